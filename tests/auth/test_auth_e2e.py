"""Authentication, identity, authorization and rate limiting through the real gateway:
the development Authority mints real tokens, the DPoP client signs real proofs."""
from __future__ import annotations

import socket
import ssl
import time

import orjson
import pytest

from stellagw.devauth import DevAuthority, DpopKey
from stellagw.devauth.client import call, fetch_token

from tests.support.gwtest import Pki, Served, connect, port_of, read_response, request, wait_for
from tests.support.services import ServiceProcess, stop_services

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0, publicOrigin: "{origin}"{tls}}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
    audiences: [stellaops-gateway]
    required: {required}
rate_limiting:
  for_instance:
    rules: [{{max_requests: {limit}, per_seconds: 60}}]
"""


class AuthStack:
    def __init__(self, tmp_path, required="false", limit=1000, tls=None, pki=None):
        self.authority = DevAuthority(port=0).start_in_thread()
        self.issuer = self.authority.issuer
        # The public origin must be known before the port is: pick a free port first.
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        scheme = "https" if tls else "http"
        text = CONFIG.format(origin=f"{scheme}://127.0.0.1:{port}", issuer=self.issuer,
                             required=required, limit=limit, tls=tls or "").replace(
            "port: 0, publicOrigin", f"port: {port}, publicOrigin")
        self.gw = Served(config_text=text, tmp_path=tmp_path)
        rec = self.gw.wait_listening()[0]
        self.http, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])
        self.base = f"{scheme}://127.0.0.1:{self.http}"
        self.client_ssl = pki.client_context() if tls else None
        self.procs = [ServiceProcess("sec", self.tcp).start()]
        assert wait_for(self._ready, 20), f"gateway or service not ready: {self.procs[0].describe()}"
        self.key = DpopKey.generate()

    def _ready(self):
        try:
            status, _, body = self.get_raw(b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
        except OSError:
            return False
        return status == 200 and "sec" in orjson.loads(body)["services"]

    def get_raw(self, raw):
        if self.client_ssl is None:
            return request(self.http, raw)
        with socket.create_connection(("127.0.0.1", self.http), timeout=5) as sock:
            with self.client_ssl.wrap_socket(sock, server_hostname="localhost") as s:
                s.sendall(raw)
                return read_response(s)

    def token(self, scope="scans:read", key=None, **kw):
        key = key or self.key
        return fetch_token(self.authority.token_endpoint, "demo-client", "demo-secret", scope,
                           dpop_key=key, **kw)["access_token"]

    def close(self):
        stop_services(self.procs)
        self.gw.stop()
        self.authority.stop()


@pytest.fixture
def stack(tmp_path):
    made = []

    def make(**kw):
        s = AuthStack(tmp_path, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_dpop_bound_token_reaches_the_service_with_gateway_identity_headers(stack):
    st = stack()
    token = st.token()
    status, headers, body = call(st.base + "/t/sec/secure", token=token, dpop_key=st.key,
                                 headers={"X-StellaOps-Tenant": "spoofed", "X-Stella-Actor": "mallory"})
    assert status == 200, body
    seen = orjson.loads(body)
    assert seen["x-stellaops-tenant"] == "tenant-1"          # from the token, not the client
    assert seen["x-stellaops-actor"] == "demo-client"
    assert "scans:read" in seen["x-stellaops-scopes"].split()
    assert "mallory" not in body.decode()


def test_an_endpoint_that_needs_a_sender_constrained_token(stack):
    st = stack()
    bearer = fetch_token(st.authority.token_endpoint, "demo-client", "demo-secret",
                         "scans:read")["access_token"]
    head = b"Host: gw\r\nAuthorization: Bearer " + bearer.encode() + b"\r\n\r\n"
    # An unbound Bearer token passes where the endpoint does not ask for more ...
    assert request(st.http, b"GET /t/sec/secure HTTP/1.1\r\n" + head)[0] == 200
    # ... and is refused where it does (HELLO sender_constrained), on the head.
    status, headers, body = request(st.http, b"GET /t/sec/bound HTTP/1.1\r\n" + head)
    error = orjson.loads(body)["error"]
    assert status == 401 and error["code"] == "invalid_token"
    assert "sender-constrained" in error["message"] and "www-authenticate" in headers
    token = st.token()
    status, _, body = call(st.base + "/t/sec/bound", token=token, dpop_key=st.key)
    assert status == 200 and orjson.loads(body)["x-stellaops-actor"] == "demo-client"


def test_refusals(stack):
    st = stack()
    # No token on an endpoint that requires a scope: 401 with a challenge.
    status, headers, body = request(st.http, b"GET /t/sec/secure HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 401 and "DPoP" in headers["www-authenticate"]
    assert orjson.loads(body)["error"]["code"]
    # Anonymous is fine where no claim is required (auth.required: false).
    assert request(st.http, b"GET /t/sec/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
    # A token without the scope the endpoint needs: 403.
    token = st.token()
    status, _, body = call(st.base + "/t/sec/admin", token=token, dpop_key=st.key)
    assert status == 403
    # A DPoP-bound token used as a Bearer token: 401.
    status, _, _ = request(st.http, b"GET /t/sec/secure HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer "
                           + token.encode() + b"\r\n\r\n")
    assert status == 401
    # A proof signed by another key than the one the token is bound to: 401.
    other = DpopKey.generate()
    status, _, _ = call(st.base + "/t/sec/secure", token=token, dpop_key=other)
    assert status == 401
    # A replayed proof: 401 the second time.
    proof = st.key.proof("GET", st.base + "/t/sec/secure", access_token=token)
    raw = (b"GET /t/sec/secure HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP " + token.encode() +
           b"\r\nDPoP: " + proof.encode() + b"\r\n\r\n")
    assert request(st.http, raw)[0] == 200
    status, headers, _ = request(st.http, raw)
    assert status == 401 and "invalid_dpop_proof" in headers["www-authenticate"]
    # Failures are counted by reason.
    metrics = request(st.http, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
    assert "gateway_auth_failures_total{" in metrics


def test_required_auth_refuses_anonymous_everywhere_but_builtins(stack):
    st = stack(required="true")
    assert request(st.http, b"GET /t/sec/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 401
    assert request(st.http, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
    token = st.token()
    assert call(st.base + "/t/sec/whoami", token=token, dpop_key=st.key)[0] == 200


def test_rate_limit_per_identity_answers_429_with_retry_after(stack):
    st = stack(limit=3)
    token = st.token()
    statuses = [call(st.base + "/t/sec/secure", token=token, dpop_key=st.key)
                for _ in range(4)]
    assert [s for s, _, _ in statuses] == [200, 200, 200, 429]
    _, headers, body = statuses[3]
    assert int(headers["Retry-After"]) >= 1 and headers["X-RateLimit-Limit"] == "3"
    err = orjson.loads(body)["error"]
    assert err["code"] == "rate_limit_exceeded" and err["limit"] == 3
    assert statuses[0][1]["X-RateLimit-Remaining"] == "2"
    # Another identity (anonymous, by address) has its own window.
    assert request(st.http, b"GET /t/sec/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
    metrics = request(st.http, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
    assert 'gateway_rate_limit_exceeded_total{tenant="tenant-1"} 1.0' in metrics


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def test_mtls_bound_token_over_https(stack, pki):
    tls = (f", tls: {{enabled: true, certificatePath: {pki.server_cert}, keyPath: {pki.server_key},"
           f" clientCertificateMode: AllowCertificate, clientCaPath: {pki.ca_path}}}")
    st = stack(tls=tls, pki=pki)
    # A token bound to the client certificate: minted directly with its x5t#S256.
    import base64
    import hashlib
    x5t = base64.urlsafe_b64encode(hashlib.sha256(pki.client_cert_der).digest()).rstrip(b"=").decode()
    token = st.authority.mint(scopes=["scans:read"], x5t=x5t)
    with_cert = pki.client_context(with_cert=True)
    status, _, body = call(st.base + "/t/sec/secure", token=token, ssl=with_cert)
    assert status == 200, body
    # The same token over a connection without that certificate is refused.
    status, _, _ = call(st.base + "/t/sec/secure", token=token, ssl=pki.client_context())
    assert status == 401


def test_websocket_upgrade_is_authenticated_with_its_dpop_proof(stack):
    import asyncio

    from picows import WSInvalidStatusError, WSListener, WSMsgType, ws_connect
    st = stack(required="true")
    got = []

    class Client(WSListener):
        def on_ws_frame(self, transport, frame):
            got.append(frame.get_payload_as_bytes())

    async def main():
        with pytest.raises(WSInvalidStatusError):   # no token: the upgrade is refused (401)
            await ws_connect(Client, f"ws://127.0.0.1:{st.http}/t/sec/ws")
        token = st.token()
        proof = st.key.proof("GET", st.base + "/t/sec/ws", access_token=token)
        transport, _ = await ws_connect(Client, f"ws://127.0.0.1:{st.http}/t/sec/ws",
                                        extra_headers={"Authorization": f"DPoP {token}",
                                                       "DPoP": proof})
        transport.send(WSMsgType.TEXT, b"authenticated")
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
        transport.disconnect()
    asyncio.run(main())
    assert got == [b"authenticated"]


def test_replayed_proof_is_caught_by_a_second_instance_sharing_valkey(tmp_path):
    from tests.support.valkey_server import ValkeyProcess
    valkey = ValkeyProcess().start()
    authority = DevAuthority(port=0).start_in_thread()
    gws, svcs = [], []
    origin = "http://gw.example.test"   # both instances sit behind one public name
    try:
        for node in ("gw-a", "gw-b"):
            d = tmp_path / node
            d.mkdir()
            gw = Served(config_text=f"""
