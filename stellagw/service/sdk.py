"""The microservice side of the frame protocol (docs/protocol.md)."""
from __future__ import annotations

import asyncio
import contextvars
import os
import random
import socket
import ssl as ssl_mod
import sys
import time
import traceback
import uuid

import orjson

from ..routing.radix import FOUND, Router, normalize_path
from ..transport import frame as fr
from ..transport.batch import WriteBatch
from ..transport.identity import registration_key, sign_hello

DEFAULT_WINDOW = 256 * 1024
MAX_WS_MESSAGE = 64 * 1024 * 1024   # a bigger WebSocket message is refused with 1009


def _start_eagerly(loop, coro):
    """Run a request's coroutine up to its first wait now, and make a Task only if it waits.

    Most handlers answer without awaiting anything; then they need neither a Task nor another
    turn of the loop (Python 3.12's eager tasks, by hand: 3.11 has none). The first step
    runs in its own copy of the context, which the Task, if one is needed, carries on in.
    Returns the Task, or None when the coroutine has finished.
    """
    ctx = contextvars.copy_context()
    try:
        yielded = ctx.run(coro.send, None)
    except StopIteration:
        return None
    return loop.create_task(_resume(coro, yielded), context=ctx)


async def _resume(coro, yielded):
    return await _Resumed(coro, yielded)


class _Resumed:
    """Awaiting this continues `coro`, which has already yielded `yielded` (what a Task
    waits on): sends, throws (cancellation) and the result pass through, as `await` would."""

    __slots__ = ("coro", "yielded")

    def __init__(self, coro, yielded):
        self.coro = coro
        self.yielded = yielded

    def __await__(self):
        coro, out = self.coro, self.yielded
        self.coro = self.yielded = None
        while True:
            try:
                sent = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # noqa: BLE001 -- thrown in by the Task: pass it on
                try:
                    out = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                out = coro.send(sent)
            except StopIteration as stop:
                return stop.value


# A Response body larger than this goes to the gateway as a stream (RESPONSE_STREAM_DATA
# under its window), and reaches the client chunked.
STREAM_ABOVE = 1024 * 1024


async def _pieces(body: bytes):
    view = memoryview(body)
    for start in range(0, len(view), 256 * 1024):
        yield view[start:start + 256 * 1024]


def json_log(service: str, message: str, level: str = "info", **fields) -> None:
    """One JSON line on stderr, in the gateway's log format (timestamp, level, message)."""
    now = time.time()
    record = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
              + ".%03dZ" % (int(now * 1000) % 1000), "level": level, "message": message,
              "service": service}
    record.update(fields)
    sys.stderr.buffer.write(orjson.dumps(record, default=str) + b"\n")
    sys.stderr.flush()


