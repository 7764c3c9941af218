"""The DPoP checks compiled against the same source run uncompiled, and the base64url codec
against its pure-Python twin.

stellagw/auth/dpop.py is one source (docs/hot-path.md): the compiled module
(stellagw.auth.dpop, typed through dpop.pxd) and that .py executed as plain Python in this
process give the same answer and the same refusal, for valid proofs and for proofs broken
in every way hypothesis finds, and cache the same client keys in the same slots
(ProofKeyCache) over sequences of proofs from several keys. The codec (cext/b64url.pyx)
works on pointers, so its twin (stellagw/_py/b64url.py) is another algorithm, held to it
here on valid and invalid input.

tests/auth/test_auth_dpop.py holds each check to the RFC on the selected implementation (both,
through `make test`); this file holds the two to each other.
"""
from __future__ import annotations

import binascii
import hashlib
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw import _impl
from stellagw._py import b64url as twin_codec
from stellagw.auth import jose
from stellagw.auth.errors import Refusal
from stellagw.auth.jose import JoseError
from stellagw.auth.nonce import NonceIssuer
from stellagw.auth.replay import replay_key

from tests.support.auth import NOW, DpopClient, b64u, sign_raw
from tests.support.impls import uncompiled

pytestmark = pytest.mark.skipif(_impl.NO_EXTENSIONS,
                                reason="STELLAGW_NO_EXTENSIONS=1: no compiled module to compare")

ORIGIN = "https://gw.example.com"
URL = ORIGIN + "/api/items"
TOKEN = "header.payload.signature-of-an-access-token"
ATH = b64u(hashlib.sha256(TOKEN.encode()).digest())
ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@pytest.fixture(scope="module")
def codec():
    from stellagw._cext import b64url
    return b64url


@pytest.fixture(scope="module")
def compiled():
    from stellagw.auth import dpop
    assert _impl.compiled("stellagw.auth.dpop"), "stellagw.auth.dpop is not built: make build"
    return dpop


@pytest.fixture(scope="module")
def source():
    return uncompiled("stellagw.auth.dpop")


@pytest.fixture(scope="module")
def client():
    return DpopClient()


def outcome(fn, *args):
    try:
        value = fn(*args)
    except (Refusal, JoseError) as exc:
        return type(exc).__name__, getattr(exc, "code", None), str(exc), getattr(exc, "reason", None)
    if value is None or isinstance(value, (bytes, str, tuple, dict)):
        return "ok", value
    return "ok", value.jkt, value.replay_key, value.ttl_ms, value.nonce_age


# ------------------------------------------------------------------- base64url

alphabetish = st.binary(max_size=40) | st.lists(
    st.sampled_from(list(ALPHABET) + list(b"+/=.!\x00 \xff")), max_size=40).map(bytes)


@given(alphabetish)
@settings(max_examples=3000)
def test_decoder_is_its_twin(codec, part):
    assert outcome(codec.decode, part) == outcome(twin_codec.decode, part)


@given(st.binary(max_size=80))
@settings(max_examples=2000)
def test_encoder_is_its_twin(codec, data):
    assert codec.encode(data) == twin_codec.encode(data)
    assert codec.encode(bytearray(data)) == twin_codec.encode(bytearray(data))
    if data:                              # "" is not base64url (an empty part is refused)
        assert codec.decode(codec.encode(data).encode()) == data
    else:
        assert codec.decode(b"") is twin_codec.decode(b"") is None


def test_unused_low_bits_are_ignored_as_binascii_ignores_them(codec):
    # "QR" and "QQ" both decode to b"A" (strict mode does not check the last bits)
    assert binascii.a2b_base64(b"QR==", strict_mode=True) == b"A"
    assert codec.decode(b"QR") == twin_codec.decode(b"QR") == b"A"


@given(st.lists(st.sampled_from(list(b"ab.")), max_size=12).map(bytes) | st.binary(max_size=12))
@settings(max_examples=2000)
def test_split_is_its_twin(codec, token):
    assert outcome(codec.split, token) == outcome(twin_codec.split, token)


json_parts = st.one_of(
    alphabetish,
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=6).map(lambda v: b64u(json.dumps(v).encode()).encode()),
    st.sampled_from([b'{"a":1,"a":2}', b'{"a":NaN}', b'{"a":Infinity}', b'{"a":1} ', b'{"a":1}x',
                     b'{"a":"\xed\xa0\x80"}', b'\xef\xbb\xbf{}', b"{}", b"[]", b'"{}"',
                     b"1e999", b"9" * 30]).map(lambda raw: b64u(raw).encode()),
    st.binary(max_size=30).map(lambda raw: b64u(raw).encode()))


