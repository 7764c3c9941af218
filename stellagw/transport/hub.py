"""The service transport of one worker: listeners, admission, heartbeats, the HELLO_ACK.

Every worker listens on the shared transport port (SO_REUSEPORT, where services first
dial in) and on a private port of its own. The HELLO_ACK lists every worker's private
port, so a service that reached one worker dials the others and ends up connected to all
of them without knowing the worker count in advance (docs/protocol.md §handshake).

Each listener has a RegistrationPolicy (identity.py, docs/service-identity.md) that every
HELLO passes before it registers, and limits on its links: the hub's health tick closes
links that went silent or stopped reading, and the transport's write buffer is bounded.
What was refused or closed, and why, is counted here and exported with the Worker's
counters (gateway_service_registrations_refused_total, gateway_service_links_closed_total,
gateway_service_link_backpressure_total).
"""
from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time

import orjson

from ..auth.replay import LocalReplayCache
from ..ingress.proxy import client_key
from ..ingress.tls import ReloadingContext
from ..listeners import HANDSHAKE_FAILURES, Acceptor, reset_socket
from . import frame as fr
from . import connection as _connection
from .connection import INITIAL_WINDOW, ServiceConnection, TimerWheel
from .identity import RegistrationPolicy, is_loopback

WHEEL_TICK = 0.05   # seconds: the precision of request timeouts
# Signed HELLOs remembered against replay (per worker; with several workers the instance's
# shared table, auth/replay.py): registrations are rare, entries live 2 x the clock skew.
HELLO_REPLAY_ENTRIES = 10000
# ENDPOINTS_UPDATE bytes a worker decodes and registers per second, all links together
# (each link has one a second already, connection.UPDATE_INTERVAL): decoding takes the
# loop ~25 ms per MB, and 10 links sending 3 MB updates each second put other requests'
# median latency at 1.2 s. An update past the budget waits, the link's last counting.
UPDATE_BYTES_PER_SECOND = 8 * 1024 * 1024
# Of the loop's time, the share updates may take: an update of tiny values costs the sliced
# decoder (connection.DECODE_SLICE) far more than its size says, up to 0.7 s a MB, and is
# charged to the budget by the time it took instead.
UPDATE_LOOP_SHARE = 0.2


class Listener:
    __slots__ = ("kind", "host", "public_port", "private_ports", "max_connections", "ssl",
                 "thumbprints", "rcvbuf", "sndbuf", "links", "handshakes", "policy",
                 "silent_after", "write_high", "write_limit", "max_service_registration",
                 "max_registration", "registered")

    def __init__(self, kind, node, private_ports, ssl_ctx, policy, unhealthy_after):
        self.kind = kind                     # "tcp" or "tls"
        self.host = node.host
        self.public_port = node.port
        self.private_ports = private_ports   # worker id -> port
        self.max_connections = node.max_connections
        self.ssl = ssl_ctx
        self.thumbprints = frozenset(getattr(node, "allowed_client_certificate_thumbprints", ()))
        self.rcvbuf = node.receive_buffer_size
        self.sndbuf = node.send_buffer_size
        self.links = 0                       # service connections admitted, still open
        self.handshakes = 0                  # TLS connections accepted, still in their handshake
        self.policy = policy
        # Unhealthy first (routing stops selecting it), then the grace, then closed.
        self.silent_after = unhealthy_after + node.dead_link_grace
        self.write_high = node.write_buffer_high_water
        self.write_limit = node.write_buffer_limit
        self.max_service_registration = node.max_service_registration_size
        self.max_registration = node.max_registration_size
        self.registered = 0                  # bytes of the contents its links registered


