"""What uploads cost the gateway in memory (issue 15): RSS before, during and after N
concurrent uploads of S MB to a slow service, then anonymous uploads to an unknown route;
one gateway checkout or several side by side (a baseline worktree beside this one).

    python -m perf uploads                                   # this checkout
    git worktree add /tmp/base e46f73b && (cd /tmp/base && python setup.py -q build_ext --inplace)
    python -m perf uploads --checkout /tmp/base --checkout .  # before | after, one run

Each checkout's gateway runs from its own tree (`python -m stellagw serve`, 1 worker); the
service is this checkout's tests/support/services.py (POST /t/up/upload?ms=M pauses M ms per MiB it
takes), so only the gateway differs. Everything on 127.0.0.1; every process this starts is
stopped by its pid at the end. Prints one row per checkout:

    rss start | peak during the uploads | after (settled) | peak during the refused uploads
    | wall time of the uploads | bytes the refused clients got out before the answer
"""
from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import commands
from ._procs import HOST, REPO_DIR, free_port

MB = 1024 * 1024


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def request(port: int, raw: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(raw)
        return read_response(s)[0]


def read_response(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            return buf, b""
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return head, body


def send_body(s: socket.socket, size: int) -> int:
    chunk = b"z" * 65536
    sent = 0
    try:
        while sent < size:
            n = min(len(chunk), size - sent)
            s.sendall(chunk[:n])
            sent += n
    except OSError:
        pass
    return sent


class Sampler:
    """The gateway's RSS every 20 ms while a phase runs; its peak."""

    def __init__(self, pid: int):
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(checkout: Path, clients: int, size_mb: int, service_ms: int, refused: int,
            workdir: Path) -> dict:
    http, tcp = free_port(), free_port()
    cfg = workdir / f"gateway-{abs(hash(str(checkout)))}.yaml"
    cfg.write_text(
        "gateway:\n"
        "  node: {workers: 1}\n"
        f"  http: {{host: {HOST}, port: {http}, maxConnections: 1000}}\n"
        f"  transports: {{tcp: {{host: {HOST}, port: {tcp}}}}}\n"
        "  routing: {maxRequestBodySize: 200MB}\n"
        "  logging: {accessLog: false}\n")
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONUNBUFFERED="1")
    env.pop("STELLAGW_NO_EXTENSIONS", None)
    log = open(workdir / "gateway.log", "ab")
    gw = subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                          cwd=checkout, env=env, stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)
    svc_env = dict(os.environ, PYTHONPATH=str(REPO_DIR))
    svc = subprocess.Popen([sys.executable, "-m", "tests.services", "--name", "up", "--gateway",
                            f"{HOST}:{tcp}", "--instance", "up-1"], cwd=REPO_DIR, env=svc_env,
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs = [svc, gw]
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if request(http, b"GET /t/up/whoami HTTP/1.1\r\nHost: t\r\n\r\n").startswith(
                        b"HTTP/1.1 200"):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or gw.poll() is not None:
                raise RuntimeError(f"gateway of {checkout} did not come up: see {workdir}/gateway.log")
            time.sleep(0.2)
        time.sleep(1.0)
        start = rss(gw.pid)
        size = size_mb * MB
        expect = hashlib.sha256(b"z" * size).hexdigest().encode()
        ok = []

        def upload():
            with socket.create_connection((HOST, http), timeout=300) as s:
                s.sendall(b"POST /t/up/upload?ms=%d HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                          % (service_ms, size))
                send_body(s, size)
                head, body = read_response(s)
                ok.append(head.startswith(b"HTTP/1.1 200") and expect in body)

        t0 = time.monotonic()
        with Sampler(gw.pid) as during:
            threads = [threading.Thread(target=upload) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall = time.monotonic() - t0
        time.sleep(2.0)          # two ticks: what closing gives back has gone back
        after = rss(gw.pid)
        sent = []

        def anonymous():
            with socket.create_connection((HOST, http), timeout=60) as s:
                s.sendall(b"POST /nowhere/at/all HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                          % size)
                sent.append(send_body(s, size))
                read_response(s)

        with Sampler(gw.pid) as refusing:
            threads = [threading.Thread(target=anonymous) for _ in range(refused)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        time.sleep(2.0)
        return {"checkout": str(checkout), "start": start, "peak": during.peak, "after": after,
                "refused_peak": refusing.peak, "end": rss(gw.pid), "wall": wall,
                "ok": sum(ok), "clients": clients,
                "refused_sent": sorted(sent)[len(sent) // 2] if sent else 0}
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        log.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n")[0])
    ap.add_argument("--checkout", action="append", type=Path,
                    help="a checkout whose gateway to measure (repeatable; default: this one)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--size-mb", type=int, default=50)
    ap.add_argument("--service-ms", type=int, default=20, help="service pause per MiB taken")
    ap.add_argument("--refused", type=int, default=5, help="anonymous uploads to an unknown route")
    args = ap.parse_args(argv)
    checkouts = [c.resolve() for c in (args.checkout or [REPO_DIR])]
    rows = []
    with tempfile.TemporaryDirectory(prefix="stellagw-uploads-") as tmp:
        for checkout in checkouts:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=checkout,
                                    capture_output=True, text=True).stdout.strip()
            print(f"[uploads] {checkout} ({commit}): {args.clients} × {args.size_mb} MB, "
                  f"service {args.service_ms} ms/MiB ...", flush=True)
            row = measure(checkout, args.clients, args.size_mb, args.service_ms, args.refused,
                          Path(tmp))
            row["commit"] = commit
            rows.append(row)
    print()
    print(f"{args.clients} concurrent uploads of {args.size_mb} MB to a service pausing "
          f"{args.service_ms} ms per MiB; then {args.refused} anonymous {args.size_mb} MB "
          "uploads to an unknown route. Gateway RSS, MB:")
    print()
    print("| checkout | start | peak (uploads) | after | peak (refused) | end | uploads ok | "
          "wall s | refused client got out |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkout']} ({r['commit']}) | {r['start'] / MB:.0f} | {r['peak'] / MB:.0f} "
              f"| {r['after'] / MB:.0f} | {r['refused_peak'] / MB:.0f} | {r['end'] / MB:.0f} "
              f"| {r['ok']}/{r['clients']} | {r['wall']:.1f} | {r['refused_sent'] / MB:.1f} MB |")
    print()
    print("command: " + commands.command_line(__name__, argv))
    return 0

