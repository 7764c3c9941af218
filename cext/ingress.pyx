# cython: language_level=3
"""The client-facing HTTP/1.1 protocol (compiled): httptools callbacks on a uvloop transport.

Compiled twin of stellagw/_py/ingress.py: the same behaviour line for line (the twin is the
easier one to read first), checked by running tests/test_ingress_protocol.py and the end to
end suites against both. It is compiled because every routed request runs through five or
more parser callbacks, the response head and the pipelining bookkeeping here: as Python
that was a fifth of the gateway's instructions per request (perf/callgrind_history.csv).

What changes against the twin is only how, never what:
* Request and HttpProtocol are extension types, so the protocol reads and writes their
  fields as C struct members; Python code (pipeline, auth, transport) still sees plain
  attributes.
* The limits of HttpLimits are copied into C fields once per connection.
* The response head is assembled in one buffer (one allocation, no format strings).
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.string cimport memcpy

import socket
from collections import deque
from time import perf_counter

import httptools

from stellagw.ingress.responses import JSON, STATUS_LINES, error_body, status_line
from stellagw.observe.metrics import Histogram

# How many parsed requests may wait behind the one in flight before we stop reading:
# bounds the memory one pipelining client can make us hold.
cdef enum:
    _PIPELINE_MAX = 16
    # Deadline kinds, checked by ServerState.tick() once a second (no timer per request).
    _D_NONE = 0
    _D_HEADER = 1
    _D_BODY = 2
    _D_IDLE = 3

PIPELINE_MAX = _PIPELINE_MAX
D_NONE, D_HEADER, D_BODY, D_IDLE = _D_NONE, _D_HEADER, _D_BODY, _D_IDLE

cdef object _HttpParserCallbackError = httptools.HttpParserCallbackError
cdef object _HttpParserUpgrade = httptools.HttpParserUpgrade
cdef object _HttpParserError = httptools.HttpParserError
cdef dict _STATUS_LINES = STATUS_LINES
cdef object _perf_counter = perf_counter
cdef bytes _JSON_CT = b"content-type: application/json\r\n"


cdef frozenset _CID_OK = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


@cython.final
cdef class Accounting:
    """One worker's correlation ids, and what every finished request leaves behind: its
    count and duration in the metrics, its access log line, the end of its span."""

    cdef public str cid_prefix
    cdef public unsigned long long cid_counter
    cdef object _worker, _metrics, _log

    def __init__(self, worker, str cid_prefix):
        self.cid_prefix = cid_prefix
        self._worker = worker
        self._metrics = worker.metrics
        self._log = worker.log

    def correlation_id(self, headers):
        for name, value in headers:
            if name == b"x-correlation-id":
                return self.correlation_id_of(value)
        return self.correlation_id_of(None)

    cpdef str correlation_id_of(self, value):
        """The client's X-Correlation-Id when well formed (≤ 64 of [A-Za-z0-9._-]), else ours."""
        if value is not None and 0 < len(value) <= 64 and _CID_OK.issuperset(value):
            return (<bytes>value).decode("ascii")
        self.cid_counter += 1
        return "%s%010x" % (self.cid_prefix, self.cid_counter)

    cpdef request_done(self, Request req, int status):
        cdef double elapsed = _perf_counter() - req.started
        if req.span is not None:
            self._worker.tracing.end_route(req, status)
        m = self._metrics
        key = (req.service, req.method, req.route, status)
        cdef dict requests = m.requests
        requests[key] = requests.get(key, 0) + 1
        hist_key = (req.service, req.method, req.route)
        cdef dict durations = m.durations
        hist = durations.get(hist_key)
        if hist is None:
            hist = durations[hist_key] = Histogram()
        hist.observe(elapsed)
        log = self._log
        if log.access_log:
            log.request(req.correlation_id, req.tenant, req.method,
                        req.target.decode("utf-8", "replace"), req.service,
                        elapsed * 1000.0, status, req.auth)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is in `protocol._reject`."""


@cython.final
@cython.freelist(64)
cdef class Request:
    """One parsed HTTP request: made once per request, read by every stage."""

    cdef public object conn             # the HttpProtocol it came on
    cdef public object method           # str, upper case as sent ("GET")
    cdef public object target           # bytes, the raw request-target path (before '?')
    cdef public object query            # bytes, after '?', without it
    cdef public object headers          # list[(bytes lowercase name, bytes value)] as received
    cdef public object body             # bytes
    cdef public object http_version     # "1.1" or "1.0"
    cdef public bint keep_alive         # what the client asked for
    cdef public object correlation_id   # str: taken from X-Correlation-Id or made
    cdef public double started          # perf_counter() at message complete
    cdef public object reject           # (status, message) when answered with an error
    cdef public object service          # str: service label for metrics/logs ("" for built-ins)
    cdef public object route            # str: the path label for metrics (template, never the raw path)
    cdef public object tenant           # str | None, set by authentication
    cdef public object state            # per-request scratch for pipeline stages (None until used)
    cdef public object pending          # the dispatch waiting for the service (has .abort()), or None
    cdef public object identity         # auth.Identity once authenticated (anonymous included)
    cdef public object resp_headers     # bytes: header lines stages add to the response
    cdef public object span             # the gateway.route span when tracing is on
    cdef public bint websocket          # a WebSocket upgrade request (GET, Upgrade: websocket)
    cdef public object auth             # str for the log line: "dpop", "mtls", "bearer", ...
    cdef public object version          # bytes: X-Service-Version, a strict version pin

    def header(self, bytes name):
        for n, v in self.headers:
            if n == name:
                return v
        return None


cdef Request _new_request(conn):
    cdef Request req = Request.__new__(Request)
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
    req.service = ""
    req.route = ""
    req.resp_headers = b""
    # reject, tenant, state, pending, identity, span, auth, version: None; websocket: False
    return req


@cython.final
cdef class HttpProtocol:
    # -- read by other parts of the gateway
    cdef public object transport
    cdef public object peer_cert        # DER of the client certificate (mTLS)
    cdef public object peername
    cdef public bytes peer_ip           # X-Forwarded-For of every request on this connection
    cdef public str anonymous_key       # rate-limit key of its anonymous requests
    cdef public double deadline
    cdef public int deadline_kind

    # -- per server (shared by every connection of this worker)
    cdef object _server
    cdef Accounting _acct
    cdef object _settings
    cdef object _handle
    cdef Py_ssize_t _max_url, _max_header_bytes, _max_header_count, _max_body
    cdef double _header_timeout, _keep_alive_timeout

    # -- per connection
    cdef object _parser
    cdef object _queue                  # deque[Request]
    cdef Request _current
    cdef list _out                      # set while data_received runs: coalesced writes
    cdef bint _closing, _reading_paused, _parse_broken, _write_paused
    cdef object _on_writable            # producer to resume when the client drains
    cdef bint _chunked, _stream_keep    # the streamed response in flight
    cdef int _stream_status

    # -- per request being parsed
    cdef Request _req
    cdef bytes _url
    cdef list _headers
    cdef Py_ssize_t _header_bytes
    cdef list _body
    cdef Py_ssize_t _body_size
    cdef object _reject                 # (status, message) or None
    cdef bint _upgrade
    cdef bytes _upgrade_tail

    def __init__(self, server):
        self._server = server
        self._acct = server.accounting
        settings = self._settings = server.http_settings
        self._handle = server.pipeline.handle
        self._max_url = settings.max_url_length
        self._max_header_bytes = settings.max_header_bytes
        self._max_header_count = settings.max_header_count
        self._max_body = settings.max_request_body_size
        self._header_timeout = settings.header_read_timeout
        self._keep_alive_timeout = settings.keep_alive_timeout

        self.peer_ip = b""
        self.anonymous_key = "ip:"
        self._queue = deque()
        self._url = b""
        self._headers = []
        self._body = []
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
        self.peer_ip = peer[0].encode() if isinstance(peer, tuple) else b""
        self.anonymous_key = "ip:" + (peer[0] if isinstance(peer, tuple) else "")
        self._parser = server.new_parser(self)
        self._set_deadline(_D_HEADER, self._header_timeout)

    def connection_lost(self, exc):
        server = self._server
        if self in server.connections:
            server.connections.discard(self)
            server.metrics.connection_closed()
        self._closing = True
        current = self._current
        self._current = None
        self._queue.clear()
        if current is not None and current.pending is not None:
            # The client went away with a request in flight: CANCEL(ClientDisconnected).
            current.pending.abort()

    def data_received(self, data):
        if self._parse_broken or self._closing:
            return
        cdef list out = []
        self._out = out
        try:
            self._parser.feed_data(data)
        except _Reject:
            self._fail_parse(0, None)
        except _HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Reject) or self._reject is not None:
                self._fail_parse(0, None)
            else:
                self._server.log.event("error", "parser callback failed", error=repr(exc.__context__))
                self._fail_parse(500, "internal error while reading the request")
        except _HttpParserUpgrade as exc:
            # llhttp stops at an upgrade; what follows is not HTTP/1.1 any more. Keep it
            # for the WebSocket protocol that may take the connection over.
            self._parse_broken = True
            self._upgrade_tail = bytes(data[exc.args[0]:]) if exc.args else b""
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()
            if self._req is not None:
                self._fail_parse(400, "protocol upgrade is not supported on this endpoint")
        except _HttpParserError as exc:
            self._fail_parse(400, _parser_message(exc))
        self._pump()
        self._out = None
        if out:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])
        if self._closing and self.transport is not None and not self.transport.is_closing():
            if self._current is None:
                self.transport.close()

    def eof_received(self):
        # A client that closes with a request in flight has gone: close, so the request is
        # cancelled upstream instead of finishing for nobody.
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
            self.deadline_kind = _D_HEADER
            self.deadline = self._server.now + self._header_timeout

    def on_url(self, bytes url):
        self._url = self._url + url if self._url else url
        if PyBytes_GET_SIZE(self._url) > self._max_url:
            self._reject = (414, "request-target longer than %d bytes" % self._max_url)
            raise _Reject

    def on_header(self, bytes name, bytes value):
        self._header_bytes += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
        if self._header_bytes > self._max_header_bytes:
            self._reject = (431, "request header block larger than %d bytes"
                            % self._max_header_bytes)
            raise _Reject
        cdef list headers = self._headers
        headers.append((_lower(name), value))
        if len(headers) > self._max_header_count:
            self._reject = (431, "more than %d request header fields" % self._max_header_count)
            raise _Reject

    def on_headers_complete(self):
        cdef Request req = self._req
        cdef bytes url = self._url
        cdef Py_ssize_t q
        parser = self._parser
        req.method = parser.get_method().decode("ascii")
        req.http_version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        cdef list headers = self._headers
        req.headers = headers
        if url[:1] != b"/":
            url = _origin_form(url)
            if url is None:
                self._reject = (400, "the request-target must be a path or an absolute URL")
                raise _Reject
        q = url.find(b"?")
        if q >= 0:
            req.target = url[:q]
            req.query = url[q + 1:]
        else:
            req.target = url
            req.query = b""
        # One pass over the headers for everything the request path needs from them.
        cdef Py_ssize_t limit = self._max_body
        cdef bytes name
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
        self.deadline_kind = _D_BODY
        self.deadline = self._server.now + self._header_timeout

    def on_body(self, bytes body):
        self._body_size += PyBytes_GET_SIZE(body)
        if self._body_size > self._max_body:
            self._reject = (413, "request body larger than %d bytes" % self._max_body)
            raise _Reject
        self._body.append(body)
        # A body that keeps arriving is progress: push the slow-client deadline on.
        self.deadline = self._server.now + self._header_timeout

    def on_message_complete(self):
        cdef Request req = self._req
        self._req = None
        cdef list body = self._body
        req.body = body[0] if len(body) == 1 else b"".join(body)
        req.started = _perf_counter()
        self.deadline_kind = _D_NONE
        if self._current is None and not self._queue:
            self._current = req
            self._run(req)
        else:
            self._queue.append(req)
            if len(self._queue) >= _PIPELINE_MAX and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()

    # ---------------------------------------------------------------- answering

    cdef _fail_parse(self, int status, message):
        """The parser cannot go on: answer (in order) with an error, then close."""
        if status == 0:
            status, message = self._reject
        self._parse_broken = True
        cdef Request req = self._req if self._req is not None else _new_request(self)
        self._req = None
        if not req.correlation_id:
            req.correlation_id = self._acct.correlation_id(self._headers)
        req.keep_alive = False
        req.started = _perf_counter()
        req.reject = (status, message)
        self._queue.append(req)
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    cdef _pump(self):
        """Start the next queued request when nothing is in flight."""
        cdef Request req
        while self._current is None and self._queue and not self._closing:
            req = self._queue.popleft()
            self._current = req
            self._run(req)
        if (self._reading_paused and not self._parse_broken and not self._closing
                and len(self._queue) < _PIPELINE_MAX // 2):
            self._reading_paused = False
            self.transport.resume_reading()

    cdef _run(self, Request req):
        if req.reject is not None:
            status, message = req.reject
            self.respond(req, status, _JSON_CT,
                         error_body(status, message, req.correlation_id), True)
            return
        try:
            result = self._handle(req)
        except Exception as exc:  # a bug in a stage must not take the connection down silently
            self._server.log.event("error", "pipeline failed", correlationId=req.correlation_id,
                                   error=repr(exc))
            result = (500, _JSON_CT, error_body(500, "internal error", req.correlation_id))
        if result is not None:
            if len(result) == 3:
                self.respond(req, result[0], result[1], result[2])
            else:
                self.respond(req, *result)

    cpdef respond(self, Request req, int status, headers, body, bint close=False):
        """Write the response for `req` (the request in flight); start the next one.

        `headers` is a preformatted block of "name: value\\r\\n" lines: stages build it once
        (built-ins keep it as a constant) and it is written as is.
        """
        if req is not self._current or self.transport is None:
            return  # the connection went away, or an answer came twice
        if type(body) is not bytes:
            body = bytes(body)
        if type(headers) is not bytes:
            headers = bytes(headers)
        server = self._server
        cdef bint keep = req.keep_alive and not close and not server.draining
        line = _STATUS_LINES.get(status)
        if line is None:
            line = status_line(status)
        cdef bytes connection
        if not keep:
            connection = b"connection: close\r\n"
        elif req.http_version == "1.0":
            connection = b"connection: keep-alive\r\n"
        else:
            connection = b""
        data = _render(<bytes>line, <bytes>server.date_header,
                       PyBytes_GET_SIZE(body) if status != 304 else -1,
                       <bytes>headers, <bytes>req.resp_headers,
                       (<str>req.correlation_id).encode("latin-1"), connection,
                       <bytes>body if req.method != "HEAD" else b"")
        if self._out is not None:
            self._out.append(data)
        else:
            self.transport.write(data)
        self._finish(req, status, keep)

    cdef _finish(self, Request req, int status, bint keep):
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
            self.deadline_kind = _D_IDLE
            self.deadline = self._server.now + self._keep_alive_timeout

    # ---------------------------------------------------------------- streamed responses

    def start_stream(self, Request req, int status, bytes headers, on_writable):
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

    def stream_chunk(self, Request req, data):
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

    def end_stream(self, Request req):
        if req is not self._current or self.transport is None:
            return
        self._on_writable = None
        if self._chunked and req.method != "HEAD":
            self.transport.write(b"0\r\n\r\n")
        self._finish(req, self._stream_status, self._stream_keep)

    def abort_stream(self, Request req):
        """The producer failed mid-body: the status is sent, so the only honest signal left
        is to cut the connection (a truncated chunked body is detectably incomplete)."""
        if req is not self._current:
            return
        self._on_writable = None
        self._current = None
        self._acct.request_done(req, 502)
        self.close()

    # ---------------------------------------------------------------- WebSocket

    def upgrade_to_websocket(self, Request req, bridge):
        """The service accepted the upgrade: picows takes the connection over."""
        if req is not self._current or self.transport is None or self._closing:
            return False
        from stellagw.ingress.websocket import hand_over
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

    cdef bytes _render_error_close(self, int status, str message):
        body = error_body(status, message, self._acct.correlation_id(()))
        return b"".join((status_line(status), self._server.date_header,
                         b"content-type: ", JSON, b"\r\ncontent-length: %d\r\n" % len(body),
                         b"connection: close\r\n\r\n", body))

    # ---------------------------------------------------------------- deadlines

    cdef _set_deadline(self, int kind, double seconds):
        self.deadline_kind = kind
        self.deadline = self._server.now + seconds

    def check_deadline(self, double now):
        cdef int kind = self.deadline_kind
        if kind == _D_NONE or now < self.deadline or self.transport is None:
            return
        self.deadline_kind = _D_NONE
        if kind == _D_IDLE or self._current is not None:
            if kind == _D_IDLE:
                self.close()
            return
        # Slow headers or a stalled body (slowloris): 408, then close.
        if self._req is not None or kind == _D_HEADER:
            self.transport.write(self._render_error_close(408, "request not received in time"))
        self.close()

    def close(self):
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def is_idle(self):
        return self._current is None and not self._queue and self._req is None


cdef bytes _lower(bytes name):
    # Header names arrive mostly capitalised ("Host"); bytes.lower() would be a method call.
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(name)
    cdef const unsigned char* s = <const unsigned char*>PyBytes_AS_STRING(name)
    for i in range(n):
        if 65 <= s[i] <= 90:
            break
    else:
        return name
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* d = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char c
    for i in range(n):
        c = s[i]
        d[i] = c + 32 if 65 <= c <= 90 else c
    return out


cdef inline char* _put(char* p, bytes part):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(part)
    memcpy(p, PyBytes_AS_STRING(part), n)
    return p + n


cdef bytes _render(bytes line, bytes date, Py_ssize_t length, bytes headers, bytes extra,
                   bytes cid, bytes connection, bytes body):
    """status line, date, content-length (unless length < 0: a 304), the stages' headers,
    the correlation id, connection, blank line, body: one allocation, one copy of each."""
    cdef char cl[48]
    cdef int cl_n = 0
    if length >= 0:
        cl_n = snprintf(cl, sizeof(cl), "content-length: %zd\r\n", length)
    cdef Py_ssize_t total = (PyBytes_GET_SIZE(line) + PyBytes_GET_SIZE(date) + cl_n
                             + PyBytes_GET_SIZE(headers) + PyBytes_GET_SIZE(extra)
                             + 18 + PyBytes_GET_SIZE(cid) + 2 + PyBytes_GET_SIZE(connection)
                             + 2 + PyBytes_GET_SIZE(body))
    cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
    cdef char* p = PyBytes_AS_STRING(out)
    p = _put(p, line)
    p = _put(p, date)
    memcpy(p, cl, cl_n)
    p += cl_n
    p = _put(p, headers)
    p = _put(p, extra)
    memcpy(p, b"x-correlation-id: ", 18)
    p += 18
    p = _put(p, cid)
    memcpy(p, b"\r\n", 2)
    p += 2
    p = _put(p, connection)
    memcpy(p, b"\r\n", 2)
    p += 2
    _put(p, body)
    return out


def _origin_form(bytes url):
    """absolute-form (RFC 9112 §3.2.2) → the path and query; servers must accept it."""
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None
    if parsed.schema not in (b"http", b"https"):
        return None
    path = parsed.path or b"/"
    return path + b"?" + parsed.query if parsed.query else path


def _parser_message(exc):
    text = str(exc) or exc.__class__.__name__
    return "malformed HTTP request: " + text
