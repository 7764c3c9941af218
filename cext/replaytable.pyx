# cython: language_level=3
"""The instance-wide DPoP `jti` table (compiled).

Compiled twin of stellagw/_py/replaytable.py — the one to read: same API, same memory
layout, same results (tests/codecs/test_replay_table.py compares the tables byte for byte). What
differs is how: the memory is an anonymous MAP_SHARED mapping, SipHash-2-4 runs on the
key's UTF-8 bytes in C (an ASCII str's are its own data, nothing is copied), and
check-and-store runs under a process-shared, robust pthread mutex kept in the header's lock
area: no system call when uncontended, and a process that dies holding it hands it to the
next locker (EOWNERDEAD) instead of blocking every worker for ever.
"""
cimport cython
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport errno
from libc.stdint cimport int64_t, uint64_t
from libc.string cimport memcpy
from posix.mman cimport (MAP_ANONYMOUS, MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap,
                         munmap)

import os

__all__ = ["ReplayTable", "siphash24", "buckets_for", "table_bytes", "REPLAY", "FRESH",
           "FRESH_EVICTED", "SLOTS", "HEADER_BYTES", "MAGIC"]


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int PTHREAD_PROCESS_SHARED
    int PTHREAD_MUTEX_ROBUST
    int pthread_mutexattr_init(pthread_mutexattr_t *attr)
    int pthread_mutexattr_destroy(pthread_mutexattr_t *attr)
    int pthread_mutexattr_setpshared(pthread_mutexattr_t *attr, int pshared)
    int pthread_mutexattr_setrobust(pthread_mutexattr_t *attr, int robust)
    int pthread_mutex_init(pthread_mutex_t *m, const pthread_mutexattr_t *attr)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_mutex_consistent(pthread_mutex_t *m)

cdef extern from "<errno.h>":
    int EOWNERDEAD


cdef enum:
    C_REPLAY = 0
    C_FRESH = 1
    C_FRESH_EVICTED = 2
    C_SLOTS = 8
    C_HEADER_BYTES = 256
    C_LOCK_OFFSET = 64
    C_FLOOR_OFFSET = 32     # int64: the latest expiry of a live entry evicted + margin
    C_FLOOR_MARGIN_MS = 5000

REPLAY = C_REPLAY
FRESH = C_FRESH
FRESH_EVICTED = C_FRESH_EVICTED
SLOTS = C_SLOTS
HEADER_BYTES = C_HEADER_BYTES
MAGIC = int.from_bytes(b"sgwjti01", "little")

cdef uint64_t C_MAGIC = MAGIC
cdef int64_t _MAX_MS = (<int64_t>1) << 62
cdef uint64_t _MAX_BUCKETS = (<uint64_t>1) << 31

if sizeof(pthread_mutex_t) > C_HEADER_BYTES - C_LOCK_OFFSET:
    raise ImportError("pthread_mutex_t does not fit the header's lock area")


def buckets_for(long long max_entries):
    """The smallest power of two ≥ 2 with at least 2 × max_entries slots."""
    if max_entries < 1:
        raise ValueError("max_entries must be positive")
    cdef uint64_t need = (2 * <uint64_t>max_entries + C_SLOTS - 1) // C_SLOTS
    cdef uint64_t n = 2
    while n < need and n <= _MAX_BUCKETS:
        n <<= 1
    if n > _MAX_BUCKETS:
        raise ValueError("max_entries too large")
    return n


def table_bytes(long long max_entries):
    return C_HEADER_BYTES + buckets_for(max_entries) * C_SLOTS * 16


cdef inline uint64_t _rotl(uint64_t x, int b) noexcept nogil:
    return (x << b) | (x >> (64 - b))


cdef inline (uint64_t, uint64_t, uint64_t, uint64_t) _rounds(
        uint64_t v0, uint64_t v1, uint64_t v2, uint64_t v3, int count) noexcept nogil:
    cdef int r
    for r in range(count):
        v0 += v1; v1 = _rotl(v1, 13); v1 ^= v0; v0 = _rotl(v0, 32)
        v2 += v3; v3 = _rotl(v3, 16); v3 ^= v2
        v0 += v3; v3 = _rotl(v3, 21); v3 ^= v0
        v2 += v1; v1 = _rotl(v1, 17); v1 ^= v2; v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


cdef uint64_t _sip(uint64_t k0, uint64_t k1, const unsigned char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t v0 = k0 ^ 0x736F6D6570736575ULL
    cdef uint64_t v1 = k1 ^ 0x646F72616E646F6DULL
    cdef uint64_t v2 = k0 ^ 0x6C7967656E657261ULL
    cdef uint64_t v3 = k1 ^ 0x7465646279746573ULL
    cdef uint64_t m
    cdef Py_ssize_t end = n - (n & 7), i
    cdef int j
    for i in range(0, end, 8):
        memcpy(&m, p + i, 8)                # little-endian hosts only (x86-64, arm64)
        v3 ^= m
        v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
        v0 ^= m
    m = (<uint64_t>(n & 0xFF)) << 56
    for j in range(n - end):
        m |= (<uint64_t>p[end + j]) << (8 * j)
    v3 ^= m
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 2)
    v0 ^= m
    v2 ^= 0xFF
    v0, v1, v2, v3 = _rounds(v0, v1, v2, v3, 4)
    return v0 ^ v1 ^ v2 ^ v3


