"""HttpProtocol without sockets: a mock transport, every input whole, byte by byte and at
random cut points (docs/design.md §9).

The protocol is one source (stellagw/ingress/http.py): `make test` runs this module on the
compiled module and again with STELLAGW_NO_EXTENSIONS=1 on the plain Python.
Stand-ins for the pipeline and the service connection keep to their contract with the
ingress: `handle(req)` on the head, `req.pending` + `req.conn.start_body(req)` to take a
body, `pending.owner.request_body(pending, chunk, end)` for each piece of it."""
from __future__ import annotations

import random

import orjson
import pytest

from stellagw.gateway import Worker
from stellagw.ingress import http as ingress

from tests.support.gwtest import NullLog, settings_from

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


class MockTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.paused = False
        self.writes = 0

    def write(self, data):
        assert not self.closed, "write after close"
        self.out += data
        self.writes += 1

    def close(self):
        self.closed = True

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    @property
    def ended(self):
        """Closed, or half-closed for a lingering read before the close."""
        return self.closed or self.eof

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555)}.get(name, default)


def new_protocol(worker):
    return ingress.HttpProtocol(worker)


def make(yaml_text="", pipeline=None):
    log = NullLog()
    worker = Worker(settings_from(yaml_text), 0, log=log.log)
    worker.started = True
    if pipeline is not None:
        worker.pipeline = pipeline
    proto = new_protocol(worker)
    transport = MockTransport()
    proto.connection_made(transport)
    return worker, proto, transport, log


def feed(proto, data: bytes, mode: str, rng=None):
    if mode == "whole":
        proto.data_received(data)
    elif mode == "bytes":
        for i in range(len(data)):
            proto.data_received(data[i:i + 1])
    else:
        rng = rng or random.Random(7)
        i = 0
        while i < len(data):
            n = rng.randint(1, 13)
            proto.data_received(data[i:i + n])
            i += n


def responses(raw: bytes):
    """Split concatenated content-length framed responses."""
    out = []
    buf = bytes(raw)
    while buf:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {buf!r}"
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode()] = v.strip().decode()
        n = int(headers.get("content-length", 0))
        status = int(lines[0].split()[1])
        out.append((status, headers, rest[:n]))
        buf = rest[n:]
    return out


MODES = ["whole", "bytes", "random"]
GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n"


@pytest.mark.parametrize("mode", MODES)
def test_get_health_live(mode):
    _, proto, t, _ = make()
    feed(proto, GET_LIVE, mode)
    [(status, headers, body)] = responses(t.out)
    assert status == 200
    assert orjson.loads(body) == {"status": "Healthy"}
    assert headers["content-type"] == "application/json"
    assert len(headers["x-correlation-id"]) > 8
    assert "date" in headers
    assert not t.ended


@pytest.mark.parametrize("mode", MODES)
def test_pipelined_requests_answered_in_order_with_one_write(mode):
    _, proto, t, _ = make()
    reqs = b"".join(b"GET %s HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: c%d\r\n\r\n" % (p, i)
                    for i, p in enumerate([b"/health/live", b"/nope", b"/health/startup"]))
    feed(proto, reqs, mode)
    got = responses(t.out)
    assert [s for s, _, _ in got] == [200, 404, 200]
    assert [h["x-correlation-id"] for _, h, _ in got] == ["c0", "c1", "c2"]
    if mode == "whole":
        assert t.writes == 1  # coalesced: one write for everything one read produced


class PendingPipeline:
    """Leaves /slow requests pending; the test answers them later, out of band."""

    def __init__(self):
        self.pending = []

    def handle(self, req):
        if req.target == b"/slow":
            self.pending.append(req)
            return None
        return 200, b"", b"fast:" + req.target


def test_pipelining_waits_for_the_pending_answer():
    pipe = PendingPipeline()
    _, proto, t, _ = make(pipeline=pipe)
    proto.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /a HTTP/1.1\r\nHost: a\r\n\r\n"
                        b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    assert t.out == b""  # /a and /b must not overtake /slow
    req = pipe.pending[0]
    proto.respond(req, 201, b"", b"slow done")
    got = responses(t.out)
    assert [(s, b) for s, _, b in got] == [(201, b"slow done"), (200, b"fast:/a"), (200, b"fast:/b")]


