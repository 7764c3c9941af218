"""What one target's run measures, whatever the target.

For each target: start it pinned to ``--server-cpu`` (``taskset -c``), wait
until it answers 200, warm up 1 s, read utime+stime of the server's process
tree (psutil, workers included), run wrk pinned to ``--load-cpu``, read the
CPU again, and report requests/s, p50/p99, **server CPU-µs per request**
(Δ(utime+stime) / requests × 1e6: the steadiest figure on a shared machine),
the RSS of the tree, then an extra wrk pass with ``--latency-connections``
connection(s) for the unloaded p50.  Backends (the hello server behind nginx,
the demo service behind the gateway) run on the load CPU, next to wrk (or on
``--backend-cpu`` when the machine has a third CPU); their CPU is reported apart
and not counted in CPU-µs/req.  ``total µs/req`` adds the backend and wrk (the
whole benchmark's CPU per request); ``load CPU %`` and ``other CPU %`` show what
the load side and the rest of the machine were doing during the run.

Loopback only, bounded by --duration; every process started here runs in its
own process group and is killed on exit, on error and on Ctrl-C.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from .. import _procs
from .._procs import HOST, Proc, tree

WARMUP_S = 1


class TargetUnavailable(Exception):
    """A target cannot run here (missing command or tool): skipped with a reason."""


class TargetFailed(Exception):
    """A target was started but did not behave (died, never answered, wrk failed)."""


class ProcSet(_procs.ProcSet):
    """Every process this run starts (perf/_procs.py); a death is a TargetFailed."""

    error = TargetFailed


def wait_http_ok(port: int, path: str, procs: ProcSet, timeout: float,
                 headers: dict | None = None) -> None:
    """Poll GET path (with ``headers``) until it answers 200 (or a process dies, or timeout)."""
    last = ["no answer"]
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    req = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n{extra}"
           "Connection: close\r\n\r\n").encode()

    def answers_200() -> bool:
        try:
            with socket.create_connection((HOST, port), timeout=1) as s:
                s.sendall(req)
                head = s.recv(64)
        except OSError as exc:
            last[0] = str(exc)
            return False
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if re.match(r"HTTP/1\.[01] 200\b", status):
            return True
        last[0] = status or "empty reply"
        return False

    if not _procs.wait_until(procs, answers_200, timeout):
        raise TargetFailed(f"http://{HOST}:{port}{path} did not answer 200 within {timeout:.0f}s (last: {last[0]})")


def cpu_snapshot(root_pids: list[int]) -> dict[tuple[int, float], float]:
    """(pid, create_time) -> seconds of utime+stime, reaped children included."""
    snap: dict[tuple[int, float], float] = {}
    for p in tree(root_pids):
        try:
            with p.oneshot():
                t = p.cpu_times()
                snap[(p.pid, p.create_time())] = (
                    t.user + t.system + t.children_user + t.children_system
                )
        except psutil.Error:
            pass
    return snap


def cpu_split(root_pids: list[int]) -> tuple[float, float]:
    """(user, system) seconds of the trees, reaped children included."""
    user = system = 0.0
    for p in tree(root_pids):
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        user += t.user + t.children_user
        system += t.system + t.children_system
    return user, system


def _tree_keys(pid: int) -> set[tuple[int, float]]:
    keys = set()
    for p in tree([pid]):
        try:
            keys.add((p.pid, p.create_time()))
        except psutil.Error:
            pass
    return keys


def _only(snap: dict, keys: set) -> dict:
    return {k: v for k, v in snap.items() if k in keys}


def cpu_delta(before: dict, after: dict) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items())


def children_cpu_s() -> float:
    """utime+stime of this process's reaped children (wrk, once it has been waited for)."""
    import resource
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def machine_cpu_s() -> float:
    """Seconds of user+nice+system CPU on the whole machine (interrupt time left out on
    both sides, since per-process times may or may not include it)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system


def machine_steal_s() -> float:
    """Seconds the hypervisor ran something else while this machine's CPUs wanted to run
    (steal, summed over the CPUs; 0 on bare metal and where the kernel does not count it)."""
    return getattr(psutil.cpu_times(), "steal", 0.0)


def rss_bytes(root_pids: list[int]) -> int:
    total = 0
    for p in tree(root_pids):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value)
    if not m:
        raise ValueError(value)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(text: str) -> dict:
    """Requests/s, p50/p99 (ms), total requests and error counts from wrk --latency."""
    out: dict = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if not m:
        raise ValueError("no Requests/sec line")
    out["req_per_s"] = float(m.group(1))
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    if not m:
        raise ValueError("no 'N requests in' line")
    out["requests"] = int(m.group(1))
    out["wrk_duration_s"] = _ms(m.group(2) + m.group(3)) / 1e3
    for pct in ("50", "99"):
        m = re.search(rf"^\s*{pct}(?:\.0+)?%\s+([\d.]+(?:us|ms|s|m|h))", text, re.M)
        out[f"p{pct}_ms"] = _ms(m.group(1)) if m else None
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(m.group(1)) if m else 0
    return out


@dataclass
class Pinning:
    enabled: bool
    server_cpu: int | None
    load_cpu: int | None
    note: str
    backend_cpu: int | None = None   # --backend-cpu: the backend on a CPU of its own

    def wrap(self, cpu, cmd: list[str]) -> list[str]:
        """``cpu``: one CPU, a list of CPUs, or None (unpinned)."""
        if not self.enabled or cpu is None or cpu == []:
            return cmd
        return _procs.taskset(cpu, cmd)

    @property
    def backend(self) -> int | None:
        """Where backends run: --backend-cpu when given, else next to wrk."""
        return self.backend_cpu if self.backend_cpu is not None else self.load_cpu


UNPINNED = Pinning(False, None, None, "unpinned")


@dataclass
class Settings:
    duration: int
    connections: int
    threads: int
    latency_connections: int
    latency_duration: int
    start_timeout: float
    pin: Pinning
    python: str
    worker_quota: float | None = None    # --worker-cpu-quota: each gateway worker's CPU share


@dataclass
class Started:
    """What a target's setup hands back to the measuring loop."""

    port: int
    path: str
    measured: list[Proc]                 # server-side trees counted in CPU-µs/req
    backends: list[Proc] = field(default_factory=list)  # reported apart
    layout: str = ""                     # who runs on which CPU, for the output
    pin: Pinning | None = None           # this target's own pinning (None: the run's)
    server_cpus: int = 1                 # CPUs the measured server is pinned to
    # Called after the measured run with the requests wrk completed: checks that the
    # target did what it claims (e.g. every request went through the rate limiter) and
    # returns figures for the JSON / notes; raises TargetFailed when it did not.
    verify: Callable[[int], dict] | None = None
    # --worker-cpu-quota: each worker's throttling counters (periods, throttled) so far
    quotas: list[Callable[[], dict]] = field(default_factory=list)


