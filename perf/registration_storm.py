"""Registration storm: the worker's longest event-loop stall, and a steady client's latency,
while 200 service instances x 200 endpoints register and then all drop at once (issue 16).

    python -m perf registration-storm                        # this checkout, ~30 s
    python -m perf registration-storm --base /tmp/base       # and the same run on another tree
    python -m perf registration-storm --instances 60 --endpoints 50 --services 20   # smaller

``--base DIR`` is a checkout with its Cython extensions built, e.g. the commit before the
incremental router::

    git worktree add --detach /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)

What runs (loopback only; every process started here is stopped at the end):

* the gateway: one worker (``run_worker``'s start-up: uvloop, ``gc.freeze()`` after start),
  pinned to ``--server-cpu``, with a **stall probe** on its loop: a 1 ms timer whose
  lateness (measured with ``perf_counter``) is the time the loop could not run a callback.
  SIGUSR1 makes it write the longest lateness since the last report, and every one
  above 5 ms, to a file;
* a steady service (``GET /steady/hello``) and, in this process, a steady client: a
  request every ``--interval`` ms on a fixed schedule, over ``--connections`` keep-alive
  connections (latency is counted from the scheduled time, so a stalled gateway shows in
  full, not hidden by the client waiting), plus a probe of one storm route
  (``GET /storm/s00/r0``) every 20 ms whose answers are counted (200 / 503 / 404 ...);
* ``--hosts`` processes hosting the storm's SDK services (``--instances`` in all, spread
  over ``--services`` service names, ``--endpoints`` templates each). They build every
  service first, then connect all at once on SIGUSR1 (the **register** phase ends when
  the worker has every instance registered); later all hosts are SIGKILLed at the same
  instant (the **drop** phase ends when the worker has none of them).

Everything but the gateway runs on ``--load-cpu``. Figures are printed, not asserted;
correctness under a storm is tested in tests/routing/test_registration_storm.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from . import _procs
from ._procs import HOST, REPO_DIR

STALL_REPORT_MS = 5.0       # the probe lists every lateness above this
PROBE_PERIOD = 0.001


# --------------------------------------------------------------------------- children


def child_gateway(config: str, report: str) -> None:
    """The gateway worker, started as run_worker does, plus the stall probe. SIGUSR2 writes
    how many storm instances are registered (``<report>.count``): the end of the drop, read
    the same way from any tree."""
    import gc

    import uvloop

    from stellagw.config import load_config_text
    from stellagw.gateway import Worker

    settings = load_config_text(Path(config).read_text(), env={})

    async def main():
        loop = asyncio.get_running_loop()
        worker = Worker(settings, 0)
        await worker.start()
        gc.collect()
        gc.freeze()
        stalls: list[float] = []
        worst = [0.0]
        due = [time.perf_counter() + PROBE_PERIOD]
        # Collector pauses, so that a stall can be told from a full collection of what the
        # storm allocated (the worker froze everything older at start-up).
        gc_pauses: list[float] = []
        gc_start = [0.0]

        def on_gc(phase, info):
            if phase == "start":
                gc_start[0] = time.perf_counter()
            else:
                ms = (time.perf_counter() - gc_start[0]) * 1000.0
                if ms > 1.0:
                    gc_pauses.append(round(ms, 1))
        gc.callbacks.append(on_gc)

        def tick():
            now = time.perf_counter()
            late = (now - due[0]) * 1000.0
            if late > worst[0]:
                worst[0] = late
            if late > STALL_REPORT_MS:
                stalls.append(round(late, 1))
            due[0] = now + PROBE_PERIOD
            loop.call_later(PROBE_PERIOD, tick)

        def dump():
            with open(report, "a") as fh:
                fh.write(json.dumps({"max_ms": round(worst[0], 1), "stalls": stalls[:],
                                     "gc_ms": gc_pauses[:]}) + "\n")
            stalls.clear()
            gc_pauses.clear()
            worst[0] = 0.0

        def count():
            n = sum(1 for i in list(worker.routing.instances.values()) if i.service != "steady")
            with open(report + ".count", "a") as fh:
                fh.write(f"{n}\n")

        loop.call_later(PROBE_PERIOD, tick)
        loop.add_signal_handler(signal.SIGUSR1, dump)
        loop.add_signal_handler(signal.SIGUSR2, count)
        loop.add_signal_handler(signal.SIGTERM, loop.stop)
        print("probe ready", flush=True)
        await asyncio.Event().wait()

    try:
        uvloop.run(main())
    except RuntimeError:          # loop.stop() on SIGTERM
        pass


def child_machine(report: str) -> None:
    """A sleeping process on the gateway's CPU: how late its 1 ms sleeps wake is what the
    machine (other processes, the hypervisor) takes from that CPU, to tell from the
    gateway's own stalls."""
    worst, stalls = [0.0], []

    def dump(signum, frame):
        with open(report, "a") as fh:
            fh.write(json.dumps({"max_ms": round(worst[0], 1), "stalls": stalls[:]}) + "\n")
        stalls.clear()
        worst[0] = 0.0

    signal.signal(signal.SIGUSR1, dump)
    print("probe ready", flush=True)
    while True:
        due = time.perf_counter() + PROBE_PERIOD
        time.sleep(PROBE_PERIOD)
        late = (time.perf_counter() - due) * 1000.0
        worst[0] = max(worst[0], late)
        if late > STALL_REPORT_MS:
            stalls.append(round(late, 1))


