"""Access-token validation: docs/security.md §3b, and the verified-token cache.

Each test names the pitfall (§3b row) or brief item it covers.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from stellagw.auth import AuthFailure, Identity, tokens

from tests.support.auth import (ISSUER_PLACEHOLDER, NOW, DpopClient, FakeRequest, SigningKey,
                                b64u, b64u_json, bearer_request, dpop_request,
                                make_authenticator, mint_token, sign_raw)

ISS = ISSUER_PLACEHOLDER


@pytest.fixture(scope="module")
def es_key():
    return SigningKey("ES256", kid="es-1")


@pytest.fixture(scope="module")
def rsa_key():
    return SigningKey("RS256", kid="rsa-1")


@pytest.fixture
def auth(tmp_path, es_key, rsa_key):
    return make_authenticator(tmp_path, [es_key, rsa_key])


def refused(result, reason, code="invalid_token", status=401) -> AuthFailure:
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.code, result.reason) == (status, code, reason), result
    return result


def ok(result) -> Identity:
    assert isinstance(result, Identity), result
    return result


def test_valid_bearer_tokens(auth, es_key, rsa_key):
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()))
    ok(auth.authenticate(bearer_request(mint_token(rsa_key, ISS)), ()))
    ok(auth.authenticate(bearer_request(mint_token(rsa_key, ISS, alg="PS256")), ()))


# ---------------------------------------------------------------------- alg: none / chosen by token

def test_alg_none(auth, es_key):
    payload = json.loads(json.dumps({"iss": ISS, "sub": "u", "aud": "stellaops-gateway",
                                     "exp": int(NOW) + 60}))
    for header in ({"alg": "none", "kid": "es-1"}, {"alg": "none"}, {"alg": "None", "kid": "es-1"}):
        # With an empty signature part (the usual form) and with a dummy one.
        token = f"{b64u_json(header)}.{b64u_json(payload)}."
        assert isinstance(auth.authenticate(bearer_request(token), ()), AuthFailure)
        refused(auth.authenticate(bearer_request(token + "AAAA"), ()), "token_alg")


def test_alg_not_on_the_configured_list(tmp_path, es_key, rsa_key):
    auth = make_authenticator(tmp_path, [es_key, rsa_key], "algorithms: [ES256]")
    refused(auth.authenticate(bearer_request(mint_token(rsa_key, ISS)), ()), "token_alg")
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()))


# ---------------------------------------------------------------------- HS/RS key confusion

@pytest.mark.parametrize("secret", ["pem", "jwk"])
def test_hmac_with_the_public_key_as_secret(auth, rsa_key, secret):
    from cryptography.hazmat.primitives import serialization
    public = rsa_key.private.public_key()
    material = (public.public_bytes(serialization.Encoding.PEM,
                                    serialization.PublicFormat.SubjectPublicKeyInfo)
                if secret == "pem" else json.dumps(rsa_key.public_jwk).encode())
    h = b64u_json({"alg": "HS256", "typ": "at+jwt", "kid": "rsa-1"})
    p = b64u_json({"iss": ISS, "sub": "u", "aud": "stellaops-gateway", "exp": int(NOW) + 60})
    token = f"{h}.{p}.{b64u(hmac.new(material, f'{h}.{p}'.encode(), hashlib.sha256).digest())}"
    refused(auth.authenticate(bearer_request(token), ()), "token_alg")


def test_alg_must_match_the_key_type(auth, es_key, rsa_key):
    # Header claims RS256 but names the EC key: refused before any signature check.
    token = mint_token(rsa_key, ISS, header={"kid": "es-1"})
    refused(auth.authenticate(bearer_request(token), ()), "token_alg_mismatch")


# ---------------------------------------------------------------------- kid / key-source headers

def test_kid_injection_is_only_a_lookup(auth, es_key, monkeypatch):
    fetches = []
    monkeypatch.setattr(auth.keys, "request_refetch", lambda: fetches.append(1))
    for kid in ("../../../../etc/passwd", "' OR 1=1 --", "x" * 300):
        result = auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"kid": kid})), ())
        assert isinstance(result, AuthFailure) and result.status == 401
        assert result.reason in ("unknown_kid", "token_malformed")   # a map lookup, nothing more
    assert len(fetches) == 2          # the over-long kid is refused before any lookup


def test_embedded_jwk_jku_x5u_x5c_are_ignored(auth, es_key):
    attacker = SigningKey("ES256", kid="es-1")      # same kid, different key
    token = mint_token(attacker, ISS, header={"jwk": attacker.bare_jwk(),
                                              "jku": "https://evil.example/jwks",
                                              "x5u": "https://evil.example/cert"})
    refused(auth.authenticate(bearer_request(token), ()), "token_signature")


def test_no_kid_is_accepted_only_with_a_single_key(tmp_path, es_key, rsa_key):
    claims = {"iss": ISS, "sub": "u", "aud": "stellaops-gateway", "exp": int(NOW) + 60}
    loner = SigningKey("ES256", kid=None)
    single = make_authenticator(tmp_path, [loner])
    ok(single.authenticate(bearer_request(sign_raw(loner, {"alg": "ES256"}, claims)), ()))
    two = make_authenticator(tmp_path, [es_key, rsa_key])
    token = sign_raw(es_key, {"alg": "ES256", "typ": "at+jwt"}, claims)
    refused(two.authenticate(bearer_request(token), ()), "token_kid")


def test_bad_signature(auth, es_key):
    token = mint_token(es_key, ISS)
    h, p, s = token.split(".")
    tampered = json.loads(base64.urlsafe_b64decode(p + "=="))
    tampered["scope"] = "admin"
    token = f"{h}.{b64u_json(tampered)}.{s}"
    refused(auth.authenticate(bearer_request(token), ()), "token_signature")


# ---------------------------------------------------------------------- exp / nbf / iat

@pytest.mark.parametrize("offset, reason", [(-61, "token_expired"), (-3600, "token_expired"),
                                            (-59, None), (0, None)])
def test_exp_with_leeway(auth, es_key, offset, reason):
    token = mint_token(es_key, ISS, exp=int(NOW) + offset, iat=int(NOW) - 120, nbf=int(NOW) - 120)
    result = auth.authenticate(bearer_request(token), ())
    ok(result) if reason is None else refused(result, reason)


def test_exp_required_and_numeric(auth, es_key):
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, drop=("exp",))), ()), "token_claims")
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, exp=str(int(NOW) + 60))), ()),
            "token_claims")


def test_nbf_in_the_future(auth, es_key):
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, nbf=int(NOW) + 61)), ()),
            "token_not_yet_valid")
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, nbf=int(NOW) + 59)), ()))


def test_iat_in_the_future(auth, es_key):
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, iat=int(NOW) + 3600,
                                                        nbf=int(NOW))), ()), "token_not_yet_valid")


def test_lifetime_cap(tmp_path, es_key):
    auth = make_authenticator(tmp_path, [es_key], 'maxTokenLifetime: "10m"')
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, lifetime=3600)), ()),
            "token_lifetime")
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, lifetime=600)), ()))


# ---------------------------------------------------------------------- iss / aud

def test_issuer_must_match_exactly(auth, es_key):
    for iss in ("https://evil.example", ISS + "/", ISS.upper()):
        refused(auth.authenticate(bearer_request(mint_token(es_key, iss)), ()), "token_issuer")
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, drop=("iss",))), ()),
            "token_claims")


def test_audience(tmp_path, es_key):
    auth = make_authenticator(tmp_path, [es_key], "audiences: [stellaops-gateway, stellaops-web]")
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, aud="stellaops-web")), ()))
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, aud=["other", "stellaops-gateway"])), ()))
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, aud="other")), ()), "token_audience")
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, drop=("aud",))), ()), "token_claims")


# ---------------------------------------------------------------------- typ / crit / cnf

def test_typ_at_jwt_when_required(tmp_path, es_key):
    auth = make_authenticator(tmp_path, [es_key], "requireAtJwtTyp: true")
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": "JWT"})), ()),
            "token_typ")
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": None})), ()),
            "token_typ")
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": "at+jwt"})), ()))
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": "application/at+JWT"})), ()))


def test_typ_jwt_is_fine_when_not_required(auth, es_key):
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": "JWT"})), ()))


def test_a_dpop_proof_is_never_an_access_token(auth, es_key):
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, header={"typ": "dpop+jwt"})), ()),
            "token_typ")


def test_crit_header_refused(auth, es_key):
    token = sign_raw(es_key, {"alg": "ES256", "kid": "es-1", "crit": ["exp"], "exp": 1},
                     {"iss": ISS, "sub": "u", "aud": "stellaops-gateway", "exp": int(NOW) + 60})
    refused(auth.authenticate(bearer_request(token), ()), "token_malformed")


def test_unsupported_confirmation_method(auth, es_key):
    # A token bound by a method we cannot check must not pass as a bearer token.
    # A member set to null read as "no binding" once: a bound token passed as a bearer one
    # (found by an adversarial probe); a cnf of null is no cnf either.
    for cnf in ({"jwk": {"kty": "EC"}}, {"kid": "x"}, {}, "jkt", {"jkt": 5}, {"jkt": None},
                {"x5t#S256": None}, {"jkt": None, "x5t#S256": None}, {"x5t#S256": ""}, None):
        refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, cnf=cnf)), ()), "token_cnf")


def test_subject_required(auth, es_key):
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS, drop=("sub", "client_id"))), ()),
            "token_claims")
    identity = ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, drop=("sub",))), ()))
    assert identity.subject == "cli-1"


# ---------------------------------------------------------------------- parsing / size caps

@pytest.mark.parametrize("token", [
    "abc", "a.b", "a.b.c.d.e", "....", "eyJ.eyJ.sig", "a b.c.d",
])
def test_malformed_tokens(auth, token):
    result = auth.authenticate(bearer_request(token), ())
    assert isinstance(result, AuthFailure) and result.status in (400, 401)


def test_duplicate_json_members_refused(auth, es_key):
    header = '{"alg":"ES256","kid":"es-1","alg":"ES256"}'
    payload = b64u_json({"iss": ISS, "sub": "u", "aud": "stellaops-gateway", "exp": int(NOW) + 60})
    token = sign_raw(es_key, {"alg": "ES256", "kid": "es-1"}, {})   # for a valid shape only
    token = f"{b64u(header.encode())}.{payload}.{token.split('.')[2]}"
    refused(auth.authenticate(bearer_request(token), ()), "token_malformed")
    # ... in the payload too (verified first, then refused as malformed).
    h = '{"alg":"ES256","kid":"es-1"}'
    p = ('{"iss":"%s","sub":"u","aud":"stellaops-gateway","exp":%d,"sub":"admin"}' % (ISS, int(NOW) + 60))
    from jwt.algorithms import get_default_algorithms
    signing_input = f"{b64u(h.encode())}.{b64u(p.encode())}"
    sig = get_default_algorithms()["ES256"].sign(signing_input.encode(), es_key.private)
    refused(auth.authenticate(bearer_request(f"{signing_input}.{b64u(sig)}"), ()), "token_malformed")


def test_size_cap_before_parsing(tmp_path, es_key, monkeypatch):
    auth = make_authenticator(tmp_path, [es_key], "maxTokenBytes: 2048")
    big = mint_token(es_key, ISS, filler="x" * 2100)
    calls = []
    monkeypatch.setattr(tokens, "split_compact", lambda *a: calls.append(a))
    refused(auth.authenticate(bearer_request(big), ()), "token_too_large")
    assert calls == []


def test_a_forged_signature_is_refused_before_pyjwt_reads_the_token(auth, es_key, monkeypatch):
    """docs/security.md §3d, forged tokens: PyJWT's decode walks every character of the
    token in Python before it verifies the signature (0.6 ms for 7.5 KB), and any client
    can send a forged token naming a known kid. The signature is checked first, so a
    forgery never reaches PyJWT; a token the Authority signed still goes through it."""
    calls = []
    real = tokens._jwt_decode
    monkeypatch.setattr(tokens, "_jwt_decode", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    wide = sign_raw(es_key, {"alg": "ES256", "kid": "es-1", **{f"h{i}": i for i in range(400)}},
                    {"iss": ISS, "sub": "u", "aud": "stellaops-gateway", "exp": int(NOW) + 60})
    h, p, sig = wide.split(".")
    forged = f"{h}.{p}.{b64u(bytes(64))}"
    refused(auth.authenticate(bearer_request(forged), ()), "token_signature")
    refused(auth.authenticate(bearer_request(f"{h}.{p}.{sig[:-2]}"), ()), "token_signature")
    assert calls == []
    ok(auth.authenticate(bearer_request(wide), ()))
    assert calls == [1]


# ---------------------------------------------------------------------- the verified-token cache

def test_second_use_is_not_reverified(auth, es_key, monkeypatch):
    calls = []
    real = tokens._jwt_decode
    monkeypatch.setattr(tokens, "_jwt_decode", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    token = mint_token(es_key, ISS)
    for _ in range(5):
        ok(auth.authenticate(bearer_request(token), ()))
    assert len(calls) == 1
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()))
    assert len(calls) == 2


def test_cache_entry_ends_at_exp(tmp_path, es_key):
    clock = [NOW]
    auth = make_authenticator(tmp_path, [es_key], clock=lambda: clock[0])
    token = mint_token(es_key, ISS, lifetime=120)
    ok(auth.authenticate(bearer_request(token), ()))
    clock[0] = NOW + 120 + 61
    refused(auth.authenticate(bearer_request(token), ()), "token_expired")


def test_sender_constraint_still_checked_on_a_cache_hit(auth, es_key):
    client, thief = DpopClient(), DpopClient()
    token = mint_token(es_key, ISS, cnf={"jkt": client.jkt})
    ok(auth.authenticate(dpop_request(client, token), ()))           # now cached
    refused(auth.authenticate(dpop_request(thief, token), ()), "dpop_jkt_mismatch")
    refused(auth.authenticate(bearer_request(token), ()), "dpop_bound_as_bearer")
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    ok(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    refused(auth.authenticate(dpop_request(client, token, proof=proof), ()), "dpop_replay",
            "invalid_dpop_proof")


def test_cache_is_bounded(tmp_path, es_key):
    auth = make_authenticator(tmp_path, [es_key])
    auth.tokens._cache_size = 3
    for i in range(10):
        ok(auth.authenticate(bearer_request(mint_token(es_key, ISS, jti=str(i))), ()))
    assert len(auth.tokens._cache) == 3


def test_cache_cleared_when_keys_change(auth, es_key):
    ok(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()))
    assert auth.tokens._cache
    auth._keys_changed()
    assert not auth.tokens._cache


# ---------------------------------------------------------------------- never echo, never raise

def test_refusals_never_echo_the_token_or_proof(auth, es_key):
    client = DpopClient()
    secretish = "SECRET-MARKER"
    token = mint_token(es_key, "https://evil\r\nx: " + secretish, cnf={"jkt": client.jkt})
    for req in (bearer_request(token), dpop_request(client, token),
                dpop_request(client, token, jti=secretish, method="POST")):
        result = auth.authenticate(req, ())
        assert isinstance(result, AuthFailure)
        text = result.headers + result.message.encode()
        assert secretish.encode() not in text and token.encode() not in text
        assert b"\r\n" not in result.message.encode()
    assert secretish not in auth.test_log.text() and token not in auth.test_log.text()


def test_no_authority_configured(tmp_path, es_key):
    from stellagw.auth import Authenticator
    from tests.support.auth import settings, ListLog
    auth = Authenticator(settings(""), ListLog())
    assert auth.ready_reasons() == []          # nothing to wait for
    ok(auth.authenticate(FakeRequest(), ()))   # anonymous still works
    refused(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()), "no_authority")


def test_other_schemes_count_as_no_token(auth):
    req = FakeRequest(headers=[(b"authorization", b"Basic dXNlcjpwdw==")])
    assert isinstance(auth.authenticate(req, ()), Identity)
    refused(auth.authenticate(req, (("scope", "read"),)), "missing_token", "unauthorized")


@pytest.mark.parametrize("value", [b"Bearer", b"Bearer ", b"DPoP", b"Bearer a b", b"Bearer a,b"])
def test_malformed_authorization(auth, value):
    req = FakeRequest(headers=[(b"authorization", value)])
    result = auth.authenticate(req, ())
    refused(result, "malformed_authorization", "invalid_request", 400)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([b"authorization", b"dpop", b"host", b"x-stellaops-scopes",
                                           b"x-other"]),
                          st.binary(max_size=300)), max_size=6),
       st.sampled_from(["GET", "POST", "get"]), st.binary(max_size=50))
def test_authenticate_never_raises(auth_for_fuzz, headers, method, target):
    req = FakeRequest(method, target, headers)
    result = auth_for_fuzz.authenticate(req, (("scope", "read"),))
    assert isinstance(result, (Identity, AuthFailure))
    assert not (isinstance(result, AuthFailure) and result.status == 500), result


@pytest.fixture(scope="module")
def auth_for_fuzz(tmp_path_factory, es_key):
    return make_authenticator(tmp_path_factory.mktemp("fuzz"), [es_key])


@hsettings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_tokens_never_raise(auth_for_fuzz, es_key, data):
    token = mint_token(es_key, ISS)
    raw = bytearray(token.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(33, 126))
    result = auth_for_fuzz.authenticate(bearer_request(raw.decode()), ())
    assert isinstance(result, (Identity, AuthFailure))
    assert not (isinstance(result, AuthFailure) and result.status == 500), result


# ---------------------------------------------------------------------- sender constraint

def test_require_sender_constraint_refuses_unbound_bearer_tokens(tmp_path, es_key):
    auth = make_authenticator(tmp_path, [es_key], "requireSenderConstraint: true")
    failure = refused(auth.authenticate(bearer_request(mint_token(es_key, ISS)), ()),
                      "not_sender_constrained")
    assert b'www-authenticate: Bearer error="invalid_token"' in failure.headers
    assert b"www-authenticate: DPoP" in failure.headers      # how to do better
    client = DpopClient()
    token = mint_token(es_key, ISS, cnf={"jkt": client.jkt})
    ok(auth.authenticate(dpop_request(client, token), ()))


def test_an_endpoint_can_require_a_sender_constrained_token(auth, es_key):
    token = mint_token(es_key, ISS)
    ok(auth.authenticate(bearer_request(token), ()))
    refused(auth.authenticate(bearer_request(token), (), sender_constrained=True),
            "not_sender_constrained")
    client = DpopClient()
    bound = mint_token(es_key, ISS, cnf={"jkt": client.jkt})
    ok(auth.authenticate(dpop_request(client, bound), (), sender_constrained=True))
