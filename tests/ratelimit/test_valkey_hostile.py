"""A broken or hostile Valkey (a fake one on loopback) under a real `stellagw serve` and a
real service: whatever it replies, the worker's memory and loop stay the gateway's, and
requests keep being answered, the environment limit failing open (docs/rate-limiting.md,
"Valkey client"; docs/security.md §3d row 32)."""
from __future__ import annotations

import socket
import threading
import time

import orjson
import psutil
import pytest

from tests.support.gwtest import Served, port_of, request
from tests.support.services import ServiceProcess

CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "redis://127.0.0.1:{port}"
    rules: [{{max_requests: 100000, per_seconds: 60}}]
"""
GET = b"GET /t/hv/whoami HTTP/1.1\r\nHost: gw\r\n\r\n"


class HostileValkey:
    """Accepts every connection and answers its first command with `head`, then `body`
    again and again as fast as the gateway takes it, for 10 s."""

    def __init__(self, head: bytes, body: bytes = b""):
        self.head, self.body = head, body
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.settimeout(10)
                if not conn.recv(65536):
                    return
                conn.sendall(self.head)
                end = time.monotonic() + 10
                while self.body and time.monotonic() < end:
                    conn.sendall(self.body)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("head, body", [
    # 13 bytes: hiredis took the count on trust and allocated 2^31 list slots; freeing them
    # when the command timed out froze the worker for seconds, on every reconnect.
    (b"*2147483647\r\n", b""),
    (b"*2147483647\r\n", b":1\r\n" * 65536),
    # A 512 MB bulk string streamed at loopback speed: buffered until the timeout (250 MB).
    (b"$536870912\r\n", b"a" * (1 << 20)),
], ids=["array-count", "endless-array", "huge-bulk"])
def test_a_hostile_valkey_neither_freezes_nor_fills_the_worker(tmp_path, head, body):
    valkey = HostileValkey(head, body)
    gw = Served("--workers", "1", config_text=CONFIG.format(port=valkey.port),
                tmp_path=tmp_path)
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("hv", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        worker = (psutil.Process(gw.proc.pid).children() or [psutil.Process(gw.proc.pid)])[0]
        slowest, answered, peak = 0.0, [], 0
        end = time.monotonic() + 4
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                status, _, reply = request(port, GET, timeout=3)
            except OSError as exc:          # a frozen worker: no answer within 3 s
                status, reply = repr(exc), b""
            slowest = max(slowest, time.monotonic() - started)
            answered.append((status, orjson.loads(reply)["instance"] if status == 200 else None))
            peak = max(peak, worker.memory_info().rss)
            time.sleep(0.05)
        # Every request reached the service and was answered at once, the limit failing open.
        assert {status for status, _ in answered} == {200}, answered
        assert all(instance for _, instance in answered)
        assert slowest < 1.0, slowest
        assert valkey.connections >= 1
        assert peak < 200 * 1024 * 1024, peak
        # Refused as a protocol error at its header (logged, the limit failing open).
        assert any(b'"errorType":"protocol"' in line for line in gw.lines)
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
        valkey.close()
