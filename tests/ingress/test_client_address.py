"""The client's real address (issue 18 item 5): the PROXY protocol and X-Forwarded-For /
Forwarded from trusted proxies only, read right to left; what the service, the rate limit
and the log see."""
from __future__ import annotations

import ipaddress
import socket
import time

import orjson
import pytest

from stellagw.config import ConfigError
from stellagw.ingress.proxy import ProxyError, TrustedProxies, client_key, parse_proxy_header

from tests.support.gwtest import Served, connect, port_of, read_response, request, settings_from
from tests.support.services import ServiceProcess
from tests.ingress.test_ingress_protocol import MockTransport, make, new_protocol, responses


def v2(src, dst, sport=1234, dport=80, command=0x21, tlv=b""):
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big") + tlv
    return (b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, family]) + len(body).to_bytes(2, "big")
            + body)


# --------------------------------------------------------------------- the parsers

@pytest.mark.parametrize("data, mode, want", [
    (b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\nGET", "v1", (43, "203.0.113.7")),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", "any", (46, "2001:db8::7")),
    (b"PROXY UNKNOWN\r\n", "v1", (15, None)),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", "v1", (35, None)),
    (v2("198.51.100.9", "10.0.0.1"), "v2", (28, "198.51.100.9")),
    (v2("2001:db8::9", "2001:db8::1"), "any", (52, "2001:db8::9")),
    (v2("198.51.100.9", "10.0.0.1", tlv=b"\x03\x00\x04abcd"), "v2", (35, "198.51.100.9")),
    (v2("198.51.100.9", "10.0.0.1", command=0x20), "v2", (28, None)),   # LOCAL
    (b"PROXY TCP4 1.2.3.4", "v1", None),                                 # incomplete
    (b"\r\n\r\n\x00\r\n", "v2", None),
])
def test_proxy_headers(data, mode, want):
    assert parse_proxy_header(data, mode) == want


