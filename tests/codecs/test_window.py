"""Sliding-window counters: both implementations, differential, and a brute-force oracle.

Every behaviour test runs against the compiled module (cext/window.pyx) and the pure-Python
twin (stellagw/_py/window.py) on a fake clock (now_ms passed in). The compiled variant is
skipped, with the reason, when it is not built or STELLAGW_NO_EXTENSIONS=1 is set.
Semantics: docs/rate-limiting.md.
"""
from __future__ import annotations

import pickle
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw import _impl
from stellagw._py import window as py_window
from tests.support.impls import Codec

WINDOW = Codec("window")
c_window, C_SKIP, needs_c = WINDOW.compiled, WINDOW.why_not, WINDOW.needs_compiled


@pytest.fixture(params=["c", "py"])
def W(request):
    if request.param == "c":
        if c_window is None:
            pytest.skip(C_SKIP)
        return c_window
    return py_window


# ---------------------------------------------------------------------------------------
# The public module


def test_public_module_reexports_the_selected_implementation():
    import stellagw.ratelimit.window as public
    expected = py_window if (_impl.NO_EXTENSIONS or c_window is None) else c_window
    assert public._m is expected
    for name in public.__all__:
        assert getattr(public, name) is getattr(expected, name)


def test_both_implementations_export_the_same_names(W):
    assert W.__all__ == py_window.__all__
    assert (W.MAX_RULES, W.MAX_BUCKETS) == (16, 100)


# ---------------------------------------------------------------------------------------
# Buckets


@pytest.mark.parametrize("seconds, width", [(1, 100), (2, 100), (10, 100), (11, 110),
                                            (60, 600), (300, 3000), (3600, 36000)])
def test_bucket_width(W, seconds, width):
    assert W.bucket_ms_for(seconds) == width
    # A whole number of buckets, never more than 100, per window.
    assert seconds * 1000 % width == 0 and seconds * 1000 // width <= 100


def test_bucket_width_rejects_zero(W):
    with pytest.raises(ValueError):
        W.bucket_ms_for(0)


# ---------------------------------------------------------------------------------------
# One rule


def test_limit_then_deny_with_retry_after(W):
    lim = W.WindowLimiter([(3, 1)])
    assert lim.hit("k", 0) == (True, 0, 3, 2, 1000, 0)
    assert lim.hit("k", 0) == (True, 0, 3, 1, 1000, 0)
    assert lim.hit("k", 50) == (True, 0, 3, 0, 950, 0)
    # All three sit in bucket 0 (0-99 ms), which leaves the 1 s window at t = 1000.
    assert lim.hit("k", 250) == (False, 750, 3, 0, 750, 0)
    assert lim.hit("k", 999) == (False, 1, 3, 0, 1, 0)
    assert lim.hit("k", 1000) == (True, 0, 3, 2, 1000, 0)


def test_window_slides_bucket_by_bucket(W):
    lim = W.WindowLimiter([(2, 1)])
    assert lim.hit("k", 0)[0]
    assert lim.hit("k", 500)[:4] == (True, 0, 2, 0)
    # Full: the request at t=0 leaves at 1000, not the whole window at once.
    assert lim.hit("k", 600)[:2] == (False, 400)
    assert lim.hit("k", 1000)[:4] == (True, 0, 2, 0)
    # Now holding t=500 and t=1000: the next one to leave is the bucket 500-599.
    assert lim.hit("k", 1200)[:2] == (False, 300)
    assert lim.hit("k", 1500)[0]


def test_denied_requests_are_not_counted(W):
    lim = W.WindowLimiter([(1, 1)])
    assert lim.hit("k", 0)[0]
    for t in range(100, 1000, 100):
        allowed, retry, *_ = lim.hit("k", t)
        assert not allowed and retry == 1000 - t
    # A client that hammers during the ban is not penalised beyond the first window.
    assert lim.hit("k", 1000)[0]


