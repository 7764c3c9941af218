"""The identity the gateway forwards, and the strip-then-overwrite header policy.

docs/original-router.md §7: strip every identity header a client sent *before* anything reads
claims, then set the gateway's own from the validated token only (the old "set if
missing" middleware let clients spoof tenants). Headers set:

    x-stellaops-tenant   claim `stellaops:tenant`, else legacy `tid` (absent when neither)
    x-stellaops-actor    `sub`, else `client_id`; `anonymous` for anonymous requests
    x-stellaops-scopes   union of `scope` (space-separated) and `scp` (list), sorted
    x-stellaops-client   `client_id`
    x-stella-*           the same under the legacy prefix, while enableLegacyHeaders

Stripped (names compared after `_` → `-`, since some backends fold underscores into dashes):
all `x-stellaops-*` / `x-stella-*`, bare `sub`, `tid`, `scope`, `scp`, `cnf`, the other
identity spellings of docs/security.md §3c row 8 (`x-tenant-id`, `x-user-*`, `x-client-cert`,
`x-forwarded-client-cert`, `x-forwarded-*`, `forwarded`), and `dpop` / `proxy-authorization`
(a proof is single-use and meant for us; RFC 9449 §7.1 never uses Proxy-Authorization).
`authorization` is kept: services may re-verify the token themselves.
"""
from __future__ import annotations

import re

from .errors import Refusal

__all__ = ["Identity", "identity_from_claims", "anonymous_identity", "strip_identity_headers",
           "is_identity_header", "SCOPE_OVERRIDE_HEADERS"]

_STRIP_EXACT = frozenset((
    b"sub", b"tid", b"scope", b"scp", b"cnf", b"dpop", b"proxy-authorization",
    b"x-tenant-id", b"x-client-cert", b"x-ssl-client-cert", b"x-forwarded-client-cert",
    b"forwarded",
))
_STRIP_PREFIXES = (b"x-stellaops-", b"x-stella-", b"x-user-", b"x-forwarded-")

# A client trying to choose its own scopes (403 unless allowScopeHeader).
SCOPE_OVERRIDE_HEADERS = frozenset(n for base in (b"x-stellaops-scopes", b"x-stella-scopes",
                                                  b"x-stellaops-scope", b"x-stella-scope")
                                   for n in (base, base.replace(b"-", b"_")))
# A request with none of these fields is anonymous whatever else it carries: the pipeline
# answers that without asking the Authenticator (Authenticator.anonymous).
CREDENTIAL_FIELDS = frozenset({b"authorization", b"dpop"}) | SCOPE_OVERRIDE_HEADERS

# What an identity claim may not hold, as it becomes a header value a service reads (and
# logs, and shows): C0 and C1 controls, and the invisible characters that change how text
# reads — zero-width, bidirectional overrides and isolates (U+202E shows "ten\u202eabc" as
# "tencba"), line and paragraph separators, the byte-order mark. And lone surrogates: the
# token's JSON may escape one (`"\ud800"`), which is no text and encodes to no header or key
# (every such request was a 500 "authentication failed internally" and an error line).
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


def is_identity_header(name: bytes) -> bool:
    if b"_" in name:
        name = name.replace(b"_", b"-")
    return name in _STRIP_EXACT or name.startswith(_STRIP_PREFIXES)


# Names known not to be identity headers. Header names repeat from request to request, so
# this turns the per-header prefix checks into one dict lookup. Bounded: random names from a
# client stop being remembered once it is full (they are still checked), and long ones are
# never remembered (a name may be as long as maxHeaderBytes: 4,096 of them, 64 MB).
_CLEAN: dict[bytes, bool] = {}
_CLEAN_MAX = 4096
_CLEAN_NAME_MAX = 64


def _clean(name: bytes) -> bool:
    if is_identity_header(name):
        return False
    if len(_CLEAN) < _CLEAN_MAX and len(name) <= _CLEAN_NAME_MAX:
        _CLEAN[name] = True
    return True


def strip_identity_headers(headers) -> list:
    """The request headers (lowercase names) without any client-sent identity header."""
    known = _CLEAN.get
    return [h for h in headers if known(h[0]) or _clean(h[0])]


