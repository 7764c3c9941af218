"""cext/httpwire.pyx against its pure-Python twin (stellagw/_py/httpwire.py), and both
against the rules of docs/http-edge.md."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from tests.support.impls import Codec

WIRE = Codec("httpwire")
py_wire, C = WIRE.twin, WIRE.compiled
IMPLS = WIRE.available

HOST_CHARS = st.sampled_from(list(b"aZ09-._~:[]@/ ,%\t!") + [0, 0xFF])


@pytest.mark.parametrize("w", IMPLS)
@pytest.mark.parametrize("value, ok", [
    (b"example.com", True), (b"a", True), (b"a:1", True), (b"a:65535", True),
    (b"10.0.0.1:8080", True), (b"[::1]", True), (b"[2001:db8::1]:443", True), (b"a-b_c~d.e", True),
    (b"", False), (b"a:", False), (b"a:0", False), (b"a:65536", False), (b"a:99999", False),
    (b"a:123456", False), (b"a:8x", False), (b"u@a", False), (b"a/b", False), (b"a b", False),
    (b"a,b", False), (b"a, b", False), (b"::1", False), (b"[::1", False), (b"[]", False),
    (b"[1.2]", False), (b"[::1]x", False), (b":80", False), (b"a%2eb", False), (b"a" * 256, False),
])
def test_host_rules(w, value, ok):
    assert w.host_ok(value) is ok


@pytest.mark.parametrize("w", IMPLS)
@pytest.mark.parametrize("value, kind", [
    (b"chunked", "CHUNKED"), (b"Chunked", "CHUNKED"), (b" chunked\t", "CHUNKED"),
    (b"gzip, chunked", "OTHER"), (b"gzip,chunked", "OTHER"), (b"x, y, chunked", "OTHER"),
    (b"gzip", "BAD"), (b"chunked, gzip", "BAD"), (b"chunked, chunked", "BAD"),
    (b"chunked,", "BAD"), (b",chunked", "BAD"), (b"", "BAD"), (b"xchunked", "BAD"),
    (b"chunked\x0b", "BAD"), (b'"chunked"', "BAD"),
])
def test_transfer_coding_rules(w, value, kind):
    assert w.transfer_coding(value) == getattr(w, "TE_" + kind)


@pytest.mark.parametrize("w", IMPLS)
def test_split_target(w):
    assert w.split_target(b"/a/b") == (b"/a/b", b"")
    assert w.split_target(b"/a?x=1?y") == (b"/a", b"x=1?y")
    assert w.split_target(b"/a?") == (b"/a", b"")
    assert w.split_target(b"/a#f") is None and w.split_target(b"/a?q#f") is None


@WIRE.needs_compiled
@given(st.lists(HOST_CHARS, max_size=40).map(bytes))
def test_host_ok_twins_agree(value):
    assert C.host_ok(value) is py_wire.host_ok(value)


@WIRE.needs_compiled
@given(st.lists(st.sampled_from([b"chunked", b"CHUNKED", b"gzip", b"", b" ", b"\t", b",",
                                 b"chunk", b"x"]), max_size=6).map(b"".join))
def test_transfer_coding_twins_agree(value):
    assert C.transfer_coding(value) == py_wire.transfer_coding(value)


@WIRE.needs_compiled
@given(st.binary(max_size=30).map(lambda b: b"/" + b))
def test_split_target_twins_agree(url):
    assert C.split_target(url) == py_wire.split_target(url)


@WIRE.needs_compiled
@given(st.binary(max_size=20), st.binary(max_size=20), st.integers(-1, 10**6),
       st.binary(max_size=40), st.binary(max_size=20),
       st.text(st.characters(max_codepoint=127), max_size=64),
       st.sampled_from([b"", b"connection: close\r\n"]), st.binary(max_size=50))
def test_render_response_twins_agree(line, date, length, headers, extra, cid, conn, body):
    args = (line, date, length, headers, extra, cid, conn, body)
    assert C.render_response(*args) == py_wire.render_response(*args)


@pytest.mark.parametrize("w", IMPLS)
def test_render_response_writes_the_correlation_id_and_refuses_a_non_ascii_one(w):
    head = (b"HTTP/1.1 200 OK\r\n", b"date: x\r\n", 2, b"", b"")
    out = w.render_response(*head, "abc-DEF_09.x", b"", b"ok")
    assert out == (b"HTTP/1.1 200 OK\r\ndate: x\r\ncontent-length: 2\r\n"
                   b"x-correlation-id: abc-DEF_09.x\r\n\r\nok")
    with pytest.raises(ValueError):
        w.render_response(*head, "caf\u00e9", b"", b"ok")     # latin-1, still not ASCII
    with pytest.raises(TypeError):
        w.render_response(*head, b"abc", b"", b"ok")
    with pytest.raises(TypeError):
        w.render_response(*head, None, b"", b"ok")


@pytest.mark.parametrize("w", IMPLS)
@pytest.mark.parametrize("value, taken", [
    (b"abc-DEF_09.x", "abc-DEF_09.x"), (b"a" * 64, "a" * 64), (b"a" * 65, None), (b"", None),
    (b"a b", None), (b"a/b", None), (b"\xe9", None), (None, None),
])
def test_correlation_id_taken_when_well_formed(w, value, taken):
    assert w.cid_taken(value) == taken


@pytest.mark.parametrize("w", IMPLS)
def test_correlation_id_made_from_prefix_and_serial(w):
    assert w.cid_made("d9ddca4b00", 1) == "d9ddca4b000000000001"
    assert w.cid_made("p", 0xFFFFFFFFFF) == "pffffffffff"
    assert w.cid_made("p", 0x10000000000) == "p10000000000"
    assert w.cid_made("", 2**64 - 1) == "ffffffffffffffff"
    assert w.cid_made("é", 10) == "é000000000a"


@pytest.mark.skipif(C is None, reason="needs the compiled module")
@given(st.one_of(st.none(), st.binary(max_size=70),
                 st.text("azAZ09._- /", max_size=70).map(str.encode)))
def test_cid_taken_twins_agree(value):
    assert C.cid_taken(value) == py_wire.cid_taken(value)


@pytest.mark.skipif(C is None, reason="needs the compiled module")
@given(st.text(max_size=12), st.integers(0, 2**64 - 1))
def test_cid_made_twins_agree(prefix, serial):
    made = C.cid_made(prefix, serial)
    assert made == py_wire.cid_made(prefix, serial) and type(made) is str


@pytest.mark.skipif(C is None, reason="needs the compiled module")
@pytest.mark.parametrize("length", [0, 9, 10, 99, 100, 65536, 2**31, 2**63 - 1])
def test_render_response_content_length_digits(length):
    args = (b"HTTP/1.1 200 OK\r\n", b"date: x\r\n", length, b"", b"", "c", b"", b"")
    assert C.render_response(*args) == py_wire.render_response(*args)
    assert b"content-length: %d\r\n" % length in C.render_response(*args)


@pytest.mark.parametrize("w", IMPLS)
def test_method_name_is_one_str_per_common_method(w):
    for name in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        first = w.method_name(name.encode())
        assert first == name and w.method_name(bytes(bytearray(name.encode()))) is first
    assert w.method_name(b"PROPFIND") == "PROPFIND" and w.method_name(b"GE") == "GE"
    with pytest.raises(TypeError):
        w.method_name(None)


@pytest.mark.skipif(C is None, reason="needs the compiled module")
@given(st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS",
                        b"GETS", b"PUTX", b"MKCOL", b"PURGE", b"DELETES", b"OPTION", b"get"]))
def test_method_name_twins_agree(method):
    assert C.method_name(method) == py_wire.method_name(method)


@pytest.mark.parametrize("w", IMPLS)
def test_header_name_is_one_object_per_common_name(w):
    # The ingress keys every later lookup (forwarding classes, credential fields, its own
    # header scan) on these objects: whatever the case the client sent, the same one.
    for name in w.COMMON_HEADER_NAMES:
        assert name == name.lower()
        for sent in (name, name.upper(), name.title(), bytes(bytearray(name))):
            assert w.header_name(sent) is name
    assert w.header_name(b"X-Custom-Thing") == b"x-custom-thing"
    assert w.header_name(b"hostx") == b"hostx" and w.header_name(b"") == b""
    with pytest.raises(TypeError):
        w.header_name(None)
    with pytest.raises(TypeError):
        w.header_name("host")


@pytest.mark.skipif(C is None, reason="needs the compiled module")
@given(st.one_of(st.binary(max_size=40),
                 st.sampled_from(py_wire.COMMON_HEADER_NAMES).flatmap(
                     lambda n: st.lists(st.booleans(), min_size=len(n), max_size=len(n)).map(
                         lambda up: bytes(c - 32 if u and 97 <= c <= 122 else c
                                          for c, u in zip(n, up))))))
def test_header_name_twins_agree(raw):
    # Only ASCII letters change case (RFC 9110 field names are tokens; bytes.lower()'s rule).
    got = C.header_name(raw)
    assert got == py_wire.header_name(raw) == raw.lower()
