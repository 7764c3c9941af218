"""OpenTelemetry spans: structure, W3C traceparent in and out, nothing when off."""
from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from tests.support.gwtest import ROOT, GatewayThread, request, settings_from, wait_for  # noqa: E402
from tests.support.services import ServiceProcess, start_service  # noqa: E402

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, tracing: {enabled: true, exporter: none}}"),
                       span_exporter=exporter).start()
    try:
        with start_service("tr", gw.transport_port, wait=gw.port, timeout=15):
            exporter.clear()
            yield gw, exporter
    finally:
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


def test_a_client_tracestate_that_does_not_parse_writes_nothing_to_the_output(traced, caplog):
    # OpenTelemetry warned once a request, quoting the member that failed, through Python's
    # last-resort handler: a client wrote a NEL and a JSON record of its own into the
    # gateway's stderr, beside the JSON log (an adversarial probe). The header is dropped
    # as before; the warning is not written.
    gw, exporter = traced
    forged = b'\x85{"level":"error","message":"forged by a client"}'
    for state in (b"ok=1,bad member" + forged, b"a=b," * 2100):
        status, _, body = request(gw.port, b"GET /t/tr/whoami HTTP/1.1\r\nHost: gw\r\ntraceparent: "
                                  + TRACEPARENT.encode() + b"\r\ntracestate: " + state + b"\r\n\r\n")
        assert status == 200
        headers = orjson.loads(body)["headers"]
        assert headers["traceparent"].split("-")[1] == CLIENT_TRACE     # the trace goes on
        assert "forged" not in headers.get("tracestate", "") and "a=b" not in headers.get("tracestate", "")
    assert not [r for r in caplog.records if r.name.startswith("opentelemetry")]