class Identity:
    """Who the request is, from the verified token (or the explicit anonymous identity).

    Made once per token and cached with it: treat as immutable. `response_headers` are
    header lines for the response (a fresh `DPoP-Nonce`), usually b"".
    """

    __slots__ = ("subject", "tenant", "client_id", "scopes", "claims", "binding", "anonymous",
                 "jkt", "response_headers", "header_pairs", "_legacy")

    def __init__(self, subject, tenant, client_id, scopes, claims, binding, anonymous,
                 legacy, jkt=None):
        self.subject = subject            # str ("anonymous" for anonymous)
        self.tenant = tenant              # str | None
        self.client_id = client_id        # str | None
        self.scopes = scopes              # frozenset[str]
        self.claims = claims              # dict: the verified token claims ({} anonymous)
        self.binding = binding            # "dpop" | "mtls" | "both" | None
        self.anonymous = anonymous
        self.jkt = jkt                    # the bound DPoP key thumbprint, when DPoP-bound
        self.response_headers = b""
        self._legacy = legacy
        # The identity headers as a tuple: read for every routed request, never copied.
        self.header_pairs = tuple(self._build_headers())

    def _build_headers(self) -> list[tuple[bytes, bytes]]:
        pairs = []
        if self.tenant is not None:
            pairs.append((b"tenant", self.tenant))
        pairs.append((b"actor", self.subject))
        project = self.claims.get("stellaops:project") if self.claims else None
        if isinstance(project, str) and project and not _CONTROL.search(project):
            pairs.append((b"project", project))
        if not self.anonymous:
            pairs.append((b"scopes", " ".join(sorted(self.scopes))))
            if self.client_id is not None:
                pairs.append((b"client", self.client_id))
        out = [(b"x-stellaops-" + name, value.encode("utf-8")) for name, value in pairs]
        if self._legacy:
            out += [(b"x-stella-" + name, value.encode("utf-8")) for name, value in pairs]
        return out

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The identity headers to add after `strip_identity_headers` (a fresh list)."""
        return list(self.header_pairs)

    def with_scopes(self, scopes: frozenset) -> "Identity":
        copy = self._copy()
        copy.scopes = scopes
        copy.header_pairs = tuple(copy._build_headers())
        return copy

    def with_response_headers(self, lines: bytes) -> "Identity":
        copy = self._copy()
        copy.response_headers = lines
        return copy

    def _copy(self) -> "Identity":
        copy = Identity.__new__(Identity)
        for name in Identity.__slots__:
            setattr(copy, name, getattr(self, name))
        return copy

    def __repr__(self) -> str:
        return (f"Identity(subject={self.subject!r}, tenant={self.tenant!r}, "
                f"binding={self.binding!r}, anonymous={self.anonymous})")


def _text(claims: dict, name: str) -> str | None:
    value = claims.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        raise Refusal("invalid_token", "access token has a malformed identity claim", "token_claims")
    return value


def _scopes(claims: dict) -> frozenset:
    scopes: set[str] = set()
    scope = claims.get("scope")
    if scope is not None:
        if not isinstance(scope, str) or _CONTROL.search(scope):
            raise Refusal("invalid_token", "access token has a malformed scope claim", "token_claims")
        scopes.update(scope.split(" "))   # RFC 6749 §3.3: separated by spaces only
    scp = claims.get("scp")
    if scp is not None:
        items = [scp] if isinstance(scp, str) else scp
        if not isinstance(items, list) or not all(isinstance(s, str) and not _CONTROL.search(s)
                                                  for s in items):
            raise Refusal("invalid_token", "access token has a malformed scp claim", "token_claims")
        for item in items:
            scopes.update(item.split(" "))
    scopes.discard("")
    return frozenset(scopes)


def identity_from_claims(claims: dict, binding: str | None, legacy: bool, jkt=None) -> Identity:
    tenant = _text(claims, "stellaops:tenant") or _text(claims, "tid")
    client_id = _text(claims, "client_id")
    subject = _text(claims, "sub") or client_id
    if subject is None:
        raise Refusal("invalid_token", "access token names no subject (sub or client_id)",
                      "token_claims")
    return Identity(subject, tenant, client_id, _scopes(claims), claims, binding, False,
                    legacy, jkt)


def anonymous_identity(legacy: bool) -> Identity:
    return Identity("anonymous", None, None, frozenset(), {}, None, True, legacy)
