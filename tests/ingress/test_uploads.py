"""Uploads and large answers end to end: the gateway (`stellagw serve`) and an SDK service,
each in its own process, over loopback. What a request body costs the gateway is bounded by
the stream window, not by the body; a refused upload costs nothing; memory comes back when
connections close (docs/http-edge.md, issue 15)."""
from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time

import orjson
import psutil
import pytest

from perf.uploads import Sampler, send_body
from tests.support.gwtest import Served, connect, port_of, read_response, request, wait_for
from tests.support.services import start_service

CONFIG = """
gateway:
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  logging: {accessLog: false}
"""
MB = 1024 * 1024
UPLOAD = 50 * MB
CLIENTS = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    gw = Served(config_text=CONFIG, tmp_path=tmp_path_factory.mktemp("uploads"))
    rec = gw.wait_listening()[0]
    http, tcp = port_of(rec["http"]), port_of(rec["tcp"])
    try:
        with start_service("up", tcp, region="eu1", version="1.0.0", instance="up-1", wait=http):
            yield http, psutil.Process(gw.proc.pid)
    finally:
        gw.stop()


def uploads_seen(http):
    return orjson.loads(request(http, b"GET /t/up/uploads HTTP/1.1\r\nHost: t\r\n\r\n")[2])["uploads"]


def cancelled_uploads(http):
    return orjson.loads(request(http, b"GET /t/up/uploads HTTP/1.1\r\nHost: t\r\n\r\n")[2])["cancelled"]


def settled_rss(proc, above, timeout=10.0):
    """RSS once it stops falling (freed buffers may take a tick to go back)."""
    deadline = time.monotonic() + timeout
    rss = proc.memory_info().rss
    while time.monotonic() < deadline and rss > above:
        time.sleep(0.25)
        rss = proc.memory_info().rss
    return rss


