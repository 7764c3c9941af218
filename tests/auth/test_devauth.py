"""The development Authority (stellagw.devauth) against a real loopback server.

Tokens and proofs are checked independently of our own code where it matters: signatures
with PyJWT against the published JWKS, thumbprints recomputed from the key's public
numbers, certificate thumbprints with hashlib, and the RFC test vectors.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlencode, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stellagw.devauth import (Authority, DevAuthority, DpopKey, TokenRequestError, call,
                              discover, fetch_token, jwk_thumbprint, premint)
from stellagw.devauth import cli as devcli
from stellagw.devauth import pki
from stellagw.devauth.jose import ProofError, access_token_hash, verify_proof

SECRET = "demo-secret"


def _b64(data: bytes) -> str:  # independent of stellagw.devauth.jose
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _get_json(url: str, ctx=None) -> dict:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def _post(url: str, form: dict | str, headers=(), ctx=None) -> tuple[int, dict, dict]:
    """Raw POST with http.client so tests can send repeated headers."""
    parts = urlsplit(url)
    conn = (http.client.HTTPSConnection(parts.hostname, parts.port, context=ctx, timeout=5)
            if parts.scheme == "https" else
            http.client.HTTPConnection(parts.hostname, parts.port, timeout=5))
    body = (form if isinstance(form, str) else urlencode(form)).encode()
    conn.putrequest("POST", parts.path)
    conn.putheader("Content-Type", "application/x-www-form-urlencoded")
    conn.putheader("Content-Length", str(len(body)))
    for k, v in headers:
        conn.putheader(k, v)
    conn.endheaders(body)
    resp = conn.getresponse()
    data, rheaders = resp.read(), {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return resp.status, rheaders, json.loads(data) if data else {}


def _form(**kw) -> dict:
    return {"grant_type": "client_credentials", "client_id": "demo-client",
            "client_secret": SECRET, **kw}


def _verify_token(auth, token: str) -> dict:
    """Verify an access token with PyJWT against the JWKS the server publishes."""
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "at+jwt"
    jwks = _get_json(auth.jwks_uri)
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    return jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[jwk["alg"]],
                      audience="stellaops-gateway", issuer=auth.issuer)


def _independent_jkt(key: DpopKey) -> str:
    pub = key.private_key.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        n = pub.public_numbers()
        canon = (f'{{"crv":"P-256","kty":"EC","x":"{_b64(n.x.to_bytes(32, "big"))}",'
                 f'"y":"{_b64(n.y.to_bytes(32, "big"))}"}}')
    else:
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        canon = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64(raw)}"}}'
    return _b64(hashlib.sha256(canon.encode()).digest())


@pytest.fixture(scope="module")
def auth():
    server = DevAuthority(port=0).start_in_thread()
    yield server
    server.stop()


# -- discovery and JWKS -----------------------------------------------------------------------
def test_discovery_document(auth):
    doc = _get_json(auth.issuer + "/.well-known/openid-configuration")
    assert doc["issuer"] == auth.issuer == f"http://127.0.0.1:{auth.port}"
    assert doc["jwks_uri"] == auth.issuer + "/jwks"
    assert doc["token_endpoint"] == auth.issuer + "/token"
    assert set(doc["dpop_signing_alg_values_supported"]) == {"ES256", "EdDSA"}
    assert "client_secret_post" in doc["token_endpoint_auth_methods_supported"]
    assert "client_secret_basic" in doc["token_endpoint_auth_methods_supported"]
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert discover(auth.issuer) == doc
    assert _get_json(auth.issuer + "/.well-known/oauth-authorization-server") == doc


def test_jwks_publishes_the_signing_key(auth):
    keys = _get_json(auth.jwks_uri)["keys"]
    active = auth.authority.active_key("ES256")
    jwk = next(k for k in keys if k["kid"] == active.kid)
    assert jwk["use"] == "sig" and jwk["alg"] == "ES256" and jwk["kty"] == "EC"
    assert jwk["crv"] == "P-256"
    assert not {"d", "p", "q"} & set(jwk)
    pub = active.private_key.public_key().public_numbers()
    assert jwk["x"] == _b64(pub.x.to_bytes(32, "big"))
    assert jwk["kid"] == jwk_thumbprint(jwk)


# -- token endpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_token_endpoint_mints_dpop_bound_tokens(auth, alg):
    key = DpopKey.generate(alg)
    doc = fetch_token(auth.token_endpoint, "demo-client", SECRET, "scans:read", dpop_key=key)
    assert doc["token_type"] == "DPoP" and doc["expires_in"] == 300
    assert doc["scope"] == "scans:read"
    claims = _verify_token(auth, doc["access_token"])
    assert claims["cnf"] == {"jkt": _independent_jkt(key)}
    assert key.thumbprint() == _independent_jkt(key)
    assert claims["sub"] == claims["client_id"] == "demo-client"
    assert claims["stellaops:tenant"] == claims["tid"] == "tenant-1"
    assert claims["scope"] == "scans:read"
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 5 and len(claims["jti"]) >= 16


def test_token_without_proof_is_bearer(auth):
    doc = fetch_token(auth.token_endpoint, "demo-client", SECRET)
    assert doc["token_type"] == "Bearer"
    claims = _verify_token(auth, doc["access_token"])
    assert "cnf" not in claims
    assert claims["scope"].split() == ["scans:read", "scans:write", "policies:read"]


def test_client_secret_basic(auth):
    basic = base64.b64encode(b"demo-client:demo-secret").decode()
    status, _, body = _post(auth.token_endpoint, {"grant_type": "client_credentials"},
                            [("Authorization", f"Basic {basic}")])
    assert status == 200 and body["token_type"] == "Bearer"


@pytest.mark.parametrize("client_id,secret", [("demo-client", "wrong"), ("nobody", SECRET),
                                              ("demo-client", "")])
def test_bad_client_credentials_401(auth, client_id, secret):
    status, headers, body = _post(auth.token_endpoint, _form(client_id=client_id,
                                                             client_secret=secret))
    assert status == 401 and body["error"] == "invalid_client"
    assert headers["www-authenticate"].startswith("Basic")
    assert headers["cache-control"] == "no-store"
    with pytest.raises(TokenRequestError) as exc:
        fetch_token(auth.token_endpoint, client_id, secret)
    assert exc.value.status == 401


@pytest.mark.parametrize("form,error", [
    (_form(scope="admin:all"), "invalid_scope"),
    (_form(tenant="tenant-2"), "invalid_request"),
    (_form(grant_type="password"), "unsupported_grant_type"),
    (_form(bind="mtls"), "invalid_request"),          # no TLS client certificate here
    (_form(bind="dpop"), "invalid_dpop_proof"),       # asked for DPoP, sent no proof
    ("grant_type=client_credentials&client_id=demo-client&client_secret=demo-secret"
     "&scope=a&scope=b", "invalid_request"),
])
def test_token_request_errors(auth, form, error):
    status, _, body = _post(auth.token_endpoint, form)
    assert status == 400 and body["error"] == error


def _tampered(proof: str) -> str:
    h, p, s = proof.split(".")
    return f"{h}.{p}.{s[:-4]}{'AAAA' if s[-4:] != 'AAAA' else 'BBBB'}"


def _forged(key: DpopKey, header: dict, claims: dict, signer=None) -> str:
    signing = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = signer(signing.encode()) if signer else key._sign(signing.encode())
    return f"{signing}.{_b64(sig)}"


def _bad_proofs(endpoint: str):
    key = DpopKey.generate()
    now = int(time.time())
    good = {"jti": "j-1", "htm": "POST", "htu": endpoint, "iat": now}
    hdr = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.public_jwk()}
    priv = key.private_key.private_numbers()
    yield "wrong htu", [key.proof("POST", endpoint.replace("/token", "/other"))]
    yield "wrong htm", [key.proof("GET", endpoint)]
    yield "stale iat", [key.proof("POST", endpoint, iat=now - 600)]
    yield "future iat", [key.proof("POST", endpoint, iat=now + 600)]
    yield "bad signature", [_tampered(key.proof("POST", endpoint))]
    yield "typ jwt", [_forged(key, {**hdr, "typ": "JWT"}, good)]
    yield "alg none", [f"{_b64(json.dumps({**hdr, 'alg': 'none'}).encode())}."
                       f"{_b64(json.dumps(good).encode())}.AAAA"]
    yield "HS256", [jwt.encode(good, "s" * 32, algorithm="HS256",
                               headers={"typ": "dpop+jwt", "jwk": key.public_jwk()})]
    yield "private jwk", [_forged(key, {**hdr, "jwk": {**key.public_jwk(),
                                                        "d": _b64(priv.private_value.to_bytes(32, "big"))}}, good)]
    yield "jwk of another key", [_forged(key, {**hdr, "jwk": DpopKey.generate().public_jwk()}, good)]
    yield "missing jti", [_forged(key, hdr, {k: v for k, v in good.items() if k != "jti"})]
    yield "not a JWS", ["not-a-jws"]
    yield "two DPoP headers", [key.proof("POST", endpoint), key.proof("POST", endpoint)]
    yield "comma joined", [key.proof("POST", endpoint) + ", " + key.proof("POST", endpoint)]


@pytest.mark.parametrize("case", [c for c, _ in _bad_proofs("http://x/token")])
def test_bad_dpop_proof_400(auth, case):
    proofs = dict(_bad_proofs(auth.token_endpoint))[case]
    status, headers, body = _post(auth.token_endpoint, _form(), [("DPoP", p) for p in proofs])
    assert status == 400, body
    assert body["error"] == "invalid_dpop_proof"
    assert headers["cache-control"] == "no-store"


def test_replayed_proof_is_rejected(auth):
    key = DpopKey.generate()
    proof = key.proof("POST", auth.token_endpoint)
    assert _post(auth.token_endpoint, _form(), [("DPoP", proof)])[0] == 200
    status, _, body = _post(auth.token_endpoint, _form(), [("DPoP", proof)])
    assert status == 400 and body["error"] == "invalid_dpop_proof"


def test_token_endpoint_nonce_challenge():
    server = DevAuthority(port=0, require_nonce=True).start_in_thread()
    try:
        key = DpopKey.generate()
        status, headers, body = _post(server.token_endpoint, _form(),
                                      [("DPoP", key.proof("POST", server.token_endpoint))])
        assert status == 400 and body["error"] == "use_dpop_nonce" and headers["dpop-nonce"]
        forged = _b64(b"\0" * 24)
        status, _, body = _post(server.token_endpoint, _form(),
                                [("DPoP", key.proof("POST", server.token_endpoint, nonce=forged))])
        assert body["error"] == "use_dpop_nonce"
        doc = fetch_token(server.token_endpoint, "demo-client", SECRET, dpop_key=key)  # retries
        assert doc["token_type"] == "DPoP"
        assert _verify_token(server, doc["access_token"])["cnf"]["jkt"] == key.thumbprint()
    finally:
        server.stop()


# -- mTLS -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = pki.make_ca()
    srv, srv_key = pki.issue_cert(ca, ca_key, "localhost", dns=["localhost"], ips=["127.0.0.1"])
    cli, cli_key = pki.issue_cert(ca, ca_key, "demo-client", client_id="demo-client")
    files = {"ca": pki.write_pem(str(d / "ca.pem"), ca),
             "server": pki.write_pem(str(d / "server.pem"), srv, srv_key),
             "client": pki.write_pem(str(d / "client.pem"), cli, cli_key)}
    files["client_der"] = cli.public_bytes(serialization.Encoding.DER)
    return files


def test_mtls_bound_token(tls_files):
    mtls = pki.server_context(tls_files["server"], client_ca=tls_files["ca"])
    server = DevAuthority(port=0, mtls_ssl=mtls).start_in_thread()
    try:
        doc = discover(server.issuer)
        assert doc["tls_client_certificate_bound_access_tokens"] is True
        endpoint = doc["mtls_endpoint_aliases"]["token_endpoint"]
        assert endpoint == f"https://127.0.0.1:{server.mtls_port}/token"
        ctx = pki.client_context(tls_files["ca"], tls_files["client"])
        tok = fetch_token(endpoint, "demo-client", SECRET, "scans:read", ssl=ctx, bind="mtls")
        assert tok["token_type"] == "Bearer"
        claims = _verify_token(server, tok["access_token"])
        expected = _b64(hashlib.sha256(tls_files["client_der"]).digest())
        assert claims["cnf"] == {"x5t#S256": expected}
        # DPoP and mTLS together: both confirmations
        key = DpopKey.generate()
        both = fetch_token(endpoint, "demo-client", SECRET, dpop_key=key, ssl=ctx, bind="mtls")
        assert _verify_token(server, both["access_token"])["cnf"] == {
            "x5t#S256": expected, "jkt": key.thumbprint()}
        # a proof made for the plain endpoint does not fit the mTLS alias
        status, _, body = _post(endpoint, _form(bind="mtls"),
                                [("DPoP", key.proof("POST", server.token_endpoint))], ctx=ctx)
        assert status == 400 and body["error"] == "invalid_dpop_proof"
        # no client certificate on the TLS session -> no certificate binding
        anon = pki.client_context(tls_files["ca"])
        status, _, body = _post(endpoint, _form(bind="mtls"), ctx=anon)
        assert status == 400 and body["error"] == "invalid_request"
    finally:
        server.stop()


def test_https_issuer(tls_files):
    tls = pki.server_context(tls_files["server"])
    server = DevAuthority(port=0, ssl=tls).start_in_thread()
    try:
        assert server.issuer.startswith("https://127.0.0.1:")
        ctx = pki.client_context(tls_files["ca"])
        assert discover(server.issuer, ssl=ctx)["token_endpoint"] == server.token_endpoint
        key = DpopKey.generate()
        doc = fetch_token(server.token_endpoint, "demo-client", SECRET, dpop_key=key, ssl=ctx)
        assert doc["token_type"] == "DPoP"
    finally:
        server.stop()


# -- keys -------------------------------------------------------------------------------------
def test_rotation_keeps_the_old_kid():
    server = DevAuthority(port=0, admin=True).start_in_thread()
    try:
        old_kid = server.authority.active_key().kid
        old_token = fetch_token(server.token_endpoint, "demo-client", SECRET)["access_token"]
        new_kid = server.rotate()
        assert new_kid != old_kid
        kids = [k["kid"] for k in _get_json(server.jwks_uri)["keys"]]
        assert kids == [old_kid, new_kid]
        new_token = fetch_token(server.token_endpoint, "demo-client", SECRET)["access_token"]
        assert jwt.get_unverified_header(new_token)["kid"] == new_kid
        _verify_token(server, old_token)
        _verify_token(server, new_token)
        status, _, body = _post(server.issuer + "/admin/rotate", {})
        assert status == 200
        assert [k["kid"] for k in _get_json(server.jwks_uri)["keys"]] == [old_kid, new_kid,
                                                                          body["kid"]]
    finally:
        server.stop()


def test_admin_rotate_is_off_by_default(auth):
    assert _post(auth.issuer + "/admin/rotate", {})[0] == 404


def test_key_file_persists_and_rotates(tmp_path):
    path = str(tmp_path / "keys.pem")
    first = Authority("http://i", key_file=path)
    kid = first.active_key().kid
    assert Authority("http://i", key_file=path).active_key().kid == kid
    assert devcli.main(["dev-authority", "--rotate", "--key-file", path]) == 0
    again = Authority("http://i", key_file=path, rs256=True)
    assert [k.alg for k in again.keys] == ["ES256", "ES256", "RS256"]
    assert again.keys[0].kid == kid and again.active_key().kid != kid
    assert len(Authority("http://i", key_file=path).keys) == 3


def test_rs256_key_and_mint_api():
    auth = Authority("http://issuer.test", rs256=True, lifetime=120)
    jwks = {k["kid"]: k for k in auth.jwks()["keys"]}
    assert {k["alg"] for k in jwks.values()} == {"ES256", "RS256"}
    tok = auth.mint("demo-client", ["scans:read"], "tenant-9", jkt="abc", alg="RS256",
                    extra_claims={"roles": ["x"], "tid": None})
    hdr = jwt.get_unverified_header(tok)
    assert hdr["alg"] == "RS256" and hdr["typ"] == "at+jwt"
    claims = jwt.decode(tok, jwt.PyJWK(jwks[hdr["kid"]]).key, algorithms=["RS256"],
                        audience="stellaops-gateway", issuer="http://issuer.test")
    assert claims["cnf"] == {"jkt": "abc"} and claims["stellaops:tenant"] == "tenant-9"
    assert "tid" not in claims and claims["roles"] == ["x"]
    assert claims["exp"] - claims["iat"] == 120
    # negative-test helpers
    assert jwt.get_unverified_header(auth.mint(alg="none"))["alg"] == "none"
    assert "typ" not in jwt.get_unverified_header(auth.mint(typ=None))
    expired = auth.mint(lifetime=-60, x5t="t")
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, jwt.PyJWK(auth.active_key().public_jwk()).key, algorithms=["ES256"],
                   audience="stellaops-gateway")
    with pytest.raises(ValueError):
        auth.mint(kid="nope")


def test_clients_file(tmp_path):
    path = tmp_path / "clients.yaml"
    path.write_text("clients:\n  svc:\n    secret: s3\n    scopes: a b\n    tenant: t1\n"
                    "    tenants: [t1, t2]\n    audience: other-aud\n")
    server = DevAuthority(port=0, clients=devauth_load(path)).start_in_thread()
    try:
        status, _, body = _post(server.token_endpoint, {"grant_type": "client_credentials",
                                                        "client_id": "svc", "client_secret": "s3",
                                                        "tenant": "t2"})
        assert status == 200
        claims = jwt.decode(body["access_token"], options={"verify_signature": False})
        assert claims["aud"] == "other-aud" and claims["tid"] == "t2" and claims["scope"] == "a b"
        assert _post(server.token_endpoint, _form())[0] == 401   # demo client not configured
    finally:
        server.stop()


def devauth_load(path):
    from stellagw.devauth import load_clients
    return load_clients(str(path))


# -- proofs and vectors -----------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_proof_has_rfc9449_fields(alg):
    key = DpopKey.generate(alg)
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    proof = key.proof("GET", "https://api.example/v1/scans?x=1#frag", access_token=token,
                      nonce="n-1")
    header = jwt.get_unverified_header(proof)
    assert header["typ"] == "dpop+jwt" and header["alg"] == alg
    assert header["jwk"] == key.public_jwk() and "d" not in header["jwk"]
    claims = jwt.decode(proof, jwt.PyJWK(header["jwk"]).key, algorithms=[alg])
    assert claims["htm"] == "GET"
    assert claims["htu"] == "https://api.example/v1/scans"
    assert abs(claims["iat"] - time.time()) < 5
    assert claims["ath"] == _b64(hashlib.sha256(token.encode()).digest())
    assert claims["ath"] == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"  # RFC 9449 §7.1
    assert claims["nonce"] == "n-1" and len(claims["jti"]) >= 16
    assert "ath" not in jwt.decode(key.proof("GET", "https://a/"), options={"verify_signature": False})
    fixed = jwt.decode(key.proof("POST", "https://a/b", iat=1562262618, jti="e1j3V_bKic8-LAEB"),
                       options={"verify_signature": False})
    assert fixed["iat"] == 1562262618 and fixed["jti"] == "e1j3V_bKic8-LAEB"
    verify_proof(proof, method="GET", url="https://API.example:443/v1/scans", access_token=token)
    with pytest.raises(ProofError):
        verify_proof(proof, method="GET", url="https://api.example/v1/scans", access_token="other")


def test_premint_gives_distinct_valid_proofs():
    key = DpopKey.generate()
    proofs = premint(50, "POST", "http://gw/x", "tok", key)
    jtis = {jwt.decode(p, jwt.PyJWK(key.public_jwk()).key, algorithms=["ES256"])["jti"]
            for p in proofs}
    assert len(jtis) == 50


def test_rfc7638_thumbprint_vector():
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29",
           "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1"
                "L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h"
                "4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91"
                "CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF4"
                "4-csFCur-kEgU8awapJzKnqDKgw"}
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    # RFC 9449 §7.1 example key -> the cnf.jkt in the RFC's example token
    ec_jwk = {"kty": "EC", "crv": "P-256", "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
              "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}
    assert jwk_thumbprint(ec_jwk) == "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    assert access_token_hash("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU") == \
        "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


# -- call() against a small resource server that demands nonces -------------------------------
class _ResourceServer(BaseHTTPRequestHandler):
    nonce = "rs-nonce-1"
    seen: list = []

    def _answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
        proofs = self.headers.get_all("DPoP") or []
        url = f"http://127.0.0.1:{self.server.server_port}{self.path}"
        status, extra, out = 200, {}, {}
        if scheme != "DPoP" or len(proofs) != 1:
            status, out = 401, {"error": "invalid_token"}
        else:
            hdr = jwt.get_unverified_header(proofs[0])
            claims = jwt.decode(proofs[0], jwt.PyJWK(hdr["jwk"]).key, algorithms=["ES256", "EdDSA"])
            assert claims["htm"] == self.command and claims["htu"] == url.split("?")[0]
            assert claims["ath"] == _b64(hashlib.sha256(token.encode()).digest())
            self.seen.append(claims)
            if claims.get("nonce") != self.nonce:
                status = 401
                extra = {"WWW-Authenticate": 'DPoP error="use_dpop_nonce"', "DPoP-Nonce": self.nonce}
            else:
                out = {"jkt": jwk_thumbprint(hdr["jwk"]), "body": body.decode(),
                       "tenant": jwt.decode(token, options={"verify_signature": False})["tid"]}
        data = json.dumps(out).encode()
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def resource():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ResourceServer)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_call_retries_once_with_the_server_nonce(auth, resource):
    key = DpopKey.generate()
    tok = fetch_token(auth.token_endpoint, "demo-client", SECRET, dpop_key=key)["access_token"]
    _ResourceServer.seen.clear()
    status, headers, body = call(resource + "/v1/scans?limit=1", "POST", {"a": 1}, token=tok,
                                 dpop_key=key)
    assert status == 200, body
    assert json.loads(body) == {"jkt": key.thumbprint(), "body": '{"a": 1}', "tenant": "tenant-1"}
    assert [c.get("nonce") for c in _ResourceServer.seen] == [None, "rs-nonce-1"]
    assert headers["content-type"] == "application/json"
    # the nonce is remembered for the origin: next call needs no retry
    status, _, _ = call(resource + "/v1/other", token=tok, dpop_key=key)
    assert status == 200 and len(_ResourceServer.seen) == 3


def test_cli_call(auth, resource, capsys):
    rc = devcli.main(["call", resource + "/v1/scans", "--authority", auth.issuer, "-v",
                      "-d", '{"x":1}', "--header", "X-Trace: t1"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["body"] == '{"x":1}'
    assert "HTTP 200" in err and "> POST" in err and "Authorization: DPoP" in err
    rc = devcli.main(["call", resource + "/v1/scans", "--authority", auth.issuer, "--no-dpop"])
    assert rc == 1 and "HTTP 401" in capsys.readouterr().err
    rc = devcli.main(["call", resource + "/v1/scans", "--authority", auth.issuer,
                      "--client-secret", "wrong"])
    assert rc == 1 and "invalid_client" in capsys.readouterr().err


def test_cli_dev_authority_refuses_non_loopback(capsys):
    assert devcli.main(["dev-authority", "--host", "0.0.0.0", "--port", "0"]) == 2
    assert "loopback" in capsys.readouterr().err
    assert devcli.main(["nope"]) == 2


def test_cli_dev_authority_serves(tmp_path):
    import subprocess, sys
    proc = subprocess.Popen([sys.executable, "-m", "stellagw.devauth.cli", "dev-authority",
                             "--port", "0", "--key-file", str(tmp_path / "k.pem")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(6)]
        issuer = next(l.split()[-1] for l in lines if l.startswith("issuer:"))
        assert any("demo-client / demo-secret" in l for l in lines)
        assert "DEVELOPMENT ONLY" in lines[0]
        assert _get_json(issuer + "/.well-known/openid-configuration")["issuer"] == issuer
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


# -- async API and HTTP edges -----------------------------------------------------------------
def test_async_context_manager():
    async def main():
        async with DevAuthority(port=0, audience="custom-aud", lifetime=180) as auth:
            loop = asyncio.get_running_loop()
            key = DpopKey.generate()
            doc = await loop.run_in_executor(None, lambda: fetch_token(
                auth.token_endpoint, "demo-client", SECRET, dpop_key=key))
            claims = jwt.decode(doc["access_token"], options={"verify_signature": False})
            return auth.issuer, claims

    issuer, claims = asyncio.run(main())
    assert claims["iss"] == issuer and claims["aud"] == "custom-aud"
    assert claims["exp"] - claims["iat"] == 180


def test_http_edges(auth):
    req = urllib.request.Request(auth.issuer + "/nope")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(auth.token_endpoint, timeout=5)          # GET /token
    assert exc.value.code == 405
    req = urllib.request.Request(auth.token_endpoint, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 400
    import socket
    with socket.create_connection(("127.0.0.1", auth.port), timeout=5) as s:
        s.sendall(b"GET /jwks HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    with socket.create_connection(("127.0.0.1", auth.port), timeout=5) as s:
        s.sendall(b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Length: 999999\r\n\r\n" + b"a" * 70000)
        assert s.recv(100).startswith(b"HTTP/1.1 413")


def test_non_loopback_refused():
    with pytest.raises(ValueError):
        DevAuthority("0.0.0.0", 0)
