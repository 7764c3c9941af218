"""The client-facing HTTP/1.1 protocol: httptools callbacks on a uvloop transport.

Pure-Python twin of cext/ingress.pyx (the compiled one runs in production); the same
behaviour, checked by running tests/test_ingress_protocol.py against both. Imported
through stellagw.ingress.http.

One HttpProtocol per client connection. Requests are parsed into `Request` objects and
queued; the pipeline answers them strictly in arrival order (pipelining), either at once
(built-ins, local errors) or later (routed requests) through `respond()`.

Error policy (STYLE §17): malformed HTTP or a broken limit → a JSON error answer and the
connection closed after it; nothing raised out of `data_received`.
"""
from __future__ import annotations

import asyncio
import socket
from collections import deque
from time import perf_counter

import httptools

from ..ingress.responses import JSON, STATUS_LINES, error_body, status_line
from ..observe.metrics import Histogram

# How many parsed requests may wait behind the one in flight before we stop reading:
# bounds the memory one pipelining client can make us hold.
PIPELINE_MAX = 16

# Deadline kinds, checked by ServerState.tick() once a second (no timer per request).
D_NONE, D_HEADER, D_BODY, D_IDLE = 0, 1, 2, 3


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is in `protocol._reject`."""


_CID_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


class Accounting:
    """One worker's correlation ids, and what every finished request leaves behind: its
    count and duration in the metrics, its access log line, the end of its span."""

    def __init__(self, worker, cid_prefix: str):
        self.cid_prefix = cid_prefix
        self.cid_counter = 0
        self._worker = worker
        self._metrics = worker.metrics
        self._log = worker.log

    def correlation_id(self, headers) -> str:
        for name, value in headers:
            if name == b"x-correlation-id":
                return self.correlation_id_of(value)
        return self.correlation_id_of(None)

    def correlation_id_of(self, value: bytes | None) -> str:
        """The client's X-Correlation-Id when well formed (≤ 64 of [A-Za-z0-9._-]), else ours."""
        if value is not None and 0 < len(value) <= 64 and _CID_OK.issuperset(value):
            return value.decode("ascii")
        self.cid_counter += 1
        return "%s%010x" % (self.cid_prefix, self.cid_counter)

    def request_done(self, req, status: int) -> None:
        elapsed = perf_counter() - req.started
        if req.span is not None:
            self._worker.tracing.end_route(req, status)
        m = self._metrics
        key = (req.service, req.method, req.route, status)
        requests = m.requests
        requests[key] = requests.get(key, 0) + 1
        hist = m.durations.get(key[:3])
        if hist is None:
            hist = m.durations[key[:3]] = Histogram()
        hist.observe(elapsed)
        log = self._log
        if log.access_log:
            log.request(req.correlation_id, req.tenant, req.method,
                        req.target.decode("utf-8", "replace"), req.service,
                        elapsed * 1000.0, status, req.auth)


class Request:
    """One parsed HTTP request. Plain slots: made once per request, read by every stage."""

    __slots__ = (
        "conn",             # the HttpProtocol it came on
        "method",           # str, upper case as sent ("GET")
        "target",           # bytes, the raw request-target path (before '?')
        "query",            # bytes, after '?', without it
        "headers",          # list[(bytes lowercase name, bytes value)] as received
        "body",             # bytes
        "http_version",     # "1.1" or "1.0"
        "keep_alive",       # bool: what the client asked for
        "correlation_id",   # str: taken from X-Correlation-Id or made
        "started",          # perf_counter() at message complete
        "reject",           # (status, message) when the request is answered with an error
        "service",          # str: service label for metrics/logs ("" for built-ins)
        "route",            # str: the path label for metrics (template, never the raw path)
        "tenant",           # str | None, set by authentication
        "state",            # per-request scratch for pipeline stages (None until used)
        "pending",          # the dispatch waiting for the service (has .abort()), or None
        "identity",         # auth.Identity once authenticated (anonymous included)
        "resp_headers",     # bytes: header lines stages add to the response (rate limits, nonce)
        "span",             # the gateway.route span when tracing is on
        "websocket",        # bool: a WebSocket upgrade request (GET, Upgrade: websocket)
        "auth",             # str for the log line: "dpop", "mtls", "bearer", "anonymous", "refused:<reason>"
        "version",          # bytes: X-Service-Version, a strict version pin (docs/selection.md)
    )

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None


