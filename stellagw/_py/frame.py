"""Frame codec, pure-Python twin of cext/frame.pyx (same API, same bytes, same errors).

The wire format is specified in docs/protocol.md; this module is the executable reference
for it. tests/codecs/test_frame.py runs every test against both implementations and checks that
they agree byte for byte and error message for error message, so any change here must be
mirrored in cext/frame.pyx (and the other way round).
"""
from __future__ import annotations

import operator
import re
import struct

import orjson

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
]

# --- constants (docs/protocol.md §2-§5) -------------------------------------------------
HEADER_SIZE = 21                 # u32 length + u8 type + 16-byte correlation id
MIN_LENGTH = 17                  # smallest legal length field: type + correlation id
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024   # limit on the length field (17 + payload)
PROTOCOL_VERSION = 1
MAX_HEADERS = 256
MAX_METHOD_LENGTH = 16
# Payloads at least this long that lie wholly inside the bytes object given to feed() are
# handed out as memoryviews into it; shorter ones are copied (a copy is cheaper than a view).
ZERO_COPY_MIN = 1024
ZERO_CORR = bytes(16)            # correlation id of connection-level frames

HELLO = 1
HEARTBEAT = 2
ENDPOINTS_UPDATE = 3
REQUEST = 4
REQUEST_STREAM_DATA = 5
RESPONSE = 6
RESPONSE_STREAM_DATA = 7
CANCEL = 8
HELLO_ACK = 9
DRAIN = 10
PING = 11
PONG = 12
WINDOW_UPDATE = 13
_LAST_TYPE = WINDOW_UPDATE

FLAG_END_STREAM = 0x01           # REQUEST/RESPONSE: body complete; STREAM_DATA: last chunk
STREAM_KIND_MASK = 0x0E          # STREAM_DATA bits 1-3, values below are pre-shifted
KIND_DATA = 0x00                 # HTTP body bytes, or a WebSocket continuation fragment
KIND_TEXT = 0x02
KIND_BINARY = 0x04
KIND_CLOSE = 0x06
KIND_PING = 0x08
KIND_PONG = 0x0A
FLAG_MORE = 0x10                 # WebSocket: this message continues in the next frame
_STREAM_RESERVED = 0xE0
_KIND_LAST = KIND_PONG
MAX_WINDOW_INCREMENT = 0x7FFFFFFF

# What FrameEncoder.request_forward does with a client's header, by the kind the caller's
# classification gives its name (stellagw/transport/headers.py owns that policy).
HEADER_KEEP = 0                  # forwarded
HEADER_DROP = 1                  # never forwarded
HEADER_CONNECTION = 2            # dropped, and so is every header its value names
HEADER_HOST = 3                  # forwarded, and its value becomes x-forwarded-host
HEADER_TE = 4                    # dropped; "trailers" is forwarded again on HTTP/1.1
HEADER_TRACE = 5                 # forwarded unless the gateway's own trace context replaces it

_CONTROL_TYPES = frozenset((HELLO, HEARTBEAT, ENDPOINTS_UPDATE, CANCEL, HELLO_ACK, DRAIN))

_U16_MAX = 0xFFFF
_U32_MAX = 0xFFFFFFFF
_LLONG_MIN = -(1 << 63)
_LLONG_MAX = (1 << 63) - 1

_be16 = struct.Struct(">H")
_be32 = struct.Struct(">I")
_header = struct.Struct(">IB")
_req_fixed = struct.Struct(">BI")
_u16_unpack = _be16.unpack_from
_u32_unpack = _be32.unpack_from

# RFC 9110 §5.6.2 token characters; header names must also be lowercase (§4 of the doc).
_TCHAR = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_TOKEN_RE = re.compile(b"[" + re.escape(_TCHAR) + b"]+")
_NAME_RE = re.compile(b"[" + re.escape(_TCHAR[:-26]) + b"]+")
_BAD_VALUE_RE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")

_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")}


class FrameError(ValueError):
    """Malformed frame or frame field; the message names the field or limit."""


class FrameTooLarge(FrameError):
    """A frame longer than max_frame_size. `limit` is that max_frame_size; `length` is the
    frame's length field (FrameDecoder.next), or, from an encoder, the length the frame had
    reached when the field that does not fit was added (a lower bound: encoding stops there)."""

    def __init__(self, message, length, limit):
        FrameError.__init__(self, message)
        self.length = length
        self.limit = limit


