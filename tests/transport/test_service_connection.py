"""ServiceConnection without sockets (docs/design.md §9): frames a service would send fed to
data_received, what the gateway writes read back from a recording transport, the client a
real HttpProtocol on another, the loop a FakeLoop whose time the test moves
(tests/support/sansio.py). The routing state, metrics, hub, pipeline and retry budget are
the worker's own.

Stage 11 and 12 of the request's journey (docs/design.md §2) and the link's life
(docs/protocol.md): HELLO and its refusals, REQUEST / RESPONSE, streaming under credit,
CANCEL, timeouts through the timer wheel, a lost link (502, or a retry), protocol errors,
PING / PONG, heartbeats, DRAIN, outlier counting and write batching.

One source (stellagw/transport/connection.py): `make test` runs this module compiled and
again with STELLAGW_NO_EXTENSIONS=1.
"""
from __future__ import annotations

import copy
import struct

import orjson
import pytest

from stellagw import _impl
from stellagw.routing.outliers import SERVER_ERROR
from stellagw.routing.radix import FOUND, NOT_FOUND
from stellagw.transport import frame as fr
from stellagw.transport.connection import (AWAIT_HELLO, CLOSED, HEARTBEAT_INTERVAL,
                                          HELLO_TIMEOUT, READY, UPDATE_INTERVAL)

from tests.support.sansio import Stack, endpoint, forbid_io, hello, parse_responses

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


@pytest.fixture(autouse=True)
def _unit(monkeypatch):
    forbid_io(monkeypatch)       # no socket, no thread: a unit test

MODES = ["whole", "bytes", "cut"]
SCANS = [endpoint("GET", "/scans/{id}", timeout_ms=2000),
         endpoint("POST", "/scans", timeout_ms=2000),
         endpoint("GET", "/feed", streaming=True, timeout_ms=2000),
         endpoint("POST", "/upload", streaming=True, timeout_ms=2000),
         endpoint("GET", "/plain")]                           # routing.defaultTimeout


def kinds(frames):
    return [fr.FRAME_TYPE_NAMES[f[0]] for f in frames]


def control(frames, ftype):
    return [(corr, fr.decode_control(payload)) for t, corr, payload in frames if t == ftype]


def error_of(body: bytes) -> dict:
    return orjson.loads(body)["error"]


def dispatched(stack, client, path, *links, method="GET", headers=()):
    """Send one request; (the link it reached, its REQUEST frame)."""
    client.get(path, *headers, method=method)
    stack.run()
    reached = [(link, sent) for link in links for sent in link.requests()]
    assert len(reached) == 1, reached
    return reached[0]


# ---------------------------------------------------------------------------- HELLO


@pytest.mark.parametrize("mode", MODES)
def test_hello_registers_the_instance_and_its_routes(mode):
    stack = Stack()
    assert stack.routing.router.match("GET", "/scans/1")[0] == NOT_FOUND
    link = stack.link()
    assert link.conn.state == AWAIT_HELLO
    link.send(lambda enc: enc.control(fr.HELLO, fr.ZERO_CORR, hello(
        "scan", SCANS, instance_id="scan-1", region="eu1", stream_window=4096)), mode)
    assert link.frames() == []                     # the HELLO_ACK waits for the loop's turn
    stack.run()
    [(_, ack)] = control(link.frames(), fr.HELLO_ACK)
    assert "error" not in ack
    assert ack["protocol"] == fr.PROTOCOL_VERSION and ack["stream_window"] == fr.INITIAL_STREAM_WINDOW
    assert [(w["worker_id"], w["port"]) for w in ack["workers"]] == [(0, 9100)]
    assert link.conn.state == READY and link.conn.peer_window == 4096
    instance = link.conn.instance
    assert (instance.service, instance.instance_id, instance.region) == ("scan", "scan-1", "eu1")
    assert list(stack.routing.instances.values()) == [instance]
    code, route, params = stack.routing.router.match("GET", "/scans/1")
    assert code == FOUND and route.template == "/scans/{id}" and params
    assert route.candidates[0][0] is instance and route.candidates[0][1].timeout == 2.0
    [rec] = stack.log.records("service registered")
    assert (rec["service"], rec["instance"], rec["endpoints"]) == ("scan", "scan-1", len(SCANS))
    # The HELLO deadline no longer applies.
    stack.advance(HELLO_TIMEOUT + 1)
    assert link.open and link.conn.state == READY


def refused_by(case, stack):
    if case == "unsupported_protocol":
        return hello("scan", SCANS, protocol=0), "UnsupportedProtocol"
    if case == "invalid_hello":
        return hello("scan", SCANS, version="1.0"), "InvalidHello"   # not semver
    if case == "route_taken":
        # Another service serves GET /scans/{id} already: the HELLO registers nothing.
        stack.register("other", [endpoint("GET", "/scans/{id}")])
        return hello("scan", SCANS), "InvalidHello"
    if case.startswith("max_frame_size="):
        # A frame that small cannot carry a request (protocol.md §1): refused at the HELLO,
        # not found out at the first request.
        value = orjson.loads(case.partition("=")[2])
        return hello("scan", SCANS, max_frame_size=value), "InvalidHello"
    raise AssertionError(case)


@pytest.mark.parametrize("case, reason", [
    ("unsupported_protocol", "unsupported_protocol"),
    ("invalid_hello", "invalid_hello"),
    ("route_taken", "invalid_hello"),
    *[(f"max_frame_size={value}", "invalid_hello")
      for value in ("0", "17", "1023", "-1", "4294967296", '"1024"', "true", "1024.0", "[]")],
])
def test_a_refused_hello_is_answered_and_leaves_nothing_registered(case, reason):
    stack = Stack()
    payload, code = refused_by(case, stack)
    before = dict(stack.routing.instances)
    link = stack.link()
    ack = link.hello(payload)
    assert ack["error"]["code"] == code and ack["error"]["message"]
    assert link.transport.closed and link.conn.state == CLOSED
    assert stack.routing.instances == before
    assert all(route.service != "scan" for route in stack.routing.routes.values())
    assert stack.hub.refused == {reason: 1} and stack.hub.closed == {"refused": 1}
    [rec] = stack.log.records("service registration refused")
    assert rec["reason"] == reason and rec["code"] == code
    if case.startswith("max_frame_size="):
        assert "'max_frame_size' must be an integer from 1024" in ack["error"]["message"]


@pytest.mark.parametrize("value", [1024, 4096, 2**32 - 1, None])
def test_a_max_frame_size_from_1024_up_is_accepted(value):
    stack = Stack()
    extra = {} if value is None else {"max_frame_size": value}
    svc = stack.register("scan", SCANS, **extra)
    assert svc.open and svc.conn.state == READY
    # Never more than our own maxFrameSize (16 MiB here), nor less than it announced.
    assert svc.conn.max_chunk == min(value or 2**24, 2**24) - fr.MIN_LENGTH - 1


