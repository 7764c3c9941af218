"""The composition root of one worker: builds the stages, owns start / ready / drain / stop.

A worker is one process with one uvloop loop. It accepts client HTTP on its own
SO_REUSEPORT socket (so several workers share a port and the kernel spreads connections),
and runs a once-a-second tick that moves the coarse clock, the Date header and every
connection's deadline — no timer object per request.
"""
from __future__ import annotations

import asyncio
import email.utils
import gc
import os
import signal
import socket
import time

import httptools

from . import __version__
from .ingress.http import Accounting, HttpProtocol
from .ingress.tls import server_context
from .observe.logs import JsonLog
from .observe.metrics import Metrics
from .observe.tracing import make_tracer
from .auth import Authenticator
from .openapi import OpenApiCache
from .health import builtins
from .pipeline import Pipeline
from .ratelimit import RateLimiter
from .routing.state import RoutingState
from .transport import headers as forward_headers
from .transport.hub import TransportHub



class HttpLimits:
    """The request-path settings as flat attributes: one attribute read per check."""

    __slots__ = ("max_connections", "max_header_bytes", "max_header_count", "max_url_length",
                 "header_read_timeout", "keep_alive_timeout", "max_request_body_size",
                 "body_read_timeout", "min_body_rate")

    def __init__(self, gw):
        http = gw.http
        self.max_connections = http.max_connections
        self.max_header_bytes = http.max_header_bytes
        self.max_header_count = http.max_header_count
        self.max_url_length = http.max_url_length
        self.header_read_timeout = http.header_read_timeout
        self.keep_alive_timeout = http.keep_alive_timeout
        self.max_request_body_size = gw.routing.max_request_body_size
        self.body_read_timeout = http.body_read_timeout
        self.min_body_rate = http.min_body_rate


