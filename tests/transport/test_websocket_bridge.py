"""transport/websocket.py (WsBridge) on a real uvloop transport handed to picows by the
gateway's own hand_over, with a plain socket as the client, so nothing between the bridge and
the assertions can repair or hide what goes over the wire.

Service → client: the socket's buffers are a few KiB and the client reads nothing until
every frame is sent, so each frame after the first waits in the transport. picows'
WSTransport.send hands a uvloop transport a view of its reusable header buffer for payloads
over 8192 bytes, and queued that view was overwritten by the next frame's header (a 5 MB
message cut short, the rest garbage: see _send_frame); here that interleaving is certain,
not a race, and every frame's header and bytes are checked.

Client → service: a client frame larger than the service's window goes out in pieces as
credit comes, instead of waiting for a window the service never grants.
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
    # A message ended by an empty fragment (a service may end one so): the client must get
    # that fragment, or the message never completes. An empty DATA|MORE says nothing.
    [(fr.KIND_BINARY | MORE, b"G" * 20000), (fr.KIND_DATA | MORE, b""), (fr.KIND_DATA, b"")],
    [(fr.KIND_TEXT, b"after")],
]
SKIPPED = [(fr.KIND_DATA | MORE, b"")]
OPCODE = {fr.KIND_TEXT: 1, fr.KIND_BINARY: 2, fr.KIND_DATA: 0}


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
    """n bytes, or what came before the socket closed or went quiet (its timeout)."""
    out = bytearray()
    while len(out) < n:
        try:
            got = sock.recv(min(n - len(out), 1 << 16))
        except TimeoutError:
            break
        if not got:
            break
        out += got
    return bytes(out)


class Link:
    """The ServiceConnection and Pending the bridge sends the client's frames with."""

    def __init__(self, window, max_chunk):
        self.pending = SimpleNamespace(corr=b"\x05" * 16, window=window)
        self.max_chunk = max_chunk      # the largest chunk a frame to the service carries
        self.inflight = {self.pending.corr: self.pending}
        self.sent: list[tuple[int, bytes]] = []     # REQUEST_STREAM_DATA (flags, chunk)
        self.writable = 0
        self.gone = 0
        self.active = 0         # the client's pings and pongs (streamIdleTimeout)
        self.over_high_water = False    # the service has not read what it was sent

    def hold_for_link(self, pending):
        return self.over_high_water

    def send_stream_chunk(self, pending, flags, chunk):
        assert pending is self.pending
        self.sent.append((flags, bytes(chunk)))

    def ws_client_writable(self, pending):
        self.writable += 1

    def ws_client_gone(self, pending):
        self.gone += 1

    def ws_client_active(self, pending):
        self.active += 1