def test_a_max_frame_size_too_small_for_the_hello_ack_is_refused():
    # 40 workers: the HELLO_ACK lists every private port (protocol.md §4.2), ~1.7 KB.
    stack = Stack()
    stack.listener.private_ports.update({wid: 41000 + wid for wid in range(1, 40)})
    link = stack.link()
    ack = link.hello(hello("scan", SCANS, max_frame_size=1024))
    assert ack["error"]["code"] == "InvalidHello"
    assert "max_frame_size 1024 cannot carry this gateway's HELLO_ACK" in ack["error"]["message"]
    assert link.transport.closed and stack.routing.instances == {}
    # Room for it: registered, and the HELLO_ACK had all the workers.
    link = stack.link()
    ack = link.hello(hello("scan", SCANS, max_frame_size=4096))
    assert "error" not in ack and len(ack["workers"]) == 40
    assert link.open and link.conn.state == READY


def test_a_hello_from_a_peer_that_may_not_claim_the_name_is_forbidden():
    # Over TCP without registrationSecret only loopback peers may register
    # (docs/service-identity.md): checked before anything is registered.
    stack = Stack()
    link = stack.link(peer=("10.1.2.3", 40000))
    ack = link.hello(hello("scan", SCANS))
    assert ack["error"]["code"] == "Forbidden" and "loopback" in ack["error"]["message"]
    assert link.transport.closed and stack.routing.instances == {}
    assert stack.hub.refused == {"not_loopback": 1}


def test_a_peer_not_yet_registered_is_held_to_max_hello_size():
    # A peer is nobody until its HELLO passes: 24 peers sending 15 MiB of a HELLO that
    # announced 16 MiB (maxFrameSize) held 360 MiB of a worker for the HELLO deadline.
    # Refused on the header now, before its bytes are read, and told why.
    stack = Stack()
    link = stack.link()
    link.feed(struct.pack(">I", 16 * 1024 * 1024 - 100) + bytes([fr.HELLO]) + b"\0" * 16
              + b"x" * 4096)
    stack.run()
    [(ftype, _, payload)] = link.frames()
    error = fr.decode_control(payload)["error"]
    assert ftype == fr.HELLO_ACK and error["code"] == "InvalidHello"
    assert "maxHelloSize" in error["message"]
    assert link.transport.closed and stack.hub.refused == {"hello_too_large": 1}
    assert stack.routing.instances == {}
    # Registered, a link may send what maxFrameSize allows: a 2 MB update.
    svc = stack.register("scan", SCANS)
    svc.control(fr.ENDPOINTS_UPDATE, {"endpoints": [
        endpoint("GET", "/big", openapi={"description": "x" * 2_000_000})]})
    stack.run()
    assert svc.open and stack.routing.router.match("GET", "/big")[0] == FOUND


def test_one_services_registrations_are_held_to_max_service_registration_size():
    # Parsed, a registration takes 15-30 times its bytes: 40 links of one service, each a
    # 1 MB HELLO with its own schemas, took 1.1 GB of a worker (maxConnections is 1000).
    # Over maxServiceRegistrationSize a HELLO is refused and an update closes the link;
    # identical content (a service's instances, as a rule) counts once and is held once.
    stack = Stack("gateway: {transports: {tcp: {maxServiceRegistrationSize: 100KB}}}")
    schemas = {"Big": {"description": "x" * 40_000}}
    first = stack.register("scan", SCANS, schemas=schemas)
    twins = [stack.register("scan", SCANS, schemas=copy.deepcopy(schemas)) for _ in range(5)]
    held = {id(t.instance.schemas) for t in [first, *twins]}
    assert len(held) == 1                                  # one parsed copy, shared
    other = stack.register("scan", SCANS, schemas={"Big": {"description": "y" * 40_000}})
    link = stack.link()
    ack = link.hello(hello("scan", SCANS, schemas={"Big": {"description": "z" * 40_000}}))
    assert ack["error"]["code"] == "InvalidHello"
    assert "maxServiceRegistrationSize" in ack["error"]["message"]
    assert link.transport.closed and stack.hub.refused == {"registration_too_large": 1}
    assert len(stack.routing.instances) == 7
    # Another service has its own budget.
    stack.register("policy", [endpoint("GET", "/policy")],
                   schemas={"Big": {"description": "z" * 40_000}})
    # An update that would pass it closes its link; one replacing the link's own is fine.
    other.control(fr.ENDPOINTS_UPDATE, {"endpoints": SCANS, "schemas": {
        "Big": {"description": "w" * 50_000}}})
    stack.run()
    assert other.open and other.conn.instance.schemas["Big"]["description"][0] == "w"
    twins[0].control(fr.ENDPOINTS_UPDATE, {"endpoints": SCANS, "schemas": {
        "Big": {"description": "u" * 50_000}}})
    stack.advance(0.1)                    # the worker's update budget (the update above)
    assert twins[0].transport.closed
    assert stack.hub.closed == {"protocol_error": 1, "refused": 1}    # + the HELLO above
    assert first.conn.instance.schemas["Big"]["description"][0] == "x"
    # What leaves gives its room back: the shared content is the first link's alone now,
    # and its update replaces it.
    for t in twins[1:]:
        t.lose()
    first.control(fr.ENDPOINTS_UPDATE, {"endpoints": SCANS, "schemas": {
        "Big": {"description": "v" * 45_000}}})
    stack.advance(0.1)
    assert first.open and first.conn.instance.schemas["Big"]["description"][0] == "v"
    first.lose()
    other.lose()
    again = stack.link()
    ack = again.hello(hello("scan", SCANS, schemas={"Big": {"description": "z" * 90_000}}))
    assert "error" not in ack and stack.hub._contents["scan"]


def test_every_services_registrations_together_are_held_to_max_registration_size():
    # maxServiceRegistrationSize bounds one service: a peer with a link per service name
    # (1 MB HELLOs, maxConnections links) made a worker hold ~15 MB a link, 20 links
    # +316 MB (docs/security.md §3d, "registrations of many services").
    stack = Stack("gateway: {transports: {tcp: {maxServiceRegistrationSize: 100KB, "
                  "maxRegistrationSize: 170KB}}}")
    links = [stack.register(f"svc{i}", [endpoint("GET", f"/svc{i}")],
                            schemas={"Big": {"description": str(i) * 40_000}})
             for i in range(4)]
    link = stack.link()
    ack = link.hello(hello("svc9", [endpoint("GET", "/svc9")],
                           schemas={"Big": {"description": "z" * 40_000}}))
    assert ack["error"]["code"] == "InvalidHello"
    assert "maxRegistrationSize" in ack["error"]["message"]
    assert link.transport.closed and stack.hub.refused == {"registration_too_large": 1}
    assert len(stack.routing.instances) == 4 and "svc9" not in stack.hub._contents
    # Identical content is counted once: another instance of svc0 is welcome.
    stack.register("svc0", [endpoint("GET", "/svc0")],
                   schemas={"Big": {"description": "0" * 40_000}})
    # What leaves gives its room back.
    links[1].lose()
    again = stack.link()
    ack = again.hello(hello("svc9", [endpoint("GET", "/svc9")],
                            schemas={"Big": {"description": "z" * 40_000}}))
    assert "error" not in ack and "svc9" in stack.hub._contents


