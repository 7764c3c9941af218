"""The adversarial corpus: malformed, ambiguous and smuggling requests, each with what the
gateway must answer, whether the connection stays, and what the service may see.

Every case names the rows of docs/http-edge.md it exercises (`ROWS`, the first cell of each
row exactly as written there) and where it comes from: an RFC 9110 / 9112 section, or an
attack class of the HTTP Garden (its TROPHIES list) or of AWS http-desync-guardian (its
tests/*.yaml tiers). Requests are written out here by hand; nothing is copied.

`{id}` in a request is the 4-byte marker of one send (so lengths stay exact); `{bearer}`,
`{bearer_noscope}`, `{dpop_token}` and `{dpop_proof}` are minted per send (tests/ingress/edge/harness.py).
`SMUGGLED` in a path is what must never reach the service.
"""
from __future__ import annotations

from .harness import BODY_LIMIT, PARTIAL, URL_LIMIT, Case, Expect, Seen

# docs/http-edge.md: key -> the row's first cell, verbatim.
ROWS = {
    # Request line
    "versions": "`HTTP/1.1`, `HTTP/1.0`",
    "head": "`HEAD` on a route that has `GET`",
    "http09": "no HTTP-version (`GET /` — HTTP/0.9 style), `HTTP/0.9`",
    "http2": "another well-formed version (`HTTP/2.0`, `HTTP/1.2`, `HTTP/3.0`)",
    "other_version": "a malformed version (`HTTP/1.10`, `http/1.1`, `HTTP/1`, `HTTP/1.1x`)",
    "method": "unknown or malformed method",
    "connect": "`CONNECT`",
    "url_long": "request-target longer than `maxUrlLength`",
    "origin_form": "origin-form `/path?query`",
    "absolute_form": "absolute-form `http(s)://authority/path`",
    "absolute_bad": "absolute-form with another scheme, userinfo, or an invalid authority",
    "asterisk_authority": "asterisk-form `*` (`OPTIONS *`), authority-form (`a:443`) outside CONNECT",
    "fragment": "a fragment (`#`) in the target",
    "bad_path": "a path `normalize_path` refuses (`%00`, overlong UTF-8, …)",
    # Header section
    "no_host": "HTTP/1.1 without `Host`",
    "two_hosts": "two or more `Host` lines (any version)",
    "bad_host": "`Host` not `uri-host [\":\" port]`: empty, userinfo (`u@h`), a path (`h/x`), a "
                "space, a list (`a, b`, `a,b`), a port outside 1–65535 or not digits, a raw IPv6 "
                "address without brackets, longer than 255",
    "header_limits": "a header block over `maxHeaderBytes` or `maxHeaderCount`",
    "bad_syntax": "whitespace before the colon, obs-fold, bare CR or LF, NUL (llhttp strict)",
    "cl_bad": "`Content-Length` malformed, duplicated (even equal), or with `Transfer-Encoding`",
    "cl_limit": "`Content-Length` above the endpoint's body limit",
    "te_10": "`Transfer-Encoding` on HTTP/1.0 (any coding)",
    "te_chunked": "`Transfer-Encoding: chunked` on HTTP/1.1 (one line, any case)",
    "te_coding": "`Transfer-Encoding` with a coding besides `chunked` (`gzip, chunked`)",
    "te_not_last": "`Transfer-Encoding` not ending in `chunked`, two lines, or an empty list "
                   "element (`chunked,`: refused rather than read two ways)",
    "connection_lines": "`Connection` on several lines",
    "ws_ok": "`Upgrade: websocket` on `GET` (WebSocket endpoint)",
    "ws_bad": "`Upgrade: websocket` on another method, or with a body",
    "upgrade_refused": "`Upgrade` refused by the endpoint (not a WebSocket endpoint)",
    "upgrade_other": "`Upgrade: h2c` (or any other protocol), or any `Upgrade` on HTTP/1.0",
    "ws_plain": "a plain request to a WebSocket endpoint",
    "expect_continue": "`Expect: 100-continue` (HTTP/1.1, body pending)",
    "expect_other": "`Expect` with any other value",
    "strip_client": "client-sent `X-Forwarded-*`, `Forwarded`, `X-Real-IP`, `True-Client-IP`, "
                    "`X-Client-IP`, `CF-Connecting-IP`, `X-HTTP-Method-Override`, `X-HTTP-Method`, "
                    "`X-Method-Override`, `X-Original-URL`, `X-Rewrite-URL` "
                    "(`gateway.http.stripRequestHeaders`)",
    "strip_identity": "client-sent identity headers (`X-StellaOps-*`, docs/auth.md)",
    "strip_folded": "any of these names with `_` for `-` (`X_Real_IP`: CGI and WSGI read both as "
                    "one variable)",
    "ows": "whitespace around a field value (`Host: a `)",
    # Body
    "refused_body": "any body on a request refused on its head (404, 405, 401, 403, 429, 413, 503)",
    "chunked_limit": "chunked body that passes the limit while streaming",
    "chunk_ext": "chunk extensions (`3;a=b`)",
    "chunk_ext_budget": "chunk extensions past that budget (a 300 MB extension)",
    "trailers": "chunked trailer fields",
    "trailer_framing": "`Content-Length` or `Transfer-Encoding` as a trailer field (llhttp strict)",
    "slow_body": "body slower than `minBodyRate` over a `bodyReadTimeout` window",
    # Deadlines
    "dl_first_head": "first head (a connection that sends nothing gets the 408 too)",
    "dl_idle": "idle between requests",
    "dl_later_head": "a later head (keep-alive or pipelined, also while another request is in flight)",
    "dl_body": "body",
    "dl_answer": "answer",
    "dl_linger": "lingering read after a refusal",
}

# Classes the corpus covers that have no row of their own in docs/http-edge.md.
EXTRA = {
    "x_request_line": "request-line whitespace and target syntax (RFC 9112 §3)",
    "x_chunk_syntax": "chunk-size and chunk-line syntax (RFC 9112 §7.1)",
    "x_pipeline": "pipelining and request smuggling across message boundaries (RFC 9112 §9.3, §11.2)",
    "x_stream": "streamed responses and request bodies",
    "x_auth": "credentials in the header section (controls for the trailer cases)",
}

CASES: list[Case] = []
H = b"Host: gw.test\r\n"


def add(name, raw, expect, rows, source, **kw):
    rows = (rows,) if isinstance(rows, str) else tuple(rows)
    for r in rows:
        assert r in ROWS or r in EXTRA, r
    assert all(c.name != name for c in CASES), name
    CASES.append(Case(name=name, raw=raw, expect=expect, rows=rows, source=source, **kw))


def req(method=b"GET", target=b"/edge/{id}/a", version=b"HTTP/1.1", headers=b"", body=b"",
        host=True) -> bytes:
    return (method + b" " + target + b" " + version + b"\r\n" + (H if host else b"")
            + headers + b"\r\n" + body)


def post(body=b"hello", target=b"/edge/{id}/a", headers=b"", method=b"POST", **kw) -> bytes:
    return req(method, target, headers=b"Content-Length: %d\r\n" % len(body) + headers,
               body=body, **kw)


def chunked(body_raw, target=b"/edge/{id}/a", headers=b"", method=b"POST", **kw) -> bytes:
    return req(method, target, headers=b"Transfer-Encoding: chunked\r\n" + headers,
               body=body_raw, **kw)


def seen(method="GET", path="/edge/{id}/a", body=b"", **kw) -> Seen:
    return Seen(method=method, path=path, body=body, **kw)


def ok(*seens, closed=False, statuses=None) -> Expect:
    return Expect(tuple(statuses or (200,) * len(seens)), closed, tuple(seens))


def refuse(*statuses, closed=True, seen=()) -> Expect:
    return Expect(tuple(statuses), closed, seen)


GOOD = req(target=b"/edge/{id}/after")
SEEN_GOOD = seen(path="/edge/{id}/after")
SMUGGLED = req(target=b"/edge/{id}/SMUGGLED")
HELLO_CHUNKED = b"5\r\nhello\r\n0\r\n\r\n"

# ====================================================================== request line

add("http11_get", req(), ok(seen(headers={"host": "gw.test", "x-forwarded-host": "gw.test",
                                          "x-forwarded-proto": "http"})),
    "versions", "RFC 9112 §2.3, §3")
add("http10_get_closes", req(version=b"HTTP/1.0", host=False), ok(seen(), closed=True),
    "versions", "RFC 9112 §9.3 (HTTP/1.0 default close)")
add("http10_with_host", req(version=b"HTTP/1.0"), ok(seen(), closed=True),
    "versions", "RFC 9112 §9.3")
