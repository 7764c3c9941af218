# cython: language_level=3
"""HTTP/1.1 wire pieces of the client edge (compiled).

Compiled twin of stellagw/_py/httpwire.py: same results on the same inputs
(tests/codecs/test_httpwire.py runs both, hypothesis included). These run once per request, so
they work on the bytes in place: the response head is one allocation and one copy of
each part, and the field checks scan without building lists or sets.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr, memcmp, memcpy

cdef extern from "Python.h":
    object PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    void *PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    bint PyUnicode_IS_ASCII(object o)

__all__ = ["render_response", "host_ok", "TE_NONE", "TE_CHUNKED", "TE_OTHER", "TE_BAD",
           "transfer_coding", "split_target", "cid_taken", "cid_made", "method_name",
           "header_name", "COMMON_HEADER_NAMES"]

cdef enum:
    C_MAX_HOST = 255
    C_MAX_CID = 64
    C_TE_NONE = 0
    C_TE_CHUNKED = 1
    C_TE_OTHER = 2
    C_TE_BAD = 3

MAX_HOST = C_MAX_HOST
TE_NONE, TE_CHUNKED, TE_OTHER, TE_BAD = C_TE_NONE, C_TE_CHUNKED, C_TE_OTHER, C_TE_BAD

# _REG[c]: unreserved (RFC 3986 §2.3); _V6[c]: hex digit, ':' or '.'; _CID[c]: what a
# client's X-Correlation-Id may hold ([A-Za-z0-9._-])
cdef unsigned char _REG[256]
cdef unsigned char _V6[256]
cdef unsigned char _CID[256]


cdef void _init() noexcept:
    cdef int i
    cdef const char *extra = b"-._~"
    for i in range(256):
        _REG[i] = (48 <= i <= 57) or (65 <= i <= 90) or (97 <= i <= 122)
        _V6[i] = (48 <= i <= 57) or (65 <= i <= 70) or (97 <= i <= 102) or i == 58 or i == 46
        _CID[i] = (48 <= i <= 57) or (65 <= i <= 90) or (97 <= i <= 122) or i == 46 \
            or i == 95 or i == 45
    i = 0
    while extra[i]:
        _REG[<unsigned char>extra[i]] = 1
        i += 1


_init()


cdef int _content_length(char *out, Py_ssize_t length) noexcept:
    # "content-length: <decimal>\r\n" into out (48 bytes); snprintf's format parsing cost
    # more than the rest of the response head.
    cdef char digits[24]
    cdef int nd = 0
    cdef size_t v = <size_t>length
    while True:
        digits[nd] = <char>(48 + v % 10)
        v //= 10
        nd += 1
        if v == 0:
            break
    memcpy(out, b"content-length: ", 16)
    cdef int k
    for k in range(nd):
        out[16 + k] = digits[nd - 1 - k]
    out[16 + nd] = 13
    out[17 + nd] = 10
    return 18 + nd


cdef inline char* _put(char* p, bytes part) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(part)
    memcpy(p, PyBytes_AS_STRING(part), n)
    return p + n


cpdef bytes render_response(bytes line, bytes date, Py_ssize_t length, bytes headers,
                            bytes extra, str cid, bytes connection, bytes body):
    """status line, date, content-length (unless length < 0: a 304), the stages' headers,
    the correlation id, connection, blank line, body: one allocation. The correlation id
    is copied from the str itself: ASCII by construction (cid_taken, cid_made)."""
    if (line is None or date is None or headers is None or extra is None or cid is None
            or connection is None or body is None):
        raise TypeError("render_response takes bytes and a str cid, not None")
    if not PyUnicode_IS_ASCII(cid):
        raise ValueError("a correlation id is ASCII")
    cdef Py_ssize_t cid_n = PyUnicode_GET_LENGTH(cid)
    cdef char cl[48]
    cdef int cl_n = 0
    if length >= 0:
        cl_n = _content_length(cl, length)
    cdef Py_ssize_t total = (PyBytes_GET_SIZE(line) + PyBytes_GET_SIZE(date) + cl_n
                             + PyBytes_GET_SIZE(headers) + PyBytes_GET_SIZE(extra)
                             + 18 + cid_n + 2 + PyBytes_GET_SIZE(connection)
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
    memcpy(p, PyUnicode_DATA(cid), cid_n)
    p += cid_n
    memcpy(p, b"\r\n", 2)
    p += 2
    p = _put(p, connection)
    memcpy(p, b"\r\n", 2)
    p += 2
    _put(p, body)
    return out


cpdef bint host_ok(bytes value) except -1:
    """uri-host [":" port] as docs/http-edge.md narrows it (see the twin)."""
    if value is None:
        raise TypeError("host_ok takes bytes, not None")
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i = 0, start, digits
    cdef bint colon = False
    cdef long port = 0
    if n == 0 or n > C_MAX_HOST:
        return False
    if s[0] == 91:                              # '[' IPv6 literal
        i = 1
        while i < n and s[i] != 93:             # ']'
            if not _V6[s[i]]:
                return False
            colon = colon or s[i] == 58
            i += 1
        if i >= n or i < 3 or not colon:
            return False
        i += 1
    else:
        while i < n and s[i] != 58:
            if not _REG[s[i]]:
                return False
            i += 1
        if i == 0:
            return False
    if i == n:
        return True
    if s[i] != 58:
        return False
    i += 1
    start = i
    while i < n:
        if not 48 <= s[i] <= 57:
            return False
        port = port * 10 + (s[i] - 48)
        i += 1
        if i - start > 5:
            return False
    digits = i - start
    return digits >= 1 and 1 <= port <= 65535


cdef inline bint _ws(unsigned char c) noexcept:
    return c == 32 or c == 9


def transfer_coding(bytes value not None):
    """TE_CHUNKED, TE_OTHER or TE_BAD for one Transfer-Encoding line (see the twin)."""
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), start = 0, end, a, b, count = 0
    cdef bint last_chunked = False, earlier_chunked = False
    cdef int j
    cdef const unsigned char *word = <const unsigned char *>b"chunked"
    while True:
        end = start
        while end < n and s[end] != 44:         # ','
            end += 1
        a = start
        b = end
        while a < b and _ws(s[a]):
            a += 1
        while b > a and _ws(s[b - 1]):
            b -= 1
        if a == b:
            return C_TE_BAD
        if last_chunked:
            earlier_chunked = True
        last_chunked = b - a == 7
        if last_chunked:
            for j in range(7):
                if s[a + j] | 0x20 != word[j]:
                    last_chunked = False
                    break
        count += 1
        if end == n:
            break
        start = end + 1
    if not last_chunked or earlier_chunked:
        return C_TE_BAD
    return C_TE_CHUNKED if count == 1 else C_TE_OTHER


cpdef tuple split_target(bytes url):
    """(path, query) of an origin-form target, split at the first '?'; None when it holds
    a '#' (a fragment is never sent, RFC 9112 §3.2)."""
    if url is None:
        raise TypeError("split_target takes bytes, not None")
    cdef const char *s = PyBytes_AS_STRING(url)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(url)
    if memchr(s, 35, n) != NULL:                # '#'
        return None
    cdef const char *q = <const char *>memchr(s, 63, n)   # '?'
    if q == NULL:
        return (url, b"")
    cdef Py_ssize_t i = q - s
    return (PyBytes_FromStringAndSize(s, i), PyBytes_FromStringAndSize(q + 1, n - i - 1))


cpdef str cid_taken(bytes value):
    """The client's X-Correlation-Id as str when well formed (see the twin), else None."""
    if value is None:
        return None
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(value)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(value), i
    if n == 0 or n > C_MAX_CID:
        return None
    for i in range(n):
        if not _CID[s[i]]:
            return None
    cdef str out = PyUnicode_New(n, 127)
    memcpy(PyUnicode_DATA(out), s, n)
    return out


