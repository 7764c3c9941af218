"""End to end: a service outlives its instances. The gateway (`stellagw serve`) and an SDK
service each in its own process, over loopback: when the service's last instance dies its
routes answer 503 "no healthy instance" (counted for the GatewayNoHealthyInstance alert),
not 404, until routing.serviceExpiry; when it comes back they answer 200 again."""
from __future__ import annotations

import re

import orjson
import pytest

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.services import ServiceProcess

CONFIG = """
gateway:
  node: {{region: eu1, workers: 1}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
  admin: {{publicEndpoints: [all]}}
  routing: {{serviceExpiry: {expiry}}}
  health: {{heartbeatIntervalSeconds: 1, checkIntervalSeconds: 1, degradedAfterSeconds: 3,
           heartbeatTimeoutSeconds: 6}}
"""


class Gateway:
    def __init__(self, tmp_path, expiry="10m"):
        self.served = Served(config_text=CONFIG.format(expiry=expiry), tmp_path=tmp_path)
        self.procs = []
        try:
            rec = self.served.wait_listening()[0]
        except BaseException:
            self.close()          # the fixture's teardown never runs for a failed setup
            raise
        self.http, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])

    def service(self, name):
        proc = ServiceProcess(name, self.tcp, region="eu1", instance=f"{name}-1").start()
        self.procs.append(proc)
        assert wait_for(lambda: self.instances(name) == 1, 15), (self.ready(), proc.describe())
        return proc

    def ready(self):
        return orjson.loads(request(self.http, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")[2])

    def instances(self, name):
        return len(self.ready()["services"].get(name, ()))

    def get(self, path):
        return request(self.http, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode(), timeout=15)

    def kill(self, proc, name):
        proc.kill()
        assert wait_for(lambda: self.instances(name) == 0, 15), self.ready()

    def close(self):
        for p in self.procs:
            p.kill()
        self.served.stop()


@pytest.fixture
def gateway(tmp_path):
    made = []

    def make(**kw):
        made.append(Gateway(tmp_path, **kw))
        return made[-1]
    yield make
    for g in made:
        g.close()


def _counted_503(gw, service) -> float:
    text = request(gw.http, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("gateway_errors_total{") and f'service="{service}"' in line \
                and 'status="503"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_last_instance_dying_leaves_503_not_404_and_its_return_200(gateway):
    gw = gateway()
    proc = gw.service("phoenix")
    assert gw.get("/t/phoenix/whoami")[0] == 200
    gw.kill(proc, "phoenix")
    for _ in range(5):
        status, headers, body = gw.get("/t/phoenix/whoami")
        assert status == 503, body
        assert orjson.loads(body)["error"]["message"] == "no healthy instance of phoenix"
    # Still a path the service never declared, and a service never seen: 404.
    assert gw.get("/t/phoenix/nothing-here")[0] == 404
    assert gw.get("/t/nobody/whoami")[0] == 404
    # What the GatewayNoHealthyInstance alert counts (grafana/alerts.yml).
    assert wait_for(lambda: _counted_503(gw, "phoenix") >= 5, 5)
    gw.service("phoenix")
    status, _, body = gw.get("/t/phoenix/whoami")
    assert status == 200 and orjson.loads(body)["instance"] == "phoenix-1"


def test_the_503_of_a_departed_service_says_when_to_retry(gateway):
    gw = gateway()
    gw.kill(gw.service("phoenix"), "phoenix")
    status, headers, _ = gw.get("/t/phoenix/whoami")
    assert status == 503 and headers.get("retry-after") == "5"


def test_after_service_expiry_the_routes_are_gone(gateway):
    gw = gateway(expiry="2s")
    gw.kill(gw.service("phoenix"), "phoenix")
    assert gw.get("/t/phoenix/whoami")[0] == 503
    # Expiry is checked with the health checks (every second here).
    assert wait_for(lambda: gw.get("/t/phoenix/whoami")[0] == 404, 6)
    assert re.search(r"no route", gw.get("/t/phoenix/whoami")[2].decode())