def test_anything_but_a_hello_first_is_a_protocol_error():
    stack = Stack()
    link = stack.link()
    link.control(fr.HEARTBEAT, {"status": "Healthy"})
    stack.run()
    assert link.frames() == [] and link.transport.closed
    assert stack.hub.closed == {"protocol_error": 1} and stack.routing.instances == {}


def test_no_hello_within_the_deadline_closes_the_link():
    stack = Stack()
    link = stack.link()
    stack.advance(HELLO_TIMEOUT - 0.5)
    assert link.open
    stack.advance(1)
    assert link.transport.closed and stack.hub.closed == {"hello_timeout": 1}


def test_endpoints_update_replaces_the_routes_of_the_link():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    svc.control(fr.ENDPOINTS_UPDATE, {"endpoints": [endpoint("GET", "/v2/scans/{id}")]})
    assert stack.routing.router.match("GET", "/v2/scans/1")[0] == FOUND
    assert stack.routing.router.match("GET", "/scans/1")[0] == NOT_FOUND
    assert svc.open and len(stack.routing.instances) == 1


def test_endpoints_updates_are_applied_at_most_once_a_second_the_last_one_counting():
    # Each update is decoded, registered and rebuilds the OpenAPI document: work a service
    # makes the worker do. One link sending 13 MB updates every 0.3 s cost 26 CPU-seconds
    # and held other services' requests up to a second (found against a real gateway).
    stack = Stack()
    svc = stack.register("scan", SCANS)
    for i in range(50):
        svc.control(fr.ENDPOINTS_UPDATE, {"endpoints": [endpoint("GET", f"/v{i}")]})
    stack.run()
    match = stack.routing.router.match
    assert match("GET", "/v0")[0] == FOUND and match("GET", "/v1")[0] == NOT_FOUND
    assert len(stack.log.records("service endpoints updated")) == 1
    stack.advance(UPDATE_INTERVAL)
    assert match("GET", "/v49")[0] == FOUND and match("GET", "/v0")[0] == NOT_FOUND
    assert len(stack.log.records("service endpoints updated")) == 2
    # A waiting update is still checked when applied: a changed identity closes the link.
    svc.control(fr.ENDPOINTS_UPDATE, {"service": "other", "endpoints": []})
    stack.run()
    assert svc.open
    stack.advance(UPDATE_INTERVAL)
    assert svc.transport.closed and stack.hub.closed == {"protocol_error": 1}


def test_the_links_updates_together_are_held_to_the_workers_update_budget(monkeypatch):
    # One a second per link still let links together make the loop decode as much as they
    # liked (~25 ms per MB): 10 links sending 3 MB updates each second put other requests'
    # median latency at 1.2 s. The worker decodes UPDATE_BYTES_PER_SECOND at most, all
    # links together; an update past it waits, its link's last counting.
    from stellagw.transport import hub as hub_mod
    monkeypatch.setattr(hub_mod, "UPDATE_BYTES_PER_SECOND", 100_000)
    stack = Stack()
    big = stack.register("big", [endpoint("GET", "/big")])
    small = stack.register("small", [endpoint("GET", "/small")])
    big.control(fr.ENDPOINTS_UPDATE, {"endpoints": [endpoint("GET", "/big2",
                                                             openapi={"description": "x" * 50_000})]})
    stack.run()                                   # ~50 KB: the budget's next 0.5 s
    match = stack.routing.router.match
    assert match("GET", "/big2")[0] == FOUND
    for i in range(3):
        small.control(fr.ENDPOINTS_UPDATE, {"endpoints": [endpoint("GET", f"/small{i}")]})
    stack.run()
    assert match("GET", "/small0")[0] == NOT_FOUND and match("GET", "/small")[0] == FOUND
    stack.advance(0.3)
    assert match("GET", "/small2")[0] == NOT_FOUND
    stack.advance(0.3)
    assert match("GET", "/small2")[0] == FOUND and match("GET", "/small0")[0] == NOT_FOUND
    assert len(stack.log.records("service endpoints updated")) == 2


@pytest.mark.parametrize("field, value", [("service", "victim"), ("version", "9.0.0"),
                                          ("instance_id", "ghost-1")])
def test_an_endpoints_update_cannot_change_who_the_link_registered_as(field, value):
    # Who a link is was settled by its HELLO, and checked there (the service's key or
    # certificate). Taken from an update, a new name reached another service's traffic, a
    # higher version out-ranked the live one, and each new instance_id left the last one
    # registered for ever (found against a real gateway, with registrationSecret set).
    stack = Stack()
    victim = stack.register("victim", [endpoint("GET", "/victim/data")])
    svc = stack.register("scan", SCANS)
    eps = [endpoint("GET", "/victim/data")] if field == "service" else SCANS
    svc.control(fr.ENDPOINTS_UPDATE, {field: value, "endpoints": eps})
    stack.run()
    assert svc.transport.closed and stack.hub.closed == {"protocol_error": 1}
    assert sorted((i.service, i.version, i.instance_id) for i in stack.routing.instances.values()) \
        == [("victim", "1.0.0", victim.instance.instance_id)]
    client = stack.client()
    link, _ = dispatched(stack, client, "/victim/data", victim, svc)
    assert link is victim


def test_an_endpoints_update_may_repeat_the_links_own_identity():
    stack = Stack()
    svc = stack.register("scan", SCANS, instance_id="scan-1")
    svc.control(fr.ENDPOINTS_UPDATE, {"service": "scan", "version": "1.0.0",
                                      "instance_id": "scan-1",
                                      "endpoints": [endpoint("GET", "/v2/scans/{id}")]})
    stack.run()
    assert svc.open and stack.routing.router.match("GET", "/v2/scans/1")[0] == FOUND
    assert [i.instance_id for i in stack.routing.instances.values()] == ["scan-1"]


