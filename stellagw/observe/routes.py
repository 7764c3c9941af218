"""`gateway_route_info{service, method, path, kind}`: what kind of route each one is.

A route declared `streaming` in its HELLO (docs/protocol.md) lasts as long as its body — a
report download, a progress feed — so its `gateway_request_duration_seconds` is how long
the body took, not how fast the gateway and the service answered. The latency SLO and the
dashboard's latency panels leave those routes out by joining on this gauge
(grafana/alerts.yml, grafana/README.md); `kind` is `streaming`, `websocket` (its duration
is the upgrade's: latency, so it stays in) or `unary`. One sample of 1 per route a worker
routes, summed over the instance's workers like every metrics source.
"""
from __future__ import annotations

HELP = ("Routes this gateway routes (value: workers that route it), by kind: unary, "
        "streaming (declared in the HELLO; left out of latency SLOs), websocket")
LABELS = ("service", "method", "path", "kind")


def _kind(endpoint) -> str:
    if endpoint.websocket:
        return "websocket"
    return "streaming" if endpoint.streaming else "unary"


def route_info(routing):
    """A `Metrics.sources` callable over `routing` (a RoutingState), read on its loop."""
    last = [None, []]

    def source() -> dict:
        routes = routing.routes
        if routes is not last[0]:         # a new dict after every registration change only
            last[0] = routes
            last[1] = [((route.service, method, template, _kind(route.candidates[0][1])), 1)
                       for (method, template), route in routes.items()]
        return {"gateway_route_info_gauge": (HELP, LABELS, last[1])}

    return source