class Request:
    """What a handler gets. `body` is complete unless the endpoint streams; then iterate
    `request.stream()` for the chunks.

    `headers`, `correlation_id` and `cancelled` are made when first read: most handlers read
    none of them, and building them for every request was 40 % of the SDK's own time per
    request (a dict of eight decoded header pairs, an asyncio.Event).
    """

    __slots__ = ("method", "path", "query", "params", "body", "timeout", "_raw_headers",
                 "_headers", "_correlation_id", "_cancelled", "_chunks", "_link", "_corr")

    def __init__(self, method, path, query, headers, params, body, timeout, link, corr):
        self.method = method
        self.path = path
        self.query = query
        self._raw_headers = headers     # [(name, value)] as bytes, names lower-case
        self._headers = None
        self._correlation_id = None
        self._cancelled = None
        self.params = params or {}
        self.body = body
        self.timeout = timeout
        self._chunks: asyncio.Queue | None = None
        self._link = link
        self._corr = corr

    @property
    def headers(self) -> dict:
        """The request's header fields, name -> value (a repeated name: its last value)."""
        if self._headers is None:
            self._headers = {n.decode("latin-1"): v.decode("latin-1")
                             for n, v in self._raw_headers}
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = value

    @property
    def correlation_id(self) -> str:
        if self._correlation_id is None:
            self._correlation_id = self.headers.get("x-correlation-id", "")
        return self._correlation_id

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the gateway sends CANCEL (the client went away, or a deadline passed)."""
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    def json(self):
        return orjson.loads(self.body)

    def _feed(self, flags, chunk):
        if self._chunks is not None:
            self._chunks.put_nowait((bytes(chunk), bool(flags & fr.FLAG_END_STREAM)))

    async def _read_all(self) -> bytes:
        # A coroutine, not `async for` over stream(): cancelled mid-body (CANCEL), an
        # async generator is left to the loop's finalizer, which then fails to close it
        # ("aclose(): asynchronous generator is already running").
        parts = []
        while True:
            chunk, last = await self._chunks.get()
            if chunk:
                self._link.grant(self._corr, len(chunk))
                parts.append(chunk)
            if last:
                return b"".join(parts)

    async def stream(self):
        """The request body in chunks, as the gateway sends them (flow-controlled)."""
        if self._chunks is None:
            if self.body:
                yield self.body
            return
        while True:
            chunk, last = await self._chunks.get()
            if chunk:
                self._link.grant(self._corr, len(chunk))
                yield chunk
            if last:
                return


class Response:
    __slots__ = ("status", "headers", "body")

    def __init__(self, body: bytes | str = b"", status: int = 200, headers=None,
                 content_type: str | None = None):
        self.status = status
        if headers is None:
            self.headers = []
        else:
            self.headers = list(headers.items()) if isinstance(headers, dict) else list(headers)
        if isinstance(body, str):
            body = body.encode()
            content_type = content_type or "text/plain; charset=utf-8"
        if content_type:
            self.headers.append(("content-type", content_type))
        self.body = body

    @classmethod
    def json(cls, obj, status: int = 200, headers=None):
        return cls(orjson.dumps(obj), status, headers, "application/json")


class StreamResponse:
    """A response whose body is produced piece by piece: `body` is an async iterable of bytes.
    The SDK sends no more than the gateway's flow-control window allows."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, body, status: int = 200, headers=None, content_type=None):
        self.status = status
        self.headers = list((headers or {}).items()) if isinstance(headers, dict) else list(headers or ())
        if content_type:
            self.headers.append(("content-type", content_type))
        self.body = body


