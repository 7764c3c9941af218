"""HTTP/1.1 wire pieces of the client edge (pure-Python twin of cext/httpwire.pyx).

Small byte-level functions the ingress runs on every request: the response head in one
buffer, and the syntax checks of the header fields the gateway itself must judge (Host,
Transfer-Encoding). tests/codecs/test_httpwire.py holds the two implementations to each other and
to the rules of docs/http-edge.md.
"""
from __future__ import annotations

__all__ = ["render_response", "host_ok", "TE_NONE", "TE_CHUNKED", "TE_OTHER", "TE_BAD",
           "transfer_coding", "split_target", "cid_taken", "cid_made", "method_name",
           "header_name", "COMMON_HEADER_NAMES"]

_REG_NAME = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_IPV6 = frozenset(b"0123456789abcdefABCDEF:.")
_DIGITS = frozenset(b"0123456789")
_CID_OK = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
MAX_HOST = 255

# transfer_coding() results
TE_NONE, TE_CHUNKED, TE_OTHER, TE_BAD = 0, 1, 2, 3


def render_response(line: bytes, date: bytes, length: int, headers: bytes, extra: bytes,
                    cid: str, connection: bytes, body: bytes) -> bytes:
    """status line, date, content-length (unless length < 0: a 304), the stages' headers,
    the correlation id (an ASCII str, as cid_taken and cid_made make it), connection, blank
    line, body: one allocation."""
    if type(cid) is not str:
        raise TypeError("render_response takes bytes and a str cid, not None")
    if not cid.isascii():
        raise ValueError("a correlation id is ASCII")
    cl = b"content-length: %d\r\n" % length if length >= 0 else b""
    return b"".join((line, date, cl, headers, extra, b"x-correlation-id: ", cid.encode(),
                     b"\r\n", connection, b"\r\n", body))


def host_ok(value: bytes) -> bool:
    """RFC 9112 §3.2 / RFC 3986 §3.2.2: `uri-host [ ":" port ]`, as far as a gateway in
    front of DNS-named services needs it (docs/http-edge.md): a reg-name of unreserved
    characters, an IPv4 address (a reg-name by this syntax) or a bracketed IPv6 literal;
    a port of 1–5 digits in 1–65535. Empty, userinfo, paths, spaces, lists, percent
    escapes and sub-delims are refused."""
    n = len(value)
    if n == 0 or n > MAX_HOST:
        return False
    if value[0] == 0x5B:                          # '['
        end = value.find(b"]")
        if end < 3 or not _IPV6.issuperset(value[1:end]) or b":" not in value[1:end]:
            return False
        rest = value[end + 1:]
    else:
        colon = value.find(b":")
        name = value if colon < 0 else value[:colon]
        if not name or not _REG_NAME.issuperset(name):
            return False
        rest = b"" if colon < 0 else value[colon:]
    if not rest:
        return True
    port = rest[1:]
    if rest[0] != 0x3A or not 1 <= len(port) <= 5 or not _DIGITS.issuperset(port):
        return False
    return 1 <= int(port) <= 65535


def transfer_coding(value: bytes) -> int:
    """The Transfer-Encoding field value (one line: llhttp refuses two) as the gateway
    treats it: TE_CHUNKED for exactly `chunked` (any case, optional whitespace),
    TE_OTHER when it ends in `chunked` after other codings (501: we decode none),
    TE_BAD for anything else (400: the body's length cannot be known, RFC 9112 §6.3)."""
    codings = [c.strip(b" \t").lower() for c in value.split(b",")]
    if not codings or codings[-1] != b"chunked" or b"" in codings:
        return TE_BAD
    if len(codings) == 1:
        return TE_CHUNKED
    return TE_BAD if b"chunked" in codings[:-1] else TE_OTHER


def split_target(url: bytes):
    """(path, query) of an origin-form target, split at the first '?'; None when it holds
    a '#' (a fragment is never sent, RFC 9112 §3.2)."""
    if b"#" in url:
        return None
    path, _, query = url.partition(b"?")
    return path, query


def cid_taken(value: bytes | None) -> str | None:
    """The client's X-Correlation-Id as str when well formed (1–64 of [A-Za-z0-9._-]),
    else None (the gateway then makes one)."""
    if value is not None and 0 < len(value) <= 64 and _CID_OK.issuperset(value):
        return value.decode("ascii")
    return None


def cid_made(prefix: str, serial: int) -> str:
    """A correlation id the gateway makes: prefix + serial (>= 0) in lowercase hex, at
    least 10 digits."""
    return "%s%010x" % (prefix, serial)


_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")}


def method_name(method: bytes) -> str:
    """The request method as str: the same str object for each common method (metrics and
    logs key on it), a decode for any other token llhttp admits."""
    if type(method) is not bytes:
        raise TypeError("method_name takes bytes")
    name = _METHODS.get(method)
    return name if name is not None else method.decode("ascii")


# The header names most requests carry or the gateway reads: header_name() gives back one
# bytes object for each, whose hash is then computed once for every lookup after it.
COMMON_HEADER_NAMES = (
    b"host", b"user-agent", b"accept", b"accept-encoding", b"accept-language",
    b"content-type", b"content-length", b"transfer-encoding", b"connection", b"keep-alive",
    b"authorization", b"dpop", b"cookie", b"cache-control", b"pragma", b"origin",
    b"referer", b"if-none-match", b"if-modified-since", b"expect", b"upgrade", b"te",
    b"x-correlation-id", b"x-request-id", b"x-service-version", b"traceparent",
    b"tracestate", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"forwarded", b"x-real-ip", b"proxy-connection", b"sec-websocket-key",
    b"sec-websocket-version", b"sec-websocket-protocol", b"sec-websocket-extensions",
)
_NAMES = {n: n for n in COMMON_HEADER_NAMES}


def header_name(raw: bytes) -> bytes:
    """A field name as the gateway keys on it: lower case (RFC 9110 §5.1), the one object
    of COMMON_HEADER_NAMES when it is one."""
    if type(raw) is not bytes:
        raise TypeError("header_name takes bytes")
    lowered = raw.lower()
    return _NAMES.get(lowered, lowered)
