"""The instance-wide DPoP `jti` table: both implementations, differential, and across processes.

Every behaviour test runs against the compiled module (cext/replaytable.pyx) and the
pure-Python twin (stellagw/_py/replaytable.py) on a fake clock (now_ms passed in); the two
must agree on every answer and on the table's bytes. The compiled variant is skipped, with
the reason, when it is not built or STELLAGW_NO_EXTENSIONS=1 is set. Then the table in
forked processes: concurrent check-and-store of the same keys (exactly one process accepts
each), and a process that dies holding the lock.
"""
from __future__ import annotations

import os
import random
import select
import shutil
import signal
import struct
import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stellagw._py import replaytable as py_table
from stellagw.auth import replay as replay_module
from stellagw.auth.replay import LocalReplayCache, SharedReplayCache
from tests.support.impls import Codec

REPLAYTABLE = Codec("replaytable")
c_table, C_SKIP, needs_c = REPLAYTABLE.compiled, REPLAYTABLE.why_not, REPLAYTABLE.needs_compiled
SECRET = bytes(range(16))
NOW = 10_000_000


@pytest.fixture(params=["c", "py"])
def T(request):
    if request.param == "c":
        if c_table is None:
            pytest.skip(C_SKIP)
        return c_table
    return py_table


def keys(n, prefix="k"):
    # Shaped like real keys: "{<jkt>}:<b64url sha256(jti)>".
    return ["{%s}:%s-%06d" % ("J" * 43, prefix, i) for i in range(n)]


# ---------------------------------------------------------------------------------------
# SipHash-2-4

# The reference implementation's vectors_sip64: key 00..0f, message 00 01 .. (n-1).
VECTORS = {0: 0x726FDB47DD0E0E31, 1: 0x74F839C593DC67FD, 8: 0x93F5F5799A932462,
           15: 0xA129CA6149BE45E5, 16: 0x3F2ACC7F57C29BDB}
K0, K1 = struct.unpack("<QQ", SECRET)


def test_siphash_matches_the_published_vectors(T):
    for n, expected in VECTORS.items():
        assert T.siphash24(K0, K1, bytes(range(n))) == expected, n


def test_siphash_matches_openssl_for_every_tail_length(T):
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    for n in range(0, 64, 3):
        data = bytes(range(n))
        out = subprocess.run([openssl, "mac", "-macopt", "hexkey:" + SECRET.hex(),
                              "-macopt", "size:8", "SIPHASH"], input=data, capture_output=True)
        if out.returncode != 0:
            pytest.skip("this openssl has no SIPHASH mac: " + out.stderr.decode()[-200:])
        assert T.siphash24(K0, K1, data) == int.from_bytes(bytes.fromhex(out.stdout.decode()),
                                                          "little"), n


