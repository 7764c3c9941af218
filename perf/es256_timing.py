"""One ES256 verification, timed in this process: the gateway's own
``stellagw.auth.jose.verify_signature``, pyjwt's and bare ``cryptography``'s, over one fresh
DPoP proof. The scorecard (auth part) runs it pinned to the server CPU and subtracts it from
the DPoP request's cost: "everything but the signature" by subtraction.

    taskset -c 0 python -m perf es256-timing      # one JSON line, µs per verification

Each figure is the median of 7 timeit repeats of 1,000 verifications.
"""
from __future__ import annotations

import argparse
import base64
import json
import statistics
import timeit

from . import commands


def median_us(fn, n: int = 1000) -> float:
    assert fn()      # a verification that fails would time the error path
    return statistics.median(timeit.repeat(fn, number=n, repeat=7)) / n * 1e6


def timings() -> dict:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    from jwt.algorithms import ECAlgorithm

    from stellagw.devauth import DpopKey

    key = DpopKey.generate("ES256")
    proof = key.proof("GET", "http://127.0.0.1:1/bench/hello", "token")
    h, p, s = proof.split(".")
    msg = f"{h}.{p}".encode()
    sig = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    out: dict = {}
    # The gateway's path is reported as an error rather than failing the run: the other two
    # still give the order of magnitude when its API changes.
    try:
        from stellagw.auth.jose import public_key_from_jwk, verify_signature
        pub = public_key_from_jwk(key.public_jwk(), "ES256")
        out["gateway_verify_signature_us"] = median_us(
            lambda: verify_signature("ES256", pub, msg, sig))
        out["how"] = "stellagw.auth.jose.verify_signature('ES256', public_key_from_jwk(jwk), ...)"
    except Exception as exc:
        out["gateway_verify_signature_error"] = repr(exc)
    pub2 = key.private_key.public_key()
    alg = ECAlgorithm(ECAlgorithm.SHA256)
    out["pyjwt_us"] = median_us(lambda: alg.verify(msg, pub2, sig))
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))

    def bare() -> bool:
        pub2.verify(der, msg, ec.ECDSA(hashes.SHA256()))
        return True

    out["cryptography_us"] = median_us(bare)
    return out


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog=commands.prog(__name__),
                            description=__doc__.split("\n\n")[0]).parse_args(argv)
    print(json.dumps(timings()))
    return 0
