"""`stellagw demo`: the development Authority, the gateway and two example services, each
its own process, with real DPoP-bound tokens end to end.

    scanner  GET  /api/v1/scans/{id}          one scan as JSON            (scope scans:read)
             POST /api/v1/scans               start a scan                (scope scans:write)
             GET  /api/v1/scans/{id}/report   a streamed report, chunked  (scope scans:read)
    policy   GET  /api/v1/policies            the policy list             (anonymous allowed)
             WS   /api/v1/policies/watch      verdicts for images sent as messages

`stellagw demo-service --name NAME --gateway HOST:PORT` runs one of them alone (also
`bench`, a hello endpoint for the benchmarks).
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from .config import load_config_text

TRY = """
stellagw demo
  gateway            http://{host}:{port}   (services dial in on {host}:{tport})
  admin listener     http://{host}:{adport}   (probes, /metrics, OpenAPI: never on the client port)
  dev Authority      http://{host}:{aport}  (client demo-client / demo-secret; development only)

Try, in another terminal — `stellagw call` fetches a DPoP-bound token from the Authority and
signs a fresh DPoP proof for every request:
  python3 -m stellagw call{authority} -v http://{host}:{port}/api/v1/scans/42
  python3 -m stellagw call{authority} -X POST -d '{{"image":"alpine:3.20"}}' http://{host}:{port}/api/v1/scans
  python3 -m stellagw call{authority} http://{host}:{port}/api/v1/scans/42/report      # streamed, chunked
  curl -i http://{host}:{port}/api/v1/scans/42                # 401: no token (WWW-Authenticate: DPoP)
  curl -i http://{host}:{port}/api/v1/policies                # anonymous is allowed here
  python3 -m stellagw ws ws://{host}:{port}/api/v1/policies/watch alpine:3.20 nginx:latest
                                                              # a WebSocket through the gateway
  curl -i -H 'X-Correlation-Id: my-trace-1' http://{host}:{port}/api/v1/policies
  for i in $(seq 25); do curl -s -o /dev/null -w '%{{http_code}} ' http://{host}:{port}/api/v1/policies; done; echo
                                                              # 429 past 20 requests/s per client
  curl -s http://{host}:{port}/health/ready                   # readiness alone (the client port)
  curl -s http://{host}:{adport}/health/ready                   # registered services and health
  curl -s http://{host}:{adport}/openapi.json                   # the aggregated OpenAPI document
  curl -s http://{host}:{adport}/metrics | grep gateway_requests_total

