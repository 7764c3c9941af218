"""The environment rate limit through the real gateway, with a real valkey-server shared by
two gateway instances: the limit holds across instances, and a Valkey outage fails open."""
from __future__ import annotations

import time

import orjson
import pytest

from tests.support.gwtest import (GatewayThread, NullLog, Pump, Served, connect, port_of,
                                  request, settings_from)
from tests.support.services import ServiceProcess
from tests.support.valkey_server import ValkeyProcess

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  node: {{nodeId: {node}}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{valkey}"
    rules: [{{max_requests: 6, per_seconds: 60}}]
    circuit_breaker: {{failure_threshold: 2, timeout_seconds: 30, half_open_timeout: 10}}
"""


def test_environment_limit_is_shared_across_instances_and_fails_open(tmp_path):
    valkey = ValkeyProcess().start()
    gws, svcs = [], []
    try:
        for node in ("gw-a", "gw-b"):
            d = tmp_path / node
            d.mkdir()
            gw = Served(config_text=CONFIG.format(node=node, valkey=valkey.url), tmp_path=d)
            rec = gw.wait_listening()[0]
            gws.append((gw, port_of(rec["http"])))
            svcs.append(ServiceProcess("rl", port_of(rec["tcp"])).start())
        for svc, (_, port) in zip(svcs, gws):
            svc.wait_routable(port, timeout=15)
        # 2 requests were spent above; 4 more are allowed in the window across BOTH instances.
        statuses = [request(gws[i % 2][1], b"GET /t/rl/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")
                    for i in range(6)]
        assert [s for s, _, _ in statuses] == [200, 200, 200, 200, 429, 429]
        _, headers, body = statuses[4]
        err = orjson.loads(body)["error"]
        assert (err["code"], err["scope"], err["limit"], err["appliesTo"]) == (
            "rate_limit_exceeded", "environment", 6, "identity")
        assert int(headers["retry-after"]) >= 1
        # Valkey goes away: no 5xx, no 401 — the environment check fails open.
        valkey.stop()
        after = [request(gws[0][1], b"GET /t/rl/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] for _ in range(5)]
        assert after == [200] * 5
        metrics = request(gws[0][1], b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
        assert "gateway_ratelimit_valkey_errors_total{" in metrics
        assert "gateway_ratelimit_breaker_trips_total{" in metrics
        assert 'gateway_ratelimit_breaker_state{state="open"} 1.0' in metrics
        count = [line for line in metrics.splitlines()
                 if line.startswith("gateway_ratelimit_check_duration_seconds_count")]
        assert count and float(count[0].split()[-1]) >= 3   # a histogram of the Valkey checks
    finally:
        for svc in svcs:
            svc.stop()
        for gw, _ in gws:
            gw.stop()
        valkey.close()


GET = b"GET /t/rl/whoami HTTP/1.1\r\nHost: gw\r\n\r\n"


def test_the_pipeline_continues_from_the_valkey_reply(tmp_path):
    """In-process: the reply's continuation answers a client that has gone, and a stage
    failing inside it answers 500 without harming the Valkey connection."""
    valkey = ValkeyProcess().start()
    log = NullLog()
    gw = GatewayThread(settings_from(f"""
gateway: {{http: {{port: 0}}, admin: {{publicEndpoints: [all]}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{valkey.url}"
    rules: [{{max_requests: 1000, per_seconds: 60}}]
"""), log=log.log).start()
    svc = ServiceProcess("rl", gw.transport_port).start()
    limiter = gw.worker.limiter
    counters = lambda: gw.call(lambda: (limiter.counters["environment_checks"],   # noqa: E731
                                        dict(limiter.counters["valkey_errors"])))
    try:
        svc.wait_routable(gw.port, timeout=15)
        checks, _ = counters()
        # The client leaves while Valkey holds the check (paused for less than the timeout).
        valkey.command("CLIENT", "PAUSE", "150", "ALL")
        with connect(gw.port) as s:
            s.sendall(GET)
        time.sleep(0.4)
        assert request(gw.port, GET)[0] == 200
        assert counters() == (checks + 2, {})
        # A stage that raises after the reply (selection, stage 10): 500 and a log line;
        # the next request is fine. A version pin not asked for before has no cached
        # ranking, so RoutingState.select (patched here) runs rather than Route.pick.
        routing = gw.worker.routing
        real = routing.select

        def broken(*args):
            routing.select = real
            raise RuntimeError("stage bug")
        gw.call(setattr, routing, "select", broken)
        status, _, body = request(gw.port, GET.replace(b"\r\n\r\n",
                                                       b"\r\nX-Service-Version: 1.0.0\r\n\r\n"))
        assert status == 500 and orjson.loads(body)["error"]
        assert request(gw.port, GET)[0] == 200
        assert counters() == (checks + 4, {})
        assert gw.call(lambda: limiter.client.connects) == 1
        failed = [r for r in map(orjson.loads, log.lines())
                  if r["message"] == "pipeline callback failed"]
        assert len(failed) == 1 and "stage bug" in failed[0]["error"]
    finally:
        svc.stop()
        gw.stop()
        valkey.close()


ROUTES_CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{valkey}"
    rules: [{{max_requests: 100, per_seconds: 60}}]
    microservices:
      rl:
        routes:
          anchored:
            pattern: "^/t/rl/hit/r$"
            match_type: regex
            rules: [{{max_requests: 2, per_seconds: 60}}]
          folder:
            pattern: /t/rl/hit/p/*
            match_type: prefix
            rules: [{{max_requests: 2, per_seconds: 60}}]
"""


def test_a_trailing_slash_does_not_escape_a_route_override(tmp_path):
    """docs/security.md §3d row 32: the router takes `/a` and `/a/` for one endpoint, so
    the route's tighter rules must hold for both spellings. An anchored regex missed `/a/`
    and a prefix written with its slash missed `/a`: the service-wide rules (100) applied."""
    valkey = ValkeyProcess().start()
    gw = svc = None
    try:
        gw = Served(config_text=ROUTES_CONFIG.format(valkey=valkey.url), tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, "/t/rl/hits", timeout=15)

        def get(path):
            return request(port, b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode())

        answers = [get(p) for p in ("/t/rl/hit/r", "/t/rl/hit/r/", "/t/rl/hit/r/",
                                    "/t/rl/hit/p", "/t/rl/hit/p/", "/t/rl/hit/p")]
        assert [a[0] for a in answers] == [200, 200, 429, 200, 200, 429]
        for refused in (answers[2], answers[5]):
            err = orjson.loads(refused[2])["error"]
            assert err["limit"] == 2 and err["rule"].startswith(
                "rate_limiting.for_environment.microservices.rl.routes.")
        seen = orjson.loads(get("/t/rl/hits")[2])["hits"]
        assert seen == ["/t/rl/hit/r", "/t/rl/hit/r/", "/t/rl/hit/p", "/t/rl/hit/p/"]
    finally:
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        valkey.close()


STALL_CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  node: {{workers: 1}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{valkey}"
    rules: [{{max_requests: 1000000, per_seconds: 60}}]
"""


def test_a_stall_of_the_gateway_itself_is_not_a_valkey_timeout(tmp_path):
    """docs/security.md §3d row 37: the loop runs due timers before it reads sockets, so a
    gateway that stopped running for 0.4 s (SIGSTOP here; a long callback, a collection,
    CPU throttling in production) found its Valkey checks past their deadline with the
    replies unread: one timeout reset the healthy connection, every check on it failed,
    and the breaker opened, the environment tier off for its timeout."""
    import os
    import signal

    valkey = ValkeyProcess().start()
    gw = svc = None
    try:
        gw = Served(config_text=STALL_CONFIG.format(valkey=valkey.url), tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        worker = rec["pid"]
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, timeout=15)
        # 40 connections keep requests (so environment checks) in flight all the time.
        with Pump(port, GET, 40):
            time.sleep(0.5)
            for _ in range(3):
                os.kill(worker, signal.SIGSTOP)
                time.sleep(0.4)
                os.kill(worker, signal.SIGCONT)
                time.sleep(0.5)
        metrics = request(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
        assert 'gateway_ratelimit_breaker_state{state="closed"} 1.0' in metrics
        assert 'gateway_ratelimit_valkey_errors_total{type="timeout"}' not in metrics
        assert 'gateway_ratelimit_environment_skipped_total{reason="breaker_open"} 0.0' in metrics
        checked = [line for line in metrics.splitlines()
                   if line.startswith('gateway_ratelimit_decisions_total{outcome="allowed",'
                                      'scope="environment"}')]
        assert checked and float(checked[0].split()[-1]) > 100
    finally:
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        valkey.close()


def test_one_valkey_hiccup_is_one_failure_for_the_breaker(tmp_path):
    """docs/security.md §3d row 39: a Valkey that paused 0.3 s under load timed one check
    out; the connection was reset and every other check on it failed with it, each counted
    by the breaker as one more consecutive failure (50 of them): one hiccup opened the
    breaker (threshold 5), the fleet-wide limit off for its timeout. The checks that failed
    only with the reset still fail open and are counted as errors, not as failures."""
    import os
    import signal

    valkey = ValkeyProcess().start()
    gw = svc = None
    stopped = False
    try:
        gw = Served(config_text=STALL_CONFIG.format(valkey=valkey.url), tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, timeout=15)
        with Pump(port, GET, 40):
            time.sleep(0.5)
            os.kill(valkey.proc.pid, signal.SIGSTOP)
            stopped = True
            time.sleep(0.3)
            os.kill(valkey.proc.pid, signal.SIGCONT)
            stopped = False
            time.sleep(0.5)
        metrics = request(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
        errors = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.splitlines()
                  if line.startswith("gateway_ratelimit_valkey_errors_total{")}
        assert errors.get('gateway_ratelimit_valkey_errors_total{type="timeout"}') == 1.0
        assert errors.get('gateway_ratelimit_valkey_errors_total{type="connection"}', 0) >= 5
        assert 'gateway_ratelimit_breaker_state{state="closed"} 1.0' in metrics
        assert 'gateway_ratelimit_environment_skipped_total{reason="breaker_open"} 0.0' in metrics
    finally:
        if stopped:
            os.kill(valkey.proc.pid, signal.SIGCONT)
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        valkey.close()
