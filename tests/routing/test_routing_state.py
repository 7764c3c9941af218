"""Routing state: HELLO validation, registration, health ageing and instance selection."""
from __future__ import annotations

import collections
import time

import pytest

from stellagw.routing.radix import FOUND, METHOD_NOT_ALLOWED, NOT_FOUND
from stellagw.routing.state import (DEGRADED, DRAINING, HEALTHY, UNHEALTHY, HelloError,
                                    RoutingState)

pytestmark = pytest.mark.twin   # run again uncompiled by `make test`: routing/table.py is glue


def hello(service="scanner", version="1.0.0", instance="i1", region="eu1", endpoints=None):
    return {"service": service, "version": version, "instance_id": instance, "region": region,
            "endpoints": endpoints or [{"method": "GET", "path": "/api/v1/scans/{id}"},
                                       {"method": "POST", "path": "/api/v1/scans"}]}


def state(**kw):
    return RoutingState("eu1", neighbor_regions=("eu2",), **kw)


def test_register_match_and_unregister():
    s = state(service_expiry=0)
    inst = s.register(object(), hello())
    code, route, params = s.match("GET", "/api/v1/scans/42")
    assert code == FOUND and params == {"id": "42"} and route.service == "scanner"
    assert s.match("DELETE", "/api/v1/scans/42")[0] == METHOD_NOT_ALLOWED
    assert s.select(route)[0] is inst
    s.unregister(inst)
    # The service stays known (503, not 404) after its last instance left.
    code, kept, _ = s.match("GET", "/api/v1/scans/42")
    assert code == FOUND and kept is route and s.select(route) is None
    assert s.instances == {} and s.routes == {}


@pytest.mark.parametrize("bad, why", [
    ({"version": "1.0"}, "semver"),
    ({"service": "Bad Name"}, "service"),
    ({"endpoints": {}}, "must be a list"),
    ({"endpoints": [{"method": "FETCH", "path": "/a"}]}, "method"),
    ({"endpoints": [{"method": "GET", "path": "a"}]}, "path"),
    ({"endpoints": [{"method": "GET", "path": "/a", "timeout_ms": -1}]}, "timeout_ms"),
    ({"endpoints": [{"method": "GET", "path": "/a/{"}]}, "/a/{"),
    # Free text shown in health answers, logs and the OpenAPI document: a 1 MB region or
    # pre-release, an instance id that reads as another (U+202E) or breaks a line.
    ({"region": "r" * 65}, "'region' longer than 64"),
    ({"version": "1.0.0-" + "a" * 200}, "'version' longer than 128"),
    ({"instance_id": "scanner-1\u202e2-"}, "'instance_id' holds a control"),
    ({"instance_id": "scanner-1\nlevel=error"}, "'instance_id' holds a control"),
    ({"region": "eu1\u200b"}, "'region' holds a control"),
])
def test_bad_hello_is_refused_and_leaves_nothing_registered(bad, why):
    s = state()
    s.register(object(), hello(service="policy", instance="p1",
                               endpoints=[{"method": "GET", "path": "/api/v1/policies"}]))
    before = (dict(s.instances), dict(s.routes), s.router.routes())
    with pytest.raises(HelloError, match=why.replace("{", r"\{")):
        s.register(object(), {**hello(), **bad})
    assert (dict(s.instances), dict(s.routes), s.router.routes()) == before


def test_a_region_with_spaces_and_a_long_build_suffix_are_still_accepted():
    s = state()
    inst = s.register(object(), {**hello(), "region": "eu west 1",
                                 "version": "1.2.3-rc.1+" + "b" * 100})
    assert inst.region == "eu west 1" and inst.version.endswith("b" * 100)


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
    # Only the route's own versions are kept ranked: a pin nobody has is not remembered.
    assert "9.9.9" not in route._cache and {"1.2.0", "1.10.0"} <= set(route._cache)


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