def test_a_route_checks_the_strictest_of_what_its_instances_declare():
    # Version 2 of a service adds a scope to a route and lowers its body limit while
    # version 1 is still connected (a rollout). The checks run before an instance is
    # selected, so they are the strictest of both: version 2, selected, never gets an
    # anonymous request or a body over its limit — they were checked against version 1's
    # declaration once (the first candidate's), and reached version 2 (found against a
    # real gateway). Once version 1 leaves, version 2's own declaration is the route's.
    stack = Stack()
    v1 = stack.register("scans", [endpoint("GET", "/scans/admin"),
                                   endpoint("POST", "/scans/upload")], version="1.0.0")
    v2 = stack.register("scans", [
        endpoint("GET", "/scans/admin", claims=[{"type": "scope", "value": "scans:admin"}]),
        endpoint("POST", "/scans/upload", max_body_bytes=16)], version="2.0.0")
    client = stack.client()
    for _ in range(3):
        client.get("/scans/admin")
        client.send(b"POST /scans/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 1000\r\n\r\n")
        stack.run()
        statuses = [status for status, _, _ in client.responses()]
        assert statuses == [401, 413], statuses
        client = stack.client()     # the 413 closed that connection
    assert v1.requests() == [] and v2.requests() == []
    v1.lose()
    stack.run()
    client.get("/scans/admin")
    stack.run()
    assert [status for status, _, _ in client.responses()] == [401]
    # Version 1 alone again (version 2 gone): anonymous is its declaration.
    v1b = stack.register("scans", [endpoint("GET", "/scans/admin")], version="1.0.0")
    v2.lose()
    stack.run()
    link, _ = dispatched(stack, stack.client(), "/scans/admin", v1b)
    assert link is v1b


def test_instances_of_a_route_must_agree_on_websocket():
    # Checked before selection: an instance that is not a WebSocket endpoint would be
    # handed an upgrade. The disagreeing HELLO is refused; the route is left as it was.
    stack = Stack()
    stack.register("chat", [endpoint("GET", "/chat", websocket=True)], version="1.0.0")
    link = stack.link()
    ack = link.hello(hello("chat", [endpoint("GET", "/chat")], version="2.0.0"))
    assert ack["error"]["code"] == "InvalidHello" and "WebSocket" in ack["error"]["message"]
    assert [i.version for i in stack.routing.instances.values()] == ["1.0.0"]


# ---------------------------------------------------------------------------- request → response


@pytest.mark.parametrize("mode", MODES)
def test_a_dispatched_request_and_its_response(mode):
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    writes = svc.transport.writes
    client.send(b"GET /scans/42?full=1 HTTP/1.1\r\nHost: gw\r\nAccept: text/plain\r\n"
                b"Connection: keep-alive\r\nX-Correlation-Id: cid-42\r\n\r\n")
    assert svc.transport.writes == writes          # batched: written at the loop's turn
    stack.run()
    [sent] = svc.requests()
    assert (sent.method, sent.path, sent.query, sent.timeout_ms) == ("GET", "/scans/42",
                                                                     b"full=1", 2000)
    assert sent.ended and sent.body == b""
    assert sent.headers["accept"] == "text/plain" and sent.headers["x-correlation-id"] == "cid-42"
    assert "connection" not in sent.headers                  # hop-by-hop stays on its hop
    assert sent.headers["x-forwarded-for"] == "127.0.0.1"
    assert len(svc.conn.inflight) == 1 and stack.hub.wheel.buckets
    svc.respond(sent.corr, 200, [(b"content-type", b"text/plain"), (b"x-scan", b"42"),
                                 (b"connection", b"close"), (b"content-length", b"999")],
                b"scan 42", mode=mode)
    [(status, headers, body)] = client.responses()
    assert (status, body) == (200, b"scan 42")
    assert headers["x-scan"] == "42" and headers["content-type"] == "text/plain"
    assert headers["content-length"] == "7" and "connection" not in headers  # the gateway frames it
    assert headers["x-correlation-id"] == "cid-42"
    assert svc.conn.inflight == {} and not client.transport.ended
    # Finished requests leave the wheel at once (it held every request for its timeout).
    assert sum(len(b) for b in stack.hub.wheel.buckets.values()) == 0
    [(req, result)] = stack.pipeline.handled
    assert result is None and req.upstream is svc.conn.instance


def test_the_requests_of_one_loop_iteration_go_out_in_one_write():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    clients = [stack.client() for _ in range(3)]
    before = svc.transport.writes
    for i, client in enumerate(clients):
        client.get(f"/scans/{i}")
    assert svc.transport.writes == before
    stack.run()
    assert svc.transport.writes == before + 1
    sent = svc.requests()
    assert [s.path for s in sent] == ["/scans/0", "/scans/1", "/scans/2"]
    assert len({s.corr for s in sent}) == 3                  # unique per request in flight
    for s, client in zip(reversed(sent), reversed(clients)):  # answered in any order
        svc.respond(s.corr, 200, (), s.path.encode())
        assert client.responses()[0][2] == s.path.encode()


def test_a_small_body_goes_inside_the_request_frame():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    client.send(b"POST /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhel")
    stack.run()
    assert svc.requests() == []                  # a small body of known length: whole or not at all
    client.send(b"lo")
    stack.run()
    [sent] = svc.requests()
    assert sent.ended and sent.body == b"hello" and sent.method == "POST"


def test_a_client_that_leaves_before_its_small_body_is_whole_reaches_no_service():
    """The REQUEST of a small body waits for the whole body: a client that leaves before
    it is whole leaves the service nothing, not even a CANCEL for a request it never saw."""
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    client.send(b"POST /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhel")
    stack.run()
    assert kinds(svc.frames()) == []
    client.leave()
    stack.run()
    assert kinds(svc.frames()) == [] and svc.open
    assert svc.conn.inflight == {}
    assert sum(len(b) for b in stack.hub.wheel.buckets.values()) == 0


def test_a_response_with_an_invalid_status_fails_the_request_not_the_link():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    link, sent = dispatched(stack, client, "/scans/1", svc)
    svc.respond(sent.corr, 101)                      # protocol.md §5.5: bad HTTP semantics
    stack.run()
    [(status, _, body)] = client.responses()
    assert status == 502 and "invalid response" in error_of(body)["message"]
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "Aborted"})]
    assert svc.open and svc.conn.inflight == {}


@pytest.mark.parametrize("streamed", [False, True])
def test_a_response_head_over_max_response_header_bytes_is_a_502(streamed):
    # A service once sent 256 headers of 60 KB (15 MB of head) and the gateway wrote them all
    # to the client. 64 KB by default, as Envoy's max_response_headers_kb.
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    link, sent = dispatched(stack, client, "/scans/1", svc)
    big = [(b"x-big-%d" % i, b"v" * 1000) for i in range(70)]          # ~71 KB
    svc.respond(sent.corr, 200, big, b"body", end=not streamed)
    stack.run()
    out = client.output()
    [(status, _, body)] = parse_responses(out)
    assert status == 502 and "larger than 65536 bytes" in error_of(body)["message"]
    assert b"x-big" not in out
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "Aborted"})]
    assert svc.open and svc.conn.inflight == {}
    # Within the limit it goes through.
    link, sent = dispatched(stack, client, "/scans/2", svc)
    svc.respond(sent.corr, 200, big[:60], b"ok")
    stack.run()
    [(status, headers, body)] = client.responses()
    assert status == 200 and headers["x-big-59"] == "v" * 1000


# ---------------------------------------------------------------------------- streaming


