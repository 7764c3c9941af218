# cython: language_level=3
"""Sliding-window rate-limit counters (compiled).

Compiled twin of stellagw/_py/window.py: same API, same results on the same inputs
(tests/test_window.py runs them differentially on a fake clock). The semantics are written
down in docs/rate-limiting.md; in short:

* Every rule (max_requests, per_seconds) has its own ring of buckets per key: 100 ms
  buckets for windows up to 10 s, and 100 buckets of window/100 above (600 ms for a
  minute, 36 s for an hour). A rule's count is the sum of the last N buckets, the current
  one included, so the window slides in bucket steps.
* hit() checks every rule and counts the request only when all of them pass: a denied
  request is not counted, so a client that keeps retrying does not extend its own ban.
* Retry-After is the time until enough of the oldest buckets leave the window for the
  most restrictive violated rule (the longest wait); `reset` is the time until the
  reported rule's oldest counted request leaves the window.
* Memory is bounded: at most max_keys keys, least recently used evicted first when a new
  key needs room; evict_idle() drops keys whose every bucket has expired (lossless).
* The clock is passed in (ms, >= 0). A clock that steps back is treated, per key, as
  standing still at the latest time that key has seen.

Storage is struct-of-arrays indexed by a slot number; a dict maps key -> slot and the LRU
order is a doubly-linked list threaded through two int arrays, so hit() allocates nothing
but its result tuple once the key exists.
"""
cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memset

from gw_debug cimport GW_DEBUG