def test_an_answered_request_lets_go_of_its_dispatch():
    # Request.pending and Pending.req point at each other: left linked, every routed
    # request would be garbage only the cycle collector finds (a pause per collection).
    pipe = PendingPipeline()
    _, proto, t, _ = make(pipeline=pipe)
    proto.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n")
    req = pipe.pending[0]

    class Dispatch:
        def __init__(self, req):
            self.req = req

        def abort(self, over_limit=False):
            pass
    req.pending = Dispatch(req)
    proto.respond(req, 200, b"", b"done")
    assert req.pending is None


def test_deep_pipelining_pauses_reading():
    pipe = PendingPipeline()
    _, proto, t, _ = make(pipeline=pipe)
    proto.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n" +
                        b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n" * 20)
    assert t.paused
    proto.respond(pipe.pending[0], 200, b"", b"")
    assert not t.paused
    assert len(responses(t.out)) == 21


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n", 400),                       # bare LF
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),                  # obs-fold
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505),
    (b"G@T / HTTP/1.1\r\nHost: gw\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),                   # TLS to a plain port
    (b"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHost: a\r\n\r\n", 400),
])
def test_malformed_requests_get_400_envelope_and_close(raw, status, mode):
    _, proto, t, _ = make()
    feed(proto, raw, mode)
    [(got, headers, body)] = responses(t.out)
    assert got == status
    err = orjson.loads(body)["error"]
    assert set(err) == {"code", "message", "trace_id"}
    assert err["trace_id"] == headers["x-correlation-id"]
    assert headers["connection"] == "close"
    assert t.ended


def test_answers_before_a_malformed_one_are_kept():
    _, proto, t, _ = make()
    proto.data_received(GET_LIVE + b"GARBAGE\r\n\r\n")
    got = responses(t.out)
    assert [s for s, _, _ in got] == [200, 400]
    assert t.ended


@pytest.mark.parametrize("mode", ["whole", "random"])
def test_limits(mode):
    cases = [
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: gw\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: gw\r\nX-Big: " + b"v" * 600 + b"\r\n\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n", 413),
    ]
    cfg = """
gateway:
  http: {maxUrlLength: 100, maxHeaderCount: 10, maxHeaderBytes: 512}
  routing: {maxRequestBodySize: 1000}
"""
    for raw, status in cases:
        echo = Echo(answer=False)
        _, proto, t, _ = make(cfg, pipeline=echo)
        feed(proto, raw, mode)
        [(got, _, body)] = responses(t.out)
        assert got == status, raw[:40]
        # A chunked body past the limit: the service had a dispatch, which is called off
        # as over the limit (CANCEL PayloadLimitExceeded, protocol.md §4.5).
        assert all(d.aborted == "over the limit" for d in echo.dispatches)
        assert orjson.loads(body)["error"]["code"]
        assert t.ended


class Dispatch:
    """A request dispatched to a stand-in service connection (`owner`)."""

    def __init__(self, req, owner):
        self.req = req
        self.owner = owner
        self.aborted = False

    def abort(self, over_limit=False):
        self.aborted = "over the limit" if over_limit else "client gone"


class Sink:
    """The service connection's side of a body: takes what request_body() gives; answers
    the request with the body once it ended (an echo). `credit`: bytes it takes before
    asking the ingress to stop reading (flow control)."""

    def __init__(self, credit=None, answer=True):
        self.chunks = []
        self.ended = False
        self.credit = credit
        self.answer = answer

    def request_body(self, pending, chunk, end):
        self.chunks.append(bytes(chunk))
        if end:
            self.ended = True
            if self.answer:
                pending.req.conn.respond(pending.req, 200, b"", b"".join(self.chunks))
        if self.credit is not None:
            self.credit -= len(chunk)
            return self.credit > 0
        return True


