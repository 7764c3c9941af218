"""Frame codec: both implementations, the protocol's test vectors, differential tests.

Every behaviour test runs against the compiled module (cext/frame.pyx) and the pure-Python
twin (stellagw/_py/frame.py). The compiled variant is skipped, with the reason, when it is
not built or STELLAGW_NO_EXTENSIONS=1 is set. The wire format is docs/protocol.md; its
hex vectors live in tests/codecs/vectors/frames.json and are checked three ways: against a
struct-based reference builder in this file, by decoding, and by encoding.
"""
from __future__ import annotations

import json
import os
import random
import re
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw import _impl
from stellagw._py import frame as py_frame
from tests.support import REPO
from tests.support.impls import Codec

ROOT = REPO
VECTORS = json.loads((Path(__file__).parent / "vectors" / "frames.json").read_text())
FRAME = Codec("frame")
c_frame, C_SKIP, needs_c = FRAME.compiled, FRAME.why_not, FRAME.needs_compiled
IMPLS = [pytest.param("c", marks=needs_c), "py"]
impls = pytest.mark.parametrize("impl", IMPLS)


def M(impl):
    return c_frame if impl == "c" else py_frame


CORR = bytes.fromhex("5a17c0de2f6b9e410000000000000001")
DROP = (b"content-length", b"date", b"x-correlation-id")   # for decode_response_block
# STELLAGW_HYPOTHESIS_EXAMPLES=5000 for a longer differential soak.
HSET = settings(max_examples=int(os.environ.get("STELLAGW_HYPOTHESIS_EXAMPLES", "150")),
                deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- helpers ---------------------------------------------------------------------------

def drain(dec):
    out = []
    while (frame := dec.next()) is not None:
        ftype, corr, payload = frame
        out.append((ftype, corr, bytes(payload)))
    return out


def cuts(data, points):
    prev = 0
    for p in sorted(points):
        yield data[prev:p]
        prev = p
    yield data[prev:]


def decode_stream(m, data, points=(), max_frame=None, kind=bytes):
    """(frames, error message or None, at_frame_boundary or None)."""
    dec = m.FrameDecoder() if max_frame is None else m.FrameDecoder(max_frame)
    frames = []
    try:
        for piece in cuts(data, points):
            dec.feed(kind(piece))
            while (frame := dec.next()) is not None:
                frames.append((frame[0], frame[1], bytes(frame[2])))
    except m.FrameError as exc:
        return frames, str(exc), None
    return frames, None, dec.at_frame_boundary()


def outcome(fn, *args):
    """Result of fn, or the error: FrameError messages must agree exactly between the
    implementations, and so must FrameTooLarge's length and limit; for
    TypeError/ValueError/OverflowError only the class must."""
    try:
        return ("ok", fn(*args))
    except (py_frame.FrameError,) + ((c_frame.FrameError,) if c_frame else ()) as exc:
        return frame_error(exc)
    except (TypeError, OverflowError, ValueError) as exc:
        return (type(exc).__name__,)


def frame_error(exc):
    """A FrameError as both implementations must agree on it: class name, message and, for
    FrameTooLarge, its length and limit."""
    if type(exc).__name__ == "FrameTooLarge":
        return ("FrameTooLarge", str(exc), exc.length, exc.limit)
    assert type(exc).__name__ == "FrameError", type(exc)
    return ("FrameError", str(exc))


def decode_payload(m, ftype, payload):
    if ftype == m.REQUEST:
        return m.decode_request(payload)
    if ftype == m.RESPONSE:
        return m.decode_response(payload)
    if ftype in (m.REQUEST_STREAM_DATA, m.RESPONSE_STREAM_DATA):
        return m.decode_stream_data(payload)
    if ftype == m.WINDOW_UPDATE:
        return m.decode_window_update(payload)
    if ftype in (m.PING, m.PONG):
        return bytes(payload)
    return m.decode_control(payload)


# --- reference builder (plain struct, independent of both codecs) ----------------------

def ref_frame(ftype, corr, payload):
    return struct.pack(">IB", 17 + len(payload), ftype) + corr + payload


def ref_headers(headers):
    out = struct.pack(">H", len(headers))
    for name, value in headers:
        out += struct.pack(">H", len(name)) + name + struct.pack(">H", len(value)) + value
    return out


def ref_request(flags, timeout_ms, method, path, query, headers, body):
    m, p = method.encode(), path.encode()
    return (struct.pack(">BIB", flags, timeout_ms, len(m)) + m + struct.pack(">H", len(p)) + p
            + struct.pack(">H", len(query)) + query + ref_headers(headers) + body)


def ref_response(flags, status, headers, body):
    return struct.pack(">BH", flags, status) + ref_headers(headers) + body


def vec_fields(vec):
    """The vector's decoded fields as the codec returns them."""
    d = vec["decoded"]
    kind = vec["kind"]
    if kind == "request":
        return (d["flags"], d["timeout_ms"], d["method"], d["path"], d["query"].encode(),
                [(n.encode(), v.encode()) for n, v in d["headers"]], d["body"].encode())
    if kind == "response":
        return (d["flags"], d["status"], [(n.encode(), v.encode()) for n, v in d["headers"]],
                d["body"].encode())
    if kind == "stream":
        return (d["flags"], bytes.fromhex(d["chunk_hex"]) if "chunk_hex" in d
                else d["chunk"].encode())
    if kind == "raw":
        return bytes.fromhex(d["payload_hex"])
    if kind == "window":
        return d["increment"]
    return d["json"] or {}


def vec_payload(vec):
    f = vec_fields(vec)
    kind = vec["kind"]
    if kind == "request":
        return ref_request(*f)
    if kind == "response":
        return ref_response(*f)
    if kind == "stream":
        return bytes([f[0]]) + f[1]
    if kind == "raw":
        return f
    if kind == "window":
        return struct.pack(">I", f)
    return json.dumps(vec["decoded"]["json"], separators=(",", ":")).encode() \
        if vec["decoded"]["json"] is not None else b""


def encode_vec(m, enc, vec):
    corr = bytes.fromhex(vec["corr"])
    f = vec_fields(vec)
    kind = vec["kind"]
    if kind == "request":
        flags, timeout_ms, method, path, query, headers, body = f
        enc.request(corr, method, path, query, headers, timeout_ms, flags, body)
    elif kind == "response":
        flags, status, headers, body = f
        enc.response(corr, status, headers, flags, body)
    elif kind == "stream":
        enc.stream_data(vec["type"], corr, f[0], f[1])
    elif kind == "raw":
        enc.raw(vec["type"], corr, f)
    elif kind == "window":
        enc.window_update(corr, f)
    else:
        enc.control(vec["type"], corr, vec["decoded"]["json"])


VALID = VECTORS["valid"]
ALL_VALID = b"".join(bytes.fromhex(v["hex"]) for v in VALID)


# --- the vectors ------------------------------------------------------------------------

def test_vectors_cover_every_frame_type():
    assert {v["type"] for v in VALID} == set(range(1, 14))


@pytest.mark.parametrize("vec", VALID, ids=[v["name"] for v in VALID])
def test_vector_matches_reference_layout(vec):
    assert ref_frame(vec["type"], bytes.fromhex(vec["corr"]), vec_payload(vec)).hex() == vec["hex"]


def test_vectors_are_the_ones_in_the_doc():
    doc = re.sub(r"\s+", "", (ROOT / "docs" / "protocol.md").read_text())
    for vec in VALID + VECTORS["invalid_frames"]:
        assert vec["hex"] in doc, vec["name"]
    for vec in VECTORS["invalid_payloads"]:
        assert vec["payload_hex"] in doc and vec["error"].replace(" ", "") in doc, vec["name"]


@impls
@pytest.mark.parametrize("vec", VALID, ids=[v["name"] for v in VALID])
def test_vector_decodes(impl, vec):
    m = M(impl)
    dec = m.FrameDecoder()
    dec.feed(bytes.fromhex(vec["hex"]))
    ftype, corr, payload = dec.next()
    assert dec.next() is None and dec.at_frame_boundary()
    assert (ftype, corr.hex()) == (vec["type"], vec["corr"])
    assert decode_payload(m, ftype, payload) == vec_fields(vec)


@impls
@pytest.mark.parametrize("vec", VALID, ids=[v["name"] for v in VALID])
def test_vector_encodes(impl, vec):
    m = M(impl)
    enc = m.FrameEncoder()
    encode_vec(m, enc, vec)
    assert len(enc) == len(vec["hex"]) // 2
    assert enc.take().hex() == vec["hex"]
    assert len(enc) == 0 and enc.take() == b""


@impls
def test_all_vectors_through_one_encoder(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    for vec in VALID:
        encode_vec(m, enc, vec)
    assert enc.take() == ALL_VALID


@impls
@pytest.mark.parametrize("vec", VECTORS["invalid_frames"],
                         ids=[v["name"] for v in VECTORS["invalid_frames"]])
def test_invalid_frame_vectors(impl, vec):
    m = M(impl)
    data = bytes.fromhex(vec["hex"])
    for points in ((), range(1, len(data))):
        frames, err, _ = decode_stream(m, data, points, vec.get("max_frame_size"))
        assert frames == [] and err == vec["error"]


@impls
@pytest.mark.parametrize("vec", VECTORS["invalid_payloads"],
                         ids=[v["name"] for v in VECTORS["invalid_payloads"]])
def test_invalid_payload_vectors(impl, vec):
    m = M(impl)
    fn = {"request": m.decode_request, "response": m.decode_response,
          "stream": m.decode_stream_data, "control": m.decode_control,
          "window": m.decode_window_update}[vec["decoder"]]
    fns = [fn]
    if vec["decoder"] == "response":
        fns.append(lambda payload: m.decode_response_block(payload, DROP))
    payload = bytes.fromhex(vec["payload_hex"])
    for fn in fns:
        for arg in (payload, bytearray(payload), memoryview(payload)):
            with pytest.raises(m.FrameError) as info:
                fn(arg)
            assert str(info.value).startswith(vec["error"])
            assert isinstance(info.value, ValueError)


# --- split feeds ---------------------------------------------------------------------

EXPECTED_ALL = [(v["type"], bytes.fromhex(v["corr"]), vec_payload(v)) for v in VALID]


@impls
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_split_whole_and_byte_at_a_time(impl, kind):
    m = M(impl)
    assert decode_stream(m, ALL_VALID, (), kind=kind) == (EXPECTED_ALL, None, True)
    assert decode_stream(m, ALL_VALID, range(1, len(ALL_VALID)), kind=kind) == \
        (EXPECTED_ALL, None, True)


@impls
@pytest.mark.parametrize("seed", range(25))
def test_split_random_cut_points(impl, seed):
    m = M(impl)
    rnd = random.Random(seed)
    big = [(m.RESPONSE_STREAM_DATA, CORR, bytes([0]) + rnd.randbytes(rnd.choice((1023, 1024, 5000))))
           for _ in range(3)]
    data = ALL_VALID + b"".join(ref_frame(*f) for f in big) + ALL_VALID
    points = rnd.sample(range(1, len(data)), rnd.randrange(1, 40))
    kind = rnd.choice((bytes, bytes, bytearray))
    assert decode_stream(m, data, points, kind=kind) == (EXPECTED_ALL + big + EXPECTED_ALL, None, True)


@impls
def test_partial_frame_is_not_a_boundary(impl):
    m = M(impl)
    dec = m.FrameDecoder()
    assert dec.at_frame_boundary()
    frame = bytes.fromhex(VALID[4]["hex"])
    for i in range(1, len(frame)):
        dec = m.FrameDecoder()
        dec.feed(frame[:i])
        assert dec.next() is None and not dec.at_frame_boundary()
        dec.feed(frame[i:])
        assert not dec.at_frame_boundary()      # a whole frame waits for next()
        assert dec.next() is not None and dec.at_frame_boundary()
    dec.feed(b"")
    assert dec.next() is None and dec.at_frame_boundary()


@impls
def test_zero_copy_payload_lifetime(impl):
    m = M(impl)
    body = bytes(range(256)) * 20
    frame = ref_frame(m.RESPONSE_STREAM_DATA, CORR, b"\x01" + body)
    small = ref_frame(m.PING, CORR, b"12345678")
    dec = m.FrameDecoder()
    dec.feed(frame + small + frame[:10])
    t1, _, p1 = dec.next()
    t2, _, p2 = dec.next()
    assert isinstance(p1, memoryview) and p1.readonly and type(p2) is bytes
    dec.feed(frame[10:])                      # straddling frame: copied out of the buffer
    _, _, p3 = dec.next()
    assert type(p3) is bytes
    dec.feed(bytearray(frame))                # not bytes: always copied
    _, _, p4 = dec.next()
    assert type(p4) is bytes
    assert bytes(p1) == p3 == p4 == b"\x01" + body
    assert m.decode_stream_data(p1) == (1, body)


# --- limits and malformed input ------------------------------------------------------

@impls
def test_oversized_length_raises_before_allocating(impl):
    m = M(impl)
    dec = m.FrameDecoder(max_frame_size=1 << 20)
    tracemalloc.start()
    try:
        dec.feed(b"\xff\xff\xff\xff")         # claims 4 GB
        with pytest.raises(m.FrameError, match="exceeds max_frame_size 1048576"):
            dec.next()
        with pytest.raises(m.FrameError):      # the stream stays broken
            dec.next()
        # A legal but large length (16 MiB) with 21 bytes fed allocates nothing big either.
        dec2 = m.FrameDecoder()
        dec2.feed(struct.pack(">IB", 16 * 1024 * 1024, m.RESPONSE_STREAM_DATA) + CORR)
        assert dec2.next() is None
        dec2.feed(bytearray(b"\x00" * 100))
        assert dec2.next() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024


@impls
def test_max_frame_size_boundary(impl):
    m = M(impl)
    frame = ref_frame(m.PING, CORR, b"x" * 10)      # length field 27
    dec = m.FrameDecoder(27)
    dec.feed(frame)
    assert dec.next()[2] == b"x" * 10
    dec = m.FrameDecoder(26)
    dec.feed(frame[:4])
    with pytest.raises(m.FrameError, match="frame length 27 exceeds max_frame_size 26"):
        dec.next()
    for bad in (16, 1 << 32, -1):
        with pytest.raises((ValueError, OverflowError)):
            m.FrameDecoder(bad)
        with pytest.raises((ValueError, OverflowError)):
            m.FrameEncoder(bad)


@impls
def test_max_frame_size_raised_between_frames(impl):
    # A service link's HELLO is held to maxHelloSize, what follows to maxFrameSize.
    m = M(impl)
    small, big = ref_frame(m.PING, CORR, b"x" * 10), ref_frame(m.PING, CORR, b"y" * 100)
    dec = m.FrameDecoder(27)
    dec.feed(small + big[:10])
    assert dec.next()[2] == b"x" * 10
    dec.set_max_frame_size(117)
    dec.feed(big[10:])
    assert dec.next()[2] == b"y" * 100
    with pytest.raises((ValueError, OverflowError)):
        dec.set_max_frame_size(16)
    dec.set_max_frame_size(116)
    dec.feed(big)
    with pytest.raises(m.FrameError, match="frame length 117 exceeds max_frame_size 116"):
        dec.next()


@impls
def test_frame_too_large_is_a_frame_error_with_its_length_and_limit(impl):
    # A connection tells a frame past its limit from other malformed input by its type
    # (a HELLO past maxHelloSize is answered, not just closed), never by its message.
    m = M(impl)
    assert issubclass(m.FrameTooLarge, m.FrameError) and m.FrameTooLarge is not m.FrameError
    for head, limit, length in ((ref_frame(m.PING, CORR, b"x" * 10)[:4], 26, 27),
                                (b"\xff\xff\xff\xff", 1 << 20, 2**32 - 1)):
        dec = m.FrameDecoder(limit)
        dec.feed(head)
        with pytest.raises(m.FrameTooLarge) as caught:
            dec.next()
        assert (caught.value.length, caught.value.limit) == (length, limit)
        assert str(caught.value) == f"frame length {length} exceeds max_frame_size {limit}"
    # Other bad headers are FrameErrors of their own.
    for data in (b"\x00\x00\x00\x10", b"\x00\x00\x00\x11\x63"):
        dec = m.FrameDecoder()
        dec.feed(data)
        with pytest.raises(m.FrameError) as caught:
            dec.next()
        assert type(caught.value) is m.FrameError
    # Every encoder method: the length it reached when the field that does not fit came.
    enc = m.FrameEncoder(100)
    calls = [
        (lambda: enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 0, b"x" * 83), 17 + 1 + 83),
        # flags, timeout, method, path, query, header count, a: b, then the body
        (lambda: enc.request(CORR, "POST", "/up", b"", [(b"a", b"b")], 0, 1, b"x" * 90),
         17 + 5 + 5 + 5 + 2 + 2 + 3 + 3 + 90),
        # flags, status, header count, the name; then the value that does not fit
        (lambda: enc.response(CORR, 200, [(b"a", b"v" * 90)], 1, b""), 17 + 3 + 2 + 3 + 92),
        (lambda: enc.control(m.CANCEL, CORR, {"reason": "r" * 90}), 17 + 13 + 90),
        (lambda: enc.raw(m.PING, CORR, b"p" * 84), 17 + 84)]
    for call, length in calls:
        with pytest.raises(m.FrameTooLarge) as caught:
            call()
        assert (caught.value.length, caught.value.limit) == (length, 100)
        assert "frame length exceeds max_frame_size 100" in str(caught.value)
    with pytest.raises(m.FrameError) as caught:
        enc.request(CORR, "GET", "/", b"", [(b"a", b"\x01")], 0, 1, b"")
    assert type(caught.value) is m.FrameError
    assert len(enc) == 0


@impls
def test_the_encoders_limit_can_change_between_frames(impl):
    # A service link's frames are held to what its HELLO announced, from then on.
    m = M(impl)
    enc = m.FrameEncoder()
    enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 0, b"x" * 2000)
    enc.set_max_frame_size(1024)
    enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 0, b"y" * 1006)       # exactly 1024
    with pytest.raises(m.FrameTooLarge):
        enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 0, b"z" * 1007)
    for bad in (16, 1 << 32, -1):
        with pytest.raises((ValueError, OverflowError)):
            enc.set_max_frame_size(bad)
    enc.set_max_frame_size(1025)
    enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 1, b"z" * 1007)
    assert enc.take() == (ref_frame(m.REQUEST_STREAM_DATA, CORR, b"\0" + b"x" * 2000)
                          + ref_frame(m.REQUEST_STREAM_DATA, CORR, b"\0" + b"y" * 1006)
                          + ref_frame(m.REQUEST_STREAM_DATA, CORR, b"\1" + b"z" * 1007))


