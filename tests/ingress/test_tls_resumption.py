"""A resumed TLS session and the client certificate it carries (docs/security.md §3a′
item 7, §3d row 54; stellagw/ingress/tls_accept.py).

OpenSSL verifies a client certificate at the full handshake only; a resumed session
(a TLS 1.3 ticket, 2 hours by default) brings the certificate with it, unchecked. Before,
every handshake of the HTTPS listener started on one context for good, whose tickets
outlived a reload, so a session from before a CA was removed from clientCaPath was resumed
after it; and a session resumed after its certificate expired still carried it. Either way
a token bound to that certificate reached the service."""
from __future__ import annotations

import base64
import datetime
import hashlib
import socket
import time

import orjson
import pytest
from cryptography.hazmat.primitives import serialization

from stellagw.devauth import DevAuthority
from stellagw.devauth.pki import issue_cert, make_ca, write_pem

from tests.support.gwtest import Pki, Served, port_of, read_response, wait_for
from tests.support.services import ServiceProcess, stop_services

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


def _x5t(cert) -> str:
    der = cert.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


class _Stack:
    """One worker (tickets are per worker), a real Authority and service `sec`; client
    certificates from a CA of the test's own, listed in clientCaPath beside the Pki's."""

    def __init__(self, tmp_path):
        self.pki = Pki(tmp_path)
        self.ca, self.ca_key = make_ca("resumption test CA")
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        self.bundle = str(tmp_path / "client-cas.pem")
        self.write_cas(with_ours=True)
        self.authority = DevAuthority(port=0).start_in_thread()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        tls = {"enabled": True, "certificatePath": self.pki.server_cert,
               "keyPath": self.pki.server_key, "clientCertificateMode": "AllowCertificate",
               "clientCaPath": self.bundle}
        config = {"gateway": {
            "node": {"workers": 1, "preStopDelay": "0s"}, "admin": {"publicEndpoints": ["all"]},
            "http": {"port": port, "publicOrigin": f"https://127.0.0.1:{port}", "tls": tls},
            "transports": {"tcp": {"port": 0}},
            "auth": {"authority": self.authority.issuer, "audiences": ["stellaops-gateway"]},
            "logging": {"accessLog": False}}}
        self.gw = Served(config_text=orjson.dumps(config).decode(), tmp_path=tmp_path)
        rec = self.gw.wait_listening()[0]
        self.https, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])
        self.procs = [ServiceProcess("sec", self.tcp).start()]
        assert wait_for(self._ready, 30), self.procs[0].describe()

    def write_cas(self, with_ours: bool) -> None:
        with open(self.pki.ca_path, "rb") as f:
            data = f.read()
        with open(self.bundle, "wb") as f:
            f.write(data + (self.ca_pem if with_ours else b""))

    def client(self, tmp_path, name: str, seconds: float):
        cert, key = issue_cert(self.ca, self.ca_key, name, client=True, server=False,
                               days=seconds / 86400)
        path = write_pem(str(tmp_path / f"{name}.pem"), cert, key)
        ctx = self.pki.client_context()
        ctx.load_cert_chain(path)
        return ctx, _x5t(cert)

    def connect(self, ctx, session=None):
        raw = socket.create_connection(("127.0.0.1", self.https), timeout=5)
        return ctx.wrap_socket(raw, server_hostname="localhost", session=session)

    def get(self, sock, path: str, token: str | None = None):
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}\r\n".encode())
        return read_response(sock)

    def _ready(self):
        try:
            with self.connect(self.pki.client_context()) as s:
                status, _, body = self.get(s, "/health/ready")
        except OSError:
            return False
        return status == 200 and "sec" in orjson.loads(body)["services"]

    def hits(self) -> list:
        with self.connect(self.pki.client_context()) as s:
            return orjson.loads(self.get(s, "/t/sec/hits")[2])["hits"]

    def close(self):
        stop_services(self.procs)
        self.gw.stop()
        self.authority.stop()


@pytest.fixture
def stack(tmp_path):
    s = _Stack(tmp_path)
    yield s
    s.close()


def _session(stack, ctx, token):
    """A full handshake whose bound request reaches the service; its TLS 1.3 ticket."""
    with stack.connect(ctx) as s:
        status, _, body = stack.get(s, "/t/sec/hit/full", token)
        assert status == 200, body
        assert s.version() == "TLSv1.3"
        return s.session


def test_a_session_from_before_a_ca_was_removed_is_not_resumed_after_it(stack, tmp_path):
    ctx, x5t = stack.client(tmp_path, "client-ca-removed", 3600)
    token = stack.authority.mint(scopes=["scans:read"], x5t=x5t)
    session = _session(stack, ctx, token)
    with stack.connect(ctx, session) as s:          # resumption works while nothing changed
        assert s.session_reused
        assert stack.get(s, "/t/sec/hit/resumed", token)[0] == 200

    stack.write_cas(with_ours=False)                # the CA is withdrawn: the file watch reloads
    stack.gw.wait_for_log(lambda r: r.get("message") == "certificates reloaded")
    outcomes = []
    for n in range(3):
        try:
            with stack.connect(ctx, session) as s:
                outcomes.append((s.session_reused, stack.get(s, f"/t/sec/hit/after-{n}", token)[0]))
        except OSError as exc:                      # the full handshake refuses the certificate
            outcomes.append(type(exc).__name__)
    assert all(not isinstance(o, tuple) for o in outcomes), outcomes
    assert stack.hits() == ["/t/sec/hit/full", "/t/sec/hit/resumed"]


def test_a_session_resumed_after_its_certificate_expired_carries_no_certificate(stack, tmp_path):
    ctx, x5t = stack.client(tmp_path, "client-expiring", 4)
    token = stack.authority.mint(scopes=["scans:read"], x5t=x5t)
    session = _session(stack, ctx, token)
    time.sleep(5)                                   # the certificate has expired
    with stack.connect(ctx, session) as s:
        assert s.session_reused
        status, _, body = stack.get(s, "/t/sec/hit/expired", token)
    assert status == 401
    assert b"invalid_token" in body, body
    # A full handshake with it is refused, as before.
    with pytest.raises(OSError):
        with stack.connect(ctx) as s:
            stack.get(s, "/t/sec/hit/full-again", token)
    assert stack.hits() == ["/t/sec/hit/full"]
