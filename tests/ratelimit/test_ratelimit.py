"""RateLimiter without Valkey: the instance tier on a fake clock, the activation gate, the
circuit breaker's state machine, the 429. The environment tier against a real server is in
tests/ratelimit/test_ratelimit_valkey.py."""
from __future__ import annotations

import asyncio
import time
from time import perf_counter

import orjson
import pytest
import uvloop

from stellagw.config import load_config_text
from stellagw.ratelimit import (UNLIMITED, Decision, RateLimiter, identity_key,
                                rate_limit_headers, rejection)
from stellagw.ratelimit import limiter as limiter_module
from stellagw.ratelimit.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from stellagw.ratelimit.environment import SCRIPT, parse_reply
from stellagw.valkey import pack_evalsha
from tests.support.gwtest import NullLog
from tests.support.valkey_server import free_port

T0 = 1_700_000_000_000          # a Unix time in ms, on a whole second


class Clock:
    def __init__(self, t: int = T0):
        self.t = t

    def __call__(self) -> int:
        return self.t


def limiter(text: str, clock=None, log=None):
    log = log or NullLog()
    return RateLimiter(load_config_text(text, env={}), log.log, now_ms=clock or Clock()), log


def records(log: NullLog) -> list[dict]:
    return [orjson.loads(line) for line in log.lines()]


INSTANCE = """
rate_limiting:
  for_instance:
    rules:
      - {max_requests: 3, per_seconds: 1}
      - {max_requests: 5, per_seconds: 10}
"""


# ---------------------------------------------------------------------------------------
# Instance tier


def test_nothing_configured_allows_synchronously():
    rl, _ = limiter("")
    assert not rl.enabled
    assert rl.check("ip:1.2.3.4", None, "svc", "/x", "/x") is UNLIMITED
    assert rate_limit_headers(UNLIMITED) == b""


