"""What a handler reads from a Request, and what its answer becomes, through the SDK's link
(a REQUEST frame in, the frames written out). The Request's headers, correlation id and
`cancelled` event are made when first read (stellagw/service/sdk.py): these tests hold what
a handler sees whether or not it reads them."""
from __future__ import annotations

import asyncio

import pytest

from stellagw.service import Response, Service
from stellagw.service.sdk import STREAM_ABOVE, _Link
from stellagw.transport import frame as fr

from .test_sdk_link import RecordingTransport

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

CORR = (7).to_bytes(16, "big")
HEADERS = [(b"host", b"gw.example"), (b"x-correlation-id", b"abc-123"),
           (b"x-stellaops-actor", b"alice"), (b"accept", b"text/plain"),
           (b"accept", b"application/json")]


def request_frame(path="/x", headers=HEADERS, corr=CORR):
    enc = fr.FrameEncoder()
    enc.request(corr, "GET", path, b"", headers, 5000, fr.FLAG_END_STREAM, b"")
    dec = fr.FrameDecoder()
    dec.feed(enc.take())
    return dec.next()


def written(transport):
    dec = fr.FrameDecoder()
    dec.feed(b"".join(transport.writes))
    out = []
    while (f := dec.next()) is not None:
        out.append(f)
    return out


def serve(svc, frames, settle=0.0):
    """Feed `frames` to a link of `svc`; returns the frames it wrote after its HELLO."""
    async def main():
        link = _Link(svc)
        transport = RecordingTransport()
        link.connection_made(transport)
        for f in frames:
            link._on_frame(*f)
            await asyncio.sleep(0)
        await asyncio.sleep(settle)
        await asyncio.sleep(0)
        return written(transport)[1:], link
    return asyncio.run(main())


def response_of(frames):
    (ftype, corr, payload), = [f for f in frames if f[0] == fr.RESPONSE]
    assert bytes(corr) == CORR
    return fr.decode_response(payload)


def test_a_handler_reads_the_headers_the_gateway_sent():
    svc = Service("svc")
    seen = {}

    @svc.get("/x")
    async def handler(req):
        seen["headers"] = req.headers
        seen["cid"] = req.correlation_id
        return Response(b"ok")

    frames, _ = serve(svc, [request_frame()])
    # Names as sent (lower case), a repeated name: its last value.
    assert seen["headers"] == {"host": "gw.example", "x-correlation-id": "abc-123",
                               "x-stellaops-actor": "alice", "accept": "application/json"}
    assert seen["cid"] == "abc-123"
    flags, status, headers, body = response_of(frames)
    assert (status, body, flags & fr.FLAG_END_STREAM) == (200, b"ok", fr.FLAG_END_STREAM)


def test_the_correlation_id_alone_and_without_one():
    svc = Service("svc")
    seen = []

    @svc.get("/x")
    async def handler(req):
        seen.append(req.correlation_id)      # read before (and without) the headers
        return Response(b"")

    serve(svc, [request_frame()])
    serve(svc, [request_frame(headers=[(b"host", b"gw.example")])])
    assert seen == ["abc-123", ""]


def test_an_unknown_path_answers_404_with_the_correlation_id():
    frames, _ = serve(Service("svc"), [request_frame("/nowhere")])
    flags, status, headers, body = response_of(frames)
    assert status == 404 and b'"trace_id":"abc-123"' in body


def test_cancel_sets_cancelled_for_a_handler_that_had_not_looked_at_it():
    svc = Service("svc")
    seen = []

    @svc.get("/x")
    async def handler(req):
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append(req.cancelled.is_set())
            raise
        return Response(b"never")

    frames, link = serve(svc, [request_frame(), (fr.CANCEL, CORR, b"")])
    assert seen == [True]
    assert [f for f in frames if f[0] == fr.RESPONSE] == []    # nothing answered after CANCEL
    assert link.requests == {} and svc.in_flight == 0


def test_a_handler_waiting_on_cancelled_is_woken_by_cancel():
    svc = Service("svc")
    seen = []

    @svc.get("/x")
    async def handler(req):
        waiter = asyncio.ensure_future(req.cancelled.wait())
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0)
            seen.append(waiter.done())
            raise

    serve(svc, [request_frame(), (fr.CANCEL, CORR, b"")])
    assert seen == [True]


def test_a_lost_link_sets_cancelled_as_a_cancel_does():
    # A gateway worker SIGKILLed mid-request (found by a kill probe): the handler was
    # cancelled but `cancelled` never set, so work it had handed to another task — which
    # waits on `cancelled`, as after a CANCEL — went on for an answer nobody would read.
    svc = Service("svc")
    seen = []

    @svc.get("/x")
    async def handler(req):
        async def job():
            await req.cancelled.wait()
            seen.append("job stopped")
        asyncio.ensure_future(job())
        await asyncio.sleep(10)
        return Response(b"never")

    async def main():
        link = _Link(svc)
        transport = RecordingTransport()
        link.connection_made(transport)
        link._on_frame(*request_frame())
        await asyncio.sleep(0)
        link.connection_lost(ConnectionResetError())
        assert isinstance(link.acked.exception(), ConnectionError)   # (no HELLO_ACK here)
        for _ in range(3):
            await asyncio.sleep(0)
        return link
    link = asyncio.run(main())
    assert seen == ["job stopped"]
    assert link.requests == {} and svc.in_flight == 0


class Tagged(Response):
    __slots__ = ()


@pytest.mark.parametrize("answer, status, body", [
    (lambda: Tagged(b"sub"), 200, b"sub"),          # a Response subclass: the general path
    (lambda: None, 204, b""),
    (lambda: "text", 200, b"text"),
    (lambda: {"a": 1}, 200, b'{"a":1}'),
])
def test_every_kind_of_answer_reaches_the_gateway(answer, status, body):
    svc = Service("svc")

    @svc.get("/x")
    async def handler(req):
        return answer()

    frames, _ = serve(svc, [request_frame()])
    flags, got_status, headers, got_body = response_of(frames)
    assert (got_status, got_body) == (status, body)


def test_an_answer_past_one_frame_is_streamed_not_sent_whole():
    svc = Service("svc")
    big = b"z" * (STREAM_ABOVE + 1)

    @svc.get("/x")
    async def handler(req):
        return Response(big)

    frames, _ = serve(svc, [request_frame()], settle=0.05)
    (ftype, corr, payload), = [f for f in frames if f[0] == fr.RESPONSE]
    flags, status, headers, body = fr.decode_response(payload)
    assert status == 200 and not flags & fr.FLAG_END_STREAM and body == b""
    data = [f for f in frames if f[0] == fr.RESPONSE_STREAM_DATA]
    assert data   # the rest waits for the gateway's window; the head says it is a stream
