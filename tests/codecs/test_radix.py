"""Radix router and path normalisation: both implementations, differential, reference.

Every behaviour test runs against the compiled module (cext/radix.pyx) and the pure-Python
twin (stellagw/_py/radix.py). The compiled variant is skipped, with the reason, when it is
not built or STELLAGW_NO_EXTENSIONS=1 is set. Rules: docs/routing.md.
"""
from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stellagw import _impl
from stellagw._py import radix as py_radix
from tests.support.impls import Codec

RADIX = Codec("radix")
c_radix, C_SKIP, needs_c = RADIX.compiled, RADIX.why_not, RADIX.needs_compiled


@pytest.fixture(params=["c", "py"])
def R(request):
    if request.param == "c":
        if c_radix is None:
            pytest.skip(C_SKIP)
        return c_radix
    return py_radix


IMPLS = [pytest.param("c", marks=needs_c), "py"]


def impl(name):
    return c_radix if name == "c" else py_radix


def build(R, *routes):
    router = R.Router()
    for method, template in routes:
        router.add(method, template, f"{method} {template}")
    return router


# ---------------------------------------------------------------------------------------
# The public module


def test_public_module_reexports_the_selected_implementation():
    import stellagw.routing.radix as public
    expected = py_radix if (_impl.NO_EXTENSIONS or c_radix is None) else c_radix
    assert public._m is expected
    assert set(public.__all__) == {"FOUND", "NOT_FOUND", "METHOD_NOT_ALLOWED", "MAX_SEGMENTS",
                                   "RouteError", "Router", "normalize_path"}
    for name in public.__all__:
        assert getattr(public, name) is getattr(expected, name)
    assert (public.FOUND, public.NOT_FOUND, public.METHOD_NOT_ALLOWED) == (0, 1, 2)
    assert issubclass(public.RouteError, ValueError)


def test_both_implementations_export_the_same_names(R):
    assert R.__all__ == py_radix.__all__
    for name in R.__all__:
        assert hasattr(R, name)


# ---------------------------------------------------------------------------------------
# Matching


def test_literal_beats_param_beats_catchall(R):
    r = build(R, ("GET", "/a/b"), ("GET", "/a/{x}"), ("GET", "/a/{*rest}"))
    assert r.match("GET", "/a/b") == (R.FOUND, "GET /a/b", None)
    assert r.match("GET", "/a/c") == (R.FOUND, "GET /a/{x}", {"x": "c"})
    assert r.match("GET", "/a/c/d") == (R.FOUND, "GET /a/{*rest}", {"rest": "c/d"})
    assert r.match("GET", "/a") == (R.FOUND, "GET /a/{*rest}", {"rest": ""})


def test_precedence_is_decided_left_to_right(R):
    # At the first segment where they differ, the literal 'b' beats '{x}', even though
    # the other template has more literal segments in total.
    r = build(R, ("GET", "/a/{x}/c"), ("GET", "/a/b/{*rest}"))
    assert r.match("GET", "/a/b/c") == (R.FOUND, "GET /a/b/{*rest}", {"rest": "c"})
    assert r.match("GET", "/a/z/c") == (R.FOUND, "GET /a/{x}/c", {"x": "z"})


def test_backtracks_when_the_literal_branch_dead_ends(R):
    r = build(R, ("GET", "/a/b/c"), ("GET", "/a/{x}/d"))
    assert r.match("GET", "/a/b/d") == (R.FOUND, "GET /a/{x}/d", {"x": "b"})
    assert r.match("GET", "/a/b/c") == (R.FOUND, "GET /a/b/c", None)
    assert r.match("GET", "/a/b/e")[0] == R.NOT_FOUND


def test_backtracks_to_a_catchall_higher_up(R):
    r = build(R, ("GET", "/a/b/c/d"), ("GET", "/a/{*rest}"))
    assert r.match("GET", "/a/b/c/x") == (R.FOUND, "GET /a/{*rest}", {"rest": "b/c/x"})


