# cython: infer_types=True
"""The client-facing HTTP/1.1 protocol: httptools callbacks on a uvloop transport.

One HttpProtocol per client connection. Every request is judged on its head: the rules of
docs/http-edge.md (version, Host, framing, Expect, Upgrade) in on_headers_complete, then
the pipeline (match, authenticate, authorise, rate-limit, select) before any body byte is
taken. A body then streams to the service as it arrives (docs/protocol.md §5.3), the client
socket paused while the service has not given credit, so what one upload holds is bounded
by the stream window, never by the body. Requests are answered strictly in arrival order
(pipelining): at once (built-ins, refusals) or later through `respond()`.

Error policy: malformed HTTP or a broken limit → a JSON error answer and the connection
closed after it (with a short lingering read, so the client gets the answer before a
reset); nothing raised out of `data_received`.

This one source runs compiled (Cython, typed through http.pxd; docs/hot-path.md) and as
plain Python (STELLAGW_NO_EXTENSIONS=1).
"""
import asyncio
import socket
from collections import deque
from functools import partial

import httptools

from ..listeners import SendDeadline, peer_closed, reset
from ..observe import metrics as observe_metrics
from ..observe.logs import MAX_LINE
from ..observe.metrics import perf_counter
from ..replies import JSON, STATUS_LINES, error_body, status_line
from .compress import accepts_gzip, gzipped
from .proxy import ProxyError, anonymous_key, client_key, parse_proxy_header
from .wire import (TE_CHUNKED, TE_OTHER, cid_made, cid_taken, header_name, host_ok,
                   method_name, render_response, split_target, transfer_coding)

try:
    import cython       # compiled, Cython reads the decorators that use it
except ImportError:     # uncompiled without Cython installed: they do nothing
    from .. import _cython_shadow as cython

# How many parsed requests may wait behind the one in flight before we stop reading:
# bounds the memory one pipelining client can make us hold.
_PIPELINE_MAX = 16
PIPELINE_MAX = _PIPELINE_MAX
# A read is parsed at most this much at a time, and not further once PIPELINE_MAX
# requests wait: the rest stays unparsed until they are served. One read (uvloop's are up
# to 256 KiB) was parsed whole, so one of tiny pipelined GETs queued ~4,600 requests
# (2.8 MB) behind one the service had not answered, before any was authorised: 100
# connections from one address held 280 MB (docs/security.md §3d, "pipelined reads").
_FEED_SLICE = 4096
# And the heads parsed and waiting on a connection hold at most about this many bytes
# (request lines and header blocks): 16 heads of maxHeaderBytes each were 256 KB or more
# a connection before any was authorised.
_PIPELINE_BYTES = 32 * 1024

# Deadline kinds, checked by Worker._tick() once a second (no timer per request).
_D_NONE = 0
_D_HEADER = 1
_D_BODY = 2
_D_IDLE = 3
_D_LINGER = 4
D_NONE, D_HEADER, D_BODY, D_IDLE, D_LINGER = _D_NONE, _D_HEADER, _D_BODY, _D_IDLE, _D_LINGER

# Why reading is paused (a bit each; reading resumes when none is left).
_P_PIPELINE = 1     # PIPELINE_MAX requests wait
_P_HOLD = 2         # a request with a body is not decided yet: none of its body is taken
_P_FLOW = 4         # the service has not given credit for more of the body
_P_STOP = 8         # the connection is being closed; only a lingering read drains it
_P_WRITE = 16       # the client is not reading what we write (the transport's buffer is full)
# Held for the gateway's sake, not the client's: a head's deadline stops meanwhile.
_P_OURS = _P_PIPELINE | _P_WRITE

# Body state of a request
_B_NONE = 0         # no body, or all of it received
_B_OPEN = 1         # more body bytes are expected
B_NONE, B_OPEN = _B_NONE, _B_OPEN

# request_done's label cache: cleared when past this many route labels (templates come and
# go with services; the metrics' own dicts keep every label set anyway).
_MAX_CELLS = 4096

# After a refusal with the client still sending: read and discard this long / this much,
# so the answer reaches the client before the close turns into a reset.
LINGER_SECONDS = 2.0
# The status logged and counted for a request whose client left (or reset) before any of
# its answer was sent: nginx's "client closed request"; for one the gateway closed the
# connection on without an answer (behind an answer that closed it, at the drain's
# deadline), nginx's 444 (docs/operations.md, Logs).
CLIENT_CLOSED = 499
CLOSED_UNANSWERED = 444
_AFTER_CLOSE = "Data after `Connection: close`"     # llhttp's HPE_CLOSED_CONNECTION
_LINGER_BYTES = 1 << 20

_JSON_CT = b"content-type: application/json\r\n"
_CLOSE = b"connection: close\r\n"
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The http_version of nearly every request, one object: transport/connection.py tells it by
# identity before comparing.
HTTP11 = "1.1"
_STATUS_LINES = STATUS_LINES     # typed (http.pxd): a dict lookup per answer, not a method call


def _eq(a, b):
    # Compiled, `str == str` is PyUnicode_Compare, a full ordering of ~100 instructions even
    # when the lengths differ, as they do in most comparisons on the request path.
    return a is b or (len(a) == len(b) and a == b)


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is in `protocol._reject`."""


class _Stop(Exception):
    """Raised inside a parser callback when the connection is done: parse nothing more."""


class EdgeState:
    """What the worker changes and every client connection reads per request: the tick's
    clock (`now`, monotonic: deadlines are set from it), the Date line, and whether the
    worker drains. One per worker (Worker.edge; its now, date_header and draining are
    these); a connection holds it typed, so each read is a C field, not an attribute
    lookup on the worker."""

    def __init__(self, now):
        self.now = now
        self.date_header = b""
        self.draining = False


class _Count:
    """Requests of one (service, method, route, status) not yet in the metrics' counts."""

    __slots__ = ("key", "n")

    def __init__(self, key):
        self.key = key      # the metrics' requests key
        self.n = 0


class _Cell:
    """One (service, method, route) label set: its duration histogram (in the metrics'
    durations dict, which the cell keeps to notice a new one) and a _Count per status."""

    __slots__ = ("service", "durations", "hist", "counts")

    def __init__(self, service, durations, hist):
        self.service = service
        self.durations = durations
        self.hist = hist
        self.counts = {}


