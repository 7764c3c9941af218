"""One request, one line, one count: every request whose head the gateway read leaves
exactly one access-log line and one count in gateway_requests_total, answered or not
(docs/operations.md, Logs; docs/security.md §3d, "a request cut short leaves no trace").

A real worker (GatewayThread) with a real SDK service over loopback sockets; each request
carries its own X-Correlation-Id, and the test compares what the client got, the log lines
and the worker's counts request by request."""
from __future__ import annotations

import socket
import time

import orjson

from tests.support.gwtest import (GatewayThread, NullLog, connect, read_response,
                                  settings_from, wait_for)
from tests.support.services import ServiceProcess


CIDS = ("left-waiting", "reset-waiting", "reset-queued", "cut-stream", "behind-cut", "closes",
        "too-large")


def _get(path: str, cid: str, extra: bytes = b"") -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: %s\r\n%s\r\n"
            % (path.encode(), cid.encode(), extra))


class _Seen:
    def __init__(self, gw, log):
        self.gw, self.log, self.records = gw, log, []

    def lines(self, cid):
        self.records += [r for r in map(orjson.loads, self.log.lines())
                         if r.get("message", "").startswith("Request ")]
        return [r for r in self.records if r["correlationId"] == cid]

    def counts(self):
        snap = self.gw.call(lambda: self.gw.worker.metrics.snapshot())
        return {tuple(row[:4]): row[4] for row in snap["requests"]}


def test_every_request_read_is_logged_and_counted_once_answered_or_not(tmp_path):
    log = NullLog()
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0, headerReadTimeout: 1s}, routing: {streamIdleTimeout: 1s}}"), log=log.log).start()
    svc = ServiceProcess("acct", gw.transport_port).start()
    seen = _Seen(gw, log)
    try:
        svc.wait_routable(gw.port, timeout=15)
        before = seen.counts()

        # 1. The client leaves while the service works on its request: 499, the
        #    service's handler cancelled.
        with connect(gw.port) as s:
            s.sendall(_get("/t/acct/slow?ms=3000", "left-waiting"))
            time.sleep(0.3)
        # 2. It resets instead (RST), with a pipelined request queued behind.
        s = connect(gw.port)
        s.sendall(_get("/t/acct/slow?ms=3000", "reset-waiting")
                  + _get("/t/acct/whoami", "reset-queued"))
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        # 3. Pipelined behind a streamed answer the gateway cuts (the service stalls past
        #    streamIdleTimeout: 504 logged, the connection closed): never started, 444.
        with connect(gw.port) as s:
            s.sendall(_get("/t/acct/stall?ms=4000", "cut-stream")
                      + _get("/t/acct/whoami", "behind-cut"))
            status, _, _ = read_response(s)   # the head, then "first\n", then the close
            assert status == 200
            while s.recv(65536):
                pass
        # 3b. Bytes after a request that said `Connection: close` are not a request: not
        #     read, answered or logged (they were, under the first one's id, as a 444).
        with connect(gw.port) as s:
            s.sendall(_get("/t/acct/slow?ms=200", "closes", b"Connection: close\r\n")
                      + _get("/t/acct/whoami", "after-close"))
            status, _, _ = read_response(s)
            assert status == 200
        # 4. A head begun and never finished: 408 at headerReadTimeout, logged and counted.
        with connect(gw.port) as s:
            s.sendall(b"GET /t/acct/whoami HTTP/1.1\r\nHost: gw\r\n")
            status, _, _ = read_response(s)
            assert status == 408

        # 5. Refused on its Content-Length before the head was judged to its end: the line
        #    names the path asked for (it said ""), the count stays under `invalid`.
        with connect(gw.port) as s:
            s.sendall(_get("/t/acct/echo?q=1", "too-large", b"Content-Length: 99999999999\r\n")
                      .replace(b"GET", b"POST", 1))
            status, _, _ = read_response(s)
            assert status == 413

        def logged():
            return all(seen.lines(cid) for cid in CIDS)
        assert wait_for(logged, timeout=5), str([(r["correlationId"], r["status"], r["path"], r["method"])
                                             for r in seen.records if r["status"] != 404])
        time.sleep(0.3)     # anything logged twice would be there by now
        lines = {cid: seen.lines(cid) for cid in CIDS + ("after-close",)}
        assert {cid: [(r["status"], r["service"]) for r in rs] for cid, rs in lines.items()} == {
            "left-waiting": [(499, "acct")], "reset-waiting": [(499, "acct")],
            "reset-queued": [(499, "")], "cut-stream": [(504, "acct")],
            "behind-cut": [(444, "")], "closes": [(200, "acct")], "after-close": [],
            "too-large": [(413, "")]}
        assert lines["too-large"][0]["path"] == "/t/acct/echo"
        timed_out = [r for r in seen.records if r["status"] == 408]
        assert len(timed_out) == 1 and timed_out[0]["method"] == "-"

        after = seen.counts()
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        assert delta.pop(("acct", "GET", "/t/acct/slow", 499)) == 2
        assert delta.pop(("", "GET", "unrouted", 499)) == 1
        assert delta.pop(("", "GET", "unrouted", 444)) == 1
        assert delta.pop(("", "-", "invalid", 408)) == 1
        assert delta.pop(("", "POST", "invalid", 413)) == 1
        assert delta.pop(("acct", "GET", "/t/acct/slow", 200)) == 1      # "closes"
        assert delta.pop(("acct", "GET", "/t/acct/stall", 504)) == 1
        assert set(delta) <= {("acct", "GET", "/t/acct/whoami", 200)}   # wait_routable's
        # What reached the service: both slow requests, each cancelled when its client left.
        assert wait_for(lambda: {"left-waiting", "reset-waiting"} <= set(
            orjson.loads(_fetch(gw.port, "/t/acct/events"))["cancelled"]), timeout=5)
        assert gw.call(lambda: gw.worker.metrics.active_connections.get("ingress", 0)) <= 1
    finally:
        svc.stop()
        gw.stop()