def wrk_cmd(s: Settings, port: int, path: str, connections: int, duration: int,
            pin: Pinning | None = None) -> list[str]:
    threads = max(1, min(s.threads, connections))
    pin = pin or s.pin
    return pin.wrap(
        pin.load_cpu,
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
         f"http://{HOST}:{port}{path}"],
    )


def run_wrk(procs: ProcSet, cmd: list[str], duration: int) -> tuple[dict, str]:
    p = procs.start(f"wrk-{len(procs.procs)}", cmd)
    try:
        p.popen.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        _procs.killpg(p.popen.pid, signal.SIGKILL)
        raise TargetFailed(f"wrk did not finish in {duration + 30}s: {shlex.join(cmd)}")
    procs.procs.remove(p)
    text = p.log.read_text(errors="replace")
    if p.popen.returncode != 0:
        raise TargetFailed(f"wrk exited {p.popen.returncode}: {shlex.join(cmd)}\n{text.strip()}")
    try:
        return parse_wrk(text), text
    except ValueError as exc:
        raise TargetFailed(f"cannot parse wrk output ({exc}):\n{text.strip()}") from None


def decide_pinning(server_cpu: int, load_cpu: int, no_pin: bool,
                   backend_cpu: int | None = None) -> Pinning:
    usable = sorted(os.sched_getaffinity(0))
    if no_pin:
        return Pinning(False, None, None, "disabled (--no-pin)")
    if backend_cpu is not None:
        if len(usable) < 3:
            raise SystemExit(f"--backend-cpu needs 3 usable CPUs (server, load, backend); "
                             f"this machine has {len(usable)}: {usable}")
        if backend_cpu not in usable or backend_cpu in (server_cpu, load_cpu):
            raise SystemExit(f"--backend-cpu {backend_cpu} must be a usable CPU other than "
                             f"--server-cpu and --load-cpu (usable: {usable})")
    if len(usable) < 2:
        return Pinning(False, None, None,
                       f"off: only {len(usable)} usable CPU, server and wrk share it (figures are pessimistic)")
    if not shutil.which("taskset"):
        raise SystemExit("taskset not found (util-linux): install it or pass --no-pin")
    for label, cpu in (("--server-cpu", server_cpu), ("--load-cpu", load_cpu)):
        if cpu not in usable:
            raise SystemExit(f"{label} {cpu} is not usable here (usable CPUs: {usable})")
    if server_cpu == load_cpu:
        raise SystemExit("--server-cpu and --load-cpu must differ")
    if backend_cpu is not None:
        return Pinning(True, server_cpu, load_cpu,
                       f"server CPU {server_cpu} (measured server only), load CPU {load_cpu} (wrk), "
                       f"backend CPU {backend_cpu} (the backend behind nginx / the gateway); "
                       f"{len(usable)} usable CPUs", backend_cpu)
    return Pinning(True, server_cpu, load_cpu,
                   f"server CPU {server_cpu} (measured server only), load CPU {load_cpu} "
                   f"(wrk, plus the backend behind nginx / the gateway); {len(usable)} usable CPUs")


