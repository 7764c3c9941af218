"""A client that does not read what the gateway writes is not read either: the gateway
pauses reading a connection while its write buffer is over the transport's high-water mark
(HttpProtocol.pause_writing), so what it holds for that client stays bounded however much
the client sends, and nothing is lost once the client reads."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.support.gwtest import GatewayThread, settings_from, wait_for

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

REQUEST = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
MARK = b"HTTP/1.1 200 OK\r\n"
N = 200_000                     # 7.6 MB of requests, ~40 MB of answers if all were held


def test_a_client_that_pipelines_and_never_reads_is_not_read_either():
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, logging: {accessLog: false}}")).start()
    s = socket.socket()
    # Small kernel buffers on the client: what the gateway does not read stays unsent.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.connect(("127.0.0.1", gw.worker.http_address[1]))
    s.settimeout(20)
    sender = threading.Thread(target=s.sendall, args=(REQUEST * N,), daemon=True)
    try:
        sender.start()
        # The client sends and reads nothing: the gateway stops reading it, so sendall
        # blocks with most of the requests unsent, and what the gateway holds is bounded.
        assert wait_for(lambda: any(c.transport is not None and c.transport.is_reading() is False
                                    for c in list(gw.worker.connections)), 10)
        time.sleep(0.3)
        held = [c.transport.get_write_buffer_size() for c in list(gw.worker.connections)
                if c.transport is not None]
        assert held and max(held) < 2 * 1024 * 1024, held
        assert sender.is_alive()        # still blocked: the gateway is not reading
        # The client reads: every request is answered, in order, none lost.
        tail = b""
        answers = 0
        while answers < N:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {answers} answers"
            data = tail + chunk
            answers += data.count(MARK)
            tail = data[-(len(MARK) - 1):]      # a status line cut between two reads
        sender.join(10)
        assert not sender.is_alive() and answers == N
    finally:
        s.close()
        gw.stop()
