"""A test microservice run in its own process: `python -m tests.support.services --name NAME ...`.

Endpoints, all under /t/<name>/ so several services can register side by side:
  GET  whoami            instance id, region, version
  GET  slow?ms=N         answers after N ms; a CANCEL is recorded (see events)
  GET  hang              never answers in time (routing.defaultTimeout applies)
  GET  secure            needs scope scans:read; returns the identity headers it got
  GET  admin             needs scope scans:admin
  GET  bound             needs scope scans:read and a DPoP- or certificate-bound token
  WS   ws                echo; "close-4001" closes with 4001, "big-N" sends N bytes, "crash" dies
  GET  events            correlation ids of requests this process saw cancelled
  GET  stream?mb=N       N MiB streamed in 64 KiB chunks
  GET  crash             the process dies mid-request
  GET|POST crash-once?marker=PATH   the first instance to create PATH dies mid-request,
                         others answer (POST crash-once-retryable: declared retryable)
  POST echo              the body back (large bodies arrive as REQUEST_STREAM_DATA)
  POST upload?ms=N       streams the body in, N ms per MiB; its size and sha256
  POST secure-upload     needs scope scans:write (an upload refused on its head)
  POST early             answers 409 without reading the body
  GET  uploads           correlation ids of the uploads that reached this process
  GET  big?mb=N          N MiB in one Response (streamed by the SDK)
  GET  json?kb=N         a JSON document of about N KiB
  GET  boom              the handler raises (a 500, and the SDK's JSON error line)
  GET  flaky             500 until the wall-clock time --fail-until (epoch seconds; 0, the
                         default: never), 200 after; both with the instance id and version
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time

from stellagw.service import Response, Service, StreamResponse


def build(name, gateways, region, version, instance, fail_until=0.0):
    svc = Service(name, version, gateways=gateways, region=region, instance_id=instance,
                  reconnect_min=0.05, reconnect_max=0.5)
    cancelled = []
    base = f"/t/{name}"

    @svc.get(base + "/whoami")
    async def whoami(req):
        return Response.json({"instance": svc.instance_id, "region": region, "version": version,
                              "pid": os.getpid(), "headers": req.headers})

    @svc.get(base + "/slow", timeout=1.0)
    async def slow(req):
        ms = int(dict(p.split("=") for p in req.query.decode().split("&") if "=" in p).get("ms", "1000"))
        try:
            await asyncio.sleep(ms / 1000)
        except asyncio.CancelledError:
            cancelled.append(req.correlation_id)
            raise
        return Response.json({"slept_ms": ms})

    @svc.get(base + "/secure", claims=[("scope", "scans:read")])
    async def secure(req):
        return Response.json({k: v for k, v in req.headers.items() if k.startswith("x-stella")})

    @svc.get(base + "/bound", claims=[("scope", "scans:read")], sender_constrained=True)
    async def bound(req):
        return Response.json({k: v for k, v in req.headers.items() if k.startswith("x-stella")})

    @svc.get(base + "/tenanted", claims=[("tenant", None)])
    async def tenanted(req):
        return Response(req.headers.get("x-stellaops-tenant", ""))

    @svc.get(base + "/admin", claims=[("scope", "scans:admin")])
    async def admin(req):
        return Response(b"admin")

    @svc.websocket(base + "/ws")
    async def ws_echo(ws):
        async for message in ws:
            if message == "close-4001":
                await ws.close(4001, "asked to")
                return
            if message == "crash":
                os._exit(5)
            if isinstance(message, str) and message.startswith("big-"):
                await ws.send(b"b" * int(message[4:]))
                continue
            await ws.send(message)

    @svc.get(base + "/hang")
    async def hang(req):
        await asyncio.sleep(30)   # the endpoint has no timeout of its own
        return Response(b"too late")

    @svc.get(base + "/events")
    async def events(req):
        return Response.json({"cancelled": cancelled})

    @svc.get(base + "/stream", streaming=True)
    async def stream(req):
        mb = int(req.query.decode().partition("mb=")[2] or "1")
        chunk = b"x" * 65536

        async def body():
            for _ in range(mb * 16):
                yield chunk
        return StreamResponse(body(), content_type="application/octet-stream")

    async def crash_once(req):
        # The first instance to see this marker dies mid-request; any other answers.
        marker = req.query.decode().partition("marker=")[2]
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return Response.json({"instance": svc.instance_id, "body": req.body.decode()})
        os.close(fd)
        os._exit(3)

    svc.get(base + "/crash-once")(crash_once)
    svc.post(base + "/crash-once")(crash_once)
    svc.post(base + "/crash-once-retryable", retryable=True)(crash_once)

    @svc.get(base + "/crash")
    async def crash(req):
        await asyncio.sleep(0.1)
        os._exit(3)

    @svc.post(base + "/echo")
    async def echo(req):
        return Response(req.body, content_type="application/octet-stream")

    uploads = []

    @svc.get(base + "/uploads")
    async def uploads_seen(req):
        return Response.json({"uploads": uploads})

    @svc.post(base + "/secure-upload", streaming=True, claims=[("scope", "scans:write")])
    async def secure_upload(req):
        uploads.append(req.correlation_id)
        return Response(b"never without a token")

    @svc.get(base + "/boom")
    async def boom(req):
        raise ValueError("boom on purpose")

    @svc.get(base + "/flaky")
    async def flaky(req):
        # An instance that fails for a while (outlier ejection): the gateway cannot aim a
        # request at one instance, so the instance decides.
        failing = time.time() < fail_until
        return Response.json({"instance": svc.instance_id, "version": version,
                              "failing": failing}, 500 if failing else 200)

    @svc.get(base + "/json")
    async def json_doc(req):
        kb = int(req.query.decode().partition("kb=")[2] or "4")
        return Response.json({"items": ["x" * 1000 for _ in range(kb)]})

    @svc.get(base + "/big")
    async def big(req):
        # A large answer that is not a StreamResponse: the SDK streams it (STREAM_ABOVE).
        mb = int(req.query.decode().partition("mb=")[2] or "20")
        return Response(b"b" * (mb * 1024 * 1024), content_type="application/octet-stream")

    @svc.post(base + "/early", streaming=True)
    async def early(req):
        # Answers before reading the body (a service that refuses an upload itself).
        uploads.append(req.correlation_id)
        return Response(b"no thanks", 409)

    @svc.post(base + "/upload", streaming=True, timeout=120.0)
    async def upload(req):
        # Takes the body as it streams in, pausing `ms` milliseconds per MiB (a slow service).
        uploads.append(req.correlation_id)
        ms = int(req.query.decode().partition("ms=")[2] or "0")
        digest = hashlib.sha256()
        size = 0
        async for chunk in req.stream():
            digest.update(chunk)
            if ms and (size + len(chunk)) >> 20 != size >> 20:
                await asyncio.sleep(ms / 1000)
            size += len(chunk)
        return Response.json({"bytes": size, "sha256": digest.hexdigest()})

    return svc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--gateway", action="append", required=True)
    p.add_argument("--region", default="local")
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--instance")
    p.add_argument("--fail-until", type=float, default=0.0)
    a = p.parse_args()
    build(a.name, a.gateway, a.region, a.version, a.instance, a.fail_until).run()


if __name__ == "__main__":
    main()
