"""WebSocket passthrough with a real client (picows ws_connect) through the gateway to an
SDK service in its own process."""
from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

import orjson
import pytest
from picows import WSListener, WSMsgType, ws_connect

from tests.support.gwtest import ROOT, GatewayThread, request, settings_from, wait_for

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


class Client(WSListener):
    def __init__(self):
        self.messages: asyncio.Queue = asyncio.Queue()
        self.close_code = None

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = frame.get_close_code()
            self.messages.put_nowait(("close", int(self.close_code) if self.close_code else None))
            transport.disconnect()
            return
        kind = "text" if frame.msg_type == WSMsgType.TEXT else "binary"
        self.messages.put_nowait((kind, frame.get_payload_as_bytes(), frame.fin))

    def on_ws_disconnected(self, transport):
        self.messages.put_nowait(("disconnected",))


@pytest.fixture(scope="module")
def gateway():
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    svc = subprocess.Popen([sys.executable, "-m", "tests.support.services", "--name", "wsv", "--gateway",
                            f"127.0.0.1:{gw.transport_port}"], cwd=ROOT)
    assert wait_for(lambda: request(gw.port, b"GET /t/wsv/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200, 15)
    yield gw, svc
    svc.terminate()
    svc.wait(10)
    gw.stop()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def connect(port, path="/t/wsv/ws", **kw):
    return await ws_connect(Client, f"ws://127.0.0.1:{port}{path}", **kw)


async def message(client, timeout=10):
    """The next whole message (fragments joined)."""
    parts = []
    while True:
        item = await asyncio.wait_for(client.messages.get(), timeout)
        if item[0] in ("close", "disconnected"):
            return item
        parts.append(item[1])
        if item[2]:
            return item[0], b"".join(parts)


def test_echo_text_and_binary(gateway):
    gw, _ = gateway

    async def main():
        transport, client = await connect(gw.port)
        transport.send(WSMsgType.TEXT, b"hello")
        assert await message(client) == ("text", b"hello")
        transport.send(WSMsgType.BINARY, b"\x00\x01\x02")
        assert await message(client) == ("binary", b"\x00\x01\x02")
        transport.send_close()
        transport.disconnect()
    run(main())


def test_large_fragmented_messages_both_ways(gateway):
    gw, _ = gateway
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def main():
        transport, client = await connect(gw.port)
        # Client → service in fragments; the gateway keeps fragmentation and the window.
        step = 200_000
        for i in range(0, len(payload), step):
            part = payload[i:i + step]
            first, last = i == 0, i + step >= len(payload)
            transport.send(WSMsgType.BINARY if first else WSMsgType.CONTINUATION, part, fin=last)
        kind, echoed = await message(client, 20)
        # a close in place of the message says its code (this failed twice in full runs)
        assert kind == "binary", (kind, echoed)
        assert echoed == payload, (len(echoed), len(payload))
        transport.send(WSMsgType.TEXT, b"big-5000000")
        kind, big = await message(client, 20)
        assert kind == "binary", (kind, big if kind != "binary" else None)
        assert big == b"b" * 5_000_000, len(big)
        transport.send_close()
        transport.disconnect()
    run(main())


class SlowClient(Client):
    """Reads like a client on a slow network: reading paused a few ms after every frame, and a
    small receive buffer, so the gateway's writes to it queue up and its flow control runs."""

    def on_ws_frame(self, transport, frame):
        super().on_ws_frame(transport, frame)
        tr = transport.underlying_transport
        tr.pause_reading()
        asyncio.get_running_loop().call_later(0.003, tr.resume_reading)


def small_receive_buffer(url):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.setblocking(False)
    return sock


def test_a_slow_client_gets_every_byte_and_may_send_frames_larger_than_the_window(gateway):
    gw, _ = gateway
    upload = os.urandom(600_000)     # one frame: more than the service's 256 KiB window

    async def main():
        transport, client = await ws_connect(SlowClient, f"ws://127.0.0.1:{gw.port}/t/wsv/ws",
                                             socket_factory=small_receive_buffer,
                                             max_frame_size=16 << 20)
        transport.send(WSMsgType.BINARY, upload)
        kind, echoed = await message(client, 20)
        assert kind == "binary", (kind, echoed)
        assert echoed == upload, (len(echoed), len(upload))
        transport.send(WSMsgType.TEXT, b"big-3000000")
        kind, big = await message(client, 20)
        assert kind == "binary", (kind, big if kind != "binary" else None)
        assert big == b"b" * 3_000_000, len(big)
        transport.send_close()
        transport.disconnect()
    run(main())


def test_service_closes_with_its_code(gateway):
    gw, _ = gateway

    async def main():
        transport, client = await connect(gw.port)
        transport.send(WSMsgType.TEXT, b"close-4001")
        assert await message(client) == ("close", 4001)
    run(main())


def test_upgrade_refused_where_the_endpoint_is_not_a_websocket(gateway):
    gw, _ = gateway
    raw = (b"GET /t/wsv/whoami HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status, headers, _ = request(gw.port, raw)
    assert status == 400
    status, _, _ = request(gw.port, b"GET /t/wsv/ws HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 426


def test_hundreds_of_concurrent_sockets(gateway):
    gw, _ = gateway

    async def one(i):
        transport, client = await connect(gw.port)
        for j in range(3):
            transport.send(WSMsgType.TEXT, b"m-%d-%d" % (i, j))
            assert await message(client) == ("text", b"m-%d-%d" % (i, j))
        transport.send_close()
        transport.disconnect()

    async def main():
        await asyncio.gather(*(one(i) for i in range(300)))
    run(main())


def test_client_going_away_cancels_and_a_killed_service_closes_1011(tmp_path):
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    svc = subprocess.Popen([sys.executable, "-m", "tests.support.services", "--name", "wsk", "--gateway",
                            f"127.0.0.1:{gw.transport_port}"], cwd=ROOT)
    try:
        assert wait_for(lambda: request(gw.port, b"GET /t/wsk/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200, 15)

        async def main():
            # The client vanishing leaves nothing in flight at the gateway.
            transport, client = await connect(gw.port, "/t/wsk/ws")
            transport.send(WSMsgType.TEXT, b"x")
            assert await message(client) == ("text", b"x")
            transport.disconnect(graceful=False)
            await asyncio.sleep(0.3)
            inflight = gw.call(lambda: sum(len(c.inflight) for c in gw.worker.hub.connections))
            assert inflight == 0
            # The service dying mid-conversation: 1011 to the client.
            transport, client = await connect(gw.port, "/t/wsk/ws")
            transport.send(WSMsgType.TEXT, b"crash")
            assert await message(client) == ("close", 1011)
        run(main())
    finally:
        svc.kill()
        svc.wait(10)
        gw.stop()


@contextlib.contextmanager
def _a_client_reading_nothing(config, service, times):
    """A gateway (GatewayThread) from `config` and a `service` test service; a WebSocket
    client that asks the service, `times` over, for 3 MB and then reads none of it."""
    gw = GatewayThread(settings_from(config)).start()
    svc = subprocess.Popen([sys.executable, "-m", "tests.support.services", "--name", service,
                            "--gateway", f"127.0.0.1:{gw.transport_port}"], cwd=ROOT)
    s = socket.socket()
    try:
        whoami = b"GET /t/%s/whoami HTTP/1.1\r\nHost: gw\r\n\r\n" % service.encode()
        assert wait_for(lambda: request(gw.port, whoami)[0] == 200, 15)
        _upgrade_and_read_nothing(s, gw.port, service, times)
        yield gw
    finally:
        s.close()
        svc.terminate()
        svc.wait(10)
        gw.stop()


def _upgrade_and_read_nothing(s, port, service, times):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    s.sendall(b"GET /t/%s/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
              b"Sec-WebSocket-Version: 13\r\n\r\n" % service.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)           # byte by byte: nothing past the 101 is read
    assert head.startswith(b"HTTP/1.1 101"), head
    mask, text = b"\x01\x02\x03\x04", b"big-3000000"
    s.sendall((b"\x81" + bytes([0x80 | len(text)]) + mask
               + bytes(c ^ mask[i % 4] for i, c in enumerate(text))) * times)


def test_a_websocket_client_that_reads_nothing_is_cut_after_its_close(tmp_path):
    # The service sends 3 MB to a client that reads none of it: credit stops, the WebSocket
    # goes idle (streamIdleTimeout) and is closed — and picows' close waits for the bytes
    # still owed. Without gateway.http.sendTimeout the connection, its buffer and its
    # place (websockets_open, maxConnectionsPerClient) stayed until the client left.
    with _a_client_reading_nothing("gateway: {http: {port: 0, sendTimeout: 2s},"
                                   " routing: {streamIdleTimeout: 1s}}", "wsr", 1) as gw:
        assert wait_for(lambda: gw.call(lambda: gw.worker.websockets_open) == 1, 5)
        # Idle after 1 s, closed, then cut 2 s later: gone well within 15 s.
        assert wait_for(lambda: gw.call(lambda: gw.worker.websockets_open) == 0, 15)
        assert gw.call(lambda: dict(gw.worker.aborted_connections)) == {"send_timeout": 1}
        assert gw.call(lambda: dict(gw.worker.per_client)) == {}
        assert wait_for(lambda: gw.call(lambda: sum(len(c.inflight) for c in gw.worker.hub.connections)) == 0, 5)


def test_an_open_websocket_whose_client_stops_reading_is_cut_after_send_timeout(tmp_path):
    # The client keeps its WebSocket open and reads nothing of what the service sends. The
    # send deadline was armed only at the close, so the connection, its buffers and the
    # service's handler were held until streamIdleTimeout (5 minutes by default) — and a
    # client reading a little now and then never went idle. Armed at pause_writing, as an
    # HTTP client's is: cut after sendTimeout, and the service is told (CANCEL).
    # 30 MB: past what the kernel's send buffer takes (it grows to a few MB on loopback),
    # so the transport's own buffer fills and pauses writing.
    with _a_client_reading_nothing("gateway: {http: {port: 0, sendTimeout: 2s}}", "wsn",
                                   10) as gw:
        assert wait_for(lambda: gw.call(lambda: gw.worker.websockets_open) == 1, 5)
        # Paused for writing at once, cut 2 s later (idle only after 5 minutes).
        assert wait_for(lambda: gw.call(lambda: gw.worker.websockets_open) == 0, 10)
        assert gw.call(lambda: dict(gw.worker.aborted_connections)) == {"send_timeout": 1}
        assert gw.call(lambda: dict(gw.worker.per_client)) == {}

        def service_cancelled():
            body = request(gw.port, b"GET /t/wsn/events HTTP/1.1\r\nHost: gw\r\n\r\n")[2]
            return len(orjson.loads(body)["cancelled"]) == 1
        assert wait_for(service_cancelled, 5)


def test_websockets_whose_clients_read_nothing_count_against_the_response_buffer_budget(tmp_path):
    # What a service's window still lets in while its WebSocket client takes nothing waits in
    # the worker (~270 KB a WebSocket here, with a few MB more in the kernel): a thousand such
    # clients held hundreds of MB until sendTimeout. They count against responseBufferBudget
    # as an HTTP client's answers do: past it the ones owing the most are reset, their
    # services told (CANCEL), and what the rest hold fits the budget.
    with _a_client_reading_nothing("gateway: {http: {port: 0, responseBufferBudget: 1MB}}",
                                   "wsb", 10) as gw:
        others = [socket.socket() for _ in range(5)]
        try:
            for s in others:
                _upgrade_and_read_nothing(s, gw.port, "wsb", 10)

            def held():
                return gw.call(lambda: (len(gw.worker.backlogged), gw.worker.backlog_total,
                                        gw.worker.websockets_open,
                                        gw.worker.aborted_connections.get("buffer_budget", 0)))
            # sendTimeout is 60 s: the budget, not the deadline, cuts them.
            assert wait_for(lambda: held()[3] >= 1 and held()[0] + held()[3] == 6, 15), held()
            paused, total, open_, cut = held()
            assert total <= 1024 * 1024 and paused >= 2 and open_ == 6 - cut, held()
            assert gw.call(lambda: set(gw.worker.aborted_connections)) == {"buffer_budget"}

            def services_cancelled():
                body = request(gw.port, b"GET /t/wsb/events HTTP/1.1\r\nHost: gw\r\n\r\n")[2]
                return len(orjson.loads(body)["cancelled"]) == cut
            assert wait_for(services_cancelled, 5)
        finally:
            for s in others:
                s.close()
        assert wait_for(lambda: gw.call(lambda: (gw.worker.websockets_open,
                                                 dict(gw.worker.backlogged),
                                                 gw.worker.backlog_total)) == (0, {}, 0), 10)


def test_a_draining_gateway_keeps_websockets_until_its_deadline_then_closes_1001():
    # docs/operations.md §4 and docs/security.md §3d ("WebSockets at the drain"): picows
    # holds a WebSocket's connection, not the worker's HTTP connections, so the drain
    # ended as soon as the HTTP connections had — every WebSocket cut at once with 1011
    # "service unavailable", as if its service had died, and `stopped` said unfinished 0.
    from tests.support.gwtest import NullLog
    logs = NullLog()
    gw = GatewayThread(settings_from(
        "gateway: {node: {nodeId: gw-a}, http: {port: 0, shutdownTimeout: 1500ms}}"),
                       log=logs.log).start()
    # A second gateway (another node: the SDK keeps one link per gateway node) to ask the
    # service what it saw once the first has stopped.
    other = GatewayThread(settings_from("gateway: {node: {nodeId: gw-b}, http: {port: 0}}")).start()
    svc = subprocess.Popen([sys.executable, "-m", "tests.support.services", "--name", "wsd",
                            "--gateway", f"127.0.0.1:{gw.transport_port}",
                            "--gateway", f"127.0.0.1:{other.transport_port}"], cwd=ROOT)
    try:
        for port in (gw.port, other.port):
            assert wait_for(lambda: request(port, b"GET /t/wsd/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200, 15)

        async def main():
            transport, client = await connect(gw.port, "/t/wsd/ws")
            transport.send(WSMsgType.TEXT, b"before")
            assert await message(client) == ("text", b"before")
            drained = gw.drain(wait=False)
            await asyncio.sleep(0.3)
            # Draining, before the deadline: the conversation goes on.
            transport.send(WSMsgType.TEXT, b"during")
            assert await message(client) == ("text", b"during")
            # At the deadline: going away, the client's cue to reconnect elsewhere.
            assert await message(client) == ("close", 1001)
            await asyncio.wrap_future(drained)
        run(main())
        # The service's handler was cancelled (CANCEL Shutdown), seen through the other gateway.
        body = request(other.port, b"GET /t/wsd/events HTTP/1.1\r\nHost: gw\r\n\r\n")[2]
        assert len(orjson.loads(body)["cancelled"]) == 1
        stopped = [orjson.loads(line) for line in logs.lines() if b'"stopped"' in line]
        assert stopped[0]["unfinished"] == 1
    finally:
        svc.terminate()
        svc.wait(10)
        other.stop()
        gw.stop()


def test_open_websockets_count_as_client_connections(gateway):
    # docs/security.md §3d ("WebSockets at the drain"): an upgraded connection left
    # gateway_active_connections{service="ingress"} at the 101, so a worker holding
    # WebSockets showed no clients (they count against maxConnections all along).
    gw, _ = gateway

    def ingress():
        return gw.call(lambda: (gw.worker.metrics.active_connections.get("ingress", 0),
                                gw.worker.websockets_open))
    assert wait_for(lambda: ingress() == (0, 0), 5), ingress()

    async def main():
        opened = [await connect(gw.port) for _ in range(3)]
        assert wait_for(lambda: ingress() == (3, 3), 5), ingress()
        for transport, _ in opened:
            transport.disconnect()
    run(main())
    assert wait_for(lambda: ingress() == (0, 0), 5), ingress()


def test_a_service_that_drains_then_closes_ends_its_websockets_with_1001():
    # docs/security.md §3d ("WebSockets at the drain"), the service's side: a service
    # that sent DRAIN and closed its link with WebSockets still open (its shutdown's
    # deadline) had them closed 1011 "service unavailable", as for a crash.
    from stellagw.service import Service
    from tests.support.servicepeer import SdkThread
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    svc = Service("wsgo", gateways=[f"127.0.0.1:{gw.transport_port}"])

    @svc.websocket("/t/wsgo/ws")
    async def echo(ws):
        async for message in ws:
            await ws.send(message)
    sdk = SdkThread(svc).start()
    try:
        async def main():
            transport, client = await connect(gw.port, "/t/wsgo/ws")
            transport.send(WSMsgType.TEXT, b"hi")
            assert await message(client) == ("text", b"hi")
            # The service stops: DRAIN, its handlers get 0.3 s, then its links close.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                svc.stop(timeout=0.3), sdk.loop))
            assert await message(client) == ("close", 1001)
        run(main())
    finally:
        sdk.loop.call_soon_threadsafe(sdk.loop.stop)
        gw.stop()
