"""End to end: a storm of registrations and disconnects while requests flow. The gateway
(`stellagw serve`), a steady service and the storm's SDK services (hosted by
perf/registration_storm.py's `_services` mode, many instances per process) each run in
their own processes, over loopback. What must hold — timings are perf/'s business:

* a service, once it has answered, never answers 404 again: 503 while it has no instance;
* requests to the steady service, on the same worker throughout, all succeed;
* after a full drop and a second storm, every service answers 200 again.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import pytest

from tests.support.gwtest import ROOT, Served, port_of, request, wait_for

STORM = [sys.executable, "-m", "perf.registration_storm"]     # run from ROOT
SERVICES, PER_SERVICE, ENDPOINTS, HOSTS = 10, 4, 50, 2

CONFIG = """
gateway:
  node: {region: eu1, workers: 1}
  http: {port: 0}
  transports: {tcp: {port: 0, maxConnections: 1024}}
  admin: {publicEndpoints: [all]}
  logging: {accessLog: false}
"""


class Probe:
    """One thread per path, requests back to back on a keep-alive connection; remembers
    (time sent, path, status) of every answer. The time it was sent, not answered: a 502
    for a request an instance died holding can reach this thread after the test saw the
    last instance gone (failed in CI once), and is no answer to a request sent after."""

    def __init__(self, port, paths):
        self.port, self.answers = port, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(p,), daemon=True)
                         for p in paths]
        for t in self._threads:
            t.start()

    def _run(self, path):
        raw = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode()
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                status = request(self.port, raw, timeout=15)[0]
            except OSError:
                status = 0
            self.answers.append((sent, path, status))
            time.sleep(0.005)

    def since(self, t0):
        return [a for a in self.answers if a[0] >= t0]

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(20)


class Storm:
    def __init__(self, tmp_path):
        self.gw = Served(config_text=CONFIG, tmp_path=tmp_path)
        self.procs = []
        try:
            rec = self.gw.wait_listening()[0]
            self.http, self.tcp = port_of(rec["http"]), port_of(rec["tcp"])
            self.steady = self._start("0", "--steady", "steady@steady-1")
            assert wait_for(lambda: self.count("steady") == 1, 20)
        except BaseException:
            self.close()          # the fixture's teardown never runs for a failed setup
            raise
        self.specs = [f"s{k % SERVICES:02d}@s{k % SERVICES:02d}-{k // SERVICES}"
                      for k in range(SERVICES * PER_SERVICE)]

    def _start(self, *args):
        proc = subprocess.Popen([*STORM, "_services", f"127.0.0.1:{self.tcp}",
                                 *args], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def hosts(self):
        """Start the storm's hosts, wait until they have built their services, then let
        them all connect at once."""
        hosts = [self._start(str(ENDPOINTS), *self.specs[h::HOSTS]) for h in range(HOSTS)]
        for h in hosts:
            assert h.stdout.readline().startswith("built"), "a storm host did not start"
        for h in hosts:
            os.kill(h.pid, signal.SIGUSR1)
        return hosts

    def ready(self):
        return orjson.loads(request(self.http, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n",
                                    timeout=15)[2])["services"]

    def count(self, name=None):
        services = self.ready()
        if name is not None:
            return len(services.get(name, ()))
        return sum(len(v) for k, v in services.items() if k != "steady")

    def kill(self, hosts):
        for h in hosts:
            h.kill()
        for h in hosts:
            h.wait(10)

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        self.gw.stop()


@pytest.fixture
def storm(tmp_path):
    s = Storm(tmp_path)
    yield s
    s.close()


def test_a_storm_of_registrations_and_disconnects_never_turns_a_known_service_into_404(storm):
    paths = [f"/storm/s{k:02d}/r{k}" for k in range(SERVICES)] + ["/steady/hello"]
    probe = Probe(storm.http, paths)
    try:
        hosts = storm.hosts()
        total = SERVICES * PER_SERVICE
        assert wait_for(lambda: storm.count() == total, 60), storm.ready()
        assert wait_for(lambda: all(any(a[1] == p and a[2] == 200 for a in probe.answers)
                                    for p in paths), 20)
        # Half the instances drop at once (host 0 held every instance of the even
        # services), then the rest.
        storm.kill(hosts[:1])
        assert wait_for(lambda: storm.count() == total // 2, 30), storm.ready()
        storm.kill(hosts[1:])
        assert wait_for(lambda: storm.count() == 0, 30), storm.ready()
        t_gone = time.monotonic()
        time.sleep(0.5)
        after_drop = [a for a in probe.since(t_gone) if a[1] != "/steady/hello"]
        # Back, all at once again.
        storm.hosts()
        assert wait_for(lambda: storm.count() == total, 60), storm.ready()
        t_back = time.monotonic()
        assert wait_for(lambda: {a[1] for a in probe.since(t_back) if a[2] == 200}
                        == set(paths), 20)
    finally:
        probe.stop()

    steady = [a[2] for a in probe.answers if a[1] == "/steady/hello"]
    assert steady and set(steady) == {200}, sorted(set(steady))
    for path in paths[:-1]:
        answers = [a[2] for a in probe.answers if a[1] == path]
        first = answers.index(200)
        # 404 only before the service's first registration; afterwards 200, 503 while it
        # has no instance, 502 for a request its instance died holding.
        assert set(answers[first:]) <= {200, 502, 503}, (path, sorted(set(answers[first:])))
    assert after_drop and {a[2] for a in after_drop} == {503}