def test_concurrent_uploads_to_a_slow_service_hold_a_window_each_not_the_body(stack):
    http, proc = stack
    start = proc.memory_info().rss
    expect = hashlib.sha256(b"z" * UPLOAD).hexdigest()
    results = []

    def upload():
        with connect(http, timeout=120) as s:
            s.sendall(b"POST /t/up/upload?ms=20 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                      % UPLOAD)
            send_body(s, UPLOAD)
            status, _, body = read_response(s)[:3]
            results.append((status, orjson.loads(body)))

    with Sampler(proc.pid) as watch:
        threads = [threading.Thread(target=upload) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
    assert results == [(200, {"bytes": UPLOAD, "sha256": expect})] * CLIENTS
    # 1 GB went through; each upload held at most its stream window and a read or two.
    assert watch.peak - start < 64 * MB, (start / MB, watch.peak / MB)
    assert settled_rss(proc, start + 16 * MB) - start < 16 * MB


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_a_client_that_leaves_while_its_upload_waits_for_credit_is_let_go(stack, how):
    # The service takes a MiB, then sleeps a minute: the gateway holds the rest of the body
    # back (it stops reading the client). Clients that then leave were not noticed — nothing
    # read them — and each held its connection (and the client's place) until the route's
    # timeout, 120 s here (an adversarial probe). Seen on the next tick now.
    http, proc = stack

    def held():
        # The gateway's open descriptors: the kernel's view of the connection (ESTABLISHED,
        # CLOSE_WAIT, gone after an RST) says nothing of whether the gateway let it go.
        return proc.num_fds()
    seen = set(uploads_seen(http))
    # The baseline once the connections of the requests before (this one's, the last
    # test's) are let go: no fewer descriptors for 0.3 s.
    before = held()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = held()
        if now >= before:
            break
        before = now
    socks = []
    for _ in range(3):
        s = connect(http)
        s.settimeout(5)
        s.sendall(b"POST /t/up/upload?ms=60000 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n"
                  % (4 * MB))
        s.sendall(b"z" * (MB + MB // 2))
        socks.append(s)
    assert wait_for(lambda: held() >= before + 3, 5)
    time.sleep(0.5)
    assert held() >= before + 3          # held back, not refused
    for s in socks:
        if how == "rst":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    assert wait_for(lambda: held() <= before, 5), (held(), before)
    # The service is told at once, not at the route's timeout two minutes on: each of the
    # three uploads' handlers was ended by a CANCEL.
    mine = set(uploads_seen(http)) - seen
    assert len(mine) == 3
    assert wait_for(lambda: mine <= set(cancelled_uploads(http)), 5), cancelled_uploads(http)


def test_anonymous_uploads_to_an_unknown_route_are_refused_on_the_head(stack):
    http, proc = stack
    before = len(uploads_seen(http))
    start = proc.memory_info().rss
    statuses = []

    def upload():
        with connect(http, timeout=30) as s:
            s.sendall(b"POST /nowhere/x HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (90 * MB))
            sent = send_body(s, 90 * MB)
            statuses.append((read_response(s)[0], sent))

    with Sampler(proc.pid) as watch:
        threads = [threading.Thread(target=upload) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert [s for s, _ in statuses] == [404] * 5
    # Refused on the head: the rest of each upload was never taken (the client's writes
    # failed long before 90 MB), and nothing of it stayed in the gateway.
    assert all(sent < 30 * MB for _, sent in statuses), statuses
    assert watch.peak - start < 32 * MB
    assert len(uploads_seen(http)) == before


def test_an_upload_refused_on_the_head_gets_no_100_continue_and_reaches_nothing(stack):
    http, _ = stack
    before = len(uploads_seen(http))
    with connect(http, timeout=10) as s:
        s.sendall(b"POST /t/up/secure-upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 1000000\r\n\r\n")
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 401") and b"100 Continue" not in head
    assert b"connection: close" in head
    assert len(uploads_seen(http)) == before


def test_expect_100_continue_comes_once_the_upload_is_accepted(stack):
    http, _ = stack
    with connect(http, timeout=10) as s:
        s.sendall(b"POST /t/up/upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 5\r\n\r\n")
        assert s.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        status, _, body = read_response(s)[:3]
    assert status == 200 and orjson.loads(body)["bytes"] == 5


def test_chunked_upload_streams_and_the_connection_stays_usable(stack):
    http, _ = stack
    with connect(http, timeout=30) as s:
        s.sendall(b"POST /t/up/upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(64):
            s.sendall(b"4000\r\n" + b"c" * 0x4000 + b"\r\n")
        s.sendall(b"0\r\nX-Trailer: dropped\r\n\r\n")
        status, _, body = read_response(s)[:3]
        assert status == 200
        assert orjson.loads(body) == {"bytes": 64 * 0x4000,
                                      "sha256": hashlib.sha256(b"c" * 64 * 0x4000).hexdigest()}
        s.sendall(b"GET /t/up/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 200


def test_a_service_answering_before_the_body_ends_closes_the_connection(stack):
    http, _ = stack
    with connect(http, timeout=10) as s:
        s.sendall(b"POST /t/up/early HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (8 * MB))
        send_body(s, 256 * 1024)
        status, headers, body = read_response(s)[:3]
    assert status == 409 and body == b"no thanks" and headers["connection"] == "close"


def test_head_on_a_get_route_end_to_end(stack):
    http, _ = stack
    with connect(http, timeout=10) as s:
        s.sendall(b"HEAD /t/up/whoami HTTP/1.1\r\nHost: t\r\n\r\nGET /t/up/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.5)
        s.settimeout(5)
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    assert length > 0 and rest.startswith(b"HTTP/1.1 200")    # no body after the HEAD answer


def test_a_large_plain_response_is_streamed_not_refused(stack):
    http, proc = stack
    with connect(http, timeout=30) as s:
        s.sendall(b"GET /t/up/big?mb=20 HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    total = 0
    while body:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        total += n
        body = rest[n + 2:]
    assert total == 20 * MB


@pytest.mark.twin     # uncompiled too: a Python frame keeps its locals, a compiled one none
def test_closed_connections_are_not_left_for_the_cycle_collector():
    """In process, with the collector off: every HttpProtocol of a closed connection is
    freed by reference counting alone (gc.freeze() at start-up means full collections are
    rare; a cycle here would keep each connection's buffers until one runs)."""
    import gc

    from stellagw.ingress.http import HttpProtocol

    from tests.support.gwtest import GatewayThread, settings_from

    def alive():
        return sum(1 for o in gc.get_objects() if type(o) is HttpProtocol)

    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    try:
        port = gw.worker.http_address[1]
        gc.collect()
        gc.disable()
        try:
            base = alive()
            for i in range(50):
                with connect(port) as s:
                    raw = (b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n" if i % 2 else
                           b"POST /nowhere HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + b"x" * 5000)
                    s.sendall(raw)
                    read_response(s)
                    s.shutdown(socket.SHUT_WR)
            assert wait_for(lambda: len(gw.worker.connections) == 0, 10)
            assert wait_for(lambda: alive() <= base, 10), alive() - base
        finally:
            gc.enable()
    finally:
        gw.stop()


ENDPOINT_CONFIG = """
gateway:
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  auth: {authority: "https://authority.example"}
"""


def test_an_endpoint_declares_its_own_body_limit_and_sender_constraint(tmp_path):
    """HELLO's max_body_bytes and sender_constrained, through a real SDK service."""
    import asyncio

    from stellagw.service import Response, Service

    gw = Served(config_text=ENDPOINT_CONFIG, tmp_path=tmp_path)
    rec = gw.wait_listening()[0]
    http, tcp = port_of(rec["http"]), port_of(rec["tcp"])
    reached = []
    svc = Service("lim", "1.0.0", gateways=[f"127.0.0.1:{tcp}"], reconnect_min=0.05)

    @svc.post("/lim/small", max_body_bytes=1000, streaming=True)
    async def small(req):
        reached.append(sum([len(c) async for c in req.stream()]))
        return Response(b"ok")

    @svc.get("/lim/bound", sender_constrained=True)
    async def bound(req):
        reached.append("bound")
        return Response(b"ok")

    loop = asyncio.new_event_loop()
    stopped = threading.Event()

    async def main():
        await svc.start()
        while not stopped.is_set():
            await asyncio.sleep(0.05)
        await svc.stop(1.0)

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: request(http, b"POST /lim/small HTTP/1.1\r\nHost: t\r\n"
                                              b"Content-Length: 3\r\n\r\nabc")[0] == 200, 20)
        reached.clear()
        status, headers, _ = request(http, b"POST /lim/small HTTP/1.1\r\nHost: t\r\n"
                                           b"Content-Length: 1001\r\n\r\n")
        assert status == 413 and headers["connection"] == "close"
        with connect(http, timeout=10) as s:
            s.sendall(b"POST /lim/small HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                      + b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n")
            assert read_response(s)[0] == 413
        # A Bearer token that is not bound is refused before any signature matters; the
        # same request elsewhere is only refused for the token itself.
        status, headers, body = request(http, b"GET /lim/bound HTTP/1.1\r\nHost: t\r\n"
                                              b"Authorization: Bearer a.b.c\r\n\r\n")
        assert status == 401 and "www-authenticate" in headers
        assert reached == []
    finally:
        stopped.set()
        thread.join(10)
        gw.stop()
