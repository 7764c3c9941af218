"""Sliding-window rate-limit counters (public API).

    limiter = WindowLimiter([(100, 1), (1000, 60)], max_keys=100_000)
    allowed, retry_after_ms, limit, remaining, reset_ms, rule = limiter.hit(key, now_ms)
    decision = limiter.decide(key)          # the same as the instance tier's Decision
    limiter.evict_idle(now_ms)              # periodically: drops keys with nothing counted

    gate = FiveMinuteCounter()              # the activation gate's local count
    gate.add(now_ms); gate.count(now_ms)

    rate_limit_headers(decision)            # the X-RateLimit-* lines of an allowed request

The compiled module (cext/window.pyx) is used when built, else the pure-Python twin
(stellagw/_py/window.py); STELLAGW_NO_EXTENSIONS=1 forces the twin. Buckets, Retry-After
and eviction are described in docs/rate-limiting.md.
"""
from .. import _impl

if _impl.NO_EXTENSIONS:
    from .._py import window as _m
else:
    try:
        from .._cext import window as _m
    except ImportError as exc:
        _impl.fell_back("window", exc)
        from .._py import window as _m

WindowLimiter = _m.WindowLimiter
FiveMinuteCounter = _m.FiveMinuteCounter
Decision = _m.Decision
rate_limit_headers = _m.rate_limit_headers
wall_ms = _m.wall_ms
bucket_ms_for = _m.bucket_ms_for
MAX_RULES = _m.MAX_RULES
MAX_BUCKETS = _m.MAX_BUCKETS

__all__ = ["WindowLimiter", "FiveMinuteCounter", "Decision", "rate_limit_headers", "wall_ms",
           "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]
