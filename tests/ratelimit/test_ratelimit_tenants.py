"""Tenant quotas without Valkey: configuration, which rules apply to whom (base, plans),
the instance tier on a fake clock, WindowLimiter.decide_with() against a brute-force
oracle and compiled against its twin, and the 429 that says which limit applied.
The environment tier is in tests/ratelimit/test_ratelimit_tenants_valkey.py, the real gateway in
tests/ratelimit/test_ratelimit_tenants_e2e.py."""
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw._py import window as py_window
from stellagw.config import ConfigError, load_config_text
from stellagw.ratelimit import UNLIMITED, RateLimiter, rejection
from stellagw.ratelimit.policy import EnvironmentPolicy, instance_rule_sets
from tests.support.gwtest import ROOT, NullLog
from tests.codecs.test_window import Oracle, c_window, needs_c, rules_st
from tests.support.valkey_server import free_port

T0 = 1_700_000_000_000


class Clock:
    def __init__(self, t: int = T0):
        self.t = t

    def __call__(self) -> int:
        return self.t


def limiter(text: str, clock=None):
    return RateLimiter(load_config_text(text, env={}), NullLog().log, now_ms=clock or Clock())


TENANTS = """
rate_limiting:
  for_instance:
    rules: [{max_requests: 3, per_seconds: 60}]
    tenant_rules: [{max_requests: 5, per_seconds: 60}]
  plans:
    gold:
      for_instance:
        tenant_rules: [{max_requests: 8, per_seconds: 60}]
    vip:
      for_instance:
        rules: [{max_requests: 10, per_seconds: 60}]
  tenants:
    globex: {plan: gold}
    initech: {plan: vip}
"""


def allowed(rl, key, tenant, n, service="scanner"):
    return [rl.check(key, tenant, service, "/r", "/r").allowed for _ in range(n)]


# ---------------------------------------------------------------------------------------
# Instance tier


def test_a_tenant_exhausting_its_quota_does_not_touch_another():
    rl = limiter(TENANTS)
    # acme's identities together: 5 a minute, each at most 3.
    assert allowed(rl, "sub:alice", "acme", 3) == [True] * 3
    assert allowed(rl, "sub:alice", "acme", 1) == [False]            # alice's own limit
    assert allowed(rl, "sub:bob", "acme", 3) == [True, True, False]  # the tenant's
    d = rl.check("sub:carol", "acme", "scanner", "/r", "/r")
    assert (d.allowed, d.applies_to, d.limit, d.window_s, d.rule) == (
        False, "tenant", 5, 60, "rate_limiting.for_instance.tenant_rules[0]")
    # Another tenant (same subjects), anonymous clients and tenantless tokens: untouched.
    assert allowed(rl, "sub:alice", "umbrella", 3) == [True] * 3
    assert allowed(rl, "sub:bob", "umbrella", 2) == [True] * 2
    assert allowed(rl, "ip:10.0.0.1", None, 3) == [True] * 3
    assert allowed(rl, "sub:alice", None, 3) == [True] * 3
    # acme on another service: counted per service, like an identity.
    assert allowed(rl, "sub:bob", "acme", 1, service="policy") == [True]
    c = rl.counters
    assert c["rejected_by_limit"] == {("instance", "identity"): 1, ("instance", "tenant"): 2}
    assert c["allowed"]["instance"] == 3 + 2 + 3 + 2 + 3 + 3 + 1
    assert c["rejected"]["instance"] == 3


def test_denied_requests_count_in_neither_counter():
    """Identity and tenant rules are one set: a request refused by either is counted in
    neither, so one identity hammering past its own limit cannot eat its tenant's quota,
    and a tenant over its quota does not use up its identities' windows."""
    rl = limiter(TENANTS)
    assert allowed(rl, "sub:alice", "acme", 10) == [True] * 3 + [False] * 7
    assert allowed(rl, "sub:bob", "acme", 3) == [True, True, False]   # 3 + 2 = the tenant's 5
    rl2 = limiter(TENANTS)
    assert allowed(rl2, "sub:a", "acme", 3) + allowed(rl2, "sub:b", "acme", 2) == [True] * 5
    assert allowed(rl2, "sub:c", "acme", 10) == [False] * 10          # the tenant is full...
    clock = rl2._clock
    clock.t += 60_000                                                 # ...until it is not,
    assert allowed(rl2, "sub:c", "acme", 4) == [True] * 3 + [False]   # and c's 10 never counted