def test_catchall_matches_zero_or_more_segments(R):
    r = build(R, ("GET", "/static/{*path}"), ("GET", "/{*all}"))
    assert r.match("GET", "/static") == (R.FOUND, "GET /static/{*path}", {"path": ""})
    assert r.match("GET", "/static/") == (R.FOUND, "GET /static/{*path}", {"path": ""})
    assert r.match("GET", "/static/css/site.css") == \
        (R.FOUND, "GET /static/{*path}", {"path": "css/site.css"})
    assert r.match("GET", "/static/css/") == (R.FOUND, "GET /static/{*path}", {"path": "css"})
    assert r.match("GET", "/") == (R.FOUND, "GET /{*all}", {"all": ""})
    assert r.match("GET", "/x/y") == (R.FOUND, "GET /{*all}", {"all": "x/y"})


def test_exact_end_beats_a_zero_segment_catchall(R):
    r = build(R, ("GET", "/files"), ("GET", "/files/{*rest}"))
    assert r.match("GET", "/files") == (R.FOUND, "GET /files", None)
    assert r.match("GET", "/files/") == (R.FOUND, "GET /files", None)


def test_params_are_decoded(R):
    r = build(R, ("GET", "/users/{id}/files/{name}"))
    path = R.normalize_path(b"/users/caf%C3%A9/files/a%2Fb%5Cc%2525")
    assert path == "/users/café/files/a%2Fb%5Cc%2525"
    assert r.match("GET", path) == \
        (R.FOUND, "GET /users/{id}/files/{name}", {"id": "café", "name": "a/b\\c%25"})


def test_catchall_value_stays_in_path_form(R):
    # "..%2F" is not a dot-segment, so it survives normalisation; decoding it in the
    # catch-all value would turn it into a traversal when the value is used as a path.
    r = build(R, ("GET", "/static/{*path}"))
    path = R.normalize_path(b"/static/..%2F..%2Fetc/passwd")
    assert path == "/static/..%2F..%2Fetc/passwd"
    assert r.match("GET", path) == \
        (R.FOUND, "GET /static/{*path}", {"path": "..%2F..%2Fetc/passwd"})


def test_encoded_slash_is_not_a_segment_boundary(R):
    r = build(R, ("GET", "/a/{x}"), ("GET", "/a/{x}/{y}"))
    assert r.match("GET", R.normalize_path(b"/a/b%2Fc")) == (R.FOUND, "GET /a/{x}", {"x": "b/c"})
    assert r.match("GET", R.normalize_path(b"/a/b/c")) == \
        (R.FOUND, "GET /a/{x}/{y}", {"x": "b", "y": "c"})


def test_parameterless_route_reuses_one_result(R):
    r = build(R, ("GET", "/health"), ("GET", "/a/b/{*rest}"), ("GET", "/a/{x}/c"))
    first = r.match("GET", "/health")
    assert first == (R.FOUND, "GET /health", None)
    assert r.match("GET", "/health") is first
    assert r.match("GET", "/health/") is first
    nf = r.match("GET", "/nope")
    assert nf == (R.NOT_FOUND, None, None)
    assert r.match("GET", "/nope/nope") is nf


def test_405_with_sorted_allow_tuple(R):
    r = build(R, ("POST", "/scans"), ("GET", "/scans"), ("DELETE", "/scans"))
    first = r.match("PUT", "/scans")
    assert first == (R.METHOD_NOT_ALLOWED, ("DELETE", "GET", "POST"), None)
    assert r.match("PATCH", "/scans/") is first       # precomputed per node


def test_405_unions_every_template_matching_the_path(R):
    # RFC 9110 §15.5.6: Allow lists the methods the target resource supports, i.e. every
    # method that would have matched this path.
    r = build(R, ("GET", "/a/b"), ("POST", "/a/{x}"), ("PUT", "/a/{*rest}"), ("GET", "/z"))
    assert r.match("POST", "/a/b") == (R.FOUND, "POST /a/{x}", {"x": "b"})
    assert r.match("PUT", "/a/b") == (R.FOUND, "PUT /a/{*rest}", {"rest": "b"})
    assert r.match("DELETE", "/a/b") == (R.METHOD_NOT_ALLOWED, ("GET", "POST", "PUT"), None)
    assert r.match("DELETE", "/a/c") == (R.METHOD_NOT_ALLOWED, ("POST", "PUT"), None)


def test_head_does_not_match_get(R):
    r = build(R, ("GET", "/a"))
    assert r.match("HEAD", "/a") == (R.METHOD_NOT_ALLOWED, ("GET",), None)


