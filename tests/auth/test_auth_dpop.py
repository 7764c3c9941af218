"""DPoP at the resource server: one test (or more) per item of docs/security.md §3a.

Each test names the item it covers; each fails if that check is removed from
stellagw/auth/authenticator.py or from the DPoP checks (stellagw/auth/dpop.py: `make test`
runs this file on it compiled and uncompiled).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest

from stellagw.auth import AuthFailure, Identity
from stellagw.auth.dpop import DpopVerifier, normalize_uri
from stellagw.auth.errors import Refusal
from stellagw.auth.jose import jwk_thumbprint

from tests.support.auth import (ISSUER_PLACEHOLDER, NOW, DpopClient, FakeRequest, SigningKey,
                                b64u, b64u_json, dpop_request, make_authenticator, mint_token,
                                random_secret, sign_raw)

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

ORIGIN = "https://gw.example.com"
URL = ORIGIN + "/api/items"


@pytest.fixture(scope="module")
def issuer_key():
    return SigningKey("ES256", kid="as-1")


@pytest.fixture
def auth(tmp_path, issuer_key):
    return make_authenticator(tmp_path, [issuer_key])


@pytest.fixture
def client():
    return DpopClient()


def bound_token(issuer_key, client, **claims):
    return mint_token(issuer_key, ISSUER_PLACEHOLDER, cnf={"jkt": client.jkt}, **claims)


def refused(result, code, reason=None, status=401) -> AuthFailure:
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.code) == (status, code), result
    if reason is not None:
        assert result.reason == reason, result
    return result


def ok(result) -> Identity:
    assert isinstance(result, Identity), result
    return result


# ---------------------------------------------------------------------- RFC 9449 test vectors

RFC_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19"
    ".eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9"
    ".2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA")
RFC_TOKEN = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
RFC_ATH = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
RFC_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC_URL = "https://resource.example.org/protectedresource"
RFC_IAT = 1562262618


def test_rfc9449_figure13_proof_verifies_with_pinned_clock():
    # §3a test vectors: the RFC's own proof, ath and jkt.
    assert b64u(hashlib.sha256(RFC_TOKEN.encode()).digest()) == RFC_ATH
    assert jwk_thumbprint({"kty": "EC", "crv": "P-256",
                           "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
                           "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA"}) == RFC_JKT
    verifier = DpopVerifier(("ES256",), 60, 8192)
    result = verifier.check(RFC_PROOF.encode(), "GET", RFC_URL, RFC_ATH, RFC_JKT, RFC_IAT)
    assert result.jkt == RFC_JKT
    # ... and each binding refuses a change: method, URI, token, key, time.
    for args in [("POST", RFC_URL, RFC_ATH, RFC_JKT, RFC_IAT),
                 ("GET", "https://resource.example.org/other", RFC_ATH, RFC_JKT, RFC_IAT),
                 ("GET", RFC_URL, b64u(hashlib.sha256(b"other").digest()), RFC_JKT, RFC_IAT),
                 ("GET", RFC_URL, RFC_ATH, "x" * 43, RFC_IAT),
                 ("GET", RFC_URL, RFC_ATH, RFC_JKT, RFC_IAT + 3600)]:
        with pytest.raises(Refusal):
            verifier.check(RFC_PROOF.encode(), *args)


def test_happy_path(auth, issuer_key, client):
    identity = ok(auth.authenticate(dpop_request(client, bound_token(issuer_key, client)), ()))
    assert identity.binding == "dpop" and identity.jkt == client.jkt
    assert identity.subject == "user-1" and identity.tenant == "t-1"


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
def test_every_configured_proof_algorithm(auth, issuer_key, alg):
    client = DpopClient(alg)
    ok(auth.authenticate(dpop_request(client, bound_token(issuer_key, client)), ()))


# ---------------------------------------------------------------------- scheme / transport (items 1–3)

def test_item1_more_than_one_authorization_header(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    req = dpop_request(client, token, extra=[(b"authorization", b"DPoP " + token.encode())])
    refused(auth.authenticate(req, ()), "invalid_request", "multiple_authorization", 400)


def test_item1_scheme_is_case_insensitive_and_allows_several_spaces(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    req = dpop_request(client, token)
    req.headers = [(n, b"dpop   " + token.encode() if n == b"authorization" else v)
                   for n, v in req.headers]
    ok(auth.authenticate(req, ()))


def test_item2_dpop_bound_token_sent_as_bearer_is_refused(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    req = dpop_request(client, token)   # a valid proof is even attached
    req.headers = [(n, b"Bearer " + token.encode() if n == b"authorization" else v)
                   for n, v in req.headers]
    failure = refused(auth.authenticate(req, ()), "invalid_token", "dpop_bound_as_bearer")
    # The error is on the scheme the client tried (item 19).
    assert failure.headers.startswith(b'www-authenticate: Bearer error="invalid_token"')


def test_item3_dpop_scheme_without_proof(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    req = FakeRequest("GET", b"/api/items", [(b"authorization", b"DPoP " + token.encode())])
    refused(auth.authenticate(req, ()), "invalid_dpop_proof", "dpop_missing")


def test_dpop_scheme_with_an_unbound_token_is_refused(auth, issuer_key, client):
    token = mint_token(issuer_key, ISSUER_PLACEHOLDER)       # no cnf.jkt
    refused(auth.authenticate(dpop_request(client, token), ()), "invalid_token", "not_dpop_bound")


# ---------------------------------------------------------------------- proof checks (items 4–16)

def test_item4_two_dpop_headers(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    second = client.proof("GET", URL, token)
    req = dpop_request(client, token, extra=[(b"dpop", second.encode())])
    refused(auth.authenticate(req, ()), "invalid_dpop_proof", "dpop_multiple")


def test_item4_comma_joined_dpop_value_counts_as_two(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    joined = client.proof("GET", URL, token) + ", " + client.proof("GET", URL, token)
    refused(auth.authenticate(dpop_request(client, token, proof=joined), ()),
            "invalid_dpop_proof", "dpop_multiple")


@pytest.mark.parametrize("mangle", [
    lambda p: p.rsplit(".", 1)[0],                 # two parts
    lambda p: p + ".extra",                        # four parts
    lambda p: p.replace(".", "=.", 1),             # padding
    lambda p: p[:20] + " " + p[20:],               # whitespace
    lambda p: p[:20] + "+" + p[21:],               # base64, not base64url
    lambda p: "a.b.c",                             # not JSON
    # In the signature a lenient decoder would skip these and the signature would verify:
    lambda p: p + "=",                             # padded signature
    lambda p: p[:-10] + " " + p[-10:],             # space inside the signature
    lambda p: p[:-10] + "*" + p[-10:],             # non-alphabet character inside it
])
def test_item5_malformed_proof(auth, issuer_key, client, mangle):
    token = bound_token(issuer_key, client)
    proof = mangle(client.proof("GET", URL, token))
    failure = refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
                      "invalid_dpop_proof")
    assert failure.reason in ("dpop_malformed", "dpop_multiple")


def test_item5_size_cap_before_parsing(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    huge = client.proof("GET", URL, token, padding="x" * 9000)
    refused(auth.authenticate(dpop_request(client, token, proof=huge), ()),
            "invalid_dpop_proof", "dpop_too_large")
    # before parsing: an oversized proof that is not even a JWS is refused for its size
    for junk in ("x" * 9000, "." * 9000, huge[:4000] + "!" + huge[4000:]):
        refused(auth.authenticate(dpop_request(client, token, proof=junk), ()),
                "invalid_dpop_proof", "dpop_too_large")


@pytest.mark.parametrize("missing", ["jti", "htm", "htu", "iat", "ath"])
def test_item6_required_payload_claims(auth, issuer_key, client, missing):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, drop=(missing,))
    failure = refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
                      "invalid_dpop_proof")
    assert failure.reason in ("dpop_jti", "dpop_claims", "dpop_ath")


@pytest.mark.parametrize("missing, reason", [("typ", "dpop_typ"), ("alg", "dpop_alg"),
                                             ("jwk", "dpop_jwk")])
def test_item6_required_header_members(auth, issuer_key, client, missing, reason):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, drop=(missing,))
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", reason)


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "dpop", "application/jwt"])
def test_item7_typ_must_be_dpop_jwt(auth, issuer_key, client, typ):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, header={"typ": typ})
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_typ")


def test_item8_alg_none(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": client.key.bare_jwk()}
    payload = {"jti": "n1", "htm": "GET", "htu": URL, "iat": int(NOW),
               "ath": b64u(hashlib.sha256(token.encode()).digest())}
    for proof in (f"{b64u_json(header)}.{b64u_json(payload)}.",
                  f"{b64u_json(header)}.{b64u_json(payload)}.AAAA"):
        failure = refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
                          "invalid_dpop_proof")
        assert failure.reason in ("dpop_alg", "dpop_malformed")


def test_item8_hmac_alg_with_the_public_jwk_as_secret(auth, issuer_key, client):
    # Key confusion: sign with HS256 using the JWK's own public bytes as the secret.
    token = bound_token(issuer_key, client)
    jwk = client.key.bare_jwk()
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}
    payload = {"jti": "h1", "htm": "GET", "htu": URL, "iat": int(NOW),
               "ath": b64u(hashlib.sha256(token.encode()).digest())}
    h, p = b64u_json(header), b64u_json(payload)
    mac = hmac.new(json.dumps(jwk).encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    proof = f"{h}.{p}.{b64u(mac)}"
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_alg")


def test_item8_alg_not_on_the_configured_list(tmp_path, issuer_key):
    auth = make_authenticator(tmp_path, [issuer_key], "algorithms: [ES256]")
    client = DpopClient("ES384")
    token = bound_token(issuer_key, client)
    refused(auth.authenticate(dpop_request(client, token), ()), "invalid_dpop_proof", "dpop_alg")
    # The challenge lists what is accepted (item 19).
    failure = auth.authenticate(dpop_request(client, token), ())
    assert b'algs="ES256"' in failure.headers


@pytest.mark.parametrize("alg, key_alg", [("ES256", "RS256"), ("RS256", "ES256"),
                                          ("ES256", "EdDSA"), ("EdDSA", "ES256")])
def test_item8_alg_must_match_the_jwk(auth, issuer_key, alg, key_alg):
    client = DpopClient(key_alg)
    token = bound_token(issuer_key, client)
    # Header says `alg`, the jwk is a `key_alg` key; signed (for real) with the jwk's key.
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": client.key.bare_jwk()}
    payload = {"jti": "m1", "htm": "GET", "htu": URL, "iat": int(NOW),
               "ath": b64u(hashlib.sha256(token.encode()).digest())}
    h, p = b64u_json(header), b64u_json(payload)
    signature = jwt.algorithms.get_default_algorithms()[key_alg].sign(f"{h}.{p}".encode(),
                                                                      client.key.private)
    proof = f"{h}.{p}.{b64u(signature)}"
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_alg_mismatch")


def test_item8_es256_with_a_p384_key(auth, issuer_key):
    client = DpopClient("ES384")
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, header={"alg": "ES256"})
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_alg_mismatch")


def test_item9_bad_signature(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    h, p, s = client.proof("GET", URL, token).split(".")
    raw = bytearray(base64.urlsafe_b64decode(s + "=="))
    raw[5] ^= 1
    proof = f"{h}.{p}.{b64u(bytes(raw))}"
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_signature")


def test_item9_only_the_jwk_key_counts(auth, issuer_key, client):
    # Signed by another key; kid/jku/x5c pointing elsewhere are never consulted.
    other = DpopClient()
    token = bound_token(issuer_key, client)
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client.key.bare_jwk(),
              "kid": "as-1", "jku": "https://evil.example/jwks"}
    payload = {"jti": "o1", "htm": "GET", "htu": URL, "iat": int(NOW),
               "ath": b64u(hashlib.sha256(token.encode()).digest())}
    proof = sign_raw(other.key, header, payload)
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_signature")


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_item10_private_key_in_jwk(auth, issuer_key, member):
    client = DpopClient("RS256" if member in ("p", "q", "dp", "dq", "qi", "oth") else "ES256")
    token = bound_token(issuer_key, client)
    jwk = dict(client.key.bare_jwk())
    jwk[member] = client.key.private_jwk.get(member, "AAAA")
    proof = client.proof("GET", URL, token, header={"jwk": jwk})
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_private_key")


def test_item10_symmetric_jwk(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, header={"jwk": {"kty": "oct", "k": "c2VjcmV0"}})
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_private_key")


def _odd(bits, seed):
    # An RSA modulus as cryptography loads a public one (odd, its top bit set): no need to
    # find primes for a key whose proof is refused before any signature check.
    import random
    return random.Random(seed).getrandbits(bits) | (1 << (bits - 1)) | 1


@pytest.mark.parametrize("bits, e", [
    (3072, (1 << 3000) + 1),       # 5.8 ms a signature check, where 65537 takes 0.06 ms
    (2048, (1 << 31) + 1),
    (16384, 65537),                 # 1 ms a signature check
], ids=["e-3000-bits", "e-2^31+1", "n-16384-bits"])
def test_item9_rsa_proof_keys_that_make_the_signature_check_costly(auth, issuer_key, bits, e,
                                                                  monkeypatch):
    # The signature is checked with the proof's own key before its binding to the token:
    # any client with a token could make every proof cost what its key's modulus and
    # exponent cost (an adversarial probe). Such a key is refused before any check.
    from stellagw.auth import dpop
    checks = []
    real = dpop.verify_signature
    monkeypatch.setattr(dpop, "verify_signature", lambda *a: checks.append(a) or real(*a))
    client = DpopClient("RS256")
    token = bound_token(issuer_key, client)
    jwk = {"kty": "RSA", "n": b64u(_odd(bits, e).to_bytes(bits // 8, "big")),
           "e": b64u(e.to_bytes((e.bit_length() + 7) // 8, "big"))}
    proof = client.proof("GET", URL, token, header={"jwk": jwk})
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_jwk")
    assert checks == []
    # The client's own key (2048 bits, 65537) still passes.
    ok(auth.authenticate(dpop_request(client, token), ()))


@pytest.mark.parametrize("htm", ["POST", "get", "Get"])
def test_item11_htm_must_equal_the_method(auth, issuer_key, client, htm):
    token = bound_token(issuer_key, client)
    proof = client.proof(htm, URL, token)
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_htm")


@pytest.mark.parametrize("htu", [
    "HTTPS://GW.EXAMPLE.COM/api/items",          # scheme and host case
    "https://gw.example.com:443/api/items",      # default port
    "https://gw.example.com/api/items?x=1",      # query ignored
    "https://gw.example.com/api/items#frag",     # fragment ignored
    "https://gw.example.com/api/%69tems",        # unreserved percent-encoding
    "https://gw.example.com/api/./x/../items",   # dot segments
])
def test_item12_htu_normalisation_accepts(auth, issuer_key, client, htu):
    token = bound_token(issuer_key, client)
    ok(auth.authenticate(dpop_request(client, token, proof=client.proof("GET", htu, token)), ()))


@pytest.mark.parametrize("htu", [
    "https://gw.example.com/API/items",          # path is case-sensitive
    "https://evil.example.com/api/items",        # other host
    "http://gw.example.com/api/items",           # other scheme
    "https://gw.example.com:8443/api/items",     # other port
    "https://gw.example.com/items",              # a prefix-stripped path
    "https://gw.example.com/api/items/",         # trailing slash
    "https://user@gw.example.com/api/items",     # userinfo
    "https://gw.example.com/api/it\tems",        # urlsplit would delete the tab
    "/api/items",                                # relative
])
def test_item12_htu_mismatch(auth, issuer_key, client, htu):
    token = bound_token(issuer_key, client)
    refused(auth.authenticate(dpop_request(client, token, proof=client.proof("GET", htu, token)), ()),
            "invalid_dpop_proof", "dpop_htu")


def test_item12_percent_encoding_case_is_normalised_on_both_sides(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", ORIGIN + "/api/a%2fb", token)
    ok(auth.authenticate(dpop_request(client, token, path="/api/a%2Fb", proof=proof), ()))


def test_item12_expected_uri_is_the_public_origin_not_the_host_header(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", "https://evil.example.com/api/items", token)
    req = dpop_request(client, token, proof=proof)
    req.headers = [(n, b"evil.example.com" if n == b"host" else v) for n, v in req.headers]
    refused(auth.authenticate(req, ()), "invalid_dpop_proof", "dpop_htu")


def test_item12_without_public_origin_the_host_header_is_used(tmp_path, issuer_key, client):
    auth = make_authenticator(tmp_path, [issuer_key], http_yaml='publicOrigin: ""')
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", "http://gw.example.com/api/items", token)
    ok(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    req = dpop_request(client, token, proof=client.proof("GET", "http://gw.example.com/api/items", token))
    req.headers = [h for h in req.headers if h[0] != b"host"]
    refused(auth.authenticate(req, ()), "invalid_dpop_proof", "dpop_htu")


def test_normalize_uri_cases():
    assert normalize_uri("HTTP://A.Example:80/x/%7e%2f") == "http://a.example/x/~%2F"
    assert normalize_uri("https://[::1]:443") == "https://[::1]/"
    assert normalize_uri("https://a.example:444/") == "https://a.example:444/"
    assert normalize_uri("https://a.example/a/b/../../..") == "https://a.example/"
    assert normalize_uri("ftp://a.example/") is None
    assert normalize_uri("https://a.example:99999/") is None
    assert normalize_uri("https://a.example/ü") is None


@pytest.mark.parametrize("offset, accepted", [(-59, True), (59, True), (-61, False), (61, False),
                                              (-3600, False), (3600, False)])
def test_item14_iat_window(auth, issuer_key, client, offset, accepted):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, now=NOW + offset)
    result = auth.authenticate(dpop_request(client, token, proof=proof), ())
    if accepted:
        ok(result)
    else:
        refused(result, "invalid_dpop_proof", "dpop_iat")


def test_item14_iat_must_be_a_number(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    for bad in (str(int(NOW)), True, None):
        proof = client.proof("GET", URL, token, iat=bad)
        refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
                "invalid_dpop_proof", "dpop_claims")


def test_item15_ath_missing_or_wrong(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token, drop=("ath",))
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()), "invalid_dpop_proof", "dpop_ath")
    other = bound_token(issuer_key, client, jti="another")
    proof = client.proof("GET", URL, other)                 # ath of a different token
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()), "invalid_dpop_proof", "dpop_ath")


def test_item16_jkt_must_match_the_proof_key(auth, issuer_key, client):
    thief = DpopClient()
    token = bound_token(issuer_key, client)                 # bound to client's key
    failure = refused(auth.authenticate(dpop_request(thief, token), ()), "invalid_token",
                      "dpop_jkt_mismatch")
    assert failure.headers.startswith(
        b'www-authenticate: DPoP error="invalid_token", error_description="Invalid DPoP key binding", algs="')


def test_item16_a_proof_with_another_key_costs_no_signature_check(auth, issuer_key, client,
                                                                   monkeypatch):
    # The binding is checked before the signature: a stolen token with proofs signed by a
    # key of the thief's choosing (any size an RSA check allows) makes the gateway verify
    # nothing. Before, every such proof paid a signature check first.
    from stellagw.auth import dpop
    checks = []
    real = dpop.verify_signature
    monkeypatch.setattr(dpop, "verify_signature", lambda *a: checks.append(a) or real(*a))
    token = bound_token(issuer_key, client)
    for thief in (DpopClient(), DpopClient("RS256")):
        refused(auth.authenticate(dpop_request(thief, token), ()), "invalid_token",
                "dpop_jkt_mismatch")
    assert checks == []
    ok(auth.authenticate(dpop_request(client, token), ()))
    assert len(checks) == 1


# ---------------------------------------------------------------------- replay (item 17), in process

def test_item17_replayed_proof_is_refused(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    proof = client.proof("GET", URL, token)
    ok(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()),
            "invalid_dpop_proof", "dpop_replay")


def test_item17_replay_is_keyed_by_key_and_jti(auth, issuer_key):
    a, b = DpopClient(), DpopClient()
    ok(auth.authenticate(dpop_request(a, bound_token(issuer_key, a), jti="same"), ()))
    ok(auth.authenticate(dpop_request(b, bound_token(issuer_key, b), jti="same"), ()))
    refused(auth.authenticate(dpop_request(a, bound_token(issuer_key, a, jti="t2"), jti="same"), ()),
            "invalid_dpop_proof", "dpop_replay")


def test_item17_a_flood_that_evicts_a_live_proof_cannot_replay_it(tmp_path, issuer_key, client):
    """One client, token and key its own, sends fresh proofs until the replay cache is full
    of live entries (accepted, so counted toward nothing that stops them): the oldest entry
    — another client's proof — was evicted, and that proof was then accepted again. Now an
    evicted proof, and anything expiring no later, is refused as a replay; proofs made
    later pass (docs/security.md §3d, "replay after eviction")."""
    auth = make_authenticator(tmp_path, [issuer_key], "replayCache: {maxEntries: 8}")
    token = bound_token(issuer_key, client)
    captured = client.proof("GET", URL, token, now=NOW - 55)
    ok(auth.authenticate(dpop_request(client, token, proof=captured), ()))
    flooder = DpopClient()
    own = bound_token(issuer_key, flooder)
    for i in range(40):                 # a second apart, all within the acceptance window
        ok(auth.authenticate(dpop_request(flooder, own, now=NOW - 50 + i), ()))
    assert auth.test_events.counts.get("dpop_replay_evicted_live", 0) >= 40 + 1 - 8
    assert len(auth.replay) <= 8
    refused(auth.authenticate(dpop_request(client, token, proof=captured), ()),
            "invalid_dpop_proof", "dpop_replay")
    ok(auth.authenticate(dpop_request(client, token, now=NOW + 10), ()))   # made later: served


def test_item17_large_jti_refused(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    ok(auth.authenticate(dpop_request(client, token, jti="j" * 256), ()))
    refused(auth.authenticate(dpop_request(client, token, jti="j" * 257), ()),
            "invalid_dpop_proof", "dpop_jti")


def test_item17_failed_requests_do_not_consume_the_jti(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    wrong = dpop_request(client, token, method="POST", jti="keep")   # htm mismatch: refused
    wrong.method = "GET"
    refused(auth.authenticate(wrong, ()), "invalid_dpop_proof", "dpop_htm")
    ok(auth.authenticate(dpop_request(client, token, jti="keep"), ()))


# ---------------------------------------------------------------------- nonces (items 13, 18)

def nonce_auth(tmp_path, issuer_key, secret, lifetime="300s", clock=lambda: NOW):
    return make_authenticator(tmp_path, [issuer_key],
                              f'dpopNonce: {{enabled: true, secret: "{secret}", lifetime: "{lifetime}"}}',
                              clock=clock)


def nonce_of(failure: AuthFailure) -> str:
    for line in failure.headers.split(b"\r\n"):
        if line.startswith(b"dpop-nonce: "):
            return line[len(b"dpop-nonce: "):].decode()
    raise AssertionError(f"no DPoP-Nonce in {failure.headers!r}")


def test_item18_nonce_flow(tmp_path, issuer_key, client):
    auth = nonce_auth(tmp_path, issuer_key, random_secret())
    token = bound_token(issuer_key, client)
    first = refused(auth.authenticate(dpop_request(client, token), ()), "use_dpop_nonce",
                    "dpop_nonce_missing")
    assert first.headers.startswith(b'www-authenticate: DPoP error="use_dpop_nonce"')
    assert b"cache-control: no-store\r\n" in first.headers
    assert b"access-control-expose-headers: WWW-Authenticate, DPoP-Nonce" in first.headers
    nonce = nonce_of(first)
    identity = ok(auth.authenticate(dpop_request(client, token, nonce=nonce), ()))
    assert identity.response_headers == b""          # still fresh: no new nonce yet


def test_item13_nonce_from_another_secret_is_refused(tmp_path, issuer_key, client):
    ours = nonce_auth(tmp_path, issuer_key, random_secret())
    theirs = nonce_auth(tmp_path, issuer_key, random_secret())
    token = bound_token(issuer_key, client)
    foreign = nonce_of(theirs.authenticate(dpop_request(client, token), ()))
    failure = refused(ours.authenticate(dpop_request(client, token, nonce=foreign), ()),
                      "use_dpop_nonce", "dpop_nonce_invalid")
    assert nonce_of(failure) != foreign


def test_item13_shared_secret_nonces_work_across_instances(tmp_path, issuer_key, client):
    secret = random_secret()
    a = nonce_auth(tmp_path, issuer_key, secret)
    b = nonce_auth(tmp_path, issuer_key, secret)
    token = bound_token(issuer_key, client)
    nonce = nonce_of(a.authenticate(dpop_request(client, token), ()))
    ok(b.authenticate(dpop_request(client, token, nonce=nonce), ()))


def test_item13_stale_nonce(tmp_path, issuer_key, client):
    clock = [NOW]
    auth = nonce_auth(tmp_path, issuer_key, random_secret(), "60s", clock=lambda: clock[0])
    token = bound_token(issuer_key, client, lifetime=3000)
    nonce = nonce_of(auth.authenticate(dpop_request(client, token), ()))
    clock[0] = NOW + 61
    failure = refused(auth.authenticate(dpop_request(client, token, nonce=nonce, now=clock[0]), ()),
                      "use_dpop_nonce", "dpop_nonce_invalid")
    fresh = nonce_of(failure)
    assert fresh != nonce
    ok(auth.authenticate(dpop_request(client, token, nonce=fresh, now=clock[0]), ()))


def test_item13_garbage_nonce(tmp_path, issuer_key, client):
    auth = nonce_auth(tmp_path, issuer_key, random_secret())
    token = bound_token(issuer_key, client)
    for bad in ("x" * 27, "", 12, "eyJ7S_zG.eyJH0-Z.HX4w-7v"):
        refused(auth.authenticate(dpop_request(client, token, nonce=bad), ()), "use_dpop_nonce")


def test_item18_fresh_nonce_on_success_past_half_lifetime(tmp_path, issuer_key, client):
    clock = [NOW]
    auth = nonce_auth(tmp_path, issuer_key, random_secret(), "100s", clock=lambda: clock[0])
    token = bound_token(issuer_key, client, lifetime=3000)
    nonce = nonce_of(auth.authenticate(dpop_request(client, token), ()))
    clock[0] = NOW + 60
    identity = ok(auth.authenticate(dpop_request(client, token, nonce=nonce, now=clock[0]), ()))
    assert identity.response_headers.startswith(b"dpop-nonce: ")
    new = identity.response_headers[len(b"dpop-nonce: "):-2].decode()
    assert new != nonce
    ok(auth.authenticate(dpop_request(client, token, nonce=new, now=clock[0]), ()))


def test_nonces_off_ignore_a_nonce_claim(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    ok(auth.authenticate(dpop_request(client, token, nonce="anything"), ()))


# ---------------------------------------------------------------------- challenges (item 19)

def test_item19_no_error_information_without_credentials(tmp_path, issuer_key):
    auth = make_authenticator(tmp_path, [issuer_key], "required: true")
    failure = refused(auth.authenticate(FakeRequest(), ()), "unauthorized", "missing_token")
    assert failure.headers == (b"www-authenticate: Bearer\r\n"
                               b'www-authenticate: DPoP algs="ES256 RS256 PS256 EdDSA"\r\n'
                               b"access-control-expose-headers: WWW-Authenticate, DPoP-Nonce\r\n")
    assert b"error" not in failure.headers


def test_item19_proof_error_challenge(auth, issuer_key, client):
    token = bound_token(issuer_key, client)
    failure = auth.authenticate(dpop_request(client, token, method="POST", proof=client.proof("GET", URL, token)), ())
    assert failure.headers.split(b"\r\n")[0] == (
        b'www-authenticate: DPoP error="invalid_dpop_proof", error_description="DPoP proof htm does '
        b'not match the request method", algs="ES256 RS256 PS256 EdDSA"')


def test_dpop_disabled(tmp_path, issuer_key, client):
    auth = make_authenticator(tmp_path, [issuer_key], "dpopEnabled: false")
    token = bound_token(issuer_key, client)
    refused(auth.authenticate(dpop_request(client, token), ()), "invalid_token", "dpop_disabled")
    failure = auth.authenticate(FakeRequest(), ("scope", "x"))
    assert b"www-authenticate: DPoP" not in failure.headers