# ---------------------------------------------------------------------------------------
# A service outlives its instances (503 until routing.serviceExpiry, then 404)


def eps(*paths, method="GET"):
    return [{"method": method, "path": p} for p in paths]


def test_a_service_whose_last_instance_left_answers_503_until_it_expires():
    s = state(service_expiry=60)
    inst = s.register(object(), hello(endpoints=eps("/a/{id}", "/b")))
    route = s.match("GET", "/a/1")[1]
    s.unregister(inst)
    code, kept, params = s.match("GET", "/a/1")
    assert (code, kept, params) == (FOUND, route, {"id": "1"})
    assert s.select(route) is None and s.select(route, "1.0.0") is None
    assert kept.candidates[0][1].path == "/a/{id}"      # what the pipeline reads before 503
    assert s.retry_after == b"retry-after: 5\r\n"
    gone_at = s._departed["scanner"]
    s.check_health(gone_at + 59)
    assert s.match("GET", "/b")[0] == FOUND
    s.check_health(gone_at + 61)
    assert s.match("GET", "/a/1")[0] == NOT_FOUND and s.match("GET", "/b")[0] == NOT_FOUND
    assert len(s.router) == 0 and s.services == {} and s._routes == {}


def test_service_expiry_zero_never_forgets():
    s = state(service_expiry=0)
    s.unregister(s.register(object(), hello()))
    s.check_health(10 ** 9)
    assert s.match("POST", "/api/v1/scans")[0] == FOUND


@pytest.mark.parametrize("expiry", [600, 0])
def test_routes_of_services_that_left_are_bounded(monkeypatch, expiry):
    """Services registering and leaving one after another, each a name of its own: their
    routes stayed for serviceExpiry (for good with 0) — ~7 MB a service of 4,096 routes,
    without end as a peer went on (docs/security.md §3d, "departed services"). Past
    MAX_PARKED_ROUTES the services that left first are forgotten (404) at once."""
    from stellagw.routing import state as st
    monkeypatch.setattr(st, "MAX_PARKED_ROUTES", 35, raising=False)
    s = state(service_expiry=expiry)
    for k in range(10):
        s.unregister(s.register(object(), hello(service=f"gone{k}", instance=f"g{k}",
                                                endpoints=eps(*[f"/g{k}/{i}" for i in range(10)]))))
    assert sum(len(svc.routes) for svc in s.services.values()) <= 35
    assert list(s._departed) == ["gone7", "gone8", "gone9"]
    assert s.match("GET", "/g0/1")[0] == NOT_FOUND and s.match("GET", "/g9/1")[0] == FOUND
    assert len(s.router) == 30
    # One that comes back gives its room back; a live service is never forgotten.
    s.register(object(), hello(service="gone9", instance="back", endpoints=eps("/g9/1")))
    live = s.register(object(), hello(service="live", instance="l", endpoints=eps(
        *[f"/live/{i}" for i in range(40)])))
    for k in range(10, 14):
        s.unregister(s.register(object(), hello(service=f"gone{k}", instance=f"g{k}",
                                                endpoints=eps(*[f"/g{k}/{i}" for i in range(10)]))))
    assert s.match("GET", "/live/39")[1].candidates[0][0] is live
    assert s.match("GET", "/g9/1")[0] == FOUND and list(s._departed)[-1] == "gone13"
    assert s._parked == sum(s.services[n].parked for n in s._departed) <= 35


def test_a_service_that_comes_back_has_the_routes_its_instances_declare():
    s = state(service_expiry=60)
    s.unregister(s.register(object(), hello(endpoints=eps("/a/{id}", "/b"))))
    route = s.match("GET", "/a/1")[1]
    back = s.register(object(), hello(instance="i2", endpoints=eps("/a/{id}", "/c")))
    assert s.match("GET", "/a/1")[1] is route and s.select(route)[0] is back
    assert s.match("GET", "/b")[0] == NOT_FOUND        # no longer declared
    assert s.match("GET", "/c")[0] == FOUND
    assert "scanner" not in s._departed
    s.check_health(time.monotonic() + 3600)             # not forgotten: it is back
    assert s.match("GET", "/a/1")[0] == FOUND


