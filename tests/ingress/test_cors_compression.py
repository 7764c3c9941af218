"""CORS answered at the gateway and gzip of answers (issue 18 item 6), end to end through a
real gateway and SDK service."""
from __future__ import annotations

import gzip

import orjson
import pytest

from tests.support.gwtest import Served, connect, port_of, read_response
from tests.support.services import start_service

CONFIG = """
gateway:
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  admin: {publicEndpoints: [all]}
  cors:
    allowOrigins: ["https://app.example"]
    allowCredentials: true
    maxAge: 5m
    routes:
      - {pathPrefix: /t/cc/whoami, allowOrigins: ["*"], allowMethods: [GET]}
  compression: {enabled: true, minSize: 2KB}
"""


@pytest.fixture(scope="module")
def port(tmp_path_factory):
    gw = Served(config_text=CONFIG, tmp_path=tmp_path_factory.mktemp("cors"))
    rec = gw.wait_listening()[0]
    http, tcp = port_of(rec["http"]), port_of(rec["tcp"])
    try:
        with start_service("cc", tcp, wait=http):
            yield http
    finally:
        gw.stop()


def raw(port, data):
    with connect(port) as s:
        s.sendall(data)
        return read_response(s)[:3]


PREFLIGHT = (b"OPTIONS /t/cc/echo HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n"
             b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: Content-Type, DPoP\r\n\r\n")


def test_a_preflight_is_answered_by_the_gateway(port):
    status, headers, body = raw(port, PREFLIGHT)
    assert status == 204 and body == b""
    assert headers["access-control-allow-origin"] == "https://app.example"
    assert headers["access-control-allow-methods"] == "POST"
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-max-age"] == "300" and headers["vary"] == "origin"
    assert "dpop" in headers["access-control-allow-headers"]


@pytest.mark.parametrize("change, reason", [
    ((b"https://app.example", b"https://evil.example"), "origin"),
    ((b"Request-Method: POST", b"Request-Method: DELETE"), "DELETE"),
    ((b"Content-Type, DPoP", b"X-Secret"), "header"),
])
def test_a_preflight_outside_the_policy_is_refused(port, change, reason):
    status, headers, body = raw(port, PREFLIGHT.replace(*change))
    assert status == 403 and reason in orjson.loads(body)["error"]["message"]
    assert "access-control-allow-origin" not in headers


def test_cross_origin_answers_carry_the_headers_gateway_errors_too(port):
    status, headers, _ = raw(port, b"POST /t/cc/echo HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n"
                                   b"Content-Length: 2\r\n\r\nhi")
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert "x-correlation-id" in headers["access-control-expose-headers"]
    status, headers, _ = raw(port, b"GET /t/cc/secure HTTP/1.1\r\nHost: t\r\nOrigin: https://app.example\r\n\r\n")
    assert status == 401 and headers["access-control-allow-origin"] == "https://app.example"
    status, headers, _ = raw(port, b"GET /t/cc/slow?ms=1 HTTP/1.1\r\nHost: t\r\nOrigin: https://evil.example\r\n\r\n")
    assert status == 200 and "access-control-allow-origin" not in headers
    # A per-path rule: any origin on whoami, but no credentials.
    status, headers, _ = raw(port, b"GET /t/cc/whoami HTTP/1.1\r\nHost: t\r\nOrigin: https://other.example\r\n\r\n")
    assert headers["access-control-allow-origin"] == "https://other.example"
    assert "access-control-allow-credentials" not in headers


def test_every_answer_under_the_policy_varies_by_origin(port):
    # Without Vary: Origin on the answers that carry no Access-Control-Allow-Origin (no
    # Origin sent, or one not allowed), a shared cache kept one of them for everybody and
    # served it to the allowed page too, which then could not read it.
    for origin in (b"", b"Origin: https://evil.example\r\n", b"Origin: https://app.example\r\n"):
        with connect(port) as s:
            s.sendall(b"GET /t/cc/slow?ms=1 HTTP/1.1\r\nHost: t\r\n" + origin + b"\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += s.recv(65536)
        lines = head.split(b"\r\n\r\n")[0].lower().split(b"\r\n")
        assert lines[0].startswith(b"http/1.1 200")
        assert lines.count(b"vary: origin") == 1, (origin, lines)


def test_json_answers_are_gzipped_when_accepted_and_large_enough(port):
    want = orjson.dumps({"items": ["x" * 1000 for _ in range(8)]})
    status, headers, body = raw(port, b"GET /t/cc/json?kb=8 HTTP/1.1\r\nHost: t\r\n"
                                      b"Accept-Encoding: br, gzip;q=0.5\r\n\r\n")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert gzip.decompress(body) == want and len(body) < len(want) // 4
    for accept in (b"", b"Accept-Encoding: gzip;q=0\r\n", b"Accept-Encoding: identity\r\n"):
        status, headers, body = raw(port, b"GET /t/cc/json?kb=8 HTTP/1.1\r\nHost: t\r\n" + accept + b"\r\n")
        assert "content-encoding" not in headers and body == want
    status, headers, body = raw(port, b"GET /t/cc/json?kb=1 HTTP/1.1\r\nHost: t\r\n"
                                      b"Accept-Encoding: gzip\r\n\r\n")
    assert "content-encoding" not in headers          # below minSize


def test_only_the_first_codings_of_accept_encoding_are_read(port):
    # Every item of a 16 KB Accept-Encoding was parsed, on every compressible answer: 2 ms
    # a request (an adversarial probe). Past MAX_CODINGS the list is not read, and an
    # answer that is not gzipped is always acceptable.
    from stellagw.ingress.compress import MAX_CODINGS, accepts_gzip
    assert accepts_gzip([(b"accept-encoding", b"a, " * (MAX_CODINGS - 1) + b"gzip")])
    assert not accepts_gzip([(b"accept-encoding", b"a, " * MAX_CODINGS + b"gzip")])
    assert not accepts_gzip([(b"accept-encoding", b"a")] * MAX_CODINGS
                            + [(b"accept-encoding", b"gzip")])
    assert accepts_gzip([(b"accept-encoding", b"*;q=0.5, " + b"a, " * 100 + b"gzip;q=0")])
    want = orjson.dumps({"items": ["x" * 1000 for _ in range(8)]})
    status, headers, body = raw(port, b"GET /t/cc/json?kb=8 HTTP/1.1\r\nHost: t\r\n"
                                      b"Accept-Encoding: " + b"a," * 7000 + b"gzip\r\n\r\n")
    assert status == 200 and "content-encoding" not in headers and body == want


def test_the_openapi_document_is_gzipped_and_revalidates(port):
    status, headers, body = raw(port, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n")
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert headers["etag"].startswith('W/"') and "paths" in orjson.loads(gzip.decompress(body))
    status, _, _ = raw(port, b"GET /openapi.json HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n"
                             b"If-None-Match: " + headers["etag"].encode() + b"\r\n\r\n")
    assert status == 304


def test_the_gzip_decision_reads_whole_fields_only():
    # Found as substrings, a service's `x-content-type` or a value holding
    # `content-encoding:` decided whether its answer was gzipped (round 9B).
    from types import SimpleNamespace

    from stellagw.ingress.compress import Compression
    gz = Compression(SimpleNamespace(min_size=0, level=5, types=["application/json", "text/"]))
    assert gz.applies(b"content-type: application/json\r\n")
    assert gz.applies(b"x-a: 1\r\nContent-Type: text/csv; charset=utf-8\r\n")
    assert not gz.applies(b"content-encoding: br\r\ncontent-type: application/json\r\n")
    assert not gz.applies(b"x-content-type: application/json\r\n")
    assert not gz.applies(b"content-type: image/png\r\nx-content-type: text/html\r\n")
    assert gz.applies(b"content-type: application/json\r\nx-note: content-encoding: br\r\n")


def test_answers_larger_than_max_size_are_not_gzipped_on_the_loop(monkeypatch):
    # A plain answer may be up to maxFrameSize (16 MB) from a service that does not stream
    # (here: the SDK told to stream nothing below 32 MB), and gzip runs on the gateway's
    # loop: 16 MB took 250 ms at level 5, every client of the worker waiting, for each
    # request that asked for it (an adversarial probe). Past MAX_SIZE it goes as it is.
    from stellagw.ingress.compress import MAX_SIZE
    from stellagw.service import Response, Service, sdk
    from tests.support.gwtest import GatewayThread, request, settings_from
    from tests.support.servicepeer import SdkThread
    monkeypatch.setattr(sdk, "STREAM_ABOVE", 32 * 1024 * 1024)
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, logging: {accessLog: false}, "
                                     "compression: {enabled: true}}")).start()
    svc = Service("gz", "1.0.0", gateways=[f"127.0.0.1:{gw.transport_port}"],
                  reconnect_min=0.05, reconnect_max=0.5)
    sizes = {"small": MAX_SIZE - 64, "large": MAX_SIZE + 64}

    @svc.get("/gz/{size}")
    async def answer(req):
        n = sizes[req.params["size"]]
        return Response(b'"' + b"x" * (n - 2) + b'"', content_type="application/json")

    sdk_thread = SdkThread(svc).start()
    try:
        for size, gzipped in (("small", True), ("large", False)):
            status, headers, body = request(gw.port, b"GET /gz/" + size.encode()
                                            + b" HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n",
                                            timeout=30)
            assert status == 200 and ("content-encoding" in headers) is gzipped, size
            plain = gzip.decompress(body) if gzipped else body
            assert len(plain) == sizes[size] and plain.strip(b'"x') == b""
    finally:
        sdk_thread.stop()
        gw.stop()
