"""What crosses a service link, over real sockets: a gateway worker on loopback, a raw frame
peer as the service, plain sockets as clients.

* A service's max_frame_size (docs/protocol.md §1): the gateway never sends a frame longer
  than the service's HELLO announced. A body that does not fit in the REQUEST follows it as
  request stream data; a head that does not fit is answered 431 and reaches no service.
* Fields a `Connection` field names are hop-by-hop (RFC 9110 §7.6.1): a service's never
  reach the client, a client's never reach the service.

One source (stellagw/transport/connection.py): run compiled and with STELLAGW_NO_EXTENSIONS=1.
"""
from __future__ import annotations

import os
import socket
import threading

import orjson
import pytest

from stellagw.transport import frame as fr

from tests.support.gwtest import GatewayThread, connect, settings_from
from tests.support.sansio import parse_responses
from tests.support.servicepeer import RawPeer, hello_for

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

LIMIT = 1024                    # the service's max_frame_size, the smallest one allowed
ENDPOINTS = [("GET", "/svc/get"), ("POST", "/svc/up"), ("GET", "/svc/stream")]


@pytest.fixture
def gw():
    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}}}}).decode())).start()
    yield gw
    gw.stop()


class Service:
    """A raw service on one link. Its decoder holds the gateway to `limit` (read_frame
    raises FrameTooLarge past it, as a service enforcing its limit would close the link),
    and the length of every frame it was sent is kept."""

    def __init__(self, gw, limit=None):
        extra = {} if limit is None else {"max_frame_size": limit}
        self.limit = limit or fr.DEFAULT_MAX_FRAME_SIZE
        self.peer = RawPeer(gw.transport_port, max_frame_size=self.limit)
        self.lengths = []
        ack = self.peer.hello(hello_for("svc", endpoints=ENDPOINTS, **extra))
        assert "error" not in ack, ack

    def frame(self):
        frame = self.peer.read_frame()
        assert frame is not None, "the gateway closed the link"
        self.lengths.append(fr.MIN_LENGTH + len(frame[2]))
        return frame

    def request(self):
        """The next request, whole: (corr, decoded REQUEST, body, [(frame type, length)]).
        Credit goes back for each chunk of a streamed body, as it is read."""
        ftype, corr, payload = self.frame()
        assert ftype == fr.REQUEST, ftype
        req = fr.decode_request(payload)
        frames = [(ftype, fr.MIN_LENGTH + len(payload))]
        body = bytearray(req[6])
        end = req[0] & fr.FLAG_END_STREAM
        while not end:
            ftype, scorr, payload = self.frame()
            assert (ftype, scorr) == (fr.REQUEST_STREAM_DATA, corr), (ftype, scorr)
            frames.append((ftype, fr.MIN_LENGTH + len(payload)))
            flags, chunk = fr.decode_stream_data(payload)
            body += chunk
            end = flags & fr.FLAG_END_STREAM
            if chunk and not end:
                self.send(lambda enc: enc.window_update(corr, len(chunk)))
        return corr, req, bytes(body), frames

    def send(self, write):
        enc = fr.FrameEncoder()
        write(enc)
        self.peer.sock.sendall(enc.take())

    def respond(self, corr, headers=(), body=b"", streamed=False):
        if not streamed:
            self.send(lambda enc: enc.response(corr, 200, list(headers), fr.FLAG_END_STREAM, body))
            return
        self.send(lambda enc: enc.response(corr, 200, list(headers), 0, b""))
        self.send(lambda enc: enc.stream_data(fr.RESPONSE_STREAM_DATA, corr, 0, body))
        self.send(lambda enc: enc.stream_data(fr.RESPONSE_STREAM_DATA, corr,
                                              fr.FLAG_END_STREAM, b""))

    def close(self):
        self.peer.close()


