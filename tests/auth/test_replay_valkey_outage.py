"""A DPoP proof refused with 503 because Valkey could not judge it is not spent
(docs/auth.md, "When Valkey fails"; docs/security.md §3a item 17).

A real gateway (`python -m stellagw serve`), a real valkey-server frozen with SIGSTOP or
stopped by its PID, the development Authority minting DPoP-bound tokens, and a raw service
peer that counts the requests reaching it. With `onValkeyError: reject` the first attempt
gets 503 and nothing reaches the service; once Valkey is back the same proof is accepted
exactly once, and a third send is a replay. With `local` the proof goes on during the
outage and stays spent afterwards, in the instance and in Valkey.
"""
from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time

import pytest

from stellagw.auth.replay import VALKEY_PREFIX, replay_key
from stellagw.devauth import DevAuthority, DpopKey
from stellagw.devauth.client import fetch_token
from stellagw.transport import frame as fr

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.servicepeer import RawPeer, hello_for

CONFIG = """
gateway:
  node: {{workers: 1}}
  http: {{port: {port}, publicOrigin: "http://127.0.0.1:{port}"}}
  transports: {{tcp: {{port: 0}}}}
  auth:
    authority: "{issuer}"
    replayCache: {{valkey: "{valkey}", onValkeyError: {policy}}}
"""

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

PATH = "/rp/secure"


class CountingService:
    """A raw service peer: answers every REQUEST with 200 and counts them."""

    def __init__(self, tcp_port: int):
        self.peer = RawPeer(tcp_port)
        hello = hello_for("rp", endpoints=[("GET", PATH)])
        hello["endpoints"][0]["claims"] = [{"type": "scope", "value": "scans:read"}]
        ack = self.peer.hello(hello)
        assert "error" not in ack, ack
        self.served = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                frame = self.peer.read_frame(timeout=60)
            except OSError:
                return
            if frame is None:
                return
            if frame[0] == fr.REQUEST:
                with self._lock:
                    self.served += 1
                enc = fr.FrameEncoder()
                enc.response(frame[1], 200, [], 1, b"ok")
                self.peer.sock.sendall(enc.take())

    def count(self) -> int:
        with self._lock:
            return self.served

    def close(self):
        self.peer.close()


class Setup:
    def __init__(self, tmp_path, valkey, policy):
        self.valkey = valkey
        self.authority = DevAuthority(port=0).start_in_thread()
        with socket.socket() as probe:       # publicOrigin names the port: choose it first
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self.gw = Served(config_text=CONFIG.format(port=self.port, issuer=self.authority.issuer,
                                                   valkey=valkey.url, policy=policy),
                         tmp_path=tmp_path)
        self.service = None
        try:
            rec = self.gw.wait_listening()[0]
            self.service = CountingService(port_of(rec["tcp"]))
            self.key = DpopKey.generate()
            self.token = fetch_token(self.authority.token_endpoint, "demo-client",
                                     "demo-secret", "scans:read", dpop_key=self.key)["access_token"]
            # The Authority's keys load in the background: a first proof may get 503 until
            # then.
            assert wait_for(lambda: self.send(self.proof())[0] == 200, timeout=20), \
                b"\n".join(self.gw.lines[-20:]).decode(errors="replace")
        except BaseException:
            self.close()
            raise

    def proof(self) -> str:
        return self.key.proof("GET", self.origin + PATH, access_token=self.token)

    def send(self, proof: str):
        raw = (f"GET {PATH} HTTP/1.1\r\nHost: gw\r\nAuthorization: DPoP {self.token}\r\n"
               f"DPoP: {proof}\r\n\r\n").encode()
        status, headers, _ = request(self.port, raw)
        return status, headers

    def valkey_key(self, proof: str) -> str:
        payload = proof.split(".")[1]
        jti = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]
        return VALKEY_PREFIX + replay_key(self.key.thumbprint(), jti)

    def close(self):
        if self.service is not None:
            self.service.close()
        self.gw.stop()
        self.authority.stop()


@pytest.fixture
def frozen_valkey(valkey_proc):
    """valkey_proc, and SIGCONT in teardown whatever the test did."""
    yield valkey_proc
    if valkey_proc.running:
        os.kill(valkey_proc.proc.pid, signal.SIGCONT)


def refused_as_replay(answer) -> bool:
    status, headers = answer
    return status == 401 and "invalid_dpop_proof" in headers.get("www-authenticate", "")


def retry_until_judged(setup, proof, attempts=40):
    """Send the proof as a client obeying Retry-After would, while the gateway still answers
    503 (it leaves Valkey alone for a second after a failure); the first other answer."""
    for _ in range(attempts):
        answer = setup.send(proof)
        if answer[0] != 503:
            return answer
        assert answer[1].get("retry-after") == "1"
        time.sleep(0.2)
    raise AssertionError("still 503 after the outage")


def commandstat(valkey, command: str) -> int:
    for line in valkey.command("INFO", "commandstats").decode().splitlines():
        if line.startswith(f"cmdstat_{command}:"):
            return int(line.split("calls=")[1].split(",")[0])
    return 0


