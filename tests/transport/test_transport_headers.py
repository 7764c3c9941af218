"""What crosses from HTTP into a REQUEST frame, and back."""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw._py import frame as py_frame
from stellagw.transport.headers import (CLASSES, RESPONSE_DROP, RESPONSE_DROP_NAMES, classify,
                                        request_headers, response_header_block)

from tests.codecs.test_frame import CORR, IMPLS, M, c_frame, frame_error


class Req:
    def __init__(self, headers, http_version="1.1"):
        self.headers = headers
        self.http_version = http_version
        self.correlation_id = "cid-1"


def test_request_headers_drop_hop_by_hop_spoofed_identity_and_gateway_owned():
    req = Req([(b"host", b"gw.example"), (b"connection", b"keep-alive, x-custom, x-stellaops-actor"),
               (b"keep-alive", b"timeout=5"), (b"x-custom", b"named-by-connection"),
               (b"x-stellaops-tenant", b"spoofed"), (b"x_stellaops_actor", b"underscored"),
               (b"x-forwarded-for", b"10.9.9.9"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
               (b"accept", b"application/json"), (b"traceparent", b"00-abc")])
    ours = [(b"x-stellaops-actor", b"demo-client"), (b"x-stellaops-tenant", b"tenant-1")]
    out = request_headers(req, b"127.0.0.1", b"https", ours)
    assert out == [
        (b"host", b"gw.example"), (b"accept", b"application/json"), (b"traceparent", b"00-abc"),
        (b"te", b"trailers"),
        (b"x-stellaops-actor", b"demo-client"), (b"x-stellaops-tenant", b"tenant-1"),
        (b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"gw.example"), (b"x-correlation-id", b"cid-1")]
    no_trace = request_headers(req, b"127.0.0.1", b"https", ours, keep_trace=False)
    assert (b"traceparent", b"00-abc") not in no_trace


def test_response_header_block_drops_framing_headers():
    block = response_header_block([(b"content-type", b"text/plain"), (b"content-length", b"9"),
                                   (b"transfer-encoding", b"chunked"), (b"x-a", b"1")])
    assert block == b"content-type: text/plain\r\nx-a: 1\r\n"


# --- the same rules in C: FrameEncoder.request_forward, decode_response_block ------------
# Both implementations of the codec must give exactly the bytes (or the error) of the
# Python rules above followed by FrameEncoder.request / frame.decode_response.

impls = pytest.mark.parametrize("impl", IMPLS)
HSET = settings(max_examples=int(os.environ.get("STELLAGW_HYPOTHESIS_EXAMPLES", "300")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRAME_ERRORS = (py_frame.FrameError,) + ((c_frame.FrameError,) if c_frame else ())

NAMES = [b"host", b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
         b"transfer-encoding", b"upgrade", b"proxy-authorization", b"x-forwarded-for",
         b"x-forwarded-proto", b"x-forwarded-host", b"x-correlation-id", b"forwarded",
         b"x-stellaops-tenant", b"x_stellaops_actor", b"x-stella-scopes", b"sub", b"dpop",
         b"traceparent", b"tracestate", b"accept", b"content-type", b"content-length", b"date",
         b"authorization", b"x-custom", b"X-Custom", b"x-a"]
LOWER_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
names = st.sampled_from(NAMES) | st.text(LOWER_TCHAR, min_size=1, max_size=10).map(str.encode)
CONTROLS = bytes(c for c in range(32) if c != 9) + b"\x7f"     # never in a field value
clean_values = st.binary(max_size=24).map(lambda b: b.translate(None, CONTROLS))
values = clean_values | st.binary(max_size=6)          # sometimes a control character: refused
SEPARATORS = [b",", b", ", b" ,\t", b",,", b"\t,\x0b "]
CONNECTION_TOKENS = [b"x-custom", b"X-CUSTOM", b"x-a", b"accept", b"host", b"traceparent",
                     b"keep-alive", b"", b"te", b"x-stellaops-tenant"]
connection_values = st.tuples(
    st.lists(st.sampled_from(CONNECTION_TOKENS), max_size=4),
    st.sampled_from(SEPARATORS), st.sampled_from([b"", b" ", b"\t\x0c"])).map(
    lambda t: t[2] + t[1].join(t[0]) + t[2])
te_values = st.sampled_from([b"trailers", b" Trailers\t", b"TRAILERS", b"trailers, gzip",
                             b"gzip", b"", b"trailer", b"\x0btrailers\r"])
client_headers = st.lists(st.one_of(
    st.tuples(names, values), st.tuples(names, values),
    st.tuples(st.just(b"connection"), connection_values),
    st.tuples(st.just(b"te"), te_values),
    st.tuples(st.just(b"host"), clean_values)), max_size=24)
identity_headers = st.lists(st.tuples(
    st.sampled_from([b"x-stellaops-tenant", b"x-stellaops-actor", b"traceparent", b"X-Up"]),
    clean_values), max_size=3)
correlation_ids = st.text(max_size=12) | st.sampled_from(["cid-1", "\ud800", "a\r\nb"])


def outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except FRAME_ERRORS as exc:
        return frame_error(exc)
    except (TypeError, ValueError) as exc:
        return (type(exc).__name__,)


def encoded(m, max_frame, call):
    """(outcome of call(encoder), every byte the encoder then holds): one frame is pending
    before the call, so an error that left anything behind would show."""
    enc = m.FrameEncoder(max_frame)
    enc.raw(m.PING, CORR, b"pending")
    return outcome(call, enc), enc.take()


@impls
@HSET
@given(headers=client_headers, version=st.sampled_from(["1.1", "1.0"]), keep_trace=st.booleans(),
       identity=identity_headers, peer_ip=st.sampled_from([b"127.0.0.1", b"::1", b"10.9.9.9"]),
       scheme=st.sampled_from([b"http", b"https"]), cid=correlation_ids,
       flags=st.sampled_from([0, 1]), body=st.binary(max_size=40),
       max_frame=st.just(16 * 1024 * 1024) | st.integers(60, 500))
def test_request_forward_is_request_headers_then_request(impl, headers, version, keep_trace,
                                                         identity, peer_ip, scheme, cid, flags,
                                                         body, max_frame):
    m = M(impl)
    req = Req(headers, version)
    req.correlation_id = cid

    def reference(enc):
        out = request_headers(req, peer_ip, scheme, identity, keep_trace=keep_trace)
        enc.request(CORR, "GET", "/api/x", b"a=1", out, 5000, flags, body)

    def forward(enc):
        enc.request_forward(CORR, "GET", "/api/x", b"a=1", req.headers, 5000, flags, body,
                            CLASSES, classify, req.http_version == "1.1", keep_trace, identity,
                            peer_ip, scheme, req.correlation_id)

    assert encoded(m, max_frame, forward) == encoded(m, max_frame, reference)


@impls
def test_request_forward_many_client_headers(impl):
    m = M(impl)
    for n_keep in (240, 252, 253, 300):
        req = Req([(b"x-a", b"1"), (b"upgrade", b"h2c")] * n_keep + [(b"host", b"h")])

        def reference(enc):
            enc.request(CORR, "GET", "/", b"", request_headers(req, b"ip", b"http"), 0, 1, b"")

        def forward(enc):
            enc.request_forward(CORR, "GET", "/", b"", req.headers, 0, 1, b"", CLASSES, classify,
                                True, True, (), b"ip", b"http", "cid-1")

        assert encoded(m, 1 << 24, forward) == encoded(m, 1 << 24, reference)


BIG = b"v" * 0xFFFF


@impls
@pytest.mark.parametrize("case", [
    # The compiled request_forward sizes the whole frame once when it can, and goes field
    # by field otherwise: these sit on either side of each reason it cannot.
    dict(headers=[(b"x-a", BIG)]), dict(headers=[(b"x-a", BIG + b"v")]),
    dict(headers=[(b"X-Up", b"1"), (b"x-b", b"a\x00")]),
    dict(headers=[(b"x-a", b"1")] * 252), dict(headers=[(b"x-a", b"1")] * 253),
    dict(identity=[(b"x-stellaops-actor", "str value")]),
    dict(identity=((b"x-stellaops-actor", b"a"), (b"", b"empty name"))),
    dict(identity=((b"bad name", b"a"),)), dict(identity=[[b"x-a", b"b"]]),
    dict(peer_ip="127.0.0.1"), dict(scheme="http"), dict(body=bytearray(b"xyz")),
    dict(body=b"b" * 200, max_frame=300), dict(body=b"b" * 150, max_frame=300),
    dict(cid="a\r\nb"), dict(headers=[(b"host", b"h\r")]),
])
def test_request_forward_at_the_edges_of_its_one_pass(impl, case):
    m = M(impl)
    headers = [(b"host", b"h"), (b"connection", b"x-gone"), (b"x-gone", b"1")] + \
        case.get("headers", [])
    req = Req(headers)
    req.correlation_id = case.get("cid", "cid-1")
    identity = case.get("identity", ((b"x-stellaops-actor", b"anonymous"),))
    peer_ip, scheme = case.get("peer_ip", b"ip"), case.get("scheme", b"http")
    body = case.get("body", b"")

    def reference(enc):
        out = request_headers(req, peer_ip, scheme, identity)
        enc.request(CORR, "POST", "/", b"", out, 5, 1, body)

    def forward(enc):
        enc.request_forward(CORR, "POST", "/", b"", req.headers, 5, 1, body, CLASSES,
                            classify, True, True, identity, peer_ip, scheme,
                            req.correlation_id)

    max_frame = case.get("max_frame", 1 << 24)
    assert encoded(m, max_frame, forward) == encoded(m, max_frame, reference)


@impls
@pytest.mark.parametrize("bad", [b"\x00", b"\n", b"\r", b"\x0b", b"\x8a", b"\xff"])
def test_request_forward_finds_a_bad_byte_anywhere(impl, bad):
    # The compiled one pass checks values eight bytes at a time: every length and place.
    m = M(impl)
    for n in range(1, 25):
        for at in range(n):
            value = b"v" * at + bad + b"v" * (n - at - 1)
            req = Req([(b"host", b"h"), (b"x-a", value)])

            def reference(enc):
                enc.request(CORR, "GET", "/", b"", request_headers(req, b"ip", b"http"), 5, 1,
                            b"")

            def forward(enc):
                enc.request_forward(CORR, "GET", "/", b"", req.headers, 5, 1, b"", CLASSES,
                                    classify, True, True, (), b"ip", b"http", "cid-1")

            assert encoded(m, 1 << 20, forward) == encoded(m, 1 << 20, reference), (n, at)


def ref_response_payload(flags, status, headers, body):
    out = struct.pack(">BHH", flags, status, len(headers))
    for name, value in headers:
        out += struct.pack(">H", len(name)) + name + struct.pack(">H", len(value)) + value
    return out + body


def block_reference(m, payload):
    flags, status, headers, body = m.decode_response(payload)
    return flags, status, response_header_block(headers), body


response_names = names | st.sampled_from([b"", b"Content-Type", b"a b"])


@impls
@HSET
@given(flags=st.integers(0, 3), status=st.integers(90, 1010),
       headers=st.lists(st.tuples(response_names, values)
                        | st.tuples(st.just(b"connection"), connection_values), max_size=12),
       body=st.binary(max_size=30) | st.just(b"x" * 1500), cut=st.integers(0, 2000),
       as_view=st.booleans())
def test_decode_response_block_is_decode_response_then_block(impl, flags, status, headers, body,
                                                              cut, as_view):
    m = M(impl)
    payload = ref_response_payload(flags, status, headers, body)
    for p in (payload, payload[:cut]):
        p = memoryview(p) if as_view else p
        assert (outcome(m.decode_response_block, p, RESPONSE_DROP_NAMES)
                == outcome(block_reference, m, p))


def test_response_drop_names_are_response_drop():
    assert sorted(RESPONSE_DROP_NAMES) == sorted(RESPONSE_DROP)


def test_long_header_names_from_clients_are_forwarded_but_never_remembered():
    """Through a real gateway: 300 requests, each with a 15 KB header name of its own
    (a client may send names as long as maxHeaderBytes). The per-name caches kept them:
    4,096 such names held 61 MB in the worker for good (docs/security.md §3d, "header
    name caches"). Now only short names are remembered; every header still reaches the
    service."""
    import socket
    import threading

    import orjson

    from stellagw.auth import identity as auth_identity
    from stellagw.transport import frame as fr
    from tests.support.gwtest import GatewayThread, connect, settings_from
    from tests.support.servicepeer import RawPeer, hello_for

    gw = GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}},
        "logging": {"accessLog": False}}}).decode())).start()
    peer = RawPeer(gw.transport_port)
    seen = []

    def serve():
        while True:
            try:
                frame = peer.read_frame(0.2)
            except (socket.timeout, TimeoutError, OSError):
                continue
            if frame is None:
                return
            if frame[0] == fr.REQUEST:
                seen.append([bytes(n) for n, _ in fr.decode_request(frame[2])[5]])
                enc = fr.FrameEncoder()
                enc.response(frame[1], 200, [], fr.FLAG_END_STREAM, b"")
                peer.sock.sendall(enc.take())

    try:
        assert "error" not in peer.hello(hello_for("svc", endpoints=[("GET", "/svc/x")]))
        threading.Thread(target=serve, daemon=True).start()
        names = [b"x%05d-" % i + b"a" * 15000 for i in range(300)]
        sock = connect(gw.port, timeout=10)
        for k in range(0, len(names), 10):
            batch = names[k:k + 10]
            sock.sendall(b"".join(b"GET /svc/x HTTP/1.1\r\nHost: x\r\nx-short-%d: 1\r\n%s: 1\r\n\r\n"
                                  % (k, name) for name in batch))
            buf = b""
            while buf.count(b"HTTP/1.1 200") < len(batch) or not buf.endswith(b"\r\n\r\n"):
                data = sock.recv(1 << 16)
                assert data, buf
                buf += data
        sock.close()
        assert len(seen) == len(names) and all(name in headers for name, headers in zip(names, seen))
        assert not [n for n in CLASSES if len(n) > 64]
        assert auth_identity.strip_identity_headers([(names[0], b"1")]) == [(names[0], b"1")]
        assert not [n for n in auth_identity._CLEAN if len(n) > 64]
        assert b"x-short-0" in CLASSES                     # short names still are
    finally:
        peer.close()
        gw.stop()
