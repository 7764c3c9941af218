"""The Authority's keys: discovery + JWKS from a real loopback HTTP server (stdlib
http.server in a thread), unknown-kid refetch (single flight, rate-limited), last good keys
kept while the Authority is down, not ready until keys load. (docs/security.md §3b
"Key rotation" row, docs/design.md §4.)
"""
from __future__ import annotations

import asyncio
import time

import pytest

from stellagw.auth import AuthFailure, Authenticator, Identity
from stellagw.auth.keys import KeysError, parse_jwks

from tests.support.auth import (Events, ListLog, LoopbackAuthority, SigningKey, bearer_request,
                                mint_token, no_proxy_env, settings)

ALGS = ("ES256", "RS256", "PS256", "EdDSA")


@pytest.fixture
def authority(monkeypatch):
    no_proxy_env(monkeypatch)
    server = LoopbackAuthority(SigningKey("ES256", kid="k1"))
    yield server
    server.close()


def new_auth(authority, extra=""):
    s = settings(f'authority: "{authority.issuer}"\n{extra}')
    log, events = ListLog(), Events()
    auth = Authenticator(s, log, events, clock=time.time)
    auth.test_log, auth.test_events = log, events
    return auth


def token_for(authority, key):
    return mint_token(key, authority.issuer, now=time.time())


def run(coro):
    return asyncio.run(coro)


def test_discovery_then_jwks(authority):
    auth = new_auth(authority)

    async def main():
        assert auth.ready_reasons() and auth.ready_reasons()[0].startswith("no Authority keys yet: ")
        await auth.start()
        try:
            assert auth.ready_reasons() == []
            result = auth.authenticate(bearer_request(token_for(authority, authority.keys[0])), ())
            assert isinstance(result, Identity)
        finally:
            auth.stop()
    run(main())
    assert authority.discovery_requests == 1 and authority.jwks_requests == 1


def test_not_ready_until_keys_load(authority):
    authority.down = True
    auth = new_auth(authority, 'keysMinRefetchInterval: "1s"')

    async def main():
        await auth.start()
        try:
            reasons = auth.ready_reasons()
            assert len(reasons) == 1 and reasons[0].startswith("no Authority keys yet: ")
            assert "503" in reasons[0]
            # A token meanwhile: the keys are not there, so 503 rather than "bad token".
            result = auth.authenticate(bearer_request(token_for(authority, authority.keys[0])), ())
            assert isinstance(result, AuthFailure) and result.status == 503
            authority.down = False
            for _ in range(40):              # the retry loop runs every ~1 s until loaded
                await asyncio.sleep(0.1)
                if not auth.ready_reasons():
                    break
            assert auth.ready_reasons() == []
        finally:
            auth.stop()
    run(main())
    assert auth.test_events.counts.get("keys_refresh_failed", 0) >= 1


def test_discovery_issuer_must_match(authority):
    authority.wrong_issuer = True
    auth = new_auth(authority)

    async def main():
        await auth.start()
        auth.stop()
    run(main())
    assert "different issuer" in auth.ready_reasons()[0]
    assert authority.jwks_requests == 0


def test_unknown_kid_triggers_one_refetch(authority):
    auth = new_auth(authority)
    rotated = SigningKey("ES256", kid="k2")

    async def main():
        await auth.start()
        try:
            authority.keys.append(rotated)          # the Authority rotates
            result = auth.authenticate(bearer_request(token_for(authority, rotated)), ())
            assert not isinstance(result, (Identity, AuthFailure))   # it has to wait
            assert isinstance(await result, Identity)
            # Now known: synchronous again.
            assert isinstance(auth.authenticate(bearer_request(token_for(authority, rotated)), ()), Identity)
        finally:
            auth.stop()
    run(main())
    assert authority.jwks_requests == 2
    assert auth.test_events.counts["keys_refetch_unknown_kid"] == 1


def test_unknown_kid_refetch_is_single_flight(authority):
    authority.delay = 0.3
    auth = new_auth(authority)
    rotated = SigningKey("ES256", kid="k2")

    async def main():
        await auth.start()
        try:
            authority.keys.append(rotated)
            pending = [auth.authenticate(bearer_request(token_for(authority, rotated)), ())
                       for _ in range(20)]
            results = await asyncio.gather(*pending)
            assert all(isinstance(r, Identity) for r in results)
        finally:
            auth.stop()
    run(main())
    assert authority.jwks_requests == 2          # startup + one refetch for twenty requests


def test_unknown_kid_refetch_is_rate_limited(authority):
    auth = new_auth(authority, 'keysMinRefetchInterval: "30s"')
    never = SigningKey("ES256", kid="nope")

    async def main():
        await auth.start()
        try:
            first = auth.authenticate(bearer_request(token_for(authority, never)), ())
            result = await first                  # one refetch happens ...
            assert isinstance(result, AuthFailure) and result.reason == "unknown_kid"
            for _ in range(5):                    # ... then unknown kids fail at once
                again = auth.authenticate(bearer_request(token_for(authority, never)), ())
                assert isinstance(again, AuthFailure) and again.reason == "unknown_kid"
        finally:
            auth.stop()
    run(main())
    assert authority.jwks_requests == 2
    assert auth.test_events.counts["keys_refetch_rate_limited"] == 5


