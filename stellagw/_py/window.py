"""Sliding-window rate-limit counters — the pure-Python twin.

Same API and the same results as the compiled ``stellagw._cext.window`` (cext/window.pyx);
tests/codecs/test_window.py runs the two differentially on a fake clock. Semantics (buckets,
Retry-After, eviction, a clock that steps back) are in docs/rate-limiting.md and in the
docstring of cext/window.pyx.

Per key the state is one ``_Entry``; an OrderedDict keeps the keys in LRU order (least
recently used first), which is the order the compiled module's linked list has.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from operator import index as _index

__all__ = ["WindowLimiter", "FiveMinuteCounter", "Decision", "rate_limit_headers", "wall_ms",
           "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]

_FINE_BUCKET_MS = 100     # resolution for windows up to _FINE_WINDOW_S
_FINE_WINDOW_S = 10
MAX_BUCKETS = 100         # buckets per rule ring, whatever the window
MAX_RULES = 16
_FIVE_MIN_BUCKETS = 300

_MAX_REQUESTS = 0x7FFFFFFF
_MAX_SECONDS = 0x7FFFFFFF
_MAX_NOW_MS = 1 << 62
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def wall_ms() -> int:
    """The default clock, Unix ms; what decide() reads when not given now_ms."""
    return time.time_ns() // 1_000_000


def bucket_ms_for(per_seconds: int) -> int:
    """Bucket width in ms for a window of per_seconds: 100 ms up to 10 s, else window/100."""
    per_seconds = _index(per_seconds)
    if per_seconds < 1:
        raise ValueError("per_seconds must be >= 1")
    if per_seconds <= _FINE_WINDOW_S:
        return _FINE_BUCKET_MS
    return per_seconds * (1000 // MAX_BUCKETS)


def _check_now(now_ms) -> int:
    if type(now_ms) is not int:
        now_ms = _index(now_ms)
    if now_ms < 0 or now_ms > _MAX_NOW_MS:
        raise ValueError(f"now_ms must be between 0 and 2**62, got {now_ms}")
    return now_ms


def _as_int64(v) -> int:
    # As the compiled type's int64 fields: TypeError for a float, OverflowError outside.
    if type(v) is not int:
        v = _index(v)
    if not _INT64_MIN <= v <= _INT64_MAX:
        raise OverflowError("int too big to convert")
    return v


class Decision:
    """The outcome of RateLimiter.check(); see cext/window.pyx for the fields.

    Read-only; the numbers are int64. Equal when every field is; unhashable.
    """
    __slots__ = ("allowed", "scope", "limit", "remaining", "reset_s", "retry_after_s",
                 "current", "window_s", "applies_to", "rule")

    def __init__(self, allowed, scope, limit, remaining, reset_s, retry_after_s, current,
                 window_s, applies_to=None, rule=None):
        for name, value in (("scope", scope), ("applies_to", applies_to), ("rule", rule)):
            if value is not None and type(value) is not str:
                raise TypeError(f"Argument '{name}' has incorrect type (expected str, "
                                f"got {type(value).__name__})")
        _set = object.__setattr__          # read-only for everyone else
        _set(self, "allowed", bool(allowed))
        _set(self, "scope", scope)
        _set(self, "limit", _as_int64(limit))
        _set(self, "remaining", _as_int64(remaining))
        _set(self, "reset_s", _as_int64(reset_s))
        _set(self, "retry_after_s", _as_int64(retry_after_s))
        _set(self, "current", _as_int64(current))
        _set(self, "window_s", _as_int64(window_s))
        _set(self, "applies_to", applies_to)
        _set(self, "rule", rule)

    def __setattr__(self, name, value):
        raise AttributeError(f"attribute {name!r} of 'Decision' objects is not writable")

    def __delattr__(self, name):
        raise AttributeError(f"attribute {name!r} of 'Decision' objects is not writable")

    def __eq__(self, other):
        if not isinstance(other, Decision):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None

    def __repr__(self) -> str:
        # The two labels only when set, so a bare decision reads as it always did.
        names = self.__slots__ if self.applies_to is not None or self.rule is not None \
            else self.__slots__[:8]
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in names)
        return f"Decision({fields})"

    def __reduce__(self):
        return Decision, tuple(getattr(self, n) for n in self.__slots__)


def rate_limit_headers(decision: Decision) -> bytes:
    """X-RateLimit-Limit/Remaining/Reset lines for a response that was let through (empty
    when no rule applied); the pipeline adds them to proxied responses."""
    if type(decision) is not Decision:
        raise TypeError(f"Argument 'decision' has incorrect type (expected Decision, "
                        f"got {type(decision).__name__})")
    if decision.scope is None:
        return b""
    return (b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
            % (decision.limit, decision.remaining, decision.reset_s))


class _Entry:
    __slots__ = ("last_ms", "heads", "sums", "rings")

    def __init__(self, last_ms: int, heads: list[int], sums: list[int], rings: list[list[int]]):
        self.last_ms = last_ms      # latest time the key was hit (its own clock)
        self.heads = heads          # per rule: absolute bucket number of the newest bucket
        self.sums = sums            # per rule: sum of the ring
        self.rings = rings          # per rule: bucket counts, bucket b at b % n


class WindowLimiter:
    """Per-key sliding windows; every rule must pass. See cext/window.pyx."""

    def __init__(self, rules, max_keys: int = 100_000, *, applies_to: str | None = None,
                 names=None):
        max_keys = _index(max_keys)
        rules = tuple(tuple(r) for r in rules)
        if not rules:
            raise ValueError("at least one rule (max_requests, per_seconds) is required")
        if len(rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_RULES} rules, got {len(rules)}")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if max_keys > 0x3FFFFFFF:
            raise ValueError("max_keys must be < 2**30")
        limits, secs, bms, nbs = [], [], [], []
        max_window_ms = 0
        for i, rule in enumerate(rules):
            if len(rule) != 2:
                raise ValueError(f"rule {i} must be (max_requests, per_seconds), got {rule!r}")
            max_requests, per_seconds = _index(rule[0]), _index(rule[1])
            if not 1 <= max_requests <= _MAX_REQUESTS:
                raise ValueError(f"rule {i}: max_requests must be between 1 and 2**31-1")
            if not 1 <= per_seconds <= _MAX_SECONDS:
                raise ValueError(f"rule {i}: per_seconds must be between 1 and 2**31-1")
            limits.append(max_requests)
            secs.append(per_seconds)
            bms.append(bucket_ms_for(per_seconds))
            nbs.append(per_seconds * 1000 // bms[-1])
            max_window_ms = max(max_window_ms, per_seconds * 1000)
        if applies_to is not None and type(applies_to) is not str:
            raise TypeError("applies_to must be a str or None")
        if names is not None:
            names = tuple(names)
            if len(names) != len(rules) or not all(type(n) is str for n in names):
                raise ValueError(f"names must be {len(rules)} strings, one per rule")
        self.names = names              # decide() labels: Decision.rule per rule ...
        self.applies_to = applies_to    # ... and Decision.applies_to
        self.rules = rules
        self.max_keys = max_keys
        self.capacity_evictions = 0
        self.allowed_count = 0      # requests hit() and decide() allowed / denied
        self.denied_count = 0
        self._secs = tuple(secs)
        self._limit = tuple(limits)
        self._bms = tuple(bms)
        self._nb = tuple(nbs)
        self._n = len(rules)
        self._max_window_ms = max_window_ms
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"WindowLimiter({list(self.rules)!r}, max_keys={self.max_keys}) "
                f"with {len(self._entries)} keys")

    def _new_entry(self, key: str, now_ms: int) -> _Entry:
        entries = self._entries
        if len(entries) >= self.max_keys:
            # Full: the least recently used key goes, counts and all.
            entries.popitem(last=False)
            self.capacity_evictions += 1
        entry = _Entry(now_ms, [now_ms // b for b in self._bms], [0] * self._n,
                       [[0] * n for n in self._nb])
        entries[key] = entry
        return entry

    @staticmethod
    def _advance(entry: _Entry, r: int, cur: int, n: int) -> None:
        head = entry.heads[r]
        if cur <= head:
            return
        ring = entry.rings[r]
        if cur - head >= n:
            ring[:] = [0] * n
            entry.sums[r] = 0
        else:
            total = entry.sums[r]
            for b in range(head + 1, cur + 1):
                total -= ring[b % n]
                ring[b % n] = 0
            entry.sums[r] = total
        entry.heads[r] = cur

    def _expiry(self, entry: _Entry, r: int, need: int) -> int:
        n = self._nb[r]
        cur = entry.heads[r]
        ring = entry.rings[r]
        b = max(cur - n + 1, 0)
        acc = 0
        while b < cur:
            acc += ring[b % n]
            if acc >= need:
                break
            b += 1
        # Bucket b is counted while the current bucket number is < b + n.
        return (b + n) * self._bms[r]

    def _touch(self, key: str, now_ms: int) -> tuple[_Entry, list[int]]:
        """The key's entry (made when new, moved to the recent end) with every ring advanced
        to the key's clock, and each rule's current bucket."""
        if type(key) is not str:
            raise TypeError(f"key must be str, not {type(key).__name__}")
        entries = self._entries
        entry = entries.get(key)
        if entry is None:
            entry = self._new_entry(key, now_ms)
        else:
            entries.move_to_end(key)
        now = now_ms if now_ms > entry.last_ms else entry.last_ms
        entry.last_ms = now
        bms, nb = self._bms, self._nb
        curs = []
        for r in range(self._n):
            cur = now // bms[r]
            curs.append(cur)
            self._advance(entry, r, cur, nb[r])
        return entry, curs

    def _full(self, entry: _Entry) -> bool:
        limit, sums = self._limit, entry.sums
        return any(sums[r] >= limit[r] for r in range(self._n))

    def _longest_wait(self, entry: _Entry, now_ms: int) -> tuple[int, int]:
        """(wait ms, rule) over the full rules: the longest wait, the first rule on ties."""
        limit, sums = self._limit, entry.sums
        best, best_wait = -1, -1
        for r in range(self._n):
            if sums[r] >= limit[r]:
                wait = self._expiry(entry, r, sums[r] - limit[r] + 1) - now_ms
                if wait > best_wait:
                    best_wait, best = wait, r
        return best_wait, best

    def _count(self, entry: _Entry, curs: list[int]) -> tuple[int, int]:
        """Count one request in every rule: (fewest left, the first rule with that few)."""
        limit, nb, sums = self._limit, self._nb, entry.sums
        best, best_left = -1, 0
        for r in range(self._n):
            entry.rings[r][curs[r] % nb[r]] += 1
            sums[r] += 1
            left = limit[r] - sums[r]
            if best < 0 or left < best_left:
                best, best_left = r, left
        return best_left, best

    def hit(self, key: str, now_ms: int) -> tuple:
        """(allowed, retry_after_ms, limit, remaining, reset_ms, rule_index); see the module."""
        if type(key) is not str:
            raise TypeError(f"key must be str, not {type(key).__name__}")
        now_ms = _check_now(now_ms)
        entry, curs = self._touch(key, now_ms)
        if self._full(entry):
            wait, best = self._longest_wait(entry, now_ms)
            self.denied_count += 1
            return (False, wait, self._limit[best], 0, wait, best)
        left, best = self._count(entry, curs)
        self.allowed_count += 1
        return (True, 0, self._limit[best], left, self._expiry(entry, best, 1) - now_ms, best)

    def _decision(self, allowed: bool, retry_ms: int, limit: int, remaining: int,
                  reset_ms: int, rule: int, now_ms: int) -> Decision:
        names = self.names
        labels = (self.applies_to, names[rule] if names is not None else None)
        if allowed:
            return Decision(True, "instance", limit, remaining, -(-(now_ms + reset_ms) // 1000),
                            0, limit - remaining, self._secs[rule], *labels)
        # A denied request is not counted: current is the limit.
        return Decision(False, "instance", limit, 0, -(-(now_ms + reset_ms) // 1000),
                        -(-retry_ms // 1000), limit, self._secs[rule], *labels)

    def decide(self, key: str, now_ms: int | None = None) -> Decision:
        """hit() as the instance tier's Decision; see cext/window.pyx."""
        if now_ms is None:
            now_ms = wall_ms()
        allowed, retry_ms, limit, remaining, reset_ms, rule = self.hit(key, now_ms)
        return self._decision(allowed, retry_ms, limit, remaining, reset_ms, rule,
                              _index(now_ms))

    def decide_with(self, key: str, other: WindowLimiter, other_key: str,
                    now_ms: int | None = None) -> Decision:
        """Both limiters' rules as one set, counted in both only when all pass; see
        cext/window.pyx."""
        if type(other) is not WindowLimiter:
            raise TypeError(f"Argument 'other' has incorrect type (expected WindowLimiter, "
                            f"got {type(other).__name__})")
        if type(key) is not str or type(other_key) is not str:
            raise TypeError("keys must be str")
        now_ms = _check_now(wall_ms() if now_ms is None else now_ms)
        if other is self:
            raise ValueError("decide_with() needs another limiter")
        entry, curs = self._touch(key, now_ms)
        other_entry, other_curs = other._touch(other_key, now_ms)
        full, other_full = self._full(entry), other._full(other_entry)
        if full or other_full:
            self.denied_count += 1
            wait, rule = self._longest_wait(entry, now_ms) if full else (-1, 0)
            if other_full:
                other_wait, other_rule = other._longest_wait(other_entry, now_ms)
                if other_wait > wait:
                    return other._decision(False, other_wait, other._limit[other_rule], 0,
                                           other_wait, other_rule, now_ms)
            return self._decision(False, wait, self._limit[rule], 0, wait, rule, now_ms)
        left, rule = self._count(entry, curs)
        other_left, other_rule = other._count(other_entry, other_curs)
        self.allowed_count += 1
        if other_left < left:
            return other._decision(True, 0, other._limit[other_rule], other_left,
                                   other._expiry(other_entry, other_rule, 1) - now_ms,
                                   other_rule, now_ms)
        return self._decision(True, 0, self._limit[rule], left,
                              self._expiry(entry, rule, 1) - now_ms, rule, now_ms)

    def evict_idle(self, now_ms: int) -> int:
        """Drop keys, least recently used first, whose every bucket has expired at now_ms;
        stops at the first key that still counts. Returns how many were dropped."""
        now_ms = _check_now(now_ms)
        entries = self._entries
        window = self._max_window_ms
        dropped = 0
        while entries:
            key = next(iter(entries))
            if entries[key].last_ms + window > now_ms:
                break
            del entries[key]
            dropped += 1
        return dropped