@given(json_parts)
@settings(max_examples=2000)
def test_json_object_is_its_twin(codec, part):
    assert outcome(codec.json_object, part) == outcome(twin_codec.json_object, part)


def test_jose_raises_where_the_codec_answers_none():
    with pytest.raises(JoseError, match="^not base64url$"):
        jose.b64url_decode(b"ab=")
    with pytest.raises(JoseError, match="^not a compact JWS$"):
        jose.split_parts(b"a..c")
    with pytest.raises(JoseError, match="^not base64url$"):
        jose.json_object_fast(b"a+b")
    with pytest.raises(JoseError, match="^not a JSON object$"):
        jose.json_object_fast(b64u(b"[1]").encode())
    assert jose.json_object_fast(b64u(b'{"a":1}').encode()) == {"a": 1}
    assert jose.split_parts(b"a.b.c") == (b"a", b"b", b"c")


# ------------------------------------------------------------------- whole proofs

claim_values = (st.none() | st.booleans() | st.integers(-2**70, 2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
                | st.lists(st.integers(), max_size=2))


@st.composite
def payloads(draw):
    payload = {"jti": "j-" + draw(st.text(min_size=0, max_size=8)), "htm": "GET", "htu": URL,
               "iat": int(NOW), "ath": ATH}
    for name in draw(st.lists(st.sampled_from(["jti", "htm", "htu", "iat", "ath", "nonce"]),
                              max_size=3, unique=True)):
        change = draw(st.sampled_from(["drop", "value", "near"]))
        if change == "drop":
            payload.pop(name, None)
        elif change == "value":
            payload[name] = draw(claim_values)
        else:
            payload[name] = {"jti": "x" * draw(st.sampled_from([255, 256, 257])),
                             "htm": draw(st.sampled_from(["get", "POST", "GET "])),
                             "htu": draw(st.sampled_from([URL + "?q=1", ORIGIN.upper() + "/api/items",
                                                          ORIGIN + ":443/api/./items", ORIGIN + "/other",
                                                          "not a uri"])),
                             "iat": NOW + draw(st.sampled_from([-60, -60.5, 60, 61, 0.25, -1e9])),
                             "ath": draw(st.sampled_from([ATH[:-1], ATH + "A", "é"])),
                             "nonce": draw(st.text(max_size=30))}[name]
    return payload


@st.composite
def proofs(draw, client):
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client.key.bare_jwk()}
    kind = draw(st.sampled_from(["payload", "bytes", "header"]))
    payload = draw(payloads()) if kind == "payload" else {
        "jti": "j1", "htm": "GET", "htu": URL, "iat": int(NOW), "ath": ATH}
    if kind == "header":
        header = dict(header)
        header[draw(st.sampled_from(["typ", "alg", "crit", "jwk"]))] = draw(claim_values)
    proof = sign_raw(client.key, header, payload, alg="ES256").encode()
    if kind == "bytes":
        at = draw(st.integers(0, len(proof)))
        edit = draw(st.sampled_from(["insert", "delete", "replace", "truncate"]))
        byte = bytes([draw(st.sampled_from(list(b".=+/!-_aZ\x00\xff")))])
        if edit == "insert":
            proof = proof[:at] + byte + proof[at:]
        elif edit == "delete":
            proof = proof[:at] + proof[at + 1:]
        elif edit == "replace":
            proof = proof[:at] + byte + proof[at + 1:]
        else:
            proof = proof[:at]
    return proof


@pytest.mark.parametrize("nonces", [False, True])
@given(data=st.data())
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_same_answer_compiled_and_uncompiled(compiled, source, client, nonces, data):
    issuer = NonceIssuer("s" * 40, 60.0) if nonces else None
    c = compiled.DpopVerifier(("ES256", "EdDSA"), 60.0, 1200, issuer)
    t = source.DpopVerifier(("ES256", "EdDSA"), 60.0, 1200, issuer)
    proof = data.draw(proofs(client))
    method = data.draw(st.sampled_from(["GET", "POST"]))
    bound = data.draw(st.sampled_from([client.jkt, None, client.jkt[:-1] + "A"]))
    now = NOW + data.draw(st.sampled_from([0.0, 30.5, -59.0, 120.0]))
    args = (proof, method, URL, ATH, bound, now)
    assert outcome(c.check, *args) == outcome(t.check, *args)


