"""Outlier ejection (stellagw/routing/outliers.py, RoutingState.failed): consecutive 5xx
answers and timeouts take an instance out of selection for a growing interval, never past
maxEjectionPercent of its service; on a fake clock."""
from __future__ import annotations

import collections

import pytest

from stellagw.config import load_config_text
from stellagw.routing.outliers import ejection_time, may_eject
from stellagw.routing.state import RoutingState


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class Log:
    def __init__(self):
        self.records = []

    def event(self, level, message, **fields):
        self.records.append((level, message, fields))

    def messages(self):
        return [m for _, m, _ in self.records]


def hello(instance, service="flaky", version="1.0.0"):
    return {"service": service, "version": version, "instance_id": instance, "region": "eu1",
            "endpoints": [{"method": "GET", "path": "/f"}]}


def routing(outliers="consecutiveErrors: 5, baseEjectionTime: 30s, maxEjectionTime: 100s",
            n=3):
    s = RoutingState("eu1")
    s.clock = Clock()
    s.log = Log()
    s.configure(load_config_text(f"gateway: {{routing: {{outlierDetection: {{{outliers}}}}}}}",
                                 env={}).gateway.routing)
    insts = [s.register(object(), hello(f"i{k}")) for k in range(n)]
    return s, insts


def fail(s, inst, times, reason="5xx", start=1):
    for streak in range(start, start + times):
        s.failed(inst, streak, reason)


def chosen(s, n=30):
    route = s.match("GET", "/f")[1]
    return collections.Counter(s.select(route)[0].instance_id for _ in range(n))


def test_arithmetic():
    assert [ejection_time(30, n, 100) for n in (1, 2, 3, 4)] == [30, 60, 90, 100]
    assert [may_eject(h, 0, 50) for h in (1, 2, 3, 4)] == [False, True, True, True]
    assert [may_eject(h, 1, 50) for h in (2, 3, 4, 5)] == [False, False, True, True]
    assert may_eject(10, 0, 10) and not may_eject(10, 1, 10) and not may_eject(9, 0, 10)
    assert may_eject(1, 0, 100) and not may_eject(5, 0, 0)


def test_an_instance_failing_in_a_row_is_ejected_then_returns():
    s, (a, b, c) = routing()
    fail(s, a, 4)
    assert not a.ejected_until                      # 4 of 5
    s.failed(a, 5, "5xx")
    assert a.ejected_until == s.clock.t + 30 and a.ejected_reason == "5xx"
    assert set(chosen(s)) == {"i1", "i2"}
    assert s.describe()["flaky"][0]["ejected"] == {"reason": "5xx", "ejections": 1,
                                                   "secondsLeft": 30.0}
    assert s.counters()["gateway_outlier_ejections"][2] == [(("flaky", "5xx"), 1)]
    assert s.counters()["gateway_outlier_ejected_gauge"][2] == [(("flaky",), 1)]
    level, message, fields = s.log.records[-1]
    assert (level, message) == ("warning", "instance ejected")
    assert fields["instance"] == "i0" and fields["seconds"] == 30 and fields["consecutive"] == 5
    s.check_health(s.clock.t + 29)
    assert a.ejected_until
    s.clock.t += 30
    s.check_health(s.clock.t)
    assert not a.ejected_until and set(chosen(s)) == {"i0", "i1", "i2"}
    assert "ejected" not in s.describe()["flaky"][0]
    assert s.log.messages()[-1] == "instance returned"


def test_each_ejection_in_a_row_lasts_longer_up_to_the_cap_and_good_behaviour_resets_it():
    s, (a, b, c) = routing()
    lengths = []
    for _ in range(4):
        fail(s, a, 5)
        lengths.append(a.ejected_until - s.clock.t)
        s.clock.t = a.ejected_until
        s.check_health(s.clock.t)
        # Back, and failing at once: the link's streak went on (no success in between).
        s.clock.t += 1
    assert lengths == [30, 60, 90, 100]
    s.clock.t += 100                                 # in for maxEjectionTime: starts over
    fail(s, a, 5)
    assert a.ejected_until - s.clock.t == 30 and a.ejections == 1