def test_last_good_keys_kept_while_the_authority_is_down(authority):
    auth = new_auth(authority)
    key = authority.keys[0]

    async def main():
        await auth.start()
        try:
            authority.down = True
            changed = await auth.keys._single_flight()
            assert changed is False
            assert auth.ready_reasons() == []
            result = auth.authenticate(bearer_request(token_for(authority, key)), ())
            assert isinstance(result, Identity)
        finally:
            auth.stop()
    run(main())
    assert auth.test_events.counts["keys_refresh_failed"] == 1
    warnings = [r for r in auth.test_log.records if r["message"] == "Authority keys refresh failed"]
    assert warnings and warnings[0]["keptKeys"] == 1 and "503" in warnings[0]["error"]


@pytest.mark.parametrize("head", [False, True], ids=["body", "head"])
def test_a_trickling_authority_is_given_up_within_the_fetch_timeout(authority, head):
    # The socket timeout bounds each read, not a body: an Authority (or a proxy before it)
    # sending a byte every 0.2 s would have held the refetch for a minute here — and every
    # request with an unknown kid waiting on it, with no deadline of its own. The status
    # line and headers too are read before any body deadline: a head sent that way held the
    # fetch (single flight) for as long as it lasted, and every later refresh with it, so a
    # rotated key was never picked up (an adversarial probe: still fetching after 8 s with a
    # 1 s timeout).
    auth = new_auth(authority, 'keysFetchTimeout: "1s"\nkeysMinRefetchInterval: "1s"')
    key = authority.keys[0]
    rotated = SigningKey("ES256", kid="k2")

    async def main():
        await auth.start()
        try:
            authority.drip, authority.drip_head = 0.2, head
            authority.keys.append(rotated)
            t0 = time.monotonic()
            waiting = [auth.authenticate(bearer_request(token_for(authority, rotated)), ())
                       for _ in range(5)]
            results = await asyncio.wait_for(asyncio.gather(*waiting), 10)
            # The fetch failed: the kid may be the Authority's all the same, so 503, not 401.
            assert all(isinstance(r, AuthFailure) and r.reason == "keys_unavailable" for r in results)
            assert time.monotonic() - t0 < 3            # the fetch's 1 s, and some slack
            # The last good keys still serve.
            assert isinstance(auth.authenticate(bearer_request(token_for(authority, key)), ()),
                              Identity)
            # The fetch is over, so the next one (after keysMinRefetchInterval) can run.
            authority.drip = 0.0
            await asyncio.sleep(1.1)
            pending = auth.authenticate(bearer_request(token_for(authority, rotated)), ())
            assert isinstance(await asyncio.wait_for(pending, 5), Identity)
        finally:
            auth.stop()
    run(main())
    warnings = [r for r in auth.test_log.records if r["message"] == "Authority keys refresh failed"]
    assert warnings and "keysFetchTimeout" in warnings[0]["error"]


def test_keys_are_parsed_off_the_loop(authority, monkeypatch):
    # A JWKS is up to 1 MiB: 2,600 RSA keys took 130 ms to parse and fingerprint, a stall
    # of every request on the worker when it ran on the loop (an adversarial probe).
    import threading
    from stellagw.auth import keys as keys_module
    threads = []
    real = keys_module.parse_jwks
    monkeypatch.setattr(keys_module, "parse_jwks",
                        lambda *a: threads.append(threading.current_thread()) or real(*a))
    auth = new_auth(authority)

    async def main():
        await auth.start()
        try:
            assert auth.ready_reasons() == []
            assert isinstance(auth.authenticate(
                bearer_request(token_for(authority, authority.keys[0])), ()), Identity)
        finally:
            auth.stop()
    run(main())
    assert threads and threading.main_thread() not in threads


def test_scheduled_refresh_picks_up_rotation(authority):
    auth = new_auth(authority, 'keysRefreshInterval: "1s"')
    rotated = SigningKey("ES256", kid="k2")

    async def main():
        await auth.start()
        try:
            authority.keys = [rotated]
            for _ in range(40):
                await asyncio.sleep(0.1)
                if auth.keys.get("k2") is not None:
                    break
            assert auth.keys.get("k2") is not None and auth.keys.get("k1") is None
        finally:
            auth.stop()
    run(main())


def test_authority_rsa_keys_that_make_a_signature_check_costly_are_skipped():
    # Every token naming such a key would cost its check (a 3000-bit exponent: 5.8 ms),
    # garbage signatures included; the same bounds as a DPoP proof's key (jose.py).
    from tests.support.auth import b64u
    good = SigningKey("ES256", kid="good")
    n = SigningKey("RS256", kid="x").public_jwk["n"]
    odd = {"kty": "RSA", "kid": "big-e", "n": n, "e": b64u(((1 << 31) + 1).to_bytes(4, "big"))}
    keys = parse_jwks({"keys": [odd, good.public_jwk]}, ALGS)
    assert [k.kid for k in keys] == ["good"]


