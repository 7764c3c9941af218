"""The request's journey: the ordered stages, written here and nowhere else.

Each stage either passes the request on, answers it (returns the response), or leaves it
pending (returns None; the answer comes later through `req.conn.respond`). The numbers
follow DESIGN.md §2; stages 1–3 (accept, parse, correlate) happen in stellagw.ingress.http.

    4  built-ins   /health/*, /metrics
    5  match       normalise the path once, radix router → route + parameters; 404 / 405
    6–9            authenticate, identity, authorize, rate-limit   (later issues)
    10 select      routable instance by version, region, ping, heartbeat; 503 when none
    11 dispatch    REQUEST frame to the instance; timeout → CANCEL + 504
    12 respond     by the service connection when the RESPONSE arrives
"""
from __future__ import annotations

from .health import builtins
from .ingress.responses import error_body
from .radix import FOUND, NOT_FOUND, normalize_path

_JSON = b"content-type: application/json\r\n"
VERSION_HEADER = b"x-service-version"   # docs/selection.md: strict semver match when sent


def _error(req, status, message, extra_headers=b""):
    return status, _JSON + extra_headers, error_body(status, message, req.correlation_id)


class Pipeline:
    def __init__(self, worker):
        gw = worker.settings.gateway
        self._builtins = builtins.table(worker)
        self._routing = worker.routing
        self._default_timeout = gw.routing.default_timeout
        # Bodies above this go as REQUEST_STREAM_DATA frames rather than inside REQUEST.
        self._stream_threshold = max(gw.routing.streaming_buffer_size, 64 * 1024)
        self._worker = worker

    def handle(self, req):
        # 4. built-ins
        builtin = self._builtins.get(req.target)
        if builtin is not None:
            return builtin(req)

        # 5. match
        path = normalize_path(req.target)
        if path is None:
            req.route = "invalid"
            return _error(req, 400, "the request path is not valid")
        code, route, params = self._routing.router.match(req.method, path)
        if code != FOUND:
            req.route = "unmatched"
            if code == NOT_FOUND:
                return _error(req, 404, f"no route for {req.method} {path}")
            allow = ", ".join(route).encode()
            return _error(req, 405, f"{req.method} is not allowed here",
                          b"allow: " + allow + b"\r\n")
        req.service = route.service
        req.route = route.template

        # 6–9: authenticate, identity, authorize, rate-limit — added by their issues.

        # 10. select
        version = req.header(VERSION_HEADER)
        selected = self._routing.select(route, version.decode("latin-1") if version else None)
        if selected is None:
            return _error(req, 503, f"no healthy instance of {route.service}"
                          + (f" {version.decode('latin-1')}" if version else ""))
        instance, endpoint = selected

        # 11. dispatch (12. respond happens when the service answers)
        instance.conn.send_request(req, endpoint, endpoint.timeout or self._default_timeout,
                                   path, self._stream_threshold)
        return None