def _as_llong(value):
    # The Cython codec converts these arguments to a C long long; mirror its errors.
    value = operator.index(value)
    if not _LLONG_MIN <= value <= _LLONG_MAX:
        raise OverflowError("Python int too large to convert to C long long")
    return value


def _check_max(max_frame_size):
    max_frame_size = _as_llong(max_frame_size)
    if not MIN_LENGTH <= max_frame_size <= _U32_MAX:
        raise ValueError(f"max_frame_size must be between {MIN_LENGTH} and {_U32_MAX}")
    return max_frame_size


def _check_header(length, ftype, have_type, max_frame):
    # Called as soon as the 4 (or 5) header bytes are in: nothing is allocated for a frame
    # before its length and type are known to be legal.
    if length < MIN_LENGTH:
        raise FrameError(f"frame length {length} is below the minimum {MIN_LENGTH}")
    if length > max_frame:
        raise FrameTooLarge(f"frame length {length} exceeds max_frame_size {max_frame}",
                            length, max_frame)
    if have_type and not 1 <= ftype <= _LAST_TYPE:
        raise FrameError(f"unknown frame type {ftype}")


# --- decoder ----------------------------------------------------------------------------

class FrameDecoder:
    """Sans-IO frame reader: feed() bytes as they arrive, call next() until it returns None.

    next() returns (ftype, corr, payload). The payload is read-only: `bytes`, or, for a
    payload of at least ZERO_COPY_MIN bytes lying wholly inside a `bytes` object given to
    feed() while nothing else was buffered, a memoryview into that object. Contract: use it
    before the next feed(), or copy it with bytes(). (Views are only ever taken of immutable
    `bytes` objects, never of the decoder's own buffer, so in practice they stay valid.)
    After a FrameError the stream is unusable: next() raises it again; close the connection.
    """

    __slots__ = ("_max", "_buf", "_pos", "_chunk", "_cpos", "_cview")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max = _check_max(max_frame_size)
        self._buf = bytearray()   # bytes kept across feed() calls (partial frames)
        self._pos = 0             # first unconsumed byte of _buf
        self._chunk = None        # the bytes object of the last feed(), read in place
        self._cpos = 0            # first unconsumed byte of _chunk
        self._cview = None        # memoryview(_chunk), made on the first zero-copy payload

    def set_max_frame_size(self, max_frame_size):
        """A new limit from the next frame header on (a link's HELLO is held to a smaller
        one than what follows it). A header already checked stays checked."""
        self._max = _check_max(max_frame_size)

    def feed(self, data):
        chunk = self._chunk
        if chunk is not None:
            # The previous chunk ended in a partial frame: keep its tail, drop the chunk.
            if self._cpos < len(chunk):
                self._buf += memoryview(chunk)[self._cpos:]
            self._chunk = self._cview = None
        if type(data) is bytes and self._pos == len(self._buf):
            if self._pos:
                self._buf.clear()
                self._pos = 0
            if data:
                self._chunk = data
                self._cpos = 0
            return
        if self._pos:
            # Compact once per feed (per batch of frames), never per frame.
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next(self):
        chunk = self._chunk
        if chunk is not None:
            pos = self._cpos
            avail = len(chunk) - pos
            if avail < 4:
                return None
            length = _u32_unpack(chunk, pos)[0]
            _check_header(length, chunk[pos + 4] if avail > 4 else 0, avail > 4, self._max)
            end = pos + 4 + length
            if avail < 4 + length:
                return None
            ftype = chunk[pos + 4]
            corr = chunk[pos + 5:pos + 21]
            if length - MIN_LENGTH >= ZERO_COPY_MIN:
                view = self._cview
                if view is None:
                    view = self._cview = memoryview(chunk)
                payload = view[pos + 21:end]
            else:
                payload = chunk[pos + 21:end]
            if end == len(chunk):
                self._chunk = self._cview = None
            else:
                self._cpos = end
            return ftype, corr, payload
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 4:
            return None
        length = _u32_unpack(buf, pos)[0]
        _check_header(length, buf[pos + 4] if avail > 4 else 0, avail > 4, self._max)
        if avail < 4 + length:
            return None
        end = pos + 4 + length
        ftype = buf[pos + 4]
        corr = bytes(buf[pos + 5:pos + 21])
        payload = bytes(buf[pos + 21:end])
        self._pos = end
        return ftype, corr, payload

    def at_frame_boundary(self):
        if self._chunk is not None and self._cpos < len(self._chunk):
            return False
        return self._pos == len(self._buf)


