"""Type stubs for stellagw._cext.replaytable (cext/replaytable.pyx); the twin is
stellagw._py.replaytable. Why and how: the twin's docstring and docs/auth.md (Replay cache)."""
from typing import Final

__all__ = ["ReplayTable", "siphash24", "buckets_for", "table_bytes", "REPLAY", "FRESH",
           "FRESH_EVICTED", "SLOTS", "HEADER_BYTES", "MAGIC"]

REPLAY: Final[int]          # 0: stored and live: refuse the proof
FRESH: Final[int]           # 1: first use, now stored
FRESH_EVICTED: Final[int]   # 2: first use, stored in place of a live entry (count it)
SLOTS: Final[int]           # 8 slots per bucket
HEADER_BYTES: Final[int]    # 256: magic, bucket count, hash key, the lock area (64..255)
MAGIC: Final[int]           # b"sgwjti01" as a little-endian u64

def siphash24(k0: int, k1: int, data: bytes) -> int:
    """SipHash-2-4 of data under the key (k0, k1)."""

def buckets_for(max_entries: int) -> int:
    """The smallest power of two >= 2 buckets with at least 2 * max_entries slots."""

def table_bytes(max_entries: int) -> int:
    """HEADER_BYTES + buckets_for(max_entries) * SLOTS * 16."""

class ReplayTable:
    nbytes: int                 # the shared mapping's size
    buckets: int
    def __init__(self, max_entries: int, secret: bytes | None = None) -> None:
        """A new table in MAP_SHARED memory, inherited by processes forked later; `secret`
        is the 16-byte hash key (random when None)."""
    @property
    def capacity(self) -> int: ...
    def check_and_store(self, key: str, now_ms: int, ttl_ms: int) -> int:
        """REPLAY, FRESH or FRESH_EVICTED; atomic across processes. now_ms, ttl_ms in
        [0, 2**62): ms of the monotonic clock and the entry's lifetime."""
    def discard(self, key: str) -> bool:
        """Forget key (a proof refused after it was stored); True when it was there."""
    def live(self, now_ms: int) -> int:
        """Entries live at now_ms (scans the table)."""
    def hash(self, key: str) -> int:
        """siphash24 of the key's UTF-8 bytes under this table's secret."""
    def memory(self) -> bytes:
        """The table's bytes without the lock area (what the twins agree on)."""
    def _lock(self) -> None: ...      # tests: a holder that dies must not block the others
    def _unlock(self) -> None: ...