def endpoints_of(name: str, count: int) -> list[tuple[str, str]]:
    """Literal and parameter templates, four per resource, as a CRUD service declares them."""
    out = []
    for j in range(count):
        base = f"/storm/{name}/r{j // 4}"
        out.append([("GET", base), ("POST", base), ("GET", base + "/{id}"),
                    ("DELETE", base + "/{id}")][j % 4])
    return out


def child_services(gateway: str, names: list[str], endpoints: int, steady: bool) -> None:
    import uvloop

    from stellagw.service import Response, Service

    async def ok(req):
        return Response(b"ok")

    if not steady:
        # The hosts share the load CPU with the steady service and client: they yield to
        # them, so the client's latency is the gateway's, not this benchmark's.
        os.nice(19)

    async def main():
        services = []
        for spec in names:
            name, instance = spec.split("@")
            svc = Service(name, "1.0.0", gateways=[gateway], region="eu1", instance_id=instance,
                          reconnect_min=0.05, reconnect_max=0.5)
            if steady:
                svc.get("/steady/hello")(ok)
            else:
                for method, template in endpoints_of(name, endpoints):
                    svc.route(method, template)(ok)
            services.append(svc)
        go = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, go.set)
        print(f"built {len(services)}", flush=True)
        if not steady:
            await go.wait()
        t0 = time.perf_counter()
        for svc in services:
            await svc.start()
        await asyncio.gather(*(svc.wait_registered(timeout=600) for svc in services))
        print(f"registered {len(services)} in {time.perf_counter() - t0:.3f} s", flush=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# --------------------------------------------------------------------------- the client


class Client:
    """Requests on a fixed schedule over `connections` keep-alive connections (each its own
    thread, staggered), every `interval` in all; records (scheduled time, latency, status).
    Several connections, as from several clients: one slow answer delays the next request
    of its own connection only, and a stall still shows in full."""

    def __init__(self, port: int, path: str, interval: float, connections: int = 1):
        self.port, self.path = port, path
        self.period = interval * connections
        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        start = time.perf_counter() + 0.05
        self._threads = [threading.Thread(target=self._run, args=(start + k * interval,),
                                          daemon=True) for k in range(connections)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _connect(self):
        sock = socket.create_connection((HOST, self.port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _run(self, due: float):
        raw = b"GET %s HTTP/1.1\r\nHost: storm\r\n\r\n" % self.path.encode()
        sock, buf = self._connect(), bytearray()
        while not self._stop.is_set():
            now = time.perf_counter()
            if now < due:
                time.sleep(due - now)
            try:
                sock.sendall(raw)
                status = _read_status(sock, buf)
            except OSError:
                sock.close()
                sock, buf, status = self._connect(), bytearray(), 0
            self.samples.append((due, time.perf_counter() - due, status))
            due += self.period
            if time.perf_counter() - due > 1.0:      # far behind: do not burst to catch up
                due = time.perf_counter()

    def window(self, t0: float, t1: float):
        return [s for s in self.samples if t0 <= s[0] < t1]


def _read_status(sock, buf: bytearray) -> int:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in a body")
        rest += chunk
    buf[:] = rest[length:]
    return status


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# --------------------------------------------------------------------------- one run


class Run:
    def __init__(self, args, tree: Path, label: str, workdir: Path):
        self.args, self.tree, self.label, self.workdir = args, tree, label, workdir
        self.procs = _procs.ProcSet(workdir)
        # The tree's stellagw; this checkout's perf, unless the tree has a perf package of
        # its own (a plain perf/ directory there does not hide this one).
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(tree), str(REPO_DIR))),
                        PYTHONUNBUFFERED="1", PYTHONHASHSEED="0")
        self.env.pop("STELLAGW_NO_EXTENSIONS", None)
        self.http, self.tcp = _procs.free_port(), _procs.free_port()
        self.report = workdir / "stalls.jsonl"
        self.machine_report = workdir / "machine.jsonl"
        self.results: dict[str, dict] = {}

    def start(self, name, cpu, *argv):
        # -P: the working directory (this checkout) must not come before the tree's stellagw
        cmd = _procs.taskset(cpu, [sys.executable, "-P", "-m", "perf.registration_storm", *argv])
        return self.procs.start(name, cmd, env=self.env)

    def wait_log(self, proc, text, timeout, count=1):
        ok = _procs.wait_until(self.procs, lambda: proc.log.read_text(errors="replace")
                               .count(text) >= count, timeout, 0.02)
        if not ok:
            raise RuntimeError(f"{proc.name}: no {text!r} within {timeout}s\n{proc.log_tail()}")

    def probe(self, proc=None, report=None) -> dict:
        proc, report = proc or self.gateway, report or self.report
        n = len(report.read_text().splitlines()) if report.exists() else 0
        os.kill(proc.popen.pid, signal.SIGUSR1)
        _procs.wait_until(self.procs, lambda: report.exists() and len(
            report.read_text().splitlines()) > n, 30, 0.02)
        return json.loads(report.read_text().splitlines()[n])

    def storm_instances(self) -> int:
        counts = Path(str(self.report) + ".count")
        n = len(counts.read_text().splitlines()) if counts.exists() else 0
        os.kill(self.gateway.popen.pid, signal.SIGUSR2)
        # The worker answers when its loop runs again: on a tree that rebuilds its router
        # per disconnect, tens of seconds later.
        if not _procs.wait_until(self.procs, lambda: counts.exists() and len(
                counts.read_text().splitlines()) > n, 900, 0.01):
            raise RuntimeError(f"{self.label}: the worker did not count its instances")
        return int(counts.read_text().splitlines()[n])

    def phase(self, name, t0, t1, extra=None):
        stall = self.probe()
        machine = self.probe(self.machine, self.machine_report)
        steady = self.client.window(t0, t1)
        lat = [s[1] * 1000.0 for s in steady]
        probe = {}
        for _, _, status in self.storm.window(t0, t1):
            probe[status] = probe.get(status, 0) + 1
        self.results[name] = {"seconds": t1 - t0, "stall_max_ms": stall["max_ms"],
                              "machine_max_ms": machine["max_ms"],
                              "stalls_over_50ms": sum(1 for x in stall["stalls"] if x > 50),
                              "stalls": stall["stalls"], "gc_ms": stall.get("gc_ms", []),
                              "n": len(lat),
                              "p50_ms": _quantile(lat, 0.50), "p99_ms": _quantile(lat, 0.99),
                              "max_ms": max(lat, default=float("nan")),
                              "steady_errors": sum(1 for s in steady if s[2] != 200),
                              "storm_route": probe, **(extra or {})}

    def run(self) -> dict:
        a = self.args
        cfg = self.workdir / "gateway.yaml"
        cfg.write_text(
            "gateway:\n"
            f"  node: {{region: eu1, workers: 1}}\n"
            f"  http: {{host: {HOST}, port: {self.http}}}\n"
            f"  transports: {{tcp: {{host: {HOST}, port: {self.tcp}, maxConnections: 4096}}}}\n"
            "  logging: {level: warning, accessLog: false}\n"
            "  openapi: {enabled: false}\n")
        try:
            self.gateway = self.start("gateway", a.server_cpu, "_gateway", str(cfg),
                                      str(self.report))
            self.wait_log(self.gateway, "probe ready", 60)
            self.machine = self.start("machine", a.server_cpu, "_machine",
                                      str(self.machine_report))
            self.wait_log(self.machine, "probe ready", 60)
            steady = self.start("steady", a.load_cpu, "_services", f"{HOST}:{self.tcp}",
                                "0", "--steady", "steady@steady-1")
            self.wait_log(steady, "registered", 60)
            per = max(1, a.instances // a.services)
            specs = [f"s{k % a.services:02d}@s{k % a.services:02d}-{k // a.services}"
                     for k in range(a.instances)]
            hosts = [self.start(f"host{h}", a.load_cpu, "_services", f"{HOST}:{self.tcp}",
                                str(a.endpoints), *specs[h::a.hosts]) for h in range(a.hosts)]
            for h in hosts:
                self.wait_log(h, "built", 300)
            self.client = Client(self.http, "/steady/hello", a.interval / 1000.0,
                                 a.connections).start()
            self.storm = Client(self.http, "/storm/s00/r0", 0.02).start()
            time.sleep(1.0)
            t = time.perf_counter()
            self.probe()                                          # reset
            self.probe(self.machine, self.machine_report)
            time.sleep(a.settle)
            self.phase("idle", t, time.perf_counter())

            t0 = time.perf_counter()
            for h in hosts:
                os.kill(h.popen.pid, signal.SIGUSR1)
            for h in hosts:
                self.wait_log(h, "registered", 900)
            t_ack = time.perf_counter() - t0
            # Acknowledged is not yet routed: HELLOs beyond a loop iteration's budget wait.
            if not _procs.wait_until(self.procs, lambda: self.storm_instances() == a.instances,
                                     900, 0.02):
                print(f"[{self.label}] warning: {self.storm_instances()} of {a.instances} "
                      f"storm instances registered in the worker", file=sys.stderr)
            t_reg = time.perf_counter() - t0
            time.sleep(a.settle)
            self.phase("register", t0, time.perf_counter(),
                       {"all_acked_s": t_ack, "all_routed_s": t_reg, "instances": a.instances,
                        "endpoints": a.endpoints, "services": a.services,
                        "per_service": per})

            t0 = time.perf_counter()
            for h in hosts:                         # all at once: one signal per group
                _procs.killpg(h.popen.pid, signal.SIGKILL)
            for h in hosts:
                self.procs.procs.remove(h)
            ok = _procs.wait_until(self.procs, lambda: self.storm_instances() == 0, 900, 0.2)
            t_drop = time.perf_counter() - t0
            for h in hosts:
                h.popen.wait(10)
            time.sleep(a.settle)
            self.phase("drop", t0, time.perf_counter(),
                       {"all_gone_s": t_drop if ok else float("nan")})
        finally:
            for c in (getattr(self, "client", None), getattr(self, "storm", None)):
                if c is not None:
                    c.stop()
            self.procs.stop_all()
        return self.results


# --------------------------------------------------------------------------- main


def _print(results: dict[str, dict], args) -> None:
    labels = list(results)
    print()
    print(f"registration storm: {args.instances} instances ({args.services} services x "
          f"{max(1, args.instances // args.services)}) x {args.endpoints} endpoints, "
          f"{args.hosts} host processes; steady client: a request every {args.interval} ms "
          f"over {args.connections} connections")
    print(f"{'phase':<9} {'tree':<6} {'loop stall max':>15} {'>50ms':>6} {'machine':>8} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'n':>6} {'phase s':>8}  storm route answers")
    for phase in ("idle", "register", "drop"):
        for label in labels:
            r = results[label].get(phase)
            if r is None:
                continue
            done = r.get("all_routed_s", r.get("all_gone_s"))
            print(f"{phase:<9} {label:<6} {r['stall_max_ms']:>12.1f} ms {r['stalls_over_50ms']:>6} "
                  f"{r['machine_max_ms']:>8.1f} "
                  f"{r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['max_ms']:>8.1f} {r['n']:>6} "
                  f"{(done if done is not None else r['seconds']):>8.2f}  "
                  + " ".join(f"{k}:{v}" for k, v in sorted(r["storm_route"].items())))
    print("loop stall max: the gateway's longest event-loop stall (its 1 ms timer's worst "
          "lateness); machine: the same for a sleeping process on its CPU (what the rest of "
          "the machine took). p50/p99/max: the steady client's latency, ms. phase s: register "
          "= until the worker had every instance registered; drop = until it had none; "
          "idle = the settle window.")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=200)
    p.add_argument("--services", type=int, default=50,
                   help="service names the instances are spread over (default 50: 4 each)")
    p.add_argument("--endpoints", type=int, default=200)
    p.add_argument("--hosts", type=int, default=4, help="processes hosting the instances")
    p.add_argument("--interval", type=float, default=5.0,
                   help="steady client: a request every this many ms, over --connections")
    p.add_argument("--connections", type=int, default=4, help="steady client connections")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after each phase")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--base", type=Path, help="another checkout (extensions built) to run too")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    _procs.stop_on_sigterm()
    if os.cpu_count() and os.cpu_count() < 2:
        args.server_cpu = args.load_cpu = 0
    os.sched_setaffinity(0, {args.load_cpu})
    runs = [("this", REPO_DIR)] + ([("base", args.base.resolve())] if args.base else [])
    results = {}
    for label, tree in runs:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                                capture_output=True, text=True).stdout.strip()
        print(f"[{label}] {tree} ({commit}) ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="storm-") as tmp:
            results[f"{label}"] = Run(args, tree, label, Path(tmp)).run()
    _print(results, args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_gateway":
        child_gateway(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_machine":
        child_machine(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "_services":
        rest = sys.argv[2:]
        steady = "--steady" in rest
        rest = [r for r in rest if r != "--steady"]
        child_services(rest[0], rest[2:], int(rest[1]), steady)
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:   # Ctrl-C, or SIGTERM (stop_on_sigterm): all stopped
            print("interrupted: all processes stopped", file=sys.stderr)
            sys.exit(130)