def test_404(R):
    r = build(R, ("GET", "/a/{x}"), ("GET", "/b"))
    for path in ("/", "/a", "/a/b/c", "/b/c", "/c", "", "a/b", "/A/x"):
        assert r.match("GET", path) == (R.NOT_FOUND, None, None), path
    assert R.Router().match("GET", "/") == (R.NOT_FOUND, None, None)


def test_root_template(R):
    r = build(R, ("GET", "/"))
    assert r.match("GET", "/") == (R.FOUND, "GET /", None)
    assert r.match("GET", "/a") == (R.NOT_FOUND, None, None)


def test_same_shape_different_methods_may_rename_params(R):
    r = R.Router()
    r.add("GET", "/scans/{id}", "get")
    r.add("DELETE", "/scans/{scan_id}", "delete")
    assert r.match("GET", "/scans/7") == (R.FOUND, "get", {"id": "7"})
    assert r.match("DELETE", "/scans/7") == (R.FOUND, "delete", {"scan_id": "7"})


def test_endpoint_identity_len_and_routes(R):
    r = R.Router()
    ep = object()
    r.add("GET", "/a/{x}", ep)
    r.add("POST", "/a/{x}", None)
    r.add("GET", "/b", 3)
    assert len(r) == 3
    assert r.routes() == [("GET", "/a/{x}", ep), ("POST", "/a/{x}", None), ("GET", "/b", 3)]
    assert r.match("GET", "/a/1")[1] is ep
    assert r.match("POST", "/a/1") == (R.FOUND, None, {"x": "1"})
    r.routes().clear()                                    # a copy
    assert len(r) == 3


def test_non_normalised_paths_do_not_crash(R):
    r = build(R, ("GET", "/a/{x}"), ("GET", "/{*rest}"))
    assert r.match("GET", "/a//") == (R.FOUND, "GET /{*rest}", {"rest": "a/"})
    assert r.match("GET", "//") == (R.FOUND, "GET /{*rest}", {"rest": ""})
    assert r.match("GET", "") == (R.NOT_FOUND, None, None)


@pytest.mark.parametrize("first, second", [
    ("/a/{x}", "/a/{y}"),
    ("/a/{*x}", "/a/{*y}"),
    ("/a/b", "/a/b"),
    ("/", "/"),
    ("/{x}/{y}", "/{y}/{x}"),
])
def test_conflicts_raise(R, first, second):
    r = R.Router()
    r.add("GET", first, 1)
    with pytest.raises(R.RouteError) as exc:
        r.add("GET", second, 2)
    assert repr(second) in str(exc.value) and repr(first) in str(exc.value)
    assert len(r) == 1
    assert r.match("GET", "/a/z") == r.match("GET", "/a/z")   # still usable
    r.add("POST", second, 3)                                 # other method: fine


def test_param_and_catchall_are_different_shapes(R):
    r = build(R, ("GET", "/a/{x}"), ("GET", "/a/{*x}"), ("GET", "/a"))
    assert len(r) == 3


@pytest.mark.parametrize("template, words", [
    ("a/b", "start with '/'"),
    ("", "start with '/'"),
    ("/a/", "end with '/'"),
    ("/a//b", "empty segment"),
    ("/a/{x", "unbalanced"),
    ("/a/x}", "unbalanced"),
    ("/a/{{x}}", "unbalanced"),
    ("/a/pre{x}", "partial-segment"),
    ("/a/{x}post", "partial-segment"),
    ("/a/{}", "empty parameter name"),
    ("/a/{*}", "empty parameter name"),
    ("/a/{x-y}", "invalid parameter name"),
    ("/a/{1x}", "invalid parameter name"),
    ("/a/{x}/{x}", "duplicate parameter name"),
    ("/a/{x}/{*x}", "duplicate parameter name"),
    ("/a/{*rest}/b", "must be the last segment"),
    ("/a/{*rest}/{x}", "must be the last segment"),
    ("/a/./b", "normalised form"),
    ("/a/..", "normalised form"),
    ("/a%2fb", "normalised form"),
    ("/%41", "normalised form"),
    ("/a\\b", "normalised form"),
    ("/a\x00", "normalised form"),
    ("/" + "/".join(["s"] * 65), "more than 64 segments"),
])
def test_bad_templates_raise(R, template, words):
    r = R.Router()
    with pytest.raises(R.RouteError) as exc:
        r.add("GET", template, None)
    assert words in str(exc.value)
    assert repr(template) in str(exc.value)
    assert len(r) == 0


