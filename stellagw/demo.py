"""`stellagw demo`: the gateway plus two example services, each its own process.

    scanner  GET  /api/v1/scans/{id}          one scan as JSON
             POST /api/v1/scans               start a scan (echoes the JSON body back)
             GET  /api/v1/scans/{id}/report   a streamed report (chunked to the client)
    policy   GET  /api/v1/policies            the policy list

`stellagw demo-service --name NAME --gateway HOST:PORT` runs one of them alone (also
`bench`, a hello endpoint for the benchmarks).
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys

from .config import default_settings

TRY = """
stellagw demo — gateway on http://{host}:{port}, services dial in on {host}:{tport}

Try, in another terminal:
  curl -i http://{host}:{port}/api/v1/scans/42
  curl -i -X POST -H 'content-type: application/json' -d '{{"image":"alpine:3.20"}}' http://{host}:{port}/api/v1/scans
  curl -N http://{host}:{port}/api/v1/scans/42/report          # streamed, chunked
  curl -i http://{host}:{port}/api/v1/policies
  curl -i -H 'X-Correlation-Id: my-trace-1' http://{host}:{port}/api/v1/policies
  curl -i http://{host}:{port}/api/v1/nothing                  # 404, JSON error envelope
  curl -s http://{host}:{port}/health/ready                    # registered services and health
  curl -s http://{host}:{port}/metrics | grep gateway_requests_total

Stop with Ctrl-C (a graceful drain).
"""


def build_service(name: str, gateways, region: str = "local", version: str = "1.0.0"):
    from .service import Response, Service, StreamResponse

    svc = Service(name, version, gateways=gateways, region=region)
    if name == "scanner":
        @svc.get("/api/v1/scans/{id}", timeout=5.0, openapi={"summary": "Get one scan"})
        async def get_scan(req):
            return Response.json({"id": req.params["id"], "status": "completed",
                                  "findings": 3, "correlationId": req.correlation_id})

        @svc.post("/api/v1/scans", openapi={"summary": "Start a scan"})
        async def start_scan(req):
            body = req.json() if req.body else {}
            return Response.json({"id": "scan-7", "accepted": body}, status=202)

        @svc.get("/api/v1/scans/{id}/report", streaming=True,
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


def settings(port: int = 8080, transport_port: int = 9100):
    s = default_settings()
    gw = s.gateway
    tcp = dataclasses.replace(gw.transports.tcp, host="127.0.0.1", port=transport_port)
    gw = dataclasses.replace(
        gw, http=dataclasses.replace(gw.http, host="127.0.0.1", port=port),
        node=dataclasses.replace(gw.node, workers=1),
        transports=dataclasses.replace(gw.transports, tcp=tcp))
    return dataclasses.replace(s, gateway=gw)


def main(port: int = 8080, transport_port: int = 9100) -> int:
    from .supervisor import serve
    s = settings(port, transport_port)
    gateway = f"127.0.0.1:{transport_port}"
    children = [subprocess.Popen([sys.executable, "-m", "stellagw", "demo-service",
                                  "--name", name, "--gateway", gateway])
                for name in ("scanner", "policy")]
    print(TRY.format(host="127.0.0.1", port=port, tport=transport_port), file=sys.stderr, flush=True)
    try:
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
