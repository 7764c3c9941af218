"""perf/k6_scenarios/models.py: the k6 scenarios' performance model — curves, histogram
quantiles, verdicts."""
from __future__ import annotations

import json
import math

import pytest

from perf.k6_scenarios import models as m
from perf.k6_scenarios import results

INF = math.inf


# --------------------------------------------------------------------------- scenario table

def test_the_table_is_the_seeds():
    rows = {s.key: (s.name, s.vus, s.duration_s, s.key_metric) for s in m.SCENARIOS.values()}
    assert rows == {
        "A": ("scenario_a_health_baseline", 10, 60, "P95 < 10 ms"),
        "B": ("scenario_b_openapi_etag", 50, 75, "P95 < 200 ms"),
        "C": ("scenario_c_routing_throughput", 200, 120, "P50 < 2 ms, P99 < 5 ms"),
        "D": ("scenario_d_correlation_id", 20, 60, "P95 < 5 ms overhead"),
        "E": ("scenario_e_rate_limit_boundary", 100, 60, "Retry-After header"),
        "F": ("scenario_f_connection_ramp", 1000, 120, "No 503 responses"),
        "G": ("scenario_g_soak", 50, 600, "Stable memory"),
    }
    for s in m.SCENARIOS.values():
        assert s.short_duration_s <= 10 and s.short_vus <= s.vus
        assert s.thresholds, s.name
        assert (s.rate is not None) == (s.executor == "constant-arrival-rate"), s.name


def test_key_metrics_are_thresholds():
    c = m.scenario("C").k6_threshold_map()
    assert c["http_req_duration{scenario:scenario_c_routing_throughput}"] == ["p(50)<2", "p(99)<5"]
    assert m.scenario("A").k6_threshold_map()[
        "http_req_duration{scenario:scenario_a_health_baseline}"] == ["p(95)<10"]
    assert "status_503" in m.scenario("F").k6_threshold_map()
    assert "ratelimit_retry_after" in m.scenario("E").k6_threshold_map()
    assert [t.metric for t in m.scenario("D").derived_thresholds] == ["cid_overhead_p95_ms"]
    assert [t.metric for t in m.scenario("G").derived_thresholds] == ["gateway_rss_growth_pct"]


def test_scenario_references():
    assert m.scenario("c").name == "scenario_c_routing_throughput"
    assert m.scenario("routing").key == "C"
    assert m.scenario("scenario_g_soak").key == "G"
    assert [s.key for s in m.select_scenarios("all")] == list("ABCDEFG")
    assert [s.key for s in m.select_scenarios("E, a,scenario_c_routing_throughput")] == ["A", "C", "E"]
    with pytest.raises(KeyError, match="unknown scenario"):
        m.scenario("scenario_")  # ambiguous
    with pytest.raises(KeyError):
        m.scenario("Z")


def test_threshold_parsing_and_checks():
    t = m.Threshold("http_req_duration", "p(99)<5")
    assert (t.stat, t.op, t.limit) == ("p(99)", "<", 5.0)
    assert t.check(4.99) and not t.check(5.0)
    assert not t.check(None) and not t.check(float("nan"))  # no data is not a pass
    assert m.Threshold("x", "rate>=0.5").check(0.5)
    assert m.Threshold("x", "count==0").check(0)
    assert t.k6_key("s1") == "http_req_duration{scenario:s1}"
    assert m.Threshold("cid_echoed", "rate>0.999", scenario_filter=False).k6_key("s1") == "cid_echoed"
    for bad in ("p95<5", "p(99) < five", "avg ~ 3", ""):
        with pytest.raises(ValueError):
            m.Threshold("x", bad)


# --------------------------------------------------------------------------- curves

def _requests(t0, n, per_s, ms=lambda i: 1.0, status="200", fail=lambda i: False):
    return [(t0 + i / per_s, "http_req_duration", ms(i),
             {"status": status, "expected_response": "false" if fail(i) else "true"})
            for i in range(n)]


