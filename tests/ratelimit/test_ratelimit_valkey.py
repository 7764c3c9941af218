"""The environment tier against a REAL valkey-server: the Lua script (atomicity, TTL, hash
tags, Cluster), RateLimiter end to end, NOSCRIPT, and the circuit breaker through a server
that is stopped and restarted (tests/support/valkey_server.py)."""
from __future__ import annotations

import asyncio
import time

import orjson
import pytest
import uvloop

from stellagw.config import load_config_text
from stellagw.ratelimit import Decision, PendingCheck, RateLimiter, rejection
from stellagw.ratelimit.breaker import CLOSED, HALF_OPEN, OPEN
from stellagw.ratelimit.environment import SCRIPT, counter_prefix, parse_reply
from stellagw.ratelimit.policy import Policy
from stellagw.valkey import ValkeyClient
from tests.support.gwtest import NullLog

BUCKET = "stella-router-rate-limit"


def run(coro):
    return uvloop.run(coro)


async def in_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def server_time(srv) -> tuple[int, int]:
    secs, micros = srv.command("TIME")
    return int(secs), int(micros)


def away_from_a_minute_edge(srv, margin: float = 2.0) -> None:
    """Tests that count within one fixed window must not straddle its end: wait out the
    last `margin` seconds of the server's current minute (hour ends are minute ends)."""
    secs, micros = server_time(srv)
    left = 60 - (secs % 60) - micros / 1e6
    if left < margin:
        time.sleep(left + 0.05)


def prefix(identity="sub:alice", service="scanner", rules=((3, 60),)) -> str:
    return counter_prefix(BUCKET, identity, Policy.make(rules, service, "*", "environment"))


def argv(rules, key=1):
    return [x for rule in rules for x in (*rule, key)]


async def decide(client, rules, identity="sub:alice", service="scanner"):
    reply = await client.evalsha(SCRIPT, [prefix(identity, service, rules)], argv(rules))
    return parse_reply(reply)


# ---------------------------------------------------------------------------------------
# The Lua script


