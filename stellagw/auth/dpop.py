# cython: infer_types=True
"""DPoP proof checks at a resource server (RFC 9449 §4.3, §7; docs/security.md §3a).

`DpopVerifier.check()` runs every §4.3 check on one proof, in this order (the RFC allows
any order; this one does the cheap and structural checks first and the replay store last,
so a request that fails anything else never consumes its `jti`):

 1. size cap (`maxTokenBytes`) before any parsing       §4.3 (2); docs/security.md §3a item 5
 2. one compact JWS: three base64url parts, strict alphabet               §4.3 (2)
 3. header: JSON object, `typ` == dpop+jwt, `alg` on our asymmetric
    allow-list, no `crit`, `jwk` an object with no private members,
    `alg` consistent with the jwk's kty/crv                                §4.3 (3)(4)(5)(7)
 4. thumbprint(jwk) == the token's `cnf.jkt`, constant time, before the
    signature: a proof signed with another key than the token's (a stolen
    token, a key of the client's choosing) costs no signature check        §6.1, §7
 5. signature with the header's `jwk` only (never kid/jku/x5u/x5c)          §4.3 (6)
 6. payload: `jti` (≤ 256 chars), `htm`, `htu`, `iat` present, typed        §4.3 (3), §11.1
 7. `htm` == request method (case-sensitive)                               §4.3 (8)
 8. `htu` == configured public origin + the path the client sent, both
    normalised (RFC 3986 §6.2.2/§6.2.3), query and fragment ignored         §4.3 (9)
 9. `iat` within ± dpopMaxClockSkew                                         §4.3 (11)
10. `ath` == base64url(SHA-256(access token)), constant time                §4.3 (12), §7
11. `nonce` valid, when nonces are on                                       §4.3 (10), §9, §11.3
 (12. `jti` not seen before: done by the Authenticator with the replay caches) §11.1

Client keys are cached (`ProofKeyCache`, docs/auth.md "The proof key cache"): a client
signs every proof with one key and sends the same header, so JSON parsing, key construction
and the thumbprint happen once per client key; the signature check runs on every proof. A
key is kept by its RFC 7638 thumbprint, with the exact header text it last came in, once a
proof it signed has passed every check; a bounded number of keys (CLOCK eviction).

One source (docs/hot-path.md): every DPoP request runs `check()`, so this file is compiled
by Cython in pure-Python mode (setup.py GLUE), typed through dpop.pxd beside it: the
classes are extension types, the steps between them C calls. STELLAGW_NO_EXTENSIONS=1 runs
it as it reads. What works on pointers, base64url and the split of the compact JWS, is the
codec jose.py chooses (cext/b64url.pyx, twin stellagw/_py/b64url.py); its functions answer
None where jose's raise, so the check calls them with no wrapper in between. Values from
the proof stay Python objects, so every comparison means what it means uncompiled (an
`iat` of any size); a claim that must be a string is typed `str` only once `_text` found
one. `verify_signature` and `public_key_from_jwk` are called through this module's
globals, compiled too, so a test (or perf/stub_signature) can replace one here.
"""
from __future__ import annotations

import hashlib
from hmac import compare_digest

from .errors import Refusal
from .jose import (PRIVATE_MEMBERS, JoseError, codec, json_object, jwk_thumbprint,
                   key_matches_alg, public_key_from_jwk, verify_signature)
from .uri import normalize_uri

__all__ = ["DpopVerifier", "ProofResult", "ProofKeyCache", "normalize_uri", "MAX_JTI_CHARS"]

MAX_JTI_CHARS = 256
KEY_CACHE_SIZE = 4096
REPLAY_GRACE_MS = 5000     # keep jtis a little past the window: instance clocks differ

INVALID = "invalid_dpop_proof"

# C values and objects when compiled (dpop.pxd): no module dictionary on the way.
_MAX_JTI_CHARS = MAX_JTI_CHARS
_REPLAY_GRACE_MS = REPLAY_GRACE_MS
_sha256 = hashlib.sha256
_split = codec.split
_decode = codec.decode
_json_object = codec.json_object
_b64url = codec.encode


