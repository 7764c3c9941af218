"""What the gateway answers itself, whichever stage answers: prebuilt status lines and the
one JSON error envelope (docs/design.md §2). Imported by ingress, the pipeline, transport,
health and openapi alike, so it belongs to none of them."""
from __future__ import annotations

from http import HTTPStatus

import orjson

STATUS_LINES: dict[int, bytes] = {}
for _s in HTTPStatus:
    STATUS_LINES[_s.value] = b"HTTP/1.1 %d %s\r\n" % (_s.value, _s.phrase.encode())


def status_line(status: int) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        if not 100 <= status <= 999:
            raise ValueError(f"bad HTTP status {status}")
        line = STATUS_LINES[status] = b"HTTP/1.1 %d Unknown\r\n" % status
    return line


# The error codes of the envelope, by status, when the caller does not name one.
ERROR_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large",
    414: "uri_too_long", 421: "misdirected_request", 426: "upgrade_required", 429: "rate_limit_exceeded", 431: "request_header_fields_too_large",
    500: "internal_error", 501: "not_implemented", 502: "bad_gateway",
    503: "service_unavailable", 504: "gateway_timeout", 505: "http_version_not_supported",
}

JSON = b"application/json"


def error_body(status: int, message: str, trace_id: str, code: str | None = None) -> bytes:
    """The one envelope for every locally answered error: {"error": {code, message, trace_id}}."""
    return orjson.dumps({"error": {
        "code": code or ERROR_CODES.get(status, "error"),
        "message": message,
        "trace_id": trace_id,
    }})