def test_script_counts_then_denies_without_counting(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        results = [await decide(c, [(3, 60)]) for _ in range(5)]
        for i, (allowed, rule, current, limit, window, reset_ms, now_ms, counts) in \
                enumerate(results[:3]):
            assert (allowed, rule, current, limit, window, counts) == (True, 0, i + 1, 3, 60,
                                                                       [i + 1])
            # reset: the end of the current minute on the server's clock.
            assert (now_ms + reset_ms) % 60_000 == 0 and 0 < reset_ms <= 60_000
        for allowed, rule, current, limit, window, reset_ms, now_ms, counts in results[3:]:
            assert (allowed, current, limit, counts) == (False, 3, 3, [3])
        secs, _ = server_time(valkey_proc)
        key = f"{prefix()}:60:{secs // 60}".encode()
        assert await c.execute("GET", key) == b"3"        # the denied ones were not counted
        await c.close()
    run(main())


def test_script_sets_ttl_on_new_windows(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        rules = [(10, 1), (10, 60), (10, 3600)]
        _, _, _, _, _, _, now_ms, _ = await decide(c, rules)
        keys = sorted(await c.execute("KEYS", "*"))
        assert len(keys) == 3
        now_s = now_ms // 1000
        for window in (1, 60, 3600):
            key = f"{prefix(rules=rules)}:{window}:{now_s // window}".encode()
            assert key in keys
            ttl = await c.execute("TTL", key)
            window_end = (now_s // window + 1) * window
            # Gone a second or so after its window ends, never before.
            assert window_end - now_s <= ttl <= window_end - now_s + 2, (window, ttl)
        await c.close()
    run(main())


def test_script_all_rules_must_pass_and_reports_the_longest_wait(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        rules = [(5, 3600), (2, 60), (2, 3600)]
        first = await decide(c, rules)
        assert first[:4] == (True, 1, 1, 2) and first[7] == [1, 1, 1]   # fewest left: rule 1
        await decide(c, rules)
        allowed, rule, current, limit, window, reset_ms, now_ms, counts = await decide(c, rules)
        # Rules 1 and 2 are both full: the hour ends last, so its wait is the Retry-After.
        # In an hour's last minute both windows end together: either rule, the same wait.
        last_minute = (now_ms // 60_000 + 1) * 60_000 % 3_600_000 == 0
        expected = [(2, 3600)] + ([(1, 60)] if last_minute else [])
        assert (allowed, current, limit, counts) == (False, 2, 2, [2, 2, 2])
        assert (rule, window) in expected
        assert (now_ms + reset_ms) % 3_600_000 == 0
        # Rules 0 and 2 share the hour's counter: one key, counted once per request.
        assert len(await c.execute("KEYS", "*")) == 2
        await c.close()
    run(main())


def test_script_is_atomic_under_concurrent_gateways(valkey_proc):
    limit, callers, connections = 50, 400, 8

    async def main():
        clients = [ValkeyClient.from_url(valkey_proc.address, timeout=5)
                   for _ in range(connections)]
        for c in clients:
            await c.evalsha(SCRIPT, [prefix("sub:warmup")], [1, 60, 1])
        # 8 "gateway instances", 50 concurrent requests each, for one identity.
        results = await asyncio.gather(*[decide(clients[i % connections], [(limit, 60)])
                                         for i in range(callers)])
        allowed = [r for r in results if r[0]]
        assert len(allowed) == limit
        assert sorted(r[2] for r in allowed) == list(range(1, limit + 1))
        assert all(r[2] == limit for r in results if not r[0])
        for c in clients:
            await c.close()
    away_from_a_minute_edge(valkey_proc)
    run(main())


def test_keys_are_hash_tagged_into_one_slot(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        rules = [(10, 1), (10, 60), (10, 3600)]
        for identity, service in [("acme/sub:alice", "scanner"), ("ip:10.0.0.1", "orders"),
                                  ("sub:we{ird}", "scanner")]:
            await decide(c, rules, identity, service)
        keys = await c.execute("KEYS", "*")
        assert len(keys) == 9
        tags = {k[:k.index(b"}") + 1] for k in keys}
        assert tags == {b"{stella-router-rate-limit:acme/sub:alice}",
                        b"{stella-router-rate-limit:ip:10.0.0.1}",
                        b"{stella-router-rate-limit:sub:we%7Bird%7D}"}
        for k in keys:
            # The format: {bucket:identity}:service:route:window:index
            _, rest = k.split(b"}:", 1)
            service, route, window, index = rest.split(b":")
            assert service in (b"scanner", b"orders") and route == b"*"
            assert int(index) >= 0 and int(window) in (1, 60, 3600)
        await c.close()
    run(main())


def test_script_in_valkey_cluster_mode(valkey_proc_factory):
    srv = valkey_proc_factory(cluster=True)

    async def main():
        c = ValkeyClient.from_url(srv.address)
        rules = [(2, 1), (2, 60)]
        assert (await decide(c, rules))[0]
        keys = await c.execute("KEYS", "*")
        slots = {await c.execute("CLUSTER", "KEYSLOT", k) for k in keys}
        tag_slot = await c.execute("CLUSTER", "KEYSLOT", prefix(rules=rules))
        assert slots == {tag_slot}       # every counter of the decision on one node
        assert await c.execute("CLUSTER", "KEYSLOT", f"{BUCKET}:sub:alice") == tag_slot
        await c.close()
    run(main())


# ---------------------------------------------------------------------------------------
# RateLimiter end to end


def env_config(srv, *, threshold=0, instance="", breaker="", rules="[{max_requests: 3, per_seconds: 60}]",
               extra=""):
    return load_config_text(f"""
rate_limiting:
  process_back_pressure_when_more_than_per_5min: {threshold}
{instance}
  for_environment:
    valkey_connection: "{srv.address}"
    rules: {rules}
{breaker}
{extra}
""", env={})


async def resolve(result):
    if isinstance(result, Decision):
        return result
    return await result


def test_environment_limit_end_to_end(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    log = NullLog()
    rl = RateLimiter(env_config(valkey_proc), log.log)

    async def main():
        await rl.start()
        results = []
        for _ in range(4):
            pending = rl.check("sub:alice", "acme", "scanner", "/s", "/s")
            assert not isinstance(pending, Decision)       # Valkey is asked
            results.append(await pending)
        await rl.close()
        return results
    results = run(main())
    assert [d.allowed for d in results] == [True, True, True, False]
    assert [d.remaining for d in results[:3]] == [2, 1, 0]
    denied = results[3]
    assert (denied.scope, denied.limit, denied.current, denied.window_s) == (
        "environment", 3, 3, 60)
    assert denied.reset_s % 60 == 0 and 1 <= denied.retry_after_s <= 60
    assert abs(denied.reset_s - time.time() - denied.retry_after_s) < 2
    status, headers, body = rejection(denied, "c1")
    err = orjson.loads(body)["error"]
    assert status == 429 and (err["scope"], err["appliesTo"], err["rule"]) == (
        "environment", "identity", "rate_limiting.for_environment.rules[0]")
    assert (denied.applies_to, denied.rule) == ("identity", "rate_limiting.for_environment.rules[0]")
    assert rl.counters["allowed"]["environment"] == 3
    assert rl.counters["rejected"] == {"instance": 0, "environment": 1}
    assert rl.counters["rejected_by_service"] == {("environment", "scanner"): 1}
    assert rl.counters["environment_checks"] == 4 and rl.counters["valkey_errors"] == {}
    assert any(orjson.loads(l)["message"] == "environment rate limiting ready" for l in log.lines())


def test_two_gateway_instances_share_the_environment_limit(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    settings = env_config(valkey_proc)
    a, b = RateLimiter(settings, NullLog().log), RateLimiter(settings, NullLog().log)

    async def main():
        out = []
        for rl in (a, b, a, b, a):
            out.append((await resolve(rl.check("ip:10.0.0.9", None, "orders", "/o", "/o"))).allowed)
        # Another identity, another service: their own counters.
        out.append((await resolve(a.check("ip:10.0.0.8", None, "orders", "/o", "/o"))).allowed)
        out.append((await resolve(b.check("ip:10.0.0.9", None, "billing", "/b", "/b"))).allowed)
        await a.close()
        await b.close()
        return out
    assert run(main()) == [True, True, True, False, False, True, True]


def test_allowed_decision_reports_the_tighter_tier(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    instance = "  for_instance:\n    rules: [{max_requests: 100, per_seconds: 1}]"
    rl = RateLimiter(env_config(valkey_proc, instance=instance), NullLog().log)

    async def main():
        first = await resolve(rl.check("ip:a", None, "s", "/", "/"))
        assert (first.scope, first.limit, first.remaining) == ("environment", 3, 2)
        await rl.close()
    run(main())
    rl2 = RateLimiter(env_config(valkey_proc, instance=instance.replace("100", "2")),
                      NullLog().log)

    async def main2():
        first = await resolve(rl2.check("ip:b", None, "s", "/", "/"))
        assert (first.scope, first.limit, first.remaining) == ("instance", 2, 1)
        await rl2.close()
    run(main2())


def test_route_override_counts_separately(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    extra = """    microservices:
      scanner:
        routes:
          export:
            pattern: /api/export*
            match_type: prefix
            rules: [{max_requests: 1, per_seconds: 60}]"""
    rl = RateLimiter(env_config(valkey_proc, extra=extra), NullLog().log)

    async def main():
        check = lambda path: resolve(rl.check("ip:a", None, "scanner", path, path))  # noqa: E731
        assert (await check("/api/export/1")).allowed
        d = await check("/api/export/2")
        assert not d.allowed and d.limit == 1
        assert (await check("/api/list")).allowed          # the service default: 3/60
        keys = sorted(await rl.client.execute("KEYS", "*"))
        await rl.close()
        return keys
    keys = run(main())
    assert [k.split(b"}:")[1].rsplit(b":", 2)[0] for k in keys] == [b"scanner:*",
                                                                   b"scanner:export"]


def test_noscript_after_script_flush_is_transparent(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    rl = RateLimiter(env_config(valkey_proc), NullLog().log)

    async def main():
        await rl.start()
        assert (await resolve(rl.check("ip:a", None, "s", "/", "/"))).allowed
        await rl.client.execute("SCRIPT", "FLUSH")
        assert (await rl.client.execute("SCRIPT", "EXISTS", SCRIPT.sha)) == [0]
        d = await resolve(rl.check("ip:a", None, "s", "/", "/"))
        assert d.allowed and d.scope == "environment" and d.remaining == 1
        assert (await rl.client.execute("SCRIPT", "EXISTS", SCRIPT.sha)) == [1]
        await rl.close()
    run(main())
    assert rl.counters["valkey_errors"] == {} and rl.breaker.state == CLOSED


def test_auth_block_redis_connection_string_drives_the_environment_tier(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    settings = load_config_text(f"""
gateway:
  auth:
    rateLimiting: {{enabled: true, requestsPerMinute: 2, burstSize: 10,
                   redisConnectionString: "{valkey_proc.url}"}}
""", env={})
    rl = RateLimiter(settings, NullLog().log)
    assert rl.instance_rules == ((10, 1), (2, 60))

    async def main():
        out = [await resolve(rl.check("sub:x", "t", "s", "/", "/")) for _ in range(3)]
        await rl.close()
        return out
    out = run(main())
    assert [d.allowed for d in out] == [True, True, False]
    # The instance tier (also 2 per minute) denies first: no need to ask Valkey.
    assert out[2].scope == "instance"
    assert rl.counters["environment_checks"] == 2


# ---------------------------------------------------------------------------------------
# Failure policy: timeouts and a server that goes away


class Clock:
    def __init__(self):
        self.t = 1_700_000_000_000

    def __call__(self):
        return self.t


BREAKER = """    circuit_breaker:
      failure_threshold: 2
      timeout_seconds: 30
      half_open_timeout: 10"""


def test_slow_valkey_fails_open_within_the_timeout(valkey_proc):
    rl = RateLimiter(env_config(valkey_proc, breaker=BREAKER), NullLog().log,
                     valkey_timeout=0.2)

    async def main():
        await rl.start()
        valkey_proc.command("CLIENT", "PAUSE", "600", "ALL")
        d = await resolve(rl.check("ip:a", None, "s", "/", "/"))
        assert d.allowed and d.scope is None           # no instance rules: unlimited
        # Failed open on its own timeout: an answer from Valkey (after the pause) would
        # have counted no error.
        assert rl.counters["valkey_errors"] == {"timeout": 1}
        await asyncio.sleep(0.7)
        await rl.close()
    run(main())
    assert rl.counters["valkey_errors"] == {"timeout": 1}


def test_breaker_through_a_server_stop_and_restart(valkey_proc):
    clock = Clock()
    log = NullLog()
    instance = "  for_instance:\n    rules: [{max_requests: 1000, per_seconds: 60}]"
    rl = RateLimiter(env_config(valkey_proc, instance=instance, breaker=BREAKER), log.log,
                     now_ms=clock)
    check = lambda: rl.check("sub:a", "t", "svc", "/", "/")  # noqa: E731

    async def main():
        await rl.start()
        assert (await resolve(check())).scope == "environment"
        await in_thread(valkey_proc.stop)
        await asyncio.sleep(0.05)
        # Two failures (failure_threshold): each request fails open on the instance tier.
        for _ in range(2):
            pending = check()
            assert not isinstance(pending, Decision)
            d = await pending
            assert d.allowed and d.scope == "instance"
            await asyncio.sleep(0.1)                   # past the reconnect backoff
        assert rl.breaker.state == OPEN
        # Open: decided synchronously, Valkey not asked at all.
        for _ in range(5):
            d = check()
            assert isinstance(d, Decision) and d.allowed and d.scope == "instance"
        # The open timeout passes while Valkey is still down: the probe fails, reopen.
        clock.t += 30_000
        probe = check()
        assert not isinstance(probe, Decision) and rl.breaker.state == HALF_OPEN
        assert isinstance(check(), Decision)           # one probe at a time
        assert (await probe).allowed
        assert rl.breaker.state == OPEN
        # Valkey comes back (empty: no script, no counters); the next probe closes it.
        await in_thread(valkey_proc.start)
        clock.t += 30_000
        await asyncio.sleep(0.25)                      # past the client's reconnect backoff
        probe = check()
        assert not isinstance(probe, Decision)
        d = await probe
        assert d.allowed and d.scope == "environment" and d.current == 1   # fresh server
        assert rl.breaker.state == CLOSED
        again = check()
        assert not isinstance(again, Decision)         # back to asking Valkey
        assert (await again).scope == "environment"
        await rl.close()
    run(main())
    c = rl.counters
    assert c["breaker_trips"] == {"failure_threshold": 1, "probe_failed": 1}
    assert c["breaker_transitions"] == {"closed->open": 1, "open->half_open": 2,
                                        "half_open->open": 1, "half_open->closed": 1}
    assert c["environment_skipped"]["breaker_open"] == 6
    assert sum(c["valkey_errors"].values()) == 3
    assert c["rejected"] == {"instance": 0, "environment": 0}
    messages = [orjson.loads(l)["message"] for l in log.lines()]
    assert [m for m in messages if "circuit breaker" in m] == [
        "rate limit circuit breaker open", "rate limit circuit breaker half_open",
        "rate limit circuit breaker open", "rate limit circuit breaker half_open",
        "rate limit circuit breaker closed"]


def test_valkey_down_from_the_start_never_denies_or_raises(valkey_proc):
    settings = env_config(valkey_proc, breaker=BREAKER)
    valkey_proc.stop()
    log = NullLog()
    rl = RateLimiter(settings, log.log)

    async def main():
        await rl.start()                               # logs, does not raise
        out = [await resolve(rl.check("ip:a", None, "s", "/", "/")) for _ in range(20)]
        await rl.close()
        return out
    out = run(main())
    assert all(d.allowed for d in out)
    assert rl.breaker.state == OPEN
    messages = [orjson.loads(l)["message"] for l in log.lines()]
    assert any("not available at start" in m for m in messages)


def test_a_cancelled_probe_lets_the_next_request_probe(valkey_proc):
    clock = Clock()
    rl = RateLimiter(env_config(valkey_proc, breaker=BREAKER), NullLog().log, now_ms=clock)

    async def main():
        await rl.start()
        rl.breaker.failure("x")
        rl.breaker.failure("x")
        clock.t += 30_000
        probe = asyncio.ensure_future(rl.check("ip:a", None, "s", "/", "/"))
        await asyncio.sleep(0)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert rl.breaker.state == HALF_OPEN
        d = await resolve(rl.check("ip:a", None, "s", "/", "/"))
        assert d.scope == "environment" and rl.breaker.state == CLOSED
        await rl.close()
    run(main())


# ---------------------------------------------------------------------------------------
# PendingCheck.then: the continuation is called from the reply handling


class Continuation:
    def __init__(self, fail: Exception | None = None):
        self.calls = []
        self.fail = fail

    def __call__(self, decision, *args):
        import inspect
        frames = [f.function for f in inspect.stack()[1:8]]
        self.calls.append((decision, args, "data_received" in frames))
        if self.fail is not None:
            raise self.fail


def test_then_is_called_once_from_the_reply_handling(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    rl = RateLimiter(env_config(valkey_proc), NullLog().log)

    async def main():
        await rl.start()
        await resolve(rl.check("ip:a", None, "s", "/", "/"))         # connected
        conts = []
        for _ in range(3):
            pending = rl.check("ip:a", None, "s", "/", "/")
            assert isinstance(pending, PendingCheck)
            cont = Continuation()
            pending.then(cont, "req", 7)
            assert cont.calls == []
            conts.append(cont)
        await rl.client.execute("PING")
        # No future, no loop hop: each decision arrives inside data_received, in order.
        assert [[(d.allowed, d.remaining, args, inside) for d, args, inside in c.calls]
                for c in conts] == [[(True, 1, ("req", 7), True)], [(True, 0, ("req", 7), True)],
                                    [(False, 0, ("req", 7), True)]]
        # then() on a check decided already calls back at once.
        pending = rl.check("ip:b", None, "s", "/", "/")
        await rl.client.execute("PING")
        late = Continuation()
        pending.then(late)
        assert [(d.allowed, inside) for d, _, inside in late.calls] == [(True, False)]
        await rl.close()
    run(main())
    assert rl.counters["environment_checks"] == 5 and rl.counters["valkey_errors"] == {}


def test_a_raising_continuation_leaves_the_limiter_and_the_client_working(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    rl = RateLimiter(env_config(valkey_proc, rules="[{max_requests: 10, per_seconds: 60}]"),
                     NullLog().log)

    async def main():
        reported = []
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: reported.append(ctx))
        await rl.start()
        bad, good = Continuation(fail=RuntimeError("stage bug")), Continuation()
        rl.check("ip:a", None, "s", "/", "/").then(bad)
        rl.check("ip:a", None, "s", "/", "/").then(good)
        d = await resolve(rl.check("ip:a", None, "s", "/", "/"))
        assert [c.calls[0][0].remaining for c in (bad, good)] == [9, 8] and d.remaining == 7
        assert [type(ctx["exception"]) for ctx in reported] == [RuntimeError]
        assert rl.client.connects == 1 and rl.breaker.state == CLOSED
        await rl.close()
    run(main())
    assert rl.counters["environment_checks"] == 3 and rl.counters["valkey_errors"] == {}


def test_then_fails_open_once_on_timeout_and_on_a_lost_connection(valkey_proc):
    instance = "  for_instance:\n    rules: [{max_requests: 1000, per_seconds: 60}]"
    rl = RateLimiter(env_config(valkey_proc, instance=instance, breaker=BREAKER), NullLog().log,
                     valkey_timeout=0.2)

    async def main():
        await rl.start()
        valkey_proc.command("CLIENT", "PAUSE", "400", "ALL")
        timed_out = Continuation()
        rl.check("ip:a", None, "s", "/", "/").then(timed_out)
        await asyncio.sleep(0.6)
        await rl.client.execute("PING")                # reconnected
        # The server dies while the check waits behind a slow command.
        asyncio.ensure_future(rl.client.execute("DEBUG", "SLEEP", "0.15")).add_done_callback(
            lambda fut: fut.exception())
        await asyncio.sleep(0)
        lost = Continuation()
        rl.check("ip:a", None, "s", "/", "/").then(lost)
        await asyncio.sleep(0.05)
        await in_thread(valkey_proc.proc.kill)
        await asyncio.sleep(0.1)
        for cont in (timed_out, lost):
            [(d, _, _)] = cont.calls
            assert d.allowed and d.scope == "instance"
        await rl.close()
    run(main())
    assert rl.counters["valkey_errors"] == {"timeout": 1, "connection": 1}
    assert rl.breaker.state == OPEN


def test_cancel_discards_the_reply_and_a_cancelled_probe_lets_the_next_one_probe(valkey_proc):
    clock = Clock()
    rl = RateLimiter(env_config(valkey_proc, breaker=BREAKER), NullLog().log, now_ms=clock)

    async def main():
        await rl.start()
        gone = Continuation()
        pending = rl.check("ip:a", None, "s", "/", "/")
        pending.then(gone)
        pending.cancel()
        await rl.client.execute("PING")
        assert gone.calls == [] and rl.counters["environment_checks"] == 0
        rl.breaker.failure("x")
        rl.breaker.failure("x")
        clock.t += 30_000
        probe = rl.check("ip:a", None, "s", "/", "/")
        assert isinstance(probe, PendingCheck) and rl.breaker.state == HALF_OPEN
        assert isinstance(rl.check("ip:a", None, "s", "/", "/"), Decision)   # one probe
        probe.cancel()
        second = rl.check("ip:a", None, "s", "/", "/")
        assert isinstance(second, PendingCheck)
        d = await second
        assert d.scope == "environment" and rl.breaker.state == CLOSED
        await rl.close()
    run(main())
