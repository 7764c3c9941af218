"""The development Authority's state and logic, without any HTTP: signing keys (with
rotation), the client table, the token minting API and the token endpoint's decisions.

DEVELOPMENT ONLY. Secrets are compared in constant time and proofs are checked properly,
but the client table is a plain file with shared secrets and nothing is audited.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import unquote_plus

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
import jwt

from .jose import (DPOP_ALGS, ProofError, b64url, b64url_decode, cert_thumbprint,
                   jwk_thumbprint, public_jwk, verify_proof)

DEFAULT_AUDIENCE = "stellaops-gateway"
DEFAULT_LIFETIME = 300


@dataclass(frozen=True)
class Client:
    client_id: str
    secret: str
    scopes: tuple[str, ...]
    tenant: str | None
    tenants: tuple[str, ...] = ()
    audience: str | None = None

    def allowed_tenants(self) -> tuple[str, ...]:
        return self.tenants or ((self.tenant,) if self.tenant else ())


def default_clients() -> dict[str, Client]:
    return {"demo-client": Client("demo-client", "demo-secret",
                                  ("scans:read", "scans:write", "policies:read"), "tenant-1")}


def load_clients(path: str) -> dict[str, Client]:
    """Read a client table from YAML or JSON: ``clients:`` as a mapping id -> entry or a list
    of entries with ``client_id``; entry fields ``secret``, ``scopes`` (list or
    space-separated), ``tenant``, optional ``tenants`` (allowed list) and ``audience``."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if path.endswith(".json"):
        doc = json.loads(text)
    else:
        import yaml
        doc = yaml.safe_load(text)
    raw = doc.get("clients", doc) if isinstance(doc, dict) else doc
    items = raw.items() if isinstance(raw, dict) else ((e.get("client_id"), e) for e in raw or ())
    out: dict[str, Client] = {}
    for cid, entry in items:
        if not cid or not isinstance(entry, dict) or not entry.get("secret"):
            raise ValueError(f"{path}: every client needs an id and a secret")
        scopes = entry.get("scopes", ())
        scopes = tuple(scopes.split() if isinstance(scopes, str) else scopes)
        tenants = entry.get("tenants") or ()
        tenants = tuple(tenants.split() if isinstance(tenants, str) else tenants)
        out[str(cid)] = Client(str(cid), str(entry["secret"]), scopes, entry.get("tenant"),
                               tenants, entry.get("audience"))
    if not out:
        raise ValueError(f"{path}: no clients")
    return out


@dataclass
class SigningKey:
    alg: str
    private_key: object
    kid: str = field(default="")

    def __post_init__(self):
        if not self.kid:
            self.kid = jwk_thumbprint(public_jwk(self.private_key))

    def public_jwk(self) -> dict:
        return {**public_jwk(self.private_key), "kid": self.kid, "use": "sig", "alg": self.alg}

    @classmethod
    def generate(cls, alg: str = "ES256") -> "SigningKey":
        if alg == "ES256":
            return cls("ES256", ec.generate_private_key(ec.SECP256R1()))
        if alg == "RS256":
            return cls("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        raise ValueError(f"unsupported signing alg {alg!r}")

    def pem(self) -> bytes:
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption())


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
                        re.S)


