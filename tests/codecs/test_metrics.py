"""/metrics: the metric names of docs/requirements.md §10, valid exposition (promtool), whole-instance totals."""
from __future__ import annotations

import math
import os
import re
import shutil
import struct
import subprocess
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stellagw._py import metrics as py_metrics
from stellagw.observe import metrics as observe_metrics
from stellagw.observe.metrics import DURATION_BUCKETS, Metrics, _View

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.impls import Codec


def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def scrape(port) -> str:
    status, _, body = request(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200
    return body.decode()


def total(text, name, **labels) -> float:
    out = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            out += float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture
def two_workers(tmp_path):
    s = Served("--workers", "2", config_text="gateway: {http: {port: 0}, transports: {tcp: {port: 0}}, "
                                                      "admin: {publicEndpoints: [all]}}",
               tmp_path=tmp_path)
    recs = s.wait_listening(2)
    yield s, port_of(recs[0]["http"])
    s.stop()


def test_metrics_cover_the_whole_instance_and_pass_promtool(two_workers):
    s, port = two_workers
    for _ in range(30):
        request(port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
    for _ in range(7):
        request(port, b"GET /no/such/route HTTP/1.1\r\nHost: gw\r\n\r\n")

    def every_scrape_sees_all():
        texts = [scrape(port) for _ in range(6)]
        return all(total(t, "gateway_requests_total", path="/health/live", status="200") == 30
                   and total(t, "gateway_requests_total", status="404") == 7 for t in texts)
    # Snapshots are published once a second: give the other worker time to publish.
    assert wait_for(every_scrape_sees_all, timeout=5)

    text = scrape(port)
    for name in ("gateway_requests_total", "gateway_request_duration_seconds_bucket",
                 "gateway_active_connections", "gateway_errors_total"):
        assert re.search(rf"^{name}\{{", text, re.M), name
    for name in ("gateway_transport_frames_total", "gateway_auth_failures_total",
                 "gateway_rate_limit_exceeded_total", "gateway_auth_duration_seconds",
                 "gateway_routing_duration_seconds", "gateway_transport_duration_seconds"):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
    assert total(text, "gateway_errors_total", status="404") == 7

    out = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- Histogram: the compiled module (cext/metrics.pyx) and its twin (stellagw/_py/metrics.py)

METRICS = Codec("metrics")
c_metrics, C_SKIP, needs_c = METRICS.compiled, METRICS.why_not, METRICS.needs_compiled
IMPLS = [py_metrics] + ([c_metrics] if c_metrics is not None else [])


@pytest.fixture(params=["c", "py"])
def M(request, monkeypatch):
    """An implementation, also installed as the Histogram Metrics and _View create."""
    if request.param == "c" and c_metrics is None:
        pytest.skip(C_SKIP)
    mod = c_metrics if request.param == "c" else py_metrics
    monkeypatch.setattr(observe_metrics, "Histogram", mod.Histogram)
    return mod


def test_observe_metrics_uses_the_selected_implementation():
    expected = py_metrics if c_metrics is None else c_metrics
    assert observe_metrics.Histogram is expected.Histogram
    assert observe_metrics.DURATION_BUCKETS is expected.DURATION_BUCKETS


@needs_c
def test_compiled_and_twin_have_the_same_bounds():
    assert c_metrics.DURATION_BUCKETS == py_metrics.DURATION_BUCKETS
    assert c_metrics.__all__ == py_metrics.__all__
    assert [b for b, _ in c_metrics.Histogram().buckets()] == \
        [repr(float(b)) for b in py_metrics.DURATION_BUCKETS] + ["+Inf"]


def test_bounds_are_sorted_floats():
    b = py_metrics.DURATION_BUCKETS
    assert all(type(x) is float for x in b) and list(b) == sorted(set(b))


EDGES = [v for b in DURATION_BUCKETS for v in (math.nextafter(b, 0), b, math.nextafter(b, 1e9))]
SPECIAL = EDGES + [0.0, -0.0, -1.0, math.inf, -math.inf, math.nan, 31.0, 5e-324, 1e308]
samples = st.floats() | st.sampled_from(SPECIAL) | st.integers(-10, 100)


@given(samples)
def test_observe_counts_in_bisects_bucket(seconds):
    for mod in IMPLS:
        h = mod.Histogram()
        h.observe(seconds)
        i = bisect_left(DURATION_BUCKETS, seconds)
        assert h.counts == [int(j == i) for j in range(len(DURATION_BUCKETS) + 1)], mod
        assert h.n == 1 and (h.total == seconds or math.isnan(seconds)), mod


def _bits(x: float) -> bytes:
    # -0.0 apart from 0.0, and every NaN one value: which NaN a sum of NaNs and infinities
    # gives (its sign and payload) is the FPU's choice, not the histogram's (the ordering
    # of additions in C and in Python may pick another one; this failed at random).
    return b"nan" if math.isnan(x) else struct.pack("<d", x)


def _state(h):
    return h.counts, _bits(h.total), h.n, h.buckets()


@needs_c
@given(st.lists(samples, max_size=60), st.lists(samples, max_size=20))
def test_compiled_matches_twin(first, second):
    c, p = c_metrics.Histogram(), py_metrics.Histogram()
    for x in first:
        c.observe(x)
        p.observe(x)
    assert _state(c) == _state(p)
    # Merge as a scrape does: a snapshot (counts, total) added to another histogram.
    c2, p2 = c_metrics.Histogram(), py_metrics.Histogram()
    for x in second:
        c2.observe(x)
        p2.observe(x)
    c2.add(c.counts, c.total)
    p2.add(p.counts, p.total)
    assert _state(c2) == _state(p2)


@needs_c
@given(st.lists(st.integers(0, 2**40), max_size=19), st.floats(allow_nan=False))
def test_compiled_add_matches_twin(counts, total):
    c, p = c_metrics.Histogram(), py_metrics.Histogram()
    c.add(counts, total)
    p.add(counts, total)
    assert _state(c) == _state(p)


def test_histogram_rejects_what_the_twin_rejects(M):
    h = M.Histogram()
    with pytest.raises(TypeError):
        h.observe("0.1")
    with pytest.raises(TypeError):
        h.observe(None)
    with pytest.raises(IndexError):
        h.add([0] * (len(DURATION_BUCKETS) + 2), 0.0)


def test_histogram_buckets_sum_and_snapshot_merge(M):
    m = Metrics()
    for s in (0.00004, 0.0003, 0.0003, 0.003, 40.0):
        m.phase("transport", s)
    h = m.phases["transport"]
    assert type(h) is M.Histogram
    assert h.n == 5 and h.total == pytest.approx(40.00364)
    b = dict(h.buckets())
    assert (b["5e-05"], b["0.0005"], b["0.005"], b["30.0"], b["+Inf"]) == (1, 3, 4, 4, 5)
    view = _View()    # what a scrape sums: here the same worker twice
    view.add(m.snapshot())
    view.add(m.snapshot())
    assert type(view.phases["transport"]) is M.Histogram
    assert view.phases["transport"].counts == [2 * c for c in h.counts]
    assert view.phases["transport"].n == 10


def test_snapshot_resume_and_render(M, tmp_path):
    """Both implementations through a worker's publish, a restart's resume and a scrape."""
    m = Metrics(str(tmp_path), worker_id=0)
    m.request_done("bench", "GET", "/bench/hello", 200, 0.0004)
    m.phase_histogram("auth").observe(0.00002)
    m.publish()
    peer = Metrics(str(tmp_path), worker_id=1)
    peer.phase("auth", 0.003)
    resumed = Metrics(str(tmp_path), worker_id=0)   # the restarted worker 0
    assert resumed.durations[("bench", "GET", "/bench/hello")].counts == \
        m.durations[("bench", "GET", "/bench/hello")].counts
    text = peer.render().decode()
    assert 'gateway_auth_duration_seconds_bucket{le="5e-05"} 1.0' in text
    assert 'gateway_auth_duration_seconds_bucket{le="+Inf"} 2.0' in text
    assert "gateway_auth_duration_seconds_count 2.0" in text
    assert ('gateway_request_duration_seconds_bucket{le="0.0005",method="GET",'
            'path="/bench/hello",service="bench"} 1.0') in text


def test_frame_counts_are_labelled_with_the_protocols_names():
    from prometheus_client import generate_latest

    from stellagw.transport.frame import FRAME_TYPE_NAMES, REQUEST, RESPONSE
    m = Metrics(frame_names=FRAME_TYPE_NAMES)
    m.frames.update({REQUEST: 3, RESPONSE: 2, 99: 1})
    text = generate_latest(m.registry).decode()
    assert 'gateway_transport_frames_total{type="REQUEST"} 3.0' in text
    assert 'gateway_transport_frames_total{type="RESPONSE"} 2.0' in text
    assert 'gateway_transport_frames_total{type="99"} 1.0' in text   # a type with no name


@needs_c
def test_compiled_clock_is_perf_counter():
    # The glue reads durations with the compiled perf_counter and Python code (auth, the
    # limiter) with time's: one clock, so their readings interleave in order.
    import time
    for _ in range(1000):
        a = time.perf_counter()
        b = c_metrics.perf_counter()
        c = time.perf_counter()
        assert a <= b <= c
    assert observe_metrics.perf_counter is c_metrics.perf_counter