def test_a_hello_without_endpoints_keeps_the_departed_routes_until_it_declares_some():
    s = state(service_expiry=60)
    s.unregister(s.register(object(), hello(endpoints=eps("/a", "/b"))))
    conn = object()
    s.register(conn, {**hello(instance="i2"), "endpoints": []})
    assert s.match("GET", "/a")[0] == FOUND and s.select(s.match("GET", "/a")[1]) is None
    inst = s.register(conn, hello(instance="i2", endpoints=eps("/a")))   # ENDPOINTS_UPDATE
    assert s.select(s.match("GET", "/a")[1])[0] is inst
    assert s.match("GET", "/b")[0] == NOT_FOUND


def test_another_service_cannot_take_a_departed_services_routes():
    s = state(service_expiry=60)
    s.unregister(s.register(object(), hello(endpoints=eps("/a"))))
    with pytest.raises(HelloError, match="already served by service 'scanner'.*serviceExpiry"):
        s.register(object(), hello(service="imposter", endpoints=eps("/a")))
    s.check_health(time.monotonic() + 61)
    s.register(object(), hello(service="newcomer", endpoints=eps("/a")))
    assert s.match("GET", "/a")[1].service == "newcomer"


def test_an_instance_leaving_others_takes_the_routes_only_it_declared():
    s = state(service_expiry=60)
    s.register(object(), hello(instance="i1", endpoints=eps("/a", "/b")))
    second = s.register(object(), hello(instance="i2", endpoints=eps("/a", "/only-here")))
    s.unregister(second)
    assert s.match("GET", "/only-here")[0] == NOT_FOUND
    assert s.match("GET", "/a")[0] == FOUND and s.match("GET", "/b")[0] == FOUND
    assert s._departed == {}


def test_the_routes_snapshot_changes_identity_only_with_registrations():
    s = state(service_expiry=60)
    inst = s.register(object(), hello(endpoints=eps("/a")))
    snap = s.routes
    assert s.routes is snap and list(snap) == [("GET", "/a")]
    live = s.match("GET", "/a")[1]
    assert snap[("GET", "/a")] is not live and snap[("GET", "/a")].candidates == live.candidates
    s.heartbeat(inst, "Degraded", ping_ms=3.0)
    assert s.routes is snap                             # health is not a registration change
    other = s.register(object(), hello(instance="i2", endpoints=eps("/a")))
    assert s.routes is not snap and len(s.routes[("GET", "/a")].candidates) == 2
    assert len(snap[("GET", "/a")].candidates) == 1     # the old snapshot did not move
    s.unregister(inst)
    s.unregister(other)
    assert s.routes == {}                               # departed routes are not published


# ---------------------------------------------------------------------------------------
# Registration at scale: the router changes in place, heartbeats leave rankings alone


def test_the_router_is_changed_in_place_route_by_route():
    s = state(service_expiry=0)
    router = s.router
    a = s.register(object(), hello(endpoints=eps("/a", "/a/{x}")))
    b = s.register(object(), hello(service="policy", instance="p", endpoints=eps("/p")))
    route = s.match("GET", "/a")[1]
    s.register(object(), hello(instance="i2", endpoints=eps("/a", "/a/{x}")))
    s.unregister(a)
    assert s.router is router and s.match("GET", "/a")[1] is route
    assert sorted(t for _, t, _ in router.routes()) == ["/a", "/a/{x}", "/p"]
    assert all(ep is s._routes[(m, t)] for m, t, ep in router.routes())
    s.unregister(b)
    assert s.match("GET", "/p")[0] == FOUND and s.select(s.match("GET", "/p")[1]) is None


