"""DPoP client side: proof keys, proofs (RFC 9449 §4), a token fetch and a request helper.

Standard library HTTP (urllib) with proxies and redirects switched off, so what you call is
what answers. Works against any RFC 9449 authorization/resource server, not only ours.

Failures name the URL: :class:`RequestFailed` when no HTTP answer came (refused, timed out,
TLS, name not found), :class:`TokenRequestError` when the Authority answered with an error.
"""
from __future__ import annotations

import errno
import http.client
import json
import secrets
import socket
import ssl as _ssl
import time
import urllib.error
import urllib.request
from http.client import HTTPMessage
from urllib.parse import urlencode, urlsplit, urlunsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from .jose import access_token_hash, b64url, jwk_thumbprint, public_jwk


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{p.netloc.lower()}"


def htu_of(url: str) -> str:
    """The ``htu`` for a request URL: the URL without query and fragment (RFC 9449 §4.2)."""
    p = urlsplit(url)
    return urlunsplit((p.scheme, p.netloc, p.path or "/", "", ""))


class DpopKey:
    """A DPoP proof key (ES256 / P-256 or EdDSA / Ed25519). ``nonces`` remembers the last
    ``DPoP-Nonce`` each origin gave us; proofs to that origin carry it automatically."""

    def __init__(self, private_key, alg: str):
        if alg == "ES256" and not (isinstance(private_key, ec.EllipticCurvePrivateKey)
                                   and isinstance(private_key.curve, ec.SECP256R1)):
            raise ValueError("ES256 needs a P-256 private key")
        if alg == "EdDSA" and not isinstance(private_key, ed25519.Ed25519PrivateKey):
            raise ValueError("EdDSA needs an Ed25519 private key")
        if alg not in ("ES256", "EdDSA"):
            raise ValueError(f"unsupported DPoP alg {alg!r}")
        self.private_key, self.alg = private_key, alg
        self._jwk = public_jwk(private_key)
        header = json.dumps({"typ": "dpop+jwt", "alg": alg, "jwk": self._jwk},
                            separators=(",", ":"))
        self._header_b64 = b64url(header.encode())
        self.nonces: dict[str, str] = {}

    @classmethod
    def generate(cls, alg: str = "ES256") -> "DpopKey":
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()), alg)
        if alg == "EdDSA":
            return cls(ed25519.Ed25519PrivateKey.generate(), alg)
        raise ValueError(f"unsupported DPoP alg {alg!r}")

    @classmethod
    def from_pem(cls, data: bytes) -> "DpopKey":
        key = serialization.load_pem_private_key(data, password=None)
        return cls(key, "EdDSA" if isinstance(key, ed25519.Ed25519PrivateKey) else "ES256")

    def public_jwk(self) -> dict:
        return dict(self._jwk)

    def thumbprint(self) -> str:
        """RFC 7638 thumbprint: the value a bound token carries as ``cnf.jkt``."""
        return jwk_thumbprint(self._jwk)

    def _sign(self, msg: bytes) -> bytes:
        if self.alg == "EdDSA":
            return self.private_key.sign(msg)
        r, s = decode_dss_signature(self.private_key.sign(msg, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def proof(self, method: str, url: str, access_token: str | None = None,
              nonce: str | None = None, iat: int | None = None, jti: str | None = None) -> str:
        """A compact-JWS DPoP proof for one request. ``ath`` is added when a token is given."""
        claims = {"jti": jti or b64url(secrets.token_bytes(16)), "htm": method,
                  "htu": htu_of(url), "iat": int(time.time()) if iat is None else iat}
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        signing_input = f"{self._header_b64}.{b64url(json.dumps(claims, separators=(',', ':')).encode())}"
        return f"{signing_input}.{b64url(self._sign(signing_input.encode('ascii')))}"


def premint(n: int, method: str, url: str, token: str | None, key: DpopKey,
            nonce: str | None = None) -> list[str]:
    """``n`` proofs with distinct ``jti`` for the same request (load tests). They go stale
    after the server's iat window (typically 30–60 s), so mint just before use."""
    return [key.proof(method, url, token, nonce=nonce) for _ in range(n)]


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def failure_reason(exc: BaseException, timeout: float | None = None) -> str:
    """Why a connection gave no HTTP answer, in words a person at a terminal can act on."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        return failure_reason(exc.reason, timeout)
    if isinstance(exc, urllib.error.URLError):
        return _one_line(exc.reason)
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s" if timeout else "timed out"
    if isinstance(exc, _ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, _ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER" or "WRONG_VERSION_NUMBER" in str(exc):
            # What OpenSSL makes of a plain-HTTP answer to its hello.
            return "TLS handshake failed: the server does not speak TLS there (plain HTTP?)"
        return f"TLS handshake failed ({exc.reason or _one_line(exc)})"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host name ({exc.strerror})"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "the server closed the connection without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by the server"
    if isinstance(exc, http.client.HTTPException):
        return f"not a valid HTTP answer ({type(exc).__name__}: {_one_line(exc)})"
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return "address already in use (another process listens there)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _one_line(exc) or type(exc).__name__


class RequestFailed(urllib.error.URLError):
    """No HTTP answer from ``url``. A URLError (an OSError), as urllib raised before, so
    callers catching those still do; ``str()`` is ``"<url>: <reason>"``, one line."""

    def __init__(self, url: str, cause: BaseException, timeout: float | None = None):
        super().__init__(cause)
        self.url, self.why = url, failure_reason(cause, timeout)

    def __str__(self) -> str:
        return f"{self.url}: {self.why}"


class TokenRequestError(Exception):
    """The Authority answered, with an error (or with something that is not a token)."""

    def __init__(self, status: int, body, url: str | None = None, what: str = "token endpoint"):
        self.status, self.body, self.url = status, body, url
        err = body.get("error") if isinstance(body, dict) else None
        desc = body.get("error_description") if isinstance(body, dict) else body
        where = f"{what} {url}" if url else what
        super().__init__(_one_line(f"{where} answered {status}: {err or ''} {desc or ''}".strip()))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _http(url: str, method: str, body: bytes | None, headers: dict, ssl=None,
          timeout: float = 30.0) -> tuple[int, HTTPMessage, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect,
                                         urllib.request.HTTPSHandler(context=ssl))
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers, exc.read()
    except (OSError, http.client.HTTPException) as exc:
        # The body's read times out or breaks off as a bare OSError, not a URLError.
        raise RequestFailed(url, exc, timeout) from exc


def discover(issuer: str, ssl=None, timeout: float = 10.0) -> dict:
    """The Authority's discovery document (``/.well-known/openid-configuration``)."""
    url = issuer.rstrip("/") + "/.well-known/openid-configuration"
    status, _, body = _http(url, "GET", None, {"Accept": "application/json"}, ssl, timeout)
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if status != 200:
        raise TokenRequestError(status, doc if isinstance(doc, dict)
                                else body.decode("utf-8", "replace"), url, "discovery")
    if not isinstance(doc, dict) or not isinstance(doc.get("token_endpoint"), str):
        raise TokenRequestError(status, "not a discovery document (no token_endpoint)", url,
                                "discovery")
    return doc


def fetch_token(token_endpoint: str, client_id: str, client_secret: str, scope=None,
                dpop_key: DpopKey | None = None, ssl=None, *, tenant: str | None = None,
                bind: str | None = None, timeout: float = 10.0) -> dict:
    """client_credentials grant (client_secret_post). With ``dpop_key`` the request carries a
    proof and the token comes back DPoP-bound; ``bind="mtls"`` asks for a certificate-bound
    token (``ssl`` must then present a client certificate). Retries once on
    ``use_dpop_nonce``. Raises :class:`TokenRequestError` on an error response."""
    form = {"grant_type": "client_credentials", "client_id": client_id,
            "client_secret": client_secret}
    if scope:
        form["scope"] = scope if isinstance(scope, str) else " ".join(scope)
    if tenant:
        form["tenant"] = tenant
    if bind:
        form["bind"] = bind
    data = urlencode(form).encode()
    origin = _origin(token_endpoint)
    for attempt in (0, 1):
        headers = {"Content-Type": "application/x-www-form-urlencoded",
                   "Accept": "application/json"}
        if dpop_key is not None:
            headers["DPoP"] = dpop_key.proof("POST", token_endpoint,
                                             nonce=dpop_key.nonces.get(origin))
        status, rheaders, body = _http(token_endpoint, "POST", data, headers, ssl, timeout)
        try:
            doc = json.loads(body)
        except ValueError:
            doc = body.decode("utf-8", "replace")
        if dpop_key is not None and rheaders.get("DPoP-Nonce"):
            dpop_key.nonces[origin] = rheaders["DPoP-Nonce"]
        if (status == 400 and attempt == 0 and dpop_key is not None and isinstance(doc, dict)
                and doc.get("error") == "use_dpop_nonce" and rheaders.get("DPoP-Nonce")):
            continue
        if status != 200 or not isinstance(doc, dict):
            raise TokenRequestError(status, doc, token_endpoint)
        if not isinstance(doc.get("access_token"), str):
            raise TokenRequestError(status, "no access_token in the answer", token_endpoint)
        return doc
    raise TokenRequestError(status, doc, token_endpoint)  # pragma: no cover - loop returns


def call(url: str, method: str = "GET", body=None, token: str | None = None,
         dpop_key: DpopKey | None = None, headers: dict | None = None, ssl=None,
         timeout: float = 30.0) -> tuple[int, HTTPMessage, bytes]:
    """One request: ``Authorization: DPoP <token>`` plus a fresh proof (or Bearer without a
    key). ``body`` may be bytes, str or a JSON-able object. Retries once on 401
    ``use_dpop_nonce``. Returns (status, headers (case-insensitive), body bytes)."""
    hdrs = dict(headers or {})
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    if isinstance(body, str):
        body = body.encode("utf-8")
    origin = _origin(url)
    for attempt in (0, 1):
        if token is not None:
            hdrs["Authorization"] = f"{'DPoP' if dpop_key else 'Bearer'} {token}"
        if dpop_key is not None:
            hdrs["DPoP"] = dpop_key.proof(method, url, token, nonce=dpop_key.nonces.get(origin))
        status, rheaders, rbody = _http(url, method, body, hdrs, ssl, timeout)
        if dpop_key is not None and rheaders.get("DPoP-Nonce"):
            dpop_key.nonces[origin] = rheaders["DPoP-Nonce"]
        challenge = ",".join(rheaders.get_all("WWW-Authenticate") or ())
        if (attempt == 0 and status == 401 and dpop_key is not None
                and "use_dpop_nonce" in challenge and rheaders.get("DPoP-Nonce")):
            continue
        return status, rheaders, rbody
    return status, rheaders, rbody  # pragma: no cover