# --- payload decoders -------------------------------------------------------------------

def _take_len(p, pos, n, width, kind, field):
    if pos + width > n:
        raise FrameError(f"{kind}: {field} length overruns the payload")
    size = p[pos] if width == 1 else _u16_unpack(p, pos)[0]
    pos += width
    if pos + size > n:
        raise FrameError(f"{kind}: {field} overruns the payload")
    return pos, pos + size


def _decode_headers(p, pos, n, kind):
    if pos + 2 > n:
        raise FrameError(f"{kind}: header count overruns the payload")
    count = _u16_unpack(p, pos)[0]
    pos += 2
    if count > MAX_HEADERS:
        raise FrameError(f"{kind}: header count {count} exceeds {MAX_HEADERS}")
    headers = []
    for _ in range(count):
        a, pos = _take_len(p, pos, n, 2, kind, "header name")
        name = bytes(p[a:pos])
        if not _NAME_RE.fullmatch(name):
            raise FrameError(f"{kind}: header name is not a lowercase token")
        a, pos = _take_len(p, pos, n, 2, kind, "header value")
        value = bytes(p[a:pos])
        if _BAD_VALUE_RE.search(value):
            raise FrameError(f"{kind}: header value contains a control character")
        headers.append((name, value))
    return pos, headers


def decode_request(payload):
    """REQUEST payload -> (flags, timeout_ms, method, path, query, headers, body)."""
    p = memoryview(payload)
    n = len(p)
    if n < 5:
        raise FrameError("REQUEST: flags/timeout_ms overrun the payload")
    flags, timeout_ms = _req_fixed.unpack_from(p, 0)
    if flags & ~FLAG_END_STREAM:
        raise FrameError(f"REQUEST: reserved flag bits set (0x{flags:02x})")
    a, pos = _take_len(p, 5, n, 1, "REQUEST", "method")
    raw = bytes(p[a:pos])
    if not raw:
        raise FrameError("REQUEST: empty method")
    if len(raw) > MAX_METHOD_LENGTH:
        raise FrameError(f"REQUEST: method length {len(raw)} exceeds {MAX_METHOD_LENGTH}")
    method = _METHODS.get(raw)
    if method is None:
        if not _TOKEN_RE.fullmatch(raw):
            raise FrameError("REQUEST: method is not an HTTP token")
        method = raw.decode("ascii")
    a, pos = _take_len(p, pos, n, 2, "REQUEST", "path")
    try:
        path = str(p[a:pos], "utf-8")
    except UnicodeDecodeError:
        raise FrameError("REQUEST: path is not valid UTF-8") from None
    a, pos = _take_len(p, pos, n, 2, "REQUEST", "query")
    query = bytes(p[a:pos])
    pos, headers = _decode_headers(p, pos, n, "REQUEST")
    return flags, timeout_ms, method, path, query, headers, bytes(p[pos:])


def decode_response(payload):
    """RESPONSE payload -> (flags, status, headers, body)."""
    p = memoryview(payload)
    n = len(p)
    if n < 3:
        raise FrameError("RESPONSE: flags/status overrun the payload")
    flags = p[0]
    if flags & ~FLAG_END_STREAM:
        raise FrameError(f"RESPONSE: reserved flag bits set (0x{flags:02x})")
    status = _u16_unpack(p, 1)[0]
    if not 100 <= status <= 999:
        raise FrameError(f"RESPONSE: status {status} out of range 100-999")
    pos, headers = _decode_headers(p, 3, n, "RESPONSE")
    return flags, status, headers, bytes(p[pos:])


def corr_id(prefix: bytes, serial: int) -> bytes:
    """The correlation id of a request on a link: the link's 8-byte prefix, then the serial
    as 8 bytes big-endian."""
    if type(prefix) is not bytes or len(prefix) != 8:
        raise ValueError("the prefix of a correlation id is 8 bytes")
    return prefix + serial.to_bytes(8, "big")