def measure(name: str, start: Callable[[Settings, ProcSet, Path], Started], s: Settings) -> dict:
    """One run of target ``name``, which ``start`` sets up; never raises for a target that
    could not run or misbehaved: the result says so (``ok``, ``error``, ``unavailable``)."""
    result: dict = {"target": name, "ok": False}
    with tempfile.TemporaryDirectory(prefix=f"stellagw-perf-{name}-") as tmpname:
        tmp = Path(tmpname)
        procs = ProcSet(tmp)
        try:
            st = start(s, procs, tmp)
            result["layout"] = st.layout
            result["pinned"] = (st.pin or s.pin).enabled
            result["server_cpus"] = st.server_cpus
            result["server_cmd"] = [shlex.join(p.cmd) for p in st.measured]
            result["backend_cmd"] = [shlex.join(p.cmd) for p in st.backends]
            server_pids = [p.popen.pid for p in st.measured]
            backend_pids = [p.popen.pid for p in st.backends]

            run_wrk(procs, wrk_cmd(s, st.port, st.path, s.connections, WARMUP_S, st.pin), WARMUP_S)
            procs.check_alive()

            cmd = wrk_cmd(s, st.port, st.path, s.connections, s.duration, st.pin)
            result["wrk_cmd"] = shlex.join(cmd)
            srv0, bk0, t0 = cpu_snapshot(server_pids), cpu_snapshot(backend_pids), time.monotonic()
            ch0, sys0, steal0 = children_cpu_s(), machine_cpu_s(), machine_steal_s()
            q0 = [q() for q in st.quotas]
            wrk, text = run_wrk(procs, cmd, s.duration)
            q1 = [q() for q in st.quotas]
            srv1, bk1, t1 = cpu_snapshot(server_pids), cpu_snapshot(backend_pids), time.monotonic()
            if st.quotas:
                # share of quota periods in which each worker was throttled: near 1 means
                # the quota, not the load, bounded the worker
                result["worker_cpu_quota"] = s.worker_quota
                result["worker_throttled"] = [
                    (b["throttled"] - a["throttled"]) / max(1, b["periods"] - a["periods"])
                    for a, b in zip(q0, q1)]
            ch1, sys1, steal1 = children_cpu_s(), machine_cpu_s(), machine_steal_s()
            result["rss_bytes"] = rss_bytes(server_pids)
            result["server_processes"] = len(srv1)
            procs.check_alive()

            n = wrk["requests"]
            if n <= 0:
                raise TargetFailed(f"wrk completed no requests:\n{text.strip()}")
            cpu_s, bk_s = cpu_delta(srv0, srv1), cpu_delta(bk0, bk1)
            # Each backend apart too (the demo service; valkey-server for the rl-env row).
            result["backend_cpu_us_per_req_by_name"] = {
                b.name: cpu_delta(*(_only(snap, _tree_keys(b.popen.pid)) for snap in (bk0, bk1)))
                / n * 1e6 for b in st.backends}
            result.update(wrk)
            result["wrk_output"] = text
            result["cpu_s"] = cpu_s
            result["cpu_us_per_req"] = cpu_s / n * 1e6
            result["server_cpu_util"] = cpu_s / (t1 - t0)
            result["backend_cpu_us_per_req"] = bk_s / n * 1e6 if backend_pids else None
            # wrk's own CPU (it is our only child reaped in the window), the whole
            # benchmark per request, and what the rest of the machine did meanwhile.
            wrk_s = ch1 - ch0
            result["wrk_cpu_us_per_req"] = wrk_s / n * 1e6
            result["total_cpu_us_per_req"] = (cpu_s + bk_s + wrk_s) / n * 1e6
            result["load_cpu_util"] = (bk_s + wrk_s) / (t1 - t0)
            result["other_cpu_util"] = max(0.0, (sys1 - sys0) - (cpu_s + bk_s + wrk_s)) / (t1 - t0)
            # Time the hypervisor took from the VM: the load and the server ran slower than
            # the figures assume, and a starved load side leaves the server less saturated.
            result["steal_util"] = (steal1 - steal0) / (t1 - t0)

            if s.latency_connections > 0:
                lcmd = wrk_cmd(s, st.port, st.path, s.latency_connections, s.latency_duration, st.pin)
                result["wrk_latency_cmd"] = shlex.join(lcmd)
                lat, _ = run_wrk(procs, lcmd, s.latency_duration)
                result["lat_req_per_s"] = lat["req_per_s"]
                result["lat_p50_ms"] = lat["p50_ms"]
                result["lat_p99_ms"] = lat["p99_ms"]
                procs.check_alive()
            if st.verify is not None:      # after every run: its CPU is not in any figure
                result.update(st.verify(n))
            result["ok"] = True
        except (TargetUnavailable, TargetFailed) as exc:
            result["error"] = str(exc)
            result["unavailable"] = isinstance(exc, TargetUnavailable)
        finally:
            procs.stop_all()
    return result