def test_keys_are_independent(W):
    lim = W.WindowLimiter([(1, 1)])
    assert lim.hit("a", 0)[0]
    assert lim.hit("b", 0)[0]
    assert not lim.hit("a", 0)[0]
    assert len(lim) == 2


def test_long_window_uses_coarse_buckets(W):
    lim = W.WindowLimiter([(2, 3600)])
    # 36 s buckets: the request at 10 s sits in bucket 0, which leaves the hour at 3600 s.
    assert lim.hit("k", 10_000)[:5] == (True, 0, 2, 1, 3_600_000 - 10_000)
    assert lim.hit("k", 40_000)[:5] == (True, 0, 2, 0, 3_600_000 - 40_000)
    # The first request's bucket (0-35999 ms) leaves the hour at 3,600,000 ms.
    assert lim.hit("k", 100_000)[:2] == (False, 3_600_000 - 100_000)
    assert lim.hit("k", 3_600_000)[0]


# ---------------------------------------------------------------------------------------
# Several rules


def test_every_rule_must_pass(W):
    lim = W.WindowLimiter([(2, 1), (3, 10)])
    assert lim.hit("k", 0)[0]
    assert lim.hit("k", 0)[0]
    allowed, retry, limit, remaining, reset, rule = lim.hit("k", 10)
    assert (allowed, rule, limit, remaining) == (False, 0, 2, 0) and retry == 990
    assert lim.hit("k", 1000)[:4] == (True, 0, 3, 0)        # the 10 s rule is now the tighter
    # Only the 10 s rule fails now: wait for the bucket 0-99 ms to leave 10 s.
    assert lim.hit("k", 2000) == (False, 8000, 3, 0, 8000, 1)


def test_most_restrictive_retry_after_is_the_longest_wait(W):
    lim = W.WindowLimiter([(1, 1), (1, 60)])
    assert lim.hit("k", 0)[0]
    # Both rules are violated; the 60 s one waits longest.
    assert lim.hit("k", 100) == (False, 60_000 - 100, 1, 0, 60_000 - 100, 1)


def test_allowed_reports_the_rule_with_fewest_left(W):
    lim = W.WindowLimiter([(10, 1), (12, 60)])
    for i in range(9):
        lim.hit("k", i)
    allowed, _, limit, remaining, _, rule = lim.hit("k", 2000)
    assert (allowed, limit, remaining, rule) == (True, 12, 2, 1)
    # A tie goes to the first rule.
    tie = W.WindowLimiter([(5, 1), (5, 60)])
    assert tie.hit("k", 0) == (True, 0, 5, 4, 1000, 0)


def test_clock_stepping_back_stands_still_for_the_key(W):
    lim = W.WindowLimiter([(1, 1)])
    assert lim.hit("k", 5000)[0]
    # The key saw 5000 ms; at "4000" it is still in the window that ends at 6000.
    assert lim.hit("k", 4000) == (False, 2000, 1, 0, 2000, 0)
    assert lim.hit("k", 6000)[0]


# ---------------------------------------------------------------------------------------
# Memory


def test_capacity_evicts_the_least_recently_used_key(W):
    lim = W.WindowLimiter([(1, 60)], max_keys=3)
    for key in "abc":
        assert lim.hit(key, 0)[0]
    assert not lim.hit("a", 1)[0]           # a becomes the most recently used
    assert lim.hit("d", 2)[0]               # b (least recent) goes
    assert len(lim) == 3 and lim.capacity_evictions == 1
    assert lim.hit("b", 3)[0]               # b starts over; c goes
    assert not lim.hit("a", 4)[0] and not lim.hit("d", 5)[0]
    assert lim.capacity_evictions == 2