class Client:
    """One HTTP exchange on its own connection, in a thread: the test serves it meanwhile."""

    def __init__(self, gw, raw: bytes):
        self.raw = raw
        self.data = b""
        self.sock = connect(gw.port, timeout=15)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        self.sock.sendall(self.raw)
        chunks = []
        try:
            while chunk := self.sock.recv(65536):
                chunks.append(chunk)
        except (socket.timeout, ConnectionResetError):
            pass
        self.data = b"".join(chunks)
        self.sock.close()

    def response(self):
        """(status, headers, body) once the gateway closed the connection."""
        self._thread.join(20)
        assert not self._thread.is_alive(), "no answer"
        [answer] = parse_responses(self.data)
        return answer


def post(gw, body: bytes, chunked: bool = False, extra: bytes = b"") -> Client:
    if chunked:
        # In pieces that do not line up with the service's frames.
        size = 777
        wire = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size])
                        for i in range(0, len(body), size)) + b"0\r\n\r\n"
        framing = b"Transfer-Encoding: chunked\r\n"
    else:
        wire, framing = body, b"Content-Length: %d\r\n" % len(body)
    return Client(gw, b"POST /svc/up HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n" + extra
                  + framing + b"\r\n" + wire)


def get(gw, path=b"/svc/get", extra: bytes = b"") -> Client:
    return Client(gw, b"GET %s HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n%s\r\n"
                  % (path, extra))


def echo(svc, client):
    """Serve one request by echoing its body; (its frames, the body the service got)."""
    corr, req, body, frames = svc.request()
    svc.respond(corr, [(b"content-type", b"application/octet-stream")], body)
    status, _, answer = client.response()
    assert status == 200 and answer == body
    return frames, body


# ---------------------------------------------------------------------------- max_frame_size