@pytest.mark.parametrize("method", ["get", "Get", "*", "", "G ET", "GET\r\n", b"GET", None, "-X"])
def test_bad_methods_raise(R, method):
    with pytest.raises(R.RouteError, match="method"):
        R.Router().add(method, "/a", None)


def test_good_templates(R):
    r = R.Router()
    for t in ("/", "/a%2Fb", "/café", "/a b", "/{*rest}", "/" + "/".join(["{p%d}" % i for i in range(64)]),
              "/v1.0/x-y_z~"):
        r.add("GET", t, t)
    assert r.match("GET", "/a%2Fb") == (R.FOUND, "/a%2Fb", None)
    assert r.match("GET", R.normalize_path("/caf%C3%A9")) == (R.FOUND, "/café", None)
    assert r.match("GET", R.normalize_path("/a%20b")) == (R.FOUND, "/a b", None)
    deep = "/" + "/".join(str(i) for i in range(64))
    status, ep, params = r.match("GET", deep)
    assert status == R.FOUND and params == {"p%d" % i: str(i) for i in range(64)}


# ---------------------------------------------------------------------------------------
# normalize_path

NORMALIZE_CASES = [
    # (raw, expected) — bytes and, where representable, the same as str
    (b"/", "/"),
    (b"/a/b", "/a/b"),
    (b"/a/b/", "/a/b/"),                      # trailing slash kept (match ignores it)
    # duplicate slashes collapse
    (b"//a///b//", "/a/b/"),
    (b"//", "/"),
    # RFC 3986 §5.2.4 dot-segments
    (b"/a/./b", "/a/b"),
    (b"/a/../b", "/b"),
    (b"/a/b/../../c", "/c"),
    (b"/a/.", "/a/"),
    (b"/a/..", "/"),
    (b"/a/b/..", "/a/"),
    (b"/..", "/"),
    (b"/../../a", "/a"),                       # clamps at the root
    (b"/a/.../b", "/a/.../b"),                 # '...' is an ordinary segment
    (b"/a/.b/c.", "/a/.b/c."),
    # encoded dots are dots
    (b"/a/%2e%2E/b", "/b"),
    (b"/a/.%2e/b", "/b"),
    (b"/a/%2E/b", "/a/b"),
    (b"/%2e%2e/%2e%2e/etc/passwd", "/etc/passwd"),
    # encoded slash / backslash / percent stay encoded (canonical upper case)
    (b"/a%2Fb", "/a%2Fb"),
    (b"/a%2fb", "/a%2Fb"),
    (b"/a/..%2F..%2Fb", "/a/..%2F..%2Fb"),     # not a dot-segment
    (b"/a%5cb", "/a%5Cb"),
    (b"/a\\b", "/a%5Cb"),                      # backslash is literal, not a separator
    (b"/a\\..\\b", "/a%5C..%5Cb"),
    (b"/%25", "/%25"),
    (b"/%252F", "/%252F"),                     # no double decoding
    (b"/%2541", "/%2541"),
    # everything else is decoded
    (b"/%41%62", "/Ab"),
    (b"/a%20b", "/a b"),
    (b"/a%3Fb%23c", "/a?b#c"),
    (b"/%7Bx%7D", "/{x}"),
    (b"/caf%C3%A9", "/café"),
    (b"/caf\xc3\xa9", "/café"),                # raw UTF-8 accepted
    (b"/%F0%9F%98%80", "/\U0001F600"),
    (b"/%E2%80%A8", "/\u2028"),                # a separator, not a control
    # invalid
    (b"", None),
    (b"a/b", None),                            # must start with '/'
    (b"*", None),
    (b"%2F", None),
    (b"http://h/a", None),
    (b"/%zz", None),
    (b"/%4", None),
    (b"/%", None),
    (b"/a%", None),
    (b"/%g0", None),
    (b"/%00", None),
    (b"/a\x00b", None),
    (b"/%0A", None),
    (b"/%0d%0a", None),
    (b"/a\tb", None),
    (b"/%7F", None),
    (b"/\x7f", None),
    (b"/%C2%85", None),                        # C1 control (NEL)
    (b"/%C2%9F", None),
    (b"/%C2%A0", "/\u00a0"),                   # first non-control after C1
    (b"/%FF", None),                           # invalid UTF-8
    (b"/\xff", None),
    (b"/%C3", None),                           # truncated sequence
    (b"/%C3/%A9", None),
    (b"/%C3%2F%A9", None),                     # an escape inside a sequence
    (b"/%C0%AE", None),                        # overlong '.'
    (b"/%C0%AF", None),                        # overlong '/'
    (b"/%E0%80%AE", None),
    (b"/%ED%A0%80", None),                     # UTF-16 surrogate
    (b"/%F4%90%80%80", None),                  # > U+10FFFF
    (b"/%FF/../a", None),                      # rejected even if '..' would drop it
    (b"/%00/../a", None),
]


