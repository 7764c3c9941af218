# What the compiled service connection (and the write batch) call in cext/frame.pyx on
# every request, as C (docs/hot-path.md): the decoder's feed() and next(), the encoder's
# request_forward() and take(), the correlation ids and the RESPONSE block. Declaring the
# two classes here makes their fields and internal methods part of this file too. The
# pure-Python twin needs none of it.
cimport cython
from libc.stdint cimport uint8_t


@cython.final
cdef class FrameDecoder:
    cdef:
        long long _max                  # largest accepted length field (17 + payload)
        unsigned char *_buf             # owned copy of bytes that straddle feed() calls
        Py_ssize_t _cap                 # allocated size of _buf
        Py_ssize_t _start               # first unconsumed byte in _buf
        Py_ssize_t _end                 # one past the last buffered byte in _buf
        object _chunk                   # bytes object of the last feed(), read in place
        const unsigned char *_cptr      # PyBytes_AS_STRING(_chunk)
        Py_ssize_t _cpos                # first unconsumed byte of _chunk
        Py_ssize_t _clen                # len(_chunk)
        object _cview                   # memoryview(_chunk), made on the first zero-copy

    cdef int _append(self, const unsigned char *data, Py_ssize_t n) except -1
    cpdef feed(self, data)
    cpdef next(self)


@cython.final
cdef class FrameEncoder:
    cdef:
        long long _max          # largest length field we may write (17 + payload)
        unsigned char *_buf     # pending encoded frames (PyMem-owned)
        Py_ssize_t _len         # bytes pending in _buf
        Py_ssize_t _cap         # allocated size of _buf

    cpdef bytes take(self)
    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _room(self, Py_ssize_t mark, Py_ssize_t extra, str kind) except -1
    cdef Py_ssize_t _begin(self, uint8_t ftype, object corr) except -1
    cdef void _end(self, Py_ssize_t mark) noexcept
    cdef void _put(self, const void *data, Py_ssize_t n) noexcept
    cdef int _put16(self, Py_ssize_t mark, const unsigned char *data, Py_ssize_t n, str kind,
                    str field) except -1
    cdef int _put16_obj(self, Py_ssize_t mark, object obj, str kind, str field) except -1
    cdef int _body(self, Py_ssize_t mark, object body, str kind) except -1
    cdef int _put_name(self, Py_ssize_t mark, object name, str kind) except -1
    cdef int _put_value(self, Py_ssize_t mark, object value, str kind) except -1
    cdef int _put_value_raw(self, Py_ssize_t mark, const unsigned char *p, Py_ssize_t n,
                            str kind) except -1
    cdef int _count_header(self, Py_ssize_t *count, str kind) except -1
    cdef int _put_header(self, Py_ssize_t mark, object item, Py_ssize_t *count,
                         str kind) except -1
    cdef int _put_fixed(self, Py_ssize_t mark, const char *name, object value,
                        Py_ssize_t *count) except -1
    cdef int _put_headers(self, Py_ssize_t mark, object headers, str kind) except -1
    cdef bint _forward_fast(self, Py_ssize_t mark, tuple seq, const uint8_t *forward,
                            bint te, object identity, object peer_ip, object scheme,
                            object host, const char *cid, Py_ssize_t clen,
                            object body) except -1
    cdef Py_ssize_t _request_start(self, object corr, object method, object path,
                                   object query, object timeout_ms,
                                   object flags) except -1
    cpdef request_forward(self, corr, method, path, query, headers, timeout_ms, flags, body,
                          dict classes, classify, bint http11, bint keep_trace,
                          identity, peer_ip, scheme, str correlation_id)
    cdef int _raw(self, uint8_t ftype, object corr, object payload, str kind) except -1


cpdef tuple decode_response_block(payload, tuple drop)
cpdef bytes corr_id(bytes prefix, unsigned long long serial)
