"""The endpoints the gateway answers itself: /health/live|ready|startup, /metrics and the
aggregated OpenAPI document (/openapi.json, /openapi.yaml, /.well-known/openapi).

Two tables: the admin listener's has them all, with readiness details; the client
listener's has only what `gateway.admin.publicEndpoints` lists, and its readiness and
startup answers carry the status alone unless `details` is listed (instance ids, versions
and pings are nobody's business on the port a LoadBalancer exposes)."""
from __future__ import annotations

import orjson

from ..config import PUBLIC_ENDPOINTS
from ..ingress.compress import accepts_gzip, gzipped
from ..replies import error_body

_JSON = b"content-type: application/json\r\ncache-control: no-store\r\n"
_METRICS = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\n"
_LIVE_BODY = orjson.dumps({"status": "Healthy"})
_NOT_GET = b"allow: GET, HEAD\r\ncontent-type: application/json\r\n"


_STATUS = {(200, "ready"): orjson.dumps({"status": "Ready"}),
           (503, "ready"): orjson.dumps({"status": "NotReady"}),
           (200, "startup"): orjson.dumps({"status": "Started"}),
           (503, "startup"): orjson.dumps({"status": "Starting"})}


def table(worker, admin: bool = False) -> dict:
    """{raw path: handler(req) -> (status, header lines, body)} for the admin listener, or
    for the client one (`admin=False`)."""

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

    gzipped_docs: dict = {}

    def openapi(req):
        # Services that just registered are in the first read after it: wait (off the
        # loop) for the build their registration started; openapi(req) runs again then.
        if worker.openapi.defer(req, openapi):
            return None
        # Every If-None-Match field counts (a client may send several).
        inm = b", ".join(v for n, v in req.headers if n == b"if-none-match") or None
        status, headers, body = worker.openapi.respond(req.target, inm)
        if status != 200 or not accepts_gzip(req.headers):
            return status, headers, body
        # The documents are large and change rarely: gzipped once per version, whatever
        # gateway.compression says (stellagw/ingress/compress.py).
        key = (req.target, headers)
        hit = gzipped_docs.get(key)
        if hit is None:
            if len(gzipped_docs) >= 16:
                gzipped_docs.clear()
            hit = gzipped_docs[key] = gzipped(headers, body, 6)
        return 200, hit[0], hit[1]

    def ready_status(req):
        status = 200 if not worker.not_ready_reasons() else 503
        return status, _JSON, _STATUS[status, "ready"]

    def startup_status(req):
        status = 200 if not worker.startup_reasons() else 503
        return status, _JSON, _STATUS[status, "startup"]

    gw = worker.settings.gateway
    listed = gw.admin.public_endpoints
    public = set(PUBLIC_ENDPOINTS if admin or "all" in listed else listed)
    details = admin or "details" in public
    handlers = {}
    for name, path, handler in (("live", b"/health/live", live),
                                ("ready", b"/health/ready", ready if details else ready_status),
                                ("startup", b"/health/startup",
                                 startup if details else startup_status)):
        if name in public:
            handlers[path] = handler
    if gw.metrics.enabled and "metrics" in public:
        handlers[b"/metrics"] = metrics
    if gw.openapi.enabled and "openapi" in public:
        from ..openapi import PATHS
        handlers.update((path, openapi) for path in PATHS)
    return {path: only_get(path, h) for path, h in handlers.items()}
