"""A new gateway pod and the fleet view, for real: a valkey-server, gateways run as
`stellagw serve` on free loopback ports, and an SDK service (tests/support/services.py) that finds
gateways by a name, as in Kubernetes: gateway A listens on 127.0.0.1, B on 127.0.0.2, the
same transport port, and the name resolves to A until the test adds B ("the service's next
resolve_interval"). Until the service has registered with B, B is not ready and answers
503 with Retry-After for its routes, never 404; then B is ready and routes.
"""
from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import orjson
import pytest

from tests.support import services as test_services

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.valkey_server import ValkeyProcess, free_port

CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  node:
    nodeId: {node}
    preStopDelay: 0s
    fleet: {{valkey: "{valkey}", publishInterval: 100ms, entryTtl: 1s, warmupTimeout: {wait},
             timeout: 300ms}}
  http: {{port: 0}}
  transports: {{tcp: {{host: {host}, port: {tcp}}}}}
  health: {{heartbeatIntervalSeconds: 1}}
"""


def get(port, path):
    return request(port, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n\r\n")


def _port_no_one_is_given() -> int:
    """A port free on every address, below the kernel's ephemeral range. The fleet's second
    gateway binds it on 127.0.0.2 long after it was picked: a port from free_port() could
    meanwhile be handed to any bind to port 0 (a listener on 0.0.0.0 then holds it on every
    address) or to an outgoing connection, and the bind failed (once in a CI run)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        return port
    return free_port()


class Fleet:
    """Gateways on one transport port (127.0.0.x) and a service that dials the addresses
    `names` lists, resolving them every 0.2 s."""

    def __init__(self, tmp_path, valkey: ValkeyProcess):
        self.tmp_path = tmp_path
        self.valkey = valkey
        self.tcp = _port_no_one_is_given()
        self.gws: dict[str, Served] = {}
        self.http: dict[str, int] = {}
        self.addresses: list[str] = []
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.svc = None
        self.seen: list[tuple[str, str]] = []      # (gateway node, path) the service got

    def gateway(self, node: str, host: str, wait: str = "10s") -> Served:
        d = self.tmp_path / node
        d.mkdir()
        gw = Served(config_text=CONFIG.format(node=node, valkey=self.valkey.url, wait=wait,
                                              host=host, tcp=self.tcp), tmp_path=d)
        self.gws[node] = gw
        self.http[node] = port_of(gw.wait_listening()[0]["http"])
        return gw

    def service(self, name: str) -> None:
        svc = test_services.build(name, ["gw.test:%d" % self.tcp], "local", "1.0.0",
                                  f"{name}-1")
        svc.resolve_interval = 0.2
        addresses = self.addresses

        async def resolve(host):
            return list(addresses)
        svc._addresses = resolve
        on_request = svc._on_request

        def record(link, corr, payload):
            from stellagw.transport import frame as fr
            # The gateway node from the HELLO_ACK: link.key is set only when the SDK's dial
            # coroutine resumes, which a REQUEST right behind the ACK can beat.
            self.seen.append((link.acked.result().get("node_id"), fr.decode_request(payload)[3]))
            on_request(link, corr, payload)
        svc._on_request = record
        self.svc = svc
        asyncio.run_coroutine_threadsafe(svc.start(), self.loop).result(10)

    def linked(self) -> set:
        return {key[0] for key in self.svc._links}

    def ready(self, node: str):
        status, _, body = get(self.http[node], "/health/ready")
        return status, orjson.loads(body)

    def metrics(self, node: str) -> str:
        return get(self.http[node], "/metrics")[2].decode()

    def close(self) -> None:
        if self.svc is not None:
            asyncio.run_coroutine_threadsafe(self.svc.stop(timeout=1), self.loop).result(10)
        for gw in self.gws.values():
            gw.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


@pytest.fixture
def fleet(tmp_path):
    with ValkeyProcess() as valkey:
        f = Fleet(tmp_path, valkey)
        try:
            yield f
        finally:
            f.close()


def _published(valkey: ValkeyProcess, service: str) -> bool:
    views = valkey.command("KEYS", "*:views")
    return bool(views) and any(service.encode() in (v or b"")
                               for v in valkey.command("HVALS", views[0]))