def test_evict_idle_drops_only_keys_with_nothing_counted(W):
    lim = W.WindowLimiter([(5, 1), (5, 10)])
    lim.hit("a", 0)
    lim.hit("b", 4000)
    lim.hit("c", 9000)
    assert lim.evict_idle(9999) == 0
    assert lim.evict_idle(10_000) == 1      # a's last hit was 10 s ago: nothing left to count
    assert len(lim) == 2
    assert lim.evict_idle(20_000) == 2
    assert len(lim) == 0
    # Eviction is lossless: the key starts from zero, as it would have anyway.
    assert lim.hit("a", 20_000) == (True, 0, 5, 4, 1000, 0)


def test_evict_idle_stops_at_the_first_busy_key(W):
    lim = W.WindowLimiter([(5, 1)])
    lim.hit("old", 0)
    lim.hit("busy", 500)
    lim.hit("old", 600)                     # old is the most recent again
    assert lim.evict_idle(1550) == 1        # busy (LRU) is idle since 1500; old is not
    # With callers whose clocks disagree, LRU order is not expiry order: the walk stops
    # at the first key that still counts ("LRU-ish"), cheap and never lossy.
    lim.hit("late", 900)
    lim.hit("early", 100)
    assert lim.evict_idle(1700) == 1        # old (600) goes; late (900) stops the walk
    assert len(lim) == 2
    assert lim.evict_idle(1900) == 2


def test_slots_are_reused_after_eviction(W):
    lim = W.WindowLimiter([(2, 1)], max_keys=1000)
    for round_ in range(5):
        t = round_ * 10_000
        for i in range(1000):
            assert lim.hit(f"k{round_}-{i}", t)[0]
        assert len(lim) == 1000
        assert lim.evict_idle(t + 1000) == 1000
    assert lim.capacity_evictions == 0


# ---------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("rules", [[], [(0, 1)], [(1, 0)], [(1, 2, 3)], [(2**31, 1)],
                                   [(1, 1)] * 17])
def test_bad_rules(W, rules):
    with pytest.raises(ValueError):
        W.WindowLimiter(rules)


def test_bad_arguments(W):
    with pytest.raises(ValueError):
        W.WindowLimiter([(1, 1)], max_keys=0)
    lim = W.WindowLimiter([(1, 1)])
    with pytest.raises(ValueError):
        lim.hit("k", -1)
    with pytest.raises(TypeError):
        lim.hit(b"k", 0)
    with pytest.raises(TypeError):
        lim.hit(None, 0)
    with pytest.raises(TypeError):
        lim.hit("k", 1.5)
    with pytest.raises(ValueError):
        lim.evict_idle(-5)
    assert lim.rules == ((1, 1),) and lim.max_keys == 100_000


# ---------------------------------------------------------------------------------------
# FiveMinuteCounter


def test_five_minute_counter(W):
    c = W.FiveMinuteCounter()
    assert c.count(0) == 0
    for t in range(0, 300_000, 1000):
        c.add(t)
    assert c.count(299_999) == 300
    assert c.count(300_000) == 299          # second 0 left the 300 s window
    c.add(300_500)
    c.add(100)                              # the clock stepped back: counts in the newest second
    assert c.count(300_999) == 301
    assert c.count(599_999) == 2            # only second 300 is left
    assert c.count(10**9) == 0
    with pytest.raises(ValueError):
        c.add(-1)


# ---------------------------------------------------------------------------------------
# Decision, decide(), rate_limit_headers()

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
FIELDS = ("allowed", "scope", "limit", "remaining", "reset_s", "retry_after_s", "current",
          "window_s")


def fields(d) -> tuple:
    return tuple(getattr(d, name) for name in FIELDS)


def legacy_headers(d) -> bytes:
    """rate_limit_headers() as stellagw/ratelimit/decision.py formatted it before."""
    if d.scope is None:
        return b""
    return (b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n"
            % (d.limit, d.remaining, d.reset_s))