def test_a_plan_overrides_the_base():
    rl = limiter(TENANTS)
    # gold: the tenant quota is 8 (identities still 3 each).
    got = [allowed(rl, f"sub:{u}", "globex", 3) for u in ("a", "b", "c")]
    assert sum(got, []).count(True) == 8
    d = rl.check("sub:d", "globex", "scanner", "/r", "/r")
    assert (d.allowed, d.limit, d.rule) == (False, 8, "rate_limiting.plans.gold.for_instance.tenant_rules[0]")
    # vip: identities get 10 (replacing the base's 3); the tenant keeps the base's 5.
    assert allowed(rl, "sub:a", "initech", 6) == [True] * 5 + [False]
    d = rl.check("sub:a", "initech", "scanner", "/r", "/r")
    assert (d.applies_to, d.limit, d.rule) == ("tenant", 5, "rate_limiting.for_instance.tenant_rules[0]")
    # An allowed decision describes the rule with the fewest requests left, of either kind.
    fresh = limiter(TENANTS)
    d = fresh.check("sub:a", "initech", "scanner", "/r", "/r")
    assert (d.applies_to, d.limit, d.remaining) == ("tenant", 5, 4)
    d = fresh.check("sub:a", "acme", "scanner", "/r", "/r")
    assert (d.applies_to, d.limit, d.remaining, d.rule) == (
        "identity", 3, 2, "rate_limiting.for_instance.rules[0]")


def test_limiters_are_shared_where_plans_keep_the_base_rules():
    rl = limiter(TENANTS)
    base, gold, vip = rl._base, rl._tenants["globex"], rl._tenants["initech"]
    assert gold.identity is base.identity and gold.tenant is not base.tenant
    assert vip.identity is not base.identity and vip.tenant is base.tenant
    assert len(rl._windows) == 4
    s = load_config_text(TENANTS, env={})
    assert instance_rule_sets(s, "vip")[0].names == ("rate_limiting.plans.vip.for_instance.rules[0]",)


def test_tenant_names_are_keys_as_in_the_identity():
    """A tenant with '/' or '%' is escaped the same way in both keys, so it can neither
    borrow another tenant's quota nor an identity's."""
    rl = limiter("""
rate_limiting:
  for_instance:
    tenant_rules: [{max_requests: 1, per_seconds: 60}]
  plans: {gold: {for_instance: {tenant_rules: [{max_requests: 2, per_seconds: 60}]}}}
  tenants: {"ac/me": {plan: gold}}
""")
    for tenant in ("ac/me", "ac%2Fme", "ac"):
        assert rl.check("sub:x", tenant, "s", "/", "/").allowed, tenant
    assert rl.check("sub:y", "ac/me", "s", "/", "/").allowed          # gold: 2
    assert not rl.check("sub:z", "ac/me", "s", "/", "/").allowed
    assert not rl.check("sub:z", "ac%2Fme", "s", "/", "/").allowed    # not on gold: 1
    assert len(rl._base.tenant) == 2 and len(rl._tenants["ac%2Fme"].tenant) == 1


def test_only_tenant_rules_leave_anonymous_requests_unlimited():
    rl = limiter("rate_limiting: {for_instance: {tenant_rules: [{max_requests: 1, per_seconds: 1}]}}")
    assert rl.enabled and rl._instance is None
    assert rl.check("ip:1.2.3.4", None, "s", "/", "/") is UNLIMITED
    assert rl.check("sub:a", None, "s", "/", "/") is UNLIMITED
    assert rl.check("sub:a", "t", "s", "/", "/").allowed
    assert not rl.check("sub:b", "t", "s", "/", "/").allowed


def test_the_shortcuts():
    """Without tenant rules or plans check() takes exactly the path it took before tenant
    quotas existed; with them and only the instance tier, a second shortcut."""
    plain = limiter("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 1}]}}")
    assert plain._instance_only and not plain._per_tenant
    assert not limiter(TENANTS)._instance_only and limiter(TENANTS)._instance_tenants
    only_plan = limiter("""
rate_limiting:
  for_instance: {rules: [{max_requests: 1, per_seconds: 60}]}
  plans: {big: {for_instance: {rules: [{max_requests: 2, per_seconds: 60}]}}}
  tenants: {acme: {plan: big}}
""")
    assert only_plan._per_tenant and only_plan._instance_tenants
    assert allowed(only_plan, "sub:a", "acme", 3) == [True, True, False]
    assert allowed(only_plan, "sub:a", "other", 2) == [True, False]


