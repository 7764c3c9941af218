"""The admin listener (`gateway.admin`): probes, /metrics, readiness details and OpenAPI,
apart from the client listener.

It runs the same HttpProtocol as clients do, given a different `server`: this facade lends
it the worker's clock, log, parser and accounting, but its own connection set, its own
connection cap and a pipeline that answers only the built-ins. So a client listener at
`gateway.http.maxConnections` never refuses a probe, and nothing here is ever routed.
"""
from __future__ import annotations

import dataclasses

from ..ingress.limits import HttpLimits
from ..replies import error_body
from . import builtins

_JSON = b"content-type: application/json\r\n"
# Admin requests are GETs: a body is only something to refuse early.
_MAX_BODY = 64 * 1024


class _Pipeline:
    def __init__(self, table: dict):
        self._table = table

    def handle(self, req):
        handler = self._table.get(req.target)
        if handler is not None:
            return handler(req)
        req.route = "unmatched"
        return 404, _JSON, error_body(404, f"no admin endpoint {req.target.decode('latin-1')}",
                                      req.correlation_id)


class _Gauge:
    """HttpProtocol counts its connections through `server.metrics`; admin ones must not
    show as client connections (`gateway_active_connections{service="ingress"}`)."""

    def __init__(self):
        self.connections_open = 0

    def connection_opened(self, service: str = "") -> None:
        self.connections_open += 1

    def connection_closed(self, service: str = "") -> None:
        self.connections_open -= 1


class AdminServer:
    def __init__(self, worker):
        gw = worker.settings.gateway
        self._worker = worker
        self.accounting = worker.accounting
        self.log = worker.log
        self.new_parser = worker.new_parser
        # The client listener's HttpLimits, built from settings in which only the caps differ: the
        # timeouts and header limits stay the client listener's.
        self.http_settings = HttpLimits(dataclasses.replace(
            gw, http=dataclasses.replace(gw.http, max_connections=gw.admin.max_connections,
                                         max_connections_per_client=0,  # probes: one address
                                         proxy_protocol="off"),   # probes speak plain HTTP
            routing=dataclasses.replace(gw.routing, max_request_body_size=_MAX_BODY)))
        self.pipeline = _Pipeline(builtins.table(worker, admin=True))
        self.connections: set = set()
        self.websockets_open = 0    # the admin listener routes none (HttpProtocol reads it)
        self.edge = worker.edge     # the worker's clock, Date line and draining
        self.metrics = _Gauge()

    def connection_refused(self, reason):
        self._worker.connection_refused("admin_" + reason)

    def connection_aborted(self, reason):
        self._worker.connection_aborted("admin_" + reason)

    def __getattr__(self, name):
        # Whatever else the protocol may come to read from its server is the worker's.
        return getattr(self._worker, name)
