# cython: language_level=3
"""Sliding-window rate-limit counters (compiled).

Compiled twin of stellagw/_py/window.py: same API, same results on the same inputs
(tests/codecs/test_window.py runs them differentially on a fake clock). The semantics are written
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
* decide_with() checks a key of this limiter and a key of another as one set of rules
  (an identity and its tenant, docs/rate-limiting.md "Tenant quotas"): counted in both
  only when all pass.

Storage is struct-of-arrays indexed by a slot number; a dict maps key -> slot and the LRU
order is a doubly-linked list threaded through two int arrays, so hit() allocates nothing
but its result tuple once the key exists.

Decision (the rate limiter's outcome) and rate_limit_headers() live here too, so that the
instance tier's per-request work -- clock, hit, Decision, X-RateLimit-* lines -- is one
C call each from RateLimiter.check() and the pipeline (issue #5).
"""
cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.long cimport PyLong_AsLongLong, PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.number cimport PyNumber_Index
from cpython.object cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from gw_debug cimport GW_DEBUG

__all__ = ["WindowLimiter", "FiveMinuteCounter", "Decision", "rate_limit_headers", "wall_ms",
           "bucket_ms_for", "MAX_RULES", "MAX_BUCKETS"]


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


cdef inline int64_t _wall_ms() noexcept:
    # time.time_ns() // 10**6: CPython's time_ns() reads the same clock on POSIX.
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1_000_000


def wall_ms():
    """The default clock, Unix ms (time.time_ns() // 10**6); what decide() reads when not
    given now_ms."""
    return _wall_ms()


cdef inline int64_t _ceil_div(int64_t a, int64_t b) noexcept:
    """ceil(a / b) for b > 0, as Python's -(-a // b) (C division truncates towards 0)."""
    cdef int64_t q = a / b
    return q + 1 if a % b > 0 else q


cdef inline int64_t _as_int64(object v) except? -1:
    """An int (or __index__) as int64; OverflowError outside."""
    if not PyLong_Check(v):
        v = PyNumber_Index(v)                   # TypeError for float, str, None
    return PyLong_AsLongLong(v)


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


# ---------------------------------------------------------------------------------------------
# Decision


# Which limit a Decision is from, interned: (applies_to, rule) pairs, a Decision holding the
# index (0: none). An index rather than a reference, so that labelling costs the per-request
# Decision no reference counting and no bytes (it fits beside `allowed`). The pairs are
# configuration paths, so the table is as small as the configuration.
cdef list _labels = [None]
cdef dict _label_ids = {}


cdef int32_t _label_id(str applies_to, str rule) except -1:
    cdef object pair, found
    if applies_to is None and rule is None:
        return 0
    pair = (applies_to, rule)
    found = _label_ids.get(pair)
    if found is not None:
        return <int32_t>found
    if len(_labels) >= 0x7FFFFFFF:
        raise OverflowError("too many distinct Decision labels")
    _labels.append(pair)
    _label_ids[pair] = len(_labels) - 1
    return <int32_t>(len(_labels) - 1)