def run_bridge(body, window=256 * 1024, max_chunk=fr.DEFAULT_MAX_FRAME_SIZE - 18):
    """`await body(bridge, link, transport, client)` with the bridge on the gateway's side of a
    loopback connection whose buffers hold a few KiB, after the upgrade. The client is a
    blocking socket (read it in an executor thread); the loop is uvloop, as in the gateway."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    # Small buffers on both ends (set before connecting, so the window is small from the
    # start): the kernel holds a few KiB, far less than one large frame.
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    server_sock, _ = listener.accept()
    listener.close()
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    key = base64.b64encode(os.urandom(16))
    req = SimpleNamespace(target=b"/ws", query=b"", headers=[
        (b"Host", b"gw"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
        (b"Sec-WebSocket-Key", key), (b"Sec-WebSocket-Version", b"13")])
    link = Link(window, max_chunk)
    bridge = WsBridge(link, link.pending)

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, server_sock)
        # The gateway's own hand-over: picows' server protocol on our uvloop transport.
        hand_over(SimpleNamespace(transport=transport), req, bridge, b"")
        assert bridge.ws is not None, "picows did not accept the upgrade"
        try:
            return await body(bridge, link, transport, client)
        finally:
            bridge.ws.disconnect()
            await asyncio.sleep(0.01)

    try:
        return uvloop.run(main())
    finally:
        client.close()


def read_101(client):
    head = b""
    while b"\r\n\r\n" not in head:
        got = client.recv(1)
        assert got, "closed before the 101"
        head += got
    assert head.startswith(b"HTTP/1.1 101"), head


def client_frame(opcode, payload, fin=True):
    """A masked client frame (RFC 6455 §5.3)."""
    n = len(payload)
    head = bytes([opcode | (0x80 if fin else 0)])
    head += (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n)
             if n < 65536 else bytes([0x80 | 127]) + struct.pack("!Q", n))
    mask = os.urandom(4)
    whole = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(n, "big")
    return head + mask + masked


async def wait_until(check, what, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out: {what}"
        await asyncio.sleep(0.005)


def test_frames_queued_behind_a_full_socket_reach_the_client_intact():
    expected = [(not flags & MORE, OPCODE[flags & fr.STREAM_KIND_MASK], chunk)
                for message in MESSAGES for flags, chunk in message
                if (flags, chunk) not in SKIPPED]
    wire_size = sum(header_size(len(chunk)) + len(chunk) for _, _, chunk in expected)

    async def body(bridge, link, transport, client):
        for message in MESSAGES:
            for flags, chunk in message:
                assert bridge.from_service(flags, chunk)
        # What makes the test certain: the frames are waiting in the transport, behind a
        # socket that has not taken them.
        queued = transport.get_write_buffer_size()
        assert queued > wire_size - 65536, (queued, wire_size)

        def read():
            read_101(client)
            client.settimeout(3)
            return read_exactly(client, wire_size)
        return await asyncio.get_running_loop().run_in_executor(None, read)

    data = run_bridge(body)
    frames = parse_frames(data)
    for i, (got, want) in enumerate(zip(frames, expected)):
        assert got[0] != "bad header", (i, got)
        fin, opcode, payload = got
        # Bytes, not lengths: a stale header leaves its old length bytes in the payload.
        assert (fin, opcode, len(payload)) == want[:2] + (len(want[2]),), i
        assert payload == want[2], (i, payload[:16], want[2][:16])
    assert len(frames) == len(expected)
    assert len(data) == wire_size


def test_a_client_frame_larger_than_the_window_goes_in_pieces_as_credit_comes():
    window = 256 * 1024
    first = os.urandom(600_000)          # one frame, more than twice the window
    second = os.urandom(1000)

    async def body(bridge, link, transport, client):
        pending = link.pending
        read_101(client)
        client.sendall(client_frame(2, first, fin=False) + client_frame(0, second))
        await wait_until(lambda: link.sent, "nothing was sent to the service")
        # What the window allows goes at once; the rest waits, and so does the client.
        assert link.sent == [(fr.KIND_BINARY | MORE, first[:window])]
        assert pending.window == 0 and bridge.reading_paused
        steps = []
        for grant in (100_000, window, 400_000):     # WINDOW_UPDATEs, as _credit applies them
            pending.window += grant
            bridge.on_credit()
            await asyncio.sleep(0.01)
            steps.append((list(link.sent), pending.window, bridge.reading_paused))
        return steps

    steps = run_bridge(body, window)
    # 100,000 more: that much of the frame's rest, and the client stays paused.
    sent, _, paused = steps[0]
    assert [(flags, len(chunk)) for flags, chunk in sent] == [
        (fr.KIND_BINARY | MORE, window), (fr.KIND_DATA | MORE, 100_000)]
    assert paused
    # 256 KiB more: the rest of the first frame; it was not the message's last, so MORE.
    sent, _, _ = steps[1]
    assert sent[2] == (fr.KIND_DATA | MORE, first[window + 100_000:])
    # Then the second frame, whole, and the client is read again.
    sent, window_left, paused = steps[2]
    assert [(flags, len(chunk)) for flags, chunk in sent] == [
        (fr.KIND_BINARY | MORE, window), (fr.KIND_DATA | MORE, 100_000),
        (fr.KIND_DATA | MORE, len(first) - window - 100_000), (fr.KIND_DATA, len(second))]
    assert b"".join(chunk for _, chunk in sent) == first + second
    assert not paused
    assert window_left == window + 100_000 + window + 400_000 - len(first) - len(second)


def test_nothing_is_relayed_while_the_link_is_over_high_water_and_the_client_waits():
    # Credit is left, but the link's buffer holds what the service has not read: the
    # client's frames wait (the client is not read) until the link takes more.
    message = os.urandom(10_000)

    async def body(bridge, link, transport, client):
        read_101(client)
        link.over_high_water = True
        client.sendall(client_frame(2, message))
        await wait_until(lambda: bridge.reading_paused, "the client was not paused")
        await asyncio.sleep(0.05)
        held = list(link.sent)
        link.over_high_water = False
        bridge.on_credit()          # what the link's _release_held calls
        return held, list(link.sent), bridge.reading_paused

    held, sent, paused = run_bridge(body)
    assert held == []
    assert sent == [(fr.KIND_BINARY, message)] and not paused


def test_a_client_frame_larger_than_the_services_frames_goes_in_pieces_that_fit():
    """A service that announced max_frame_size 1024 takes stream data of at most 1006
    bytes a frame (docs/protocol.md §1): a longer client frame goes in pieces, MORE on all
    but the last, whatever window there is."""
    first, second = os.urandom(2500), b"short text"

    async def body(bridge, link, transport, client):
        read_101(client)
        client.sendall(client_frame(2, first) + client_frame(1, second)
                       + client_frame(8, struct.pack("!H", 1000) + b"bye"))
        await wait_until(lambda: bridge.closed, "the CLOSE was not handled")
        return list(link.sent)

    sent = run_bridge(body, window=1 << 20, max_chunk=1024 - 18)
    assert [(flags, len(chunk)) for flags, chunk in sent] == [
        (fr.KIND_BINARY | MORE, 1006), (fr.KIND_DATA | MORE, 1006), (fr.KIND_DATA, 488),
        (fr.KIND_TEXT, len(second)), (fr.KIND_CLOSE | fr.FLAG_END_STREAM, 5)]
    assert b"".join(chunk for _, chunk in sent[:3]) == first and sent[3][1] == second


def test_a_client_frame_over_max_message_frame_is_refused_with_1009_and_goes_nowhere():
    """picows holds a client frame whole until it is complete: MAX_MESSAGE_FRAME (1 MiB) is
    what one WebSocket can make the gateway hold beyond the service's window. A frame of
    exactly that size goes through; one byte more is refused (1009, Message Too Big) on its
    header, before its payload is read, and the service gets none of it."""
    from stellagw.ingress.websocket import MAX_MESSAGE_FRAME
    whole = os.urandom(MAX_MESSAGE_FRAME)

    async def body(bridge, link, transport, client):
        loop = asyncio.get_running_loop()
        read_101(client)
        await loop.run_in_executor(None, client.sendall, client_frame(2, whole))
        await wait_until(lambda: sum(len(c) for _, c in link.sent) == len(whole),
                         "the 1 MiB frame did not reach the service")
        delivered = b"".join(c for _, c in link.sent)
        link.sent.clear()
        # The header of a frame one byte longer, and a little of its payload.
        over = client_frame(2, b"z" * (MAX_MESSAGE_FRAME + 1))[:14 + 1000]
        client.sendall(over)
        client.settimeout(5)
        reply = await loop.run_in_executor(None, read_exactly, client, 1 << 16)
        await wait_until(transport.is_closing, "the connection was kept after the 1009")
        return delivered, reply, list(link.sent)

    delivered, reply, sent = run_bridge(body, window=2 * MAX_MESSAGE_FRAME)
    assert delivered == whole
    frames = parse_frames(reply)
    assert frames and frames[-1][1] == 8, frames                 # a close frame
    assert struct.unpack("!H", frames[-1][2][:2])[0] == 1009
    assert sent == []


def test_an_oversized_client_frame_sent_in_one_write_goes_nowhere_either():
    """The header and the payload in one write: picows then delivers the frame whole with
    its 1009, and the service received all 4 MiB of it once (an adversarial probe)."""
    from stellagw.ingress.websocket import MAX_MESSAGE_FRAME

    async def body(bridge, link, transport, client):
        loop = asyncio.get_running_loop()
        read_101(client)
        await loop.run_in_executor(None, client.sendall,
                                   client_frame(2, b"z" * (MAX_MESSAGE_FRAME + 1)))
        client.settimeout(5)
        reply = await loop.run_in_executor(None, read_exactly, client, 1 << 16)
        await wait_until(transport.is_closing, "the connection was kept after the 1009")
        return reply, list(link.sent)

    reply, sent = run_bridge(body, window=8 * MAX_MESSAGE_FRAME)
    frames = parse_frames(reply)
    assert frames and frames[-1][1] == 8 and struct.unpack("!H", frames[-1][2][:2])[0] == 1009
    assert [k for k, _ in sent if k & fr.STREAM_KIND_MASK != fr.KIND_CLOSE] == [], sent


@pytest.mark.parametrize("code, sent", [(1005, 1011), (1006, 1011), (999, 1011), (5000, 1011),
                                        (1015, 1011), (4001, 4001), (1000, 1000)])
def test_a_close_code_no_endpoint_may_send_reaches_the_client_as_1011(code, sent):
    """RFC 6455 §7.4: 1005, 1006, 1015 and codes outside 1000-4999 are never sent on the
    wire; a service's went to the client as they were (an adversarial probe)."""
    async def body(bridge, link, transport, client):
        loop = asyncio.get_running_loop()
        assert not bridge.from_service(fr.KIND_CLOSE | fr.FLAG_END_STREAM,
                                       struct.pack("!H", code) + b"bye")
        read_101(client)
        client.settimeout(5)
        return await loop.run_in_executor(None, read_exactly, client, 1 << 16)

    frames = parse_frames(run_bridge(body))
    assert frames and frames[-1][1] == 8
    assert struct.unpack("!H", frames[-1][2][:2])[0] == sent