cpdef str cid_made(str prefix, unsigned long long serial):
    """prefix + serial in lowercase hex, at least 10 digits (see the twin): one str built
    in place, where %-formatting parsed its format and built two."""
    if prefix is None:
        raise TypeError("prefix must be str")
    if not PyUnicode_IS_ASCII(prefix):
        return "%s%010x" % (prefix, serial)
    cdef const char *hexdigits = b"0123456789abcdef"
    cdef int nd = 10
    cdef unsigned long long v = serial >> 40
    while v:
        nd += 1
        v >>= 4
    cdef Py_ssize_t plen = PyUnicode_GET_LENGTH(prefix)
    cdef str out = PyUnicode_New(plen + nd, 127)
    cdef char *p = <char *>PyUnicode_DATA(out)
    memcpy(p, PyUnicode_DATA(prefix), plen)
    p += plen + nd
    v = serial
    while nd:
        p -= 1
        p[0] = hexdigits[v & 15]
        v >>= 4
        nd -= 1
    return out


cdef str _GET = "GET", _HEAD = "HEAD", _POST = "POST", _PUT = "PUT", _PATCH = "PATCH"
cdef str _DELETE = "DELETE", _OPTIONS = "OPTIONS"


cpdef str method_name(bytes method):
    """The request method as str: one str object per common method (see the twin), found
    by length and bytes rather than a hash of the parser's new bytes object each time."""
    if method is None:
        raise TypeError("method_name takes bytes, not None")
    cdef const char *m = PyBytes_AS_STRING(method)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(method)
    if n == 3:
        if memcmp(m, b"GET", 3) == 0:
            return _GET
        if memcmp(m, b"PUT", 3) == 0:
            return _PUT
    elif n == 4:
        if memcmp(m, b"POST", 4) == 0:
            return _POST
        if memcmp(m, b"HEAD", 4) == 0:
            return _HEAD
    elif n == 5:
        if memcmp(m, b"PATCH", 5) == 0:
            return _PATCH
    elif n == 6:
        if memcmp(m, b"DELETE", 6) == 0:
            return _DELETE
    elif n == 7:
        if memcmp(m, b"OPTIONS", 7) == 0:
            return _OPTIONS
    return method.decode("ascii")


