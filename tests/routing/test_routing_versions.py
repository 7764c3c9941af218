"""Versions of a service sharing unpinned traffic: configured weights, the ramp of a new
version, sticky keys (stellagw/routing/versions.py, RoutingState selection), on a fake clock."""
from __future__ import annotations

import collections

import pytest

from stellagw.config import load_config_text
from stellagw.routing import versions as v
from stellagw.routing.state import SPLIT, VERSION_SETTLE, RoutingState
from stellagw.routing.versions import Split

pytestmark = pytest.mark.twin   # run again uncompiled by `make test`: routing/table.py is glue


class Clock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


class Ident:
    def __init__(self, subject, anonymous=False):
        self.subject, self.anonymous = subject, anonymous


class Req:
    """What selection reads of a request (ingress Request fields)."""

    def __init__(self, headers=(), tenant=None, identity=None, client_ip=b"10.0.0.1"):
        self.headers, self.tenant, self.identity, self.client_ip = (
            list(headers), tenant, identity, client_ip)


def hdr(key):
    return Req([(b"x-client", key.encode())])


def hello(version, instance, service="canary", region="eu1"):
    return {"service": service, "version": version, "instance_id": instance, "region": region,
            "endpoints": [{"method": "GET", "path": "/c/{id}"}]}


def routing(yaml_routing: str = "", **kw):
    s = RoutingState("eu1", **kw)
    s.clock = Clock()
    if "stickyKey" not in yaml_routing:
        yaml_routing = "stickyKey: 'header:x-client'\n" + yaml_routing
    text = "gateway:\n  routing:\n" + "".join(f"    {line}\n" for line in yaml_routing.splitlines())
    s.configure(load_config_text(text, env={}).gateway.routing)
    return s


def route(s):
    return s.match("GET", "/c/1")[1]


def spread(s, n=2000, key="client-%d", at=None):
    r = route(s)
    return collections.Counter(s.select(r, None, hdr(key % i))[0].version for i in range(n))


# --------------------------------------------------------------------------- arithmetic

def test_ramp_shares_newest_first_each_a_fraction_of_what_newer_ones_left():
    assert v.ramp_shares([None, None], 0.0, 60) == ([1.0, 0.0], 0.0)
    assert v.ramp_shares([100.0, None], 100.0, 60) == ([0.0, 1.0], 160.0)
    assert v.ramp_shares([100.0, None], 130.0, 60) == ([0.5, 0.5], 160.0)
    assert v.ramp_shares([100.0, None], 160.0, 60) == ([1.0, 0.0], 0.0)
    # Three versions: 1.4 at a quarter, 1.3 at half of what 1.4 left, 1.2 the rest.
    shares, until = v.ramp_shares([145.0, 130.0, None], 160.0, 60)
    assert shares == pytest.approx([0.25, 0.375, 0.375]) and until == 190.0
    # The version it ramped against left: the oldest one present takes the rest.
    assert v.ramp_shares([130.0], 145.0, 60) == ([1.0], 190.0)
    assert v.ramp_shares([100.0, None], 130.0, 0) == ([1.0, 0.0], 0.0)     # no ramp


def test_weight_shares_and_thresholds():
    assert v.weight_shares(["1.3.0", "1.2.0"], {"1.2.0": 90, "1.3.0": 10}) == [0.1, 0.9]
    # Renormalised over what is routable; unlisted versions take nothing.
    assert v.weight_shares(["1.4.0", "1.2.0"], {"1.2.0": 90, "1.3.0": 10}) == [0.0, 1.0]
    assert v.weight_shares(["1.4.0"], {"1.2.0": 90}) is None
    assert v.weight_shares(["1.3.0", "1.2.0"], {"1.2.0": 0, "1.3.0": 0, "9.9.9": 5}) is None
    assert v.thresholds([0.1, 0.9]) == [round(0.1 * 2**32), 2**32]


