"""Valkey Cluster for real: the client (stellagw/valkey.py) against a 3-master cluster of
valkey-server processes (tests/support/valkey_server.py: ValkeyCluster, made by `valkey-cli
--cluster create`), the rate limiter and the DPoP replay cache over it, and two gateway
instances sharing the environment limit through it, end to end with a real SDK service.

Routing: each command goes to the master owning its key's slot (key_slot(), checked
against known vectors and the server's CLUSTER KEYSLOT); a resharded slot is found by
following MOVED, a migrating one by ASK. A master killed by its PID: the rate-limit breaker
fails open and closes again when the node is back or a replica has taken its slots; the
replay cache applies onValkeyError. The cluster is shared by the module (about 2 s to make);
each test starts from an empty dataset.
"""
from __future__ import annotations

import asyncio
import random
import socket
import time

import hiredis
import pytest
import uvloop

from stellagw.auth import AuthFailure, Identity
from stellagw.config import load_config_text
from stellagw.ratelimit import Decision, RateLimiter
from stellagw.valkey import (SLOTS, Script, ValkeyClient, ValkeyClusterClient,
                             ValkeyConnectionError, ValkeyTimeout, _packed_slot, command_slot,
                             key_slot, pack_evalsha, parse_address)
from tests.support.gwtest import GatewayThread, NullLog, read_response, settings_from, wait_for
from tests.support.auth import (ISSUER_PLACEHOLDER, DpopClient, SigningKey, dpop_request,
                                make_authenticator, mint_token)
from tests.support.services import ServiceProcess
from tests.support.valkey_server import ValkeyCluster, free_port

BUCKET = "stella-router-rate-limit"
INCR = Script("return redis.call('INCR', KEYS[1])")


@pytest.fixture
def cluster(valkey_cluster):  # noqa: F811 -- the fixture
    """The module's cluster, every slot served, no data."""
    valkey_cluster.wait_ok()
    valkey_cluster.flush()
    return valkey_cluster


def one_per_master(cluster, candidates, tag=lambda c: c):
    """[(candidate, master)]: the first candidate whose tag (a key) lands on each master, in
    the masters' slot order, as the cluster itself computes slots."""
    found = {}
    for candidate in candidates:
        master = cluster.master_of(tag(candidate))
        found.setdefault(master, candidate)
        if len(found) == len(cluster.masters()):
            break
    return [(found[master], master) for master in cluster.masters()]


def identity_tag(identity: str) -> str:
    # The environment counters' hash tag (docs/rate-limiting.md, "Keys").
    return f"{{{BUCKET}:{identity}}}"


def keys_on(node, needle: str) -> list[bytes]:
    return [k for k in node.command("KEYS", "*") if needle.encode() in k]


def without_replica(cluster):
    """The masters no replica could take over from (a killed one stays down)."""
    return [m for m in cluster.masters()
            if b"connected_slaves:0" in m.command("INFO", "replication")]


def away_from_an_hour_edge(cluster, margin: float = 5.0) -> None:
    """Counts within one fixed hour must not straddle its end: wait out the last seconds of
    the servers' hour, when that is where the clock is."""
    secs, micros = cluster.masters()[0].command("TIME")
    left = 3600 - int(secs) % 3600 - int(micros) / 1e6
    if left < margin:
        time.sleep(left + 0.05)


# ---------------------------------------------------------------------------------------
# The slot function and addresses (no server)


@pytest.mark.parametrize("key, slot", [
    ("123456789", 0x31C3),                 # CRC16/XMODEM's check value
    ("foo", 12182), ("bar", 5061), ("somekey", 11058),
    ("foo{hash_tag}", 2515), ("bar{hash_tag}", 2515),   # CLUSTER KEYSLOT's documented ones
    # The hash tag rules (values from valkey-server 8.1's CLUSTER KEYSLOT).
    ("{user1000}.following", 3443), ("{user1000}.followers", 3443), ("user1000", 3443),
    ("foo{}{bar}", 8363),                 # an empty tag: the whole key
    ("foo{{bar}}zap", 4015), ("{bar", 4015),             # up to the first "}"
    ("foo{bar}{zap}", 5061),              # the first tag only
    ("{", 4092), ("}{x}", 16287), ("x", 16287),
    ("", 0),
])
def test_key_slot_known_vectors(key, slot):
    assert key_slot(key) == slot == key_slot(key.encode())


