"""base64url for JOSE (pure Python): strict decoding, encoding, a compact JWS's three parts.

The twin of cext/b64url.pyx (stellagw._cext.b64url), and the one to read: the compiled one
answers the same on every input (tests/codecs/test_dpop_twins.py). stellagw/auth/jose.py chooses
one and raises JoseError where these answer None.
"""
from __future__ import annotations

import binascii

import orjson

__all__ = ["decode", "encode", "split", "json_object"]

# binascii directly: the base64 module's url-safe wrappers cost a microsecond a call.
_TO_STD = bytes.maketrans(b"-_", b"+/")
_TO_URL = bytes.maketrans(b"+/", b"-_")
_PAD = (b"", b"", b"==", b"=")


def decode(part: bytes) -> bytes | None:
    """Strict base64url: the URL-safe alphabet only, no padding, no whitespace, non-empty;
    None when it is not that.

    The alphabet is checked by a2b_base64's strict mode once "-_" are mapped to "+/": all
    that is left to refuse by hand is the standard alphabet's own "+/" and padding (a
    regular expression over the part cost more than the decoding). Strict mode ignores the
    unused low bits of the last character ("QR" and "QQ" are both b"A").
    """
    if not part or len(part) % 4 == 1 or b"+" in part or b"/" in part or b"=" in part:
        return None
    try:
        return binascii.a2b_base64(part.translate(_TO_STD) + _PAD[len(part) % 4], strict_mode=True)
    except (binascii.Error, ValueError):
        return None


def encode(data: bytes) -> str:
    """base64url without padding, as str."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URL).rstrip(b"=").decode("ascii")


def split(token: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(header, payload, signature): the three non-empty parts between two dots, or None.
    Their alphabet is left to whoever decodes each."""
    parts = token.split(b".")
    if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2]:
        return None
    return parts[0], parts[1], parts[2]


def json_object(part: bytes) -> dict | None:
    """A base64url part holding a JSON object → the dict (orjson), or None."""
    raw = decode(part)
    if raw is None:
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