def test_a_refused_template_takes_its_hello_siblings_out_of_the_router_again():
    s = state()
    s.register(object(), hello(service="policy", instance="p", endpoints=eps("/x/{key}")))
    before = s.router.routes()
    with pytest.raises(HelloError, match=r"/x/\{id\}"):
        s.register(object(), hello(endpoints=eps("/new/one", "/new/two", "/x/{id}")))
    assert s.router.routes() == before and s.match("GET", "/new/one")[0] == NOT_FOUND
    assert "scanner" not in s.services


def test_heartbeats_that_change_nothing_selection_sees_keep_every_ranking():
    s = state(heartbeat_interval=10)
    one = s.register(object(), hello(instance="one", endpoints=eps("/a")))
    two = s.register(object(), hello(instance="two", endpoints=eps("/a")))
    other = s.register(object(), hello(service="policy", instance="p", endpoints=eps("/p")))
    a, p = s.match("GET", "/a")[1], s.match("GET", "/p")[1]
    s.heartbeat(one, "Healthy", ping_ms=0.2)
    s.heartbeat(two, "Healthy", ping_ms=0.4)
    s.select(a), s.select(p)
    ranked_a, ranked_p = a._cache[None], p._cache[None]
    for _ in range(50):
        s.heartbeat(one, "Healthy", in_flight=3, ping_ms=0.3)   # same 1 ms band
        s.heartbeat(other, "Healthy", ping_ms=0.1)
    assert a._cache[None] is ranked_a and p._cache[None] is ranked_p
    s.heartbeat(two, "Healthy", ping_ms=9.0)                     # another band: re-rank /a
    for _ in range(10):
        s.heartbeat(two, "Healthy", ping_ms=9.0)
    assert None not in a._cache and p._cache[None] is ranked_p
    assert {s.select(a)[0] for _ in range(4)} == {one}


def test_a_late_heartbeat_is_seen_by_the_health_check_and_undone_by_the_next_heartbeat():
    s = state(heartbeat_interval=10, degraded_after=25, unhealthy_after=40)
    one = s.register(object(), hello(instance="one", endpoints=eps("/a")))
    two = s.register(object(), hello(instance="two", endpoints=eps("/a")))
    a = s.match("GET", "/a")[1]
    assert {s.select(a)[0] for _ in range(4)} == {one, two}
    s.heartbeat(one, "Healthy")
    s.check_health(one.last_heartbeat + 1)     # two has been silent since it registered
    two.last_heartbeat = one.last_heartbeat - 11
    s.check_health(one.last_heartbeat + 1)
    assert two.status == HEALTHY and two.late == 1
    assert {s.select(a)[0] for _ in range(4)} == {one}
    s.heartbeat(two, "Healthy")
    assert {s.select(a)[0] for _ in range(4)} == {one, two}


def test_expiry_of_many_services_is_spread_over_loop_iterations():
    import asyncio

    from stellagw.routing import state as state_mod

    s = state(service_expiry=1)
    per = state_mod.EXPIRY_BATCH // 2 + 1
    for k in range(3):
        s.unregister(s.register(object(), hello(
            service=f"s{k}", instance="i",
            endpoints=[{"method": "GET", "path": f"/s{k}/{n}"} for n in range(per)])))
    total = len(s.router)

    async def run():
        s.check_health(time.monotonic() + 2)
        first = total - len(s.router)
        for _ in range(10):
            await asyncio.sleep(0)
        return first
    first = asyncio.run(run())
    assert first == state_mod.EXPIRY_BATCH and len(s.router) == 0 and s.services == {}


# ---------------------------------------------------------------------------------------
# Random sequences of registrations, updates, disconnects and expiry against a model

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stellagw.routing.state import DEPARTED  # noqa: E402

# "/shared" is claimed by both services (refused for the second); "/s/{*rest}" and
# "/s/{*tail}" have one shape (the router refuses the second).
POOLS = {"a": ["/a", "/a/{id}", "/a/{id}/x", "/s/{*rest}", "/shared"],
         "b": ["/b", "/b/{id}", "/s/{*tail}", "/shared"]}
