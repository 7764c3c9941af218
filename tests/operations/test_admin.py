"""The admin listener (issue 16 item 5): probes, /metrics, readiness details and OpenAPI on
their own port, never refused by the client connection cap; the client port serves only
what `gateway.admin.publicEndpoints` lists."""
from __future__ import annotations

import orjson
import pytest

from tests.support.gwtest import Served, connect, port_of, read_response, request


def get(port, path, extra=b""):
    return request(port, b"GET %s HTTP/1.1\r\nHost: gw\r\n%s\r\n" % (path.encode(), extra))


@pytest.fixture
def gateway(start_gateway):
    return start_gateway


def admin_port(gw) -> int:
    return gw.worker.admin_address[1]


def test_internal_endpoints_are_on_the_admin_port_and_not_on_the_client_port(tmp_path):
    s = Served(config_text="gateway: {http: {port: 0}, transports: {tcp: {port: 0}}, "
                           "node: {preStopDelay: 0s}}", tmp_path=tmp_path)
    try:
        [rec] = s.wait_listening()
        http, admin = port_of(rec["http"]), port_of(rec["admin"])
        assert rec["admin"].startswith("http://127.0.0.1:")
        for path in ("/metrics", "/openapi.json", "/openapi.yaml", "/.well-known/openapi"):
            assert get(admin, path)[0] == 200, path
            assert get(http, path)[0] == 404, path     # not built in there: no route
        status, _, body = get(admin, "/health/ready")
        ready = orjson.loads(body)
        assert status == 200 and ready["status"] == "Ready" and "services" in ready
        assert ready["worker"] == 0 and ready["node"]
        # The client port keeps the probes a load balancer needs, without the details.
        status, _, body = get(http, "/health/ready")
        assert (status, body) == (200, b'{"status":"Ready"}')
        assert get(http, "/health/startup")[2] == b'{"status":"Started"}'
        assert get(http, "/health/live")[0] == get(admin, "/health/live")[0] == 200
        assert orjson.loads(get(admin, "/health/startup")[2]) == {"status": "Started", "reasons": []}
        # Admin requests count like any built-in, as the whole instance's /metrics shows.
        text = get(admin, "/metrics")[2].decode()
        assert 'gateway_requests_total{method="GET",path="/metrics",service="",status="200"}' in text
    finally:
        assert s.stop() == 0


def test_public_endpoints_are_what_the_operator_lists(gateway):
    gw = gateway("gateway: {http: {port: 0}, admin: {publicEndpoints: [ready, metrics, details]}}")
    assert get(gw.port, "/health/live")[0] == 404
    assert get(gw.port, "/metrics")[0] == 200
    assert "services" in orjson.loads(get(gw.port, "/health/ready")[2])   # with details
    assert get(gw.port, "/openapi.json")[0] == 404
    for path in ("/health/live", "/metrics", "/openapi.json", "/health/startup"):
        assert get(admin_port(gw), path)[0] == 200, path

    gw = gateway("gateway: {http: {port: 0}, admin: {publicEndpoints: []}}")
    assert get(gw.port, "/health/live")[0] == 404
    assert get(admin_port(gw), "/health/live")[0] == 200

    # `all`: the client port as it was before the admin listener (tests, development).
    gw = gateway("gateway: {http: {port: 0}, admin: {publicEndpoints: [all]}}")
    for path in ("/health/live", "/health/startup", "/metrics", "/openapi.json"):
        assert get(gw.port, path)[0] == 200, path
    assert orjson.loads(get(gw.port, "/health/ready")[2])["worker"] == 0


def test_admin_listener_can_be_turned_off(gateway):
    gw = gateway("gateway: {http: {port: 0}, admin: {enabled: false, publicEndpoints: [live, metrics]}}")
    assert gw.worker.admin_address is None and gw.worker.admin is None
    assert get(gw.port, "/metrics")[0] == 200
    assert get(gw.port, "/health/ready")[0] == 404


def test_admin_port_answers_only_built_ins(gateway):
    gw = gateway()
    port = admin_port(gw)
    status, headers, body = get(port, "/t/svc/x")
    assert status == 404 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["message"] == "no admin endpoint /t/svc/x"
    status, headers, _ = request(port, b"POST /metrics HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_probes_are_answered_while_clients_hold_every_connection(gateway):
    gw = gateway("gateway: {http: {port: 0, maxConnections: 3}, admin: {maxConnections: 2}}")
    clients = [connect(gw.port) for _ in range(3)]
    try:
        for c in clients:   # every slot taken (each answered once, so surely accepted)
            c.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(c)[0] == 200
        status, _, body = get(gw.port, "/health/live")
        assert status == 503 and b"connection limit reached" in body
        port = admin_port(gw)
        for path in ("/health/live", "/health/ready", "/health/startup", "/metrics"):
            assert get(port, path)[0] == 200, path
        # Open admin connections are not client connections, in the cap or in the gauge.
        with connect(port) as held:
            held.sendall(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
            text = read_response(held)[2].decode()
            assert 'gateway_active_connections{service="ingress"} 3.0' in text
            assert "gateway_admin_connections 1.0" in text
            # The admin listener has a cap of its own.
            with connect(port) as second:
                second.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert read_response(second)[0] == 200
                status, _, body = get(port, "/health/live")
                assert status == 503 and b"connection limit reached" in body
    finally:
        for c in clients:
            c.close()


def test_admin_keep_alive_and_deadlines_follow_the_client_settings(gateway):
    gw = gateway("gateway: {http: {port: 0, headerReadTimeout: 1s}}")
    with connect(admin_port(gw)) as s:
        buf = bytearray()
        for _ in range(3):
            s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert read_response(s, buf)[0] == 200
        s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\n")   # never finished
        s.settimeout(5)
        status, _, _ = read_response(s, buf)
        assert status == 408
