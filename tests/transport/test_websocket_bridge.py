"""transport/websocket.py (WsBridge), service → client, on a real uvloop transport whose socket
cannot take a burst: every frame must reach the client as it was sent, header and payload.

picows' WSTransport.send hands a uvloop transport a view of its reusable header buffer for
payloads over 8192 bytes; queued behind a full socket, that view was overwritten by the next
frame's header (a 5 MB message cut short, the rest garbage: see _send_frame). Here the
socket's buffers are a few KiB and the client reads nothing until every frame is sent, so
each frame after the first waits in the transport: the interleaving that corrupted the
frames is certain, not a race. The client side is a plain socket and the frames are parsed
here, so nothing between the gateway's writes and the assertions can repair or hide them.
"""
from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from types import SimpleNamespace

import pytest
import uvloop

from stellagw.ingress.websocket import hand_over
from stellagw.transport import frame as fr
from stellagw.transport.websocket import WsBridge

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

MORE = fr.FLAG_MORE

# (flags, payload) as RESPONSE_STREAM_DATA would carry them, chosen so that consecutive frames
# have different header sizes and bytes: 10-byte headers (65536, 70000), 4-byte (30000, 8193)
# — those went through picows' writelines — and 2-byte (100, the 17-byte tail of the failed
# test's echo), which picows copied into the same buffer.
MESSAGES = [
    [(fr.KIND_BINARY | MORE, b"A" * 65536), (fr.KIND_DATA | MORE, b"B" * 65536),
     (fr.KIND_DATA | MORE, b"C" * 65536), (fr.KIND_DATA | MORE, b"D" * 30000),
     (fr.KIND_DATA | MORE, b"E" * 65536), (fr.KIND_DATA, b"F" * 100)],
    [(fr.KIND_TEXT, b"t" * 70000)],
    [(fr.KIND_BINARY | MORE, os.urandom(65536)), (fr.KIND_DATA | MORE, os.urandom(8193)),
     (fr.KIND_DATA | MORE, os.urandom(65536)), (fr.KIND_DATA, os.urandom(17))],
    [(fr.KIND_TEXT, b"small")],
]
OPCODE = {fr.KIND_TEXT: 1, fr.KIND_BINARY: 2, fr.KIND_DATA: 0}


class Conn:
    """What WsBridge calls on its ServiceConnection while it writes to the client."""

    def __init__(self):
        self.writable = 0
        self.gone = 0

    def ws_client_writable(self, pending):
        self.writable += 1

    def ws_client_gone(self, pending):
        self.gone += 1


def header_size(n):
    return 2 if n < 126 else 4 if n < 65536 else 10


def parse_frames(data):
    """Server frames (unmasked) as (fin, opcode, payload); stops at the first impossible header."""
    frames, pos = [], 0
    while pos + 2 <= len(data):
        b0, b1 = data[pos], data[pos + 1]
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = struct.unpack_from("!H", data, pos)[0], pos + 2
        elif n == 127:
            n, pos = struct.unpack_from("!Q", data, pos)[0], pos + 8
        if b0 & 0x70 or b1 & 0x80 or pos + n > len(data):
            frames.append(("bad header", data[pos - 10:pos].hex()))
            break
        frames.append((bool(b0 & 0x80), b0 & 0x0F, data[pos:pos + n]))
        pos += n
    return frames


def read_exactly(sock, n):
    out = bytearray()
    while len(out) < n:
        got = sock.recv(min(n - len(out), 1 << 16))
        if not got:
            break
        out += got
    return bytes(out)


def test_frames_queued_behind_a_full_socket_reach_the_client_intact():
    expected = [(not flags & MORE, OPCODE[flags & fr.STREAM_KIND_MASK], chunk)
                for message in MESSAGES for flags, chunk in message]
    wire_size = sum(header_size(len(chunk)) + len(chunk) for _, _, chunk in expected)

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    # Small buffers on both ends (set before connecting, so the window is small from the
    # start): the kernel holds a few KiB, far less than the first two frames.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    key = base64.b64encode(os.urandom(16))
    req = SimpleNamespace(target=b"/ws", query=b"", headers=[
        (b"Host", b"gw"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", b"13")])
    conn = Conn()
    bridge = WsBridge(conn, None)

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_sock)
        # The gateway's own hand-over: picows' server protocol on our uvloop transport.
        hand_over(SimpleNamespace(transport=transport), req, bridge, b"")
        assert bridge.ws is not None, "picows did not accept the upgrade"
        for message in MESSAGES:
            for flags, chunk in message:
                assert bridge.from_service(flags, chunk)
        # What makes the test certain: the frames are waiting in the transport, behind a
        # socket that has not taken them.
        queued = transport.get_write_buffer_size()
        assert queued > wire_size - 65536, (queued, wire_size)

        def read():
            head = b""
            while b"\r\n\r\n" not in head:
                got = client.recv(1)
                assert got, "closed before the 101"
                head += got
            assert head.startswith(b"HTTP/1.1 101"), head
            client.settimeout(10)
            return read_exactly(client, wire_size)
        data = await loop.run_in_executor(None, read)
        bridge.ws.disconnect()
        await asyncio.sleep(0.01)
        return data

    try:
        data = uvloop.run(main())
    finally:
        client.close()
    frames = parse_frames(data)
    for i, (got, want) in enumerate(zip(frames, expected)):
        assert got[0] != "bad header", (i, got)
        fin, opcode, payload = got
        # Bytes, not lengths: a stale header leaves its old length bytes in the payload.
        assert (fin, opcode, len(payload)) == want[:2] + (len(want[2]),), i
        assert payload == want[2], (i, payload[:16], want[2][:16])
    assert len(frames) == len(expected)
    assert len(data) == wire_size
