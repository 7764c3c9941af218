"""Header rules at the boundary between HTTP and the frame protocol.

Hop-by-hop headers (RFC 9110 §7.6.1) describe one HTTP connection and never cross it, in
either direction; nor does anything the `Connection` header names: a client's (forward_headers,
FrameEncoder.request_forward) or a service's (frame.decode_response_block, which drops what a
`connection` field names whenever it drops `connection`). The gateway adds
X-Forwarded-For/-Proto/-Host and the correlation id on the way in, and frames the response
itself (content-length or chunked) on the way out.
"""
from __future__ import annotations

from .frame import (HEADER_CONNECTION as _CONNECTION, HEADER_DROP as _DROP,
                    HEADER_HOST as _HOST, HEADER_KEEP as _KEEP, HEADER_TE as _TE,
                    HEADER_TRACE as _TRACE)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization", b"http2-settings",
})
# Headers the gateway itself sets on the way in: a client's own values are dropped, so a
# service can trust them.
GATEWAY_SET = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                         b"x-correlation-id", b"forwarded"})
# Framing is the gateway's job on the client side.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"x-correlation-id"}
# The same for frame.decode_response_block, which compares names in C against a tuple.
RESPONSE_DROP_NAMES = tuple(sorted(RESPONSE_DROP))


# Client-IP and method-override spellings a client must never choose
# (gateway.http.stripRequestHeaders; configure() sets them from the configuration).
STRIPPED: frozenset = frozenset()


def configure(strip_request_headers) -> None:
    """Install the configured strip list; forgets every classification made before."""
    global STRIPPED
    STRIPPED = frozenset(name.lower().encode("latin-1") for name in strip_request_headers)
    CLASSES.clear()


# What to do with each request header name (a frame.HEADER_* kind), learnt once per name:
# header names repeat from request to request, so forwarding costs one dict lookup per
# header. Bounded: names past the cap are classified every time, never remembered.
# FrameEncoder.request_forward takes both, the cache and `classify` for what it lacks.
# Only names of at most _CLASSES_NAME_MAX bytes are remembered: a client's names may be as
# long as maxHeaderBytes, and 4,096 of 15 KB (one client, 5,000 requests, 1 s) held 61 MB
# in every worker for good. Real names are short (the longest common one is 30 bytes).
CLASSES: dict[bytes, int] = {}
_CLASSES_MAX = 4096
_CLASSES_NAME_MAX = 64


def classify(name: bytes) -> int:
    from ..auth.identity import is_identity_header
    if name == b"connection":
        kind = _CONNECTION
    elif name == b"host":
        kind = _HOST
    elif name == b"te":
        kind = _TE
    elif name == b"traceparent" or name == b"tracestate":
        kind = _TRACE
    elif (name in HOP_BY_HOP or _gateway_owned(_folded(name)) or is_identity_header(name)):
        # Identity headers: a client must never choose the tenant or actor a service sees.
        kind = _DROP
    else:
        kind = _KEEP
    if len(CLASSES) < _CLASSES_MAX and len(name) <= _CLASSES_NAME_MAX:
        CLASSES[name] = kind
    return kind


def _gateway_owned(name: bytes) -> bool:
    # Every X-Forwarded-* (Port, Prefix, Server ... which frameworks build URLs from), the
    # gateway's own set, and the configured client-IP / method-override names.
    return name in GATEWAY_SET or name in STRIPPED or name.startswith(b"x-forwarded-")


def _folded(name: bytes) -> bytes:
    # CGI/WSGI servers read `X_Real_IP` and `X-Real-IP` as one variable (HTTP_X_REAL_IP):
    # the gateway's own and the stripped names are matched with `_` read as `-`.
    return name.replace(b"_", b"-")


def request_headers(req, peer_ip: bytes, scheme: bytes, identity_headers=(),
                    keep_trace: bool = True) -> list:
    """The headers a REQUEST frame carries for `req`, in one pass over the client's.

    Dropped: hop-by-hop headers and what `Connection` names, the client's own identity
    headers (docs/auth.md) and the headers the gateway sets itself. The gateway's identity
    headers are added after the `Connection`-named ones are removed, so a client cannot
    name one of ours there. `keep_trace=False` when tracing replaces the client's
    traceparent with the gateway's own span. The request path encodes the same headers
    without this list, with FrameEncoder.request_forward (tests check they agree).
    """
    return forward_headers(req.headers, CLASSES, classify, req.http_version == "1.1",
                           keep_trace, identity_headers, peer_ip, scheme, req.correlation_id)


def forward_headers(headers, classes, classify, http11: bool, keep_trace: bool, identity,
                    peer_ip: bytes, scheme: bytes, correlation_id: str) -> list:
    """request_headers' rules over a list of (name, value) pairs: also the pure-Python
    FrameEncoder.request_forward (stellagw/_py/frame.py)."""
    named = None
    host = None
    te_trailers = False
    out = []
    for header in headers:
        name = header[0]
        kind = classes.get(name)
        if kind is None:
            kind = classify(name)
        if kind == _KEEP:
            out.append(header)
        elif kind == _HOST:
            host = header[1]
            out.append(header)
        elif kind == _CONNECTION:
            # Every Connection line counts (RFC 9110 §7.6.1): a field named on any of them
            # is hop-by-hop.
            named = named or set()
            named.update(t.strip().lower() for t in header[1].split(b","))
        elif kind == _TE:
            te_trailers = header[1].strip().lower() == b"trailers"
        elif kind == _TRACE and keep_trace:
            out.append(header)
    if named:
        out = [h for h in out if h[0] not in named]
    if te_trailers and http11:
        out.append((b"te", b"trailers"))
    out.extend(identity)
    out.append((b"x-forwarded-for", peer_ip))
    out.append((b"x-forwarded-proto", scheme))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-correlation-id", correlation_id.encode()))
    return out


def response_header_block(headers) -> bytes:
    """Format a service's response headers for the client.

    The frame decoder has already refused names that are not lowercase tokens and values
    with a control character (docs/protocol.md §8), so nothing here can split the response.
    Dropped: RESPONSE_DROP, and the fields the service's own `connection` fields name.
    The request path does this in C: frame.decode_response_block(payload, RESPONSE_DROP_NAMES).
    """
    drop = RESPONSE_DROP
    named = None
    for name, value in headers:
        if name == b"connection":
            named = named or set()
            named.update(t.strip().lower() for t in value.split(b","))
    if named:
        drop = drop | named
    return b"".join([b"%s: %s\r\n" % (n, v) for n, v in headers if n not in drop])
