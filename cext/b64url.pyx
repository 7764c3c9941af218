# cython: language_level=3
"""base64url for JOSE (compiled): strict decoding, encoding, a compact JWS's three parts.

Compiled twin of stellagw/_py/b64url.py, the one to read for what each function answers
(tests/codecs/test_dpop_twins.py holds the two to each other with hypothesis). The twin goes
through binascii, which needs the standard alphabet and padding: a translate, a pad and a
copy per part before it decodes, and a translate and a strip after it encodes. Here each
is one pass over the bytes into the result's own buffer; a DPoP request decodes two parts
of its proof and encodes one digest (docs/hot-path.md). Failures answer None, not an
exception: stellagw/auth/jose.py raises its JoseError, and the DPoP check its refusal.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_New
from libc.string cimport memchr

import orjson

__all__ = ["decode", "encode", "split", "json_object"]


cdef extern from "Python.h":
    void *PyUnicode_DATA(object)

cdef object _loads = orjson.loads
cdef object _JSONDecodeError = orjson.JSONDecodeError

# _B64[c]: the 6-bit value of a URL-safe alphabet character, -1 for every other byte
# ("+", "/" and "=" included).
cdef signed char _B64[256]
cdef const char *_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


cdef void _init_table() noexcept:
    cdef int i
    for i in range(256):
        _B64[i] = -1
    for i in range(64):
        _B64[<unsigned char>_ALPHABET[i]] = i


_init_table()


cdef object _decode(const unsigned char *src, Py_ssize_t n):
    """The bytes of n characters of the URL-safe alphabet without padding, or None; the unused
    low bits of the last character are ignored, as binascii's strict mode ignores them."""
    cdef Py_ssize_t rest = n % 4, full = n - rest, i, o = 0
    cdef int a, b, c, d
    cdef unsigned char *dst
    if n == 0 or rest == 1:
        return None
    out = PyBytes_FromStringAndSize(NULL, full // 4 * 3 + (rest - 1 if rest else 0))
    dst = <unsigned char *>PyBytes_AS_STRING(out)
    for i in range(0, full, 4):
        a = _B64[src[i]]
        b = _B64[src[i + 1]]
        c = _B64[src[i + 2]]
        d = _B64[src[i + 3]]
        if (a | b | c | d) < 0:
            return None
        dst[o] = <unsigned char>((a << 2) | (b >> 4))
        dst[o + 1] = <unsigned char>((b << 4) | (c >> 2))
        dst[o + 2] = <unsigned char>((c << 6) | d)
        o += 3
    if rest:
        a = _B64[src[full]]
        b = _B64[src[full + 1]]
        c = _B64[src[full + 2]] if rest == 3 else 0
        if (a | b | c) < 0:
            return None
        dst[o] = <unsigned char>((a << 2) | (b >> 4))
        if rest == 3:
            dst[o + 1] = <unsigned char>((b << 4) | (c >> 2))
    return out


def decode(bytes part not None):
    """Strict base64url (the URL-safe alphabet only, no padding, non-empty) → bytes, or None."""
    return _decode(<const unsigned char *>PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))


def encode(data):
    """base64url without padding, as str (bytes, or anything bytes() takes)."""
    if not PyBytes_CheckExact(data):
        data = bytes(data)
    cdef const unsigned char *src = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data), i, o = 0
    cdef Py_ssize_t rest = n % 3, full = n - rest
    out = PyUnicode_New(full // 3 * 4 + (rest + 1 if rest else 0), 127)
    cdef unsigned char *dst = <unsigned char *>PyUnicode_DATA(out)
    for i in range(0, full, 3):
        dst[o] = _ALPHABET[src[i] >> 2]
        dst[o + 1] = _ALPHABET[((src[i] & 3) << 4) | (src[i + 1] >> 4)]
        dst[o + 2] = _ALPHABET[((src[i + 1] & 15) << 2) | (src[i + 2] >> 6)]
        dst[o + 3] = _ALPHABET[src[i + 2] & 63]
        o += 4
    if rest:
        dst[o] = _ALPHABET[src[full] >> 2]
        if rest == 1:
            dst[o + 1] = _ALPHABET[(src[full] & 3) << 4]
        else:
            dst[o + 1] = _ALPHABET[((src[full] & 3) << 4) | (src[full + 1] >> 4)]
            dst[o + 2] = _ALPHABET[(src[full + 1] & 15) << 2]
    return out


def split(bytes token not None):
    """(header, payload, signature): the three non-empty parts between two dots, or None.
    Their alphabet is left to whoever decodes each."""
    cdef const char *buf = PyBytes_AS_STRING(token)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(token), i, j
    cdef const char *dot = <const char *>memchr(buf, 46, n)
    if dot == NULL:
        return None
    i = dot - buf
    dot = <const char *>memchr(buf + i + 1, 46, n - i - 1)
    if dot == NULL:
        return None
    j = dot - buf
    if i == 0 or j == i + 1 or j == n - 1 or memchr(buf + j + 1, 46, n - j - 1) != NULL:
        return None
    return (PyBytes_FromStringAndSize(buf, i), PyBytes_FromStringAndSize(buf + i + 1, j - i - 1),
            PyBytes_FromStringAndSize(buf + j + 1, n - j - 1))


def json_object(bytes part not None):
    """A base64url part holding a JSON object → the dict (orjson), or None."""
    raw = _decode(<const unsigned char *>PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part))
    if raw is None:
        return None
    try:
        obj = _loads(raw)
    except _JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None
