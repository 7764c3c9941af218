"""The ingress over real loopback sockets: keep-alive, pipelining, deadlines, TLS, drain."""
from __future__ import annotations

import os
import socket
import ssl
import threading
import time

import orjson
import pytest

from tests.support.gwtest import (NullLog, Pki, connect, is_closed, read_response, request,
                                  wait_for)

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


@pytest.fixture
def gateway(start_gateway):
    return lambda yaml_text="", log=None: start_gateway(
        yaml_text or "gateway: {http: {port: 0}, admin: {publicEndpoints: [all]}}", log=log)


def test_keep_alive_and_pipelining_over_a_socket(gateway):
    gw = gateway()
    with connect(gw.port) as s:
        buf = bytearray()
        for _ in range(3):
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s, buf)[0] == 200
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 5 + b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n")
        statuses = [read_response(s, buf)[0] for _ in range(6)]
        assert statuses == [200] * 5 + [404]


def test_ready_startup_and_metrics(gateway):
    gw = gateway()
    status, _, body = request(gw.port, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200 and orjson.loads(body)["status"] == "Ready"
    status, _, body = request(gw.port, b"GET /health/startup HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200 and orjson.loads(body)["status"] == "Started"
    request(gw.port, b"GET /nothing/here HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, headers, body = request(gw.port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    text = body.decode()
    assert 'gateway_requests_total{method="GET",path="/health/ready",service="",status="200"} 1.0' in text
    assert 'gateway_requests_total{method="GET",path="unmatched",service="",status="404"} 1.0' in text
    assert "gateway_request_duration_seconds_bucket" in text
    assert 'gateway_active_connections{service="ingress"} 1.0' in text


def test_slowloris_gets_408_and_close(gateway):
    gw = gateway("gateway: {http: {port: 0, headerReadTimeout: 1s}}")
    with connect(gw.port) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        status, headers, body = read_response(s)
        assert status == 408 and headers["connection"] == "close"
        assert 0.9 <= time.monotonic() - t0 < 4
        assert is_closed(s)


def test_idle_keep_alive_connection_is_closed(gateway):
    gw = gateway("gateway: {http: {port: 0, keepAliveTimeout: 1s}}")
    with connect(gw.port) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(s)[0] == 200
        assert is_closed(s, timeout=5)


def _accepted(gw, client: socket.socket) -> socket.socket:
    """The gateway's side of `client`'s connection (the gateway runs in this process): a
    duplicate of its descriptor, for reading its options."""
    import psutil
    peer = client.getsockname()
    for c in psutil.Process().net_connections("tcp"):
        if c.laddr and c.raddr and c.laddr[1] == gw.port and tuple(c.raddr) == peer:
            return socket.socket(fileno=os.dup(c.fd))
    raise AssertionError(f"no accepted connection from {peer}")


@pytest.mark.parametrize("idle, on", [("45s", True), ("0", False)])
def test_client_connections_carry_tcp_keep_alive(gateway, idle, on):
    # A client gone without a FIN is found by the kernel's probes (gateway.http.tcpKeepAlive),
    # set on the listening socket and copied by Linux to every accepted connection.
    gw = gateway(f"gateway: {{http: {{port: 0, tcpKeepAlive: {idle}}}}}")
    with connect(gw.port) as s:
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(s)[0] == 200
        with _accepted(gw, s) as accepted:
            assert bool(accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)) is on
            if on:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 45
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6


def test_malformed_request_over_socket(gateway):
    gw = gateway()
    with connect(gw.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        status, headers, body = read_response(s)
        assert status == 400 and orjson.loads(body)["error"]["code"] == "bad_request"
        assert is_closed(s)


def test_connection_cap(gateway):
    gw = gateway("gateway: {http: {port: 0, maxConnections: 2}}")
    a, b = connect(gw.port), connect(gw.port)
    try:
        assert wait_for(lambda: len(gw.worker.connections) == 2)
        with connect(gw.port) as c:
            status, _, body = read_response(c)
            assert status == 503 and is_closed(c)
        a.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(a)[0] == 200
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def _tls_yaml(pki, **extra):
    tls = {"enabled": True, "certificatePath": pki.server_cert, "keyPath": pki.server_key}
    tls.update(extra)
    return orjson.dumps({"gateway": {"http": {"port": 0, "tls": tls}}}).decode()


def _https(port, ctx, raw=b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n"):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw_sock:
        with ctx.wrap_socket(raw_sock, server_hostname="localhost") as s:
            s.sendall(raw)
            return s.version(), read_response(s)


def test_https_prefers_tls13(gateway, pki):
    gw = gateway(_tls_yaml(pki))
    version, (status, _, _) = _https(gw.port, pki.client_context())
    assert version == "TLSv1.3" and status == 200


def test_https_tls12_allowed_by_default_refused_with_min_13(gateway, pki):
    ctx = pki.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    gw = gateway(_tls_yaml(pki))
    version, (status, _, _) = _https(gw.port, ctx)
    assert version == "TLSv1.2" and status == 200
    gw13 = gateway(_tls_yaml(pki, minVersion="1.3"))
    with pytest.raises(ssl.SSLError):
        _https(gw13.port, ctx)


def test_https_client_that_reads_nothing_is_cut_after_send_timeout(gateway, pki):
    # gateway.http.sendTimeout through TLS: what is owed sits in the TLS layer's buffer and
    # the kernel's; the cut resets the connection all the same (tests/ingress/test_backpressure.py
    # has the plain-TCP cases).
    cfg = orjson.loads(_tls_yaml(pki))
    cfg["gateway"]["http"].update({"sendTimeout": "2s", "keepAliveTimeout": "1s"})
    cfg["gateway"]["logging"] = {"accessLog": False}
    gw = gateway(orjson.dumps(cfg).decode())
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", gw.port))
    s = pki.client_context().wrap_socket(raw, server_hostname="localhost")
    s.settimeout(10)

    def send():
        try:
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n" * 50_000)
        except OSError:
            pass        # reset by the gateway
    sender = threading.Thread(target=send, daemon=True)
    try:
        sender.start()
        assert wait_for(lambda: gw.call(lambda: len(gw.worker.connections)) == 1, 5)
        assert wait_for(lambda: gw.call(lambda: len(gw.worker.connections)) == 0, 20)
        assert gw.call(lambda: dict(gw.worker.aborted_connections)) == {"send_timeout": 1}
        assert gw.call(lambda: dict(gw.worker.per_client)) == {}
        sender.join(10)
        assert not sender.is_alive()        # its connection is gone: sendall ended
    finally:
        raw.close()


def test_https_from_pfx_with_password(gateway, pki):
    gw = gateway(_tls_yaml(pki, certificatePath=pki.server_pfx, keyPath="",
                           certificatePassword=pki.server_pfx_password))
    _, (status, _, _) = _https(gw.port, pki.client_context())
    assert status == 200


def test_client_certificate_kept_with_the_connection(gateway, pki):
    gw = gateway(_tls_yaml(pki, clientCertificateMode="AllowCertificate", clientCaPath=pki.ca_path))
    ctx = pki.client_context(with_cert=True)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as raw_sock:
        with ctx.wrap_socket(raw_sock, server_hostname="localhost") as s:
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(s)[0] == 200
            certs = gw.call(lambda: [c.peer_cert for c in gw.worker.connections])
            assert certs == [pki.client_cert_der]
    # Without a certificate the connection is still served (AllowCertificate) ...
    _, (status, _, _) = _https(gw.port, pki.client_context())
    assert status == 200
    # ... and RequireCertificate refuses it.
    gw2 = gateway(_tls_yaml(pki, clientCertificateMode="RequireCertificate", clientCaPath=pki.ca_path))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _https(gw2.port, pki.client_context())


class SlowPipeline:
    """/slow is answered 0.5 s later, from the loop, like a routed request."""

    def __init__(self, worker, inner):
        self.worker, self.inner = worker, inner

    def handle(self, req):
        if req.target == b"/slow":
            import asyncio
            asyncio.get_running_loop().call_later(
                0.5, lambda: req.conn.respond(req, 200, b"", b"finished"))
            return None
        return self.inner.handle(req)


def test_graceful_shutdown_finishes_in_flight_requests(gateway):
    gw = gateway("gateway: {http: {port: 0, shutdownTimeout: 5s}}")
    gw.call(lambda: setattr(gw.worker, "pipeline", SlowPipeline(gw.worker, gw.worker.pipeline)))
    # Protocols bind pipeline.handle when the connection opens: open after the swap.
    slow = connect(gw.port)
    idle = connect(gw.port)
    try:
        idle.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert read_response(idle)[0] == 200
        slow.sendall(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
        time.sleep(0.1)
        fut = gw.drain(wait=False)
        assert is_closed(idle)  # idle keep-alive connections go at once
        status, headers, body = read_response(slow)
        assert (status, body, headers["connection"]) == (200, b"finished", "close")
        fut.result(10)
        with pytest.raises(OSError):
            connect(gw.port, timeout=1).sendall(b"GET / HTTP/1.1\r\nHost: gw\r\n\r\n")
    finally:
        slow.close()
        idle.close()


def test_readiness_turns_503_while_draining(gateway):
    gw = gateway()
    gw.call(lambda: setattr(gw.worker, "draining", True))
    status, _, body = request(gw.port, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 503 and "draining" in orjson.loads(body)["reasons"][0]


def test_request_log_lines_carry_no_credentials(gateway):
    log = NullLog()
    gw = gateway(log=log.log)
    request(gw.port, b"GET /health/live?token=eyJsecret HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP eyJhbGciOi.secret\r\n"
                     b"DPoP: eyJ0eXAiOi.proof\r\n\r\n")
    gw.call(log.log.flush)
    text = b"\n".join(log.lines())
    assert b"/health/live" in text
    assert b"eyJ" not in text and b"secret" not in text and b"proof" not in text
