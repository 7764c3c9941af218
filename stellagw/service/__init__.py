"""stellagw.service — the microservice SDK.

    from stellagw.service import Service, Response

    svc = Service("scanner", "1.2.0", gateways=["127.0.0.1:9100"])

    @svc.get("/api/v1/scans/{id}", timeout=5.0)
    async def get_scan(req):
        return Response.json({"id": req.params["id"]})

    svc.run()          # or: await svc.start(); ...; await svc.stop()

A service dials in to every gateway it is given (a DNS name counts once per address it
resolves to), and to every worker of each: the HELLO_ACK lists them (docs/protocol.md).
It re-registers after a lost connection with backoff and jitter, sends heartbeats, and
runs each request's handler as a task that a CANCEL cancels.
"""
from .sdk import Request, Response, Service, StreamResponse, WebSocket

__all__ = ["Service", "Request", "Response", "StreamResponse", "WebSocket"]