Stop with Ctrl-C (a graceful drain).
"""


def build_service(name: str, gateways, region: str = "local", version: str = "1.0.0"):
    from .service import Response, Service, StreamResponse

    svc = Service(name, version, gateways=gateways, region=region)
    if name == "scanner":
        @svc.get("/api/v1/scans/{id}", timeout=5.0, claims=[("scope", "scans:read")],
                 openapi={"summary": "Get one scan"})
        async def get_scan(req):
            return Response.json({"id": req.params["id"], "status": "completed", "findings": 3,
                                  "tenant": req.headers.get("x-stellaops-tenant"),
                                  "actor": req.headers.get("x-stellaops-actor"),
                                  "correlationId": req.correlation_id})

        @svc.post("/api/v1/scans", claims=[("scope", "scans:write")],
                  openapi={"summary": "Start a scan"})
        async def start_scan(req):
            body = req.json() if req.body else {}
            return Response.json({"id": "scan-7", "accepted": body}, status=202)

        @svc.get("/api/v1/scans/{id}/report", streaming=True, claims=[("scope", "scans:read")],
                 openapi={"summary": "Stream a scan report"})
        async def report(req):
            async def lines():
                for i in range(5):
                    yield f"finding {i + 1} of 5 for scan {req.params['id']}\n".encode()
                    await asyncio.sleep(0.2)
            return StreamResponse(lines(), content_type="text/plain; charset=utf-8")
    elif name == "policy":
        @svc.get("/api/v1/policies", openapi={"summary": "List policies"})
        async def policies(req):
            return Response.json([{"id": "p-1", "name": "no-critical-cves"},
                                  {"id": "p-2", "name": "signed-images-only"}])

        @svc.websocket("/api/v1/policies/watch", openapi={"summary": "Watch policy decisions"})
        async def watch(ws):
            # A WebSocket through the gateway: every message is evaluated and answered.
            await ws.send('{"event":"watching","policies":["no-critical-cves","signed-images-only"]}')
            async for message in ws:
                image = message if isinstance(message, str) else message.decode("utf-8", "replace")
                verdict = "deny" if "latest" in image else "allow"
                await ws.send(f'{{"image":"{image[:200]}","verdict":"{verdict}"}}')
    elif name == "bench":
        body = b"hello from bench\n"

        @svc.get("/bench/hello")
        async def hello(req):
            return Response(body, content_type="text/plain")
    else:
        raise SystemExit(f"unknown demo service {name!r} (scanner, policy, bench)")
    return svc


def run_service(name: str, gateways, region: str, version: str) -> int:
    svc = build_service(name, gateways, region, version)
    svc.run()
    return 0


DEMO_CONFIG = """
gateway:
  node: {{workers: 1, region: local}}
  http: {{host: 127.0.0.1, port: {port}, publicOrigin: "http://127.0.0.1:{port}"}}
  admin: {{host: 127.0.0.1, port: {adport}}}
  transports: {{tcp: {{host: 127.0.0.1, port: {tport}}}}}
  auth:
    authority: "http://127.0.0.1:{aport}"
    audiences: [stellaops-gateway]
rate_limiting:
  for_instance:
    rules: [{{max_requests: 20, per_seconds: 1}}, {{max_requests: 600, per_seconds: 60}}]
"""


def settings(port: int = 8080, transport_port: int = 9100, authority_port: int = 8400,
             admin_port: int = 9090):
    return load_config_text(DEMO_CONFIG.format(port=port, tport=transport_port,
                                               aport=authority_port, adport=admin_port),
                            source="<demo>")


def _wait_http(url: str, proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"stellagw demo: {url} did not start (exit {proc.returncode})")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"stellagw demo: {url} did not answer within {timeout:.0f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner(port: int, transport_port: int, authority_port: int, admin_port: int) -> str:
    """What to try, with the ports in use. `stellagw call` defaults to the Authority on 8400,
    so any other port must be passed to it, or every printed call fails to get a token."""
    from .devauth.cli import DEFAULT_AUTHORITY
    authority = f"http://127.0.0.1:{authority_port}"
    return TRY.format(host="127.0.0.1", port=port, tport=transport_port, aport=authority_port,
                      adport=admin_port,
                      authority="" if authority == DEFAULT_AUTHORITY else f" --authority {authority}")


def main(port: int = 8080, transport_port: int = 9100, authority_port: int = 8400,
         admin_port: int = 9090) -> int:
    from .supervisor import serve
    # 0 = a free port, chosen here rather than at bind time: the banner, the services and the
    # gateway's auth.authority all need the number before anything listens. (Another process
    # may take it in between; the bind then fails with "address in use".)
    port, transport_port, authority_port, admin_port = (
        p or _free_port() for p in (port, transport_port, authority_port, admin_port))
    s = settings(port, transport_port, authority_port, admin_port)
    py = [sys.executable, "-m", "stellagw"]
    children = [subprocess.Popen(py + ["dev-authority", "--port", str(authority_port)],
                                 stdout=subprocess.DEVNULL)]
    try:
        # The gateway is ready once it holds the Authority's keys: start that first.
        _wait_http(f"http://127.0.0.1:{authority_port}/.well-known/openid-configuration",
                   children[0])
        gateway = f"127.0.0.1:{transport_port}"
        children += [subprocess.Popen(py + ["demo-service", "--name", name, "--gateway", gateway])
                     for name in ("scanner", "policy")]
        print(banner(port, transport_port, authority_port, admin_port), file=sys.stderr,
              flush=True)
        return serve(s)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