def test_a_new_gateway_is_not_ready_and_answers_503_until_the_fleets_services_reach_it(fleet):
    a = fleet.gateway("gw-a", "127.0.0.1")
    # The first gateway of the fleet: nothing published, ready at once, and says so.
    assert a.wait_for_log(lambda r: r.get("message", "").startswith("fleet view empty"))
    fleet.addresses.append("127.0.0.1")
    fleet.service("fl")
    assert wait_for(lambda: fleet.ready("gw-a")[0] == 200
                    and "fl" in fleet.ready("gw-a")[1]["services"], 10)
    assert get(fleet.http["gw-a"], "/t/fl/whoami")[0] == 200
    assert wait_for(lambda: _published(fleet.valkey, "fl"), 5)

    t0 = time.monotonic()
    b = fleet.gateway("gw-b", "127.0.0.2")
    warming = b.wait_for_log(lambda r: r.get("message") == "fleet warming up")[0]
    assert warming["services"] == 1 and warming["missing"] == 1
    # Not ready, saying which service it waits for ...
    status, doc = fleet.ready("gw-b")
    assert status == 503
    assert "starting: 1 service(s) the fleet routes have not registered: fl" in doc["reasons"]
    assert doc["fleet"]["state"] == "warming" and doc["fleet"]["missing"] == ["fl"]
    # ... and a client that comes anyway gets 503 with Retry-After for the service's
    # routes (the envelope of a known service without an instance), 404 for the rest.
    for path in ("/t/fl/whoami", "/t/fl/slow?ms=1", "/t/fl/secure"):
        status, headers, body = get(fleet.http["gw-b"], path)
        err = orjson.loads(body)["error"]
        assert (status, headers["retry-after"]) == (503, "5"), (path, status, body)
        assert err["message"] == "no healthy instance of fl" and err["trace_id"]
    status, headers, body = get(fleet.http["gw-b"], "/t/nobody/whoami")
    assert status == 404 and "retry-after" not in headers
    assert fleet.linked() == {"gw-a"}
    assert all(node == "gw-a" for node, _ in fleet.seen)
    time.sleep(0.3)                                  # still waiting: nothing changed
    assert fleet.ready("gw-b")[0] == 503 and get(fleet.http["gw-b"], "/t/fl/whoami")[0] == 503

    # The service's next resolve finds B: B is ready and routes.
    found = time.monotonic()
    fleet.addresses.append("127.0.0.2")
    assert wait_for(lambda: fleet.ready("gw-b")[0] == 200, 10)
    ready_after, registered_to_ready = time.monotonic() - t0, time.monotonic() - found
    warm = b.wait_for_log(lambda r: r.get("message") == "fleet warm")[0]
    assert warm["missing"] == [] and warm["missingCount"] == 0 and warm["ms"] > 0
    status, _, body = get(fleet.http["gw-b"], "/t/fl/whoami")
    assert status == 200 and orjson.loads(body)["instance"] == "fl-1"
    assert ("gw-b", "/t/fl/whoami") in fleet.seen
    text = fleet.metrics("gw-b")
    assert 'gateway_fleet_warmups_total{outcome="complete"} 1.0' in text
    [seconds] = [float(line.split()[1]) for line in text.splitlines()
                 if line.startswith("gateway_fleet_warmup_seconds_total ")]
    assert 0 < seconds * 1000 <= warm["ms"] + 1
    print(f"gateway B: process start to ready {ready_after:.2f} s; ready "
          f"{registered_to_ready:.2f} s after its address joined the name (resolved every "
          f"0.2 s); fleet warm {warm['ms']} ms after the worker started")


def test_without_valkey_a_new_gateway_is_ready_at_once_and_the_others_keep_serving(fleet):
    a = fleet.gateway("gw-a", "127.0.0.1")
    fleet.addresses.append("127.0.0.1")
    fleet.service("fl")
    assert wait_for(lambda: _published(fleet.valkey, "fl"), 10)
    fleet.valkey.stop()

    # A's publishes fail: logged once, counted, and A serves on.
    assert a.wait_for_log(lambda r: r.get("message", "").startswith("fleet publish failed"))
    assert get(fleet.http["gw-a"], "/t/fl/whoami")[0] == 200
    assert wait_for(lambda: "gateway_fleet_publish_failures_total{type=\"connection\"}"
                    in fleet.metrics("gw-a"), 5)
    time.sleep(0.3)
    assert len([line for line in a.lines if b"fleet publish failed" in line]) == 1

    b = fleet.gateway("gw-b", "127.0.0.2")
    line = b.wait_for_log(lambda r: r.get("message", "").startswith("fleet view unavailable"))[0]
    assert line["level"] == "warning" and "connection" in line["error"]
    assert fleet.ready("gw-b")[0] == 200                  # as without a fleet view
    assert get(fleet.http["gw-b"], "/t/fl/whoami")[0] == 404   # today's rule
    fleet.addresses.append("127.0.0.2")
    assert wait_for(lambda: get(fleet.http["gw-b"], "/t/fl/whoami")[0] == 200, 10)

    # Valkey back: A publishes again, and says so.
    fleet.valkey.start()
    assert a.wait_for_log(lambda r: r.get("message") == "fleet publish works again")


