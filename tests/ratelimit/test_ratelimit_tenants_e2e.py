"""Tenant quotas through real gateways (`stellagw serve`), a real SDK service, tokens for
several tenants minted by the development Authority with DPoP proofs, and for the
environment tier a real valkey-server shared by two gateway instances."""
from __future__ import annotations

import orjson
import pytest

from stellagw.devauth import DevAuthority, DpopKey

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.services import ServiceProcess
from tests.support.valkey_server import ValkeyProcess

ORIGIN = "http://gw.example.test"     # the instances sit behind one public name
PATH = "/t/tq/whoami"

CONFIG = """
gateway:
  node: {{nodeId: {node}}}
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0, publicOrigin: "{origin}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
rate_limiting:
{limits}
  plans:
    gold:
      {tier}:
        tenant_rules: [{{max_requests: 6, per_seconds: 60}}]
  tenants:
    globex: {{plan: gold}}
"""

INSTANCE = """
  for_instance:
    rules: [{max_requests: 100, per_seconds: 60}]
    tenant_rules: [{max_requests: 3, per_seconds: 60}]
"""

ENVIRONMENT = """
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "{valkey}"
    rules: [{{max_requests: 100, per_seconds: 60}}]
    tenant_rules: [{{max_requests: 3, per_seconds: 60}}]
"""