def decode_response_block(payload, drop):
    """RESPONSE payload -> (flags, status, header block, body): the headers whose names are
    not in `drop` (a tuple of bytes) as b"name: value\\r\\n" lines, validated exactly as
    decode_response validates them. When `drop` holds b"connection", the fields that any
    `connection` field's value names (comma-separated, case-insensitive) are dropped too:
    they describe the connection the response came on (RFC 9110 §7.6.1)."""
    if type(drop) is not tuple or any(type(name) is not bytes for name in drop):
        raise TypeError("drop must be a tuple of bytes")
    flags, status, headers, body = decode_response(payload)
    drop = set(drop)
    if b"connection" in drop:
        drop |= _connection_named(headers)
    block = b"".join([b"%s: %s\r\n" % (n, v) for n, v in headers if n not in drop])
    return flags, status, block, body


def _connection_named(headers):
    """The field names the `connection` fields among `headers` (lowercase names) nominate:
    comma-separated tokens, any case, optional whitespace around them."""
    named = set()
    for name, value in headers:
        if name == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def _check_stream_flags(flags):
    if flags & _STREAM_RESERVED:
        raise FrameError(f"STREAM_DATA: reserved flag bits set (0x{flags:02x})")
    kind = flags & STREAM_KIND_MASK
    if kind > _KIND_LAST:
        raise FrameError(f"STREAM_DATA: unknown stream kind {kind >> 1}")
    if flags & FLAG_MORE and (kind > KIND_BINARY or flags & FLAG_END_STREAM):
        raise FrameError("STREAM_DATA: MORE set on a control kind or with END_STREAM")
    if kind == KIND_CLOSE and not flags & FLAG_END_STREAM:
        raise FrameError("STREAM_DATA: CLOSE without END_STREAM")


def decode_stream_data(payload):
    """REQUEST_STREAM_DATA / RESPONSE_STREAM_DATA payload -> (flags, chunk)."""
    p = memoryview(payload)
    if len(p) < 1:
        raise FrameError("STREAM_DATA: flags overrun the payload")
    flags = p[0]
    _check_stream_flags(flags)
    return flags, bytes(p[1:])


def decode_control(payload):
    """JSON control payload -> dict ({} for an empty payload)."""
    if len(payload) == 0:
        return {}
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"control payload is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise FrameError("control payload is not a JSON object")
    return obj


def decode_window_update(payload):
    """WINDOW_UPDATE payload -> increment (1 .. MAX_WINDOW_INCREMENT)."""
    if len(payload) != 4:
        raise FrameError(f"WINDOW_UPDATE: payload is {len(payload)} bytes, expected 4")
    inc = _u32_unpack(payload, 0)[0]
    if not 1 <= inc <= MAX_WINDOW_INCREMENT:
        raise FrameError(f"WINDOW_UPDATE: increment {inc} out of range 1-{MAX_WINDOW_INCREMENT}")
    return inc


# --- encoder ----------------------------------------------------------------------------

def _check_flags(flags, kind):
    if not 0 <= flags <= 0xFF:
        raise FrameError(f"{kind}: flags {flags} out of range 0-255")
    if flags & ~FLAG_END_STREAM:
        raise FrameError(f"{kind}: reserved flag bits set (0x{flags:02x})")


def _corr_bytes(corr):
    b = memoryview(corr)
    if b.nbytes != 16:
        raise FrameError("correlation id must be 16 bytes")
    return b


def _buffer(obj, what):
    if isinstance(obj, str):
        raise TypeError(f"{what} must be a bytes-like object, not str")
    mv = memoryview(obj)
    return mv if mv.ndim == 1 and mv.format == "B" else mv.cast("B")