def load_key_file(path: str) -> list[SigningKey]:
    """Every private key in a PEM file, in order (the last of each alg is the active one)."""
    with open(path, "rb") as fh:
        data = fh.read()
    keys = []
    for m in _PEM_BLOCK.finditer(data):
        key = serialization.load_pem_private_key(m.group(0), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            keys.append(SigningKey("ES256", key))
        elif isinstance(key, rsa.RSAPrivateKey) and key.key_size >= 2048:
            keys.append(SigningKey("RS256", key))
        else:
            raise ValueError(f"{path}: only P-256 EC and RSA >= 2048 keys are supported")
    if not keys:
        raise ValueError(f"{path}: no PEM private key found")
    return keys


def append_key_file(path: str, key: SigningKey) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as fh:
        fh.write(key.pem())


class TokenError(Exception):
    def __init__(self, status: int, error: str, description: str, headers=()):
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = list(headers)


class Authority:
    """Keys, clients and minting. ``issuer`` may be set after construction (the server
    fills it in once it knows its port)."""

    def __init__(self, issuer: str | None = None, *, audience: str = DEFAULT_AUDIENCE,
                 clients: dict[str, Client] | None = None, lifetime: int = DEFAULT_LIFETIME,
                 key_file: str | None = None, rs256: bool = False, token_alg: str = "ES256",
                 require_nonce: bool = False, nonce_ttl: int = 300, proof_skew: int = 30):
        self.issuer = issuer
        self.audience, self.lifetime, self.token_alg = audience, lifetime, token_alg
        self.clients = default_clients() if clients is None else dict(clients)
        self.key_file = key_file
        self.require_nonce, self.nonce_ttl, self.proof_skew = require_nonce, nonce_ttl, proof_skew
        self._lock = threading.Lock()
        self._nonce_secret = secrets.token_bytes(32)
        self._seen_jti: OrderedDict[str, float] = OrderedDict()
        if key_file and os.path.exists(key_file):
            self.keys = load_key_file(key_file)
        else:
            self.keys = [SigningKey.generate("ES256")]
            if key_file:
                append_key_file(key_file, self.keys[0])
        if rs256 or token_alg == "RS256":
            if not any(k.alg == "RS256" for k in self.keys):
                self._add(SigningKey.generate("RS256"))
        self.active_key(token_alg)

    # -- keys ---------------------------------------------------------------------------
    def _add(self, key: SigningKey) -> None:
        with self._lock:
            self.keys = [*self.keys, key]
        if self.key_file:
            append_key_file(self.key_file, key)

    def active_key(self, alg: str = "ES256") -> SigningKey:
        for key in reversed(self.keys):
            if key.alg == alg:
                return key
        raise ValueError(f"no {alg} signing key")

    def rotate(self, alg: str = "ES256") -> str:
        """Add a new signing key for ``alg`` and make it active; older keys stay in the JWKS."""
        key = SigningKey.generate(alg)
        self._add(key)
        return key.kid

    def retire(self, kid: str) -> None:
        """Drop a key from the JWKS (in memory only; edit the key file to make it stick)."""
        with self._lock:
            rest = [k for k in self.keys if k.kid != kid]
            if len(rest) == len(self.keys) or not rest:
                raise ValueError(f"cannot retire {kid!r}")
            self.keys = rest

    def jwks(self) -> dict:
        return {"keys": [k.public_jwk() for k in self.keys]}

    # -- minting ------------------------------------------------------------------------
    def mint(self, client_id: str = "demo-client", scopes=None, tenant: str | None = None, *,
             jkt: str | None = None, x5t: str | None = None, lifetime: int | None = None,
             extra_claims: dict | None = None, kid: str | None = None, alg: str | None = None,
             typ: str | None = "at+jwt", audience=None, subject: str | None = None,
             now: float | None = None, extra_headers: dict | None = None) -> str:
        """Mint an access token directly (tests, demos). ``scopes``/``tenant`` default to the
        client table entry when the client is known. ``extra_claims`` are merged last; a value
        of None deletes that claim (e.g. ``{"exp": None}``). ``alg="none"`` yields an
        unsigned token, for negative tests."""
        client = self.clients.get(client_id)
        if scopes is None:
            scopes = client.scopes if client else ()
        scope = scopes if isinstance(scopes, str) else " ".join(scopes)
        if tenant is None and client is not None:
            tenant = client.tenant
        iat = int(time.time() if now is None else now)
        exp = iat + (self.lifetime if lifetime is None else lifetime)
        claims = {"iss": self.issuer, "sub": subject or client_id,
                  "aud": audience or (client.audience if client and client.audience
                                      else self.audience),
                  "exp": exp, "iat": iat, "nbf": iat, "jti": b64url(secrets.token_bytes(16)),
                  "scope": scope, "client_id": client_id}
        if tenant is not None:
            claims["stellaops:tenant"] = tenant
            claims["tid"] = tenant
        cnf = {}
        if jkt:
            cnf["jkt"] = jkt
        if x5t:
            cnf["x5t#S256"] = x5t
        if cnf:
            claims["cnf"] = cnf
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        headers = {"typ": typ}
        if alg == "none":
            headers.update(extra_headers or {})
            return jwt.encode(claims, None, algorithm="none", headers=headers)
        if kid is not None:
            key = next((k for k in self.keys if k.kid == kid), None)
            if key is None or (alg is not None and alg != key.alg):
                raise ValueError(f"no signing key {kid!r} for alg {alg!r}")
        else:
            key = self.active_key(alg or self.token_alg)
        headers["kid"] = key.kid
        headers.update(extra_headers or {})
        return jwt.encode(claims, key.private_key, algorithm=key.alg, headers=headers)

    # -- DPoP nonces and replay -------------------------------------------------------------
    def new_nonce(self, now: float | None = None) -> str:
        ts = int(time.time() if now is None else now).to_bytes(8, "big")
        return b64url(ts + hmac.new(self._nonce_secret, ts, hashlib.sha256).digest()[:16])

    def nonce_valid(self, nonce, now: float | None = None) -> bool:
        try:
            raw = b64url_decode(nonce)
        except ValueError:
            return False
        if len(raw) != 24:
            return False
        mac = hmac.new(self._nonce_secret, raw[:8], hashlib.sha256).digest()[:16]
        age = (time.time() if now is None else now) - int.from_bytes(raw[:8], "big")
        return hmac.compare_digest(mac, raw[8:]) and -5 <= age <= self.nonce_ttl

    def _replayed(self, key: str, now: float) -> bool:
        seen = self._seen_jti
        while seen and (next(iter(seen.values())) < now or len(seen) > 10000):
            seen.popitem(last=False)
        if key in seen:
            return True
        seen[key] = now + 2 * self.proof_skew + 1
        return False

    # -- token endpoint ---------------------------------------------------------------------
    def token_request(self, form: dict[str, list[str]], *, authorization: list[str],
                      dpop: list[str], token_endpoint: str,
                      peer_cert: bytes | None) -> tuple[dict, list[tuple[str, str]]]:
        """Decide a client_credentials request: (JSON body, extra response headers).
        Raises TokenError for error responses."""
        for name, values in form.items():
            if len(values) > 1:
                raise TokenError(400, "invalid_request", f"parameter {name} repeated")
        p = {k: v[0] for k, v in form.items()}
        if p.get("grant_type") != "client_credentials":
            raise TokenError(400, "unsupported_grant_type", "only client_credentials")
        client = self._authenticate(p, authorization)
        wanted = p.get("scope", "").split()
        if any(s not in client.scopes for s in wanted):
            raise TokenError(400, "invalid_scope", "scope not allowed for this client")
        tenant = p.get("tenant") or client.tenant
        if p.get("tenant") and tenant not in client.allowed_tenants():
            raise TokenError(400, "invalid_request", "tenant not allowed for this client")
        bind = p.get("bind")
        if bind not in (None, "", "dpop", "mtls"):
            raise TokenError(400, "invalid_request", "bind must be dpop or mtls")
        jkt = self._check_dpop(dpop, token_endpoint) if dpop or bind == "dpop" else None
        x5t = None
        if bind == "mtls":
            if not peer_cert:
                raise TokenError(400, "invalid_request", "bind=mtls needs a TLS client certificate")
            x5t = cert_thumbprint(peer_cert)
        scopes = wanted or list(client.scopes)
        token = self.mint(client.client_id, scopes, tenant, jkt=jkt, x5t=x5t)
        body = {"access_token": token, "token_type": "DPoP" if jkt else "Bearer",
                "expires_in": self.lifetime, "scope": " ".join(scopes)}
        extra = [("DPoP-Nonce", self.new_nonce())] if jkt and self.require_nonce else []
        return body, extra

    def _authenticate(self, p: dict, authorization: list[str]) -> Client:
        basic = [a for a in authorization if a[:6].lower() == "basic "]
        if len(authorization) > 1 or (basic and "client_secret" in p):
            raise TokenError(400, "invalid_request", "use exactly one client authentication method")
        if basic:
            try:
                raw = base64.b64decode(basic[0][6:].strip(), validate=True).decode("utf-8")
                cid, secret = (unquote_plus(x) for x in raw.split(":", 1))
            except (ValueError, UnicodeDecodeError):
                raise self._bad_client() from None
            if p.get("client_id", cid) != cid:
                raise TokenError(400, "invalid_request", "client_id differs from Basic auth")
        else:
            cid, secret = p.get("client_id", ""), p.get("client_secret", "")
        client = self.clients.get(cid)
        expected = client.secret if client else "\0" * 32
        if not hmac.compare_digest(secret.encode(), expected.encode()) or client is None:
            raise self._bad_client()
        return client

    @staticmethod
    def _bad_client() -> TokenError:
        return TokenError(401, "invalid_client", "client authentication failed",
                          [("WWW-Authenticate", 'Basic realm="stellagw-dev-authority"')])

    def _check_dpop(self, dpop: list[str], token_endpoint: str) -> str:
        if len(dpop) != 1:
            raise TokenError(400, "invalid_dpop_proof",
                             "exactly one DPoP header is required" if dpop else "missing DPoP proof")
        now = time.time()
        try:
            header, claims = verify_proof(dpop[0], method="POST", url=token_endpoint, now=now,
                                          max_skew=self.proof_skew, algorithms=DPOP_ALGS)
        except ProofError as exc:
            raise TokenError(400, "invalid_dpop_proof", str(exc)) from None
        if self.require_nonce and not self.nonce_valid(claims.get("nonce")):
            raise TokenError(400, "use_dpop_nonce", "Authorization server requires nonce in DPoP proof",
                             [("DPoP-Nonce", self.new_nonce(now))])
        jkt = jwk_thumbprint(header["jwk"])
        with self._lock:
            if self._replayed(f"{jkt}.{claims['jti']}", now):
                raise TokenError(400, "invalid_dpop_proof", "DPoP proof replayed")
        return jkt