def legacy_decision(W, hit: tuple, now_ms: int, windows: tuple):
    """The instance Decision as RateLimiter.check() built it from hit() before decide()."""
    allowed, retry_ms, limit, remaining, reset_ms, rule = hit
    if not allowed:
        return W.Decision(False, "instance", limit, 0, -(-(now_ms + reset_ms) // 1000),
                          -(-retry_ms // 1000), limit, windows[rule])
    return W.Decision(True, "instance", limit, remaining, -(-(now_ms + reset_ms) // 1000),
                      0, limit - remaining, windows[rule])


def test_decision_fields_eq_repr(W):
    d = W.Decision(True, "instance", 3, 2, 1_700_000_001, 0, 1, 1)
    assert fields(d) == (True, "instance", 3, 2, 1_700_000_001, 0, 1, 1)
    assert repr(d) == ("Decision(allowed=True, scope='instance', limit=3, remaining=2, "
                       "reset_s=1700000001, retry_after_s=0, current=1, window_s=1)")
    assert d == W.Decision(True, "instance", 3, 2, 1_700_000_001, 0, 1, 1)
    assert not d != W.Decision(True, "instance", 3, 2, 1_700_000_001, 0, 1, 1)
    for i in range(len(FIELDS)):
        other = list(fields(d))
        other[i] = None if i == 1 else (not other[i] if i == 0 else other[i] + 1)
        assert d != W.Decision(*other), FIELDS[i]
    assert d != (True, "instance", 3, 2, 1_700_000_001, 0, 1, 1) and d != "x"
    assert W.Decision(allowed=False, scope=None, limit=0, remaining=0, reset_s=0,
                      retry_after_s=0, current=0, window_s=0).scope is None
    assert pickle.loads(pickle.dumps(d)) == d


def test_decision_is_read_only_and_unhashable(W):
    d = W.Decision(False, "environment", 100, 0, 99, 7, 100, 60)
    for name in FIELDS:
        with pytest.raises(AttributeError):
            setattr(d, name, getattr(d, name))
        with pytest.raises(AttributeError):
            delattr(d, name)
    with pytest.raises(TypeError):
        hash(d)
    with pytest.raises(TypeError):
        {d}


@pytest.mark.parametrize("args, error", [
    ((True, "instance", 1.0, 0, 0, 0, 0, 0), TypeError),         # no silent truncation
    ((True, "instance", "1", 0, 0, 0, 0, 0), TypeError),
    ((True, "instance", 0, 0, 0, 0, 0, None), TypeError),
    ((True, b"instance", 0, 0, 0, 0, 0, 0), TypeError),
    ((True, "instance", 0, 0, 2**63, 0, 0, 0), OverflowError),   # int64 fields
    ((True, "instance", 0, -(2**63) - 1, 0, 0, 0, 0), OverflowError),
])
def test_decision_rejects_what_the_compiled_type_cannot_hold(W, args, error):
    with pytest.raises(error):
        W.Decision(*args)


def test_rate_limit_headers(W):
    assert W.rate_limit_headers(W.Decision(True, "instance", 10, 4, 99, 0, 6, 1)) == \
        b"X-RateLimit-Limit: 10\r\nX-RateLimit-Remaining: 4\r\nX-RateLimit-Reset: 99\r\n"
    assert W.rate_limit_headers(W.Decision(True, None, 10, 4, 99, 0, 6, 1)) == b""
    for v in (0, -1, 9, 10, INT64_MIN, INT64_MAX):
        d = W.Decision(True, "environment", v, v, v, 0, 0, 0)
        assert W.rate_limit_headers(d) == legacy_headers(d), v
    with pytest.raises(TypeError):
        W.rate_limit_headers(None)


def test_decide_is_hit_as_a_decision(W):
    lim, ref = W.WindowLimiter([(2, 1), (3, 60)]), W.WindowLimiter([(2, 1), (3, 60)])
    for now in (1_700_000_000_000, 1_700_000_000_050, 1_700_000_000_999, 1_700_000_001_000,
                1_700_000_002_345, 1_700_000_061_000):
        d = lim.decide("k", now)
        assert d == legacy_decision(W, ref.hit("k", now), now, (1, 60)), now
        assert W.rate_limit_headers(d) == legacy_headers(d)
    assert (lim.allowed_count, lim.denied_count) == (ref.allowed_count, ref.denied_count) == (4, 2)


def test_decide_reads_the_wall_clock_by_default(W):
    assert time.time_ns() // 10**6 <= W.wall_ms() <= time.time_ns() // 10**6
    lim = W.WindowLimiter([(5, 1)])
    before = W.wall_ms()
    d = lim.decide("k")
    after = W.wall_ms()
    # The request's 100 ms bucket leaves the 1 s window 10 buckets later.
    def reset_s(t): return -(-(t // 100 + 10) * 100 // 1000)
    assert reset_s(before) <= d.reset_s <= reset_s(after)
    assert (d.allowed, d.scope, d.limit, d.remaining, d.current, d.window_s) == \
        (True, "instance", 5, 4, 1, 1)


def test_decide_checks_its_arguments_like_hit(W):
    lim = W.WindowLimiter([(1, 1)])
    for key, now, error in [(b"k", 0, TypeError), (None, 0, TypeError), ("k", 1.5, TypeError),
                            ("k", -1, ValueError), ("k", 2**62 + 1, ValueError)]:
        with pytest.raises(error):
            lim.decide(key, now)
    assert len(lim) == 0 and lim.allowed_count == lim.denied_count == 0


int64_st = st.one_of(st.integers(-5, 300), st.integers(INT64_MIN, INT64_MAX))
decision_st = st.tuples(st.booleans(), st.sampled_from([None, "instance", "environment"]),
                        *[int64_st] * 6)


@needs_c
@settings(max_examples=300, deadline=None)
@given(args=decision_st, other=decision_st)
def test_compiled_decision_matches_twin(args, other):
    c, p = c_window.Decision(*args), py_window.Decision(*args)
    assert fields(c) == fields(p) == args
    assert repr(c) == repr(p)
    assert (c == c_window.Decision(*other)) == (p == py_window.Decision(*other)) == (args == other)
    assert c_window.rate_limit_headers(c) == py_window.rate_limit_headers(p) == legacy_headers(p)


# ---------------------------------------------------------------------------------------
# Brute-force oracle and differential tests


class Oracle:
    """The semantics written out naively: every counted hit kept with its time."""

    def __init__(self, rules):
        self.rules = [(m, s * 1000, py_window.bucket_ms_for(s)) for m, s in rules]
        self.hits: dict[str, list[int]] = {}
        self.last: dict[str, int] = {}

    def _count(self, times, window_ms, width, now):
        n = window_ms // width
        return sum(1 for t in times if t // width > now // width - n)

    def _wait(self, times, limit, window_ms, width, now_eff, now_ms):
        # The earliest bucket boundary at which one more request would fit.
        n = window_ms // width
        for boundary in sorted({(t // width + n) * width for t in times}):
            if boundary > now_eff and self._count(times, window_ms, width, boundary) < limit:
                return boundary - now_ms
        raise AssertionError("no boundary frees the rule")

    def hit(self, key, now_ms):
        now = max(now_ms, self.last.get(key, now_ms))
        self.last[key] = now
        times = self.hits.setdefault(key, [])
        counts = [self._count(times, w, b, now) for _, w, b in self.rules]
        if any(c >= m for c, (m, _, _) in zip(counts, self.rules)):
            best = (-1, -1)
            for r, (m, w, b) in enumerate(self.rules):
                if counts[r] >= m:
                    wait = self._wait(times, m, w, b, now, now_ms)
                    if wait > best[0]:
                        best = (wait, r)
            return (False, best[0], self.rules[best[1]][0], 0, best[0], best[1])
        times.append(now)
        best = None
        for r, (m, w, b) in enumerate(self.rules):
            left = m - counts[r] - 1
            if best is None or left < best[0]:
                best = (left, r)
        m, w, b = self.rules[best[1]]
        oldest = min(t for t in times if t // b > now // b - w // b)
        return (True, 0, m, best[0], (oldest // b + w // b) * b - now_ms, best[1])


rules_st = st.lists(st.tuples(st.integers(1, 6), st.sampled_from([1, 2, 5, 10, 11, 60, 120])),
                    min_size=1, max_size=4)
# (key, delta ms); a negative delta now and then steps the clock back.
steps_st = st.lists(st.tuples(st.sampled_from("abc"),
                              st.one_of(st.integers(0, 400), st.integers(0, 20_000),
                                        st.integers(-500, 0))),
                    min_size=1, max_size=150)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st, steps=steps_st)
def test_twin_matches_the_oracle(rules, steps):
    lim, oracle = py_window.WindowLimiter(rules), Oracle(rules)
    now = 1_000_000
    for key, delta in steps:
        now = max(0, now + delta)
        assert lim.hit(key, now) == oracle.hit(key, now), (key, now)


ops_st = st.lists(st.one_of(
    st.tuples(st.just("hit"), st.sampled_from("abcdefg"), st.integers(-300, 3000)),
    st.tuples(st.just("evict"), st.just(""), st.integers(0, 70_000)),
), min_size=1, max_size=300)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st, max_keys=st.integers(1, 8), ops=ops_st)
def test_compiled_matches_twin(rules, max_keys, ops):
    c, p = c_window.WindowLimiter(rules, max_keys), py_window.WindowLimiter(rules, max_keys)
    now = 0
    for op, key, delta in ops:
        now = max(0, now + delta)
        if op == "hit":
            assert c.hit(key, now) == p.hit(key, now), (key, now)
        else:
            assert c.evict_idle(now) == p.evict_idle(now), now
        assert len(c) == len(p)
        assert c.capacity_evictions == p.capacity_evictions
        assert (c.allowed_count, c.denied_count) == (p.allowed_count, p.denied_count)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rules=rules_st, steps=steps_st)
def test_decide_matches_hit_and_the_limiters_former_arithmetic(rules, steps):
    impls = [py_window] + ([c_window] if c_window is not None else [])
    windows = tuple(s for _, s in rules)
    pairs = [(W, W.WindowLimiter(rules), W.WindowLimiter(rules)) for W in impls]
    now = 1_700_000_000_000
    for key, delta in steps:
        now = max(0, now + delta)
        got = []
        for W, lim, ref in pairs:
            d = lim.decide(key, now)
            assert d == legacy_decision(W, ref.hit(key, now), now, windows), (W.__name__, key, now)
            got.append((fields(d), W.rate_limit_headers(d)))
        assert got.count(got[0]) == len(got), (key, now)   # compiled and twin agree
    for W, lim, ref in pairs:
        assert (lim.allowed_count, lim.denied_count) == (ref.allowed_count, ref.denied_count)
        assert lim.allowed_count + lim.denied_count == len(steps)


@needs_c
@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(-2000, 40_000)), max_size=200))
def test_compiled_five_minute_counter_matches_twin(ops):
    c, p = c_window.FiveMinuteCounter(), py_window.FiveMinuteCounter()
    now = 10**6
    for add, delta in ops:
        now = max(0, now + delta)
        if add:
            c.add(now)
            p.add(now)
        assert c.count(now) == p.count(now)


@needs_c
@pytest.mark.parametrize("rules", [[], [(0, 1)], [(1, 0)], [(1, 1)] * 17, [(1, 2, 3)]])
def test_compiled_and_twin_reject_the_same_rules(rules):
    for W in (c_window, py_window):
        with pytest.raises(ValueError):
            W.WindowLimiter(rules)
