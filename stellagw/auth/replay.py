"""The DPoP `jti` replay cache (RFC 9449 §11.1, docs/security.md §3a item 17).

Implementations of one protocol, `check_and_store(key, ttl_ms) -> bool` ("True: first
time seen, now stored; False: a replay"):

- `LocalReplayCache`: this instance's cache, synchronous, bounded and time-evicting. Always
  used: it answers same-instance replays without a round trip and is the fallback when
  Valkey fails. With one worker it is an in-process dict. With several, the supervisor calls
  `share_across_workers()` before it forks, and from then on `LocalReplayCache(...)` builds a
  `SharedReplayCache` over that one table (stellagw/_py/replaytable.py): a per-worker dict
  let a proof be replayed once to each worker, while the instance promises one use.
- `ValkeyReplayCache`: shared by every gateway instance, asynchronous: one
  `SET key 1 NX PX ttl` (atomic "store unless present"; the reply is `OK` when stored and
  nil when the key exists). With `undo_unanswered` (onValkeyError: reject) the value is a
  mark of this attempt, and an attempt whose answer the gateway did not get is released
  behind it on the same connection (docs/auth.md, "When Valkey fails").

The local caches also have `discard(key)`: with onValkeyError: reject a request answered
503 because Valkey could not judge its proof forgets the jti it stored first, so the
client's retry is judged like a first use.

Key format (docs/auth.md): `stellagw:dpop:jti:{<jkt>}:<sha256(jti)>`. The hash tag is the
client key's thumbprint, so keys spread over Valkey Cluster slots (a fixed tag such as
`{dpop}` would put every proof of every client on one node) while one client's keys share
a slot. The jti is stored as a hash: its size is then fixed whatever the client sent.
"""
from __future__ import annotations

import hashlib
import os
from base64 import urlsafe_b64encode
from collections import OrderedDict
from time import monotonic
from typing import Awaitable, Protocol

from .. import _impl
from .jose import b64url

if _impl.NO_EXTENSIONS:
    from .._py.replaytable import ReplayTable
else:
    try:
        from .._cext.replaytable import ReplayTable
    except ImportError as exc:
        _impl.fell_back("replaytable", exc)
        from .._py.replaytable import ReplayTable

# How much later than an evicted live entry a new key must expire to be taken.
FLOOR_MARGIN = 5.0

__all__ = ["ReplayCache", "LocalReplayCache", "SharedReplayCache", "ValkeyReplayCache",
           "replay_key", "share_across_workers"]

VALKEY_PREFIX = "stellagw:dpop:jti:"

# Deletes the key only when it still holds this attempt's mark: never another attempt's.
RELEASE_SCRIPT = ("if redis.call('GET', KEYS[1]) == ARGV[1] then "
                  "return redis.call('DEL', KEYS[1]) end return 0")

# The instance's table, when the supervisor made one: inherited by every worker it forks.
_instance_table = None


def share_across_workers(max_entries: int):
    """Make the table every worker of this instance will check proofs in. Call it in the
    supervisor before forking; returns the table."""
    global _instance_table
    _instance_table = ReplayTable(max_entries)
    return _instance_table


def replay_key(jkt: str, jti: str) -> str:
    """`{<jkt>}:<b64url sha256(jti)>`; the Valkey cache adds its prefix."""
    return "{" + jkt + "}:" + b64url(hashlib.sha256(jti.encode("utf-8")).digest())


class ReplayCache(Protocol):
    def check_and_store(self, key: str, ttl_ms: int) -> "bool | Awaitable[bool]": ...