def test_points_of_many_keys_spread_evenly():
    seed = v.seed_of("canary")
    for fmt in ("c%d", "%d", "client-%d", "10.0.%d.1"):
        points = [v.point((fmt % i).encode(), seed) for i in range(4000)]
        for share in (0.1, 0.5, 0.9):
            below = sum(p < share * 2**32 for p in points) / len(points)
            assert abs(below - share) < 0.025, (fmt, share, below)
    assert v.point(b"a", seed) == v.point(b"a", seed) != v.point(b"a", v.seed_of("other"))


@pytest.mark.parametrize("sticky, req, key", [
    ("header:x-client", Req([(b"x-client", b"k1")]), b"k1"),
    ("header:x-client", Req([(b"x-client", b"")], identity=Ident("alice")), b"alice"),
    ("cookie:sid", Req([(b"cookie", b"a=1; sid=s-9; b=2")]), b"s-9"),
    ("cookie:sid", Req([(b"cookie", b"a=1")]), b"10.0.0.1"),
    ("tenant", Req(tenant="acme", identity=Ident("alice")), b"acme"),
    ("tenant", Req(identity=Ident("alice")), b"alice"),
    ("identity", Req(identity=Ident("alice")), b"alice"),
    ("identity", Req(identity=Ident("anonymous", anonymous=True)), b"10.0.0.1"),
])
def test_sticky_key_and_its_fallbacks(sticky, req, key):
    assert v.key_of(req, *v.parse_sticky(sticky)) == key


# --------------------------------------------------------------------------- the ramp

def test_a_new_version_ramps_in_and_clients_that_moved_stay():
    s = routing("stickyKey: 'header:x-client'\nversionRamp: 60s")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += VERSION_SETTLE
    s.register(object(), hello("1.3.0", "new"))
    assert spread(s) == {"1.2.0": 2000}                 # at 0 %: nobody yet
    s.clock.t += 15
    first = spread(s)
    assert abs(first["1.3.0"] / 2000 - 0.25) < 0.03
    r = route(s)
    moved = [i for i in range(2000) if s.select(r, None, hdr("client-%d" % i))[0].version == "1.3.0"]
    s.clock.t += 15                                      # at 50 %
    assert abs(spread(s)["1.3.0"] / 2000 - 0.5) < 0.03
    assert all(s.select(r, None, hdr("client-%d" % i))[0].version == "1.3.0" for i in moved)
    # The pin is never ramped.
    assert s.select(r, "1.2.0", hdr("client-%d" % moved[0]))[0].version == "1.2.0"
    s.clock.t += 30
    assert spread(s) == {"1.3.0": 2000}
    assert route(s)._cache[None].__class__ is tuple     # done: one ranking, no split
    assert Split not in route(s)._cache


def test_versions_that_register_together_are_not_ramped():
    # A worker that (re)starts sees every version within seconds: the newest serves at once.
    s = routing("stickyKey: 'header:x-client'\nversionRamp: 60s")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += VERSION_SETTLE - 1
    s.register(object(), hello("1.3.0", "new"))
    assert spread(s, 200) == {"1.3.0": 200}


def test_version_ramp_zero_switches_at_once():
    s = routing("stickyKey: 'header:x-client'\nversionRamp: 0")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += 3600
    s.register(object(), hello("1.3.0", "new"))
    assert spread(s, 200) == {"1.3.0": 200}


def test_a_reconnect_continues_its_ramp_and_a_long_absence_ramps_again():
    s = routing("versionRamp: 60s")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += 100
    new = s.register(object(), hello("1.3.0", "new"))
    s.clock.t += 30
    s.unregister(new)
    s.clock.t += VERSION_SETTLE - 5                      # back within the settle time
    new = s.register(object(), hello("1.3.0", "new"))
    assert abs(spread(s)["1.3.0"] / 2000 - 35 / 60) < 0.03
    s.unregister(new)
    s.clock.t += VERSION_SETTLE + 1                      # gone too long: new again
    s.register(object(), hello("1.3.0", "new"))
    assert spread(s) == {"1.2.0": 2000}