def test_timeouts_count_like_5xx():
    s, (a, b, c) = routing()
    fail(s, a, 5, "timeout")
    assert a.ejected_reason == "timeout"
    assert s.counters()["gateway_outlier_ejections"][2] == [(("flaky", "timeout"), 1)]


def test_never_below_the_minimum_healthy_share():
    s, (a, b) = routing(n=2)                         # 50 %: one of two
    fail(s, a, 5)
    fail(s, b, 8)
    assert a.ejected_until and not b.ejected_until
    assert set(chosen(s)) == {"i1"}
    kept = [f for _, m, f in s.log.records if m == "outlier kept in selection"]
    assert len(kept) == 1 and kept[0]["instance"] == "i1"    # logged once, at the threshold
    # When a returns, b (still failing) is ejected at its next failure, and a cannot be.
    s.clock.t = a.ejected_until
    s.check_health(s.clock.t)
    s.failed(b, 9, "5xx")
    assert b.ejected_until and not a.ejected_until
    s.failed(a, 6, "5xx")
    assert not a.ejected_until


def test_a_services_only_instance_is_never_ejected():
    s, (a,) = routing(n=1)
    fail(s, a, 50)
    assert not a.ejected_until and set(chosen(s, 3)) == {"i0"}


def test_instances_out_of_selection_by_health_do_not_count_as_healthy():
    s, (a, b, c, d) = routing(n=4)                   # 50 % of 4: two ...
    s.heartbeat(c, "Draining")
    s.heartbeat(d, "Unhealthy")                     # ... but only a and b are routable
    fail(s, a, 5)
    fail(s, b, 5)
    assert a.ejected_until and not b.ejected_until


def test_max_ejection_percent_100_may_empty_a_service():
    s, (a,) = routing("consecutiveErrors: 2, maxEjectionPercent: 100", n=1)
    fail(s, a, 2)
    assert a.ejected_until and s.select(s.match("GET", "/f")[1]) is None


def test_off_and_turned_off():
    s, (a, b, c) = routing("consecutiveErrors: 0")
    fail(s, a, 50)
    assert not a.ejected_until
    s, (a, b, c) = routing()
    fail(s, a, 5)
    assert a.ejected_until
    s.configure(load_config_text("gateway: {routing: {outlierDetection: {consecutiveErrors: 0}}}",
                                 env={}).gateway.routing)
    assert not a.ejected_until and set(chosen(s)) == {"i0", "i1", "i2"}


def test_an_ejected_instance_that_leaves_or_updates_its_endpoints():
    s, (a, b, c) = routing()
    fail(s, a, 5)
    # ENDPOINTS_UPDATE on the same link: still ejected.
    a2 = s.register(a.conn, {**hello("i0"), "endpoints": [{"method": "GET", "path": "/f"},
                                                          {"method": "GET", "path": "/g"}]})
    assert a2.ejected_until == a.ejected_until and set(chosen(s)) == {"i1", "i2"}
    s.unregister(a2)
    s.clock.t += 30
    s.check_health(s.clock.t)                        # nothing to return, nothing logged
    assert s.log.messages()[-1] == "instance ejected"
    assert s.counters()["gateway_outlier_ejected_gauge"][2] == []


@pytest.mark.parametrize("status", ["Draining", "Unhealthy"])
def test_an_instance_out_of_selection_by_health_is_not_ejected(status):
    s, (a, b, c) = routing()
    s.heartbeat(a, status)
    fail(s, a, 5)
    assert not a.ejected_until


def test_the_return_timer_runs_on_the_loop():
    import asyncio

    async def main():
        s, (a, b, c) = routing("consecutiveErrors: 1, baseEjectionTime: 50ms")
        s.clock = __import__("time").monotonic
        s.failed(a, 1, "5xx")
        assert a.ejected_until
        await asyncio.sleep(0.15)
        return a.ejected_until
    assert asyncio.run(main()) == 0.0
