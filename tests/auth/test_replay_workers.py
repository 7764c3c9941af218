"""One DPoP proof, one use, per instance — whichever worker it reaches (issue 16, item 6a).

A real 2-worker instance (`python -m stellagw serve`) without Valkey, the development
Authority minting DPoP-bound tokens and a service in its own process. Each request is put on
a chosen worker: a connection's first request is `/health/ready`, whose body names the worker
that accepted the connection, and the proof follows on the same keep-alive connection.
"""
from __future__ import annotations

import os
import signal
import socket
import threading

import orjson
import pytest

from stellagw.devauth import DevAuthority, DpopKey
from stellagw.devauth.client import fetch_token

from tests.support.gwtest import Served, connect, port_of, read_response, wait_for
from tests.support.services import ServiceProcess

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

# Readiness details name the worker; on the client port so the proof can follow them on
# the same connection.
CONFIG = """
gateway:
  admin: {{publicEndpoints: [live, ready, startup, details]}}
  node: {{workers: 2}}
  http: {{port: {port}, publicOrigin: "http://127.0.0.1:{port}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
    audiences: [stellaops-gateway]
"""

READY = b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n"


class Instance:
    def __init__(self, tmp_path):
        self.authority = DevAuthority(port=0).start_in_thread()
        with socket.socket() as probe:       # publicOrigin names the port: choose it first
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.gw = Served(config_text=CONFIG.format(port=self.port, issuer=self.authority.issuer),
                         tmp_path=tmp_path)
        recs = self.gw.wait_listening(2)
        self.pids = {r["pid"] for r in recs}
        self.svc = ServiceProcess("rw", port_of(recs[0]["tcp"])).start()
        self.key = DpopKey.generate()
        self.token = fetch_token(self.authority.token_endpoint, "demo-client", "demo-secret",
                                 "scans:read", dpop_key=self.key)["access_token"]
        assert wait_for(lambda: self.routes_on({0, 1}), timeout=20), (
            f"service not on both workers: {self.svc.describe()}")

    def routes_on(self, workers) -> bool:
        seen = set()
        for w in workers:
            sock, buf = self.connection_to(w)
            with sock:
                sock.sendall(b"GET /t/rw/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")
                if read_response(sock, buf)[0] == 200:
                    seen.add(w)
        return seen == set(workers)

    def connection_to(self, worker: int):
        """A keep-alive connection the kernel gave to `worker`."""
        for _ in range(200):
            sock = connect(self.port)
            buf = bytearray()
            sock.sendall(READY)
            try:
                got = orjson.loads(read_response(sock, buf)[2])["worker"]
            except (OSError, ConnectionError):
                sock.close()
                continue
            if got == worker:
                return sock, buf
            sock.close()
        raise AssertionError(f"no connection reached worker {worker}")

    def proof_request(self) -> bytes:
        proof = self.key.proof("GET", f"http://127.0.0.1:{self.port}/t/rw/secure",
                               access_token=self.token)
        return (b"GET /t/rw/secure HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP " + self.token.encode()
                + b"\r\nDPoP: " + proof.encode() + b"\r\n\r\n")

    def send_to(self, worker: int, raw: bytes):
        sock, buf = self.connection_to(worker)
        with sock:
            sock.sendall(raw)
            status, headers, _ = read_response(sock, buf)
        return status, headers

    def close(self):
        self.svc.stop()
        self.gw.stop()
        self.authority.stop()


@pytest.fixture
def instance(tmp_path):
    inst = Instance(tmp_path)
    yield inst
    inst.close()


def refused_as_replay(answer) -> bool:
    status, headers = answer
    return status == 401 and "invalid_dpop_proof" in headers.get("www-authenticate", "")


def test_a_proof_replayed_to_each_worker_is_refused(instance):
    for first, other in ((0, 1), (1, 0)):
        raw = instance.proof_request()
        assert instance.send_to(first, raw)[0] == 200
        assert refused_as_replay(instance.send_to(other, raw)), f"accepted again by worker {other}"
        assert refused_as_replay(instance.send_to(first, raw))


def test_one_proof_sent_to_both_workers_at_once_is_accepted_once(instance):
    for _ in range(10):
        raw = instance.proof_request()
        conns = [instance.connection_to(w) for w in (0, 1)]
        start = threading.Barrier(2)
        statuses = [None, None]

        def send(i):
            sock, buf = conns[i]
            start.wait()
            sock.sendall(raw)
            statuses[i] = read_response(sock, buf)[0]
        threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for sock, _ in conns:
            sock.close()
        assert sorted(statuses) == [200, 401], statuses


def test_a_restarted_worker_still_refuses_what_its_predecessor_accepted(instance):
    raws = [instance.proof_request() for _ in range(2)]
    for w, raw in enumerate(raws):
        assert instance.send_to(w, raw)[0] == 200
    victim = min(instance.pids)
    os.kill(victim, signal.SIGKILL)      # this worker only, by its PID
    instance.gw.wait_for_log(lambda r: r.get("message") == "listening"
                             and r.get("pid") not in instance.pids)
    assert wait_for(lambda: instance.routes_on({0, 1}), timeout=20)
    # The new worker fetches the Authority's keys for its first token; on a loaded machine
    # that can outlast a request (503 keys_unavailable), so a fresh proof goes first.
    for w in (0, 1):
        assert wait_for(lambda: instance.send_to(w, instance.proof_request())[0] == 200,
                        timeout=20)
    for raw in raws:
        for w in (0, 1):
            assert refused_as_replay(instance.send_to(w, raw)), f"worker {w} accepted a replay"
