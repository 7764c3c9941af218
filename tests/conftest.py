"""What every test module shares, registered once.

Layout (docs/design.md, "Tests"): a folder per stage of the request's journey (ingress,
auth, routing, ratelimit, transport, service), the codecs beside their pure-Python twins
(codecs), whole-journey runs (e2e), what operators touch (operations) and the perf harness
(benchmarks); shared helpers in tests/support.

* Fixtures: valkey_proc, valkey_proc_factory, valkey_cluster (real valkey-server processes,
  tests/support/valkey_server.py); start_gateway (in-process gateways, stopped after the
  test).
* Compiled and pure-Python: a codec test takes its pair from tests/support/impls.py (a
  fixture parametrised over both, the compiled one skipped with the reason when it is not
  built). Glue modules are one source: a test module marked `twin` is run a second time by
  `make test` with STELLAGW_NO_EXTENSIONS=1, the glue then imported from its .py.
* Hypothesis: the `ci` profile (the default) is derandomised, so a run is the same on every
  machine and a failure repeats; HYPOTHESIS_PROFILE=dev explores with fresh random
  examples and keeps a database of failures.
"""
from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tests.support.gwtest import GatewayThread, settings_from

pytest_plugins = ["tests.support.valkey_server"]

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    # A loaded 2-CPU CI machine makes data generation slow, not wrong.
    suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "twin: run again uncompiled (STELLAGW_NO_EXTENSIONS=1) by make test")


@pytest.fixture
def start_gateway():
    """start_gateway(yaml_text, log=None): a GatewayThread (a worker on its own loop in a
    thread, real sockets) from that configuration, started; every one is stopped after the
    test."""
    started = []

    def start(yaml_text="gateway: {http: {port: 0}}", log=None):
        gw = GatewayThread(settings_from(yaml_text), log=log).start()
        started.append(gw)
        return gw
    yield start
    for gw in started:
        gw.stop()