def test_a_streamed_response_is_chunked_and_credit_follows_the_client():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/feed", svc)
    svc.respond(sent.corr, 200, [(b"content-type", b"text/event-stream")], b"one,", end=False)
    stack.run()
    head = client.output()
    assert head.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked\r\n" in head
    assert head.endswith(b"\r\n\r\n4\r\none,\r\n")
    # Credit goes back for what the client took.
    assert [(t, c, fr.decode_window_update(p)) for t, c, p in svc.frames()] == [
        (fr.WINDOW_UPDATE, sent.corr, 4)]
    # The timeout covers REQUEST → RESPONSE, not the stream: a long stream is not a 504.
    stack.advance(5)
    assert svc.frames() == [] and client.output() == b""
    # A client that stops reading gets no more credit for the service ...
    client.proto.pause_writing()
    svc.stream(sent.corr, b"two,")
    svc.stream(sent.corr, b"three,")
    stack.run()
    assert client.output() == b"4\r\ntwo,\r\n6\r\nthree,\r\n"
    assert svc.frames() == []
    # ... until it drains: then all it took, at once.
    client.proto.resume_writing()
    stack.run()
    assert [(t, fr.decode_window_update(p)) for t, _, p in svc.frames()] == [
        (fr.WINDOW_UPDATE, 10)]
    svc.stream(sent.corr, b"", end=True)
    assert client.output() == b"0\r\n\r\n"
    assert svc.conn.inflight == {} and not client.transport.ended


