"""A test microservice run in its own process: `python -m tests.support.services --name NAME ...`.

Endpoints, all under /t/<name>/ so several services can register side by side:
  GET  whoami            instance id, region, version
  GET  slow?ms=N         answers after N ms; a CANCEL is recorded (see events)
  GET  hang              never answers in time (routing.defaultTimeout applies)
  GET  secure            needs scope scans:read; returns the identity headers it got
  GET  admin             needs scope scans:admin
  GET  bound             needs scope scans:read and a DPoP- or certificate-bound token
  WS   ws                echo; "close-4001" closes with 4001, "big-N" sends N bytes, "crash" dies
                         (a CANCEL is noted in events)
  GET  events            correlation ids of requests this process saw cancelled
  GET  stream?mb=N       N MiB streamed in 64 KiB chunks
  GET  stall?ms=N        streams one line, then nothing for N ms (a CANCEL is recorded, see
                         events), then another line and the end
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
  GET  hit/{id}          answers "hit"; the path is noted (see hits)
  GET  hits              the paths of the hit/{id} requests that reached this process
  GET  flaky             500 until the wall-clock time --fail-until (epoch seconds; 0, the
                         default: never), 200 after; both with the instance id and version

A test starts one with ServiceProcess / start_service (below): started, waited for until a
route answers through a gateway, stopped by PID, its output kept for failure messages.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time

from stellagw.service import Response, Service, StreamResponse

from tests.support import REPO


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
        try:
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
        except asyncio.CancelledError:
            cancelled.append(ws.request.correlation_id)
            raise

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

    @svc.get(base + "/stall", streaming=True)
    async def stall(req):
        ms = int(req.query.decode().partition("ms=")[2] or "1000")

        async def body():
            yield b"first\n"
            try:
                await asyncio.sleep(ms / 1000)
            except asyncio.CancelledError:
                cancelled.append(req.correlation_id)
                raise
            yield b"late\n"
        return StreamResponse(body(), content_type="text/plain")

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
    cancelled = []      # uploads whose handler a CANCEL from the gateway ended

    @svc.get(base + "/uploads")
    async def uploads_seen(req):
        return Response.json({"uploads": uploads, "cancelled": cancelled})

    @svc.post(base + "/secure-upload", streaming=True, claims=[("scope", "scans:write")])
    async def secure_upload(req):
        uploads.append(req.correlation_id)
        return Response(b"never without a token")

    hits = []           # rate-limit tests: which requests reached the service

    @svc.get(base + "/hit/{id}")
    async def hit(req):
        hits.append(req.path)
        return Response(b"hit")

    @svc.get(base + "/hits")
    async def hits_seen(req):
        return Response.json({"hits": hits})

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
        try:
            async for chunk in req.stream():
                digest.update(chunk)
                if ms and (size + len(chunk)) >> 20 != size >> 20:
                    await asyncio.sleep(ms / 1000)
                size += len(chunk)
        except asyncio.CancelledError:
            cancelled.append(req.correlation_id)
            raise
        return Response.json({"bytes": size, "sha256": digest.hexdigest()})

    return svc


# ---------------------------------------------------------------------- running it from a test


class ServiceProcess:
    """This module (or `module`, e.g. tests.support.services_feed) as a test's SDK service in
    its own process::

        svc = start_service("scan", gw.transport_port, region="eu1", wait=gw.port)
        ...                              # svc.pid, svc.send_signal(...), svc.output()
        svc.stop()                       # SIGTERM by PID, then SIGKILL if it lingers

    `gateways`: transport ports (127.0.0.1) or "host:port" strings, one --gateway each.
    Its stdout and stderr go to one file, not a pipe (a pipe nobody reads stalls the
    service once full): wait_routable puts its tail in the failure message, and stop()
    prints the tail, which pytest shows only for a test that failed."""

    TAIL = 40

    def __init__(self, name: str, *gateways, region: str | None = None,
                 version: str | None = None, instance: str | None = None,
                 fail_until: float | None = None, module: str = "tests.support.services"):
        self.name = name
        self.argv = [sys.executable, "-m", module, "--name", name]
        for gw in gateways:
            self.argv += ["--gateway", gw if isinstance(gw, str) else f"127.0.0.1:{gw}"]
        for flag, value in (("--region", region), ("--version", version),
                            ("--instance", instance), ("--fail-until", fail_until)):
            if value is not None:
                self.argv += [flag, str(value)]
        self.proc: subprocess.Popen | None = None
        self._out = None
        self._final = b""
        self._signalled = False

    def start(self) -> "ServiceProcess":
        self._out = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.argv, cwd=str(REPO), stdout=self._out,
                                     stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self):
        return self.proc.poll()

    def send_signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def output(self) -> bytes:
        """Everything it wrote so far (stdout and stderr), after stop() too."""
        if self._out.closed:
            return self._final
        self._out.flush()
        self._out.seek(0)
        return self._out.read()

    def describe(self) -> str:
        code = self.proc.poll()
        state = "running" if code is None else f"exited with {code}"
        tail = b"\n".join(self.output().splitlines()[-self.TAIL:]).decode(errors="replace")
        return f"service {self.name!r} (pid {self.proc.pid}, {state}); its last lines:\n{tail}"

    def routable(self, port: int, path: str | None = None, raw: bytes | None = None) -> bool:
        """Does one request through the gateway's client `port` get a 200? `raw`: the whole
        request instead of GET `path` (default /t/<name>/whoami)."""
        from tests.support.gwtest import request
        if raw is None:
            raw = b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % (path or f"/t/{self.name}/whoami").encode()
        try:
            return request(port, raw)[0] == 200
        except OSError:
            return False

    def wait_routable(self, port: int, path: str | None = None, raw: bytes | None = None,
                      timeout: float = 20.0) -> "ServiceProcess":
        """Until a request through `port` is answered 200 (routable), or fail with its log."""
        from tests.support.gwtest import wait_for
        ok = wait_for(lambda: self.routable(port, path, raw) or self.proc.poll() is not None,
                      timeout)
        assert ok and self.proc.poll() is None, f"not routable through :{port}: {self.describe()}"
        return self

    def terminate(self, sig=signal.SIGTERM) -> None:
        """Signal it by PID once (SIGTERM: the SDK drains), without waiting."""
        if self.proc is not None and self.proc.poll() is None and not self._signalled:
            self._signalled = True
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0, sig=signal.SIGTERM):
        """terminate(), wait, SIGKILL after `timeout`; its return code. Stopped already:
        nothing is sent."""
        if self.proc is None:
            return None
        self.terminate(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        if self._out is not None and not self._out.closed:
            sys.stdout.write(self.describe() + "\n")     # shown by pytest for a failed test
            self._final = self.output()
            self._out.close()
        return self.proc.returncode

    def kill(self):
        """SIGKILL now (a crash, as far as the gateway can tell), then as stop()."""
        if self.proc.poll() is None:
            self._signalled = True
            self.proc.kill()
        return self.stop()

    def __enter__(self) -> "ServiceProcess":
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_services(services, timeout: float = 10.0) -> None:
    """Stop several at once: all signalled first, so their drains overlap."""
    for svc in services:
        svc.terminate()
    for svc in services:
        svc.stop(timeout)


def start_service(name: str, *gateways, wait: int | None = None, path: str | None = None,
                  timeout: float = 20.0, **flags) -> ServiceProcess:
    """ServiceProcess(name, *gateways, **flags) started; with `wait` (a gateway's client
    port), once `path` (default /t/<name>/whoami) answers 200 through it. Stopped again
    if it never does."""
    svc = ServiceProcess(name, *gateways, **flags).start()
    if wait is not None:
        try:
            svc.wait_routable(wait, path, timeout=timeout)
        except BaseException:
            svc.stop()
            raise
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
