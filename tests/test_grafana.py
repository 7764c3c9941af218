"""grafana/stella-ops-gateway-performance.json against a LIVE Prometheus.

A real gateway (with the policy and bench demo services) takes traffic; Debian's
`prometheus` server scrapes it every second (config from perf/prometheus.yml.template);
every PromQL expression of every panel goes through `/api/v1/query` and must parse, and
the core panels (RPS, p50/p99, error rate, active connections, …) must return data. The
dashboard's structure (UID, `${DS_PROMETHEUS}` input, seed §14 rows, grid) and the metric
names it uses are checked against what the gateway really exports; `promtool check
metrics` validates the exposition itself.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import string
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "stella-ops-gateway-performance.json"
TEMPLATE = ROOT / "perf" / "prometheus.yml.template"
RATE_INTERVAL = "5s"   # what Grafana's $__rate_interval becomes at a 1 s scrape interval

# Panels that must show data while the gateway takes routed traffic.
MUST_HAVE_DATA = {
    "P50 latency", "P99 latency", "Error rate (5xx)", "Requests/s", "Active client connections",
    "Request latency percentiles", "P95 / P99 by service", "Requests/s by service",
    "Requests/s by status", "Errors by status", "Active connections",
    "Transport frames/s by type", "Routes with traffic", "Service connections",
    "Rate-limited/s (429)",
}
SEED_ROWS = ["Overview", "Latency distribution", "Throughput & rate limiting",
             "Pipeline breakdown", "Connections & resources"]
# Exported by a standard process collector, not by stellagw's own families.
EXTERNAL_METRICS = {"process_resident_memory_bytes"}


def _tool(name):
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} not installed (apt-get install prometheus)")
    return path


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(d=None):
    return [p for p in (d or dashboard())["panels"] if p["type"] != "row"]


def expressions(d=None):
    """(panel title, refId, expr) of every target."""
    return [(p["title"], t["refId"], t["expr"]) for p in panels(d) for t in p["targets"]]


def substitute(expr: str) -> str:
    # All-value of every template variable is ".*"; $__rate_interval as Grafana computes it.
    return (expr.replace("$__rate_interval", RATE_INTERVAL).replace("$job", ".*")
            .replace("$instance", ".*").replace("$service", ".*"))


# --------------------------------------------------------------------------- static checks

def test_dashboard_structure():
    d = dashboard()
    assert d["uid"] == "stella-ops-gateway-performance"
    assert d["schemaVersion"] >= 36
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    assert d["__inputs"][0]["pluginId"] == "prometheus"
    rows = [p["title"] for p in d["panels"] if p["type"] == "row"]
    assert rows == SEED_ROWS
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
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            assert t["expr"].strip()
    for v in d["templating"]["list"]:
        assert v["datasource"] == ds
    kinds = {p["title"]: p["type"] for p in panels(d)}
    assert kinds["P50 latency"] == kinds["P99 latency"] == "gauge"
    text = json.dumps(d)
    for needed in ("gateway_auth_duration_seconds", "gateway_routing_duration_seconds",
                   "gateway_transport_duration_seconds", "gateway_rate_limit_exceeded_total",
                   "process_resident_memory_bytes", "gateway_transport_frames_total",
                   "gateway_errors_total", "status=\\\"429\\\""):
        assert needed in text, needed


# --------------------------------------------------------------------------- live stack

def _render_prometheus_config(path: Path, target: str) -> None:
    text = string.Template(TEMPLATE.read_text()).substitute(
        SCRAPE_INTERVAL="1s", JOB="stellagw", TARGETS=f'"{target}"')
    path.write_text(text)


def _get_json(url: str, timeout: float = 5.0) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 for a bad expression: the body says why
        with exc:
            return json.loads(exc.read())


class Traffic(threading.Thread):
    """Routed, built-in and 404 requests over keep-alive connections until stopped."""

    PATHS = ["/api/v1/policies", "/bench/hello", "/bench/hello", "/health/live", "/no/such/route"]

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.halt = threading.Event()
        self.sent = 0
        self.errors: list[str] = []

    def run(self):
        conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=5) for _ in range(3)]
        i = 0
        while not self.halt.is_set():
            conn = conns[i % len(conns)]
            try:
                conn.request("GET", self.PATHS[i % len(self.PATHS)])
                conn.getresponse().read()
                self.sent += 1
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                conn.close()
            i += 1
            if i % 20 == 0:
                time.sleep(0.01)  # a few hundred req/s is plenty; leave CPU to the gateway
        for c in conns:
            c.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from perf.k6_scenarios import stack as stack_mod

    prometheus = _tool("prometheus")
    work = tmp_path_factory.mktemp("grafana-live")
    stack = stack_mod.Stack(work, auth="off", services=("policy", "bench"), pin=False,
                            start_timeout=20)
    prom = None
    traffic = None
    try:
        stack.start()
        traffic = Traffic(stack.http_port)
        traffic.start()
        port = stack_mod.free_port()
        cfg = work / "prometheus.yml"
        _render_prometheus_config(cfg, f"127.0.0.1:{stack.http_port}")
        prom_log = open(work / "prometheus.log", "wb")
        prom = subprocess.Popen(
            [prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
             "--storage.tsdb.retention.time=1h"],
            stdout=prom_log, stderr=subprocess.STDOUT, start_new_session=True)
        prom_log.close()
        base = f"http://127.0.0.1:{port}"

        def query(expr):
            return _get_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

        # Ready once a rate over the window has data: several scrapes are in.
        deadline = time.monotonic() + 25
        while True:
            if prom.poll() is not None:
                pytest.fail("prometheus exited:\n" + (work / "prometheus.log").read_text()[-2000:])
            try:
                r = query(f"sum(rate(gateway_requests_total[{RATE_INTERVAL}]))")
                if r.get("status") == "success" and r["data"]["result"]:
                    samples = query('count_over_time(up{job="stellagw"}[1m])')
                    if samples["data"]["result"] and float(samples["data"]["result"][0]["value"][1]) >= 4:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prometheus never had data:\n" + (work / "prometheus.log").read_text()[-2000:])
            time.sleep(0.25)
        yield {"query": query, "stack": stack, "base": base, "traffic": traffic}
    finally:
        if traffic is not None:
            traffic.halt.set()
            traffic.join(5)
        if prom is not None:
            try:
                os.killpg(prom.pid, signal.SIGTERM)
                prom.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(prom.pid, signal.SIGKILL)
                prom.wait(5)
        stack.stop()


def test_every_panel_query_runs_on_live_prometheus(live):
    failures, empty = [], []
    seen_titles = set()
    for title, ref, expr in expressions():
        seen_titles.add(title)
        r = live["query"](substitute(expr))
        if r.get("status") != "success":
            failures.append(f"{title} [{ref}]: {r.get('errorType')}: {r.get('error')}\n    {expr}")
            continue
        if title in MUST_HAVE_DATA and ref == "A" and not r["data"]["result"]:
            empty.append(f"{title}: {expr}")
    assert not failures, "queries Prometheus refused:\n" + "\n".join(failures)
    assert not empty, "core panels without data:\n" + "\n".join(empty)
    assert MUST_HAVE_DATA <= seen_titles
    assert not live["traffic"].errors[:3], live["traffic"].errors[:3]


def test_core_panel_values_are_plausible(live):
    q = live["query"]
    by_title = {p["title"]: p["targets"][0]["expr"] for p in panels()}

    def value(title):
        res = q(substitute(by_title[title]))["data"]["result"]
        return float(res[0]["value"][1])

    assert value("Requests/s") > 10
    p50, p99 = value("P50 latency"), value("P99 latency")
    assert 0 < p50 <= p99 < 1.0
    assert value("Error rate (5xx)") == 0.0  # 404s are errors, not 5xx
    assert value("Active client connections") >= 3  # the traffic thread's keep-alives
    assert value("Service connections") >= 2  # policy + bench


def test_template_variables_resolve(live):
    """`label_values(expr, label)` as Grafana runs it: the series' values of ``label``."""
    got = {}
    for v in dashboard()["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", v["query"]["query"].strip())
        assert m, v["query"]
        expr, label = substitute(m[1]), m[2]
        r = live["query"](f"group by ({label}) ({expr})")
        assert r["status"] == "success", r
        got[v["name"]] = {s["metric"].get(label, "") for s in r["data"]["result"]}
    assert got["job"] == {"stellagw"}
    assert got["instance"] == {f"127.0.0.1:{live['stack'].http_port}"}
    assert {"policy", "bench"} <= got["service"]


def test_metric_names_exist_and_exposition_passes_promtool(live):
    promtool = _tool("promtool")
    stack = live["stack"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(stack.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr

    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, fam, kind = line.split(None, 3)
            exported.add(fam)
            exported |= {fam + "_total"} if kind == "counter" else set()
            exported |= {fam + s for s in ("_bucket", "_sum", "_count")} if kind == "histogram" else set()
        elif line and not line.startswith("#"):
            exported.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)[0])
    used = set()
    for _, _, expr in expressions():
        used |= set(re.findall(r"\b((?:gateway|process)_[a-z_]+)\b", expr))
    unknown = used - exported - EXTERNAL_METRICS
    assert not unknown, f"dashboard uses metrics the gateway does not export: {sorted(unknown)}"
