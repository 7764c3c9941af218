"""A rate-limit decision, and the 429 the gateway answers with (docs/original-router.md §8).

Decision and rate_limit_headers() live with the instance tier's counters (ratelimit/window.py,
compiled in cext/window.pyx), which builds the per-request Decision and its X-RateLimit-*
lines in C; its fields are described in cext/window.pyx.
"""
from __future__ import annotations

import orjson

from .window import Decision, rate_limit_headers

__all__ = ["Decision", "UNLIMITED", "rejection", "rate_limit_headers"]


# No rule applied (no instance rules, environment skipped or without rules).
UNLIMITED = Decision(True, None, 0, 0, 0, 0, 0, 0)


def rejection(decision: Decision, trace_id: str) -> tuple[int, bytes, bytes]:
    """(429, header lines, JSON body) for a denied decision.

    Headers and body are those of the original Router (upstream-notes §8), all taken from
    the same decision; the body adds "traceId" (the request's correlation id) after the
    upstream fields, like every other error the gateway answers itself.
    """
    retry = decision.retry_after_s if decision.retry_after_s > 0 else 1
    headers = (b"Retry-After: %d\r\nX-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\n"
               b"X-RateLimit-Reset: %d\r\ncontent-type: application/json\r\n"
               % (retry, decision.limit, decision.remaining, decision.reset_s))
    body = orjson.dumps({
        "error": "rate_limit_exceeded",
        "message": f"Rate limit exceeded. Try again in {retry} seconds.",
        "retryAfter": retry,
        "limit": decision.limit,
        "current": decision.current,
        "window": decision.window_s,
        "scope": decision.scope,
        "traceId": trace_id,
    })
    return 429, headers, body