def _refuse(message, reason):
    return Refusal(INVALID, message, reason)


def _text(claims, name):
    """The claim `name` when it is a string, else None (compiled: a str from here on, so
    its comparisons, length and encoding are C calls)."""
    value = claims.get(name)
    return value if isinstance(value, str) else None


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
        self._by_header = {}            # bytes -> _Key
        self._by_jkt = {}               # str -> _Key
        self._ring = []                 # the _Keys in slot order
        self._hand = 0

    def __len__(self):
        return len(self._ring)

    def thumbprints(self):
        """In slot order: two caches fed the same proofs hold the same list."""
        found = []
        for entry in self._ring:
            found.append(entry.jkt)
        return found

    def get(self, header):
        return self._by_header.get(header)

    def key(self, jkt):
        """The key object of a thumbprint whose proofs passed, or None.

        The thumbprint covers every member a key object is made of (RFC 7638 §3.2: kty,
        crv, x, y / kty, n, e / crv, kty, x); whatever else a header carries (its alg,
        private or extra members) is checked on the header before this is asked."""
        entry = self._by_jkt.get(jkt)
        return None if entry is None else entry.key

    def passed(self, header, alg, key, jkt):
        """A proof with this header passed every check."""
        entry = self._by_jkt.get(jkt)
        if entry is not None:
            entry.used = True
            if entry.header != header:
                # The key moves to its new header: header variants of one key never take
                # more than its one slot.
                del self._by_header[entry.header]
                entry.header = header
                entry.alg = alg
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
            old = ring[hand]
            while old.used:
                old.used = False
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

    def _header(self, segment):
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

    def check(self, proof, method, expected_htu, ath, bound_jkt, now):
        """All proof checks but replay; raises Refusal. `proof` is bytes; `method`,
        `expected_htu` (origin + raw path) and `ath` str; `bound_jkt` str or None; `now` the
        wall clock in seconds (the types dpop.pxd gives them when compiled)."""
        if len(proof) > self._max_bytes:
            raise _refuse("DPoP proof is too large", "dpop_too_large")
        parts = _split(proof)
        if parts is None:
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed")
        h, p, s = parts
        known = self.key_cache.get(h)
        if known is None:
            alg, key, jkt = self._header(h)
        else:
            alg, key, jkt = known.alg, known.key, known.jkt
        if bound_jkt is not None and not compare_digest(jkt.encode(), bound_jkt.encode("utf-8")):
            # RFC 9449 §7.1's own example answer for this case.
            raise Refusal("invalid_token", "Invalid DPoP key binding", "dpop_jkt_mismatch")

        signature = _decode(s)
        if signature is None:
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed")
        if not verify_signature(alg, key, proof[:len(h) + 1 + len(p)], signature):
            raise _refuse("DPoP proof signature is invalid", "dpop_signature")

        claims = _json_object(p)
        if claims is None:
            raise _refuse("DPoP proof payload is not a JSON object", "dpop_malformed")
        jti = _text(claims, "jti")
        if not jti or len(jti) > _MAX_JTI_CHARS:
            raise _refuse("DPoP proof jti is missing or longer than 256 characters", "dpop_jti")
        htm = _text(claims, "htm")
        htu = _text(claims, "htu")
        iat = claims.get("iat")
        if (htm is None or htu is None
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

        proof_ath = _text(claims, "ath")
        if proof_ath is None:
            raise _refuse("DPoP proof lacks ath", "dpop_ath")
        if not compare_digest(proof_ath.encode("utf-8"), ath.encode("ascii")):
            raise _refuse("DPoP proof ath does not match the access token", "dpop_ath")

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
        ttl_ms = max(1000, int((iat + skew - now) * 1000) + _REPLAY_GRACE_MS)
        # replay.replay_key(jkt, jti), without a Python call
        replay = "{" + jkt + "}:" + _b64url(_sha256(jti.encode("utf-8")).digest())
        return ProofResult(jkt, replay, ttl_ms, nonce_age)
