"""End to end: the gateway (`stellagw serve`) and SDK services, each in its own process,
over real loopback sockets."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time

import orjson
import psutil
import pytest

from tests.support.gwtest import Served, connect, port_of, read_response, request, wait_for
from tests.support.services import ServiceProcess, stop_services

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

GW_CONFIG = """
gateway:
  admin: {{publicEndpoints: [all]}}
  node: {{region: eu1, workers: {workers}}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
  routing: {{neighborRegions: [eu2], defaultTimeout: 5s, versionRamp: 0}}
  health: {{heartbeatIntervalSeconds: 1, checkIntervalSeconds: 1, degradedAfterSeconds: 3,
           heartbeatTimeoutSeconds: 6}}
"""


class Stack:
    def __init__(self, tmp_path, workers=1):
        self.gw = Served(config_text=GW_CONFIG.format(workers=workers), tmp_path=tmp_path)
        recs = self.gw.wait_listening(workers)
        self.http = port_of(recs[0]["http"])
        self.tcp = port_of(recs[0]["tcp"])
        self.services = []

    def service(self, name, region="eu1", version="1.0.0", instance=None, wait=True):
        proc = ServiceProcess(name, self.tcp, region=region, version=version,
                              instance=instance or f"{name}-{region}-{version}").start()
        self.services.append(proc)
        if wait:
            self.wait_registered(instance or f"{name}-{region}-{version}")
        return proc

    def ready(self):
        return orjson.loads(request(self.http, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")[2])

    def wait_registered(self, instance, gone=False, timeout=15):
        def seen():
            services = self.ready()["services"]
            ids = {i["instanceId"] for insts in services.values() for i in insts}
            return (instance in ids) != gone
        assert wait_for(seen, timeout), self.ready()

    def get(self, path, headers=b""):
        return request(self.http, b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), headers),
                       timeout=15)

    def close(self):
        stop_services(self.services)
        return self.gw.stop()


@pytest.fixture
def stack(tmp_path):
    stacks = []

    def make(workers=1):
        s = Stack(tmp_path, workers)
        stacks.append(s)
        return s
    yield make
    for s in stacks:
        s.close()


def test_routing_by_template_and_errors(stack):
    st = stack()
    st.service("alpha")
    st.service("beta")
    status, headers, body = st.get("/t/alpha/whoami", b"X-Correlation-Id: trace-77\r\n")
    assert status == 200 and orjson.loads(body)["instance"] == "alpha-eu1-1.0.0"
    assert headers["x-correlation-id"] == "trace-77"
    seen = orjson.loads(body)["headers"]
    assert seen["x-correlation-id"] == "trace-77" and seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http" and seen["x-forwarded-host"] == "t"
    assert orjson.loads(st.get("/t/beta/whoami")[2])["instance"] == "beta-eu1-1.0.0"
    assert st.get("/t/gamma/whoami")[0] == 404
    status, headers, body = request(st.http, b"DELETE /t/alpha/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    # A big body travels as REQUEST_STREAM_DATA frames and comes back intact.
    payload = os.urandom(300_000)
    status, _, body = request(st.http, b"POST /t/alpha/echo HTTP/1.1\r\nHost: gw\r\nContent-Length: %d\r\n\r\n"
                              % len(payload) + payload)
    assert status == 200 and body == payload


def test_region_then_latency_selection(stack):
    st = stack()
    st.service("geo", region="us1", instance="far")
    assert orjson.loads(st.get("/t/geo/whoami")[2])["instance"] == "far"
    st.service("geo", region="eu2", instance="near")
    assert {orjson.loads(st.get("/t/geo/whoami")[2])["instance"] for _ in range(6)} == {"near"}
    st.service("geo", region="eu1", instance="local")
    assert {orjson.loads(st.get("/t/geo/whoami")[2])["instance"] for _ in range(6)} == {"local"}


def test_version_selection(stack):
    st = stack()
    st.service("ver", version="1.2.0", instance="v120")
    st.service("ver", version="1.10.0", instance="v1100")
    assert orjson.loads(st.get("/t/ver/whoami")[2])["instance"] == "v1100"
    assert orjson.loads(st.get("/t/ver/whoami", b"X-Service-Version: 1.2.0\r\n")[2])["instance"] == "v120"
    assert st.get("/t/ver/whoami", b"X-Service-Version: 3.0.0\r\n")[0] == 503


def test_timeout_is_504_and_the_service_sees_the_cancel(stack):
    st = stack()
    st.service("tmo")
    t0 = time.monotonic()
    status, headers, body = st.get("/t/tmo/slow?ms=5000", b"X-Correlation-Id: late-1\r\n")
    assert status == 504 and orjson.loads(body)["error"]["code"] == "gateway_timeout"
    assert time.monotonic() - t0 < 3  # the endpoint's own 1 s timeout, not the default 5 s
    assert wait_for(lambda: "late-1" in orjson.loads(st.get("/t/tmo/events")[2])["cancelled"])


def test_client_disconnect_cancels_the_request(stack):
    st = stack()
    st.service("dis")
    s = connect(st.http)
    s.sendall(b"GET /t/dis/slow?ms=800 HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: gone-1\r\n\r\n")
    time.sleep(0.2)
    s.close()
    assert wait_for(lambda: "gone-1" in orjson.loads(st.get("/t/dis/events")[2])["cancelled"])


def test_50mb_stream_to_a_slow_reader_keeps_gateway_memory_bounded(stack):
    st = stack()
    st.service("big")
    gw = psutil.Process(st.gw.proc.pid)
    base = gw.memory_info().rss
    s = socket.create_connection(("127.0.0.1", st.http))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"GET /t/big/stream?mb=50 HTTP/1.1\r\nHost: gw\r\n\r\n")
    received, peak = 0, base
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    head, _, rest = head.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    received += len(rest)
    t_end = time.monotonic() + 60
    tail = rest[-5:]
    while time.monotonic() < t_end:
        chunk = s.recv(256 * 1024)
        if not chunk:
            break
        received += len(chunk)
        tail = (tail + chunk)[-5:]
        if tail == b"0\r\n\r\n":
            break
        time.sleep(0.002)  # a deliberately slow reader: ~100 MB/s at most, usually far less
        peak = max(peak, gw.memory_info().rss)
    s.close()
    assert tail == b"0\r\n\r\n"
    assert received > 50 * 1024 * 1024  # the body plus chunk framing
    # The gateway may hold a window per stream plus socket buffers, never the stream.
    assert peak - base < 20 * 1024 * 1024, f"gateway RSS grew by {(peak - base) >> 20} MiB"


def test_a_killed_service_fails_its_requests_with_502_and_nothing_else(stack):
    st = stack()
    st.service("victim")
    st.service("bystander")
    results = {}

    def slow_bystander():
        results["bystander"] = st.get("/t/bystander/slow?ms=600")[0]
    t = threading.Thread(target=slow_bystander)
    t.start()
    status, _, body = st.get("/t/victim/crash")
    assert status == 502 and orjson.loads(body)["error"]["code"] == "bad_gateway"
    t.join(10)
    assert results["bystander"] == 200
    st.wait_registered("victim-eu1-1.0.0", gone=True)
    # The service stays known without an instance: 503 and Retry-After, never "no route".
    status, headers, _ = st.get("/t/victim/whoami")
    assert status == 503 and int(headers["retry-after"]) >= 1
    assert st.get("/t/bystander/whoami")[0] == 200


def test_service_reconnects_and_reregisters_after_the_gateway_restarts_a_worker(stack):
    st = stack(workers=2)
    st.service("phoenix")
    # Both workers route to it: it dialled the second worker from the HELLO_ACK list.
    assert wait_for(lambda: {orjson.loads(st.get("/health/ready")[2])["worker"]
                             for _ in range(20)} == {0, 1})
    ready_workers = set()
    for _ in range(40):
        status, _, body = st.get("/t/phoenix/whoami")
        assert status == 200
        ready_workers.add(orjson.loads(st.get("/health/ready")[2])["worker"])
    # Kill one worker: the supervisor restarts it and the service re-registers with it.
    worker_pids = [c.pid for c in psutil.Process(st.gw.proc.pid).children()]
    os.kill(worker_pids[0], signal.SIGKILL)
    st.gw.wait_for_log(lambda r: r.get("message") == "listening")

    def all_workers_route():
        ok = set()
        for _ in range(30):
            s = connect(st.http)
            s.sendall(b"GET /t/phoenix/whoami HTTP/1.1\r\nHost: gw\r\n\r\nGET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
            buf = bytearray()
            status = read_response(s, buf)[0]
            worker = orjson.loads(read_response(s, buf)[2])["worker"]
            s.close()
            if status == 200:
                ok.add(worker)
        return ok == {0, 1}
    assert wait_for(all_workers_route, timeout=15)


def test_gateway_restart_service_reregisters(tmp_path, stack):
    st = stack()
    st.service("again")
    st.get("/t/again/whoami")
    # Restart the whole gateway on the same transport port: the service finds it again.
    old_tcp = st.tcp
    st.gw.stop()
    st.gw = Served(config_text=GW_CONFIG.format(workers=1).replace("tcp: {port: 0}",
                   f"tcp: {{port: {old_tcp}}}"), tmp_path=tmp_path)
    st.http = port_of(st.gw.wait_listening()[0]["http"])
    st.wait_registered("again-eu1-1.0.0")
    assert st.get("/t/again/whoami")[0] == 200


def test_gateway_shutdown_cancels_what_outlives_the_drain_deadline(tmp_path):
    st = Stack(tmp_path)
    st.gw.stop()  # replace with one whose drain deadline is short
    st.gw = Served(config_text=GW_CONFIG.format(workers=1).replace(
        "http: {port: 0}", "http: {port: 0, shutdownTimeout: 1s}").replace(
        "defaultTimeout: 5s", "defaultTimeout: 20s"), tmp_path=tmp_path)
    rec = st.gw.wait_listening()[0]
    st.http, st.tcp = port_of(rec["http"]), port_of(rec["tcp"])
    try:
        st.service("late")
        s = connect(st.http, timeout=15)
        s.sendall(b"GET /t/late/slow?ms=900 HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: done-1\r\n\r\n")
        s2 = connect(st.http, timeout=15)
        s2.sendall(b"GET /t/late/hang HTTP/1.1\r\nHost: gw\r\n\r\n")
        time.sleep(0.3)
        t0 = time.monotonic()
        st.gw.proc.send_signal(signal.SIGTERM)
        status, headers, body = read_response(s)   # finishes within the deadline
        assert status == 200 and headers["connection"] == "close"
        status, headers, body = read_response(s2)  # cut at the deadline: CANCEL(Shutdown)
        assert status == 503 and "shutting down" in orjson.loads(body)["error"]["message"]
        assert 0.8 < time.monotonic() - t0 < 5
        assert st.gw.proc.wait(15) == 0
    finally:
        s.close()
        s2.close()
        st.close()


def test_openapi_document_aggregates_registered_services(stack):
    from openapi_spec_validator import validate
    st = stack()
    status, headers, body = st.get("/openapi.json")
    assert status == 200
    etag0 = headers["etag"]
    st.service("docs1")
    st.service("docs2")

    def has_both():
        doc = orjson.loads(st.get("/openapi.json")[2])
        return "/t/docs1/whoami" in doc["paths"] and "/t/docs2/whoami" in doc["paths"]
    assert wait_for(has_both, timeout=10)
    status, headers, body = st.get("/openapi.json")
    doc = orjson.loads(body)
    validate(doc)
    assert doc["openapi"].startswith("3.1") and headers["etag"] != etag0
    status, h304, body304 = st.get("/openapi.json", b"If-None-Match: " + headers["etag"].encode() + b"\r\n")
    assert status == 304 and body304 == b"" and "content-length" not in h304
    status, hy, yaml_body = st.get("/openapi.yaml")
    import yaml
    assert status == 200 and yaml.safe_load(yaml_body) == doc
    status, _, disc = st.get("/.well-known/openapi")
    assert status == 200 and orjson.loads(disc)


def test_readiness_waits_for_required_services_and_reports_instance_health(tmp_path):
    gw = Served(config_text=GW_CONFIG.format(workers=1).replace(
        "health: {", "health: {requiredServices: [needed], "), tmp_path=tmp_path)
    rec = gw.wait_listening()[0]
    st = Stack.__new__(Stack)
    st.gw, st.http, st.tcp, st.services = gw, port_of(rec["http"]), port_of(rec["tcp"]), []
    try:
        status, _, body = st.get("/health/ready")
        assert status == 503 and "required service 'needed'" in orjson.loads(body)["reasons"][0]
        proc = st.service("needed")
        status, _, body = st.get("/health/ready")
        assert status == 200
        [inst] = orjson.loads(body)["services"]["needed"]
        assert inst["status"] == "Healthy" and inst["version"] == "1.0.0"
        # A frozen service stops heartbeating: Degraded after 3 s, Unhealthy (not ready) after 6 s.
        proc.send_signal(signal.SIGSTOP)
        try:
            assert wait_for(lambda: orjson.loads(st.get("/health/ready")[2])["services"]
                            ["needed"][0]["status"] == "Degraded", timeout=8)
            assert wait_for(lambda: st.get("/health/ready")[0] == 503, timeout=8)
            assert st.get("/t/needed/whoami")[0] == 503   # registered but not routable
        finally:
            proc.send_signal(signal.SIGCONT)
        assert wait_for(lambda: st.get("/health/ready")[0] == 200, timeout=8)
    finally:
        st.close()


def test_readiness_looks_only_at_the_required_services_instances():
    """docs/security.md §3d, /health/ready: each answer built a set of every instance's
    service (60 ns an instance: 0.6 ms a request at 10,000), required services or none,
    and any client may ask it on the client port. Only a required service's own instances
    are looked at now, up to the first routable one."""
    from tests.support.gwtest import GatewayThread, settings_from
    from tests.support.servicepeer import RawPeer, hello_for

    class NotWalked(dict):
        def values(self):
            raise AssertionError("readiness walked every instance")

    gw = GatewayThread(settings_from("gateway: {http: {port: 0}, health: "
                                     "{requiredServices: [needed]}}")).start()
    peers = []

    def reasons():
        # On the loop, in one go: nothing else runs while the table is swapped.
        routing = gw.worker.routing
        everyone = routing.instances
        routing.instances = NotWalked(everyone)
        try:
            return ("ok", gw.worker.not_ready_reasons())
        except AssertionError as exc:
            return ("walked", str(exc))
        finally:
            routing.instances = everyone
    try:
        for name in ("other", "other", "needed"):
            peer = RawPeer(gw.transport_port)
            assert "error" not in peer.hello(hello_for(name))
            peers.append(peer)
            assert wait_for(lambda: name in gw.call(lambda: list(gw.worker.routing.services)))
            verdict, said = gw.call(reasons)
            assert verdict == "ok", said
            assert said == ([] if name == "needed"
                            else ["required service 'needed' has no routable instance"])
        status, _, body = request(gw.port, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status == 200 and orjson.loads(body)["status"] == "Ready"
    finally:
        for peer in peers:
            peer.close()
        gw.stop()


def test_a_streamed_response_that_stalls_is_cut_and_its_service_cancelled():
    # routing.streamIdleTimeout over real sockets and the real SDK: the service streams a
    # line, then nothing. The client gets the head and the line, then the connection is
    # cut without the last chunk; the service's producer is cancelled; the gateway serves on.
    from tests.support.gwtest import GatewayThread, is_closed, settings_from
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0}, routing: {streamIdleTimeout: 1s}}")).start()
    svc = ServiceProcess("st", gw.transport_port).start()
    try:
        svc.wait_routable(gw.port, timeout=15)
        with connect(gw.port, timeout=10) as s:
            s.sendall(b"GET /t/st/stall?ms=60000 HTTP/1.1\r\nHost: gw\r\n"
                      b"X-Correlation-Id: stalled-1\r\n\r\n")
            got = b""
            while b"first\n" not in got:
                chunk = s.recv(65536)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in got
            assert is_closed(s, timeout=10)      # cut: no "late" line, no last chunk
        assert wait_for(lambda: "stalled-1" in orjson.loads(request(
            gw.port, b"GET /t/st/events HTTP/1.1\r\nHost: gw\r\n\r\n")[2])["cancelled"])
        assert request(gw.port, b"GET /t/st/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
        assert gw.call(lambda: gw.worker.hub.timeouts) == 1
    finally:
        svc.stop()
        gw.stop()


def test_a_websocket_with_nothing_moving_is_closed_and_its_handler_cancelled():
    # routing.streamIdleTimeout on a WebSocket, real sockets, picows client, SDK service:
    # messages and the client's pings keep it open past the timeout; then nothing moves
    # and the client gets a close frame 1001, the service's handler CANCEL, the service
    # no blame (it is still selected), and the gateway serves on.
    import asyncio

    from picows import WSListener, WSMsgType, ws_connect

    from tests.support.gwtest import GatewayThread, settings_from
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0}, routing: {streamIdleTimeout: 1s, "
        "outlierDetection: {consecutiveErrors: 1, maxEjectionPercent: 100}}}")).start()
    svc = ServiceProcess("wsi", gw.transport_port).start()
    got, closed = [], []

    class Client(WSListener):
        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.CLOSE:
                closed.append((frame.get_close_code(), frame.get_close_message()))
            elif frame.msg_type == WSMsgType.TEXT:
                got.append(frame.get_payload_as_bytes())

    async def main():
        loop = asyncio.get_running_loop()
        transport, _ = await ws_connect(Client, f"ws://127.0.0.1:{gw.port}/t/wsi/ws",
                                        extra_headers={"X-Correlation-Id": "ws-idle-1"})
        for i in range(4):           # 2.4 s in all, never 1 s without a message or a ping
            transport.send(WSMsgType.TEXT if i % 2 == 0 else WSMsgType.PING, b"m%d" % i)
            await asyncio.sleep(0.6)
        assert closed == [] and got == [b"m0", b"m2"]
        end = loop.time() + 10
        while not closed and loop.time() < end:      # now quiet: closed within ~2 s
            await asyncio.sleep(0.05)
        transport.disconnect()

    try:
        svc.wait_routable(gw.port, timeout=15)
        asyncio.run(main())
        assert [(int(code), reason) for code, reason in closed] == [(1001, b"idle")]
        assert wait_for(lambda: "ws-idle-1" in orjson.loads(request(
            gw.port, b"GET /t/wsi/events HTTP/1.1\r\nHost: gw\r\n\r\n")[2])["cancelled"])
        assert request(gw.port, b"GET /t/wsi/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
        assert gw.call(lambda: gw.worker.hub.timeouts) == 1
        assert gw.call(lambda: sum(len(b) for b in gw.worker.hub.wheel.buckets.values())) == 0
        # Nothing of it is held: no stream in flight, the client connection counted out.
        assert gw.call(lambda: (sum(len(c.inflight) for c in gw.worker.hub._by_conn),
                                gw.worker.websockets_open)) == (0, 0)
    finally:
        svc.stop()
        gw.stop()


def test_finished_requests_leave_nothing_behind_in_the_timer_wheel():
    # Regression: finished requests stayed in the timeout wheel until their (30 s)
    # deadline, so RSS grew with the request rate (240 MB under wrk).
    from tests.support.gwtest import GatewayThread, settings_from
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    svc = ServiceProcess("wh", gw.transport_port).start()
    try:
        svc.wait_routable(gw.port, timeout=15)
        with connect(gw.port) as s:
            buf = bytearray()
            for _ in range(300):
                s.sendall(b"GET /t/wh/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")
                assert read_response(s, buf)[0] == 200
        held = gw.call(lambda: sum(len(b) for b in gw.worker.hub.wheel.buckets.values()))
        assert held == 0
        # A routed request's REQUEST and RESPONSE frames are counted on the link and folded
        # into the frame counts when a snapshot is taken: each is there, once.
        from stellagw.transport.frame import REQUEST, RESPONSE
        before = dict(gw.call(lambda: gw.worker.metrics.snapshot())["frames"])
        for _ in range(7):
            assert request(gw.port, b"GET /t/wh/whoami HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
        after = dict(gw.call(lambda: gw.worker.metrics.snapshot())["frames"])
        assert after[REQUEST] - before[REQUEST] == 7 and after[RESPONSE] - before[RESPONSE] == 7
    finally:
        svc.stop()
        gw.stop()


def test_sdk_finds_a_gateway_added_behind_its_name_later(tmp_path):
    # Scale-up: the service is configured with a name; a new address appears behind it.
    import asyncio
    import socket as _socket

    from stellagw.service import Response, Service
    first = Served(config_text=GW_CONFIG.format(workers=1), tmp_path=tmp_path)
    second = None
    try:
        r1 = first.wait_listening()[0]
        with _socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        # Same port on 127.0.0.1 and 127.0.0.2: "gw.test" resolves to one, then both.
        first.stop()
        cfg = GW_CONFIG.format(workers=1).replace("tcp: {port: 0}", f"tcp: {{port: {port}}}")
        cfg = cfg.replace("region: eu1", "region: eu1, nodeId: gw-a")
        first = Served(config_text=cfg, tmp_path=tmp_path)
        r1 = first.wait_listening()[0]
        addrs = ["127.0.0.1"]

        async def main():
            svc = Service("grow", gateways=[f"gw.test:{port}"], resolve_interval=0.2,
                          reconnect_min=0.05)

            async def resolve(host):
                return list(addrs)
            svc._addresses = resolve

            @svc.get("/t/grow/x")
            async def x(req):
                return Response(b"x")
            await svc.start()
            await svc.wait_registered(1)
            nonlocal second
            d2 = tmp_path / "second"
            d2.mkdir()
            # Another instance: its own address and node id (a pod name, in Kubernetes).
            second = Served(config_text=cfg.replace(
                f"tcp: {{port: {port}}}", f"tcp: {{host: 127.0.0.2, port: {port}}}").replace(
                "nodeId: gw-a", "nodeId: gw-b"), tmp_path=d2)
            await asyncio.get_running_loop().run_in_executor(None, second.wait_listening)
            addrs.append("127.0.0.2")
            await svc.wait_registered(2, timeout=10)   # found the new gateway by itself
            await svc.stop()
        asyncio.run(main())
    finally:
        first.stop()
        if second is not None:
            second.stop()


class _Recording:
    """A service connection's transport that records every write."""

    def __init__(self, transport):
        self.transport = transport
        self.writes = []

    def write(self, data):
        self.writes.append(bytes(data))
        self.transport.write(data)

    def __getattr__(self, name):
        return getattr(self.transport, name)


def test_a_burst_goes_to_the_service_in_bounded_writes_and_every_request_is_answered():
    """Requests that arrive together are written to the service together, but never more
    than frame.WRITE_BATCH frames at once: the service starts on the first of a burst while
    the gateway encodes the rest (docs/hot-path.md)."""
    from stellagw.transport import frame as fr
    from tests.support.gwtest import GatewayThread, settings_from
    gw = GatewayThread(settings_from("gateway: {http: {port: 0}}")).start()
    svc = ServiceProcess("wb", gw.transport_port).start()
    clients = []
    try:
        svc.wait_routable(gw.port, timeout=15)
        req = b"GET /t/wb/whoami HTTP/1.1\r\nHost: t\r\nX-Pad: " + b"p" * 200 + b"\r\n\r\n"
        for _ in range(60):
            s = connect(gw.port, timeout=15)
            s.sendall(req)
            assert read_response(s)[0] == 200
            clients.append(s)
        conn = gw.call(lambda: next(iter(gw.worker.hub.connections)))
        rec = _Recording(conn.transport)
        gw.call(setattr, conn, "transport", rec)
        # Hold the gateway's loop while every client sends: it then reads all 60 requests
        # in one turn of the loop, the burst that follows a stall.
        held = threading.Event()

        def hold():
            held.set()
            time.sleep(0.5)
        gw.loop.call_soon_threadsafe(hold)
        assert held.wait(5)
        for s in clients:
            s.sendall(req)
        assert all(read_response(s)[0] == 200 for s in clients)
        writes = gw.call(lambda: list(rec.writes))
        gw.call(setattr, conn, "transport", rec.transport)
        per_write = []
        for data in writes:
            dec = fr.FrameDecoder()
            dec.feed(data)
            types = []
            while (f := dec.next()) is not None:
                types.append(f[0])
            per_write.append(types.count(fr.REQUEST))
        assert sum(per_write) == 60
        assert max(per_write) <= fr.WRITE_BATCH < 60, per_write
        assert len([n for n in per_write if n]) >= -(-60 // fr.WRITE_BATCH)
    finally:
        for s in clients:
            s.close()
        svc.stop()
        gw.stop()
