# cython: language_level=3
"""Frame codec for the gateway <-> microservice transport (docs/protocol.md).

Compiled twin of stellagw/_py/frame.py: same API, same bytes out, same FrameError
messages on the same input (tests/codecs/test_frame.py checks all three differentially).

Layout of this file: constants, lookup tables, FrameError, the decoder (feed/next over a
caller's bytes object read in place, with an owned buffer only for frames that straddle
feed() calls), the payload decoders, and the encoder (one growable buffer, placeholder
header back-patched at the end of each frame, take() hands out every pending frame as one
bytes object so the transport does one write per loop iteration).
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize,
                            PyBytes_GET_SIZE)
from cpython.dict cimport PyDict_GetItemWithError
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_FromObject
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.unicode cimport PyUnicode_AsLatin1String, PyUnicode_DecodeASCII, PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, strlen

from gw_debug cimport GW_DEBUG
from gw_endian cimport gw_load_be16, gw_load_be32, gw_store_be16, gw_store_be32

import orjson

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object u, Py_ssize_t *size) except NULL
    bint PyUnicode_IS_ASCII(object u)
    void *PyUnicode_DATA(object u)
    Py_ssize_t PyUnicode_GET_LENGTH(object u)
    bint PyUnicode_Check(object o)

cdef object _loads = orjson.loads
cdef object _dumps = orjson.dumps
cdef object _JSONDecodeError = orjson.JSONDecodeError


# --- constants (docs/protocol.md §2-§5) ---------------------------------------------------

cdef enum:
    C_HEADER_SIZE = 21          # u32 length + u8 type + 16-byte correlation id
    C_MIN_LENGTH = 17           # smallest legal length field: type + correlation id
    C_MAX_HEADERS = 256
    C_MAX_METHOD = 16
    C_ZERO_COPY_MIN = 1024      # shorter payloads are copied: a copy is cheaper than a view
    C_U16_MAX = 0xFFFF
    C_MIN_ALLOC = 4096
    C_KEEP_ALLOC = 1024 * 1024  # buffers above this are freed when they become empty

cdef enum FrameType:
    T_HELLO = 1
    T_HEARTBEAT = 2
    T_ENDPOINTS_UPDATE = 3
    T_REQUEST = 4
    T_REQUEST_STREAM_DATA = 5
    T_RESPONSE = 6
    T_RESPONSE_STREAM_DATA = 7
    T_CANCEL = 8
    T_HELLO_ACK = 9
    T_DRAIN = 10
    T_PING = 11
    T_PONG = 12
    T_WINDOW_UPDATE = 13
    T_LAST = 13

cdef enum StreamFlags:
    F_END_STREAM = 0x01
    F_KIND_MASK = 0x0E
    F_KIND_DATA = 0x00
    F_KIND_TEXT = 0x02
    F_KIND_BINARY = 0x04
    F_KIND_CLOSE = 0x06
    F_KIND_PING = 0x08
    F_KIND_PONG = 0x0A
    F_MORE = 0x10
    F_STREAM_RESERVED = 0xE0

# What FrameEncoder.request_forward does with a client's header, by the kind the caller's
# classification gives its name (stellagw/transport/headers.py owns that policy).
cdef enum HeaderKind:
    H_KEEP = 0              # forwarded
    H_DROP = 1              # never forwarded
    H_CONNECTION = 2        # dropped, and so is every header its value names
    H_HOST = 3              # forwarded, and its value becomes x-forwarded-host
    H_TE = 4                # dropped; "trailers" is forwarded again on HTTP/1.1
    H_TRACE = 5             # forwarded unless the gateway's own trace context replaces it

HEADER_SIZE = C_HEADER_SIZE
MIN_LENGTH = C_MIN_LENGTH
DEFAULT_MAX_FRAME_SIZE = 16 * 1024 * 1024
PROTOCOL_VERSION = 1
MAX_HEADERS = C_MAX_HEADERS
MAX_METHOD_LENGTH = C_MAX_METHOD
ZERO_COPY_MIN = C_ZERO_COPY_MIN
ZERO_CORR = bytes(16)

HELLO = T_HELLO
HEARTBEAT = T_HEARTBEAT
ENDPOINTS_UPDATE = T_ENDPOINTS_UPDATE
REQUEST = T_REQUEST
REQUEST_STREAM_DATA = T_REQUEST_STREAM_DATA
RESPONSE = T_RESPONSE
RESPONSE_STREAM_DATA = T_RESPONSE_STREAM_DATA
CANCEL = T_CANCEL
HELLO_ACK = T_HELLO_ACK
DRAIN = T_DRAIN
PING = T_PING
PONG = T_PONG
WINDOW_UPDATE = T_WINDOW_UPDATE

FLAG_END_STREAM = F_END_STREAM
FLAG_MORE = F_MORE
STREAM_KIND_MASK = F_KIND_MASK
KIND_DATA = F_KIND_DATA
KIND_TEXT = F_KIND_TEXT
KIND_BINARY = F_KIND_BINARY
KIND_CLOSE = F_KIND_CLOSE
KIND_PING = F_KIND_PING
KIND_PONG = F_KIND_PONG
MAX_WINDOW_INCREMENT = 0x7FFFFFFF

HEADER_KEEP = H_KEEP
HEADER_DROP = H_DROP
HEADER_CONNECTION = H_CONNECTION
HEADER_HOST = H_HOST
HEADER_TE = H_TE
HEADER_TRACE = H_TRACE

cdef long long _U32_MAX = 0xFFFFFFFF
cdef long long _MAX_WINDOW_INCREMENT = 0x7FFFFFFF


# --- lookup tables --------------------------------------------------------------------

# _TOKEN: RFC 9110 §5.6.2 tchar. _NAME: tchar without A-Z (names travel lowercase).
# _LOWER: ASCII case fold. _VALUE_BAD: the control characters but HTAB (RFC 9110 §5.5: never
# valid in a field value; CR, LF and NUL would split the message, the others are read as
# whitespace or separators by some parsers downstream).
cdef uint8_t _TOKEN[256]
cdef uint8_t _NAME[256]
cdef uint8_t _LOWER[256]
cdef uint8_t _VALUE_BAD[256]


cdef void _init_tables() noexcept:
    cdef const char *extra = b"!#$%&'*+-.^_`|~"
    cdef int i
    for i in range(256):
        _TOKEN[i] = 0
        _NAME[i] = 0
        _VALUE_BAD[i] = 0
        _LOWER[i] = <uint8_t>(i + 32 if 65 <= i <= 90 else i)
    for i in range(48, 58):
        _TOKEN[i] = _NAME[i] = 1
    for i in range(97, 123):
        _TOKEN[i] = _NAME[i] = 1
    for i in range(65, 91):
        _TOKEN[i] = 1
    i = 0
    while extra[i]:
        _TOKEN[<uint8_t>extra[i]] = _NAME[<uint8_t>extra[i]] = 1
        i += 1
    for i in range(32):
        _VALUE_BAD[i] = i != 9
    _VALUE_BAD[127] = 1


_init_tables()

# Decoded methods: the common ones come from these cached strings, not a fresh decode.
cdef str _M_GET = "GET", _M_PUT = "PUT", _M_POST = "POST", _M_HEAD = "HEAD"
cdef str _M_PATCH = "PATCH", _M_DELETE = "DELETE", _M_OPTIONS = "OPTIONS"


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


cdef inline int _check_header(uint32_t length, Py_ssize_t avail, const unsigned char *p,
                              long long max_frame) except -1:
    # Runs as soon as the 4 (or 5) header bytes are in: nothing is allocated for a frame
    # before its length and type are known to be legal (docs/design.md §3).
    if length < C_MIN_LENGTH:
        raise FrameError(f"frame length {length} is below the minimum {C_MIN_LENGTH}")
    if length > max_frame:
        raise FrameTooLarge(f"frame length {length} exceeds max_frame_size {max_frame}",
                            length, max_frame)
    # Unknown types are protocol errors, never skipped: types are only added with a new
    # protocol version, negotiated in HELLO/HELLO_ACK (docs/protocol.md §6).
    if avail > 4 and (p[4] < 1 or p[4] > T_LAST):
        raise FrameError(f"unknown frame type {p[4]}")
    return 0


cdef inline long long _ll(object value) except? -1:
    # Integer arguments: ints (and __index__ objects) only, never a truncated float; same
    # TypeError / OverflowError as the twin's operator.index() + range check.
    return PyNumber_Index(value)


cdef long long _check_max(long long max_frame_size) except -1:
    if max_frame_size < C_MIN_LENGTH or max_frame_size > _U32_MAX:
        raise ValueError(f"max_frame_size must be between {C_MIN_LENGTH} and {_U32_MAX}")
    return max_frame_size


# --- decoder --------------------------------------------------------------------------

@cython.final
cdef class FrameDecoder:
    """Sans-IO frame reader: feed() bytes as they arrive, call next() until it returns None.

    next() returns (ftype, corr, payload). The payload is read-only: `bytes`, or, for a
    payload of at least ZERO_COPY_MIN bytes lying wholly inside a `bytes` object given to
    feed() while nothing else was buffered, a memoryview into that object. Contract: use it
    before the next feed(), or copy it with bytes(). (Views are only ever taken of immutable
    `bytes` objects, never of the decoder's own buffer, so in practice they stay valid.)
    After a FrameError the stream is unusable: next() raises it again; close the connection.
    """

    def __cinit__(self):
        self._buf = NULL
        self._cap = self._start = self._end = 0
        self._chunk = self._cview = None
        self._cptr = NULL
        self._cpos = self._clen = 0

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max = _check_max(_ll(max_frame_size))

    def __dealloc__(self):
        PyMem_Free(self._buf)
        self._buf = NULL

    def set_max_frame_size(self, max_frame_size):
        """A new limit from the next frame header on (a link's HELLO is held to a smaller
        one than what follows it). A header already checked stays checked."""
        self._max = _check_max(_ll(max_frame_size))

    cdef int _append(self, const unsigned char *data, Py_ssize_t n) except -1:
        cdef Py_ssize_t need, cap
        cdef unsigned char *nbuf
        if n == 0:
            return 0
        if self._start:
            # Compact once per feed (one batch of frames), never per frame.
            memmove(self._buf, self._buf + self._start, <size_t>(self._end - self._start))
            self._end -= self._start
            self._start = 0
        need = self._end + n
        if need > self._cap:
            cap = self._cap * 2
            if cap < need:
                cap = need
            if cap < C_MIN_ALLOC:
                cap = C_MIN_ALLOC
            nbuf = <unsigned char *>PyMem_Realloc(self._buf, <size_t>cap)
            if nbuf == NULL:
                raise MemoryError()
            self._buf = nbuf
            self._cap = cap
        memcpy(self._buf + self._end, data, <size_t>n)
        self._end = need
        return 0

    cpdef feed(self, data):
        cdef Py_buffer view
        if self._chunk is not None:
            # The previous chunk ended in a partial frame: keep its tail, drop the chunk.
            self._append(self._cptr + self._cpos, self._clen - self._cpos)
            self._chunk = self._cview = None
            self._cptr = NULL
            self._cpos = self._clen = 0
        if PyBytes_CheckExact(data) and self._start == self._end:
            self._start = self._end = 0
            if self._cap > C_KEEP_ALLOC:
                PyMem_Free(self._buf)
                self._buf = NULL
                self._cap = 0
            if PyBytes_GET_SIZE(data):
                self._chunk = data
                self._cptr = <const unsigned char *>PyBytes_AS_STRING(data)
                self._clen = PyBytes_GET_SIZE(data)
            return
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
        try:
            self._append(<const unsigned char *>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cpdef next(self):
        cdef const unsigned char *p
        cdef Py_ssize_t avail, end, plen
        cdef uint32_t length
        cdef uint8_t ftype
        cdef object corr, payload
        if self._chunk is not None:
            p = self._cptr + self._cpos
            avail = self._clen - self._cpos
        else:
            if GW_DEBUG:
                assert 0 <= self._start <= self._end <= self._cap
            p = self._buf + self._start
            avail = self._end - self._start
        if avail < 4:
            return None
        length = gw_load_be32(p)
        _check_header(length, avail, p, self._max)
        if avail < 4 + <Py_ssize_t>length:
            return None
        ftype = p[4]
        corr = PyBytes_FromStringAndSize(<const char *>p + 5, 16)
        plen = <Py_ssize_t>length - C_MIN_LENGTH
        if self._chunk is not None:
            end = self._cpos + 4 + <Py_ssize_t>length
            if plen >= C_ZERO_COPY_MIN:
                if self._cview is None:
                    self._cview = PyMemoryView_FromObject(self._chunk)
                payload = self._cview[self._cpos + C_HEADER_SIZE:end]
            else:
                payload = PyBytes_FromStringAndSize(<const char *>p + C_HEADER_SIZE, plen)
            if end == self._clen:
                self._chunk = self._cview = None
                self._cptr = NULL
                self._cpos = self._clen = 0
            else:
                self._cpos = end
        else:
            payload = PyBytes_FromStringAndSize(<const char *>p + C_HEADER_SIZE, plen)
            self._start += 4 + <Py_ssize_t>length
            if self._start == self._end:
                self._start = self._end = 0
        return (ftype, corr, payload)

    def at_frame_boundary(self):
        return self._cpos == self._clen and self._start == self._end


# --- payload decoders -----------------------------------------------------------------

cdef inline int _take(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t n, int width,
                      str kind, str field, Py_ssize_t *start) except -1:
    cdef Py_ssize_t at = pos[0], size
    if at + width > n:
        raise FrameError(f"{kind}: {field} length overruns the payload")
    size = p[at] if width == 1 else gw_load_be16(p + at)
    at += width
    if at + size > n:
        raise FrameError(f"{kind}: {field} overruns the payload")
    start[0] = at
    pos[0] = at + size
    return 0


cdef Py_ssize_t _header_count(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t n,
                              str kind) except -1:
    cdef Py_ssize_t count
    if pos[0] + 2 > n:
        raise FrameError(f"{kind}: header count overruns the payload")
    count = gw_load_be16(p + pos[0])
    pos[0] += 2
    if count > C_MAX_HEADERS:
        raise FrameError(f"{kind}: header count {count} exceeds {C_MAX_HEADERS}")
    return count


cdef int _next_header(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t n, str kind,
                      Py_ssize_t *name_at, Py_ssize_t *value_at) except -1:
    # The name is p[name_at:value_at - 2], the value p[value_at:pos]. docs/protocol.md §3.2:
    # these checks are what stops a service from splitting the response to the client.
    cdef Py_ssize_t j, end
    _take(p, pos, n, 2, kind, "header name", name_at)
    end = pos[0]
    if name_at[0] == end:
        raise FrameError(f"{kind}: header name is not a lowercase token")
    for j in range(name_at[0], end):
        if not _NAME[p[j]]:
            raise FrameError(f"{kind}: header name is not a lowercase token")
    _take(p, pos, n, 2, kind, "header value", value_at)
    for j in range(value_at[0], pos[0]):
        if _VALUE_BAD[p[j]]:
            raise FrameError(f"{kind}: header value contains a control character")
    return 0


cdef list _decode_headers(const unsigned char *p, Py_ssize_t *pos, Py_ssize_t n, str kind):
    cdef Py_ssize_t count = _header_count(p, pos, n, kind), a = 0, v = 0
    cdef list headers = []
    while count:
        count -= 1
        _next_header(p, pos, n, kind, &a, &v)
        headers.append((PyBytes_FromStringAndSize(<const char *>p + a, v - 2 - a),
                        PyBytes_FromStringAndSize(<const char *>p + v, pos[0] - v)))
    return headers


cdef str _method_str(const unsigned char *m, Py_ssize_t n):
    cdef Py_ssize_t i
    for i in range(n):
        if not _TOKEN[m[i]]:
            raise FrameError("REQUEST: method is not an HTTP token")
    if n == 3:
        if _eq3(m, b"GET"):
            return _M_GET
        if _eq3(m, b"PUT"):
            return _M_PUT
    elif n == 4:
        if _eq4(m, b"POST"):
            return _M_POST
        if _eq4(m, b"HEAD"):
            return _M_HEAD
    elif n == 5 and _eq5(m, b"PATCH"):
        return _M_PATCH
    elif n == 6 and _eq6(m, b"DELETE"):
        return _M_DELETE
    elif n == 7 and _eq7(m, b"OPTIONS"):
        return _M_OPTIONS
    return PyUnicode_DecodeASCII(<const char *>m, n, NULL)


cdef inline bint _eq3(const unsigned char *a, const char *b) noexcept:
    return a[0] == b[0] and a[1] == b[1] and a[2] == b[2]


cdef inline bint _eq4(const unsigned char *a, const char *b) noexcept:
    return _eq3(a, b) and a[3] == b[3]


cdef inline bint _eq5(const unsigned char *a, const char *b) noexcept:
    return _eq4(a, b) and a[4] == b[4]


cdef inline bint _eq6(const unsigned char *a, const char *b) noexcept:
    return _eq5(a, b) and a[5] == b[5]


cdef inline bint _eq7(const unsigned char *a, const char *b) noexcept:
    return _eq6(a, b) and a[6] == b[6]


cdef tuple _decode_request(const unsigned char *p, Py_ssize_t n, object unused):
    cdef Py_ssize_t pos = 5, a = 0
    cdef uint8_t flags
    cdef uint32_t timeout_ms
    cdef str method, path
    cdef bytes query, body
    cdef list headers
    if n < 5:
        raise FrameError("REQUEST: flags/timeout_ms overrun the payload")
    flags = p[0]
    if flags & ~F_END_STREAM:
        raise FrameError(f"REQUEST: reserved flag bits set (0x{flags:02x})")
    timeout_ms = gw_load_be32(p + 1)
    _take(p, &pos, n, 1, "REQUEST", "method", &a)
    if pos == a:
        raise FrameError("REQUEST: empty method")
    if pos - a > C_MAX_METHOD:
        raise FrameError(f"REQUEST: method length {pos - a} exceeds {C_MAX_METHOD}")
    method = _method_str(p + a, pos - a)
    _take(p, &pos, n, 2, "REQUEST", "path", &a)
    try:
        path = PyUnicode_DecodeUTF8(<const char *>p + a, pos - a, NULL)
    except UnicodeDecodeError:
        raise FrameError("REQUEST: path is not valid UTF-8") from None
    _take(p, &pos, n, 2, "REQUEST", "query", &a)
    query = PyBytes_FromStringAndSize(<const char *>p + a, pos - a)
    headers = _decode_headers(p, &pos, n, "REQUEST")
    body = PyBytes_FromStringAndSize(<const char *>p + pos, n - pos)
    return (flags, timeout_ms, method, path, query, headers, body)


cdef int _response_head(const unsigned char *p, Py_ssize_t n) except -1:
    cdef uint8_t flags
    cdef uint16_t status
    if n < 3:
        raise FrameError("RESPONSE: flags/status overrun the payload")
    flags = p[0]
    if flags & ~F_END_STREAM:
        raise FrameError(f"RESPONSE: reserved flag bits set (0x{flags:02x})")
    status = gw_load_be16(p + 1)
    if status < 100 or status > 999:
        raise FrameError(f"RESPONSE: status {status} out of range 100-999")
    return 0


cdef tuple _decode_response(const unsigned char *p, Py_ssize_t n, object unused):
    cdef Py_ssize_t pos = 3
    cdef uint8_t flags
    cdef uint16_t status
    cdef list headers
    _response_head(p, n)
    flags = p[0]
    status = gw_load_be16(p + 1)
    headers = _decode_headers(p, &pos, n, "RESPONSE")
    return (flags, status, headers, PyBytes_FromStringAndSize(<const char *>p + pos, n - pos))


cdef bint _listed(const unsigned char *name, Py_ssize_t n, tuple names) noexcept:
    # `names` holds only bytes (decode_response_block checks).
    cdef PyObject *item
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE(names)):
        item = PyTuple_GET_ITEM(names, i)
        if (PyBytes_GET_SIZE(<object>item) == n
                and memcmp(PyBytes_AS_STRING(<object>item), name, <size_t>n) == 0):
            return True
    return False


cdef Py_ssize_t _drop_nominated(const unsigned char *p, Py_ssize_t count,
                                uint8_t *keep) except -1:
    # The fields a dropped `connection` field names go too (RFC 9110 §7.6.1): off the common
    # path (only a response that carries Connection comes here), so plain Python objects.
    # Returns the bytes of the block lines it took out.
    cdef Py_ssize_t pos = 5, i, nlen, vlen, less = 0
    cdef set named = set()
    cdef bytes token
    for i in range(count):
        nlen = gw_load_be16(p + pos)
        vlen = gw_load_be16(p + pos + 2 + nlen)
        if (not keep[i] and nlen == 10
                and memcmp(p + pos + 2, <const char *>b"connection", 10) == 0):
            for token in PyBytes_FromStringAndSize(<const char *>p + pos + 4 + nlen,
                                                   vlen).split(b","):
                named.add(token.strip().lower())
        pos += 4 + nlen + vlen
    pos = 5
    for i in range(count):
        nlen = gw_load_be16(p + pos)
        vlen = gw_load_be16(p + pos + 2 + nlen)
        if keep[i] and PyBytes_FromStringAndSize(<const char *>p + pos + 2, nlen) in named:
            keep[i] = 0
            less += nlen + vlen + 4
        pos += 4 + nlen + vlen
    return less


cdef tuple _decode_response_block(const unsigned char *p, Py_ssize_t n, object drop):
    # Validation first, over the whole frame (same errors, same order as decode_response),
    # sizing the kept lines on the way; then one allocation and a copy. No per-header
    # objects: the block goes to the client as it is.
    cdef Py_ssize_t pos = 3, count, i, a = 0, v = 0, size = 0, nlen, vlen
    cdef uint8_t keep[C_MAX_HEADERS]
    cdef uint8_t flags
    cdef uint16_t status
    cdef bint nominates = False
    cdef bytes block, body
    cdef char *out
    _response_head(p, n)
    flags = p[0]
    status = gw_load_be16(p + 1)
    count = _header_count(p, &pos, n, "RESPONSE")
    for i in range(count):
        _next_header(p, &pos, n, "RESPONSE", &a, &v)
        keep[i] = not _listed(p + a, v - 2 - a, <tuple>drop)
        if keep[i]:
            size += (v - 2 - a) + (pos - v) + 4
        elif v - 2 - a == 10 and memcmp(p + a, <const char *>b"connection", 10) == 0:
            # Looked for among the dropped names only: a response without Connection
            # pays nothing for the rule.
            nominates = True
    if nominates:
        size -= _drop_nominated(p, count, keep)
    body = PyBytes_FromStringAndSize(<const char *>p + pos, n - pos)
    block = PyBytes_FromStringAndSize(NULL, size)
    out = PyBytes_AS_STRING(block)
    pos = 5
    for i in range(count):
        nlen = gw_load_be16(p + pos)
        vlen = gw_load_be16(p + pos + 2 + nlen)
        if keep[i]:
            memcpy(out, p + pos + 2, <size_t>nlen)
            out[nlen] = b':'
            out[nlen + 1] = b' '
            out += nlen + 2
            memcpy(out, p + pos + 4 + nlen, <size_t>vlen)
            out[vlen] = b'\r'
            out[vlen + 1] = b'\n'
            out += vlen + 2
        pos += 4 + nlen + vlen
    return (flags, status, block, body)


cdef int _check_stream_flags(long long flags) except -1:
    cdef long long kind = flags & F_KIND_MASK
    if flags & F_STREAM_RESERVED:
        raise FrameError(f"STREAM_DATA: reserved flag bits set (0x{flags:02x})")
    if kind > F_KIND_PONG:
        raise FrameError(f"STREAM_DATA: unknown stream kind {kind >> 1}")
    # RFC 6455 §5.5: control messages are never fragmented; MORE + END_STREAM contradict.
    if flags & F_MORE and (kind > F_KIND_BINARY or flags & F_END_STREAM):
        raise FrameError("STREAM_DATA: MORE set on a control kind or with END_STREAM")
    if kind == F_KIND_CLOSE and not flags & F_END_STREAM:
        raise FrameError("STREAM_DATA: CLOSE without END_STREAM")
    return 0


cdef tuple _decode_stream_data(const unsigned char *p, Py_ssize_t n, object unused):
    if n < 1:
        raise FrameError("STREAM_DATA: flags overrun the payload")
    _check_stream_flags(p[0])
    return (p[0], PyBytes_FromStringAndSize(<const char *>p + 1, n - 1))


# (bytes, length, the decoder's own argument: decode_response_block's names, else None)
ctypedef tuple (*_payload_decoder)(const unsigned char *, Py_ssize_t, object)


cdef tuple _with_buffer(object payload, _payload_decoder decode, object arg):
    """Run `decode` over the payload's bytes: bytes directly, other buffers through the
    buffer protocol (a memoryview from FrameDecoder.next is read without a copy)."""
    cdef Py_buffer view
    if PyBytes_CheckExact(payload):
        return decode(<const unsigned char *>PyBytes_AS_STRING(payload),
                      PyBytes_GET_SIZE(payload), arg)
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        return decode(<const unsigned char *>view.buf, view.len, arg)
    finally:
        PyBuffer_Release(&view)


def decode_request(payload):
    """REQUEST payload -> (flags, timeout_ms, method, path, query, headers, body)."""
    return _with_buffer(payload, _decode_request, None)


def decode_response(payload):
    """RESPONSE payload -> (flags, status, headers, body)."""
    return _with_buffer(payload, _decode_response, None)


cpdef bytes corr_id(bytes prefix, unsigned long long serial):
    """The correlation id of a request on a link: the link's 8-byte prefix, then the serial
    as 8 bytes big-endian (one bytes built in place of to_bytes and a concatenation)."""
    if prefix is None or PyBytes_GET_SIZE(prefix) != 8:
        raise ValueError("the prefix of a correlation id is 8 bytes")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 16)
    cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
    cdef int i
    memcpy(p, PyBytes_AS_STRING(prefix), 8)
    for i in range(8):
        p[15 - i] = <unsigned char>(serial >> (8 * i))
    return out


cpdef tuple decode_response_block(payload, tuple drop):
    """RESPONSE payload -> (flags, status, header block, body): the headers whose names are
    not in `drop` (a tuple of bytes) as b"name: value\\r\\n" lines, validated exactly as
    decode_response validates them. When `drop` holds b"connection", the fields that any
    `connection` field's value names (comma-separated, case-insensitive) are dropped too:
    they describe the connection the response came on (RFC 9110 §7.6.1)."""
    if drop is None:
        raise TypeError("drop must be a tuple of bytes")
    for name in drop:
        if not PyBytes_CheckExact(name):
            raise TypeError("drop must be a tuple of bytes")
    return _with_buffer(payload, _decode_response_block, drop)


def decode_stream_data(payload):
    """REQUEST_STREAM_DATA / RESPONSE_STREAM_DATA payload -> (flags, chunk)."""
    return _with_buffer(payload, _decode_stream_data, None)


def decode_control(payload):
    """JSON control payload -> dict ({} for an empty payload)."""
    if len(payload) == 0:
        return {}
    try:
        obj = _loads(payload)
    except _JSONDecodeError as exc:
        raise FrameError(f"control payload is not valid JSON: {exc}") from None
    if type(obj) is not dict:
        raise FrameError("control payload is not a JSON object")
    return obj


def decode_window_update(payload):
    """WINDOW_UPDATE payload -> increment (1 .. MAX_WINDOW_INCREMENT)."""
    cdef Py_buffer view
    cdef uint32_t inc
    PyObject_GetBuffer(payload, &view, PyBUF_SIMPLE)
    try:
        if view.len != 4:
            raise FrameError(f"WINDOW_UPDATE: payload is {view.len} bytes, expected 4")
        inc = gw_load_be32(<const unsigned char *>view.buf)
    finally:
        PyBuffer_Release(&view)
    if inc < 1 or inc > _MAX_WINDOW_INCREMENT:
        raise FrameError(f"WINDOW_UPDATE: increment {inc} out of range "
                         f"1-{_MAX_WINDOW_INCREMENT}")
    return inc


# --- forwarded request headers (FrameEncoder.request_forward) ---------------------------

cdef inline tuple _header_pair(object item):
    # Names and values are read in place, so only what the HTTP parser gives is taken.
    if (PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 2
            and PyBytes_CheckExact(<object>PyTuple_GET_ITEM(item, 0))
            and PyBytes_CheckExact(<object>PyTuple_GET_ITEM(item, 1))):
        return <tuple>item
    raise TypeError("headers must be (bytes, bytes) tuples")


cdef inline bint _space(unsigned char c) noexcept:
    return c == 32 or 9 <= c <= 13         # what bytes.strip() strips


cdef inline bint _lower_eq(const unsigned char *t, Py_ssize_t tn, const unsigned char *lower,
                           Py_ssize_t n) noexcept:
    # t.lower() == lower
    cdef Py_ssize_t j
    if tn != n:
        return False
    for j in range(n):
        if _LOWER[t[j]] != lower[j]:
            return False
    return True


cdef bint _names(bytes connection, bytes name) noexcept:
    # name in {t.strip().lower() for t in connection.split(b",")}, without the set
    cdef const unsigned char *c = <const unsigned char *>PyBytes_AS_STRING(connection)
    cdef const unsigned char *nm = <const unsigned char *>PyBytes_AS_STRING(name)
    cdef Py_ssize_t clen = PyBytes_GET_SIZE(connection), nlen = PyBytes_GET_SIZE(name)
    cdef Py_ssize_t start = 0, end, a, b
    while True:
        end = start
        while end < clen and c[end] != 44:      # ','
            end += 1
        a = start
        b = end
        while a < b and _space(c[a]):
            a += 1
        while b > a and _space(c[b - 1]):
            b -= 1
        if _lower_eq(c + a, b - a, nm, nlen):
            return True
        if end == clen:
            return False
        start = end + 1


cdef bint _named(list connection, bytes name):
    # Every Connection line counts (RFC 9110 §7.6.1)
    cdef object value
    for value in connection:
        if _names(<bytes>value, name):
            return True
    return False


cdef bint _is_trailers(bytes value) noexcept:
    # value.strip().lower() == b"trailers"
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t a = 0, b = PyBytes_GET_SIZE(value)
    while a < b and _space(p[a]):
        a += 1
    while b > a and _space(p[b - 1]):
        b -= 1
    return _lower_eq(p + a, b - a, <const unsigned char *>b"trailers", 8)


cdef inline unsigned char *_copy_name(unsigned char *out, const unsigned char *p, Py_ssize_t n,
                                     uint8_t *bad) noexcept:
    # _put_name's checks and folding, on room reserved already; a failed check only marks
    # `bad` (the caller then goes the field-by-field way, which names the error).
    cdef Py_ssize_t i
    cdef uint8_t c
    if n == 0 or n > C_U16_MAX:
        bad[0] = 1
        return out
    gw_store_be16(out, <uint16_t>n)
    out += 2
    for i in range(n):
        c = p[i]
        bad[0] |= _TOKEN[c] ^ 1
        out[i] = _LOWER[c]
    return out + n


cdef inline uint64_t _has_byte(uint64_t w, uint64_t each) noexcept:
    # nonzero when a byte of w equals the byte repeated in `each` (exact: the classic
    # zero-byte test on w ^ each)
    w ^= each
    return (w - <uint64_t>0x0101010101010101) & ~w & <uint64_t>0x8080808080808080


cdef inline uint64_t _has_control(uint64_t w) noexcept:
    # nonzero when a byte of w is below 0x20 or is 0x7F (may flag a byte of 0x80 or more
    # after one of those: the caller looks at flagged words byte by byte)
    return (((w - <uint64_t>0x2020202020202020) & ~w) | _has_byte(w, <uint64_t>0x7F7F7F7F7F7F7F7F)) \
        & <uint64_t>0x8080808080808080


cdef inline unsigned char *_copy_value(unsigned char *out, const unsigned char *p, Py_ssize_t n,
                                      uint8_t *bad) noexcept:
    # _put_value_raw's check (no control character but HTAB), eight bytes at a time: a word
    # with one (HTAB, mostly) is looked at byte by byte. On room reserved already (see
    # _copy_name).
    cdef Py_ssize_t i = 0, j
    cdef uint64_t w, found = 0
    if n > C_U16_MAX:
        bad[0] = 1
        return out
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        if _has_control(w):
            for j in range(i, i + 8):
                found |= _VALUE_BAD[p[j]]
        i += 8
    while i < n:
        found |= _VALUE_BAD[p[i]]
        i += 1
    if found:
        bad[0] = 1
    gw_store_be16(out, <uint16_t>n)
    memcpy(out + 2, p, <size_t>n)
    return out + 2 + n


cdef inline unsigned char *_copy_fixed(unsigned char *out, const char *name,
                                      Py_ssize_t n) noexcept:
    # One of the gateway's own header names: a lowercase token already, copied as is.
    gw_store_be16(out, <uint16_t>n)
    memcpy(out + 2, name, <size_t>n)
    return out + 2 + n


cdef inline unsigned char *_copy_pair(unsigned char *out, object pair, uint8_t *bad) noexcept:
    # A (name, value) pair of bytes (_bytes_pair said so): _copy_name then _copy_value.
    cdef object item = <object>PyTuple_GET_ITEM(pair, 0)
    out = _copy_name(out, <const unsigned char *>PyBytes_AS_STRING(item),
                     PyBytes_GET_SIZE(item), bad)
    item = <object>PyTuple_GET_ITEM(pair, 1)
    return _copy_value(out, <const unsigned char *>PyBytes_AS_STRING(item),
                       PyBytes_GET_SIZE(item), bad)


cdef inline bint _bytes_pair(object item) noexcept:
    return (PyTuple_CheckExact(item) and PyTuple_GET_SIZE(item) == 2
            and PyBytes_CheckExact(<object>PyTuple_GET_ITEM(item, 0))
            and PyBytes_CheckExact(<object>PyTuple_GET_ITEM(item, 1)))


# --- encoder --------------------------------------------------------------------------

cdef int _check_flags(long long flags, str kind) except -1:
    if flags < 0 or flags > 0xFF:
        raise FrameError(f"{kind}: flags {flags} out of range 0-255")
    if flags & ~F_END_STREAM:
        raise FrameError(f"{kind}: reserved flag bits set (0x{flags:02x})")
    return 0


@cython.final
cdef class FrameEncoder:
    """Appends encoded frames to one reusable buffer; take() hands them out as one bytes.

    Each method validates its fields (same rules and messages as the decoders) and the
    frame size against max_frame_size; on any error the buffer is left exactly as it was.
    """

    def __cinit__(self):
        self._buf = NULL
        self._len = self._cap = 0

    def __init__(self, max_frame_size=DEFAULT_MAX_FRAME_SIZE):
        self._max = _check_max(_ll(max_frame_size))

    def __dealloc__(self):
        PyMem_Free(self._buf)
        self._buf = NULL

    def __len__(self):
        return self._len

    def set_max_frame_size(self, max_frame_size):
        """A new limit for the frames encoded from now on (a service link's frames are held
        to what its HELLO announced). Frames already encoded are not checked again."""
        self._max = _check_max(_ll(max_frame_size))

    cpdef bytes take(self):
        cdef bytes data = PyBytes_FromStringAndSize(<const char *>self._buf, self._len)
        self._len = 0
        if self._cap > C_KEEP_ALLOC:
            # One huge frame must not pin its buffer for the connection's lifetime.
            PyMem_Free(self._buf)
            self._buf = NULL
            self._cap = 0
        return data

    # --- buffer primitives. Each frame is written at `mark`: a placeholder header, the
    # fields, then the length is back-patched by _end(). _room() keeps the buffer from
    # ever growing past one legal frame, so an oversized frame costs no allocation.

    cdef int _reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self._len + extra, cap
        cdef unsigned char *nbuf
        if need <= self._cap:
            return 0
        cap = self._cap * 2
        if cap < need:
            cap = need
        if cap < C_MIN_ALLOC:
            cap = C_MIN_ALLOC
        nbuf = <unsigned char *>PyMem_Realloc(self._buf, <size_t>cap)
        if nbuf == NULL:
            raise MemoryError()
        self._buf = nbuf
        self._cap = cap
        return 0

    cdef int _room(self, Py_ssize_t mark, Py_ssize_t extra, str kind) except -1:
        if self._len - mark - 4 + extra > self._max:
            raise FrameTooLarge(f"{kind}: frame length exceeds max_frame_size {self._max}",
                                self._len - mark - 4 + extra, self._max)
        return self._reserve(extra)

    cdef Py_ssize_t _begin(self, uint8_t ftype, object corr) except -1:
        cdef Py_buffer view
        cdef Py_ssize_t mark = self._len
        if PyBytes_CheckExact(corr):
            if PyBytes_GET_SIZE(corr) != 16:
                raise FrameError("correlation id must be 16 bytes")
            self._reserve(C_HEADER_SIZE)
            memcpy(self._buf + mark + 5, PyBytes_AS_STRING(corr), 16)
        else:
            PyObject_GetBuffer(corr, &view, PyBUF_SIMPLE)
            try:
                if view.len != 16:
                    raise FrameError("correlation id must be 16 bytes")
                self._reserve(C_HEADER_SIZE)
                memcpy(self._buf + mark + 5, view.buf, 16)
            finally:
                PyBuffer_Release(&view)
        self._buf[mark + 4] = ftype
        self._len = mark + C_HEADER_SIZE
        return mark

    cdef void _end(self, Py_ssize_t mark) noexcept:
        gw_store_be32(self._buf + mark, <uint32_t>(self._len - mark - 4))

    cdef void _put(self, const void *data, Py_ssize_t n) noexcept:
        # Caller has reserved room.
        memcpy(self._buf + self._len, data, <size_t>n)
        self._len += n

    cdef int _put16(self, Py_ssize_t mark, const unsigned char *data, Py_ssize_t n,
                    str kind, str field) except -1:
        if n > C_U16_MAX:
            raise FrameError(f"{kind}: {field} length {n} exceeds {C_U16_MAX}")
        self._room(mark, 2 + n, kind)
        gw_store_be16(self._buf + self._len, <uint16_t>n)
        self._len += 2
        self._put(data, n)
        return 0

    cdef int _put16_obj(self, Py_ssize_t mark, object obj, str kind, str field) except -1:
        cdef Py_buffer view
        if PyBytes_CheckExact(obj):
            return self._put16(mark, <const unsigned char *>PyBytes_AS_STRING(obj),
                               PyBytes_GET_SIZE(obj), kind, field)
        if PyUnicode_Check(obj):
            raise TypeError(f"{field} must be a bytes-like object, not str")
        PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE)
        try:
            self._put16(mark, <const unsigned char *>view.buf, view.len, kind, field)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _body(self, Py_ssize_t mark, object body, str kind) except -1:
        cdef Py_buffer view
        if PyBytes_CheckExact(body):
            self._room(mark, PyBytes_GET_SIZE(body), kind)
            self._put(PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body))
            return 0
        if PyUnicode_Check(body):
            raise TypeError("body must be a bytes-like object, not str")
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        try:
            self._room(mark, view.len, kind)
            self._put(view.buf, view.len)
        finally:
            PyBuffer_Release(&view)
        return 0

    cdef int _put_name(self, Py_ssize_t mark, object name, str kind) except -1:
        # Names travel lowercase (HTTP/2 style): validate as a token, fold while copying.
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef Py_ssize_t n, i
        cdef bint release = False
        if PyBytes_CheckExact(name):
            p = <const unsigned char *>PyBytes_AS_STRING(name)
            n = PyBytes_GET_SIZE(name)
        elif PyUnicode_Check(name):
            if not PyUnicode_IS_ASCII(name):
                raise FrameError(f"{kind}: header name is not a lowercase token")
            p = <const unsigned char *>PyUnicode_DATA(name)
            n = PyUnicode_GET_LENGTH(name)
        else:
            PyObject_GetBuffer(name, &view, PyBUF_SIMPLE)
            p = <const unsigned char *>view.buf
            n = view.len
            release = True
        try:
            if n > C_U16_MAX:
                raise FrameError(f"{kind}: header name length {n} exceeds {C_U16_MAX}")
            if n == 0:
                raise FrameError(f"{kind}: header name is not a lowercase token")
            for i in range(n):
                if not _TOKEN[p[i]]:
                    raise FrameError(f"{kind}: header name is not a lowercase token")
            self._room(mark, 2 + n, kind)
            gw_store_be16(self._buf + self._len, <uint16_t>n)
            self._len += 2
            for i in range(n):
                self._buf[self._len + i] = _LOWER[p[i]]
            self._len += n
        finally:
            if release:
                PyBuffer_Release(&view)
        return 0

    cdef int _put_value(self, Py_ssize_t mark, object value, str kind) except -1:
        cdef Py_buffer view
        cdef const unsigned char *p
        cdef Py_ssize_t n, i
        cdef bint release = False
        cdef object tmp = None
        if PyBytes_CheckExact(value):
            p = <const unsigned char *>PyBytes_AS_STRING(value)
            n = PyBytes_GET_SIZE(value)
        elif PyUnicode_Check(value):
            if PyUnicode_IS_ASCII(value):
                p = <const unsigned char *>PyUnicode_DATA(value)
                n = PyUnicode_GET_LENGTH(value)
            else:
                try:
                    tmp = PyUnicode_AsLatin1String(value)
                except UnicodeEncodeError:
                    raise FrameError(f"{kind}: header value is not latin-1") from None
                p = <const unsigned char *>PyBytes_AS_STRING(tmp)
                n = PyBytes_GET_SIZE(tmp)
        else:
            PyObject_GetBuffer(value, &view, PyBUF_SIMPLE)
            p = <const unsigned char *>view.buf
            n = view.len
            release = True
        try:
            self._put_value_raw(mark, p, n, kind)
        finally:
            if release:
                PyBuffer_Release(&view)
        return 0

    cdef int _put_value_raw(self, Py_ssize_t mark, const unsigned char *p, Py_ssize_t n,
                            str kind) except -1:
        cdef Py_ssize_t i
        for i in range(n):
            if _VALUE_BAD[p[i]]:
                raise FrameError(f"{kind}: header value contains a control character")
        return self._put16(mark, p, n, kind, "header value")

    cdef int _count_header(self, Py_ssize_t *count, str kind) except -1:
        count[0] += 1
        if count[0] > C_MAX_HEADERS:
            raise FrameError(f"{kind}: more than {C_MAX_HEADERS} headers")
        return 0

    cdef int _put_header(self, Py_ssize_t mark, object item, Py_ssize_t *count,
                         str kind) except -1:
        name, value = item
        self._count_header(count, kind)
        self._put_name(mark, name, kind)
        self._put_value(mark, value, kind)
        return 0

    cdef int _put_fixed(self, Py_ssize_t mark, const char *name, object value,
                        Py_ssize_t *count) except -1:
        # A header of the gateway's own (REQUEST only): the name is a known lowercase token.
        self._count_header(count, "REQUEST")
        self._put16(mark, <const unsigned char *>name, <Py_ssize_t>strlen(name), "REQUEST",
                    "header name")
        return self._put_value(mark, value, "REQUEST")

    cdef int _put_headers(self, Py_ssize_t mark, object headers, str kind) except -1:
        cdef Py_ssize_t count_at, count = 0
        self._room(mark, 2, kind)
        count_at = self._len
        self._len += 2
        for item in headers:
            self._put_header(mark, item, &count, kind)
        gw_store_be16(self._buf + count_at, <uint16_t>count)
        return 0

    cdef bint _forward_fast(self, Py_ssize_t mark, tuple seq, const uint8_t *forward,
                            bint te, object identity, object peer_ip, object scheme,
                            object host, const char *cid, Py_ssize_t clen,
                            object body) except -1:
        """request_forward's header section and body when every field is bytes and the
        whole frame fits: sized and reserved once, each field checked as it is copied
        (field by field, the checks and reservations cost more than the copies). False
        when a field is of another type, too long or invalid, or a limit would be passed:
        the caller then rewinds and goes field by field, which raises the error request()
        would."""
        cdef Py_ssize_t n = PyTuple_GET_SIZE(seq), i, total = 2, count = 0
        cdef tuple pair, ident
        cdef object item
        cdef unsigned char *out
        cdef unsigned char *count_at
        cdef uint8_t bad = 0
        if not (PyBytes_CheckExact(peer_ip) and PyBytes_CheckExact(scheme)
                and PyBytes_CheckExact(body)):
            return False
        if PyTuple_CheckExact(identity):
            ident = <tuple>identity
        elif type(identity) is list:
            ident = tuple(identity)
        else:
            return False
        for i in range(n):
            if forward[i]:
                pair = <tuple>PyTuple_GET_ITEM(seq, i)
                total += 4 + PyBytes_GET_SIZE(<object>PyTuple_GET_ITEM(pair, 0)) \
                    + PyBytes_GET_SIZE(<object>PyTuple_GET_ITEM(pair, 1))
                count += 1
        if te:
            total += 4 + 2 + 8
            count += 1
        for item in ident:
            if not _bytes_pair(item):
                return False
            total += 4 + PyBytes_GET_SIZE(<object>PyTuple_GET_ITEM(item, 0)) \
                + PyBytes_GET_SIZE(<object>PyTuple_GET_ITEM(item, 1))
            count += 1
        total += (4 + 15 + PyBytes_GET_SIZE(peer_ip) + 4 + 17 + PyBytes_GET_SIZE(scheme)
                  + 4 + 16 + clen)
        count += 3
        if host is not None:
            total += 4 + 16 + PyBytes_GET_SIZE(host)
            count += 1
        if count > C_MAX_HEADERS:
            return False
        total += PyBytes_GET_SIZE(body)
        if self._len - mark - 4 + total > self._max:
            return False
        self._reserve(total)
        count_at = self._buf + self._len
        out = count_at + 2
        for i in range(n):
            if forward[i]:
                out = _copy_pair(out, <object>PyTuple_GET_ITEM(seq, i), &bad)
        if te:
            out = _copy_fixed(out, b"te", 2)
            out = _copy_fixed(out, b"trailers", 8)
        for pair in ident:
            out = _copy_pair(out, pair, &bad)
        out = _copy_fixed(out, b"x-forwarded-for", 15)
        out = _copy_value(out, <const unsigned char *>PyBytes_AS_STRING(peer_ip),
                          PyBytes_GET_SIZE(peer_ip), &bad)
        out = _copy_fixed(out, b"x-forwarded-proto", 17)
        out = _copy_value(out, <const unsigned char *>PyBytes_AS_STRING(scheme),
                          PyBytes_GET_SIZE(scheme), &bad)
        if host is not None:
            out = _copy_fixed(out, b"x-forwarded-host", 16)
            out = _copy_value(out, <const unsigned char *>PyBytes_AS_STRING(host),
                              PyBytes_GET_SIZE(host), &bad)
        out = _copy_fixed(out, b"x-correlation-id", 16)
        out = _copy_value(out, <const unsigned char *>cid, clen, &bad)
        if bad:
            return False
        gw_store_be16(count_at, <uint16_t>count)
        memcpy(out, PyBytes_AS_STRING(body), <size_t>PyBytes_GET_SIZE(body))
        self._len += total
        return True

    # --- frames -----------------------------------------------------------------------

    cdef Py_ssize_t _request_start(self, object corr, object method, object path,
                                   object query, object timeout_ms,
                                   object flags) except -1:
        # A REQUEST up to its headers; returns the frame's mark.
        cdef Py_ssize_t mark, mlen, plen = 0, i
        cdef const unsigned char *m
        cdef const char *pp
        cdef Py_ssize_t qlen = 0
        cdef const char *qp
        cdef long long tmo = _ll(timeout_ms)
        cdef long long fl = _ll(flags)
        if not PyUnicode_Check(method):
            raise TypeError("method must be str")
        if not PyUnicode_Check(path):
            raise TypeError("path must be str")
        _check_flags(fl, "REQUEST")
        if tmo < 0 or tmo > _U32_MAX:
            raise FrameError(f"REQUEST: timeout_ms {tmo} out of range 0-{_U32_MAX}")
        mlen = PyUnicode_GET_LENGTH(method)
        if mlen == 0:
            raise FrameError("REQUEST: empty method")
        if not PyUnicode_IS_ASCII(method):
            raise FrameError("REQUEST: method is not an HTTP token")
        if mlen > C_MAX_METHOD:
            raise FrameError(f"REQUEST: method length {mlen} exceeds {C_MAX_METHOD}")
        m = <const unsigned char *>PyUnicode_DATA(method)
        for i in range(mlen):
            if not _TOKEN[m[i]]:
                raise FrameError("REQUEST: method is not an HTTP token")
        mark = self._begin(T_REQUEST, corr)
        try:
            self._room(mark, 6 + mlen, "REQUEST")
            self._buf[self._len] = <uint8_t>fl
            gw_store_be32(self._buf + self._len + 1, <uint32_t>tmo)
            self._buf[self._len + 5] = <uint8_t>mlen
            self._len += 6
            self._put(m, mlen)
            try:
                pp = PyUnicode_AsUTF8AndSize(path, &plen)
            except UnicodeEncodeError:
                raise FrameError("REQUEST: path is not valid UTF-8") from None
            self._put16(mark, <const unsigned char *>pp, plen, "REQUEST", "path")
            if PyUnicode_Check(query):
                try:
                    qp = PyUnicode_AsUTF8AndSize(query, &qlen)
                except UnicodeEncodeError:
                    raise FrameError("REQUEST: query is not valid UTF-8") from None
                self._put16(mark, <const unsigned char *>qp, qlen, "REQUEST", "query")
            else:
                self._put16_obj(mark, query, "REQUEST", "query")
        except BaseException:
            self._len = mark
            raise
        return mark

    def request(self, corr, method, path, query, headers, timeout_ms, flags, body):
        cdef Py_ssize_t mark = self._request_start(corr, method, path, query, timeout_ms, flags)
        try:
            self._put_headers(mark, headers, "REQUEST")
            self._body(mark, body, "REQUEST")
        except BaseException:
            self._len = mark
            raise
        self._end(mark)

    cpdef request_forward(self, corr, method, path, query, headers, timeout_ms, flags, body,
                          dict classes, classify, bint http11, bint keep_trace,
                          identity, peer_ip, scheme, str correlation_id):
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
        if classes is None or correlation_id is None:
            raise TypeError("classes and correlation_id must not be None")
        cdef tuple seq = tuple(headers)
        cdef Py_ssize_t n = len(seq), i, mark, count_at, count = 0, clen = 0, start
        cdef uint8_t small[C_MAX_HEADERS]
        cdef uint8_t *forward = small
        cdef PyObject *known
        cdef long kind
        cdef tuple pair
        cdef object name, host = None
        cdef list connection = None     # the value of every Connection line
        cdef bint te_trailers = False
        cdef const char *cid
        if n > C_MAX_HEADERS:
            forward = <uint8_t *>PyMem_Malloc(<size_t>n)
            if forward == NULL:
                raise MemoryError()
        try:
            # Pass 1: classify every header. A Connection header may come after the ones
            # it names, so nothing is written before all of them are known.
            for i in range(n):
                pair = _header_pair(seq[i])
                name = pair[0]
                known = PyDict_GetItemWithError(classes, name)
                if known != NULL:
                    kind = <object>known
                else:
                    kind = classify(name)
                forward[i] = kind == H_KEEP or kind == H_HOST or (kind == H_TRACE and keep_trace)
                if kind == H_HOST:
                    host = pair[1]
                elif kind == H_CONNECTION:
                    if connection is None:
                        connection = [pair[1]]
                    else:
                        connection.append(pair[1])
                elif kind == H_TE:
                    te_trailers = _is_trailers(pair[1])
            # request_headers() encodes the correlation id before request() checks a field:
            # so does this, for the same error on the same input.
            cid = PyUnicode_AsUTF8AndSize(correlation_id, &clen)
            mark = self._request_start(corr, method, path, query, timeout_ms, flags)
            try:
                if connection is not None:
                    for i in range(n):
                        if forward[i] and _named(connection, <bytes>(<tuple>seq[i])[0]):
                            forward[i] = 0
                start = self._len
                if self._forward_fast(mark, seq, forward, te_trailers and http11, identity,
                                      peer_ip, scheme, host, cid, clen, body):
                    self._end(mark)
                    return
                self._len = start
                self._room(mark, 2, "REQUEST")
                count_at = self._len
                self._len += 2
                for i in range(n):
                    if not forward[i]:
                        continue
                    pair = <tuple>seq[i]
                    self._count_header(&count, "REQUEST")
                    self._put_name(mark, pair[0], "REQUEST")
                    self._put_value(mark, pair[1], "REQUEST")
                if te_trailers and http11:
                    self._put_fixed(mark, b"te", b"trailers", &count)
                for item in identity:
                    self._put_header(mark, item, &count, "REQUEST")
                self._put_fixed(mark, b"x-forwarded-for", peer_ip, &count)
                self._put_fixed(mark, b"x-forwarded-proto", scheme, &count)
                if host is not None:
                    self._put_fixed(mark, b"x-forwarded-host", host, &count)
                self._count_header(&count, "REQUEST")
                self._put16(mark, <const unsigned char *>b"x-correlation-id", 16, "REQUEST",
                            "header name")
                self._put_value_raw(mark, <const unsigned char *>cid, clen, "REQUEST")
                gw_store_be16(self._buf + count_at, <uint16_t>count)
                self._body(mark, body, "REQUEST")
            except BaseException:
                self._len = mark
                raise
            self._end(mark)
        finally:
            if forward != small:
                PyMem_Free(forward)

    def response(self, corr, status, headers, flags, body):
        cdef Py_ssize_t mark
        cdef long long st = _ll(status)
        cdef long long fl = _ll(flags)
        _check_flags(fl, "RESPONSE")
        if st < 100 or st > 999:
            raise FrameError(f"RESPONSE: status {st} out of range 100-999")
        mark = self._begin(T_RESPONSE, corr)
        try:
            self._room(mark, 3, "RESPONSE")
            self._buf[self._len] = <uint8_t>fl
            gw_store_be16(self._buf + self._len + 1, <uint16_t>st)
            self._len += 3
            self._put_headers(mark, headers, "RESPONSE")
            self._body(mark, body, "RESPONSE")
        except BaseException:
            self._len = mark
            raise
        self._end(mark)

    def stream_data(self, ftype, corr, flags, chunk):
        cdef Py_ssize_t mark
        cdef long long ft = _ll(ftype)
        cdef long long fl = _ll(flags)
        if ft != T_REQUEST_STREAM_DATA and ft != T_RESPONSE_STREAM_DATA:
            raise FrameError(f"frame type {ft} is not a stream-data type")
        if fl < 0 or fl > 0xFF:
            raise FrameError(f"STREAM_DATA: flags {fl} out of range 0-255")
        _check_stream_flags(fl)
        mark = self._begin(<uint8_t>ft, corr)
        try:
            self._room(mark, 1, "STREAM_DATA")
            self._buf[self._len] = <uint8_t>fl
            self._len += 1
            self._body(mark, chunk, "STREAM_DATA")
        except BaseException:
            self._len = mark
            raise
        self._end(mark)

    def control(self, ftype, corr, obj):
        cdef object data
        cdef long long ft = _ll(ftype)
        if not (ft == T_HELLO or ft == T_HEARTBEAT or ft == T_ENDPOINTS_UPDATE
                or ft == T_CANCEL or ft == T_HELLO_ACK or ft == T_DRAIN):
            raise FrameError(f"frame type {ft} is not a JSON control type")
        if obj is None:
            data = b""
        elif type(obj) is dict:
            data = _dumps(obj)
        else:
            raise TypeError("control payload must be a dict or None")
        self._raw(<uint8_t>ft, corr, data, "control")

    def window_update(self, corr, increment):
        cdef unsigned char inc[4]
        cdef long long inc_n = _ll(increment)
        if inc_n < 1 or inc_n > _MAX_WINDOW_INCREMENT:
            raise FrameError(f"WINDOW_UPDATE: increment {inc_n} out of range "
                             f"1-{_MAX_WINDOW_INCREMENT}")
        gw_store_be32(inc, <uint32_t>inc_n)
        self._raw(T_WINDOW_UPDATE, corr, PyBytes_FromStringAndSize(<const char *>inc, 4),
                  "WINDOW_UPDATE")

    def raw(self, ftype, corr, payload):
        """Any frame type with a payload written verbatim (PING/PONG echo their payload)."""
        cdef long long ft = _ll(ftype)
        if ft < 1 or ft > T_LAST:
            raise FrameError(f"unknown frame type {ft}")
        self._raw(<uint8_t>ft, corr, payload, "raw")

    cdef int _raw(self, uint8_t ftype, object corr, object payload, str kind) except -1:
        cdef Py_ssize_t mark = self._begin(ftype, corr)
        try:
            self._body(mark, payload, kind)
        except BaseException:
            self._len = mark
            raise
        self._end(mark)
        return 0
