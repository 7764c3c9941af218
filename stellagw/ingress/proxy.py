"""The client's real address behind load balancers (docs/http-edge.md, "Client address").

Two sources, both trusted only as far as the operator says:

* the PROXY protocol header (HAProxy's v1 text / v2 binary) a load balancer writes before
  the first byte of the connection, when `gateway.http.proxyProtocol` is on for the
  listener: it replaces the TCP peer for everything on the connection;
* `X-Forwarded-For` (or RFC 7239 `Forwarded: for=`) of a request whose peer is in
  `gateway.http.trustedProxies`: read right to left, skipping trusted hops; the first
  address that is not a trusted proxy is the client. Anything unparsable stops the walk
  there (the address before it, a trusted hop's, is kept): a client can only ever prepend.

Once per connection (PROXY) or per request from a trusted proxy (X-Forwarded-For); never on
the path of a request from an untrusted peer.
"""
from __future__ import annotations

import ipaddress

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107            # the longest v1 line, CRLF included (the spec's bound)
V2_MAX = 16 + 2048      # header + addresses + TLVs we accept; more is refused


class ProxyError(ValueError):
    """A PROXY header that is missing, malformed or not allowed: 400 and close."""


def parse_proxy_header(data: bytes, mode: str):
    """(bytes consumed, the source address as text, or None for LOCAL/UNKNOWN), or None
    when `data` does not yet hold the whole header. `mode`: "v1", "v2" or "any"."""
    if data.startswith(V2_SIGNATURE[:len(data)]) and mode in ("v2", "any"):
        if len(data) < 16:
            return None
        return _v2(data)
    if V1_PREFIX.startswith(data[:6]) and mode in ("v1", "any"):
        end = data.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(data) >= V1_MAX:
                raise ProxyError("PROXY v1 header longer than 107 bytes")
            return None if V1_PREFIX.startswith(data[:6]) else _refuse(mode)
        return end + 2, _v1(data[:end])
    return _refuse(mode)


def _refuse(mode):
    raise ProxyError(f"the connection did not start with a PROXY protocol header ({mode})")


def _v1(line: bytes):
    parts = line.split(b" ")
    if parts[0] != b"PROXY" or len(parts) < 2:
        raise ProxyError("malformed PROXY v1 header")
    if parts[1] == b"UNKNOWN":
        return None
    if parts[1] not in (b"TCP4", b"TCP6") or len(parts) != 6:
        raise ProxyError("malformed PROXY v1 header")
    try:
        src = ipaddress.ip_address(parts[2].decode("ascii"))
        ipaddress.ip_address(parts[3].decode("ascii"))
        for port in parts[4:6]:
            if not port.isdigit() or not 0 <= int(port) <= 65535 or (len(port) > 1 and port[:1] == b"0"):
                raise ValueError(port)
    except (ValueError, UnicodeDecodeError):
        raise ProxyError("malformed PROXY v1 address") from None
    if (src.version == 4) != (parts[1] == b"TCP4"):
        raise ProxyError("PROXY v1 address family mismatch")
    return str(src)


def _v2(data: bytes):
    if data[:12] != V2_SIGNATURE:
        raise ProxyError("malformed PROXY v2 signature")
    ver_cmd, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if ver_cmd >> 4 != 2 or ver_cmd & 0x0F > 1:
        raise ProxyError("unsupported PROXY v2 version or command")
    if 16 + length > V2_MAX:
        raise ProxyError("PROXY v2 header too long")
    if len(data) < 16 + length:
        return None
    body = data[16:16 + length]
    consumed = 16 + length
    if ver_cmd & 0x0F == 0:                  # LOCAL: the balancer's own health check
        return consumed, None
    if family == 0x11 and length >= 12:     # TCP over IPv4
        return consumed, str(ipaddress.IPv4Address(body[:4]))
    if family == 0x21 and length >= 36:     # TCP over IPv6
        return consumed, str(ipaddress.IPv6Address(body[:16]))
    if family == 0x00:                       # UNSPEC
        return consumed, None
    raise ProxyError("unsupported PROXY v2 address family")