class FiveMinuteCounter:
    """Requests in the last 300 one-second buckets (the activation gate's local count)."""

    __slots__ = ("_ring", "_head", "_total")

    def __init__(self):
        self._ring = [0] * _FIVE_MIN_BUCKETS
        self._head = 0          # absolute second of the newest bucket
        self._total = 0         # sum of the ring

    def _advance(self, cur: int) -> None:
        head = self._head
        if cur <= head:
            return
        if cur - head >= _FIVE_MIN_BUCKETS:
            self._ring = [0] * _FIVE_MIN_BUCKETS
            self._total = 0
        else:
            ring = self._ring
            for b in range(head + 1, cur + 1):
                self._total -= ring[b % _FIVE_MIN_BUCKETS]
                ring[b % _FIVE_MIN_BUCKETS] = 0
        self._head = cur

    def add(self, now_ms: int) -> None:
        """Count one request at now_ms (a clock that steps back counts in the newest bucket)."""
        self._advance(_check_now(now_ms) // 1000)
        self._ring[self._head % _FIVE_MIN_BUCKETS] += 1
        self._total += 1

    def count(self, now_ms: int) -> int:
        """Requests counted in the 300 seconds ending with now_ms's second."""
        self._advance(_check_now(now_ms) // 1000)
        return self._total
