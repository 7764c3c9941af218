"""grafana/ right on defaults, against a LIVE Prometheus scraping a real gateway (issue 19).

The test starts `stellagw serve` (its admin listener serves /metrics), Debian's `prometheus`
scraping it every second and evaluating grafana/alerts.yml every second, and takes it
through three phases in order:

1. idle — no service, no traffic but Prometheus' own scrapes: no alert pending or firing,
   and every panel that counts something reads 0, not "No data";
2. mixed traffic — two real SDK services (tests/support/services_feed.py), routed requests,
   unrouted 404s, refused tokens, client-port probes, tests.support.services' `/stream` and a slow
   streamed feed (0.5 s per request, about 3 % of its service's requests): every target of
   every panel returns data, for "All" and for one service; the latency panels stay under
   50 ms while the feed's own route reads its half second (and the old all-routes P99 would
   have been driven past 50 ms by it); no alert is pending or firing;
3. faults — slow requests on one service and a key file that stops parsing: the latency
   SLO alert goes pending for that service only and the key-refresh alert fires, so the
   quiet phases above are not quiet because a rule reads nothing.

The dashboard's structure (UID, `${DS_PROMETHEUS}` input, rows, grid), the service selector
on every panel and the metric names it uses are checked against what the gateway exports;
`promtool check metrics` validates the exposition. About 35 s.

Phase 2 holds real latencies to the 50 ms SLO, so the module is marked `alone`: make test
runs it after the other tests, which it would otherwise share the CPUs with.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.support import REPO
from tests.support.gwtest import Served, port_of
from tests.support.services import ServiceProcess, stop_services

pytestmark = pytest.mark.alone

ROOT = REPO
DASHBOARD = ROOT / "grafana" / "stella-ops-gateway-performance.json"
RULES = ROOT / "grafana" / "alerts.yml"
RATE_INTERVAL = "5s"   # Grafana's $__rate_interval is at least 4 scrape intervals (1 s here)

ROWS = ["Overview", "Latency distribution", "Throughput & rate limiting", "Pipeline breakdown",
        "Connections & resources", "Operations", 'Built-ins and unrouted (service="")']
SERVICES = ("alpha", "beta")
# How a panel whose metric has no service label applies the selector: the gateways that
# answered requests of the selected services.
NARROW = ('and on (job, instance) group by (job, instance) '
          '(gateway_requests_total{job=~"$job", instance=~"$instance", service=~"$service"})')


def _tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: `make test-tools` installs Debian's prometheus")
        pytest.skip(f"{name} not installed (apt-get install prometheus, or `make test-tools`)")
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d=None):
    return [p for p in (d or dashboard())["panels"] if p["type"] != "row"]


def rows_of(d=None) -> dict[str, str]:
    """panel title -> the title of the row it sits under."""
    out, current = {}, None
    for p in sorted((d or dashboard())["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            current = p["title"]
        else:
            out[p["title"]] = current
    return out


def expressions(d=None):
    """(panel title, refId, expr) of every target."""
    return [(p["title"], t["refId"], t["expr"]) for p in panels(d) for t in p["targets"]]


def substitute(expr: str, service: str = ".*") -> str:
    # As Grafana does: "All" is each variable's allValue (.*), or one service selected.
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$job", ".*")
            .replace("$instance", ".*").replace("$service", service))


def is_whole_gateway(title: str) -> bool:
    return "(whole gateway)" in title


# --------------------------------------------------------------------------- static checks

def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "stella-ops-gateway-performance"
    assert d["schemaVersion"] >= 36
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    assert [p["title"] for p in d["panels"] if p["type"] == "row"] == ROWS
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    occupied = set()
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"{p['title']} overlaps another panel"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            assert t["expr"].strip()
    for v in d["templating"]["list"]:
        assert v["datasource"] == ds
    kinds = {p["title"]: p["type"] for p in panels(d)}
    assert kinds["P50 latency (slowest service)"] == kinds["P99 latency (slowest service)"] == "gauge"


def test_the_service_selector_is_on_every_panel_and_builtins_stay_out_of_service_panels():
    d = dashboard()
    service_var = next(v for v in d["templating"]["list"] if v["name"] == "service")
    # The list offers routed services only; "All" matches every series.
    assert 'service!=""' in service_var["query"]["query"] and service_var["allValue"] == ".*"
    rows = rows_of(d)
    for title, ref, expr in expressions(d):
        assert "$service" in expr, f"{title} [{ref}] ignores the service selector"
        # The whole-gateway narrowing reads every request, built-ins too: any gateway that
        # answered anything is one to show under "All".
        narrowed = expr.replace(NARROW, "")
        if rows[title] == ROWS[-1]:
            continue          # the built-ins row: service="" by definition
        for metric, matchers in re.findall(r"(\w+)\{([^}]*)\}", narrowed):
            if 'service=~"$service"' in matchers and metric != "gateway_active_connections":
                # A service panel: "All" (.*) would match the built-ins' service="" too.
                assert 'service!=""' in matchers, f"{title} [{ref}]: {metric} lets built-ins in"
        if is_whole_gateway(title):
            # No service label to filter on: the selector narrows to the gateways that routed
            # the selected services (and the metric really has no service label: see the live
            # test of exported labels).
            assert NARROW in expr, title
        else:
            assert narrowed == expr, f"{title}: narrowed to gateways, but not titled so"


def test_latency_panels_leave_streamed_routes_and_builtins_out():
    d = dashboard()
    for title, ref, expr in expressions(d):
        if "gateway_request_duration_seconds" not in expr or rows_of(d)[title] == ROWS[-1]:
            continue
        if title.startswith(("P99 by route", "Routes with traffic")):
            continue          # per route: a streamed route is its own line
        assert 'unless on (job, instance, service, method, path) max_over_time(gateway_route_info' \
               in expr and 'kind="streaming"' in expr, f"{title} [{ref}]"
        if "histogram_quantile" in expr and "(service, le)" not in expr:
            pytest.fail(f"{title} [{ref}]: a percentile across services")


# --------------------------------------------------------------------------- live stack

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 for a bad expression: the body says why
        with exc:
            return json.loads(exc.read())


def _write_jwks(path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    from jwt.algorithms import ECAlgorithm
    jwk = json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    path.write_text(json.dumps({"keys": [jwk]}))


class Traffic(threading.Thread):
    """Mixed client traffic over keep-alive connections until stopped: routed requests to
    both services, tests.support.services' /stream now and then, unrouted 404s, client-port probes
    and (under 1/s, below GatewayAuthFailureSpike's floor) a malformed token. `extra` paths
    are added to the mix when set (the faults phase)."""

    MIX = ["/t/alpha/whoami", "/t/beta/whoami", "/t/alpha/whoami", "/t/beta/whoami",
           "/t/alpha/whoami", "/t/beta/whoami", "/no/such/route", "/health/live"]

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.sent = 0
        self.errors: list[str] = []
        self.statuses: dict[int, int] = {}
        self.extra: list[str] = []

    def _one(self, conn, path, headers=None):
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1
        self.sent += 1

    def run(self):
        conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=10) for _ in range(2)]
        i = 0
        last_bad_token = time.monotonic()
        while not self.halt.is_set():
            conn = conns[i % 2]
            try:
                now = time.monotonic()
                if now - last_bad_token >= 2.5:
                    last_bad_token = now
                    self._one(conn, "/t/alpha/whoami", {"Authorization": "Bearer not.a.token"})
                elif i % 40 == 0:
                    self._one(conn, "/t/alpha/stream?mb=1")
                elif self.extra and i % 5 == 0:
                    self._one(conn, self.extra[i % len(self.extra)])
                else:
                    self._one(conn, self.MIX[i % len(self.MIX)])
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
            i += 1
            time.sleep(0.015)   # ~60 requests/s: plenty, and CPU left to the gateway
        for c in conns:
            c.close()


class Feed(threading.Thread):
    """One client after another on the slow streamed feed of `beta` (0.5 s each)."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.done = 0
        self.errors: list[str] = []

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.halt.is_set():
            try:
                conn.request("GET", "/t/beta/feed")
                resp = conn.getresponse()
                body = resp.read()
                assert resp.status == 200 and body.count(b"data:") == 8, (resp.status, body)
                self.done += 1
            except (OSError, http.client.HTTPException, AssertionError) as exc:
                self.errors.append(repr(exc))
                conn.close()
                time.sleep(0.1)
        conn.close()


class Live:
    """The gateway, Prometheus and (from phase 2) services and traffic; phases only advance."""

    PHASES = ("idle", "traffic", "faults")

    def __init__(self, work: Path):
        self.work = work
        self.phase = None
        self.procs: list[ServiceProcess] = []
        self.threads: list = []
        self.gateway = None
        self.traffic = self.feed = None

    # ------------------------------------------------------------------ start / stop

    def start(self):
        prometheus = _tool("prometheus")
        self.jwks = self.work / "jwks.json"
        _write_jwks(self.jwks)
        self.gateway = Served(tmp_path=self.work, config_text=(
            "gateway:\n"
            # Two workers, as in production: instance-wide sums, the supervisor's counters.
            "  node: {workers: 2}\n"
            "  http: {host: 127.0.0.1, port: 0}\n"
            "  admin: {host: 127.0.0.1, port: 0}\n"
            "  transports: {tcp: {host: 127.0.0.1, port: 0}}\n"
            "  logging: {accessLog: false}\n"
            # A static key file, re-read every second: phase 3 breaks it.
            f"  auth: {{authority: 'https://authority.test', jwksPath: '{self.jwks}', "
            "keysRefreshInterval: 1s}\n"))
        listening = self.gateway.wait_listening(2)[0]
        self.http_port = port_of(listening["http"])
        self.admin_port = port_of(listening["admin"])
        self.transport_port = port_of(listening["tcp"])
        self.target = f"127.0.0.1:{self.admin_port}"
        cfg = self.work / "prometheus.yml"
        cfg.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            f"rule_files: ['{RULES}']\n"
            "scrape_configs:\n"
            "  - job_name: stellagw\n"
            f"    static_configs: [{{targets: ['{self.target}']}}]\n")
        port = _free_port()
        self.base = f"http://127.0.0.1:{port}"
        log = open(self.work / "prometheus.log", "wb")
        self.prom = subprocess.Popen(
            [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={self.work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def stop(self):
        for t in (self.traffic, self.feed):
            if t is not None:
                t.halt.set()
                t.join(10)
        stop_services(self.procs[::-1])
        if getattr(self, "prom", None) is not None:
            try:
                os.killpg(self.prom.pid, signal.SIGTERM)   # its own session: only it
                self.prom.wait(10)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(self.prom.pid, signal.SIGKILL)
                self.prom.wait(5)
        if self.gateway is not None:
            self.gateway.stop()

    # ------------------------------------------------------------------ Prometheus

    def query(self, expr: str) -> dict:
        return _get_json(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def result(self, expr: str) -> list:
        r = self.query(expr)
        assert r.get("status") == "success", (expr, r)
        return r["data"]["result"]

    def value(self, expr: str) -> float:
        res = self.result(expr)
        assert len(res) == 1, (expr, res)
        return float(res[0]["value"][1])

    def alerts(self) -> list[dict]:
        return [s["metric"] for s in self.result("ALERTS")]

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            if self.prom.poll() is not None:
                pytest.fail("prometheus exited:\n" + (self.work / "prometheus.log").read_text()[-2000:])
            try:
                if predicate():
                    return
            except (OSError, AssertionError, KeyError, IndexError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{what} within {timeout} s\nalerts: {self.alerts()}\n"
                            + (self.work / "prometheus.log").read_text()[-2000:])
            time.sleep(0.25)

    def last_evaluations(self) -> float:
        """The oldest last-evaluation time (Unix) over the rule groups evaluated every second."""
        import datetime
        groups = _get_json(f"{self.base}/api/v1/rules")["data"]["groups"]
        times = []
        for g in groups:
            if g["interval"] > 1:
                continue        # the 30-day group: every 5 minutes
            stamp = re.sub(r"(\.\d{6})\d*", r"\1", g["lastEvaluation"]).replace("Z", "+00:00")
            times.append(datetime.datetime.fromisoformat(stamp).timestamp())
        return min(times)

    def settle(self, rounds: int = 3):
        """Let every rule be evaluated `rounds` more times on what was scraped so far."""
        start = time.time()
        self.wait(lambda: self.last_evaluations() >= start + rounds, 15, "rule evaluations")

    # ------------------------------------------------------------------ phases

    def advance(self, phase: str):
        want = self.PHASES.index(phase)
        have = -1 if self.phase is None else self.PHASES.index(self.phase)
        if want < have:
            pytest.skip(f"the live stack is past the {phase} phase")
        for step in self.PHASES[have + 1: want + 1]:
            getattr(self, f"_enter_{step}")()
            self.phase = step

    def _enter_idle(self):
        # Enough scrapes for every [5s] window, and the rules evaluated on them.
        self.wait(lambda: self.value(f'count_over_time(up{{job="stellagw"}}[30s])') >= 6
                  and self.value(f'up{{job="stellagw"}}') == 1, 25, "six scrapes")
        self.settle()

    def _enter_traffic(self):
        for name in SERVICES:
            self.procs.append(ServiceProcess(name, self.transport_port,
                                             module="tests.support.services_feed").start())
        for name in SERVICES:
            self.wait(lambda: _status(self.http_port, f"/t/{name}/whoami") == 200, 20,
                      f"{name} registered")
        self.traffic = Traffic(self.http_port)
        self.feed = Feed(self.http_port)
        self.traffic.start()
        self.feed.start()
        # Every [5s] window filled with traffic, the feed included, and the rules run on it.
        t0 = time.monotonic()
        self.wait(lambda: self.feed.done >= 12 and time.monotonic() - t0 >= 7, 30, "traffic")
        self.wait(lambda: self.value(
            'sum(increase(gateway_request_duration_seconds_count{path="/t/beta/feed"}[5s])) > 0') > 0,
            10, "the feed in Prometheus")
        self.settle()

    def _enter_faults(self):
        # beta: one request in five to /slow (80 ms), i.e. ~5 % of its requests over 50 ms.
        self.traffic.extra = ["/t/beta/slow?ms=80"]
        self.jwks.write_text("this is not a JWKS")


def _rule_groups():
    import yaml
    return yaml.safe_load(RULES.read_text())["groups"]


def _status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    stack = Live(tmp_path_factory.mktemp("grafana-live"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


# What an idle gateway still counts: Prometheus' scrapes, and (this test's key file is
# re-read every second) key refreshes.
IDLE_NOT_ZERO = {"Built-in and unrouted requests/s by path (whole gateway)",
                 "Authentication and breaker events (whole gateway)"}


def _count_panels(d=None):
    """Targets that count something: they must read 0 rather than nothing."""
    out = []
    for p in panels(d):
        for t in p["targets"]:
            if "vector(0)" in t["expr"]:
                out.append((p["title"], t["refId"], t["expr"]))
    return out


def test_1_idle_gateway_fires_nothing_and_its_counts_read_zero(live):
    live.advance("idle")
    assert live.alerts() == []
    # Prometheus' own scrapes are the only requests: built-ins, never a service's latency.
    assert live.result('gateway_requests_total{path="/metrics", service=""}')
    counts = _count_panels()
    assert len(counts) >= 20
    for title, ref, expr in counts:
        res = live.result(substitute(expr))
        assert res, f"{title} [{ref}] reads 'No data' on an idle gateway"
        if title not in IDLE_NOT_ZERO:
            assert all(float(s["value"][1]) == 0 for s in res), (title, ref, res)
    # The latency gauges have nothing to show rather than the scrapes' latency.
    by_title = {p["title"]: p["targets"][0]["expr"] for p in panels()}
    assert live.result(substitute(by_title["P99 latency (slowest service)"])) == []
    assert live.result(substitute(by_title["P50 latency (slowest service)"])) == []


def test_2_every_panel_has_data_under_mixed_traffic(live):
    live.advance("traffic")
    empty, refused = [], []
    for service in (".*", "beta"):
        for title, ref, expr in expressions():
            r = live.query(substitute(expr, service))
            if r.get("status") != "success":
                refused.append(f"{title} [{ref}] ({service}): {r.get('error')}\n    {expr}")
            elif not r["data"]["result"]:
                empty.append(f"{title} [{ref}] ({service}): {expr}")
    assert not refused, "queries Prometheus refused:\n" + "\n".join(refused)
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert not live.traffic.errors[:3] and not live.feed.errors[:3], (
        live.traffic.errors[:3], live.feed.errors[:3])


def test_3_clean_traffic_with_a_streamed_route_fires_no_alert(live):
    live.advance("traffic")
    by_title = {p["title"]: p["targets"] for p in panels()}

    def first(title, service=".*"):
        return live.result(substitute(by_title[title][0]["expr"], service))

    # The feed's own route: half a second per request, as "P99 by route" shows ...
    routes = {s["metric"]["path"]: float(s["value"][1]) for s in first("P99 by route (streamed routes too)")}
    assert routes["/t/beta/feed"] >= 0.25, routes
    # ... which, over all routed requests, would have held the P99 past the SLO ...
    old = live.value(f'histogram_quantile(0.99, sum by (le) (rate('
                     f'gateway_request_duration_seconds_bucket{{service!=""}}[{RATE_INTERVAL}])))')
    assert old > 0.05, old
    # ... while the panels and the SLO, per service and without streamed routes, do not.
    p99 = float(first("P99 latency (slowest service)")[0]["value"][1])
    assert 0 < p99 < 0.05, p99
    assert 0 < float(first("P50 latency (slowest service)")[0]["value"][1]) <= p99
    per_service = {s["metric"]["service"]: float(s["value"][1]) for s in live.result(
        "job_service:gateway_request_duration_seconds:p99_rate5m")}
    assert set(per_service) == set(SERVICES) and max(per_service.values()) < 0.05, per_service
    assert live.alerts() == []

    # The rest of the overview, plausible.
    assert float(first("Requests/s")[0]["value"][1]) > 10
    assert float(first("Error rate (5xx)")[0]["value"][1]) == 0.0   # 401/404 are not 5xx
    assert float(first("Service connections")[0]["value"][1]) >= 2
    assert float(first("Streamed routes (not in latency SLOs)", "beta")[0]["value"][1]) >= 2
    reasons = {s["metric"].get("reason") for s in first("Auth failures by reason (whole gateway)")}
    assert "token_malformed" in reasons
    builtins = {s["metric"].get("path") for s in first(
        "Built-in and unrouted requests/s by path (whole gateway)")}
    assert {"/metrics", "/health/live", "unmatched"} <= builtins
    assert float(first("Active client connections (whole gateway)")[0]["value"][1]) >= 2
    assert {s["metric"]["service"] for s in first("Requests/s by service")} == set(SERVICES)


def test_4_slow_requests_and_a_failing_key_refresh_do_fire(live):
    live.advance("faults")

    def firing():
        alerts = live.alerts()
        latency = {(a.get("service"), a["alertstate"]) for a in alerts
                   if a["alertname"] == "GatewayHighLatencyP99"}
        keys = [a for a in alerts if a["alertname"] == "GatewayKeyRefreshFailing"]
        return ("beta", "pending") in latency and keys and keys[0]["alertstate"] == "firing"

    live.wait(firing, 25, "GatewayHighLatencyP99 (beta) pending and GatewayKeyRefreshFailing firing")
    alerts = live.alerts()
    # Only the slow service; nothing else woke up (the breaker, reloads, errors ...).
    assert {a["alertname"] for a in alerts} == {"GatewayHighLatencyP99", "GatewayKeyRefreshFailing"}, alerts
    assert {a.get("service") for a in alerts if a["alertname"] == "GatewayHighLatencyP99"} == {"beta"}
    by_title = {p["title"]: p["targets"][0]["expr"] for p in panels()}
    assert live.value(substitute(by_title["Key refresh failures in 1 h (whole gateway)"])) >= 1


def test_metric_names_and_labels_match_what_the_gateway_exports(live):
    promtool = _tool("promtool")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{live.target}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

    exported, with_service = set(), set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, kind = line.split(None, 3)
            exported.add(fam)
            exported |= {fam + "_total"} if kind == "counter" else set()
            exported |= {fam + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else set()
        elif line and not line.startswith("#"):
            name = re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)[0]
            exported.add(name)
            if 'service="' in line:
                with_service.add(name)
    used = set()
    for title, _, expr in expressions():
        used |= set(re.findall(r"\b((?:gateway|process)_[a-z_]+)\b", expr))
        if is_whole_gateway(title):
            # Whole-gateway panels are so because what they read has no service to split by:
            # a metric without the label, or the clients' (ingress) or built-ins' ("") series.
            for metric, matchers in re.findall(r"(\w+)\{([^}]*)\}", expr.replace(NARROW, "")):
                assert metric not in with_service or re.search(r'service="(ingress)?"', matchers), (
                    title, metric)
    unknown = used - exported
    assert not unknown, f"dashboard uses metrics the gateway does not export: {sorted(unknown)}"
    assert "gateway_route_info" in exported
