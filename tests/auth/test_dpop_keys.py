"""The proof key cache (ProofKeyCache in stellagw/auth/dpop.py) and the ECDSA signature check
(stellagw.auth.jose.verify_signature): docs/auth.md, "The proof key cache".

Every test runs on stellagw/auth/dpop.py uncompiled ("source": the .py executed in this
process) and compiled ("compiled": the module Cython built from it, when it is);
tests/codecs/test_dpop_twins.py holds the two to each other with hypothesis.

`STELLAGW_MEASURE_DPOP=time taskset -c 1 python -m pytest -s tests/auth/test_dpop_keys.py -k measure`
prints the figures docs/auth.md quotes (in-process, interleaved rounds, medians and ranges);
`STELLAGW_MEASURE_DPOP=callgrind` counts instructions instead.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt.algorithms import get_default_algorithms

from stellagw import _impl
from stellagw.auth import jose
from stellagw.auth.errors import Refusal

from tests.support import REPO
from tests.support.auth import NOW, DpopClient, SigningKey, b64u, sign_raw
from tests.support.impls import uncompiled

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

ROOT = REPO
ORIGIN = "https://gw.example.com"
URL = ORIGIN + "/api/items"
TOKEN = "header.payload.signature-of-an-access-token"
ATH = b64u(hashlib.sha256(TOKEN.encode()).digest())


def _module(which: str):
    """"source": stellagw/auth/dpop.py run as plain Python; "compiled": the extension."""
    if which == "compiled":
        assert _impl.compiled("stellagw.auth.dpop"), "stellagw.auth.dpop is not built: make build"
        return importlib.import_module("stellagw.auth.dpop")
    if _impl.NO_EXTENSIONS:                 # the module imported is the source already
        return importlib.import_module("stellagw.auth.dpop")
    return uncompiled("stellagw.auth.dpop")


_MODULES = {}


@pytest.fixture(params=["source"] + ([] if _impl.NO_EXTENSIONS else ["compiled"]))
def mod(request):
    if request.param not in _MODULES:
        _MODULES[request.param] = _module(request.param)
    return _MODULES[request.param]


@pytest.fixture(scope="module")
def client():
    return DpopClient()


def check(verifier, proof, bound):
    """"ok" or the refusal's reason."""
    try:
        verifier.check(proof.encode(), "GET", URL, ATH, bound, NOW)
    except Refusal as refusal:
        return refusal.reason
    return "ok"


def proof_with(client, header_extra=None, jwk_extra=None, **claims):
    header = {"typ": "dpop+jwt", "alg": client.key.alg,
              "jwk": {**client.key.bare_jwk(), **(jwk_extra or {})}, **(header_extra or {})}
    payload = {"jti": os.urandom(8).hex(), "htm": "GET", "htu": URL, "iat": int(NOW),
               "ath": ATH, **claims}
    return sign_raw(client.key, header, payload)


@pytest.fixture
def builds(mod, monkeypatch):
    """How many key objects the module made from a JWK."""
    made = []
    real = jose.public_key_from_jwk

    def counting(jwk, alg):
        made.append(jwk)
        return real(jwk, alg)

    monkeypatch.setattr(mod, "public_key_from_jwk", counting)
    return made


# ------------------------------------------------------------------- what is kept

def test_a_key_is_made_once_and_kept_after_its_first_proof_passes(mod, client, builds):
    v = mod.DpopVerifier(("ES256",), 60.0, 8192)
    for _ in range(3):
        assert check(v, client.proof("GET", URL, TOKEN), client.jkt) == "ok"
    assert len(builds) == 1
    assert v.key_cache.thumbprints() == [client.jkt]


def test_without_the_cache_every_proof_makes_its_key(mod, client, builds):
    v = mod.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=0)
    for _ in range(3):
        assert check(v, client.proof("GET", URL, TOKEN), client.jkt) == "ok"
    assert len(builds) == 3 and len(v.key_cache) == 0


@pytest.mark.parametrize("fault", ["signature", "binding", "iat", "ath"])
def test_a_proof_that_fails_keeps_nothing(mod, client, builds, fault):
    v = mod.DpopVerifier(("ES256",), 60.0, 8192)
    proof = client.proof("GET", URL, TOKEN)
    bound = client.jkt
    if fault == "signature":
        proof = proof.rsplit(".", 1)[0] + "." + b64u(b"\x01" * 64)
    elif fault == "binding":
        bound = DpopClient().jkt
    elif fault == "iat":
        proof = proof_with(client, iat=int(NOW) - 3600)
    else:
        proof = proof_with(client, ath=ATH[::-1])
    assert check(v, proof, bound) != "ok"
    assert check(v, proof, bound) != "ok"
    assert len(v.key_cache) == 0 and len(builds) == 2    # each failure paid in full


def test_header_variants_of_one_key_take_one_slot_and_reuse_its_key(mod, client, builds):
    v = mod.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=4)
    for i in range(20):
        assert check(v, proof_with(client, header_extra={"kid": f"variant-{i}"}),
                     client.jkt) == "ok"
    assert v.key_cache.thumbprints() == [client.jkt]
    assert len(builds) == 1


