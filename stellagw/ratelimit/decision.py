"""A rate-limit decision, and the 429 the gateway answers with (upstream-notes §8)."""
from __future__ import annotations

import orjson

__all__ = ["Decision", "UNLIMITED", "rejection", "rate_limit_headers"]


class Decision:
    """The outcome of RateLimiter.check(); every field comes from one rule of one tier.

    allowed        False -> answer 429 with rejection(decision, trace_id)
    scope          "instance" | "environment"; None when no rule applied at all
    limit          the rule's max_requests
    remaining      requests left in its window after this one (0 when denied)
    reset_s        Unix seconds when the rule's window frees quota (X-RateLimit-Reset)
    retry_after_s  whole seconds, >= 1 when denied, else 0
    current        the rule's count (this request included when allowed)
    window_s       the rule's per_seconds
    """
    __slots__ = ("allowed", "scope", "limit", "remaining", "reset_s", "retry_after_s",
                 "current", "window_s")

    def __init__(self, allowed: bool, scope: str | None, limit: int, remaining: int,
                 reset_s: int, retry_after_s: int, current: int, window_s: int):
        self.allowed = allowed
        self.scope = scope
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s
        self.retry_after_s = retry_after_s
        self.current = current
        self.window_s = window_s

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"Decision({fields})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, Decision):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None


# No rule applied (no instance rules, environment skipped or without rules).
UNLIMITED = Decision(True, None, 0, 0, 0, 0, 0, 0)


def rate_limit_headers(decision: Decision) -> bytes:
    """X-RateLimit-Limit/Remaining/Reset lines for a response that was let through (empty
    when no rule applied); the lead may add them to proxied responses."""
    if decision.scope is None:
        return b""
    return (b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
            % (decision.limit, decision.remaining, decision.reset_s))


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