class LocalReplayCache:
    """An insertion-ordered map key → expiry (monotonic seconds), at most `max_entries`.

    Entries are inserted with nearly the same TTL, so the oldest entry is (nearly) the first
    to expire: expired ones are dropped from the front a few at a time on every insert, so
    there is no sweeper task. When the cache is full of *live* entries the oldest is evicted
    anyway (memory is the hard bound) and `on_evict_live()` is called so it is counted:
    size `maxEntries` above peak proofs/s × the acceptance window (docs/auth.md). An
    evicted proof must not be accepted again: from then on a new key expiring no later
    than the latest evicted one is refused as a replay (`_floor`), so a client flooding
    fresh proofs (each accepted, 429 or not) cannot push another's proof out and replay
    it; proofs made now expire later and pass.
    OrderedDict, not dict: popping from the front of a plain dict leaves holes that make
    the next `next(iter())` scan them (quadratic under churn); OrderedDict pops in O(1).
    """

    __slots__ = ("_entries", "_max", "_clock", "on_evict_live", "_floor")

    def __new__(cls, max_entries: int, clock=monotonic, on_evict_live=None):
        # The Authenticator builds "the instance's cache" without knowing about workers.
        if _instance_table is not None and cls is LocalReplayCache:
            return SharedReplayCache(_instance_table, clock, on_evict_live)
        return super().__new__(cls)

    def __init__(self, max_entries: int, clock=monotonic, on_evict_live=None):
        self._entries: OrderedDict[str, float] = OrderedDict()
        self._max = max_entries
        self._clock = clock
        self.on_evict_live = on_evict_live
        self._floor = 0.0        # the latest expiry of a live entry evicted

    def __len__(self) -> int:
        return len(self._entries)

    def check_and_store(self, key: str, ttl_ms: int) -> bool:
        entries = self._entries
        now = self._clock()
        expiry = entries.get(key)
        if expiry is not None:
            if expiry > now:
                return False
            del entries[key]
        expiry = now + ttl_ms / 1000.0
        if expiry <= self._floor:
            return False         # it may be a proof whose entry was evicted
        # Drop a few expired entries from the front (amortised cleanup).
        for _ in range(4):
            if not entries:
                break
            first_key, first_expiry = next(iter(entries.items()))
            if first_expiry > now:
                break
            entries.popitem(last=False)
        if len(entries) >= self._max:
            _, first_expiry = entries.popitem(last=False)
            if first_expiry > now:
                # The same proof again gets the same expiry give or take how the wall and
                # monotonic clocks moved meanwhile (the table's FLOOR_MARGIN_MS).
                self._floor = max(self._floor, first_expiry + FLOOR_MARGIN)
                if self.on_evict_live is not None:
                    self.on_evict_live()
        entries[key] = expiry
        return True

    def discard(self, key: str) -> None:
        """Forget a key stored by a request that was then refused without an answer on its
        proof (docs/auth.md, "When Valkey fails")."""
        self._entries.pop(key, None)


class SharedReplayCache:
    """The LocalReplayCache protocol over a table shared by the instance's workers.

    The table is atomic across processes (two workers seeing one `jti` at once: exactly one
    accepts), bounded (at least 2 × maxEntries slots of 16 bytes, made once per instance),
    and drops expired entries as new ones need their slots. Expiry times are ms of the
    monotonic clock, which all processes of the machine share.
    """

    __slots__ = ("_check", "_live", "_clock", "on_evict_live", "discard")

    def __init__(self, table, clock=monotonic, on_evict_live=None):
        self._check = table.check_and_store
        self.discard = table.discard
        self._live = table.live
        self._clock = clock
        self.on_evict_live = on_evict_live

    def __len__(self) -> int:
        return self._live(int(self._clock() * 1000))

    def check_and_store(self, key: str, ttl_ms: int) -> bool:
        result = self._check(key, int(self._clock() * 1000), ttl_ms)
        if result == 2 and self.on_evict_live is not None:   # FRESH_EVICTED
            self.on_evict_live()
        return result != 0                                   # REPLAY is 0


class ValkeyReplayCache:
    """`SET <prefix><key> 1 NX PX <ttl>` on a `stellagw.valkey.ValkeyClient`.

    Raises whatever the client raises (ValkeyError subclasses, timeouts): the caller
    applies the configured outage policy.
    """

    __slots__ = ("_client", "_prefix")

    def __init__(self, client, prefix: str = VALKEY_PREFIX):
        self._client = client
        self._prefix = prefix

    async def check_and_store(self, key: str, ttl_ms: int, undo_unanswered: bool = False) -> bool:
        """`undo_unanswered`: the caller will refuse the request when it gets no answer
        (onValkeyError: reject), so a SET that runs anyway — Valkey was stopped, not
        dead, and runs it once it resumes — must not keep the jti: the SET stores a mark
        of this attempt, and when the reply does not reach us the client sends
        RELEASE_SCRIPT behind it on the same connection, which Valkey runs after it."""
        client = self._client
        ttl = str(max(1, int(ttl_ms)))
        undoable = getattr(client, "execute_undoable", None) if undo_unanswered else None
        if undoable is not None:
            name = self._prefix + key
            mark = "a:" + urlsafe_b64encode(os.urandom(12)).decode("ascii")
            reply = await undoable(("SET", name, mark, "NX", "PX", ttl),
                                   ("EVAL", RELEASE_SCRIPT, "1", name, mark))
        else:
            reply = await client.execute("SET", self._prefix + key, "1", "NX", "PX", ttl)
        if reply is None:
            return False
        if reply in (b"OK", "OK"):
            return True
        raise ValueError("unexpected reply to SET NX")   # never treat garbage as "new"