def _responses(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in `raw`, read by llhttp (httptools) as a client
    reads them: a 204 or 304 has no body whatever follows its head."""
    import httptools
    out = []

    class Reader:
        def on_message_begin(self):
            out.append([0, b""])

        def on_body(self, body):
            out[-1][1] += body

        def on_headers_complete(self):
            out[-1][0] = parser.get_status_code()

    parser = httptools.HttpResponseParser(Reader())
    parser.feed_data(raw)
    return [tuple(r) for r in out]


@pytest.mark.parametrize("status", [204, 205, 304])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_a_status_without_content_goes_without_the_services_body(status, streamed):
    # 204, 205 and 304 have no content (RFC 9110 §15.3.5, §15.3.6, §15.4.5), and a client
    # reads none after a 204 or 304 head: bytes there are its next response on the
    # connection. A service's body — here one shaped as a response — is dropped, no framing
    # announces one (no Content-Length on 204 / 304, 0 on 205; never chunked), and the
    # client's next request gets its own answer.
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/feed" if streamed else "/scans/1", svc)
    forged = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"
    svc.respond(sent.corr, status, (), forged, end=not streamed)
    if streamed:
        svc.stream(sent.corr, forged)
        svc.stream(sent.corr, b"", end=True)
    stack.run()
    _, sent = dispatched(stack, client, "/scans/2", svc)
    svc.respond(sent.corr, 200, (), b"second")
    stack.run()
    raw = client.output()
    assert _responses(raw) == [(status, b""), (200, b"second")]
    head = raw[:raw.index(b"\r\n\r\n")].lower()
    assert b"transfer-encoding" not in head and b"forged" not in raw
    assert (b"content-length: 0" in head) if status == 205 else (b"content-length" not in head)
    assert not client.transport.closed and svc.conn.inflight == {}


def test_a_streamed_204_to_http_1_0_closes_as_its_streams_do():
    # HTTP/1.0 has no chunking: a streamed answer ends with the connection, and says so —
    # a bodiless one too, rather than keep a connection its head did not announce as kept.
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    client.send(b"GET /feed HTTP/1.0\r\nHost: gw\r\nConnection: keep-alive\r\n\r\n")
    stack.run()
    [sent] = svc.requests()
    svc.respond(sent.corr, 204, (), b"", end=False)
    svc.stream(sent.corr, b"dropped", end=True)
    stack.run()
    raw = client.output()
    assert raw.startswith(b"HTTP/1.1 204 ") and b"connection: close\r\n" in raw
    assert raw.endswith(b"\r\n\r\n") and b"dropped" not in raw and client.transport.closed


def test_a_link_lost_mid_stream_cuts_the_client_connection():
    # protocol.md §5.4: the status is out, so a truncated chunked body and a closed
    # connection are the only honest signal left (no 502 after a 200 head).
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/feed", svc)
    svc.respond(sent.corr, 200, (), b"part", end=False)
    stack.run()
    assert client.output().endswith(b"4\r\npart\r\n")
    svc.lose()
    stack.run()
    assert client.transport.closed and client.output() == b""
    assert stack.pipeline._retries.counts == {}      # an answer had started: never retried


@pytest.mark.parametrize("cut", ["link_lost", "idle"])
def test_a_close_delimited_stream_cut_mid_body_is_reset_not_closed(cut):
    # An HTTP/1.0 client (nginx's default proxy_http_version) reads a streamed answer up to
    # the connection's end: a FIN there reads as the whole body. Round 9B: nginx in front
    # ended its client's chunked answer with `0\r\n\r\n`, keep-alive, after a service died
    # mid-stream — a cut body passed (and cached) as whole. docs/security.md §3d, "cut
    # close-delimited stream".
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    client.send(b"GET /feed HTTP/1.0\r\nHost: gw\r\n\r\n")
    stack.run()
    [sent] = svc.requests()
    svc.respond(sent.corr, 200, [(b"content-type", b"text/csv")], b"row1\n", end=False)
    stack.run()
    raw = client.output()
    # What the client reads: a head without length or chunking, then the rows so far.
    assert _responses(raw) == [(200, b"row1\n")]
    assert b"transfer-encoding" not in raw.lower() and b"content-length" not in raw.lower()
    if cut == "link_lost":
        svc.lose()
        stack.run()
    else:
        stack.advance(stack.worker.hub.stream_idle_timeout + 1)
        stack.run()
    assert client.output() == b"" and client.transport.closed
    assert client.transport.aborted        # RST: the reader sees a failure, not an end


def test_a_chunked_or_bodiless_stream_cut_mid_body_still_closes_in_order():
    # Chunked, the missing last chunk shows the cut (the FIN lets the written chunks go);
    # a streamed 204 has no body to cut.
    for request, status in ((b"GET /feed HTTP/1.1\r\nHost: gw\r\n\r\n", 200),
                            (b"GET /feed HTTP/1.0\r\nHost: gw\r\n\r\n", 204)):
        stack = Stack()
        svc = stack.register("scan", SCANS)
        client = stack.client()
        client.send(request)
        stack.run()
        [sent] = svc.requests()
        svc.respond(sent.corr, status, (), b"part", end=False)
        stack.run()
        svc.lose()
        stack.run()
        assert client.transport.closed and not client.transport.aborted


def streaming(first: bytes):
    """A /feed stream under a 3 s streamIdleTimeout, its RESPONSE head and `first` out;
    one failure ejects the instance (to see whether a timeout counted against it)."""
    stack = Stack("gateway: {routing: {streamIdleTimeout: 3s, "
                  "outlierDetection: {consecutiveErrors: 1, maxEjectionPercent: 100}}}")
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/feed", svc)
    svc.respond(sent.corr, 200, (), first, end=False)
    stack.run()
    return stack, svc, client, sent


def test_a_streamed_response_that_goes_idle_is_ended():
    # routing.streamIdleTimeout: a stream in which no byte moves for that long is ended —
    # CANCEL(Timeout) to the service, the client cut without the last chunk (its status is
    # out), counted as a 504 and against the instance; one that keeps moving never is.
    stack, svc, client, sent = streaming(b"one,")
    assert client.output().endswith(b"4\r\none,\r\n")
    for _ in range(4):               # a chunk every 2 s: 8 s in all, never 3 s idle
        stack.advance(2)
        svc.stream(sent.corr, b"x")
        stack.run()
    assert client.output() == b"1\r\nx\r\n" * 4 and not client.transport.closed
    assert kinds(svc.frames()) == ["WINDOW_UPDATE"] * 5
    stack.advance(2.9)
    assert svc.frames() == [] and not client.transport.closed
    stack.advance(0.2)
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "Timeout"})]
    assert client.transport.closed and client.output() == b""   # no "0\r\n\r\n"
    assert svc.conn.inflight == {} and stack.hub.wheel.buckets == {}
    assert svc.conn.instance.ejected_until                      # the service stalled
    [event] = stack.log.records("streamed response idle: ended")
    assert event["waitingOn"] == "service" and event["correlationId"]
    snapshot = stack.worker.metrics.snapshot()
    assert [status for (*_, status, n) in snapshot["requests"]] == [504]


def test_a_client_that_stops_reading_a_stream_is_cut_without_blaming_the_service():
    # The same deadline when the stream waits on the client: it took nothing for that long
    # (credit held back), so the service gets CANCEL and the client is cut, but the
    # instance is not counted as failing.
    stack, svc, client, sent = streaming(b"")
    client.output()
    client.proto.pause_writing()
    svc.stream(sent.corr, b"held")
    stack.run()
    assert svc.frames() == []                       # no credit back: the client is not reading
    stack.advance(3.1)
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "Timeout"})]
    assert client.transport.closed and svc.conn.inflight == {}
    assert not svc.conn.instance.ejected_until
    [event] = stack.log.records("streamed response idle: ended")
    assert event["waitingOn"] == "client"


def test_stream_data_past_the_granted_window_is_a_protocol_error():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/feed", svc)
    svc.respond(sent.corr, 200, (), b"", end=False)
    client.proto.pause_writing()                      # the client reads nothing: no credit
    for _ in range(fr.INITIAL_STREAM_WINDOW // 65536):
        svc.stream(sent.corr, b"x" * 65536)           # the whole window: allowed
    assert svc.open
    svc.stream(sent.corr, b"x")                       # one byte more
    assert not svc.open and stack.hub.closed == {"protocol_error": 1}
    stack.run()                                       # the transport reports the close
    # The gateway holds no more than the window it granted; the client, whose answer was
    # cut mid-stream, is closed rather than left waiting, and nothing refers to the link.
    assert svc.conn.inflight == {}
    assert client.transport.ended


def test_one_byte_chunks_reach_the_service_as_one_frame_per_read():
    # A hostile client's 1-byte chunks (6 bytes each on the wire) would otherwise cost a
    # 21-byte frame header per body byte, and a frame's work at both ends.
    stack = Stack()
    svc = stack.link()
    svc.hello(hello("scan", SCANS))
    client = stack.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"1\r\nx\r\n" * 500)
    stack.run()
    frames = svc.frames()
    assert kinds(frames) == ["REQUEST", "REQUEST_STREAM_DATA"]
    assert fr.decode_stream_data(frames[1][2]) == (0, b"x" * 500)
    client.send(b"1\r\ny\r\n" * 3 + b"0\r\n\r\n")
    stack.run()
    assert [fr.decode_stream_data(p) for _, _, p in svc.frames()] == [
        (0, b"yyy"), (fr.FLAG_END_STREAM, b"")]
    [sent] = svc.requests(frames)
    svc.respond(sent.corr, 201, (), b"stored")
    assert client.responses()[0][:1] == (201,)


def test_a_request_body_streams_under_the_services_window():
    stack = Stack()
    svc = stack.link()
    svc.hello(hello("scan", SCANS, stream_window=1024))
    client = stack.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 3000\r\n\r\n" + b"a" * 2000)
    stack.run()
    frames = svc.frames()
    assert kinds(frames) == ["REQUEST", "REQUEST_STREAM_DATA"]
    [sent] = svc.requests(frames)
    assert not sent.ended and sent.body == b""
    assert fr.decode_stream_data(frames[1][2]) == (0, b"a" * 1024)    # the whole window
    assert client.transport.paused                 # the rest waits: the client is not read
    svc.window_update(sent.corr, 1024)
    stack.run()
    assert [fr.decode_stream_data(p) for _, _, p in svc.frames()] == [(0, b"a" * 976)]
    assert not client.transport.paused             # everything given went out: read on
    client.send(b"b" * 1000)
    stack.run()
    assert [fr.decode_stream_data(p) for _, _, p in svc.frames()] == [(0, b"b" * 48)]
    svc.window_update(sent.corr, 4096)
    stack.run()
    assert [fr.decode_stream_data(p) for _, _, p in svc.frames()] == [
        (fr.FLAG_END_STREAM, b"b" * 952)]
    svc.respond(sent.corr, 201, (), b"stored")
    assert client.responses()[0][:1] == (201,)


def test_a_body_over_the_limit_after_the_answer_started_cuts_the_stream_as_413():
    # The service answers a streaming upload at once (a progress feed); the client's chunked
    # body then passes the body limit: the status is out, so the client is cut, the service
    # gets CANCEL PayloadLimitExceeded, and the request is counted as the 413 it is.
    stack = Stack("gateway: {routing: {maxRequestBodySize: 100}}")
    svc = stack.register("scan", SCANS)
    client = stack.client()
    client.send(b"POST /upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"10\r\n" + b"a" * 16 + b"\r\n")
    stack.run()
    [sent] = svc.requests()
    svc.respond(sent.corr, 200, (), b"started", end=False)
    stack.run()
    assert client.output().startswith(b"HTTP/1.1 200 ")
    svc.frames()
    client.send(b"64\r\n" + b"b" * 100 + b"\r\n")
    stack.run()
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "PayloadLimitExceeded"})]
    assert client.transport.closed and svc.conn.inflight == {}
    snapshot = stack.worker.metrics.snapshot()
    assert [status for (*_, status, n) in snapshot["requests"]] == [413]


# ---------------------------------------------------------------------------- cancel, timeout


def test_a_client_that_leaves_cancels_its_request():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/scans/1", svc)
    client.leave()
    stack.run()
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "ClientDisconnected"})]
    assert svc.conn.inflight == {}
    assert sum(len(b) for b in stack.hub.wheel.buckets.values()) == 0
    svc.respond(sent.corr, 200, (), b"late")         # a late answer is dropped
    stack.run()
    assert client.output() == b"" and svc.open


@pytest.mark.parametrize("path, timeout", [("/scans/1", 2.0), ("/plain", 5.0)])
def test_a_request_not_answered_in_time_is_cancelled_and_answered_504(path, timeout):
    stack = Stack("gateway: {routing: {defaultTimeout: 5s}}")
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, path, svc)
    assert sent.timeout_ms == int(timeout * 1000)       # the service knows its deadline
    stack.advance(timeout - 0.1)
    assert client.output() == b"" and svc.frames() == []
    stack.advance(0.2)
    assert control(svc.frames(), fr.CANCEL) == [(sent.corr, {"reason": "Timeout"})]
    [(status, _, body)] = client.responses()
    assert status == 504 and error_of(body)["code"] == "gateway_timeout"
    assert stack.hub.timeouts == 1 and svc.conn.inflight == {}
    assert stack.hub.wheel.buckets == {}
    svc.respond(sent.corr, 200, (), b"too late")
    stack.run()
    assert client.output() == b"" and svc.open
    assert stack.loop.timers() == []              # the wheel stops turning once empty


def test_a_service_that_cancels_fails_its_request():
    stack = Stack("gateway: {retries: {enabled: false}}")
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/scans/1", svc)
    svc.control(fr.CANCEL, {"reason": "Shutdown"}, corr=sent.corr)
    [(status, _, body)] = client.responses()
    assert status == 502 and "cancelled" in error_of(body)["message"]


# ---------------------------------------------------------------------------- a lost link


def test_a_lost_link_answers_502_for_everything_in_flight():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    clients = [stack.client() for _ in range(3)]
    for i, client in enumerate(clients):
        client.get(f"/scans/{i}")
    stack.run()
    assert len(svc.requests()) == 3
    svc.lose()
    stack.run()
    for client in clients:
        [(status, _, body)] = client.responses()
        assert status == 502 and "lost" in error_of(body)["message"]
    assert stack.routing.instances == {} and stack.hub.connections == set()
    # Nowhere to retry (its only instance was that link): counted as such.
    assert stack.pipeline._retries.counts == {("scan", "no_instance"): 3}
    # The service is known still: its routes answer 503, not 404, until it is back.
    clients[0].get("/scans/9")
    [(status, headers, _)] = clients[0].responses()
    assert status == 503 and headers["retry-after"] == "5"


def pair(stack):
    a = stack.register("scan", SCANS, instance_id="scan-a")
    b = stack.register("scan", SCANS, instance_id="scan-b")
    return a, b


def test_a_lost_link_retries_an_idempotent_request_on_another_instance():
    stack = Stack()
    a, b = pair(stack)
    client = stack.client()
    first, sent = dispatched(stack, client, "/scans/1", a, b)
    other = b if first is a else a
    first.lose()
    stack.run()
    [again] = other.requests()
    assert (again.method, again.path) == ("GET", "/scans/1")
    assert client.output() == b""                      # the client saw nothing of the loss
    other.respond(again.corr, 200, (), b"from the other")
    [(status, _, body)] = client.responses()
    assert (status, body) == (200, b"from the other")
    assert stack.pipeline._retries.counts == {("scan", "retried"): 1}


def test_a_lost_link_does_not_retry_a_post_nor_past_the_budget():
    stack = Stack("gateway: {retries: {budgetPercent: 0, minRetriesPerSecond: 0}}")
    a, b = pair(stack)
    post, get = stack.client(), stack.client()
    post.send(b"POST /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\nhi")
    stack.run()
    first = a if a.requests() else b
    other = b if first is a else a
    # The GET on the same link as the POST (selection alternates between the two).
    while True:
        get.get("/scans/1")
        stack.run()
        if first.requests():
            break
        [s] = other.requests()
        other.respond(s.corr, 200)
        get.responses()
    first.lose()
    stack.run()
    assert other.requests() == []
    assert [r[0] for r in post.responses()] == [502] and [r[0] for r in get.responses()] == [502]
    assert stack.pipeline._retries.counts == {("scan", "not_idempotent"): 1, ("scan", "budget"): 1}


# ---------------------------------------------------------------------------- protocol errors


def _frame(ftype: int, payload: bytes = b"", corr: bytes = fr.ZERO_CORR) -> bytes:
    # By hand: the encoder refuses to make what these cases need.
    return struct.pack(">IB", 17 + len(payload), ftype) + corr + payload


def _malformed(name: str, corr: bytes) -> bytes:
    if name == "longer than maxFrameSize":
        return struct.pack(">IB", 0x7FFFFFF0, fr.RESPONSE) + b"\0" * 16
    if name == "shorter than a header":
        return struct.pack(">IB", 3, fr.RESPONSE) + b"\0" * 16
    if name == "unknown type":
        return _frame(0x7F)
    if name == "a REQUEST from a service":
        return _frame(fr.REQUEST, b"\0" * 8)
    if name == "a control payload that is not JSON":
        return _frame(fr.HEARTBEAT, b"{not json")
    if name == "HELLO twice":
        return _frame(fr.HELLO, orjson.dumps(hello("scan", [])))
    if name == "a RESPONSE status out of range":
        return _frame(fr.RESPONSE, b"\x01\x00\x2a\x00\x00", corr)          # status 42
    if name.startswith("a RESPONSE header value with "):
        # status 200, one header x-a whose value holds a control character (RFC 9110 §5.5):
        # CR, LF, NUL would split the client's response; VT, FF, ESC and DEL some parsers
        # downstream read as whitespace or separators.
        ctl = {"CR": b"\r", "VT": b"\x0b", "FF": b"\x0c", "ESC": b"\x1b", "DEL": b"\x7f"}[name[-3:].strip()]
        return _frame(fr.RESPONSE, b"\x01\x00\xc8\x00\x01\x00\x03x-a\x00\x03a" + ctl + b"b", corr)
    if name == "a WINDOW_UPDATE of 3 bytes":
        return _frame(fr.WINDOW_UPDATE, b"\0\0\1", corr)
    if name == "credit past 2^31-1":
        return _frame(fr.WINDOW_UPDATE, struct.pack(">I", fr.MAX_WINDOW_INCREMENT), corr)
    raise AssertionError(name)


MALFORMED = ["longer than maxFrameSize", "shorter than a header", "unknown type",
             "a REQUEST from a service", "a control payload that is not JSON", "HELLO twice",
             "a RESPONSE status out of range", "a WINDOW_UPDATE of 3 bytes",
             "credit past 2^31-1"] + [f"a RESPONSE header value with {c}"
                                      for c in ("CR", "VT", "FF", "ESC", "DEL")]


@pytest.mark.parametrize("name", MALFORMED)
@pytest.mark.parametrize("mode", ["whole", "bytes"])
def test_a_malformed_frame_closes_the_link_and_fails_what_was_in_flight(name, mode):
    # protocol.md §5.5: a protocol error closes the connection; every request on it fails.
    stack = Stack()
    svc = stack.register("scan", SCANS)
    client = stack.client()
    _, sent = dispatched(stack, client, "/scans/1", svc)
    data = _malformed(name, sent.corr)
    svc.feed(data, mode)
    assert svc.conn.state == CLOSED and svc.transport.closed
    assert stack.hub.closed == {"protocol_error": 1}
    [rec] = stack.log.records("service connection closed")
    assert rec["reason"] == "protocol_error" and rec["detail"]
    stack.run()                                   # connection_lost: the in-flight request
    out = client.output()
    [(status, _, _)] = parse_responses(out)
    assert status == 502 and b"x-a" not in out    # nothing of the service's head reached it
    assert stack.routing.instances == {}


# ---------------------------------------------------------------------------- PING, heartbeats, DRAIN


def test_ping_is_answered_with_pong_and_an_oversize_ping_closes_the_link():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    corr = b"p" * 16
    svc.raw(fr.PING, b"12345678", corr)
    stack.run()
    assert svc.frames() == [(fr.PONG, corr, b"12345678")]
    # A peer that pings without reading what we write gets nothing queued for it.
    svc.conn.pause_writing()
    svc.raw(fr.PING, b"x")
    stack.run()
    assert svc.frames() == [] and stack.hub.pressure == {"paused": 1, "pong_shed": 1}
    svc.conn.resume_writing()
    svc.raw(fr.PING, b"x" * 65)              # protocol.md §3.5: 64 bytes at most
    assert svc.transport.closed and stack.hub.closed == {"oversize_ping": 1}


def test_a_heartbeat_sets_the_status_and_its_ping_measures_the_link():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    instance = svc.conn.instance
    svc.control(fr.HEARTBEAT, {"status": "Degraded", "in_flight": 3, "error_rate": 0.25})
    stack.run()
    assert (instance.announced, instance.status, instance.in_flight, instance.error_rate) == (
        "Degraded", "Degraded", 3, 0.25)
    [(ftype, corr, payload)] = svc.frames()          # the ping rides on the heartbeat
    assert ftype == fr.PING and len(payload) == 8   # our send time: no table of pings
    assert instance.avg_ping_ms == 0.0
    # A PONG that is not the echo of it (here: claiming a send 5 ms earlier) is not counted;
    # the echo is, once.
    earlier = (int.from_bytes(payload, "big") - 5_000_000).to_bytes(8, "big")
    svc.raw(fr.PONG, earlier, corr)
    assert instance.avg_ping_ms == 0.0
    svc.raw(fr.PONG, payload, corr)
    measured = instance.avg_ping_ms
    assert 0.0 < measured < 60_000
    svc.raw(fr.PONG, payload, corr)
    assert instance.avg_ping_ms == measured


def test_heartbeats_faster_than_heartbeat_interval_wait_and_only_the_last_counts():
    # Each heartbeat that flips the status drops the rankings of every route of the
    # instance and tells every routing listener: a link sending them at line rate, with
    # 4,000 routes, held other requests up to 1.2 s. One per HEARTBEAT_INTERVAL is applied.
    stack = Stack()
    svc = stack.register("scan", [endpoint("GET", f"/r{i}") for i in range(500)])
    instance = svc.conn.instance
    events = []
    stack.routing.listeners.append(lambda event, inst, **kw: events.append(event))
    statuses = ["Unhealthy", "Healthy", "Draining", "Degraded"]
    svc.feed(b"".join(_frame(fr.HEARTBEAT, orjson.dumps(
        {"status": statuses[i % 4], "in_flight": i})) for i in range(1000)))
    stack.run()
    assert instance.announced == "Unhealthy" and instance.in_flight == 0   # the first
    assert events.count("health") == 1
    assert [f[0] for f in svc.frames()] == [fr.PING]                       # one PING too
    stack.advance(HEARTBEAT_INTERVAL)
    assert instance.announced == "Degraded" and instance.in_flight == 999  # the last waiting
    assert events.count("health") == 2
    # A heartbeat waiting when DRAIN comes does not announce the instance again after it.
    svc.control(fr.HEARTBEAT, {"status": "Healthy"})
    svc.control(fr.DRAIN, {})
    stack.advance(HEARTBEAT_INTERVAL)
    assert instance.announced == "Draining"


def test_drain_from_the_service_stops_new_requests_but_finishes_those_in_flight():
    stack = Stack()
    svc = stack.register("scan", SCANS)
    busy, late = stack.client(), stack.client()
    _, sent = dispatched(stack, busy, "/scans/1", svc)
    svc.control(fr.DRAIN, {"reason": "shutting down", "deadline_ms": 5000})
    assert svc.conn.instance.status == "Draining"
    late.get("/scans/2")
    stack.run()
    [(status, headers, _)] = late.responses()
    assert status == 503 and headers["retry-after"] == "5"
    assert svc.requests() == []
    svc.respond(sent.corr, 200, (), b"done")
    assert busy.responses()[0][:1] == (200,)
    [rec] = stack.log.records("service draining")
    assert rec["service"] == "scan"


def test_drain_from_the_gateway_tells_the_service_its_deadline():
    stack = Stack("gateway: {http: {shutdownTimeout: 7s}}")
    svc = stack.register("scan", SCANS)
    stack.hub.drain()
    [(_, payload)] = control(svc.frames(), fr.DRAIN)
    assert payload["deadline_ms"] == 7000 and payload["reason"]


# ---------------------------------------------------------------------------- outliers


def test_consecutive_5xx_answers_eject_the_instance():
    stack = Stack("gateway: {routing: {outlierDetection: {consecutiveErrors: 2}}}")
    a, b = pair(stack)
    client = stack.client()
    answers = [500, 200, 500, 500]             # a success in between starts the count over
    ejected = []
    while len(ejected) < len(answers):
        link, sent = dispatched(stack, client, "/scans/1", a, b)
        if link is a:
            link.respond(sent.corr, answers[len(ejected)])
            ejected.append(bool(a.conn.instance.ejected_until))
        else:
            link.respond(sent.corr, 200)
        client.responses()
    assert ejected == [False, False, False, True]
    counters = stack.routing.counters()["gateway_outlier_ejections"][2]
    assert counters == [(("scan", SERVER_ERROR), 1)]
    # Out of selection: every request goes to the other instance now.
    for i in range(4):
        link, sent = dispatched(stack, client, f"/scans/{i}", a, b)
        assert link is b
        b.respond(sent.corr, 200)
        client.responses()


def test_compiled_where_the_glue_is():
    assert _impl.compiled("stellagw.transport.connection") is not _impl.NO_EXTENSIONS