@cython.final
@cython.freelist(16)
cdef class Decision:
    """The outcome of RateLimiter.check(); every field comes from one rule of one tier.

    allowed        False -> answer 429 with rejection(decision, trace_id)
    scope          "instance" | "environment"; None when no rule applied at all
    limit          the rule's max_requests
    remaining      requests left in its window after this one (0 when denied)
    reset_s        Unix seconds when the rule's window frees quota (X-RateLimit-Reset)
    retry_after_s  whole seconds, >= 1 when denied, else 0
    current        the rule's count (this request included when allowed)
    window_s       the rule's per_seconds
    applies_to     whose requests the rule counts: "identity" | "tenant"; None when the
                   limiter was not told (a bare WindowLimiter)
    rule           the rule's configuration path, e.g. "rate_limiting.for_instance.rules[1]"

    Read-only; the numbers are int64. Equal when every field is; unhashable.
    """
    cdef readonly bint allowed
    cdef int32_t label               # into _labels (declared here: the padding after allowed)
    cdef readonly str scope
    cdef readonly int64_t limit, remaining, reset_s, retry_after_s, current, window_s

    def __init__(self, bint allowed, str scope, limit, remaining, reset_s, retry_after_s,
                 current, window_s, str applies_to=None, str rule=None):
        # Integers only (a typed int64_t argument would truncate a float through __int__).
        self.allowed = allowed
        self.scope = scope
        self.limit = _as_int64(limit)
        self.remaining = _as_int64(remaining)
        self.reset_s = _as_int64(reset_s)
        self.retry_after_s = _as_int64(retry_after_s)
        self.current = _as_int64(current)
        self.window_s = _as_int64(window_s)
        self.label = _label_id(applies_to, rule)

    @property
    def applies_to(self):
        return None if self.label == 0 else (<tuple>_labels[self.label])[0]

    @property
    def rule(self):
        return None if self.label == 0 else (<tuple>_labels[self.label])[1]

    def __reduce__(self):
        return Decision, (self.allowed, self.scope, self.limit, self.remaining, self.reset_s,
                          self.retry_after_s, self.current, self.window_s, self.applies_to,
                          self.rule)

    def __eq__(self, other):
        if not isinstance(other, Decision):
            return NotImplemented
        cdef Decision o = <Decision>other
        return (self.allowed == o.allowed and self.scope == o.scope and self.limit == o.limit
                and self.remaining == o.remaining and self.reset_s == o.reset_s
                and self.retry_after_s == o.retry_after_s and self.current == o.current
                and self.window_s == o.window_s and self.label == o.label)

    def __repr__(self):
        # The two labels only when set, so a bare decision reads as it always did.
        labels = ""
        if self.label != 0:
            labels = f", applies_to={self.applies_to!r}, rule={self.rule!r}"
        return (f"Decision(allowed={self.allowed!r}, scope={self.scope!r}, limit={self.limit}, "
                f"remaining={self.remaining}, reset_s={self.reset_s}, "
                f"retry_after_s={self.retry_after_s}, current={self.current}, "
                f"window_s={self.window_s}{labels})")


cdef inline Py_ssize_t _put(char *buf, Py_ssize_t n, const char *s, Py_ssize_t length) noexcept:
    memcpy(buf + n, s, length)
    return n + length


cdef inline Py_ssize_t _put_int(char *buf, Py_ssize_t n, int64_t v) noexcept:
    """v in decimal, as b"%d" writes it."""
    cdef char digits[20]
    cdef int k = 0
    cdef uint64_t u = <uint64_t>v
    if v < 0:
        buf[n] = c'-'
        n += 1
        u = <uint64_t>0 - u            # also right for INT64_MIN
    while True:
        digits[k] = <char>(c'0' + u % 10)
        k += 1
        u //= 10
        if u == 0:
            break
    while k:
        k -= 1
        buf[n] = digits[k]
        n += 1
    return n


def rate_limit_headers(Decision decision not None):
    """X-RateLimit-Limit/Remaining/Reset lines for a response that was let through (empty
    when no rule applied); the pipeline adds them to proxied responses."""
    # 67 bytes of names and CRLFs + 3 numbers of at most 20 characters.
    cdef char buf[160]
    cdef Py_ssize_t n = 0
    if decision.scope is None:
        return b""
    n = _put(buf, n, b"X-RateLimit-Limit: ", 19)
    n = _put_int(buf, n, decision.limit)
    n = _put(buf, n, b"\r\nX-RateLimit-Remaining: ", 25)
    n = _put_int(buf, n, decision.remaining)
    n = _put(buf, n, b"\r\nX-RateLimit-Reset: ", 21)
    n = _put_int(buf, n, decision.reset_s)
    n = _put(buf, n, b"\r\n", 2)
    return buf[:n]


# ---------------------------------------------------------------------------------------------
# WindowLimiter


cdef struct Outcome:        # what hit() returns, in C
    bint allowed
    int64_t retry_ms
    int64_t limit
    int64_t remaining
    int64_t reset_ms
    int rule