@pytest.mark.parametrize("raw, expected", NORMALIZE_CASES, ids=[repr(c[0]) for c in NORMALIZE_CASES])
def test_normalize_path(R, raw, expected):
    assert R.normalize_path(raw) == expected
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return
    assert R.normalize_path(text) == expected


def test_normalize_path_str_input(R):
    assert R.normalize_path("/café/%C3%A9") == "/café/é"
    assert R.normalize_path("/\ud800") is None                # lone surrogate
    assert R.normalize_path("/\x85") is None                  # C1 control as str
    assert R.normalize_path("/\U0001F600/./x") == "/\U0001F600/x"


def test_normalize_path_long_input(R):
    # Longer than the compiled version's stack buffer: heap path.
    raw = b"/" + b"\\" * 5000 + b"/x/../y"
    assert R.normalize_path(raw) == "/" + "%5C" * 5000 + "/y"
    assert R.normalize_path(b"/" + b"a/" * 3000) == "/" + "a/" * 3000


def test_normalize_path_type_error(R):
    with pytest.raises(TypeError):
        R.normalize_path(None)
    with pytest.raises(TypeError):
        R.normalize_path(bytearray(b"/a"))


_TOKENS = ["/", "/", "/", ".", "..", "%2e", "%2E", "%2F", "%2f", "%5C", "%5c", "%25", "%",
           "%4", "%zz", "%41", "a", "b", "é", "%C3", "%A9", "%C3%A9", "%FF", "%C2%85", "%00",
           "\\", "?", "#", " ", "{", "}", "\x01", "\x7f", "%20", "\U0001F600", "%F0%9F%98%80"]
raw_paths = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=14).map(lambda t: "".join(t)),
    st.lists(st.sampled_from(_TOKENS), max_size=14).map(lambda t: "/" + "".join(t)),
    st.text(max_size=30).map(lambda t: "/" + t),
)


@pytest.mark.parametrize("name", IMPLS)
@settings(max_examples=600, deadline=None)
@given(raw=raw_paths)
def test_normalize_path_properties(name, raw):
    R = impl(name)
    out = R.normalize_path(raw)
    try:
        raw_bytes = raw.encode("utf-8")
    except UnicodeEncodeError:
        assert out is None
        return
    assert R.normalize_path(raw_bytes) == out
    if out is None:
        return
    assert out.startswith("/") and "//" not in out
    segments = out[1:].split("/")
    assert "." not in segments and ".." not in segments
    assert not re.search("[\x00-\x1f\x7f-\x9f\\\\]", out)
    assert re.fullmatch(r"[^%]*(%(25|2F|5C)[^%]*)*", out)       # only three escapes remain
    assert R.normalize_path(out) == out                         # idempotent


# ---------------------------------------------------------------------------------------
# Differential: compiled vs pure Python


_LITERALS = ["a", "b", "c", "api", "v1", "é", "x%2Fy", "%25"]
_PATH_SEGMENTS = _LITERALS + ["zz", "a%2Fb", "q%5Cr", "%252F", "ü"]
_METHODS = ["GET", "POST", "PUT"]


