"""Frame codec of the gateway <-> microservice transport (wire format: docs/protocol.md).

The codec itself is compiled (cext/frame.pyx -> stellagw._cext.frame) with a pure-Python
twin (stellagw._py.frame), imported below (STELLAGW_NO_EXTENSIONS=1 takes the twin). This
module re-exports it, plus a few pure-Python helpers that are not on the hot path. The
service SDK (stellagw/service/) speaks the same protocol through it.

Usage::

    dec = FrameDecoder()                    # one per connection
    dec.feed(data)                          # in data_received
    while (frame := dec.next()) is not None:
        ftype, corr, payload = frame        # payload: use now, or bytes(payload)
        if ftype == RESPONSE:
            flags, status, headers, body = decode_response(payload)

    enc = FrameEncoder()                    # one per connection
    enc.request(corr, "GET", "/x", b"", [(b"host", b"a")], 5000, FLAG_END_STREAM, b"")
    transport.write(enc.take())             # once per loop iteration (or per WRITE_BATCH)
"""
from __future__ import annotations

import struct

from .. import _impl

if _impl.NO_EXTENSIONS:
    from .._py import frame as _m
else:
    try:
        from .._cext import frame as _m
    except ImportError as exc:
        _impl.fell_back("frame", exc)
        from .._py import frame as _m

HEADER_SIZE = _m.HEADER_SIZE
MIN_LENGTH = _m.MIN_LENGTH
DEFAULT_MAX_FRAME_SIZE = _m.DEFAULT_MAX_FRAME_SIZE
PROTOCOL_VERSION = _m.PROTOCOL_VERSION
MAX_HEADERS = _m.MAX_HEADERS
MAX_METHOD_LENGTH = _m.MAX_METHOD_LENGTH
ZERO_COPY_MIN = _m.ZERO_COPY_MIN
ZERO_CORR = _m.ZERO_CORR

# How many frames (and bytes of them) a connection holds before it writes them. The frames
# produced in one loop iteration go out in one write (one syscall, one wake-up of the
# peer), but a burst -- the backlog after a stall -- written as one block makes the two ends
# take turns: the peer starts on the first request only once the last is encoded, and then
# the writer waits for it. Past WRITE_BATCH frames the block goes out at once and the peer
# works on it while the rest is produced. The drain after each stall of the machine is
# what made the p99 at 50 % load (docs/hot-path.md, perf/README.md). Frames, not bytes:
# what the peer waits for is the time each one takes to produce (a 4 KiB bound split the
# larger DPoP-authenticated requests into writes of a few frames: ~2 µs a request more at
# full load).
WRITE_BATCH = 16
WRITE_BATCH_BYTES = 64 * 1024

HELLO = _m.HELLO
HEARTBEAT = _m.HEARTBEAT
ENDPOINTS_UPDATE = _m.ENDPOINTS_UPDATE
REQUEST = _m.REQUEST
REQUEST_STREAM_DATA = _m.REQUEST_STREAM_DATA
RESPONSE = _m.RESPONSE
RESPONSE_STREAM_DATA = _m.RESPONSE_STREAM_DATA
CANCEL = _m.CANCEL
HELLO_ACK = _m.HELLO_ACK
DRAIN = _m.DRAIN
PING = _m.PING
PONG = _m.PONG
WINDOW_UPDATE = _m.WINDOW_UPDATE

FLAG_END_STREAM = _m.FLAG_END_STREAM
FLAG_MORE = _m.FLAG_MORE
STREAM_KIND_MASK = _m.STREAM_KIND_MASK
KIND_DATA = _m.KIND_DATA
KIND_TEXT = _m.KIND_TEXT
KIND_BINARY = _m.KIND_BINARY
KIND_CLOSE = _m.KIND_CLOSE
KIND_PING = _m.KIND_PING
KIND_PONG = _m.KIND_PONG
MAX_WINDOW_INCREMENT = _m.MAX_WINDOW_INCREMENT

HEADER_KEEP = _m.HEADER_KEEP
HEADER_DROP = _m.HEADER_DROP
HEADER_CONNECTION = _m.HEADER_CONNECTION
HEADER_HOST = _m.HEADER_HOST
HEADER_TE = _m.HEADER_TE
HEADER_TRACE = _m.HEADER_TRACE

FrameError = _m.FrameError
FrameTooLarge = _m.FrameTooLarge
FrameDecoder = _m.FrameDecoder
FrameEncoder = _m.FrameEncoder
decode_request = _m.decode_request
decode_response = _m.decode_response
decode_response_block = _m.decode_response_block
decode_stream_data = _m.decode_stream_data
decode_control = _m.decode_control
decode_window_update = _m.decode_window_update
corr_id = _m.corr_id

# --- protocol vocabulary (docs/protocol.md) -------------------------------------------

