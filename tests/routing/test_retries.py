"""A request retried on another instance when its link broke before any answer (issue 18
item 2): idempotent methods and endpoints declared retryable, once, under a budget."""
from __future__ import annotations

import os

import orjson
import pytest

from stellagw.config import load_config_text
from stellagw.transport.retry import RetryBudget

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.services import ServiceProcess, stop_services

CONFIG = """
gateway:
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0}}
  admin: {publicEndpoints: [all]}
"""


class Stack:
    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.gw = Served(config_text=CONFIG, tmp_path=tmp_path)
        rec = self.gw.wait_listening()[0]
        self.http, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])
        self.procs = []
        self.n = 0

    def instances(self):
        body = request(self.http, b"GET /health/ready HTTP/1.1\r\nHost: t\r\n\r\n")[2]
        return {i["instanceId"] for i in orjson.loads(body)["services"].get("rt", [])}

    def ensure(self, count):
        while len(self.instances()) < count:
            self.n += 1
            svc = ServiceProcess("rt", self.tcp, instance=f"rt-{self.n}").start()
            self.procs.append(svc)
            assert wait_for(lambda: f"rt-{self.n}" in self.instances(), 20), svc.describe()

    def send(self, method, path, body=b""):
        marker = str(self.tmp / f"marker-{self.n}-{method}-{path.strip('/').replace('/', '-')}")
        raw = (b"%s /t/rt/%s?marker=%s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
               % (method.encode(), path.encode(), marker.encode(), len(body), body))
        return request(self.http, raw, timeout=15)

    def retries(self, outcome):
        text = request(self.http, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")[2].decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gateway_retries_total{") and f'outcome="{outcome}"' in line)

    def close(self):
        stop_services(self.procs)
        self.gw.stop()


@pytest.fixture
def stack(tmp_path):
    st = Stack(tmp_path)
    yield st
    st.close()


def test_a_broken_link_is_retried_once_for_idempotent_and_retryable_requests(stack):
    stack.ensure(2)
    status, _, body = stack.send("GET", "crash-once")
    assert status == 200, body                     # the other instance answered
    assert stack.retries("retried") == 1
    stack.ensure(2)
    status, _, body = stack.send("POST", "crash-once", b"order-1")
    assert status == 502                           # a POST may have been done: not repeated
    assert stack.retries("not_idempotent") == 1
    stack.ensure(2)
    status, _, body = stack.send("POST", "crash-once-retryable", b"order-2")
    assert status == 200 and orjson.loads(body)["body"] == "order-2"   # the body went again
    assert stack.retries("retried") == 2


def test_the_budget_bounds_retries():
    settings = load_config_text("gateway: {retries: {budgetPercent: 10, minRetriesPerSecond: 1}}")
    budget = RetryBudget(settings.gateway.retries)
    # Few requests: the floor (1/s over the 10 s window) applies.
    assert [budget.allow(5, now=100.0) for _ in range(12)].count(True) == 10
    # Within the window, 10 % of the requests dispatched since its start.
    budget = RetryBudget(settings.gateway.retries)
    budget.allow(0, now=200.0)
    allowed = sum(budget.allow(1000, now=200.5) for _ in range(200))
    assert allowed == 99                           # 100 in all, one spent above
    # Past the window the counts start over.
    assert budget.allow(1000, now=215.0)