LINKS = 4

ops = st.lists(st.one_of(
    st.tuples(st.just("hello"), st.integers(0, LINKS - 1), st.sampled_from(sorted(POOLS)),
              st.integers(0, 31), st.sampled_from(["GET", "POST"])),
    st.tuples(st.just("update"), st.integers(0, LINKS - 1), st.integers(0, 31)),
    st.tuples(st.just("close"), st.integers(0, LINKS - 1)),
    st.tuples(st.just("expire"), st.sampled_from(["due", "early"]))), max_size=30)


def _pick(service, mask, method):
    return [(method, p) for k, p in enumerate(POOLS[service]) if mask >> k & 1]


class Model:
    """What the docs say: a service with instances has the routes they declare; one whose
    last instance left keeps the routes it had until it expires; a HELLO or update that
    declares nothing leaves a departed service's routes alone."""

    def __init__(self):
        self.links = {}       # link -> (service, [(method, path)])
        self.kept = {}        # service -> {(method, path)} kept without an instance
        self.departed = {}    # service -> step its last instance left

    def owner(self, key):
        for service, routes in self.routes().items():
            if key in routes:
                return service
        return None

    def routes(self):
        out = {s: set(k) for s, k in self.kept.items()}
        for service, declared in self.links.values():
            out.setdefault(service, set()).update(declared)
        return out

    def claim(self, link, service, declared):
        """None if the state must refuse it, else applies it."""
        for key in declared:
            owner = self.owner(key)
            if owner not in (None, service):
                return None
        shapes = {(m, p.split("{")[0]) for s, keys in self.routes().items() if s != service
                  for m, p in keys if "{*" in p}
        if any("{*" in p and (m, p.split("{")[0]) in shapes for m, p in declared):
            return None
        self.links[link] = (service, declared)
        if declared:
            self.kept.pop(service, None)
        self.departed.pop(service, None)
        return True

    def close(self, link, step):
        service, declared = self.links.pop(link)
        if not any(s == service for s, _ in self.links.values()):
            kept = self.kept.setdefault(service, set())
            kept.update(declared)
            if kept:
                self.departed[service] = step
            else:
                del self.kept[service]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops)
def test_random_registration_sequences_match_the_model(ops):
    _run_model(ops)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, drains=st.lists(st.booleans(), min_size=30, max_size=30))
def test_the_same_sequences_waiting_in_the_loop_end_the_same(ops, drains):
    """Every HELLO and disconnect waits for the loop (as in a storm), the state is looked at
    only at random points: what waits is done in order, and a HELLO refused late is
    refused through on_refused, exactly those the model refuses."""
    import asyncio

    from stellagw.routing import state as state_mod

    async def run():
        saved = state_mod.BATCH_BUDGET, state_mod.PUMP_SLICE
        state_mod.BATCH_BUDGET = state_mod.PUMP_SLICE = 0.0
        try:
            _run_model(ops, drains)
        finally:
            state_mod.BATCH_BUDGET, state_mod.PUMP_SLICE = saved
    asyncio.run(run())