def test_the_ramped_split_is_worked_out_again_only_once_a_step():
    s = routing("versionRamp: 60s")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += 100
    s.register(object(), hello("1.3.0", "new"))
    s.clock.t += 30
    r = route(s)
    s.select(r, None, hdr("a"))
    split = r._cache[Split]
    assert r._cache[None] is SPLIT and not SPLIT
    s.clock.t += 0.5
    s.select(r, None, hdr("a"))
    assert r._cache[Split] is split
    s.clock.t += 0.6
    s.select(r, None, hdr("a"))
    assert r._cache[Split] is not split


def test_without_a_request_a_split_spreads_by_count():
    s = routing("versionRamp: 60s")
    s.register(object(), hello("1.2.0", "old"))
    s.clock.t += 100
    s.register(object(), hello("1.3.0", "new"))
    s.clock.t += 30
    r = route(s)
    counts = collections.Counter(s.select(r)[0].version for _ in range(1000))
    assert abs(counts["1.3.0"] - 500) < 10


# --------------------------------------------------------------------------- weights

WEIGHTED = """stickyKey: 'header:x-client'
services:
  canary: {weights: {"1.2.0": 90, "1.3.0": 10}}"""


def test_weights_split_unpinned_traffic_and_a_client_keeps_its_version():
    s = routing(WEIGHTED)
    s.register(object(), hello("1.2.0", "a"))
    s.register(object(), hello("1.3.0", "b"))
    s.register(object(), hello("1.3.0", "c"))
    counts = spread(s, 10000)
    assert abs(counts["1.3.0"] / 10000 - 0.10) < 0.01
    r = route(s)
    for key in ("k1", "k2", "k3", "k4"):
        assert len({s.select(r, None, hdr(key))[0].version for _ in range(20)}) == 1
    # Within the version the instances share the load as before.
    chosen = collections.Counter(s.select(r, "1.3.0", hdr("k1"))[0].instance_id for _ in range(10))
    assert chosen == {"b": 5, "c": 5}


def test_weights_renormalise_over_what_is_routable_and_never_cause_an_outage():
    s = routing(WEIGHTED)
    old = s.register(object(), hello("1.2.0", "a"))
    s.register(object(), hello("1.3.0", "b"))
    s.register(object(), hello("1.4.0", "c"))           # not listed: pinned traffic only
    assert set(spread(s, 500)) == {"1.2.0", "1.3.0"}
    s.heartbeat(old, "Draining")
    assert spread(s, 500) == {"1.3.0": 500}
    s.unregister(s.instances[("canary", "b", next(k[2] for k in s.instances if k[1] == "b"))])
    # No listed version left: the default rule (the newest) rather than a 503.
    assert spread(s, 50) == {"1.4.0": 50}


def test_raising_a_canarys_weight_keeps_the_clients_it_had():
    s = routing(WEIGHTED)
    s.register(object(), hello("1.2.0", "a"))
    s.register(object(), hello("1.3.0", "b"))
    r = route(s)
    on_canary = [i for i in range(2000)
                 if s.select(r, None, hdr("client-%d" % i))[0].version == "1.3.0"]
    s.configure(load_config_text("""
gateway:
  routing:
    stickyKey: 'header:x-client'
    services: {canary: {weights: {"1.2.0": 50, "1.3.0": 50}}}
""", env={}).gateway.routing)
    assert all(s.select(r, None, hdr("client-%d" % i))[0].version == "1.3.0" for i in on_canary)
    assert abs(spread(s)["1.3.0"] / 2000 - 0.5) < 0.03


def test_a_services_own_sticky_key():
    s = routing("""stickyKey: 'header:x-client'
services:
  canary: {weights: {"1.2.0": 50, "1.3.0": 50}, stickyKey: tenant}""")
    s.register(object(), hello("1.2.0", "a"))
    s.register(object(), hello("1.3.0", "b"))
    r = route(s)
    # The header varies, the tenant does not: one version.
    assert len({s.select(r, None, Req([(b"x-client", b"%d" % i)], tenant="acme"))[0].version
                for i in range(50)}) == 1