def _utf8_cut():
    text = "naïve ☃".encode()
    return text[:7], text[7:]          # "☃" split across two fragments


@pytest.mark.parametrize("frames, code, relayed", [
    # RSV1 with no extension agreed
    ([bytes([0xC2]) + client_frame(2, b"abc")[1:]], 1002, b""),
    # a continuation with no message begun
    ([client_frame(0, b"more")], 1002, b""),
    # a new message inside a fragmented one: the first fragment went, nothing after
    ([client_frame(1, b"one", fin=False), client_frame(2, b"two")], 1002, b"one"),
    # TEXT that is not UTF-8, whole or in its second fragment
    ([client_frame(1, b"ok \xff")], 1007, b""),
    ([client_frame(1, b"abc", fin=False), client_frame(0, b"\xc3\x28")], 1007, b"abc"),
])
def test_a_client_frame_that_breaks_rfc_6455_fails_the_connection(frames, code, relayed):
    """RFC 6455 §5.2, §5.4, §8.1: each of these was relayed to the service as if fine."""
    async def body(bridge, link, transport, client):
        loop = asyncio.get_running_loop()
        read_101(client)
        client.sendall(b"".join(frames))
        client.settimeout(5)
        reply = await loop.run_in_executor(None, read_exactly, client, 1 << 16)
        await wait_until(transport.is_closing, "the connection was kept")
        return reply, list(link.sent)

    reply, sent = run_bridge(body, window=1 << 20)
    frames_back = parse_frames(reply)
    assert frames_back and frames_back[-1][1] == 8
    assert struct.unpack("!H", frames_back[-1][2][:2])[0] == code
    data = b"".join(c for k, c in sent if k & fr.STREAM_KIND_MASK != fr.KIND_CLOSE)
    assert data == relayed
    close = [c for k, c in sent if k & fr.STREAM_KIND_MASK == fr.KIND_CLOSE]
    assert close and fr.parse_ws_close(close[0])[0] == code