class Echo:
    """Answers a body-less request on its head; takes a body through a Sink and echoes it."""

    def __init__(self, **sink):
        self.seen = []
        self.sinks = []
        self.dispatches = []
        self._sink = sink

    def handle(self, req):
        self.seen.append(req)
        if req.body_state == ingress.B_NONE:
            return 200, b"", req.body
        sink = Sink(**self._sink)
        self.sinks.append(sink)
        req.pending = Dispatch(req, sink)
        self.dispatches.append(req.pending)
        req.conn.start_body(req)
        return None


@pytest.mark.parametrize("mode", MODES)
def test_chunked_and_content_length_bodies_reach_the_service(mode):
    echo = Echo()
    _, proto, t, _ = make(pipeline=echo)
    feed(proto, b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", mode)
    assert [b"".join(s.chunks) for s in echo.sinks] == [b"hello", b"abcde"]
    assert [b for _, _, b in responses(t.out)] == [b"hello", b"abcde"]
    assert not t.ended


def test_http10_closes_unless_keep_alive():
    _, proto, t, _ = make()
    proto.data_received(b"GET /health/live HTTP/1.0\r\n\r\n")
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "close" and t.ended

    _, proto, t, _ = make()
    proto.data_received(b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "keep-alive" and not t.ended


@pytest.mark.parametrize("line", [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b""])
@pytest.mark.parametrize("fields", [b"", b"Connection: keep-alive\r\n", b"Connection: close\r\n",
                                    b"Proxy-Connection: keep-alive\r\n",
                                    b"Proxy-Connection: close\r\n", b"Connection: upgrade\r\n",
                                    b"Connection: x\r\nConnection: keep-alive\r\n",
                                    b"X-Connection: keep-alive\r\nKeep-Alive: 5\r\n"])
def test_the_version_is_the_parsers_own(line, fields):
    """The ingress reads the version from keep-alive when that decides it (http.py,
    on_headers_complete): what it takes is what llhttp read, for every version llhttp
    admits and every line that moves its keep-alive."""
    import httptools

    from stellagw.gateway import _strict

    class Seen:
        def on_headers_complete(self):
            self.version = parser.get_http_version()

    seen = Seen()
    parser = httptools.HttpRequestParser(seen)
    _strict(parser)
    raw = b"GET /x " + line + b"\r\nHost: a\r\n" + fields + b"\r\n"
    parser.feed_data(raw.replace(b" \r\n", b"\r\n"))

    taken = []

    class Capture:
        def handle(self, req):
            taken.append(req.http_version)
            return 200, b"", b"ok"

    _, proto, t, _ = make(pipeline=Capture())
    proto.data_received(raw.replace(b" \r\n", b"\r\n"))
    [(status, _, _)] = responses(t.out)
    if seen.version in ("1.0", "1.1"):
        assert taken == [seen.version] and status == 200
    else:
        assert taken == [] and status == (505 if seen.version == "2.0" else 400)


def test_correlation_id_taken_only_when_well_formed():
    for given, kept in [(b"abc-123_X.y", True), (b"a" * 64, True), (b"a" * 65, False),
                        (b"bad id", False), (b"semi;colon", False), (b"", False)]:
        _, proto, t, _ = make()
        proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: " + given + b"\r\n\r\n")
        [(_, h, _)] = responses(t.out)
        assert (h["x-correlation-id"] == given.decode()) is kept, given


def test_head_has_no_body_and_unknown_method_on_builtin_is_405():
    _, proto, t, _ = make()
    proto.data_received(b"HEAD /health/live HTTP/1.1\r\nHost: gw\r\n\r\nPOST /health/live HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    raw = bytes(t.out)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"content-length: 20" in head and rest.startswith(b"HTTP/1.1 405")
    assert b"allow: GET, HEAD" in rest


def test_expect_100_continue_only_after_the_request_is_dispatched():
    echo = Echo()
    _, proto, t, _ = make(pipeline=echo)
    proto.data_received(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert bytes(t.out) == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.data_received(b"hi")
    assert echo.sinks[0].chunks[-2:] == [b"hi", b""] and echo.sinks[0].ended


def test_expect_100_continue_refused_on_the_head_gets_no_100():
    class Refuse:
        def handle(self, req):
            return 401, b"", b"no"

    _, proto, t, _ = make(pipeline=Refuse())
    proto.data_received(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
    out = bytes(t.out)
    assert out.startswith(b"HTTP/1.1 401") and b"100 Continue" not in out
    assert b"connection: close" in out


def test_header_deadline_answers_408_and_idle_deadline_closes():
    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s, keepAliveTimeout: 5s}}")
    proto.data_received(b"GET /health/live HTTP/1.1\r\nHost:")
    proto.check_deadline(worker.now + 1)
    assert not t.ended
    proto.check_deadline(worker.now + 3)
    assert t.ended and bytes(t.out).startswith(b"HTTP/1.1 408")

    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s, keepAliveTimeout: 5s}}")
    proto.data_received(GET_LIVE)
    proto.check_deadline(worker.now + 4)
    assert not t.ended
    proto.check_deadline(worker.now + 6)
    assert t.ended and bytes(t.out).count(b"HTTP/1.1") == 1  # idle close sends nothing


def test_connection_cap_answers_503():
    worker, proto, t, _ = make("gateway: {http: {maxConnections: 1}}")
    second = new_protocol(worker)
    t2 = MockTransport()
    second.connection_made(t2)
    assert bytes(t2.out).startswith(b"HTTP/1.1 503") and t2.ended
    assert len(worker.connections) == 1


def test_draining_responses_carry_connection_close():
    worker, proto, t, _ = make()
    worker.draining = True
    proto.data_received(GET_LIVE)
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "close" and t.ended


def test_one_json_log_line_per_request():
    worker, proto, t, log = make()
    proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: cid-1\r\n\r\n"
                        b"GET /missing?x=1 HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: cid-2\r\n\r\n")
    records = [orjson.loads(line) for line in log.lines()]
    reqs = [r for r in records if r.get("correlationId")]
    assert [(r["correlationId"], r["path"], r["status"], r["method"]) for r in reqs] == [
        ("cid-1", "/health/live", 200, "GET"), ("cid-2", "/missing", 404, "GET")]
    for r in reqs:
        assert {"timestamp", "level", "message", "tenantId", "service", "durationMs"} <= set(r)
        assert r["timestamp"].endswith("Z")