class _TlsAcceptor(Acceptor):
    """The service TLS listener, accepting itself like the HTTPS one (ingress/tls_accept.py).

    With uvloop's create_server(ssl=...) a connection was the hub's only once its handshake
    was done, so any peer reaching the port, certificate or not, held connections in their
    handshake outside maxConnections (7,300 descriptors held by one probe within 2 s, each
    for HELLO_TIMEOUT), and could make each handshake fail as expensively as it liked (a
    chain of 250 made-up certificates: 53 ms of the worker's loop each, the worker 83 %
    busy). Now those in their handshake count against maxConnections, the next is reset at
    accept, and an address with HANDSHAKE_FAILURES failed handshakes in a second is reset
    at accept for the rest of it (docs/security.md §3d row 58). A TLS peer has HELLO's time
    for its handshake: the link's HELLO timer starts only once it is done."""

    def __init__(self, hub, listener: Listener, sock: socket.socket):
        super().__init__(sock, hub.loop)
        self._hub = hub
        self._listener = listener
        self._failures: dict[bytes, int] = {}   # failed handshakes by address, this second
        self._second = 0

    def _failures_now(self) -> dict[bytes, int]:
        second = int(self._loop.time())
        if second != self._second:
            self._second = second
            self._failures.clear()
        return self._failures

    def _admit(self, sock: socket.socket, peer: str) -> None:
        listener, hub = self._listener, self._hub
        if listener.links + listener.handshakes >= listener.max_connections:
            hub.link_closed("tls_handshake_limit")
            reset_socket(sock)
            return
        client = client_key(peer.encode())
        if self._failures_now().get(client, 0) >= HANDSHAKE_FAILURES:
            hub.link_closed("tls_handshake_failures")
            reset_socket(sock)
            return
        listener.handshakes += 1
        held, made = [sock], []

        def factory():
            held.clear()                # the transport closes it from now on
            made.append(hub._accept(listener))
            return made[0]

        task = self._loop.create_task(self._loop.connect_accepted_socket(
            factory, sock, ssl=hub.tls_context.current,
            ssl_handshake_timeout=_connection.HELLO_TIMEOUT))
        task.add_done_callback(lambda t: self._done(t, client, held, made))

    def _done(self, task, client: bytes, held: list, made: list) -> None:
        self._listener.handshakes -= 1
        for sock in held:
            reset_socket(sock)
        if task.cancelled() or task.exception() is not None:
            # Its connection was never made: nothing else forgets it.
            for conn in made:
                if conn not in self._hub.connections:
                    self._hub._by_conn.pop(conn, None)
        if task.cancelled():
            return
        exc = task.exception()      # retrieved: a failed handshake is not the loop's error
        if isinstance(exc, ssl.SSLError):
            failures = self._failures_now()
            failures[client] = failures.get(client, 0) + 1


class _Content:
    """One distinct registration content of a service: its size and the parsed copy the
    links sending it share."""

    __slots__ = ("size", "endpoints", "schemas", "links", "listener")

    def __init__(self, size, endpoints, schemas):
        self.size, self.endpoints, self.schemas, self.links = size, endpoints, schemas, 0
        self.listener = None        # whose maxRegistrationSize it counts against


class HeldBudget:
    """The worker's bytes of requests waiting for links over high water (`bytes`) and
    gateway.transports.heldRequestBudget (`budget`): ServiceConnection._hold and its
    releases keep `bytes`."""

    __slots__ = ("bytes", "budget")

    def __init__(self, budget: int):
        self.bytes = 0
        self.budget = budget


