"""Access-token verification (RFC 7519, RFC 9068, RFC 8725; docs/security.md §3b).

`TokenVerifier.verify()` on a token not seen before, in order:

 1. size ≤ maxTokenBytes (checked by the caller before anything else)
 2. compact JWS, strict base64url; header a JSON object without duplicates
 3. header `alg` on the configured list (never `none`/HS*: config refuses them), no `crit`,
    `typ` not `dpop+jwt` (a proof is not an access token) and, with requireAtJwtTyp,
    `at+jwt` (RFC 9068 §4)
 4. key by `kid` from the configured issuer's keys only (the token's `jku`/`x5u`/`jwk`/
    `x5c` are never used); an unknown kid → the caller triggers the rate-limited refetch
 5. `alg` must be one the key's type allows (ES256 ⇔ EC P-256, ...)
 6. signature (jose.verify_signature, before PyJWT reads the token), with the configured
    algorithms ∩ the key's type — never taken from the token; then `iss` (exact) and `aud`
    (any configured) with PyJWT
 7. `exp` required, `nbf`, `iat` (not in the future), `exp − iat` ≤ maxTokenLifetime, all
    with leeway = dpopMaxClockSkew and our clock
 8. `cnf`: only `jkt` and `x5t#S256` are understood; any other confirmation method is
    refused (a bound token we cannot check must not pass as a bearer token)
 9. identity claims well-formed

A verified token is cached by SHA-256 of its text until `exp` + leeway (bounded, oldest
out first), so a token used for many requests is verified once. Only this part is cached:
the sender-constraint checks (DPoP proof, certificate) run on every request. The cache is
emptied whenever the Authority's key set changes.
"""
from __future__ import annotations

from collections import OrderedDict

import jwt
from jwt import exceptions as jwt_errors

from .errors import Refusal
from .identity import identity_from_claims
from .jose import (JoseError, b64url, b64url_decode, json_object, split_compact,
                   verify_signature)

__all__ = ["TokenVerifier", "TokenInfo", "UnknownKey", "TOKEN_CACHE_SIZE"]

TOKEN_CACHE_SIZE = 16384
MAX_KID_CHARS = 256

# Module-level so tests can count verifications.
_jwt_decode = jwt.decode

_AT_JWT = ("at+jwt", "application/at+jwt")
_DPOP_JWT = ("dpop+jwt", "application/dpop+jwt")
_CNF_MEMBERS = frozenset(("jkt", "x5t#S256"))


def _invalid(message: str, reason: str) -> Refusal:
    return Refusal("invalid_token", message, reason)


class TokenInfo:
    """A verified token: its identity and binding, valid until `deadline` (exp + leeway)."""

    __slots__ = ("identity", "deadline", "jkt", "x5t", "ath")

    def __init__(self, identity, deadline, jkt, x5t, ath=None):
        self.identity = identity
        self.deadline = deadline
        self.jkt = jkt
        self.x5t = x5t
        self.ath = ath     # base64url SHA-256 of the token, what a DPoP proof's ath must be


