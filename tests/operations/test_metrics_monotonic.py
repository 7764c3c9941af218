"""Instance-wide counters never go backwards (issue 16, item 6b).

A 2-worker instance under load, scraped at 5 Hz while one worker is killed (SIGKILL, by its
PID) and restarted by the supervisor: every counter sample — request counts, histogram
buckets, counts and sums, the rate limiter's and authentication's counters — is compared
with the same series in every earlier scrape, whichever worker answered either.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from stellagw.observe.metrics import Metrics

from tests.support.gwtest import Served, connect, port_of, read_response, wait_for
from tests.support.services import ServiceProcess
from tests.codecs.test_metrics import promtool

# /metrics and the answering worker's id (readiness details) on the port clients use, so a
# scrape and the worker that answered it share one connection.
CONFIG = """
gateway:
  admin: {publicEndpoints: [all]}
  node: {workers: 2}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  health: {heartbeatIntervalSeconds: 1, checkIntervalSeconds: 1, degradedAfterSeconds: 3,
           heartbeatTimeoutSeconds: 6}
rate_limiting:
  for_instance:
    rules: [{max_requests: 1000000, per_seconds: 60}]
"""

SCRAPE = b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\nGET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n"


def counter_samples(text: str) -> dict:
    """Every sample that may only grow: counters, and histograms' buckets, counts, sums."""
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.type not in ("counter", "histogram"):
            continue
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port):
    """(worker that answered, text) — the readiness body on the same connection names it."""
    with connect(port) as s:
        s.sendall(SCRAPE)
        buf = bytearray()
        status, _, body = read_response(s, buf)
        ready = orjson.loads(read_response(s, buf)[2])
    assert status == 200
    return ready["worker"], body.decode()