def test_instance_windows_and_retry_after():
    clock = Clock()
    rl, _ = limiter(INSTANCE, clock)
    check = lambda: rl.check("sub:alice", "acme", "scanner", "/r", "/r")  # noqa: E731
    rule0 = ("identity", "rate_limiting.for_instance.rules[0]")
    d = check()
    assert d == Decision(True, "instance", 3, 2, T0 // 1000 + 1, 0, 1, 1, *rule0)
    check()
    clock.t += 250
    assert check() == Decision(True, "instance", 3, 0, T0 // 1000 + 1, 0, 3, 1, *rule0)
    clock.t += 250                                      # T0 + 500
    denied = check()
    assert denied == Decision(False, "instance", 3, 0, T0 // 1000 + 1, 1, 3, 1, *rule0)
    clock.t += 500                                      # T0 + 1000: the first two left
    assert check().allowed and check().allowed
    # 5 counted in 10 s: the 10 s rule is violated; its oldest bucket leaves at T0 + 10 s.
    clock.t += 100
    d = check()
    assert (d.allowed, d.limit, d.window_s, d.retry_after_s, d.current) == (False, 5, 10, 9, 5)
    assert d.reset_s == T0 // 1000 + 10
    assert d.rule == "rate_limiting.for_instance.rules[1]"
    assert rl.counters["allowed"]["instance"] == 5
    assert rl.counters["rejected"]["instance"] == 2
    assert rl.counters["rejected_by_service"] == {("instance", "scanner"): 2}
    assert rl.counters["rejected_by_limit"] == {("instance", "identity"): 2}


def test_retry_after_rounds_up_and_is_at_least_one_second():
    clock = Clock(T0 + 999)
    rl, _ = limiter("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 60}]}}",
                    clock)
    assert rl.check("ip:a", None, "s", "/", "/").allowed
    # 600 ms buckets counted from the epoch: T0 = 200 (mod 600), so the request at T0+999
    # sits in the bucket [T0+400, T0+1000) and leaves the minute at T0+60,400.
    clock.t = T0 + 60_000
    d = rl.check("ip:a", None, "s", "/", "/")
    assert not d.allowed and d.retry_after_s == 1 and d.window_s == 60   # 400 ms -> 1 s
    assert d.reset_s == (T0 + 60_400 + 999) // 1000
    clock.t = T0 + 400
    d = rl.check("ip:a", None, "s", "/", "/")
    assert d.retry_after_s == 60                                          # exactly 60 s
    clock.t = T0 + 399                                                    # (the key's clock
    assert rl.check("ip:a", None, "s", "/", "/").retry_after_s == 61      # stands at T0+400)
    clock.t = T0 + 60_400
    assert rl.check("ip:a", None, "s", "/", "/").allowed


def test_keys_per_tenant_identity_address_and_service():
    rl, _ = limiter("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 60}]}}")
    calls = [
        (identity_key("alice", "10.0.0.1"), "acme", "svc"),
        (identity_key("alice", "10.0.0.1"), "globex", "svc"),     # same sub, other tenant
        (identity_key("bob", "10.0.0.1"), "acme", "svc"),
        (identity_key(None, "10.0.0.1"), None, "svc"),            # anonymous: the address
        (identity_key(None, "10.0.0.2"), None, "svc"),
        (identity_key("alice", "10.0.0.1"), "acme", "other"),     # another service
        (identity_key("alice", "10.0.0.1"), "ac/me", "svc"),      # tenant with a '/'
        (identity_key("me/alice", "10.0.0.1"), "ac", "svc"),      # ...is not this one
    ]
    for key, tenant, service in calls:
        assert rl.check(key, tenant, service, "/", "/").allowed, (key, tenant, service)
    for key, tenant, service in calls:
        assert not rl.check(key, tenant, service, "/", "/").allowed
    assert identity_key("alice", "1.2.3.4") == "sub:alice"
    assert identity_key(None, "1.2.3.4") == "ip:1.2.3.4"


def test_instance_only_fast_path_decides_as_the_full_path():
    """check() takes a shortcut when the instance tier is all there is; with an environment
    tier whose gate skips Valkey it goes the long way. Same decisions, same counters."""
    env = f"""
  process_back_pressure_when_more_than_per_5min: 1000000
  for_environment:
    valkey_connection: "127.0.0.1:{free_port()}"
    rules: [{{max_requests: 10, per_seconds: 60}}]
"""
    clock = Clock()
    fast, _ = limiter(INSTANCE, clock)
    full, _ = limiter(INSTANCE + env, clock)
    assert fast._instance_only and not full._instance_only and full._gate is not None
    for step in [0, 0, 0, 100, 400, 500, 0, 3000, 3000, 0, 0, 9000]:
        clock.t += step
        for key, tenant, service in [("sub:alice", "acme", "scanner"), ("ip:b", None, "s")]:
            d = fast.check(key, tenant, service, "/r", "/r")
            assert d.__class__ is Decision
            assert d == full.check(key, tenant, service, "/r", "/r"), (clock.t, key)
            assert rate_limit_headers(d) == (
                b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
                % (d.limit, d.remaining, d.reset_s))
    f, g = fast.counters, full.counters
    assert f["allowed"]["instance"] == g["allowed"]["instance"] == 12
    assert f["rejected"]["instance"] == g["rejected"]["instance"] == 12
    assert f["rejected_by_service"] == g["rejected_by_service"]
    assert g["environment_skipped"]["gate"] == 12          # the allowed ones went on


def test_gate_is_only_kept_for_an_environment_tier():
    rl, _ = limiter(INSTANCE + "  process_back_pressure_when_more_than_per_5min: 10\n")
    assert rl._gate is None and rl._instance_only


def test_instance_tier_reads_the_wall_clock_by_default():
    rl = RateLimiter(load_config_text(INSTANCE, env={}), NullLog().log)
    before = time.time()
    d = rl.check("ip:a", None, "s", "/", "/")
    after = time.time()
    # The first request's 100 ms bucket leaves the 1 s window within 1.1 s.
    assert d.allowed and before <= d.reset_s <= after + 2
    assert rl.counters["allowed"]["instance"] == 1


def test_idle_keys_are_evicted_on_a_timer():
    clock = Clock()
    rl, _ = limiter("rate_limiting: {for_instance: {rules: [{max_requests: 5, per_seconds: 1}]}}",
                    clock)

    async def main():
        await rl.start()
        for i in range(10):
            rl.check(f"ip:{i}", None, "s", "/", "/")
        clock.t += 1000
        await asyncio.sleep(1.1)
        await rl.close()
    uvloop.run(main())
    assert rl.counters["instance_keys_evicted"]["idle"] == 10
    assert len(rl._instance) == 0


# ---------------------------------------------------------------------------------------
# The 429


def test_rejection_headers_and_body():
    d = Decision(False, "environment", 100, 0, 1_700_000_060, 7, 100, 60, "tenant",
                 "rate_limiting.for_environment.tenant_rules[0]")
    status, headers, body = rejection(d, "corr-1")
    assert status == 429
    assert headers == (b"Retry-After: 7\r\nX-RateLimit-Limit: 100\r\nX-RateLimit-Remaining: 0\r\n"
                       b"X-RateLimit-Reset: 1700000060\r\n"
                       b"X-RateLimit-Policy: 100;w=60;scope=environment;applies-to=tenant\r\n"
                       b"content-type: application/json\r\n")
    # The gateway's one error envelope, the original's 429 fields inside it (its constant
    # "error" is the envelope's code), then which limit applied.
    assert orjson.loads(body) == {"error": {
        "code": "rate_limit_exceeded",
        "message": "Rate limit exceeded. Try again in 7 seconds.",
        "trace_id": "corr-1",
        "retryAfter": 7, "limit": 100, "current": 100, "window": 60,
        "scope": "environment",
        "appliesTo": "tenant", "rule": "rate_limiting.for_environment.tenant_rules[0]",
    }}
    assert list(orjson.loads(body)["error"]) == [
        "code", "message", "trace_id", "retryAfter", "limit", "current", "window", "scope",
        "appliesTo", "rule"]
    # A decision that does not say which limit (built by hand): the fields are null.
    _, headers, body = rejection(Decision(False, "instance", 1, 0, 5, 1, 1, 1), "t")
    assert b"X-RateLimit-Policy: 1;w=1;scope=instance\r\n" in headers
    assert orjson.loads(body)["error"]["appliesTo"] is None


def test_rejection_of_an_instance_decision():
    clock = Clock()
    rl, _ = limiter("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 1}]}}",
                    clock)
    rl.check("ip:a", None, "s", "/", "/")
    clock.t += 300
    status, headers, body = rejection(rl.check("ip:a", None, "s", "/", "/"), "t")
    assert b"Retry-After: 1\r\n" in headers
    err = orjson.loads(body)["error"]
    assert (err["scope"], err["appliesTo"], err["rule"], err["trace_id"]) == (
        "instance", "identity", "rate_limiting.for_instance.rules[0]", "t")
    assert rate_limit_headers(Decision(True, "instance", 10, 4, 99, 0, 6, 1)) == \
        b"X-RateLimit-Limit: 10\r\nX-RateLimit-Remaining: 4\r\nX-RateLimit-Reset: 99\r\n"


# ---------------------------------------------------------------------------------------
# The activation gate (Valkey unreachable: the environment check fails open)


def _env_yaml(port: int, threshold: int, extra: str = "") -> str:
    return f"""
rate_limiting:
  process_back_pressure_when_more_than_per_5min: {threshold}
  for_instance:
    rules: [{{max_requests: 1000, per_seconds: 1}}]
  for_environment:
    valkey_connection: "127.0.0.1:{port}"
    rules: [{{max_requests: 10, per_seconds: 60}}]
{extra}"""


def test_gate_skips_the_environment_below_the_threshold():
    clock = Clock()
    rl, _ = limiter(_env_yaml(free_port(), 5), clock)

    async def main():
        for _ in range(5):                       # counts 1..5: not more than 5
            assert isinstance(rl.check("ip:a", None, "s", "/", "/"), Decision)
            clock.t += 1000
        pending = rl.check("ip:a", None, "s", "/", "/")
        assert not isinstance(pending, Decision)
        d = await pending                        # Valkey is down: fail open
        assert d.allowed and d.scope == "instance"
        # Five minutes later the count has drained: skipped again.
        clock.t += 300_000
        assert isinstance(rl.check("ip:a", None, "s", "/", "/"), Decision)
        await rl.close()
    uvloop.run(main())
    assert rl.counters["environment_skipped"]["gate"] == 6
    assert rl.counters["valkey_errors"] == {"connection": 1}


def test_gate_zero_always_checks():
    rl, log = limiter(_env_yaml(free_port(), 0))

    async def main():
        for _ in range(3):
            pending = rl.check("ip:a", None, "s", "/", "/")
            assert not isinstance(pending, Decision)
            assert (await pending).allowed       # fail open, every time
        await rl.close()
    uvloop.run(main())
    assert rl.counters["valkey_errors"]["connection"] == 3
    assert rl.counters["allowed"] == {"instance": 3, "environment": 0}
    failures = [r for r in records(log) if r["message"].startswith("environment rate limit check")]
    assert len(failures) == 1                    # logged once per 10 s, counted every time
    assert failures[0]["errorType"] == "connection"


def test_packed_commands_are_cached_per_identity_and_policy_and_bounded(monkeypatch):
    monkeypatch.setattr(limiter_module, "COMMAND_CACHE_MAX", 3)
    rl, _ = limiter(_env_yaml(free_port(), 0, "    circuit_breaker: {failure_threshold: 1000}"))

    async def main():
        for key, tenant, service in [("ip:a", None, "s"), ("ip:a", None, "s"),
                                     ("sub:b", "t/1", "s"), ("ip:a", None, "other")]:
            assert (await rl.check(key, tenant, service, "/", "/")).allowed   # fails open
        s, other = rl._policy.resolve("s", "/"), rl._policy.resolve("other", "/")
        # Without tenant rules a tenant's check is the identity's alone (ARGV: limit,
        # window, KEYS index).
        assert s.identity_only is s and s.argv == (10, 60, 1)
        assert rl._commands == {
            ("ip:a", s): pack_evalsha(SCRIPT, ("{stella-router-rate-limit:ip:a}:s:*",),
                                      (10, 60, 1)),
            ("t%2F1/sub:b", s): pack_evalsha(
                SCRIPT, ("{stella-router-rate-limit:t%252F1/sub:b}:s:*",), (10, 60, 1)),
            ("ip:a", other): pack_evalsha(
                SCRIPT, ("{stella-router-rate-limit:ip:a}:other:*",), (10, 60, 1))}
        await rl.check("ip:c", None, "s", "/", "/")    # full: dropped whole, then this one
        assert list(rl._commands) == [("ip:c", s)]
        await rl.close()
    uvloop.run(main())
    assert rl.counters["valkey_errors"] == {"connection": 5}


def test_parse_reply_checks_the_length_and_the_leading_fields():
    assert parse_reply([1, 0, 3, 10, 60, 500, 1_700_000_000_000, 3]) == (
        True, 0, 3, 10, 60, 500, 1_700_000_000_000, [3])
    assert parse_reply([0, 1, 2, 2, 1, 20, 5, 1, 2])[0] is False
    for bad in (None, b"OK", (1, 0, 3, 10, 60, 500, 7, 3), [1, 0, 3, 10, 60, 500, 7],
                [1, 0, 3, b"10", 60, 500, 7, 3], [1, 0, 3, 10, 60, 500, None, 3]):
        with pytest.raises(ValueError, match="unexpected rate-limit script reply"):
            parse_reply(bad)


def test_environment_reply_beyond_int64_fails_open():
    rl, _ = limiter(_env_yaml(free_port(), 0))
    instance = Decision(True, "instance", 1000, 999, T0 // 1000 + 1, 0, 1, 1)
    reply = [1, 0, 3, 2**64, 60, 500, T0, 3]              # a limit no Decision can hold
    check = rl._policy.resolve("s", "/")
    assert rl._environment_decided(reply, instance, "s", check, perf_counter()) is instance
    assert rl.counters["valkey_errors"] == {"other": 1}
    assert rl.counters["allowed"]["environment"] == 0


def test_environment_without_an_address_is_off_and_says_so():
    rl, log = limiter("""
rate_limiting:
  for_environment:
    rules: [{max_requests: 10, per_seconds: 60}]
""")
    assert rl.client is None and not rl.enabled
    assert rl.check("ip:a", None, "s", "/", "/") is UNLIMITED
    assert any("no valkey_connection" in r["message"] for r in records(log))


def test_route_without_environment_rules_is_not_sent_to_valkey():
    rl, _ = limiter("""
rate_limiting:
  for_environment:
    valkey_connection: "127.0.0.1:1"
    microservices:
      scanner:
        routes:
          hot: {pattern: /hot, rules: [{max_requests: 1, per_seconds: 1}]}
""")
    assert rl.check("ip:a", None, "scanner", "/cold", "/cold") is UNLIMITED
    assert rl.counters["environment_skipped"]["no_rules"] == 1


# ---------------------------------------------------------------------------------------
# The circuit breaker's state machine (fake clock)


class BreakerSettings:
    failure_threshold = 3
    timeout_seconds = 30.0
    half_open_timeout = 10.0


@pytest.fixture
def breaker():
    clock = Clock(0)
    log = NullLog()
    counters: dict = {}
    b = CircuitBreaker(BreakerSettings, log.log, counters, clock=lambda: clock.t, name="v")
    return b, clock, log, counters


def test_breaker_opens_after_consecutive_failures(breaker):
    b, clock, log, counters = breaker
    b.failure("timeout")
    b.failure("timeout")
    b.success()                                  # not consecutive: starts over
    b.failure("timeout")
    b.failure("timeout")
    assert b.state == CLOSED and b.allow()
    b.failure("connection: refused")
    assert b.state == OPEN and not b.allow()
    assert counters["breaker_trips"] == {"failure_threshold": 1}
    assert counters["breaker_transitions"] == {"closed->open": 1}
    (line,) = [r for r in records(log) if "circuit breaker" in r["message"]]
    assert line["message"] == "rate limit circuit breaker open" and line["level"] == "warning"
    assert line["reason"] == "failure_threshold" and "connection: refused" in line["detail"]


def test_breaker_half_open_probe_then_close(breaker):
    b, clock, log, counters = breaker
    for _ in range(3):
        b.failure("x")
    clock.t = 29.9
    assert not b.allow()
    clock.t = 30
    assert b.allow() and b.state == HALF_OPEN    # this caller is the probe
    assert not b.allow() and not b.allow()       # everyone else: skip while it is out
    b.failure("late failure from before")        # in half-open, a failure reopens...
    assert b.state == OPEN
    clock.t = 60
    assert b.allow()
    b.success()
    assert b.state == CLOSED and b.allow()
    assert counters["breaker_transitions"] == {"closed->open": 1, "open->half_open": 2,
                                               "half_open->open": 1, "half_open->closed": 1}
    assert counters["breaker_trips"] == {"failure_threshold": 1, "probe_failed": 1}
    states = [r["message"].rsplit(" ", 1)[1] for r in records(log)]
    assert states == ["open", "half_open", "open", "half_open", "closed"]


def test_breaker_probe_timeout_and_abandon(breaker):
    b, clock, log, counters = breaker
    for _ in range(3):
        b.failure("x")
    clock.t = 30
    assert b.allow()                             # the probe goes out and never returns
    clock.t = 39.9
    assert not b.allow()
    clock.t = 40
    assert not b.allow() and b.state == OPEN     # half_open_timeout: reopened
    assert counters["breaker_trips"]["probe_timeout"] == 1
    clock.t = 70
    assert b.allow()                             # probe again...
    b.abandon()                                  # ...whose caller was cancelled
    assert b.allow()                             # so the next caller probes
    b.success()
    assert b.state == CLOSED