@needs_c
@HSET
@given(length=st.integers(0, 2**32 - 1) | st.integers(0, 400), ftype=st.integers(0, 20),
       limit=st.integers(17, 300) | st.sampled_from([2**32 - 1, 1 << 20]),
       fed=st.integers(4, 30), size=st.integers(0, 400))
def test_differential_frame_too_large(length, ftype, limit, fed, size):
    """The same FrameTooLarge (or other error), length and limit, from both decoders on any
    header, and from both encoders on any frame size."""
    data = (struct.pack(">IB", length, ftype) + CORR + b"p" * 400)[:fed]

    def decoded(m):
        dec = m.FrameDecoder(limit)
        dec.feed(data)
        return outcome(dec.next)

    assert decoded(c_frame) == decoded(py_frame)
    calls = [
        ("stream_data", (5, CORR, 0, b"s" * size)),
        ("raw", (11, CORR, b"r" * size)),
        ("control", (8, CORR, {"reason": "c" * size})),
        ("response", (CORR, 200, [(b"x-h", b"v" * (size // 2))], 0, b"b" * (size // 2))),
        ("request", (CORR, "PUT", "/p" * (size // 4), b"q" * (size // 4),
                     [(b"x-h", b"v" * (size // 4))], 0, 1, b"b" * (size // 4))),
    ]
    assert encode_outcome(c_frame, limit, calls) == encode_outcome(py_frame, limit, calls)


@impls
def test_short_length_field_waits(impl):
    m = M(impl)
    dec = m.FrameDecoder()
    for part in (b"\x00", b"\x00", b"\x00"):
        dec.feed(part)
        assert dec.next() is None and not dec.at_frame_boundary()
    dec.feed(b"\x11")                            # length 17, type not yet known
    assert dec.next() is None
    dec.feed(b"\x0b" + CORR)
    assert dec.next() == (m.PING, CORR, b"")


@impls
def test_unknown_type_detected_with_five_bytes(impl):
    m = M(impl)
    dec = m.FrameDecoder()
    dec.feed(b"\x00\x00\x00\x11\x63")
    with pytest.raises(m.FrameError, match="unknown frame type 99"):
        dec.next()


@impls
def test_request_header_overrun_and_too_many_headers(impl):
    m = M(impl)
    head = ref_request(1, 0, "GET", "/", b"", [], b"")[:-2]
    two = head + struct.pack(">H", 2) + struct.pack(">H", 1) + b"a" + struct.pack(">H", 1) + b"b"
    with pytest.raises(m.FrameError, match="REQUEST: header name length overruns"):
        m.decode_request(two)
    many = head + struct.pack(">H", 300) + b"\x00\x01a\x00\x00" * 300
    with pytest.raises(m.FrameError, match="REQUEST: header count 300 exceeds 256"):
        m.decode_request(many)
    ok = head + struct.pack(">H", 256) + b"\x00\x01a\x00\x00" * 256
    assert len(m.decode_request(ok)[5]) == 256
    enc = m.FrameEncoder()
    with pytest.raises(m.FrameError, match="REQUEST: more than 256 headers"):
        enc.request(CORR, "GET", "/", b"", [(b"a", b"")] * 257, 0, 1, b"")
    assert len(enc) == 0


@impls
def test_control_json_errors(impl):
    m = M(impl)
    assert m.decode_control(b"") == {}
    assert m.decode_control(memoryview(b'{"a":[1]}')) == {"a": [1]}
    for bad in (b"{", b"\xff", b'{"a":1}x'):
        with pytest.raises(m.FrameError, match="control payload is not valid JSON"):
            m.decode_control(bad)
    for bad in (b"[]", b"1", b'"s"', b"null"):
        with pytest.raises(m.FrameError, match="not a JSON object"):
            m.decode_control(bad)


# --- encoder behaviour -----------------------------------------------------------------

@impls
def test_encoder_oversized_frame_leaves_buffer_as_it_was(impl):
    m = M(impl)
    enc = m.FrameEncoder(max_frame_size=1000)
    enc.raw(m.PING, CORR, b"1234")
    before = len(enc)
    big = b"x" * (10 * 1024 * 1024)
    tracemalloc.start()
    try:
        with pytest.raises(m.FrameError, match="frame length exceeds max_frame_size 1000"):
            enc.request(CORR, "POST", "/up", b"", [(b"a", b"b")], 0, 1, big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 and len(enc) == before
    with pytest.raises(m.FrameError):
        enc.response(CORR, 200, [(b"a", b"v" * 990)], 1, b"")
    with pytest.raises(m.FrameError):
        enc.stream_data(m.RESPONSE_STREAM_DATA, CORR, 0, b"x" * 983)
    enc.stream_data(m.RESPONSE_STREAM_DATA, CORR, 0, b"x" * 982)   # exactly 1000
    assert len(enc) == before + 1004
    with pytest.raises(m.FrameError):
        enc.control(m.HELLO, CORR, {"x": "y" * 1000})
    assert enc.take()[:before] == ref_frame(m.PING, CORR, b"1234")


@impls
def test_encoder_rolls_back_on_a_bad_field(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.raw(m.PONG, CORR, b"ab")
    good = [(b"a", b"1")] * 5
    cases = [
        lambda: enc.request(CORR, "GET", "/", b"", good + [(b"b", b"x\r\ny")], 0, 1, b""),
        lambda: enc.request(CORR, "GET", "/", b"", good + [(b"bad name", b"")], 0, 1, b""),
        lambda: enc.request(CORR, "GET", "/", b"", good + [(b"a", b"b", b"c")], 0, 1, b""),
        lambda: enc.request(CORR, "GET", "/", b"", good + [(1, b"b")], 0, 1, b""),
        lambda: enc.request(CORR, "GET", "/", b"", good, 0, 1, "str body"),
        lambda: enc.request(CORR, "GET", "/\ud800", b"", good, 0, 1, b""),
        lambda: enc.request(CORR[:15], "GET", "/", b"", good, 0, 1, b""),
        lambda: enc.response(CORR, 200, good + [("é", "v")], 1, b""),
        lambda: enc.response(CORR, 200, good + [("a", "\u20ac")], 1, b""),
        lambda: enc.response(CORR, 200, iter(good * 60), 1, b""),
        lambda: enc.control(m.HELLO, CORR, {"a": object()}),
        lambda: enc.control(m.HELLO, CORR, [1]),
    ]
    for case in cases:
        with pytest.raises((ValueError, TypeError)):
            case()
        assert enc.take() == ref_frame(m.PONG, CORR, b"ab")
        enc.raw(m.PONG, CORR, b"ab")


@impls
def test_encoder_field_rules(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.request(bytearray(CORR), "PROPFIND", "/é", "a=é", [("X-Up", "vé"), (b"ok", bytearray(b"1"))],
                4294967295, 0, memoryview(b"body"))
    enc.response(memoryview(CORR), 999, [], 0, bytearray())
    dec = m.FrameDecoder()
    dec.feed(enc.take())
    req = m.decode_request(dec.next()[2])
    assert req == (0, 4294967295, "PROPFIND", "/é", "a=é".encode(),
                   [(b"x-up", "vé".encode("latin-1")), (b"ok", b"1")], b"body")
    assert m.decode_response(dec.next()[2]) == (0, 999, [], b"")
    bad = [
        (lambda: enc.request(CORR, "", "/", b"", [], 0, 1, b""), "REQUEST: empty method"),
        (lambda: enc.request(CORR, "G" * 17, "/", b"", [], 0, 1, b""), "method length 17 exceeds 16"),
        (lambda: enc.request(CORR, "GET ", "/", b"", [], 0, 1, b""), "method is not an HTTP token"),
        (lambda: enc.request(CORR, "GÉT", "/", b"", [], 0, 1, b""), "method is not an HTTP token"),
        (lambda: enc.request(CORR, "GET", "/", b"", [], -1, 1, b""), "timeout_ms -1 out of range"),
        (lambda: enc.request(CORR, "GET", "/", b"", [], 1 << 32, 1, b""), "timeout_ms 4294967296"),
        (lambda: enc.request(CORR, "GET", "/", b"", [], 0, 2, b""), r"reserved flag bits set \(0x02\)"),
        (lambda: enc.request(CORR, "GET", "/", b"", [], 0, 256, b""), "flags 256 out of range"),
        (lambda: enc.request(CORR, "GET", "/" * 65536, b"", [], 0, 1, b""), "path length 65536 exceeds"),
        (lambda: enc.request(CORR, "GET", "/", b"q" * 65536, [], 0, 1, b""), "query length 65536"),
        (lambda: enc.request(CORR, "GET", "/", b"", [(b"", b"")], 0, 1, b""), "header name is not"),
        (lambda: enc.request(CORR, "GET", "/", b"", [(b"a", b"\x00")], 0, 1, b""), "control character"),
        (lambda: enc.request(CORR, "GET", "/", b"", [(b"a", b"v" * 65536)], 0, 1, b""),
         "header value length 65536"),
        (lambda: enc.response(CORR, 99, [], 1, b""), "status 99 out of range"),
        (lambda: enc.response(CORR, 1000, [], 1, b""), "status 1000 out of range"),
        (lambda: enc.stream_data(m.RESPONSE, CORR, 0, b""), "frame type 6 is not a stream-data"),
        (lambda: enc.stream_data(m.RESPONSE_STREAM_DATA, CORR, m.KIND_CLOSE, b""), "CLOSE without"),
        (lambda: enc.stream_data(m.RESPONSE_STREAM_DATA, CORR, 0x100, b""), "flags 256 out of range"),
        (lambda: enc.control(m.REQUEST, CORR, None), "frame type 4 is not a JSON control type"),
        (lambda: enc.window_update(CORR, 0), "increment 0 out of range"),
        (lambda: enc.window_update(CORR, 1 << 31), "increment 2147483648 out of range"),
        (lambda: enc.raw(14, CORR, b""), "unknown frame type 14"),
        (lambda: enc.raw(m.PING, b"short", b""), "correlation id must be 16 bytes"),
    ]
    for fn, msg in bad:
        with pytest.raises(m.FrameError, match=msg):
            fn()
        assert len(enc) == 0
    for fn in (lambda: enc.request(CORR, b"GET", "/", b"", [], 0, 1, b""),
               lambda: enc.request(CORR, "GET", b"/", b"", [], 0, 1, b""),
               lambda: enc.request(CORR, "GET", "/", 5, [], 0, 1, b""),
               lambda: enc.request(CORR, "GET", "/", b"", [], 1.5, 1, b""),
               lambda: enc.raw(m.PING, "0123456789abcdef", b""),
               lambda: enc.stream_data(m.REQUEST_STREAM_DATA, CORR, 0, "text")):
        with pytest.raises(TypeError):
            fn()
        assert len(enc) == 0


@impls
def test_take_coalesces_and_reuses(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    for round_ in range(3):
        for i in range(100):
            enc.response(CORR, 200, [(b"content-length", b"2")], 1, b"ok")
        data = enc.take()
        assert len(enc) == 0 and len(data) == 100 * len(data[:len(data) // 100])
        dec = m.FrameDecoder()
        dec.feed(data)
        assert len(drain(dec)) == 100
    enc.stream_data(m.RESPONSE_STREAM_DATA, CORR, 0, b"x" * (4 * 1024 * 1024))
    assert len(enc.take()) == 21 + 1 + 4 * 1024 * 1024
    enc.raw(m.PING, CORR, b"")
    assert enc.take() == ref_frame(m.PING, CORR, b"")


# --- decode_response_block, request_forward ---------------------------------------------
# (tests/transport/test_transport_headers.py checks both against the Python header rules they replace)

@impls
def test_response_block_drops_named_headers_and_keeps_order(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    headers = [(b"content-type", b"text/plain"), (b"date", b"x"), (b"x-a", b""),
               (b"content-length", b"2"), (b"x-a", b"2")]
    enc.response(CORR, 404, headers, 1, b"no")
    payload = enc.take()[21:]
    expected = (1, 404, b"content-type: text/plain\r\nx-a: \r\nx-a: 2\r\n", b"no")
    for arg in (payload, bytearray(payload), memoryview(payload)):
        assert m.decode_response_block(arg, DROP) == expected
    assert m.decode_response_block(payload, ())[2].count(b"\r\n") == 5
    assert m.decode_response_block(ref_response(0, 200, [], b""), DROP) == (0, 200, b"", b"")
    for drop in ([b"date"], (b"date", "x"), None):
        with pytest.raises(TypeError):
            m.decode_response_block(payload, drop)


@impls
def test_response_block_drops_what_a_dropped_connection_field_names(impl):
    # RFC 9110 §7.6.1: a field a service's Connection names described its connection to
    # the gateway and goes no further, on any of its Connection lines, in any case.
    m = M(impl)
    headers = [(b"x-keep", b"1"), (b"connection", b"keep-alive, X-Keep"), (b"x-other", b"2"),
               (b"connection", b"\tx-two ,, "), (b"x-two", b"3"), (b"x-keep", b"4"),
               (b"content-type", b"text/plain")]
    payload = ref_response(1, 200, headers, b"ok")
    drop = DROP + (b"connection",)
    assert m.decode_response_block(payload, drop) == (
        1, 200, b"x-other: 2\r\ncontent-type: text/plain\r\n", b"ok")
    # A caller that keeps `connection` keeps what it names (it did not drop the field).
    assert m.decode_response_block(payload, DROP)[2] == b"".join(
        b"%s: %s\r\n" % h for h in headers)
    # Without any Connection field, nothing else changes.
    plain = [h for h in headers if h[0] != b"connection"]
    assert m.decode_response_block(ref_response(1, 200, plain, b""), drop)[2] == b"".join(
        b"%s: %s\r\n" % h for h in plain)


def forward_args(headers, **kw):
    """request_forward's arguments: a GET with `headers`, classified by their own kind names."""
    m = py_frame
    kinds = {b"connection": m.HEADER_CONNECTION, b"host": m.HEADER_HOST, b"te": m.HEADER_TE,
             b"traceparent": m.HEADER_TRACE, b"drop-me": m.HEADER_DROP}
    args = dict(corr=CORR, method="GET", path="/p", query=b"q", headers=headers, timeout_ms=5,
                flags=1, body=b"", classes={},
                classify=lambda name: kinds.get(name, m.HEADER_KEEP),
                http11=True, keep_trace=True, identity=[(b"x-id", b"me")], peer_ip=b"ip",
                scheme=b"http", correlation_id="c")
    args.update(kw)
    return list(args.values())


@impls
def test_request_forward_rules(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.request_forward(*forward_args([
        (b"x-named", b"1"), (b"host", b"h1"), (b"drop-me", b"2"), (b"traceparent", b"t"),
        (b"te", b" Trailers "), (b"X-Named", b"case kept"),
        (b"connection", b"keep-alive ,X-NAMED,"),
        (b"host", b"h2"), (b"", b"named by the empty token")]))
    headers = m.decode_request(enc.take()[21:])[5]
    assert headers == [(b"host", b"h1"), (b"traceparent", b"t"), (b"x-named", b"case kept"),
                       (b"host", b"h2"), (b"te", b"trailers"), (b"x-id", b"me"),
                       (b"x-forwarded-for", b"ip"), (b"x-forwarded-proto", b"http"),
                       (b"x-forwarded-host", b"h2"), (b"x-correlation-id", b"c")]
    enc.request_forward(*forward_args([(b"te", b"trailers"), (b"traceparent", b"t")],
                                      http11=False, keep_trace=False, identity=(),
                                      correlation_id="é"))
    assert m.decode_request(enc.take()[21:])[5] == [
        (b"x-forwarded-for", b"ip"), (b"x-forwarded-proto", b"http"),
        (b"x-correlation-id", "é".encode())]


@impls
def test_request_forward_counts_and_refuses_like_request(impl):
    m = M(impl)
    enc = m.FrameEncoder()
    # More client headers than a frame may carry is fine while few are forwarded.
    enc.request_forward(*forward_args([(b"drop-me", b"x")] * 300 + [(b"a", b"1")] * 252))
    assert len(m.decode_request(enc.take()[21:])[5]) == 256
    enc.raw(m.PING, CORR, b"")
    before = len(enc)
    for headers, msg in (([(b"a", b"1")] * 253, "REQUEST: more than 256 headers"),
                         ([(b"a", b"\r")], "control character"),
                         ([(b"a b", b"")], "header name is not a lowercase token")):
        with pytest.raises(m.FrameError, match=msg):
            enc.request_forward(*forward_args(headers))
        assert len(enc) == before
    for bad in ([[b"a", b"1"]], [(b"a", "1")], [(b"a",)], [("a", b"1")], [(b"a", b"1", b"")], 5):
        with pytest.raises(TypeError):
            enc.request_forward(*forward_args(bad))
        assert len(enc) == before
    with pytest.raises(TypeError):
        enc.request_forward(*forward_args([], classes=None))
    with pytest.raises(UnicodeEncodeError):
        enc.request_forward(*forward_args([], correlation_id="\ud800"))
    assert len(enc) == before


# --- hypothesis: round trips -------------------------------------------------------------

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
corrs = st.binary(min_size=16, max_size=16)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]) | \
    st.text(alphabet=TCHAR, min_size=1, max_size=16)
paths = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
names = st.text(alphabet=TCHAR, min_size=1, max_size=24)
# Valid field values: no control character but HTAB (RFC 9110 §5.5).
CONTROLS = bytes(c for c in range(32) if c != 9) + b"\x7f"
values = st.binary(max_size=40).map(lambda b: b.translate(None, CONTROLS))
headers_st = st.lists(st.tuples(names, values), max_size=12)
bodies = st.binary(max_size=2100)


def lowered(headers):
    return [(n.lower().encode(), v) for n, v in headers]


def roundtrip(m, enc, points):
    data = enc.take()
    frames, err, boundary = decode_stream(m, data, points)
    assert err is None and boundary
    return frames


@impls
@HSET
@given(corr=corrs, method=methods, path=paths, query=st.binary(max_size=40), headers=headers_st,
       timeout=st.integers(0, 2**32 - 1), flags=st.sampled_from([0, 1]), body=bodies,
       cut=st.integers(1, 400))
def test_roundtrip_request(impl, corr, method, path, query, headers, timeout, flags, body, cut):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.request(corr, method, path, query, headers, timeout, flags, body)
    [(ftype, c, payload)] = roundtrip(m, enc, range(cut, 3000, cut))
    assert (ftype, c) == (m.REQUEST, corr)
    assert m.decode_request(payload) == (flags, timeout, method, path, query, lowered(headers), body)


@impls
@HSET
@given(corr=corrs, status=st.integers(100, 999), headers=headers_st,
       flags=st.sampled_from([0, 1]), body=bodies, cut=st.integers(1, 400))
def test_roundtrip_response(impl, corr, status, headers, flags, body, cut):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.response(corr, status, headers, flags, body)
    [(ftype, c, payload)] = roundtrip(m, enc, range(cut, 3000, cut))
    assert (ftype, c) == (m.RESPONSE, corr)
    assert m.decode_response(payload) == (flags, status, lowered(headers), body)
    block = b"".join(b"%s: %s\r\n" % (n, v) for n, v in lowered(headers) if n not in DROP)
    assert m.decode_response_block(payload, DROP) == (flags, status, block, body)


STREAM_FLAGS = [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 0x10, 0x12, 0x14]


@impls
@HSET
@given(corr=corrs, ftype=st.sampled_from([5, 7]), flags=st.sampled_from(STREAM_FLAGS),
       chunk=bodies, cut=st.integers(1, 400))
def test_roundtrip_stream_data(impl, corr, ftype, flags, chunk, cut):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.stream_data(ftype, corr, flags, chunk)
    [(t, c, payload)] = roundtrip(m, enc, range(cut, 3000, cut))
    assert (t, c) == (ftype, corr) and m.decode_stream_data(payload) == (flags, chunk)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)


@impls
@HSET
@given(corr=corrs, ftype=st.sampled_from([1, 2, 3, 8, 9, 10]),
       obj=st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=6))
def test_roundtrip_control(impl, corr, ftype, obj):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.control(ftype, corr, obj)
    [(t, c, payload)] = roundtrip(m, enc, ())
    assert (t, c) == (ftype, corr) and m.decode_control(payload) == (obj or {})


@impls
@HSET
@given(corr=corrs, ftype=st.sampled_from([11, 12]), payload=st.binary(max_size=64),
       inc=st.integers(1, 2**31 - 1))
def test_roundtrip_ping_pong_window(impl, corr, ftype, payload, inc):
    m = M(impl)
    enc = m.FrameEncoder()
    enc.raw(ftype, corr, payload)
    enc.window_update(corr, inc)
    (t, c, p), (t2, c2, p2) = roundtrip(m, enc, (5,))
    assert (t, c, p) == (ftype, corr, payload)
    assert (t2, c2) == (m.WINDOW_UPDATE, corr) and m.decode_window_update(p2) == inc


# --- hypothesis: C vs Python -----------------------------------------------------------

any_text = st.text(max_size=20) | st.sampled_from(["GET", "Ä", "/\ud800", "é€", "a\r\nb"])
any_name = any_text | st.binary(max_size=20) | st.sampled_from([b"Content-Type", b"", 3])
any_value = any_text | st.binary(max_size=20)
any_headers = st.lists(st.tuples(any_name, any_value), max_size=6)
any_int = st.integers(-3, 1100) | st.sampled_from([2**32 - 1, 2**32, 2**31, -2**40, 2**70])


def encode_outcome(m, max_frame, calls):
    enc = m.FrameEncoder(max_frame)
    results = []
    for name, args in calls:
        results.append(outcome(getattr(enc, name), *args))
        results.append(len(enc))
    results.append(enc.take())
    return results


@needs_c
@HSET
@given(max_frame=st.integers(17, 300) | st.just(16 * 1024 * 1024), corr=corrs | st.binary(max_size=20),
       method=any_text, path=any_text, query=st.binary(max_size=30) | any_text,
       headers=any_headers, timeout=any_int, flags=any_int, status=any_int, ftype=any_int,
       body=st.binary(max_size=300), obj=st.none() | st.dictionaries(st.text(max_size=5), json_values))
def test_differential_encoders(max_frame, corr, method, path, query, headers, timeout, flags,
                               status, ftype, body, obj):
    calls = [
        ("request", (corr, method, path, query, headers, timeout, flags, body)),
        ("request", (corr, "GET", "/p", b"q=1", headers, 100, 1, body)),
        ("response", (corr, status, headers, flags, body)),
        ("stream_data", (ftype, corr, flags, body)),
        ("stream_data", (7, corr, flags & 0xFF if flags >= 0 else 0, body)),
        ("control", (ftype, corr, obj)),
        ("control", (1, corr, obj)),
        ("window_update", (corr, status)),
        ("raw", (ftype, corr, body)),
    ]
    assert encode_outcome(c_frame, max_frame, calls) == encode_outcome(py_frame, max_frame, calls)


def full_decode(m, data, points, max_frame):
    frames, err, boundary = decode_stream(m, data, points, max_frame)
    out = [(t, c, p, outcome(decode_payload, m, t, p)) for t, c, p in frames]
    return out, err, boundary


def frame_soup():
    """Byte strings that are mostly frames, some of them damaged."""
    good = st.sampled_from([bytes.fromhex(v["hex"]) for v in VALID])
    damaged = st.tuples(good, st.integers(0, 400), st.integers(0, 255)).map(
        lambda t: t[0][:t[1] % len(t[0])] + bytes([t[2]]) + t[0][t[1] % len(t[0]) + 1:])
    head = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 20), st.binary(max_size=60)).map(
        lambda t: struct.pack(">IB", t[0] % 90 if t[0] % 3 else t[0], t[1]) + CORR + t[2])
    return st.lists(good | damaged | head | st.binary(max_size=30), max_size=8).map(b"".join)


@needs_c
@HSET
@given(data=frame_soup() | st.binary(max_size=200), cut_seed=st.integers(0, 2**16),
       max_frame=st.sampled_from([17, 40, 100, 16 * 1024 * 1024]))
def test_differential_decoders(data, cut_seed, max_frame):
    rnd = random.Random(cut_seed)
    points = rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randrange(0, 6))) if data else []
    c = full_decode(c_frame, data, points, max_frame)
    assert c == full_decode(py_frame, data, points, max_frame)
    assert c == full_decode(c_frame, data, (), max_frame)


@needs_c
@HSET
@given(payload=st.binary(max_size=120) | frame_soup())
def test_differential_payload_decoders(payload):
    for fn in ("decode_request", "decode_response", "decode_stream_data", "decode_control",
               "decode_window_update"):
        assert outcome(getattr(c_frame, fn), payload) == outcome(getattr(py_frame, fn), payload)
    for drop in (DROP, DROP + (b"connection",)):
        assert (outcome(c_frame.decode_response_block, payload, drop)
                == outcome(py_frame.decode_response_block, payload, drop))


@needs_c
def test_differential_payload_types():
    body = b"\x00" * 1500
    data = ALL_VALID + ref_frame(7, CORR, body) + ref_frame(7, CORR, body[:1022]) + ALL_VALID[:7]
    for m in (c_frame, py_frame):
        dec = m.FrameDecoder()
        dec.feed(data)
        types = []
        while (f := dec.next()) is not None:
            types.append(type(f[2]).__name__)
        assert types.count("memoryview") == 1
    assert full_decode(c_frame, data, (), None) == full_decode(py_frame, data, (), None)


@needs_c
def test_same_constants_in_both():
    for name in py_frame.__all__:
        pv = getattr(py_frame, name)
        cv = getattr(c_frame, name)
        if isinstance(pv, (int, bytes)):
            assert pv == cv, name
        elif isinstance(pv, type):
            assert isinstance(cv, type) and cv.__name__ == pv.__name__, name
        else:
            assert callable(pv) and callable(cv), name


# --- the public module -----------------------------------------------------------------

def test_public_module():
    from stellagw.transport import frame
    assert set(py_frame.__all__) <= set(frame.__all__)
    for name in frame.__all__:
        assert hasattr(frame, name), name
    expected = py_frame if (_impl.NO_EXTENSIONS or c_frame is None) else c_frame
    assert frame.FrameDecoder is expected.FrameDecoder
    assert issubclass(frame.FrameError, ValueError)
    assert frame.FRAME_TYPE_NAMES[frame.HELLO_ACK] == "HELLO_ACK" and len(frame.FRAME_TYPE_NAMES) == 13
    assert frame.ws_close_payload(1000, "bye") == bytes.fromhex("03e8627965")
    assert frame.parse_ws_close(bytes.fromhex("03e8627965")) == (1000, "bye")
    assert frame.parse_ws_close(b"") == (None, "") and frame.ws_close_payload() == b""
    assert frame.stream_kind(frame.KIND_CLOSE | frame.FLAG_END_STREAM) == frame.KIND_CLOSE
    for bad in (b"\x03", b"\x03\xe8\xff"):
        with pytest.raises(frame.FrameError):
            frame.parse_ws_close(bad)
    with pytest.raises(frame.FrameError):
        frame.ws_close_payload(999)


# --- correlation ids of a link's requests --------------------------------------------------

@impls
def test_corr_id_is_prefix_then_serial(impl):
    m = M(impl)
    assert m.corr_id(b"\x01" * 8, 0x0102) == b"\x01" * 8 + b"\x00" * 6 + b"\x01\x02"
    assert m.corr_id(b"abcdefgh", 2**64 - 1) == b"abcdefgh" + b"\xff" * 8
    for prefix in (b"short", b"123456789", None):
        with pytest.raises(ValueError):
            m.corr_id(prefix, 1)
    for serial in (-1, 2**64):
        with pytest.raises(OverflowError):
            m.corr_id(b"abcdefgh", serial)


@needs_c
@given(st.binary(min_size=8, max_size=8), st.integers(0, 2**64 - 1))
def test_corr_id_twins_agree(prefix, serial):
    assert c_frame.corr_id(prefix, serial) == py_frame.corr_id(prefix, serial)