class FrameEncoder:
    """Appends encoded frames to one reusable buffer; take() hands them out as one bytes.

    Each method validates its fields (same rules and messages as the decoders) and the
    frame size against max_frame_size; on any error the buffer is left exactly as it was.
    """

    __slots__ = ("_max", "_buf")

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max = _check_max(max_frame_size)
        self._buf = bytearray()   # pending encoded frames

    def __len__(self):
        return len(self._buf)

    def set_max_frame_size(self, max_frame_size):
        """A new limit for the frames encoded from now on (a service link's frames are held
        to what its HELLO announced). Frames already encoded are not checked again."""
        self._max = _check_max(max_frame_size)

    def take(self):
        data = bytes(self._buf)
        self._buf.clear()
        return data

    # Each frame is written at `mark`: a placeholder header, the fields, then the length
    # is back-patched. `_room` keeps the buffer from ever growing past one legal frame.
    def _begin(self, ftype, corr):
        c = _corr_bytes(corr)
        buf = self._buf
        mark = len(buf)
        buf += b"\0\0\0\0"
        buf.append(ftype)
        buf += c
        return mark

    def _room(self, mark, extra, kind):
        length = len(self._buf) - mark - 4 + extra
        if length > self._max:
            raise FrameTooLarge(f"{kind}: frame length exceeds max_frame_size {self._max}",
                                length, self._max)

    def _end(self, mark):
        buf = self._buf
        _be32.pack_into(buf, mark, len(buf) - mark - 4)

    def _put16(self, mark, data, kind, field):
        if len(data) > _U16_MAX:
            raise FrameError(f"{kind}: {field} length {len(data)} exceeds {_U16_MAX}")
        self._room(mark, 2 + len(data), kind)
        self._buf += _be16.pack(len(data))
        self._buf += data

    def _put_headers(self, mark, headers, kind):
        count_at = len(self._buf)
        self._room(mark, 2, kind)
        self._buf += b"\0\0"
        count = 0
        for name, value in headers:
            count += 1
            if count > MAX_HEADERS:
                raise FrameError(f"{kind}: more than {MAX_HEADERS} headers")
            # Names travel lowercase (HTTP/2 style); the encoder folds ASCII case for you.
            if isinstance(name, str):
                try:
                    name = name.encode("ascii")
                except UnicodeEncodeError:
                    raise FrameError(f"{kind}: header name is not a lowercase token") from None
            else:
                name = bytes(_buffer(name, "header name"))
            if len(name) > _U16_MAX:
                raise FrameError(f"{kind}: header name length {len(name)} exceeds {_U16_MAX}")
            name = name.lower()
            if not _NAME_RE.fullmatch(name):
                raise FrameError(f"{kind}: header name is not a lowercase token")
            self._put16(mark, name, kind, "header name")
            # RFC 9110 §5.5: no control character but HTAB is valid in a field value.
            if isinstance(value, str):
                try:
                    value = value.encode("latin-1")
                except UnicodeEncodeError:
                    raise FrameError(f"{kind}: header value is not latin-1") from None
            else:
                value = _buffer(value, "header value")
            if _BAD_VALUE_RE.search(value):
                raise FrameError(f"{kind}: header value contains a control character")
            self._put16(mark, value, kind, "header value")
        _be16.pack_into(self._buf, count_at, count)

    def _body(self, mark, body, kind):
        body = _buffer(body, "body")
        self._room(mark, len(body), kind)
        self._buf += body

    def request(self, corr, method, path, query, headers, timeout_ms, flags, body):
        timeout_ms = _as_llong(timeout_ms)
        flags = _as_llong(flags)
        if not isinstance(method, str):
            raise TypeError("method must be str")
        if not isinstance(path, str):
            raise TypeError("path must be str")
        _check_flags(flags, "REQUEST")
        if not 0 <= timeout_ms <= _U32_MAX:
            raise FrameError(f"REQUEST: timeout_ms {timeout_ms} out of range 0-{_U32_MAX}")
        if not method:
            raise FrameError("REQUEST: empty method")
        try:
            m = method.encode("ascii")
        except UnicodeEncodeError:
            raise FrameError("REQUEST: method is not an HTTP token") from None
        if len(m) > MAX_METHOD_LENGTH:
            raise FrameError(f"REQUEST: method length {len(m)} exceeds {MAX_METHOD_LENGTH}")
        if not _TOKEN_RE.fullmatch(m):
            raise FrameError("REQUEST: method is not an HTTP token")
        mark = self._begin(REQUEST, corr)
        try:
            self._room(mark, 6 + len(m), "REQUEST")
            self._buf += _req_fixed.pack(flags, timeout_ms)
            self._buf.append(len(m))
            self._buf += m
            try:
                p = path.encode("utf-8")
            except UnicodeEncodeError:
                raise FrameError("REQUEST: path is not valid UTF-8") from None
            self._put16(mark, p, "REQUEST", "path")
            if isinstance(query, str):
                try:
                    query = query.encode("utf-8")
                except UnicodeEncodeError:
                    raise FrameError("REQUEST: query is not valid UTF-8") from None
            else:
                query = _buffer(query, "query")
            self._put16(mark, query, "REQUEST", "query")
            self._put_headers(mark, headers, "REQUEST")
            self._body(mark, body, "REQUEST")
        except BaseException:
            del self._buf[mark:]
            raise
        self._end(mark)

    def request_forward(self, corr, method, path, query, headers, timeout_ms, flags, body,
                        classes, classify, http11, keep_trace, identity, peer_ip, scheme,
                        correlation_id):
        """request() with the headers a client's request forwards, built while encoding.

        `headers` are the client's (bytes, bytes) pairs; `classes` maps a name to its
        HEADER_* kind, and classify(name) gives the kind of a name it lacks. Forwarded:
        HEADER_KEEP and HEADER_HOST headers, HEADER_TRACE ones when keep_trace, except
        those any HEADER_CONNECTION header names; then `te: trailers` if the last
        HEADER_TE header said so and http11, the `identity` pairs, x-forwarded-for
        (peer_ip), -proto (scheme), -host (the last HEADER_HOST value, if any) and
        x-correlation-id. The same bytes as request() given
        stellagw.transport.headers.request_headers(), which states these rules.
        """
        if type(classes) is not dict:
            raise TypeError("classes must be a dict")
        if type(correlation_id) is not str:
            raise TypeError("correlation_id must be str")
        for pair in headers:
            if (type(pair) is not tuple or len(pair) != 2 or type(pair[0]) is not bytes
                    or type(pair[1]) is not bytes):
                raise TypeError("headers must be (bytes, bytes) tuples")
        # The rules are stated once, in transport/headers.py (imported here, not at the top:
        # that module imports this one's constants).
        from ..transport.headers import forward_headers
        out = forward_headers(headers, classes, classify, http11, keep_trace, identity,
                              peer_ip, scheme, correlation_id)
        self.request(corr, method, path, query, out, timeout_ms, flags, body)

    def response(self, corr, status, headers, flags, body):
        status = _as_llong(status)
        flags = _as_llong(flags)
        _check_flags(flags, "RESPONSE")
        if not 100 <= status <= 999:
            raise FrameError(f"RESPONSE: status {status} out of range 100-999")
        mark = self._begin(RESPONSE, corr)
        try:
            self._room(mark, 3, "RESPONSE")
            self._buf.append(flags)
            self._buf += _be16.pack(status)
            self._put_headers(mark, headers, "RESPONSE")
            self._body(mark, body, "RESPONSE")
        except BaseException:
            del self._buf[mark:]
            raise
        self._end(mark)

    def stream_data(self, ftype, corr, flags, chunk):
        ftype = _as_llong(ftype)
        flags = _as_llong(flags)
        if ftype != REQUEST_STREAM_DATA and ftype != RESPONSE_STREAM_DATA:
            raise FrameError(f"frame type {ftype} is not a stream-data type")
        if not 0 <= flags <= 0xFF:
            raise FrameError(f"STREAM_DATA: flags {flags} out of range 0-255")
        _check_stream_flags(flags)
        mark = self._begin(ftype, corr)
        try:
            self._room(mark, 1, "STREAM_DATA")
            self._buf.append(flags)
            self._body(mark, chunk, "STREAM_DATA")
        except BaseException:
            del self._buf[mark:]
            raise
        self._end(mark)

    def control(self, ftype, corr, obj):
        ftype = _as_llong(ftype)
        if ftype not in _CONTROL_TYPES:
            raise FrameError(f"frame type {ftype} is not a JSON control type")
        if obj is None:
            data = b""
        elif type(obj) is dict:
            data = orjson.dumps(obj)
        else:
            raise TypeError("control payload must be a dict or None")
        self._raw(ftype, corr, data, "control")

    def window_update(self, corr, increment):
        increment = _as_llong(increment)
        if not 1 <= increment <= MAX_WINDOW_INCREMENT:
            raise FrameError(f"WINDOW_UPDATE: increment {increment} out of range "
                             f"1-{MAX_WINDOW_INCREMENT}")
        self._raw(WINDOW_UPDATE, corr, _be32.pack(increment), "WINDOW_UPDATE")

    def raw(self, ftype, corr, payload):
        """Any frame type with a payload written verbatim (PING/PONG echo their payload)."""
        ftype = _as_llong(ftype)
        if not 1 <= ftype <= _LAST_TYPE:
            raise FrameError(f"unknown frame type {ftype}")
        self._raw(ftype, corr, payload, "raw")

    def _raw(self, ftype, corr, payload, kind):
        mark = self._begin(ftype, corr)
        try:
            self._body(mark, payload, kind)
        except BaseException:
            del self._buf[mark:]
            raise
        self._end(mark)