FRAME_TYPE_NAMES = {
    HELLO: "HELLO", HEARTBEAT: "HEARTBEAT", ENDPOINTS_UPDATE: "ENDPOINTS_UPDATE",
    REQUEST: "REQUEST", REQUEST_STREAM_DATA: "REQUEST_STREAM_DATA", RESPONSE: "RESPONSE",
    RESPONSE_STREAM_DATA: "RESPONSE_STREAM_DATA", CANCEL: "CANCEL", HELLO_ACK: "HELLO_ACK",
    DRAIN: "DRAIN", PING: "PING", PONG: "PONG", WINDOW_UPDATE: "WINDOW_UPDATE",
}
CONTROL_TYPES = frozenset((HELLO, HEARTBEAT, ENDPOINTS_UPDATE, CANCEL, HELLO_ACK, DRAIN))

# CANCEL reasons; the first four are the original Router's, "Aborted" is service -> gateway.
CANCEL_CLIENT_DISCONNECTED = "ClientDisconnected"
CANCEL_TIMEOUT = "Timeout"
CANCEL_PAYLOAD_LIMIT_EXCEEDED = "PayloadLimitExceeded"
CANCEL_SHUTDOWN = "Shutdown"
CANCEL_ABORTED = "Aborted"
CANCEL_REASONS = (CANCEL_CLIENT_DISCONNECTED, CANCEL_TIMEOUT, CANCEL_PAYLOAD_LIMIT_EXCEEDED,
                  CANCEL_SHUTDOWN, CANCEL_ABORTED)

HEALTH_STATUSES = ("Healthy", "Degraded", "Draining", "Unhealthy")

INITIAL_STREAM_WINDOW = 256 * 1024     # per stream, per direction, unless HELLO(_ACK) says
# The smallest max_frame_size a service may announce in its HELLO (docs/protocol.md §1):
# below it, the fields the gateway adds to every REQUEST (x-forwarded-*, x-correlation-id,
# identity, traceparent: a few hundred bytes) leave little or nothing of a frame for the
# client's own head.
MIN_SERVICE_FRAME_SIZE = 1024
HEARTBEAT_INTERVAL_MS = 10_000
PING_PAYLOAD_MAX = 64

_close_head = struct.Struct(">H")


def stream_kind(flags: int) -> int:
    """The KIND_* value of STREAM_DATA flags."""
    return flags & STREAM_KIND_MASK


def ws_close_payload(code: int | None = None, reason: str = "") -> bytes:
    """Chunk of a KIND_CLOSE stream-data frame: empty, or u16 code + UTF-8 reason."""
    if code is None:
        if reason:
            raise FrameError("WebSocket close: a reason needs a code")
        return b""
    raw = reason.encode("utf-8")
    if not 1000 <= code <= 4999 or len(raw) > 123:
        raise FrameError("WebSocket close: code must be 1000-4999 and reason <= 123 bytes")
    return _close_head.pack(code) + raw


def parse_ws_close(chunk) -> tuple[int | None, str]:
    """(code or None, reason) from the chunk of a KIND_CLOSE frame (RFC 6455 §5.5.1)."""
    chunk = bytes(chunk)
    if not chunk:
        return None, ""
    if len(chunk) < 2 or len(chunk) > 125:
        raise FrameError(f"WebSocket close: payload of {len(chunk)} bytes")
    try:
        reason = chunk[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("WebSocket close: reason is not valid UTF-8") from None
    return _close_head.unpack_from(chunk)[0], reason


__all__ = [
    "HEADER_SIZE", "MIN_LENGTH", "DEFAULT_MAX_FRAME_SIZE", "PROTOCOL_VERSION", "MAX_HEADERS",
    "MAX_METHOD_LENGTH", "ZERO_COPY_MIN", "ZERO_CORR",
    "HELLO", "HEARTBEAT", "ENDPOINTS_UPDATE", "REQUEST", "REQUEST_STREAM_DATA", "RESPONSE",
    "RESPONSE_STREAM_DATA", "CANCEL", "HELLO_ACK", "DRAIN", "PING", "PONG", "WINDOW_UPDATE",
    "FLAG_END_STREAM", "FLAG_MORE", "STREAM_KIND_MASK", "KIND_DATA", "KIND_TEXT",
    "KIND_BINARY", "KIND_CLOSE", "KIND_PING", "KIND_PONG", "MAX_WINDOW_INCREMENT",
    "HEADER_KEEP", "HEADER_DROP", "HEADER_CONNECTION", "HEADER_HOST", "HEADER_TE",
    "HEADER_TRACE",
    "FrameError", "FrameTooLarge", "FrameDecoder", "FrameEncoder",
    "decode_request", "decode_response", "decode_response_block", "decode_stream_data",
    "decode_control", "decode_window_update", "corr_id",
    "FRAME_TYPE_NAMES", "CONTROL_TYPES", "CANCEL_CLIENT_DISCONNECTED", "CANCEL_TIMEOUT",
    "CANCEL_PAYLOAD_LIMIT_EXCEEDED", "CANCEL_SHUTDOWN", "CANCEL_ABORTED", "CANCEL_REASONS",
    "HEALTH_STATUSES", "INITIAL_STREAM_WINDOW", "MIN_SERVICE_FRAME_SIZE", "HEARTBEAT_INTERVAL_MS",
    "PING_PAYLOAD_MAX",
    "stream_kind", "ws_close_payload", "parse_ws_close",
]
