# The Histogram of cext/metrics.pyx, for the compiled glue to call observe() as a C method
# (four times per routed request; docs/hot-path.md), and the clock its durations are read
# with, as a C function. Its pure-Python twin needs none.
cimport cython
from libc.stdint cimport int64_t

cdef enum:
    C_N_BOUNDS = 18     # len(DURATION_BUCKETS); a bucket per bound, then +Inf


@cython.final
cdef class Histogram:
    cdef int64_t c[C_N_BOUNDS + 1]       # zeroed by tp_alloc
    cdef readonly double total

    cpdef observe(self, double seconds)

cpdef double perf_counter() noexcept