def test_curve_windows_rates_and_percentiles():
    # 10 s at 100 req/s; latency i % 100 ms so every window holds 0..99 once per second.
    samples = _requests(1000.0, 1000, 100, ms=lambda i: float(i % 100), fail=lambda i: i % 50 == 0)
    samples += [(1000.0 + s, "vus", 7, {}) for s in range(10)]
    pts = m.aggregate_curve(samples, window_s=2)
    assert len(pts) == 5
    for p in pts:
        assert p.window_seconds == pytest.approx(2.0, abs=0.01)
        assert p.requests == 200 and p.failed == 4
        assert p.achieved_rps == pytest.approx(100.0, rel=0.01)
        assert p.offered_rps == p.achieved_rps  # closed loop: nothing dropped
        assert p.error_rate == pytest.approx(0.02)
        assert p.p50_ms == pytest.approx(49.5)
        assert p.p95_ms == pytest.approx(94.05)
        assert p.p99_ms == pytest.approx(98.01)
        assert p.vus == 7 and p.status_counts == {"200": 200}
    assert pts[1].window_start - pts[0].window_start == 2


def test_curve_offered_counts_dropped_arrivals_and_keeps_gaps():
    samples = _requests(0.0, 50, 50)                        # second 0: 50 served
    samples += [(0.5, "dropped_iterations", 1, {})] * 10    # ... 10 could not start
    samples += _requests(3.0, 50, 50)                       # seconds 1-2: a stall
    pts = m.aggregate_curve(samples, window_s=1)
    assert [p.requests for p in pts] == [50, 0, 0, 50]
    assert pts[0].offered_rps == pytest.approx(60) and pts[0].achieved_rps == pytest.approx(50)
    assert pts[1].p50_ms is None and pts[1].error_rate == 0.0


def test_curve_partial_last_window():
    # 4.2 s of traffic in 2 s windows: the 0.2 s sliver joins the window before it.
    pts = m.aggregate_curve(_requests(0.0, 421, 100), window_s=2)
    assert [p.requests for p in pts] == [200, 221]
    assert pts[-1].window_seconds == pytest.approx(2.2)
    assert pts[-1].achieved_rps == pytest.approx(100.45, rel=0.01)
    # 5.5 s: a 1.5 s tail stands alone, rated over 1.5 s, not 2.
    pts = m.aggregate_curve(_requests(0.0, 551, 100), window_s=2)
    assert [p.requests for p in pts] == [200, 200, 151]
    assert pts[-1].window_seconds == pytest.approx(1.5)
    assert pts[-1].achieved_rps == pytest.approx(100.7, rel=0.01)


def test_curve_edge_cases():
    assert m.aggregate_curve([], 1) == []
    assert m.aggregate_curve([(1.0, "iterations", 1, {})], 1) == []
    with pytest.raises(ValueError):
        m.aggregate_curve(_requests(0, 2, 1), 0)
    one = m.aggregate_curve([(5.0, "http_req_duration", 3.0, {})], 1)
    assert len(one) == 1 and one[0].p99_ms == 3.0 and one[0].requests == 1
    assert m.percentile([], 0.5) is None
    assert m.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5


def test_curve_from_k6_json_points(tmp_path):
    lines = [
        {"type": "Metric", "metric": "http_req_duration", "data": {"name": "http_req_duration"}},
        {"metric": "http_req_duration", "type": "Point", "data": {
            "time": "2026-11-28T02:33:42.500000000Z", "value": 2.5,
            "tags": {"scenario": "scenario_a_health_baseline", "status": "200"}}},
        {"metric": "http_req_duration", "type": "Point", "data": {
            "time": "2026-11-28T03:33:43.250000000+01:00", "value": 1.5,
            "tags": {"scenario": "scenario_a_health_baseline", "status": "200"}}},
        {"metric": "http_req_duration", "type": "Point", "data": {
            "time": "2026-11-28T02:33:43.300Z", "value": 9.0, "tags": {"scenario": "other"}}},
        {"metric": "http_req_waiting", "type": "Point", "data": {
            "time": "2026-11-28T02:33:43.300Z", "value": 9.0, "tags": {}}},
        {"metric": "vus", "type": "Point", "data": {"time": "2026-11-28T02:33:43Z", "value": 5, "tags": {}}},
    ]
    path = tmp_path / "points.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pts = results.read_points(path, "scenario_a_health_baseline")
    assert [(p[1], p[2]) for p in pts] == [("http_req_duration", 2.5), ("http_req_duration", 1.5),
                                          ("vus", 5)]
    assert pts[1][0] - pts[0][0] == pytest.approx(0.75)
    assert results.parse_time("1970-01-01T00:00:01.5Z") == 1.5