def test_configure_keeps_what_is_registered_and_reranks():
    s = routing()
    far = s.register(object(), hello("1.0.0", "far", region="us1"))
    near = s.register(object(), hello("1.0.0", "near", region="eu2"))
    r = route(s)
    assert {s.select(r)[0] for _ in range(4)} == {far, near}     # both "the rest"
    s.configure(load_config_text("gateway: {routing: {neighborRegions: [eu2]}}",
                                 env={}).gateway.routing)
    assert {s.select(r)[0] for _ in range(4)} == {near}
    assert len(s.instances) == 2 and s.sticky == ("identity", None)


class Link:
    """A service link as the routing state reads it for the metric."""

    def __init__(self, sent):
        self.sent = sent

    def requests_sent(self):
        return self.sent


def test_requests_per_version_are_summed_over_links_and_outlive_them():
    s = routing(WEIGHTED)
    a, b, c = Link(7), Link(5), Link(1)
    ia = s.register(a, hello("1.2.0", "a"))
    s.register(b, hello("1.2.0", "b"))
    s.register(c, hello("1.3.0", "c"))
    s.register(object(), hello("1.3.0", "d"))           # not a link that counts: 0
    assert dict(s.counters()["gateway_version_requests"][2]) == {
        ("canary", "1.2.0"): 12, ("canary", "1.3.0"): 1}
    s.unregister(ia)
    a.sent = 100                                        # gone: what it had stays, once
    b.sent = 6
    assert dict(s.counters()["gateway_version_requests"][2]) == {
        ("canary", "1.2.0"): 13, ("canary", "1.3.0"): 1}
    # ENDPOINTS_UPDATE on link c: the same link, counted once.
    s.register(c, hello("1.3.0", "c"))
    assert dict(s.counters()["gateway_version_requests"][2])[("canary", "1.3.0")] == 1


def test_versions_that_leave_are_forgotten_and_their_labels_bounded(monkeypatch):
    """Instances churning, each with a version of its own, beside one that stays: the
    service's version records held one per version ever seen, and each join scanned them
    all; now one without a link is forgotten VERSION_SETTLE after (docs/security.md §3d,
    "versions ever seen")."""
    from stellagw.routing import state as st
    monkeypatch.setattr(st, "MAX_LABELS", 50, raising=False)
    s = routing("versionRamp: 60s")
    s.register(Link(1), hello("1.0.0", "keeper"))
    for i in range(400):
        gone = s.register(Link(2), hello(f"1.0.{i + 1}-churn", f"churn-{i}"))
        s.unregister(gone)
        s.clock.t += 0.5
    svc = s.services["canary"]
    # The keeper's version and those that left within the last VERSION_SETTLE.
    assert len(svc.versions) <= 2 + VERSION_SETTLE / 0.5 and "1.0.0" in svc.versions
    assert len(svc.left) == len(svc.versions) - 1
    # Every request is still counted; past 50 (service, version) pairs as _other.
    counted = dict(s.counters()["gateway_version_requests"][2])
    assert len(counted) <= 50 + 1 + 1 and sum(counted.values()) == 1 + 2 * 400   # + the keeper
    assert counted[("_other", "_other")] == 2 * (400 - 50)
    # A version back within VERSION_SETTLE keeps its ramp, one back later is new again.
    s.clock.t += 1
    back = s.register(Link(0), hello("1.0.400-churn", "again"))
    assert svc.versions["1.0.400-churn"].links == 1 and "1.0.400-churn" not in svc.left
    s.unregister(back)
    s.clock.t += VERSION_SETTLE + 1
    s.register(Link(0), hello("1.0.401-churn", "later"))
    assert set(svc.versions) == {"1.0.0", "1.0.401-churn"} and not svc.left
