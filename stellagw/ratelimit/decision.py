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

    The body is the gateway's one error envelope, {"error": {"code", "message",
    "trace_id"}}, with the original Router's 429 fields inside it (docs/original-router.md
    §8; its constant "error" is the envelope's "code"), then which limit it was:
    "appliesTo" (identity or tenant) and "rule" (the rule's configuration path). The
    headers are the original's, all from the same decision, plus X-RateLimit-Policy naming
    the limit and window (the quota-policy syntax of the IETF RateLimit header fields
    drafts) and which limit it was.
    """
    retry = decision.retry_after_s if decision.retry_after_s > 0 else 1
    applies = decision.applies_to
    headers = (b"Retry-After: %d\r\nX-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\n"
               b"X-RateLimit-Reset: %d\r\nX-RateLimit-Policy: %d;w=%d;scope=%s%s\r\n"
               b"content-type: application/json\r\n"
               % (retry, decision.limit, decision.remaining, decision.reset_s, decision.limit,
                  decision.window_s, (decision.scope or "none").encode(),
                  b";applies-to=" + applies.encode() if applies else b""))
    body = orjson.dumps({"error": {
        "code": "rate_limit_exceeded",
        "message": f"Rate limit exceeded. Try again in {retry} seconds.",
        "trace_id": trace_id,
        "retryAfter": retry,
        "limit": decision.limit,
        "current": decision.current,
        "window": decision.window_s,
        "scope": decision.scope,
        "appliesTo": applies,
        "rule": decision.rule,
    }})
    return 429, headers, body