# --------------------------------------------------------------------------- histograms

def test_histogram_quantile_matches_promql():
    # 10 in (0, 1ms], 80 in (1, 2], 10 in (2, 5]: PromQL interpolates linearly in the bucket.
    b = [(0.001, 10), (0.002, 90), (0.005, 100), (INF, 100)]
    assert m.histogram_quantile(0.05, b) == pytest.approx(0.0005)
    assert m.histogram_quantile(0.5, b) == pytest.approx(0.0015)
    assert m.histogram_quantile(0.95, b) == pytest.approx(0.0035)
    assert m.histogram_quantile(1.0, b) == pytest.approx(0.005)
    # Rank in the +Inf bucket: the highest finite bound.
    assert m.histogram_quantile(0.99, [(0.001, 10), (INF, 100)]) == 0.001
    assert m.histogram_quantile(0.5, [(0.001, 0), (INF, 0)]) is None
    assert m.histogram_quantile(0.5, []) is None
    assert m.histogram_quantile(0.5, [(0.001, 5)]) is None  # no +Inf bucket: not a histogram
    assert m.histogram_quantile(-1, b) == -INF and m.histogram_quantile(2, b) == INF


EXPOSITION_BEFORE = """\
# HELP gateway_requests_total HTTP requests answered by the gateway
# TYPE gateway_requests_total counter
gateway_requests_total{method="GET",path="/bench/hello",service="bench",status="200"} 100.0
gateway_requests_total{method="GET",path="/metrics",service="",status="200"} 3.0
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{le="0.001",method="GET",path="/bench/hello",service="bench"} 50.0
gateway_request_duration_seconds_bucket{le="0.002",method="GET",path="/bench/hello",service="bench"} 100.0
gateway_request_duration_seconds_bucket{le="+Inf",method="GET",path="/bench/hello",service="bench"} 100.0
gateway_request_duration_seconds_count{method="GET",path="/bench/hello",service="bench"} 100.0
gateway_request_duration_seconds_sum{method="GET",path="/bench/hello",service="bench"} 0.1
# TYPE gateway_transport_duration_seconds histogram
gateway_transport_duration_seconds_bucket{le="0.0005"} 100.0
gateway_transport_duration_seconds_bucket{le="0.001"} 100.0
gateway_transport_duration_seconds_bucket{le="+Inf"} 100.0
gateway_transport_duration_seconds_count 100.0
gateway_transport_duration_seconds_sum 0.03
# TYPE gateway_active_connections gauge
gateway_active_connections{service="ingress"} 1.0
"""