class TransportHub:
    def __init__(self, worker, routing, ports: dict | None):
        gw = worker.settings.gateway
        self.worker = worker
        self.routing = routing
        self.metrics = worker.metrics
        self.log = worker.log
        self.loop = None
        self.frame_counts = worker.metrics.frames   # frame type -> frames, both directions
        self.max_frame_size = max(gw.transports.tcp.max_frame_size, gw.transports.tls.max_frame_size)
        self.max_hello_size = min(self.max_frame_size, max(gw.transports.tcp.max_hello_size,
                                                           gw.transports.tls.max_hello_size))
        # Registration content by link, and each distinct content of a service once
        # (admit_registration): conn -> (service, digest); (service, digest) -> _Content.
        self._registered: dict = {}
        self._contents: dict = {}
        self.update_free_at = 0.0        # loop time the update budget is free again
        self.chunk_size = max(1024, min(gw.routing.streaming_buffer_size, INITIAL_WINDOW))
        self.stream_idle_timeout = gw.routing.stream_idle_timeout
        self.max_response_head = gw.routing.max_response_header_bytes
        self.scheme = b"https" if gw.http.tls.enabled else b"http"
        self.connections: set[ServiceConnection] = set()
        self._ports = ports or {}
        self._listeners: list[Listener] = []
        self._servers = []
        self._by_conn: dict[ServiceConnection, Listener] = {}
        self._timer = None
        self.timeouts = 0
        self.refused: dict[str, int] = {}       # registrations refused, by reason
        self.closed: dict[str, int] = {}        # links the gateway closed, by reason
        # links paused over high water, PONGs shed and requests held meanwhile
        self.pressure: dict[str, int] = {}
        # What requests waiting for links over high water keep (ServiceConnection._hold),
        # against gateway.transports.heldRequestBudget: a running total, like the HTTP
        # edge's backlog_total. One attribute, not two: past 30 attributes the hub's
        # instance dict stops sharing keys and every hub attribute read of every request
        # costs a dict lookup (callgrind: +80 instructions a routed request).
        self.held = HeldBudget(gw.transports.held_request_budget)
        self._replay = LocalReplayCache(HELLO_REPLAY_ENTRIES)
        worker.metrics.sources.append(self._counters)
        worker.metrics.folds.append(self._fold_frames)
        # A HELLO refused after waiting its turn in a registration storm: logged and counted
        # like any refusal instead of a bare close.
        routing.on_refused = lambda conn, message: conn.refuse_late(message)
        # Request timeouts: a uv timer per request would cost more than the rest of
        # dispatch; the wheel (compiled with the connection) is made in start(), with the loop.
        self.wheel: TimerWheel | None = None
        # The TLS listener's certificates, reloaded in place (ingress/tls.py): None without it.
        self.tls_context: ReloadingContext | None = None

    # ---------------------------------------------------------------- lifecycle

    async def start(self, sockets) -> None:
        """`sockets`: [(kind, socket)] already bound and listening (public and private)."""
        self.loop = asyncio.get_running_loop()
        self.wheel = TimerWheel(self.loop, WHEEL_TICK)
        gw = self.worker.settings.gateway
        by_kind = {}
        for kind in ("tcp", "tls"):
            node = getattr(gw.transports, kind)
            if not node.enabled:
                continue
            ctx = None
            if kind == "tls":
                self.tls_context = ReloadingContext(node, "gateway.transports.tls")
                ctx = self.tls_context.listening
            policy = RegistrationPolicy(kind, node, self._replay)
            by_kind[kind] = Listener(kind, node, self._ports.get(kind, {}), ctx, policy,
                                     gw.health.heartbeat_timeout_seconds)
            self._listeners.append(by_kind[kind])
            if policy.open_to:
                # Only a listener others can reach makes the open policy worth a warning.
                self.log.event("info" if kind == "tcp" and is_loopback((node.host,)) else "warning",
                               "service identity not configured", transport=kind,
                               allowed=policy.open_to, see="docs/service-identity.md")
        for kind, sock in sockets:
            listener = by_kind[kind]
            if listener.ssl is not None:
                # Accepted here, as the HTTPS listener does (_TlsAcceptor).
                self._servers.append(_TlsAcceptor(self, listener, sock))
                continue
            server = await self.loop.create_server(
                lambda lst=listener: self._accept(lst), sock=sock)
            self._servers.append(server)
        self._schedule()

    def _accept(self, listener):
        conn = ServiceConnection(self)
        self._by_conn[conn] = listener
        return conn

    def arm(self, pending, timeout: float) -> None:
        self.wheel.arm(pending, timeout)

    def _schedule(self):
        interval = self.worker.settings.gateway.health.check_interval_seconds
        self._timer = self.loop.call_later(interval, self._tick)

    def _tick(self):
        self._schedule()
        self.routing.check_health(time.monotonic())
        now = self.loop.time()
        for conn in list(self.connections):
            listener = self._by_conn.get(conn)
            if listener is not None:
                conn.sweep(now, listener.silent_after)

    def reload_tls(self, node=None, *, only_if_changed: bool = False):
        """New service handshakes use the certificate files of `node` (default: the same
        settings, files read again); links already up keep theirs. None when there is no
        TLS listener or (`only_if_changed`) its files did not change, else a ReloadResult."""
        ctx = self.tls_context
        if ctx is None or (only_if_changed and not ctx.changed()):
            return None
        return ctx.reload(node)

    def close_listeners(self):
        for server in self._servers:
            server.close()

    def drain(self):
        """Tell every service this worker is going away (they stop sending it new work)."""
        deadline_ms = int(self.worker.settings.gateway.http.shutdown_timeout * 1000)
        for conn in list(self.connections):
            conn.send_drain(deadline_ms)

    def shutdown(self):
        """At the drain deadline: CANCEL(Shutdown) what is left, then close."""
        if self._timer is not None:
            self._timer.cancel()
        for conn in list(self.connections):
            conn.cancel_all("Shutdown")
            conn._flush()
            if conn.transport is not None:
                conn.transport.close()

    # ---------------------------------------------------------------- per connection

    def admit(self, conn, transport) -> str | None:
        listener = self._by_conn.get(conn)
        if listener is None:
            return "no listener"
        if listener.links >= listener.max_connections:
            del self._by_conn[conn]
            return f"transports.{listener.kind}.maxConnections ({listener.max_connections}) reached"
        if listener.thumbprints:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            if der is None:
                del self._by_conn[conn]
                return "no client certificate"
            sha1 = hashlib.sha1(der).hexdigest()
            sha256 = hashlib.sha256(der).hexdigest()
            if sha1 not in listener.thumbprints and sha256 not in listener.thumbprints:
                del self._by_conn[conn]
                return f"client certificate {sha256} is not in allowedClientCertificateThumbprints"
        listener.links += 1
        self.connections.add(conn)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, listener.rcvbuf)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, listener.sndbuf)
            except OSError:
                pass
        # Low water at a quarter: resume once the service has caught up, not on every byte.
        transport.set_write_buffer_limits(high=listener.write_high, low=listener.write_high // 4)
        return None

    def authorize(self, conn, hello) -> tuple[str, str] | None:
        """May this peer register the service its HELLO names? None, or (reason, message)."""
        listener = self._by_conn.get(conn)
        if listener is None:
            return ("no_listener", "the connection has no listener")
        return listener.policy.check(hello, conn.transport, conn.peer)

    def write_buffer_limit(self, conn) -> int:
        return self._by_conn[conn].write_limit

    def _fold_frames(self) -> None:
        for conn in self.connections:
            conn.fold_counts()

    def admit_registration(self, conn, hello: dict, size: int,
                           digest: bytes | None = None) -> str | None:
        """A HELLO or ENDPOINTS_UPDATE of `size` bytes from `conn`: None when its service's
        registrations stay within maxServiceRegistrationSize with it (what the link
        registered before replaced), else why not. Links sending the same endpoints and
        schemas (a service's instances, as a rule) count them once and share one parsed
        copy: `hello`'s are replaced by the first link's. `digest`: the sliced decoder's, of
        the raw members (a large payload: serialising it again here held the loop 60 ms)."""
        service = hello.get("service")
        if not isinstance(service, str):
            return None              # the HELLO's own checks refuse it
        endpoints, schemas = hello.get("endpoints"), hello.get("schemas")
        if digest is None:
            try:
                digest = hashlib.blake2b(orjson.dumps([endpoints, schemas]),
                                         digest_size=16).digest()
            except (TypeError, orjson.JSONEncodeError):
                return None          # not JSON: the HELLO's own checks refuse it
            digest = b"j" + digest   # never equal to a raw digest (another serialisation)
        old = self._registered.get(conn)
        if old == (service, digest):
            return None
        contents = self._contents.get(service, {})
        held = contents.get(digest)
        listener = self._by_conn.get(conn)
        if held is None:
            own = contents.get(old[1]) if old is not None and old[0] == service else None
            freed = own.size if own is not None and own.links == 1 else 0
            total = size + sum(c.size for d, c in contents.items()) - freed
            limit = listener.max_service_registration if listener is not None else 0
            if total > limit:
                return (f"the registrations of service {service!r} on this worker would hold "
                        f"{total} bytes, over gateway.transports.{getattr(listener, 'kind', '*')}"
                        f".maxServiceRegistrationSize ({limit}); identical ones count once")
            # Every service's together: the per-service bound alone let a peer with a link
            # per service name make a worker hold maxConnections of them (15 MB a 1 MB HELLO).
            if old is not None and old[0] != service:
                own = self._contents.get(old[0], {}).get(old[1])
                freed = own.size if own is not None and own.links == 1 else 0
            everything = listener.registered + size - freed if listener is not None else 0
            if listener is not None and everything > listener.max_registration:
                return (f"the registrations of every service on this worker would hold "
                        f"{everything} bytes, over gateway.transports.{listener.kind}"
                        f".maxRegistrationSize ({listener.max_registration}); identical ones "
                        f"count once")
        self._drop_registration(conn)
        if held is None:
            held = self._contents.setdefault(service, {})[digest] = _Content(size, endpoints,
                                                                              schemas)
            if listener is not None:
                held.listener = listener
                listener.registered += size
        held.links += 1
        self._registered[conn] = (service, digest)
        if "endpoints" in hello:
            hello["endpoints"] = held.endpoints
        if "schemas" in hello:
            hello["schemas"] = held.schemas
        return None

    def update_spent(self, size: int, now: float) -> None:
        """An ENDPOINTS_UPDATE of `size` bytes is being applied (UPDATE_BYTES_PER_SECOND)."""
        self.update_free_at = max(self.update_free_at, now) + size / UPDATE_BYTES_PER_SECOND

    def update_decoded(self, size: int, seconds: float, now: float) -> None:
        """An update of `size` bytes took `seconds` of the loop to decode, a slice at a time:
        past what its bytes were charged, the budget is charged by that time."""
        extra = seconds / UPDATE_LOOP_SHARE - size / UPDATE_BYTES_PER_SECOND
        if extra > 0:
            self.update_free_at = max(self.update_free_at, now) + extra

    def _drop_registration(self, conn) -> None:
        key = self._registered.pop(conn, None)
        if key is not None:
            contents = self._contents[key[0]]
            held = contents[key[1]]
            held.links -= 1
            if held.links == 0:
                del contents[key[1]]
                if held.listener is not None:
                    held.listener.registered -= held.size
                if not contents:
                    del self._contents[key[0]]

    def release(self, conn) -> None:
        self._drop_registration(conn)
        listener = self._by_conn.pop(conn, None)
        if listener is not None and conn in self.connections:
            listener.links -= 1
        self.connections.discard(conn)

    def hello_ack(self, conn=None) -> dict:
        gw = self.worker.settings.gateway
        workers = []
        listener = self._by_conn.get(conn) if conn is not None else None
        listeners = [listener] if listener is not None else self._listeners[:1]
        for lst in listeners:
            # An unspecified bind address means "the host you dialled" (protocol.md §4.2).
            host = "" if lst.host in ("0.0.0.0", "::") else lst.host
            for wid, port in sorted(lst.private_ports.items()):
                workers.append({"worker_id": wid, "host": host, "port": port})
        return {
            "protocol": fr.PROTOCOL_VERSION,
            "node_id": self.worker.node_id,
            "worker_id": self.worker.worker_id,
            "workers": workers,
            "heartbeat_interval_ms": int(gw.health.heartbeat_interval_seconds * 1000),
            "stream_window": INITIAL_WINDOW,
            "max_frame_size": self.max_frame_size,
        }

    def count_timeout(self) -> None:
        self.timeouts += 1

    def registration_refused(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def link_closed(self, reason: str) -> None:
        self.closed[reason] = self.closed.get(reason, 0) + 1

    def backpressure(self, event: str) -> None:
        self.pressure[event] = self.pressure.get(event, 0) + 1

    def _counters(self) -> dict:
        return {
            "gateway_service_registrations_refused": (
                "HELLOs refused (HELLO_ACK error), by reason: Forbidden ones (identity, "
                "docs/service-identity.md), invalid_hello, unsupported_protocol", ("reason",),
                [((k,), v) for k, v in self.refused.items()]),
            "gateway_service_links_closed": (
                "Service connections the gateway closed, by reason", ("reason",),
                [((k,), v) for k, v in self.closed.items()]),
            "gateway_service_link_backpressure": (
                "Service links over writeBufferHighWater (paused), PINGs left unanswered "
                "(pong_shed) and requests or their data held (held) meanwhile, new requests "
                "answered 503 for the worker's heldRequestBudget being spent (held_refused); "
                "links not read for sending too many frames for nothing (ignored_frames)",
                ("event",),
                [((k,), v) for k, v in self.pressure.items()]),
            "gateway_service_link_held_bytes_gauge": (
                "Bytes of requests waiting for service links over writeBufferHighWater, "
                "against gateway.transports.heldRequestBudget", (), [((), self.held.bytes)]),
        }

