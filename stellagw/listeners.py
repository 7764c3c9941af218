"""The instance's listening sockets, bound before anything serves, and its descriptor budget.

A port someone else listens on stops start-up (exit 2, "address in use"). Sockets that
workers share sit in one SO_REUSEPORT group that only this process creates: a bind without
SO_REUSEPORT first proves the port is free (any listener there, even one with
SO_REUSEPORT, makes it fail), then the group is bound. Before this, every worker bound its
own SO_REUSEPORT socket, so a second gateway joined the group and took half the traffic.

One worker (`workers: 1`) binds plain exclusive sockets. With several, the supervisor binds
and listens on everything and its workers inherit the sockets through fork:

- client HTTP, admin and the public transport ports: one socket per worker in the port's
  group, so the kernel keeps spreading connections by hash as before;
- each worker's private transport port: one exclusive socket.

The supervisor keeps its copies, so a worker's sockets outlive it: while it restarts, what
arrives for it waits in the backlog (services redialling its private port included) instead
of being refused or reset, and the new worker takes it over.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import resource
import select
import socket
import struct
import termios

# Descriptors a worker needs besides its connections: listening sockets, epoll, the log
# pipe, Valkey and Authority connections, snapshot files, the loop's reserve descriptor.
FD_HEADROOM = 256


class ListenerError(Exception):
    """A configured address that cannot be listened on; the CLI exits 2 with this line."""

    def __init__(self, key: str, host: str, port: int, error: OSError):
        super().__init__(key, host, port, error)
        self.key, self.host, self.port, self.error = key, host, port, error

    def __str__(self) -> str:
        where = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        if self.error.errno == errno.EADDRINUSE:
            return f"address in use: {where} ({self.key}): another process listens there"
        return f"cannot listen on {where} ({self.key}): {self.error.strerror or self.error}"


def _socket(host: str, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    # SO_REUSEADDR: a restart finds the port free despite the last run's TIME_WAIT
    # connections; Linux still refuses the bind while anything listens there.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def bind_exclusive(key: str, host: str, port: int) -> socket.socket:
    """A bound (not yet listening) socket that no other process can share."""
    sock = _socket(host, reuse_port=False)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenerError(key, host, port, exc) from None
    return sock


def bind_group(key: str, host: str, port: int, count: int) -> list[socket.socket]:
    """`count` bound sockets in one SO_REUSEPORT group, on a port nobody else holds."""
    probe = bind_exclusive(key, host, port)
    port = probe.getsockname()[1]
    probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _socket(host, reuse_port=True)
            socks.append(sock)
            sock.bind((host, port))
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise ListenerError(key, host, port, exc) from None
    return socks


# After the idle time, a probe every KEEPALIVE_INTERVAL seconds; KEEPALIVE_PROBES without
# an answer and the kernel drops the connection.
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 6


def keep_alive(sock: socket.socket, idle: float) -> None:
    """TCP keep-alive (gateway.http.tcpKeepAlive) on a listening socket: Linux gives every
    connection accepted from it the same options, so no call per connection. Without it
    a client that vanished without a FIN (its network gone, a phone asleep) holds a
    WebSocket or a long stream, and a connection slot, for as long as the other side
    stays up: nothing is sent to it that could fail. 0 = off."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1 if idle > 0 else 0)
    if idle > 0 and hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, round(idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


def owed(transport) -> int:
    """Bytes written to an accepted connection that its peer has not taken: the transport's
    buffer and the kernel's send queue (unsent, or sent and not acknowledged: SIOCOUTQ,
    which Linux spells TIOCOUTQ). A peer that reads makes it shrink, whichever of the two
    holds the bytes; gateway.http.sendTimeout cuts a peer for which it does not."""
    left = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            left += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
        except (OSError, ValueError):
            pass        # closed meanwhile: what is left is the transport's
    return left


class SendDeadline:
    """gateway.http.sendTimeout and minSendRate on one connection, checked once a second
    while the peer owes us reading (paused for writing, or closing with bytes left): each
    window of `timeout` must see it take at least `min_rate × timeout` bytes, and at least
    one, else it is cut — "send_timeout" when it took nothing, "send_rate" when it took too
    little (a slow-read attack: a window's worth of bytes every so often keeps a connection
    and its buffers for ever under a no-progress rule alone).

    What the peer took is what its kernel acknowledged (`taken`): a peer that does not read
    fills its receive window and the acknowledgements stop, so they follow its reading; a
    streamed chunk written meanwhile cannot hide what it did or did not read, as comparing
    what is owed would."""

    __slots__ = ("timeout", "min_rate", "need", "since", "base")

    def __init__(self, timeout: float, min_rate: int = 0):
        self.timeout = timeout
        self.min_rate = min_rate
        self.need = max(1, int(min_rate * timeout))
        self.since = 0.0        # the window's start; 0: nothing owed at the last check
        self.base = 0           # what the peer had taken by then

    def again(self) -> SendDeadline:
        """The same rule for another connection (a WebSocket taking over a client's)."""
        return SendDeadline(self.timeout, self.min_rate)

    def expired(self, transport, now: float) -> str | None:
        """The reason to cut the peer (reset() it), or None."""
        if owed(transport) == 0:
            self.since = 0.0
            return None
        got = taken(transport)
        if self.since == 0.0:
            self.since, self.base = now, got
            return None
        if now - self.since < self.timeout:
            return None
        if got - self.base >= self.need:
            self.since, self.base = now, got
            return None
        self.since = 0.0
        return "send_timeout" if got == self.base else "send_rate"


def taken(transport) -> int:
    """Bytes of this connection its peer's kernel acknowledged (TCP_INFO's tcpi_bytes_acked,
    Linux ≥ 4.1); 0 where that cannot be read (the peer then reads as taking nothing, and
    only what is owed shrinking to 0 clears it)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
        except (OSError, ValueError):
            return 0
        if len(info) >= _TCP_INFO_LEN:
            return _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
    return 0


# struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, 24 u32 (rto .. total_retrans),
# pacing_rate and max_pacing_rate (u64), then bytes_acked (u64).
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_BYTES_ACKED = struct.Struct("Q")
_BYTES_ACKED_AT = 8 + 24 * 4 + 2 * 8
_TCP_INFO_LEN = _BYTES_ACKED_AT + 8


_GONE = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def peer_closed(transport) -> bool:
    """Whether the peer has closed its side (FIN, or RST), seen without reading it:
    POLLRDHUP says so even with unread bytes before the FIN — a connection the gateway is
    not reading (it holds an upload back for the service's credit) would otherwise only
    learn it when it reads again."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _GONE)
        events = poller.poll(0)
    except (OSError, ValueError):
        return False
    return bool(events and events[0][1] & _GONE)


def reset(transport) -> None:
    """Drop a connection at once with an RST: what the kernel still holds for a peer that
    takes nothing goes with it, where a close would leave it queued behind a FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ValueError):
            pass
    transport.abort()


# Connections an Acceptor takes per wake-up; the rest wait in the backlog for the next loop
# turn, so a burst does not hold the loop.
_ACCEPT_BATCH = 64
# Out of descriptors (or kernel memory): what waits stays in the backlog, and accept is
# tried again this much later — the listening socket stays readable, so trying at once
# would spin the loop.
_ACCEPT_RETRY = 1.0
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_LINGER_RST = struct.pack("ii", 1, 0)
# Failed TLS handshakes one client address may have in a second (per worker and listener)
# before its next connections that second are reset at accept. A failed handshake can be
# costly on our side only: OpenSSL 3.0 decodes every certificate the client sends before it
# verifies any, 0.18 ms each, so 250 made-up ones (68 KB, under OpenSSL's 100 KB cap) cost
# the worker 46 ms against 2–3 ms for the client — one address pinned a worker with two
# connections at a time. A client whose certificate does not verify fails every try
# anyway. docs/security.md §3d rows 55 and 58.
HANDSHAKE_FAILURES = 4


def reset_socket(sock: socket.socket) -> None:
    """Close an accepted socket with an RST: the kernel drops what the peer sent (half a
    ClientHello) at once and keeps no TIME_WAIT for it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    sock.close()


class Acceptor:
    """A listening socket the worker accepts from itself (the TLS listeners: uvloop's
    `create_server(ssl=...)` hands over a connection only once its handshake is done, so
    caps could not count those in it). `_admit(sock, peer)` gets each accepted socket;
    out of descriptors, accepting pauses for a second. What Worker keeps of a listener, as
    it keeps an asyncio Server: close() and is_serving()."""

    def __init__(self, sock: socket.socket, loop) -> None:
        sock.setblocking(False)     # accept() must never wait: it runs on the loop
        self._sock = sock
        self._fd = sock.fileno()
        self._loop = loop
        self._serving = True
        self._retry = None
        loop.add_reader(self._fd, self._accept)

    def is_serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._serving:
            return
        self._serving = False
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        else:
            self._loop.remove_reader(self._fd)
        self._sock.close()

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._loop.add_reader(self._fd, self._accept)

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self._loop.remove_reader(self._fd)
                    self._retry = self._loop.call_later(_ACCEPT_RETRY, self._resume)
                    return
                continue        # ECONNABORTED and the like: that one is gone, not the rest
            self._admit(sock, address[0])

    def _admit(self, sock: socket.socket, peer: str) -> None:
        raise NotImplementedError


def listen(sock: socket.socket, backlog: int) -> socket.socket:
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


@dataclasses.dataclass
class WorkerSockets:
    """What one worker serves on. `transports` holds (kind, socket) pairs: the public
    port's and, with several workers, the worker's private one."""
    http: socket.socket
    admin: socket.socket | None
    transports: list
    private_ports: dict          # kind -> {worker id: port}; empty with one worker

    def all(self) -> list[socket.socket]:
        return [s for s in (self.http, self.admin) if s is not None] + [s for _, s in self.transports]


def _transport_nodes(gw):
    for kind in ("tcp", "tls"):
        node = getattr(gw.transports, kind)
        if node.enabled:
            yield kind, node


def bind_instance(settings, workers: int) -> list[WorkerSockets]:
    """Every listening socket of the instance, one WorkerSockets per worker; raises
    ListenerError before anything listens when one address cannot be had."""
    gw = settings.gateway
    made: list[socket.socket] = []
    try:
        def group(key, host, port, backlog):
            socks = bind_group(key, host, port, workers) if workers > 1 else \
                [bind_exclusive(key, host, port)]
            made.extend(socks)
            return socks

        http = group("gateway.http.port", gw.http.host, gw.http.port, gw.http.backlog)
        admin = group("gateway.admin.port", gw.admin.host, gw.admin.port, 128) \
            if gw.admin.enabled else [None] * workers
        public, private, private_ports = {}, {}, {}
        for kind, node in _transport_nodes(gw):
            public[kind] = group(f"gateway.transports.{kind}.port", node.host, node.port, 512)
            if workers > 1:
                private[kind] = []
                for _ in range(workers):
                    sock = bind_exclusive(f"gateway.transports.{kind}.host", node.host, 0)
                    made.append(sock)
                    private[kind].append(sock)
                private_ports[kind] = {wid: s.getsockname()[1] for wid, s in enumerate(private[kind])}
        # Only now, with every address in hand, does anything listen.
        for sock in http:
            listen(sock, gw.http.backlog)
        for sock in admin:
            if sock is not None:
                listen(sock, 128)
        for socks in (*public.values(), *private.values()):
            for sock in socks:
                listen(sock, 512)
    except BaseException:
        for sock in made:
            sock.close()
        raise
    out = []
    for wid in range(workers):
        transports = []
        for kind in public:
            transports.append((kind, public[kind][wid]))
            if kind in private:
                transports.append((kind, private[kind][wid]))
        out.append(WorkerSockets(http[wid], admin[wid], transports, private_ports))
    return out


# ------------------------------------------------------------------ file descriptors

def descriptors_needed(settings) -> int:
    """One worker's descriptors at its caps: every connection cap it has, plus headroom."""
    gw = settings.gateway
    need = gw.http.max_connections + FD_HEADROOM
    if gw.admin.enabled:
        need += gw.admin.max_connections
    for _, node in _transport_nodes(gw):
        need += node.max_connections
    return need


def raise_fd_limit(settings) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; refuse a configuration whose caps do
    not fit in it (otherwise, at the limit, libuv accepts and closes new connections
    unanswered). Returns the soft limit now in force."""
    from .config import ConfigError
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = max(soft, 1 << 20) if soft != resource.RLIM_INFINITY else 1 << 20
    if soft == resource.RLIM_INFINITY or soft >= target:
        limit = soft
    else:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            limit = target
        except (OSError, ValueError):
            limit = soft
    need = descriptors_needed(settings)
    if limit != resource.RLIM_INFINITY and need > limit:
        gw = settings.gateway
        others = need - gw.http.max_connections - FD_HEADROOM
        # Named: the largest of the caps, which is the one to lower (a transport's
        # maxConnections of 2**31 was reported as gateway.http.maxConnections).
        caps = [("gateway.http.maxConnections", gw.http.max_connections)]
        if gw.admin.enabled:
            caps.append(("gateway.admin.maxConnections", gw.admin.max_connections))
        caps += [(f"gateway.transports.{kind}.maxConnections", node.max_connections)
                 for kind, node in _transport_nodes(gw)]
        raise ConfigError(
            max(caps, key=lambda cap: cap[1])[0],
            f"{gw.http.max_connections} client connections, with {others} admin and service "
            f"connections and {FD_HEADROOM} spare descriptors, need {need} file descriptors per "
            f"worker but RLIMIT_NOFILE allows {limit} (hard limit {hard}): lower maxConnections "
            f"or raise the limit (ulimit -n, systemd LimitNOFILE=, the container runtime's nofile)")
    return limit