class Stack:
    """An Authority, `count` gateways with `limits`, one SDK service dialed into each."""

    def __init__(self, tmp_path, limits: str, tier: str, count: int):
        self.authority = DevAuthority(port=0).start_in_thread()
        self.key = DpopKey.generate()
        self.gws, self.ports, self.svcs = [], [], []
        for i in range(count):
            d = tmp_path / f"gw{i}"
            d.mkdir()
            gw = Served(config_text=CONFIG.format(node=f"gw-{i}", origin=ORIGIN, limits=limits,
                                                  tier=tier, issuer=self.authority.issuer),
                        tmp_path=d)
            self.gws.append(gw)
            rec = gw.wait_listening()[0]
            self.ports.append(port_of(rec["http"]))
            self.svcs.append(ServiceProcess("tq", port_of(rec["tcp"])).start())
        # Readiness, not a routed request: that would spend the quotas under test.
        for svc, port in zip(self.svcs, self.ports):
            assert wait_for(lambda p=port: self._ready(p), 20), f"not ready: {svc.describe()}"
        self.tokens: dict[tuple[str, str], str] = {}

    @staticmethod
    def _ready(port):
        try:
            status, _, body = request(port, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
        except OSError:
            return False
        return status == 200 and "tq" in orjson.loads(body)["services"]

    def get(self, subject: str | None, tenant: str | None = None, gw: int = 0):
        """GET PATH as `subject` of `tenant` (DPoP-bound token, a fresh proof), or
        anonymously when subject is None."""
        head = b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
        if subject is not None:
            token = self.tokens.get((subject, tenant))
            if token is None:
                token = self.tokens[subject, tenant] = self.authority.mint(
                    scopes=["scans:read"], tenant=tenant, subject=subject,
                    jkt=self.key.thumbprint())
            proof = self.key.proof("GET", ORIGIN + PATH, access_token=token)
            head += b"Authorization: DPoP " + token.encode() + b"\r\nDPoP: " + proof.encode() + b"\r\n"
        return request(self.ports[gw], head + b"\r\n")

    def metrics(self, gw: int = 0) -> str:
        return request(self.ports[gw], b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()

    def close(self):
        for svc in self.svcs:
            svc.stop()
        for gw in self.gws:
            gw.stop()
        self.authority.stop()


@pytest.fixture
def stack(tmp_path):
    made = []

    def make(*args):
        s = Stack(tmp_path, *args)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def statuses(responses):
    return [status for status, _, _ in responses]


def test_instance_tier_tenant_quota_through_the_gateway(stack):
    st = stack(INSTANCE, "for_instance", 1)
    # The service sees who asked: the tenant travels in the identity headers.
    status, _, body = st.get("alice", "acme")
    assert status == 200 and orjson.loads(body)["headers"]["x-stellaops-tenant"] == "acme"
    # acme, all of its identities together: 3 a minute.
    got = [st.get("alice", "acme"), st.get("bob", "acme"), st.get("carol", "acme")]
    assert statuses(got) == [200, 200, 429]
    _, headers, body = got[2]
    assert headers["x-ratelimit-limit"] == "3" and headers["x-ratelimit-remaining"] == "0"
    assert headers["x-ratelimit-policy"] == "3;w=60;scope=instance;applies-to=tenant"
    assert int(headers["retry-after"]) >= 1
    err = orjson.loads(body)["error"]
    assert (err["code"], err["scope"], err["appliesTo"], err["limit"], err["window"],
            err["rule"]) == ("rate_limit_exceeded", "instance", "tenant", 3, 60,
                             "rate_limiting.for_instance.tenant_rules[0]")
    assert err["trace_id"] and err["retryAfter"] == int(headers["retry-after"])
    # Tenant B, with the very same subjects: untouched by A's exhausted quota.
    assert statuses([st.get(u, "umbrella") for u in ("alice", "bob", "carol")]) == [200] * 3
    # globex is on plan gold: 6 a minute.
    got = [st.get(u, "globex") for u in "abcdefg"]
    assert statuses(got) == [200] * 6 + [429]
    assert orjson.loads(got[6][2])["error"]["rule"] == \
        "rate_limiting.plans.gold.for_instance.tenant_rules[0]"
    # An allowed response's X-RateLimit-* describe the tighter of the two rules.
    _, headers, _ = st.get("dave", "initech")
    assert (headers["x-ratelimit-limit"], headers["x-ratelimit-remaining"]) == ("3", "2")
    # Anonymous clients keep their per-address key (only the identity rule: 100).
    assert statuses([st.get(None) for _ in range(4)]) == [200] * 4
    metrics = st.metrics()
    assert 'gateway_rate_limit_exceeded_total{tenant="acme"} 1.0' in metrics
    assert 'gateway_rate_limit_exceeded_total{tenant="globex"} 1.0' in metrics


def test_environment_tier_tenant_quota_across_two_gateways(stack, tmp_path):
    valkey = ValkeyProcess().start()
    try:
        st = stack(ENVIRONMENT.format(valkey=valkey.url), "for_environment", 2)
        # acme, across both instances: 3 a minute for the tenant as a whole.
        got = [st.get(u, "acme", gw=i % 2) for i, u in enumerate(("alice", "bob", "alice",
                                                                  "carol"))]
        assert statuses(got) == [200, 200, 200, 429]
        _, headers, body = got[3]
        assert headers["x-ratelimit-policy"] == "3;w=60;scope=environment;applies-to=tenant"
        err = orjson.loads(body)["error"]
        assert (err["scope"], err["appliesTo"], err["limit"], err["current"], err["window"],
                err["rule"]) == ("environment", "tenant", 3, 3, 60,
                                 "rate_limiting.for_environment.tenant_rules[0]")
        assert st.get("dave", "acme", gw=0)[0] == 429       # either instance refuses it
        # Another tenant: untouched; globex on gold: 6 across both instances.
        assert statuses([st.get(u, "umbrella", gw=i % 2)
                         for i, u in enumerate(("alice", "bob", "carol"))]) == [200] * 3
        got = [st.get(u, "globex", gw=i % 2) for i, u in enumerate("abcdefg")]
        assert statuses(got) == [200] * 6 + [429]
        assert orjson.loads(got[6][2])["error"]["rule"] == \
            "rate_limiting.plans.gold.for_environment.tenant_rules[0]"
        # Anonymous: the per-address key, the identity rule only.
        assert statuses([st.get(None, gw=i % 2) for i in range(4)]) == [200] * 4
        # The counters in Valkey: tagged by the tenant, "<tenant>/*" for the tenant's own.
        keys = {k.rsplit(b":", 2)[0] for k in valkey.command("KEYS", "*")}
        assert {b"{stella-router-rate-limit:acme}/*:tq:*",
                b"{stella-router-rate-limit:acme}/sub:alice:tq:*",
                b"{stella-router-rate-limit:globex}/*:tq:*",
                b"{stella-router-rate-limit:ip:127.0.0.1}:tq:*"} <= keys
    finally:
        valkey.close()


REPLAY_CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0, publicOrigin: "{origin}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
    replayCache: {{valkey: "{valkey}", onValkeyError: local}}
rate_limiting:
  for_instance:
    rules: [{{max_requests: 100, per_seconds: 60}}]
    tenant_rules: [{{max_requests: 2, per_seconds: 60}}]
"""


def test_tenant_quota_holds_for_requests_in_flight_when_the_replay_cache_fails(tmp_path):
    """docs/security.md §3d row 33: with the DPoP replay cache in Valkey and
    `onValkeyError: local`, the requests waiting on Valkey when it failed went on without
    their tenant (set only for an answer authentication had at once): counted as tenantless
    identities, past the tenant's quota. A frozen Valkey holds every request for the
    replay timeout, so a burst then was let through whole."""
    import os
    import signal
    import threading

    valkey = ValkeyProcess().start()
    authority = DevAuthority(port=0).start_in_thread()
    gw = svc = None
    stopped = False
    try:
        gw = Served(config_text=REPLAY_CONFIG.format(origin=ORIGIN, issuer=authority.issuer,
                                                     valkey=valkey.url), tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, "/t/rl/hits", timeout=15)
        key = DpopKey.generate()
        token = authority.mint(scopes=["scans:read"], tenant="acme", subject="alice",
                               jkt=key.thumbprint())
        path = "/t/rl/hit/burst"

        def raw():
            proof = key.proof("GET", ORIGIN + path, access_token=token)
            return (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP "
                    + token.encode() + b"\r\nDPoP: " + proof.encode() + b"\r\n\r\n")

        burst = [raw() for _ in range(8)]
        os.kill(valkey.proc.pid, signal.SIGSTOP)     # every check now waits for the timeout
        stopped = True
        answers = [None] * len(burst)

        def send(i):
            answers[i] = request(port, burst[i])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(burst))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        statuses = sorted(a[0] for a in answers)
        assert statuses == [200, 200] + [429] * 6, statuses
        for status, _, body in answers:
            if status == 429:
                assert orjson.loads(body)["error"]["appliesTo"] == "tenant"
        seen = orjson.loads(request(port, b"GET /t/rl/hits HTTP/1.1\r\nHost: gw\r\n\r\n")[2])
        assert seen["hits"] == [path, path]
    finally:
        if stopped:
            os.kill(valkey.proc.pid, signal.SIGCONT)
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        authority.stop()
        valkey.close()


MANY_TENANTS_CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0, publicOrigin: "{origin}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
rate_limiting:
  for_instance:
    tenant_rules: [{{max_requests: 1, per_seconds: 60}}]
"""


def test_the_rate_limited_metric_names_a_bounded_number_of_tenants(tmp_path):
    """docs/security.md §3d row 34: gateway_rate_limit_exceeded_total is labelled by tenant,
    and a worker kept one series per tenant ever refused, for ever. Past MAX_TENANT_LABELS
    (1000) a worker counts new tenants under `_other`."""
    from tests.support.gwtest import connect, read_response

    authority = DevAuthority(port=0).start_in_thread()
    gw = svc = None
    try:
        gw = Served(config_text=MANY_TENANTS_CONFIG.format(origin=ORIGIN,
                                                           issuer=authority.issuer),
                    tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, "/t/rl/hits", timeout=15)
        key = DpopKey.generate()
        path = "/t/rl/hit/t"
        tenants = 1005
        statuses = {}
        with connect(port, timeout=10) as s:
            buf = bytearray()
            for i in range(tenants):
                token = authority.mint(scopes=["scans:read"], tenant=f"tenant-{i}",
                                       subject="alice", jkt=key.thumbprint())
                for _ in range(2):          # the second one is refused: 429
                    proof = key.proof("GET", ORIGIN + path, access_token=token)
                    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
                              b"Authorization: DPoP " + token.encode() + b"\r\nDPoP: "
                              + proof.encode() + b"\r\n\r\n")
                    status = read_response(s, buf)[0]
                    statuses[status] = statuses.get(status, 0) + 1
        assert statuses == {200: tenants, 429: tenants}
        seen = orjson.loads(request(port, b"GET /t/rl/hits HTTP/1.1\r\nHost: gw\r\n\r\n")[2])
        assert len(seen["hits"]) == tenants
        metrics = request(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
        series = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                  for line in metrics.splitlines()
                  if line.startswith("gateway_rate_limit_exceeded_total{")}
        assert len(series) == 1001
        assert series['gateway_rate_limit_exceeded_total{tenant="_other"}'] == tenants - 1000
        assert sum(series.values()) == tenants
    finally:
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        authority.stop()