def _run_model(ops, drains=None):
    """Sync when drains is None; else every step waits in the state's queue and, where
    drains says so, the loop runs until nothing waits before the model is compared."""
    # Health never ages here: the clock jumps for expiry only.
    s = state(service_expiry=100, heartbeat_interval=1e9, degraded_after=1e9, unhealthy_after=1e9)
    refused, expected_refused = [], []
    s.on_refused = lambda conn, message: refused.append(conn)
    model = Model()
    conns = [object() for _ in range(LINKS)]
    live = {}                               # link -> Instance
    clock = [0.0]
    import types

    import stellagw.routing.state as state_mod
    saved = state_mod.time
    state_mod.time = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)

    def settle():
        loop = asyncio.get_running_loop()
        while s.pending():
            loop._run_once()

    def claim(link, service, declared, h):
        verdict = model.claim(link, service, declared)
        try:
            live[link] = s.register(conns[link], h)
        except HelloError:
            assert drains is None and verdict is None
            return
        assert verdict or drains is not None
        if verdict is None:                 # refused when its turn comes
            expected_refused.append(conns[link])
            del live[link]

    import asyncio
    try:
        for step, op in enumerate(ops):
            clock[0] = step * 10.0
            if op[0] == "hello" and op[1] not in live:
                _, link, service, mask, method = op
                conns[link] = object()      # a new connection
                declared = _pick(service, mask, method)
                claim(link, service, declared,
                      {**hello(service=service, instance=f"{service}{link}"),
                       "endpoints": [{"method": m, "path": p} for m, p in declared]})
            elif op[0] == "update" and op[1] in live:
                link, inst = op[1], live[op[1]]
                declared = _pick(inst.service, op[2], model.links[link][1][0][0]
                                 if model.links[link][1] else "GET")
                claim(link, inst.service, declared,
                      {**hello(service=inst.service, instance=inst.instance_id),
                       "endpoints": [{"method": m, "path": p} for m, p in declared]})
                if link not in live:        # a refused update closes the link
                    model.close(link, step)
            elif op[0] == "close" and op[1] in live:
                s.unregister(live.pop(op[1]))
                model.close(op[1], step)
            elif op[0] == "expire":
                if drains is not None:
                    settle()                # expiry reads what has happened so far
                late = 101 if op[1] == "due" else 99
                oldest = min(model.departed.values(), default=None)
                if oldest is not None:
                    now = oldest * 10.0 + late
                    s.check_health(now)
                    for service, left in list(model.departed.items()):
                        if now - left * 10.0 >= 100:
                            del model.departed[service]
                            del model.kept[service]
            if drains is None or drains[step % len(drains)]:
                if drains is not None:
                    settle()
                _check(s, model, live)
        if drains is not None:
            settle()
            _check(s, model, live)
            assert refused == expected_refused
    finally:
        state_mod.time = saved


def _check(s, model, live):
    expected = {key: service for service, keys in model.routes().items() for key in keys}
    assert {(m, t) for m, t, _ in s.router.routes()} == set(expected) == set(s._routes)
    assert s.routes.keys() == {k for k, svc in expected.items()
                               if any(svc == sv and k in d for sv, d in model.links.values())}
    for (method, template), service in expected.items():
        route = s._routes[(method, template)]
        assert route.service == service
        path = template.replace("{id}", "7").replace("{*rest}", "r").replace("{*tail}", "r")
        assert s.match(method, path)[1] is route
        serving = {id(i) for link, i in live.items() if (method, template) in model.links[link][1]}
        if serving:
            assert {id(c[0]) for c in route.candidates} == serving
            assert s.select(route) is not None
        else:
            assert [c[0] for c in route.candidates] == [DEPARTED] and s.select(route) is None
    assert {k[0] for k in s.instances} == {i.service for i in live.values()}


# ---------------------------------------------------------------------------------------
# A storm: what does not fit in a loop iteration waits, in order, a slice per iteration


class Conn:
    """What the state may touch of a connection: its transport, to close a refused link."""

    def __init__(self):
        self.transport = self
        self.closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def storm(monkeypatch):
    """Run `fn(state)` inside a loop callback with no budget left: everything waits."""
    import asyncio

    from stellagw.routing import state as state_mod

    def run(s, fn, budget=0.0):
        monkeypatch.setattr(state_mod, "BATCH_BUDGET", budget)

        async def main():
            loop = asyncio.get_running_loop()
            box = {}
            loop.call_soon(lambda: box.setdefault("v", fn(s)))
            await asyncio.sleep(0)
            waited = s.pending()
            while s.pending():
                await asyncio.sleep(0)
            return box["v"], waited
        return asyncio.run(main())
    return run


