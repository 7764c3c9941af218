"""The endpoints the gateway answers itself: /health/live|ready|startup, /metrics and the
aggregated OpenAPI document (/openapi.json, /openapi.yaml, /.well-known/openapi)."""
from __future__ import annotations

import orjson

from ..ingress.responses import error_body

_JSON = b"content-type: application/json\r\ncache-control: no-store\r\n"
_METRICS = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
_LIVE_BODY = orjson.dumps({"status": "Healthy"})
_NOT_GET = b"allow: GET, HEAD\r\ncontent-type: application/json\r\n"


def table(worker) -> dict:
    """{raw path: handler(req) -> (status, header lines, body)}."""

    def only_get(path: bytes, handler):
        route = path.decode()

        def guarded(req):
            req.route = route
            if req.method not in ("GET", "HEAD"):
                return 405, _NOT_GET, error_body(405, "use GET or HEAD", req.correlation_id)
            return handler(req)
        return guarded

    def live(req):
        # Liveness is only "the loop answers": never depend on anything downstream.
        return 200, _JSON, _LIVE_BODY

    def ready(req):
        reasons = worker.not_ready_reasons()
        body = {"status": "Ready" if not reasons else "NotReady", "reasons": reasons,
                "node": worker.node_id, "worker": worker.worker_id}
        body.update(worker.health_details())
        return (200 if not reasons else 503), _JSON, orjson.dumps(body)

    def startup(req):
        reasons = worker.startup_reasons()
        body = {"status": "Started" if not reasons else "Starting", "reasons": reasons}
        return (200 if not reasons else 503), _JSON, orjson.dumps(body)

    def metrics(req):
        return 200, _METRICS, worker.render_metrics()

    def openapi(req):
        # Every If-None-Match field counts (a client may send several).
        inm = b", ".join(v for n, v in req.headers if n == b"if-none-match") or None
        return worker.openapi.respond(req.target, inm)

    gw = worker.settings.gateway
    handlers = {b"/health/live": live, b"/health/ready": ready, b"/health/startup": startup}
    if gw.metrics.enabled:
        handlers[b"/metrics"] = metrics
    if gw.openapi.enabled:
        from ..openapi import PATHS
        handlers.update((path, openapi) for path in PATHS)
    return {path: only_get(path, h) for path, h in handlers.items()}
