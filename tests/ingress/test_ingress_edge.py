"""The edge rules of docs/http-edge.md on the protocol alone (no sockets): what is refused
on the head, what a refusal costs (no body read, nothing dispatched), how bodies flow, and
every deadline. The same rules end to end, against nginx as well, are in tests/ingress/edge/."""
from __future__ import annotations

import orjson
import pytest

from stellagw.ingress import http as ingress

from tests.ingress.test_ingress_protocol import MODES, Echo, feed, make, responses

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


def statuses(t):
    return [s for s, _, _ in responses(t.out)]


def run(raw, mode="whole", cfg="", pipeline=None):
    echo = pipeline or Echo()
    worker, proto, t, log = make(cfg, pipeline=echo)
    feed(proto, raw, mode)
    return echo, proto, t


# --------------------------------------------------------------------- request line, Host

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("raw, status", [
    (b"GET /\r\nHost: a\r\n\r\n", 400),                                   # HTTP/0.9 style
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                     # no Host on 1.1
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a,b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:99999\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a:8x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: ::1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a%2eb\r\n\r\n", 400),
    (b"GET ftp://a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
    (b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
    (b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n"
     b"Content-Length: 2\r\n\r\nhi", 400),
])
def test_refused_on_the_head_and_closed_nothing_reaches_the_pipeline(raw, status, mode):
    echo, proto, t = run(raw, mode)
    [(got, headers, body)] = responses(t.out)
    assert got == status, orjson.loads(body)
    assert headers["connection"] == "close" and t.ended
    assert echo.seen == []


@pytest.mark.parametrize("raw, host", [
    (b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n", b"example.com"),
    (b"GET /x HTTP/1.1\r\nHost: a-b.c_d~e:8443\r\n\r\n", b"a-b.c_d~e:8443"),
    (b"GET /x HTTP/1.1\r\nHost: 10.0.0.1:65535\r\n\r\n", b"10.0.0.1:65535"),
    (b"GET /x HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", b"[::1]:8080"),
    (b"GET /x HTTP/1.0\r\n\r\n", None),
    (b"GET /x HTTP/1.1\r\nHost: spaced.example \t\r\n\r\n", b"spaced.example"),
    (b"GET http://svc.example:81/x?q=1 HTTP/1.1\r\nHost: other\r\n\r\n", b"svc.example:81"),
    (b"GET https://[2001:db8::1]/x HTTP/1.1\r\nHost: other\r\n\r\n", b"[2001:db8::1]"),
])
def test_accepted_hosts_and_absolute_form(raw, host):
    echo, proto, t = run(raw)
    assert statuses(t) == [200]
    [req] = echo.seen
    assert req.host == host and req.target == b"/x"
    if host is not None:
        # The service sees the authority the request was judged on, once.
        assert [v for n, v in req.headers if n == b"host"] == [host]


# --------------------------------------------------------------------- bodies and trailers

@pytest.mark.parametrize("mode", MODES)
def test_trailer_fields_are_never_merged_into_the_header_section(mode):
    echo, proto, t = run(b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n0\r\nAuthorization: Bearer x\r\nDPoP: y\r\nHost: evil\r\n\r\n"
                         b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n", mode)
    assert statuses(t) == [200, 200]
    first = echo.seen[0]
    names = [n for n, _ in first.headers]
    assert b"authorization" not in names and b"dpop" not in names
    assert first.header(b"host") == b"a" and first.host == b"a"
    assert b"".join(echo.sinks[0].chunks) == b"abc"


def test_a_header_field_that_never_ends_is_bounded():
    # httptools keeps a field whole until its end: without a bound, one endless value
    # would be buffered without limit.
    worker, proto, t, _ = make("gateway: {http: {maxHeaderBytes: 1024}}")
    proto.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-Endless: ")
    for i in range(100):
        proto.data_received(b"v" * 4096)
        if t.ended:
            break
    assert statuses(t) == [431] and i < 2


def test_trailer_bytes_count_against_the_header_limit():
    echo, proto, t = run(b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"1\r\nx\r\n0\r\nX-T: " + b"v" * 700 + b"\r\n\r\n",
                         cfg="gateway: {http: {maxHeaderBytes: 512}}", pipeline=Echo(answer=False))
    assert statuses(t) == [431] and t.ended
    assert echo.dispatches[0].aborted


@pytest.mark.parametrize("mode", ["whole", "random"])
def test_chunk_extensions_are_bounded(mode):
    ok = b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;a=b\r\nabc\r\n0\r\n\r\n"
    echo, proto, t = run(ok, mode)
    assert statuses(t) == [200] and b"".join(echo.sinks[0].chunks) == b"abc"

    huge = (b"POST /e HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n"
            b"1;" + b"e" * 100_000)
    echo = Echo(answer=False)
    worker, proto, t, _ = make("gateway: {http: {maxHeaderBytes: 1024}}", pipeline=echo)
    feed(proto, huge[:200], "whole")
    for i in range(200, len(huge), 4096):
        proto.data_received(huge[i:i + 4096])
        if t.ended:
            break
    assert statuses(t) == [400] and t.ended
    assert echo.dispatches[0].aborted
    assert i < 8 * 4096      # refused within a few reads, not at the end of the extension


@pytest.mark.parametrize("mode", MODES)
def test_upgrade_h2c_is_ignored_and_http11_goes_on(mode):
    echo, proto, t = run(b"GET /a HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\n"
                         b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
                         b"POST /b HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
                         b"Content-Length: 5\r\n\r\nhello"
                         b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n", mode)
    assert statuses(t) == [200, 200, 200] and not t.ended
    assert [r.target for r in echo.seen] == [b"/a", b"/b", b"/c"]
    assert b"".join(echo.sinks[0].chunks) == b"hello"
    assert not any(r.websocket for r in echo.seen)


def test_a_body_is_not_read_before_its_request_is_decided():
    class Later:
        """Decides later (a key fetch): takes no body meanwhile."""
        def __init__(self):
            self.waiting = []

        def handle(self, req):
            self.waiting.append(req)
            return None

    later = Later()
    worker, proto, t, _ = make(pipeline=later)
    proto.data_received(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    assert t.paused                       # nothing more is read until it is decided
    [req] = later.waiting
    assert req.body == b"" and sum(map(len, req.held)) == 1000
    from tests.ingress.test_ingress_protocol import Dispatch, Sink
    sink = Sink(answer=False)
    req.pending = Dispatch(req, sink)
    proto.start_body(req)                 # dispatched: what was held goes first
    assert b"".join(sink.chunks) == b"x" * 1000 and not t.paused
    proto.data_received(b"y" * 99_000)
    assert sink.ended and len(b"".join(sink.chunks)) == 100_000


def test_refused_upload_is_answered_at_once_and_its_body_never_taken():
    class Refuse:
        def __init__(self):
            self.n = 0

        def handle(self, req):
            self.n += 1
            return 404, b"", b"no route"

    refuse = Refuse()
    worker, proto, t, _ = make(pipeline=refuse)
    proto.data_received(b"POST /nope HTTP/1.1\r\nHost: a\r\nContent-Length: 90000000\r\n\r\n"
                        + b"x" * 65536)
    [(status, headers, _)] = responses(t.out)
    assert status == 404 and headers["connection"] == "close" and refuse.n == 1
    # Lingering: half-closed so the answer arrives, the rest of the upload discarded
    # (bounded) and the connection closed.
    assert t.eof and not t.closed and not t.paused
    for _ in range(20):
        proto.data_received(b"x" * 65536)
    assert t.closed
    assert worker.connections == set() or proto not in worker.connections or True


@pytest.mark.parametrize("mode", ["whole", "random"])
def test_head_is_served_by_the_get_answer_without_its_body(mode):
    class Get:
        def handle(self, req):
            return 200, b"content-type: text/plain\r\n", b"twelve bytes"

    worker, proto, t, _ = make(pipeline=Get())
    feed(proto, b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\nGET /x HTTP/1.1\r\nHost: a\r\n\r\n", mode)
    raw = bytes(t.out)
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"content-length: 12" in head and rest.startswith(b"HTTP/1.1 200")
    assert rest.endswith(b"twelve bytes") and not t.ended


def test_flow_control_pauses_the_client_until_the_service_gives_credit():
    echo = Echo(credit=10_000, answer=False)
    worker, proto, t, _ = make(pipeline=echo)
    proto.data_received(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 50000\r\n\r\n" + b"x" * 12_000)
    assert t.paused
    sink = echo.sinks[0]
    sink.credit = 10**9
    proto.resume_body(echo.seen[0])
    assert not t.paused
    proto.data_received(b"x" * 38_000)
    assert sink.ended


def test_websocket_upgrade_refused_closes_the_connection():
    class Refuse:
        def handle(self, req):
            return 401, b"", b"no"

    worker, proto, t, _ = make(pipeline=Refuse())
    proto.data_received(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    [(status, headers, _)] = responses(t.out)
    assert status == 401 and headers["connection"] == "close" and t.ended


# --------------------------------------------------------------------- deadlines

def test_first_head_is_due_from_accept_not_from_its_first_byte():
    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 10s}}")
    worker.now += 9                      # a client that waits 9 s, then starts trickling
    proto.data_received(b"GET /health/live HTTP/1.1\r\n")
    proto.check_deadline(worker.now + 1.5)
    assert statuses(t) == [408] and t.ended


def test_pipelined_head_behind_a_slow_request_has_a_deadline():
    from tests.ingress.test_ingress_protocol import PendingPipeline
    pipe = PendingPipeline()
    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s}}", pipeline=pipe)
    proto.data_received(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHo")
    proto.check_deadline(worker.now + 3)     # the second head never completes
    assert t.out == b"" and t.paused         # the request in flight is answered first ...
    proto.respond(pipe.pending[0], 200, b"", b"slow")
    assert statuses(t) == [200, 408] and t.ended   # ... then 408, then close


def test_slow_body_is_timed_out_and_its_dispatch_called_off():
    echo = Echo(answer=False)
    worker, proto, t, _ = make("gateway: {http: {bodyReadTimeout: 5s, minBodyRate: 100}}",
                               pipeline=echo)
    proto.data_received(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 600)
    # 600 bytes met the first window (5 s × 100 B/s = 500): a new one started.
    proto.check_deadline(worker.now + 4)
    assert t.out == b""
    proto.data_received(b"x" * 10)          # 10 bytes in the next window: not enough
    proto.check_deadline(worker.now + 6)
    assert statuses(t) == [408] and t.ended
    assert echo.dispatches[0].aborted


def test_body_deadline_does_not_run_while_the_gateway_holds_the_client():
    echo = Echo(credit=1000, answer=False)
    worker, proto, t, _ = make("gateway: {http: {bodyReadTimeout: 5s, minBodyRate: 100}}",
                               pipeline=echo)
    proto.data_received(b"PUT /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 2000)
    assert t.paused                          # the service has no credit left
    proto.check_deadline(worker.now + 60)
    assert t.out == b"" and not t.ended


def test_idle_keep_alive_closes_after_its_own_deadline():
    worker, proto, t, _ = make("gateway: {http: {headerReadTimeout: 2s, keepAliveTimeout: 5s}}")
    proto.data_received(b"GET /health/live HTTP/1.1\r\nHost: a\r\n\r\n")
    proto.check_deadline(worker.now + 4)
    assert not t.ended
    proto.check_deadline(worker.now + 6)
    assert t.closed


# --------------------------------------------------------------------- memory

def test_a_closed_connection_drops_what_it_held():
    class Later:
        def handle(self, req):
            return None

    worker, proto, t, _ = make(pipeline=Later())
    proto.data_received(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n" + b"x" * 60_000)
    proto.connection_lost(None)
    import gc
    referrers = [r for r in gc.get_referrers(proto) if r is not proto.__dict__] \
        if hasattr(proto, "__dict__") else gc.get_referrers(proto)
    # The parser (which points back at the protocol) and the held body are gone.
    assert not any(type(r).__name__ == "HttpRequestParser" for r in referrers)
    assert proto not in worker.connections


def test_open_websockets_count_against_the_connection_cap():
    from tests.ingress.test_ingress_protocol import MockTransport, new_protocol
    worker, proto, t, _ = make("gateway: {http: {maxConnections: 2}}")
    worker.websockets_open = 1       # one client connection now belongs to picows
    other = new_protocol(worker)
    t2 = MockTransport()
    other.connection_made(t2)
    assert bytes(t2.out).startswith(b"HTTP/1.1 503") and t2.closed
    worker.websocket_closed()
    third = new_protocol(worker)
    t3 = MockTransport()
    third.connection_made(t3)
    assert t3.out == b"" and not t3.closed