class HttpProtocol(asyncio.Protocol):
    def __init__(self, server):
        # -- per server (shared by every connection of this worker)
        self._server = server
        self._acct = server.accounting
        self._settings = server.http_settings
        self._handle = server.pipeline.handle

        # -- per connection
        self.transport = None
        self.peer_cert: bytes | None = None   # DER of the client certificate (mTLS)
        self.peername = None
        self.peer_ip = b""
        self.anonymous_key = "ip:"
        self._parser = None
        self._queue: deque[Request] = deque()
        self._current: Request | None = None
        self._out: list[bytes] | None = None  # set while data_received runs: coalesced writes
        self._closing = False
        self._reading_paused = False
        self._parse_broken = False
        self.deadline = 0.0
        self.deadline_kind = D_NONE
        self._write_paused = False
        self._on_writable = None       # producer to resume when the client drains
        self._chunked = False          # the response in flight is chunked
        self._stream_keep = False
        self._stream_status = 0

        # -- per request being parsed
        self._req: Request | None = None
        self._url = b""
        self._headers: list = []
        self._header_bytes = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._reject: tuple[int, str] | None = None
        self._upgrade = False
        self._upgrade_tail = b""

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport):
        self.transport = transport
        server = self._server
        if len(server.connections) >= self._settings.max_connections:
            # Over the cap: answer rather than leave the client hanging in the backlog.
            transport.write(self._render_error_close(503, "connection limit reached"))
            transport.close()
            self._closing = True
            return
        server.connections.add(self)
        server.metrics.connection_opened()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.peer_cert = ssl_object.getpeercert(binary_form=True)
        self.peername = peer = transport.get_extra_info("peername")
        # X-Forwarded-For of every request on this connection, encoded once, and the
        # rate-limit key of its anonymous requests (ratelimit.identity_key).
        self.peer_ip = peer[0].encode() if isinstance(peer, tuple) else b""
        self.anonymous_key = "ip:" + (peer[0] if isinstance(peer, tuple) else "")
        self._parser = server.new_parser(self)
        self._set_deadline(D_HEADER, self._settings.header_read_timeout)

    def connection_lost(self, exc):
        if self in self._server.connections:
            self._server.connections.discard(self)
            self._server.metrics.connection_closed()
        self._closing = True
        current, self._current = self._current, None
        self._queue.clear()
        if current is not None and current.pending is not None:
            # The client went away with a request in flight: CANCEL(ClientDisconnected).
            current.pending.abort()

    def data_received(self, data):
        if self._parse_broken or self._closing:
            return
        self._out = out = []
        try:
            self._parser.feed_data(data)
        except _Reject:
            self._fail_parse()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Reject) or self._reject is not None:
                self._fail_parse()
            else:
                self._server.log.event("error", "parser callback failed", error=repr(exc.__context__))
                self._fail_parse(500, "internal error while reading the request")
        except httptools.HttpParserUpgrade as exc:
            # llhttp stops at an upgrade; what follows is not HTTP/1.1 any more. Keep it
            # for the WebSocket protocol that may take the connection over.
            self._parse_broken = True
            self._upgrade_tail = bytes(data[exc.args[0]:]) if exc.args else b""
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            if self._req is not None:
                self._fail_parse(400, "protocol upgrade is not supported on this endpoint")
        except httptools.HttpParserError as exc:
            self._fail_parse(400, _parser_message(exc))
        self._pump()
        self._out = None
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self._closing and self.transport is not None and not self.transport.is_closing():
            if self._current is None:
                self.transport.close()

    def eof_received(self):
        # A client that closes with a request in flight has gone (browsers and proxies do
        # not half-close to wait for an answer): close, so the request is cancelled
        # upstream instead of finishing for nobody.
        return False

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self):
        self._req = _new_request(self)
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_size = 0
        self._reject = None
        self._upgrade = False
        if self._current is None:
            self.deadline_kind = D_HEADER
            self.deadline = self._server.now + self._settings.header_read_timeout

    def on_url(self, url: bytes):
        self._url += url
        if len(self._url) > self._settings.max_url_length:
            self._reject = (414, "request-target longer than %d bytes" % self._settings.max_url_length)
            raise _Reject

    def on_header(self, name: bytes, value: bytes):
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._settings.max_header_bytes:
            self._reject = (431, "request header block larger than %d bytes"
                            % self._settings.max_header_bytes)
            raise _Reject
        headers = self._headers
        headers.append((name.lower(), value))
        if len(headers) > self._settings.max_header_count:
            self._reject = (431, "more than %d request header fields" % self._settings.max_header_count)
            raise _Reject

    def on_headers_complete(self):
        req = self._req
        parser = self._parser
        req.method = parser.get_method().decode("ascii")
        req.http_version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        req.headers = headers = self._headers
        url = self._url
        if url[:1] != b"/":
            url = _origin_form(url)
            if url is None:
                self._reject = (400, "the request-target must be a path or an absolute URL")
                raise _Reject
        q = url.find(b"?")
        if q >= 0:
            req.target, req.query = url[:q], url[q + 1:]
        else:
            req.target, req.query = url, b""
        # One pass over the headers for everything the request path needs from them.
        limit = self._settings.max_request_body_size
        expect = cid = None
        for name, value in headers:
            if name == b"content-length":
                # llhttp (strict) already refused malformed and conflicting lengths.
                if int(value) > limit:
                    req.correlation_id = self._acct.correlation_id_of(cid)
                    self._reject = (413, "request body larger than %d bytes" % limit)
                    raise _Reject
            elif name == b"x-correlation-id":
                if cid is None:
                    cid = value
            elif name == b"x-service-version":
                if req.version is None:
                    req.version = value
            elif name == b"upgrade":
                self._upgrade = True
            elif name == b"expect":
                expect = value.lower()
        req.correlation_id = self._acct.correlation_id_of(cid)
        if self._upgrade and parser.should_upgrade():
            upgrade = req.header(b"upgrade") or b""
            if upgrade.lower() != b"websocket" or req.method != "GET":
                # h2c and anything else: we speak HTTP/1.1 and WebSocket only.
                self._reject = (400, "protocol upgrade is not supported on this endpoint")
                raise _Reject
            req.websocket = True
        if expect is not None:
            if expect != b"100-continue":
                self._reject = (417, "only 'Expect: 100-continue' is supported")
                raise _Reject
            if req.http_version == "1.1" and self._current is None and not self._queue:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.deadline_kind = D_BODY
        self.deadline = self._server.now + self._settings.header_read_timeout

    def on_body(self, body: bytes):
        self._body_size += len(body)
        if self._body_size > self._settings.max_request_body_size:
            self._reject = (413, "request body larger than %d bytes" % self._settings.max_request_body_size)
            raise _Reject
        self._body.append(body)
        # A body that keeps arriving is progress: push the slow-client deadline on.
        self.deadline = self._server.now + self._settings.header_read_timeout

    def on_message_complete(self):
        req = self._req
        self._req = None
        body = self._body
        req.body = body[0] if len(body) == 1 else b"".join(body)
        req.started = perf_counter()
        self.deadline_kind = D_NONE
        if self._current is None and not self._queue:
            self._current = req
            self._run(req)
        else:
            self._queue.append(req)
            if len(self._queue) >= PIPELINE_MAX and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()

    # ---------------------------------------------------------------- answering

    def _fail_parse(self, status: int | None = None, message: str | None = None):
        """The parser cannot go on: answer (in order) with an error, then close."""
        if status is None:
            status, message = self._reject
        self._parse_broken = True
        req = self._req or _new_request(self)
        self._req = None
        if not req.correlation_id:
            req.correlation_id = self._acct.correlation_id(self._headers)
        req.keep_alive = False
        req.started = perf_counter()
        req.reject = (status, message)
        self._queue.append(req)
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _pump(self):
        """Start the next queued request when nothing is in flight."""
        while self._current is None and self._queue and not self._closing:
            req = self._queue.popleft()
            self._current = req
            self._run(req)
        if (self._reading_paused and not self._parse_broken and not self._closing
                and len(self._queue) < PIPELINE_MAX // 2):
            self._reading_paused = False
            self.transport.resume_reading()

    def _run(self, req: Request):
        if req.reject is not None:
            status, message = req.reject
            self.respond(req, status, b"content-type: application/json\r\n",
                         error_body(status, message, req.correlation_id), close=True)
            return
        try:
            result = self._handle(req)
        except Exception as exc:  # a bug in a stage must not take the connection down silently
            self._server.log.event("error", "pipeline failed", correlationId=req.correlation_id,
                                   error=repr(exc))
            result = (500, b"content-type: application/json\r\n",
                      error_body(500, "internal error", req.correlation_id))
        if result is not None:
            self.respond(req, *result)

    def respond(self, req: Request, status: int, headers: bytes, body: bytes,
                close: bool = False) -> None:
        """Write the response for `req` (the request in flight); start the next one.

        `headers` is a preformatted block of "name: value\\r\\n" lines: stages build it once
        (built-ins keep it as a constant) and it is written as is.
        """
        if req is not self._current or self.transport is None:
            return  # the connection went away, or an answer came twice
        server = self._server
        keep = req.keep_alive and not close and not server.draining
        # RFC 9110 §8.6: no Content-Length on 304 (it would describe the unsent body).
        length = b"content-length: %d\r\n" % len(body) if status != 304 else b""
        out = [STATUS_LINES.get(status) or status_line(status), server.date_header, length,
               headers, req.resp_headers, b"x-correlation-id: ",
               req.correlation_id.encode("latin-1"), b"\r\n"]
        if not keep:
            out.append(b"connection: close\r\n")
        elif req.http_version == "1.0":
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        if req.method != "HEAD" and body:
            out.append(body)
        data = b"".join(out)
        if self._out is not None:
            self._out.append(data)
        else:
            self.transport.write(data)
        self._finish(req, status, keep)

    def _finish(self, req: Request, status: int, keep: bool) -> None:
        self._current = None
        # Request and Pending point at each other: unlinked here, both go when the last
        # reference does, instead of waiting for the cycle collector.
        req.pending = None
        self._acct.request_done(req, status)
        if not keep:
            self._closing = True
            self._queue.clear()
            if self._out is None:
                self.transport.close()
            return
        if self._out is None:
            # Answered from a callback (routed request): carry on with the queue here.
            self._pump()
        if self._current is None and not self._queue and self._req is None:
            self.deadline_kind = D_IDLE
            self.deadline = self._server.now + self._settings.keep_alive_timeout

    # ---------------------------------------------------------------- streamed responses

    def start_stream(self, req: Request, status: int, headers: bytes, on_writable) -> bool:
        """Write the head of a streamed response: chunked (HTTP/1.1) or close-delimited.

        `on_writable()` is called when a client that stopped taking data (pause_writing)
        can take more: the producer resumes then (flow control back to the service).
        """
        if req is not self._current or self.transport is None or self._closing:
            return False
        self._chunked = req.http_version == "1.1"
        self._stream_keep = self._chunked and req.keep_alive and not self._server.draining
        self._on_writable = on_writable
        framing = (b"transfer-encoding: chunked\r\n" if self._chunked else b"")
        if not self._stream_keep:
            framing += b"connection: close\r\n"
        self._stream_status = status
        self.transport.write(b"".join((
            status_line(status), self._server.date_header, headers, req.resp_headers, framing,
            b"x-correlation-id: ", req.correlation_id.encode("latin-1"), b"\r\n\r\n")))
        return True

    def stream_chunk(self, req: Request, data) -> bool:
        """Send one piece of a streamed body. False: stop producing until on_writable()."""
        if req is not self._current or self.transport is None or req.method == "HEAD":
            return not self._write_paused
        if not data:
            return not self._write_paused
        if self._chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.transport.write(data)
        return not self._write_paused

    def end_stream(self, req: Request) -> None:
        if req is not self._current or self.transport is None:
            return
        self._on_writable = None
        if self._chunked and req.method != "HEAD":
            self.transport.write(b"0\r\n\r\n")
        self._finish(req, self._stream_status, self._stream_keep)

    def abort_stream(self, req: Request) -> None:
        """The producer failed mid-body: the status is sent, so the only honest signal left
        is to cut the connection (a truncated chunked body is detectably incomplete)."""
        if req is not self._current:
            return
        self._on_writable = None
        self._current = None
        self._acct.request_done(req, 502)
        self.close()

    # ---------------------------------------------------------------- WebSocket

    def upgrade_to_websocket(self, req: Request, bridge) -> bool:
        """The service accepted the upgrade: picows takes the connection over."""
        if req is not self._current or self.transport is None or self._closing:
            return False
        from ..ingress.websocket import hand_over
        self._current = None
        self._closing = True            # this protocol is done with the connection
        self._server.connections.discard(self)
        self._server.metrics.connection_closed()
        self._acct.request_done(req, 101)
        hand_over(self, req, bridge, self._upgrade_tail)
        return True

    def pause_writing(self):
        self._write_paused = True

    def resume_writing(self):
        self._write_paused = False
        cb = self._on_writable
        if cb is not None:
            cb()

    def _render_error_close(self, status: int, message: str) -> bytes:
        body = error_body(status, message, self._acct.correlation_id(()))
        return b"".join((status_line(status), self._server.date_header,
                         b"content-type: ", JSON, b"\r\ncontent-length: %d\r\n" % len(body),
                         b"connection: close\r\n\r\n", body))

    # ---------------------------------------------------------------- deadlines

    def _set_deadline(self, kind: int, seconds: float):
        self.deadline_kind = kind
        self.deadline = self._server.now + seconds

    def check_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        if kind == D_NONE or now < self.deadline or self.transport is None:
            return
        self.deadline_kind = D_NONE
        if kind == D_IDLE or self._current is not None:
            if kind == D_IDLE:
                self.close()
            return
        # Slow headers or a stalled body (slowloris): 408, then close.
        if self._req is not None or kind == D_HEADER:
            self.transport.write(self._render_error_close(408, "request not received in time"))
        self.close()

    def close(self):
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def is_idle(self) -> bool:
        return self._current is None and not self._queue and self._req is None


def _new_request(conn) -> Request:
    req = Request()
    req.conn = conn
    req.method = "-"
    req.target = b""
    req.query = b""
    req.headers = ()
    req.body = b""
    req.http_version = "1.1"
    req.keep_alive = True
    req.correlation_id = ""
    req.started = 0.0
    req.reject = None
    req.service = ""
    req.route = ""
    req.tenant = None
    req.state = None
    req.pending = None
    req.identity = None
    req.resp_headers = b""
    req.span = None
    req.websocket = False
    req.auth = None
    req.version = None
    return req


def _origin_form(url: bytes) -> bytes | None:
    """absolute-form (RFC 9112 §3.2.2) → the path and query; servers must accept it."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    if parsed.schema not in (b"http", b"https"):
        return None
    path = parsed.path or b"/"
    return path + b"?" + parsed.query if parsed.query else path


def _parser_message(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    return "malformed HTTP request: " + text