def test_command_slot_reads_the_key_where_each_command_has_it():
    assert command_slot(("SET", "{t}a", "1")) == key_slot("t")
    assert command_slot((b"get", b"k")) == key_slot("k")
    assert command_slot(("EVALSHA", "0" * 40, 2, "{t}:x", "{t}:y", "arg")) == key_slot("t")
    assert command_slot(("EVAL", "return 1", 0, "arg")) is None
    for keyless in (("PING",), ("SCRIPT", "LOAD", "return 1"), ("CLUSTER", "SLOTS"),
                    ("KEYS", "*"), ("TIME",)):
        assert command_slot(keyless) is None
    # The packed form (what evalsha_then is given) gives the same, binary keys included.
    for args in [("SET", "{t}a", "1"), ("EVALSHA", "0" * 40, 1, b"k\r\n{\x00}\xff", 7),
                 ("EVALSHA", "0" * 40, 0), ("PING",), ("GET", "é" * 40)]:
        assert _packed_slot(hiredis.pack_command(args)) == command_slot(args)
    assert _packed_slot(pack_evalsha(INCR, ["{t}n"], [1, 2])) == key_slot("t")


@pytest.mark.parametrize("url, nodes, extra", [
    ("redis://:p%40ss@10.0.0.1:7000,10.0.0.2:7001", [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
     {"password": "p@ss", "username": None}),
    ("valkey://gw:pw@cache:6379?cluster=true", [("cache", 6379)],
     {"username": "gw", "password": "pw"}),
    ("redis://a,b:7000,[::1]:7001,a", [("a", 6379), ("b", 7000), ("::1", 7001)],
     {"username": None, "password": None}),
    ("a:7000,b:7001,password=pw,abortConnect=false", [("a", 7000), ("b", 7001)],
     {"password": "pw"}),
    ("cache:6379,cluster=true,connectTimeout=200", [("cache", 6379)], {"connect_timeout": 0.2}),
])
def test_cluster_addresses(url, nodes, extra):
    assert parse_address(url) == {"nodes": nodes, **extra}
    client = ValkeyClient.from_url(url)
    assert isinstance(client, ValkeyClusterClient)
    assert "pw" not in client.name and "p@ss" not in client.name
    # Its name is itself an address for the same seeds.
    assert parse_address(client.name)["nodes"] == nodes


def test_a_bad_address_stops_the_configuration_naming_its_key():
    from stellagw.config import ConfigError
    with pytest.raises(ConfigError) as info:
        load_config_text('rate_limiting: {for_environment: '
                         '{valkey_connection: "redis://a:1,b:2?cluster=false"}}', env={})
    assert info.value.path == "rate_limiting.for_environment.valkey_connection"
    assert "seeds of a cluster" in info.value.reason
    s = load_config_text('gateway: {auth: {replayCache: {valkey: "a:7000,b:7001,password=x"}}}',
                         env={})
    assert parse_address(s.gateway.auth.replay_cache.valkey)["nodes"] == [("a", 7000),
                                                                          ("b", 7001)]


def test_cluster_address_over_tls():
    kw = parse_address("rediss://a:7000,b:7000?ssl_cert_reqs=none")
    assert kw["nodes"] == [("a", 7000), ("b", 7000)] and kw["ssl"].check_hostname is False
    assert ValkeyClient.from_url("valkeys://a,b").name == "valkeys://a:6379,b:6379?cluster=true"


# ---------------------------------------------------------------------------------------
# The client against the cluster


def test_key_slot_agrees_with_the_server(cluster):
    rng = random.Random(18)
    alphabet = b"ab{}:\r\n\x00\xff"
    keys = [bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
            for _ in range(500)] + [f"{BUCKET}:{i}".encode() for i in range(100)]

    async def main():
        node = cluster.masters()[0]
        client = ValkeyClient(node.host, node.port)
        slots = await asyncio.gather(*(client.execute("CLUSTER", "KEYSLOT", k) for k in keys))
        await client.close()
        return slots
    assert [key_slot(k) for k in keys] == uvloop.run(main())


def test_each_command_goes_to_the_master_of_its_slot(cluster):
    placed = one_per_master(cluster, (f"key-{i}" for i in range(100)))
    keys = [key for key, _ in placed]

    async def main():
        client = ValkeyClient.from_url(cluster.url)
        # 300 commands at once over three masters, each master's share on its connection.
        replies = await asyncio.gather(*(client.execute("INCR", keys[i % 3]) for i in range(300)))
        assert [replies[i::3] for i in range(3)] == [list(range(1, 101))] * 3
        # SCRIPT goes to every master (scripts are cached per node); EVALSHA to the slot's.
        assert await client.execute("SCRIPT", "LOAD", INCR.source) == INCR.sha.encode()
        assert [await client.evalsha(INCR, [key]) for key in keys] == [101] * 3
        assert [await client.evalsha_future(INCR, [key]) for key in keys] == [102] * 3
        assert client.redirects == {"moved": 0, "ask": 0}
        assert (client.connects, client.refreshes) == (3, 1)
        await client.close()
    uvloop.run(main())
    for key, master in placed:
        assert master.command("GET", key) == b"102"
        assert master.command("SCRIPT", "EXISTS", INCR.sha) == [1]


def test_no_seed_answering_fails_like_a_server_that_is_down():
    async def main():
        down = ValkeyClient.from_url(f"redis://127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
        for _ in range(2):
            with pytest.raises(ValkeyConnectionError, match="no node gave the slot map"):
                await down.execute("GET", "k")
        await down.close()
        with pytest.raises(ValkeyConnectionError, match="closed"):
            await down.execute("GET", "k")
    uvloop.run(main())


def test_a_server_that_is_not_a_cluster_is_named_in_the_error(valkey_proc):
    async def main():
        client = ValkeyClient.from_url(f"{valkey_proc.address},cluster=true")
        with pytest.raises(ValkeyConnectionError, match="cluster support disabled"):
            await client.execute("GET", "k")
        await client.close()
    uvloop.run(main())


def test_seeds_that_never_answer_fail_the_first_command_within_the_timeout():
    async def main():
        # Listeners that accept and never answer: each seed would cost a whole timeout.
        silent = [await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
                  for _ in range(3)]
        seeds = ",".join(f"127.0.0.1:{s.sockets[0].getsockname()[1]}" for s in silent)
        client = ValkeyClient.from_url(f"redis://{seeds}", timeout=0.2)
        with pytest.raises(ValkeyTimeout, match="no slot map within 0.4 s"):
            await client.execute("GET", "k")
        await client.close()
        for server in silent:
            server.close()
    uvloop.run(main())


def env_settings(url: str, rules: str = "[{max_requests: 3, per_seconds: 3600}]", breaker=""):
    return load_config_text(f"""
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{url}"
    rules: {rules}
    {breaker}
""", env={})


async def decided(result):
    return result if isinstance(result, Decision) else await result


def test_the_counters_of_one_decision_share_a_slot_and_identities_spread_over_masters(cluster):
    placed = one_per_master(cluster, (f"ip:10.0.0.{i}" for i in range(1, 250)), identity_tag)
    rules = "[{max_requests: 5, per_seconds: 1}, {max_requests: 5, per_seconds: 60}, " \
            "{max_requests: 5, per_seconds: 3600}]"
    rl = RateLimiter(env_settings(cluster.url, rules), NullLog().log)

    async def main():
        await rl.start()                                  # the script, on every master
        for identity, _ in placed:
            d = await decided(rl.check(identity, None, "scanner", "/s", "/s"))
            assert (d.allowed, d.scope, d.remaining) == (True, "environment", 4)
        assert rl.client.redirects == {"moved": 0, "ask": 0}
        await rl.close()
    uvloop.run(main())
    for identity, master in placed:
        keys = keys_on(master, identity_tag(identity))
        assert len(keys) == 3                             # one counter per window
        assert {cluster.slot_of(k) for k in keys} == {cluster.slot_of(identity_tag(identity))}
        assert all(keys_on(other, identity_tag(identity)) == [] for other in cluster.masters()
                   if other is not master)
    assert rl.counters["valkey_errors"] == {}


def test_replay_keys_spread_over_masters_and_a_replay_is_caught_across_instances(cluster):
    from stellagw.auth import ValkeyReplayCache
    from stellagw.auth.replay import VALKEY_PREFIX, replay_key
    placed = one_per_master(cluster, (f"jkt-{i}" for i in range(100)),
                            lambda jkt: replay_key(jkt, "jti"))

    async def main():
        a = ValkeyReplayCache(ValkeyClient.from_url(cluster.url))
        b = ValkeyReplayCache(ValkeyClient.from_url(cluster.url))
        for jkt, _ in placed:
            assert await a.check_and_store(replay_key(jkt, "jti"), 60_000) is True
            assert await b.check_and_store(replay_key(jkt, "jti"), 60_000) is False
        for cache in (a, b):
            await cache._client.close()
    uvloop.run(main())
    for jkt, master in placed:
        assert master.command("EXISTS", VALKEY_PREFIX + replay_key(jkt, "jti")) == 1


def test_an_unanswered_replay_check_is_released_on_the_node_that_ran_it(cluster):
    # onValkeyError: reject (docs/auth.md, "When Valkey fails"): the SET carries a mark of
    # the attempt, and its release follows it to the same master, in order.
    from stellagw.auth import ValkeyReplayCache
    from stellagw.auth.replay import VALKEY_PREFIX, replay_key
    (jkt, master), = one_per_master(cluster, (f"jkt-{i}" for i in range(100)),
                                    lambda jkt: replay_key(jkt, "jti"))[:1]
    released, kept = replay_key(jkt, "released"), replay_key(jkt, "kept")
    master.command("CONFIG", "RESETSTAT")

    async def main():
        cache = ValkeyReplayCache(ValkeyClient.from_url(cluster.url, timeout=30))
        assert await cache.check_and_store(replay_key(jkt, "jti"), 60_000, True) is True
        # The SETs wait for the pause, the callers give up, then the SETs run and reply.
        # (A paused client that disconnects has its command dropped: the connection stays.)
        master.command("CLIENT", "PAUSE", "600", "WRITE")
        for key, undo in ((released, True), (kept, False)):     # reject off: no release
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await cache.check_and_store(key, 60_000, undo)
        await asyncio.sleep(0)
        assert await until_async(lambda: master.command("EXISTS", VALKEY_PREFIX + kept) == 1)
        assert await until_async(
            lambda: b"cmdstat_eval:calls=1," in master.command("INFO", "commandstats"))
        await cache._client.close()
    uvloop.run(main())
    assert master.command("GET", VALKEY_PREFIX + replay_key(jkt, "jti")).startswith(b"a:")
    assert master.command("EXISTS", VALKEY_PREFIX + released) == 0


async def until_async(predicate, timeout=10.0) -> bool:
    """Poll a blocking predicate while this loop keeps reading its sockets (bounded)."""
    deadline = time.monotonic() + timeout
    loop = asyncio.get_running_loop()
    while not await loop.run_in_executor(None, predicate):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def test_a_resharded_slot_is_found_by_following_moved_and_its_counts_move_along(cluster):
    away_from_an_hour_edge(cluster)
    identity = "ip:10.9.9.9"
    slot = cluster.slot_of(identity_tag(identity))
    rl = RateLimiter(env_settings(cluster.url), NullLog().log)
    check = lambda: decided(rl.check(identity, None, "scanner", "/s", "/s"))  # noqa: E731

    async def main():
        assert [(await check()).remaining for _ in range(2)] == [2, 1]
        source = cluster.owner(slot)
        target = next(m for m in cluster.masters() if m is not source)
        assert cluster.move_slot(slot, target) == 1       # the counter, migrated
        # The limiter still sends to the old owner: MOVED, followed once, from the reply
        # handling (evalsha_then); the count goes on where it was.
        d = await check()
        assert (d.allowed, d.scope, d.remaining) == (True, "environment", 0)
        assert rl.client.redirects == {"moved": 1, "ask": 0}
        assert rl.client.owner(slot) == (target.host, target.port)
        d = await check()
        assert (d.allowed, d.scope) == (False, "environment")
        assert rl.client.redirects["moved"] == 1          # straight to the new owner
        await rl.close()
    uvloop.run(main())
    assert rl.counters["valkey_errors"] == {}


def test_a_key_of_a_migrating_slot_is_followed_with_asking(cluster):
    slot = cluster.slot_of("{mig}")
    source = cluster.owner(slot)
    target = next(m for m in cluster.masters() if m is not source)

    async def main():
        client = ValkeyClient.from_url(cluster.url)
        await client.execute("SET", "{mig}:moved", "m")
        await client.execute("SET", "{mig}:stays", "s")
        cluster.begin_migration(slot, target)
        assert source.command("MIGRATE", target.host, target.port, "", 0, 5000,
                              "KEYS", "{mig}:moved") == b"OK"
        # A key that has moved: ASK, then ASKING + the command at the target.
        assert await client.execute("GET", "{mig}:moved") == b"m"
        assert client.redirects == {"moved": 0, "ask": 1}
        assert await client.execute("GET", "{mig}:stays") == b"s"
        assert client.redirects["ask"] == 1
        # A script whose key is not at the source goes to the target too, where it is
        # loaded first (NOSCRIPT, SCRIPT LOAD, ASKING + EVALSHA again); the redirection
        # arrives in the reply handling (evalsha_then).
        fresh = Script("return redis.call('INCR', KEYS[1]) -- only here")
        assert await client.evalsha_future(fresh, ["{mig}:new"]) == 1
        assert target.command("SCRIPT", "EXISTS", fresh.sha) == [1]
        assert client.redirects["ask"] == 2
        assert client.owner(slot) == (source.host, source.port)    # ASK changes no map
        cluster.migrate_keys(slot, source, target)
        cluster.end_migration(slot, target)
        assert await client.execute("GET", "{mig}:stays") == b"s"   # MOVED now
        assert client.redirects == {"moved": 1, "ask": 2}
        await client.close()
    uvloop.run(main())


# ---------------------------------------------------------------------------------------
# Two gateway instances through the cluster, end to end


GATEWAY = """
gateway: {{http: {{port: 0}}, admin: {{publicEndpoints: [all]}}, node: {{nodeId: {node}}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{url}"
    rules: [{{max_requests: 3, per_seconds: 3600}}]
    circuit_breaker: {{failure_threshold: 2, timeout_seconds: 0.5, half_open_timeout: 2}}
"""
GET = b"GET /t/cl/whoami HTTP/1.1\r\nHost: gw\r\n\r\n"


def get(port: int, source: str = "127.0.0.1"):
    """One request from a loopback address of our choosing: the anonymous rate-limit
    identity is ip:<source>, so the source picks the master its counters live on."""
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(source, 0)) as s:
        s.sendall(GET)
        return read_response(s)


def sources_per_master(cluster):
    return one_per_master(cluster, (f"127.0.0.{i}" for i in range(2, 255)),
                          lambda ip: identity_tag(f"ip:{ip}"))


@pytest.fixture(scope="module")
def gateways(valkey_cluster):  # noqa: F811 -- the fixture
    # Two instances (node ids of their own: a service links to each).
    gws = [GatewayThread(settings_from(GATEWAY.format(url=valkey_cluster.url, node=node)),
                         log=NullLog().log).start() for node in ("gw-a", "gw-b")]
    svc = ServiceProcess("cl", *(gw.transport_port for gw in gws)).start()
    # Until the service answers through each gateway; from a new address each time, as
    # requests refused before that (503) count against the address's limit.
    sources = (f"127.1.{i // 250}.{i % 250 + 1}" for i in range(250 * 250))
    try:
        for gw in gws:
            assert wait_for(lambda gw=gw: get(gw.port, next(sources))[0] == 200, 20), svc.describe()
        yield gws
    finally:
        svc.stop()
        for gw in gws:
            gw.stop()


def limiter_state(gw):
    limiter = gw.worker.limiter
    return gw.call(lambda: (limiter.breaker.state, dict(limiter.counters["valkey_errors"])))


def test_two_gateways_share_the_environment_limit_through_the_cluster(cluster, gateways):
    away_from_an_hour_edge(cluster)
    placed = sources_per_master(cluster)
    for source, _ in placed:
        answers = [get(gateways[i % 2].port, source) for i in range(5)]
        assert [status for status, _, _ in answers] == [200, 200, 200, 429, 429], source
        _, headers, body = answers[3]
        assert headers["x-ratelimit-limit"] == "3" and b'"scope":"environment"' in body
    for source, master in placed:
        [key] = keys_on(master, identity_tag(f"ip:{source}"))
        assert master.command("GET", key) == b"3"         # both gateways counted there
    for gw in gateways:
        assert limiter_state(gw) == ("closed", {})


def fails_open_until_counted_again(gw, source: str, timeout: float = 30.0) -> list[int]:
    """Requests from `source` until one is decided by Valkey again (it carries the
    environment rule's X-RateLimit-Limit); the statuses before it."""
    before = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, headers, _ = get(gw.port, source)
        if headers.get("x-ratelimit-limit") == "3":
            return before
        before.append(status)
        time.sleep(0.02)
    raise AssertionError(f"never counted in Valkey again; statuses {before[-20:]}")


def test_a_master_killed_fails_open_and_its_return_closes_the_breaker(cluster, gateways):
    away_from_an_hour_edge(cluster)
    gw = gateways[0]
    source, victim = next((s, m) for s, m in sources_per_master(cluster)
                          if m in without_replica(cluster))
    assert get(gw.port, source)[1]["x-ratelimit-remaining"] == "2"
    cluster.kill(victim)
    # As with one server: the checks fail (refused, or CLUSTERDOWN), the requests go on.
    statuses = []
    assert wait_for(lambda: statuses.append(get(gw.port, source)[0])
                    or limiter_state(gw)[0] == "open", 10)
    assert set(statuses) == {200}
    state, errors = limiter_state(gw)
    assert state == "open" and errors and set(errors) <= {"connection", "reply"}
    cluster.restart(victim)
    assert set(fails_open_until_counted_again(gw, source)) <= {200}
    assert limiter_state(gw)[0] == "closed"
    # The node came back empty (nothing persisted): counted from 1 again, and the limit holds.
    assert [get(gw.port, source)[0] for _ in range(3)] == [200, 200, 429]


def test_a_master_killed_with_a_replica_the_limiter_follows_the_new_slot_map(cluster,
                                                                                gateways):
    away_from_an_hour_edge(cluster)
    gw = gateways[1]
    source, victim = next((s, m) for s, m in sources_per_master(cluster)
                          if m in without_replica(cluster))
    slot = cluster.slot_of(identity_tag(f"ip:{source}"))
    replica = cluster.add_replica(victim)
    assert get(gw.port, source)[0] == 200
    cluster.kill(victim)
    # The breaker opens, the replica is promoted, a reload of the slot map (after a failed
    # check) finds it, and the half-open probe closes the breaker: no restart needed.
    assert set(fails_open_until_counted_again(gw, source)) <= {200}
    assert cluster.owner(slot) is replica
    limiter = gw.worker.limiter
    assert gw.call(lambda: limiter.client.owner(slot)) == (replica.host, replica.port)
    assert limiter_state(gw)[0] == "closed"
    assert 429 in [get(gw.port, source)[0] for _ in range(3)]
    # The old master comes back as the new one's replica: every slot served, as before.
    cluster.restart(victim)
    assert victim not in cluster.masters()


def test_the_replay_cache_on_a_killed_master_follows_on_valkey_error(tmp_path, cluster):
    key = SigningKey("ES256", kid="k1")
    victim = without_replica(cluster)[0]
    client = next(c for c in (DpopClient() for _ in range(200))
                  if cluster.master_of("{" + c.jkt + "}") is victim)
    token = mint_token(key, ISSUER_PLACEHOLDER, cnf={"jkt": client.jkt})
    valkeys = [ValkeyClient.from_url(cluster.url, timeout=0.25) for _ in range(2)]
    local = make_authenticator(tmp_path, [key], valkey=valkeys[0])
    reject = make_authenticator(tmp_path, [key], "replayCache: {onValkeyError: reject}",
                                valkey=valkeys[1])

    async def authenticate(auth, **kw):
        result = auth.authenticate(dpop_request(client, token, **kw), ())
        return await result if hasattr(result, "__await__") else result

    async def main():
        # Both up: a proof used at one instance is a replay at the other.
        proof = client.proof("GET", "https://gw.example.com/api/items", token)
        assert isinstance(await authenticate(local, proof=proof), Identity)
        assert (await authenticate(reject, proof=proof)).reason == "dpop_replay"
        assert len(keys_on(victim, client.jkt)) == 1
        cluster.kill(victim)
        refused = await authenticate(reject)
        assert isinstance(refused, AuthFailure)
        assert (refused.status, refused.reason) == (503, "replay_cache_unavailable")
        assert isinstance(await authenticate(local), Identity)
        assert local.test_events.counts["dpop_replay_valkey_fallback"] == 1
        assert reject.test_events.counts["dpop_replay_valkey_reject"] == 1
        cluster.restart(victim)
        deadline = time.monotonic() + 20
        while not isinstance(await authenticate(reject), Identity):
            assert time.monotonic() < deadline, "the replay cache never came back"
            await asyncio.sleep(0.05)
        for valkey in valkeys:
            await valkey.close()
    uvloop.run(main())


def test_a_cluster_made_without_valkey_cli():
    with ValkeyCluster(masters=3, use_cli=False) as made:
        assert [(first, last) for first, last, _ in made.slot_map()] == \
            [(0, 5460), (5461, 10921), (10922, SLOTS - 1)]
        placed = one_per_master(made, (f"k{i}" for i in range(100)))

        async def main():
            client = ValkeyClient.from_url(made.url)
            for key, _ in placed:
                await client.execute("SET", key, "v")
            await client.close()
        uvloop.run(main())
        assert [master.command("GET", key) for key, master in placed] == [b"v"] * 3
