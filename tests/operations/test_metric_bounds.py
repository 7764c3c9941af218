"""What a service (and its clients) can make a worker's metrics hold: the request label sets
per (service, method, route template, status) are bounded, past the bound counted under
`_other` (docs/security.md §3d, "route label sets"; docs/operations.md, metrics)."""
from __future__ import annotations

import socket
import threading

import orjson
import pytest

from stellagw.observe import metrics as observe_metrics
from stellagw.transport import frame as fr

from tests.support.gwtest import GatewayThread, connect, settings_from
from tests.support.servicepeer import RawPeer, hello_for

pytestmark = pytest.mark.twin   # run again uncompiled: ingress/http.py is glue

TEMPLATES = 40
STATUSES = (200, 404, 503)


class StatusService:
    """A raw service that answers each request with the status its query names, and
    keeps the paths it was sent."""

    def __init__(self, gw, endpoints):
        self.peer = RawPeer(gw.transport_port)
        ack = self.peer.hello(hello_for("svc", endpoints=endpoints))
        assert "error" not in ack, ack
        self.seen = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                frame = self.peer.read_frame(0.2)
            except (socket.timeout, TimeoutError, OSError):
                continue
            if frame is None:
                return
            ftype, corr, payload = frame
            if ftype != fr.REQUEST:
                continue
            req = fr.decode_request(payload)
            self.seen.append(req[3])
            status = int(bytes(req[4]).split(b"=")[1])
            enc = fr.FrameEncoder()
            enc.response(corr, status, [], fr.FLAG_END_STREAM, b"")
            self.peer.sock.sendall(enc.take())

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.peer.close()


def exchange(port, raws):
    """Send requests pipelined 16 at a time on one connection; their statuses."""
    sock = connect(port, timeout=10)
    statuses = []
    try:
        for k in range(0, len(raws), 16):
            batch = raws[k:k + 16]
            sock.sendall(b"".join(batch))
            buf = b""
            while buf.count(b"HTTP/1.1 ") < len(batch) or not buf.endswith(b"\r\n\r\n"):
                data = sock.recv(1 << 16)
                assert data, "connection closed"
                buf += data
            statuses += [int(line[9:12]) for line in buf.split(b"\r\n")
                         if line.startswith(b"HTTP/1.1 ")]
    finally:
        sock.close()
    return statuses


def test_route_label_sets_past_the_bound_count_as_other(monkeypatch):
    monkeypatch.setattr(observe_metrics, "MAX_REQUEST_LABELS", 50, raising=False)
    monkeypatch.setattr(observe_metrics, "MAX_DURATION_LABELS", 20, raising=False)
    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}},
        "logging": {"accessLog": False}}}).decode())).start()
    svc = None
    try:
        svc = StatusService(gw, [("GET", f"/svc/t{i}") for i in range(TEMPLATES)])
        raws = [f"GET /svc/t{i}?s={s} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                for i in range(TEMPLATES) for s in STATUSES]
        statuses = exchange(gw.port, raws)
        # Every request reached the service and its answer the client: only the labels change.
        assert statuses == [s for _ in range(TEMPLATES) for s in STATUSES]
        assert len(svc.seen) == len(raws)
        m = gw.worker.metrics
        snap = gw.call(m.snapshot)           # folds what the request path counted
        requests = {tuple(r[:4]): r[4] for r in snap["requests"]}
        durations = {tuple(d[:3]): d[5] for d in snap["durations"]}
        ours = {k: v for k, v in requests.items() if k[0] in ("svc", "_other")}
        # 50 label sets, then one _other label set per status; nothing beyond.
        assert len(requests) <= 50 + len(STATUSES)
        assert {k for k in ours if k[0] == "_other"} == {
            ("_other", "_other", "_other", s) for s in STATUSES}
        assert sum(ours.values()) == len(raws)       # every request counted once
        assert ("svc", "GET", "/svc/t0", 200) in requests
        assert len(durations) <= 20 + 1 and durations[observe_metrics.OTHER_ROUTE] > 0
        assert sum(v for k, v in durations.items()
                   if k[0] in ("svc", "_other")) == len(raws)
    finally:
        if svc is not None:
            svc.close()
        gw.stop()


def test_metrics_request_done_keeps_the_same_bound(monkeypatch):
    monkeypatch.setattr(observe_metrics, "MAX_REQUEST_LABELS", 3, raising=False)
    monkeypatch.setattr(observe_metrics, "MAX_DURATION_LABELS", 2, raising=False)
    m = observe_metrics.Metrics()
    for i in range(10):
        m.request_done("svc", "GET", f"/t{i}", 200, 0.01)
    assert len(m.requests) == 4 and m.requests[("_other", "_other", "_other", 200)] == 7
    assert len(m.durations) == 3 and m.durations[observe_metrics.OTHER_ROUTE].n == 8
