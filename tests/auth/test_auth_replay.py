"""The DPoP jti replay cache: docs/security.md §3a item 17.

In-process LRU (bounded, time-evicting), the Valkey path through a fake client implementing
`execute` (the real-Valkey outage is tests/auth/test_replay_valkey_outage.py), replays
caught across instances, and the outage policy (`onValkeyError: local | reject`), which
must never be silent, never accept a replay, and under `reject` never spend a proof it
refused with 503.
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
    assert len(cache) == 3 and evicted == [1]              # the oldest, "a", went first
    # ...and is not accepted again, nor anything expiring no later (it may be "a"):
    # docs/security.md §3d, "replay after eviction".
    assert cache.check_and_store("a", 60_000) is False
    assert cache.check_and_store("e", 60_000) is False
    now[0] += 5.001                 # a proof made later than the floor's margin passes
    assert cache.check_and_store("e", 60_000) is True and evicted == [1, 1]


def test_local_cache_discard():
    cache = LocalReplayCache(10)
    assert cache.check_and_store("a", 60_000) is True
    cache.discard("a")
    cache.discard("never stored")
    assert cache.check_and_store("a", 60_000) is True
    assert cache.check_and_store("a", 60_000) is False


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


REJECT = "replayCache: {onValkeyError: reject}"


def test_reject_a_proof_refused_for_an_outage_is_not_spent(tmp_path, key, client, monkeypatch):
    from stellagw.auth import authenticator as auth_module
    monkeypatch.setattr(auth_module, "VALKEY_RETRY_AFTER", 0.0)
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], REJECT, valkey=valkey)
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    for _ in range(2):
        result = resolve(auth.authenticate(dpop_request(client, token, proof=proof), ()))
        assert (result.status, result.reason) == (503, "replay_cache_unavailable")
    assert len(auth.replay) == 0 and valkey.store == {}
    valkey.down = False
    assert isinstance(resolve(auth.authenticate(dpop_request(client, token, proof=proof), ())),
                      Identity)
    result = resolve(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"


def test_reject_the_quiet_second_does_not_spend_proofs_either(tmp_path, key, client,
                                                               monkeypatch):
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], REJECT, valkey=valkey)
    token = token_for(key, client)
    resolve(auth.authenticate(dpop_request(client, token), ()))        # Valkey marked down
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    calls = len(valkey.calls)
    result = auth.authenticate(dpop_request(client, token, proof=proof), ())   # no wait
    assert (result.status, result.reason) == (503, "replay_cache_unavailable")
    assert len(valkey.calls) == calls and len(auth.replay) == 0
    valkey.down = False
    monkeypatch.setattr(auth, "_valkey_down_until", 0.0)
    assert isinstance(resolve(auth.authenticate(dpop_request(client, token, proof=proof), ())),
                      Identity)


def test_reject_a_timed_out_or_cancelled_check_is_not_spent(tmp_path, key, client):
    valkey = FakeValkey()
    valkey.hang = True
    auth = make_authenticator(tmp_path, [key], 'replayCache: {timeout: "50ms", onValkeyError: reject}',
                              valkey=valkey)
    token = token_for(key, client)
    timed_out = client.proof("GET", "https://gw.example.com/api/items", token)
    result = resolve(auth.authenticate(dpop_request(client, token, proof=timed_out), ()))
    assert result.reason == "replay_cache_unavailable"
    auth._valkey_down_until = 0.0
    cancelled = client.proof("GET", "https://gw.example.com/api/items", token)

    async def give_up():
        task = asyncio.ensure_future(auth.authenticate(dpop_request(client, token, proof=cancelled), ()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(give_up())
    assert len(auth.replay) == 0
    valkey.hang = False
    for proof in (timed_out, cancelled):
        assert isinstance(resolve(auth.authenticate(dpop_request(client, token, proof=proof), ())),
                          Identity)
        result = auth.authenticate(dpop_request(client, token, proof=proof), ())
        assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"


def test_reject_outage_with_the_instance_table_of_several_workers(tmp_path, key, client,
                                                                  monkeypatch):
    from stellagw.auth import replay as replay_module
    monkeypatch.setattr(replay_module, "_instance_table", None)
    replay_module.share_across_workers(1000)
    valkey = FakeValkey()
    a = make_authenticator(tmp_path, [key], REJECT, valkey=valkey)
    b = make_authenticator(tmp_path, [key], REJECT, valkey=valkey)
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    valkey.down = True
    assert resolve(a.authenticate(dpop_request(client, token, proof=proof), ())).status == 503
    valkey.down = False
    assert isinstance(resolve(b.authenticate(dpop_request(client, token, proof=proof), ())),
                      Identity)
    for auth in (a, b):
        auth._valkey_down_until = 0.0
        result = auth.authenticate(dpop_request(client, token, proof=proof), ())
        assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"


def test_local_policy_keeps_a_fallback_proof_spent_after_recovery(tmp_path, key, client):
    valkey = FakeValkey()
    valkey.down = True
    auth = make_authenticator(tmp_path, [key], valkey=valkey)          # default: local
    token = token_for(key, client)
    proof = client.proof("GET", "https://gw.example.com/api/items", token)
    assert isinstance(resolve(auth.authenticate(dpop_request(client, token, proof=proof), ())),
                      Identity)
    valkey.down = False
    auth._valkey_down_until = 0.0
    result = resolve(auth.authenticate(dpop_request(client, token, proof=proof), ()))
    assert isinstance(result, AuthFailure) and result.reason == "dpop_replay"


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