class WebSocket:
    """A WebSocket the gateway holds with a client; the handler of a `websocket` endpoint
    gets one. Iterate it for messages (str for text, bytes for binary); `send()` them;
    `close()` with a code. Flow control is the SDK's job: a slow client slows `send()`."""

    def __init__(self, link, corr, request: Request):
        self.request = request
        self.cancelled = asyncio.Event()   # set on CANCEL, or when the link is lost
        self.close_code: int | None = None
        self.close_reason = ""
        self._link = link
        self._corr = corr
        self._queue: asyncio.Queue = asyncio.Queue()
        self._parts: list[bytes] = []
        self._size = 0
        self._text = False
        self._closed_sent = False
        # One message at a time: a send that waits for credit would otherwise let another
        # task's message start between its fragments (a new TEXT/BINARY inside a fragmented
        # message, which the client must refuse).
        self._sending = asyncio.Lock()

    def _feed(self, flags, chunk):
        kind = flags & fr.STREAM_KIND_MASK
        chunk = bytes(chunk)
        if kind == fr.KIND_CLOSE:
            self.close_code, self.close_reason = fr.parse_ws_close(chunk)
            self._queue.put_nowait(None)
            return
        if kind in (fr.KIND_TEXT, fr.KIND_BINARY):
            self._text, self._parts = kind == fr.KIND_TEXT, [chunk]
            self._size = len(chunk)
        else:
            self._parts.append(chunk)
            self._size += len(chunk)
        if self._size > MAX_WS_MESSAGE:
            self._parts = []
            self._queue.put_nowait(None)
            asyncio.ensure_future(self.close(1009, "message too big"))
            return
        if flags & fr.FLAG_MORE:
            # A message larger than the window must still arrive whole: credit for its
            # fragments goes back at once (bounded by MAX_WS_MESSAGE), for whole messages
            # when the handler takes them.
            self._link.grant(self._corr, len(chunk)) if chunk else None
        else:
            data = b"".join(self._parts)
            self._parts = []
            self._queue.put_nowait((data.decode("utf-8") if self._text else data, len(chunk)))
        if flags & fr.FLAG_END_STREAM:
            self._queue.put_nowait(None)

    async def receive(self):
        """The next message, or None once the client closed."""
        item = await self._queue.get()
        if item is None:
            self._queue.put_nowait(None)   # later calls see the close too
            return None
        message, size = item
        if size:
            self._link.grant(self._corr, size)  # credit back only as messages are taken
        return message

    def __aiter__(self):
        return self

    async def __anext__(self):
        message = await self.receive()
        if message is None:
            raise StopAsyncIteration
        return message

    async def send(self, message) -> None:
        if isinstance(message, str):
            kind, data = fr.KIND_TEXT, message.encode("utf-8")
        else:
            kind, data = fr.KIND_BINARY, bytes(message)
        async with self._sending:
            await self._link.send_with_credit(self._corr, kind, data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed_sent:
            return
        self._closed_sent = True
        self._link.send_stream_frame(self._corr, fr.KIND_CLOSE | fr.FLAG_END_STREAM,
                                     fr.ws_close_payload(code, reason))


class _Endpoint:
    __slots__ = ("method", "path", "handler", "timeout", "streaming", "websocket", "claims",
                 "openapi", "max_body_bytes", "sender_constrained", "retryable")

    def __init__(self, method, path, handler, timeout, streaming, websocket, claims, openapi,
                 max_body_bytes=None, sender_constrained=False, retryable=False):
        self.method, self.path, self.handler = method, path, handler
        self.timeout, self.streaming, self.websocket = timeout, streaming, websocket
        self.claims, self.openapi = claims, openapi
        self.max_body_bytes, self.sender_constrained = max_body_bytes, sender_constrained
        self.retryable = retryable

    def describe(self) -> dict:
        d = {"method": self.method, "path": self.path, "streaming": self.streaming}
        if self.timeout:
            d["timeout_ms"] = int(self.timeout * 1000)
        if self.websocket:
            d["websocket"] = True
        if self.claims:
            d["claims"] = [{"type": t, "value": v} for t, v in self.claims]
        if self.openapi:
            d["openapi"] = self.openapi
        if self.max_body_bytes is not None:
            d["max_body_bytes"] = self.max_body_bytes
        if self.sender_constrained:
            d["sender_constrained"] = True
        if self.retryable:
            d["retryable"] = True
        return d


class Service:
    def __init__(self, name: str, version: str = "1.0.0", *, gateways=("127.0.0.1:9100",),
                 region: str = "", instance_id: str | None = None, ssl: ssl_mod.SSLContext | None = None,
                 server_hostname: str | None = None, schemas: dict | None = None,
                 reconnect_min: float = 0.1, reconnect_max: float = 5.0,
                 resolve_interval: float = 30.0, log=None,
                 registration_secret: str | None = None, registration_key: str | None = None):
        """`registration_secret` (the gateway's transports.*.registrationSecret) or
        `registration_key` (this service's own, from
        `stellagw.transport.identity.registration_key(secret, name)`) signs every HELLO
        (docs/service-identity.md); when both are None, the environment's
        STELLAGW_REGISTRATION_KEY or STELLAGW_REGISTRATION_SECRET does."""
        if not gateways:
            raise ValueError("a service needs at least one gateway address")
        self.name = name
        self.version = version
        self.region = region
        self.instance_id = instance_id or f"{name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.gateways = [_split(g) for g in gateways]
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.schemas = schemas or {}
        self._hello_key = _hello_key(name, registration_secret, registration_key)
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        # Gateway names are resolved again this often: a gateway instance added by a
        # scale-up (a new address behind the DNS name) gets this service too.
        self.resolve_interval = resolve_interval
        self._seen_addrs: set[tuple[str, int]] = set()
        # Addresses being dialled now: the periodic lookup and a rediscovery after a DRAIN
        # both find a new address, and each dialling it made two links (two registrations,
        # one closed again).
        self._dialling: set[tuple[str, int]] = set()
        self.status = "Healthy"
        # log(message, **fields): the SDK's events (a gateway unreachable, a handler that
        # failed with its traceback, a refused HELLO); JSON lines on stderr unless given.
        self._log = log or (lambda msg, **kw: json_log(self.name, msg, **kw))
        self._endpoints: list[_Endpoint] = []
        self._router = Router()
        self._links: dict[tuple, "_Link"] = {}       # (node, worker) -> live link
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._requests = 0
        self._errors = 0
        self.in_flight = 0

    # ---------------------------------------------------------------- declaring endpoints

    def route(self, method: str, path: str, *, timeout: float | None = None, streaming=False,
              websocket=False, claims=(), openapi: dict | None = None,
              max_body_bytes: int | None = None, sender_constrained: bool = False,
              retryable: bool = False):
        """`max_body_bytes`: the largest request body the gateway lets through to this
        endpoint (413 on the head for a larger Content-Length, or when a chunked body
        passes it); default routing.maxRequestBodySize. `sender_constrained`: the gateway
        refuses Bearer tokens bound to neither a DPoP key nor an mTLS certificate here.
        `retryable`: the gateway may send a request to another instance after a broken link
        though its method is not idempotent (this endpoint copes with a repeat)."""
        def register(handler):
            ep = _Endpoint(method.upper(), path, handler, timeout, streaming, websocket,
                           tuple(claims), openapi, max_body_bytes, sender_constrained, retryable)
            self._router.add(ep.method, path, ep)
            self._endpoints.append(ep)
            return handler
        return register

    def get(self, path, **kw):
        return self.route("GET", path, **kw)

    def post(self, path, **kw):
        return self.route("POST", path, **kw)

    def put(self, path, **kw):
        return self.route("PUT", path, **kw)

    def delete(self, path, **kw):
        return self.route("DELETE", path, **kw)

    def websocket(self, path, **kw):
        """A WebSocket endpoint: the handler gets a `WebSocket` (async iteration, send, close)."""
        return self.route("GET", path, websocket=True, **kw)

    def hello(self) -> dict:
        """The HELLO of one connection: signed afresh each call when a key is configured."""
        hello = {"protocol": fr.PROTOCOL_VERSION, "service": self.name, "version": self.version,
                 "instance_id": self.instance_id, "region": self.region,
                 "endpoints": [ep.describe() for ep in self._endpoints], "schemas": self.schemas,
                 "stream_window": DEFAULT_WINDOW, "sdk": "stellagw.service"}
        return sign_hello(hello, self._hello_key) if self._hello_key else hello

    # ---------------------------------------------------------------- running

    def run(self) -> None:
        import uvloop

        async def main():
            await self.start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            await self.stop()
        uvloop.run(main())

    async def start(self) -> None:
        if not self._endpoints:
            raise ValueError("declare at least one endpoint before start()")
        for host, port in self.gateways:
            self._spawn(self._watch(host, port))

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_registered(self, links: int = 1, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self._links) < links:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._links)} of {links} gateway links up")
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float = 10.0) -> None:
        """Drain: tell every gateway, let running handlers finish, then close."""
        self._stopping = True
        # Heartbeats say so too from now on (protocol.md §4.6): they said Healthy.
        self.status = "Draining"
        for link in list(self._links.values()):
            link.send_control(fr.DRAIN, {"reason": "service stopping"})
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for link in list(self._links.values()):
            link.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)

    # ---------------------------------------------------------------- connections

    async def _addresses(self, host):
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        return sorted({info[4][0] for info in infos})

    async def _watch(self, host, port):
        await self._discover(host, port)
        while not self._stopping and self.resolve_interval > 0:
            await asyncio.sleep(self.resolve_interval)
            try:
                addrs = await self._addresses(host)
            except OSError:
                continue
            # An address that left the name is forgotten: a new gateway given it later
            # (pod IPs are reused) is new.
            self._seen_addrs -= {(a, p) for a, p in self._seen_addrs
                                 if p == port and a not in addrs}
            if any((a, port) not in self._seen_addrs for a in addrs):
                await self._discover(host, port, only_new=True)

    async def _discover(self, host, port, only_new=False, skip_linked=True):
        """Dial the gateway's shared port at each address of its name; the HELLO_ACK tells
        which worker answered and where the others are. An address already linked is
        left alone (unless `skip_linked` is false: a worker of it is missing), and one that
        fails does not hold up the others: it is tried again, with backoff and jitter, for
        as long as the name resolves to it."""
        delay = self.reconnect_min
        origin = (host, port)
        while not self._stopping:
            failed = None
            try:
                addrs = await self._addresses(host)
            except OSError as exc:
                addrs, failed = [], exc
            for addr in addrs:
                if only_new and (addr, port) in self._seen_addrs:
                    continue
                if skip_linked and any(link.address == addr and link.origin == origin
                                       for link in self._links.values()):
                    # Redialled after another address's DRAIN; with Kubernetes publishing
                    # not-ready pods, a terminating one stays in the name for a while.
                    self._seen_addrs.add((addr, port))
                    continue
                if (addr, port) in self._dialling:
                    continue        # another discovery is dialling it, and retries it if it fails
                self._dialling.add((addr, port))
                try:
                    link = await self._connect(addr, port, host)
                    ack = await link.acked
                except (OSError, asyncio.TimeoutError, ConnectionError) as exc:
                    failed = exc
                    continue
                finally:
                    self._dialling.discard((addr, port))
                self._adopt(link, ack, addr, origin)
                self._seen_addrs.add((addr, port))
            if failed is None:
                return
            self._log("gateway unreachable", gateway=f"{host}:{port}", error=str(failed))
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.reconnect_max)

    async def _connect(self, addr, port, host):
        loop = asyncio.get_running_loop()
        _, link = await asyncio.wait_for(loop.create_connection(
            lambda: _Link(self), addr, port, ssl=self.ssl,
            server_hostname=(self.server_hostname or host) if self.ssl else None), 10)
        return link

    def _adopt(self, link, ack, addr, origin):
        node = ack.get("node_id")
        key = (node, ack.get("worker_id"))
        private = {}
        for w in ack.get("workers", ()):
            whost = w.get("host") or addr
            if whost in ("0.0.0.0", "::"):
                whost = addr  # the worker listens on every address: use the one that worked
            private[(node, w.get("worker_id"))] = (whost, w["port"])
        link.origin = origin
        link.address = addr
        if key in self._links and self._links[key] is not link:
            link.close()  # already linked to this worker; this was a second door to it
        else:
            link.key = key
            # After a loss, redial this worker's own port: the shared one may lead elsewhere.
            link.dial = private.get(key, (addr, link.port))
            self._links[key] = link
        for wkey, (whost, wport) in private.items():
            if wkey not in self._links:
                self._spawn(self._keep(wkey, whost, wport, origin))

    async def _keep(self, key, host, port, origin):
        """Dial one worker's private port, and again after the link is lost. When that
        port stops leading to that worker (the gateway restarted), discover it anew."""
        delay = self.reconnect_min
        failures = 0
        while not self._stopping and key not in self._links:
            try:
                link = await self._connect(host, port, host)
                ack = await link.acked
                if (ack.get("node_id"), ack.get("worker_id")) != key:
                    link.close()
                    break
                link.key, link.dial, link.origin = key, (host, port), origin
                link.address = host
                self._links[key] = link
                return
            except (OSError, asyncio.TimeoutError, ConnectionError):
                failures += 1
                if failures >= 5:
                    break
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.reconnect_max)
        if not self._stopping and key not in self._links:
            self._spawn(self._discover(*origin, skip_linked=False))

    def _lost(self, link):
        if link.key is not None and self._links.get(link.key) is link:
            del self._links[link.key]
            if self._stopping:
                return
            if link.drained:
                self._spawn(self._rediscover(link.origin))
            else:
                self._spawn(self._keep(link.key, *link.dial, link.origin))

    async def _rediscover(self, origin):
        await asyncio.sleep(self.reconnect_min * (0.5 + random.random()))
        await self._discover(*origin)

    # ---------------------------------------------------------------- requests

    def _on_request(self, link, corr, payload):
        flags, timeout_ms, method, path, query, headers, body = fr.decode_request(payload)
        route_path = normalize_path(path) or path
        code, ep, params = self._router.match(method, route_path)
        if code != FOUND and method == "HEAD":
            # The gateway sends HEAD to GET endpoints (RFC 9110 §9.3.2) and drops the body.
            code, ep, params = self._router.match("GET", route_path)
        req = Request(method, path, query, headers, params, body,
                      timeout_ms / 1000.0 if timeout_ms else None, link, corr)
        if not flags & fr.FLAG_END_STREAM:
            req._chunks = asyncio.Queue()
            if body:
                req._chunks.put_nowait((body, False))
                req.body = b""
        if code != FOUND:
            link.send_response(corr, Response.json(
                {"error": {"code": "not_found", "message": f"{self.name} has no {method} {path}",
                           "trace_id": req.correlation_id}}, 404))
            return
        self.in_flight += 1
        self._requests += 1
        if ep.websocket:
            ws = WebSocket(link, corr, req)
            link.send_head(corr, 101)   # accepted: the gateway hands the client to picows
            task = asyncio.ensure_future(self._handle_ws(link, corr, ep, ws))
            link.requests[corr] = (task, ws)
            return
        task = _start_eagerly(link._loop, self._handle(link, corr, ep, req))
        if task is not None:
            link.requests[corr] = (task, req)

    async def _handle(self, link, corr, ep, req):
        try:
            if req._chunks is not None and not ep.streaming:
                req.body = await req._read_all()
                req._chunks = None
            result = await ep.handler(req)
            if result.__class__ is not Response:    # a plain Response, the common answer, is one
                if result is None:
                    result = Response(b"", 204)
                elif isinstance(result, (bytes, str)):
                    result = Response(result)
                elif isinstance(result, (dict, list)):
                    result = Response.json(result)
            if isinstance(result, StreamResponse):
                await link.send_stream(corr, result)
            elif len(result.body) > STREAM_ABOVE:
                # Past one frame's worth it would not fit a RESPONSE (max_frame_size), and
                # the gateway would hold all of it: sent under the stream window instead.
                await link.send_stream(corr, StreamResponse(_pieces(result.body), result.status,
                                                            result.headers))
            else:
                link.send_response(corr, result)
        except asyncio.CancelledError:
            pass  # CANCEL from the gateway: it has answered the client already
        except Exception as exc:
            self._errors += 1
            self._log("handler failed", level="error", method=ep.method, path=ep.path,
                      correlationId=req.correlation_id, error=repr(exc),
                      traceback=traceback.format_exc())
            link.send_response(corr, Response.json(
                {"error": {"code": "internal_error", "message": "the service failed",
                           "trace_id": req.correlation_id}}, 500))
        finally:
            self.in_flight -= 1
            link.requests.pop(corr, None)

    async def _handle_ws(self, link, corr, ep, ws):
        try:
            await ep.handler(ws)
            await ws.close(1000)
        except asyncio.CancelledError:
            pass  # the client went away (CANCEL)
        except Exception as exc:
            self._errors += 1
            self._log("websocket handler failed", level="error", path=ep.path, error=repr(exc),
                      traceback=traceback.format_exc())
            await ws.close(1011, "internal error")
        finally:
            self.in_flight -= 1
            link.requests.pop(corr, None)

    def heartbeat(self) -> dict:
        rate = self._errors / self._requests if self._requests else 0.0
        self._requests = self._errors = 0
        return {"instance_id": self.instance_id, "status": self.status,
                "in_flight": self.in_flight, "error_rate": round(rate, 4),
                "sent_ms": int(time.time() * 1000)}


