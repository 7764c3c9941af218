"""The circuit breaker in front of the environment (Valkey) check.

    closed ──(failure_threshold consecutive failures)──> open
    open ──(timeout_seconds elapsed; the next check is the probe)──> half_open
    half_open ──(probe succeeds)──> closed
    half_open ──(probe fails, or is still unanswered after half_open_timeout)──> open

While open, and in half-open while the probe is out, the environment check is skipped:
the request is decided by the instance tier alone (fail OPEN, docs/original-router.md §8). Every
transition is logged and counted. The clock (seconds, monotonic) is injectable for tests.
"""
from __future__ import annotations

import time

__all__ = ["CircuitBreaker", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class CircuitBreaker:
    def __init__(self, settings, log, counters: dict, clock=time.monotonic, name: str = ""):
        self.failure_threshold = settings.failure_threshold
        self.timeout_seconds = settings.timeout_seconds
        self.half_open_timeout = settings.half_open_timeout
        self._log = log
        self._clock = clock
        self._name = name
        self._trips = counters.setdefault("breaker_trips", {})
        self._transitions = counters.setdefault("breaker_transitions", {})
        self.state = CLOSED
        self.failures = 0                   # consecutive failures while closed
        self._open_until = 0.0
        self._probe_since: float | None = None   # half-open: when the probe went out

    def allow(self) -> bool:
        """True: ask Valkey (in half-open, this caller is the probe). False: skip it."""
        if self.state == CLOSED:
            return True
        now = self._clock()
        if self.state == OPEN:
            if now < self._open_until:
                return False
            self._set(HALF_OPEN, "open timeout elapsed; next check is the probe")
            self._probe_since = now
            return True
        if self._probe_since is None:       # the last probe was abandoned: send another
            self._probe_since = now
            return True
        if now - self._probe_since >= self.half_open_timeout:
            self._trip("probe_timeout", "the half-open probe got no answer in "
                                        f"{self.half_open_timeout:g} s")
        return False

    def success(self) -> None:
        if self.state == HALF_OPEN:
            self._probe_since = None
            self._set(CLOSED, "probe succeeded")
        self.failures = 0

    def failure(self, error: str) -> None:
        if self.state == CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._trip("failure_threshold", f"{self.failures} consecutive failures, "
                                                f"last: {error}")
        elif self.state == HALF_OPEN:
            self._trip("probe_failed", f"probe failed: {error}")
        # OPEN: a late failure of a check sent before the breaker opened changes nothing.

    def abandon(self) -> None:
        """The check was cancelled before Valkey answered (say, the client went away):
        in half-open, let the next check be the probe."""
        if self.state == HALF_OPEN:
            self._probe_since = None

    def _trip(self, reason: str, detail: str) -> None:
        self._trips[reason] = self._trips.get(reason, 0) + 1
        self._open_until = self._clock() + self.timeout_seconds
        self._probe_since = None
        self._set(OPEN, detail, reason=reason)

    def _set(self, state: str, detail: str, **fields) -> None:
        previous, self.state = self.state, state
        self.failures = 0
        key = f"{previous}->{state}"
        self._transitions[key] = self._transitions.get(key, 0) + 1
        level = "warning" if state == OPEN else "info"
        self._log.event(level, f"rate limit circuit breaker {state}", previous=previous,
                        detail=detail, valkey=self._name,
                        **({"retryInSeconds": self.timeout_seconds} if state == OPEN else {}),
                        **fields)
