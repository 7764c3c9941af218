"""Retrying a request on another instance (gateway.retries; docs/selection.md "Retries").

A request is tried once more, on another instance, when its service link broke or the
service cancelled it before any byte of an answer — the one case where the gateway knows
the client has seen nothing and the request may be sent again: its method is idempotent
(RFC 9110 §9.2.2) or its endpoint says `retryable` in HELLO, and its body went whole inside
the REQUEST (a streamed body is gone). Timeouts and 5xx answers are never retried: the
service may have done the work.

A budget keeps retries from multiplying an outage (as Envoy's retry budget): over the last
10 seconds, retries may be at most `budgetPercent` of the requests dispatched, or
`minRetriesPerSecond` × 10 when there were few. Per worker; checked only when a retry is
wanted, against the pipeline's count of dispatched requests (a C counter, nothing per
request here).
"""
from __future__ import annotations

import time
from collections import deque

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
WINDOW = 10.0


class RetryBudget:
    def __init__(self, settings):
        self.configure(settings)
        self.retries = 0
        self._marks: deque = deque()     # (time, dispatched, retries), about one a second
        self.counts: dict[tuple[str, str], int] = {}   # (service, outcome) -> n

    def configure(self, settings) -> None:
        """gateway.retries, at start and on a reload (the counts and the window carry on)."""
        self.enabled = settings.enabled
        self.ratio = settings.budget_percent / 100.0
        self.floor = settings.min_retries_per_second * WINDOW

    def allow(self, dispatched: int, now: float | None = None) -> bool:
        """May one more retry go now? `dispatched`: requests dispatched so far."""
        now = time.monotonic() if now is None else now
        marks = self._marks
        while marks and now - marks[0][0] > WINDOW:
            marks.popleft()
        if not marks or now - marks[-1][0] >= 1.0:
            marks.append((now, dispatched, self.retries))
        _, base_dispatched, base_retries = marks[0]
        if self.retries - base_retries >= max(self.floor, self.ratio * (dispatched - base_dispatched)):
            return False
        self.retries += 1
        return True

    def count(self, service: str, outcome: str) -> None:
        key = (service, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1

    def source(self) -> dict:
        """The metrics source (Metrics.sources): gateway_retries_total{service,outcome}."""
        return {"gateway_retries": (
            "Requests tried again on another instance after a broken link or a cancel "
            "before any answer (retried), or not (budget, not_idempotent, no_instance)",
            ("service", "outcome"), [((s, o), n) for (s, o), n in self.counts.items()])}
