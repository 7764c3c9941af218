"""Test helpers for stellagw.auth: keys, tokens and DPoP proofs minted here with PyJWT and
cryptography (independently of stellagw.devauth), fake requests, a fake Valkey, and a real
loopback Authority (discovery + JWKS over stdlib http.server).

Named test_auth_*.py so it sits with the auth tests; it holds no tests itself.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from stellagw.auth import Authenticator
from stellagw.config import load_config_text

ISSUER_PLACEHOLDER = "https://authority.test"
NOW = 1_800_000_000.0          # the pinned wall clock of most tests


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64u_json(obj) -> str:
    return b64u(json.dumps(obj, separators=(",", ":")).encode())


# ---------------------------------------------------------------------- keys

class SigningKey:
    """A private key, its public JWK, and the alg it signs with."""

    def __init__(self, alg: str = "ES256", kid: str | None = "k1", bits: int = 2048):
        self.alg = alg
        self.kid = kid
        if alg.startswith("ES"):
            curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
            self.private = ec.generate_private_key(curve)
            algo = jwt.algorithms.ECAlgorithm
        elif alg in ("EdDSA",):
            self.private = ed25519.Ed25519PrivateKey.generate()
            algo = jwt.algorithms.OKPAlgorithm
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
            algo = jwt.algorithms.RSAAlgorithm
        self.public_jwk = json.loads(algo.to_jwk(self.private.public_key()))
        self.private_jwk = json.loads(algo.to_jwk(self.private))
        if kid is not None:
            self.public_jwk["kid"] = kid

    @property
    def jkt(self) -> str:
        members = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                   "OKP": ("crv", "kty", "x")}[self.public_jwk["kty"]]
        canonical = json.dumps({m: self.public_jwk[m] for m in members}, separators=(",", ":"),
                               sort_keys=True)
        return b64u(hashlib.sha256(canonical.encode()).digest())

    def bare_jwk(self) -> dict:
        return {k: v for k, v in self.public_jwk.items() if k not in ("kid",)}


def jwks(*keys: SigningKey) -> dict:
    return {"keys": [k.public_jwk for k in keys]}


def mint_token(key: SigningKey, issuer: str, *, now: float = NOW, lifetime: float = 300,
               header: dict | None = None, alg: str | None = None, drop=(), **claims) -> str:
    payload = {"iss": issuer, "sub": "user-1", "aud": "stellaops-gateway", "iat": int(now),
               "nbf": int(now), "exp": int(now + lifetime), "jti": uuid.uuid4().hex,
               "client_id": "cli-1", "scope": "read write", "stellaops:tenant": "t-1"}
    payload.update(claims)
    for name in drop:
        payload.pop(name, None)
    headers = {"typ": "at+jwt"}
    if key.kid is not None:
        headers["kid"] = key.kid
    headers.update(header or {})
    return jwt.encode(payload, key.private, algorithm=alg or key.alg, headers=headers)


def sign_raw(key: SigningKey, header: dict, payload: dict, alg: str | None = None) -> str:
    """A compact JWS with exactly this header (PyJWT adds nothing but what we pass)."""
    alg = alg or key.alg
    h = b64u_json(header)
    p = b64u_json(payload)
    signer = jwt.algorithms.get_default_algorithms()[alg]
    signature = signer.sign(f"{h}.{p}".encode(), key.private)
    return f"{h}.{p}.{b64u(signature)}"


class DpopClient:
    """Makes DPoP proofs the way a client would (RFC 9449 §4.2)."""

    def __init__(self, alg: str = "ES256"):
        self.key = SigningKey(alg, kid=None)

    @property
    def jkt(self) -> str:
        return self.key.jkt

    def proof(self, method: str, url: str, token: str | None = None, *, now: float = NOW,
              nonce: str | None = None, header: dict | None = None, drop=(), alg=None,
              **claims) -> str:
        h = {"typ": "dpop+jwt", "alg": alg or self.key.alg, "jwk": self.key.bare_jwk()}
        h.update(header or {})
        payload = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(now)}
        if token is not None:
            payload["ath"] = b64u(hashlib.sha256(token.encode()).digest())
        if nonce is not None:
            payload["nonce"] = nonce
        payload.update(claims)
        for name in drop:
            payload.pop(name, None)
            h.pop(name, None)
        return sign_raw(self.key, h, payload, alg=self.key.alg)


# ---------------------------------------------------------------------- requests

class FakeConn:
    def __init__(self, peer_cert: bytes | None = None):
        self.peer_cert = peer_cert


class FakeRequest:
    def __init__(self, method="GET", target=b"/api/items", headers=(), peer_cert=None):
        self.method = method
        self.target = target
        self.query = b""
        self.headers = [(n.lower(), v) for n, v in headers]
        self.conn = FakeConn(peer_cert)
        self.correlation_id = "cid-test"
        self.tenant = None


def dpop_request(client: DpopClient, token: str, *, method="GET", path="/api/items",
                 origin="https://gw.example.com", proof=None, extra=(), **proof_args):
    if proof is None:
        proof = client.proof(method, origin + path, token, **proof_args)
    headers = [(b"host", b"gw.example.com"), (b"authorization", b"DPoP " + token.encode()),
               (b"dpop", proof.encode())] + list(extra)
    return FakeRequest(method, path.encode(), headers)


def bearer_request(token: str, *, method="GET", path="/api/items", extra=(), peer_cert=None):
    headers = [(b"host", b"gw.example.com"), (b"authorization", b"Bearer " + token.encode())]
    return FakeRequest(method, path.encode(), headers + list(extra), peer_cert=peer_cert)


# ---------------------------------------------------------------------- the authenticator

class Events:
    def __init__(self):
        self.counts: dict[str, int] = {}

    def __call__(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1


class ListLog:
    """Stands in for JsonLog: keeps records; threshold 10 (debug) so every line is made."""
    threshold = 10

    def __init__(self):
        self.records: list[dict] = []

    def event(self, level, message, **fields):
        self.records.append({"level": level, "message": message, **fields})

    def text(self) -> str:
        return json.dumps(self.records)


def settings(auth_yaml: str = "", http_yaml: str = 'publicOrigin: "https://gw.example.com"'):
    text = "gateway:\n  http:\n    " + http_yaml + "\n  auth:\n" + "".join(
        "    " + line + "\n" for line in auth_yaml.strip("\n").splitlines())
    return load_config_text(text, env={})


def make_authenticator(tmp_path, keys, auth_yaml: str = "", *, issuer=ISSUER_PLACEHOLDER,
                       clock=lambda: NOW, valkey=None, http_yaml=None):
    """An Authenticator over a static JWKS file holding `keys`, started on a throwaway loop."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(*keys)))
    yaml_text = f'authority: "{issuer}"\njwksPath: "{path}"\n' + auth_yaml
    s = settings(yaml_text) if http_yaml is None else settings(yaml_text, http_yaml)
    log = ListLog()
    events = Events()
    auth = Authenticator(s, log, events, valkey=valkey, clock=clock)
    auth.test_log, auth.test_events = log, events

    async def start():
        await auth.start()
        auth.stop()          # no refresh task outliving this loop
    asyncio.run(start())
    assert auth.ready_reasons() == []
    return auth


