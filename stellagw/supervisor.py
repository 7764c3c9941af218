"""One gateway instance = a supervisor and N worker processes sharing ports.

Each worker opens its own listening socket on the same port with SO_REUSEPORT; the kernel
spreads new connections across them. The supervisor binds nothing it serves: when a port
is 0 it reserves a free one first (a bound, non-listening SO_REUSEPORT socket it keeps), so
every worker agrees on the port. A worker that dies is restarted (with a short backoff when
it dies young); SIGTERM/SIGINT are forwarded and the supervisor exits when all workers have.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import signal
import socket
import sys
import time

from .gateway import check_httptools_strict, run_worker
from .observe.logs import JsonLog


def _reserve_port(host: str, port: int) -> tuple[int, socket.socket | None]:
    if port != 0:
        return port, None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock.getsockname()[1], sock


def _with_ports(settings, http_port: int, transport_ports: dict):
    gw = settings.gateway
    http = dataclasses.replace(gw.http, port=http_port)
    transports = gw.transports
    for kind, port in transport_ports.items():
        transports = dataclasses.replace(
            transports, **{kind: dataclasses.replace(getattr(transports, kind), port=port)})
    return dataclasses.replace(settings, gateway=dataclasses.replace(
        gw, http=http, transports=transports))


def serve(settings) -> int:
    check_httptools_strict()
    workers = settings.gateway.node.workers or os.cpu_count() or 1
    if workers == 1:
        return run_worker(settings, 0)

    log = JsonLog(settings.gateway.logging.level)
    log.extra = {"node": settings.gateway.node.node_id, "role": "supervisor"}
    http = settings.gateway.http
    reservations = []
    port, sock = _reserve_port(http.host, http.port)
    reservations.append(sock)
    # Service transports: the shared port, and one private port per worker that the
    # HELLO_ACK names so services can reach every worker (docs/protocol.md).
    public, private = {}, {}
    for kind in ("tcp", "tls"):
        node = getattr(settings.gateway.transports, kind)
        if not node.enabled:
            continue
        public[kind], sock = _reserve_port(node.host, node.port)
        reservations.append(sock)
        private[kind] = {}
        for wid in range(workers):
            private[kind][wid], sock = _reserve_port(node.host, 0)
            reservations.append(sock)
    settings = _with_ports(settings, port, public)
    # Shared by the workers for instance-wide /metrics (observe/metrics.py).
    run_dir = tempfile.mkdtemp(prefix="stellagw-run-")
    reservations = [s for s in reservations if s is not None]

    children: dict[int, int] = {}   # pid -> worker id
    started: dict[int, float] = {}  # worker id -> start time
    stopping = False

    def spawn(worker_id: int) -> None:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                for s in reservations:
                    s.close()
                code = run_worker(settings, worker_id, transport_ports=private, run_dir=run_dir)
            except BaseException as exc:  # the child must never return into the supervisor
                print(f"worker {worker_id} failed: {exc!r}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        children[pid] = worker_id
        started[worker_id] = time.monotonic()

    def forward(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.event("info", "supervisor starting", workers=workers, pid=os.getpid())
    log.flush()
    for i in range(workers):
        spawn(i)

    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        worker_id = children.pop(pid, None)
        if worker_id is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        log.event("error", "worker died; restarting", worker=worker_id, exit=code)
        log.flush()
        if time.monotonic() - started[worker_id] < 1.0:
            time.sleep(1.0)  # a crash loop must not spin the CPU
        if not stopping:
            spawn(worker_id)
    for s in reservations:
        s.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    log.event("info", "supervisor stopped")
    log.drain()
    return exit_code