def test_text_split_inside_a_character_is_relayed():
    """UTF-8 is checked across fragments: a character cut between two is fine."""
    head, tail = _utf8_cut()

    async def body(bridge, link, transport, client):
        read_101(client)
        client.sendall(client_frame(1, head, fin=False) + client_frame(0, tail))
        await wait_until(lambda: sum(len(c) for _, c in link.sent) == len(head + tail),
                         "the message did not reach the service")
        return list(link.sent), transport.is_closing()

    sent, closing = run_bridge(body, window=1 << 20)
    assert b"".join(c for _, c in sent) == head + tail and not closing


def test_empty_continuations_inside_a_message_do_not_reach_the_service():
    """docs/security.md §3d, empty WebSocket fragments: a client's empty continuation that
    does not end its message carries nothing, and no window counts it. Each was relayed as
    its own REQUEST_STREAM_DATA: 1,000 frames on the link from one 6 KB write. The one that
    ends a message still goes (the message must end), and the client is still active."""
    filler = client_frame(0, b"", fin=False) * 1000

    async def body(bridge, link, transport, client):
        read_101(client)
        client.sendall(client_frame(2, b"a", fin=False) + filler + client_frame(0, b"b")
                       + client_frame(1, b"c", fin=False) + filler + client_frame(0, b""))
        await wait_until(lambda: len(link.sent) >= 4 or link.active >= 2000,
                         "the messages did not reach the service")
        await asyncio.sleep(0.05)
        return list(link.sent), link.active, transport.is_closing()

    sent, active, closing = run_bridge(body, window=1 << 20)
    assert sent == [(fr.KIND_BINARY | MORE, b"a"), (fr.KIND_DATA, b"b"),
                    (fr.KIND_TEXT | MORE, b"c"), (fr.KIND_DATA, b"")]
    assert active == 2000 and not closing