def test_hellos_beyond_the_iterations_budget_wait_and_are_registered_in_order(storm):
    s = state(service_expiry=60)
    slices = []
    pump = s._pump

    def timed_pump():
        t0 = time.perf_counter()
        pump()
        slices.append(time.perf_counter() - t0)
    s._pump = timed_pump
    hellos = [hello(service=f"s{k}", instance="i",
                    endpoints=eps(*[f"/s{k}/r{n}/{{id}}" for n in range(200)]))
              for k in range(40)]

    def burst(s):
        return [s.register(Conn(), h) for h in hellos]
    insts, waited = storm(s, burst, budget=0.003)
    assert 0 < waited < 40                         # some at once, the rest waited
    assert [s.instances[(i.service, "i", id(i.conn))] for i in insts] == insts
    assert all(len(i.endpoints) == 200 for i in insts)
    assert s.match("GET", "/s39/r199/7")[1].candidates[0][0] is insts[39]
    assert len(slices) > 1                         # spread over loop iterations


def test_a_waiting_hello_refused_when_its_turn_comes_closes_its_link(storm):
    s = state()
    s.register(object(), hello(service="policy", instance="p", endpoints=eps("/x/{key}")))
    refused = []
    conn, other = Conn(), Conn()

    def burst(s):
        return (s.register(conn, hello(endpoints=eps("/new", "/x/{id}"))),
                s.register(other, hello(service="third", endpoints=eps("/x/{key}"))))
    (inst, third), _ = storm(s, burst)
    assert conn.closed and other.closed            # no on_refused: the link is closed
    assert s.match("GET", "/new")[0] == NOT_FOUND and "scanner" not in s.services
    assert inst.status == UNHEALTHY and [k[0] for k in s.instances] == ["policy"]
    s.on_refused = lambda c, message: refused.append((c, message))
    storm(s, lambda s: s.register(conn, hello(endpoints=eps("/x/{id}"))))
    assert refused and refused[0][0] is conn and "/x/{id}" in refused[0][1]
    assert third.status == UNHEALTHY


def test_a_refused_endpoints_update_takes_what_the_link_registered_before(storm):
    s = state(service_expiry=60)
    s.register(object(), hello(service="policy", instance="p", endpoints=eps("/x/{key}")))
    conn = Conn()
    first = s.register(conn, hello(endpoints=eps("/a")))
    storm(s, lambda s: s.register(conn, hello(endpoints=eps("/a", "/x/{id}"))))
    assert conn.closed and first.status == UNHEALTHY
    assert ("scanner", "i1", id(conn)) not in s.instances
    assert s.select(s.match("GET", "/a")[1]) is None      # scanner: departed, 503


def test_a_waiting_disconnect_is_unselectable_at_once(storm):
    s = state()
    conn = object()
    gone = s.register(conn, hello(instance="gone", endpoints=eps("/a")))
    stays = s.register(object(), hello(instance="stays", endpoints=eps("/a")))
    route = s.match("GET", "/a")[1]
    seen = []

    def burst(s):
        s.unregister(gone)
        seen.extend(s.select(route)[0] for _ in range(4))
        return s.pending()
    waiting, _ = storm(s, burst)
    assert waiting == 1 and set(seen) == {stays}
    assert [c[0] for c in route.candidates] == [stays]


def test_a_link_that_closes_while_its_hello_waits_registers_and_leaves(storm):
    s = state(service_expiry=60)
    events = []
    s.listeners.append(lambda ev, inst, **kw: events.append(ev))

    def burst(s):
        inst = s.register(object(), hello(endpoints=eps("/a")))
        s.heartbeat(inst, "Healthy", ping_ms=1.0)  # nothing to re-rank yet, no event
        s.unregister(inst)
        return inst
    inst, _ = storm(s, burst)
    assert events == ["registered", "unregistered"] and s.instances == {}
    assert s.match("GET", "/a")[0] == FOUND and s.select(s.match("GET", "/a")[1]) is None


