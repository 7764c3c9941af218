"""The client listener's limits, read by HttpProtocol on every request, and the hosts it
serves, read by the pipeline (docs/http-edge.md)."""
from __future__ import annotations

import ipaddress


class AllowedHosts:
    """gateway.http.allowedHosts: the hosts a request may name (docs/http-edge.md, "Host").
    A service builds links from X-Forwarded-Host (password resets, redirects); any host a
    client chose would reach it there."""

    __slots__ = ("_names", "_suffixes")

    def __init__(self, names):
        self._names = frozenset(n.encode() for n in names if not n.startswith("*."))
        self._suffixes = tuple(n[1:].encode() for n in names if n.startswith("*."))

    def allows(self, host) -> bool:
        """`host`: a Host value host_ok() passed, or None (HTTP/1.0 without one)."""
        if not host:
            return False
        host = host.lower()
        if host[:1] == b"[":                # an IPv6 literal, in the spelling config keeps
            try:
                name = b"[%s]" % str(ipaddress.IPv6Address(
                    host[1:host.index(b"]")].decode("ascii"))).encode()
            except ValueError:
                return False
        else:
            name = host.partition(b":")[0]
            if name[-1:] == b".":           # the root's dot: the same name (RFC 1034 §3.1)
                name = name[:-1]
        return name in self._names or (bool(self._suffixes) and name.endswith(self._suffixes))


class HttpLimits:
    """The request-path settings as flat attributes: one attribute read per check."""

    __slots__ = ("max_connections", "max_connections_per_client", "max_header_bytes",
                 "max_header_count", "max_url_length",
                 "header_read_timeout", "keep_alive_timeout", "max_request_body_size",
                 "body_read_timeout", "min_body_rate", "send_timeout", "min_send_rate",
                 "response_buffer_budget", "proxy_protocol",
                 "request_id_header")

    def __init__(self, gw):
        http = gw.http
        self.max_connections = http.max_connections
        self.max_connections_per_client = http.max_connections_per_client
        self.max_header_bytes = http.max_header_bytes
        self.max_header_count = http.max_header_count
        self.max_url_length = http.max_url_length
        self.header_read_timeout = http.header_read_timeout
        self.keep_alive_timeout = http.keep_alive_timeout
        self.max_request_body_size = gw.routing.max_request_body_size
        self.body_read_timeout = http.body_read_timeout
        self.min_body_rate = http.min_body_rate
        self.send_timeout = http.send_timeout
        self.min_send_rate = http.min_send_rate
        self.response_buffer_budget = http.response_buffer_budget
        self.proxy_protocol = http.proxy_protocol     # "off", "v1", "v2" or "any"
        self.request_id_header = http.request_id_header.lower().encode("latin-1")
