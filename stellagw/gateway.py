"""The composition root of one worker: builds the stages, owns start / ready / drain / stop.

A worker is one process with one uvloop loop. It serves clients, the admin listener and
the service transport on sockets bound before it started (stellagw/listeners.py: with
several workers, the supervisor's SO_REUSEPORT groups, which the kernel spreads connections
over), and runs a once-a-second tick that moves the coarse clock, the Date header and every
connection's deadline — no timer object per request.

Start: services first (transports, admin), clients last — a restarted worker waits until
the service instances its siblings know have reached it (`warmupTimeout`), so it never
answers 404 for a service that is there. A new pod does the same for the services the
other pods route, read from Valkey (`gateway.node.fleet`, routing/fleet.py): it serves
clients meanwhile, but is not ready, and answers 503 for those services' routes. Drain
(SIGTERM): not ready at once, listeners closed `preStopDelay` later, then in-flight work
finished (docs/operations.md §4).
"""
from __future__ import annotations

import array
import asyncio
import email.utils
import errno
import fcntl
import gc
import os
import signal
import socket
import sys
import termios
import time

import httptools
import orjson

from . import __version__
from .ingress.http import Accounting, EdgeState, HttpProtocol
from .ingress.limits import HttpLimits
from .ingress.compress import Compression
from .ingress.proxy import TrustedProxies
from .ingress.tls import ReloadingContext
from .ingress.tls_accept import TlsListener
from .observe.logs import JsonLog, install_library_logs
from .observe.metrics import Metrics
from .observe.routes import route_info
from .observe.tracing import make_tracer
from .auth import Authenticator
from .openapi import OpenApiCache
from .health import builtins
from .health.admin import AdminServer
from .files import replace_atomically
from .listeners import WorkerSockets, bind_exclusive, keep_alive, listen
from .pipeline import Pipeline
from .ratelimit import RateLimiter
from .reload import Reloader
from .routing.fleet import FleetMember
from .routing.state import RoutingState
from .transport import headers as forward_headers
from .transport.frame import FRAME_TYPE_NAMES
from .transport.hub import TransportHub