@st.composite
def templates(draw, valid_only=False):
    n = draw(st.integers(0, 4))
    segs = []
    names = iter(range(100))
    for k in range(n):
        kind = draw(st.sampled_from(["l", "l", "p", "c"] if (k == n - 1 or not valid_only)
                                    else ["l", "l", "p"]))
        name = f"p{next(names)}" if valid_only else draw(st.sampled_from(["p", "q", "p1", ""]))
        if kind == "l":
            segs.append(draw(st.sampled_from(_LITERALS)))
        elif kind == "p":
            segs.append("{%s}" % name)
        else:
            segs.append("{*%s}" % name)
    template = "/" + "/".join(segs)
    if not valid_only and draw(st.integers(0, 9)) == 0:
        template = draw(st.sampled_from(["", "a", "/a/", "/{x", "/a//b", "/a/{*r}/b"]))
    return template


route_sets = st.lists(st.tuples(st.sampled_from(_METHODS), templates()), max_size=12)
valid_route_sets = st.lists(st.tuples(st.sampled_from(_METHODS), templates(valid_only=True)),
                            max_size=12)
paths = st.builds(
    lambda segs, slash: "/" + "/".join(segs) + ("/" if slash and segs else ""),
    st.lists(st.sampled_from(_PATH_SEGMENTS), max_size=5), st.booleans())
queries = st.lists(st.tuples(st.sampled_from(_METHODS + ["DELETE"]), paths), min_size=1,
                   max_size=12)


def _add_all(R, routes):
    router = R.Router()
    outcome = []
    for k, (method, template) in enumerate(routes):
        try:
            router.add(method, template, k)
        except R.RouteError as exc:
            outcome.append(("error", str(exc)))
        else:
            outcome.append(("ok",))
    return router, outcome


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=route_sets, qs=queries)
def test_differential_router(routes, qs):
    rc, oc = _add_all(c_radix, routes)
    rp, op = _add_all(py_radix, routes)
    assert oc == op
    assert len(rc) == len(rp) and rc.routes() == rp.routes()
    for method, path in qs:
        assert rc.match(method, path) == rp.match(method, path), (method, path)


@needs_c
@settings(max_examples=300, deadline=None)
@given(routes=valid_route_sets, method=st.sampled_from(_METHODS),
       path=st.text(alphabet="/ab%2F.", max_size=12))
def test_differential_router_arbitrary_paths(routes, method, path):
    rc, _ = _add_all(c_radix, routes)
    rp, _ = _add_all(py_radix, routes)
    assert rc.match(method, path) == rp.match(method, path)


@needs_c
@settings(max_examples=1500, deadline=None)
@given(raw=st.one_of(raw_paths, st.binary(max_size=24).map(lambda b: b"/" + b),
                     st.binary(max_size=8)))
def test_differential_normalize_path(raw):
    assert c_radix.normalize_path(raw) == py_radix.normalize_path(raw)


# ---------------------------------------------------------------------------------------
# Incremental updates: remove() leaves the router a fresh build of what remains would be


def test_remove_returns_the_endpoint_and_the_route_stops_matching(R):
    r = build(R, ("GET", "/a/{x}"), ("GET", "/a/b"), ("POST", "/a/b"))
    assert r.remove("GET", "/a/b") == "GET /a/b"
    assert r.match("GET", "/a/b") == (R.FOUND, "GET /a/{x}", {"x": "b"})
    assert r.match("PUT", "/a/b") == (R.METHOD_NOT_ALLOWED, ("GET", "POST"), None)
    assert r.remove("POST", "/a/b") == "POST /a/b"
    assert r.match("PUT", "/a/b") == (R.METHOD_NOT_ALLOWED, ("GET",), None)
    assert len(r) == 1 and r.routes() == [("GET", "/a/{x}", "GET /a/{x}")]


def test_remove_of_what_is_not_routed_is_a_key_error_and_changes_nothing(R):
    r = build(R, ("GET", "/a/{x}"))
    for method, template in [("POST", "/a/{x}"), ("GET", "/a/{y}"), ("GET", "/a"), ("GET", "/")]:
        with pytest.raises(KeyError):
            r.remove(method, template)
    assert r.routes() == [("GET", "/a/{x}", "GET /a/{x}")]
    assert r.match("GET", "/a/1") == (R.FOUND, "GET /a/{x}", {"x": "1"})