EXPOSITION_AFTER = """\
# TYPE gateway_requests_total counter
gateway_requests_total{method="GET",path="/bench/hello",service="bench",status="200"} 1090.0
gateway_requests_total{method="GET",path="/bench/hello",service="bench",status="503"} 10.0
gateway_requests_total{method="GET",path="/metrics",service="",status="200"} 4.0
gateway_requests_total{method="GET",path="/health/live",service="",status="200"} 7.0
# TYPE gateway_errors_total counter
gateway_errors_total{service="bench",status="503"} 10.0
# TYPE gateway_ratelimit_total counter
# TYPE gateway_request_duration_seconds histogram
gateway_request_duration_seconds_bucket{le="0.001",method="GET",path="/bench/hello",service="bench"} 50.0
gateway_request_duration_seconds_bucket{le="0.002",method="GET",path="/bench/hello",service="bench"} 600.0
gateway_request_duration_seconds_bucket{le="+Inf",method="GET",path="/bench/hello",service="bench"} 1100.0
gateway_request_duration_seconds_count{method="GET",path="/bench/hello",service="bench"} 1100.0
gateway_request_duration_seconds_sum{method="GET",path="/bench/hello",service="bench"} 3.1
gateway_request_duration_seconds_bucket{le="0.001",method="GET",path="/health/live",service=""} 7.0
gateway_request_duration_seconds_bucket{le="0.002",method="GET",path="/health/live",service=""} 7.0
gateway_request_duration_seconds_bucket{le="+Inf",method="GET",path="/health/live",service=""} 7.0
gateway_request_duration_seconds_count{method="GET",path="/health/live",service=""} 7.0
gateway_request_duration_seconds_sum{method="GET",path="/health/live",service=""} 0.001
# TYPE gateway_auth_duration_seconds histogram
gateway_auth_duration_seconds_bucket{le="0.0005"} 250.0
gateway_auth_duration_seconds_bucket{le="0.001"} 1000.0
gateway_auth_duration_seconds_bucket{le="+Inf"} 1000.0
gateway_auth_duration_seconds_count 1000.0
gateway_auth_duration_seconds_sum 0.6
# TYPE gateway_transport_duration_seconds histogram
gateway_transport_duration_seconds_bucket{le="0.0005"} 600.0
gateway_transport_duration_seconds_bucket{le="0.001"} 1100.0
gateway_transport_duration_seconds_bucket{le="+Inf"} 1100.0
gateway_transport_duration_seconds_count 1100.0
gateway_transport_duration_seconds_sum 0.6
# TYPE gateway_active_connections gauge
gateway_active_connections{service="ingress"} 64.0
gateway_active_connections{service="bench"} 1.0
# TYPE gateway_auth_failures_total counter
gateway_auth_failures_total{reason="invalid_dpop_proof"} 2.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 4.2e+07
"""


def test_metrics_delta_and_phase_quantiles():
    before = m.GatewayPerformanceMetrics.parse(EXPOSITION_BEFORE)
    after = m.GatewayPerformanceMetrics.parse(EXPOSITION_AFTER)
    d = after - before
    # Counters subtract; series new since "before" count from zero; gauges are "after"'s.
    assert d.sum("gateway_requests_total", service="bench") == 1000
    assert d.sum("gateway_requests_total", path="/health/live") == 7
    assert d.sum("gateway_active_connections", service="ingress") == 64
    h = d.histogram("gateway_request_duration_seconds", service="bench")
    assert h.buckets == ((0.001, 0.0), (0.002, 500.0), (INF, 1000.0)) and h.count == 1000
    assert h.sum == pytest.approx(3.0)
    # Half of the run's bench requests beyond 2 ms: the p50 is the 2 ms bound, p95 clamps.
    assert d.quantile_ms("gateway_request_duration_seconds", 0.5, service="bench") == pytest.approx(2.0)
    assert d.quantile_ms("gateway_request_duration_seconds", 0.95, service="bench") == pytest.approx(2.0)
    # where= filters like a PromQL label matcher (`service!=""`).
    routed = d.histogram("gateway_request_duration_seconds", where=lambda lab: lab["service"] != "")
    assert routed.count == 1000

    ph = d.phase_quantiles()
    assert ph["auth"]["count"] == 1000
    assert ph["auth"]["p50_ms"] == pytest.approx(0.5 + 0.5 * (500 - 250) / 750)
    assert ph["auth"]["mean_ms"] == pytest.approx(0.6)
    assert ph["transport"]["count"] == 1000  # 1100 - 100
    assert ph["transport"]["p50_ms"] == pytest.approx(0.5)
    assert ph["routing"] == {"count": 0, "p50_ms": None, "p95_ms": None, "mean_ms": None}

    obs = d.observation(0.5, service="bench")
    assert obs.total_ms == pytest.approx(2.0) and obs.routing_ms is None
    assert obs.transport_ms == pytest.approx(0.5)
    # The p50 request's total and the p50 round trip are two different requests.
    assert obs.gateway_ms is None
    assert obs.quantile == 0.5 and obs.service == "bench"
    mean = d.mean_observation(service="bench")
    assert mean.gateway_ms == pytest.approx(3.0 - 0.57)  # a difference of means is the mean difference

    s = d.summary()
    assert s["by_status"] == {"200": 997, "503": 10}  # /metrics scrapes are left out
    assert s["requests"] == 1007
    assert s["error_rate_5xx"] == pytest.approx(10 / 1007)
    assert s["auth_failures"] == {"invalid_dpop_proof": 2}
    assert s["resident_memory_bytes"] == 42e6


