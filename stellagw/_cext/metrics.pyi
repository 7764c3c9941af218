"""Type stubs for stellagw._cext.metrics (cext/metrics.pyx); the twin is stellagw._py.metrics."""
from typing import Final, Iterable

__all__ = ["Histogram", "DURATION_BUCKETS", "perf_counter"]

DURATION_BUCKETS: Final[tuple[float, ...]]    # seconds, 18 upper bounds (+Inf implied)

def perf_counter() -> float:
    """time.perf_counter(): the same clock (CLOCK_MONOTONIC) and the same value."""

class Histogram:
    @property
    def counts(self) -> list[int]:
        """Per bucket (len(DURATION_BUCKETS) + 1, the last is +Inf); a new list each time."""
    @property
    def total(self) -> float: ...
    @property
    def n(self) -> int: ...
    def observe(self, seconds: float, /) -> None:
        """Count one sample in bucket bisect_left(DURATION_BUCKETS, seconds)."""
    def add(self, counts: Iterable[int], total: float) -> None: ...
    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative (upper bound, count) pairs, "+Inf" last."""
