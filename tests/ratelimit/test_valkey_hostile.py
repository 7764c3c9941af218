"""A broken or hostile Valkey (a fake one on loopback) under a real `stellagw serve` and a
real service: whatever it replies, the worker's memory and loop stay the gateway's, and
requests keep being answered, the environment limit failing open (docs/rate-limiting.md,
"Valkey client"; docs/security.md §3d row 44)."""
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
        answered, peak = [], 0
        end = time.monotonic() + 4
        while time.monotonic() < end:
            try:
                status, _, reply = request(port, GET, timeout=3)
            except OSError as exc:          # a frozen worker (4 s a reconnect): no answer in 3 s
                status, reply = repr(exc), b""
            answered.append((status, orjson.loads(reply)["instance"] if status == 200 else None))
            peak = max(peak, worker.memory_info().rss)
            time.sleep(0.05)
        # Every request reached the service and was answered, the limit failing open.
        assert {status for status, _ in answered} == {200}, answered
        assert all(instance for _, instance in answered)
        assert valkey.connections >= 1
        assert peak < 200 * 1024 * 1024, peak
        # Refused as a protocol error at its header (logged, the limit failing open).
        assert any(b'"errorType":"protocol"' in line for line in gw.lines)
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
        valkey.close()


class HostileCluster:
    """A seed whose CLUSTER SLOTS names `masters` masters, each one listening (all in one
    selector thread): they answer EVALSHA with an allowing rate-limit reply and SCRIPT
    LOAD with a SHA, as real ones would."""

    def __init__(self, masters: int):
        import selectors
        self.selector = selectors.DefaultSelector()
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(masters + 1)]
        for sock in self.listeners:
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, None)
        self.seed = self.listeners[0].getsockname()[1]
        per = SLOTS // masters
        self.slots = b"*%d\r\n" % masters + b"".join(
            b"*3\r\n:%d\r\n:%d\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n" % (
                i * per, SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1,
                sock.getsockname()[1]) for i, sock in enumerate(self.listeners[1:]))
        self.accepted = 0
        self.closed = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        import selectors

        import hiredis
        while not self.closed:
            for key, _ in self.selector.select(0.2):
                if key.data is None:
                    try:
                        conn, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.accepted += 1
                    self.selector.register(conn, selectors.EVENT_READ, hiredis.Reader())
                    continue
                conn, reader = key.fileobj, key.data
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(conn)
                    conn.close()
                    continue
                reader.feed(data)
                out = b""
                while (command := reader.gets()) is not False:
                    name = command[0].upper()
                    out += (self.slots if name == b"CLUSTER" else
                            b"$40\r\n" + b"0" * 40 + b"\r\n" if name == b"SCRIPT" else
                            b"*8\r\n:1\r\n:0\r\n:1\r\n:100000\r\n:60\r\n:1000\r\n:1000\r\n:0\r\n"
                            if name == b"EVALSHA" else b"+OK\r\n")
                try:
                    conn.sendall(out)
                except OSError:
                    pass

    def close(self):
        self.closed = True


SLOTS = 16384


def test_a_cluster_naming_hundreds_of_masters_does_not_take_every_descriptor(tmp_path):
    """docs/security.md §3d row 47: each master is a connection per worker, outside the
    descriptors the connection caps reserve; a slot map naming 500 took them all at start
    (SCRIPT LOAD goes to every master), and every client and service connection was then
    closed unanswered."""
    import resource
    import subprocess
    import sys

    from tests.support.gwtest import ROOT
    cluster = HostileCluster(500)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(CONFIG.format(port=cluster.seed).replace(
        f"redis://127.0.0.1:{cluster.seed}", f"redis://127.0.0.1:{cluster.seed}?cluster=true")
        .replace("http: {port: 0}", "http: {port: 0, maxConnections: 100}")
        .replace("tcp: {port: 0}", "tcp: {port: 0, maxConnections: 20}")
        .replace("admin: {publicEndpoints: [all]}",
                 "admin: {publicEndpoints: [all], maxConnections: 8}"))
    need = 100 + 20 + 8 + 256       # what the caps need (listeners.descriptors_needed)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
    gw = Served.__new__(Served)
    gw.proc = subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=limit)
    gw.lines, gw._cond, gw._seen = [], threading.Condition(), 0
    gw._reader = threading.Thread(target=gw._read, daemon=True)
    gw._reader.start()
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("hv", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        answered = [request(port, GET) for _ in range(20)]
        assert {status for status, _, _ in answered} == {200}
        assert all(orjson.loads(body)["instance"].startswith("hv") for _, _, body in answered)
        assert psutil.Process(gw.proc.pid).num_fds() < 100
        assert not any(b"out of file descriptors" in line for line in gw.lines)
        assert any(b"names 500 masters" in line for line in gw.lines)
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
        cluster.close()


def test_redirections_to_ever_new_addresses_do_not_open_a_connection_each():
    """docs/security.md §3d row 47: a node answering every command with a MOVED to an
    address not seen before made a connection each, until the next reload of the map."""
    import asyncio

    import uvloop

    from stellagw.valkey import ValkeyClient, ValkeyError
    max_nodes = 80                  # stellagw.valkey.MAX_NODES

    async def main():
        servers, ports = [], []
        nxt = iter(range(1, 10**6))

        async def handle(reader, writer):
            import hiredis
            parser = hiredis.Reader()
            while data := await reader.read(65536):
                parser.feed(data)
                while (command := parser.gets()) is not False:
                    if command[0].upper() == b"CLUSTER":
                        writer.write(b"*1\r\n*3\r\n:0\r\n:16383\r\n*2\r\n$9\r\n127.0.0.1\r\n:%d\r\n"
                                     % ports[0])
                    else:
                        writer.write(b"-MOVED 1 127.0.0.1:%d\r\n"
                                     % ports[next(nxt) % len(ports)])
            writer.close()
        for _ in range(300):
            server = await asyncio.start_server(handle, "127.0.0.1", 0)
            servers.append(server)
            ports.append(server.sockets[0].getsockname()[1])
        client = ValkeyClient.from_url(f"redis://127.0.0.1:{ports[0]}?cluster=true", timeout=1)
        try:
            results = await asyncio.gather(*(client.execute("GET", f"k{i}") for i in range(300)),
                                           return_exceptions=True)
            assert all(isinstance(r, ValkeyError) for r in results), results[:3]
            assert len(client._nodes) <= max_nodes, len(client._nodes)
            assert sum(node.connected for node in client._nodes.values()) <= max_nodes
        finally:
            await client.close()
            for server in servers:
                server.close()
    uvloop.run(main())
