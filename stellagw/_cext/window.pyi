"""Type stubs for stellagw._cext.window (cext/window.pyx); the twin is stellagw._py.window."""
from typing import Final, Iterable

__all__ = ["WindowLimiter", "FiveMinuteCounter", "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]

MAX_RULES: Final[int]       # 16 rules per limiter
MAX_BUCKETS: Final[int]     # 100 buckets per rule ring

def bucket_ms_for(per_seconds: int) -> int:
    """Bucket width (ms): 100 for windows up to 10 s, else per_seconds * 10 (window/100)."""

class WindowLimiter:
    rules: tuple[tuple[int, int], ...]     # (max_requests, per_seconds) as given
    max_keys: int
    capacity_evictions: int                # keys dropped because max_keys was reached
    def __init__(self, rules: Iterable[tuple[int, int]], max_keys: int = 100_000) -> None: ...
    def hit(self, key: str, now_ms: int) -> tuple[bool, int, int, int, int, int]:
        """(allowed, retry_after_ms, limit, remaining, reset_ms, rule_index); a denied
        request is not counted; limit/remaining/reset_ms describe the most restrictive rule."""
    def __len__(self) -> int: ...
    def evict_idle(self, now_ms: int) -> int: ...

class FiveMinuteCounter:
    def __init__(self) -> None: ...
    def add(self, now_ms: int) -> None: ...
    def count(self, now_ms: int) -> int: ...
