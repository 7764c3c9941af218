"""A Valkey failover behind one address (a managed service's primary endpoint, a DNS name or
a TCP proxy that moves to the new master): the old master, now a replica, answers every
write READONLY on the connection the gateway holds. The gateway must drop that connection
and connect again — to whatever the address now leads to — or the environment limit
fails open until a restart (docs/rate-limiting.md, "Valkey client"; docs/security.md §3d
row 48)."""
from __future__ import annotations

import socket
import threading
import time

import orjson

from tests.support.gwtest import Served, port_of, request
from tests.support.services import ServiceProcess
from tests.support.valkey_server import ValkeyProcess

CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  process_back_pressure_when_more_than_per_5min: 0
  for_environment:
    valkey_connection: "redis://127.0.0.1:{port}"
    rules: [{{max_requests: 5, per_seconds: 600}}]
    circuit_breaker: {{failure_threshold: 2, timeout_seconds: 1, half_open_timeout: 1}}
"""
GET = b"GET /t/fo/whoami HTTP/1.1\r\nHost: gw\r\n\r\n"


class Endpoint:
    """A TCP proxy: each new connection goes to the current target, as a DNS name or a
    load balancer in front of the master does; connections made before a switch stay."""

    def __init__(self, target: int):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_after_a_failover_behind_one_address_the_limit_counts_on_the_new_master(tmp_path):
    old, new = ValkeyProcess().start(), ValkeyProcess().start()
    endpoint = Endpoint(old.port)
    gw = Served(config_text=CONFIG.format(port=endpoint.port), tmp_path=tmp_path)
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("fo", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        assert old.command("DBSIZE") > 0            # counted on the first master

        # Failover: the endpoint leads to the new master; the old one becomes its replica.
        endpoint.target = new.port
        assert old.command("REPLICAOF", "127.0.0.1", str(new.port)) == b"OK"
        statuses = []
        end = time.monotonic() + 8
        while time.monotonic() < end and 429 not in statuses:
            status, _, body = request(port, GET)
            if status == 200:
                assert orjson.loads(body)["instance"].startswith("fo")
            statuses.append(status)
            time.sleep(0.1)
        # The limit is enforced again, counted on the new master: 5 allowed, then 429.
        assert 429 in statuses, statuses
        assert new.command("DBSIZE") > 0
        gw.wait_for_log(lambda r: "READONLY" in str(r.get("error")), timeout=5)
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
        endpoint.close()
        old.close()
        new.close()
