"""Strict JOSE pieces shared by access tokens, DPoP proofs and the key store.

Everything here is about *not* being lenient (RFC 8725, docs/security.md §3b):

- compact JWS only: three base64url parts, alphabet checked before decoding (the stdlib
  decoder silently skips characters outside it), no padding, no whitespace;
- JSON objects only, UTF-8 only, duplicate members refused (so no two parsers can ever
  disagree on which duplicate wins), no NaN/Infinity;
- an algorithm is only ever paired with a key of the matching type: `ES256` ⇔ EC P-256,
  `RS*`/`PS*` ⇔ RSA (2048 to 8192 bits, e < 2^31), `EdDSA` ⇔ OKP Ed25519/Ed448. HMAC does
  not exist here.

Signature checks use PyJWT's algorithm objects (its PSS salt length is the audited one),
except ECDSA's: every DPoP proof is one, and PyJWT's wrapper (a hex round trip per integer,
a new ECDSA object per call) cost ~20k instructions beside cryptography's own ~870k, so ES*
calls cryptography directly with PyJWT's raw→DER conversion (docs/auth.md, "The proof key
cache"). Key objects are cryptography public keys, never bytes, so a public key can never
be reused as an HMAC secret (CVE-2022-29217 class).
"""
from __future__ import annotations

import hashlib
import json
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from jwt.algorithms import get_default_algorithms
from jwt.exceptions import PyJWTError

from .. import _impl

# base64url is a codec (docs/hot-path.md): cext/b64url.pyx, or its twin stellagw/_py/b64url.py
# (the one to read). Its functions answer None where the ones here raise JoseError; the
# DPoP check calls them as they are (`codec`), with no wrapper in between.
if _impl.NO_EXTENSIONS:
    from .._py import b64url as codec
else:
    try:
        from .._cext import b64url as codec
    except ImportError as exc:
        _impl.fell_back("b64url", exc)
        from .._py import b64url as codec

__all__ = [
    "JoseError", "b64url", "b64url_decode", "split_compact", "split_parts", "json_object",
    "json_object_fast", "codec",
    "ALG_KEY_TYPES", "key_matches_alg", "public_key_from_jwk", "jwk_thumbprint",
    "verify_signature", "PRIVATE_MEMBERS",
]

_PART = re.compile(rb"[A-Za-z0-9_-]+")
_ALGORITHMS = get_default_algorithms()

# alg -> (kty, allowed crv values or None)
ALG_KEY_TYPES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "ES256": ("EC", ("P-256",)), "ES384": ("EC", ("P-384",)), "ES512": ("EC", ("P-521",)),
    "RS256": ("RSA", None), "RS384": ("RSA", None), "RS512": ("RSA", None),
    "PS256": ("RSA", None), "PS384": ("RSA", None), "PS512": ("RSA", None),
    "EdDSA": ("OKP", ("Ed25519", "Ed448")),
}

# Members that only a private (or symmetric) JWK has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_MEMBERS = frozenset(("d", "p", "q", "dp", "dq", "qi", "oth", "k"))

# RFC 7638 §3.2: the required members of each key type, in lexicographic order.
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                       "OKP": ("crv", "kty", "x")}

MIN_RSA_BITS = 2048
# An RSA check costs with the modulus and the exponent, both of the key's choosing — a DPoP
# proof's key is the client's, and its signature is checked before the binding to the
# token: a 3072-bit key with a 3000-bit exponent took 5.8 ms a proof (65537: 0.06 ms), a
# 16384-bit one 1 ms (an adversarial probe). Keys in use are 2048-4096 bits with e = 65537;
# the exponent's bound is Go's crypto/rsa's.
MAX_RSA_BITS = 8192
MAX_RSA_EXPONENT = (1 << 31) - 1

_decode = codec.decode
_split = codec.split
_json_object = codec.json_object
b64url = codec.encode      # base64url without padding, as str


class JoseError(ValueError):
    """Malformed or unacceptable JOSE input; the message is safe to show (no input echoed)."""


def b64url_decode(part: bytes) -> bytes:
    """Strict base64url: the URL-safe alphabet only, no padding, no whitespace, non-empty."""
    raw = _decode(part)
    if raw is None:
        raise JoseError("not base64url")
    return raw


def split_compact(token: bytes) -> tuple[bytes, bytes, bytes]:
    """header, payload, signature segments of a compact JWS (JWE has five parts: refused)."""
    parts = token.split(b".")
    if len(parts) != 3:
        raise JoseError("not a compact JWS")
    header, payload, signature = parts
    for part in parts:
        if not _PART.fullmatch(part):
            raise JoseError("not a compact JWS")
    return header, payload, signature


