"""A large HELLO or ENDPOINTS_UPDATE is decoded a slice at a time on the worker's loop
(transport/sliced.py): the worker's other clients are served meanwhile, and the link's later
frames wait until the registration has taken effect. Real sockets, a raw frame peer, an SDK
service; ordered by events, never by time. Plus the sliced decoder against orjson."""
from __future__ import annotations

import random
import threading
import time

import orjson
import pytest

from stellagw.routing.radix import FOUND, NOT_FOUND
from stellagw.routing.table import DRAINING
from stellagw.service import Response, Service
from stellagw.transport import connection
from stellagw.transport import frame as fr
from stellagw.transport import sliced

from tests.support.gwtest import GatewayThread, request, settings_from, wait_for
from tests.support.servicepeer import RawPeer, SdkThread, hello_for


def gateway() -> GatewayThread:
    return GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "transports": {"tcp": {"port": 0}}}}).decode())).start()


def get(gw, path):
    return request(gw.port, b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode(), 15)


def big_payload(endpoints, size):
    """An ENDPOINTS_UPDATE of about `size` bytes: the endpoints and a large schema."""
    items = b",".join([b'{"type":"object","properties":{"id":{"type":"string"}}}'] * (size // 56))
    return (b'{"endpoints":' + orjson.dumps(endpoints) + b',"schemas":{"Big":{"type":"array",'
            b'"x-items":[' + items + b"]}}}")


def test_a_large_update_is_decoded_in_slices_the_worker_serving_and_the_link_waiting(monkeypatch):
    """While one service's 2 MB update is being decoded (held here after its first slice),
    another service's client is answered, the update has no effect yet and the DRAIN the
    link sent behind it waits; let go, the update applies, then the DRAIN."""
    steps, first, release = [0], threading.Event(), threading.Event()
    step = sliced.SlicedJson.step
    loop_thread = []

    def gated(self, deadline):
        steps[0] += 1
        loop_thread.append(threading.get_ident())
        if steps[0] > 1 and not release.is_set():
            first.set()
            return False                 # no progress, the loop free: a slice that waits
        return step(self, deadline)
    monkeypatch.setattr(sliced.SlicedJson, "step", gated)

    gw = gateway()
    fast = SdkThread(Service("fast", gateways=[f"127.0.0.1:{gw.transport_port}"]))

    @fast.service.get("/t/fast/x")
    async def x(req):
        return Response(b"fast")
    fast.start()
    peer = RawPeer(gw.transport_port)
    try:
        assert "error" not in peer.hello(hello_for("big", instance_id="big-1",
                                                   endpoints=[("GET", "/t/big/a")]))
        eps = [{"method": "GET", "path": p, "timeout_ms": 60000} for p in ("/t/big/a", "/t/big/b")]
        update = big_payload(eps, 2 * 1024 * 1024)
        assert len(update) > connection.DECODE_WHOLE
        enc = fr.FrameEncoder()
        enc.raw(fr.ENDPOINTS_UPDATE, fr.ZERO_CORR, update)
        enc.control(fr.DRAIN, fr.ZERO_CORR, {"reason": "behind the update"})
        peer.sock.sendall(enc.take())
        assert first.wait(15), "the update was not decoded in slices"

        def state():
            router = gw.worker.routing.router
            inst = [i for i in gw.worker.routing.instances.values() if i.service == "big"]
            return router.match("GET", "/t/big/b")[0], [i.status for i in inst]
        # Mid-decode: another service's client is served, the update has done nothing yet,
        # and the DRAIN behind it has not been read.
        status, _, body = get(gw, "/t/fast/x")
        assert (status, body) == (200, b"fast")
        match, statuses = gw.call(state)
        assert match == NOT_FOUND and DRAINING not in statuses, (match, statuses)
        release.set()
        assert wait_for(lambda: gw.call(state)[1] == [DRAINING], 15), gw.call(state)
        assert gw.call(state)[0] == FOUND            # the update took effect, then the DRAIN
        assert set(loop_thread) == {gw._thread.ident}     # on the loop, no thread
        assert steps[0] > 2
        assert gw.call(lambda: dict(gw.worker.hub.closed)) == {}
    finally:
        release.set()
        peer.close()
        fast.stop()
        gw.stop()


def test_a_large_hello_is_decoded_in_slices_and_answered():
    gw = gateway()
    peer = RawPeer(gw.transport_port)
    try:
        hello = hello_for("bighello", instance_id="bh-1", endpoints=[("GET", "/t/bh/x")])
        hello["schemas"] = {"S%d" % i: {"type": "object", "description": "d" * 100}
                            for i in range(5000)}
        assert len(orjson.dumps(hello)) > connection.DECODE_WHOLE
        ack = peer.hello(hello)
        assert "error" not in ack and ack["worker_id"] == 0
        assert gw.call(lambda: gw.worker.routing.router.match("GET", "/t/bh/x")[0]) == FOUND
        inst = gw.call(lambda: [i for i in gw.worker.routing.instances.values()
                                if i.service == "bighello"])
        assert len(inst) == 1 and inst[0].schemas == hello["schemas"]
    finally:
        peer.close()
        gw.stop()


def test_a_large_invalid_update_closes_the_link():
    gw = gateway()
    peer = RawPeer(gw.transport_port)
    try:
        assert "error" not in peer.hello(hello_for("bad", endpoints=[("GET", "/t/bad/x")]))
        update = big_payload([], 512 * 1024)
        peer.send(fr.ENDPOINTS_UPDATE, update[:-1] + b"]")      # the last brace wrong
        peer.wait_closed()
        assert gw.call(lambda: dict(gw.worker.hub.closed)) == {"protocol_error": 1}
    finally:
        peer.close()
        gw.stop()


def _value(rng, depth=0):
    r = rng.random()
    if depth > 5 or r < 0.3:
        return rng.choice([0, -5, 1.5, 1e300, True, False, None, "", "é€😀", "x" * rng.randint(0, 90),
                           2**63, -(2**63), "\"\\/\n", "\\ud800"])
    if r < 0.65:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 8))]
    return {rng.choice(["endpoints", "schemas", "k", "é", "a" * 40, str(rng.randint(0, 99))]):
            _value(rng, depth + 1) for _ in range(rng.randint(0, 8))}


