"""Type stubs for stellagw._cext.window (cext/window.pyx); the twin is stellagw._py.window."""
from typing import Final, Iterable

__all__ = ["WindowLimiter", "FiveMinuteCounter", "Decision", "rate_limit_headers", "wall_ms",
           "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]

MAX_RULES: Final[int]       # 16 rules per limiter
MAX_BUCKETS: Final[int]     # 100 buckets per rule ring

def bucket_ms_for(per_seconds: int) -> int:
    """Bucket width (ms): 100 for windows up to 10 s, else per_seconds * 10 (window/100)."""

def wall_ms() -> int:
    """time.time_ns() // 10**6: the clock decide() reads when not given now_ms."""

class Decision:
    """A rate-limit decision; read-only, equal field by field, unhashable."""
    @property
    def allowed(self) -> bool: ...
    @property
    def scope(self) -> str | None: ...          # "instance" | "environment" | None
    @property
    def limit(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_s(self) -> int: ...
    @property
    def retry_after_s(self) -> int: ...
    @property
    def current(self) -> int: ...
    @property
    def window_s(self) -> int: ...
    @property
    def applies_to(self) -> str | None: ...     # "identity" | "tenant" | None
    @property
    def rule(self) -> str | None: ...           # the rule's configuration path
    def __init__(self, allowed: bool, scope: str | None, limit: int, remaining: int,
                 reset_s: int, retry_after_s: int, current: int, window_s: int,
                 applies_to: str | None = None, rule: str | None = None) -> None: ...
    def __eq__(self, other: object) -> bool: ...
    __hash__: None  # type: ignore[assignment]

def rate_limit_headers(decision: Decision) -> bytes:
    """b"X-RateLimit-Limit: L\\r\\nX-RateLimit-Remaining: R\\r\\nX-RateLimit-Reset: S\\r\\n", or b""
    when decision.scope is None."""

class WindowLimiter:
    rules: tuple[tuple[int, int], ...]     # (max_requests, per_seconds) as given
    max_keys: int
    capacity_evictions: int                # keys dropped because max_keys was reached
    allowed_count: int                     # requests hit() and decide() allowed
    denied_count: int                      # ... and denied
    applies_to: str | None                 # decide()'s Decision.applies_to
    names: tuple[str, ...] | None          # decide()'s Decision.rule, per rule
    def __init__(self, rules: Iterable[tuple[int, int]], max_keys: int = 100_000, *,
                 applies_to: str | None = None, names: Iterable[str] | None = None) -> None: ...
    def hit(self, key: str, now_ms: int) -> tuple[bool, int, int, int, int, int]:
        """(allowed, retry_after_ms, limit, remaining, reset_ms, rule_index); a denied
        request is not counted; limit/remaining/reset_ms describe the most restrictive rule."""
    def decide(self, key: str, now_ms: int | None = None) -> Decision:
        """hit() as the instance tier's Decision (scope "instance"); now_ms None = wall_ms()."""
    def decide_with(self, key: str, other: WindowLimiter, other_key: str,
                    now_ms: int | None = None) -> Decision:
        """This limiter's rules for key and other's for other_key as one set: counted in
        both only when all pass; the Decision of the rule decide() would pick over the
        union, labelled by its limiter; counted in this limiter's allowed/denied_count."""
    def __len__(self) -> int: ...
    def evict_idle(self, now_ms: int) -> int: ...

class FiveMinuteCounter:
    def __init__(self) -> None: ...
    def add(self, now_ms: int) -> None: ...
    def count(self, now_ms: int) -> int: ...
