# C types for stellagw/transport/batch.py when compiled (docs/hot-path.md).
cimport cython

from stellagw._cext.frame cimport FrameEncoder

cdef Py_ssize_t _WRITE_BATCH, _WRITE_BATCH_BYTES


@cython.final
cdef class WriteBatch:
    cdef public FrameEncoder encoder
    cdef object _loop, _flush
    cdef bint _scheduled
    cdef Py_ssize_t _unwritten      # frames encoded since the last write

    cpdef added(self)
    cpdef bint write(self, transport) except -1
