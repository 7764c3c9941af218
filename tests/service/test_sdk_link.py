"""The SDK's link to a gateway: what it writes, and when (against a recording transport)."""
from __future__ import annotations

import asyncio

import pytest

from stellagw.transport import frame as fr
from stellagw.service import Response, Service
from stellagw.service.sdk import _Link

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


class RecordingTransport:
    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(bytes(data))

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 9100) if name == "peername" else default


def test_responses_finished_together_go_out_in_bounded_writes_in_order():
    """Handlers that finish in one turn of the loop share writes, but no write holds more
    than frame.WRITE_BATCH frames: the gateway starts on the first responses of a burst
    while the service produces the rest."""
    async def main():
        link = _Link(Service("svc"))
        transport = RecordingTransport()
        link.connection_made(transport)          # queues the HELLO
        corrs = [i.to_bytes(16, "big") for i in range(1, 61)]
        for corr in corrs:
            link.send_response(corr, Response(b"x" * 200))
        await asyncio.sleep(0)                   # the turn ends: the scheduled flush runs
        return transport.writes

    writes = asyncio.run(main())
    counts = []
    for data in writes:
        one = fr.FrameDecoder()
        one.feed(data)
        n = 0
        while one.next() is not None:
            n += 1
        counts.append(n)
    assert sum(counts) == 61 and max(counts) <= fr.WRITE_BATCH < 61, counts
    dec = fr.FrameDecoder()
    dec.feed(b"".join(writes))
    frames = []
    while (f := dec.next()) is not None:
        frames.append((f[0], bytes(f[1])))
    assert [t for t, _ in frames] == [fr.HELLO] + [fr.RESPONSE] * 60
    assert [c for _, c in frames[1:]] == [i.to_bytes(16, "big") for i in range(1, 61)]


def test_a_lone_response_waits_for_the_end_of_the_turn():
    async def main():
        link = _Link(Service("svc"))
        transport = RecordingTransport()
        link.connection_made(transport)
        link.send_response(b"\x01" * 16, Response(b"ok"))
        before = len(transport.writes)
        await asyncio.sleep(0)
        return before, transport.writes

    before, writes = asyncio.run(main())
    assert before == 0 and len(writes) == 1      # HELLO and the response: one write


def test_two_tasks_sending_on_one_websocket_send_one_message_after_the_other():
    """Two sends that both wait for credit: each message's fragments stay together (a new
    TEXT/BINARY inside a fragmented message is a protocol error for the client), and neither
    sender is left waiting for a WINDOW_UPDATE that was handed to the other."""
    from stellagw.service.sdk import WebSocket
    corr = b"\x07" * 16

    async def main():
        link = _Link(Service("svc"))
        transport = RecordingTransport()
        link.connection_made(transport)
        link.send_head(corr, 101)                  # the WebSocket's stream: a 256 KiB window
        ws = WebSocket(link, corr, None)
        first = asyncio.ensure_future(ws.send(b"a" * 300_000))
        second = asyncio.ensure_future(ws.send(b"b" * 300_000))
        await asyncio.sleep(0.01)                  # both out of credit now
        enc = fr.FrameEncoder()
        enc.window_update(corr, 1 << 20)
        link.data_received(enc.take())
        await asyncio.wait_for(asyncio.gather(first, second), 2)
        return transport.writes

    writes = asyncio.run(main())
    dec = fr.FrameDecoder()
    dec.feed(b"".join(writes))
    messages, current = [], None
    while (f := dec.next()) is not None:
        if f[0] != fr.RESPONSE_STREAM_DATA:
            continue
        flags, chunk = fr.decode_stream_data(f[2])
        kind = flags & fr.STREAM_KIND_MASK
        if current is None:
            assert kind == fr.KIND_BINARY, flags
            current = []
        else:
            assert kind == fr.KIND_DATA, f"a new message inside message {len(messages) + 1}"
        current.append(chunk)
        if not flags & fr.FLAG_MORE:
            messages.append(b"".join(current))
            current = None
    assert current is None
    assert sorted(messages) == [b"a" * 300_000, b"b" * 300_000]


def test_heartbeats_say_draining_once_the_service_stops():
    # docs/security.md §3d ("Healthy after DRAIN"): stop() sent DRAIN, then the link's
    # heartbeats went on saying Healthy until it closed (protocol.md §4.6: Draining).
    async def main():
        svc = Service("svc")
        assert svc.heartbeat()["status"] == "Healthy"
        await svc.stop(timeout=0.1)
        return svc.heartbeat()["status"]
    assert asyncio.run(main()) == "Draining"