class _Link(asyncio.Protocol):
    """One connection to one gateway worker."""

    def __init__(self, service: Service):
        self.service = service
        self.transport = None
        self.key = None
        self.dial = None
        self.origin = None
        self.address = None      # the gateway's address it was dialled at
        self.drained = False
        self.port = None
        self.acked = asyncio.get_running_loop().create_future()
        self.requests: dict[bytes, tuple] = {}
        self._decoder = fr.FrameDecoder()
        self._encoder = fr.FrameEncoder()
        self._windows: dict[bytes, int] = {}
        self._window_waiters: dict[bytes, asyncio.Future] = {}
        self._initial_window = DEFAULT_WINDOW
        self._heartbeat = None
        self._loop = asyncio.get_running_loop()
        self._writes = WriteBatch(self._encoder, self._loop, self._flush)

    def connection_made(self, transport):
        self.transport = transport
        self.port = transport.get_extra_info("peername")[1]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_control(fr.HELLO, self.service.hello())

    def connection_lost(self, exc):
        if not self.acked.done():
            self.acked.set_exception(ConnectionError("closed before HELLO_ACK"))
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        # The gateway worker is gone (killed, or the link cut): it has answered these
        # requests or closed their clients already, as after a CANCEL, so they are
        # cancelled as by one — `cancelled` set too, or work a handler handed to another
        # task would go on for an answer nobody will read.
        for task, req in list(self.requests.values()):
            req.cancelled.set()
            task.cancel()
        for fut in self._window_waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("gateway connection lost"))
        self.transport = None
        self.service._lost(self)

    def data_received(self, data):
        try:
            self._decoder.feed(data)
            while (frame := self._decoder.next()) is not None:
                self._on_frame(*frame)
        except fr.FrameError as exc:
            self.service._log("protocol error from the gateway", level="error", error=str(exc))
            self.close()

    def _on_frame(self, ftype, corr, payload):
        if ftype == fr.REQUEST:
            self.service._on_request(self, corr, payload)
        elif ftype == fr.REQUEST_STREAM_DATA:
            entry = self.requests.get(corr)
            if entry is not None:
                flags, chunk = fr.decode_stream_data(payload)
                entry[1]._feed(flags, chunk)
        elif ftype == fr.CANCEL:
            entry = self.requests.pop(corr, None)
            if entry is not None:
                entry[1].cancelled.set()
                entry[0].cancel()
        elif ftype == fr.WINDOW_UPDATE:
            self._windows[corr] = self._windows.get(corr, 0) + fr.decode_window_update(payload)
            fut = self._window_waiters.pop(corr, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif ftype == fr.PING:
            self._encoder.raw(fr.PONG, corr, payload)
            self._schedule_flush()
        elif ftype == fr.HELLO_ACK:
            ack = fr.decode_control(payload)
            if "error" in ack:
                # Logged: a Forbidden service retries for ever, and without this nothing on
                # its side would say why.
                self.service._log("HELLO refused by the gateway", level="error",
                                  refusal=ack["error"])
                if not self.acked.done():
                    self.acked.set_exception(ConnectionError(f"HELLO refused: {ack['error']}"))
                return
            self._initial_window = int(ack.get("stream_window", DEFAULT_WINDOW))
            interval = ack.get("heartbeat_interval_ms", 10000) / 1000.0
            self._heartbeat = self._loop.call_later(interval, self._beat, interval)
            if not self.acked.done():
                self.acked.set_result(ack)
        elif ftype == fr.DRAIN:
            # The worker is stopping: when it closes, find the gateway anew through its
            # shared address rather than redialling this worker's port (protocol.md §4.6).
            self.drained = True

    def _beat(self, interval):
        if self.transport is None:
            return
        self.send_control(fr.HEARTBEAT, self.service.heartbeat())
        self._heartbeat = self._loop.call_later(interval, self._beat, interval)

    # -- writing

    def send_control(self, ftype, obj):
        self._encoder.control(ftype, fr.ZERO_CORR, obj)
        self._schedule_flush()

    def grant(self, corr, n):
        self._encoder.window_update(corr, n)
        self._schedule_flush()

    def send_response(self, corr, resp: Response):
        if self.transport is None:
            return
        self._encoder.response(corr, resp.status, resp.headers, fr.FLAG_END_STREAM, resp.body)
        self._schedule_flush()

    def send_head(self, corr, status: int, headers=()):
        """A RESPONSE that opens a stream (no END_STREAM)."""
        if self.transport is None:
            return
        self._windows.setdefault(corr, self._initial_window)
        self._encoder.response(corr, status, list(headers), 0, b"")
        self._schedule_flush()

    def send_stream_frame(self, corr, flags, data):
        if self.transport is None:
            return
        self._encoder.stream_data(fr.RESPONSE_STREAM_DATA, corr, flags, data)
        self._schedule_flush()

    async def send_with_credit(self, corr, kind, data: bytes):
        """One message as RESPONSE_STREAM_DATA fragments within the gateway's window."""
        view = memoryview(data)
        first = True
        while True:
            window = self._windows.get(corr, 0)
            if window <= 0 and view:
                # Shared by whoever waits on this stream: a second waiter must not replace
                # (and so strand) the first.
                fut = self._window_waiters.get(corr)
                if fut is None or fut.done():
                    fut = self._window_waiters[corr] = self._loop.create_future()
                await fut
                continue
            n = min(len(view), window, 64 * 1024)
            part, view = view[:n], view[n:]
            flags = (kind if first else fr.KIND_DATA) | (fr.FLAG_MORE if view else 0)
            self._encoder.stream_data(fr.RESPONSE_STREAM_DATA, corr, flags, part)
            self._windows[corr] = window - n
            first = False
            self._schedule_flush()
            if not view or self.transport is None:
                return

    async def send_stream(self, corr, resp: StreamResponse):
        if self.transport is None:
            return
        self._windows[corr] = self._initial_window
        self._encoder.response(corr, resp.status, resp.headers, 0, b"")
        self._schedule_flush()
        try:
            async for chunk in resp.body:
                view = memoryview(chunk)
                while view:
                    window = self._windows.get(corr, 0)
                    if window <= 0:
                        fut = self._window_waiters[corr] = self._loop.create_future()
                        await fut
                        continue
                    n = min(len(view), window, 64 * 1024)
                    self._encoder.stream_data(fr.RESPONSE_STREAM_DATA, corr, 0, view[:n])
                    self._windows[corr] = window - n
                    view = view[n:]
                    self._schedule_flush()
                    if self.transport is None:
                        return
                    # Let the loop write: a producer that never awaits would hold it all.
                    if len(self._encoder) > 256 * 1024:
                        self._flush()
                        await asyncio.sleep(0)
            self._encoder.stream_data(fr.RESPONSE_STREAM_DATA, corr, fr.FLAG_END_STREAM, b"")
            self._schedule_flush()
        finally:
            self._windows.pop(corr, None)
            self._window_waiters.pop(corr, None)

    def _schedule_flush(self):
        self._writes.added()

    def _flush(self):
        self._writes.write(self.transport)

    def close(self):
        if self.transport is not None:
            self._flush()
            self.transport.close()


def _hello_key(name, secret, key) -> str | None:
    if secret is None and key is None:
        key = os.environ.get("STELLAGW_REGISTRATION_KEY") or None
        secret = os.environ.get("STELLAGW_REGISTRATION_SECRET") or None
    if key is not None:
        if len(key) != 64 or not all(c in "0123456789abcdefABCDEF" for c in key):
            raise ValueError("registration_key must be the 64 hex digits of "
                             "registration_key(secret, service)")
        return key.lower()
    return registration_key(secret, name) if secret else None


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"gateway address {address!r} must be HOST:PORT")
    return host.strip("[]"), int(port)