def split_parts(token: bytes) -> tuple[bytes, bytes, bytes]:
    """Like split_compact, leaving the alphabet to whoever decodes each part (b64url_decode
    checks it, and a DPoP proof's header is looked up by its exact bytes before that)."""
    parts = _split(token)
    if parts is None:
        raise JoseError("not a compact JWS")
    return parts


def _object_without_duplicates(pairs: list) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise JoseError("duplicate JSON member")
    return obj


def _no_constants(name: str):
    raise JoseError("NaN/Infinity are not JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_object_without_duplicates,
                            parse_constant=_no_constants)


def json_object(segment: bytes) -> dict:
    """A base64url segment → a JSON object, strictly."""
    raw = b64url_decode(segment)
    try:
        obj = _DECODER.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise JoseError("not a JSON object") from None
    if not isinstance(obj, dict):
        raise JoseError("not a JSON object")
    return obj


def json_object_fast(segment: bytes) -> dict:
    """Like json_object, with orjson: for DPoP proof payloads, parsed on every request.

    orjson keeps the last of duplicate members instead of refusing them; that is the
    allowed alternative of docs/security.md §3b ("take lexically last — never mix") because a proof
    payload is read by this one parser only, never by a second one that could disagree.
    It refuses invalid UTF-8 and NaN/Infinity like the strict parser.
    """
    obj = _json_object(segment)
    if obj is None:
        raise JoseError("not base64url" if _decode(segment) is None else "not a JSON object")
    return obj


def key_matches_alg(jwk: dict, alg: str) -> bool:
    expected = ALG_KEY_TYPES.get(alg)
    if expected is None:
        return False
    kty, curves = expected
    return jwk.get("kty") == kty and (curves is None or jwk.get("crv") in curves)


def public_key_from_jwk(jwk: dict, alg: str):
    """The cryptography public key of a public JWK usable with `alg`, or JoseError."""
    if not isinstance(jwk, dict):
        raise JoseError("jwk is not an object")
    if PRIVATE_MEMBERS.intersection(jwk) or jwk.get("kty") == "oct":
        raise JoseError("jwk contains private or symmetric key material")
    if not key_matches_alg(jwk, alg):
        raise JoseError("alg does not match the key type")
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    if not all(isinstance(jwk.get(m), str) and jwk[m] for m in members):
        raise JoseError("jwk lacks a required member")
    try:
        key = _ALGORITHMS[alg].from_jwk(jwk)
    except (PyJWTError, ValueError, TypeError, KeyError):
        raise JoseError("jwk is not a valid public key") from None
    if hasattr(key, "private_bytes"):   # belt and braces: from_jwk never gets here with "d"
        raise JoseError("jwk contains private key material")
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise JoseError("RSA key shorter than 2048 bits")
        if key.key_size > MAX_RSA_BITS or key.public_numbers().e > MAX_RSA_EXPONENT:
            raise JoseError("RSA key longer than 8192 bits or with an exponent above 2^31 - 1")
    return key


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638 SHA-256 thumbprint, base64url: the `jkt` of RFC 9449 §6.1."""
    members = _THUMBPRINT_MEMBERS.get(jwk.get("kty"))
    if members is None or not all(isinstance(jwk.get(m), str) for m in members):
        raise JoseError("jwk cannot be thumbprinted")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"),
                           sort_keys=True, ensure_ascii=False)
    return b64url(hashlib.sha256(canonical.encode("utf-8")).digest())


# Immutable, so made once.
_ECDSA = {"ES256": ec.ECDSA(hashes.SHA256()), "ES384": ec.ECDSA(hashes.SHA384()),
          "ES512": ec.ECDSA(hashes.SHA512())}


def verify_signature(alg: str, key, signing_input: bytes, signature: bytes) -> bool:
    ecdsa = _ECDSA.get(alg)
    try:
        if ecdsa is None:
            return _ALGORITHMS[alg].verify(signing_input, key, signature)
        # RFC 7518 §3.4: R and S, each the curve's size, big-endian; cryptography wants DER.
        # The size is the key's, as PyJWT takes it.
        size = (key.curve.key_size + 7) // 8
        if len(signature) != 2 * size:
            return False
        key.verify(encode_dss_signature(int.from_bytes(signature[:size], "big"),
                                        int.from_bytes(signature[size:], "big")),
                   signing_input, ecdsa)
        return True
    except (InvalidSignature, PyJWTError, ValueError, TypeError):
        return False