# ------------------------------------------------------------------- correctness

@pytest.mark.parametrize("jwk_extra", [
    {"kid": "k1"}, {"use": "sig"}, {"alg": "ES256"}, {"key_ops": ["verify"]},
    {"x5c": ["not a certificate"]}, {"ext": True}])
def test_members_outside_the_thumbprint_change_nothing(mod, client, builds, jwk_extra):
    """The key object is made of the thumbprint's members only (RFC 7638 §3.2), so a header
    whose jwk adds others verifies like the plain one, cached or not."""
    cached = mod.DpopVerifier(("ES256",), 60.0, 8192)
    fresh = mod.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=0)
    assert check(cached, client.proof("GET", URL, TOKEN), client.jkt) == "ok"
    proof = proof_with(client, jwk_extra=jwk_extra)
    assert check(cached, proof, client.jkt) == check(fresh, proof, client.jkt) == "ok"
    assert len(builds) == 2                               # the cached one was reused
    forged = proof.rsplit(".", 1)[0] + "." + b64u(b"\x01" * 64)
    assert check(cached, forged, client.jkt) == check(fresh, forged, client.jkt) == "dpop_signature"


@pytest.mark.parametrize("header_extra, jwk_extra, reason", [
    ({}, {"d": b64u(b"\x01" * 32)}, "dpop_private_key"),
    ({}, {"kty": "oct"}, "dpop_private_key"),
    ({"alg": "EdDSA"}, {}, "dpop_alg_mismatch"),
    ({"alg": "ES384"}, {}, "dpop_alg"),
    ({"crit": ["exp"]}, {}, "dpop_malformed"),
    ({"typ": "jwt"}, {}, "dpop_typ"),
])
def test_a_known_key_in_a_bad_header_is_still_refused(mod, client, header_extra, jwk_extra,
                                                      reason):
    v = mod.DpopVerifier(("ES256", "EdDSA"), 60.0, 8192)
    assert check(v, client.proof("GET", URL, TOKEN), client.jkt) == "ok"
    assert check(v, proof_with(client, header_extra, jwk_extra), client.jkt) == reason
    assert v.key_cache.thumbprints() == [client.jkt]


def test_one_rsa_key_under_two_algs_keeps_one_key_object(mod, builds):
    key = SigningKey("RS256", kid=None)
    jwk = key.bare_jwk()
    v = mod.DpopVerifier(("RS256", "PS256"), 60.0, 8192)
    for alg in ("RS256", "PS256", "RS256"):
        payload = {"jti": os.urandom(8).hex(), "htm": "GET", "htu": URL, "iat": int(NOW),
                   "ath": ATH}
        proof = sign_raw(key, {"typ": "dpop+jwt", "alg": alg, "jwk": jwk}, payload, alg=alg)
        assert check(v, proof, key.jkt) == "ok"
    assert len(builds) == 1 and v.key_cache.thumbprints() == [key.jkt]


# ------------------------------------------------------------------- a flood

def test_a_flood_of_fresh_keys_evicts_and_spares_a_key_in_use(mod):
    """CLOCK: a key used since the hand last passed it stays; one seen once goes first."""
    capacity = 8
    v = mod.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=capacity)
    hot, cold = DpopClient(), DpopClient()
    assert check(v, hot.proof("GET", URL, TOKEN), hot.jkt) == "ok"
    assert check(v, cold.proof("GET", URL, TOKEN), cold.jkt) == "ok"
    for i in range(60):
        fresh = DpopClient()
        assert check(v, fresh.proof("GET", URL, TOKEN), fresh.jkt) == "ok"
        assert len(v.key_cache) <= capacity
        if i % 3 == 0:
            assert check(v, hot.proof("GET", URL, TOKEN), hot.jkt) == "ok"
        assert hot.jkt in v.key_cache.thumbprints()
    assert cold.jkt not in v.key_cache.thumbprints()
    assert len(v.key_cache) == capacity


# ------------------------------------------------------------------- the ECDSA check

@pytest.fixture(scope="module")
def ec_keys():
    return {alg: SigningKey(alg, kid=None) for alg in ("ES256", "ES384", "ES512")}