def test_reject_a_proof_refused_while_valkey_is_frozen_is_usable_once_it_is_back(tmp_path,
                                                                                   frozen_valkey):
    setup = Setup(tmp_path, frozen_valkey, "reject")
    try:
        served = setup.service.count()
        proof = setup.proof()
        os.kill(frozen_valkey.proc.pid, signal.SIGSTOP)
        try:
            status, headers = setup.send(proof)     # its SET waits in the frozen server
            assert (status, headers.get("retry-after")) == (503, "1")
            assert setup.service.count() == served
        finally:
            os.kill(frozen_valkey.proc.pid, signal.SIGCONT)
        # The SET ran once Valkey resumed, and so did the release behind it: no trace.
        assert wait_for(lambda: commandstat(frozen_valkey, "eval") == 1, timeout=10)
        assert frozen_valkey.command("EXISTS", setup.valkey_key(proof)) == 0

        assert retry_until_judged(setup, proof)[0] == 200
        assert setup.service.count() == served + 1
        assert frozen_valkey.command("EXISTS", setup.valkey_key(proof)) == 1
        assert refused_as_replay(setup.send(proof))
        assert setup.service.count() == served + 1
    finally:
        setup.close()


def test_reject_a_proof_refused_while_valkey_is_stopped_is_usable_once_it_is_back(tmp_path,
                                                                                    valkey_proc):
    setup = Setup(tmp_path, valkey_proc, "reject")
    try:
        served = setup.service.count()
        proof = setup.proof()
        valkey_proc.stop()                       # SIGTERM by its PID: connection refused
        for _ in range(2):                       # Valkey failing, then the quiet second
            status, headers = setup.send(proof)
            assert (status, headers.get("retry-after")) == (503, "1")
        assert setup.service.count() == served
        valkey_proc.start()                      # same port, empty
        assert retry_until_judged(setup, proof)[0] == 200
        assert setup.service.count() == served + 1
        assert refused_as_replay(setup.send(proof))
        assert setup.service.count() == served + 1
    finally:
        setup.close()


def test_local_a_proof_served_during_the_outage_stays_spent(tmp_path, frozen_valkey):
    setup = Setup(tmp_path, frozen_valkey, "local")
    try:
        served = setup.service.count()
        proof = setup.proof()
        os.kill(frozen_valkey.proc.pid, signal.SIGSTOP)
        try:
            assert setup.send(proof)[0] == 200       # the instance's cache decided
            assert setup.service.count() == served + 1
            assert refused_as_replay(setup.send(proof))
        finally:
            os.kill(frozen_valkey.proc.pid, signal.SIGCONT)
        # Its SET, late, is kept: other instances refuse the proof too. No release.
        assert wait_for(lambda: frozen_valkey.command("EXISTS", setup.valkey_key(proof)) == 1,
                        timeout=10)
        assert commandstat(frozen_valkey, "eval") == 0
        assert refused_as_replay(setup.send(proof))
        assert setup.service.count() == served + 1
    finally:
        setup.close()


def test_a_stall_of_the_gateway_itself_is_not_a_replay_cache_outage(tmp_path):
    """docs/security.md §3d row 38: the replay check's own bound was as long as the Valkey
    client's timeout, and the loop runs due timers before it reads sockets: after the
    worker had not run for 0.4 s (a long callback, a collection, CPU throttling; SIGSTOP
    here) every check in flight failed as an outage, and under `reject` the next second
    of DPoP requests was refused 503 too. Now the client's stall-aware timeout decides."""
    from tests.support.services import ServiceProcess
    from tests.support.valkey_server import ValkeyProcess
    from tests.support.gwtest import connect, read_response

    valkey = ValkeyProcess().start()
    authority = DevAuthority(port=0).start_in_thread()
    gw = svc = None
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        gw = Served(config_text=CONFIG.format(port=port, issuer=authority.issuer,
                                              valkey=valkey.url, policy="reject"),
                    tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        worker = rec["pid"]
        svc = ServiceProcess("rl", port_of(rec["tcp"])).start()
        svc.wait_routable(port, "/t/rl/hits", timeout=15)
        key = DpopKey.generate()
        token = authority.mint(scopes=["scans:read"], jkt=key.thumbprint())
        path = "/t/rl/hit/r"
        origin = f"http://127.0.0.1:{port}"
        stop = threading.Event()
        counts: dict[int, int] = {}
        lock = threading.Lock()

        def client():
            with connect(port, timeout=10) as s:
                buf = bytearray()
                while not stop.is_set():
                    proof = key.proof("GET", origin + path, access_token=token)
                    s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
                              b"Authorization: DPoP " + token.encode() + b"\r\nDPoP: "
                              + proof.encode() + b"\r\n\r\n")
                    status = read_response(s, buf)[0]
                    with lock:
                        counts[status] = counts.get(status, 0) + 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        for _ in range(3):
            os.kill(worker, signal.SIGSTOP)
            time.sleep(0.4)
            os.kill(worker, signal.SIGCONT)
            time.sleep(0.6)
        stop.set()
        for t in threads:
            t.join(10)
        assert set(counts) == {200}, counts
        seen = json.loads(request(port, b"GET /t/rl/hits HTTP/1.1\r\nHost: gw\r\n\r\n")[2])
        assert len(seen["hits"]) == counts[200]
    finally:
        if svc is not None:
            svc.stop()
        if gw is not None:
            gw.stop()
        authority.stop()
        valkey.close()