add("http10_keep_alive", req(version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n"),
    ok(seen()), "versions", "RFC 9112 §9.3 (keep-alive on 1.0)")
add("http10_keep_alive_pipelined",
    req(version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n")
    + req(target=b"/edge/{id}/after", version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n"),
    ok(seen(), SEEN_GOOD), ("versions", "x_pipeline"), "RFC 9112 §9.3")
add("http09_bare", b"GET /edge/{id}/a\r\n\r\n", refuse(400), "http09", "RFC 9112 §3 (no HTTP-version)")
add("http09_with_headers", b"GET /edge/{id}/a\r\n" + H + b"\r\n", refuse(400), "http09",
    "issue 15: a request line with no HTTP-version followed by headers was routed")
add("http09_explicit", req(version=b"HTTP/0.9"), refuse(400), "http09", "RFC 9112 §2.3")
add("http09_then_request", b"GET /edge/{id}/a\r\n\r\n" + SMUGGLED, refuse(400), ("http09", "x_pipeline"),
    "HTTP Garden: HTTP/0.9 then a pipelined request")
add("http2_version", req(version=b"HTTP/2.0"), refuse(505), "http2", "RFC 9110 §15.6.6")
add("h2_prior_knowledge_preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", refuse(505), "http2",
    "RFC 9113 §3.3 preface sent to an HTTP/1.1 server", alts=(refuse(400),))
add("version_1_2", req(version=b"HTTP/1.2"), refuse(505), "other_version", "RFC 9110 §15.6.6")
add("version_3_0", req(version=b"HTTP/3.0"), refuse(505), "other_version", "RFC 9110 §15.6.6")
add("version_1_10", req(version=b"HTTP/1.10"), refuse(400), "other_version",
    "HTTP Garden: versions read as their longest valid prefix")
add("version_lowercase", req(version=b"http/1.1"), refuse(400), "other_version",
    "RFC 9112 §2.3 (HTTP-name is case-sensitive)")
add("version_no_minor", req(version=b"HTTP/1"), refuse(400), "other_version", "RFC 9112 §2.3")
add("version_overflow", req(version=b"HTTP/4294967295.255"), refuse(400), "other_version",
    "HTTP Garden: 8-bit overflow in version numbers", alts=(refuse(505),))
add("version_trailing_garbage", req(version=b"HTTP/1.1x"), refuse(400), "other_version",
    "RFC 9112 §3")
add("method_unknown", req(method=b"FOO"), refuse(400), "method", "RFC 9110 §9.1")
add("method_lowercase", req(method=b"get"), refuse(400), "method",
    "RFC 9110 §9.1 (methods are case-sensitive)")
add("method_separators", req(method=b'G=":<>(e),[T];?'), refuse(400), "method",
    "HTTP Garden: methods read as their longest valid prefix")
add("method_nul", req(method=b"\x00"), refuse(400), "method", "HTTP Garden: unvalidated methods")
add("method_utf8", req(method=b"G\xc3\x89T"), refuse(400), "method", "RFC 9110 §5.6.2 (token)")
add("method_propfind", req(method=b"PROPFIND"), refuse(400), "method",
    "RFC 4918 method no endpoint declares",
    alts=(refuse(405, closed=False),))
add("method_trace", req(method=b"TRACE"), refuse(405, closed=False), "method",
    "cross-site tracing: TRACE must never reach a service", alts=(refuse(400),))
add("connect_authority_form", req(method=b"CONNECT", target=b"gw.test:443",
                                  headers=b"X-Edge-Id: {id}\r\n"),
    refuse(405), "connect", "RFC 9110 §9.3.6", resp_absent=("allow",))
add("connect_origin_form", req(method=b"CONNECT"), refuse(405), "connect", "RFC 9110 §9.3.6",
    alts=(refuse(400),), resp_absent=("allow",))
add("connect_with_body", req(method=b"CONNECT", target=b"gw.test:443",
                             headers=b"X-Edge-Id: {id}\r\nContent-Length: 5\r\n", body=b"hello"),
    refuse(405), "connect", "RFC 9110 §9.3.6 (a CONNECT body has no defined meaning)",
    alts=(refuse(400),), resp_absent=("allow",))
add("url_too_long", req(target=b"/edge/{id}/" + b"a" * (URL_LIMIT + 100)), refuse(414),
    "url_long", "RFC 9112 §3 / RFC 9110 §15.5.15")
add("url_query_too_long", req(target=b"/edge/{id}/a?q=" + b"b" * (URL_LIMIT + 100)), refuse(414),
    "url_long", "RFC 9110 §15.5.15 (the query counts)")
_long = b"/edge/{id}/" + b"a" * (URL_LIMIT - 200)
add("url_under_limit", req(target=_long), ok(seen(path=_long.decode())), "url_long",
    "RFC 9112 §3 (8000-octet guidance)")
add("origin_query", req(target=b"/edge/{id}/a?x=1&y=%20z"), ok(seen(query=b"x=1&y=%20z")),
    "origin_form", "RFC 9112 §3.2.1")
add("origin_dot_segments", req(target=b"/edge/{id}/x/../a/./"), ok(seen(path="/edge/{id}/a/")),
    "origin_form", "RFC 3986 §5.2.4; docs/routing.md rule 8")
add("origin_double_slashes", req(target=b"//edge//{id}///a"), ok(seen()), "origin_form",
    "docs/routing.md rule 9")
add("origin_encoded_slash", req(target=b"/edge/{id}/a%2Fb"), ok(seen(path="/edge/{id}/a%2Fb")),
    "origin_form", "RFC 3986 §2.2; docs/routing.md rule 5")
add("origin_encoded_dots", req(target=b"/edge/{id}/x/%2e%2E/a"), ok(seen()), "origin_form",
    "path confusion: encoded dot-segments")
add("absolute_form_http", req(target=b"http://gw.test/edge/{id}/a", headers=b"", host=False)
    .replace(b"\r\n\r\n", b"\r\nHost: other.test\r\n\r\n", 1),
    ok(seen(headers={"host": "gw.test", "x-forwarded-host": "gw.test"})), "absolute_form",
    "RFC 9112 §3.2.2 (the target's authority replaces Host)")
add("absolute_form_https_port", req(target=b"https://gw.test:8443/edge/{id}/a?q=1", host=False,
                                    headers=b"Host: gw.test:8443\r\n"),
    ok(seen(query=b"q=1", headers={"host": "gw.test:8443", "x-forwarded-host": "gw.test:8443"})),
    "absolute_form", "RFC 9112 §3.2.2")
# RFC 9112 §3.2: a Host with an invalid value is a 400, whatever the target's form; it was
# ignored in absolute-form and the request routed (found by differential fuzzing: nginx 400).
add("absolute_form_invalid_host", req(target=b"http://gw.test/edge/{id}/a", host=False,
                                      headers=b"Host: /evil.test\r\n"),
    refuse(400), ("absolute_form", "bad_host"), "RFC 9112 §3.2 (MUST 400)")
add("absolute_form_host_with_tab", req(target=b"http://gw.test/edge/{id}/a", host=False,
                                       headers=b"Host: gw.t\test\r\n"),
    refuse(400), ("absolute_form", "bad_host"), "RFC 9112 §3.2 (MUST 400)")
add("absolute_form_without_host", req(target=b"http://gw.test/edge/{id}/a", host=False),
    refuse(400), ("absolute_form", "no_host"), "RFC 9112 §3.2 (Host is required on 1.1 anyway)")
add("absolute_form_scheme_uppercase", req(target=b"HTTP://gw.test/edge/{id}/a"),
    ok(seen(headers={"host": "gw.test"})), "absolute_form",
    "RFC 3986 §3.1 (schemes are case-insensitive)", alts=(refuse(400),))
add("absolute_form_ftp", req(target=b"ftp://gw.test/edge/{id}/a"), refuse(400), "absolute_bad",
    "RFC 9112 §3.2.2")
add("absolute_form_userinfo", req(target=b"http://user:pw@gw.test/edge/{id}/a"), refuse(400),
    "absolute_bad", "RFC 9110 §4.2.4 (userinfo is deprecated, invalid in http URIs)")
add("absolute_form_bad_port", req(target=b"http://gw.test:99999/edge/{id}/a"), refuse(400),
    "absolute_bad", "RFC 3986 §3.2.3")
add("absolute_form_empty_authority", req(target=b"http:///edge/{id}/a"), refuse(400),
    "absolute_bad", "RFC 9110 §4.2.1 (http URIs need a host)")
add("absolute_form_host_with_at", req(target=b"http://gw.test@evil.test/edge/{id}/a"),
    refuse(400), "absolute_bad", "SSRF parser differential: userinfo@host")
add("options_asterisk", req(method=b"OPTIONS", target=b"*", headers=b"X-Edge-Id: {id}\r\n"),
    refuse(400), "asterisk_authority", "RFC 9112 §3.2.4")
add("get_asterisk", req(target=b"*", headers=b"X-Edge-Id: {id}\r\n"), refuse(400),
    "asterisk_authority", "RFC 9112 §3.2.4 (only OPTIONS)")
add("authority_form_get", req(target=b"gw.test:443", headers=b"X-Edge-Id: {id}\r\n"),
    refuse(400), "asterisk_authority", "RFC 9112 §3.2.3 (only CONNECT)")
add("fragment_in_path", req(target=b"/edge/{id}/a#frag"), refuse(400), "fragment",
    "RFC 9112 §3.2 (origin-form has no fragment)")
add("fragment_after_query", req(target=b"/edge/{id}/a?x=1#frag"), refuse(400), "fragment",
    "RFC 9112 §3.2")
add("fragment_hides_path", req(target=b"/edge/{id}/a#/../../secure/x"), refuse(400), "fragment",
    "path confusion through a fragment")
add("path_nul_kept", req(target=b"/edge/{id}/a%00b") + GOOD, refuse(400, 200, closed=False,
                                                              seen=(SEEN_GOOD,)),
    "bad_path", "docs/routing.md rule 3")
add("path_overlong_utf8_kept", req(target=b"/edge/{id}/%C0%AE%C0%AE/x") + GOOD,
    refuse(400, 200, closed=False, seen=(SEEN_GOOD,)), "bad_path", "docs/routing.md rule 4")
add("path_bad_percent_kept", req(target=b"/edge/{id}/%zz") + GOOD,
    refuse(400, 200, closed=False, seen=(SEEN_GOOD,)), "bad_path", "RFC 3986 §2.1")
add("path_encoded_crlf_kept", req(target=b"/edge/{id}/a%0d%0aX-Canary:%201") + GOOD,
    refuse(400, 200, closed=False, seen=(SEEN_GOOD,)), "bad_path",
    "header injection through a decoded path")
add("request_line_double_space", b"GET  /edge/{id}/a HTTP/1.1\r\n" + H + b"\r\n", refuse(400),
    "x_request_line", "RFC 9112 §3 (single SP; lenient whitespace parsing MAY be done)",
    alts=(ok(seen()),))
add("request_line_tab", b"GET\t/edge/{id}/a HTTP/1.1\r\n" + H + b"\r\n", refuse(400),
    "x_request_line", "RFC 9112 §3")
add("request_line_bare_lf_separator", b"GET /edge/{id}/a\nHTTP/1.1\r\n" + H + b"\r\n", refuse(400),
    "x_request_line", "HTTP Garden: \\n as request-line whitespace")
add("request_line_leading_space", b" " + req(), refuse(400), "x_request_line", "RFC 9112 §3")
add("request_line_leading_crlf", b"\r\n" + req(), ok(seen()), "x_request_line",
    "RFC 9112 §2.2 (SHOULD ignore one empty line before the request-line)",
    alts=(refuse(400),))
add("request_target_relative", req(target=b"edge/{id}/a"), refuse(400), "x_request_line",
    "RFC 9112 §3.2", alts=(refuse(400, closed=False),))
add("request_target_raw_space", req(target=b"/edge/{id}/a b"), refuse(400), "x_request_line",
    "RFC 9112 §3.2")
add("request_target_ctl", req(target=b"/edge/{id}/a\x01b"), refuse(400), "x_request_line",
    "RFC 9112 §3.2", alts=(refuse(400, closed=False),))

# ====================================================================== Host

add("host_missing_11", req(host=False), refuse(400), "no_host", "RFC 9112 §3.2")
add("host_missing_11_post", post(host=False), refuse(400), "no_host", "RFC 9112 §3.2")
add("host_two_equal", req(headers=H), refuse(400), "two_hosts", "RFC 9112 §3.2")
add("host_two_different", req(headers=b"Host: evil.test\r\n"), refuse(400), "two_hosts",
    "RFC 9112 §3.2 (host confusion)")
add("host_two_http10", req(version=b"HTTP/1.0", headers=b"Host: evil.test\r\n"), refuse(400),
    "two_hosts", "RFC 9112 §3.2 (any version)")
add("host_two_case_variants", req(headers=b"HOST: evil.test\r\n"), refuse(400), "two_hosts",
    "RFC 9110 §5.1 (field names are case-insensitive)")
for _name, _value, _src in (
        ("empty", b"", "RFC 9112 §3.2"),
        ("userinfo", b"u@gw.test", "RFC 9110 §7.2"),
        ("path", b"gw.test/x", "RFC 9110 §7.2"),
        ("space", b"gw test", "RFC 9110 §7.2"),
        ("list_space", b"a.test, b.test", "RFC 9110 §7.2 (Host is a singleton)"),
        ("list", b"a.test,b.test", "RFC 9110 §7.2"),
        ("port_0", b"gw.test:0", "RFC 9110 §4.2.1"),
        ("port_99999", b"gw.test:99999", "issue 15: port 99999 was routed"),
        ("port_abc", b"gw.test:abc", "RFC 3986 §3.2.3"),
        ("port_plus", b"gw.test:+80", "RFC 3986 §3.2.3"),
        ("ipv6_unbracketed", b"::1", "RFC 3986 §3.2.2"),
        ("too_long", b"h" * 300, "RFC 1035 §2.3.4 (255 octets)"),
        ("backslash", b"gw.test\\evil.test", "parser differential"),
        ("bracket_unclosed", b"[::1", "RFC 3986 §3.2.2")):
    add(f"host_{_name}", req(host=False, headers=b"Host: " + _value + b"\r\n"), refuse(400),
        "bad_host", _src)
add("host_ipv6_bracketed", req(host=False, headers=b"Host: [::1]:8080\r\n"),
    ok(seen(headers={"host": "[::1]:8080"})), "bad_host", "RFC 3986 §3.2.2 (valid)")
add("host_ipv4_port", req(host=False, headers=b"Host: 127.0.0.1:8080\r\n"),
    ok(seen(headers={"host": "127.0.0.1:8080"})), "bad_host", "RFC 9110 §7.2 (valid)")
add("host_leading_tab", req(host=False, headers=b"Host:\tgw.test\r\n"),
    ok(seen(headers={"host": "gw.test"})), "bad_host", "RFC 9110 §5.5 (HTAB is OWS before the value)")
add("host_trailing_space", req(host=False, headers=b"Host: gw.test \r\n"),
    ok(seen(headers={"host": "gw.test"})), "ows",
    "RFC 9110 §5.5 (OWS after the value is not part of it)")
# Any field, not only Host (found by differential fuzzing against nginx, which trims them):
# the service saw `x-api-key: k \t`.
add("value_trailing_ows", req(headers=b"X-Api-Key: k1 \t\r\nX-Note: a b\t \r\n"),
    ok(seen(headers={"x-api-key": "k1", "x-note": "a b"})), "ows",
    "RFC 9110 §5.5 (OWS after the value is not part of it)")
add("value_only_ows", req(headers=b"X-Api-Key: \t \r\n"),
    ok(seen(headers={"x-api-key": ""})), "ows", "RFC 9110 §5.5 (an empty value)")

# ====================================================================== header limits and syntax

add("header_bytes_over", req(headers=b"X-Big: " + b"b" * 17000 + b"\r\n"), refuse(431),
    "header_limits", "RFC 6585 §5")
add("header_count_over", req(headers=b"".join(b"X-H%d: v\r\n" % i for i in range(101))),
    refuse(431), "header_limits", "RFC 6585 §5")
add("header_count_under", req(headers=b"".join(b"X-H%d: v\r\n" % i for i in range(90))),
    ok(seen(headers={"x-h89": "v"})), "header_limits", "RFC 6585 §5 (under the limit)")
_bad = (
    ("space_before_colon_cl", b"Content-Length : 5\r\n", b"hello",
     "HTTP Garden: whitespace stripped from the end of names (CVE-2023-40518)"),
    ("space_before_colon_host", b"X-A : 1\r\n", b"", "RFC 9112 §5.1"),
    ("tab_before_colon_te", b"Transfer-Encoding\t: chunked\r\n", HELLO_CHUNKED,
     "desync-guardian ambiguous: TE with a trailing tab in the name"),
    ("obs_fold", b"X-A: 1\r\n folded\r\n", b"", "RFC 9112 §5.2"),
    ("obs_fold_tab", b"X-A: 1\r\n\tfolded\r\n", b"", "RFC 9112 §5.2"),
    ("obs_fold_te", b"X-A: 1\r\n Transfer-Encoding: chunked\r\n", HELLO_CHUNKED,
     "desync-guardian severe: multiline headers hiding Transfer-Encoding"),
    ("bare_lf_in_header", b"X-A: 1\nX-B: 2\r\n", b"", "RFC 9112 §2.2 (llhttp strict)"),
    ("bare_cr_in_value", b"X-A: va\rlue\r\n", b"", "RFC 9110 §5.5"),
    ("bare_cr_terminator", b"X-A: 1\rX-Canary: 1\r\n", b"", "HTTP Garden: \\r as a line terminator"),
    ("nul_in_value", b"X-A: a\x00b\r\n", b"", "RFC 9110 §5.5"),
    ("nul_at_value_end", b"X-A: a\x00\r\n", b"", "HTTP Garden: \\x00 stripped from value ends"),
    ("nul_in_name", b"X-A\x00: b\r\n", b"", "desync-guardian severe: \\0 in a name"),
    ("space_in_name", b"Transfer Encoding: chunked\r\n", HELLO_CHUNKED,
     "desync-guardian ambiguous: TE with a space in the middle"),
    ("no_colon", b"Content-Length 5\r\n", b"hello", "HTTP Garden: names separated by space alone"),
    ("empty_name", b": x\r\n", b"", "HTTP Garden: empty header names"),
    ("colon_only", b":\r\n", b"", "HTTP Garden: header block truncated at ':'"),
    ("name_non_ascii", b"\xefoo: bar\r\n", b"", "HTTP Garden: non-ASCII bytes in names"),
    ("name_x85_cl", b"Content-Length\x85: 5\r\n", b"hello",
     "HTTP Garden: \\x85 stripped from the ends of names"),
    ("name_continued", b"Transfer-\r\nEncoding: chunked\r\n", HELLO_CHUNKED,
     "HTTP Garden: names continued across lines"),
    ("name_ctl_prefix_te", b"\x01Transfer-Encoding: chunked\r\n", HELLO_CHUNKED,
     "desync-guardian bad-header-characters"),
)
for _name, _hdr, _body, _src in _bad:
    add(_name, req(method=b"POST" if _body else b"GET", headers=_hdr, body=_body), refuse(400),
        "bad_syntax", _src)
add("first_header_leading_space", b"GET /edge/{id}/a HTTP/1.1\r\n Host: gw.test\r\n\r\n",
    refuse(400), "bad_syntax", "RFC 9112 §2.2 (whitespace before the first field line)")
add("first_header_leading_tab_cl", b"POST /edge/{id}/a HTTP/1.1\r\n\tContent-Length: 5\r\n" + H
    + b"\r\nhello", refuse(400), "bad_syntax", "HTTP Garden: leading whitespace of the first name")
add("bare_lf_everywhere", b"GET /edge/{id}/a HTTP/1.1\nHost: gw.test\n\n", refuse(400),
    "bad_syntax", "RFC 9112 §2.2 (llhttp strict)")
add("bare_cr_end_of_head", b"GET /edge/{id}/a HTTP/1.1\r\n" + H + b"\rZ" + SMUGGLED,
    refuse(400), ("bad_syntax", "x_pipeline"), "HTTP Garden: head ended on \\r\\n\\rX")

# ====================================================================== Content-Length

for _name, _hdr, _body, _src in (
        ("cl_duplicate_equal", b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello",
         "RFC 9112 §6.3 (5); desync-guardian severe"),
        ("cl_duplicate_different", b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!",
         "HTTP Garden: conflicting Content-Length"),
        ("cl_list_equal", b"Content-Length: 5, 5\r\n", b"hello", "RFC 9110 §8.6"),
        ("cl_plus", b"Content-Length: +5\r\n", b"hello", "HTTP Garden: int() parsing"),
        ("cl_minus", b"Content-Length: -1\r\n", b"hello", "HTTP Garden: negative lengths"),
        ("cl_hex", b"Content-Length: 0x5\r\n", b"hello", "HTTP Garden: 0x-prefixed lengths"),
        ("cl_inner_space", b"Content-Length: 1 0\r\n", b"helloworld", "desync-guardian severe"),
        ("cl_decimal_point", b"Content-Length: 5.0\r\n", b"hello", "desync-guardian severe"),
        ("cl_empty", b"Content-Length: \r\n", b"", "HTTP Garden: empty Content-Length"),
        ("cl_empty_then_value", b"Content-Length: \r\nContent-Length: 5\r\n", b"hello",
         "HTTP Garden: empty Content-Length first"),
        ("cl_overflow_64", b"Content-Length: 18446744073709551616\r\n", b"hello",
         "desync-guardian severe: 64-bit overflow"),
        ("cl_trailing_letter", b"Content-Length: 5Z\r\n", b"hello",
         "HTTP Garden: longest valid prefix"),
        ("cl_vertical_tab", b"Content-Length: 5\x0b\r\n", b"hello", "desync-guardian bad characters"),
        ("cl_underscore_digits", b"Content-Length: 1_0\r\n", b"helloworld", "HTTP Garden: int()"),
        ("cl_and_te", b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\nG",
         "RFC 9112 §6.1 (CL.TE)"),
        ("te_and_cl", b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
         b"8\r\nSMUGGLED\r\n0\r\n\r\n", "RFC 9112 §6.1 (TE.CL)"),
        ("cl_and_te_gzip", b"Content-Length: 5\r\nTransfer-Encoding: gzip\r\n", b"hello",
         "desync-guardian ambiguous: TE and CL"),
        ("cl_and_te_comma", b"Transfer-Encoding: ,chunked\r\nContent-Length: 5\r\n",
         b"0\r\n\r\n", "HTTP Garden: ',chunked' with Content-Length")):
    add(_name, post(b"", headers=_hdr).replace(b"Content-Length: 0\r\n", b"", 1) + _body,
        refuse(400), "cl_bad", _src)
add("cl_te_classic_smuggle", req(b"POST", headers=b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
                                 body=b"5c\r\n" + SMUGGLED + b"\r\n0\r\n\r\n"),
    refuse(400), ("cl_bad", "x_pipeline"), "PortSwigger CL.TE desync")
add("cl_leading_zeros", post(b"hello", headers=b"").replace(b"Content-Length: 5", b"Content-Length: 005"),
    ok(seen("POST", body=b"hello")), "cl_bad", "RFC 9110 §8.6 (1*DIGIT: 005 is 5)",
    alts=(refuse(400),))
add("cl_octal_trap", post(b"0123456789").replace(b"Content-Length: 10", b"Content-Length: 010"),
    ok(seen("POST", body=b"0123456789")), "cl_bad", "HTTP Garden: strtoll base 0 reads 010 as 8",
    alts=(refuse(400),))
add("cl_ows", post(b"hello").replace(b"Content-Length: 5", b"Content-Length:\t 5 "),
    ok(seen("POST", body=b"hello")), "cl_bad", "RFC 9110 §5.5 (OWS is not part of the value)")
add("cl_zero_pipelined", post(b"") + GOOD, ok(seen("POST"), SEEN_GOOD), ("cl_bad", "x_pipeline"),
    "HTTP Garden: pipelined requests after Content-Length: 0")
add("cl_underscore_name", req(headers=b"Content_Length: 5\r\n") + b"hello\r\n\r\n",
    refuse(200, 400, seen=(seen(),)), ("cl_bad", "x_pipeline"),
    "desync-guardian ambiguous: Content_Length is another field")
add("cl_over_limit", req(b"POST", headers=b"Content-Length: %d\r\n" % (BODY_LIMIT * 4),
                         body=b"x" * 1000), refuse(413), ("cl_limit", "refused_body"),
    "RFC 9110 §15.5.14 (decided on the head)")
add("cl_over_limit_expect", req(b"POST", headers=b"Content-Length: %d\r\nExpect: 100-continue\r\n"
                                % (BODY_LIMIT + 1), body=b"x" * 1000),
    refuse(413), ("cl_limit", "expect_continue"), "RFC 9110 §10.1.1 (no 100 before a refusal)",
    wait_after_head=True)
add("cl_huge_limit", req(b"POST", headers=b"Content-Length: 99999999999999\r\n", body=b"x"),
    refuse(413), "cl_limit", "RFC 9110 §15.5.14", alts=(refuse(400),))
add("cl_at_limit", post(b"x" * BODY_LIMIT), ok(seen("POST", body=b"x" * BODY_LIMIT)), "cl_limit",
    "RFC 9110 §8.6 (exactly the limit)")

# ====================================================================== Transfer-Encoding

add("te_http10_chunked", chunked(HELLO_CHUNKED, version=b"HTTP/1.0"), refuse(400), "te_10",
    "RFC 9112 §6.1")
add("te_http10_keepalive_smuggle",
    chunked(HELLO_CHUNKED, version=b"HTTP/1.0", headers=b"Connection: keep-alive\r\n") + SMUGGLED,
    refuse(400), ("te_10", "x_pipeline"), "issue 15: HTTP/1.0 chunked de-chunked on a kept connection")
add("te_http10_gzip", req(b"POST", version=b"HTTP/1.0", headers=b"Transfer-Encoding: gzip\r\n",
                          body=b"hello"), refuse(400), "te_10", "RFC 9112 §6.1")
add("te_chunked", chunked(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
    ok(seen("POST", body=b"hello world")), "te_chunked", "RFC 9112 §7.1")
add("te_chunked_upper", chunked(HELLO_CHUNKED).replace(b"chunked", b"CHUNKED"),
    ok(seen("POST", body=b"hello")), "te_chunked", "RFC 9112 §7 (codings are case-insensitive)")
add("te_chunked_mixed_case", chunked(HELLO_CHUNKED).replace(b"chunked", b"cHuNkEd"),
    ok(seen("POST", body=b"hello")), "te_chunked", "RFC 9112 §7")
add("te_chunked_empty", chunked(b"0\r\n\r\n"), ok(seen("POST")), "te_chunked", "RFC 9112 §7.1")
add("te_chunked_pipelined", chunked(HELLO_CHUNKED) + GOOD, ok(seen("POST", body=b"hello"), SEEN_GOOD),
    ("te_chunked", "x_pipeline"), "RFC 9112 §9.3")
add("te_chunked_on_get", chunked(HELLO_CHUNKED, method=b"GET"), ok(seen("GET", body=b"hello")),
    "te_chunked", "desync-guardian ambiguous: GET with a chunked body")
add("te_chunked_many_small", chunked(b"".join(b"1\r\n%c\r\n" % c for c in b"abcdefghij" * 5)
                                     + b"0\r\n\r\n"),
    ok(seen("POST", body=b"abcdefghij" * 5)), "te_chunked", "RFC 9112 §7.1")
add("te_chunked_leading_ows", chunked(HELLO_CHUNKED).replace(b": chunked", b":   chunked  "),
    ok(seen("POST", body=b"hello")), "te_chunked", "RFC 9110 §5.5 (OWS)", alts=(refuse(400),))
add("te_chunked_trailing_comma", chunked(HELLO_CHUNKED).replace(b": chunked", b": chunked,"),
    ok(seen("POST", body=b"hello")), "te_chunked",
    "RFC 9110 §5.6.1 (empty list elements are ignored)", alts=(refuse(400),))
add("te_chunked_leading_comma", chunked(HELLO_CHUNKED).replace(b": chunked", b": ,chunked"),
    ok(seen("POST", body=b"hello")), "te_chunked",
    "HTTP Garden: ',chunked' read as another coding", alts=(refuse(400),))
add("te_underscore_name", req(b"POST", headers=b"Transfer_Encoding: chunked\r\nContent-Length: 5\r\n",
                              body=b"hello"),
    ok(seen("POST", body=b"hello")), ("te_chunked", "x_pipeline"),
    "desync-guardian ambiguous: Transfer_Encoding is another field (CL frames the body)")
for _name, _value in (("gzip_chunked", b"gzip, chunked"), ("deflate_chunked", b"deflate, chunked"),
                      ("compress_chunked", b"compress,chunked")):
    add(f"te_{_name}", chunked(HELLO_CHUNKED).replace(b": chunked", b": " + _value), refuse(501),
        "te_coding", "RFC 9112 §6.1 (501 for a coding not understood); issue 15")
add("te_identity_chunked", chunked(HELLO_CHUNKED).replace(b": chunked", b": identity, chunked"),
    refuse(501), "te_coding", "RFC 9112 §7 (identity is no longer a coding)", alts=(refuse(400),))
for _name, _value, _src in (
        ("gzip", b"gzip", "RFC 9112 §6.3 (3): chunked must be final"),
        ("chunked_gzip", b"chunked, gzip", "RFC 9112 §6.3 (3)"),
        ("xchunked", b"xchunked", "desync-guardian severe: unknown TE xchunked"),
        ("quoted", b'"chunked"', "TE obfuscation: a quoted coding"),
        ("vertical_tab", b"chunked\x0b", "TE obfuscation: chunked\\x0b"),
        ("ctl_x01", b"\x01chunked", "desync-guardian bad-header-characters"),
        ("nbsp", b"chunked\xa0", "HTTP Garden: \\xa0 stripped from values"),
        ("chunked_chunked", b"chunked, chunked", "RFC 9112 §7 (chunked at most once)"),
        ("empty", b"", "RFC 9112 §6.1"),
        ("identity", b"identity", "RFC 9112 §7"),
        ("chunked_semicolon", b"chunked;q=1", "TE obfuscation: parameters on chunked")):
    add(f"te_{_name}", chunked(HELLO_CHUNKED).replace(b": chunked", b": " + _value, 1),
        refuse(400), "te_not_last", _src, alts=(refuse(501),))
add("te_two_lines_chunked", chunked(HELLO_CHUNKED, headers=b"Transfer-Encoding: chunked\r\n"),
    refuse(400), "te_not_last", "HTTP Garden: several TE: chunked lines")
add("te_two_lines_identity", chunked(HELLO_CHUNKED, headers=b"Transfer-Encoding: identity\r\n"),
    refuse(400), "te_not_last", "desync-guardian: two TE lines")
add("te_two_lines_gzip_first",
    req(b"POST", headers=b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        body=HELLO_CHUNKED), refuse(400), "te_not_last", "RFC 9112 §6.1", alts=(refuse(501),))

# ====================================================================== chunk syntax

_chunk_bad = (
    ("chunk_size_overflow", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n", "integer overflow"),
    ("chunk_size_0x", b"0x5\r\nhello\r\n0\r\n\r\n", "HTTP Garden: strtoll(,,16) prefixes"),
    ("chunk_size_negative", b"-5\r\nhello\r\n0\r\n\r\n", "HTTP Garden: negative chunk sizes"),
    ("chunk_size_plus", b"+5\r\nhello\r\n0\r\n\r\n", "HTTP Garden: int() chunk sizes"),
    ("chunk_size_underscore", b"0_2e\r\n\r\n" + SMUGGLED, "HTTP Garden: 0_2e (CVE-2023-47627)"),
    ("chunk_size_empty", b"\r\n\r\n", "HTTP Garden: empty chunk size read as 0"),
    ("chunk_size_leading_space", b"   5\r\nhello\r\n0\r\n\r\n",
     "HTTP Garden: whitespace-prefixed chunk sizes"),
    ("chunk_size_trailing_junk", b"5these-bytes-are-not-hex\r\nhello\r\n0\r\n\r\n",
     "HTTP Garden: longest valid prefix re-emitted"),
    ("chunk_data_too_long", b"3\r\nabcdef\r\n0\r\n\r\n", "RFC 9112 §7.1"),
    ("chunk_missing_crlf", b"5\r\nhelloX0\r\n\r\n", "RFC 9112 §7.1"),
    ("chunk_bare_lf", b"5\nhello\n0\n\n", "HTTP Garden: bare \\n as chunk line terminator"),
    ("chunk_lf_after_data", b"a\r\n0123456789\n0\r\n\r\n", "HTTP Garden: \\n after chunk data"),
    ("chunk_cr_then_any", b"5\r\r;ABCD\r\nhello\r\n0\r\n\r\n", "HTTP Garden: chunk line ended on \\rX"),
    ("chunk_invalid_then_request", b"INVALID!!!\r\n" + SMUGGLED,
     "HTTP Garden: the next message found after an invalid chunk"),
    ("chunk_last_no_final_crlf", b"0\r\n" + SMUGGLED[:-2],
     "HTTP Garden: chunked body ended on \\r\\nXX"),
    ("chunk_size_hex_uppercase_x", b"0X5\r\nhello\r\n0\r\n\r\n", "TE obfuscation: 0X prefix"),
)
for _name, _body, _src in _chunk_bad:
    add(_name, chunked(_body), refuse(400, seen=PARTIAL), "x_chunk_syntax", _src)
add("chunk_crlf_inside_body_ok",
    chunked(b"17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n0\r\n\r\n"),
    ok(seen("POST", body=b"0\r\n\r\nGET / HTTP/1.1\r\n\r\n")), ("te_chunked", "x_pipeline"),
    "HTTP Garden transducer bug: a request inside chunk data")
add("chunk_ext_simple", chunked(b"5;a=b\r\nhello\r\n0\r\n\r\n"), ok(seen("POST", body=b"hello")),
    "chunk_ext", "RFC 9112 §7.1.1")
add("chunk_ext_quoted", chunked(b'5;a="b;c=d"\r\nhello\r\n0;x="y"\r\n\r\n'),
    ok(seen("POST", body=b"hello")), "chunk_ext", "RFC 9112 §7.1.1 (quoted-string)")
add("chunk_ext_bare_name", chunked(b"5;ext\r\nhello\r\n0\r\n\r\n"), ok(seen("POST", body=b"hello")),
    "chunk_ext", "RFC 9112 §7.1.1")
add("chunk_ext_bws", chunked(b"5 ;a=b\r\nhello\r\n0\r\n\r\n"), ok(seen("POST", body=b"hello")),
    "chunk_ext", "RFC 9112 §7.1.1 (BWS before ';')", alts=(refuse(400, seen=PARTIAL),))
add("chunk_ext_huge", chunked(b"5;a=" + b"x" * 20000 + b"\r\nhello\r\n0\r\n\r\n"),
    refuse(400, seen=PARTIAL), "chunk_ext_budget", "issue 15: unbounded chunk extensions (§7.1.1)")
add("chunk_ext_many", chunked(b"".join(b"1;e=" + b"y" * 120 + b"\r\n%c\r\n" % c
                                       for c in b"abcdefghij" * 20) + b"0\r\n\r\n"),
    refuse(400, seen=PARTIAL), "chunk_ext_budget", "RFC 9112 §7.1.1 (overhead counted over the body)")
add("chunk_ext_bare_cr", chunked(b"5;a=b\rc\r\nhello\r\n0\r\n\r\n"), refuse(400, seen=PARTIAL),
    "chunk_ext", "HTTP Garden: \\r forwarded inside chunk extensions")
add("chunk_ext_quoted_crlf", chunked(b'5;a="x\r\nhello\r\n0\r\n\r\n'), refuse(400, seen=PARTIAL),
    "chunk_ext", "RFC 9112 §7.1.1 (no CR/LF in a quoted-string)")
add("chunked_over_limit", chunked(b"".join(b"%x\r\n" % 14000 + b"z" * 14000 + b"\r\n"
                                           for _ in range(5)) + b"0\r\n\r\n"),
    refuse(413, seen=PARTIAL), "chunked_limit", "RFC 9110 §15.5.14 (found while streaming)")
add("chunked_over_limit_streaming_endpoint",
    chunked(b"".join(b"%x\r\n" % 14000 + b"z" * 14000 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n",
            target=b"/stream/{id}/in"),
    refuse(413, seen=PARTIAL), "chunked_limit", "RFC 9110 §15.5.14")
add("chunked_over_limit_one_chunk", chunked(b"%x\r\n" % (BODY_LIMIT + 10) + b"q" * (BODY_LIMIT + 10)
                                            + b"\r\n0\r\n\r\n"),
    refuse(413, seen=PARTIAL), "chunked_limit", "RFC 9110 §15.5.14 (a chunk size over the limit)")

# ====================================================================== trailers

_TRAILER_BASE = b"5\r\nhello\r\n0\r\n"
add("trailer_authorization_anonymous", chunked(_TRAILER_BASE + b"Authorization: Bearer {bearer}\r\n\r\n"),
    ok(seen("POST", body=b"hello", absent=("authorization",))), "trailers",
    "RFC 9110 §6.5.1, RFC 9112 §7.1.2: trailers never merged")
add("trailer_authorization_secure", chunked(_TRAILER_BASE + b"Authorization: Bearer {bearer}\r\n\r\n",
                                            target=b"/secure/{id}/a"),
    refuse(401), ("trailers", "refused_body"),
    "issue 15: credentials in the trailer authenticated a request")
add("trailer_dpop_secure", chunked(_TRAILER_BASE + b"Authorization: DPoP {dpop_token}\r\n"
                                   b"DPoP: {dpop_proof}\r\n\r\n", target=b"/secure/{id}/a"),
    refuse(401), ("trailers", "refused_body"), "issue 15: Authorization + DPoP only in the trailer",
    dpop=("POST", "/secure/{id}/a"))
add("trailer_host", chunked(_TRAILER_BASE + b"Host: evil.test\r\n\r\n"),
    ok(seen("POST", body=b"hello", headers={"host": "gw.test", "x-forwarded-host": "gw.test"})),
    "trailers", "issue 15: a trailer Host became X-Forwarded-Host")
add("trailer_canary", chunked(_TRAILER_BASE + b"X-Canary: 1\r\nX-Other: 2\r\n\r\n"),
    ok(seen("POST", body=b"hello", absent=("x-other",))), "trailers", "RFC 9112 §7.1.2")
add("trailer_content_length", chunked(_TRAILER_BASE + b"Content-Length: 50\r\n\r\n") + GOOD,
    refuse(400, seen=PARTIAL), ("trailer_framing", "x_pipeline"),
    "smuggling: framing fields in the trailer (RFC 9110 §6.5.1)",)
add("trailer_transfer_encoding", chunked(_TRAILER_BASE + b"Transfer-Encoding: chunked\r\n\r\n") + GOOD,
    refuse(400, seen=PARTIAL), ("trailer_framing", "x_pipeline"),
    "smuggling: framing fields in the trailer (RFC 9110 §6.5.1)",)
add("trailer_looks_like_request", chunked(b"0\r\nX:POST /edge/{id}/SMUGGLED HTTP/1.1\r\n\r\n"),
    ok(seen("POST", absent=("x",))), ("trailers", "x_pipeline"),
    "HTTP Garden: chunked bodies ended on \\r\\nXX (a valid trailer here)")
add("trailer_identity_spoof", chunked(_TRAILER_BASE + b"X-StellaOps-Tenant: evil\r\n\r\n",
                                      target=b"/secure/{id}/a",
                                      headers=b"Authorization: Bearer {bearer}\r\n"),
    ok(seen("POST", path="/secure/{id}/a", body=b"hello",
            headers={"x-stellaops-tenant": "t-1", "authorization": None})),
    ("trailers", "strip_identity"), "RFC 9112 §7.1.2; docs/auth.md")
add("trailer_second_authorization", chunked(_TRAILER_BASE + b"Authorization: Bearer forged\r\n\r\n",
                                            target=b"/secure/{id}/a",
                                            headers=b"Authorization: Bearer {bearer}\r\n"),
    ok(seen("POST", path="/secure/{id}/a", body=b"hello", headers={"authorization": None})),
    "trailers", "RFC 9110 §6.5.1 (a trailer Authorization is not a second header)")
add("trailer_too_big", chunked(_TRAILER_BASE + b"X-Big: " + b"t" * 20000 + b"\r\n\r\n"),
    refuse(431, seen=PARTIAL), "trailers", "issue 15: trailers counted against maxHeaderBytes",
    alts=(refuse(400, seen=PARTIAL),))
add("trailer_obs_fold", chunked(_TRAILER_BASE + b"X-A: 1\r\n folded\r\n\r\n"),
    refuse(400, seen=PARTIAL), "trailers", "RFC 9112 §5.2 in the trailer section")
add("trailer_bare_lf", chunked(_TRAILER_BASE + b"X-A: 1\n\r\n"), refuse(400, seen=PARTIAL),
    "trailers", "RFC 9112 §2.2 in the trailer section")
add("trailer_nul", chunked(_TRAILER_BASE + b"X-A: a\x00b\r\n\r\n"), refuse(400, seen=PARTIAL),
    "trailers", "RFC 9110 §5.5 in the trailer section")
add("trailer_declared", chunked(_TRAILER_BASE + b"X-Sig: abc\r\n\r\n", headers=b"Trailer: X-Sig\r\n"),
    ok(seen("POST", body=b"hello", absent=("x-sig", "trailer"))), "trailers", "RFC 9110 §6.6.2")

# ====================================================================== credentials (controls)

add("secure_bearer_header", req(target=b"/secure/{id}/a", headers=b"Authorization: Bearer {bearer}\r\n"),
    ok(seen(path="/secure/{id}/a", headers={"x-stellaops-tenant": "t-1"})), "x_auth",
    "control for trailer_authorization_secure")
add("secure_dpop_header_chunked",
    chunked(HELLO_CHUNKED, target=b"/secure/{id}/a",
            headers=b"Authorization: DPoP {dpop_token}\r\nDPoP: {dpop_proof}\r\n"),
    ok(seen("POST", path="/secure/{id}/a", body=b"hello", absent=("dpop",))), "x_auth",
    "control for trailer_dpop_secure", dpop=("POST", "/secure/{id}/a"))
add("secure_anonymous_get", req(target=b"/secure/{id}/a"), refuse(401, closed=False), "x_auth",
    "docs/auth.md (no body pending: the connection stays)")
add("secure_two_authorization",
    req(target=b"/secure/{id}/a",
        headers=b"Authorization: Bearer {bearer}\r\nAuthorization: Bearer {bearer}\r\n"),
    refuse(400, closed=False), "x_auth", "docs/auth.md (more than one Authorization)",
    alts=(refuse(400),))

# ====================================================================== Connection

add("connection_two_lines_named", req(headers=b"Connection: x-a\r\nConnection: x-b\r\n"
                                      b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"),
    ok(seen(headers={"x-c": "3"}, absent=("x-a", "x-b"))), "connection_lines",
    "RFC 9110 §7.6.1, §5.3 (issue 15: only the last line was honoured)")
add("connection_close_first_line", req(headers=b"Connection: close\r\nConnection: x-a\r\nX-A: 1\r\n"),
    ok(seen(absent=("x-a",)), closed=True), "connection_lines", "RFC 9110 §7.6.1")
add("connection_close_last_line", req(headers=b"Connection: x-a\r\nConnection: close\r\nX-A: 1\r\n"),
    ok(seen(absent=("x-a",)), closed=True), "connection_lines", "RFC 9110 §7.6.1")
add("connection_close_then_pipelined", req(headers=b"Connection: close\r\n") + SMUGGLED,
    ok(seen(), closed=True), ("connection_lines", "x_pipeline"), "RFC 9112 §9.6")
add("connection_mixed_list", req(headers=b"Connection: X-A , Close\r\nX-A: 1\r\n"),
    ok(seen(absent=("x-a",)), closed=True), "connection_lines", "RFC 9110 §7.6.1 (case-insensitive)")
add("connection_names_xff", req(headers=b"Connection: x-forwarded-for\r\nX-Forwarded-For: 6.6.6.6\r\n"),
    ok(seen()), ("connection_lines", "strip_client"), "hop-by-hop abuse: naming a gateway-set field")
add("connection_names_identity", req(target=b"/secure/{id}/a",
                                     headers=b"Authorization: Bearer {bearer}\r\n"
                                     b"Connection: x-stellaops-tenant\r\nConnection: x-stellaops-actor\r\n"),
    ok(seen(path="/secure/{id}/a", headers={"x-stellaops-tenant": "t-1", "x-stellaops-actor": "user-1"})),
    ("connection_lines", "strip_identity"), "hop-by-hop abuse: naming the gateway's identity headers")
add("connection_http10_keepalive_then_close", req(version=b"HTTP/1.0",
                                                  headers=b"Connection: keep-alive\r\nConnection: close\r\n"),
    ok(seen(), closed=True), "connection_lines", "RFC 9112 §9.3")
add("connection_upgrade_alone", req(headers=b"Connection: upgrade\r\n"), ok(seen()),
    "connection_lines", "RFC 9110 §7.8 (no Upgrade field: nothing to upgrade)")
add("connection_three_lines_pipelined",
    req(headers=b"Connection: x-a\r\nConnection: keep-alive\r\nConnection: x-b\r\n"
                b"X-A: 1\r\nX-B: 2\r\n") + GOOD,
    ok(seen(absent=("x-a", "x-b")), SEEN_GOOD), ("connection_lines", "x_pipeline"), "RFC 9110 §7.6.1")

# ====================================================================== Upgrade

_H2C_BODY = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
_WS = (b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
       b"Sec-WebSocket-Version: 13\r\n")
add("ws_upgrade", req(target=b"/ws/{id}/chat", headers=_WS),
    Expect((101,), False, (Seen("GET", "/ws/{id}/chat", None, headers={"upgrade": "websocket"},
                                cancelled=None),)),
    "ws_ok", "RFC 6455 §4.2; RFC 9110 §7.8")
add("ws_upgrade_post", req(b"POST", target=b"/ws/{id}/chat", headers=_WS + b"Content-Length: 0\r\n"),
    refuse(400), "ws_bad", "RFC 6455 §4.1 (the handshake is a GET)")
add("ws_upgrade_with_body", req(target=b"/ws/{id}/chat", headers=_WS + b"Content-Length: 5\r\n",
                                body=b"hello"), refuse(400), "ws_bad",
    "smuggling: a body in front of the WebSocket stream")
add("ws_upgrade_chunked_body", req(target=b"/ws/{id}/chat", headers=_WS + b"Transfer-Encoding: chunked\r\n",
                                   body=HELLO_CHUNKED), refuse(400), "ws_bad", "RFC 6455 §4.1")
add("ws_upgrade_plain_endpoint", req(headers=_WS), refuse(400), "upgrade_refused",
    "issue 15: a refused upgrade left a dead connection open")
add("ws_upgrade_plain_endpoint_pipelined", req(headers=_WS) + SMUGGLED, refuse(400),
    ("upgrade_refused", "x_pipeline"), "RFC 9110 §7.8")
add("ws_upgrade_http10", req(version=b"HTTP/1.0", headers=_WS),
    ok(seen(absent=("upgrade",)), closed=True), "upgrade_other",
    "RFC 9110 §7.8 (Upgrade in an HTTP/1.0 request MUST be ignored)", alts=(refuse(400),))
add("ws_endpoint_plain_get", req(target=b"/ws/{id}/chat") + GOOD,
    Expect((426, 200), False, (SEEN_GOOD,)), ("ws_plain", "x_pipeline"),
    "RFC 9110 §15.5.22 (426 Upgrade Required)")
add("h2c_upgrade_with_body", req(b"POST", headers=_H2C_BODY + b"Content-Length: 5\r\n", body=b"hello") + GOOD,
    ok(seen("POST", body=b"hello", absent=("upgrade", "http2-settings")), SEEN_GOOD),
    ("upgrade_other", "x_pipeline"),
    "curl --http2 -d: llhttp stops before the body of an upgrade; it must still be read as one")
add("h2c_upgrade_with_chunked_body", req(b"POST", headers=_H2C_BODY + b"Transfer-Encoding: chunked\r\n",
                                         body=HELLO_CHUNKED) + GOOD,
    ok(seen("POST", body=b"hello", absent=("upgrade",)), SEEN_GOOD), ("upgrade_other", "x_pipeline"),
    "an ignored upgrade with a chunked body")
_H2C = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
add("h2c_upgrade", req(headers=_H2C), ok(seen(absent=("upgrade", "http2-settings"))), "upgrade_other",
    "RFC 9110 §7.8; issue 15 (curl --http2, Java HttpClient)")
add("h2c_upgrade_no_connection", req(headers=b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
    ok(seen(absent=("upgrade", "http2-settings"))), "upgrade_other",
    "RFC 9110 §7.8 (Upgrade not listed in Connection)")
add("h2c_upgrade_pipelined", req(headers=_H2C) + GOOD,
    ok(seen(absent=("upgrade", "http2-settings")), SEEN_GOOD), ("upgrade_other", "x_pipeline"),
    "llhttp stops at an upgrade: what follows must still be HTTP/1.1")
add("h2c_upgrade_post_body", post(b"hello", headers=_H2C), ok(seen("POST", body=b"hello")),
    "upgrade_other", "RFC 9110 §7.8 (with a body)")
add("upgrade_other_protocol", req(headers=b"Connection: upgrade\r\nUpgrade: foo/1.0\r\n"),
    ok(seen(absent=("upgrade",))), "upgrade_other", "RFC 9110 §7.8")
add("upgrade_tls", req(headers=b"Connection: Upgrade\r\nUpgrade: TLS/1.2\r\n"),
    ok(seen(absent=("upgrade",))), "upgrade_other", "RFC 2817 §3.2")
add("upgrade_websocket_h2c_list",
    req(headers=b"Connection: Upgrade\r\nUpgrade: h2c, websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"),
    refuse(400), ("upgrade_refused",), "RFC 9110 §7.8 (a list naming websocket, plain endpoint)",
    alts=(ok(seen(absent=("upgrade",))),))

# ====================================================================== Expect

_EXP = b"Expect: 100-continue\r\n"
add("expect_continue_anonymous", post(b"hello", headers=_EXP), ok(seen("POST", body=b"hello"),
                                                                  statuses=(100, 200)),
    "expect_continue", "RFC 9110 §10.1.1", wait_after_head=True)
add("expect_continue_chunked", chunked(HELLO_CHUNKED, headers=_EXP),
    ok(seen("POST", body=b"hello"), statuses=(100, 200)), "expect_continue", "RFC 9110 §10.1.1",
    wait_after_head=True)
add("expect_continue_secure_authenticated", post(b"hello", target=b"/secure/{id}/a",
                                                 headers=_EXP + b"Authorization: Bearer {bearer}\r\n"),
    ok(seen("POST", path="/secure/{id}/a", body=b"hello"), statuses=(100, 200)), "expect_continue",
    "RFC 9110 §10.1.1", wait_after_head=True)
add("expect_continue_secure_anonymous", post(b"hello", target=b"/secure/{id}/a", headers=_EXP),
    refuse(401), ("expect_continue", "refused_body"),
    "issue 15: 100 Continue was sent before authentication", wait_after_head=True)
add("expect_continue_unknown_route", post(b"x" * 20000, target=b"/nowhere/{id}/a", headers=_EXP),
    refuse(404), ("expect_continue", "refused_body"), "RFC 9110 §10.1.1", wait_after_head=True)
add("expect_continue_method_not_allowed", post(b"hello", target=b"/getonly/{id}/a", method=b"PUT",
                                               headers=_EXP),
    refuse(405), ("expect_continue", "refused_body"), "RFC 9110 §10.1.1", wait_after_head=True)
add("expect_continue_forbidden", post(b"hello", target=b"/secure/{id}/a",
                                      headers=_EXP + b"Authorization: Bearer {bearer_noscope}\r\n"),
    refuse(403), ("expect_continue", "refused_body"), "RFC 9110 §10.1.1 (authorisation first)",
    wait_after_head=True)
add("expect_continue_http10", post(b"hello", headers=_EXP, version=b"HTTP/1.0"),
    ok(seen("POST", body=b"hello"), closed=True), "expect_continue",
    "RFC 9110 §10.1.1 (ignored in HTTP/1.0: no 100)", wait_after_head=True)
add("expect_continue_no_body", req(headers=_EXP), ok(seen()), "expect_continue",
    "RFC 9110 §10.1.1 (nothing pending: 100 optional)", allow_100=True)
add("expect_continue_case", post(b"hello", headers=b"Expect: 100-Continue\r\n"),
    ok(seen("POST", body=b"hello")), "expect_continue", "RFC 9110 §10.1.1 (case-insensitive)",
    allow_100=True)
add("expect_foo", post(b"hello", headers=b"Expect: foo\r\n"), refuse(417), "expect_other",
    "RFC 9110 §10.1.1")
add("expect_list", post(b"hello", headers=b"Expect: 100-continue, foo\r\n"), refuse(417),
    "expect_other", "RFC 9110 §10.1.1")
add("expect_empty", req(headers=b"Expect: \r\n"), refuse(417), "expect_other", "RFC 9110 §10.1.1",
    alts=(ok(seen()),))
add("expect_two_lines", post(b"hello", headers=_EXP + b"Expect: foo\r\n"), refuse(417),
    "expect_other", "RFC 9110 §10.1.1")
# The other way round: only the last line was judged, so this had `100 Continue` and
# reached the service (found by differential fuzzing against nginx).
add("expect_two_lines_other_first", post(b"hello", headers=b"Expect: foo\r\n" + _EXP),
    refuse(417), "expect_other", "RFC 9110 §10.1.1")

# ====================================================================== stripped headers

_CLIENT_IP = (b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.test\r\nX-Forwarded-Proto: https\r\n"
              b"X-Forwarded-Port: 443\r\nX-Forwarded-Prefix: /admin\r\n"
              b"Forwarded: for=6.6.6.6;host=evil.test\r\n"
              b"X-Real-IP: 6.6.6.6\r\nTrue-Client-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\n"
              b"CF-Connecting-IP: 6.6.6.6\r\nX-HTTP-Method-Override: DELETE\r\nX-HTTP-Method: DELETE\r\n"
              b"X-Method-Override: DELETE\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n")
add("strip_all_client_headers", post(b"hello", headers=_CLIENT_IP),
    ok(seen("POST", body=b"hello", headers={"x-forwarded-host": "gw.test", "x-forwarded-proto": "http"},
            absent=("x-forwarded-port", "x-forwarded-prefix"))),
    "strip_client", "issue 15: client IP spellings and method overrides reached services")
for _name, _hdr in (("x_real_ip", b"X-Real-IP: 6.6.6.6"), ("true_client_ip", b"True-Client-IP: 6.6.6.6"),
                    ("x_client_ip", b"X-Client-IP: 6.6.6.6"),
                    ("cf_connecting_ip", b"CF-Connecting-IP: 6.6.6.6"),
                    ("x_original_url", b"X-Original-URL: /secure/x"),
                    ("x_rewrite_url", b"X-Rewrite-URL: /secure/x"),
                    ("forwarded", b"Forwarded: for=6.6.6.6"),
                    ("xff", b"X-Forwarded-For: 6.6.6.6, 127.0.0.1"),
                    ("x_real_ip_underscore", b"X_Real_IP: 6.6.6.6")):
    add(f"strip_{_name}", req(headers=_hdr + b"\r\n"),
        ok(seen(absent=("x_real_ip",) if "underscore" in _name else ())),
        "strip_folded" if "underscore" in _name else "strip_client",
        "issue 15 / gateway.http.stripRequestHeaders")
add("strip_method_override", post(b"hello", headers=b"X-HTTP-Method-Override: DELETE\r\n"),
    ok(seen("POST", body=b"hello")), "strip_client", "method override: the service sees POST")
add("strip_xfh_spoof", req(headers=b"X-Forwarded-Host: evil.test\r\n"),
    ok(seen(headers={"x-forwarded-host": "gw.test"})), "strip_client", "host header poisoning")
add("strip_xfproto_spoof", req(headers=b"X-Forwarded-Proto: https\r\n"),
    ok(seen(headers={"x-forwarded-proto": "http"})), "strip_client", "scheme spoofing")
add("strip_identity_anonymous", req(headers=b"X-StellaOps-Tenant: evil\r\nX-StellaOps-Actor: mallory\r\n"
                                    b"X-Stella-Tenant: evil\r\nX_StellaOps_Tenant: evil\r\n"),
    ok(seen(headers={"x-stellaops-actor": "anonymous"},
            absent=("x-stellaops-tenant", "x-stella-tenant", "x_stellaops_tenant"))),
    "strip_identity", "docs/auth.md (strip, then set)")
add("strip_identity_authenticated",
    req(target=b"/secure/{id}/a",
        headers=b"Authorization: Bearer {bearer}\r\nX-StellaOps-Tenant: evil\r\n"),
    ok(seen(path="/secure/{id}/a", headers={"x-stellaops-tenant": "t-1"})), "strip_identity",
    "docs/auth.md")
add("strip_dpop_header_anonymous", req(headers=b"DPoP: not-a-proof\r\n"), ok(seen(absent=("dpop",))),
    "strip_identity", "docs/auth.md (a proof is meant for the gateway)", alts=(refuse(401, closed=False),))

# ====================================================================== bodies refused on the head

add("body_unknown_route", post(b"u" * 50000, target=b"/nowhere/{id}/a"), refuse(404),
    "refused_body", "issue 15: a 90 MB upload to an unknown path was read in full, then 404")
add("body_unknown_route_chunked", chunked(b"%x\r\n" % 30000 + b"u" * 30000 + b"\r\n0\r\n\r\n",
                                          target=b"/nowhere/{id}/a"),
    refuse(404), "refused_body", "issue 15")
add("body_method_not_allowed", post(b"m" * 10000, target=b"/getonly/{id}/a", method=b"PUT"),
    refuse(405), "refused_body", "RFC 9110 §15.5.6")
add("body_unauthenticated", post(b"s" * 20000, target=b"/secure/{id}/a"), refuse(401),
    "refused_body", "RFC 9110 §15.5.2")
add("body_forbidden", post(b"f" * 20000, target=b"/secure/{id}/a",
                           headers=b"Authorization: Bearer {bearer_noscope}\r\n"),
    refuse(403), "refused_body", "RFC 9110 §15.5.4")
add("body_refused_then_pipelined", post(b"hello", target=b"/nowhere/{id}/a") + SMUGGLED,
    refuse(404), ("refused_body", "x_pipeline"), "a request after a refused body never runs")
add("no_body_unknown_route_kept", req(target=b"/nowhere/{id}/a") + req(target=b"/nowhere/{id}/b"),
    refuse(404, 404, closed=False), "refused_body", "no body pending: the connection stays")

# ====================================================================== HEAD

add("head_on_get_route", req(b"HEAD", target=b"/getonly/{id}/a"),
    ok(seen(("GET", "HEAD"), "/getonly/{id}/a")), "head", "RFC 9110 §9.3.2; issue 15 (was 405)")
add("head_on_head_route", req(b"HEAD"), ok(seen("HEAD")), "head", "RFC 9110 §9.3.2")
add("head_then_get", req(b"HEAD", target=b"/getonly/{id}/a") + req(target=b"/getonly/{id}/b"),
    ok(seen(("GET", "HEAD"), "/getonly/{id}/a"), seen("GET", "/getonly/{id}/b")), ("head", "x_pipeline"),
    "RFC 9112 §6.3 (1): no body after a HEAD answer", head=(0,))
add("head_http10", req(b"HEAD", target=b"/getonly/{id}/a", version=b"HTTP/1.0"),
    ok(seen(("GET", "HEAD"), "/getonly/{id}/a"), closed=True), "head", "RFC 9110 §9.3.2")
add("head_streamed", req(b"HEAD", target=b"/stream/{id}/a"),
    ok(seen(("GET", "HEAD"), "/stream/{id}/a")), ("head", "x_stream"),
    "RFC 9110 §9.3.2 (a streamed answer, no chunks)")

# ====================================================================== streams

add("stream_get", req(target=b"/stream/{id}/a"), ok(seen(path="/stream/{id}/a")), "x_stream",
    "RFC 9112 §7.1 (chunked answer)")
add("stream_get_pipelined", req(target=b"/stream/{id}/a") + GOOD,
    ok(seen(path="/stream/{id}/a"), SEEN_GOOD), ("x_stream", "x_pipeline"), "RFC 9112 §9.3")
add("stream_get_http10", req(target=b"/stream/{id}/a", version=b"HTTP/1.0"),
    ok(seen(path="/stream/{id}/a"), closed=True), "x_stream", "RFC 9112 §6.3 (close-delimited)")
add("stream_post_chunked", chunked(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n", target=b"/stream/{id}/in"),
    ok(seen("POST", "/stream/{id}/in", b"abcdef")), ("x_stream", "te_chunked"), "RFC 9112 §7.1")

# ====================================================================== pipelining and smuggling

add("pipeline_three", req() + req(target=b"/edge/{id}/b") + GOOD,
    ok(seen(), seen(path="/edge/{id}/b"), SEEN_GOOD), "x_pipeline", "RFC 9112 §9.3.2")
add("pipeline_ten", b"".join(req(target=b"/edge/{id}/%d" % i) for i in range(10)),
    ok(*(seen(path="/edge/{id}/%d" % i) for i in range(10))), "x_pipeline", "RFC 9112 §9.3.2")
for _name, _bad_req, _src in (
        ("nul", req(headers=b"X-A: a\x00b\r\n"), "HTTP Garden"),
        ("duplicate_cl", req(b"POST", headers=b"Content-Length: 1\r\nContent-Length: 2\r\n", body=b"ab"),
         "desync-guardian severe"),
        ("http09", b"GET /edge/{id}/x\r\n", "RFC 9112 §3"),
        ("two_hosts", req(headers=b"Host: evil.test\r\n"), "RFC 9112 §3.2"),
        ("obs_fold", req(headers=b"X-A: 1\r\n fold\r\n"), "RFC 9112 §5.2"),
        ("te_gzip", chunked(HELLO_CHUNKED).replace(b": chunked", b": gzip, chunked"), "RFC 9112 §6.1")):
    _status = 501 if _name == "te_gzip" else 400
    add(f"pipeline_middle_{_name}", req() + _bad_req + SMUGGLED,
        refuse(200, _status, seen=(seen(),)), "x_pipeline",
        _src + ": earlier answered in order, then the refusal, later never runs")
add("pipeline_body_contains_request", post(SMUGGLED),
    ok(seen("POST", body=SMUGGLED)), "x_pipeline", "a request inside a Content-Length body")
add("pipeline_chunk_contains_request",
    chunked(b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n") + GOOD,
    ok(seen("POST", body=SMUGGLED), SEEN_GOOD), "x_pipeline", "a request inside chunk data")
add("pipeline_garbage_after_close", req(headers=b"Connection: close\r\n") + b"Invalid\r\n\r\n",
    ok(seen(), closed=True), "x_pipeline", "HTTP Garden: invalid bytes after Connection: close")
add("pipeline_garbage_after", req() + b"Invalid\r\n\r\n", refuse(200, 400, seen=(seen(),)),
    "x_pipeline", "RFC 9112 §3")
add("pipeline_cl0_then_body_request", post(b"") + post(b"x" * 34, target=b"/edge/{id}/b") + GOOD,
    ok(seen("POST"), seen("POST", "/edge/{id}/b", b"x" * 34), SEEN_GOOD), "x_pipeline",
    "HTTP Garden: pipelined requests read as the body of a Content-Length: 0 request")
add("pipeline_extra_crlf_between", req() + b"\r\n" + GOOD, ok(seen(), SEEN_GOOD), "x_pipeline",
    "RFC 9112 §2.2", alts=(refuse(200, 400, seen=(seen(),)),))
add("pipeline_http10_then_more", req(version=b"HTTP/1.0") + SMUGGLED, ok(seen(), closed=True),
    "x_pipeline", "RFC 9112 §9.3 (HTTP/1.0 closes)")
add("pipeline_get_with_body", post(b"hello", method=b"GET") + GOOD,
    ok(seen("GET", body=b"hello"), SEEN_GOOD), "x_pipeline",
    "desync-guardian ambiguous: GET with a body is framed, not read as the next request")
add("pipeline_head_with_cl_body", post(b"hello", method=b"HEAD") + GOOD,
    ok(seen("HEAD", body=b"hello"), SEEN_GOOD), ("x_pipeline", "head"),
    "desync-guardian ambiguous: HEAD with a Content-Length body", head=(0,),
    alts=(refuse(400),))
add("pipeline_delete_with_body", post(b"hello", method=b"DELETE") + GOOD,
    ok(seen("DELETE", body=b"hello"), SEEN_GOOD), "x_pipeline", "RFC 9110 §9.3.5")
add("pipeline_options_with_body", post(b"hello", method=b"OPTIONS") + GOOD,
    ok(seen("OPTIONS", body=b"hello"), SEEN_GOOD), "x_pipeline", "RFC 9110 §9.3.7")
add("pipeline_patch_chunked", chunked(HELLO_CHUNKED, method=b"PATCH") + GOOD,
    ok(seen("PATCH", body=b"hello"), SEEN_GOOD), "x_pipeline", "RFC 5789")
add("pipeline_two_chunked",
    chunked(HELLO_CHUNKED) + chunked(b"3\r\nabc\r\n0\r\n\r\n", target=b"/edge/{id}/b"),
    ok(seen("POST", body=b"hello"), seen("POST", "/edge/{id}/b", b"abc")), "x_pipeline", "RFC 9112 §9.3")
add("pipeline_trailing_bytes_after_chunked", chunked(HELLO_CHUNKED) + b"\x00",
    refuse(200, 400, seen=(seen("POST", body=b"hello"),)), "x_pipeline",
    "HTTP Garden: one extra byte after a chunked body")

# ====================================================================== deadlines (short-deadline gateway)

_DL = dict(gateway="deadlines", oracle=False)
add("deadline_first_head_silent", b"", refuse(408), "dl_first_head",
    "issue 15: the head deadline starts at accept", script=((0.0, b""),), idle=4.0,
    alts=(refuse(),), max_seconds=3.0, **_DL)
add("deadline_first_head_partial", b"", refuse(408), "dl_first_head", "slowloris",
    script=((0.0, b"GET /edge/{id}/a HTTP/1.1\r\nHost: gw"),), idle=4.0, max_seconds=3.0, **_DL)
_head = req()
add("deadline_first_head_trickle", b"", refuse(408), "dl_first_head",
    "slowloris: a head trickled in, the deadline counted from accept",
    script=tuple((0.0 if i == 0 else 0.3, _head[i * 3:i * 3 + 3]) for i in range((len(_head) + 2) // 3)),
    idle=4.0, max_seconds=3.5, **_DL)
add("deadline_idle_keepalive", b"", ok(seen(), closed=True), "dl_idle", "RFC 9112 §9.8",
    script=((0.0, req()),), idle=6.0, keep_wait=5.0, min_seconds=2.0, silent_close=True, **_DL)
add("deadline_later_head_keepalive", b"", refuse(200, 408, seen=(seen(),)), "dl_later_head",
    "slowloris on a kept connection", script=((0.0, req()), (0.4, b"G")), idle=4.0, **_DL)
add("deadline_later_head_pipelined", b"",
    refuse(200, 408, seen=(seen(path="/slow/{id}/a", query=b"ms=2500"),)), "dl_later_head",
    "issue 15: a pipelined head never got a deadline while the first was in flight",
    script=((0.0, req(target=b"/slow/{id}/a?ms=2500") + b"GET /edge/{id}/b HTTP/1.1\r\nHo"),),
    idle=4.0, alts=(refuse(200, seen=(seen(path="/slow/{id}/a", query=b"ms=2500"),)),), **_DL)
add("deadline_body_stalled", b"", refuse(408, seen=PARTIAL), ("dl_body", "slow_body"),
    "a body that stops", script=((0.0, req(b"POST", headers=b"Content-Length: 100\r\n",
                                           body=b"0123456789")),), idle=4.0, **_DL)
add("deadline_body_trickle", b"", refuse(408, seen=PARTIAL), ("dl_body", "slow_body"),
    "issue 15: a body trickled a byte at a time was never timed out",
    script=((0.0, req(b"POST", headers=b"Content-Length: 1000\r\n")),)
    + tuple((0.25, b"t") for _ in range(20)), idle=4.0, max_seconds=3.5, **_DL)
add("deadline_answer", req(target=b"/late/{id}/a"),
    refuse(504, closed=False, seen=(seen(path="/late/{id}/a", cancelled=True),)), "dl_answer",
    "the endpoint's timeout (0.5 s in HELLO)", oracle=False)
add("deadline_lingering_read", b"", refuse(404), ("dl_linger", "refused_body"),
    "RFC 9112 §9.6 (a refusal must reach a client still sending)",
    script=((0.0, req(b"POST", target=b"/nowhere/{id}/a", headers=b"Content-Length: 60000\r\n")),)
    + tuple((0.03, b"L" * 10000) for _ in range(6)), no_reset=True)


def by_name(name: str) -> Case:
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def covered_rows() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {k: [] for k in ROWS}
    for c in CASES:
        for r in c.rows:
            if r in out:
                out[r].append(c.name)
    return out
