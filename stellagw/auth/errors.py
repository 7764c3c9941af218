"""Refusals: status, error code, safe message and the preformatted challenge headers.

RFC 6750 §3 / RFC 9449 §7.1: a 401 carries `WWW-Authenticate` naming the scheme the client
tried, with `error` and `error_description`; DPoP challenges add `algs` (SHOULD). No error
information when the request carried no credentials (RFC 6750 §3.1). 403 for scope
(`insufficient_scope`). Descriptions are fixed strings chosen here — never text from the
token, the proof or a header — so nothing a client sends can reach a response header or a
log line through them.
"""
from __future__ import annotations

__all__ = ["AuthFailure", "Refusal", "Challenges"]

# Browser clients can read these only when exposed (docs/security.md §3a item 20).
_EXPOSE = b"access-control-expose-headers: WWW-Authenticate, DPoP-Nonce\r\n"
_NO_STORE = b"cache-control: no-store\r\n"


class AuthFailure:
    """A refused request. `headers` are complete "name: value\\r\\n" lines to add."""

    __slots__ = ("status", "code", "message", "headers", "reason")

    def __init__(self, status: int, code: str, message: str, headers: bytes, reason: str):
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers
        self.reason = reason     # low-cardinality metrics label

    def __repr__(self) -> str:
        return f"AuthFailure({self.status}, {self.code!r}, {self.reason!r}: {self.message})"


class Refusal(Exception):
    """Raised inside the checks; turned into an AuthFailure by the Authenticator.

    `code` is the RFC error code (`invalid_token`, `invalid_dpop_proof`, `use_dpop_nonce`,
    `invalid_request`), `reason` the metrics label, `message` a fixed description.
    """

    def __init__(self, code: str, message: str, reason: str, status: int = 401):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.status = status


class Challenges:
    """Builds (and memoises) the failure objects; the header bytes are made once."""

    def __init__(self, algorithms: tuple[str, ...], dpop_enabled: bool):
        self._algs = " ".join(algorithms)
        self._dpop = dpop_enabled
        self._memo: dict[tuple, AuthFailure] = {}
        dpop_line = b'www-authenticate: DPoP algs="%s"\r\n' % self._algs.encode() if dpop_enabled else b""
        # What a request without credentials is told (RFC 9449 §7.2: "Bearer, DPoP algs=...").
        self.no_credentials = b"www-authenticate: Bearer\r\n" + dpop_line + _EXPOSE
        self._dpop_line = dpop_line

    def failure(self, scheme: str | None, code: str, message: str, reason: str,
                status: int = 401, nonce: str | None = None, scope: str | None = None) -> AuthFailure:
        key = (scheme, code, message, reason, status, nonce, scope)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        failure = AuthFailure(status, code, message,
                              self._headers(scheme, code, message, status, nonce, scope), reason)
        if nonce is None and len(self._memo) < 512:
            self._memo[key] = failure
        return failure

    def _headers(self, scheme, code, message, status, nonce, scope) -> bytes:
        if status >= 500:
            # Our side is not ready (keys, replay store): no challenge, the client may retry.
            return b"retry-after: 1\r\n" if status == 503 else b""
        if scheme is None:
            # No credentials: the bare challenges, no error information (RFC 6750 §3.1).
            return self.no_credentials if status == 401 else b""
        params = f'error="{code}", error_description="{message}"'
        if scope:
            params += f', scope="{scope}"'
        if scheme == "DPoP":
            if status == 401:
                params += f', algs="{self._algs}"'
            lines = f"www-authenticate: DPoP {params}\r\n".encode()
        else:
            lines = f"www-authenticate: Bearer {params}\r\n".encode()
            if status == 401:
                lines += self._dpop_line   # still tell the client DPoP is accepted
        if nonce is not None:
            lines += b"dpop-nonce: " + nonce.encode("ascii") + b"\r\n" + _NO_STORE
        return lines + _EXPOSE