class Accounting:
    """One worker's correlation ids, and what every finished request leaves behind: its
    count and duration in the metrics, its access log line, the end of its span."""

    def __init__(self, worker, cid_prefix):
        self.cid_prefix = cid_prefix
        self.cid_counter = 0
        self._worker = worker
        self._metrics = worker.metrics
        self._log = worker.log
        self._cells = {}    # route label -> method -> _Cell; see request_done
        # The last request's label set and count: a run of requests to one route with one
        # status (what a busy route sees) finds its count without a dict lookup.
        self._last_route = self._last_method = None
        self._last_status = 0
        self._last_cell = None
        self._last_count = None
        # Counts with requests the metrics do not have yet: added to them before each
        # snapshot (Metrics.folds), so what is published and scraped is exact.
        self._unfolded = []
        worker.metrics.folds.append(self.fold)

    def _cell(self, service, method, route):
        durations = self._metrics.durations
        hist_key = observe_metrics.duration_key(durations, (service, method, route))
        hist = durations.get(hist_key)
        if hist is None:
            hist = durations[hist_key] = observe_metrics.Histogram()
        return _Cell(service, durations, hist)

    def fold(self):
        """Add the requests counted since the last fold to the metrics' counts."""
        requests = self._metrics.requests
        for count in self._unfolded:
            requests[count.key] = requests.get(count.key, 0) + count.n
            count.n = 0
        self._unfolded = []

    def correlation_id(self, headers):
        for name, value in headers:
            if name == b"x-correlation-id":
                return self.correlation_id_of(value)
        return self.correlation_id_of(None)

    def correlation_id_of(self, value):
        """The client's X-Correlation-Id when well formed (≤ 64 of [A-Za-z0-9._-]), else ours."""
        cid = cid_taken(value)
        if cid is not None:
            return cid
        self.cid_counter += 1
        return cid_made(self.cid_prefix, self.cid_counter)

    def request_done(self, req, status):
        elapsed = perf_counter() - req.started
        if req.span is not None:
            self._worker.tracing.end_route(req, status)
        # The label sets' cells, found again by the label strings themselves (each the same
        # str object from request to request, its hash cached): the metrics' tuple keys,
        # built and hashed per request, cost more than the counting. The count is a C
        # integer until a snapshot folds it in.
        cell = self._last_cell
        count = self._last_count
        # (The metrics' durations dict is never replaced once made: observe/metrics.py.)
        if (req.route is not self._last_route or req.method is not self._last_method
                or status != self._last_status or cell is None
                or req.service is not cell.service):
            by_method = self._cells.get(req.route)
            if by_method is None:
                if len(self._cells) >= _MAX_CELLS:
                    self._cells.clear()     # what _unfolded holds is folded all the same
                by_method = self._cells[req.route] = {}
            cell = by_method.get(req.method)
            if (cell is None or cell.service != req.service
                    or cell.durations is not self._metrics.durations):
                cell = by_method[req.method] = self._cell(req.service, req.method, req.route)
            count = cell.counts.get(status)
            if count is None:
                # Bounded: past MAX_REQUEST_LABELS a new label set counts as _other.
                count = cell.counts[status] = _Count(observe_metrics.request_key(
                    self._metrics.requests, (req.service, req.method, req.route, status)))
            self._last_route = req.route
            self._last_method = req.method
            self._last_status = status
            self._last_cell = cell
            self._last_count = count
        if not count.n:
            self._unfolded.append(count)
        count.n += 1
        cell.hist.observe(elapsed)
        log = self._log
        if log.access_log:
            self._log_line(req, status, elapsed)

    def _log_line(self, req, status, elapsed):
        agent = None
        for name, value in req.headers:
            if name == b"user-agent":
                # Bytes past ASCII stay visible, but never as raw C1 controls: NEL (0x85)
                # ends a line for Unicode-aware log tools (an adversarial probe). Replaced
                # as bytes, one C scan per control present, in no more than a log line can
                # hold (the line is clipped to 4096 bytes, and marked, in observe/logs.py):
                # str.translate with a dict cost 70 ns a character, 840 µs a request for a
                # 12 KB agent of C1 bytes (another probe).
                if not value.isascii():
                    if len(value) > MAX_LINE:
                        value = value[:MAX_LINE]
                    for c1, escaped in _C1_ESCAPES:
                        if c1 in value:
                            value = value.replace(c1, escaped)
                agent = value.decode("latin-1")
                break
        upstream = req.upstream
        timings = {"auth": round(req.auth_s * 1000.0, 3),
                   "routing": round(req.route_s * 1000.0, 3)}
        if upstream is not None:
            timings["upstream"] = round(req.upstream_s * 1000.0, 3)
        self._log.request(req.correlation_id, req.tenant, req.method,
                          req.target.decode("utf-8", "replace"), req.service,
                          elapsed * 1000.0, status, req.auth,
                          client=req.client_ip.decode("latin-1"), userAgent=agent,
                          bytesIn=req.body_size, bytesOut=req.bytes_out,
                          upstream=upstream.instance_id if upstream is not None else None,
                          version=upstream.version if upstream is not None else None,
                          timings=timings)


# The freelist is set here: Cython (3.3) drops one declared in the .pxd when it reads this
# class (pure-Python mode), so Request was malloc'd and freed per request (~150 instructions).
@cython.freelist(64)
@cython.cclass
class Request:
    """One parsed HTTP request: made once per request, read by every stage.

    conn            the HttpProtocol it came on
    method          str, upper case as sent ("GET")
    target          bytes, the request-target path (before '?')
    query           bytes, after '?', without it
    headers         list[(bytes lowercase name, bytes value)] of the header section
                    (never a trailer field)
    host            bytes, the validated authority (Host, or an absolute-form target's)
    body            bytes: the whole body when it came before dispatch, else b""
    content_length  -1 chunked, else the Content-Length (0: none)
    body_state      _B_OPEN while body bytes are still to come
    body_limit      largest body accepted (the endpoint's, or routing.maxRequestBodySize)
    body_size       body bytes received so far
    held            body chunks received before the request was dispatched (bounded by
                    one read: reading is paused until then)
    expect_continue the client waits for `100 Continue` before sending its body
    http_version    "1.1" or "1.0"
    keep_alive      what the client asked for
    correlation_id  str: taken from X-Correlation-Id or made
    started         perf_counter() when the head was complete
    reject          (status, message) when the request is answered with an error
    service, route  labels for metrics and logs ("" for built-ins; a template, never the
                    raw path)
    tenant          str | None, set by authentication
    pending         the dispatch waiting for the service (has .abort()), or None
    identity        auth.Identity once authenticated (anonymous included)
    resp_headers    bytes: header lines stages add to the response (rate limits, nonce)
    span            the gateway.route span when tracing is on
    websocket       a WebSocket upgrade request (GET, Upgrade: websocket)
    auth            str for the log line: "dpop", "mtls", "bearer", "anonymous", "refused:…"
    version         bytes: X-Service-Version, a strict version pin (docs/selection.md)
    bytes_out       response body bytes written (the access log)
    upstream        the service Instance it was sent to, or None
    auth_s, route_s, upstream_s
                    seconds in authentication, in routing (match, rate limit, selection),
                    and from the REQUEST frame to the service's answer
    routed          the routing Route it matched (a retry selects again from it)
    retried         it was sent to a second instance already (never a third)
    client_ip       bytes: the client's address (the connection's, or what a trusted proxy's
                    X-Forwarded-For / Forwarded says): X-Forwarded-For to the service, the
                    anonymous rate-limit key, the access log
    done            answered (or its client gone): nothing more is sent for it
    """

    def header(self, name):
        for n, v in self.headers:
            if n == name:
                return v
        return None


def _new_request(conn):
    req = Request.__new__(Request)
    req.conn = conn
    req.method = "-"
    req.target = b""
    req.query = b""
    req.headers = ()
    req.host = None
    req.body = b""
    req.content_length = 0
    req.body_state = _B_NONE
    req.body_limit = 0
    req.head_size = 0
    req.body_size = 0
    req.held = None
    req.expect_continue = False
    req.http_version = HTTP11
    req.keep_alive = True
    req.correlation_id = ""
    req.started = 0.0
    req.reject = None
    req.service = ""
    req.route = ""
    req.tenant = None
    req.pending = None
    req.identity = None
    req.resp_headers = b""
    req.span = None
    req.websocket = False
    req.auth = None
    req.version = None
    req.done = False
    req.client_ip = b""
    req.routed = None
    req.retried = False
    req.bytes_out = 0
    req.upstream = None
    req.auth_s = 0.0
    req.route_s = 0.0
    req.upstream_s = 0.0
    return req


