"""End to end: versions sharing traffic by weight with sticky clients, and outlier ejection,
with the gateway (`stellagw serve`) and SDK services (tests/support/services.py) in their own
processes over loopback."""
from __future__ import annotations

import collections
import re
import threading
import time

import orjson
import pytest

from tests.support.gwtest import Served, connect, port_of, read_response, request, wait_for
from tests.support.services import ServiceProcess, stop_services

CONFIG = """
gateway:
  admin: {publicEndpoints: [all]}
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  routing:
    defaultTimeout: 5s
    stickyKey: header:x-client
    services:
      canary: {weights: {"1.2.0": 90, "1.3.0": 10}}
    outlierDetection: {consecutiveErrors: 3, baseEjectionTime: 2s, maxEjectionTime: 4s}
  health: {heartbeatIntervalSeconds: 1, checkIntervalSeconds: 1, degradedAfterSeconds: 3,
           heartbeatTimeoutSeconds: 6}
"""


class Stack:
    def __init__(self, tmp_path):
        self.gw = Served(config_text=CONFIG, tmp_path=tmp_path)
        rec = self.gw.wait_listening()[0]
        self.http, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])
        self.procs = []
        self._sock = None
        self._buf = bytearray()

    def service(self, name, instance, version="1.0.0", fail_for=0.0):
        self.procs.append(ServiceProcess(
            name, self.tcp, version=version, instance=instance, region="eu1",
            fail_until=time.time() + fail_for if fail_for else None).start())

    def ready(self):
        return orjson.loads(request(self.http, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")[2])

    def instances(self, service):
        return {i["instanceId"]: i for i in self.ready()["services"].get(service, [])}

    def wait_registered(self, service, count):
        assert wait_for(lambda: len(self.instances(service)) == count, 20), self.ready()

    def get(self, path, headers=b""):
        """One request on a kept-alive connection."""
        if self._sock is None:
            self._sock = connect(self.http, timeout=15)
        self._sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), headers))
        status, _, body = read_response(self._sock, self._buf)
        return status, orjson.loads(body) if body else None

    def metric(self, name, **labels):
        text = request(self.http, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
        for found, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
            if dict(re.findall(r'(\w+)="([^"]*)"', found)) == labels:
                return float(value)
        return 0.0

    def close(self):
        if self._sock is not None:
            self._sock.close()
        stop_services(self.procs)
        self.gw.stop()


@pytest.fixture
def stack(tmp_path):
    s = Stack(tmp_path)
    yield s
    s.close()


def test_weights_split_2000_clients_90_10_and_each_keeps_its_version(stack):
    stack.service("canary", "stable", "1.2.0")
    stack.service("canary", "canary", "1.3.0")
    stack.wait_registered("canary", 2)
    versions = {}
    for i in range(2000):
        status, body = stack.get("/t/canary/whoami", b"X-Client: client-%d\r\n" % i)
        assert status == 200
        versions[i] = body["version"]
    share = collections.Counter(versions.values())["1.3.0"] / 2000
    assert 0.07 <= share <= 0.13, share
    # One client, one version, request after request (some of each).
    for i in [k for k, ver in versions.items() if ver == "1.3.0"][:3] + [0, 1, 2]:
        seen = {stack.get("/t/canary/whoami", b"X-Client: client-%d\r\n" % i)[1]["version"]
                for _ in range(10)}
        assert seen == {versions[i]}
    # The pin wins over the split, and the access log and the metric show the version.
    stable_client = next(k for k, ver in versions.items() if ver == "1.2.0")
    status, body = stack.get("/t/canary/whoami", b"X-Client: client-%d\r\nX-Service-Version: "
                             b"1.3.0\r\nX-Correlation-Id: pinned-1\r\n" % stable_client)
    assert status == 200 and body["version"] == "1.3.0"
    [line] = stack.gw.wait_for_log(lambda r: r.get("correlationId") == "pinned-1")
    assert line["version"] == "1.3.0" and line["upstream"] == "canary"
    canary = stack.metric("gateway_version_requests_total", service="canary", version="1.3.0")
    stable = stack.metric("gateway_version_requests_total", service="canary", version="1.2.0")
    assert canary + stable == 2000 + 60 + 1 and canary >= 140


def test_an_instance_answering_500s_is_ejected_and_returns(stack):
    stack.service("flaky", "good")
    stack.service("flaky", "bad", fail_for=12.0)      # 500s for its first 12 seconds
    # Both failing for good: one may be ejected (maxEjectionPercent 50), never both.
    stack.service("broken", "b1", fail_for=3600)
    stack.service("broken", "b2", fail_for=3600)
    stack.wait_registered("flaky", 2)
    stack.wait_registered("broken", 2)
    answers = [stack.get("/t/flaky/flaky") for _ in range(10)]
    assert [b["instance"] for s, b in answers if s == 500] == ["bad"] * 3   # 3 in a row
    assert {b["instance"] for _, b in [stack.get("/t/flaky/flaky") for _ in range(20)]} == {"good"}
    bad = stack.instances("flaky")["bad"]
    assert bad["ejected"]["reason"] == "5xx" and bad["ejected"]["ejections"] == 1
    assert "ejected" not in stack.instances("flaky")["good"]
    [line] = stack.gw.wait_for_log(lambda r: r.get("message") == "instance ejected")
    assert (line["service"], line["instance"], line["reason"]) == ("flaky", "bad", "5xx")
    assert stack.metric("gateway_outlier_ejections_total", service="flaky", reason="5xx") == 1

    statuses = collections.Counter(stack.get("/t/broken/flaky")[0] for _ in range(30))
    assert statuses == {500: 30}                      # still served: never a 503
    ejected = [i for i in stack.instances("broken").values() if "ejected" in i]
    assert len(ejected) == 1

    # Back after its interval; once it stops failing it takes its share again (a failure
    # right after a return ejects it again, for longer: 2 s, then 4 s, the cap).
    def both_serve():
        answers = [stack.get("/t/flaky/flaky") for _ in range(6)]
        return {b["instance"] for s, b in answers if s == 200} == {"good", "bad"}
    assert wait_for(both_serve, timeout=30, interval=0.2)
    assert "ejected" not in stack.instances("flaky")["bad"]
    stack.gw.wait_for_log(lambda r: r.get("message") == "instance returned"
                          and r.get("instance") == "bad")


def test_timeouts_in_a_row_eject_too(stack):
    stack.service("slowpoke", "s1")
    stack.service("slowpoke", "s2")
    stack.wait_registered("slowpoke", 2)
    statuses = []

    def slow():
        statuses.append(request(stack.http, b"GET /t/slowpoke/slow?ms=3000 HTTP/1.1\r\n"
                                            b"Host: t\r\n\r\n", timeout=15)[0])
    threads = [threading.Thread(target=slow) for _ in range(8)]   # 4 each: 1 s timeout
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert statuses == [504] * 8
    ejected = [i for i in stack.instances("slowpoke").values() if "ejected" in i]
    assert [i["ejected"]["reason"] for i in ejected] == ["timeout"]
    assert stack.metric("gateway_outlier_ejections_total", service="slowpoke",
                        reason="timeout") == 1