@pytest.fixture
def instance(tmp_path):
    gw = Served(config_text=CONFIG, tmp_path=tmp_path)
    recs = gw.wait_listening(2)
    http, tcp = port_of(recs[0]["http"]), port_of(recs[0]["tcp"])
    svc = ServiceProcess("mono", tcp).start()
    try:
        def both_route():
            seen = set()
            for _ in range(20):
                with connect(http) as s:
                    s.sendall(b"GET /t/mono/whoami HTTP/1.1\r\nHost: gw\r\n\r\nGET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
                    buf = bytearray()
                    if read_response(s, buf)[0] == 200:
                        seen.add(orjson.loads(read_response(s, buf)[2])["worker"])
            return seen == {0, 1}
        assert wait_for(both_route, timeout=20), svc.describe()
        yield gw, http, {r["pid"] for r in recs}
    finally:
        svc.stop()
        gw.stop()


def load(port, stop: threading.Event, counts: list):
    """Routed requests and a few kinds of failure, on short keep-alive connections so the
    kernel spreads them over both workers."""
    reqs = (b"GET /t/mono/whoami HTTP/1.1\r\nHost: gw\r\n\r\n" * 4 + b"GET /no/route HTTP/1.1\r\nHost: gw\r\n\r\n"
            + b"GET /t/mono/secure HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer x.y.z\r\n\r\n")
    while not stop.is_set():
        try:
            with connect(port, timeout=3) as s:
                s.sendall(reqs)
                buf = bytearray()
                for _ in range(6):
                    read_response(s, buf)
                    counts[0] += 1
        except OSError:
            time.sleep(0.01)   # a connection the killed worker held: try again


def test_counters_never_decrease_across_scrapes_and_a_worker_kill(instance):
    gw, port, pids = instance
    stop = threading.Event()
    counts = [0]
    loaders = [threading.Thread(target=load, args=(port, stop, counts), daemon=True)
               for _ in range(2)]
    for t in loaders:
        t.start()
    last: dict = {}
    drops: list = []
    answered = set()
    scrapes = 0
    killed = None
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < 8.0:
            tick = time.monotonic()
            if killed is None and tick - t0 > 3.0:
                killed = sorted(pids)[0]
                os.kill(killed, signal.SIGKILL)
            try:
                worker, text = scrape(port)
            except (OSError, ConnectionError):
                continue   # this scrape hit the dying worker's accept queue
            scrapes += 1
            answered.add(worker)
            for key, value in counter_samples(text).items():
                if value < last.get(key, 0.0):
                    drops.append((round(tick - t0, 2), worker, key, last[key], value))
                last[key] = max(value, last.get(key, 0.0))
            time.sleep(max(0.0, 0.2 - (time.monotonic() - tick)))
        restarted = gw.wait_for_log(lambda r: r.get("message") == "listening"
                                    and r.get("pid") not in pids, timeout=10)
        assert restarted
    finally:
        stop.set()
        for t in loaders:
            t.join(5)
    assert scrapes >= 20 and answered == {0, 1} and counts[0] > 200, (scrapes, answered, counts)
    assert not drops, f"{len(drops)} decreases, first: {drops[:5]}"
    routed = sum(v for (name, labels), v in last.items()
                 if name == "gateway_requests_total" and ("service", "mono") in labels)
    assert routed > 0
    assert any(name == "gateway_ratelimit_decisions_total" for name, _ in last)
    out = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


# --- the rules, in-process: two workers' Metrics over one run directory


def requests_total(text: str) -> float:
    return sum(v for (name, _), v in counter_samples(text).items()
               if name == "gateway_requests_total")


def test_a_scrape_answered_by_the_other_worker_never_shows_less(tmp_path):
    a, b = Metrics(str(tmp_path), 0), Metrics(str(tmp_path), 1)
    for m, n in ((a, 5), (b, 3)):
        for _ in range(n):
            m.request_done("svc", "GET", "/x", 200, 0.001)
        m.publish()
    for _ in range(2):                       # counted after a's last periodic publish
        a.request_done("svc", "GET", "/x", 200, 0.001)
    first = requests_total(a.render().decode())
    second = requests_total(b.render().decode())
    assert first == second == 10


def test_a_restarted_worker_carries_on_from_its_predecessor(tmp_path):
    decisions = {"allowed": 7}
    breaker = {"open": 1}

    def source():
        return {"gateway_ratelimit_decisions": ("decisions", ("outcome",),
                                                [((k,), v) for k, v in decisions.items()]),
                "gateway_ratelimit_breaker_state_gauge": ("state", ("state",),
                                                          [((k,), v) for k, v in breaker.items()])}
    old = Metrics(str(tmp_path), 0)
    old.sources.append(source)
    old.request_done("svc", "GET", "/x", 200, 0.002)
    old.auth_failed("dpop_replay")
    old.publish()
    text = old.render().decode()
    # The worker dies; its replacement's sources start from zero.
    decisions, breaker = {"allowed": 2, "rejected": 1}, {"closed": 1}
    new = Metrics(str(tmp_path), 0)
    new.sources.append(source)
    after = new.render().decode()
    before_samples, after_samples = counter_samples(text), counter_samples(after)
    for key, value in before_samples.items():
        assert after_samples.get(key, 0) >= value, key
    assert ('gateway_ratelimit_decisions_total{outcome="allowed"} 9.0') in after
    assert ('gateway_ratelimit_decisions_total{outcome="rejected"} 1.0') in after
    # A gauge is the live state only: the dead worker's open breaker is gone.
    assert 'gateway_ratelimit_breaker_state{state="open"}' not in after
    assert 'gateway_ratelimit_breaker_state{state="closed"} 1.0' in after


def test_a_peer_file_that_cannot_be_read_keeps_its_last_counts(tmp_path):
    a, b = Metrics(str(tmp_path), 0), Metrics(str(tmp_path), 1)
    b.request_done("svc", "GET", "/x", 200, 0.001)
    b.publish()
    assert requests_total(a.render().decode()) == 1
    (tmp_path / "worker-1.json").write_bytes(b"{not json")
    assert requests_total(a.render().decode()) == 1


def test_sums_are_taken_in_worker_order_whoever_answers(tmp_path):
    workers = [Metrics(str(tmp_path), i) for i in range(3)]
    for m, s in zip(workers, (0.1, 0.2, 0.3)):   # 0.1 + 0.2 + 0.3 != 0.2 + 0.3 + 0.1 in floats
        m.phase("auth", s)
        m.publish()
    sums = {line for m in workers for line in m.render().decode().splitlines()
            if line.startswith("gateway_auth_duration_seconds_sum")}
    assert len(sums) == 1