@needs_c
@given(st.binary(max_size=300), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_compiled_siphash_matches_twin(data, k0, k1):
    assert c_table.siphash24(k0, k1, data) == py_table.siphash24(k0, k1, data)


# ---------------------------------------------------------------------------------------
# Size and layout

def test_both_export_the_same_names_and_constants(T):
    assert T.__all__ == py_table.__all__
    for name in ("REPLAY", "FRESH", "FRESH_EVICTED", "SLOTS", "HEADER_BYTES", "MAGIC"):
        assert getattr(T, name) == getattr(py_table, name), name
    assert (T.REPLAY, T.FRESH, T.FRESH_EVICTED) == (0, 1, 2)


@pytest.mark.parametrize("entries", [1, 3, 4, 5, 1000, 100_000, 1_000_000])
def test_at_least_two_slots_per_entry_in_a_power_of_two_of_buckets(T, entries):
    n = T.buckets_for(entries)
    assert n == py_table.buckets_for(entries) and n & (n - 1) == 0 and n >= 2
    assert n * T.SLOTS >= 2 * entries and (n // 2) * T.SLOTS < max(2 * entries, 2 * T.SLOTS)
    assert T.table_bytes(entries) == T.HEADER_BYTES + n * T.SLOTS * 16
    assert T.ReplayTable(entries, SECRET).nbytes == T.table_bytes(entries)


def test_default_size_is_four_mebibytes(T):
    assert T.table_bytes(100_000) == 256 + 4 * 1024 * 1024


def test_bad_arguments(T):
    with pytest.raises(ValueError):
        T.buckets_for(0)
    with pytest.raises(ValueError):
        T.buckets_for(2**40)
    with pytest.raises(ValueError):
        T.ReplayTable(10, b"short")
    t = T.ReplayTable(10, SECRET)
    with pytest.raises(TypeError):
        t.check_and_store(b"bytes", NOW, 1000)
    for now, ttl in ((-1, 1000), (NOW, -1), (2**62, 1), (NOW, 2**62)):
        with pytest.raises((ValueError, OverflowError)):
            t.check_and_store("k", now, ttl)


def test_header_names_the_layout_and_key(T):
    t = T.ReplayTable(100, SECRET)
    magic, buckets, k0, k1 = struct.unpack_from("=QQQQ", t.memory())
    assert (magic, buckets, k0, k1) == (T.MAGIC, t.buckets, K0, K1)
    assert len(t.memory()) == 64 + t.buckets * T.SLOTS * 16


def test_random_secret_per_table(T):
    a, b = T.ReplayTable(10), T.ReplayTable(10)
    assert a.hash("same key") != b.hash("same key")


# ---------------------------------------------------------------------------------------
# Behaviour

def test_store_replay_expiry(T):
    t = T.ReplayTable(10, SECRET)
    assert t.check_and_store("a", NOW, 1000) == T.FRESH
    assert t.check_and_store("a", NOW + 999, 1000) == T.REPLAY
    assert t.check_and_store("b", NOW, 1000) == T.FRESH
    assert t.check_and_store("a", NOW + 1000, 1000) == T.FRESH     # expired: usable again
    assert t.check_and_store("a", NOW + 1999, 5) == T.REPLAY       # and stored anew
    assert t.live(NOW + 1000) == 1 and t.live(NOW + 999) == 2


def test_a_replay_does_not_extend_the_entry(T):
    t = T.ReplayTable(10, SECRET)
    t.check_and_store("a", NOW, 1000)
    t.check_and_store("a", NOW + 500, 60_000)
    assert t.check_and_store("a", NOW + 1000, 1000) == T.FRESH


def test_non_ascii_keys(T):
    t = T.ReplayTable(10, SECRET)
    assert t.check_and_store("jti-é-☃", NOW, 1000) == T.FRESH
    assert t.check_and_store("jti-é-☃", NOW, 1000) == T.REPLAY
    assert t.check_and_store("jti-e-☃", NOW, 1000) == T.FRESH
    assert t.hash("é") == py_table.siphash24(K0, K1, "é".encode())


def test_discard_forgets_one_key_only(T):
    t = T.ReplayTable(10, SECRET)
    for k in ("a", "b", "jti-é-☃"):
        t.check_and_store(k, NOW, 60_000)
    assert t.discard("a") is True
    assert t.discard("a") is False                 # gone already
    assert t.discard("never stored") is False
    assert t.live(NOW) == 2
    assert t.check_and_store("b", NOW, 60_000) == T.REPLAY
    assert t.discard("jti-é-☃") is True
    assert t.check_and_store("a", NOW + 1, 60_000) == T.FRESH    # usable again, once
    assert t.check_and_store("a", NOW + 2, 60_000) == T.REPLAY
    with pytest.raises(TypeError):
        t.discard(b"bytes")


def test_discard_leaves_the_other_keys(T):
    t = T.ReplayTable(100, SECRET)
    ks = keys(100)
    assert {t.check_and_store(k, NOW, 60_000) for k in ks} == {T.FRESH}
    for k in ks[::2]:
        assert t.discard(k) is True
    assert t.live(NOW) == 50
    assert [t.check_and_store(k, NOW, 60_000) for k in ks] == [T.FRESH, T.REPLAY] * 50


@pytest.mark.parametrize("entries", [100, 10_000])
def test_max_entries_live_keys_fit_without_evicting_a_live_one(T, entries):
    """Two choices per key: at max_entries live keys no bucket pair is full yet."""
    t = T.ReplayTable(entries, SECRET)
    ks = keys(entries)
    assert {t.check_and_store(k, NOW, 60_000) for k in ks} == {T.FRESH}
    assert t.live(NOW) == entries
    assert {t.check_and_store(k, NOW + 1, 60_000) for k in ks} == {T.REPLAY}


def test_bounded_full_of_live_entries_the_soonest_to_expire_goes(T):
    t = T.ReplayTable(16, SECRET)         # 4 buckets, 32 slots
    # A second apart (past the floor's margin: a key must expire 5 s after the latest
    # live one evicted), each live for 10 minutes.
    results = [t.check_and_store(k, NOW + i * 1000, 600_000) for i, k in enumerate(keys(200))]
    assert results[:16].count(T.FRESH) == 16
    assert T.FRESH_EVICTED in results and T.REPLAY not in results
    assert t.live(NOW + 200_000) == t.capacity == 32
    assert len(t.memory()) == 64 + 32 * 16         # the bound: memory never grows
    # The most recent keys are still there; some of the oldest were evicted, and are not
    # accepted again with the expiry they had (docs/security.md §3d, "replay after
    # eviction"); a key made later is.
    assert t.check_and_store(keys(200)[-1], NOW + 300_000, 60_000) == T.REPLAY
    assert t.check_and_store(keys(200)[0], NOW + 300_000, 300_000) == T.REPLAY
    assert t.check_and_store("later", NOW + 300_000, 600_000) != T.REPLAY


def test_expired_slots_are_reused_without_eviction(T):
    t = T.ReplayTable(1000, SECRET)
    now = NOW
    for round_ in range(5):
        got = {t.check_and_store(k, now, 1000) for k in keys(1000, prefix=f"r{round_}")}
        assert got == {T.FRESH}
        now += 1000
    assert t.live(now - 1) == 1000


STEPS = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 40), st.integers(0, 300)),
                 max_size=300)