# The header names most requests carry or the gateway reads: one list, the twin's (data,
# not logic). header_name() gives back one bytes object for each, its hash computed once,
# so the dict and set lookups after it (the forwarding classes, the credential fields) hash
# nothing.
from stellagw._py.httpwire import COMMON_HEADER_NAMES

cdef enum:
    C_NAME_MAX = 24                 # the longest common name (sec-websocket-extensions)

cdef tuple _NAMES = tuple(sorted(COMMON_HEADER_NAMES, key=len))
# _NAMES[_FIRST[n]:_FIRST[n + 1]] are the names of n bytes.
cdef Py_ssize_t _FIRST[C_NAME_MAX + 2]


cdef void _index_names() noexcept:
    cdef Py_ssize_t n, i = 0
    for n in range(C_NAME_MAX + 2):
        while i < len(_NAMES) and len(<bytes>_NAMES[i]) < n:
            i += 1
        _FIRST[n] = i


_index_names()


cpdef bytes header_name(bytes raw):
    """A field name as the gateway keys on it: lower case (RFC 9110 §5.1), the one object
    of COMMON_HEADER_NAMES when it is one, else `raw` itself when it has no upper-case
    letter (the parser's bytes object is the caller's alone), else a lowered copy."""
    if raw is None:
        raise TypeError("header_name takes bytes, not None")
    cdef const unsigned char *s = <const unsigned char *>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), i, k
    cdef const unsigned char *name
    cdef unsigned char c
    cdef bint upper = False
    if n <= C_NAME_MAX:
        for k in range(_FIRST[n], _FIRST[n + 1]):
            name = <const unsigned char *>PyBytes_AS_STRING(<bytes>_NAMES[k])
            for i in range(n):
                c = s[i]
                if 65 <= c <= 90:
                    c += 32
                if c != name[i]:
                    break
            else:
                return <bytes>_NAMES[k]
    for i in range(n):
        if 65 <= s[i] <= 90:
            upper = True
            break
    if not upper:
        return raw
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char *o = <unsigned char *>PyBytes_AS_STRING(out)
    for i in range(n):
        c = s[i]
        o[i] = c + 32 if 65 <= c <= 90 else c
    return out
