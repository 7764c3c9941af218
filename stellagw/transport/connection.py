# cython: infer_types=True
"""One microservice connection, gateway side (docs/protocol.md).

States: AWAIT_HELLO → READY → CLOSED. A connection that has not sent a valid HELLO
within HELLO_TIMEOUT, sends anything else first, or sends a malformed frame is closed
with a logged reason; a HELLO that cannot be registered, or claims a service name the
peer may not claim (the hub's RegistrationPolicy, docs/service-identity.md), leaves
nothing registered and is answered HELLO_ACK{error}.

A link is also closed when it goes quiet — no frame for health.heartbeatTimeoutSeconds +
deadLinkGrace (the hub's sweep) — or stops reading: past the transport's high-water mark
its PINGs go unanswered, past writeBufferLimit or for that long it is cut; one that leaves
our PING unanswered that long is cut too (heartbeats from a timer, its reader wedged). Every closure
the gateway makes is counted by reason (TransportHub.link_closed).

Requests in flight are kept in `inflight` (correlation id → Pending). Their answer comes
back as RESPONSE (whole, or a head followed by RESPONSE_STREAM_DATA); a timeout sends
CANCEL(Timeout) and answers 504; the client leaving sends CANCEL(ClientDisconnected); the
connection dropping answers 502 for every request still waiting, at once.

A request body is dispatched as it arrives from the client (request_body): a small one
with a known length goes inside REQUEST once complete, anything else as REQUEST followed by
REQUEST_STREAM_DATA under the service's window; the ingress pauses the client while no
credit is left. No frame is longer than the service's HELLO announced (max_frame_size): a
body that does not fit in its REQUEST is streamed, a head that does not fit answered 431. The answer's timeout runs from the REQUEST and is pushed on while the
service grants credit for the body, then starts afresh when the body is complete (a slow
upload is the client's delay, bounded by the ingress's body deadline).

Writes to the service are coalesced: frames go into one FrameEncoder and are written once
per loop iteration, or after frame.WRITE_BATCH frames (docs/hot-path.md).

While the link is over writeBufferHighWater nothing more of the clients' making goes into
its buffer: new requests, small bodies and stream data wait in `_held`, in arrival order,
and go when the service has caught up (resume_writing). The link's buffer then holds what
the service has not read yet of what was sent before the pause — about writeBufferHighWater
plus a batch — however many clients send at once, so writeBufferLimit is reached only by a
service that does not read (docs/protocol.md §3.4).

One source, compiled (typed through connection.pxd) and run as plain Python under
STELLAGW_NO_EXTENSIONS=1.
"""
import asyncio
import gc
import os
from collections import deque
import socket
import time
from functools import partial

from ..ingress.http import B_OPEN, HTTP11
from ..observe.metrics import perf_counter
from ..replies import error_body
from ..routing.outliers import SERVER_ERROR, TIMEOUT
from ..routing.state import DRAINING, HelloError
from . import frame as fr
from . import sliced
from .frame import corr_id, decode_response_block
from .batch import WriteBatch
from .headers import CLASSES, RESPONSE_DROP_NAMES, classify, request_headers

try:
    import cython       # compiled, Cython reads the decorators that use it
except ImportError:     # uncompiled without Cython installed: they do nothing
    from .. import _cython_shadow as cython

HELLO_TIMEOUT = 10.0
# At most one ENDPOINTS_UPDATE applied per link this often; those in between wait, and only
# the last of them counts (each replaces the whole set). Decoding, registering and the
# OpenAPI rebuild that follows are work a service makes the worker do: unpaced, one link
# sending 13 MB updates every 0.3 s cost 26 CPU-seconds and held other services' requests
# up to a second.
UPDATE_INTERVAL = 1.0
# At most one HEARTBEAT applied per link this often, the last one waiting counting (as
# updates): each status it flips drops the rankings of all the instance's routes and tells
# every routing listener, and a link sending heartbeats at line rate that flip its status,
# with 4,000 routes, held other requests up to 1.2 s.
HEARTBEAT_INTERVAL = 0.1
# A HELLO or ENDPOINTS_UPDATE larger than a slab is decoded a slice at a time, each slice
# this long at most, other callbacks in between (sliced.py): one orjson.loads of a 16 MB
# update held the loop 0.4-1.5 s, every client of the worker waiting. Meanwhile the link's
# later frames wait unread, so none overtakes the registration's effect.
DECODE_SLICE = 0.002
# ... when larger than this; up to it, one orjson call: about 1 ms for a realistic 256 KB
# registration, 9 ms for the densest shape (tiny values). The sliced decoder costs about 5
# times orjson's CPU on realistic registrations (8.5 against 1.5 ms for 470 KB), which a
# registration storm, every service at once, would pay.
DECODE_WHOLE = 256 * 1024
# At most one of a link's PINGs answered this often, the last waiting answered when its time
# comes (as HEARTBEATs): answered at line rate, four links flooding PINGs put other
# requests' median latency at 10 ms (0.2 ms before). While one waits the link is not read:
# unanswered, the flood still cost its decoding (7.6 ms). The SDK never pings; a service
# that does, to detect a dead gateway, pings every few seconds.
PING_INTERVAL = 0.05
# Frames for nothing (an unknown or finished correlation id, a PONG to no PING) a link may
# send per IGNORED_INTERVAL; past them it is not read for the rest of it. Races after a
# CANCEL or a timeout send a few; four links flooding WINDOW_UPDATEs for unknown streams,
# each read and dropped, put other requests' median latency at 9.7 ms.
IGNORED_INTERVAL = 0.1
IGNORED_PER_INTERVAL = 1024
MAX_PING_PAYLOAD = 64           # protocol.md §3.5: a longer PING or PONG is a protocol error
_MAX_PING = MAX_PING_PAYLOAD
INITIAL_WINDOW = 256 * 1024     # bytes of stream data a peer may send per stream unacknowledged
_MAX_WINDOW = 0x7FFFFFFF        # a window past this is a flow-control error (as in HTTP/2)
_JSON = b"content-type: application/json\r\n"

_AWAIT_HELLO = 0
_READY = 1
_CLOSED = 2
AWAIT_HELLO, READY, CLOSED = _AWAIT_HELLO, _READY, _CLOSED
_B_OPEN = B_OPEN

_REQUEST = fr.REQUEST
_RESPONSE = fr.RESPONSE
_RESPONSE_STREAM_DATA = fr.RESPONSE_STREAM_DATA
_REQUEST_STREAM_DATA = fr.REQUEST_STREAM_DATA
_FLAG_END_STREAM = fr.FLAG_END_STREAM
# A stream-data frame's length field past its chunk: type + corr + the flags byte.
_STREAM_OVERHEAD = fr.MIN_LENGTH + 1

# What a request waits for in ServiceConnection._held while the link is over high water.
_HELD_COMPACT = 64      # finished Pendings left in _held before it is compacted (_finish)
_HELD_REQUEST = 1       # its REQUEST has not gone out (nor its body been read)
_HELD_INLINE = 2        # its small body is complete: the REQUEST carrying it waits
_HELD_STREAM = 3        # REQUEST sent: the next of its body (or WebSocket) data waits


# (freelist here, not in the .pxd: see Request in ingress/http.py)
@cython.freelist(64)
@cython.cclass
class Pending:
    """A request sent to the service and not yet fully answered (made by _new_pending).

    corr        the correlation id of its frames
    req         the ingress Request
    owner       the ServiceConnection it was sent on
    deadline    the timer wheel's time of the timeout (perf_counter's on an asyncio
                loop); 0.0 once the answer started
    timeout     seconds, for re-arming while the body streams
    bucket      the timer wheel's set holding it while it can time out
    streaming   RESPONSE head written, RESPONSE_STREAM_DATA follows
    unacked     stream bytes written to the client but not yet granted back
    sent_at     perf_counter() when the REQUEST was queued
    window      credit for our REQUEST_STREAM_DATA
    path        the normalised path, while the REQUEST waits for its body
    inline      body chunks of a small body waiting to go inside REQUEST, or None
    body        body chunks waiting for credit (REQUEST_STREAM_DATA)
    body_pos    bytes of body[0] already sent
    body_open   REQUEST sent, its body not yet ended
    body_end    the client's body is complete (END_STREAM follows the body)
    span        gateway.transport.send when tracing is on
    ws          WsBridge once a WebSocket upgrade was accepted
    endpoint    the Endpoint it was sent to
    replayable  its REQUEST carried the whole body: it may go again elsewhere
                (transport/retry.py)
    held        0, or what it waits for in its link's `_held` (_HELD_*)
    held_size   while `held`: its bytes in the hub's held.bytes (set by _hold only)
    held_spare  of them, set aside for body not yet read (_held_room)
    """

    def abort(self, over_limit=False):
        """The client went away, or its request was refused mid-body: over its body limit
        (the client gets 413) the CANCEL says PayloadLimitExceeded, else ClientDisconnected
        (protocol.md §4.5)."""
        self.owner._client_gone(self, fr.CANCEL_PAYLOAD_LIMIT_EXCEEDED if over_limit
                                else fr.CANCEL_CLIENT_DISCONNECTED)

    def expire(self, now):
        """Called by the hub's timer wheel once the deadline bucket is due."""
        if self.deadline and now >= self.deadline:
            self.owner._timeout(self)