def check_httptools_strict() -> None:
    """Refuse to start on an httptools that cannot switch llhttp's leniencies off.

    Lenient parsing (bare LF, obs-fold, chunk extensions without CRLF ...) is what request
    smuggling between a proxy and us would exploit; see docs/security.md §3c.
    """
    class _Sink:
        pass

    parser = httptools.HttpRequestParser(_Sink())
    if not hasattr(parser, "set_dangerous_leniencies"):
        raise RuntimeError("httptools >= 0.6.2 is required (llhttp strict mode); "
                           f"found {httptools.__version__}")
    _strict(parser)
    try:
        parser.feed_data(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n")
    except httptools.HttpParserError:
        return
    raise RuntimeError("httptools accepted a bare LF in a header: llhttp is not strict")


def _strict(parser) -> None:
    parser.set_dangerous_leniencies(
        lenient_headers=False, lenient_chunked_length=False, lenient_keep_alive=False,
        lenient_transfer_encoding=False, lenient_version=False, lenient_data_after_close=False,
        lenient_optional_lf_after_cr=False, lenient_optional_cr_before_lf=False,
        lenient_optional_crlf_after_chunk=False)


def listen_socket(host: str, port: int, backlog: int,
                  key: str = "gateway.http.port") -> socket.socket:
    """A listening socket of this worker alone (no SO_REUSEPORT: a port in use is refused
    with a ListenerError naming `key`)."""
    return listen(bind_exclusive(key, host, port), backlog)


# How often, at most, "out of file descriptors" is logged; the metric counts every check.
_FD_LOG_INTERVAL = 10.0
_READY_STATUSES = ("Healthy", "Degraded")


class Worker:
    def __init__(self, settings, worker_id: int = 0, log: JsonLog | None = None,
                 transport_ports: dict | None = None, run_dir: str | None = None,
                 span_exporter=None, config_source=None, heartbeat=None):
        gw = settings.gateway
        self.settings = settings
        self._heartbeat = heartbeat     # the supervisor's watchdog (watchdog.py): once a tick
        self.worker_id = worker_id
        self.node_id = gw.node.node_id
        self.http_settings = HttpLimits(gw)
        forward_headers.configure(gw.http.strip_request_headers)
        # None when no proxy is trusted: the ingress then reads no forwarding header at all.
        self.trusted_proxies = TrustedProxies(gw.http.trusted_proxies) or None
        self.compression = Compression(gw.compression) if gw.compression.enabled else None
        self.log = log or JsonLog(gw.logging.level, access_log=gw.logging.access_log)
        self.log.extra = {"node": self.node_id, "worker": worker_id}
        self.metrics = Metrics(run_dir, worker_id, frame_names=FRAME_TYPE_NAMES)
        # Correlation ids (prefix: random per worker) and the per-request metrics and log line.
        self.accounting = Accounting(self, os.urandom(4).hex() + "%02x" % (worker_id & 0xFF))
        self.connections: set[HttpProtocol] = set()
        self.websockets_open = 0    # client connections handed over to picows, still open
        # gateway.http.maxConnectionsPerClient: open connections (WebSockets included) by
        # client address; an address is forgotten with its last connection.
        self.per_client: dict[bytes, int] = {}
        # Client connections paused for writing → what they owed then: answers their
        # clients have not taken, summed against gateway.http.responseBufferBudget.
        self.backlogged: dict = {}
        self.backlog_total = 0
        # HTTPS connections in their TLS handshake: counted against both caps until it ends
        # (ingress/tls_accept.py).
        self.handshakes: set = set()
        self.refused_connections: dict[str, int] = {}   # at accept, by reason
        self.aborted_connections: dict[str, int] = {}   # cut by the gateway, by reason
        self.failed_handshakes: dict[str, int] = {}     # HTTPS handshakes failed, by reason
        # Failed HTTPS handshakes of each client address since the last tick (a second):
        # past HANDSHAKE_FAILURES the address is reset at accept (ingress/tls_accept.py).
        self.handshake_failures: dict[bytes, int] = {}
        self.metrics.sources.append(self._connection_counters)
        # The tick's clock, the Date line, draining: what connections read per request.
        self.edge = EdgeState(time.monotonic())
        self.auth_events: dict[str, int] = {}
        self._drain_started = False
        self.started = False
        self.http_address: tuple | None = None
        self._update_date()
        self._servers: list[asyncio.AbstractServer] = []     # client listener(s)
        self._admin_servers: list[asyncio.AbstractServer] = []
        self.admin_address: tuple | None = None
        self._tick_handle = None
        self._stopped = asyncio.Event()
        self._run_dir = run_dir
        # Warm start: (service, instance id) pairs still expected to reach this worker.
        self.warming: set | None = None
        self._published_instances = None
        self._published_routes = None
        self.fd_exhausted: dict[str, int] = {}
        self._fd_logged_at = -_FD_LOG_INTERVAL
        self._fd_unlogged = 0
        health = gw.health
        self.routing = RoutingState(gw.node.region, gw.routing.neighbor_regions,
                                    health.heartbeat_interval_seconds,
                                    health.degraded_after_seconds,
                                    health.heartbeat_timeout_seconds,
                                    gw.routing.service_expiry)
        # Version weights and ramps, sticky keys, outlier ejection (docs/selection.md).
        self.routing.configure(gw.routing)
        self.routing.log = self.log
        self.metrics.sources.append(self.routing.counters)
        self.hub = TransportHub(self, self.routing, transport_ports)
        self.transport_addresses: dict[str, tuple] = {}
        self.tracing = make_tracer(settings, span_exporter)   # None when off
        self.auth = Authenticator(settings, self.log, on_event=self._auth_event)
        self.limiter = RateLimiter(settings, self.log)
        oa = gw.openapi
        self.openapi = OpenApiCache(
            self.routing, oa.title, oa.version, oa.cache_ttl_seconds,
            server_url=gw.http.public_origin or None,
            sender_constraints=tuple(k for k, on in (("dpop", gw.auth.dpop_enabled),
                                                      ("mtls", gw.auth.mtls_enabled)) if on),
            # PyYAML is slow: built off the loop, the last document served meanwhile; and
            # only when served at all (a disabled document follows no registration).
            background=gw.openapi.enabled)
        self.metrics.sources.append(self._counter_sources)
        self.metrics.sources.append(route_info(self.routing))   # latency SLOs skip streams
        # The environment check's latency, as a histogram (the limiter only times it).
        self.limiter.check_observer = self.metrics.phase_histogram("ratelimit_check").observe
        self.builtins = builtins.table(self)
        self.pipeline = Pipeline(self)
        self.metrics.sources.append(self.pipeline._retries.source)
        self.admin = AdminServer(self) if gw.admin.enabled else None
        self._auth_task = None
        # What the other pods route, through Valkey; None when gateway.node.fleet.valkey
        # is not set.
        self.fleet = FleetMember(self) if gw.node.fleet.valkey else None
        if self.fleet is not None:
            self.metrics.sources.append(self.fleet.counters)
        # SIGHUP and certificate files (stellagw/reload.py): `config_source` says where the
        # configuration came from; without one only certificates are reloaded.
        self.reloader = Reloader(self, config_source, run_dir)

    # ------------------------------------------------------------------ request path hooks

    # The worker's side of its EdgeState.
    @property
    def now(self) -> float:
        return self.edge.now

    @now.setter
    def now(self, value: float) -> None:
        self.edge.now = value

    @property
    def date_header(self) -> bytes:
        return self.edge.date_header

    @date_header.setter
    def date_header(self, value: bytes) -> None:
        self.edge.date_header = value

    @property
    def draining(self) -> bool:
        return self.edge.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.edge.draining = value

    @staticmethod
    def new_parser(protocol):
        parser = httptools.HttpRequestParser(protocol)
        _strict(parser)
        return parser

    def websocket_closed(self, client: bytes | None = None) -> None:
        self.websockets_open -= 1
        self.metrics.connection_closed()
        if client is not None:
            self.release_client(client)

    def admit_client(self, address: bytes, cap: int) -> bool:
        """Count one more connection of `address`, unless it holds `cap` already."""
        n = self.per_client.get(address, 0)
        if n >= cap:
            return False
        self.per_client[address] = n + 1
        return True

    def release_client(self, address: bytes) -> None:
        n = self.per_client.get(address, 0) - 1
        if n > 0:
            self.per_client[address] = n
        else:
            self.per_client.pop(address, None)

    def client_backlogged(self, conn) -> None:
        """`conn` (a client connection or WebSocket) does not take what it is sent: called
        as it pauses for writing, and again as more is written to it while paused. Past
        gateway.http.responseBufferBudget, summed over such connections, the ones owing the
        most are reset until the rest fit: a whole RESPONSE (up to maxFrameSize) goes to its
        client's buffer at once, and twenty clients reading nothing held 400 MB of 16 MB
        answers, for hours at minSendRate (docs/http-edge.md, "What one connection can
        hold"). `conn.buffered()` says what it holds; `conn.cut(reason)` resets it."""
        backlogged = self.backlogged
        n = conn.buffered()
        total = self.backlog_total + n - backlogged.get(conn, 0)
        backlogged[conn] = n
        if total > self.http_settings.response_buffer_budget:
            budget = self.http_settings.response_buffer_budget
            for c, m in sorted(backlogged.items(), key=lambda item: item[1], reverse=True):
                if total <= budget:
                    break
                del backlogged[c]
                total -= m
                c.cut("buffer_budget")
        self.backlog_total = total

    def client_caught_up(self, conn) -> None:
        n = self.backlogged.pop(conn, None)
        if n is not None:
            self.backlog_total -= n

    def connection_refused(self, reason: str) -> None:
        self.refused_connections[reason] = self.refused_connections.get(reason, 0) + 1

    def connection_aborted(self, reason: str) -> None:
        self.aborted_connections[reason] = self.aborted_connections.get(reason, 0) + 1

    def handshake_failed(self, reason: str) -> None:
        self.failed_handshakes[reason] = self.failed_handshakes.get(reason, 0) + 1

    def _connection_counters(self) -> dict:
        return {"gateway_connections_refused": (
            "Client connections refused at accept (answered 503 and closed; with TLS, reset "
            "before the handshake), by reason: limit (maxConnections), per_client "
            "(maxConnectionsPerClient), proxy_protocol (proxyProtocol: no valid PROXY header "
            "(over HTTPS before the handshake), or from an untrusted peer), handshake_failures "
            "(HTTPS: the address's TLS handshakes failed too often in the last second)", ("reason",),
            [((k,), v) for k, v in self.refused_connections.items()]),
            "gateway_connections_aborted": (
                "Client connections the gateway cut, by reason: send_timeout (owed bytes "
                "and none taken for sendTimeout), send_rate (less than minSendRate taken), "
                "handshake_timeout (TLS handshake not done in headerReadTimeout), "
                "header_timeout (not a byte of a request in headerReadTimeout from accept: 408), "
                "buffer_budget (owed the most when the answers held for paused clients passed "
                "responseBufferBudget)", ("reason",),
                [((k,), v) for k, v in self.aborted_connections.items()]),
            "gateway_tls_handshake_failures": (
                "HTTPS connections whose TLS handshake failed, by reason: client_certificate "
                "(did not verify against clientCaPath), protocol (no TLS version, cipher or "
                "record both sides accept, or not TLS), closed (the peer went away in it)",
                ("reason",), [((k,), v) for k, v in self.failed_handshakes.items()])}

    def correlation_id(self, headers) -> str:
        return self.accounting.correlation_id(headers)

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # ------------------------------------------------------------------ health

    def _counter_sources(self) -> dict:
        c = self.limiter.counters
        return {
            "gateway_fd_exhausted": (
                "Once-a-second checks that found no file descriptor to open (while it lasts, "
                "libuv accepts and closes new connections unanswered; HTTPS ones wait in the "
                "backlog)", ("errno",),
                [((k,), v) for k, v in self.fd_exhausted.items()]),
            "gateway_log_lines_dropped": (
                "Log lines dropped because the output (stdout) did not take them: 16 MiB were "
                "waiting for it", (), [((), self.log.dropped_total)]),
            "gateway_admin_connections_gauge": (
                "Open connections on the admin listener", (),
                [((), self.admin.metrics.connections_open if self.admin is not None else 0)]),
            "gateway_auth_events": ("Authentication events that are not failures (key refresh "
                                    "trouble, Valkey replay-cache fallbacks)", ("event",),
                                    [((k,), v) for k, v in self.auth_events.items()]),
            "gateway_ratelimit_decisions": (
                "Rate-limit decisions by tier and outcome", ("scope", "outcome"),
                [((scope, "allowed"), v) for scope, v in c["allowed"].items()]
                + [((scope, "rejected"), v) for scope, v in c["rejected"].items()]),
            "gateway_ratelimit_rejections_by_limit": (
                "429s by tier and by what the limit counted (an identity, or a tenant as a "
                "whole)", ("scope", "applies_to"),
                [((scope, applies), v) for (scope, applies), v
                 in c["rejected_by_limit"].items()]),
            "gateway_ratelimit_environment_skipped": (
                "Environment checks skipped (activation gate, no rules, breaker open)",
                ("reason",), [((k,), v) for k, v in c["environment_skipped"].items()]),
            "gateway_ratelimit_valkey_errors": (
                "Valkey errors of the environment check, by type", ("type",),
                [((k,), v) for k, v in c["valkey_errors"].items()]),
            "gateway_ratelimit_breaker_trips": (
                "Circuit breaker openings, by reason", ("reason",),
                [((k,), v) for k, v in c["breaker_trips"].items()]),
            "gateway_ratelimit_breaker_state_gauge": (
                "Workers whose rate-limit circuit breaker is in each state", ("state",),
                [((state,), int(breaker is not None and breaker.state == state))
                 for breaker in (getattr(self.limiter, "breaker", None),)
                 for state in ("closed", "open", "half_open")]),
        }

    def _auth_event(self, name: str) -> None:
        # Not failures: key refresh trouble, Valkey replay fallbacks (docs/auth.md).
        self.auth_events[name] = self.auth_events.get(name, 0) + 1

    def not_ready_reasons(self) -> list[str]:
        reasons = list(self.auth.ready_reasons())
        # Only the required services' own instances, up to the first routable one: a set of
        # every instance's service was built for each /health/ready, which any client may
        # ask on the client port — 60 ns per instance, 0.6 ms a request at 10,000 of them,
        # whether any service was required or not.
        services = self.routing.services
        for name in self.settings.gateway.health.required_services:
            svc = services.get(name)
            if svc is None or not any(i.status in ("Healthy", "Degraded")
                                      for i in svc.members.values()):
                reasons.append(f"required service {name!r} has no routable instance")
        if self.draining:
            reasons.append("draining: the gateway is shutting down")
        if self.warming:
            reasons.append(f"starting: {len(self.warming)} service instance(s) known to the "
                           f"other workers have not reached this one yet")
        elif not self.started:
            reasons.append("starting: listeners are not up yet")
        if self.fleet is not None:
            reasons += self.fleet.reasons()
        for server in (*self._servers, *self._admin_servers):
            if not server.is_serving() and not self.draining:
                reasons.append("a listener is down")
        return reasons

    def startup_reasons(self) -> list[str]:
        reasons = [] if self.started else ["listeners are not up yet"]
        return reasons + list(self.auth.ready_reasons())

    def health_details(self) -> dict:
        out = {"services": self.routing.describe(), "config": self.reloader.describe()}
        if self.fleet is not None:
            out["fleet"] = self.fleet.describe()
        return out


    # ------------------------------------------------------------------ lifecycle

    async def start(self, http_sock: socket.socket | None = None,
                    transport_socks: list | None = None,
                    admin_sock: socket.socket | None = None) -> None:
        """Serve on the given sockets (bound and listening; with several workers, the
        supervisor's), or on sockets of this worker's own when none are given."""
        gw = self.settings.gateway
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        # Asked first, answered while the rest starts: a Valkey that is slow or gone costs
        # at most a few times fleet.timeout, once.
        fleet_read = None
        if self.fleet is not None and gw.node.fleet.warmup_timeout > 0:
            fleet_read = asyncio.ensure_future(self.fleet.read())
        ssl_ctx = None
        if gw.http.tls.enabled:
            # Reloaded in place on SIGHUP and when its files change (stellagw/reload.py).
            self.reloader.http_tls = ReloadingContext(gw.http.tls, "gateway.http.tls")
            ssl_ctx = self.reloader.http_tls.listening
        if http_sock is None:
            http_sock = listen_socket(gw.http.host, gw.http.port, gw.http.backlog)
        if self.admin is not None and admin_sock is None:
            admin_sock = listen_socket(gw.admin.host, gw.admin.port, 128, "gateway.admin.port")
        self.http_address = http_sock.getsockname()[:2]
        if transport_socks is None:
            transport_socks = self._own_transport_sockets()
        # Whoever was connected to this worker's predecessor: read before anything can change
        # the files (this worker publishes its own once a second).
        expected = self._expected_instances()
        sibling_routes = self._sibling_routes()
        await self.hub.start(transport_socks)
        self.reloader.check_expiry()
        self._tick_handle = loop.call_later(1.0, self._tick)
        if self._heartbeat is not None:
            self._heartbeat()           # judged from now on (the warm start below included)
        await self.limiter.start()
        if gw.openapi.enabled:
            self.openapi.warm()
        # Keys may take a while (an Authority that is down): serve meanwhile; readiness
        # says "no Authority keys yet" until they are in.
        self._auth_task = asyncio.ensure_future(self.auth.start())
        if admin_sock is not None:
            admin = self.admin
            self._admin_servers.append(await loop.create_server(
                lambda: HttpProtocol(admin), sock=admin_sock, backlog=128))
            self.admin_address = admin_sock.getsockname()[:2]
        await self._warm_up(expected)
        # The siblings' services that have not reached this worker (restarting, or gone
        # for less than serviceExpiry): 503 as on the siblings, not 404 (a worker restarted
        # while a service restarted answered 404 for it until it came back).
        for service, routes in sibling_routes.items():
            if service not in self.routing.services:
                self.routing.expect(service, routes, departed_at=time.monotonic())
        view = await fleet_read if fleet_read is not None else None
        if self._drain_started:
            # SIGTERM during the warm-up: this worker never serves clients.
            http_sock.close()
            return
        # Before clients: a route of a service the fleet routes is 503 from the first
        # request on, never 404.
        fleet_services = self.fleet.seed(view) if self.fleet is not None else set()
        keep_alive(http_sock, gw.http.tcp_keep_alive)     # inherited by each connection
        if ssl_ctx is not None:
            # Accepted here, not by uvloop: the connection caps must see a connection
            # before its handshake (ingress/tls_accept.py).
            server = TlsListener(self, http_sock, self.reloader.http_tls)
        else:
            server = await loop.create_server(
                lambda: HttpProtocol(self), sock=http_sock, backlog=gw.http.backlog)
        self._servers.append(server)
        self.started = True
        scheme = "https" if ssl_ctx else "http"
        addresses = {kind: _fmt_addr(addr) for kind, addr in self.transport_addresses.items()}
        if self.admin_address is not None:
            addresses["admin"] = "http://" + _fmt_addr(self.admin_address)
        self.log.event("info", "listening", version=__version__,
                       http=f"{scheme}://{_fmt_addr(self.http_address)}", pid=os.getpid(),
                       configHash=self.reloader.hash, **addresses)
        if gw.http.proxy_protocol != "off" and not gw.http.trusted_proxies:
            # Allowed (a port only the balancer reaches), but said: otherwise any client
            # that reaches it writes its own PROXY header, and its address is what it says.
            self.log.event("warning", "gateway.http.proxyProtocol without trustedProxies: "
                           "a PROXY header is believed from any peer; list the balancers")
        self.log.flush()
        if self.fleet is not None:
            self.fleet.begin(view, fleet_services, t0)

    def _own_transport_sockets(self) -> list:
        """The transport port(s), plus this worker's private port when the supervisor
        assigned private ports (several workers); one worker alone names its shared port
        in the HELLO_ACK."""
        gw = self.settings.gateway
        socks = []
        assigned = self.hub._ports
        ports = {}
        for kind in ("tcp", "tls"):
            node = getattr(gw.transports, kind)
            if not node.enabled:
                continue
            sock = listen_socket(node.host, node.port, 512, f"gateway.transports.{kind}.port")
            socks.append((kind, sock))
            self.transport_addresses[kind] = sock.getsockname()[:2]
            private = assigned.get(kind)
            if private:
                own = listen_socket(node.host, private[self.worker_id], 512,
                                    f"gateway.transports.{kind}.host")
                socks.append((kind, own))
                ports[kind] = dict(private)
            else:
                ports[kind] = {self.worker_id: sock.getsockname()[1]}
        self.hub._ports = ports
        return socks

    def use_sockets(self, sockets: WorkerSockets) -> tuple:
        """The supervisor's sockets for this worker → start()'s arguments. The first
        transport socket of each kind is the public port's (listeners.bind_instance)."""
        ports = {}
        for kind, sock in sockets.transports:
            if kind not in self.transport_addresses:
                self.transport_addresses[kind] = sock.getsockname()[:2]
                ports[kind] = (dict(sockets.private_ports[kind]) if kind in sockets.private_ports
                               else {self.worker_id: sock.getsockname()[1]})
        self.hub._ports = ports
        return sockets.http, list(sockets.transports), sockets.admin

    # ------------------------------------------------------------------ warm start

    def _routable_instances(self) -> set:
        return {(i.service, i.instance_id) for i in list(self.routing.instances.values())
                if i.status in _READY_STATUSES}

    def _sibling_files(self, prefix: str):
        """The parsed JSON of each `<prefix>*.json` the workers (this one's predecessor too)
        published in the run directory; a file that cannot be read or parsed is skipped."""
        if not self._run_dir:
            return
        try:
            names = os.listdir(self._run_dir)
        except OSError:
            return
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".json")):
                continue
            try:
                with open(os.path.join(self._run_dir, name), "rb") as f:
                    yield orjson.loads(f.read())
            except (OSError, ValueError):
                continue

    def _expected_instances(self) -> set:
        """What the other workers (and this worker's predecessor, in its own file) had
        routable when they last published: the instances that will dial this worker."""
        expected: set = set()
        for view in self._sibling_files("instances-"):
            try:
                expected.update((svc, iid) for svc, iid in view)
            except (ValueError, TypeError):
                continue
        return expected

    def _sibling_routes(self) -> dict:
        """{service: routes} every worker (this one's predecessor too) had routes of when
        it last published, registered or departed."""
        merged: dict = {}
        for view in self._sibling_files("routes-"):
            try:
                for service, routes in view.items():
                    if isinstance(service, str) and isinstance(routes, list):
                        merged.setdefault(service, [tuple(r) for r in routes
                                                    if isinstance(r, list) and len(r) == 3])
            except (ValueError, TypeError, AttributeError):
                continue
        return merged

    def _publish_instances(self) -> None:
        if not self._run_dir or self.warming:
            return   # a warming worker's partial view would only lower its siblings' bar
        generation = self.routing.generation
        if generation != self._published_routes:
            path = os.path.join(self._run_dir, f"routes-{self.worker_id}.json")
            try:
                replace_atomically(path, orjson.dumps(self.routing.route_view()))
                self._published_routes = generation
            except OSError:
                pass
        now = self._routable_instances()
        if now == self._published_instances:
            return
        path = os.path.join(self._run_dir, f"instances-{self.worker_id}.json")
        try:
            replace_atomically(path, orjson.dumps(sorted(now)))
        except OSError:
            return
        self._published_instances = now

    async def _warm_up(self, expected: set) -> None:
        if not expected:
            return
        timeout = self.settings.gateway.node.warmup_timeout
        t0 = time.monotonic()
        self.warming = set(expected)
        self.log.event("info", "warming up", instances=len(expected), timeout=timeout)
        self.log.flush()
        try:
            while not self._drain_started:
                self.warming = expected - self._routable_instances()
                if not self.warming or time.monotonic() - t0 >= timeout:
                    break
                await asyncio.sleep(0.02)
        finally:
            missing = sorted(f"{svc}/{iid}" for svc, iid in self.warming)
            self.warming = None
        self.log.event("info" if not missing else "warning", "warm",
                       ms=round((time.monotonic() - t0) * 1000), missing=missing[:20],
                       missingCount=len(missing))

    # ------------------------------------------------------------------ the tick

    def _update_date(self) -> None:
        self.date_header = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(1.0, self._tick)
        self.now = time.monotonic()
        if self._heartbeat is not None:
            self._heartbeat()
        self._update_date()
        self.handshake_failures.clear()
        now = self.now
        for conn in list(self.connections):
            conn.check_deadline(now)
        if self.admin is not None:
            for conn in list(self.admin.connections):
                conn.check_deadline(now)
        self._check_descriptors()
        self._publish_instances()
        self.reloader.tick()
        self.log.flush()
        self.metrics.publish()

    def _check_descriptors(self) -> None:
        """uvloop never reports EMFILE/ENFILE on accept: libuv accepts and closes the waiting
        connections itself (the HTTPS listener, which accepts itself, leaves them in the
        backlog meanwhile: ingress/tls_accept.py). So once a second, try to open one
        descriptor."""
        try:
            os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            return
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return
            name = errno.errorcode[exc.errno]
        self.fd_exhausted[name] = self.fd_exhausted.get(name, 0) + 1
        self._fd_unlogged += 1
        if self.now - self._fd_logged_at >= _FD_LOG_INTERVAL:
            self._fd_logged_at = self.now
            self.log.event("error", "out of file descriptors: new connections are closed "
                           "unanswered", errno=name, seconds=self._fd_unlogged,
                           clients=len(self.connections), services=len(self.hub.connections))
            self._fd_unlogged = 0

    # ------------------------------------------------------------------ drain

    async def drain(self, delay: float = 0.0) -> None:
        """Not ready at once; `delay` seconds later (SIGTERM: preStopDelay) no new
        connections; then in-flight work finishes, idle connections close, and it stops."""
        if self._drain_started:
            return
        self._drain_started = True
        # Readiness fails from here, and every answer says `Connection: close`, so
        # keep-alive clients move elsewhere while this worker still answers them.
        self.draining = True
        gw = self.settings.gateway
        self.log.event("info", "draining", connections=len(self.connections), delay=delay)
        self.log.flush()
        if delay > 0 and self.started:
            await asyncio.sleep(delay)
        for server in self._servers:
            server.close()
        self.hub.close_listeners()
        self.hub.drain()
        self.log.event("info", "listeners closed", connections=len(self.connections))
        deadline = time.monotonic() + gw.http.shutdown_timeout
        while True:
            for conn in list(self.connections):
                # Idle is not enough (the SIGTERM failures of issue 16): a keep-alive client
                # sends its next request right after an answer, so an "idle" connection may
                # have it in the socket, unread, or on its way. Only a connection quiet for
                # a while is closed; a busy one gets its next answer with Connection: close.
                if conn.is_idle() and _quiet(conn):
                    conn.close()
                    conn.abort_if_only_waiting()
            # WebSockets are picows' connections, not in self.connections: they too have
            # until the deadline (without this the drain ended as soon as the HTTP
            # connections had, and cut every WebSocket at preStopDelay).
            if ((not self.connections and not self.websockets_open)
                    or time.monotonic() >= deadline):
                break
            await asyncio.sleep(0.05)
        # What the deadline cuts: HTTP connections still open, and WebSockets.
        unfinished = len(self.connections) + self.websockets_open
        self.hub.shutdown()
        for handshake in list(self.handshakes):
            handshake.abort()
        for conn in list(self.connections):
            conn.close()
        # The admin listener last: probes and scrapes see the whole drain.
        for server in self._admin_servers:
            server.close()
        if self.admin is not None:
            for conn in list(self.admin.connections):
                conn.close()
        self.auth.stop()
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
        if self.fleet is not None:
            await self.fleet.close()
        await self.limiter.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        # The last counts go to the instance's files: a worker that exits between two
        # publishes would otherwise take up to a second of them with it.
        self.metrics.publish()
        self.log.event("info", "stopped", unfinished=unfinished)
        self.log.drain()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