def test_no_spans_when_tracing_is_off():
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    try:
        assert gw.worker.tracing is None
        assert request(gw.port, b"GET /nothing HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 404
    finally:
        gw.stop()


# --------------------------------------------------------------------------- the default exporter

class _Collector:
    """An OTLP/HTTP trace receiver on loopback: keeps each export request it is sent."""

    def __init__(self):
        import http.server
        import threading
        self.requests: list[tuple[str, str, bytes]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                outer.requests.append((self.path, self.headers.get("content-type", ""), body))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[tuple[str, str, str]]:
        """(service.name, span name, trace id hex) of everything received."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest)
        out = []
        for path, _, body in list(self.requests):
            req = ExportTraceServiceRequest.FromString(body)
            for rs in req.resource_spans:
                attrs = {a.key: a.value.string_value for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out += [(attrs.get("service.name"), s.name, s.trace_id.hex())
                            for s in ss.spans]
        return out

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_tracing_enabled_with_the_otel_extra_starts_and_ships_spans_over_otlp(tmp_path, monkeypatch):
    # What docs/configuration.md shows: `enabled: true` and nothing else but where the
    # collector is. The default exporter (otlp) is in the extra, so this serves.
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from tests.support.gwtest import Served, port_of
    collector = _Collector()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")   # ms; the default 5 s is test time
    served = Served(tmp_path=tmp_path, config_text=(
        "gateway:\n"
        "  http: {host: 127.0.0.1, port: 0}\n"
        "  transports: {tcp: {host: 127.0.0.1, port: 0}}\n"
        "  logging: {accessLog: false}\n"
        "  tracing:\n"
        "    enabled: true\n"
        "    serviceName: stellagw-under-test\n"
        f"    otlpEndpoint: http://127.0.0.1:{collector.port}/v1/traces\n"))
    svc = None
    try:
        listening = served.wait_listening()[0]
        port, transport = port_of(listening["http"]), port_of(listening["tcp"])
        svc = ServiceProcess("otlp", transport).start()
        hello = b"GET /t/otlp/whoami HTTP/1.1\r\nHost: gw\r\ntraceparent: " + TRACEPARENT.encode() + b"\r\n\r\n"
        svc.wait_routable(port, raw=hello, timeout=15)
        assert wait_for(lambda: {"gateway.route", "gateway.auth.validate", "gateway.transport.send"}
                        <= {name for _, name, _ in collector.spans()}, 10), collector.spans()
        path, ctype, _ = collector.requests[0]
        assert path == "/v1/traces" and ctype == "application/x-protobuf"
        routed = [(svc_name, trace) for svc_name, name, trace in collector.spans()
                  if name == "gateway.route"]
        assert ("stellagw-under-test", CLIENT_TRACE) in routed
        assert served.proc.poll() is None
    finally:
        if svc is not None:
            svc.stop()
        assert served.stop() == 0
        collector.close()


def test_a_collector_that_never_answers_does_not_hold_the_exit(tmp_path, monkeypatch):
    """docs/security.md §3d row 49: the SDK's shutdown waited up to 30 s for its exporter
    thread, on the worker's loop at the end of the drain: with the collector blackholed,
    every SIGTERM took 32 s, past Kubernetes' default grace period."""
    import signal
    import socket
    import threading
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    from tests.support.gwtest import Served, port_of
    blackhole = socket.create_server(("127.0.0.1", 0))   # accepts, reads, never answers
    held = []

    def accept():
        while True:
            try:
                held.append(blackhole.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    served = Served(tmp_path=tmp_path, config_text=(
        "gateway:\n"
        "  node: {preStopDelay: 0s}\n"
        "  http: {host: 127.0.0.1, port: 0}\n"
        "  transports: {tcp: {host: 127.0.0.1, port: 0}}\n"
        "  tracing:\n"
        "    enabled: true\n"
        f"    otlpEndpoint: http://127.0.0.1:{blackhole.getsockname()[1]}/v1/traces\n"))
    svc = None
    try:
        listening = served.wait_listening()[0]
        port = port_of(listening["http"])
        svc = ServiceProcess("bh", port_of(listening["tcp"])).start().wait_routable(port, timeout=15)
        for _ in range(20):
            status, _, body = request(port, b"GET /t/bh/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert status == 200 and orjson.loads(body)["instance"].startswith("bh")
        assert wait_for(lambda: held, 5)             # an export is under way, unanswered
        assert served.stop(signal.SIGTERM) == 0      # within stop()'s 20 s: it took 32 s
        served.wait_for_log(lambda r: r.get("message") == "stopped", timeout=1)
    finally:
        if svc is not None:
            svc.stop()
        served.stop()
        blackhole.close()
        for conn in held:
            conn.close()


# --------------------------------------------------------------------------- a missing exporter

# Imported by every Python started with this folder on PYTHONPATH: the OTLP exporter is
# not there, as in an environment installed without the `otel` extra.
_HIDE_OTLP = '''
import sys

class _NoOtlp:
    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry.exporter.otlp" or name.startswith("opentelemetry.exporter.otlp."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOtlp())
'''


def _without_otlp(tmp_path, *args, config: str):
    import os
    hide = tmp_path / "hide"
    hide.mkdir(exist_ok=True)
    (hide / "sitecustomize.py").write_text(_HIDE_OTLP)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(config)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hide), ROOT]))
    return subprocess.run([sys.executable, "-m", "stellagw", *args, str(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_a_missing_exporter_is_a_configuration_error_for_serve_and_check_config(tmp_path):
    config = ("gateway:\n  http: {host: 127.0.0.1, port: 0}\n"
              "  transports: {tcp: {host: 127.0.0.1, port: 0}}\n  tracing: {enabled: true}\n")
    for args in (("check-config",), ("serve", "--config")):
        r = _without_otlp(tmp_path, *args, config=config)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert lines[0].startswith("stellagw: configuration error: gateway.tracing.exporter: "
                                   "otlp needs opentelemetry-exporter-otlp-proto-http"), lines
        assert "pip install 'stellagw[otel]'" in lines[0]
        assert "listening" not in r.stdout


def test_exporters_that_need_no_otlp_package_still_pass_without_it(tmp_path):
    for exporter in ("console", "none"):
        r = _without_otlp(tmp_path, "check-config", config=(
            f"gateway:\n  tracing: {{enabled: true, exporter: {exporter}}}\n"))
        assert r.returncode == 0, r.stderr
        assert f"exporter: {exporter}" in r.stdout


def test_tracing_off_never_imports_opentelemetry(tmp_path, monkeypatch):
    # The check runs only when tracing is on: a gateway without the extra loads as before.
    r = _without_otlp(tmp_path, "check-config", config="gateway:\n  tracing: {enabled: false}\n")
    assert r.returncode == 0, r.stderr
    from stellagw.config import load_config_text
    from stellagw.observe import tracing
    calls = []
    real = tracing.unavailable
    monkeypatch.setattr(tracing, "unavailable", lambda exporter: calls.append(exporter) or real(exporter))
    load_config_text("gateway: {tracing: {enabled: false}}")
    assert calls == []
    load_config_text("gateway: {tracing: {enabled: true, exporter: none}}")
    assert calls == ["none"]