__all__ = ["WindowLimiter", "FiveMinuteCounter", "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]


cdef enum:
    C_FINE_BUCKET_MS = 100       # resolution for windows up to C_FINE_WINDOW_S
    C_FINE_WINDOW_S = 10
    C_MAX_BUCKETS = 100          # buckets per rule ring, whatever the window
    C_MAX_RULES = 16             # rules per limiter; per-rule scratch lives on the stack
    C_MIN_SLOTS = 64             # first allocation; doubled up to max_keys
    C_FIVE_MIN_BUCKETS = 300     # FiveMinuteCounter: 300 one-second buckets

MAX_RULES = C_MAX_RULES
MAX_BUCKETS = C_MAX_BUCKETS

# Largest accepted values: counts are uint32, times int64 ms.
cdef int64_t _MAX_REQUESTS = 0x7FFFFFFF
cdef int64_t _MAX_SECONDS = 0x7FFFFFFF
cdef int64_t _MAX_NOW_MS = <int64_t>1 << 62


cpdef int64_t bucket_ms_for(int64_t per_seconds) except -1:
    """Bucket width in ms for a window of per_seconds: 100 ms up to 10 s, else window/100."""
    if per_seconds < 1:
        raise ValueError("per_seconds must be >= 1")
    if per_seconds <= C_FINE_WINDOW_S:
        return C_FINE_BUCKET_MS
    return per_seconds * (1000 // C_MAX_BUCKETS)


cdef inline int64_t _as_now(object now_ms) except -1:
    """now_ms as int64, checked: an int (or __index__) between 0 and 2**62."""
    cdef int overflow = 0
    cdef long long v
    if not PyLong_Check(now_ms):
        now_ms = PyNumber_Index(now_ms)         # TypeError for float, str, None
    v = PyLong_AsLongLongAndOverflow(now_ms, &overflow)
    if overflow or v < 0 or v > _MAX_NOW_MS:
        raise ValueError(f"now_ms must be between 0 and 2**62, got {now_ms}")
    return v


@cython.final
cdef class WindowLimiter:
    # --- configuration, fixed at __init__
    cdef readonly tuple rules        # ((max_requests, per_seconds), ...) as given
    cdef readonly Py_ssize_t max_keys
    cdef int n_rules
    cdef int64_t limit[C_MAX_RULES]       # max_requests per rule
    cdef int64_t bms[C_MAX_RULES]         # bucket width (ms) per rule
    cdef int64_t nb[C_MAX_RULES]          # buckets in the rule's ring
    cdef int64_t off[C_MAX_RULES]         # where the rule's ring starts inside a slot
    cdef int64_t stride                   # counters per slot: sum of nb
    cdef int64_t max_window_ms            # a key idle this long has no counted request
    # --- slots: arrays of `cap` entries, grown by doubling up to max_keys
    cdef Py_ssize_t cap              # allocated slots
    cdef Py_ssize_t high             # slots ever handed out (0..high-1 are initialised)
    cdef dict index                  # key (str) -> slot (int)
    cdef list keys                   # slot -> key, None when free
    cdef uint32_t *counts            # cap * stride: the rings
    cdef int64_t *heads              # cap * n_rules: absolute bucket number of the newest bucket
    cdef uint32_t *sums              # cap * n_rules: sum of the ring
    cdef int64_t *last_ms            # cap: latest time the key was hit (its own clock)
    cdef int32_t *prev               # cap: LRU list towards the most recent; -1 ends
    cdef int32_t *nxt                # cap: LRU list towards the least recent / free list
    cdef int32_t mru                 # most recently used slot, -1 when empty
    cdef int32_t lru                 # least recently used slot, -1 when empty
    cdef int32_t free                # head of the free-slot list (through nxt), -1 when empty
    cdef readonly Py_ssize_t capacity_evictions   # keys dropped because max_keys was reached

    def __cinit__(self):
        self.counts = NULL
        self.heads = NULL
        self.sums = NULL
        self.last_ms = NULL
        self.prev = NULL
        self.nxt = NULL

    def __init__(self, rules, Py_ssize_t max_keys=100_000):
        cdef int i = 0
        cdef int64_t max_requests, per_seconds
        if self.cap:
            # The arrays are laid out for the rules given first; a second __init__ would
            # reinterpret them.
            raise TypeError("WindowLimiter.__init__() may only be called once")
        rules = tuple(tuple(r) for r in rules)
        if not rules:
            raise ValueError("at least one rule (max_requests, per_seconds) is required")
        if len(rules) > C_MAX_RULES:
            raise ValueError(f"at most {C_MAX_RULES} rules, got {len(rules)}")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if max_keys > 0x3FFFFFFF:
            raise ValueError("max_keys must be < 2**30")
        self.stride = 0
        self.max_window_ms = 0
        for rule in rules:
            if len(rule) != 2:
                raise ValueError(f"rule {i} must be (max_requests, per_seconds), got {rule!r}")
            max_requests, per_seconds = rule
            if not 1 <= max_requests <= _MAX_REQUESTS:
                raise ValueError(f"rule {i}: max_requests must be between 1 and 2**31-1")
            if not 1 <= per_seconds <= _MAX_SECONDS:
                raise ValueError(f"rule {i}: per_seconds must be between 1 and 2**31-1")
            self.limit[i] = max_requests
            self.bms[i] = bucket_ms_for(per_seconds)
            self.nb[i] = per_seconds * 1000 // self.bms[i]
            self.off[i] = self.stride
            self.stride += self.nb[i]
            if per_seconds * 1000 > self.max_window_ms:
                self.max_window_ms = per_seconds * 1000
            i += 1
        self.n_rules = i
        self.rules = rules
        self.max_keys = max_keys
        self.index = {}
        self.keys = []
        self.mru = self.lru = self.free = -1
        self.cap = self.high = 0
        self.capacity_evictions = 0

    def __dealloc__(self):
        PyMem_Free(self.counts)
        PyMem_Free(self.heads)
        PyMem_Free(self.sums)
        PyMem_Free(self.last_ms)
        PyMem_Free(self.prev)
        PyMem_Free(self.nxt)

    def __len__(self):
        return len(self.index)

    # --- slots and the LRU list -----------------------------------------------------------

    cdef int _grow(self) except -1:
        cdef Py_ssize_t cap = self.cap * 2 if self.cap else C_MIN_SLOTS
        cdef void *p
        if cap > self.max_keys:
            cap = self.max_keys
        # Each realloc is committed as soon as it succeeds, so a MemoryError half way
        # leaves every array at least self.cap long and the object consistent.
        p = PyMem_Realloc(self.counts, cap * self.stride * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self.counts = <uint32_t *>p
        p = PyMem_Realloc(self.heads, cap * self.n_rules * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.heads = <int64_t *>p
        p = PyMem_Realloc(self.sums, cap * self.n_rules * sizeof(uint32_t))
        if p == NULL:
            raise MemoryError()
        self.sums = <uint32_t *>p
        p = PyMem_Realloc(self.last_ms, cap * sizeof(int64_t))
        if p == NULL:
            raise MemoryError()
        self.last_ms = <int64_t *>p
        p = PyMem_Realloc(self.prev, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self.prev = <int32_t *>p
        p = PyMem_Realloc(self.nxt, cap * sizeof(int32_t))
        if p == NULL:
            raise MemoryError()
        self.nxt = <int32_t *>p
        self.cap = cap
        return 0

    cdef inline void _unlink(self, int32_t s) noexcept:
        cdef int32_t p = self.prev[s], n = self.nxt[s]
        if p >= 0:
            self.nxt[p] = n
        else:
            self.mru = n
        if n >= 0:
            self.prev[n] = p
        else:
            self.lru = p

    cdef inline void _push_front(self, int32_t s) noexcept:
        self.prev[s] = -1
        self.nxt[s] = self.mru
        if self.mru >= 0:
            self.prev[self.mru] = s
        self.mru = s
        if self.lru < 0:
            self.lru = s

    cdef int _drop(self, int32_t s) except -1:
        """Forget the key in slot s and put the slot on the free list."""
        key = self.keys[s]
        del self.index[key]
        self.keys[s] = None
        self._unlink(s)
        self.nxt[s] = self.free
        self.free = s
        return 0

    cdef int32_t _new_slot(self, str key, int64_t now_ms) except -1:
        cdef int32_t s
        cdef int r
        if self.free < 0:
            if self.high == self.cap and self.cap < self.max_keys:
                self._grow()
            if self.high < self.cap:
                self.nxt[self.high] = -1
                self.free = <int32_t>self.high
                self.high += 1
                self.keys.append(None)
            else:
                # Full: the least recently used key goes, counts and all ("LRU-ish": the
                # order is by last hit, not by when its counts expire).
                self._drop(self.lru)
                self.capacity_evictions += 1
        s = self.free
        self.free = self.nxt[s]
        memset(&self.counts[s * self.stride], 0, self.stride * sizeof(uint32_t))
        for r in range(self.n_rules):
            self.heads[s * self.n_rules + r] = now_ms // self.bms[r]
            self.sums[s * self.n_rules + r] = 0
        self.last_ms[s] = now_ms
        self.keys[s] = key
        self.index[key] = s
        self._push_front(s)
        return s

    # --- the rings ---------------------------------------------------------------------------

    cdef inline void _advance(self, int32_t s, int r, int64_t cur) noexcept:
        """Move rule r's ring of slot s forward to bucket `cur`, zeroing what fell out."""
        cdef int64_t *head = &self.heads[s * self.n_rules + r]
        cdef uint32_t *ring = &self.counts[s * self.stride + self.off[r]]
        cdef uint32_t *total = &self.sums[s * self.n_rules + r]
        cdef int64_t n = self.nb[r], b
        if cur <= head[0]:
            return
        if cur - head[0] >= n:
            memset(ring, 0, n * sizeof(uint32_t))
            total[0] = 0
        else:
            b = head[0] + 1
            while b <= cur:
                total[0] -= ring[b % n]
                ring[b % n] = 0
                b += 1
        head[0] = cur

    cdef int64_t _expiry(self, int32_t s, int r, int64_t need) noexcept:
        """Time (ms, absolute) when the oldest buckets of rule r holding at least `need`
        counted requests have all left the window. The ring is current."""
        cdef int64_t n = self.nb[r], b, acc = 0
        cdef int64_t cur = self.heads[s * self.n_rules + r]
        cdef uint32_t *ring = &self.counts[s * self.stride + self.off[r]]
        b = cur - n + 1
        if b < 0:
            b = 0
        while b < cur:
            acc += ring[b % n]
            if acc >= need:
                break
            b += 1
        # Bucket b is counted while the current bucket number is < b + n.
        return (b + n) * self.bms[r]

    # --- API ---------------------------------------------------------------------------------

    def hit(self, str key not None, object now_ms):
        """hit(key, now_ms) -> (allowed, retry_after_ms, limit, remaining, reset_ms, rule_index)

        Check every rule for `key` at time now_ms and count the request when all pass.
        The last four fields describe the most restrictive rule: on a deny the violated
        rule with the longest wait (retry_after_ms >= 1, remaining 0); otherwise the rule
        with the fewest requests left, after this one (0 for retry_after_ms)."""
        cdef PyObject *found
        cdef int32_t s
        cdef int r, n_rules = self.n_rules, best = -1
        cdef int64_t now, wait, best_wait = -1, left, best_left = 0, base
        cdef int64_t cur[C_MAX_RULES]
        cdef bint allowed = True
        cdef int64_t t = _as_now(now_ms)   # the caller's clock
        found = PyDict_GetItem(self.index, key)
        if found == NULL:
            s = self._new_slot(key, t)
        else:
            s = <int32_t><object>found
            if s != self.mru:
                self._unlink(s)
                self._push_front(s)
        now = t                                 # the key's clock: never steps back
        if now < self.last_ms[s]:
            now = self.last_ms[s]
        self.last_ms[s] = now
        base = s * n_rules
        for r in range(n_rules):
            cur[r] = now // self.bms[r]
            self._advance(s, r, cur[r])
            if self.sums[base + r] >= self.limit[r]:
                allowed = False
        if GW_DEBUG:
            for r in range(n_rules):
                assert self.sums[base + r] <= self.limit[r]
        if not allowed:
            for r in range(n_rules):
                if self.sums[base + r] >= self.limit[r]:
                    wait = self._expiry(s, r, self.sums[base + r] - self.limit[r] + 1) - t
                    if wait > best_wait:
                        best_wait = wait
                        best = r
            return (False, best_wait, self.limit[best], 0, best_wait, best)
        for r in range(n_rules):
            self.counts[s * self.stride + self.off[r] + cur[r] % self.nb[r]] += 1
            self.sums[base + r] += 1
            left = self.limit[r] - self.sums[base + r]
            if best < 0 or left < best_left:
                best_left = left
                best = r
        return (True, 0, self.limit[best], best_left, self._expiry(s, best, 1) - t, best)

    def evict_idle(self, object now_ms):
        """Drop keys, least recently used first, whose every bucket has expired at now_ms;
        stops at the first key that still counts. Returns how many were dropped."""
        cdef Py_ssize_t dropped = 0
        cdef int32_t s
        cdef int64_t t = _as_now(now_ms)   # the caller's clock
        while self.lru >= 0:
            s = self.lru
            if self.last_ms[s] + self.max_window_ms > t:
                break
            self._drop(s)
            dropped += 1
        return dropped

    def __repr__(self):
        return f"WindowLimiter({list(self.rules)!r}, max_keys={self.max_keys}) with {len(self.index)} keys"


@cython.final
cdef class FiveMinuteCounter:
    """Requests in the last 300 one-second buckets (the activation gate's local count)."""
    cdef uint32_t ring[C_FIVE_MIN_BUCKETS]
    cdef int64_t head            # absolute second of the newest bucket
    cdef uint64_t total          # sum of the ring

    def __cinit__(self):
        memset(self.ring, 0, sizeof(self.ring))
        self.head = 0
        self.total = 0

    cdef inline void _advance(self, int64_t cur) noexcept:
        cdef int64_t b
        if cur <= self.head:
            return
        if cur - self.head >= C_FIVE_MIN_BUCKETS:
            memset(self.ring, 0, sizeof(self.ring))
            self.total = 0
        else:
            b = self.head + 1
            while b <= cur:
                self.total -= self.ring[b % C_FIVE_MIN_BUCKETS]
                self.ring[b % C_FIVE_MIN_BUCKETS] = 0
                b += 1
        self.head = cur

    def add(self, object now_ms):
        """Count one request at now_ms (a clock that steps back counts in the newest bucket)."""
        self._advance(_as_now(now_ms) // 1000)
        self.ring[self.head % C_FIVE_MIN_BUCKETS] += 1
        self.total += 1

    def count(self, object now_ms):
        """Requests counted in the 300 seconds ending with now_ms's second."""
        self._advance(_as_now(now_ms) // 1000)
        return self.total
