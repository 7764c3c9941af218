"""The SDK reports failures as JSON lines with their traceback (issue 19 item 6)."""
from __future__ import annotations

import orjson

from tests.support.gwtest import Served, port_of, request
from tests.support.services import ServiceProcess

CONFIG = """
gateway:
  http: {port: 0}
  transports: {tcp: {port: 0}}
"""


def test_a_failing_handler_is_logged_as_json_with_its_traceback(tmp_path):
    gw = Served(config_text=CONFIG, tmp_path=tmp_path)
    rec = gw.wait_listening()[0]
    http, tcp = port_of(rec["http"]), port_of(rec["tcp"])
    svc = ServiceProcess("lg", tcp).start()
    try:
        svc.wait_routable(http)
        status, headers, body = request(http, b"GET /t/lg/boom HTTP/1.1\r\nHost: t\r\n"
                                              b"X-Correlation-Id: boom-1\r\n\r\n")
        assert status == 500 and orjson.loads(body)["error"]["trace_id"] == "boom-1"
    finally:
        svc.stop()
        gw.stop()
    # Its stdout and stderr, where the SDK writes its JSON lines.
    records = [orjson.loads(line) for line in svc.output().splitlines() if line.startswith(b"{")]
    [failed] = [r for r in records if r["message"] == "handler failed"]
    assert failed["level"] == "error" and failed["service"] == "lg"
    assert failed["correlationId"] == "boom-1" and "ValueError: boom on purpose" in failed["traceback"]
    assert failed["timestamp"].endswith("Z")