class TimerWheel:
    """Request timeouts without a timer per request: buckets of `tick` seconds hold the
    requests due in them; a request that finishes leaves its bucket at once (_finish,
    _disarm), so the wheel holds only what can still expire, and one loop timer turns it
    while anything is armed. Compiled with the connection: arming is on every request's
    path (as a Python method of the hub it cost 3,400 of a routed request's 63,000
    instructions)."""

    def __init__(self, loop, tick):
        self._loop = loop
        # An asyncio loop (uvloop's too) keeps time on CLOCK_MONOTONIC, which perf_counter
        # reads as a C call; any other loop (a test's fake one, which moves its own time)
        # is asked for its time.
        self._time = None if isinstance(loop, asyncio.AbstractEventLoop) else loop.time
        self._tick = tick
        self.buckets = {}           # slot (deadline // tick + 1) -> set of Pending
        self._pos = 0
        self._handle = None
        self._turn_cb = self._turn
        # The bucket armed last: requests arriving within one tick share it, found without
        # a lookup. Forgotten at every turn, which may take it out of `buckets`.
        self._last_slot = -1
        self._last_bucket = None

    def arm(self, pending, timeout, now=-1.0):
        # `now`: the caller's perf_counter() reading, when it has just made one: a routed
        # request's clock reads were ~2 % of the gateway's CPU under load (docs/hot-path.md).
        if self._time is not None:
            now = self._time()
        elif now < 0.0:
            now = perf_counter()
        deadline = now + timeout
        pending.deadline = deadline
        # A whole float: compiled, no int object per request (int() made one, ~160
        # instructions); as a key it equals the int _turn pops.
        slot = deadline // self._tick + 1
        if slot == self._last_slot:
            bucket = self._last_bucket
        else:
            buckets = self.buckets
            bucket = buckets.get(slot)
            if bucket is None:
                bucket = buckets[slot] = set()
                if self._handle is None:
                    self._pos = min(self._pos or slot, slot)
                    self._handle = self._loop.call_later(self._tick, self._turn_cb)
            self._last_slot = slot
            self._last_bucket = bucket
        bucket.add(pending)
        pending.bucket = bucket

    def _turn(self):
        self._last_slot = -1
        self._last_bucket = None
        now = perf_counter() if self._time is None else self._time()
        due = int(now / self._tick)
        buckets = self.buckets
        pos = self._pos
        if due - pos > len(buckets) * 4 + 64:
            # Far behind (a long sleep): look at the slots that exist, not every slot.
            for slot in sorted(s for s in buckets if s <= due):
                for pending in list(buckets.pop(slot)):
                    pending.expire(now)
        else:
            while pos <= due:
                bucket = buckets.pop(pos, None)
                if bucket:
                    for pending in list(bucket):
                        pending.expire(now)
                pos += 1
        self._pos = due + 1
        self._handle = self._loop.call_later(self._tick, self._turn_cb) if buckets else None


def _new_pending(corr, req, owner, sent_at, window, timeout):
    # Not Pending(...): no __init__ call per request; every field is set here.
    pending = Pending.__new__(Pending)
    pending.corr = corr
    pending.req = req
    pending.owner = owner
    pending.deadline = 0.0
    pending.timeout = timeout
    pending.bucket = None
    pending.streaming = False
    pending.unacked = 0
    pending.sent_at = sent_at
    pending.window = window
    pending.path = None
    pending.inline = None
    pending.body = []
    pending.body_pos = 0
    pending.body_open = False
    pending.body_end = False
    pending.span = None
    pending.ws = None
    pending.endpoint = None
    pending.replayable = False
    pending.held = 0
    return pending