def test_remove_frees_the_shape_and_the_literal_index(R):
    r = build(R, ("GET", "/"), ("GET", "/files/{*rest}"), ("GET", "/files"), ("GET", "/a/b/c"))
    for method, template in [("GET", "/"), ("GET", "/files/{*rest}"), ("GET", "/files"),
                             ("GET", "/a/b/c")]:
        r.remove(method, template)
    assert len(r) == 0
    for path in ("/", "/files", "/files/", "/files/x/y", "/a/b/c", "/a/b/c/", "/a/b"):
        assert r.match("GET", path) == (R.NOT_FOUND, None, None), path
    r.add("GET", "/files/{*other}", 1)      # the shapes are free again, under any name
    r.add("GET", "/a/b/c", 2)
    assert r.match("GET", "/files/x") == (R.FOUND, 1, {"other": "x"})
    assert r.match("GET", "/a/b/c/") == (R.FOUND, 2, None)


def test_remove_prunes_the_tree():
    r = build(py_radix, ("GET", "/a/{x}/b/c"), ("GET", "/a/{x}/{*r}"), ("POST", "/q"))
    for method, template, _ in r.routes():
        r.remove(method, template)
    root = r._root
    assert (root.literal, root.param, root.handlers, root.catchall) == (None, None, None, None)
    assert r._static == {} and r._shapes == {} and r._routes == {}


def test_remove_does_not_allocate_per_route_for_ever(R):
    # 20,000 add/remove rounds: what remove() leaves behind is bounded.
    import gc
    import sys

    def rounds(n):
        for i in range(n):
            r.add("POST", f"/svc/{i % 7}/{{id}}/x{i % 3}", i)
            r.remove("POST", f"/svc/{i % 7}/{{id}}/x{i % 3}")
    r = build(R, ("GET", "/keep/{x}"))
    rounds(100)
    gc.collect()
    before = sys.getallocatedblocks()
    rounds(20_000)
    gc.collect()
    assert sys.getallocatedblocks() - before < 50


@st.composite
def add_remove_sequences(draw):
    """[("add", method, template) | ("remove", method, template)]: removals name routes
    added before (the tests below track what is in), or, now and then, one that is not."""
    ops, present = [], []
    for _ in range(draw(st.integers(0, 24))):
        if present and draw(st.integers(0, 2)) == 0:
            method, template = present.pop(draw(st.integers(0, len(present) - 1)))
            ops.append(("remove", method, template))
        elif draw(st.integers(0, 9)) == 0:
            ops.append(("remove", draw(st.sampled_from(_METHODS)), draw(templates(True))))
        else:
            method, template = draw(st.sampled_from(_METHODS)), draw(templates(True))
            ops.append(("add", method, template))
            present.append((method, template))
    return ops


def _apply(R, ops):
    """Run the sequence; returns the router and the outcome of every step."""
    router = R.Router()
    outcome = []
    for k, (op, method, template) in enumerate(ops):
        try:
            if op == "add":
                router.add(method, template, k)
                outcome.append(("ok",))
            else:
                outcome.append(("removed", router.remove(method, template)))
        except R.RouteError as exc:
            outcome.append(("error", str(exc)))
        except KeyError:
            outcome.append(("absent",))
    return router, outcome


def _fresh(R, router):
    fresh = R.Router()
    for method, template, endpoint in router.routes():
        fresh.add(method, template, endpoint)
    return fresh


@pytest.mark.parametrize("name", IMPLS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=add_remove_sequences(), qs=queries)
def test_add_remove_sequences_match_a_fresh_build(name, ops, qs):
    R = impl(name)
    router, _ = _apply(R, ops)
    fresh = _fresh(R, router)
    assert router.routes() == fresh.routes() and len(router) == len(fresh)
    for method, path in qs:
        assert router.match(method, path) == fresh.match(method, path), (method, path)
    # What is left can be taken out again, in any order, down to an empty router.
    for method, template, endpoint in reversed(router.routes()):
        assert router.remove(method, template) == endpoint
    assert len(router) == 0
    for method, path in qs:
        assert router.match(method, path) == (R.NOT_FOUND, None, None)


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=add_remove_sequences(), qs=queries)
def test_differential_add_remove_sequences(ops, qs):
    rc, oc = _apply(c_radix, ops)
    rp, op = _apply(py_radix, ops)
    assert oc == op
    assert len(rc) == len(rp) and rc.routes() == rp.routes()
    for method, path in qs:
        assert rc.match(method, path) == rp.match(method, path), (method, path)