def test_every_frame_to_a_service_fits_the_max_frame_size_it_announced(gw):
    svc = Service(gw, LIMIT)
    try:
        # The REQUEST of an empty body: its length tells where a body stops fitting (the
        # head grows only by the digits of Content-Length; the rest is fixed per request).
        frames, _ = echo(svc, post(gw, b""))
        [(ftype, empty)] = frames
        fits = LIMIT - empty - 2            # a three-digit Content-Length
        assert 100 <= fits <= 999
        chunk = LIMIT - fr.MIN_LENGTH - 1   # the most a stream-data frame carries
        sizes = [1, fits - 1, fits, fits + 1, fits + 2, chunk, chunk + 1, 2 * chunk,
                 2 * chunk + 1, 8000, 70_000]
        for size in sizes:
            for chunked in (False, True):
                sent = os.urandom(size)
                frames, got = echo(svc, post(gw, sent, chunked))
                assert got == sent, (size, chunked)          # intact and in order
                assert max(n for _, n in frames) <= LIMIT, (size, chunked, frames)
                if size <= fits and not chunked:
                    # It fits: the body goes inside the REQUEST, as on any link.
                    assert frames == [(fr.REQUEST, empty + len(str(size)) - 1 + size)], size
                    continue
                # The head, then the body as stream data.
                assert frames[0][0] == fr.REQUEST and frames[0][1] < LIMIT
                assert {t for t, _ in frames[1:]} == {fr.REQUEST_STREAM_DATA}
                if not chunked and size < 65536:
                    # Whole before it went (under the streaming threshold): in frames as
                    # full as the limit allows.
                    data = [n for _, n in frames[1:]]
                    assert data[:size // chunk] == [LIMIT] * (size // chunk), (size, data)
        assert max(svc.lengths) <= LIMIT
    finally:
        svc.close()


def test_a_link_that_announced_nothing_keeps_the_body_inside_the_request(gw):
    # The protocol's default (16 MiB): a body up to the streaming threshold goes whole.
    svc = Service(gw)
    try:
        sent = os.urandom(8000)
        frames, got = echo(svc, post(gw, sent))
        assert got == sent and len(frames) == 1 and frames[0][1] > 8000
    finally:
        svc.close()


@pytest.mark.parametrize("method", ["GET", "POST content-length", "POST chunked"])
def test_a_head_larger_than_the_services_frames_is_431_and_reaches_no_service(gw, method):
    svc = Service(gw, LIMIT)
    try:
        big = b"X-Big: " + b"b" * LIMIT + b"\r\n"
        if method == "GET":
            client = get(gw, extra=big)
        else:
            client = post(gw, b"x" * 100, chunked=method == "POST chunked", extra=big)
        status, _, body = client.response()
        assert status == 431
        assert "larger than the service accepts" in orjson.loads(body)["error"]["message"]
        # Nothing went to the service: the next frame it gets is the next request's.
        client = get(gw)
        corr, req, _, _ = svc.request()
        assert req[3] == "/svc/get" and all(name != b"x-big" for name, _ in req[5])
        svc.respond(corr, body=b"ok")
        assert client.response()[0] == 200
    finally:
        svc.close()


# ---------------------------------------------------------------------------- Connection


@pytest.mark.parametrize("streamed", [False, True], ids=["buffered", "streamed"])
def test_fields_a_services_connection_field_names_do_not_reach_the_client(gw, streamed):
    svc = Service(gw)
    try:
        client = get(gw, b"/svc/stream" if streamed else b"/svc/get")
        corr, _, _, _ = svc.request()
        svc.respond(corr, [(b"connection", b"keep-alive, X-Keep"), (b"x-keep", b"1"),
                           (b"x-other", b"2"), (b"connection", b" x-Two ,"),
                           (b"x-two", b"3"), (b"content-type", b"text/plain")],
                    b"hello", streamed)
        status, headers, body = client.response()
        assert status == 200 and body == b"hello"
        assert headers["x-other"] == "2" and headers["content-type"] == "text/plain"
        assert "x-keep" not in headers and "x-two" not in headers
        assert headers.get("transfer-encoding") == ("chunked" if streamed else None)
        # The client's own connection is the gateway's business: it asked to close.
        assert headers["connection"] == "close"
    finally:
        svc.close()


def test_fields_a_clients_connection_field_names_do_not_reach_the_service(gw):
    svc = Service(gw)
    try:
        # Named on either of two Connection lines, before or after the field itself (get()
        # sends `Connection: close` as well).
        client = get(gw, extra=b"X-Foo: 1\r\nConnection: X-Foo\r\nX-Bar: 2\r\n"
                               b"Connection: x-baz\r\nX-Baz: 3\r\n")
        corr, req, _, _ = svc.request()
        names = [name for name, _ in req[5]]
        assert b"x-bar" in names
        assert b"x-foo" not in names and b"x-baz" not in names and b"connection" not in names
        svc.respond(corr, body=b"ok")
        assert client.response()[0] == 200
    finally:
        svc.close()


# ---------------------------------------------------------------------------- tiny frames


def test_a_streamed_answer_in_tiny_frames_reaches_the_client_in_few_writes(gw):
    """docs/security.md §3d, tiny stream frames: a service that streams its answer a byte
    per RESPONSE_STREAM_DATA made the gateway write each to the client (a chunk and a
    syscall per byte: 10,410 writes for one 230 KB read) and send a WINDOW_UPDATE for each.
    The pieces of one read now go as one write, and credit goes back for them at once."""
    svc = Service(gw)
    try:
        client = get(gw, b"/svc/stream")
        corr, _, _, _ = svc.request()

        def tiny(enc):
            enc.response(corr, 200, [(b"content-type", b"text/plain")], 0, b"")
            for _ in range(1000):
                enc.stream_data(fr.RESPONSE_STREAM_DATA, corr, 0, b"x")
            enc.stream_data(fr.RESPONSE_STREAM_DATA, corr, fr.FLAG_END_STREAM, b"")
        svc.send(tiny)          # 23 KB in one write: one read or a few
        status, _, body = client.response()
        assert status == 200 and body == b"x" * 1000
        # The chunked framing the client got says how many writes the body took.
        rest = client.data.partition(b"\r\n\r\n")[2]
        chunks = 0
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            chunks += 1
            rest = rest[size + 2:]
        assert chunks <= 5, chunks
        granted = []
        svc.peer.sock.settimeout(0.5)
        try:
            while (frame := svc.peer.read_frame(0.5)) is not None:
                if frame[0] == fr.WINDOW_UPDATE and frame[1] == corr:
                    granted.append(fr.decode_window_update(frame[2]))
        except (socket.timeout, TimeoutError):
            pass
        assert sum(granted) == 1000 and len(granted) <= 5, granted
    finally:
        svc.close()
