"""The instance-wide DPoP `jti` table — the pure-Python twin.

Same API, same memory layout and the same results as the compiled
``stellagw._cext.replaytable`` (cext/replaytable.pyx); tests/codecs/test_replay_table.py runs the
two differentially, byte for byte over the table. stellagw/auth/replay.py imports one of
them (STELLAGW_NO_EXTENSIONS=1: this one).

Why it exists: with several workers and no Valkey, a per-worker cache let a proof be
replayed once per worker. The supervisor makes one table in shared memory before it forks,
so every worker — and every restarted worker — checks and stores in the same one.

Layout (native byte order; every field a 64-bit word):

* header, HEADER_BYTES: magic, bucket count (a power of two), the 128-bit SipHash key, then
  a lock area the compiled module keeps its process-shared mutex in (unused here);
* buckets of SLOTS slots, each bucket SLOTS fingerprints then SLOTS expiry times (ms of the
  monotonic clock, which every process of the machine shares). Fingerprint 0 = empty.

A key's fingerprint is SipHash-2-4 of its UTF-8 bytes under a random key made when the
table is: keyed, so nobody who cannot read the table can choose `jti`s that crowd one
bucket and push other clients' entries out. The fingerprint's low bits pick one bucket and
bits 32 and up another ("two choices"); a new key goes to the one with fewer live entries,
which keeps buckets from overflowing long after one choice would (tests check: no live
entry is evicted at `max_entries` live keys). The table has at least 2 × max_entries slots.

check_and_store is atomic across processes: here under a POSIX record lock on the memfd
the table lives in (released by the kernel when a holder dies), plus a thread lock, since
record locks do not exclude threads of one process. A table is used by one implementation:
the two lock differently.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading

__all__ = ["ReplayTable", "siphash24", "buckets_for", "table_bytes", "REPLAY", "FRESH",
           "FRESH_EVICTED", "SLOTS", "HEADER_BYTES", "MAGIC"]

REPLAY = 0          # seen before and still live: refuse
FRESH = 1           # first use: stored
FRESH_EVICTED = 2   # first use: stored in place of a live entry (count it: that one may be replayed)

SLOTS = 8                               # per bucket: its fingerprints fill one cache line
HEADER_BYTES = 256
MAGIC = int.from_bytes(b"sgwjti01", "little")   # this layout, version 1
_MAX_MS = 1 << 62                       # now_ms and ttl_ms below this: their sum fits int64
_LOCK_OFFSET = 64                       # the compiled module's mutex; 64..HEADER_BYTES
_HEADER = struct.Struct("=QQQQ")        # magic, buckets, k0, k1
# Then, at byte 32, the latest expiry of a live entry that was evicted plus a margin (0:
# none): a new key that expires no later may be that entry, replayed, and is refused. The
# same proof presented again gets the same expiry give or take how the wall and monotonic
# clocks moved meanwhile: the margin covers that.
_FLOOR = struct.Struct("=q")
_FLOOR_OFFSET = 32
FLOOR_MARGIN_MS = 5000
_MAX_BUCKETS = 1 << 31                  # bits 32 and up choose the second bucket
_M64 = 0xFFFF_FFFF_FFFF_FFFF


def buckets_for(max_entries: int) -> int:
    """The smallest power of two ≥ 2 with at least 2 × max_entries slots."""
    if max_entries < 1:
        raise ValueError("max_entries must be positive")
    need = -(-2 * max_entries // SLOTS)
    n = 2
    while n < need:
        n <<= 1
    if n > _MAX_BUCKETS:
        raise ValueError("max_entries too large")
    return n


def table_bytes(max_entries: int) -> int:
    return HEADER_BYTES + buckets_for(max_entries) * SLOTS * 16


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _M64


def siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 (Aumasson & Bernstein) of `data` under the key (k0, k1), as an int."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    end = n - (n & 7)
    tail = int.from_bytes(data[end:], "little") | ((n & 0xFF) << 56)
    words = [w for (w,) in struct.iter_unpack("<Q", data[:end])]
    words.append(tail)
    for m in words:
        v3 ^= m
        for _ in range(2):
            v0 = (v0 + v1) & _M64; v1 = _rotl(v1, 13) ^ v0; v0 = _rotl(v0, 32)   # noqa: E702
            v2 = (v2 + v3) & _M64; v3 = _rotl(v3, 16) ^ v2                      # noqa: E702
            v0 = (v0 + v3) & _M64; v3 = _rotl(v3, 21) ^ v0                      # noqa: E702
            v2 = (v2 + v1) & _M64; v1 = _rotl(v1, 17) ^ v2; v2 = _rotl(v2, 32)  # noqa: E702
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(4):
        v0 = (v0 + v1) & _M64; v1 = _rotl(v1, 13) ^ v0; v0 = _rotl(v0, 32)       # noqa: E702
        v2 = (v2 + v3) & _M64; v3 = _rotl(v3, 16) ^ v2                          # noqa: E702
        v0 = (v0 + v3) & _M64; v3 = _rotl(v3, 21) ^ v0                          # noqa: E702
        v2 = (v2 + v1) & _M64; v1 = _rotl(v1, 17) ^ v2; v2 = _rotl(v2, 32)      # noqa: E702
    return v0 ^ v1 ^ v2 ^ v3


class ReplayTable:
    """A bounded set of keys with expiry times, in memory shared with forked children."""

    def __init__(self, max_entries: int, secret: bytes | None = None):
        """A new, empty table for max_entries live keys. `secret`: the 16-byte hash key
        (random when None; tests pin it)."""
        if secret is None:
            secret = os.urandom(16)
        if len(secret) != 16:
            raise ValueError("secret must be 16 bytes")
        self.buckets = buckets_for(max_entries)
        self.nbytes = HEADER_BYTES + self.buckets * SLOTS * 16
        self._fd = os.memfd_create("stellagw-replay", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.nbytes)
        self._map = mmap.mmap(self._fd, self.nbytes, mmap.MAP_SHARED)
        k0, k1 = struct.unpack("<QQ", secret)
        _HEADER.pack_into(self._map, 0, MAGIC, self.buckets, k0, k1)
        self._k0, self._k1 = k0, k1
        self._words = memoryview(self._map)[HEADER_BYTES:].cast("Q")
        self._times = memoryview(self._map)[HEADER_BYTES:].cast("q")
        self._mask = self.buckets - 1
        self._thread_lock = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.buckets * SLOTS

    def memory(self) -> bytes:
        """The table's bytes without the lock area: what the twins must agree on."""
        raw = self._map[:]
        return raw[:_LOCK_OFFSET] + raw[HEADER_BYTES:]

    def hash(self, key: str) -> int:
        return siphash24(self._k0, self._k1, key.encode("utf-8"))

    # The lock, also for tests: a process that dies holding it must not stop the others.
    def _lock(self) -> None:
        self._thread_lock.acquire()
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def check_and_store(self, key: str, now_ms: int, ttl_ms: int) -> int:
        """REPLAY when `key` is stored and live at now_ms; otherwise store it until
        now_ms + ttl_ms and return FRESH (or FRESH_EVICTED when a live entry made room)."""
        if not (0 <= now_ms < _MAX_MS and 0 <= ttl_ms < _MAX_MS):
            raise ValueError("now_ms and ttl_ms must be in [0, 2**62)")
        fp, b1, b2 = self._place(key)
        expiry = now_ms + ttl_ms
        words, times = self._words, self._times
        self._lock()
        try:
            for base in (b1, b2):
                for i in range(base, base + SLOTS):
                    if words[i] == fp:
                        if times[i + SLOTS] > now_ms:
                            return REPLAY
                        times[i + SLOTS] = expiry
                        return FRESH
            floor = _FLOOR.unpack_from(self._map, _FLOOR_OFFSET)[0]
            if expiry <= floor:
                return REPLAY
            live1 = sum(1 for i in range(b1, b1 + SLOTS)
                        if words[i] and times[i + SLOTS] > now_ms)
            live2 = sum(1 for i in range(b2, b2 + SLOTS)
                        if words[i] and times[i + SLOTS] > now_ms)
            target = b1 if live1 <= live2 else b2
            if min(live1, live2) < SLOTS:
                for i in range(target, target + SLOTS):
                    if not words[i] or times[i + SLOTS] <= now_ms:
                        slot = i
                        break
                result = FRESH
            else:
                # Both full of live entries: the one that expires first goes.
                slot = b1
                for i in (*range(b1, b1 + SLOTS), *range(b2, b2 + SLOTS)):
                    if times[i + SLOTS] < times[slot + SLOTS]:
                        slot = i
                if times[slot + SLOTS] + FLOOR_MARGIN_MS > floor:
                    _FLOOR.pack_into(self._map, _FLOOR_OFFSET,
                                     times[slot + SLOTS] + FLOOR_MARGIN_MS)
                result = FRESH_EVICTED
            # Expiry first: a process dying between the two stores leaves the old key with
            # a later expiry (harmless), never the new key with the old one's.
            times[slot + SLOTS] = expiry
            words[slot] = fp
            return result
        finally:
            self._unlock()

    def _place(self, key):
        """`key`'s fingerprint (never 0: 0 marks an empty slot) and its two buckets."""
        if not isinstance(key, str):
            raise TypeError("key must be str")
        h = siphash24(self._k0, self._k1, key.encode("utf-8"))
        return h or 1, (h & self._mask) * (2 * SLOTS), ((h >> 32) & self._mask) * (2 * SLOTS)

    def discard(self, key: str) -> bool:
        """Forget `key` (a proof refused after it was stored: docs/auth.md, "When Valkey
        fails"). True when it was there. Only the slot holding the key's fingerprint is
        cleared, so a key that was evicted meanwhile takes nothing else with it."""
        fp, b1, b2 = self._place(key)
        words, times = self._words, self._times
        self._lock()
        try:
            for base in (b1, b2):
                for i in range(base, base + SLOTS):
                    if words[i] == fp:
                        # Fingerprint first: a process dying between the two stores leaves
                        # an empty slot (fingerprint 0) with a stale expiry, nothing reads.
                        words[i] = 0
                        times[i + SLOTS] = 0
                        return True
            return False
        finally:
            self._unlock()

    def live(self, now_ms: int) -> int:
        """Entries live at now_ms (a scan of the whole table: tests, not requests)."""
        words, times = self._words, self._times
        n = 0
        for b in range(0, self.buckets * 2 * SLOTS, 2 * SLOTS):
            for i in range(b, b + SLOTS):
                if words[i] and times[i + SLOTS] > now_ms:
                    n += 1
        return n
