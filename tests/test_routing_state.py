"""Routing state: HELLO validation, registration, health ageing and instance selection."""
from __future__ import annotations

import collections

import pytest

from stellagw.radix import FOUND, METHOD_NOT_ALLOWED, NOT_FOUND
from stellagw.routing.state import (DEGRADED, DRAINING, HEALTHY, UNHEALTHY, HelloError,
                                    RoutingState)


def hello(service="scanner", version="1.0.0", instance="i1", region="eu1", endpoints=None):
    return {"service": service, "version": version, "instance_id": instance, "region": region,
            "endpoints": endpoints or [{"method": "GET", "path": "/api/v1/scans/{id}"},
                                       {"method": "POST", "path": "/api/v1/scans"}]}


def state(**kw):
    return RoutingState("eu1", neighbor_regions=("eu2",), **kw)


def test_register_match_and_unregister():
    s = state()
    inst = s.register(object(), hello())
    code, route, params = s.match("GET", "/api/v1/scans/42")
    assert code == FOUND and params == {"id": "42"} and route.service == "scanner"
    assert s.match("DELETE", "/api/v1/scans/42")[0] == METHOD_NOT_ALLOWED
    assert s.select(route)[0] is inst
    s.unregister(inst)
    assert s.match("GET", "/api/v1/scans/42")[0] == NOT_FOUND
    assert s.instances == {}


@pytest.mark.parametrize("bad, why", [
    ({"version": "1.0"}, "semver"),
    ({"service": "Bad Name"}, "service"),
    ({"endpoints": {}}, "must be a list"),
    ({"endpoints": [{"method": "FETCH", "path": "/a"}]}, "method"),
    ({"endpoints": [{"method": "GET", "path": "a"}]}, "path"),
    ({"endpoints": [{"method": "GET", "path": "/a", "timeout_ms": -1}]}, "timeout_ms"),
    ({"endpoints": [{"method": "GET", "path": "/a/{"}]}, "/a/{"),
])
def test_bad_hello_is_refused_and_leaves_nothing_registered(bad, why):
    s = state()
    s.register(object(), hello(service="policy", instance="p1",
                               endpoints=[{"method": "GET", "path": "/api/v1/policies"}]))
    before = (dict(s.instances), dict(s.routes), s.router.routes())
    with pytest.raises(HelloError, match=why.replace("{", r"\{")):
        s.register(object(), {**hello(), **bad})
    assert (dict(s.instances), dict(s.routes), s.router.routes()) == before


def test_a_route_owned_by_another_service_is_refused():
    s = state()
    s.register(object(), hello())
    with pytest.raises(HelloError, match="already served by service 'scanner'"):
        s.register(object(), hello(service="imposter", instance="x"))
    assert s.match("POST", "/api/v1/scans")[1].service == "scanner"


def test_health_ages_and_draining_is_not_routed():
    s = state(degraded_after=15, unhealthy_after=30)
    inst = s.register(object(), hello())
    t0 = inst.last_heartbeat
    s.check_health(t0 + 14)
    assert inst.status == HEALTHY
    s.check_health(t0 + 16)
    assert inst.status == DEGRADED
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert s.select(route) is not None  # Degraded is still routable
    s.check_health(t0 + 31)
    assert inst.status == UNHEALTHY and s.select(route) is None
    s.heartbeat(inst, "Healthy")
    assert inst.status == HEALTHY and s.select(route) is not None
    s.heartbeat(inst, "Draining")
    assert inst.status == DRAINING and s.select(route) is None


def test_selection_region_tiers_then_ping_then_round_robin():
    s = state()
    far = s.register(object(), hello(instance="far", region="us1"))
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert s.select(route)[0] is far
    near = s.register(object(), hello(instance="near", region="eu2"))
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert s.select(route)[0] is near          # neighbour region beats the rest
    local_slow = s.register(object(), hello(instance="slow", region="eu1"))
    local_fast = s.register(object(), hello(instance="fast", region="eu1"))
    s.heartbeat(local_slow, "Healthy", ping_ms=12.0)
    s.heartbeat(local_fast, "Healthy", ping_ms=0.3)
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert {s.select(route)[0] for _ in range(10)} == {local_fast}
    twin = s.register(object(), hello(instance="twin", region="eu1"))
    s.heartbeat(twin, "Healthy", ping_ms=0.5)  # same ping band as fast: share the load
    route = s.match("GET", "/api/v1/scans/1")[1]
    counts = collections.Counter(s.select(route)[0].instance_id for _ in range(100))
    assert counts == {"fast": 50, "twin": 50}


def test_version_selection_strict_or_newest():
    s = state()
    s.register(object(), hello(instance="old", version="1.2.0"))
    s.register(object(), hello(instance="new", version="1.10.0"))
    s.register(object(), hello(instance="pre", version="2.0.0-rc.1"))
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert s.select(route)[0].instance_id == "pre"  # newest by semver precedence
    assert s.select(route, "1.2.0")[0].instance_id == "old"
    assert s.select(route, "1.10.0")[0].instance_id == "new"
    assert s.select(route, "9.9.9") is None


def test_two_links_of_one_instance_are_two_candidates_until_one_closes():
    s = state()
    events = []
    s.listeners.append(lambda ev, inst, **kw: events.append((ev, inst.conn)))
    a, b = object(), object()
    ia = s.register(a, hello())
    s.register(b, hello())
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert [c[0].conn for c in route.candidates] == [a, b]
    s.unregister(ia)
    route = s.match("GET", "/api/v1/scans/1")[1]
    assert [c[0].conn for c in route.candidates] == [b]
    assert events == [("registered", a), ("registered", b), ("unregistered", a)]


def test_endpoints_update_replaces_the_connections_endpoints():
    s = state()
    conn = object()
    s.register(conn, hello())
    s.register(conn, hello(endpoints=[{"method": "GET", "path": "/api/v2/scans"}]))
    assert s.match("GET", "/api/v1/scans/1")[0] == NOT_FOUND
    assert s.match("GET", "/api/v2/scans")[0] == FOUND
    assert len(s.instances) == 1