@pytest.mark.parametrize("name", IMPLS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=add_remove_sequences(), qs=queries)
def test_add_remove_sequences_match_the_reference(name, ops, qs):
    router, _ = _apply(impl(name), ops)
    reference = ReferenceRouter(router.routes())
    for method, path in qs:
        assert router.match(method, path) == reference.match(method, path), (method, path)


# ---------------------------------------------------------------------------------------
# Reference: one regex per template, precedence as documented


class ReferenceRouter:
    """The documented semantics, written naively: every template is a regex; among the
    templates matching the path, those with the method win by precedence key (per
    segment, left to right: literal 0 < param 1 < catch-all 2; the end of a template
    without a catch-all is -1, before a zero-segment catch-all)."""

    def __init__(self, routes):
        self.entries = []
        for method, template, endpoint in routes:
            segs = [] if template == "/" else template[1:].split("/")
            pattern, key, names, catch = "", [], [], False
            for seg in segs:
                if seg.startswith("{*"):
                    pattern += r"(?:/(.*))?"
                    key.append(2)
                    names.append(seg[2:-1])
                    catch = True
                elif seg.startswith("{"):
                    pattern += r"/([^/]+)"
                    key.append(1)
                    names.append(seg[1:-1])
                else:
                    pattern += "/" + re.escape(seg)
                    key.append(0)
            if not catch:
                key.append(-1)
            self.entries.append((re.compile(pattern or "/"), key, method, endpoint, names, catch))

    def match(self, method, path):
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        hits = [(e, m) for e in self.entries if (m := e[0].fullmatch(path))]
        mine = [(e, m) for e, m in hits if e[2] == method]
        if not mine:
            if hits:
                return (2, tuple(sorted({e[2] for e, _ in hits})), None)
            return (1, None, None)
        (regex, key, _, endpoint, names, catch), m = min(mine, key=lambda h: h[0][1])
        if not names:
            return (0, endpoint, None)
        params = {}
        for k, name in enumerate(names):
            value = m.group(k + 1) or ""
            if not (catch and k == len(names) - 1):
                value = value.replace("%2F", "/").replace("%5C", "\\").replace("%25", "%")
            params[name] = value
        return (0, endpoint, params)


@pytest.mark.parametrize("name", IMPLS)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(routes=valid_route_sets, qs=queries)
def test_matches_reference(name, routes, qs):
    R = impl(name)
    router, _ = _add_all(R, routes)
    reference = ReferenceRouter(router.routes())
    for method, path in qs:
        assert router.match(method, path) == reference.match(method, path), (method, path)


@pytest.mark.parametrize("name", IMPLS)
def test_reference_agrees_on_hand_written_table(name):
    R = impl(name)
    routes = [("GET", "/a/b/c"), ("GET", "/a/{x}/d"), ("GET", "/a/{x}/{y}"), ("POST", "/a/{*r}"),
              ("GET", "/"), ("PUT", "/{*all}"), ("GET", "/a/b")]
    router = build(R, *routes)
    reference = ReferenceRouter(router.routes())
    for method in ("GET", "POST", "PUT", "DELETE"):
        for path in ("/", "/a", "/a/", "/a/b", "/a/b/c", "/a/b/d", "/a/z/d", "/a/z/e", "/a/b/c/d",
                     "/x", "/a/b/c/"):
            assert router.match(method, path) == reference.match(method, path), (method, path)


def test_parameterless_match_does_not_allocate(R):
    import sys
    r = build(R, ("GET", "/api/v1/health"), ("GET", "/api/v1/{x}"), ("POST", "/api/v1/items"))
    paths = ["/api/v1/health", "/api/v1/health/"]
    for _ in range(100):                                     # warm caches
        for p in paths:
            r.match("GET", p)
            r.match("PUT", "/api/v1/items")
    before = sys.getallocatedblocks()
    for _ in range(10_000):
        for p in paths:
            r.match("GET", p)
    assert sys.getallocatedblocks() - before < 50
