# cython: language_level=3
"""DPoP proof checks (compiled).

Compiled twin of stellagw/_py/dpop.py: the same code line for line with C types (read the
twin; the checks are listed in stellagw/auth/dpop.py). Values from the proof stay Python
objects, so every comparison means what it means in the twin (an `iat` of any size, a
`jti` of any type); what the types remove is the interpreter around them. Functions are
called through module globals as in the twin, so a test can replace one here.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_New
from libc.string cimport memchr

import hashlib
import hmac

import orjson

from stellagw.auth.errors import Refusal
from stellagw.auth.jose import (JoseError, PRIVATE_MEMBERS, json_object, jwk_thumbprint,
                                key_matches_alg, public_key_from_jwk, verify_signature)
from stellagw.auth.uri import normalize_uri

__all__ = ["DpopVerifier", "ProofResult", "ProofKeyCache", "MAX_JTI_CHARS"]

MAX_JTI_CHARS = 256
KEY_CACHE_SIZE = 4096
REPLAY_GRACE_MS = 5000     # keep jtis a little past the window: instance clocks differ

INVALID = "invalid_dpop_proof"

cdef Py_ssize_t _MAX_JTI_CHARS = MAX_JTI_CHARS


cdef extern from "Python.h":
    void *PyUnicode_DATA(object)

cdef object _sha256 = hashlib.sha256
cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError


# --------------------------------------------------------------------- base64url in C
# What the twin does with stellagw.auth.jose (b64url_decode, split_parts, json_object_fast,
# and replay.replay_key's b64url), without the translate/pad/copy round trips: a DPoP
# request decodes two parts and encodes one digest. tests/test_dpop_twins.py holds these
# to the jose functions on valid and invalid input.

cdef signed char _B64[256]
cdef const char *_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


cdef void _init_table() noexcept:
    cdef int i
    for i in range(256):
        _B64[i] = -1
    for i in range(64):
        _B64[<unsigned char>_ALPHABET[i]] = i


_init_table()


cdef bytes _b64url_decode(const unsigned char *src, Py_ssize_t n):
    """jose.b64url_decode: the URL-safe alphabet only, no padding, non-empty; the unused
    low bits of the last character are ignored, as binascii's strict mode ignores them."""
    cdef Py_ssize_t rest = n % 4, full = n - rest, i, o = 0
    cdef int a, b, c, d
    cdef unsigned char *dst
    if n == 0 or rest == 1:
        raise JoseError("not base64url")
    out = PyBytes_FromStringAndSize(NULL, full // 4 * 3 + (rest - 1 if rest else 0))
    dst = <unsigned char *>PyBytes_AS_STRING(out)
    for i in range(0, full, 4):
        a = _B64[src[i]]
        b = _B64[src[i + 1]]
        c = _B64[src[i + 2]]
        d = _B64[src[i + 3]]
        if (a | b | c | d) < 0:
            raise JoseError("not base64url")
        dst[o] = <unsigned char>((a << 2) | (b >> 4))
        dst[o + 1] = <unsigned char>((b << 4) | (c >> 2))
        dst[o + 2] = <unsigned char>((c << 6) | d)
        o += 3
    if rest:
        a = _B64[src[full]]
        b = _B64[src[full + 1]]
        c = _B64[src[full + 2]] if rest == 3 else 0
        if (a | b | c) < 0:
            raise JoseError("not base64url")
        dst[o] = <unsigned char>((a << 2) | (b >> 4))
        if rest == 3:
            dst[o + 1] = <unsigned char>((b << 4) | (c >> 2))
    return out


cdef str _b64url(bytes data):
    """jose.b64url: base64url without padding, as str."""
    cdef const unsigned char *src = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i, o = 0
    cdef Py_ssize_t rest = n % 3, full = n - rest
    out = PyUnicode_New(full // 3 * 4 + (rest + 1 if rest else 0), 127)
    cdef unsigned char *dst = <unsigned char *>PyUnicode_DATA(out)
    for i in range(0, full, 3):
        dst[o] = _ALPHABET[src[i] >> 2]
        dst[o + 1] = _ALPHABET[((src[i] & 3) << 4) | (src[i + 1] >> 4)]
        dst[o + 2] = _ALPHABET[((src[i + 1] & 15) << 2) | (src[i + 2] >> 6)]
        dst[o + 3] = _ALPHABET[src[i + 2] & 63]
        o += 4
    if rest:
        dst[o] = _ALPHABET[src[full] >> 2]
        if rest == 1:
            dst[o + 1] = _ALPHABET[(src[full] & 3) << 4]
        else:
            dst[o + 1] = _ALPHABET[((src[full] & 3) << 4) | (src[full + 1] >> 4)]
            dst[o + 2] = _ALPHABET[(src[full + 1] & 15) << 2]
    return <str>out


cdef dict _json_object(const unsigned char *src, Py_ssize_t n):
    """jose.json_object_fast over a part of the proof."""
    raw = _b64url_decode(src, n)
    try:
        obj = _loads(raw)
    except _JSONDecodeError:
        raise JoseError("not a JSON object") from None
    if not isinstance(obj, dict):
        raise JoseError("not a JSON object")
    return <dict>obj


def b64url_decode_c(bytes part not None) -> bytes:
    """The C decoder, for the tests that hold it to jose.b64url_decode."""
    return _b64url_decode(<const unsigned char *>PyBytes_AS_STRING(part), len(part))


def b64url_c(bytes data not None) -> str:
    """The C encoder, for the tests that hold it to jose.b64url."""
    return _b64url(data)


def _refuse(message: str, reason: str) -> Refusal:
    return Refusal(INVALID, message, reason)


@cython.final
cdef class ProofResult:
    cdef public object jkt, replay_key, ttl_ms, nonce_age   # nonce_age: seconds, or None

    def __init__(self, jkt, replay_key, ttl_ms, nonce_age):
        self.jkt = jkt
        self.replay_key = replay_key
        self.ttl_ms = ttl_ms
        self.nonce_age = nonce_age


@cython.final
cdef class _Key:
    cdef bytes header
    cdef object alg, key, jkt
    cdef bint used


@cython.final
cdef class ProofKeyCache:
    """stellagw/_py/dpop.py's ProofKeyCache with C fields (read the twin): the client keys
    whose proofs passed every check, by thumbprint, each with the exact header text it last
    came in; CLOCK at `capacity`."""
    cdef readonly Py_ssize_t capacity
    cdef dict _by_header, _by_jkt
    cdef list _ring
    cdef Py_ssize_t _hand

    def __init__(self, Py_ssize_t capacity):
        self.capacity = capacity
        self._by_header = {}
        self._by_jkt = {}
        self._ring = []
        self._hand = 0

    def __len__(self):
        return len(self._ring)

    def thumbprints(self):
        return [(<_Key>entry).jkt for entry in self._ring]

    cdef _Key get(self, bytes header):
        entry = self._by_header.get(header)
        return None if entry is None else <_Key>entry

    cdef object key(self, jkt):
        entry = self._by_jkt.get(jkt)
        return None if entry is None else (<_Key>entry).key

    cdef void passed(self, bytes header, alg, key, jkt) except *:
        cdef _Key entry, old
        cdef Py_ssize_t hand
        found = self._by_jkt.get(jkt)
        if found is not None:
            entry = <_Key>found
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
        entry = _Key.__new__(_Key)
        entry.header = header
        entry.alg = alg
        entry.key = key
        entry.jkt = jkt
        entry.used = False
        if len(self._ring) < self.capacity:
            self._ring.append(entry)
        else:
            hand = self._hand
            while (<_Key>self._ring[hand]).used:
                (<_Key>self._ring[hand]).used = False
                hand = (hand + 1) % self.capacity
            old = <_Key>self._ring[hand]
            del self._by_header[old.header]
            del self._by_jkt[old.jkt]
            self._ring[hand] = entry
            self._hand = (hand + 1) % self.capacity
        self._by_header[header] = entry
        self._by_jkt[jkt] = entry


@cython.final
cdef class DpopVerifier:
    cdef frozenset _algorithms
    cdef double _skew
    cdef Py_ssize_t _max_bytes
    cdef public object nonces
    cdef readonly ProofKeyCache key_cache

    def __init__(self, algorithms, max_clock_skew: float, max_bytes: int, nonces=None,
                 key_cache_size: int = KEY_CACHE_SIZE):
        self._algorithms = frozenset(algorithms)
        self._skew = max_clock_skew
        self._max_bytes = max_bytes
        self.nonces = nonces
        self.key_cache = ProofKeyCache(key_cache_size)

    # ------------------------------------------------------------------ header

    cdef tuple _header(self, bytes segment):
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
        return (alg, key, jkt)

    # ------------------------------------------------------------------ the checks

    def check(self, bytes proof not None, method, expected_htu, ath, bound_jkt, double now):
        """All proof checks but replay; raises Refusal. `expected_htu` is origin + raw path."""
        cdef const unsigned char *buf = <const unsigned char *>PyBytes_AS_STRING(proof)
        cdef const unsigned char *dot
        cdef Py_ssize_t n = PyBytes_GET_SIZE(proof), i, j
        cdef dict claims
        cdef double skew
        cdef bytes h
        cdef _Key known
        if n > self._max_bytes:
            raise _refuse("DPoP proof is too large", "dpop_too_large")
        # split_parts: exactly three non-empty parts
        dot = <const unsigned char *>memchr(buf, 46, n)
        i = dot - buf if dot != NULL else -1
        dot = <const unsigned char *>memchr(buf + i + 1, 46, n - i - 1) if i >= 0 else NULL
        j = dot - buf if dot != NULL else -1
        if (i <= 0 or j <= i + 1 or j >= n - 1
                or memchr(buf + j + 1, 46, n - j - 1) != NULL):
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed")
        h = proof[:i]
        known = self.key_cache.get(h)
        if known is None:
            alg, key, jkt = self._header(h)
        else:
            alg, key, jkt = known.alg, known.key, known.jkt

        try:
            signature = _b64url_decode(buf + j + 1, n - j - 1)
        except JoseError:
            raise _refuse("DPoP proof is not a compact JWS", "dpop_malformed") from None
        if not verify_signature(alg, key, proof[:j], signature):
            raise _refuse("DPoP proof signature is invalid", "dpop_signature")

        try:
            claims = _json_object(buf + i + 1, j - i - 1)
        except JoseError:
            raise _refuse("DPoP proof payload is not a JSON object", "dpop_malformed") from None
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(<str>jti) > _MAX_JTI_CHARS:
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
        if not hmac.compare_digest((<str>proof_ath).encode("utf-8"), ath.encode("ascii")):
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
        # replay.replay_key
        replay = "{" + jkt + "}:" + _b64url(_sha256((<str>jti).encode("utf-8")).digest())
        return ProofResult(jkt, replay, ttl_ms, nonce_age)
