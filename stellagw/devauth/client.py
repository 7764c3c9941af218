"""DPoP client side: proof keys, proofs (RFC 9449 §4), a token fetch and a request helper.

Standard library HTTP (urllib) with proxies and redirects switched off, so what you call is
what answers. Works against any RFC 9449 authorization/resource server, not only ours.
"""
from __future__ import annotations

import json
import secrets
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


class TokenRequestError(Exception):
    def __init__(self, status: int, body):
        self.status, self.body = status, body
        err = body.get("error") if isinstance(body, dict) else None
        desc = body.get("error_description") if isinstance(body, dict) else body
        super().__init__(f"token endpoint answered {status}: {err or ''} {desc or ''}".strip())


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


def discover(issuer: str, ssl=None) -> dict:
    """The Authority's discovery document (``/.well-known/openid-configuration``)."""
    status, _, body = _http(issuer.rstrip("/") + "/.well-known/openid-configuration", "GET",
                            None, {"Accept": "application/json"}, ssl, 10.0)
    if status != 200:
        raise TokenRequestError(status, body.decode("utf-8", "replace"))
    return json.loads(body)


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
            raise TokenRequestError(status, doc)
        return doc
    raise TokenRequestError(status, doc)  # pragma: no cover - loop always returns


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