class _Paced:
    """A control frame a link may send at most once per `interval` (ENDPOINTS_UPDATE,
    HEARTBEAT): one sooner waits, undecoded, and a later one replaces it — the last one
    counts. `apply(payload)` is called with the one that goes; `not_before()` may hold it
    longer (the worker's update budget)."""

    __slots__ = ("_loop", "_interval", "_apply", "_not_before", "_at", "_timer", "_waiting")

    def __init__(self, loop, interval, apply, not_before=None):
        self._loop = loop
        self._interval = interval
        self._apply = apply                 # the link's: a bad payload is its protocol error
        self._not_before = not_before
        self._at = 0.0                      # loop time before which a frame waits
        self._timer = None
        self._waiting = None                # the payload waiting, or None

    def offer(self, payload):
        now = self._loop.time()
        at = self._at if self._not_before is None else max(self._at, self._not_before())
        if now < at:
            self._waiting = bytes(payload)
            if self._timer is None:
                self._timer = self._loop.call_later(at - now, self._due)
            return
        self._at = now + self._interval
        self._apply(payload)

    def _due(self):
        self._timer = None
        payload, self._waiting = self._waiting, None
        if payload is not None:
            self.offer(payload)             # again: the budget may have gone elsewhere

    def waits(self):
        return self._waiting is not None

    def cancel(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting = None

    def close(self):
        """The link is gone: nothing waits, and the link (which `apply` holds) is let go."""
        self.cancel()
        self._apply = self._not_before = None


class ServiceConnection:
    def __init__(self, hub):
        # -- per worker
        self._hub = hub
        self._routing = hub.routing
        self._metrics = hub.metrics
        self._log = hub.log
        self._loop = hub.loop
        # -- per connection
        self.transport = None
        self.state = _AWAIT_HELLO
        self.instance = None
        self.peer = None
        # Its HELLO first, under its own limit (a peer not yet known holds little here);
        # maxFrameSize once the HELLO has passed (_on_hello).
        self._decoder = fr.FrameDecoder(hub.max_hello_size)
        self._encoder = fr.FrameEncoder(hub.max_frame_size)
        self.inflight = {}
        # A streamed answer's pieces from one read, joined into one write to the client
        # (_flush_out): a service sending 1-byte RESPONSE_STREAM_DATA cost a write syscall
        # and a WINDOW_UPDATE each, 10,000 of them for one 230 KB read.
        self._out = None
        self._out_chunks = []
        self._corr_prefix = os.urandom(8)
        self._corr_next = 0
        self._hello_timer = None
        self._slicing = None            # sliced.SlicedJson of a registration being decoded
        self._ping_paused = False       # not read until the PING waiting (_pings) is answered
        self._read_holds = 0            # reasons not to read now (pause_reading while > 0)
        self._ignored_count = 0         # frames for nothing since...
        self._ignored_until = 0.0       # ...this loop time's interval began (IGNORED_INTERVAL)
        self._ignore_paused = False
        self._drained = False           # the service sent DRAIN
        self._updates = _Paced(self._loop, UPDATE_INTERVAL, self._waited(self._apply_update),
                               lambda: hub.update_free_at)     # the worker's update budget
        self._beats = _Paced(self._loop, HEARTBEAT_INTERVAL, self._waited(self._apply_beat))
        self._pings = _Paced(self._loop, PING_INTERVAL, self._waited(self._pong))
        self.peer_window = INITIAL_WINDOW   # the service's stream_window from HELLO
        self._opened = False            # counted in metrics.active_connections
        # Liveness without a clock read per frame: a count, compared at each sweep.
        self._frames = 0
        self._frames_seen = 0
        self._quiet_since = 0.0         # loop time of the sweep that last saw the count move
        self._write_paused = False      # over the transport's high-water mark
        self._ping_since = 0.0          # loop time of our oldest PING not yet answered
        self._ping_sent = None          # the payload of our last PING, until its PONG
        self._paused_since = 0.0
        self._write_limit = 0           # bytes the transport may buffer for this link
        self._held = deque()            # Pendings waiting for the link to take more (_HELD_*)
        self._held_dead = 0             # of them finished meanwhile (see _finish)
        self._held_threshold = 0        # send_request's stream_threshold, for the REQUESTs held
        self._release_scheduled = False
        self._frame_counts = hub.frame_counts
        # The two frames of every request, counted as C integers and folded into the
        # frame counts before each metrics snapshot (fold_counts); the others go there at once.
        self._requests_sent = 0
        self._responses_received = 0
        self._transport_hist = hub.metrics.phase_histogram("transport")
        self._failures = 0              # 5xx answers and timeouts in a row (outlier detection)
        # Looked up once: each is used for every request.
        self._wheel = hub.wheel
        self._scheme = hub.scheme
        self._writes = WriteBatch(self._encoder, self._loop, self._flush)
        # What the service's HELLO announced it accepts (protocol.md §1, "max_frame_size"),
        # settled once at the HELLO: the encoder refuses a frame past it, and on a link
        # whose limit is below ours (_small_frames) a REQUEST that does not fit whole is
        # sent as a head and stream data. No stream-data chunk is longer than max_chunk.
        self._small_frames = False
        self.max_chunk = hub.max_frame_size - _STREAM_OVERHEAD

    # ---------------------------------------------------------------- transport callbacks

    def connection_made(self, transport):
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        reason = self._hub.admit(self, transport)
        if reason is not None:
            self._log.event("warning", "service connection refused", peer=_peer(self.peer),
                            reason=reason)
            self._hub.link_closed("not_admitted")
            transport.close()
            self.state = _CLOSED
            return
        self._write_limit = self._hub.write_buffer_limit(self)
        self._hello_timer = self._loop.call_later(HELLO_TIMEOUT, self._hello_timeout)

    def connection_lost(self, exc):
        self.state = _CLOSED
        self.fold_counts()
        self._hub.release(self)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._updates.close()
        self._beats.close()
        self._pings.close()
        self._end_slicing()
        self._release_buffers()
        self._held.clear()
        self._held_dead = 0
        inflight = self.inflight
        self.inflight = {}
        if self.instance is not None:
            # Out of selection first: a retry of what was in flight must go elsewhere.
            self._routing.unregister(self.instance, reason="connection lost")
        for pending in inflight.values():
            if pending.held == _HELD_REQUEST or pending.held == _HELD_INLINE:
                self._send_elsewhere(pending, False)
                continue
            _disarm(pending)
            if pending.span is not None:
                pending.span.end()
            pending.body = []
            if self._drained and pending.ws is not None:
                # The service drained, then closed: its shutdown, not a crash. 1001 (going
                # away, RFC 6455 §7.4.1), the client's cue to reconnect, not 1011.
                pending.ws.going_away(b"service shutting down")
                continue
            self._lost(pending, "the service connection was lost")
        if self.instance is not None:
            if self._opened:
                # Not by state: a link the gateway closed itself is CLOSED already here.
                self._opened = False
                self._metrics.connection_closed(self.instance.service)
            self._log.event("info", "service disconnected", service=self.instance.service,
                            instance=self.instance.instance_id, failed_in_flight=len(inflight))

    def data_received(self, data):
        decoder = self._decoder
        frame_counts = self._frame_counts
        try:
            decoder.feed(data)
            while True:
                frame = decoder.next()
                if frame is None:
                    if self._out is not None:
                        self._flush_out()
                    break
                self._frames += 1
                ftype_obj, corr, payload = frame
                ftype = ftype_obj
                if ftype == _RESPONSE:
                    if self._out is not None:
                        self._flush_out()
                    self._responses_received += 1
                    self._on_response(corr, payload)
                else:
                    frame_counts[ftype_obj] = frame_counts.get(ftype_obj, 0) + 1
                    if ftype == _RESPONSE_STREAM_DATA:
                        self._on_stream_data(corr, payload)
                    else:
                        if self._out is not None:
                            self._flush_out()
                        self._on_control(ftype_obj, corr, payload)
                if self.state == _CLOSED or self._slicing is not None:
                    if self._out is not None:
                        self._flush_out()
                    return      # closed, or the frames behind a registration wait for it
        except fr.FrameTooLarge as exc:
            self._out = None                # the link fails, and its streams with it
            self._out_chunks.clear()
            if self.state == _AWAIT_HELLO:
                # The decoder's, on the HELLO's length field (nothing else is read before
                # it). Told why, or it would dial again with the same HELLO for ever.
                self._refuse("InvalidHello", "hello_too_large",
                             f"HELLO larger than {self._hub.max_hello_size} bytes "
                             "(gateway.transports.*.maxHelloSize): send the endpoints in an "
                             "ENDPOINTS_UPDATE after a smaller HELLO, or raise the limit", None)
                return
            self._protocol_error(str(exc))
        except (fr.FrameError, HelloError) as exc:
            self._out = None
            self._out_chunks.clear()
            self._protocol_error(str(exc))

    def eof_received(self):
        return False

    # ---------------------------------------------------------------- frames from the service

    def _on_control(self, ftype, corr, payload):
        if self.state == _AWAIT_HELLO:
            if ftype != fr.HELLO:
                raise fr.FrameError(f"expected HELLO first, got frame type {ftype}")
            self._decode_registration(payload, self._on_hello)
        elif ftype == fr.HEARTBEAT:
            self._beats.offer(payload)
        elif ftype == fr.PONG:
            if len(payload) > _MAX_PING:
                self._close_link("oversize_ping", f"PONG of {len(payload)} bytes (at most "
                                 f"{_MAX_PING})", True)
            elif self._ping_sent is not None and payload == self._ping_sent:
                # Only the answer to our PING, once: each PONG folds into the instance's
                # ping and may re-rank all its routes, and a flood of made-up ones (past
                # HEARTBEAT_INTERVAL's pacing) put other requests' median latency at 1.3 s
                # with 4,000 routes; it also cleared the unanswered-PING clock.
                self._ping_sent = None
                self._ping_since = 0.0
                sent = int.from_bytes(payload, "big")
                rtt_ms = (time.monotonic_ns() - sent) / 1e6
                if 0 <= rtt_ms < 60_000:
                    self._routing.heartbeat(self.instance, None, ping_ms=rtt_ms)
            else:
                self._ignored()
        elif ftype == fr.PING:
            if len(payload) > _MAX_PING:
                # Echoed, it would make us write whatever the peer sends (1 MiB in, 1 MiB out).
                self._close_link("oversize_ping", f"PING of {len(payload)} bytes (at most "
                                 f"{_MAX_PING})", True)
            elif self._write_paused:
                # Shed, not queued: a peer that pings without reading grows nothing here.
                self._hub.backpressure("pong_shed")
            else:
                self._pings.offer(corr + bytes(payload))      # corr is 16 bytes
                if self._pings.waits() and not self._ping_paused:
                    self._ping_paused = True
                    self._hold_reading()
        elif ftype == fr.WINDOW_UPDATE:
            pending = self.inflight.get(corr)
            if pending is not None:
                self._credit(pending, fr.decode_window_update(payload))
            else:
                self._ignored()
        elif ftype == fr.CANCEL:
            # The service gave up on a request (its own shutdown or a failure).
            pending = self.inflight.get(corr)
            if pending is not None:
                self._finish(pending)
                reason = fr.decode_control(payload).get("reason", "cancelled")
                self._lost(pending, f"the service cancelled the request ({reason})")
            else:
                self._ignored()
        elif ftype == fr.DRAIN:
            # A heartbeat sent before the DRAIN and still waiting (HEARTBEAT_INTERVAL) must
            # not announce the instance Healthy again after it.
            self._beats.cancel()
            # For good on this link (protocol.md §4.6): a HEARTBEAT or ENDPOINTS_UPDATE
            # after it does not make the instance selectable again (the SDK's heartbeats
            # said Healthy until it closed, and new requests went to it while it drained).
            self._drained = True
            self._routing.heartbeat(self.instance, DRAINING)
            self._log.event("info", "service draining", service=self.instance.service,
                            instance=self.instance.instance_id)
            # What waits for this link was never sent: no new request goes to a draining
            # instance (protocol.md §4.6), so those go elsewhere, or get the 503 a new one would.
            for pending in list(self._held):
                if pending.held == _HELD_REQUEST or pending.held == _HELD_INLINE:
                    self._send_elsewhere(pending, True)
        elif ftype == fr.ENDPOINTS_UPDATE:
            self._updates.offer(payload)
        elif ftype == fr.HELLO:
            raise fr.FrameError("HELLO received twice on one connection")
        else:
            raise fr.FrameError(f"unexpected frame type {ftype} from a service")

    def _waited(self, apply):
        """`apply` as a frame that waited (_Paced) is applied: from a timer, not from
        data_received, so its errors are turned into the protocol error here."""
        def applied(payload):
            if self.state != _READY:
                return
            try:
                apply(payload)
            except (fr.FrameError, HelloError) as exc:
                self._protocol_error(str(exc))
        return applied

    def _ignored(self):
        """A frame for nothing was read and dropped: past IGNORED_PER_INTERVAL of them in
        an interval the link is not read until it ends."""
        now = self._loop.time()
        if now >= self._ignored_until:
            self._ignored_until = now + IGNORED_INTERVAL
            self._ignored_count = 0
        self._ignored_count += 1
        if self._ignored_count > IGNORED_PER_INTERVAL and not self._ignore_paused:
            self._ignore_paused = True
            self._hub.backpressure("ignored_frames")
            self._hold_reading()
            self._loop.call_later(self._ignored_until - now, self._ignored_done)

    def _ignored_done(self):
        self._ignore_paused = False
        self._release_reading()

    def _hold_reading(self):
        """One more reason not to read the link (a registration being decoded, a PING
        waiting, too many frames for nothing)."""
        self._read_holds += 1
        if self._read_holds == 1 and self.state != _CLOSED:
            self.transport.pause_reading()

    def _release_reading(self):
        self._read_holds -= 1
        if self._read_holds == 0 and self.state != _CLOSED:
            self.transport.resume_reading()

    def _pong(self, ping):
        """The PONG of a PING that _pings let go: its corr and payload echoed."""
        if self._ping_paused:
            self._ping_paused = False
            self._release_reading()
        if self._write_paused:
            self._hub.backpressure("pong_shed")
            return
        self._encoder.raw(fr.PONG, ping[:16], ping[16:])
        self._schedule_flush()

    def _apply_beat(self, payload):
        hb = fr.decode_control(payload)
        self._routing.heartbeat(self.instance, DRAINING if self._drained else hb.get("status"),
                                hb.get("in_flight"), hb.get("error_rate"))
        if self._write_paused:
            return          # it is not reading: a ping would only wait in our buffer
        # Ping rides on the heartbeat (protocol.md §5.3): the PING carries our send
        # time, so an idle connection costs no timer and no table of pings.
        self._ping_sent = time.monotonic_ns().to_bytes(8, "big")
        self._encoder.raw(fr.PING, fr.ZERO_CORR, self._ping_sent)
        self._count_sent(fr.PING)
        self._schedule_flush()
        if not self._ping_since:
            self._ping_since = self._loop.time()

    def _decode_registration(self, payload, then):
        """then(obj, size, digest) with the JSON object `payload` holds: at once up to
        DECODE_WHOLE bytes (digest None: the hub makes it), else a slice at a time from the
        loop, the link not read meanwhile (DECODE_SLICE)."""
        if len(payload) <= DECODE_WHOLE:
            then(fr.decode_control(payload), len(payload), None)
            return
        # The payload stays valid: nothing is fed to the decoder until reading resumes.
        self._slicing = sliced.SlicedJson(payload)
        self._hold_reading()
        _gc_hold(True)
        self._loop.call_soon(self._decode_slice, then, len(payload), 0.0)

    def _decode_slice(self, then, size, spent):
        decoding = self._slicing
        if decoding is None or self.state == _CLOSED:
            return
        started = perf_counter()
        try:
            done = decoding.step(started + DECODE_SLICE)
        except sliced.DecodeError as exc:
            self._end_slicing()
            self._protocol_error(f"control payload is not valid JSON: {exc}")
            return
        spent += perf_counter() - started
        if not done:
            self._loop.call_soon(self._decode_slice, then, size, spent)
            return
        self._end_slicing()
        if self.state == _READY:
            self._hub.update_decoded(size, spent, self._loop.time())
        try:
            then(decoding.result, size, decoding.digest)
        except (fr.FrameError, HelloError) as exc:
            self._protocol_error(str(exc))
            return
        if self.state != _CLOSED:
            self._release_reading()
            self.data_received(b"")         # the frames that came behind it, in order

    def _end_slicing(self):
        if self._slicing is not None:
            self._slicing = None
            _gc_hold(False)

    def _apply_update(self, payload):
        self._hub.update_spent(len(payload), self._loop.time())
        self._decode_registration(payload, self._updated)

    def _updated(self, update, size, digest):
        inst = self.instance
        hello = {"service": inst.service, "version": inst.version,
                 "instance_id": inst.instance_id, "region": inst.region}
        for name, value in hello.items():
            # Who the link is was settled by its HELLO (and checked there: the
            # service's key or certificate): an update replaces endpoints, never that.
            # Taken, a new name would reach another service's traffic, a new
            # instance_id leave the old registration behind for ever.
            if name in update and update[name] != value:
                raise fr.FrameError(f"ENDPOINTS_UPDATE changes {name} ({update[name]!r}; "
                                    f"this connection registered {value!r})")
        update.update(hello)
        denied = self._hub.admit_registration(self, update, size, digest)
        if denied is not None:
            raise fr.FrameError(denied)
        self.instance = self._routing.register(self, update)
        if self._drained:
            self._routing.heartbeat(self.instance, DRAINING)
        self._log.event("info", "service endpoints updated", service=inst.service,
                        instance=inst.instance_id, endpoints=len(self.instance.endpoints))

    def _on_hello(self, hello, size, digest=None):
        proto = hello.get("protocol") if isinstance(hello, dict) else None
        if not isinstance(proto, int) or isinstance(proto, bool) or proto < 1:
            self._refuse("UnsupportedProtocol", "unsupported_protocol",
                         f"unsupported protocol version {proto!r}", hello)
            return
        # Before registering: a refused claim must leave the name's instances untouched.
        denied = self._hub.authorize(self, hello)
        if denied is not None:
            self._refuse("Forbidden", denied[0], denied[1], hello)
            return
        limit = self._link_frame_size(hello)
        if limit < 0:
            return
        ack = self._hub.hello_ack(self)
        small = limit < self._hub.max_frame_size
        if small and not _fits(fr.HELLO_ACK, ack, limit):
            self._refuse("InvalidHello", "invalid_hello",
                         f"max_frame_size {limit} cannot carry this gateway's HELLO_ACK", hello)
            return
        denied = self._hub.admit_registration(self, hello, size, digest)
        if denied is not None:
            self._refuse("InvalidHello", "registration_too_large", denied, hello)
            return
        self._decoder.set_max_frame_size(self._hub.max_frame_size)     # it is someone now
        try:
            instance = self._routing.register(self, hello)
        except HelloError as exc:
            self._refuse("InvalidHello", "invalid_hello", str(exc), hello)
            return
        if small:
            self._encoder.set_max_frame_size(limit)
            self._small_frames = True
            self.max_chunk = limit - _STREAM_OVERHEAD
        window = hello.get("stream_window", INITIAL_WINDOW)
        self.peer_window = window if isinstance(window, int) and 0 < window < 2**31 else INITIAL_WINDOW
        self.instance = instance
        self.state = _READY
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._metrics.connection_opened(instance.service)
        self._opened = True
        self._frames_seen = self._frames
        self._quiet_since = self._loop.time()
        self._encoder.control(fr.HELLO_ACK, fr.ZERO_CORR, ack)
        self._count_sent(fr.HELLO_ACK)
        self._schedule_flush()
        self._log.event("info", "service registered", service=instance.service,
                        version=instance.version, instance=instance.instance_id,
                        region=instance.region, endpoints=len(instance.endpoints),
                        peer=_peer(self.peer))

    def _link_frame_size(self, hello):
        """The largest frame this link may carry to the service: its HELLO's max_frame_size
        (absent: the protocol's default), never more than our own maxFrameSize. -1 when the
        value is refused (answered already): below MIN_SERVICE_FRAME_SIZE no REQUEST head
        of an ordinary request fits (protocol.md §1)."""
        announced = hello.get("max_frame_size")
        if announced is None:
            announced = fr.DEFAULT_MAX_FRAME_SIZE
        elif (announced.__class__ is not int
                or not fr.MIN_SERVICE_FRAME_SIZE <= announced <= 0xFFFFFFFF):
            self._refuse("InvalidHello", "invalid_hello",
                         f"HELLO field 'max_frame_size' must be an integer from "
                         f"{fr.MIN_SERVICE_FRAME_SIZE} to 4294967295, not "
                         f"{repr(announced)[:40]}: a smaller frame cannot carry a request",
                         hello)
            return -1
        return min(announced, self._hub.max_frame_size)

    def _on_response(self, corr, payload):
        pending = self.inflight.get(corr)
        if pending is None:
            self._ignored()
            return  # answered already (timeout/cancel): a late answer is dropped
        if pending.streaming:
            raise fr.FrameError("a second RESPONSE for one request")
        flags, status, block, body = decode_response_block(payload, RESPONSE_DROP_NAMES)
        req = pending.req
        if req.websocket:
            self._on_upgrade_answer(pending, flags, status, block, body)
            return
        if block is None or status < 200 or status > 599:
            # protocol.md §5.5: bad HTTP semantics fail this request, not the connection.
            self._cancel(pending, "Aborted")
            _reply_error(req, 502, "the service sent an invalid response")
            return
        if len(block) > self._hub.max_response_head:
            # gateway.routing.maxResponseHeaderBytes: a head no client or proxy in front of
            # it should have to take (a service sent 15 MB of headers once, passed through).
            self._cancel(pending, "Aborted")
            _reply_error(req, 502, "the service sent a response head larger than "
                                   "%d bytes" % self._hub.max_response_head)
            return
        if status >= 500:
            self._failed(SERVER_ERROR)
        else:
            self._failures = 0
        upstream_s = perf_counter() - pending.sent_at
        req.upstream_s = upstream_s
        self._transport_hist.observe(upstream_s)
        if flags & _FLAG_END_STREAM:
            self._finish(pending)
            conn = req.conn
            conn.respond(req, status, block, body)
            return
        pending.streaming = True
        # The timeout covers REQUEST → RESPONSE (protocol.md §5.4); the stream has its own:
        # no byte moving either way for streamIdleTimeout ends it (_timeout).
        pending.timeout = self._hub.stream_idle_timeout
        self._rearm(pending)
        if not req.conn.start_stream(req, status, block, partial(self._client_writable, pending)):
            self._cancel(pending, "ClientDisconnected")
            return
        if body:
            self._stream_to_client(pending, body)

    def _on_upgrade_answer(self, pending, flags, status, block, body):
        req = pending.req
        if status != 101 or flags & _FLAG_END_STREAM:
            if status < 200 or status > 599:
                status, block, body = 502, _JSON, error_body(
                    502, "the service answered the upgrade with a bad status", req.correlation_id)
            # Refused by the service (e.g. 403): an ordinary answer, then close — the
            # connection was already switched off HTTP parsing at the upgrade.
            self._finish(pending)
            req.conn.respond(req, status, block, body, True)
            return
        # From here the stream's deadline: no message either way for streamIdleTimeout
        # closes the WebSocket (_timeout), which would otherwise hold its client connection,
        # this stream and the service's handler for as long as the peer keeps TCP alive.
        pending.timeout = self._hub.stream_idle_timeout
        self._rearm(pending)
        pending.streaming = True
        from .websocket import WsBridge
        pending.ws = WsBridge(self, pending)
        if not req.conn.upgrade_to_websocket(req, pending.ws):
            self._cancel(pending, "ClientDisconnected")

    def send_stream_chunk(self, pending, flags, chunk):
        """Client → service WebSocket data (REQUEST_STREAM_DATA)."""
        if self.state != _READY:
            return
        self._encoder.stream_data(_REQUEST_STREAM_DATA, pending.corr, flags, chunk)
        self._count_sent(_REQUEST_STREAM_DATA)
        self._schedule_flush()
        if flags & _FLAG_END_STREAM:
            self._finish(pending)
        elif pending.deadline:
            self._rearm(pending)            # the client is sending: not idle

    def ws_client_active(self, pending):
        """A client's PING or PONG: the WebSocket is not idle."""
        if self.inflight.get(pending.corr) is pending and pending.deadline:
            self._rearm(pending)

    def ws_client_gone(self, pending):
        if self.inflight.get(pending.corr) is pending:
            self._cancel(pending, "ClientDisconnected")

    def ws_client_writable(self, pending):
        if self.inflight.get(pending.corr) is pending:
            self._grant(pending)

    def _on_stream_data(self, corr, payload):
        pending = self.inflight.get(corr)
        if pending is None or not pending.streaming:
            self._ignored()
            return
        flags, chunk = fr.decode_stream_data(payload)
        # What we have not granted back is what the service has spent of the window we
        # announced (HELLO_ACK): past it, the service ignores flow control and would make us
        # hold without bound for a client that is not reading (protocol.md §3.4).
        if pending.unacked + len(chunk) > INITIAL_WINDOW:
            self._protocol_error(f"RESPONSE_STREAM_DATA past the stream window: "
                                 f"{pending.unacked + len(chunk)} bytes unacknowledged of "
                                 f"{INITIAL_WINDOW}")
            return
        if pending.ws is not None:
            if not pending.ws.from_service(flags, chunk):
                self._finish(pending)
                return
            if pending.deadline:
                self._rearm(pending)        # the service is sending: not idle
            pending.unacked += len(chunk)
            if not pending.ws.client_paused:
                self._grant(pending)
            return
        if pending.deadline:
            self._rearm(pending)            # the service is sending: not idle
        if chunk:
            # Held until this read's frames are done (or another frame comes between),
            # then written as one piece (_flush_out). Counted now: the window check above
            # sees what is held.
            if self._out is not pending:
                if self._out is not None:
                    self._flush_out()
                self._out = pending
            self._out_chunks.append(chunk)
            pending.unacked += len(chunk)
        if flags & _FLAG_END_STREAM:
            if self._out is not None:
                self._flush_out()
            self._finish(pending)
            pending.req.conn.end_stream(pending.req)

    def _flush_out(self):
        """The held pieces of one streamed answer, as one write to its client; credit back
        to the service if the client keeps up (as _stream_to_client)."""
        pending = self._out
        chunks = self._out_chunks
        self._out = None
        chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self.inflight.get(pending.corr) is not pending:
            return      # failed meanwhile (the link's protocol error): the client is cut
        if pending.req.conn.stream_chunk(pending.req, chunk):
            self._grant(pending)

    def _stream_to_client(self, pending, chunk):
        writable = pending.req.conn.stream_chunk(pending.req, chunk)
        pending.unacked += len(chunk)
        # Credit goes back only while the client keeps up, so a slow reader holds at most
        # one window plus the transport's buffer per stream: never an unbounded stream.
        if writable:
            self._grant(pending)

    def _client_writable(self, pending):
        if self.inflight.get(pending.corr) is pending:
            if pending.deadline:
                self._rearm(pending)        # the client took what it was sent: not idle
            self._grant(pending)

    def _grant(self, pending):
        if pending.unacked:
            self._encoder.window_update(pending.corr, pending.unacked)
            self._count_sent(fr.WINDOW_UPDATE)
            pending.unacked = 0
            self._schedule_flush()

    def _credit(self, pending, increment):
        """WINDOW_UPDATE for our stream: a WebSocket's, or a request body's."""
        window = pending.window + increment
        if window > _MAX_WINDOW:
            raise fr.FrameError("WINDOW_UPDATE past 2^31-1 bytes of credit")
        if pending.ws is not None:
            pending.window = window
            pending.ws.on_credit()
        elif pending.body_open:
            pending.window = window
            if pending.deadline:
                self._rearm(pending)       # the service is taking the body: not stuck
            self._send_body(pending)
            if not pending.body and not pending.body_end:
                pending.req.conn.resume_body(pending.req)

    # ---------------------------------------------------------------- requests to the service

    def send_request(self, req, endpoint, timeout, path, stream_threshold, sent_at):
        if self.state != _READY:
            # Selected as the link dropped: the loss has been handled for everything else.
            if not self._hub.worker.pipeline.retry(req, path, self.instance, endpoint):
                _reply_error(req, 502, "the service connection was lost")
            return
        held_size = 0
        if self._write_paused:
            # It would wait in `_held`: past the worker's heldRequestBudget it is answered
            # now, before anything is made for it (_held_room).
            held_size = self._held_room(req, stream_threshold)
            if held_size < 0:
                return
        self._corr_next += 1
        corr = corr_id(self._corr_prefix, self._corr_next)
        pending = _new_pending(corr, req, self, sent_at, self.peer_window, timeout)
        self.inflight[corr] = pending
        req.pending = pending
        req.upstream = self.instance
        pending.endpoint = endpoint
        pending.path = path
        if req.span is not None:
            tracing = self._hub.worker.tracing
            pending.span = tracing.child(req.span, "gateway.transport.send",
                                         **{"stellagw.service": req.service})
        if self._write_paused:
            # The service has not read what it was sent: this REQUEST waits its turn, its
            # body not read meanwhile; if the link drops or drains first, it goes elsewhere.
            pending.held = _HELD_REQUEST
            self._held_threshold = stream_threshold
            self._hold(pending, held_size)
            # What _held_room set aside for the body still to come (read until the client
            # is paused): counted when it arrives, only past that.
            pending.held_spare = held_size - _held_size(req)
            self._wheel.arm(pending, timeout, sent_at)
            return
        self._dispatch(pending, endpoint, timeout, path, stream_threshold, sent_at)

    def _dispatch(self, pending, endpoint, timeout, path, stream_threshold, sent_at):
        """The REQUEST out, with its body when it has it and it is small; a body still arriving
        is asked of the ingress (start_body) and follows through request_body()."""
        req = pending.req
        if req.websocket:
            # The request stream stays open: it carries the client's messages (protocol.md).
            identity = req.identity
            extra = identity.header_pairs if identity is not None else ()
            if pending.span is not None:
                # The service continues our trace, not the client's span.
                extra = list(extra) + self._hub.worker.tracing.traceparent(pending.span)
            headers = request_headers(req, req.client_ip, self._scheme, extra,
                                      keep_trace=req.span is None)
            headers.append((b"upgrade", b"websocket"))
            try:
                self._encoder.request(pending.corr, req.method, path, req.query, headers,
                                      int(timeout * 1000), 0, b"")
            except fr.FrameTooLarge as exc:
                self._head_too_large(pending, exc)
                return
            self._requests_sent += 1
        elif req.body_state == _B_OPEN:
            # The body is still arriving: the ingress hands it over through request_body().
            if (endpoint.streaming or req.content_length < 0
                    or req.content_length > stream_threshold):
                if self._small_frames:
                    if self._send_head_within(pending, path, b"", True) < 0:
                        return      # answered: the body is not read
                else:
                    self._send_head(pending, path, 0, b"")
                pending.body_open = True
                self._schedule_flush()
                self._wheel.arm(pending, timeout)
            else:
                pending.inline = []
            req.conn.start_body(req)
            return
        else:
            body = req.body
            if not self._send_whole(pending, path, body,
                                    len(body) > stream_threshold or (endpoint.streaming and body)):
                return
        self._schedule_flush()
        self._wheel.arm(pending, timeout, sent_at)

    def _send_whole(self, pending, path, body, streamed):
        """The REQUEST of a body the gateway holds whole: inside it, or after it as stream
        data when `streamed` or too large for the service's frames. False: the head alone
        does not fit the service's frames, and the client was answered."""
        if self._small_frames:
            fit = self._send_head_within(pending, path, body, streamed)
            if fit < 0:
                return False
            streamed = fit > 0
        else:
            self._send_head(pending, path, 0 if streamed else _FLAG_END_STREAM,
                            b"" if streamed else body)
        if streamed:
            pending.body_open = True
            pending.body.append(body)
            pending.body_end = True
            self._send_body(pending)
        else:
            pending.replayable = True       # the whole body went: a retry sends it again
        return True

    def _send_head(self, pending, path, flags, body):
        """The REQUEST frame: request_headers' rules applied while encoding."""
        req = pending.req
        identity = req.identity
        extra = identity.header_pairs if identity is not None else ()
        if pending.span is not None:
            extra = list(extra) + self._hub.worker.tracing.traceparent(pending.span)
        version = req.http_version
        self._encoder.request_forward(
            pending.corr, req.method, path, req.query, req.headers,
            int(pending.timeout * 1000), flags, body,
            CLASSES, classify, version is HTTP11 or version == "1.1", req.span is None, extra,
            req.client_ip, self._scheme, req.correlation_id)
        self._requests_sent += 1

    def _send_head_within(self, pending, path, body, streamed):
        """_send_head on a link whose service takes smaller frames than ours: a body that
        does not fit in its REQUEST follows it as stream data (protocol.md §1). 0: the
        REQUEST carries the body (END_STREAM); 1: it went without, the caller streams the
        body; -1: the head alone does not fit, nothing was sent and the client is answered
        (_head_too_large)."""
        if not streamed:
            try:
                self._send_head(pending, path, _FLAG_END_STREAM, body)
                return 0
            except fr.FrameTooLarge as exc:
                if not body:
                    return self._head_too_large(pending, exc)
        try:
            self._send_head(pending, path, 0, b"")
        except fr.FrameTooLarge as exc:
            return self._head_too_large(pending, exc)
        return 1

    def _head_too_large(self, pending, exc):
        """A REQUEST head (path, query, headers: the client's and the gateway's) larger than
        the service's max_frame_size: 431, as for any request head too large to take; the
        service hears nothing (protocol.md §1)."""
        self._finish(pending)
        req = pending.req
        self._log.event("info", "request head too large for the service",
                        service=req.service, route=req.route,
                        correlationId=req.correlation_id, frameLength=exc.length,
                        maxFrameSize=exc.limit)
        _reply_error(req, 431, "the request head is larger than the service accepts")
        return -1

    def request_body(self, pending, chunk, end):
        """The next piece of a request's body from the client (`end`: it is complete).
        False when some of it waits for the service's credit: the ingress then stops
        reading that client until resume_body()."""
        if self.inflight.get(pending.corr) is not pending:
            return True         # answered or cancelled meanwhile: the rest goes nowhere
        if pending.held == _HELD_REQUEST:
            # Not sent yet: what was read stays with the request, as before it was decided,
            # and the client is paused until the REQUEST goes (_release_held).
            req = pending.req
            if req.held is None:
                req.held = []
            if chunk:
                req.held.append(chunk)
                n = len(chunk) - pending.held_spare
                if n > 0:
                    # Read past what it set aside (a read goes on after the client is
                    # paused): counted, and past the budget refused as a newcomer would be —
                    # nothing of it was sent. So the budget is a bound, not a target.
                    pending.held_spare = 0
                    pending.held_size += n
                    budget = self._hub.held
                    budget.bytes += n
                    if budget.bytes > budget.budget:
                        self._finish(pending)
                        self._refuse_held(req)
                        return True
                else:
                    pending.held_spare = -n
            if not end:
                return False
            held = req.held
            req.body = held[0] if len(held) == 1 else b"".join(held)
            req.held = None
            return True
        inline = pending.inline
        if inline is not None:
            # A small body of known length: one REQUEST with the body inside, when complete.
            if chunk:
                inline.append(chunk)
            if end:
                pending.inline = None
                body = inline[0] if len(inline) == 1 else b"".join(inline)
                pending.req.body = body          # whole and small: a retry sends it again
                self._wheel.arm(pending, pending.timeout)
                if self._write_paused:
                    # Paused again before its REQUEST went: it waits, within the budget
                    # like a newcomer (nothing was sent).
                    n = _held_size(pending.req)
                    budget = self._hub.held
                    if budget.bytes + n > budget.budget:
                        self._finish(pending)
                        self._refuse_held(pending.req)
                        return True
                    pending.held = _HELD_INLINE
                    self._hold(pending, n)
                elif self._send_whole(pending, pending.path, body, False):
                    self._schedule_flush()
            return True
        if chunk:
            pending.body.append(chunk)
        if end:
            pending.body_end = True
        if pending.deadline:
            self._rearm(pending)    # the body moves: the answer is not due yet
        self._send_body(pending)
        return not pending.body

    def _send_body(self, pending):
        """REQUEST_STREAM_DATA for what the window allows; END_STREAM once it is all out."""
        chunk_size = self._hub.chunk_size      # the hub's: a reload changes it
        if chunk_size > self.max_chunk:
            chunk_size = self.max_chunk
        queue = pending.body
        if self._write_paused and queue and pending.window > 0:
            if not pending.held:
                pending.held = _HELD_STREAM
                self._hold(pending, 0)
            return
        while queue and pending.window > 0:
            chunk = queue[0]
            pos = pending.body_pos
            n = min(chunk_size, len(chunk) - pos, pending.window)
            end = pos + n
            if end >= len(chunk):
                del queue[0]
                pending.body_pos = 0
            else:
                pending.body_pos = end
            last = pending.body_end and not queue
            self._encoder.stream_data(_REQUEST_STREAM_DATA, pending.corr,
                                      _FLAG_END_STREAM if last else 0,
                                      chunk if pos == 0 and end == len(chunk) else chunk[pos:end])
            pending.window -= n
            self._count_sent(_REQUEST_STREAM_DATA)
            if last:
                pending.body_open = False
        if pending.body_end and not queue and pending.body_open:
            self._encoder.stream_data(_REQUEST_STREAM_DATA, pending.corr, _FLAG_END_STREAM, b"")
            self._count_sent(_REQUEST_STREAM_DATA)
            pending.body_open = False
        if not pending.body_open and pending.body_end and pending.deadline:
            # The request is complete: the service's time to answer starts now.
            self._rearm(pending)
        self._schedule_flush()

    def _rearm(self, pending):
        _disarm(pending)
        self._wheel.arm(pending, pending.timeout)

    def _timeout(self, pending):
        if self.inflight.get(pending.corr) is not pending:
            return
        pending.deadline = 0.0
        self._cancel(pending, "Timeout")
        self._hub.count_timeout()
        if pending.ws is not None:
            # streamIdleTimeout on a WebSocket: no message either way. Neither side's
            # failure (a quiet WebSocket is not a stalled service): 1001 to the client,
            # CANCEL(Timeout) to the service's handler.
            req = pending.req
            self._log.event("info", "websocket idle: closed", service=req.service,
                            route=req.route, correlationId=req.correlation_id,
                            idleSeconds=pending.timeout)
            pending.ws.idle_close()
            return
        if not pending.streaming:
            self._failed(TIMEOUT)
        else:
            # streamIdleTimeout: the status is out, so the client is cut (_fail). Credit held
            # back means the client had not taken what it was sent: the stream waited on the
            # client, which is no failure of the service's (outlier detection).
            waited_on = "client" if pending.unacked else "service"
            if waited_on == "service":
                self._failed(TIMEOUT)
            req = pending.req
            self._log.event("warning", "streamed response idle: ended", service=req.service,
                            route=req.route, correlationId=req.correlation_id,
                            waitingOn=waited_on, idleSeconds=pending.timeout)
        self._fail(pending, 504, "the service did not answer in time")

    def requests_sent(self):
        """Requests sent on this link so far (their correlation ids number them): read for
        gateway_version_requests_total at scrape time, never per request."""
        return self._corr_next

    def _failed(self, reason):
        """A 5xx answer or a timeout: the routing state ejects an instance whose link has
        too many in a row (routing/state.py failed)."""
        self._failures += 1
        if self.instance is not None:
            self._routing.failed(self.instance, self._failures, reason)

    def _client_gone(self, pending, reason):
        if self.inflight.get(pending.corr) is pending:
            self._cancel(pending, reason)

    def cancel_all(self, reason):
        """Gateway shutdown at the drain deadline: CANCEL(Shutdown) for what is left."""
        for pending in list(self.inflight.values()):
            self._cancel(pending, reason)
            if pending.ws is not None:
                # The gateway is going away, not the service: 1001, not 1011 (RFC 6455
                # §7.4.1), so the client reconnects, through another gateway.
                pending.ws.going_away()
            else:
                self._fail(pending, 503, "the gateway is shutting down")

    def _cancel(self, pending, reason):
        # A small body still being collected (`inline`) means its REQUEST has not gone out:
        # the service has nothing to cancel.
        sent = pending.inline is None and pending.held != _HELD_REQUEST \
            and pending.held != _HELD_INLINE
        self._finish(pending)
        if sent and self.state == _READY:
            self._encoder.control(fr.CANCEL, pending.corr, {"reason": reason})
            self._count_sent(fr.CANCEL)
            self._schedule_flush()

    def _finish(self, pending):
        pending.deadline = 0.0          # _disarm, inlined: this runs for every request
        bucket = pending.bucket
        if bucket is not None:
            bucket.discard(pending)
            pending.bucket = None
        self.inflight.pop(pending.corr, None)
        if pending.inline is not None or pending.body:
            pending.inline = None
            pending.body = []
        if pending.span is not None:
            pending.span.end()
            pending.span = None
        if pending.held:
            # Finished while it waited in _held (its client left, its timeout fired): the
            # release skips it, but until then it kept its request (head and body, ~80 KB)
            # — clients sending and leaving while the link stayed over high water grew
            # _held without bound (docs/security.md §3d, "held requests"). Dropped once
            # the finished ones are half of what waits. Its bytes leave the budget at once.
            if pending.held_size:
                self._hub.held.bytes -= pending.held_size
            pending.held = 0
            self._held_dead += 1
            if self._held_dead >= _HELD_COMPACT and 2 * self._held_dead >= len(self._held):
                held = self._held
                live = [p for p in held if p.held]
                held.clear()
                held.extend(live)
                self._held_dead = 0

    def _lost(self, pending, message):
        """The link broke or the service cancelled before answering: another instance may
        take the request (transport/retry.py), else 502."""
        if (pending.replayable and not pending.streaming and pending.ws is None
                and self._hub.worker.pipeline.retry(pending.req, pending.path, self.instance,
                                                    pending.endpoint)):
            return
        self._fail(pending, 502, message)

    def _fail(self, pending, status, message):
        req = pending.req
        if pending.ws is not None:
            pending.ws.abort()
            return
        if pending.streaming:
            req.conn.abort_stream(req, status)
        else:
            _reply_error(req, status, message)

    # ---------------------------------------------------------------- writing

    def fold_counts(self):
        """Move the REQUEST and RESPONSE frames counted since the last fold into the
        worker's frame counts (before a metrics snapshot, and when the link closes)."""
        frames = self._frame_counts
        if self._requests_sent:
            frames[_REQUEST] = frames.get(_REQUEST, 0) + self._requests_sent
            self._requests_sent = 0
        if self._responses_received:
            frames[_RESPONSE] = frames.get(_RESPONSE, 0) + self._responses_received
            self._responses_received = 0

    def _count_sent(self, ftype, n=1):
        frames = self._frame_counts
        frames[ftype] = frames.get(ftype, 0) + n

    def _schedule_flush(self):
        self._writes.added()

    def _flush(self):
        if self._writes.write(self.transport if self.state != _CLOSED else None):
            if self._write_paused and self.transport.get_write_buffer_size() > self._write_limit:
                self._close_link("write_buffer_full",
                                 f"over {self._write_limit} bytes wait for a service that is "
                                 f"not reading", False)

    def pause_writing(self):
        """The transport's buffer passed writeBufferHighWater: the service is not reading."""
        self._write_paused = True
        self._paused_since = self._loop.time()
        self._hub.backpressure("paused")

    def resume_writing(self):
        self._write_paused = False
        if self._ping_since:
            # A PING behind a buffer the service was not taking may not have reached it:
            # its time to answer starts now.
            self._ping_since = self._loop.time()
        if self._held and not self._release_scheduled:
            # Soon, not from inside the transport's callback.
            self._release_scheduled = True
            self._loop.call_soon(self._release_held)

    def _hold(self, pending, size):
        """`pending` waits in `_held`; `size`: what it keeps meanwhile, counted in the
        worker's held.bytes until it leaves (_release_held, or _finish for every other way:
        answered, timed out, its client gone, moved elsewhere, the link lost)."""
        pending.held_size = size
        if size:
            self._hub.held.bytes += size
        self._held.append(pending)
        self._hub.backpressure("held")

    def _held_room(self, req, stream_threshold):
        """What a new request would keep while it waits in `_held` — with its body still
        arriving, up to `stream_threshold` more of it, set aside now so that heads admitted
        alone cannot grow past the budget with their bodies — or -1: the worker's
        gateway.transports.heldRequestBudget is spent, and it was answered 503 with
        Retry-After, nothing sent to the service and its body not read further. Each waits
        with its head and up to max(streamingBufferSize, 64 KiB) of body (~80 KB): with
        maxConnections clients sending to slow services, 800 MB a worker, unbounded
        (docs/security.md §3d, "held request budget")."""
        size = _held_size(req)
        if req.body_state == _B_OPEN:
            rest = req.content_length - req.body_size
            size += stream_threshold if req.content_length < 0 or rest > stream_threshold \
                else rest
        held = self._hub.held
        if held.bytes + size <= held.budget:
            return size
        self._refuse_held(req)
        return -1

    def _refuse_held(self, req):
        """503 with Retry-After for a request that would wait past the held budget; with its
        body still arriving the connection closes, the rest not read."""
        self._hub.backpressure("held_refused")
        req.conn.respond(req, 503, _JSON + self._routing.retry_after,
                         error_body(503, f"too many requests wait for {req.service}",
                                    req.correlation_id))

    def hold_for_link(self, pending):
        """The WebSocket bridge's check before it relays client data: True when the link is
        over high water (the data waits; the bridge is called back through on_credit)."""
        if not self._write_paused:
            return False
        if not pending.held:
            pending.held = _HELD_STREAM
            self._hold(pending, 0)
        return True

    def _send_elsewhere(self, pending, draining):
        """A REQUEST that waited in `_held` and never went: to another instance, whatever its
        method (pipeline.reroute); else 503 when this instance is draining (as a new request
        gets), 502 when its link was lost."""
        req = pending.req
        self._finish(pending)
        pending.held = 0
        if self._hub.worker.pipeline.reroute(req, pending.path, self.instance, pending.sent_at):
            if req.body_state == _B_OPEN and req.pending is not None and not req.pending.body:
                req.conn.resume_body(req)     # paused while it waited here
            return
        if draining:
            _reply_error(req, 503, f"no healthy instance of {req.service}")
        else:
            _reply_error(req, 502, "the service connection was lost")

    def _release_held(self):
        """What waited for the link, in arrival order, until it is over high water again."""
        self._release_scheduled = False
        held = self._held
        while held and not self._write_paused and self.state == _READY:
            pending = held.popleft()
            kind = pending.held
            if not kind:
                self._held_dead -= 1
                continue            # answered, timed out or cancelled meanwhile (_finish)
            if pending.held_size:
                self._hub.held.bytes -= pending.held_size
            pending.held = 0
            if self.inflight.get(pending.corr) is not pending:
                continue
            if kind == _HELD_REQUEST:
                _disarm(pending)
                req = pending.req
                self._dispatch(pending, pending.endpoint, pending.timeout, pending.path,
                               self._held_threshold, pending.sent_at)
                if req.body_state == _B_OPEN and not pending.body:
                    req.conn.resume_body(req)     # paused by request_body while it waited
            elif kind == _HELD_INLINE:
                if self._send_whole(pending, pending.path, pending.req.body, False):
                    self._schedule_flush()
            elif pending.ws is not None:
                pending.ws.on_credit()
            else:
                self._send_body(pending)
                if not pending.body and not pending.body_end:
                    pending.req.conn.resume_body(pending.req)

    def send_drain(self, deadline_ms):
        if self.state == _READY:
            self._encoder.control(fr.DRAIN, fr.ZERO_CORR,
                                  {"reason": "gateway shutting down", "deadline_ms": deadline_ms})
            self._flush()

    # ---------------------------------------------------------------- errors

    def _hello_timeout(self):
        self._hello_timer = None
        if self.state == _AWAIT_HELLO:
            self._close_link("hello_timeout", f"no HELLO within {HELLO_TIMEOUT:.0f}s", True)

    def _refuse(self, code, reason, message, hello):
        """protocol.md §5.5: a refused HELLO gets HELLO_ACK{error} and the connection closes.
        `reason` labels gateway_service_registrations_refused_total."""
        claimed = hello.get("service") if isinstance(hello, dict) else None
        self._hub.registration_refused(reason)
        self._log.event("warning", "service registration refused", peer=_peer(self.peer),
                        service=claimed[:64] if isinstance(claimed, str) else None,
                        code=code, reason=reason, detail=message)
        self._encoder.control(fr.HELLO_ACK, fr.ZERO_CORR,
                              {"protocol": fr.PROTOCOL_VERSION, "error": {"code": code, "message": message}})
        self._close_link("refused", None, True)

    def refuse_late(self, message):
        """A HELLO that had to wait its turn was refused when routed (RoutingState.on_refused):
        acknowledged already, so the link is closed without a HELLO_ACK."""
        self._hub.registration_refused("invalid_hello")
        self._close_link("refused", message, True)

    def _protocol_error(self, reason):
        self._close_link("protocol_error", reason, True)

    def sweep(self, now, silent_after):
        """The hub's health check, every checkIntervalSeconds (loop time `now`): a link that
        sent no frame, took nothing we wrote, or answered no PING for `silent_after` seconds
        is dead, wedged or hostile. Silence is measured from the sweep that last saw a frame, so it is never
        overestimated: a link is closed late by up to one interval, never early."""
        if self.state != _READY:
            return
        if self._frames != self._frames_seen:
            self._frames_seen = self._frames
            self._quiet_since = now
        elif now - self._quiet_since >= silent_after:
            self._close_link("silent", f"no frame for {now - self._quiet_since:.1f}s", False)
            return
        if self._write_paused:
            if now - self._paused_since >= silent_after:
                self._close_link("not_reading", f"it has read nothing we sent for "
                                 f"{now - self._paused_since:.1f}s", False)
        elif self._ping_since and now - self._ping_since >= silent_after:
            # Heartbeats still come (a timer thread) but nothing we send is read, or nothing
            # read is acted on: routed to, it would time out every request (protocol.md §5.3).
            self._close_link("unanswered_ping", f"no PONG for "
                             f"{now - self._ping_since:.1f}s", False)

    def _close_link(self, reason, detail, graceful):
        """Close, counted by `reason` (gateway_service_links_closed_total) and logged with
        `detail` (None: logged already). Graceful lets what is queued go first (a refusal's
        HELLO_ACK) when the peer is taking what we write; otherwise the link is cut at
        once, so a peer that stopped reading does not keep our buffers."""
        if self.state == _CLOSED:
            return
        self.state = _CLOSED
        self._hub.link_closed(reason)
        if detail is not None:
            self._log.event("warning", "service connection closed", reason=reason,
                            detail=detail, peer=_peer(self.peer),
                            service=self.instance.service if self.instance is not None else None)
        transport = self.transport
        if transport is not None:
            if graceful and len(self._encoder):
                transport.write(self._encoder.take())
            if graceful and not transport.get_write_buffer_size():
                transport.close()
            else:
                transport.abort()
        self._release_buffers()

    def _release_buffers(self):
        # Now, not when the last reference goes: the instance and failed requests may keep
        # this object a while, and a partial frame can be maxFrameSize bytes.
        self._encoder.take()
        self._decoder = fr.FrameDecoder(self._hub.max_frame_size)


_gc_holds = [0, None]      # links decoding a registration; the thresholds they replaced


def _gc_hold(hold):
    """No full collection while registrations are decoded: each of the millions of fresh
    objects' promotions set one off, scanning the whole heap on the loop (300 ms at the end
    of a 16 MB update, a dozen times). Young collections go on, a slice's worth each; turning
    collection off instead left them all to one collection of 260 ms after it."""
    if hold:
        _gc_holds[0] += 1
        if _gc_holds[0] == 1:
            _gc_holds[1] = gc.get_threshold()
            gc.set_threshold(_gc_holds[1][0], _gc_holds[1][1], 1 << 30)
    else:
        _gc_holds[0] -= 1
        if _gc_holds[0] == 0:
            gc.set_threshold(*_gc_holds[1])


def _fits(ftype, obj, limit):
    """Does control frame `ftype` with `obj` fit in `limit` bytes (a HELLO time check)?"""
    try:
        fr.FrameEncoder(limit).control(ftype, fr.ZERO_CORR, obj)
    except fr.FrameTooLarge:
        return False
    return True


def _disarm(pending):
    """No timeout any more: out of the timer wheel now, so it holds only what can expire."""
    pending.deadline = 0.0
    bucket = pending.bucket
    if bucket is not None:
        bucket.discard(pending)
        pending.bucket = None


def _held_size(req):
    """A waiting request's bytes as the held budget counts them: its target, its header
    names and values, and the body read so far (the rest, read while it waits, is added by
    request_body)."""
    size = len(req.target) + req.body_size
    for name, value in req.headers:
        size += len(name) + len(value)
    return size


def _reply_error(req, status, message):
    req.conn.respond(req, status, _JSON, error_body(status, message, req.correlation_id))


def _peer(peer):
    if not peer:
        return None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