@pytest.mark.parametrize("seed", range(4))
def test_the_sliced_decoder_gives_and_refuses_what_orjson_does(monkeypatch, seed):
    """Documents and mutations of them, with slabs far smaller than any value in them."""
    rng = random.Random(seed)
    for i in range(150):
        data = orjson.dumps({"endpoints": _value(rng, 1), "schemas": _value(rng, 1),
                             "x": _value(rng, 1)}, option=orjson.OPT_INDENT_2 if i % 3 else 0)
        if i % 4 == 0:
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                b[rng.randrange(len(b))] = rng.choice(b'{}[],:"\\ 0a\xff\xc3')
            data = bytes(b)
        if i % 5 == 0:
            data = data.replace(b'"x', rng.choice([b'"\\ud800', b'"\\ud83d\\ude00',
                                                   b'"\\\\ud800', b'"\\udc00', b"NaN,\"", b'1e5,"',
                                                   b'123456789012345678901234567890,"', b'1e999,"',
                                                   b'-1' + b'0' * 400 + b',"']), 1)
        try:
            want = orjson.loads(data)
        except orjson.JSONDecodeError:
            want = None
        if not isinstance(want, dict):
            want = None
        for slab in (40, 61, 400):
            monkeypatch.setattr(sliced, "SLAB", slab)
            decoding = sliced.SlicedJson(data)
            try:
                while not decoding.step(time.perf_counter() + 1e-5):
                    pass
                got = decoding.result
            except sliced.DecodeError:
                got = None
            assert got == want, (slab, data)
            if got is not None:
                assert len(decoding.digest) == 16


def test_the_sliced_decoder_refuses_a_number_past_a_doubles_range_as_orjson_does():
    for number in (b"1e999", b"-1e400", b"1" + b"0" * 400):
        data = b'{"endpoints": [], "x": %s}' % number
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(data)
        decoding = sliced.SlicedJson(data + b" " * (2 * sliced.SLAB))
        with pytest.raises(sliced.DecodeError):
            while not decoding.step(time.perf_counter() + 1):
                pass