def test_instance_shortcut_decides_as_the_full_path():
    """Tenant quotas with only the instance tier take a shortcut; with an environment tier
    whose gate skips Valkey check() goes the long way. Same decisions, same counters."""
    env = f"""
  process_back_pressure_when_more_than_per_5min: 1000000
  for_environment:
    valkey_connection: "127.0.0.1:{free_port()}"
    rules: [{{max_requests: 10, per_seconds: 60}}]
"""
    clock = Clock()
    fast, full = limiter(TENANTS, clock), limiter(TENANTS + env, clock)
    assert fast._instance_tenants and not full._instance_tenants and full._gate is not None
    callers = [("sub:a", "acme"), ("sub:b", "acme"), ("sub:a", "globex"), ("sub:c", "initech"),
               ("ip:9", None), ("sub:a", None)]
    for step in [0, 0, 100, 5000, 0, 20_000, 0, 0, 40_000, 0, 61_000, 0]:
        clock.t += step
        for key, tenant in callers:
            d = fast.check(key, tenant, "scanner", "/r", "/r")
            assert d == full.check(key, tenant, "scanner", "/r", "/r"), (clock.t, key, tenant)
    f, g = fast.counters, full.counters
    for name in ("allowed", "rejected", "rejected_by_service", "rejected_by_limit"):
        assert f[name] == g[name], name
    assert f["rejected"]["instance"] > 0 and f["rejected_by_limit"][("instance", "tenant")] > 0


def test_idle_tenant_keys_are_evicted_in_every_limiter():
    clock = Clock()
    rl = limiter(TENANTS, clock)
    for i in range(4):
        rl.check(f"sub:{i}", "globex", "s", "/", "/")
        rl.check(f"sub:{i}", "initech", "s", "/", "/")
    clock.t += 60_000

    async def main():
        rl._evict()                     # what start() arms once a second
        rl._evict_handle.cancel()
    uvloop.run(main())
    # 4 + 4 identities, the globex and initech tenant keys.
    assert rl.counters["instance_keys_evicted"]["idle"] == 4 + 4 + 1 + 1
    assert all(len(w) == 0 for w in rl._windows)


# ---------------------------------------------------------------------------------------
# The 429 says which limit


def test_the_429_names_the_tenant_limit():
    rl = limiter(TENANTS)
    allowed(rl, "sub:a", "globex", 3)
    allowed(rl, "sub:b", "globex", 3)
    allowed(rl, "sub:c", "globex", 2)
    status, headers, body = rejection(rl.check("sub:d", "globex", "scanner", "/r", "/r"), "tr-1")
    assert status == 429
    assert b"X-RateLimit-Limit: 8\r\n" in headers and b"X-RateLimit-Remaining: 0\r\n" in headers
    assert b"X-RateLimit-Policy: 8;w=60;scope=instance;applies-to=tenant\r\n" in headers
    err = orjson.loads(body)["error"]
    assert err == {"code": "rate_limit_exceeded", "message": err["message"], "trace_id": "tr-1",
                   "retryAfter": err["retryAfter"], "limit": 8, "current": 8, "window": 60,
                   "scope": "instance", "appliesTo": "tenant",
                   "rule": "rate_limiting.plans.gold.for_instance.tenant_rules[0]"}
    status, headers, body = rejection(rl.check("sub:a", "globex", "scanner", "/r", "/r"), "tr-2")
    # alice's own limit is full too, and the tenant's: the one to wait for longest is named;
    # both windows are the minute, so the identity's (listed first) on a tie.
    assert orjson.loads(body)["error"]["appliesTo"] in ("identity", "tenant")


def test_the_429_names_the_auth_block_rules():
    rl = limiter("""
gateway: {auth: {rateLimiting: {enabled: true, requestsPerMinute: 2, burstSize: 0}}}
rate_limiting:
  for_instance: {tenant_rules: [{max_requests: 100, per_seconds: 60}]}
""")
    allowed(rl, "sub:a", "t", 2)
    d = rl.check("sub:a", "t", "scanner", "/", "/")
    assert (d.allowed, d.applies_to, d.rule) == (
        False, "identity", "gateway.auth.rateLimiting.requestsPerMinute")