def test_counter_reset_counts_from_zero():
    before = m.GatewayPerformanceMetrics.parse(
        '# TYPE gateway_requests_total counter\ngateway_requests_total{status="200"} 500\n')
    after = m.GatewayPerformanceMetrics.parse(
        '# TYPE gateway_requests_total counter\ngateway_requests_total{status="200"} 20\n')
    assert (after - before).sum("gateway_requests_total") == 20


def test_exposition_parsing_details():
    text = ('# HELP x_total a "quoted" help\n# TYPE x_total counter\n'
            'x_total{path="/a\\"b",le="+Inf"} 1.5e3 1700000000000\n'
            'y NaN\nz -Inf\n')
    g = m.GatewayPerformanceMetrics.parse(text)
    assert g.series("x_total") == [({"path": '/a"b', "le": "+Inf"}, 1500.0)]
    assert math.isnan(g.sum("y")) and g.sum("z") == -INF
    with pytest.raises(ValueError):
        m.GatewayPerformanceMetrics.parse("not a metric line at all {\n")


def test_parses_the_real_gateway_exposition():
    """The module reads what stellagw.observe.metrics really writes."""
    from stellagw.observe.metrics import Metrics
    mx = Metrics()
    for i in range(200):
        mx.request_done("bench", "GET", "/bench/hello", 200, 0.0004 if i % 2 else 0.003)
        mx.phase("transport", 0.0003)
    mx.request_done("", "GET", "unmatched", 404, 0.00001)
    mx.connection_opened()
    g = m.GatewayPerformanceMetrics.parse(mx.render().decode())
    assert g.sum("gateway_requests_total", service="bench", status="200") == 200
    assert g.sum("gateway_errors_total", status="404") == 1
    # 0.4 ms lies in the (0.25, 0.5] ms bucket: the quantile interpolates inside it.
    assert g.quantile_ms("gateway_request_duration_seconds", 0.25, service="bench") == pytest.approx(0.375)
    assert 2.0 < g.quantile_ms("gateway_request_duration_seconds", 0.75, service="bench") <= 5.0
    assert g.phase_quantiles()["transport"]["count"] == 200
    assert g.sum("gateway_active_connections", service="ingress") == 1


# --------------------------------------------------------------------------- summaries

def _summary(results_):
    cfg = m.scenario("C")
    s = m.PerformanceTestSummary(cfg, short=True, started_at=0.0, finished_at=6.0,
                                 thresholds=results_,
                                 curve=m.aggregate_curve(_requests(0.0, 500, 100), 1))
    return s.finalize()


def test_summary_violations_and_status():
    p50, p99, err = m.scenario("C").k6_thresholds
    ok = _summary([m.ThresholdResult(p50, True, 0.4), m.ThresholdResult(p99, True, 3.0),
                   m.ThresholdResult(err, True, 0.0)])
    assert ok.status == "passed" and ok.passed and ok.violations == []
    bad = _summary([m.ThresholdResult(p50, True, 0.4), m.ThresholdResult(p99, False, 7.5),
                    m.ThresholdResult(err, True, 0.0)])
    assert bad.status == "failed" and not bad.passed
    assert [v.threshold.expression for v in bad.violations] == ["p(99)<5"]
    d = json.loads(bad.to_json())
    assert d["scenario"] == "scenario_c_routing_throughput" and d["status"] == "failed"
    assert [v["expression"] for v in d["violations"]] == ["p(99)<5"]
    assert {t["expression"] for t in d["thresholds"]} == {"p(50)<2", "p(99)<5", "rate<0.001"}
    assert d["totals"]["requests"] == 500
    assert d["totals"]["achieved_rps"] == pytest.approx(100, rel=0.02)
    assert d["curve"][0]["achieved_rps"] == pytest.approx(100, rel=0.02)
    md = bad.to_markdown()
    assert "**VIOLATED**" in md and "p(99)<5" in md and "| t (s) |" in md
    # No verdicts at all is a failure too: nothing was shown to meet the SLO.
    assert _summary([]).status == "failed"
    skipped = m.PerformanceTestSummary(m.scenario("E"), True, 0.0, 1.0, status="skipped").finalize()
    assert skipped.status == "skipped"