# A connection closed while idle must have heard nothing from its client for this long: a
# client in a request loop sends again within microseconds to milliseconds of an answer.
_QUIET = 0.25
_TCP_INFO_LAST_DATA_RECV = 52   # struct tcp_info: 8 one-byte fields, 9 u32, then 3 times


def _quiet(conn) -> bool:
    """No byte unread in the socket, and none received for _QUIET seconds."""
    transport = conn.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
        if buf[0] > 0:
            return False
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    except (OSError, ValueError):
        return True
    if len(info) < _TCP_INFO_LAST_DATA_RECV + 4:
        return True
    last_recv_ms = int.from_bytes(info[_TCP_INFO_LAST_DATA_RECV:_TCP_INFO_LAST_DATA_RECV + 4],
                                  sys.byteorder)
    return last_recv_ms >= _QUIET * 1000


def _fmt_addr(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_worker(settings, worker_id: int = 0, sockets: WorkerSockets | None = None,
               run_dir: str | None = None, config_source=None, heartbeat=None) -> int:
    """Run one worker until SIGTERM/SIGINT has drained it (SIGHUP: reload). Returns the
    exit code."""
    import uvloop

    async def main():
        worker = Worker(settings, worker_id, run_dir=run_dir, config_source=config_source,
                        heartbeat=heartbeat)
        loop = asyncio.get_running_loop()
        install_library_logs(worker.log, loop)
        # SIGTERM is an orchestrator's: wait preStopDelay for load balancers to notice the
        # failing readiness. SIGINT is a person's at a terminal: stop now. The delay is
        # read when the signal comes: a reload may have changed it.
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(
            worker.drain(worker.settings.gateway.node.pre_stop_delay)))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(worker.drain()))
        loop.add_signal_handler(signal.SIGHUP, worker.reloader.signalled)
        worker.reloader.catch_up()
        args = worker.use_sockets(sockets) if sockets is not None else ()
        await worker.start(*args)
        # What exists now (modules, configuration, tables) lives as long as the process:
        # out of the collector's sight, a full collection scans only what came later. It
        # took ~10 ms of paused loop per full collection, a visible p99 (perf/README.md).
        gc.collect()
        gc.freeze()
        await worker.wait_stopped()

    check_httptools_strict()
    uvloop.run(main())
    return 0