# ---------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("text, path, words", [
    ("rate_limiting: {plans: {gold: {}}, tenants: {acme: {plan: golld}}}",
     "rate_limiting.tenants.acme.plan", ["no plan 'golld'", "did you mean 'gold'"]),
    ("rate_limiting: {tenants: {acme: {tier: gold}}}", "rate_limiting.tenants.acme.tier",
     ["unknown key", "plan"]),
    ("rate_limiting: {tenants: {acme: {}}}", "rate_limiting.tenants.acme.plan", ["required"]),
    ("rate_limiting: {plans: {gold: {for_environment: {rules: [{max_requests: 1, per_seconds: 1}]}}}}",
     "rate_limiting.plans.gold.for_environment", ["not configured"]),
    ("""rate_limiting:
  for_environment:
    microservices: {scanner: {routes: {export: {pattern: /x}}}}
  plans: {gold: {for_environment: {microservices: {scanner: {routes: {exprt: {}}}}}}}""",
     "rate_limiting.plans.gold.for_environment.microservices.scanner.routes.exprt",
     ["no route 'exprt'", "did you mean 'export'", "pattern"]),
    ("rate_limiting: {plans: {gold: {for_environment: {microservices: {scanner: "
     "{routes: {r: {pattern: /x}}}}}}}}",
     "rate_limiting.plans.gold.for_environment.microservices.scanner.routes.r.pattern",
     ["unknown key"]),
    ("rate_limiting: {for_instance: {tenant_rules: [{max_requests: 0, per_seconds: 1}]}}",
     "rate_limiting.for_instance.tenant_rules[0].max_requests", ["at least 1"]),
    ("rate_limiting: {for_instance: {tenant_rules: ["
     + ", ".join(["{max_requests: 1, per_seconds: 1}"] * 17) + "]}}",
     "rate_limiting.for_instance.tenant_rules", ["at most 16"]),
    ("rate_limiting: {plans: {gold: {for_instance: {rules: ["
     + ", ".join(["{max_requests: 1, per_seconds: 1}"] * 17) + "]}}}}",
     "rate_limiting.plans.gold.for_instance.rules", ["at most 16"]),
])
def test_bad_tenant_configuration_names_the_key(text, path, words):
    with pytest.raises(ConfigError) as info:
        load_config_text(text, env={})
    assert info.value.path == path, str(info.value)
    assert all(w in info.value.reason for w in words), info.value.reason