class UnknownKey:
    __slots__ = ("kid",)

    def __init__(self, kid):
        self.kid = kid


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TokenVerifier:
    def __init__(self, auth, store, *, cache_size: int = TOKEN_CACHE_SIZE):
        self._issuer = auth.authority
        self._audiences = list(auth.audiences)
        self._algorithms = frozenset(auth.algorithms)
        self._leeway = auth.dpop_max_clock_skew
        self._max_lifetime = auth.max_token_lifetime
        self._require_typ = auth.require_at_jwt_typ
        self._legacy = auth.enable_legacy_headers
        self._store = store
        self._cache: OrderedDict[bytes, TokenInfo] = OrderedDict()
        self._cache_size = cache_size

    def clear(self) -> None:
        self._cache.clear()

    def cached(self, digest: bytes, now: float) -> TokenInfo | None:
        info = self._cache.get(digest)
        if info is None:
            return None
        if now > info.deadline:
            del self._cache[digest]
            return None
        return info

    def verify(self, token: bytes, digest: bytes, now: float) -> TokenInfo | UnknownKey:
        """Full verification; raises Refusal. The result is cached."""
        try:
            h, p, sig = split_compact(token)
            header = json_object(h)
        except JoseError:
            raise _invalid("access token is malformed", "token_malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _invalid("access token alg is not accepted", "token_alg")
        if "crit" in header:
            raise _invalid("access token has critical header parameters", "token_malformed")
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise _invalid("access token is malformed", "token_malformed")
        typ = typ.lower() if typ else ""
        if typ in _DPOP_JWT:
            raise _invalid("a DPoP proof is not an access token", "token_typ")
        if self._require_typ and typ not in _AT_JWT:
            raise _invalid("access token typ must be at+jwt", "token_typ")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise _invalid("access token is malformed", "token_malformed")

        key = self._store.get(kid)
        if key is None:
            if kid is not None or not self._store.loaded:
                return UnknownKey(kid)
            raise _invalid("access token names no signing key (kid)", "token_kid")
        if alg not in key.algorithms:
            raise _invalid("access token alg does not match its signing key", "token_alg_mismatch")

        # The signature first, by our own check (the one DPoP proofs get): PyJWT's decode
        # looks at every character of every segment in a Python generator before it
        # verifies anything, 0.6 ms for a token at maxTokenBytes — any client's forged token
        # with a known kid paid that, six times an ordinary request of its size. PyJWT then
        # checks the claims below, only for tokens the Authority signed, without verifying
        # the signature a second time (an ES256 verify is most of a new token's cost).
        try:
            signature = b64url_decode(sig)
        except JoseError:
            raise _invalid("access token is malformed", "token_malformed") from None
        if not verify_signature(alg, key.key, h + b"." + p, signature):
            raise _invalid("access token signature is invalid", "token_signature")
        try:
            _jwt_decode(token, key=key.key, algorithms=list(key.algorithms),
                        audience=self._audiences, issuer=self._issuer,
                        options={"require": ["exp", "iss", "aud"], "verify_signature": False,
                                 "verify_aud": True, "verify_iss": True,
                                 # time claims are checked below with our clock
                                 "verify_exp": False, "verify_nbf": False, "verify_iat": False})
        except jwt_errors.InvalidAudienceError:
            raise _invalid("access token audience is not accepted", "token_audience") from None
        except jwt_errors.InvalidIssuerError:
            raise _invalid("access token issuer is not accepted", "token_issuer") from None
        except jwt_errors.MissingRequiredClaimError:
            raise _invalid("access token lacks a required claim (exp, iss, aud)", "token_claims") from None
        except jwt_errors.InvalidAlgorithmError:
            raise _invalid("access token alg is not accepted", "token_alg") from None
        except (jwt_errors.PyJWTError, ValueError, TypeError):
            raise _invalid("access token is invalid", "token_malformed") from None
        try:
            claims = json_object(p)          # strict: no duplicate members
        except JoseError:
            raise _invalid("access token is malformed", "token_malformed") from None

        leeway = self._leeway
        exp = claims.get("exp")
        if not _number(exp):
            raise _invalid("access token exp is not a number", "token_claims")
        if now > exp + leeway:
            raise _invalid("access token has expired", "token_expired")
        nbf = claims.get("nbf")
        if nbf is not None:
            if not _number(nbf):
                raise _invalid("access token nbf is not a number", "token_claims")
            if nbf > now + leeway:
                raise _invalid("access token is not valid yet", "token_not_yet_valid")
        iat = claims.get("iat")
        if iat is not None:
            if not _number(iat):
                raise _invalid("access token iat is not a number", "token_claims")
            if iat > now + leeway:
                raise _invalid("access token was issued in the future", "token_not_yet_valid")
        start = iat if iat is not None else (nbf if nbf is not None else now)
        if exp - start > self._max_lifetime + leeway:
            raise _invalid("access token lifetime exceeds the accepted maximum", "token_lifetime")

        jkt = x5t = None
        if "cnf" in claims:
            cnf = claims["cnf"]
            if not isinstance(cnf, dict) or not cnf or not _CNF_MEMBERS.issuperset(cnf):
                raise _invalid("access token has an unsupported confirmation (cnf) method", "token_cnf")
            # Every member present is a non-empty string: a `null` one read as "no binding"
            # once, turning a bound token into a bearer one (found by an adversarial probe).
            for value in cnf.values():
                if not isinstance(value, str) or not value:
                    raise _invalid("access token has a malformed cnf claim", "token_cnf")
            jkt = cnf.get("jkt")
            x5t = cnf.get("x5t#S256")
        binding = ("both" if jkt and x5t else "dpop" if jkt else "mtls" if x5t else None)
        identity = identity_from_claims(claims, binding, self._legacy, jkt)

        info = TokenInfo(identity, exp + leeway, jkt, x5t, b64url(digest) if jkt else None)
        cache = self._cache
        if len(cache) >= self._cache_size:
            cache.popitem(last=False)
        cache[digest] = info
        return info
