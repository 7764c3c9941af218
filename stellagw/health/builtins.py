"""The endpoints the gateway answers itself: /health/live|ready|startup and /metrics."""
from __future__ import annotations

import orjson

from ..ingress.responses import error_body

_JSON = b"content-type: application/json\r\ncache-control: no-store\r\n"
_METRICS = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
_LIVE_BODY = orjson.dumps({"status": "Healthy"})


def table(worker) -> dict:
    def only_get(handler):
        def guarded(req):
            req.route = path
            if req.method not in ("GET", "HEAD"):
                return (405, b"allow: GET, HEAD\r\ncontent-type: application/json\r\n",
                        error_body(405, "use GET or HEAD", req.correlation_id))
            return handler(req)
        path = handler.__name__
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

    live.__name__, ready.__name__ = "/health/live", "/health/ready"
    startup.__name__, metrics.__name__ = "/health/startup", "/metrics"
    handlers = [live, ready, startup]
    if worker.settings.gateway.metrics.enabled:
        handlers.append(metrics)
    return {h.__name__.encode(): only_get(h) for h in handlers}