def resolve(result):
    """Run an awaitable result of authenticate() to completion (sync results pass through)."""
    if hasattr(result, "__await__"):
        async def wait():
            return await result
        return asyncio.run(wait())
    return result


# ---------------------------------------------------------------------- fake Valkey

class FakeValkeyError(Exception):
    """Stands in for stellagw.valkey.ValkeyError subclasses."""


class FakeValkey:
    """Implements the one ValkeyClient method the replay cache uses: `execute`."""

    def __init__(self):
        self.store: dict[str, float] = {}
        self.calls: list[tuple] = []
        self.down = False
        self.hang = False

    async def execute(self, *args):
        self.calls.append(args)
        if self.hang:
            await asyncio.sleep(3600)
        if self.down:
            raise FakeValkeyError("connection refused")
        command, key, value, nx, px, ttl = args
        assert (command, value, nx, px) == ("SET", "1", "NX", "PX")
        now = time.monotonic()
        if key in self.store and self.store[key] > now:
            return None
        self.store[key] = now + int(ttl) / 1000
        return b"OK"


# ---------------------------------------------------------------------- a real loopback Authority

class LoopbackAuthority:
    """OIDC discovery + JWKS on 127.0.0.1 in a thread. Counts requests; can go down."""

    def __init__(self, *keys: SigningKey, delay: float = 0.0):
        self.keys = list(keys)
        self.delay = delay
        self.drip = 0.0         # > 0: the JWKS body goes out a byte at a time, this far apart
        self.drip_head = False  # with drip: the status line and headers too
        self._closed = threading.Event()
        self.down = False
        self.wrong_issuer = False
        self.jwks_requests = 0
        self.discovery_requests = 0
        authority = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                if authority.down:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    authority.discovery_requests += 1
                    body = {"issuer": authority.issuer + ("/evil" if authority.wrong_issuer else ""),
                            "jwks_uri": authority.issuer + "/jwks"}
                elif self.path == "/jwks":
                    authority.jwks_requests += 1
                    if authority.delay:
                        time.sleep(authority.delay)
                    body = jwks(*authority.keys)
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                if self.path == "/jwks" and authority.drip and authority.drip_head:
                    data = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\n\r\n" % len(data)) + data
                    self.close_connection = True
                    for i in range(len(data)):
                        if authority._closed.wait(authority.drip):
                            return
                        try:
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                        except OSError:      # the gateway gave up at its deadline
                            return
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.path == "/jwks" and authority.drip:
                    for i in range(len(data)):      # a trickle: each read gets something
                        if authority._closed.wait(authority.drip):
                            return
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    return
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._closed.set()
        self.server.shutdown()
        self.server.server_close()


def no_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def random_secret() -> str:
    return os.urandom(24).hex()
