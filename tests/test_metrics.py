"""/metrics: the seed's metric names, valid exposition (promtool), whole-instance totals."""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from bisect import bisect_left

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stellagw.observe.metrics import DURATION_BUCKETS, Histogram, Metrics, _View

from .gwtest import Served, port_of, request, wait_for


def promtool():
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def scrape(port) -> str:
    status, _, body = request(port, b"GET /metrics HTTP/1.1\r\n\r\n")
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
    s = Served("--workers", "2", config_text="gateway: {http: {port: 0}, transports: {tcp: {port: 0}}}",
               tmp_path=tmp_path)
    recs = s.wait_listening(2)
    yield s, port_of(recs[0]["http"])
    s.stop()


def test_metrics_cover_the_whole_instance_and_pass_promtool(two_workers):
    s, port = two_workers
    for _ in range(30):
        request(port, b"GET /health/live HTTP/1.1\r\n\r\n")
    for _ in range(7):
        request(port, b"GET /no/such/route HTTP/1.1\r\n\r\n")

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


# --- Histogram ------------------------------------------------------------------------

EDGES = [v for b in DURATION_BUCKETS for v in (math.nextafter(b, 0), b, math.nextafter(b, 1e9))]


@given(st.floats() | st.sampled_from(EDGES + [0.0, -0.0, -1.0, math.inf, -math.inf, 31.0]))
def test_observe_counts_in_bisects_bucket(seconds):
    h = Histogram()
    h.observe(seconds)
    i = bisect_left(DURATION_BUCKETS, seconds)
    assert h.counts == [int(j == i) for j in range(len(DURATION_BUCKETS) + 1)]
    assert h.n == 1 and (h.total == seconds or math.isnan(seconds))


def test_histogram_buckets_sum_and_snapshot_merge():
    m = Metrics()
    for s in (0.00004, 0.0003, 0.0003, 0.003, 40.0):
        m.phase("transport", s)
    h = m.phases["transport"]
    assert h.n == 5 and h.total == pytest.approx(40.00364)
    b = dict(h.buckets())
    assert (b["5e-05"], b["0.0005"], b["0.005"], b["30.0"], b["+Inf"]) == (1, 3, 4, 4, 5)
    view = _View()    # what a scrape sums: here the same worker twice
    view.add(m.snapshot())
    view.add(m.snapshot())
    assert view.phases["transport"].counts == [2 * c for c in h.counts]
    assert view.phases["transport"].n == 10
