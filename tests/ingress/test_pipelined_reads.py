"""One read full of pipelined requests: at most PIPELINE_MAX of them (and the rest of a
small slice) are parsed and held while the first waits for its service; the rest of the
read waits unparsed, reading stopped, and every request is served in order afterwards
(docs/security.md §3d, "pipelined reads")."""
from __future__ import annotations

import gc
import socket
import threading

import orjson
import pytest

from stellagw.transport import frame as fr

from tests.support.gwtest import GatewayThread, connect, settings_from, wait_for
from tests.support.servicepeer import RawPeer, hello_for

pytestmark = pytest.mark.twin   # run again uncompiled: ingress/http.py is glue

REQUESTS = 3000


def parsed(gw) -> int:
    """Request objects alive in the gateway: the pipelined requests it has parsed."""
    return gw.call(lambda: sum(type(o).__name__ == "Request" for o in gc.get_objects()))


def test_a_read_of_pipelined_requests_is_parsed_only_as_far_as_the_pipeline_takes():
    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}},
        "logging": {"accessLog": False}}}).decode())).start()
    peer = RawPeer(gw.transport_port)
    seen = []
    answering = threading.Event()

    def serve():
        waiting = []
        while True:
            try:
                frame = peer.read_frame(0.05)
            except (socket.timeout, TimeoutError):
                frame = ()
            except OSError:
                return
            if frame is None:
                return
            if frame and frame[0] == fr.REQUEST:
                seen.append(bytes(fr.decode_request(frame[2])[4]))
                waiting.append(frame[1])
            if answering.is_set():
                enc = fr.FrameEncoder()
                for corr in waiting:
                    enc.response(corr, 200, [], fr.FLAG_END_STREAM, b"")
                waiting = []
                peer.sock.sendall(enc.take())

    sock = None
    try:
        assert "error" not in peer.hello(hello_for("svc", endpoints=[("GET", "/s")]))
        threading.Thread(target=serve, daemon=True).start()
        baseline = parsed(gw)
        raw = b"".join(b"GET /s?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(REQUESTS))
        sock = connect(gw.port, timeout=20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.sendall(raw)                        # ~100 KB: one or two reads of the gateway's
        assert wait_for(lambda: len(seen) == 1, 5)
        # The first waits for its answer; of the rest, the pipeline's 16 and what shared a
        # 4 KiB slice with them are parsed (before: the whole read, thousands).
        assert parsed(gw) - baseline <= 16 + 4096 // 30 + 2
        answering.set()
        buf = b""
        while buf.count(b"HTTP/1.1 200") < REQUESTS:
            data = sock.recv(1 << 16)
            assert data, buf[-200:]
            buf += data
        # Every one reached the service once, in the order sent.
        assert seen == [b"%d" % i for i in range(REQUESTS)]
    finally:
        if sock is not None:
            sock.close()
        peer.close()
        gw.stop()


def test_large_pipelined_heads_are_parsed_only_to_a_byte_budget():
    """16 heads of 15 KB each were parsed and held per connection (240 KB, unauthorised):
    1,000 connections of one address held +275 MB. The heads waiting hold about 32 KB."""
    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}},
        "logging": {"accessLog": False}}}).decode())).start()
    peer = RawPeer(gw.transport_port)
    seen = []
    answering = threading.Event()

    def serve():
        while True:
            try:
                frame = peer.read_frame(0.05)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if frame is None:
                return
            if frame[0] == fr.REQUEST:
                seen.append(bytes(fr.decode_request(frame[2])[4]))
                answering.wait(10)
                enc = fr.FrameEncoder()
                enc.response(frame[1], 200, [], fr.FLAG_END_STREAM, b"")
                peer.sock.sendall(enc.take())

    sock = None
    try:
        assert "error" not in peer.hello(hello_for("svc", endpoints=[("GET", "/s")]))
        threading.Thread(target=serve, daemon=True).start()
        baseline = parsed(gw)
        pad = b"x-pad: " + b"p" * 15000 + b"\r\n"
        raw = b"".join(b"GET /s?%d HTTP/1.1\r\nHost: x\r\n%s\r\n" % (i, pad) for i in range(17))
        sock = connect(gw.port, timeout=20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.sendall(raw)
        assert wait_for(lambda: len(seen) == 1, 5)
        # Before: 16 waited behind the first (240 KB). Now the first, the budget (32 KB:
        # two of them), the head that crossed it and the one begun in the same slice.
        assert parsed(gw) - baseline <= 1 + 3 + 1
        answering.set()
        buf = b""
        while buf.count(b"HTTP/1.1 200") < 17:
            data = sock.recv(1 << 16)
            assert data, buf[-200:]
            buf += data
        assert seen == [b"%d" % i for i in range(17)]
    finally:
        answering.set()
        if sock is not None:
            sock.close()
        peer.close()
        gw.stop()


def test_a_client_that_resets_with_its_pipeline_full_gets_nothing_more_sent_for_it():
    """Reading is paused while the pipeline is full, so a client's reset is seen only when
    the answer in hand is written. The next queued request was then started — sent to its
    service for a client already gone — before the failed write closed the connection.
    Found by a probe beyond round 8D; now nothing more is sent, the first request's stream
    is cancelled, and the connection and its parsed requests are let go."""
    import struct
    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}},
        "logging": {"accessLog": False}}}).decode())).start()
    peer = RawPeer(gw.transport_port)
    frames = []

    def record():
        while True:
            try:
                frame = peer.read_frame(0.05)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            if frame is None:
                return
            frames.append(frame[0])

    try:
        hello = hello_for("svc", endpoints=[("GET", "/s")])
        hello["endpoints"][0]["timeout_ms"] = 1000      # the answer in hand: a 504
        assert "error" not in peer.hello(hello)
        threading.Thread(target=record, daemon=True).start()
        baseline = parsed(gw)
        sock = connect(gw.port, timeout=20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.sendall(b"".join(b"GET /s?%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
                              for i in range(REQUESTS)))
        assert wait_for(lambda: fr.REQUEST in frames, 5)
        assert parsed(gw) > baseline                    # the pipeline is full, reading paused
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()                                    # RST
        assert wait_for(lambda: gw.call(lambda: len(gw.worker.connections)) == 0, 5)
        assert wait_for(lambda: parsed(gw) == baseline, 5)
        assert wait_for(lambda: fr.CANCEL in frames, 5)
        assert frames.count(fr.REQUEST) == 1, frames    # without the fix: 2
    finally:
        peer.close()
        gw.stop()