def test_jwks_filtering():
    ec = SigningKey("ES256", kid="ec")
    rsa_small = SigningKey("RS256", kid="small", bits=1024)
    private = SigningKey("ES256", kid="priv")
    enc = SigningKey("ES256", kid="enc")
    doc = {"keys": [
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        dict(private.private_jwk, kid="priv"),
        dict(enc.public_jwk, use="enc"),
        rsa_small.public_jwk,
        dict(ec.public_jwk, alg="ES256"),
        dict(SigningKey("ES256").public_jwk, kid="ec"),     # duplicate kid: first wins
        "not a key",
    ]}
    keys = parse_jwks(doc, ALGS)
    assert [(k.kid, k.algorithms) for k in keys] == [("ec", ("ES256",))]
    with pytest.raises(KeysError):
        parse_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}, ALGS)
    with pytest.raises(KeysError):
        parse_jwks({"nokeys": []}, ALGS)
    # An RSA key serves the configured RSA algorithms only; its own "alg" narrows further.
    rsa = SigningKey("RS256", kid="r")
    assert parse_jwks({"keys": [rsa.public_jwk]}, ALGS)[0].algorithms == ("RS256", "PS256")
    assert parse_jwks({"keys": [dict(rsa.public_jwk, alg="PS256")]}, ALGS)[0].algorithms == ("PS256",)


def test_static_jwks_file_needs_no_network(tmp_path):
    key = SigningKey("ES256", kid="f1")
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [%s]}' % __import__("json").dumps(key.public_jwk))
    s = settings(f'authority: "https://authority.example"\njwksPath: "{path}"')
    auth = Authenticator(s, ListLog(), clock=time.time)

    async def main():
        await auth.start()
        auth.stop()
    run(main())
    assert auth.ready_reasons() == []
    assert isinstance(auth.authenticate(bearer_request(
        mint_token(key, "https://authority.example", now=time.time())), ()), Identity)


def test_missing_jwks_file_is_a_ready_reason(tmp_path):
    s = settings(f'authority: "https://authority.example"\njwksPath: "{tmp_path}/none.json"')
    auth = Authenticator(s, ListLog(), clock=time.time)

    async def main():
        await auth.start()
        auth.stop()
    run(main())
    assert "cannot read" in auth.ready_reasons()[0]


def test_an_unknown_kid_while_the_authority_is_down_is_503_and_retried_soon(authority):
    # docs/security.md §3d ("Authority restarting with rotated keys"): a token signed with a
    # new key reached the gateway while the Authority's JWKS could not be fetched (a replica
    # restarting behind its address). The refetch failed, the token was refused 401
    # invalid_token (a client then throws a good token away), and every token with that
    # key got 401 at once for keysMinRefetchInterval (30 s), the Authority back or not.
    auth = new_auth(authority, 'keysMinRefetchInterval: "30s"')
    rotated = SigningKey("ES256", kid="k2")

    async def main():
        await auth.start()
        try:
            authority.keys.append(rotated)
            authority.down = True
            first = await auth.authenticate(bearer_request(token_for(authority, rotated)), ())
            assert isinstance(first, AuthFailure) and (first.status, first.reason) == (503, "keys_unavailable")
            # The Authority still down: 503 at once, not "bad token".
            again = auth.authenticate(bearer_request(token_for(authority, rotated)), ())
            assert isinstance(again, AuthFailure) and again.status == 503
            authority.down = False
            await asyncio.sleep(1.1)          # a failed fetch is tried again after 1 s
            result = auth.authenticate(bearer_request(token_for(authority, rotated)), ())
            if not isinstance(result, (Identity, AuthFailure)):
                result = await result
            assert isinstance(result, Identity)
            # A kid the Authority does not have, once it answers: 401 as before.
            never = auth.authenticate(bearer_request(token_for(authority, SigningKey("ES256", kid="nope"))), ())
            assert isinstance(never, AuthFailure) and (never.status, never.reason) == (401, "unknown_kid")
        finally:
            auth.stop()
    run(main())


def test_failed_refetches_in_a_row_back_off_to_the_min_refetch_interval(authority):
    # The 1 s retry after a failed fetch (docs/security.md §3d, "Authority restarting with
    # rotated keys") doubles with each failure in a row: a long outage is asked no more
    # often than keysMinRefetchInterval, whatever clients with unknown kids send.
    from stellagw.auth.keys import KeyStore
    now = [0.0]
    store = KeyStore(authority=authority.issuer, jwks_path="", algorithms=ALGS,
                     refresh_interval=300, min_refetch_interval=5.0, clock=lambda: now[0])

    async def main():
        authority.down = True
        fetched = []
        for t in [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 7.0, 12.0, 16.0, 17.0]:
            now[0] = t
            pending = store.request_refetch()
            if pending is not None:
                fetched.append(t)
                await pending
        return fetched
    # Waits of 1, 2, 4, then 5 s (the interval).
    assert run(main()) == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0]
