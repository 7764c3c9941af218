"""Authentication, identity and authorisation: stages 6–8 of the request's journey
(docs/design.md §2, docs/auth.md).

| module | what |
|---|---|
| `authenticator.py` | `Authenticator`, the stage: the order of the checks |
| `tokens.py`, `keys.py`, `jose.py` | access-token verification, the Authority's keys, strict JOSE parsing (base64url: a codec, cext/b64url.pyx) |
| `dpop.py`, `replay.py`, `nonce.py` | DPoP proofs (compiled from dpop.py + dpop.pxd), the `jti` replay caches, server nonces |
| `mtls.py` | certificate-bound tokens |
| `identity.py`, `claims.py` | the identity headers a service sees; an endpoint's RequiringClaims |
| `errors.py`, `uri.py` | refusals and challenges; `htu` normalisation |
"""
from .authenticator import Authenticator
from .errors import AuthFailure
from .identity import Identity, strip_identity_headers
from .keys import KeyStore
from .replay import LocalReplayCache, ReplayCache, ValkeyReplayCache

__all__ = ["Authenticator", "Identity", "AuthFailure", "strip_identity_headers",
           "ReplayCache", "LocalReplayCache", "ValkeyReplayCache", "KeyStore"]
