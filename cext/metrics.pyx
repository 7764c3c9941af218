# cython: language_level=3
"""Duration histograms (compiled).

Compiled twin of stellagw/_py/metrics.py: same API, same results (tests/codecs/test_metrics.py runs
them differentially). observe() runs four times per routed request (issue #8), so here it is
a METH_O method that bisects a C array and bumps a C counter and a C double: no Python
object is created. `counts` is built as a list only when asked for (snapshots,
scrapes).
"""
cimport cython
from libc.stdint cimport int64_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

__all__ = ["Histogram", "DURATION_BUCKETS", "perf_counter"]

# Seconds; the twin has the same tuple, and its comment says why these (tests check).
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# C_N_BOUNDS and the Histogram's fields: stellagw/_cext/metrics.pxd (the glue cimports it).

cdef double BOUNDS[C_N_BOUNDS]
cdef tuple LABELS = tuple(repr(float(b)) for b in DURATION_BUCKETS)


cdef int _load_bounds() except -1:
    cdef Py_ssize_t i
    if len(DURATION_BUCKETS) != C_N_BOUNDS:
        raise ImportError(f"C_N_BOUNDS is {C_N_BOUNDS} but DURATION_BUCKETS has "
                          f"{len(DURATION_BUCKETS)} bounds")
    for i in range(C_N_BOUNDS):
        BOUNDS[i] = DURATION_BUCKETS[i]
    return 0

_load_bounds()


cpdef double perf_counter() noexcept:
    """time.perf_counter()'s clock and value, as a C call for the compiled glue: the
    request path reads it seven times, and through Python each read was a call and a float."""
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    # perf_counter's rounding: nanoseconds as one integer, then seconds.
    return <double>(<int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec) / 1e9


cdef class Histogram:
    """Counts per DURATION_BUCKETS bucket (the last is +Inf) and the sum of the samples."""

    @property
    def counts(self):
        """The bucket counts, as a new list."""
        return [self.c[i] for i in range(C_N_BOUNDS + 1)]

    @property
    def n(self):
        cdef int64_t s = 0
        cdef Py_ssize_t i
        for i in range(C_N_BOUNDS + 1):
            s += self.c[i]
        return s

    # A C method for the compiled glue; from Python, METH_O (one argument, no keywords).
    @cython.always_allow_keywords(False)
    cpdef observe(self, double seconds):
        # bisect_left(DURATION_BUCKETS, seconds), with bisect's own test (bound < x), so
        # NaN, infinities and negatives land where bisect puts them.
        cdef int lo = 0, hi = C_N_BOUNDS, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if BOUNDS[mid] < seconds:
                lo = mid + 1
            else:
                hi = mid
        self.c[lo] += 1
        self.total += seconds

    def add(self, counts, total):
        """Add another histogram's counts and sum (a worker's snapshot)."""
        cdef Py_ssize_t i = 0
        for count in counts:
            if i > C_N_BOUNDS:
                raise IndexError("list index out of range")   # what the twin's list says
            self.c[i] += <int64_t>count
            i += 1
        self.total += <double>total

    def buckets(self):
        """Cumulative (upper bound, count) pairs, "+Inf" last, as prometheus_client takes them."""
        cdef int64_t acc = 0
        cdef Py_ssize_t i
        out = []
        for i in range(C_N_BOUNDS):
            acc += self.c[i]
            out.append((LABELS[i], acc))
        out.append(("+Inf", acc + self.c[C_N_BOUNDS]))
        return out