def test_client_disconnect_runs_the_abort_hook():
    pipe = PendingPipeline()
    _, proto, t, _ = make(pipeline=pipe)
    proto.data_received(b"GET /slow HTTP/1.1\r\nHost: gw\r\n\r\n")
    aborted = []
    req = pipe.pending[0]

    class Waiting:
        def abort(self, over_limit=False):
            assert not over_limit
            aborted.append(req)
    req.pending = Waiting()
    proto.connection_lost(None)
    assert aborted == [req]
    proto.respond(req, 200, b"", b"late")  # an answer after the client left is dropped
    assert t.out == b""




def test_request_counts_reach_every_snapshot():
    """Accounting counts a label set's requests as C integers and folds them into the
    metrics' counts when a snapshot is taken: each snapshot has every request before it."""
    worker, proto, t, _ = make()
    for n in (3, 1, 0, 5):
        for _ in range(n):
            proto.data_received(GET_LIVE)
        proto.data_received(b"GET /nowhere HTTP/1.1\r\nHost: gw\r\n\r\n")
        counts = {tuple(k): v for *k, v in worker.metrics.snapshot()["requests"]}
    assert counts[("", "GET", "/health/live", 200)] == 9
    assert counts[("", "GET", "unmatched", 404)] == 4
    # Runs of one label set are counted through the last request's count; a change of
    # method, route or status in between takes another.
    for raw in (b"POST /nowhere", b"GET /nowhere", b"POST /nowhere", b"POST /nowhere",
                b"GET /health/live", b"GET /nowhere"):
        proto.data_received(raw + b" HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
    counts = {tuple(k): v for *k, v in worker.metrics.snapshot()["requests"]}
    assert counts[("", "POST", "unmatched", 404)] == 3
    assert counts[("", "GET", "unmatched", 404)] == 6
    assert counts[("", "GET", "/health/live", 200)] == 10