class HttpProtocol:
    def __init__(self, server):
        # -- per server (shared by every connection of this worker)
        self._server = server
        self._edge = server.edge
        self._acct = server.accounting
        settings = self._settings = server.http_settings
        self._handle = server.pipeline.handle
        self._max_url = settings.max_url_length
        self._max_header_bytes = settings.max_header_bytes
        self._max_header_count = settings.max_header_count
        self._max_body = settings.max_request_body_size
        self._header_timeout = settings.header_read_timeout
        self._keep_alive_timeout = settings.keep_alive_timeout
        self._body_timeout = settings.body_read_timeout
        self._body_window_bytes = int(settings.min_body_rate * settings.body_read_timeout)

        # -- per connection
        self.transport = None
        self._transport_write = None
        self.peer_cert = None            # DER of the client certificate (mTLS)
        self.peername = None
        self.peer_ip = b""               # the client's address: the TCP peer, or PROXY's source
        self.anonymous_key = "ip:"       # rate-limit key of its anonymous requests
        self._trust = server.trusted_proxies    # TrustedProxies, or None
        self._trusted = False            # the peer is a trusted proxy: its X-Forwarded-For counts
        self._proxy_mode = settings.proxy_protocol
        self._client_key = None          # the address counted for maxConnectionsPerClient
        self._request_id = settings.request_id_header     # a lowercase name, or b""
        self._gzip = server.compression    # gateway.compression (Compression), or None
        self._proxy_buf = None           # bytes, while the PROXY header is still arriving
        self.proxied = None              # str: the PROXY source read before TLS ("": LOCAL)
        self._peer_text = ""             # peer_ip as text
        self.deadline = 0.0
        self.deadline_kind = _D_NONE
        # Checked while it owes reading (sendTimeout, minSendRate)
        self._send = SendDeadline(settings.send_timeout, settings.min_send_rate)
        self._set_parser(None)
        self._queue = deque()
        self._current = None
        self._out = None                 # set while data_received runs: coalesced writes
        self._closing = False
        self._paused = 0
        self._held_at = 0.0
        self._parse_broken = False
        self._write_paused = False
        self._on_writable = None         # producer to resume when the client drains
        self._chunked = False            # the streamed response in flight is chunked
        self._stream_keep = False
        self._stream_drop = False        # its body is not sent (HEAD, 204, 205, 304)
        self._stream_status = 0
        self._streaming = False          # a streamed response's head has been written
        self._requests = 0               # requests begun on this connection
        self._lingering = 0              # bytes discarded since the lingering read began
        self._writing = 0                # the size of the last write (buffered())
        self._unparsed = None            # what _feed left of a read while the pipeline is full
        self._unparsed_scheduled = False

        # -- per request being parsed
        self._req = None
        self._in_body = False            # _req's header section is complete
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._reject = None
        self._rate_bytes = 0             # body bytes in the current minimum-rate window
        # Body pieces of the read being parsed, for the service: handed over together once
        # llhttp is done with the read (_flush_body), so a client sending one-byte chunks
        # does not make the gateway write a frame (21 bytes of header) per byte.
        self._body_out = []
        # What llhttp reads without telling us (chunk extensions, whitespace around field
        # values) is bounded too: every read, the bytes no callback accounted for are taken
        # from a budget of maxHeaderBytes, topped up a little per request and per chunk.
        self._seen = 0                   # bytes of this read that callbacks accounted for
        self._slack = settings.max_header_bytes
        self._upgrade_tail = b""
        self._last = None                # the request parsed last (an upgrade stops after it)
        self._resync = False             # llhttp stops before this body (an ignored upgrade)

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport):
        self.transport = transport
        self._transport_write = transport.write     # bound once: no lookup per answer
        server = self._server
        # Connections handed to picows (WebSockets) count as long as they are open.
        if len(server.connections) + server.websockets_open >= self._settings.max_connections:
            # Over the cap: answer rather than leave the client hanging in the backlog.
            server.connection_refused("limit")
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
        self._set_peer(peer[0] if isinstance(peer, tuple) else "")
        if self._proxy_mode != "off" and self.proxied is not None:
            # Over TLS the PROXY header came before the handshake and was read there
            # (ingress/tls_accept.py), its peer checked: what it named is the client.
            if not self._proxied_by(self.proxied):
                return
        elif self._proxy_mode != "off":
            if self._trust is not None and not self._trusted:
                # A PROXY header is believed from the configured proxies only.
                server.connection_refused("proxy_protocol")
                self._refuse_connection("the PROXY protocol is accepted from trusted proxies only")
                return
            self._proxy_buf = b""       # counted per client once the header names it
        elif not self._admit_client():
            return
        self._set_parser(server.new_parser(self))
        # The first head is due headerReadTimeout after accept, not after its first byte.
        self._set_deadline(_D_HEADER, self._header_timeout)

    def _set_parser(self, parser):
        # Its three per-request methods bound once per parser: called through the parser,
        # each call looks the name up on the type first (~100 instructions a request each).
        # Dropped with it: a bound method holds the parser, the parser holds this protocol.
        self._parser = parser
        if parser is None:
            self._p_feed = self._p_method = self._p_keep_alive = None
        else:
            self._p_feed = parser.feed_data
            self._p_method = parser.get_method
            self._p_keep_alive = parser.should_keep_alive

    def connection_lost(self, exc):
        server = self._server
        if self._write_paused:
            self._write_paused = False
            server.client_caught_up(self)
        if self in server.connections:
            server.connections.discard(self)
            server.metrics.connection_closed()
        if self._client_key is not None:
            server.release_client(self._client_key)
            self._client_key = None
        # Closed by us (an answer that closed it, a cut, the drain's deadline) or by the
        # client: what its unanswered requests are logged and counted as.
        gone = CLOSED_UNANSWERED if self._closing else CLIENT_CLOSED
        self._closing = True
        current = self._current
        self._current = None
        if current is not None and current.pending is not None:
            # The client went away with a request in flight: CANCEL(ClientDisconnected).
            current.pending.abort()
        # Drop what this connection holds at once: the parser points back at us (a cycle
        # the collector would only find in a full collection), held bodies and buffers.
        if current is not None:
            current.done = True
            # Every request whose head was read leaves one line and one count, answered or
            # not: a client that left (or reset) before its answer — while the service
            # worked on it, mid-upload — left no trace at all (an adversarial probe). A
            # streamed answer cut short keeps the status its head carried (bytesOut says
            # how far it got).
            self._acct.request_done(current, self._stream_status if self._streaming
                                    else gone)
            self._streaming = False
        self._drop_queue(gone)
        self._set_parser(None)
        self._req = None
        self._last = None
        self._headers = []
        self._on_writable = None
        self._upgrade_tail = b""
        self._body_out = []
        self._unparsed = None

    def data_received(self, data):
        if self._closing:
            if self.deadline_kind == _D_LINGER:
                self._linger(len(data))
            return
        if self._parse_broken:
            return
        if self._proxy_buf is not None:
            data = self._proxy_header(data)
            if data is None:
                return
        out = []
        self._out = out
        while data is not None:
            data = self._feed(data)
        self._pump()
        self._out = None
        if out:
            data = b"".join(out) if len(out) > 1 else out[0]
            self._writing = len(data)
            self._transport_write(data)
        if self._closing and self._current is None:
            self._close_now()

    def _feed(self, data):
        """Parse one read; returns what is left for a fresh parser after an ignored
        upgrade, else None.

        A read that could spend the whole chunk-extension / whitespace budget (_slack) is
        parsed in slices that shrink with it, so an overlong extension is refused within
        about a KiB of the budget, before the message it hides in can complete. A read that
        is all Content-Length body (a large upload) goes in one piece."""
        n = len(data)
        if n <= self._slack and n <= _FEED_SLICE:
            return self._parse(data)
        req = self._req
        if (self._in_body and req is not None and req.content_length > 0
                and req.content_length - req.body_size >= n):
            return self._parse(data)
        view = memoryview(data)
        pos = 0
        while pos < n:
            step = max(self._slack // 2, 1024)
            if step > _FEED_SLICE:
                step = _FEED_SLICE
            end = pos + step
            rest = self._parse(view[pos:end])
            if rest is not None:
                return rest + bytes(view[end:]) if end < n else rest
            if self._parse_broken or self._closing:
                return None
            pos = end
            if pos >= n:
                break
            if self._pipeline_full(_PIPELINE_BYTES):
                # Enough waits: the rest of this read is parsed once they are served
                # (_pump), reading stopped meanwhile so nothing overtakes it.
                self._unparsed = bytes(view[pos:])
                self._pause(_P_PIPELINE)
                return None
            req = self._req
            if (self._in_body and req is not None and req.content_length > 0
                    and req.content_length - req.body_size >= n - pos):
                return self._parse(view[pos:])     # the rest is body: in one piece
        return None

    def _parse(self, data):
        self._seen = 0
        try:
            self._p_feed(data)
        except _Stop:
            pass
        except _Reject:
            self._failed()
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, _Stop):
                pass
            elif isinstance(context, _Reject) or self._reject is not None:
                self._failed()
            else:
                self._server.log.event("error", "parser callback failed", error=repr(context))
                self._reject = (500, "internal error while reading the request")
                self._failed()
            # Not left bound in this frame: the exception's traceback holds the callback's
            # frame, and through it this connection, as a cycle that only the collector
            # would free (uncompiled; compiled frames keep no locals).
            context = None
        except httptools.HttpParserUpgrade as exc:
            return self._upgraded(data, exc.args[0] if exc.args else len(data))
        except httptools.HttpParserError as exc:
            if str(exc) == _AFTER_CLOSE:
                # Bytes after a request that said `Connection: close`: not read as a
                # request (RFC 9112 §9.6), so neither answered nor logged. Made a 400 that
                # the close then dropped, they were logged under the last request's id.
                self._parse_broken = True
                self._pause(_P_STOP)
                return None
            message = _parser_message(exc)
            # HTTP/3.0, HTTP/1.2 ...: "505 HTTP Version Not Supported" says what is wrong.
            self._reject = (505 if "HTTP version" in message else 400, message)
            self._failed()
        else:
            self._slack -= len(data) - self._seen
            if self._slack < 0:
                # In a head, what is unaccounted is mostly a field still arriving (httptools
                # keeps it whole until its end): the head is too large. In a body, chunk
                # extensions.
                if self._in_body:
                    self._reject = (400, "chunk extensions larger than %d bytes"
                                    % self._max_header_bytes)
                else:
                    self._reject = (431, "request header block larger than %d bytes"
                                    % self._max_header_bytes)
                self._failed()
        if self._body_out:
            self._flush_body()      # a refused body's pieces go nowhere (_req is gone)
        return None

    def _set_peer(self, address):
        self.peer_ip = address.encode()
        self.anonymous_key = anonymous_key(self.peer_ip)
        self._peer_text = address
        self._trusted = self._trust is not None and self._trust.trusts(address)

    def _proxy_header(self, data):
        """The PROXY protocol header before the first request: the source it names becomes
        the client's address. Returns what follows it, or None while it is incomplete."""
        buf = self._proxy_buf + bytes(data)
        try:
            parsed = parse_proxy_header(buf, self._proxy_mode)
        except ProxyError as exc:
            # Counted as over HTTPS (ingress/tls_accept.py): over plain HTTP this refusal
            # left no trace, no request line and no count.
            self._server.connection_refused("proxy_protocol")
            self._refuse_connection(str(exc))
            return None
        if parsed is None:
            self._proxy_buf = buf
            return None
        self._proxy_buf = None
        consumed, source = parsed
        if not self._proxied_by(source):
            return None
        rest = buf[consumed:]
        return rest if rest else None

    def _proxied_by(self, source):
        """A PROXY header named `source` (None or "" for LOCAL / UNKNOWN: the TCP peer stays
        the client): the client's address from now on, counted against
        maxConnectionsPerClient. False when that refused the connection."""
        if source:
            self._set_peer(source)
        return self._admit_client()

    def _admit_client(self):
        """gateway.http.maxConnectionsPerClient: False (answered 503, closing) when this
        address holds that many of the worker's connections already. A trusted proxy's own
        connections carry many clients each: not counted, unless PROXY names the client."""
        cap = self._settings.max_connections_per_client
        if cap <= 0 or (self._trusted and self._proxy_mode == "off"):
            return True
        key = client_key(self.peer_ip)
        if not self._server.admit_client(key, cap):
            self._server.connection_refused("per_client")
            self._refuse_connection("too many connections from this address", 503)
            return False
        self._client_key = key
        return True

    def _refuse_connection(self, message, status=400):
        self.transport.write(self._render_error_close(status, message))
        self._closing = True
        self._parse_broken = True
        self.transport.close()

    def eof_received(self):
        # A client that closes with a request in flight has gone (browsers and proxies do
        # not half-close to wait for an answer): close, so the request is cancelled
        # upstream instead of finishing for nobody.
        return False

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self):
        if self._resync:
            return
        self._req = _new_request(self)
        self._in_body = False
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._reject = None
        self._requests += 1
        if self._requests > 1:
            # A later head (keep-alive or pipelined) has headerReadTimeout from its first
            # byte; the first one keeps the deadline set at accept.
            self._set_deadline(_D_HEADER, self._header_timeout)

    def on_url(self, url: bytes):
        if self._resync:
            return
        self._seen += len(url)
        self._url = self._url + url if self._url else url
        if len(self._url) > self._max_url:
            self._reject = (414, "request-target longer than %d bytes" % self._max_url)
            raise _Reject

    def on_header(self, name: bytes, value: bytes):
        if self._resync:
            return
        n = len(name) + len(value) + 4       # "name: value\r\n"
        self._seen += n
        self._header_bytes += n
        if self._header_bytes > self._max_header_bytes:
            self._reject = (431, "request header block larger than %d bytes"
                            % self._max_header_bytes)
            raise _Reject
        if self._in_body:
            # A trailer field (RFC 9112 §7.1.2): counted, never merged into the header
            # section a stage reads (§6.5.1) — the service sees none of them.
            return
        headers = self._headers
        last = len(value) - 1       # (compiled without wraparound: no value[-1])
        if last >= 0 and (value[last] == 32 or value[last] == 9):
            # OWS after a field value is not part of it (RFC 9110 §5.5); llhttp skips the
            # OWS before it but keeps this: a service would see `x-api-key: k ` where every
            # RFC reader (nginx too) sees `k`.
            value = value.rstrip(b" \t")
        # Lower case, and one object per common name: its hash is made once, not by every
        # lookup of every request (cext/httpwire.pyx).
        headers.append((header_name(name), value))
        if len(headers) > self._max_header_count:
            self._reject = (431, "more than %d request header fields" % self._max_header_count)
            raise _Reject

    def on_headers_complete(self):
        if self._resync:
            self._resync = False     # the synthetic head of _upgraded(): the body follows
            return
        req = self._req
        parser = self._parser
        req.method = method_name(self._p_method())
        # "METHOD SP target SP HTTP/1.1 CRLF ... CRLF", and some whitespace per request
        self._seen += len(req.method) + 14
        self._top_up(64)
        keep_alive = self._p_keep_alive()
        req.keep_alive = keep_alive
        headers = self._headers
        req.headers = headers
        req.started = perf_counter()
        req.body_limit = self._max_body
        # One pass over the headers for everything the request path needs from them.
        name: bytes
        value: bytes
        expect = cid = rid = host = te = upgrade_to = xff = fwd = None
        hosts = tes = 0
        length = 0
        connection = False
        for name, value in headers:
            if name == b"host":
                host = value
                hosts += 1
            elif name == b"content-length":
                length = int(value)        # llhttp (strict) refused malformed and repeated
            elif name == b"transfer-encoding":
                te = value
                tes += 1
            elif name == b"x-correlation-id":
                cid = value if cid is None or cid is rid else cid
            elif name == self._request_id and cid is None:
                cid = rid = value       # gateway.http.requestIdHeader: X-Correlation-Id wins
            elif name == b"x-service-version":
                if req.version is None:
                    req.version = value
            elif name == b"upgrade":
                upgrade_to = value
            elif name == b"connection":
                connection = True
                # llhttp reads keep-alive and close from one line; every line counts.
                if b"close" in value.lower() and _has_token(value, b"close"):
                    req.keep_alive = False
            elif name == b"expect":
                # Every line is an expectation (a list, RFC 9110 §5.3): one other than
                # 100-continue on any line is a 417, not only on the last.
                if expect is None or expect.strip().lower() == b"100-continue":
                    expect = value
            elif name == b"proxy-connection":
                connection = True           # llhttp reads it as Connection
            elif self._trusted and (name == b"x-forwarded-for" or name == b"forwarded"):
                # From a trusted proxy only: every line of each, joined as one list.
                if name == b"forwarded":
                    fwd = value if fwd is None else fwd + b", " + value
                else:
                    xff = value if xff is None else xff + b", " + value
        # get_http_version() formats a str per call (as much as the rest of this callback).
        # llhttp (strict) admits 0.9, 1.0, 1.1 and 2.0, and keeps a 1.1 connection alive
        # unless told to close, any other only when a Connection (or Proxy-Connection) line
        # says keep-alive: kept alive without either line, the request is 1.1.
        version = HTTP11 if keep_alive and not connection else parser.get_http_version()
        req.http_version = version
        if version != "1.1" and version != "1.0":
            # llhttp reads a missing version as 0.9 and accepts 2.0 in a request line.
            if version == "2.0":
                self._refuse(505, "HTTP/2 is not spoken on this port; send HTTP/1.1")
            self._refuse(400, "the request line must end in HTTP/1.1 or HTTP/1.0")
        if _eq(req.method, "CONNECT"):
            self._refuse(405, "CONNECT is not supported")
        req.correlation_id = self._acct.correlation_id_of(cid)
        req.client_ip = self.peer_ip
        if xff is not None or fwd is not None:
            client = self._trust.client(self._peer_text, xff, fwd)
            if client != self._peer_text:
                req.client_ip = client.encode()
        # llhttp stops after the head of an upgrade (Upgrade + Connection: upgrade).
        upgrade = upgrade_to is not None and parser.should_upgrade()
        # RFC 9110 §7.8: an HTTP/1.0 request's Upgrade is ignored.
        if upgrade and version == "1.1" and upgrade_to.strip().lower() == b"websocket":
            req.websocket = True
        if length and length > self._max_body:      # (0, most requests: no int made to compare)
            self._refuse(413, "request body larger than %d bytes" % self._max_body)
        if hosts > 1:
            self._refuse(400, "more than one Host header field")
        if host is None:
            if version == "1.1":
                self._refuse(400, "an HTTP/1.1 request needs a Host header field")
        # (OWS around Host is gone already: llhttp skips it before, on_header after.) An
        # invalid one is a 400 in absolute-form too, though the target's authority replaces
        # it (RFC 9112 §3.2: MUST): a front end that routes on Host must not see a request
        # we route on another authority.
        if host is not None and not host_ok(host):
            self._refuse(400, "the Host header field is not a valid host[:port]")
        url = self._url
        if not url or url[0] != 47:                  # not origin-form ('/')
            url = self._absolute_form(req, url)     # its authority replaces Host
        elif host is not None:
            req.host = host
        parts = split_target(url)
        if parts is None:
            self._refuse(400, "a request-target has no fragment")
        req.target, req.query = parts
        if te is not None:
            if tes > 1:
                self._refuse(400, "more than one Transfer-Encoding header field")
            if version == "1.0":
                # RFC 9112 §6.1: framing an HTTP/1.0 recipient may not know; treat as faulty.
                self._refuse(400, "Transfer-Encoding is not allowed on HTTP/1.0")
            coding = transfer_coding(te)
            if coding == TE_OTHER:
                self._refuse(501, "only the chunked transfer coding is supported")
            if coding != TE_CHUNKED:
                self._refuse(400, "Transfer-Encoding must end in chunked")
            req.content_length = -1
        else:
            req.content_length = length
        has_body = req.content_length != 0
        if expect is not None:
            if expect.strip().lower() != b"100-continue":
                self._refuse(417, "only 'Expect: 100-continue' is supported")
            req.expect_continue = version == "1.1" and has_body
        if req.websocket and (req.method != "GET" or has_body):
            self._refuse(400, "a WebSocket upgrade is a GET without a body")
        # Upgrade: h2c and the like (RFC 9110 §7.8) are ignored and answered in HTTP/1.1.
        # llhttp stops right after such a head without reading its body: _upgraded() reads
        # the body on with a fresh parser, framed as this head said (_resync).
        self._resync = upgrade and not req.websocket and has_body
        if has_body:
            req.body_state = _B_OPEN
            req.held = []
            self._in_body = True
            self._rate_bytes = 0
            self._set_deadline(_D_BODY, self._body_timeout)
        else:
            self._in_body = False
            self.deadline_kind = _D_NONE
        if self._current is None and not self._queue and not self._write_paused:
            self._current = req
            self._run(req)
            if self._closing:
                raise _Stop          # answered and closing: parse nothing more
            if req.body_state == _B_OPEN and req.pending is None:
                self._pause(_P_HOLD)   # decided later (a key fetch, Valkey): hold the body
        else:
            req.head_size = self._header_bytes + len(self._url)
            self._queue.append(req)
            if has_body:
                self._pause(_P_HOLD)
            elif self._pipeline_full(_PIPELINE_BYTES):
                self._pause(_P_PIPELINE)

    def on_body(self, body: bytes):
        req = self._req
        n = len(body)
        self._seen += n
        req.body_size += n
        if req.body_size > req.body_limit:
            self._reject = (413, "request body larger than %d bytes" % req.body_limit)
            raise _Reject
        self._rate_bytes += n
        if self._rate_bytes >= self._body_window_bytes:
            # The minimum rate is met for this window: the next one starts now.
            self._rate_bytes = 0
            self.deadline = self._edge.now + self._body_timeout
        if req.pending is not None:
            self._body_out.append(body)
        elif req.held is not None:
            req.held.append(body)

    def _flush_body(self):
        """What on_body took from this read goes to the service as one piece; the client
        is paused when it waits for the service's credit."""
        out = self._body_out
        self._body_out = []
        req = self._req
        if req is None or req.pending is None:
            return      # refused or answered meanwhile: the rest goes nowhere
        pending = req.pending
        if not pending.owner.request_body(pending, out[0] if len(out) == 1 else b"".join(out),
                                          False):
            self._pause(_P_FLOW)

    def on_chunk_header(self):
        self._top_up(24)         # "<hex size>\r\n" and the CRLF after the data

    def on_message_complete(self):
        if self._resync:
            return          # llhttp's end of an upgrade head, not of the body (_upgraded)
        if self._body_out:
            self._flush_body()
        req = self._req
        self._req = None
        self._last = req
        self._in_body = False
        # No more of this body will come: what waits for credit is the service's business.
        self._resume(_P_FLOW)
        if req.body_state == _B_OPEN:
            req.body_state = _B_NONE
            pending = req.pending
            if pending is not None:
                pending.owner.request_body(pending, b"", True)
            elif req.held is not None:
                held = req.held
                req.body = held[0] if len(held) == 1 else b"".join(held)
                req.held = None
        if self._current is None and not self._queue:
            # Answered on its head already: the connection idles from here.
            self._set_deadline(_D_IDLE, self._keep_alive_timeout)
        elif self.deadline_kind == _D_BODY:
            self.deadline_kind = _D_NONE

    def _top_up(self, n):
        # Capped: a long connection does not save up a budget to spend at once.
        self._slack = min(self._slack + n, 2 * self._max_header_bytes)

    # ---------------------------------------------------------------- judging the head

    def _refuse(self, status, message):
        self._reject = (status, message)
        raise _Reject

    def _absolute_form(self, req, url):
        """absolute-form (RFC 9112 §3.2.2) → path and query; its authority is the Host."""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            parsed = None
        if (parsed is None or parsed.schema not in (b"http", b"https") or parsed.userinfo
                or not parsed.host):
            self._refuse(400, "the request-target must be a path or an http(s) URL")
        authority = parsed.host
        if b":" in authority:
            authority = b"[" + authority + b"]"
        if parsed.port is not None:
            authority += b":%d" % parsed.port
        if not host_ok(authority):
            self._refuse(400, "the request-target's authority is not a valid host[:port]")
        req.host = authority
        # The target's authority replaces Host for the service too.
        self._headers[:] = [(n, v) for n, v in self._headers if n != b"host"]
        self._headers.append((b"host", authority))
        path = parsed.path or b"/"
        return path + b"?" + parsed.query if parsed.query else path

    # ---------------------------------------------------------------- the body

    def start_body(self, req):
        """The request was dispatched (`req.pending` is set): its body may now be read.
        Called by the service connection; feeds what arrived while it was decided."""
        if req.body_state != _B_OPEN and req.held is None:
            return
        pending = req.pending
        held = req.held
        req.held = None
        owner = pending.owner
        more = True
        if held:
            for chunk in held:
                more = owner.request_body(pending, chunk, False)
        if req.body_state != _B_OPEN:
            owner.request_body(pending, b"", True)
            return
        if not more:
            self._pause(_P_FLOW)
        if req.expect_continue and req is self._current and not self._closing:
            req.expect_continue = False
            self._write(_CONTINUE)
        self._resume(_P_HOLD)
        if self.deadline_kind == _D_BODY:
            self.deadline = self._edge.now + self._body_timeout

    def resume_body(self, req):
        """The service took what waited of `req`'s body (flow control): read on."""
        if self._paused & _P_FLOW:
            self._resume(_P_FLOW)
            if self.deadline_kind == _D_BODY:
                self.deadline = self._edge.now + self._body_timeout

    def _body_failed(self, req, status, message):
        """The body broke a limit or deadline after the head was judged: stop reading;
        answer when no response byte has gone out yet, else cut the connection."""
        self._parse_broken = True
        self._pause(_P_STOP)
        self._req = None
        self._in_body = False
        if req is not self._current:
            req.reject = (status, message)     # queued: answered in its turn
            req.keep_alive = False
            return
        pending = req.pending
        if pending is not None:
            pending.abort(status == 413)     # the service learns why (protocol.md §4.5)
        if self._streaming:
            self.abort_stream(req, status)
            return
        self.respond(req, status, _JSON_CT, error_body(status, message, req.correlation_id),
                     True)

    # ---------------------------------------------------------------- answering

    def _failed(self):
        """The parser or a limit stopped this request: answer it (in order), then close."""
        status, message = self._reject
        if self._in_body and self._req is not None:
            self._body_failed(self._req, status, message)
            return
        self._parse_broken = True
        self._pause(_P_STOP)
        begun = self._req is not None
        req = self._req if begun else _new_request(self)
        self._req = None
        if not req.correlation_id:
            # The head's own fields so far; with no head begun, self._headers still holds
            # the last request's, whose X-Correlation-Id is not this one's (two requests
            # logged under one id).
            req.correlation_id = self._acct.correlation_id(self._headers if begun else ())
        if begun and not req.target and self._url and self._url[0] == 47:
            # Refused before the head was judged to its end (413 on Content-Length, a bad
            # Host): the line still says which path was asked for, not "".
            parts = split_target(self._url)
            if parts is not None:
                req.target = parts[0]
        req.keep_alive = False
        req.body_state = _B_NONE
        req.started = perf_counter()
        req.reject = (status, message)
        if not req.route:
            req.route = "invalid"   # the documented label, never "" (docs/operations.md)
        if req is not self._current and req not in self._queue:
            self._queue.append(req)

    def _pump(self):
        """Start the next queued request when nothing is in flight and the client takes
        what it was sent. A client that pipelined and reads nothing had every queued request
        sent to its service and every answer added to its buffer (16 answers held, for
        `sendTimeout` or for ever at `minSendRate`; an adversarial probe): the next one now
        waits for resume_writing, as nginx starts a pipelined request only once the last
        answer is out (docs/security.md §3d, "pipelined behind a client not reading")."""
        while (self._current is None and self._queue and not self._closing
               and not self._write_paused):
            if self.transport is None or self.transport.is_closing():
                # The answer just written failed (a client that reset while reading was
                # paused, its pipeline full, is seen only then): connection_lost follows and
                # counts the queue; none of it goes to a service for a client that is gone.
                break
            req = self._queue.popleft()
            self._current = req
            self._run(req)
        if self._paused & _P_HOLD and not self._closing and not self._holding():
            self._resume(_P_HOLD)
        if (self._paused & _P_PIPELINE and len(self._queue) < _PIPELINE_MAX // 2
                and not self._pipeline_full(_PIPELINE_BYTES // 2)):
            if self._unparsed is None:
                self._resume(_P_PIPELINE)
            elif not self._unparsed_scheduled:
                # What was left of a read goes first, still not reading (not from inside
                # this call: it may run within data_received).
                self._unparsed_scheduled = True
                asyncio.get_running_loop().call_soon(self._continue)

    def _pipeline_full(self, bytes_limit):
        """PIPELINE_MAX requests wait, or heads of `bytes_limit` bytes."""
        if len(self._queue) >= _PIPELINE_MAX:
            return True
        n = 0
        for req in self._queue:
            n += req.head_size
        return n >= bytes_limit

    def _continue(self):
        """Parse what _feed left of a read (the pipeline was full)."""
        self._unparsed_scheduled = False
        data = self._unparsed
        self._unparsed = None
        if data is not None and not self._closing:
            self.data_received(data)

    def _holding(self):
        """Is a request that has not been dispatched waiting for (part of) its body?"""
        req = self._current
        if req is not None and req.held is not None and req.pending is None:
            return True
        for req in self._queue:
            if req.held is not None:
                return True
        return False

    def _run(self, req):
        if req.reject is not None:
            status, message = req.reject
            self.respond(req, status, _JSON_CT, error_body(status, message, req.correlation_id),
                         True)
            return
        try:
            result = self._handle(req)
        except Exception as exc:  # a bug in a stage must not take the connection down silently
            self._server.log.event("error", "pipeline failed", correlationId=req.correlation_id,
                                   error=repr(exc))
            result = (500, _JSON_CT, error_body(500, "internal error", req.correlation_id))
        if result is not None:
            self.respond(req, result[0], result[1], result[2])

    def respond(self, req, status, headers, body, close=False):
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
        # A body still arriving closes the connection: its rest will not be read.
        keep = (req.keep_alive and not close and not self._edge.draining
                and req.body_state != _B_OPEN and not req.websocket)
        line = _STATUS_LINES.get(status)
        if line is None:
            line = status_line(status)
        if not keep:
            connection = _CLOSE
        elif req.http_version is not HTTP11 and _eq(req.http_version, "1.0"):
            connection = _KEEP_ALIVE   # (HTTP11 first: "1.1" and "1.0" differ in the last byte)
        else:
            connection = b""
        if status == 204 or status == 304 or status == 205:
            # No content, whatever the service sent: a client frames these without reading
            # a body, so bytes after the head would be read as the next response on the
            # connection (a desync the service's data could steer). No Content-Length on 204
            # and 304 either (RFC 9110 §8.6); 205 says 0 (§15.3.6).
            payload = b""
            length = 0 if status == 205 else -1
        elif _eq(req.method, "HEAD"):
            payload = b""
            length = len(body)
        else:
            payload = body
            gzip = self._gzip
            if (gzip is not None and gzip.min_size <= len(body) <= gzip.max_size
                    and gzip.applies(headers) and accepts_gzip(req.headers)):
                headers, payload = gzipped(headers, body, gzip.level)
                body = payload
            length = len(body)
        req.bytes_out = len(payload)
        data = render_response(line, self._edge.date_header, length,
                               headers, req.resp_headers, req.correlation_id,
                               connection, payload)
        self._write(data)
        self._finish(req, status, keep)

    def _drop_queue(self, status):
        """Pipelined requests never started, whose connection closes: each logged and
        counted once, as `status` (they once vanished without a trace)."""
        if not self._queue:
            return
        for req in self._queue:
            req.done = True
            if not req.route:
                req.route = "unrouted"      # a fixed label: never matched, never ""
            self._acct.request_done(req, status)
        self._queue.clear()

    def _write(self, data):
        if self._out is not None:
            self._out.append(data)
        else:
            self._writing = len(data)
            self._transport_write(data)

    def _finish(self, req, status, keep):
        self._current = None
        self._streaming = False
        req.done = True
        # Request and Pending point at each other: unlinked here, both go when the last
        # reference does, instead of waiting for the cycle collector.
        req.pending = None
        req.held = None
        self._acct.request_done(req, status)
        if not keep:
            self._closing = True
            self._drop_queue(CLOSED_UNANSWERED)
            if self._out is None:
                self._close_now()
            return
        if self._out is None:
            # Answered from a callback (routed request): carry on with the queue here.
            self._pump()
        if self._current is None and not self._queue and self._req is None:
            self._set_deadline(_D_IDLE, self._keep_alive_timeout)

    def _close_now(self):
        """Close after what is written; when the client may still be sending (a refused
        body, a broken head), read and discard for a moment first: closing a socket with
        unread data sends a reset, which can destroy the answer before the client reads it."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.deadline_kind == _D_LINGER:
            return
        if self._req is None and not self._parse_broken:
            transport.close()
            return
        self._req = None
        self._in_body = False
        self._set_deadline(_D_LINGER, LINGER_SECONDS)
        self._lingering = 0
        if transport.can_write_eof():
            transport.write_eof()
        self._paused = 0
        transport.resume_reading()

    def _linger(self, n):
        self._lingering += n
        if self._lingering > _LINGER_BYTES:
            self.transport.close()

    # ---------------------------------------------------------------- reading

    def _pause(self, reason):
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        if reason & _P_OURS and not self._paused & _P_OURS:
            self._held_at = self._edge.now
        self._paused |= reason

    def _resume(self, reason):
        if self._paused & reason:
            self._paused &= ~reason
            if reason & _P_OURS and not self._paused & _P_OURS and (
                    self.deadline_kind == _D_HEADER or self.deadline_kind == _D_IDLE):
                # A head half read, or the next one not begun, when we stopped reading: what
                # follows waited on us, not on the client (docs/http-edge.md, Deadlines). The
                # clock resumes where it was.
                self.deadline += self._edge.now - self._held_at
            if not self._paused and self.transport is not None and not self._closing:
                self.transport.resume_reading()

    # ---------------------------------------------------------------- streamed responses

    def start_stream(self, req, status, headers, on_writable):
        """Write the head of a streamed response: chunked (HTTP/1.1) or close-delimited.

        `on_writable()` is called when a client that stopped taking data (pause_writing)
        can take more: the producer resumes then (flow control back to the service).
        """
        if req is not self._current or self.transport is None or self._closing:
            return False
        # 204, 205 and 304 have no content (respond()): the head is the whole answer, with
        # no framing that would announce a body; what the service streams is dropped.
        bodiless = status == 204 or status == 304 or status == 205
        http11 = req.http_version == "1.1"
        self._chunked = http11 and not bodiless
        # HTTP/1.1: chunked or bodiless, so the connection can be kept; HTTP/1.0: the body
        # (or its absence) ends with the connection, as before.
        self._stream_keep = http11 and req.keep_alive and not self._edge.draining
        self._on_writable = on_writable
        framing = (b"transfer-encoding: chunked\r\n" if self._chunked
                   else b"content-length: 0\r\n" if status == 205 else b"")
        if not self._stream_keep:
            framing += _CLOSE
        self._stream_status = status
        self._stream_drop = bodiless or req.method == "HEAD"    # the head is all it gets
        self._streaming = True
        self._write(b"".join((
            status_line(status), self._edge.date_header, headers, req.resp_headers, framing,
            b"x-correlation-id: ", req.correlation_id.encode("latin-1"), b"\r\n\r\n")))
        return True

    def stream_chunk(self, req, data):
        """Send one piece of a streamed body. False: stop producing until on_writable()."""
        if req is not self._current or self.transport is None or self._stream_drop:
            return not self._write_paused
        if not data:
            return not self._write_paused
        req.bytes_out += len(data)
        self._writing = len(data)
        if self._chunked:
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.transport.write(data)
        return not self._write_paused

    def end_stream(self, req):
        if req is not self._current or self.transport is None:
            return
        self._on_writable = None
        if self._chunked and req.method != "HEAD":
            self.transport.write(b"0\r\n\r\n")     # (never chunked for 204, 205, 304)
        self._finish(req, self._stream_status,
                     self._stream_keep and req.body_state != _B_OPEN)

    def abort_stream(self, req, status=502):
        """The producer failed mid-body: the status is sent, so the only honest signal left
        is to cut the connection (a truncated chunked body is detectably incomplete).
        `status` is what metrics and the access log count it as (504: it went idle)."""
        if req is not self._current:
            return
        self._on_writable = None
        self._current = None
        self._streaming = False
        req.pending = None
        req.done = True
        self._acct.request_done(req, status)
        if not self._chunked and not self._stream_drop and self.transport is not None:
            # A body delimited by the close (HTTP/1.0, as nginx's default proxy_http_version
            # asks) would read as whole after a FIN, or a TLS close_notify: a proxy in front
            # ended its own chunked answer cleanly and could cache the cut body. A reset is
            # the one signal such a reader sees as a failure.
            self._closing = True
            reset(self.transport)
            return
        self.close()

    # ---------------------------------------------------------------- upgrades

    def _upgraded(self, data, offset):
        """llhttp stopped after a head with an upgrade (its message is complete, or for
        one with a body, _resync). Returns the bytes to parse on, for an upgrade we ignore."""
        rest = bytes(data[offset:])
        if self._resync:
            # An upgrade we ignore (h2c) on a request with a body llhttp did not read: a
            # fresh parser reads it, framed by a head of our own whose callbacks are
            # skipped, then goes on with HTTP/1.1.
            req = self._req
            if req.content_length < 0:
                framing = b"transfer-encoding: chunked\r\n"
            else:
                framing = b"content-length: %d\r\n" % req.content_length
            self._set_parser(self._server.new_parser(self))
            return b"PUT / HTTP/1.1\r\nhost: x\r\n" + framing + b"\r\n" + rest
        req = self._last
        if req is not None and req.websocket:
            # What follows is WebSocket: kept for picows, which takes the connection over
            # if the service accepts (upgrade_to_websocket). Refused, it is closed.
            self._parse_broken = True
            self._upgrade_tail = rest
            self._pause(_P_STOP)
            if req.done:
                self._closing = True
            return None
        if self._parse_broken or self._closing:
            return None
        # An upgrade we ignore (h2c) without a body: HTTP/1.1 goes on with a fresh parser
        # where the old one stopped.
        self._set_parser(self._server.new_parser(self))
        return rest if rest else None

    def upgrade_to_websocket(self, req, bridge):
        """The service accepted the upgrade: picows takes the connection over."""
        if req is not self._current or self.transport is None or self._closing:
            return False
        from .websocket import hand_over
        self._current = None
        req.done = True
        self._closing = True            # this protocol is done with the connection
        server = self._server
        server.connections.discard(self)
        server.client_caught_up(self)       # picows' buffers are the bridge's to bound
        # Still a client connection, now picows': counted against maxConnections and in
        # gateway_active_connections{service="ingress"} until it closes (the bridge calls
        # websocket_closed; the gauge once dropped it here, so open WebSockets went unseen).
        server.websockets_open += 1
        # Its address stays counted (maxConnectionsPerClient) until picows' connection closes.
        bridge.on_closed = partial(server.websocket_closed, self._client_key)
        bridge.send_deadline = self._send.again()
        bridge.on_cut = server.connection_aborted
        bridge.budget = server          # responseBufferBudget counts it too
        self._client_key = None
        self._acct.request_done(req, 101)
        hand_over(self, req, bridge, self._upgrade_tail)
        return True

    # ---------------------------------------------------------------- flow control

    def pause_writing(self):
        # The client does not read what we write: nor do we read it until it does. Else a
        # client pipelining requests and reading nothing has us hold every answer (40 MB of
        # GET lines held 199 MB of responses).
        self._write_paused = True
        self._pause(_P_WRITE)
        self._server.client_backlogged(self)    # which may cut it at once

    def resume_writing(self):
        self._write_paused = False
        self._server.client_caught_up(self)
        self._resume(_P_WRITE)
        if self._current is None and self._queue and self._out is None:
            self._pump()        # what waited for the client to take its answers (_pump)
        cb = self._on_writable
        if cb is not None:
            cb()

    def _render_error_close(self, status, message):
        body = error_body(status, message, self._acct.correlation_id(()))
        return b"".join((status_line(status), self._edge.date_header,
                         b"content-type: ", JSON, b"\r\ncontent-length: %d\r\n" % len(body),
                         _CLOSE, b"\r\n", body))

    # ---------------------------------------------------------------- deadlines

    def _set_deadline(self, kind, seconds):
        self.deadline_kind = kind
        self.deadline = self._edge.now + seconds

    def check_deadline(self, now):
        if self._write_paused or self._closing:
            self._check_send(now)
        elif self._paused & (_P_HOLD | _P_FLOW) and self.transport is not None \
                and peer_closed(self.transport):
            # Its body held back for the service's credit, a client that left is not read
            # to find out; the request then waited for its route timeout, holding the
            # client's place and the service's work (an adversarial probe). Gone now:
            # connection_lost cancels it (ClientDisconnected).
            self.transport.abort()
            return
        kind = self.deadline_kind
        if kind == _D_NONE or now < self.deadline or self.transport is None:
            return
        if kind == _D_BODY and self._paused & (_P_HOLD | _P_FLOW):
            return          # we hold the client back: not its delay
        if (kind == _D_HEADER or kind == _D_IDLE) and self._paused & _P_OURS:
            return          # likewise; the clock is pushed on when we read again (_resume)
        self.deadline_kind = _D_NONE
        if kind == _D_IDLE or kind == _D_LINGER:
            self.close()
        elif kind == _D_BODY:
            req = self._req
            if req is not None:
                self._body_failed(req, 408, "request body not received in time")
                if self._current is None or self._closing:
                    self._close_now()
        elif self._current is not None or self._req is not None:
            # A pipelined head that does not come (slowloris behind a slow request): the
            # request in flight is answered, then 408, then close. A head begun and not
            # finished is answered the same way, in its turn, so its 408 is logged and
            # counted like any refusal (written directly, it left no trace).
            self._reject = (408, "request not received in time")
            self._failed()
            self._pump()
        else:
            # Not a byte of a request since accept: no request
            # line, but a refusal all the same, counted by its reason (it left no trace).
            self._server.connection_aborted("header_timeout")
            self.transport.write(self._render_error_close(408, "request not received in time"))
            self._closing = True
            self._close_now()

    def _check_send(self, now):
        # A client that stopped taking what it is owed: closing waits for the write buffer
        # to drain, so a client that reads nothing would hold its connection and the buffer
        # for ever (docs/http-edge.md, "What one connection can hold").
        transport = self.transport
        if transport is None:
            return
        reason = self._send.expired(transport, now)
        if reason is not None:
            self.cut(reason)

    def cut(self, reason):
        """Reset the connection (RST: what it is owed goes with it), counted by `reason`."""
        transport = self.transport
        if transport is None:
            return
        self._closing = True
        self._server.connection_aborted(reason)
        reset(transport)

    def buffered(self):
        """What the connection holds for its client, asked as it pauses for writing: its
        transport's buffer, or the write in progress if larger — the kernel may have taken
        most of that write already, but uvloop keeps a view of the whole object until its
        last byte is sent."""
        transport = self.transport
        if transport is None:
            return 0
        return max(transport.get_write_buffer_size(), self._writing)

    def close(self):
        self._closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def is_idle(self):
        return self._current is None and not self._queue and self._req is None

    def abort_if_only_waiting(self):
        """At drain: a TLS connection closed idle, everything sent, that now only waits for
        the client's close_notify (up to headerReadTimeout) is cut. RFC 8446 §6.1: the
        closer need not wait for it, and nothing is owed; a client that never sends one
        held the drain, and the pod's termination, that long."""
        t = self.transport
        if (self._closing and self.is_idle() and t is not None and t.is_closing()
                and t.get_write_buffer_size() == 0
                and t.get_extra_info("ssl_object") is not None):
            t.abort()


_C1_ESCAPES = [(bytes([c]), b"\\x%02x" % c) for c in range(0x80, 0xA0)]


def _has_token(value, token):
    for item in value.split(b","):
        if item.strip(b" \t").lower() == token:
            return True
    return False


def _parser_message(exc):
    text = str(exc) or exc.__class__.__name__
    return "malformed HTTP request: " + text