@needs_c
@settings(max_examples=150, deadline=None)
@given(STEPS, st.sampled_from([1, 8, 40]))
def test_compiled_matches_twin_byte_for_byte(steps, entries):
    c, p = c_table.ReplayTable(entries, SECRET), py_table.ReplayTable(entries, SECRET)
    now = NOW
    for key, dt, ttl in steps:
        now += dt
        k = f"key-{key}"
        if ttl % 7 == 0:                            # now and then, forget one instead
            assert c.discard(k) == p.discard(k)
        else:
            assert c.check_and_store(k, now, ttl) == p.check_and_store(k, now, ttl)
    assert c.memory() == p.memory()
    assert c.live(now) == p.live(now)


# ---------------------------------------------------------------------------------------
# Across processes

def _fork(child):
    """Run child() in a forked process; its return value (bytes) comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            out = child()
            with os.fdopen(w, "wb") as f:
                f.write(out)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid, r, timeout=60.0):
    """The child's output; a child that has not finished within `timeout` is killed."""
    deadline = time.monotonic() + timeout
    chunks = []
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError("the child did not finish: a process is stuck on the table")
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return b"".join(chunks)


def test_concurrent_inserts_from_several_processes_accept_each_key_once(T):
    n = 20_000 if T is not py_table else 1_500
    procs = 3
    table = T.ReplayTable(n, SECRET)
    ks = keys(n)
    go = os.pipe()

    def child(seed):
        def run():
            # Two in the same order race on every key (the C section is ~0.1 µs long);
            # the third, shuffled, meets them anywhere.
            order = list(range(n))
            if seed == 2:
                random.Random(seed).shuffle(order)
            os.read(go[0], 1)                         # all start together
            accepted = [i for i in order if table.check_and_store(ks[i], NOW, 60_000)]
            return struct.pack(f"<{len(accepted)}i", *accepted)
        return run
    kids = [_fork(child(seed)) for seed in range(procs)]
    os.write(go[1], b"x" * procs)
    accepted = [struct.unpack(f"<{len(d) // 4}i", d) for d in (_collect(*k) for k in kids)]
    os.close(go[0])
    os.close(go[1])
    total = sorted(i for a in accepted for i in a)
    assert total == list(range(n)), "a key accepted twice or never"
    assert table.live(NOW) == n


