"""DPoP proof checks at a resource server (RFC 9449 §4.3, §7; security-checklists §3a).

`DpopVerifier.check()` runs every §4.3 check on one proof, in this order (the RFC allows
any order; this one does the cheap and structural checks first and the replay store last,
so a request that fails anything else never consumes its `jti`):

 1. size cap (`maxTokenBytes`) before any parsing                        §4.3 (2), checklist 5
 2. one compact JWS: three base64url parts, strict alphabet               §4.3 (2)
 3. header: JSON object, `typ` == dpop+jwt, `alg` on our asymmetric
    allow-list, no `crit`, `jwk` an object with no private members,
    `alg` consistent with the jwk's kty/crv                                §4.3 (3)(4)(5)(7)
 4. signature with the header's `jwk` only (never kid/jku/x5u/x5c)          §4.3 (6)
 5. payload: `jti` (≤ 256 chars), `htm`, `htu`, `iat` present, typed        §4.3 (3), §11.1
 6. `htm` == request method (case-sensitive)                               §4.3 (8)
 7. `htu` == configured public origin + the path the client sent, both
    normalised (RFC 3986 §6.2.2/§6.2.3), query and fragment ignored         §4.3 (9)
 8. `iat` within ± dpopMaxClockSkew                                         §4.3 (11)
 9. `ath` == base64url(SHA-256(access token)), constant time                §4.3 (12), §7
10. thumbprint(jwk) == the token's `cnf.jkt`, constant time                §6.1, §7
11. `nonce` valid, when nonces are on                                       §4.3 (10), §9, §11.3
 (12. `jti` not seen before: done by the Authenticator with the replay caches) §11.1

Client keys are cached (`ProofKeyCache`, docs/auth.md "The proof key cache"): a client
signs every proof with one key and sends the same header, so JSON parsing, key construction
and the thumbprint happen once per client key; the signature check runs on every proof. A
key is kept by its RFC 7638 thumbprint, with the exact header text it last came in, once a
proof it signed has passed every check; a bounded number of keys (CLOCK eviction).

The code is in stellagw/_py/dpop.py (the one to read) and, compiled, cext/dpop.pyx; the
compiled one unless STELLAGW_NO_EXTENSIONS=1 or it is not built. `impl` is the module
imported (perf/stub_signature replaces its `verify_signature`).
"""
from __future__ import annotations

from .. import _impl
from .uri import normalize_uri

if _impl.NO_EXTENSIONS:
    from .._py import dpop as impl
else:
    try:
        from .._cext import dpop as impl
    except ImportError as exc:
        _impl.fell_back("dpop", exc)
        from .._py import dpop as impl

DpopVerifier = impl.DpopVerifier
ProofResult = impl.ProofResult
MAX_JTI_CHARS = impl.MAX_JTI_CHARS

__all__ = ["DpopVerifier", "ProofResult", "normalize_uri", "MAX_JTI_CHARS", "impl"]
