"""Stateless DPoP server nonces (RFC 9449 §8–9).

A nonce is base64url( issued_at (4 bytes, big-endian Unix seconds) || HMAC-SHA256(secret,
"stellagw dpop nonce v1" || issued_at)[:16] ): 27 characters of the NQCHAR-safe base64url
alphabet. Any instance holding the same secret accepts it while
`issued_at ∈ [now − lifetime, now + FUTURE_TOLERANCE]`, so no shared state is needed and a
nonce also fixes the proof's age in server time (§11.1) whatever the client's clock says.

The secret: `gateway.auth.dpopNonce.secret`, or, when empty, `PROCESS_SECRET`, made when this
module is imported. The supervisor imports the gateway (and so this module) before it
forks its workers, so every worker of one instance shares it; separate instances do not —
they need a configured secret (docs/auth.md).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import struct

from .jose import JoseError, b64url, b64url_decode

__all__ = ["NonceIssuer", "PROCESS_SECRET"]

PROCESS_SECRET = os.urandom(32)
_LABEL = b"stellagw dpop nonce v1\0"
FUTURE_TOLERANCE = 5.0     # seconds: instances' clocks differ a little
_LENGTH = 27               # base64url of 20 bytes


class NonceIssuer:
    __slots__ = ("_secret", "lifetime", "_cached_second", "_cached")

    def __init__(self, secret: str | bytes, lifetime: float):
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        self._secret = secret or PROCESS_SECRET
        self.lifetime = lifetime
        self._cached_second = -1
        self._cached = ""

    def _mac(self, stamp: bytes) -> bytes:
        return hmac.new(self._secret, _LABEL + stamp, hashlib.sha256).digest()[:16]

    def current(self, now: float) -> str:
        second = int(now)
        if second != self._cached_second:
            stamp = struct.pack(">I", second & 0xFFFFFFFF)
            self._cached = b64url(stamp + self._mac(stamp))
            self._cached_second = second
        return self._cached

    def age(self, nonce: object, now: float) -> float | None:
        """Seconds since the nonce was issued, or None when it is not a valid current nonce."""
        if not isinstance(nonce, str) or len(nonce) != _LENGTH:
            return None
        try:
            raw = b64url_decode(nonce.encode("ascii"))
        except (JoseError, UnicodeEncodeError):
            return None
        if len(raw) != 20:
            return None
        stamp, mac = raw[:4], raw[4:]
        if not hmac.compare_digest(mac, self._mac(stamp)):
            return None
        age = now - struct.unpack(">I", stamp)[0]
        if age > self.lifetime or age < -FUTURE_TOLERANCE:
            return None
        return age