def test_same_key_at_once_from_several_processes(T):
    """Many rounds of one key, every process trying it at the same instant."""
    table = T.ReplayTable(1000, SECRET)
    rounds, procs = (400 if T is not py_table else 100), 3
    barrier_fds = [os.pipe() for _ in range(procs)]

    def child(j):
        def run():
            wins = []
            for rnd in range(rounds):
                os.read(barrier_fds[j][0], 1)
                if table.check_and_store(f"round-{rnd}", NOW, 60_000):
                    wins.append(rnd)
            return struct.pack(f"<{len(wins)}i", *wins)
        return run
    kids = [_fork(child(j)) for j in range(procs)]
    for _ in range(rounds):
        for j in range(procs):
            os.write(barrier_fds[j][1], b"x")
    wins = [struct.unpack(f"<{len(d) // 4}i", d) for d in (_collect(*k) for k in kids)]
    for r, w in barrier_fds:
        os.close(r)
        os.close(w)
    assert sorted(i for w in wins for i in w) == list(range(rounds))


def test_a_process_dying_with_the_lock_does_not_block_the_others(T):
    table = T.ReplayTable(100, SECRET)

    def die_holding_it():
        table._lock()
        os._exit(0)                     # no unlock, no cleanup: as SIGKILL would leave it
    pid = os.fork()
    if pid == 0:
        die_holding_it()
    os.waitpid(pid, 0)
    # Checked in another child, so a table that deadlocks fails the test instead of hanging it.
    kid = _fork(lambda: bytes([table.check_and_store("after", NOW, 1000),
                               table.check_and_store("after", NOW, 1000)]))
    assert _collect(*kid, timeout=10) == bytes([T.FRESH, T.REPLAY])
    assert table.check_and_store("after", NOW, 1000) == T.REPLAY     # the parent sees it too


# ---------------------------------------------------------------------------------------
# The replay cache over the table (stellagw/auth/replay.py)

def test_shared_cache_protocol_and_live_evictions(T):
    now = [100.0]
    evicted = []
    cache = SharedReplayCache(T.ReplayTable(8, SECRET), clock=lambda: now[0],   # 16 slots
                              on_evict_live=lambda: evicted.append(1))
    assert cache.check_and_store("a", 1000) is True
    assert cache.check_and_store("a", 1000) is False
    now[0] += 1.0
    assert cache.check_and_store("a", 1000) is True
    for k in keys(100):
        now[0] += 1.0                    # a second apart: past the floor's margin (below)
        assert cache.check_and_store(k, 600_000) is True
    assert len(cache) == 16 and len(evicted) >= 100 - 16
    # An evicted key is never accepted again while it could be live (docs/security.md
    # §3d, "replay after eviction"): none of the first keys, presented with the expiry
    # they had (key i was stored at 102 + i), though most of them left the table.
    again = [k for i, k in enumerate(keys(100)[:50])
             if cache.check_and_store(k, int((102 + i + 600 - now[0]) * 1000))]
    assert again == []


def test_shared_cache_discard(T):
    cache = SharedReplayCache(T.ReplayTable(8, SECRET))
    assert cache.check_and_store("a", 60_000) is True
    cache.discard("a")
    assert cache.check_and_store("a", 60_000) is True
    assert cache.check_and_store("a", 60_000) is False


def test_local_cache_is_the_instance_table_once_shared(monkeypatch):
    monkeypatch.setattr(replay_module, "_instance_table", None)
    assert type(LocalReplayCache(10)) is LocalReplayCache
    table = replay_module.share_across_workers(1000)
    assert replay_module._instance_table is table
    a, b = LocalReplayCache(1000), LocalReplayCache(1000)   # two workers' Authenticators
    assert type(a) is SharedReplayCache
    assert a.check_and_store("k", 60_000) is True
    assert b.check_and_store("k", 60_000) is False


def test_authenticators_of_two_workers_share_replays(tmp_path, monkeypatch):
    from stellagw.auth import AuthFailure, Identity

    from tests.support.auth import (ISSUER_PLACEHOLDER, DpopClient, SigningKey, dpop_request,
                                    make_authenticator, mint_token)
    monkeypatch.setattr(replay_module, "_instance_table", None)
    replay_module.share_across_workers(1000)
    key, client = SigningKey("ES256", kid="k1"), DpopClient()
    a = make_authenticator(tmp_path, [key])
    b = make_authenticator(tmp_path, [key])
    token = mint_token(key, ISSUER_PLACEHOLDER, cnf={"jkt": client.jkt})
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    assert isinstance(a.authenticate(dpop_request(client, token, proof=proof), ()), Identity)
    result = b.authenticate(dpop_request(client, token, proof=proof), ())
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"