@given(alg=st.sampled_from(["ES256", "ES384", "ES512"]), data=st.data())
@settings(max_examples=300, deadline=None)
def test_ecdsa_check_answers_as_pyjwt(ec_keys, alg, data):
    key = ec_keys[alg]
    public = key.private.public_key()
    pyjwt = get_default_algorithms()[alg]
    message = data.draw(st.binary(max_size=64))
    good = pyjwt.sign(message, key.private)
    signature = data.draw(st.sampled_from([
        good, good[:-1], good + b"\x00", b"", b"\x00" * len(good), b"\xff" * len(good),
        good[len(good) // 2:] + good[:len(good) // 2],
    ]) | st.binary(max_size=140))
    if data.draw(st.booleans()):
        message += b"!"
    try:
        expected = pyjwt.verify(message, public, signature)
    except ValueError:                  # jose's old wrapper answered False for these
        expected = False
    assert jose.verify_signature(alg, public, message, signature) is expected


# ------------------------------------------------------------------- measurement

MEASURE = os.environ.get("STELLAGW_MEASURE_DPOP", "")


def _calls(mod) -> dict:
    """name → (one call, signature stubbed?), over one real proof: check() leaves replay to
    the Authenticator, so one proof can be checked any number of times."""
    client = DpopClient()
    proof = client.proof("GET", URL, TOKEN).encode()
    h, p, s = proof.split(b".")
    msg = h + b"." + p
    raw = jose.b64url_decode(s)
    public = client.key.private.public_key()
    jwk_key = jose.public_key_from_jwk(client.key.bare_jwk(), "ES256")
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    pyjwt = get_default_algorithms()["ES256"]
    cached = mod.DpopVerifier(("ES256",), 60.0, 8192)
    fresh = mod.DpopVerifier(("ES256",), 60.0, 8192, key_cache_size=0)
    jkt = client.jkt                    # a property that hashes: not inside the loop

    def check(v):
        return lambda: v.check(proof, "GET", URL, ATH, jkt, NOW)

    return {
        "bare: cryptography ES256 verify (DER)":
            (lambda: public.verify(der, msg, ec.ECDSA(hashes.SHA256())), False),
        "PyJWT ES256 verify (jose before)": (lambda: pyjwt.verify(msg, jwk_key, raw), False),
        "jose.verify_signature": (lambda: jose.verify_signature("ES256", jwk_key, msg, raw), False),
        "check, key cache": (check(cached), False),
        "check, no key cache (every key fresh)": (check(fresh), False),
        "check, key cache, signature stubbed": (check(cached), True),
        "check, no key cache, signature stubbed": (check(fresh), True),
    }


def _loop(mod, fn, stub: bool, n: int) -> float:
    """CPU-µs per call: this thread's CPU time, so other processes on the CPU count less."""
    saved = mod.verify_signature
    if stub:
        mod.verify_signature = lambda *a: True
    try:
        fn()                            # the cached verifier's one miss, outside the loop
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        return (time.thread_time() - t0) / n * 1e6
    finally:
        mod.verify_signature = saved


def _instructions(which: str, name: str, n: int) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    env.pop("STELLAGW_MEASURE_DPOP", None)
    run = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-m", "tests.auth.test_dpop_keys", which, name, str(n)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return int(re.search(r"Collected : (\d+)", run.stderr).group(1))


@pytest.mark.skipif(not MEASURE, reason="a measurement: STELLAGW_MEASURE_DPOP=time (pin it: "
                    "taskset -c 1) or =callgrind")
def test_measure(mod, request):
    """The figures of docs/auth.md. `time`: CPU-µs per call, median [range] of interleaved
    rounds, and × the bare verify of the same round. `callgrind`: instructions per call
    (a run of 400 calls minus a run of 100). The PyJWT row is what jose.verify_signature
    called before; "no key cache" pays on every proof what a key not seen before costs."""
    which = request.node.callspec.params["mod"]
    calls = _calls(mod)
    bare_name = next(iter(calls))
    if MEASURE == "callgrind":
        if shutil.which("valgrind") is None:
            pytest.skip("valgrind is not installed")
        per = {name: (_instructions(which, name, 400) - _instructions(which, name, 100)) / 300
               for name in calls}
        print(f"\n{mod.__name__} ({which}): instructions per call (callgrind)")
        for name, count in per.items():
            print(f"  {name:<42} {count:9,.0f}  {count / per[bare_name]:5.3f}×")
        return
    rounds, n = int(os.environ.get("ROUNDS", 15)), int(os.environ.get("N", 1000))
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, stub) in calls.items():
            times[name].append(_loop(mod, fn, stub, n))
    bare = times[bare_name]
    print(f"\n{mod.__name__} ({which}): {rounds} rounds of {n} calls, CPU {sorted(os.sched_getaffinity(0))}; "
          f"CPU-µs per call, median [range]; × the bare verify of the same round")
    for name, ts in times.items():
        # Each round beside its own bare verify: the machine's drift over the rounds cancels.
        ratios = [t / b for t, b in zip(ts, bare)]
        print(f"  {name:<42} {statistics.median(ts):7.2f} [{min(ts):6.2f} .. {max(ts):6.2f}]"
              f"  {statistics.median(ratios):5.3f}× [{min(ratios):.3f} .. {max(ratios):.3f}]")


if __name__ == "__main__":
    # One call of _calls, n times, for callgrind: python -m tests.auth.test_dpop_keys WHICH NAME N
    _mod = _module(sys.argv[1])
    _fn, _stub = _calls(_mod)[sys.argv[2]]
    _loop(_mod, _fn, _stub, int(sys.argv[3]))
