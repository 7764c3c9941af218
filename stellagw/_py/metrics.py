"""Duration histograms — the pure-Python twin.

Same API and the same results as the compiled ``stellagw._cext.metrics`` (cext/metrics.pyx);
tests/codecs/test_metrics.py runs the two differentially. stellagw/observe/metrics.py picks one.
"""
from __future__ import annotations

from bisect import bisect_left
from time import perf_counter

__all__ = ["Histogram", "DURATION_BUCKETS", "perf_counter"]

# Seconds. Dense below 10 ms because the routing overhead SLO is < 2 ms (p50) / < 5 ms (p99).
# Down to 50 µs: auth, routing and most routed requests take well under 0.5 ms, and a
# quantile inside one bucket is only an interpolation. cext/metrics.pyx has the same tuple
# (tests/codecs/test_metrics.py checks).
DURATION_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025,
                    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_LABELS = tuple(repr(float(b)) for b in DURATION_BUCKETS)


class Histogram:
    """Counts per DURATION_BUCKETS bucket (the last is +Inf) and the sum of the samples.

    The sample count is the counts' sum, not a field: observe() then updates two things
    instead of three.
    """

    __slots__ = ("counts", "total")

    def __init__(self):
        self.counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.total = 0.0

    @property
    def n(self) -> int:
        return sum(self.counts)

    def observe(self, seconds: float, /) -> None:
        # bisect_left(DURATION_BUCKETS, seconds), unrolled below 2 ms, where nearly every
        # sample lands: a float compare in bytecode is several times cheaper than bisect's
        # call and generic compares. `seconds > bound` is bisect's own test, so the index is
        # the same for every value, NaN included (tests/codecs/test_metrics.py checks).
        if seconds > 0.0005:
            if seconds > 0.002:
                i = bisect_left(DURATION_BUCKETS, seconds, 6)
            else:
                i = 5 if seconds > 0.001 else 4
        elif seconds > 0.0001:
            i = 3 if seconds > 0.00025 else 2
        else:
            i = 1 if seconds > 0.00005 else 0
        self.counts[i] += 1
        self.total += seconds

    def add(self, counts, total) -> None:
        """Add another histogram's counts and sum (a worker's snapshot)."""
        mine = self.counts
        for i, c in enumerate(counts):
            mine[i] += c
        self.total += total

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (upper bound, count) pairs, "+Inf" last, as prometheus_client takes them."""
        out, acc = [], 0
        for bound, count in zip(_LABELS, self.counts):
            acc += count
            out.append((bound, acc))
        out.append(("+Inf", acc + self.counts[-1]))
        return out