def test_a_client_close_without_window_cancels_instead_of_waiting_for_credit():
    """The service has spent the window and reads nothing more: the client's CLOSE cannot go
    as stream data. The client still gets its close echoed, and the service CANCEL (through
    ws_client_gone) instead of a request held, with the client's bytes, until it reads."""
    async def body(bridge, link, transport, client):
        read_101(client)
        client.sendall(client_frame(2, b"x" * 100) + client_frame(2, b"y" * 50)
                       + client_frame(8, struct.pack("!H", 1000) + b"bye"))
        await wait_until(lambda: bridge.closed, "the CLOSE was not handled")
        client.settimeout(3)
        loop = asyncio.get_running_loop()
        echoed = await loop.run_in_executor(None, read_exactly, client, 4)
        after = await loop.run_in_executor(None, read_exactly, client, 1)
        return list(link.sent), link.gone, list(bridge._held), echoed, after

    sent, gone, held, echoed, after = run_bridge(body, window=120)
    # The first message fits; of the second what the window left (20 bytes), then nothing.
    assert sent == [(fr.KIND_BINARY, b"x" * 100), (fr.KIND_BINARY | MORE, b"y" * 20)]
    assert gone == 1 and held == []
    assert echoed[:2] == b"\x88\x02" and echoed[2:4] == struct.pack("!H", 1000)
    assert after == b""                             # and the client's connection closed


def test_a_client_sending_pings_and_reading_nothing_is_not_read_either():
    """A client that pings and never reads is paused when the PONGs fill the transport, so
    the gateway holds a bounded amount for it, and the PONGs arrive once it reads — one for
    the last PING of each read (RFC 6455 §5.5.3), never more than it sent."""
    n = 80_000                                      # 10.6 MB of pings, more than the kernel holds
    pings = client_frame(9, b"p" * 125) * n

    async def body(bridge, link, transport, client):
        import threading
        read_101(client)
        client.settimeout(20)
        sender = threading.Thread(target=client.sendall, args=(pings,), daemon=True)
        sender.start()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sender.join, 3)
        held = transport.get_write_buffer_size()
        client.settimeout(2)
        pongs = await loop.run_in_executor(None, read_exactly, client, n * 127)
        await loop.run_in_executor(None, sender.join, 10)
        return held, pongs, sender.is_alive(), link.sent, link.active

    held, pongs, still_sending, sent, active = run_bridge(body)
    assert held < 512 * 1024, held
    count = len(pongs) // 127
    assert 0 < count <= n and pongs == (b"\x8a\x7d" + b"p" * 125) * count and not still_sending
    assert sent == []                               # pings are the gateway's, not the service's
    assert active == count                          # each answer keeps the WebSocket from idling


def test_a_ping_flood_in_one_write_gets_one_pong_for_its_last_ping():
    """docs/security.md §3d, PING floods: each PING was answered with its own PONG, a send
    syscall each — 10,000 for one 60 KB write of empty PINGs. One PONG now answers the last
    PING of what was read at once (RFC 6455 §5.5.3), and counts as activity once."""
    pings = b"".join(client_frame(9, b"%05d" % i) for i in range(2000))

    async def body(bridge, link, transport, client):
        read_101(client)
        client.sendall(pings)
        client.settimeout(1)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, read_exactly, client, 2000 * 7), link.active

    data, active = run_bridge(body)
    frames = parse_frames(data)
    assert frames and all(opcode == 10 and fin for fin, opcode, _ in frames)
    payloads = [int(payload) for _, _, payload in frames]
    assert payloads[-1] == 1999 and payloads == sorted(set(payloads))
    assert len(frames) <= 20, len(frames)           # one per read, not one per PING
    assert active == len(frames)