def test_a_valid_proof_gives_the_same_result(compiled, source, client):
    proof = client.proof("GET", URL, TOKEN).encode()
    c = compiled.DpopVerifier(("ES256",), 60.0, 8192)
    t = source.DpopVerifier(("ES256",), 60.0, 8192)
    got = outcome(c.check, proof, "GET", URL, ATH, client.jkt, NOW)
    assert got[0] == "ok" and got == outcome(t.check, proof, "GET", URL, ATH, client.jkt, NOW)
    jti = json.loads(jose.b64url_decode(proof.split(b".")[1]))["jti"]
    assert got[2] == replay_key(client.jkt, jti)


def test_both_call_verify_signature_through_their_globals(compiled, source, client, monkeypatch):
    """perf/stub_signature and the tests replace it on the module: a global, compiled too."""
    proof = client.proof("GET", URL, TOKEN)
    forged = proof.rsplit(".", 1)[0].encode() + b"." + b64u(b"\x00" * 64).encode()
    for mod in (compiled, source):
        v = mod.DpopVerifier(("ES256",), 60.0, 8192)
        assert outcome(v.check, forged, "GET", URL, ATH, client.jkt, NOW)[3] == "dpop_signature"
        monkeypatch.setattr(mod, "verify_signature", lambda *a: True)
        assert outcome(v.check, forged, "GET", URL, ATH, client.jkt, NOW)[0] == "ok"


# ------------------------------------------------------------------- the key cache

@pytest.fixture(scope="module")
def clients():
    return [DpopClient() for _ in range(5)]


def variant_header(client, which):
    jwk = client.key.bare_jwk()
    return [
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk},
        {"jwk": jwk, "alg": "ES256", "typ": "dpop+jwt"},            # other bytes, same key
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk, "kid": "x"},
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": {**jwk, "kid": "k", "use": "sig"}},
        {"typ": "dpop+jwt", "alg": "ES256", "jwk": {**jwk, "d": b64u(b"\x01" * 32)}},
        {"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk},
    ][which]


steps = st.tuples(st.integers(0, 4), st.integers(0, 5),
                  st.sampled_from(["ok", "ok", "ok", "signature", "binding", "iat"]))


@given(capacity=st.integers(0, 4), script=st.lists(steps, max_size=30))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_key_cache_same_answers_compiled_and_uncompiled_and_as_no_cache(compiled, source, clients,
                                                                        capacity, script):
    """Hits by header, hits by thumbprint, misses, refusals and evictions: the cache
    compiled and uncompiled answer every proof alike, as a verifier without a cache does,
    and hold the same keys in the same slots."""
    c = compiled.DpopVerifier(("ES256", "EdDSA"), 60.0, 8192, key_cache_size=capacity)
    t = source.DpopVerifier(("ES256", "EdDSA"), 60.0, 8192, key_cache_size=capacity)
    none = source.DpopVerifier(("ES256", "EdDSA"), 60.0, 8192, key_cache_size=0)
    for who, which, fault in script:
        client = clients[who]
        payload = {"jti": f"j{len(script)}-{who}-{which}", "htm": "GET", "htu": URL,
                   "iat": int(NOW) - (3600 if fault == "iat" else 0), "ath": ATH}
        proof = sign_raw(client.key, variant_header(client, which), payload, alg="ES256")
        if fault == "signature":
            proof = proof.rsplit(".", 1)[0] + "." + b64u(b"\x01" * 64)
        bound = clients[(who + 1) % len(clients)].jkt if fault == "binding" else client.jkt
        args = (proof.encode(), "GET", URL, ATH, bound, NOW)
        assert outcome(c.check, *args) == outcome(t.check, *args) == outcome(none.check, *args)
        assert c.key_cache.thumbprints() == t.key_cache.thumbprints()
        assert len(c.key_cache) <= capacity


def test_key_cache_flood_evicts_alike(compiled, source):
    """Fresh keys beyond the capacity, with one key in use throughout: the same slots
    compiled and uncompiled, never more than the capacity, and the key in use kept."""
    c = compiled.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=5)
    t = source.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=5)
    hot = DpopClient()
    for i in range(40):
        for client in ((hot, DpopClient()) if i % 2 else (DpopClient(),)):
            proof = client.proof("GET", URL, TOKEN).encode()
            args = (proof, "GET", URL, ATH, client.jkt, NOW)
            assert outcome(c.check, *args)[0] == "ok"
            assert outcome(t.check, *args)[0] == "ok"
            assert c.key_cache.thumbprints() == t.key_cache.thumbprints()
            assert len(c.key_cache) <= 5
    assert hot.jkt in c.key_cache.thumbprints() and len(c.key_cache) == 5