def _fetch(port, path):
    with connect(port) as s:
        s.sendall(_get(path, "probe-events", b"Connection: close\r\n"))
        return read_response(s)[2]


def test_refusals_before_any_request_are_counted_by_reason():
    """No request line for them, so a count: a connection that sends nothing before
    headerReadTimeout (408, closed), and over plain HTTP a connection without its PROXY
    header or from a peer not trusted to send one (400, closed) — over HTTPS the latter
    were counted already; over HTTP none of them left any trace."""
    log = NullLog()
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0, headerReadTimeout: 1s, proxyProtocol: v1,"
        " trustedProxies: [127.0.0.0/8]}}"), log=log.log).start()
    untrusted = GatewayThread(settings_from(
        "gateway: {http: {port: 0, proxyProtocol: v1, trustedProxies: [10.0.0.0/8]}}"),
        log=NullLog().log).start()
    try:
        with connect(gw.port) as s:            # nothing sent
            assert read_response(s)[0] == 408
        with connect(gw.port) as s:            # a request without its PROXY header
            s.sendall(_get("/t/acct/whoami", "no-proxy-header"))
            assert read_response(s)[0] == 400
        with connect(untrusted.port) as s:     # a peer not among trustedProxies
            s.sendall(b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 80\r\n"
                      + _get("/t/acct/whoami", "untrusted"))
            assert read_response(s)[0] == 400
        assert gw.call(lambda: dict(gw.worker.aborted_connections)) == {"header_timeout": 1}
        assert gw.call(lambda: dict(gw.worker.refused_connections)) == {"proxy_protocol": 1}
        assert untrusted.call(lambda: dict(untrusted.worker.refused_connections)) == {
            "proxy_protocol": 1}
        # Nothing reached a pipeline: no request line for any of them.
        assert not [r for r in map(orjson.loads, log.lines())
                    if r.get("message", "").startswith("Request ")]
    finally:
        untrusted.stop()
        gw.stop()