def test_a_routes_policy_is_the_strictest_declaration_and_follows_its_instances():
    # What the pipeline checks before selecting (Route.policy): every claim, the smallest
    # body limit, a sender constraint if any instance asks; back to the rest's when the
    # strictest instance leaves.
    s = state()
    a = s.register(object(), hello(instance="a", endpoints=[{"method": "GET", "path": "/x"}]))
    b = s.register(object(), hello(version="1.1.0", instance="b", endpoints=[
        {"method": "GET", "path": "/x", "claims": [{"type": "scope", "value": "s1"}],
         "max_body_bytes": 100}]))
    c = s.register(object(), hello(version="1.2.0", instance="c", endpoints=[
        {"method": "GET", "path": "/x", "claims": [{"type": "tenant"}], "max_body_bytes": 50,
         "sender_constrained": True}]))
    route = s.match("GET", "/x")[1]
    p = route.policy
    assert (p.claims, p.max_body, p.sender_constrained) == (
        (("scope", "s1"), ("tenant", None)), 50, True)
    s.unregister(c)
    p = route.policy
    assert (p.claims, p.max_body, p.sender_constrained) == ((("scope", "s1"),), 100, False)
    s.unregister(b)
    assert route.policy is a.endpoints[0]
    # Instances declaring alike share one Endpoint: no new policy object for them.
    d = s.register(object(), hello(instance="d", endpoints=[{"method": "GET", "path": "/x"}]))
    assert d.endpoints[0] is a.endpoints[0] and route.policy is a.endpoints[0]


@pytest.mark.parametrize("template", ["/api/users/me", "/api/{section}/me", "/api/{*rest}",
                                      "/files/reports/{*rest}", "/files", "/{*all}",
                                      "/v/{*rest}"])
def test_a_template_that_overlaps_another_services_is_refused(template):
    # The more specific template wins a match (docs/routing.md §3): a service declaring
    # /api/users/me beside another's /api/users/{id} took that user's requests, whatever
    # the identity checks on service names (found against a real gateway).
    s = state(service_expiry=0)
    victim = s.register(object(), hello(service="victim", instance="v", endpoints=[
        {"method": "GET", "path": "/api/users/{id}"}, {"method": "GET", "path": "/files/{*rest}"},
        {"method": "GET", "path": "/v/{id}"}]))
    before = (dict(s.instances), dict(s.routes), s.router.routes())
    with pytest.raises(HelloError, match="overlaps GET .* of service 'victim'"):
        s.register(object(), hello(service="attacker", instance="a",
                                   endpoints=[{"method": "GET", "path": template}]))
    assert (dict(s.instances), dict(s.routes), s.router.routes()) == before
    # Another method, or a template no request shares, is fine.
    s.register(object(), hello(service="attacker", instance="a", endpoints=[
        {"method": "POST", "path": template}, {"method": "GET", "path": "/api/groups/{id}"},
        {"method": "GET", "path": "/v/{id}/x"}]))
    # A departed service's templates stay its own until it expires ...
    s.unregister(victim)
    with pytest.raises(HelloError, match="overlaps"):
        s.register(object(), hello(service="other", instance="o",
                                   endpoints=[{"method": "GET", "path": "/files/x"}]))
    # ... and its own templates may overlap each other.
    s.register(object(), hello(service="victim", instance="v2", endpoints=[
        {"method": "GET", "path": "/api/users/{id}"}, {"method": "GET", "path": "/api/users/me"}]))


def test_overlapping_services_may_be_allowed():
    s = state()
    s.allow_overlap = True
    s.register(object(), hello(service="users", instance="u",
                               endpoints=[{"method": "GET", "path": "/api/users/{id}"}]))
    s.register(object(), hello(service="profile", instance="p",
                               endpoints=[{"method": "GET", "path": "/api/users/me"}]))
    assert s.match("GET", "/api/users/me")[1].service == "profile"
    assert s.match("GET", "/api/users/42")[1].service == "users"