def test_bad_tenant_configuration_stops_serve_before_listening(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("rate_limiting: {plans: {gold: {}}, tenants: {acme: {plan: silver}}}\n")
    out = subprocess.run([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "rate_limiting.tenants.acme.plan" in out.stderr and "no plan 'silver'" in out.stderr
    assert "listening" not in out.stdout


# ---------------------------------------------------------------------------------------
# Environment policy: both kinds, each resolved on its own; plans overlaid


ENV = """
rate_limiting:
  for_environment:
    valkey_connection: "localhost:6379"
    rules: [{max_requests: 100, per_seconds: 60}]
    tenant_rules: [{max_requests: 1000, per_seconds: 60}]
    microservices:
      scanner:
        tenant_rules: [{max_requests: 500, per_seconds: 60}]
        routes:
          export:
            pattern: /export*
            match_type: prefix
            rules: [{max_requests: 2, per_seconds: 60}]
          bulk:
            pattern: /export/bulk
            tenant_rules: [{max_requests: 5, per_seconds: 60}]
  plans:
    gold:
      for_environment:
        tenant_rules: [{max_requests: 9000, per_seconds: 60}]
        microservices:
          scanner:
            routes:
              export: {rules: [{max_requests: 20, per_seconds: 60}]}
          billing:
            rules: [{max_requests: 7, per_seconds: 1}]
"""


@pytest.fixture(scope="module")
def settings_env():
    return load_config_text(ENV, env={})


@pytest.mark.parametrize("plan, service, path, identity, tenant", [
    # (kind: (level, route, rules, name)): a route without rules of a kind is skipped for it.
    (None, "scanner", "/export/1", ("route", "export", ((2, 60),), "microservices.scanner.routes.export.rules[0]"),
     ("microservice", "*", ((500, 60),), "microservices.scanner.tenant_rules[0]")),
    (None, "scanner", "/export/bulk", ("route", "export", ((2, 60),), "microservices.scanner.routes.export.rules[0]"),
     ("route", "bulk", ((5, 60),), "microservices.scanner.routes.bulk.tenant_rules[0]")),
    (None, "scanner", "/list", ("environment", "*", ((100, 60),), "rules[0]"),
     ("microservice", "*", ((500, 60),), "microservices.scanner.tenant_rules[0]")),
    (None, "orders", "/o", ("environment", "*", ((100, 60),), "rules[0]"),
     ("environment", "*", ((1000, 60),), "tenant_rules[0]")),
    ("gold", "scanner", "/export/1", ("route", "export", ((20, 60),), "P.microservices.scanner.routes.export.rules[0]"),
     ("microservice", "*", ((500, 60),), "microservices.scanner.tenant_rules[0]")),
    ("gold", "scanner", "/export/bulk", ("route", "export", ((20, 60),), "P.microservices.scanner.routes.export.rules[0]"),
     ("route", "bulk", ((5, 60),), "microservices.scanner.routes.bulk.tenant_rules[0]")),
    ("gold", "orders", "/o", ("environment", "*", ((100, 60),), "rules[0]"),
     ("environment", "*", ((9000, 60),), "P.tenant_rules[0]")),
    ("gold", "billing", "/b", ("microservice", "*", ((7, 1),), "P.microservices.billing.rules[0]"),
     ("environment", "*", ((9000, 60),), "P.tenant_rules[0]")),
])
def test_environment_resolution_per_kind_and_plan(settings_env, plan, service, path, identity,
                                                  tenant):
    env = settings_env.rate_limiting.for_environment
    if plan:
        policy = EnvironmentPolicy(env, settings_env.rate_limiting.plans[plan].for_environment,
                                   f"rate_limiting.plans.{plan}.for_environment")
    else:
        policy = EnvironmentPolicy(env)
    check = policy.resolve(service, path)

    def name(n):
        return (n.replace("P.", f"rate_limiting.plans.{plan}.for_environment.") if n.startswith("P.")
                else f"rate_limiting.for_environment.{n}")
    for got, (level, route, rules, rule_name), applies in ((check.identity, identity, "identity"),
                                                           (check.tenant, tenant, "tenant")):
        assert (got.level, got.route, got.rules, got.applies) == (level, route, rules, applies)
        assert got.names == (name(rule_name),)
    # ARGV: the identity's rules on KEYS[1], the tenant's on KEYS[2].
    assert check.argv == (*identity[2][0], 1, *tenant[2][0], 2)
    assert check.applies == ("identity", "tenant")
    alone = check.identity_only
    assert alone.tenant is None and alone.identity is check.identity and alone.argv[-1] == 1
    assert policy.resolve(service, path) is check and policy.has_tenant_rules


# ---------------------------------------------------------------------------------------
# WindowLimiter.decide_with(): a brute-force oracle, and compiled against twin


class PairOracle:
    """decide_with() written out naively on two Oracles (tests/codecs/test_window.py)."""

    def __init__(self, rules, other_rules):
        self.sides = (Oracle(rules), Oracle(other_rules))
        self.secs = (tuple(s for _, s in rules), tuple(s for _, s in other_rules))

    def decide(self, key, other_key, now_ms):
        states = []
        for o, k in zip(self.sides, (key, other_key)):
            now = max(now_ms, o.last.get(k, now_ms))
            o.last[k] = now
            times = o.hits.setdefault(k, [])
            states.append((o, times, now, [o._count(times, w, b, now) for _, w, b in o.rules]))
        if any(c >= m for o, _, _, counts in states for c, (m, _, _) in zip(counts, o.rules)):
            best = (-1, 0, 0)
            for side, (o, times, now, counts) in enumerate(states):
                for r, (m, w, b) in enumerate(o.rules):
                    if counts[r] >= m:
                        wait = o._wait(times, m, w, b, now, now_ms)
                        if wait > best[0]:
                            best = (wait, side, r)
            wait, side, r = best
            limit = self.sides[side].rules[r][0]
            return side, (False, "instance", limit, 0, -(-(now_ms + wait) // 1000),
                          -(-wait // 1000), limit, self.secs[side][r])
        best = None
        for side, (o, times, now, counts) in enumerate(states):
            times.append(now)
            for r, (m, _, _) in enumerate(o.rules):
                if best is None or m - counts[r] - 1 < best[0]:
                    best = (m - counts[r] - 1, side, r)
        left, side, r = best
        o, times, now, _ = states[side]
        m, w, b = o.rules[r]
        oldest = min(t for t in times if t // b > now // b - w // b)
        reset_ms = (oldest // b + w // b) * b - now_ms
        return side, (True, "instance", m, left, -(-(now_ms + reset_ms) // 1000), 0, m - left,
                      self.secs[side][r])


pair_steps_st = st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from("xy"),
                                   st.one_of(st.integers(0, 400), st.integers(0, 20_000),
                                             st.integers(-500, 0))),
                         min_size=1, max_size=120)


def labelled(W, rules, applies):
    return W.WindowLimiter(rules, applies_to=applies,
                           names=[f"{applies}[{i}]" for i in range(len(rules))])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st, other_rules=rules_st, steps=pair_steps_st)
def test_decide_with_matches_the_oracle(rules, other_rules, steps):
    impls = [py_window] + ([c_window] if c_window is not None else [])
    pairs = [(W, labelled(W, rules, "identity"), labelled(W, other_rules, "tenant"))
             for W in impls]
    oracle = PairOracle(rules, other_rules)
    now = 1_000_000
    for key, other_key, delta in steps:
        now = max(0, now + delta)
        side, expected = oracle.decide(key, other_key, now)
        for W, lim, other in pairs:
            d = lim.decide_with(key, other, other_key, now)
            fields = (d.allowed, d.scope, d.limit, d.remaining, d.reset_s, d.retry_after_s,
                      d.current, d.window_s)
            assert fields == expected, (W.__name__, key, other_key, now)
            applies = ("identity", "tenant")[side]
            assert d.applies_to == applies and d.rule.startswith(applies + "[")
    for W, lim, other in pairs:
        assert lim.allowed_count + lim.denied_count == len(steps)
        assert other.allowed_count == other.denied_count == 0


ops_st = st.lists(st.one_of(
    st.tuples(st.just("with"), st.sampled_from("abcdef"), st.sampled_from("xyz"),
              st.integers(-300, 3000)),
    st.tuples(st.just("alone"), st.sampled_from("abcdef"), st.just(""), st.integers(-300, 3000)),
    st.tuples(st.just("evict"), st.just(""), st.just(""), st.integers(0, 70_000)),
), min_size=1, max_size=200)


@needs_c
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st, other_rules=rules_st, max_keys=st.integers(1, 5), ops=ops_st)
def test_compiled_decide_with_matches_twin(rules, other_rules, max_keys, ops):
    sides = []
    for W in (c_window, py_window):
        sides.append((W.WindowLimiter(rules, max_keys, applies_to="identity"),
                      W.WindowLimiter(other_rules, max_keys, applies_to="tenant")))
    now = 0
    for op, key, other_key, delta in ops:
        now = max(0, now + delta)
        got = []
        for lim, other in sides:
            if op == "with":
                got.append(repr(lim.decide_with(key, other, other_key, now)))
            elif op == "alone":
                got.append(repr(lim.decide(key, now)))
            else:
                got.append((lim.evict_idle(now), other.evict_idle(now)))
            got.append((len(lim), len(other), lim.capacity_evictions, other.capacity_evictions,
                        lim.allowed_count, lim.denied_count))
        assert got[:2] == got[2:], (op, key, other_key, now)


@pytest.mark.parametrize("W", [py_window] + ([c_window] if c_window is not None else []),
                         ids=lambda W: W.__name__.split(".")[-2])
def test_decide_with_arguments(W):
    lim = W.WindowLimiter([(1, 1)], names=["n"])
    with pytest.raises(ValueError):
        lim.decide_with("a", lim, "b", 0)                  # one slot table for two keys
    with pytest.raises(TypeError):
        lim.decide_with("a", None, "b", 0)
    with pytest.raises(TypeError):
        lim.decide_with("a", W.WindowLimiter([(1, 1)]), None, 0)
    with pytest.raises(ValueError):
        W.WindowLimiter([(1, 1)], names=["a", "b"])         # one name per rule
    d = lim.decide_with("a", W.WindowLimiter([(5, 1)]), "b")   # the wall clock
    assert d.allowed and d.rule == "n" and d.applies_to is None
    assert W.Decision(True, "instance", 1, 0, 0, 0, 1, 1, "tenant", "r") != \
        W.Decision(True, "instance", 1, 0, 0, 0, 1, 1, "identity", "r")
    assert repr(W.Decision(True, None, 0, 0, 0, 0, 0, 0)).endswith("window_s=0)")