def siphash24(uint64_t k0, uint64_t k1, bytes data):
    """SipHash-2-4 (Aumasson & Bernstein) of `data` under the key (k0, k1), as an int."""
    return _sip(k0, k1, <const unsigned char *><const char *>data, len(data))


@cython.final
cdef class ReplayTable:
    """A bounded set of keys with expiry times, in memory shared with forked children."""
    cdef unsigned char *_mem
    cdef readonly Py_ssize_t nbytes
    cdef readonly uint64_t buckets
    cdef uint64_t _mask, _k0, _k1
    cdef uint64_t *_slots            # bucket b: fingerprints at [16b, 16b+8), expiries after
    cdef pthread_mutex_t *_mutex

    def __cinit__(self, long long max_entries, secret=None):
        """A new, empty table for max_entries live keys. `secret`: the 16-byte hash key
        (random when None; tests pin it)."""
        if secret is None:
            secret = os.urandom(16)
        cdef bytes key = bytes(secret)
        if len(key) != 16:
            raise ValueError("secret must be 16 bytes")
        self.buckets = buckets_for(max_entries)
        self.nbytes = C_HEADER_BYTES + self.buckets * C_SLOTS * 16
        cdef void *mem = mmap(NULL, self.nbytes, PROT_READ | PROT_WRITE,
                              MAP_SHARED | MAP_ANONYMOUS, -1, 0)
        if mem == MAP_FAILED:
            raise OSError(errno, os.strerror(errno))
        self._mem = <unsigned char *>mem           # zeroed by the kernel
        cdef uint64_t *header = <uint64_t *>mem
        memcpy(&self._k0, <const char *>key, 8)
        memcpy(&self._k1, <const char *>key + 8, 8)
        header[0] = C_MAGIC
        header[1] = self.buckets
        header[2] = self._k0
        header[3] = self._k1
        self._mask = self.buckets - 1
        self._slots = <uint64_t *>(self._mem + C_HEADER_BYTES)
        self._mutex = <pthread_mutex_t *>(self._mem + C_LOCK_OFFSET)
        cdef pthread_mutexattr_t attr
        cdef int rc = pthread_mutexattr_init(&attr)
        if rc == 0:
            rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED)
            if rc == 0:
                rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST)
            if rc == 0:
                rc = pthread_mutex_init(self._mutex, &attr)
            pthread_mutexattr_destroy(&attr)
        if rc != 0:
            raise OSError(rc, os.strerror(rc))

    def __dealloc__(self):
        # This process's mapping only: the other processes keep theirs.
        if self._mem != NULL:
            munmap(self._mem, self.nbytes)
            self._mem = NULL

    @property
    def capacity(self):
        return self.buckets * C_SLOTS

    def memory(self):
        """The table's bytes without the lock area: what the twins must agree on."""
        return (self._mem[:C_LOCK_OFFSET]
                + self._mem[C_HEADER_BYTES:self.nbytes])

    def hash(self, str key):
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(key, &n)
        return _sip(self._k0, self._k1, <const unsigned char *>p, n)

    cdef int _acquire(self) except -1:
        cdef int rc = pthread_mutex_lock(self._mutex)
        if rc == EOWNERDEAD:
            # The holder died inside check_and_store: at worst it left a key stored with
            # another's expiry (see the order of the stores), never a half-written word.
            rc = pthread_mutex_consistent(self._mutex)
        if rc != 0:
            raise OSError(rc, os.strerror(rc))
        return 0

    def _lock(self):
        self._acquire()

    def _unlock(self):
        cdef int rc = pthread_mutex_unlock(self._mutex)
        if rc != 0:
            raise OSError(rc, os.strerror(rc))

    def check_and_store(self, str key, int64_t now_ms, int64_t ttl_ms):
        """REPLAY when `key` is stored and live at now_ms; otherwise store it until
        now_ms + ttl_ms and return FRESH (or FRESH_EVICTED when a live entry made room)."""
        if not (0 <= now_ms < _MAX_MS and 0 <= ttl_ms < _MAX_MS):
            raise ValueError("now_ms and ttl_ms must be in [0, 2**62)")
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(key, &n)
        cdef uint64_t h = _sip(self._k0, self._k1, <const unsigned char *>p, n)
        cdef uint64_t fp = h if h else 1
        cdef int64_t expiry = now_ms + ttl_ms
        cdef uint64_t *b1 = self._slots + (h & self._mask) * (2 * C_SLOTS)
        cdef uint64_t *b2 = self._slots + ((h >> 32) & self._mask) * (2 * C_SLOTS)
        cdef int64_t *t1 = <int64_t *>(b1 + C_SLOTS)
        cdef int64_t *t2 = <int64_t *>(b2 + C_SLOTS)
        cdef int i, live1 = 0, live2 = 0, result
        cdef uint64_t *fps
        cdef int64_t *times
        cdef uint64_t *victim_fp = b1
        cdef int64_t *victim_t = t1
        cdef int64_t *floor = <int64_t *>(self._mem + C_FLOOR_OFFSET)
        self._acquire()
        for i in range(C_SLOTS):
            if b1[i] == fp:
                result = _refresh(&t1[i], now_ms, expiry)
                pthread_mutex_unlock(self._mutex)
                return result
        for i in range(C_SLOTS):
            if b2[i] == fp:
                result = _refresh(&t2[i], now_ms, expiry)
                pthread_mutex_unlock(self._mutex)
                return result
        if expiry <= floor[0]:
            # Not older than a live entry that was evicted: it may be that one, replayed.
            pthread_mutex_unlock(self._mutex)
            return C_REPLAY
        for i in range(C_SLOTS):
            live1 += b1[i] != 0 and t1[i] > now_ms
            live2 += b2[i] != 0 and t2[i] > now_ms
        if live1 < C_SLOTS or live2 < C_SLOTS:
            if live1 <= live2:
                fps, times = b1, t1
            else:
                fps, times = b2, t2
            for i in range(C_SLOTS):
                if fps[i] == 0 or times[i] <= now_ms:
                    victim_fp, victim_t = &fps[i], &times[i]
                    break
            result = C_FRESH
        else:
            # Both full of live entries: the one that expires first goes.
            for i in range(C_SLOTS):
                if t1[i] < victim_t[0]:
                    victim_fp, victim_t = &b1[i], &t1[i]
            for i in range(C_SLOTS):
                if t2[i] < victim_t[0]:
                    victim_fp, victim_t = &b2[i], &t2[i]
            # The same proof presented again gets the same expiry give or take how the
            # wall and monotonic clocks moved meanwhile: the margin covers that.
            if victim_t[0] + C_FLOOR_MARGIN_MS > floor[0]:
                floor[0] = victim_t[0] + C_FLOOR_MARGIN_MS
            result = C_FRESH_EVICTED
        # Expiry first: a process dying between the two stores leaves the old key with a
        # later expiry (harmless), never the new key with the old one's.
        victim_t[0] = expiry
        victim_fp[0] = fp
        pthread_mutex_unlock(self._mutex)
        return result

    def discard(self, str key):
        """Forget `key` (a proof refused after it was stored: docs/auth.md, "When Valkey
        fails"). True when it was there. Only the slot holding the key's fingerprint is
        cleared, so a key that was evicted meanwhile takes nothing else with it."""
        cdef Py_ssize_t n
        cdef const char *p = PyUnicode_AsUTF8AndSize(key, &n)
        cdef uint64_t h = _sip(self._k0, self._k1, <const unsigned char *>p, n)
        cdef uint64_t fp = h if h else 1
        cdef uint64_t *b1 = self._slots + (h & self._mask) * (2 * C_SLOTS)
        cdef uint64_t *b2 = self._slots + ((h >> 32) & self._mask) * (2 * C_SLOTS)
        cdef uint64_t *fps = b1
        cdef int i, pass_
        self._acquire()
        for pass_ in range(2):
            for i in range(C_SLOTS):
                if fps[i] == fp:
                    # Fingerprint first: a process dying between the two stores leaves an
                    # empty slot (fingerprint 0) with a stale expiry, which nothing reads.
                    fps[i] = 0
                    (<int64_t *>(fps + C_SLOTS))[i] = 0
                    pthread_mutex_unlock(self._mutex)
                    return True
            fps = b2
        pthread_mutex_unlock(self._mutex)
        return False

    def live(self, int64_t now_ms):
        """Entries live at now_ms (a scan of the whole table: tests, not requests)."""
        cdef uint64_t b
        cdef int i
        cdef Py_ssize_t n = 0
        cdef uint64_t *fps
        cdef int64_t *times
        for b in range(self.buckets):
            fps = self._slots + b * (2 * C_SLOTS)
            times = <int64_t *>(fps + C_SLOTS)
            for i in range(C_SLOTS):
                n += fps[i] != 0 and times[i] > now_ms
        return n


cdef inline int _refresh(int64_t *t, int64_t now_ms, int64_t expiry) noexcept nogil:
    if t[0] > now_ms:
        return C_REPLAY
    t[0] = expiry
    return C_FRESH