def client_key(address: bytes) -> bytes:
    """What maxConnectionsPerClient counts a client by: an IPv4 address (IPv4-mapped IPv6
    too) as it is, an IPv6 address by its /64 — one host's usual allocation, whose 2^64
    addresses would otherwise be 2^64 clients (docs/http-edge.md, "Client address")."""
    if b":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.decode("ascii"))
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped).encode()
    return b"%s/64" % str(ipaddress.IPv6Address(ip.packed[:8] + bytes(8))).encode()


def anonymous_key(address: bytes) -> str:
    """The rate-limit key of an anonymous client's requests: "ip:" and its client_key(),
    so an IPv6 host's /64 is one client for rate limits as for the connection cap, and
    ::ffff:a.b.c.d the same client as a.b.c.d. (By the full address, one /64 never met a
    limit: 110,000 requests from it went through a rule of 5 a minute.)"""
    return "ip:" + client_key(address).decode("latin-1")


class TrustedProxies:
    """gateway.http.trustedProxies: networks whose X-Forwarded-For / Forwarded is believed."""

    def __init__(self, cidrs):
        self._networks = tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)
        self._cache: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: str) -> bool:
        hit = self._cache.get(address)
        if hit is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            hit = any(ip in net for net in self._networks)
            if len(self._cache) < 4096:
                self._cache[address] = hit
        return hit

    def client(self, peer: str, xff: bytes | None, forwarded: bytes | None) -> str:
        """The client address of a request from `peer` (a trusted proxy).

        Read right to left, one hop at a time, each parsed only when it is reached: the
        walk stops at the first hop that is not a trusted proxy, so what a client wrote
        left of the address its proxy appended is never looked at. Parsing the whole list
        first (an adversarial probe) cost 38 ms a request for 16 KB of `a,` — a client
        behind the load balancer pinned a worker with 26 requests a second."""
        value = xff if xff is not None else forwarded
        hop_of = _xff_hop if xff is not None else _forwarded_hop
        client = peer
        end = len(value)
        while True:
            start = value.rfind(b",", 0, end) + 1
            hop = hop_of(value[start:end])
            if hop is None:
                break                        # unparsable: trust nothing further left
            client = hop
            if start == 0 or not self.trusts(hop):
                break
            end = start - 1
        return client


def _xff_hop(item: bytes):
    item = item.strip(b" \t")
    address = _address(item)
    if address is None and (item[:1] == b"[" or item.count(b":") == 1):
        # Some balancers append the client's port ("203.0.113.7:51234", Azure Application
        # Gateway) or bracket an IPv6 one ("[2001:db8::1]:51234"). Unparsed, such a hop
        # ended the walk at the balancer itself: every client behind it was one anonymous
        # client, one rate-limit key, that any of them could use up for all.
        address = _address(_without_port(item))
    return address


def _without_port(hop: bytes) -> bytes:
    """`a.b.c.d:port`, `[v6]` or `[v6]:port` -> the address; anything else -> b"" (none)."""
    if hop[:1] == b"[":
        address, _, rest = hop[1:].partition(b"]")
    else:
        address, _, rest = hop.partition(b":")
        rest = b":" + rest
    if rest and not (rest[:1] == b":" and rest[1:].isdigit() and len(rest) <= 6):
        return b""
    return address


def _forwarded_hop(element: bytes):
    for pair in element.split(b";"):
        name, _, v = pair.strip(b" \t").partition(b"=")
        if name.lower() == b"for":
            v = v.strip(b'"')
            if v.startswith(b"["):
                v = v[1:v.find(b"]")] if b"]" in v else b""
            elif v.count(b":") == 1:
                v = v.partition(b":")[0]
            return _address(v)
    return None


def _address(token: bytes):
    try:
        return str(ipaddress.ip_address(token.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return None