def check_httptools_strict() -> None:
    """Refuse to start on an httptools that cannot switch llhttp's leniencies off.

    Lenient parsing (bare LF, obs-fold, chunk extensions without CRLF ...) is what request
    smuggling between a proxy and us would exploit; see reference/security-checklists.md.
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


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


class Worker:
    def __init__(self, settings, worker_id: int = 0, log: JsonLog | None = None,
                 transport_ports: dict | None = None, run_dir: str | None = None,
                 span_exporter=None):
        gw = settings.gateway
        self.settings = settings
        self.worker_id = worker_id
        self.node_id = gw.node.node_id
        self.http_settings = HttpLimits(gw)
        forward_headers.configure(gw.http.strip_request_headers)
        self.log = log or JsonLog(gw.logging.level, access_log=gw.logging.access_log)
        self.log.extra = {"node": self.node_id, "worker": worker_id}
        self.metrics = Metrics(run_dir, worker_id)
        # Correlation ids (prefix: random per worker) and the per-request metrics and log line.
        self.accounting = Accounting(self, os.urandom(4).hex() + "%02x" % (worker_id & 0xFF))
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self.auth_events: dict[str, int] = {}
        self._drain_started = False
        self.started = False
        self.http_address: tuple | None = None
        self.now = time.monotonic()
        self.date_header = b""
        self._update_date()
        self._servers: list[asyncio.AbstractServer] = []
        self._tick_handle = None
        self._stopped: asyncio.Event | None = None
        health = gw.health
        self.routing = RoutingState(gw.node.region, gw.routing.neighbor_regions,
                                    health.heartbeat_interval_seconds,
                                    health.degraded_after_seconds,
                                    health.heartbeat_timeout_seconds)
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
            background=True)   # PyYAML is slow: build off the loop, serve the last document
        self.metrics.sources.append(self._counter_sources)
        # The environment check's latency, as a histogram (the limiter only times it).
        self.limiter.check_observer = self.metrics.phase_histogram("ratelimit_check").observe
        self.builtins = builtins.table(self)
        self.pipeline = Pipeline(self)
        self._auth_task = None

    # ------------------------------------------------------------------ request path hooks

    @staticmethod
    def new_parser(protocol):
        parser = httptools.HttpRequestParser(protocol)
        _strict(parser)
        return parser

    def correlation_id(self, headers) -> str:
        return self.accounting.correlation_id(headers)

    def render_metrics(self) -> bytes:
        return self.metrics.render()

    # ------------------------------------------------------------------ health

    def _counter_sources(self) -> dict:
        c = self.limiter.counters
        return {
            "gateway_auth_events": ("Authentication events that are not failures (key refresh "
                                    "trouble, Valkey replay-cache fallbacks)", ("event",),
                                    [((k,), v) for k, v in self.auth_events.items()]),
            "gateway_ratelimit_decisions": (
                "Rate-limit decisions by tier and outcome", ("scope", "outcome"),
                [((scope, "allowed"), v) for scope, v in c["allowed"].items()]
                + [((scope, "rejected"), v) for scope, v in c["rejected"].items()]),
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
        routable = {i.service for i in self.routing.instances.values()
                    if i.status in ("Healthy", "Degraded")}
        for name in self.settings.gateway.health.required_services:
            if name not in routable:
                reasons.append(f"required service {name!r} has no routable instance")
        if self.draining:
            reasons.append("draining: the gateway is shutting down")
        if not self.started:
            reasons.append("starting: listeners are not up yet")
        for server in self._servers:
            if not server.is_serving() and not self.draining:
                reasons.append("a listener is down")
        return reasons

    def startup_reasons(self) -> list[str]:
        reasons = [] if self.started else ["listeners are not up yet"]
        return reasons + list(self.auth.ready_reasons())

    def health_details(self) -> dict:
        return {"services": self.routing.describe()}


    # ------------------------------------------------------------------ lifecycle

    async def start(self, http_sock: socket.socket | None = None,
                    transport_socks: list | None = None) -> None:
        gw = self.settings.gateway
        loop = asyncio.get_running_loop()
        ssl_ctx = server_context(gw.http.tls, "gateway.http.tls") if gw.http.tls.enabled else None
        if http_sock is None:
            http_sock = listen_socket(gw.http.host, gw.http.port, gw.http.backlog)
        server = await loop.create_server(
            lambda: HttpProtocol(self), sock=http_sock, ssl=ssl_ctx, backlog=gw.http.backlog,
            ssl_handshake_timeout=gw.http.header_read_timeout if ssl_ctx else None)
        self._servers.append(server)
        self.http_address = http_sock.getsockname()[:2]
        if transport_socks is None:
            transport_socks = self._own_transport_sockets()
        await self.hub.start(transport_socks)
        self._stopped = asyncio.Event()
        self._tick_handle = loop.call_later(1.0, self._tick)
        await self.limiter.start()
        if gw.openapi.enabled:
            self.openapi.warm()
        # Keys may take a while (an Authority that is down): serve meanwhile; readiness
        # says "no Authority keys yet" until they are in.
        self._auth_task = asyncio.ensure_future(self.auth.start())
        self.started = True
        scheme = "https" if ssl_ctx else "http"
        transports = {kind: _fmt_addr(addr) for kind, addr in self.transport_addresses.items()}
        self.log.event("info", "listening", version=__version__,
                       http=f"{scheme}://{_fmt_addr(self.http_address)}", pid=os.getpid(),
                       **transports)
        self.log.flush()

    def _own_transport_sockets(self) -> list:
        """The shared transport port(s), plus this worker's private port when the
        supervisor assigned private ports (several workers); one worker alone names its
        shared port in the HELLO_ACK."""
        gw = self.settings.gateway
        socks = []
        assigned = self.hub._ports
        ports = {}
        for kind in ("tcp", "tls"):
            node = getattr(gw.transports, kind)
            if not node.enabled:
                continue
            sock = listen_socket(node.host, node.port, 512)
            socks.append((kind, sock))
            self.transport_addresses[kind] = sock.getsockname()[:2]
            private = assigned.get(kind)
            if private:
                own = listen_socket(node.host, private[self.worker_id], 512)
                socks.append((kind, own))
                ports[kind] = dict(private)
            else:
                ports[kind] = {self.worker_id: sock.getsockname()[1]}
        self.hub._ports = ports
        return socks

    def _update_date(self) -> None:
        self.date_header = b"date: " + email.utils.formatdate(usegmt=True).encode() + b"\r\n"

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._tick_handle = loop.call_later(1.0, self._tick)
        self.now = time.monotonic()
        self._update_date()
        now = self.now
        for conn in list(self.connections):
            conn.check_deadline(now)
        self.log.flush()
        self.metrics.publish()

    async def drain(self) -> None:
        """SIGTERM: not ready, no new connections, finish in-flight work, then stop."""
        if self._drain_started:
            return
        self._drain_started = True
        self.draining = True
        self.log.event("info", "draining", connections=len(self.connections))
        for server in self._servers:
            server.close()
        self.hub.close_listeners()
        self.hub.drain()
        deadline = time.monotonic() + self.settings.gateway.http.shutdown_timeout
        while True:
            for conn in list(self.connections):
                if conn.is_idle():
                    conn.close()
            if not self.connections or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        self.hub.shutdown()
        for conn in list(self.connections):
            conn.close()
        self.auth.stop()
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
        await self.limiter.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        self.log.event("info", "stopped", unfinished=len(self.connections))
        self.log.drain()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


def _fmt_addr(addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_worker(settings, worker_id: int = 0, http_sock: socket.socket | None = None,
               transport_ports: dict | None = None, run_dir: str | None = None) -> int:
    """Run one worker until SIGTERM/SIGINT has drained it. Returns the exit code."""
    import uvloop

    async def main():
        worker = Worker(settings, worker_id, transport_ports=transport_ports, run_dir=run_dir)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(worker.drain()))
        await worker.start(http_sock)
        # What exists now (modules, configuration, tables) lives as long as the process:
        # out of the collector's sight, a full collection scans only what came later. It
        # took ~10 ms of paused loop per full collection, a visible p99 (perf/README.md).
        gc.collect()
        gc.freeze()
        await worker.wait_stopped()

    check_httptools_strict()
    uvloop.run(main())
    return 0
