"""OpenTelemetry spans: structure, W3C traceparent in and out, nothing when off."""
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from .gwtest import ROOT, GatewayThread, request, settings_from, wait_for  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, tracing: {enabled: true, exporter: none}}"),
                       span_exporter=exporter).start()
    svc = subprocess.Popen([sys.executable, "-m", "tests.services", "--name", "tr", "--gateway",
                            f"127.0.0.1:{gw.transport_port}"], cwd=ROOT)
    try:
        assert wait_for(lambda: request(gw.port, b"GET /t/tr/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200, 15)
        exporter.clear()
        yield gw, exporter
    finally:
        svc.terminate()
        svc.wait(10)
        gw.stop()


def test_route_span_with_auth_and_transport_children_continuing_the_client_trace(traced):
    gw, exporter = traced
    status, _, body = request(gw.port, b"GET /t/tr/whoami HTTP/1.1\r\nHost: gw\r\ntraceparent: "
                              + TRACEPARENT.encode() + b"\r\n\r\n")
    assert status == 200
    assert wait_for(lambda: len(exporter.get_finished_spans()) >= 3)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    route, auth, send = spans["gateway.route"], spans["gateway.auth.validate"], spans["gateway.transport.send"]
    assert f"{route.context.trace_id:032x}" == CLIENT_TRACE          # the client's trace goes on
    assert f"{route.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert auth.parent.span_id == route.context.span_id
    assert send.parent.span_id == route.context.span_id
    assert route.attributes["http.route"] == "/t/tr/whoami"
    assert route.attributes["http.response.status_code"] == 200
    # The service got the transport span's traceparent, not the client's.
    seen = orjson.loads(body)["headers"]["traceparent"]
    assert seen.split("-")[1] == CLIENT_TRACE
    assert seen.split("-")[2] == f"{send.context.span_id:016x}"


def test_no_spans_when_tracing_is_off():
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    try:
        assert gw.worker.tracing is None
        assert request(gw.port, b"GET /nothing HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 404
    finally:
        gw.stop()