def test_k6_summary_verdicts():
    ks = {"metrics": {
        "http_req_duration{scenario:s}": {"type": "trend", "values": {"p(99)": 7.5, "med": 0.4, "count": 10},
                                          "thresholds": {"p(99)<5": {"ok": False}, "p(50)<2": {"ok": True}}},
        "ratelimit_retry_after": {"type": "rate", "values": {"rate": 0, "passes": 0, "fails": 0},
                                  "thresholds": {"rate>0.999": {"ok": True}}},
    }}
    v = results.threshold_verdicts(ks)
    assert v[("http_req_duration{scenario:s}", "p(99)<5")] == (False, 7.5, 10)
    assert v[("http_req_duration{scenario:s}", "p(50)<2")] == (True, 0.4, 10)  # med stands in
    assert v[("ratelimit_retry_after", "rate>0.999")] == (True, 0, 0)  # k6 passes no-data


# --------------------------------------------------------------------------- scaling, overhead

def test_scaled_thresholds_stretch_latencies_only():
    c = m.scenario("C").scaled(3)
    assert [t.expression for t in c.thresholds] == ["p(50)<6", "p(99)<15", "rate<0.001"]
    assert [t.table_expression for t in c.thresholds] == ["p(50)<2", "p(99)<5", ""]
    assert c.k6_threshold_map()["http_req_duration{scenario:scenario_c_routing_throughput}"] == \
        ["p(50)<6", "p(99)<15"]
    assert [t.expression for t in m.scenario("D").scaled(2.5).derived_thresholds] == ["value<12.5"]
    assert m.scenario("E").scaled(3).thresholds == m.scenario("E").thresholds  # no latency
    assert m.scenario("G").scaled(1) is m.scenario("G")
    assert m.format_limit(0.1 * 3) == "0.3" and m.format_limit(15.0) == "15"


def test_overhead_is_per_request_not_a_difference_of_percentiles():
    # Two kinds of request: slow service + fast gateway, fast service + slow gateway. The
    # p99 of the totals minus the p99 of the round trips says 0; each request says 1 or 9.
    lines = []
    for i in range(100):
        slow_service = i % 2 == 0
        total, upstream = (10.0, 9.0) if slow_service else (10.0, 1.0)
        lines.append({"correlationId": f"k6.r.1.{i}", "durationMs": total, "status": 200,
                      "service": "s", "timings": {"auth": 0.1, "routing": 0.01, "upstream": upstream}})
    obs = [m.GatewayPerformanceObservation.from_access_log(r) for r in lines]
    assert obs[0].transport_ms == 9.0 and obs[0].gateway_ms == 1.0 and obs[1].gateway_ms == 9.0
    client = {f"k6.r.1.{i}": 10.5 for i in range(0, 100, 2)}   # half of them matched
    o = m.request_overhead(obs, client)
    assert o["requests"] == 100 and o["matched"] == 50
    gw = o["rows"]["gateway"]
    assert gw["count"] == 100 and gw["p50_ms"] == pytest.approx(5.0) and gw["p99_ms"] == pytest.approx(9.0)
    assert gw["mean_ms"] == pytest.approx(5.0) and gw["max_ms"] == 9.0
    assert o["rows"]["client_minus_upstream"]["p50_ms"] == pytest.approx(1.5)
    assert o["rows"]["outside_gateway"]["max_ms"] == pytest.approx(0.5)
    # A built-in has no upstream: all its time is the gateway's, and no round trip row.
    health = m.GatewayPerformanceObservation.from_access_log({"correlationId": "k6.r.1.x", "durationMs": 0.02})
    o = m.request_overhead([health], {"k6.r.1.x": 0.3})
    assert o["rows"]["gateway"]["p50_ms"] == 0.02 and o["rows"]["upstream"]["count"] == 0
    assert o["rows"]["client_minus_upstream"]["count"] == 0
    assert o["rows"]["outside_gateway"]["p50_ms"] == pytest.approx(0.28)
