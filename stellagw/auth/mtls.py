"""Certificate-bound access tokens (RFC 8705 §3; docs/security.md §3a′).

A token with `cnf["x5t#S256"]` is valid only on a TLS connection whose client certificate
hashes to it: base64url (no padding) of SHA-256 over the DER leaf certificate — not hex.
The certificate is the one of *our own* TLS session (`HttpProtocol.peer_cert`, taken from
`SSLObject.getpeercert(binary_form=True)` at connection time); no header can supply it.
Missing certificate or mismatch → 401 `invalid_token`. Chain validation is the listener's
policy (`gateway.http.tls.clientCaPath`), separate from this binding check (§3a′ item 8).
"""
from __future__ import annotations

import hashlib
import hmac

from .errors import Refusal
from .jose import b64url

__all__ = ["certificate_thumbprint", "check_certificate_binding"]


def certificate_thumbprint(der: bytes) -> str:
    return b64url(hashlib.sha256(der).digest())


def check_certificate_binding(bound: str, peer_cert: bytes | None) -> None:
    if not peer_cert:
        raise Refusal("invalid_token", "certificate-bound token used without a client certificate",
                      "mtls_missing_certificate")
    actual = certificate_thumbprint(peer_cert)
    if not hmac.compare_digest(actual.encode(), bound.encode("utf-8")):
        raise Refusal("invalid_token", "certificate-bound token does not match the client certificate",
                      "mtls_mismatch")
