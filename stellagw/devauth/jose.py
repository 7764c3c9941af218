"""Small JOSE helpers shared by the development Authority and the DPoP client.

base64url without padding, RFC 7638 JWK thumbprints, RFC 8705 certificate thumbprints,
JWK <-> key conversion for the algorithms we use (ES256 / P-256, EdDSA / Ed25519, RS256) and
the Authority-side DPoP proof check (RFC 9449 §4.3, for the token endpoint only — the
gateway's resource-server validation lives in ``stellagw.auth``, not here).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from urllib.parse import urlsplit, urlunsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.api_jws import PyJWS
from jwt.exceptions import PyJWTError

DPOP_ALGS = ("ES256", "EdDSA")
_B64URL = re.compile(r"^[A-Za-z0-9_-]*$")
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_PROOF_LEN = 8192


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict: base64url alphabet only, no padding, no whitespace."""
    if not isinstance(text, str) or not _B64URL.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _int_b64(n: int, length: int | None = None) -> str:
    length = length or max(1, (n.bit_length() + 7) // 8)
    return b64url(n.to_bytes(length, "big"))


def public_jwk(key) -> dict:
    """Public JWK members (only the public ones) for a private or public key object."""
    if hasattr(key, "public_key"):
        key = key.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("only P-256 EC keys are supported")
        nums = key.public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": _int_b64(nums.x, 32), "y": _int_b64(nums.y, 32)}
    if isinstance(key, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        return {"kty": "OKP", "crv": "Ed25519",
                "x": b64url(key.public_bytes(Encoding.Raw, PublicFormat.Raw))}
    if isinstance(key, rsa.RSAPublicKey):
        nums = key.public_numbers()
        return {"kty": "RSA", "n": _int_b64(nums.n), "e": _int_b64(nums.e)}
    raise ValueError(f"unsupported key type {type(key).__name__}")


_REQUIRED = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638: SHA-256 over the required members, lexicographic order, no whitespace."""
    members = _REQUIRED.get(jwk.get("kty"))
    if members is None:
        raise ValueError(f"unsupported kty {jwk.get('kty')!r}")
    canon = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True,
                       ensure_ascii=False)
    return b64url(hashlib.sha256(canon.encode("utf-8")).digest())


def cert_thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (no padding) of SHA-256 over the DER certificate."""
    return b64url(hashlib.sha256(der).digest())


def access_token_hash(token: str) -> str:
    """RFC 9449 §4.2 ``ath``."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def key_from_public_jwk(jwk: dict, alg: str):
    """A public key object for a DPoP proof's ``jwk`` header, consistent with ``alg``."""
    if not isinstance(jwk, dict):
        raise ValueError("jwk is not an object")
    if _PRIVATE_MEMBERS & set(jwk):
        raise ValueError("jwk contains private key material")
    if alg == "ES256":
        if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256":
            raise ValueError("ES256 needs an EC P-256 jwk")
        x, y = b64url_decode(jwk.get("x", "")), b64url_decode(jwk.get("y", ""))
        if len(x) != 32 or len(y) != 32:
            raise ValueError("bad P-256 coordinates")
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                             ec.SECP256R1()).public_key()
    if alg == "EdDSA":
        if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise ValueError("EdDSA needs an OKP Ed25519 jwk")
        x = b64url_decode(jwk.get("x", ""))
        if len(x) != 32:
            raise ValueError("bad Ed25519 key")
        return ed25519.Ed25519PublicKey.from_public_bytes(x)
    raise ValueError(f"alg {alg!r} not allowed")


def _no_dupes(pairs):
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise ValueError(f"duplicate member {k!r}")
        obj[k] = v
    return obj


def parse_json_segment(seg: str) -> dict:
    obj = json.loads(b64url_decode(seg).decode("utf-8"), object_pairs_hook=_no_dupes)
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def normalize_htu(url: str) -> str:
    """RFC 3986 syntax/scheme normalisation for htu comparison; query and fragment dropped."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    port = parts.port
    if ":" in host:
        host = f"[{host}]"
    if port is not None and (scheme, port) not in (("http", 80), ("https", 443)):
        host = f"{host}:{port}"
    return urlunsplit((scheme, host, parts.path or "/", "", ""))


class ProofError(Exception):
    """A DPoP proof was rejected; the message is safe to return as error_description."""


def verify_proof(proof: str, *, method: str, url: str, now: float | None = None,
                 max_skew: int = 30, access_token: str | None = None,
                 algorithms=DPOP_ALGS) -> tuple[dict, dict]:
    """Check one DPoP proof (RFC 9449 §4.3 items 2–9, 11, 12a). Returns (header, claims).

    Replay (jti) and nonce checks are the caller's: they need state.
    """
    if not isinstance(proof, str) or len(proof) > MAX_PROOF_LEN:
        raise ProofError("proof too large")
    parts = proof.split(".")
    if len(parts) != 3 or not all(parts):
        raise ProofError("not a compact JWS")
    try:
        header = parse_json_segment(parts[0])
        claims = parse_json_segment(parts[1])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProofError(f"malformed proof: {exc}") from None
    if header.get("typ") != "dpop+jwt":
        raise ProofError("typ must be dpop+jwt")
    alg = header.get("alg")
    if alg not in algorithms:
        raise ProofError(f"alg {alg!r} not allowed")
    if "crit" in header:
        raise ProofError("crit not supported")
    try:
        key = key_from_public_jwk(header.get("jwk"), alg)
    except ValueError as exc:
        raise ProofError(f"bad jwk: {exc}") from None
    try:
        PyJWS().decode_complete(proof, key=key, algorithms=[alg])
    except PyJWTError:
        raise ProofError("signature does not verify") from None
    for name in ("jti", "htm", "htu", "iat"):
        if name not in claims:
            raise ProofError(f"missing claim {name}")
    jti = claims["jti"]
    if not isinstance(jti, str) or not 0 < len(jti) <= 256:
        raise ProofError("bad jti")
    if claims["htm"] != method:
        raise ProofError("htm does not match")
    htu = claims["htu"]
    try:
        if not isinstance(htu, str) or normalize_htu(htu) != normalize_htu(url):
            raise ProofError("htu does not match")
    except ValueError:
        raise ProofError("bad htu") from None
    iat = claims["iat"]
    if not isinstance(iat, (int, float)) or isinstance(iat, bool):
        raise ProofError("bad iat")
    now = time.time() if now is None else now
    if abs(now - iat) > max_skew:
        raise ProofError("iat outside the acceptance window")
    if access_token is not None:
        import hmac
        if not hmac.compare_digest(str(claims.get("ath", "")), access_token_hash(access_token)):
            raise ProofError("ath does not match")
    return header, claims