@pytest.mark.parametrize("data, mode", [
    (b"GET / HTTP/1.1\r\n", "v1"),                                  # no header at all
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v2"),                 # v1 where v2 is configured
    (v2("1.2.3.4", "5.6.7.8"), "v1"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "v1"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "v1"),                     # family mismatch
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n", "v1"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "v1"),
    (b"PROXY " + b"x" * 120, "v1"),                                 # longer than 107, no CRLF
    (b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c" + bytes(12), "v2"),  # version 3
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff", "v2"),               # 64 KiB of TLVs
])
def test_bad_proxy_headers(data, mode):
    with pytest.raises(ProxyError):
        parse_proxy_header(data, mode)


@pytest.mark.parametrize("xff, forwarded, client", [
    (b"203.0.113.7", None, "203.0.113.7"),
    (b"203.0.113.7, 10.0.0.5", None, "203.0.113.7"),              # a trusted hop skipped
    (b"6.6.6.6, 203.0.113.7, 10.0.0.5", None, "203.0.113.7"),     # the client's own claim ignored
    (b"garbage, 203.0.113.7", None, "203.0.113.7"),
    (b"203.0.113.7, garbage", None, "10.0.0.9"),                  # unparsable: stop at the peer
    (b"10.0.0.5, 10.0.0.6", None, "10.0.0.5"),                    # all trusted: the leftmost
    # a balancer that appends the client's port, or brackets IPv6 (security.md §3d row 36)
    (b"6.6.6.6, 203.0.113.7:51234", None, "203.0.113.7"),
    (b"[2001:db8::1]:443, 10.0.0.5:80", None, "2001:db8::1"),
    (b"[2001:db8::1]", None, "2001:db8::1"),
    (b"203.0.113.7:", None, "10.0.0.9"),                          # not a port: unparsable
    (b"203.0.113.7:http", None, "10.0.0.9"),
    (b"[2001:db8::1]x", None, "10.0.0.9"),
    (None, b'for=203.0.113.7;proto=https, for="[2001:db8::1]:443"', "2001:db8::1"),
    (None, b'for="203.0.113.8:5000", for=10.0.0.5', "203.0.113.8"),
    (None, b"for=unknown", "10.0.0.9"),
])
def test_forwarded_for_right_to_left(xff, forwarded, client):
    trust = TrustedProxies(["10.0.0.0/8"])
    assert trust.client("10.0.0.9", xff, forwarded) == client


@pytest.mark.parametrize("header", ["xff", "forwarded"])
def test_only_the_hops_up_to_the_first_untrusted_one_are_parsed(monkeypatch, header):
    # A client behind the load balancer writes what it likes left of the address the
    # balancer appends. Parsing the whole list first cost 38 ms a request for 16 KB of
    # "a," (an adversarial probe): 26 requests a second pinned a worker. Right to left,
    # one hop at a time, the walk ends at the client the balancer saw.
    from stellagw.ingress import proxy
    parsed = []
    real = proxy._address
    monkeypatch.setattr(proxy, "_address", lambda token: parsed.append(token) or real(token))
    trust = TrustedProxies(["10.0.0.0/8"])
    if header == "xff":
        xff, forwarded = b"a," * 7000 + b"6.6.6.6, 203.0.113.7, 10.0.0.5", None
    else:
        xff, forwarded = None, b"for=a," * 2300 + b"for=6.6.6.6, for=203.0.113.7, for=10.0.0.5"
    assert trust.client("10.0.0.9", xff, forwarded) == "203.0.113.7"
    assert len(parsed) == 2


def test_config_checks_the_networks():
    assert settings_from("gateway: {http: {trustedProxies: [10.0.0.0/8, '::1']}}") \
        .gateway.http.trusted_proxies == ("10.0.0.0/8", "::1/128")
    with pytest.raises(ConfigError) as err:
        settings_from("gateway: {http: {trustedProxies: [10.0.0.300/8]}}")
    assert err.value.path == "gateway.http.trustedProxies[0]"
    with pytest.raises(ConfigError):
        settings_from("gateway: {http: {proxyProtocol: v3}}")


# --------------------------------------------------------------------- the protocol

class Seen:
    def __init__(self):
        self.reqs = []

    def handle(self, req):
        self.reqs.append(req)
        return 200, b"", b""


def connect_proto(cfg, peer="127.0.0.1"):
    seen = Seen()
    worker, proto, t, _ = make(cfg, pipeline=seen)
    proto2 = new_protocol(worker)
    t2 = MockTransport()
    t2.get_extra_info = lambda name, default=None: {"peername": (peer, 5555)}.get(name, default)
    proto2.connection_made(t2)
    return seen, proto2, t2


def test_x_forwarded_for_counts_only_from_a_trusted_peer():
    raw = b"GET /a HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n"
    seen, proto, t = connect_proto("gateway: {http: {trustedProxies: [127.0.0.0/8]}}")
    proto.data_received(raw)
    assert seen.reqs[0].client_ip == b"203.0.113.7"
    seen, proto, t = connect_proto("gateway: {http: {trustedProxies: [10.0.0.0/8]}}")
    proto.data_received(raw)
    assert seen.reqs[0].client_ip == b"127.0.0.1"
    seen, proto, t = connect_proto("")
    proto.data_received(raw)
    assert seen.reqs[0].client_ip == b"127.0.0.1"


def test_proxy_protocol_sets_the_connection_address():
    seen, proto, t = connect_proto("gateway: {http: {proxyProtocol: any}}")
    for piece in (b"PROXY TCP4 203.0.", b"113.7 10.0.0.1 40000 443\r\nGET /a HTTP/1.1\r\nHo",
                  b"st: a\r\n\r\n"):
        proto.data_received(piece)
    assert seen.reqs[0].client_ip == b"203.0.113.7" and proto.anonymous_key == "ip:203.0.113.7"
    assert [s for s, _, _ in responses(t.out)] == [200]


def test_proxy_protocol_refuses_a_connection_without_it_or_from_an_untrusted_peer():
    seen, proto, t = connect_proto("gateway: {http: {proxyProtocol: v1}}")
    proto.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert bytes(t.out).startswith(b"HTTP/1.1 400") and t.closed and seen.reqs == []
    seen, proto, t = connect_proto("gateway: {http: {proxyProtocol: v1, trustedProxies: [10.0.0.0/8]}}")
    assert bytes(t.out).startswith(b"HTTP/1.1 400") and t.closed


def open_from(worker, peer, first=b""):
    """One more client connection to `worker` from `peer` (its first bytes sent)."""
    proto = new_protocol(worker)
    t = MockTransport()
    t.get_extra_info = lambda name, default=None: {"peername": (peer, 5555)}.get(name, default)
    proto.connection_made(t)
    if first and not t.closed:
        proto.data_received(first)
    return proto, t


GET = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n"


def refused(t):
    return bytes(t.out).startswith(b"HTTP/1.1 503") and t.closed \
        and b"too many connections from this address" in bytes(t.out)


def test_one_address_holds_at_most_max_connections_per_client():
    # One host cannot take every connection of a worker: the next one from its address is
    # answered 503 and closed — whatever it sent goes nowhere — while other addresses are
    # served; a closed connection frees its place, and the count goes with the last one.
    seen = Seen()
    worker, first, _, _ = make("gateway: {http: {maxConnectionsPerClient: 2}}", pipeline=seen)
    a1, t1 = open_from(worker, "192.0.2.1", GET)
    a2, t2 = open_from(worker, "192.0.2.1", GET)
    a3, t3 = open_from(worker, "192.0.2.1", GET)
    assert refused(t3) and not t1.closed and not t2.closed
    b1, u1 = open_from(worker, "198.51.100.9", GET)
    assert not u1.closed
    assert [r.client_ip for r in seen.reqs] == [b"192.0.2.1", b"192.0.2.1", b"198.51.100.9"]
    a3.connection_lost(None)
    a1.connection_lost(None)
    a4, t4 = open_from(worker, "192.0.2.1", GET)
    assert not t4.closed and len(seen.reqs) == 4
    assert worker.refused_connections == {"per_client": 1}
    for proto in (a2, a4, b1, first):
        proto.connection_lost(None)
    assert worker.per_client == {}                  # nothing kept for a gone address


def test_a_trusted_proxy_is_not_capped_but_the_clients_proxy_protocol_names_are():
    worker, _, _, _ = make("gateway: {http: {maxConnectionsPerClient: 1, "
                           "trustedProxies: [127.0.0.0/8]}}")
    conns = [open_from(worker, "127.0.0.1", GET) for _ in range(3)]
    assert not any(t.closed for _, t in conns) and b"127.0.0.1" not in worker.per_client
    seen = Seen()
    worker, _, _, _ = make("gateway: {http: {maxConnectionsPerClient: 1, proxyProtocol: v1, "
                           "trustedProxies: [127.0.0.0/8]}}", pipeline=seen)
    header = b"PROXY TCP4 203.0.113.7 10.0.0.1 40000 443\r\n"
    _, t1 = open_from(worker, "127.0.0.1", header + GET)
    _, t2 = open_from(worker, "127.0.0.1", header + GET)
    _, t3 = open_from(worker, "127.0.0.1", header.replace(b".7 ", b".8 ") + GET)
    assert not t1.closed and refused(t2) and not t3.closed
    # The refused one's request, in the same read as its PROXY header, went nowhere.
    assert [r.client_ip for r in seen.reqs] == [b"203.0.113.7", b"203.0.113.8"]
    assert worker.per_client == {b"203.0.113.7": 1, b"203.0.113.8": 1}


def test_an_ipv6_client_is_counted_by_its_slash_64():
    # A host usually has a whole /64: counted by address, it could open 2^64 "clients".
    # An IPv4-mapped address is the IPv4 client it maps.
    assert client_key(b"2001:db8::1") == client_key(b"2001:db8::ffff:1") == b"2001:db8::/64"
    assert client_key(b"::ffff:192.0.2.1") == client_key(b"192.0.2.1") == b"192.0.2.1"
    worker, first, _, _ = make("gateway: {http: {maxConnectionsPerClient: 2}}")
    conns = [open_from(worker, peer) for peer in
             ("2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8:0:1::1",
              "::ffff:192.0.2.1", "192.0.2.1", "192.0.2.1")]
    assert [refused(t) for _, t in conns] == [False, False, True, False, False, False, True]
    for proto, _ in conns + [(first, None)]:
        proto.connection_lost(None)
    assert worker.per_client == {}


def test_max_connections_per_client_is_checked():
    assert settings_from("").gateway.http.max_connections_per_client == 1000
    assert settings_from("gateway: {http: {maxConnectionsPerClient: 0}}") \
        .gateway.http.max_connections_per_client == 0
    with pytest.raises(ConfigError) as err:
        settings_from("gateway: {http: {maxConnectionsPerClient: -1}}")
    assert err.value.path == "gateway.http.maxConnectionsPerClient"


def test_a_websocket_holds_its_place_until_it_closes():
    # Over real sockets: with 2 per address, a WebSocket (handed to picows) and a kept-alive
    # connection leave no room for a third from the same address, which is answered 503 and
    # never reaches the service; once the WebSocket closes, there is room again.
    import asyncio
    import time

    from picows import WSListener, WSMsgType, ws_connect

    from tests.support.gwtest import GatewayThread, is_closed
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0, maxConnectionsPerClient: 2}}")).start()
    svc = ServiceProcess("pc", gw.transport_port).start()
    try:
        svc.wait_routable(gw.port, timeout=15)
        assert wait_until(lambda: gw.call(lambda: dict(gw.worker.per_client)) == {})
        third = b"GET /t/pc/whoami HTTP/1.1\r\nHost: t\r\nX-Correlation-Id: third-1\r\n\r\n"

        async def main():
            got = []

            class Client(WSListener):
                def on_ws_frame(self, transport, frame):
                    if frame.msg_type == WSMsgType.TEXT:
                        got.append(frame.get_payload_as_bytes())

            ws, _ = await ws_connect(Client, f"ws://127.0.0.1:{gw.port}/t/pc/ws")
            ws.send(WSMsgType.TEXT, b"hi")
            while not got:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()

            def requests_sent():
                from stellagw.transport.frame import REQUEST
                return dict(gw.call(lambda: gw.worker.metrics.snapshot())["frames"])[REQUEST]

            def plain_then_third():
                with connect(gw.port) as kept:
                    kept.sendall(b"GET /t/pc/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
                    assert read_response(kept)[0] == 200
                    before = requests_sent()
                    with connect(gw.port) as s:
                        s.sendall(third)
                        status = read_response(s)[0]
                        assert is_closed(s, timeout=5)
                    assert requests_sent() == before        # nothing went to the service
                    return status
            status = await loop.run_in_executor(None, plain_then_third)
            ws.disconnect()
            return status
        assert asyncio.run(main()) == 503
        assert wait_until(lambda: gw.call(lambda: dict(gw.worker.per_client)) == {})
        assert gw.call(lambda: (len(gw.worker.connections), gw.worker.websockets_open)) == (0, 0)
        status, _, body = request(gw.port, third)
        assert status == 200
        assert gw.call(lambda: dict(gw.worker.refused_connections)) == {"per_client": 1}
    finally:
        svc.stop()
        gw.stop()


def test_connections_reset_mid_head_give_their_places_back():
    # Hostile: fill the cap with connections that send half a head (or nothing), then reset
    # them (RST, no FIN) — three times over. Each reset frees its place at once; the count
    # does not creep, and the address is served after.
    import struct

    from tests.support.gwtest import GatewayThread
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0, maxConnectionsPerClient: 5}}")).start()
    try:
        for _ in range(3):
            held = [connect(gw.port) for _ in range(5)]
            for s in held[::2]:
                s.sendall(b"GET /health/live HTTP/1.1\r\nHo")
            assert wait_until(lambda: gw.call(lambda: dict(gw.worker.per_client))
                              == {b"127.0.0.1": 5})
            status, _, _ = request(gw.port, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status == 503
            for s in held:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
            assert wait_until(lambda: gw.call(lambda: (dict(gw.worker.per_client),
                                                       len(gw.worker.connections))) == ({}, 0))
        assert request(gw.port, b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n")[0] == 200
        assert gw.call(lambda: dict(gw.worker.refused_connections)) == {"per_client": 3}
    finally:
        gw.stop()


def test_a_reload_changes_the_cap_for_connections_accepted_from_then_on():
    # gateway.http.maxConnectionsPerClient is applied by a reload (docs/configuration.md:
    # connections accepted from the reload on), like routing.streamIdleTimeout (streams
    # from then on): in process, the worker's own reload path with a source read in code.
    import asyncio

    from stellagw.reload import ConfigSource

    from tests.support.gwtest import GatewayThread, is_closed
    current = [settings_from("gateway: {http: {port: 0, maxConnectionsPerClient: 1}}")]
    source = ConfigSource(None, current[0], reader=lambda: current[0])
    gw = GatewayThread(current[0], config_source=source).start()
    live = b"GET /health/live HTTP/1.1\r\nHost: t\r\n\r\n"
    try:
        with connect(gw.port) as first:
            first.sendall(live)
            assert read_response(first)[0] == 200
            with connect(gw.port) as second:
                second.sendall(live)
                assert read_response(second)[0] == 503 and is_closed(second, timeout=5)
            current[0] = settings_from("gateway: {http: {port: 0, maxConnectionsPerClient: 2}, "
                                       "routing: {streamIdleTimeout: 7s}}")
            gw.call(lambda: asyncio.ensure_future(gw.worker.reloader.reload()))
            assert wait_until(lambda: gw.call(lambda: gw.worker.hub.stream_idle_timeout) == 7.0)
            with connect(gw.port) as second:
                second.sendall(live)
                assert read_response(second)[0] == 200
                first.sendall(live)                   # the first one was never cut
                assert read_response(first)[0] == 200
        assert wait_until(lambda: gw.call(lambda: dict(gw.worker.per_client)) == {})
    finally:
        gw.stop()


def wait_until(check, timeout=10.0):
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------- end to end

CONFIG = """
gateway:
  node: {{region: eu1, workers: 1}}
  http: {{port: 0{http}}}
  transports: {{tcp: {{port: 0}}}}
rate_limiting:
  for_instance:
    rules: [{{max_requests: 2, per_seconds: 60}}]
"""


@pytest.fixture
def stack(tmp_path):
    made = []

    def start(http=""):
        gw = Served(config_text=CONFIG.format(http=http), tmp_path=tmp_path)
        rec = gw.wait_listening()[0]
        port, tcp = port_of(rec["http"]), port_of(rec["tcp"])
        svc = ServiceProcess("ca", tcp).start()
        made.append((gw, svc))
        start.served.append(gw)
        prefix = b"PROXY UNKNOWN\r\n" if "proxyProtocol" in http else b""
        svc.wait_routable(port, raw=prefix + b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n"
                                             b"X-Forwarded-For: 192.0.2.1\r\n\r\n")
        return port
    start.served = []
    yield start
    for gw, svc in made:
        svc.stop()
        gw.stop()


def whoami(port, head=b""):
    status, _, body = request(port, b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n")
    return status, (orjson.loads(body)["headers"] if status == 200 else None)


def test_end_to_end_behind_a_trusted_proxy(stack):
    port = stack(", trustedProxies: [127.0.0.0/8]")
    status, headers = whoami(port, b"X-Forwarded-For: 6.6.6.6, 203.0.113.7\r\n")
    assert headers["x-forwarded-for"] == "203.0.113.7"
    # What a client writes left of its balancer's hop is not looked at, however long.
    status, headers = whoami(port, b"X-Forwarded-For: " + b"a," * 7000 + b"203.0.113.7\r\n")
    assert status == 200 and headers["x-forwarded-for"] == "203.0.113.7"
    # The anonymous rate limit is per resolved client: 2 each (one spent by the fixture's
    # first request from 192.0.2.1).
    for client in (b"203.0.113.20", b"203.0.113.21"):
        statuses = [whoami(port, b"X-Forwarded-For: " + client + b"\r\n")[0] for _ in range(3)]
        assert statuses == [200, 200, 429]
    # An IPv6 client is its /64, and an IPv4-mapped address its IPv4 one, as for the
    # connection cap: by the full address, one /64 was 2^64 clients and never limited
    # (110,000 requests through a rule of 5 a minute).
    statuses = [whoami(port, b"X-Forwarded-For: 2001:db8:7:7::%x\r\n" % i)[0] for i in range(1, 4)]
    assert statuses == [200, 200, 429]
    statuses = [whoami(port, b"X-Forwarded-For: " + c + b"\r\n")[0]
                for c in (b"198.51.100.30", b"::ffff:198.51.100.30", b"198.51.100.30")]
    assert statuses == [200, 200, 429]
    # A balancer that appends the client's port (or brackets IPv6): the client is the
    # address, whatever its port — not the balancer, which made every client behind it
    # one key (security.md §3d row 36). The service sees the address.
    answers = [whoami(port, b"X-Forwarded-For: 198.51.100.40:%d\r\n" % p) for p in (1, 2, 3)]
    assert [a[0] for a in answers] == [200, 200, 429]
    assert [a[1]["x-forwarded-for"] for a in answers[:2]] == ["198.51.100.40"] * 2
    answers = [whoami(port, b"X-Forwarded-For: [2001:db8:8:8::%d]:443\r\n" % i) for i in (1, 2, 3)]
    assert [a[0] for a in answers] == [200, 200, 429]
    assert answers[0][1]["x-forwarded-for"] == "2001:db8:8:8::1"
    # ... and other clients behind that balancer still have their own limits.
    assert whoami(port, b"X-Forwarded-For: 198.51.100.41:4\r\n")[0] == 200


def test_end_to_end_untrusted_peer_keeps_its_own_address(stack):
    port = stack(", trustedProxies: [10.0.0.0/8]")
    status, headers = whoami(port, b"X-Forwarded-For: 203.0.113.7\r\nX-Real-IP: 203.0.113.7\r\n")
    assert headers["x-forwarded-for"] == "127.0.0.1" and "x-real-ip" not in headers


def test_end_to_end_proxy_protocol_v2(stack):
    port = stack(", proxyProtocol: any")
    with connect(port) as s:
        s.sendall(v2("198.51.100.9", "127.0.0.1") + b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = read_response(s)[:3]
    assert status == 200 and orjson.loads(body)["headers"]["x-forwarded-for"] == "198.51.100.9"
    with connect(port) as s:
        s.sendall(b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_response(s)[0] == 400
    # Without trustedProxies any peer's PROXY header is believed: the operator is told.
    [line] = stack.served[-1].wait_for_log(lambda r: "without trustedProxies" in r.get("message", ""))
    assert line["level"] == "warning"


def test_access_log_fields_and_x_request_id(stack, tmp_path):
    port = stack(", trustedProxies: [127.0.0.0/8], requestIdHeader: X-Request-Id")
    status, _, body = request(port, b"POST /t/ca/echo HTTP/1.1\r\nHost: t\r\nUser-Agent: probe/1.0\r\n"
                                     b"X-Forwarded-For: 203.0.113.9\r\nX-Request-Id: req-42\r\n"
                                     b"Content-Length: 5\r\n\r\nhello")
    assert status == 200 and body == b"hello"
    # X-Correlation-Id wins over X-Request-Id when both come.
    status, headers, _ = request(port, b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\nX-Request-Id: r-1\r\n"
                                       b"X-Correlation-Id: c-1\r\n\r\n")
    assert headers["x-correlation-id"] == "c-1"
    return_lines = stack.served[-1].wait_for_log(lambda r: r.get("correlationId") == "req-42")
    line = return_lines[0]
    assert line["client"] == "203.0.113.9" and line["userAgent"] == "probe/1.0"
    assert line["bytesIn"] == 5 and line["bytesOut"] == 5 and line["status"] == 200
    assert line["upstream"] and line["version"] == "1.0.0" and line["service"] == "ca"
    assert set(line["timings"]) == {"auth", "routing", "upstream"}
    assert all(v >= 0 for v in line["timings"].values())
    # A C1 control in a header the log shows is escaped, never raw: NEL (0x85) ends a line
    # for Unicode-aware log tools. Other bytes past ASCII stay as they came (latin-1).
    request(port, b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\nUser-Agent: a\x85b\xe9\r\n"
                  b"X-Correlation-Id: c1-agent\r\n\r\n")
    [line] = stack.served[-1].wait_for_log(lambda r: r.get("correlationId") == "c1-agent")
    assert line["userAgent"] == "a\\x85b\u00e9"
