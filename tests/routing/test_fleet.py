"""The fleet view (stellagw/routing/fleet.py) against a real valkey-server: what one
gateway publishes and a new one reads, a dead pod's entry expiring, the bounds, Valkey's
failures; and the routes RoutingState.expect() gives a service that has not registered
yet (503 with Retry-After, not 404, and out of the way as soon as services register)."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from stellagw.routing import fleet as fl
from stellagw.routing.fleet import FleetStore, FleetView, encode_view, keys_for, routable_view
from stellagw.routing.radix import FOUND, NOT_FOUND
from stellagw.routing.state import DEPARTED, HelloError, RoutingState
from stellagw.valkey import ValkeyClient, ValkeyConnectionError, ValkeyError



def run(coro):
    return asyncio.run(coro)


async def _with_store(url, fn, where=("prod", "eu1"), **kw):
    client = ValkeyClient.from_url(url, timeout=0.5)
    try:
        return await fn(FleetStore(client, *where, **kw))
    finally:
        await client.close()


def view(**services):
    doc, digest, _ = encode_view({name: [list(r) for r in routes]
                                  for name, routes in services.items()})
    return doc, digest


SCANS = [("GET", "/api/scans/{id}", 0), ("GET", "/api/scans/ws", 1)]
POLICY = [("POST", "/api/policy", 0)]


# --------------------------------------------------------------------------- the store

def test_a_new_gateway_reads_the_union_of_what_the_others_publish(valkey_proc):
    async def main(store):
        a, b = view(scanner=SCANS), view(scanner=SCANS[:1], policy=POLICY)
        assert await store.publish("gw-a/0", *a, ttl=5) == 0
        assert await store.publish("gw-b/0", *b, ttl=5) == 0
        got = await store.read()
        assert got.members == 2 and got.bad == 0
        assert got.services == {
            "scanner": {("GET", "/api/scans/{id}", False), ("GET", "/api/scans/ws", True)},
            "policy": {("POST", "/api/policy", False)}}
    run(_with_store(valkey_proc.url, main))
    # One hash tag: a Valkey Cluster keeps the three keys on one master.
    keys = keys_for("prod", "eu1")
    assert len({k[:k.index("}") + 1] for k in keys}) == 1
    assert sorted(valkey_proc.command("KEYS", "*")) == sorted(k.encode() for k in keys)


def test_an_unchanged_view_is_not_sent_again_and_a_lost_one_is(valkey_proc):
    async def main(store):
        doc, digest = view(scanner=SCANS)
        await store.publish("gw-a/0", doc, digest, ttl=5)
        sets = _stat(valkey_proc, "hset")
        for _ in range(3):
            await store.publish("gw-a/0", doc, digest, ttl=5)
        assert _stat(valkey_proc, "hset") == sets          # only the expiry moved
        valkey_proc.command("FLUSHALL")                    # a Valkey restarted empty
        await store.publish("gw-a/0", doc, digest, ttl=5)
        assert _stat(valkey_proc, "hset") == sets + 2      # sent whole again
        assert (await store.read()).services.keys() == {"scanner"}
        valkey_proc.command("SCRIPT", "FLUSH")             # and without its scripts
        await store.publish("gw-a/0", doc, digest, ttl=5)
        assert (await store.read()).members == 1
    run(_with_store(valkey_proc.url, main))


def _stat(server, command: str) -> int:
    info = server.command("INFO", "commandstats").decode()
    for line in info.splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_a_dead_pods_entry_expires_and_is_removed(valkey_proc):
    async def main(store):
        await store.publish("dead/0", *view(gone=POLICY), ttl=0.3)
        await store.publish("live/0", *view(scanner=SCANS), ttl=5)
        assert (await store.read()).services.keys() == {"gone", "scanner"}
        await asyncio.sleep(0.4)
        # Not read once its time has passed, though still stored ...
        got = await store.read()
        assert got.members == 1 and got.services.keys() == {"scanner"}
        members, views, digests = store.keys
        assert valkey_proc.command("HEXISTS", views, "dead/0") == 1
        # ... and the next publish of anyone removes it.
        assert await store.publish("live/0", *view(scanner=SCANS), ttl=5) == 1
        assert valkey_proc.command("ZRANGE", members, 0, -1) == [b"live/0"]
        assert valkey_proc.command("HKEYS", views) == [b"live/0"]
        assert valkey_proc.command("HKEYS", digests) == [b"live/0"]
        # The keys live as long as the longest entry, so a fleet that is gone leaves none.
        assert 4000 < valkey_proc.command("PTTL", members) <= 5000
    run(_with_store(valkey_proc.url, main))


def test_the_whole_fleet_gone_leaves_nothing(valkey_proc):
    async def main(store):
        await store.publish("a/0", *view(scanner=SCANS), ttl=0.2)
        await asyncio.sleep(0.35)
        assert valkey_proc.command("KEYS", "*") == []
        got = await store.read()
        assert (got.members, got.services) == (0, {})
    run(_with_store(valkey_proc.url, main))


def test_the_fleet_holds_at_most_max_members_and_never_drops_the_publisher(valkey_proc):
    async def main(store):
        for i in range(6):
            await store.publish(f"gw-{i}/0", *view(**{f"s{i}": POLICY}), ttl=5 + i)
        members = store.keys[0]
        # The entries closest to expiry made way; the one publishing stays.
        assert valkey_proc.command("ZCARD", members) == 3
        assert set(valkey_proc.command("ZRANGE", members, 0, -1)) == {b"gw-3/0", b"gw-4/0",
                                                                       b"gw-5/0"}
        await store.publish("gw-0/0", *view(s0=POLICY), ttl=1)     # the soonest to expire
        assert b"gw-0/0" in valkey_proc.command("ZRANGE", members, 0, -1)
        assert valkey_proc.command("ZCARD", members) == 3
        assert (await store.read()).members == 3
    run(_with_store(valkey_proc.url, main, max_members=3))


def test_identical_views_are_read_once(valkey_proc):
    async def main(store):
        same = view(scanner=SCANS)
        for i in range(20):
            await store.publish(f"gw-{i}/0", *same, ttl=5)
        members, raws = await store.client.evalsha(fl._READ, store.keys, [100])
        assert members == 20 and len(raws) == 1
    run(_with_store(valkey_proc.url, main))


def test_a_view_too_large_keeps_every_service_and_leaves_the_largest_routes_out():
    big = [("GET", f"/api/big/{i}", 0) for i in range(200)]
    services = {"big": big, "small": POLICY, "none": []}
    doc, _, left_out = encode_view(services, limit=2000)
    assert len(doc) <= 2000 and left_out == 1
    got = FleetView()
    got.add(doc)
    assert got.services == {"big": set(), "small": {("POST", "/api/policy", False)},
                            "none": set()}
    # Too many names even without routes: as many as fit.
    names = {f"service-{i:04d}": [] for i in range(500)}
    doc, _, _ = encode_view(names, limit=1000)
    assert 0 < len(orjson.loads(doc)["services"]) < 500 and len(doc) <= 1000
    # The defaults hold every service a HELLO can name, without routes.
    names = {("s%063d" % i): [] for i in range(fl.MAX_SERVICES + 10)}
    doc, _, _ = encode_view(names)
    assert len(orjson.loads(doc)["services"]) == fl.MAX_SERVICES


def test_a_view_in_another_format_is_skipped_not_fatal(valkey_proc):
    async def main(store):
        await store.publish("new/0", b'{"v": 2, "services": {"x": 1}}', "d1", ttl=5)
        await store.publish("junk/0", b"\xff not json", "d2", ttl=5)
        await store.publish("ok/0", *view(scanner=SCANS), ttl=5)
        got = await store.read()
        assert got.members == 3 and got.bad == 2 and got.services.keys() == {"scanner"}
    run(_with_store(valkey_proc.url, main))


def test_valkey_down_fails_the_call_with_a_valkey_error(valkey_proc):
    url = valkey_proc.url
    valkey_proc.stop()

    async def main(store):
        with pytest.raises(ValkeyConnectionError):
            await store.read()
        with pytest.raises(ValkeyConnectionError):
            await store.publish("a/0", *view(scanner=SCANS), ttl=5)
        assert fl.error_type(ValkeyConnectionError("x")) == "connection"
    run(_with_store(url, main))


def test_a_stalled_valkey_times_out(valkey_proc):
    async def main(store):
        await store.publish("a/0", *view(scanner=SCANS), ttl=5)
        blocker = ValkeyClient.from_url(valkey_proc.url, timeout=5)
        stall = asyncio.ensure_future(blocker.execute("DEBUG", "SLEEP", "0.8"))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        with pytest.raises(ValkeyError) as err:
            await store.read()
        assert fl.error_type(err.value) == "timeout" and time.monotonic() - t0 < 0.7
        await stall
        await blocker.close()
    run(_with_store(valkey_proc.url, main))


def test_a_one_node_cluster_takes_the_scripts(valkey_proc_factory):
    # Cluster rules: every key of a script in one slot (CROSSSLOT otherwise).
    server = valkey_proc_factory(cluster=True)

    async def main(store):
        await store.publish("a/0", *view(scanner=SCANS), ttl=5)
        assert (await store.read()).services.keys() == {"scanner"}
    run(_with_store(server.url + "?cluster=true", main))


# --------------------------------------------------------------------------- routing

class _Conn:
    transport = None


def _hello(service, *paths, iid="i1"):
    return {"service": service, "version": "1.0.0", "instance_id": iid,
            "endpoints": [{"method": "GET", "path": p} for p in paths]}


def test_expected_routes_answer_like_a_restarting_service_until_it_registers():
    rs = RoutingState("eu1")
    assert rs.expect("scanner", [("GET", "/api/scans/{id}", False),
                                 ("GET", "/api/scans/ws", True)]) == 2
    code, route, _ = rs.match("GET", "/api/scans/42")
    assert code == FOUND and route.service == "scanner"
    assert route.candidates[0][0] is DEPARTED and rs.select(route) is None   # -> 503
    assert rs.match("GET", "/api/scans/ws")[1].candidates[0][1].websocket
    assert rs.match("GET", "/api/other")[0] == NOT_FOUND                     # -> 404
    assert rs.routes == {} and rs.describe() == {}    # not in OpenAPI, metrics, readiness
    assert rs.expected() == ["scanner"]

    # The service registers: its HELLO's endpoints are its routes now.
    inst = rs.register(_Conn(), _hello("scanner", "/api/scans/{id}", "/api/scans/v2"))
    assert rs.expected() == []
    assert rs.select(rs.match("GET", "/api/scans/42")[1])[0] is inst
    assert rs.match("GET", "/api/scans/ws")[1].template == "/api/scans/{id}"  # its own gone
    assert not rs.withdraw("scanner")                 # registered: the usual rules
    rs.unregister(inst)
    assert rs.match("GET", "/api/scans/42")[1].candidates[0][0] is DEPARTED


def test_withdrawn_routes_are_404_and_a_service_here_is_left_alone():
    rs = RoutingState("eu1")
    rs.register(_Conn(), _hello("policy", "/api/policy"))
    assert rs.expect("policy", [("GET", "/api/policy/other", False)]) == 0
    assert rs.match("GET", "/api/policy/other")[0] == NOT_FOUND
    rs.expect("gone", [("GET", "/api/gone", False), ("BREW", "/x", False),
                       ("GET", "no-slash", False)])
    assert rs.match("GET", "/api/gone")[0] == FOUND
    assert rs.withdraw("gone") and rs.match("GET", "/api/gone")[0] == NOT_FOUND
    assert "gone" not in rs.services and not rs.withdraw("gone")
    # A template another service holds is left out (the first one wins).
    assert rs.expect("thief", [("GET", "/api/policy", False)]) == 0


def test_a_route_the_fleet_gave_another_service_yields_to_the_one_that_registers():
    # A rollout moved GET /api/moved from "old" to "new": the fleet's view may still say
    # "old". The service that registers here decides; a real owner still refuses.
    rs = RoutingState("eu1")
    rs.expect("old", [("GET", "/api/moved", False), ("GET", "/api/old", False)])
    inst = rs.register(_Conn(), _hello("new", "/api/moved"))
    assert rs.select(rs.match("GET", "/api/moved")[1])[0] is inst
    assert rs.match("GET", "/api/old")[1].service == "old"
    rs.register(_Conn(), _hello("owner", "/api/owned"))
    with pytest.raises(HelloError):
        rs.register(_Conn(), _hello("intruder", "/api/owned", iid="i2"))


def test_routable_view_lists_what_this_worker_routes():
    rs = RoutingState("eu1")
    a = rs.register(_Conn(), _hello("scanner", "/api/scans/{id}"))
    rs.register(_Conn(), {"service": "quiet", "version": "1.0.0", "instance_id": "q",
                          "endpoints": []})
    rs.expect("expected", [("GET", "/api/expected", False)])
    assert routable_view(rs) == {"scanner": [("GET", "/api/scans/{id}", 0)], "quiet": []}
    rs.heartbeat(a, "Draining")
    assert routable_view(rs) == {"quiet": []}


# --------------------------------------------------------------------------- one worker

WORKER = """
gateway:
  admin: {{publicEndpoints: [all]}}
  node:
    nodeId: {node}
    preStopDelay: 0s
    fleet: {{valkey: "{valkey}", publishInterval: 100ms, entryTtl: 1s, warmupTimeout: {wait}}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
"""


def _gateway(valkey, node="gw-new", wait="500ms"):
    from tests.support.gwtest import GatewayThread, NullLog, settings_from
    log = NullLog()
    gw = GatewayThread(settings_from(WORKER.format(node=node, valkey=valkey.url, wait=wait)),
                       log=log.log).start()
    return gw, log


def _get(port, path):
    from tests.support.gwtest import request
    return request(port, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n\r\n")


def _events(log, message):
    return [r for r in map(orjson.loads, log.lines()) if r.get("message") == message]


def test_a_service_that_never_comes_is_404_once_the_wait_is_over(valkey_proc):
    # Another pod's entry, as it publishes it: "gone" has two routes.
    run(_with_store(valkey_proc.url, lambda store: store.publish(
        "gw-old/0", *view(gone=[("GET", "/api/gone/{id}", 0), ("POST", "/api/gone", 0)]),
        ttl=30), where=("dev", "local")))
    gw, log = _gateway(valkey_proc, wait="500ms")
    try:
        status, headers, _ = _get(gw.port, "/api/gone/1")
        assert (status, headers.get("retry-after")) == (503, "5")
        assert _get(gw.port, "/health/ready")[0] == 503
        from tests.support.gwtest import wait_for
        assert wait_for(lambda: _get(gw.port, "/health/ready")[0] == 200, 3)
        assert _get(gw.port, "/api/gone/1")[0] == 404
        [warm] = _events(log, "fleet warm")
        assert warm["level"] == "warning" and warm["missing"] == ["gone"]
        assert warm["missingCount"] == 1 and warm["ms"] >= 500
        metrics = _get(gw.port, "/metrics")[2].decode()
        assert 'gateway_fleet_warmups_total{outcome="timeout"} 1.0' in metrics
        assert "gateway_fleet_missing_services 0.0" in metrics
        # Warm: it publishes its own view (nothing routable) beside the old pod's.
        members = keys_for("dev", "local")[0]
        assert wait_for(lambda: b"gw-new/0" in valkey_proc.command("ZRANGE", members, 0, -1))
    finally:
        gw.stop()


def test_a_drain_while_waiting_ends_the_wait(valkey_proc):
    run(_with_store(valkey_proc.url, lambda store: store.publish(
        "gw-old/0", *view(gone=POLICY), ttl=30), where=("dev", "local")))
    gw, log = _gateway(valkey_proc, wait="30s")
    try:
        assert _get(gw.port, "/health/ready")[0] == 503
        t0 = time.monotonic()
        gw.drain()
        assert time.monotonic() - t0 < 2
        [warm] = _events(log, "fleet warm")
        assert warm["missing"] == ["gone"]
        assert gw.worker.fleet.warmups == {"stopped": 1}
    finally:
        gw.stop()


def test_without_a_fleet_key_nothing_is_read_or_published(valkey_proc):
    from tests.support.gwtest import GatewayThread, settings_from
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, admin: {publicEndpoints: [all]}}")
                       ).start()
    try:
        assert gw.worker.fleet is None
        status, _, body = _get(gw.port, "/health/ready")
        assert status == 200 and "fleet" not in orjson.loads(body)
        assert "gateway_fleet" not in _get(gw.port, "/metrics")[2].decode()
    finally:
        gw.stop()


def test_the_address_needs_a_restart_and_the_timings_are_live():
    from stellagw.config import load_config_text
    from stellagw.reload import changed_keys, restart_required
    old = load_config_text("gateway: {node: {fleet: {valkey: 'a:1'}}}", env={})
    new = load_config_text("""
gateway:
  node:
    fleet: {valkey: 'b:1', timeout: 1s, publishInterval: 1s, entryTtl: 3s, warmupTimeout: 5s}
""", env={})
    keys = changed_keys(old, new)
    assert {k for k in keys if restart_required(k)} == {"gateway.node.fleet.valkey",
                                                        "gateway.node.fleet.timeout"}
    assert {k for k in keys if not restart_required(k)} == {
        "gateway.node.fleet.publishInterval", "gateway.node.fleet.entryTtl",
        "gateway.node.fleet.warmupTimeout"}


def test_a_service_restarting_on_the_other_pods_is_503_on_a_new_one(valkey_proc):
    # docs/security.md §3d ("a worker restarted during a service's restart"), across pods:
    # the fleet view listed routable services only, so a pod started while a service
    # restarted (its routes 503 on every other pod until serviceExpiry) answered 404 for it.
    # What the old pod publishes once its service's last instance left.
    doc = orjson.dumps({"v": 1, "services": {}, "departed": {"back": [["GET", "/api/back/{id}", 0]]}},
                       option=orjson.OPT_SORT_KEYS)
    digest = __import__("hashlib").sha1(doc).hexdigest()
    run(_with_store(valkey_proc.url, lambda store: store.publish("gw-old/0", doc, digest, ttl=30),
                    where=("dev", "local")))
    gw, log = _gateway(valkey_proc, wait="300ms")
    try:
        status, headers, _ = _get(gw.port, "/api/back/1")
        assert (status, headers.get("retry-after")) == (503, "5")
        # Not waited for: ready at once, and still 503 after the fleet's wait.
        assert _get(gw.port, "/health/ready")[0] == 200
        time.sleep(0.4)
        assert _get(gw.port, "/api/back/1")[0] == 503
        assert gw.call(lambda: gw.worker.routing._departed.get("back")) is not None
    finally:
        gw.stop()
    # The old pod's side: a service kept without an instance is in its view as departed.
    rs = RoutingState("eu1")
    rs.unregister(rs.register(_Conn(), _hello("back", "/api/back/{id}")))
    assert routable_view(rs) == {}
    assert encode_view(routable_view(rs), departed=fl.departed_view(rs))[0] == doc


def test_a_service_forgotten_after_service_expiry_leaves_the_published_views():
    # What the fleet view and the siblings' routes file publish is rewritten when the
    # routing generation moves; the expiry did not move it, so a forgotten service was
    # still offered as departed (503 on new pods) until some other change.
    rs = RoutingState("eu1", service_expiry=5.0)
    rs.unregister(rs.register(_Conn(), _hello("old", "/api/old")))
    assert fl.departed_view(rs) == {"old": [["GET", "/api/old", 0]]}
    generation = rs.generation
    rs.check_health(time.monotonic() + 10)
    assert rs.generation != generation
    assert fl.departed_view(rs) == {} and rs.route_view() == {}
