"""Header rules at the boundary between HTTP and the frame protocol.

Hop-by-hop headers (RFC 9110 §7.6.1) describe one HTTP connection and never cross it, in
either direction; nor does anything the `Connection` header names. The gateway adds
X-Forwarded-For/-Proto/-Host and the correlation id on the way in, and frames the response
itself (content-length or chunked) on the way out.
"""
from __future__ import annotations


HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding",
    b"upgrade", b"proxy-authenticate", b"proxy-authorization",
})
# Headers the gateway itself sets on the way in: a client's own values are dropped, so a
# service can trust them.
GATEWAY_SET = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
                         b"x-correlation-id", b"forwarded"})
# Framing is the gateway's job on the client side.
RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"date", b"x-correlation-id"}


def request_headers(req, peer_ip: bytes, scheme: bytes, client_headers=None,
                    identity_headers=()) -> list:
    """The headers a REQUEST frame carries for `req`.

    `client_headers`: the client's headers with its identity headers already stripped
    (auth.strip_identity_headers). The gateway's identity headers are added after the
    `Connection`-named ones are removed, so a client cannot name one of ours there.
    """
    drop = HOP_BY_HOP | GATEWAY_SET
    named = None
    host = None
    out = []
    for name, value in (req.headers if client_headers is None else client_headers):
        if name == b"connection":
            named = {t.strip().lower() for t in value.split(b",")}
            continue
        if name == b"host":
            host = value
        if name in drop:
            continue
        out.append((name, value))
    if named:
        out = [(n, v) for n, v in out if n not in named]
    if req.http_version == "1.1" and req.header(b"te") == b"trailers":
        out.append((b"te", b"trailers"))
    out.extend(identity_headers)
    out.append((b"x-forwarded-for", peer_ip))
    out.append((b"x-forwarded-proto", scheme))
    if host is not None:
        out.append((b"x-forwarded-host", host))
    out.append((b"x-correlation-id", req.correlation_id.encode()))
    return out


def response_header_block(headers) -> bytes:
    """Format a service's response headers for the client.

    The frame decoder has already refused names that are not lowercase tokens and values
    with CR, LF or NUL (docs/protocol.md §8), so nothing here can split the response.
    """
    drop = RESPONSE_DROP
    return b"".join([b"%s: %s\r\n" % (n, v) for n, v in headers if n not in drop])
