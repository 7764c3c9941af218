"""HttpProtocol without sockets: a mock transport, every input whole, byte by byte and at
random cut points (STYLE §32, §35).

Every test runs against both implementations: the compiled protocol (cext/ingress.pyx)
and its pure-Python twin (stellagw/_py/ingress.py) must answer byte for byte alike."""
from __future__ import annotations

import random

import orjson
import pytest

from stellagw import _impl
from stellagw._py import ingress as py_ingress
from stellagw.gateway import Worker

from .gwtest import NullLog, settings_from


class MockTransport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False
        self.paused = False
        self.writes = 0

    def write(self, data):
        assert not self.closed, "write after close"
        self.out += data
        self.writes += 1

    def close(self):
        self.closed = True

    def is_closing(self):
        return self.closed

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", 5555)}.get(name, default)


IMPLS = ["python"] if _impl.NO_EXTENSIONS else ["compiled", "python"]
_module = None


@pytest.fixture(autouse=True, params=IMPLS)
def impl(request):
    """Which implementation make() builds the protocol (and the worker's Accounting) of."""
    global _module
    if request.param == "python":
        _module = py_ingress
    else:
        from stellagw._cext import ingress
        _module = ingress
    yield request.param
    _module = None


def new_protocol(worker, module=None):
    module = module or _module
    if not isinstance(worker.accounting, module.Accounting):
        worker.accounting = module.Accounting(worker, worker.accounting.cid_prefix)
    return module.HttpProtocol(worker)


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
    assert not t.closed


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

        def abort(self):
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
    (b"GET / HTTP/9.9\r\nHost: a\r\n\r\n", 400),
    (b"G@T / HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),                   # TLS to a plain port
    (b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHost: a\r\n\r\n", 400),
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
    assert t.closed


def test_answers_before_a_malformed_one_are_kept():
    _, proto, t, _ = make()
    proto.data_received(GET_LIVE + b"GARBAGE\r\n\r\n")
    got = responses(t.out)
    assert [s for s, _, _ in got] == [200, 400]
    assert t.closed


@pytest.mark.parametrize("mode", ["whole", "random"])
def test_limits(mode):
    cases = [
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 600 + b"\r\n\r\n", 431),
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
        _, proto, t, _ = make(cfg)
        feed(proto, raw, mode)
        [(got, _, body)] = responses(t.out)
        assert got == status, raw[:40]
        assert orjson.loads(body)["error"]["code"]
        assert t.closed


@pytest.mark.parametrize("mode", MODES)
def test_chunked_and_content_length_bodies_reach_the_pipeline(mode):
    seen = []

    class Echo:
        def handle(self, req):
            seen.append(req.body)
            return 200, b"", req.body

    _, proto, t, _ = make(pipeline=Echo())
    feed(proto, b"POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
                b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n", mode)
    assert seen == [b"hello", b"abcde"]
    assert [b for _, _, b in responses(t.out)] == [b"hello", b"abcde"]


def test_http10_closes_unless_keep_alive():
    _, proto, t, _ = make()
    proto.data_received(b"GET /health/live HTTP/1.0\r\n\r\n")
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "close" and t.closed

    _, proto, t, _ = make()
    proto.data_received(b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "keep-alive" and not t.closed


def test_correlation_id_taken_only_when_well_formed():
    for given, kept in [(b"abc-123_X.y", True), (b"a" * 64, True), (b"a" * 65, False),
                        (b"bad id", False), (b"semi;colon", False), (b"", False)]:
        _, proto, t, _ = make()
        proto.data_received(b"GET /health/live HTTP/1.1\r\nX-Correlation-Id: " + given + b"\r\n\r\n")
        [(_, h, _)] = responses(t.out)
        assert (h["x-correlation-id"] == given.decode()) is kept, given


def test_head_has_no_body_and_unknown_method_on_builtin_is_405():
    _, proto, t, _ = make()
    proto.data_received(b"HEAD /health/live HTTP/1.1\r\n\r\nPOST /health/live HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    raw = bytes(t.out)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"content-length: 20" in head and rest.startswith(b"HTTP/1.1 405")
    assert b"allow: GET, HEAD" in rest


def test_expect_100_continue():
    seen = []

    class Echo:
        def handle(self, req):
            seen.append(req.body)
            return 200, b"", b"ok"

    _, proto, t, _ = make(pipeline=Echo())
    proto.data_received(b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert bytes(t.out) == b"HTTP/1.1 100 Continue\r\n\r\n"
    proto.data_received(b"hi")
    assert seen == [b"hi"]


def test_header_deadline_answers_408_and_idle_deadline_closes():
    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s, keepAliveTimeout: 5s}}")
    proto.data_received(b"GET /health/live HTTP/1.1\r\nHost:")
    proto.check_deadline(worker.now + 1)
    assert not t.closed
    proto.check_deadline(worker.now + 3)
    assert t.closed and bytes(t.out).startswith(b"HTTP/1.1 408")

    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s, keepAliveTimeout: 5s}}")
    proto.data_received(GET_LIVE)
    proto.check_deadline(worker.now + 4)
    assert not t.closed
    proto.check_deadline(worker.now + 6)
    assert t.closed and bytes(t.out).count(b"HTTP/1.1") == 1  # idle close sends nothing


def test_connection_cap_answers_503():
    worker, proto, t, _ = make("gateway: {http: {maxConnections: 1}}")
    second = new_protocol(worker)
    t2 = MockTransport()
    second.connection_made(t2)
    assert bytes(t2.out).startswith(b"HTTP/1.1 503") and t2.closed
    assert len(worker.connections) == 1


def test_draining_responses_carry_connection_close():
    worker, proto, t, _ = make()
    worker.draining = True
    proto.data_received(GET_LIVE)
    [(_, h, _)] = responses(t.out)
    assert h["connection"] == "close" and t.closed


def test_one_json_log_line_per_request():
    worker, proto, t, log = make()
    proto.data_received(b"GET /health/live HTTP/1.1\r\nX-Correlation-Id: cid-1\r\n\r\n"
                        b"GET /missing?x=1 HTTP/1.1\r\nX-Correlation-Id: cid-2\r\n\r\n")
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
    proto.data_received(b"GET /slow HTTP/1.1\r\n\r\n")
    aborted = []
    req = pipe.pending[0]

    class Waiting:
        def abort(self):
            aborted.append(req)
    req.pending = Waiting()
    proto.connection_lost(None)
    assert aborted == [req]
    proto.respond(req, 200, b"", b"late")  # an answer after the client left is dropped
    assert t.out == b""


# --------------------------------------------------------------------- compiled vs twin

_PIECES = [
    GET_LIVE,
    b"GET /health/ready HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: abc-1\r\n\r\n",
    b"HEAD /health/live HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /nope?x=1 HTTP/1.1\r\nHOST: gw\r\nX-Service-Version: 1.2.3\r\n\r\n",
    b"GET http://gw/health/live HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"POST /health/live HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"PUT /y HTTP/1.1\r\nHost: gw\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
    b"GET /health/live HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /health/live HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: gw\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
    b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nX-Big: " + b"v" * 600 + b"\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: gw\r\nContent-Length: 99999\r\n\r\n",
    b"BROKEN\r\n\r\n",
    b"GET /health/live HTTP/1.1\r\nHost: gw\nX: y\r\n\r\n",
]


def _differential_workers():
    from stellagw._cext import ingress
    out = []
    for module in (py_ingress, ingress):
        worker = Worker(settings_from("gateway: {http: {maxUrlLength: 256, maxHeaderBytes: 512}}"),
                        0, log=NullLog().log)
        worker.started = True
        worker.date_header = b"date: Sat, 28 Nov 2026 00:00:00 GMT\r\n"
        out.append((module, worker))
    return out


def _run_both(workers, stream: bytes, cuts: list[int]):
    outs = []
    for module, worker in workers:
        # The same made-up correlation ids on both.
        worker.accounting = module.Accounting(worker, "fixed0")
        worker.connections.clear()
        proto = module.HttpProtocol(worker)
        t = MockTransport()
        proto.connection_made(t)
        prev = 0
        for cut in sorted(cuts) + [len(stream)]:
            if cut > prev:
                proto.data_received(stream[prev:cut])
                prev = cut
        outs.append((bytes(t.out), t.closed, t.paused, t.writes))
    return outs


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="needs the compiled module")
def test_compiled_and_twin_answer_byte_for_byte(impl):
    if impl != "compiled":
        pytest.skip("one run compares both")
    rng = random.Random(2026)
    workers = _differential_workers()
    for _ in range(600):
        pieces = [rng.choice(_PIECES) for _ in range(rng.randint(1, 5))]
        stream = b"".join(pieces)
        cuts = [rng.randint(0, len(stream)) for _ in range(rng.randint(0, 6))]
        py_out, c_out = _run_both(workers, stream, cuts)
        assert c_out == py_out, (pieces, cuts)
