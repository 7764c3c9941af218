"""The DPoP jti replay cache: docs/security.md §3a item 17.

In-process LRU (bounded, time-evicting), the Valkey path through a fake client implementing
`execute` (the lead adds a real-Valkey test), replays caught across instances, and the
outage policy (`onValkeyError: local | reject`), which must never be silent.
"""
from __future__ import annotations

import asyncio

import pytest

from stellagw.auth import AuthFailure, Identity, LocalReplayCache, ValkeyReplayCache

from tests.support.auth import (ISSUER_PLACEHOLDER, DpopClient, FakeValkey, SigningKey,
                                dpop_request, make_authenticator, mint_token, resolve)

ISS = ISSUER_PLACEHOLDER


@pytest.fixture(scope="module")
def key():
    return SigningKey("ES256", kid="k1")


@pytest.fixture
def client():
    return DpopClient()


def token_for(key, client):
    return mint_token(key, ISS, cnf={"jkt": client.jkt})


# ---------------------------------------------------------------------- in process

def test_local_cache_store_replay_expiry():
    now = [100.0]
    cache = LocalReplayCache(10, clock=lambda: now[0])
    assert cache.check_and_store("a", 1000) is True
    assert cache.check_and_store("a", 1000) is False
    now[0] += 1.01
    assert cache.check_and_store("a", 1000) is True      # expired: usable again


def test_local_cache_is_bounded_and_counts_live_evictions():
    now = [100.0]
    evicted = []
    cache = LocalReplayCache(3, clock=lambda: now[0], on_evict_live=lambda: evicted.append(1))
    for k in "abcd":
        assert cache.check_and_store(k, 60_000)
    assert len(cache) == 3 and evicted == [1]
    assert cache.check_and_store("a", 60_000) is True      # the oldest went first


def test_local_cache_drops_expired_entries_as_it_goes():
    now = [100.0]
    evicted = []
    cache = LocalReplayCache(3, clock=lambda: now[0], on_evict_live=lambda: evicted.append(1))
    for k in "abc":
        cache.check_and_store(k, 1000)
    now[0] += 2
    cache.check_and_store("d", 1000)
    assert len(cache) == 1 and evicted == []


def test_replay_entry_outlives_the_acceptance_window(tmp_path, key, client):
    # The TTL covers iat + skew (+ grace), so a proof can never be replayed while acceptable.
    auth = make_authenticator(tmp_path, [key])
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    assert isinstance(auth.authenticate(dpop_request(client, token, proof=proof), ()), Identity)
    expiry = next(iter(auth.replay._entries.values()))
    import time
    assert expiry - time.monotonic() >= 60       # dpopMaxClockSkew


# ---------------------------------------------------------------------- Valkey (fake client)

def test_valkey_key_format_and_command(tmp_path, key, client):
    valkey = FakeValkey()
    auth = make_authenticator(tmp_path, [key], valkey=valkey)
    result = resolve(auth.authenticate(dpop_request(client, token_for(key, client), jti="j-1"), ()))
    assert isinstance(result, Identity)
    (command,) = valkey.calls
    assert command[0] == "SET" and command[2:5] == ("1", "NX", "PX")
    assert command[1].startswith("stellagw:dpop:jti:{" + client.jkt + "}:")
    assert "j-1" not in command[1]                    # the jti is stored hashed
    assert int(command[5]) >= 60_000


def test_replay_across_instances_through_valkey(tmp_path, key, client):
    shared = FakeValkey()
    a = make_authenticator(tmp_path, [key], valkey=shared)
    b = make_authenticator(tmp_path, [key], valkey=shared)
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    assert isinstance(resolve(a.authenticate(dpop_request(client, token, proof=proof), ())), Identity)
    result = resolve(b.authenticate(dpop_request(client, token, proof=proof), ()))
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"


def test_same_instance_replay_is_caught_before_valkey(tmp_path, key, client):
    valkey = FakeValkey()
    auth = make_authenticator(tmp_path, [key], valkey=valkey)
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    resolve(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    result = auth.authenticate(dpop_request(client, token, proof=proof), ())
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"
    assert len(valkey.calls) == 1


def test_outage_policy_local_falls_back_and_counts(tmp_path, key, client):
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], valkey=valkey)      # default: local
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    assert isinstance(resolve(auth.authenticate(dpop_request(client, token, proof=proof), ())), Identity)
    assert auth.test_events.counts["dpop_replay_valkey_fallback"] == 1
    assert any(r["message"] == "DPoP replay cache (Valkey) failed" for r in auth.test_log.records)
    # The in-process cache still catches the replay on this instance.
    result = auth.authenticate(dpop_request(client, token, proof=proof), ())
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"
    # While Valkey is marked down, requests do not wait on it (and are still counted).
    calls = len(valkey.calls)
    result = auth.authenticate(dpop_request(client, token), ())
    assert isinstance(result, Identity) and len(valkey.calls) == calls
    assert auth.test_events.counts["dpop_replay_valkey_fallback"] == 2


def test_outage_policy_reject(tmp_path, key, client):
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], "replayCache: {onValkeyError: reject}", valkey=valkey)
    result = resolve(auth.authenticate(dpop_request(client, token_for(key, client)), ()))
    assert isinstance(result, AuthFailure)
    assert (result.status, result.reason) == (503, "replay_cache_unavailable")
    assert b"retry-after: 1" in result.headers
    assert auth.test_events.counts["dpop_replay_valkey_reject"] == 1


def test_valkey_timeout_is_an_outage(tmp_path, key, client):
    valkey = FakeValkey()
    valkey.hang = True
    auth = make_authenticator(tmp_path, [key], 'replayCache: {timeout: "50ms", onValkeyError: reject}',
                              valkey=valkey)
    result = resolve(auth.authenticate(dpop_request(client, token_for(key, client)), ()))
    assert isinstance(result, AuthFailure) and result.reason == "replay_cache_unavailable"


def test_valkey_recovers_after_the_retry_interval(tmp_path, key, client, monkeypatch):
    from stellagw.auth import authenticator as auth_module
    monkeypatch.setattr(auth_module, "VALKEY_RETRY_AFTER", 0.0)
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], valkey=valkey)
    token = token_for(key, client)
    resolve(auth.authenticate(dpop_request(client, token), ()))
    valkey.down = False
    result = resolve(auth.authenticate(dpop_request(client, token), ()))
    assert isinstance(result, Identity) and len(valkey.store) == 1


def test_unexpected_reply_is_not_new():
    class Odd:
        async def execute(self, *args):
            return b"QUEUED"
    with pytest.raises(ValueError):
        asyncio.run(ValkeyReplayCache(Odd()).check_and_store("k", 1000))


def test_failures_before_the_replay_check_do_not_touch_valkey(tmp_path, key, client):
    valkey = FakeValkey()
    auth = make_authenticator(tmp_path, [key], valkey=valkey)
    req = dpop_request(client, token_for(key, client), method="POST")
    req.method = "GET"
    assert isinstance(auth.authenticate(req, ()), AuthFailure)
    assert valkey.calls == []
