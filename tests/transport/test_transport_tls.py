"""The TLS service transport: a required client certificate and the thumbprint allow-list."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time

import orjson
import pytest

from stellagw.service import Response, Service

from tests.support.gwtest import GatewayThread, Pki, request, settings_from


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_gateway(pki, **tls):
    """A gateway whose only service transport is TLS with a required client certificate."""
    config = {"gateway": {
        "http": {"port": 0},
        "transports": {"tcp": {"enabled": False},
                       "tls": {"enabled": True, "port": 0, "certificatePath": pki.server_cert,
                               "keyPath": pki.server_key, "clientCaPath": pki.ca_path,
                               "clientCertificateMode": "RequireCertificate", **tls}}}}
    gw = GatewayThread(settings_from(orjson.dumps(config).decode())).start()
    return gw, gw.worker.transport_addresses["tls"][1]


def test_tls_transport_admits_only_allowed_client_certificates(pki):
    allowed = hashlib.sha256(pki.client_cert_der).hexdigest()
    gw, tls_port = tls_gateway(pki, allowedClientCertificateThumbprints=[allowed])

    def client_ctx(cert, key):
        ctx = ssl.create_default_context(cafile=pki.ca_path)
        ctx.load_cert_chain(cert, key)
        return ctx

    async def run(name, ctx, expect_registered):
        svc = Service(name, gateways=[f"127.0.0.1:{tls_port}"], ssl=ctx,
                      server_hostname="localhost", reconnect_min=0.05, reconnect_max=0.2)

        @svc.get(f"/t/{name}/x")
        async def x(req):
            return Response(b"over tls")
        await svc.start()
        try:
            if expect_registered:
                await svc.wait_registered(1, timeout=10)
            else:
                with pytest.raises(TimeoutError):
                    await svc.wait_registered(1, timeout=1.5)
        finally:
            await svc.stop()

    try:
        asyncio.run(run("trusted", client_ctx(pki.client_cert, pki.client_key), True))
        # Same CA, valid TLS, but not on the allow-list: the connection is refused.
        asyncio.run(run("stranger", client_ctx(pki.other_cert, pki.other_key), False))
        assert request(gw.port, b"GET /t/stranger/x HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 404
    finally:
        gw.stop()


def test_tls_transport_routes_requests(pki):
    gw, tls_port = tls_gateway(pki)
    ctx = ssl.create_default_context(cafile=pki.ca_path)
    ctx.load_cert_chain(pki.client_cert, pki.client_key)

    async def main():
        svc = Service("secured", gateways=[f"127.0.0.1:{tls_port}"], ssl=ctx,
                      server_hostname="localhost")

        @svc.get("/t/secured/x")
        async def x(req):
            return Response(b"over tls")
        await svc.start()
        await svc.wait_registered(1)
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            None, lambda: request(gw.port, b"GET /t/secured/x HTTP/1.1\r\nHost: gw\r\n\r\n"))
        await svc.stop()
        return result
    try:
        status, _, body = asyncio.run(main())
        assert status == 200 and body == b"over tls"
    finally:
        gw.stop()


def test_a_tls_peer_that_never_finishes_its_handshake_is_dropped_in_hello_time(pki, monkeypatch):
    # The HELLO deadline (10 s; 1 s here) starts when the TLS handshake is done, so the
    # handshake needs one of its own: uvloop's default is 60 s, during which a silent
    # connection is in no count the gateway keeps. One that sends half a ClientHello and
    # one that sends nothing are both closed in about a second.
    from stellagw.transport import connection
    monkeypatch.setattr(connection, "HELLO_TIMEOUT", 1.0)
    gw, tls_port = tls_gateway(pki)
    try:
        silent = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        half = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
        start = time.monotonic()
        for s in (silent, half):
            with s:
                try:
                    got = s.recv(1)                 # TimeoutError after 10 s: still open
                except ConnectionResetError:
                    got = b""
                assert got == b""
        assert time.monotonic() - start < 8
    finally:
        gw.stop()