gateway:
  node: {{nodeId: {node}}}
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0, publicOrigin: "{origin}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{authority.issuer}"
    replayCache: {{valkey: "{valkey.url}"}}
""", tmp_path=d)
            rec = gw.wait_listening()[0]
            gws.append((gw, port_of(rec["http"])))
            svcs.append(ServiceProcess("rp", port_of(rec["tcp"])).start())
        for svc, (_, port) in zip(svcs, gws):
            svc.wait_routable(port, timeout=15)
        key = DpopKey.generate()
        token = fetch_token(authority.token_endpoint, "demo-client", "demo-secret", "scans:read",
                            dpop_key=key)["access_token"]
        proof = key.proof("GET", origin + "/t/rp/secure", access_token=token)
        raw = (b"GET /t/rp/secure HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP " + token.encode() +
               b"\r\nDPoP: " + proof.encode() + b"\r\n\r\n")
        assert request(gws[0][1], raw)[0] == 200
        status, headers, _ = request(gws[1][1], raw)     # the same proof at the other instance
        assert status == 401 and "invalid_dpop_proof" in headers["www-authenticate"]
    finally:
        stop_services(svcs)
        for gw, _ in gws:
            gw.stop()
        authority.stop()
        valkey.close()


def test_tenant_required_and_project_header(stack):
    st = stack()
    # A token without a tenant on an endpoint that declares a tenant claim: 403 TENANT_REQUIRED.
    token = st.authority.mint(scopes=["scans:read"], jkt=st.key.thumbprint(),
                              extra_claims={"stellaops:tenant": None, "tid": None,
                                            "stellaops:project": "proj-9"})
    status, _, body = call(st.base + "/t/sec/tenanted", token=token, dpop_key=st.key)
    assert status == 403 and orjson.loads(body)["error"]["code"] == "TENANT_REQUIRED"
    # The project claim travels as X-StellaOps-Project.
    status, _, body = call(st.base + "/t/sec/secure", token=token, dpop_key=st.key)
    assert status == 200 and orjson.loads(body)["x-stellaops-project"] == "proj-9"


def test_log_lines_say_the_auth_outcome_and_never_carry_credentials(stack):
    st = stack()
    token = st.token()
    assert call(st.base + "/t/sec/secure", token=token, dpop_key=st.key)[0] == 200
    assert request(st.http, b"GET /t/sec/secure HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 401
    proof = st.key.proof("GET", st.base + "/t/sec/secure", access_token=token)
    assert request(st.http, b"GET /t/sec/whoami HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP " + token.encode()
                   + b"\r\nDPoP: " + proof.encode() + b"\r\n\r\n")[0] == 401  # htu mismatch

    def logged():
        recs = [orjson.loads(x) for x in st.gw.lines if x.startswith(b"{")]
        return [r for r in recs if r.get("path", "").startswith("/t/sec/")]
    assert wait_for(lambda: len(logged()) >= 3, 5)
    outcomes = [r["auth"] for r in logged()]
    assert outcomes[:3] == ["dpop", "refused:missing_token", outcomes[2]]
    assert outcomes[2].startswith("refused:")
    text = b"\n".join(st.gw.lines)
    assert token.encode() not in text and proof.encode() not in text
    assert token.split(".")[2].encode() not in text


def test_a_lone_surrogate_in_an_identity_claim_is_refused_not_an_internal_error(stack):
    """docs/security.md §3d row 35: a token whose JSON escapes a lone surrogate in `sub` or
    the tenant (`"\\ud800"`) passed the claim checks, then failed to encode: a 500 and an
    error line a request, for whoever holds such a token. Now 401 token_claims; nothing
    reaches the service."""
    st = stack()
    path = "/t/sec/hit/s"
    for claims in ({"subject": "\ud800"}, {"tenant": "t\udfff"}, {"subject": "a\ud83d"}):
        token = st.authority.mint(scopes=["scans:read"], jkt=st.key.thumbprint(), **claims)
        status, headers, body = call(st.base + path, token=token, dpop_key=st.key)
        assert status == 401, body
        assert orjson.loads(body)["error"]["code"] == "invalid_token"
        assert 'error="invalid_token"' in headers["www-authenticate"]
    seen = orjson.loads(request(st.http, b"GET /t/sec/hits HTTP/1.1\r\nHost: gw\r\n\r\n")[2])
    assert seen["hits"] == []
    # A well-formed token still goes through.
    token = st.authority.mint(scopes=["scans:read"], jkt=st.key.thumbprint(), subject="s\u00e9")
    assert call(st.base + path, token=token, dpop_key=st.key)[0] == 200
