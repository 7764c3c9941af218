"""Authorisation: an endpoint's RequiringClaims against the identity (docs/design.md §2 stage 8).

Every requirement `(type, value)` must hold:

- type `scope` (or `scp`): `value` is in the identity's scope set (the union of the token's
  `scope` and `scp`); value None = at least one scope;
- type `tenant`: the token's tenant (`stellaops:tenant`, else `tid`); value None = any tenant
  (a token without one gets 403 `TENANT_REQUIRED` from the Authenticator);
- any other type names a claim of the verified token: value None = the claim is present;
  a list claim = `value` is one of its members; otherwise equality (numbers and booleans
  also match their JSON text, since HELLO declares values as strings).

A missing scope → 403 `insufficient_scope` (RFC 6750 §3.1, with the `scope` the endpoint
needs); any other unmet claim → 403 `forbidden`. The anonymous identity meets nothing, and
the Authenticator answers it 401 instead (authenticating could help).
"""
from __future__ import annotations

import re

__all__ = ["unmet", "challenge_scope"]

_SCOPE_TYPES = ("scope", "scp")
# RFC 6749 §3.3 scope-token characters: safe to put inside a quoted header parameter.
_NQCHAR = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


def _text(value) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value) if isinstance(value, float) else str(value)
    return value if isinstance(value, str) else None


def _matches(claim, value) -> bool:
    if claim is None:
        return False
    if value is None:
        return True
    if isinstance(claim, (list, tuple)):
        return any(_matches(item, value) for item in claim if not isinstance(item, (list, dict)))
    return claim == value or (not isinstance(claim, str) and _text(claim) == value)


def unmet(identity, requirements) -> tuple[list, bool]:
    """(scopes missing, whether a non-scope claim is unmet). Malformed requirements fail closed."""
    missing_scopes: list = []
    other = False
    for requirement in requirements:
        try:
            kind, value = requirement
        except (TypeError, ValueError):
            other = True
            continue
        if kind in _SCOPE_TYPES:
            ok = bool(identity.scopes) if value is None else value in identity.scopes
            if not ok:
                missing_scopes.append(value)
        elif kind == "tenant":
            # The tenant comes from `stellaops:tenant`, else `tid` (identity.tenant).
            if identity.tenant is None or (value is not None and identity.tenant != value):
                other = True
        elif not isinstance(kind, str) or not _matches(identity.claims.get(kind), value):
            other = True
    return missing_scopes, other


def challenge_scope(missing: list) -> str | None:
    """The `scope` parameter for the challenge: only well-formed scope tokens."""
    names = [m for m in missing if isinstance(m, str) and _NQCHAR.fullmatch(m)]
    return " ".join(names) or None