@cython.final
cdef class WindowLimiter:
    # --- configuration, fixed at __init__
    cdef readonly tuple rules        # ((max_requests, per_seconds), ...) as given
    cdef readonly Py_ssize_t max_keys
    cdef int n_rules
    cdef int64_t limit[C_MAX_RULES]       # max_requests per rule
    cdef int64_t secs[C_MAX_RULES]        # per_seconds per rule
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
    # Requests hit() and decide() allowed / denied: kept here so that RateLimiter's counters
    # cost the request path nothing.
    cdef readonly Py_ssize_t allowed_count, denied_count
    # What decide() writes into Decision.applies_to and .rule (per rule); None when not given.
    cdef readonly str applies_to
    cdef readonly tuple names
    cdef int32_t label[C_MAX_RULES]   # per rule: its Decision label (0: none)

    def __cinit__(self):
        self.counts = NULL
        self.heads = NULL
        self.sums = NULL
        self.last_ms = NULL
        self.prev = NULL
        self.nxt = NULL

    def __init__(self, rules, Py_ssize_t max_keys=100_000, *, str applies_to=None,
                 names=None):
        cdef int i = 0, r
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
            self.secs[i] = per_seconds
            self.bms[i] = bucket_ms_for(per_seconds)
            self.nb[i] = per_seconds * 1000 // self.bms[i]
            self.off[i] = self.stride
            self.stride += self.nb[i]
            if per_seconds * 1000 > self.max_window_ms:
                self.max_window_ms = per_seconds * 1000
            i += 1
        self.n_rules = i
        if names is not None:
            names = tuple(names)
            if len(names) != i or not all(type(n) is str for n in names):
                raise ValueError(f"names must be {i} strings, one per rule")
        self.names = names
        self.applies_to = applies_to
        for r in range(i):
            self.label[r] = _label_id(applies_to, names[r] if names is not None else None)
        self.rules = rules
        self.max_keys = max_keys
        self.index = {}
        self.keys = []
        self.mru = self.lru = self.free = -1
        self.cap = self.high = 0
        self.capacity_evictions = 0
        self.allowed_count = self.denied_count = 0

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

    # --- decide_with()'s steps: the parts of _hit() it must run apart, on two limiters

    cdef int32_t _touch(self, str key, int64_t t, int64_t *cur) except -1:
        """The key's slot (made when new, moved to the front of the LRU list) with every
        ring advanced to the key's clock at the caller's time t; cur[r] is rule r's current
        bucket."""
        cdef PyObject *found
        cdef int32_t s
        cdef int r
        cdef int64_t now
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
        for r in range(self.n_rules):
            cur[r] = now // self.bms[r]
            self._advance(s, r, cur[r])
        if GW_DEBUG:
            for r in range(self.n_rules):
                assert self.sums[s * self.n_rules + r] <= self.limit[r]
        return s

    cdef inline bint _full(self, int32_t s) noexcept:
        """True when some rule of slot s has no room for one more request."""
        cdef int r
        cdef Py_ssize_t base = s * self.n_rules
        for r in range(self.n_rules):
            if self.sums[base + r] >= self.limit[r]:
                return True
        return False

    cdef int64_t _longest_wait(self, int32_t s, int64_t t, int *rule) noexcept:
        """Over the full rules of slot s: the longest wait (ms from t) until one more
        request fits, and (*rule) whose it is; the first such rule on ties."""
        cdef int r
        cdef int64_t wait, best_wait = -1
        cdef Py_ssize_t base = s * self.n_rules
        for r in range(self.n_rules):
            if self.sums[base + r] >= self.limit[r]:
                wait = self._expiry(s, r, self.sums[base + r] - self.limit[r] + 1) - t
                if wait > best_wait:
                    best_wait = wait
                    rule[0] = r
        return best_wait

    cdef int64_t _count(self, int32_t s, int64_t *cur, int *rule) noexcept:
        """Count one request in every rule of slot s; the fewest requests left after it, and
        (*rule) the first rule with that few."""
        cdef int r, best = -1
        cdef int64_t left, best_left = 0
        cdef Py_ssize_t base = s * self.n_rules
        for r in range(self.n_rules):
            self.counts[s * self.stride + self.off[r] + cur[r] % self.nb[r]] += 1
            self.sums[base + r] += 1
            left = self.limit[r] - self.sums[base + r]
            if best < 0 or left < best_left:
                best_left = left
                best = r
        rule[0] = best
        return best_left

    cdef int _hit(self, str key, int64_t t, Outcome *o) except -1:
        """hit() at the caller's time t, into *o.

        Every request's path: one pass that advances and checks each rule, written out
        rather than built from decide_with()'s helpers, which cost it ~75 instructions in
        calls and second passes (tests/ratelimit/test_ratelimit_tenants.py holds the two to one
        oracle)."""
        cdef PyObject *found
        cdef int32_t s
        cdef int r, n_rules = self.n_rules, best = -1
        cdef int64_t now, wait, best_wait = -1, left, best_left = 0, base
        cdef int64_t cur[C_MAX_RULES]
        cdef bint allowed = True
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
            self.denied_count += 1
            o.allowed = False
            o.retry_ms = o.reset_ms = best_wait
            o.limit = self.limit[best]
            o.remaining = 0
            o.rule = best
            return 0
        for r in range(n_rules):
            self.counts[s * self.stride + self.off[r] + cur[r] % self.nb[r]] += 1
            self.sums[base + r] += 1
            left = self.limit[r] - self.sums[base + r]
            if best < 0 or left < best_left:
                best_left = left
                best = r
        self.allowed_count += 1
        o.allowed = True
        o.retry_ms = 0
        o.limit = self.limit[best]
        o.remaining = best_left
        o.reset_ms = self._expiry(s, best, 1) - t
        o.rule = best
        return 0

    def hit(self, str key not None, object now_ms):
        """hit(key, now_ms) -> (allowed, retry_after_ms, limit, remaining, reset_ms, rule_index)

        Check every rule for `key` at time now_ms and count the request when all pass.
        The last four fields describe the most restrictive rule: on a deny the violated
        rule with the longest wait (retry_after_ms >= 1, remaining 0); otherwise the rule
        with the fewest requests left, after this one (0 for retry_after_ms)."""
        cdef Outcome o
        self._hit(key, _as_now(now_ms), &o)
        return (o.allowed, o.retry_ms, o.limit, o.remaining, o.reset_ms, o.rule)

    cdef Decision _decision(self, Outcome *o, int64_t t):
        """*o, this limiter's outcome at time t, as a Decision (scope "instance")."""
        cdef Decision d = Decision.__new__(Decision)
        d.allowed = o.allowed
        d.scope = "instance"
        d.limit = o.limit
        d.remaining = o.remaining
        d.reset_s = _ceil_div(t + o.reset_ms, 1000)
        if o.allowed:
            d.retry_after_s = 0
            d.current = o.limit - o.remaining
        else:
            d.retry_after_s = _ceil_div(o.retry_ms, 1000)
            d.current = o.limit         # a denied request is not counted
        d.window_s = self.secs[o.rule]
        d.label = self.label[o.rule]
        return d

    def decide(self, str key not None, object now_ms=None):
        """hit() as the instance tier's Decision (scope "instance"): reset_s and
        retry_after_s rounded up to whole seconds, current the rule's count, window_s its
        per_seconds, applies_to and rule this limiter's labels of the rule. now_ms None
        reads wall_ms()."""
        cdef Outcome o
        cdef int64_t t = _wall_ms() if now_ms is None else _as_now(now_ms)
        self._hit(key, t, &o)
        return self._decision(&o, t)

    def decide_with(self, str key not None, WindowLimiter other not None,
                    str other_key not None, object now_ms=None):
        """decide() over this limiter's rules for `key` and `other`'s rules for `other_key`
        as one set: the request is counted in both only when every rule of both passes
        (so neither counter holds a request the other refused). The Decision is that of
        the rule decide() would pick over the union -- on a deny the longest wait, else
        the fewest requests left, ties going to this limiter -- labelled by its limiter.
        The request is counted in this limiter's allowed_count / denied_count only."""
        cdef Outcome o
        cdef int64_t t = _wall_ms() if now_ms is None else _as_now(now_ms)
        cdef int64_t cur[C_MAX_RULES]
        cdef int64_t other_cur[C_MAX_RULES]
        cdef int32_t s, os
        cdef int rule = 0, other_rule = 0
        cdef int64_t wait = -1, other_wait = -1, left, other_left
        cdef bint full, other_full
        if other is self:
            # One slot table: touching the second key could evict the first one's slot.
            raise ValueError("decide_with() needs another limiter")
        s = self._touch(key, t, cur)
        os = other._touch(other_key, t, other_cur)
        full = self._full(s)
        other_full = other._full(os)
        if full or other_full:
            self.denied_count += 1
            if full:
                wait = self._longest_wait(s, t, &rule)
            if other_full:
                other_wait = other._longest_wait(os, t, &other_rule)
            o.allowed = False
            o.remaining = 0
            if other_wait > wait:
                o.retry_ms = o.reset_ms = other_wait
                o.limit = other.limit[other_rule]
                o.rule = other_rule
                return other._decision(&o, t)
            o.retry_ms = o.reset_ms = wait
            o.limit = self.limit[rule]
            o.rule = rule
            return self._decision(&o, t)
        left = self._count(s, cur, &rule)
        other_left = other._count(os, other_cur, &other_rule)
        self.allowed_count += 1
        o.allowed = True
        o.retry_ms = 0
        if other_left < left:
            o.limit = other.limit[other_rule]
            o.remaining = other_left
            o.reset_ms = other._expiry(os, other_rule, 1) - t
            o.rule = other_rule
            return other._decision(&o, t)
        o.limit = self.limit[rule]
        o.remaining = left
        o.reset_ms = self._expiry(s, rule, 1) - t
        o.rule = rule
        return self._decision(&o, t)

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
