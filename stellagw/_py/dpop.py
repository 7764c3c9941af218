"""DPoP proof checks (pure Python; the checks are listed in stellagw/auth/dpop.py).

Every DPoP request runs `DpopVerifier.check`, so it is compiled (cext/dpop.pyx →
stellagw._cext.dpop) with this module as its twin, the one to read; both are tested with
the same suite and against each other (tests/test_auth_dpop.py, tests/test_dpop_twins.py).
Functions are called through this module's globals, in the compiled twin too, so a test
(or perf/stub_signature) can replace one on the selected module.
"""
from __future__ import annotations

import hmac

from stellagw.auth.errors import Refusal
from stellagw.auth.jose import (JoseError, PRIVATE_MEMBERS, b64url_decode, json_object,
                                json_object_fast, jwk_thumbprint, key_matches_alg,
                                public_key_from_jwk, split_parts, verify_signature)
from stellagw.auth.replay import replay_key
from stellagw.auth.uri import normalize_uri

__all__ = ["DpopVerifier", "ProofResult", "ProofKeyCache", "MAX_JTI_CHARS"]

MAX_JTI_CHARS = 256
KEY_CACHE_SIZE = 4096
REPLAY_GRACE_MS = 5000     # keep jtis a little past the window: instance clocks differ

INVALID = "invalid_dpop_proof"


def _refuse(message: str, reason: str) -> Refusal:
    return Refusal(INVALID, message, reason)


class ProofResult:
    __slots__ = ("jkt", "replay_key", "ttl_ms", "nonce_age")

    def __init__(self, jkt, replay_key, ttl_ms, nonce_age):
        self.jkt = jkt
        self.replay_key = replay_key
        self.ttl_ms = ttl_ms
        self.nonce_age = nonce_age       # seconds, or None when nonces are off


class _Key:
    __slots__ = ("header", "alg", "key", "jkt", "used")

    def __init__(self, header, alg, key, jkt):
        self.header = header
        self.alg = alg
        self.key = key
        self.jkt = jkt
        self.used = False


class ProofKeyCache:
    """The client keys whose proofs passed every check, by RFC 7638 thumbprint, each with
    the exact header text it last came in (docs/auth.md, "The proof key cache").

    Only a proof that passed is admitted, and a thumbprint has one entry whatever headers
    it comes in, so filling the cache takes keys the Authority bound tokens to and proofs
    signed by each; at `capacity` a newcomer evicts (CLOCK: an entry used since the hand
    last passed it is spared once, a key seen once is the first to go). `capacity` 0: off.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._by_header: dict[bytes, _Key] = {}
        self._by_jkt: dict[str, _Key] = {}
        self._ring: list[_Key] = []
        self._hand = 0

    def __len__(self) -> int:
        return len(self._ring)

    def thumbprints(self) -> list[str]:
        """In slot order: two caches fed the same proofs hold the same list."""
        return [entry.jkt for entry in self._ring]

    def get(self, header: bytes) -> _Key | None:
        return self._by_header.get(header)

    def key(self, jkt: str):
        """The key object of a thumbprint whose proofs passed, or None.

        The thumbprint covers every member a key object is made of (RFC 7638 §3.2: kty,
        crv, x, y / kty, n, e / crv, kty, x); whatever else a header carries (its alg,
        private or extra members) is checked on the header before this is asked."""
        entry = self._by_jkt.get(jkt)
        return None if entry is None else entry.key

    def passed(self, header: bytes, alg: str, key, jkt: str) -> None:
        """A proof with this header passed every check."""
        entry = self._by_jkt.get(jkt)
        if entry is not None:
            entry.used = True
            if entry.header != header:
                # The key moves to its new header: header variants of one key never take
                # more than its one slot.
                del self._by_header[entry.header]
                entry.header, entry.alg = header, alg
                self._by_header[header] = entry
            return
        if self.capacity <= 0:
            return
        entry = _Key(header, alg, key, jkt)
        ring = self._ring
        if len(ring) < self.capacity:
            ring.append(entry)
        else:
            hand = self._hand
            while ring[hand].used:
                ring[hand].used = False
                hand = (hand + 1) % self.capacity
            old = ring[hand]
            del self._by_header[old.header]
            del self._by_jkt[old.jkt]
            ring[hand] = entry
            self._hand = (hand + 1) % self.capacity
        self._by_header[header] = entry
        self._by_jkt[jkt] = entry


class DpopVerifier:
    def __init__(self, algorithms, max_clock_skew: float, max_bytes: int, nonces=None,
                 key_cache_size: int = KEY_CACHE_SIZE):
        """`key_cache_size`: how many client keys ProofKeyCache keeps; 0: none, every header
        is parsed and its key made, as for a key never seen."""
        self._algorithms = frozenset(algorithms)
        self._skew = max_clock_skew
        self._max_bytes = max_bytes
        self.nonces = nonces
        self.key_cache = ProofKeyCache(key_cache_size)

    # ------------------------------------------------------------------ header

    def _header(self, segment: bytes) -> tuple:
        """The header's checks, for a header not in the cache: (alg, key, jkt)."""
        try:
            header = json_object(segment)
        except JoseError:
            raise _refuse("DPoP proof header is not a JSON object", "dpop_malformed") from None
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() != "dpop+jwt":
            raise _refuse("DPoP proof typ must be dpop+jwt", "dpop_typ")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            # none and every MAC are never on the list (config refuses them).
            raise _refuse("DPoP proof alg is not an accepted asymmetric algorithm", "dpop_alg")
        if "crit" in header:
            raise _refuse("DPoP proof has critical header parameters", "dpop_malformed")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise _refuse("DPoP proof lacks its public jwk", "dpop_jwk")
        if PRIVATE_MEMBERS.intersection(jwk) or jwk.get("kty") == "oct":
            raise _refuse("DPoP proof jwk contains a private key", "dpop_private_key")
        if not key_matches_alg(jwk, alg):
            raise _refuse("DPoP proof alg does not match its jwk", "dpop_alg_mismatch")
        try:
            jkt = jwk_thumbprint(jwk)
            key = self.key_cache.key(jkt)
            if key is None:
                key = public_key_from_jwk(jwk, alg)
        except JoseError:
            raise _refuse("DPoP proof jwk is not a valid public key", "dpop_jwk") from None
        return alg, key, jkt

    # ------------------------------------------------------------------ the checks

    def check(self, proof: bytes, method: str, expected_htu: str, ath: str,
              bound_jkt: str | None, now: float) -> ProofResult:
        """All proof checks but replay; raises Refusal. `expected_htu` is origin + raw path."""
        if len(proof) > self._max_bytes:
            raise _refuse("DPoP proof is too large", "dpop_too_large")
        try:
            h, p, s = split_parts(proof)
        except JoseError:
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed") from None
        known = self.key_cache.get(h)
        if known is None:
            alg, key, jkt = self._header(h)
        else:
            alg, key, jkt = known.alg, known.key, known.jkt

        try:
            signature = b64url_decode(s)
        except JoseError:
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed") from None
        if not verify_signature(alg, key, proof[:len(h) + 1 + len(p)], signature):
            raise _refuse("DPoP proof signature is invalid", "dpop_signature")

        try:
            claims = json_object_fast(p)
        except JoseError:
            raise _refuse("DPoP proof payload is not a JSON object", "dpop_malformed") from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_CHARS:
            raise _refuse("DPoP proof jti is missing or longer than 256 characters", "dpop_jti")
        htm = claims.get("htm")
        htu = claims.get("htu")
        iat = claims.get("iat")
        if (not isinstance(htm, str) or not isinstance(htu, str)
                or not isinstance(iat, (int, float)) or isinstance(iat, bool)):
            raise _refuse("DPoP proof lacks htm, htu or iat", "dpop_claims")

        if htm != method:
            raise _refuse("DPoP proof htm does not match the request method", "dpop_htm")
        if htu != expected_htu:
            normalized = normalize_uri(htu)
            if normalized is None or normalized != normalize_uri(expected_htu):
                raise _refuse("DPoP proof htu does not match the request URI", "dpop_htu")
        skew = self._skew
        if not (now - skew <= iat <= now + skew):
            raise _refuse("DPoP proof iat is outside the acceptance window", "dpop_iat")

        proof_ath = claims.get("ath")
        if not isinstance(proof_ath, str):
            raise _refuse("DPoP proof lacks ath", "dpop_ath")
        if not hmac.compare_digest(proof_ath.encode("utf-8"), ath.encode("ascii")):
            raise _refuse("DPoP proof ath does not match the access token", "dpop_ath")

        if bound_jkt is not None and not hmac.compare_digest(jkt.encode(), bound_jkt.encode("utf-8")):
            # RFC 9449 §7.1's own example answer for this case.
            raise Refusal("invalid_token", "Invalid DPoP key binding", "dpop_jkt_mismatch")

        nonce_age = None
        if self.nonces is not None:
            nonce = claims.get("nonce")
            if nonce is None:
                raise Refusal("use_dpop_nonce", "Resource server requires nonce in DPoP proof",
                              "dpop_nonce_missing")
            nonce_age = self.nonces.age(nonce, now)
            if nonce_age is None:
                raise Refusal("use_dpop_nonce", "DPoP proof nonce is invalid or expired",
                              "dpop_nonce_invalid")

        # Only now: a key is kept once a proof it signed passed, bound to the token.
        self.key_cache.passed(h, alg, key, jkt)
        ttl_ms = max(1000, int((iat + skew - now) * 1000) + REPLAY_GRACE_MS)
        return ProofResult(jkt, replay_key(jkt, jti), ttl_ms, nonce_age)
