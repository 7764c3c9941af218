"""The HTTPS client listener: the connection caps apply at accept, before the TLS handshake.

uvloop's `create_server(ssl=...)` hands the application its connection only once the
handshake is done, so the caps in HttpProtocol.connection_made never saw a connection
held in its handshake; `start_tls` from connection_made loses the ClientHello to the plain
protocol (uvloop reads as soon as connection_made returns). So this listener accepts
itself: the caps are checked with the address accept() gives, before any transport or SSL
object exists; a refused connection is reset (a TLS client can be told nothing before a
handshake); an admitted one is handed to `loop.connect_accepted_socket(ssl=...)` with
headerReadTimeout as its handshake deadline, and holds its places until the handshake
ends — done, they pass to its HttpProtocol in one step; failed or timed out, they are
freed. docs/http-edge.md, "Connection caps", has the reasons and the uvloop source they
rest on.

With `proxyProtocol` on, a load balancer writes its PROXY header before the client's first
TLS byte (it does not terminate TLS: mTLS-bound tokens need the client's certificate here).
So the header is read off the raw socket first, exactly its own bytes, under the same
deadline; the per-client cap then counts the source it names, and the handshake starts on
what follows (docs/http-edge.md, "Client address").
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import time

from cryptography import x509

from ..listeners import HANDSHAKE_FAILURES, Acceptor, reset_socket
from .http import D_HEADER, HttpProtocol
from .proxy import V2_MAX, ProxyError, client_key, parse_proxy_header

def _failure(exc: BaseException) -> str:
    """What a failed handshake is counted as: a client certificate that did not verify (a
    CA rotated on one side only shows here first), a peer that does not speak our TLS
    (version, ciphers, not TLS at all), or one that went away in the middle."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "client_certificate"
    if isinstance(exc, ssl.SSLError):
        return "protocol"
    return "closed"


def _forget_expired(protocol, transport) -> None:
    """A resumed session brings the client certificate verified at its full handshake, and
    OpenSSL does not look at it again: for the ticket's lifetime (2 hours) it stood for a
    certificate that had since expired, and a token bound to it was accepted. Such a
    connection has no certificate (a bound token is then 401 `mtls_missing_certificate`;
    a new full handshake refuses the certificate). docs/security.md §3d row 54."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or not ssl_object.session_reused:
        return
    # From the DER, not getpeercert()'s dictionary: that decodes every name the
    # certificate holds (2.3 ms for 3,500 DNS names), this only what is asked.
    try:
        expires = x509.load_der_x509_certificate(protocol.peer_cert).not_valid_after_utc.timestamp()
    except ValueError:
        expires = 0             # unreadable: not believed either
    if expires <= time.time():
        protocol.peer_cert = None


class Handshake(asyncio.Protocol):
    """One accepted connection in its TLS handshake, holding its place in the caps. It is
    the SSLProtocol's application protocol until the handshake is done, then hands the
    connection to an HttpProtocol."""

    __slots__ = ("worker", "key", "client", "sock", "task", "head_due", "proxied", "_header",
                 "_timer", "_listener")

    def __init__(self, worker, sock: socket.socket, key: bytes | None, timeout: float,
                 client: bytes | None = None):
        self.worker = worker
        self.key = key              # counted in worker.per_client, or None
        self.client = client        # whose failures count (HANDSHAKE_FAILURES), or None
        self.sock = sock            # until uvloop's transport owns it
        self.task = None
        # With proxyProtocol: the source the PROXY header named ("" for LOCAL / UNKNOWN:
        # the TCP peer), once read; None before (or without proxyProtocol).
        self.proxied = None
        self._header = None         # bytes of the PROXY header taken so far, while reading it
        self._timer = None
        self._listener = None       # the TlsListener, while reading the PROXY header
        # The first head is due headerReadTimeout after accept (the tick's clock, as
        # HttpProtocol's deadlines): the handshake's time comes out of it.
        self.head_due = worker.edge.now + timeout

    def _factory(self):
        self.sock = None            # the transport closes it from now on
        return self

    def release(self) -> None:
        worker = self.worker
        if self in worker.handshakes:
            worker.handshakes.discard(self)
            if self.key is not None:
                worker.release_client(self.key)

    def connection_made(self, transport):
        # The handshake is done. The place is given up and taken again by HttpProtocol in
        # the same call: nothing else can take it meanwhile, so it never fails for caps
        # this connection already passed.
        self.release()
        protocol = HttpProtocol(self.worker)
        protocol.proxied = self.proxied
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if protocol.peer_cert is not None:
            _forget_expired(protocol, transport)
        if protocol.deadline_kind == D_HEADER:
            protocol.deadline = self.head_due

    def finished(self, task) -> None:
        self.task = None
        self.drop()                     # the socket too, if it ended before uvloop took it
        if task.cancelled():
            return
        exc = task.exception()      # retrieved: a failed handshake is not the loop's error
        if isinstance(exc, ConnectionAbortedError):
            # uvloop's handshake deadline (SSLProtocol._check_handshake_timeout).
            self.worker.connection_aborted("handshake_timeout")
        elif exc is not None:
            reason = _failure(exc)
            worker = self.worker
            worker.handshake_failed(reason)
            if reason != "closed" and self.client is not None:
                failures = worker.handshake_failures
                failures[self.client] = failures.get(self.client, 0) + 1

    # ------------------------------------------------------------ the PROXY header

    def read_proxy(self, listener, mode: str, peer: str) -> None:
        """Read the PROXY header off the raw socket, then start the handshake on the bytes
        after it. The deadline is the handshake's: headerReadTimeout from accept."""
        loop = listener._loop
        self._listener = listener
        self._header = b""
        self.sock.setblocking(False)    # accept() gives a blocking socket
        loop.add_reader(self.sock.fileno(), self._proxy_readable, mode, peer)
        self._timer = loop.call_later(max(self.head_due - self.worker.edge.now, 0.0),
                                      self._proxy_expired)

    def _proxy_readable(self, mode: str, peer: str) -> None:
        sock = self.sock
        # Peeked, not read: bytes past the header are the ClientHello, left in the socket
        # for uvloop's SSL transport (which cannot be handed bytes already read).
        try:
            data = sock.recv(V2_MAX - len(self._header), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:                        # closed (or reset) before the header ended
            self.drop()
            return
        header = self._header + data
        try:
            parsed = parse_proxy_header(header, mode)
        except ProxyError:
            self.worker.connection_refused("proxy_protocol")
            self.drop()
            return
        # What is header is taken out of the socket: all of it while the header is not
        # complete (else the peek would see it again at once, level-triggered, and spin
        # the loop), exactly the header's rest once it is. Peeked, so there to take.
        take = len(data) if parsed is None else parsed[0] - len(self._header)
        try:
            sock.recv(take)
        except OSError:
            self.drop()
            return
        if parsed is None:
            self._header = header
            return
        source = parsed[1]
        self._proxy_done()
        self.proxied = source or ""
        worker = self.worker
        limits = worker.http_settings
        cap = limits.max_connections_per_client
        client = client_key((source or peer).encode())
        if worker.handshake_failures.get(client, 0) >= HANDSHAKE_FAILURES:
            worker.connection_refused("handshake_failures")
            self.drop()
            return
        self.client = client
        if cap > 0:
            key = client
            if not worker.admit_client(key, cap):
                worker.connection_refused("per_client")
                self.drop()
                return
            self.key = key
        self._listener._start_tls(self)

    def _proxy_expired(self) -> None:
        self._timer = None
        self.worker.connection_aborted("handshake_timeout")
        self.drop()

    def _proxy_done(self) -> None:
        if self._header is not None:
            self._header = None
            self._listener._loop.remove_reader(self.sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def drop(self) -> None:
        """Refused or failed before uvloop took the socket (or it is still reading its
        PROXY header): give up the places, reset."""
        self._proxy_done()
        self.release()
        if self.sock is not None:
            reset_socket(self.sock)
            self.sock = None

    def abort(self) -> None:
        """Drop it now (the worker is stopping)."""
        self.drop()                     # before its task ran, the socket is still ours
        if self.task is not None:
            self.task.cancel()          # connect_accepted_socket closes the transport


class TlsListener(Acceptor):
    """The HTTPS listener: each accepted socket admitted under the caps, then its PROXY
    header read and its handshake started (Handshake)."""

    def __init__(self, worker, sock: socket.socket, tls):
        super().__init__(sock, asyncio.get_running_loop())
        self._worker = worker
        self._tls = tls             # ingress.tls.ReloadingContext

    def _admit(self, sock: socket.socket, peer: str) -> None:
        worker = self._worker
        limits = worker.http_settings
        if (len(worker.connections) + worker.websockets_open + len(worker.handshakes)
                >= limits.max_connections):
            worker.connection_refused("limit")
            reset_socket(sock)
            return
        key = client = None
        cap = limits.max_connections_per_client
        trust = worker.trusted_proxies
        mode = limits.proxy_protocol
        if mode != "off":
            # Counted by the source its PROXY header names, once read.
            if trust is not None and not trust.trusts(peer):
                worker.connection_refused("proxy_protocol")
                reset_socket(sock)
                return
        elif trust is None or not trust.trusts(peer):
            # (A trusted proxy's connections carry many clients: neither bound applies.)
            client = client_key(peer.encode())
            if worker.handshake_failures.get(client, 0) >= HANDSHAKE_FAILURES:
                worker.connection_refused("handshake_failures")
                reset_socket(sock)
                return
            if cap > 0:
                key = client
                if not worker.admit_client(key, cap):
                    worker.connection_refused("per_client")
                    reset_socket(sock)
                    return
        handshake = Handshake(worker, sock, key, limits.header_read_timeout, client)
        worker.handshakes.add(handshake)
        if mode != "off":
            handshake.read_proxy(self, mode, peer)
        else:
            self._start_tls(handshake)

    def _start_tls(self, handshake: Handshake) -> None:
        timeout = self._worker.http_settings.header_read_timeout
        # What is left of headerReadTimeout from accept (all of it, without a PROXY header
        # to read first).
        due = max(handshake.head_due - self._worker.edge.now, 0.001)
        # headerReadTimeout bounds the close too: uvloop waits for the client's close_notify
        # after ours (30 s by default), and a client that never sends one held its places,
        # descriptor and SSL object that long after we closed — for a 408, an idle
        # keep-alive, at drain (docs/http-edge.md, "Connection caps").
        # Each handshake on the context of the files last loaded, not on one moved to it by
        # the SNI callback: session tickets and the session cache belong to the context the
        # handshake started on, so with one context for good a session from before a reload
        # was resumed after it — a client certificate of a CA since removed from
        # clientCaPath kept its certificate-bound tokens valid for the ticket's lifetime
        # (2 hours). A reload now ends resumption (docs/security.md §3d row 54).
        task = self._loop.create_task(self._loop.connect_accepted_socket(
            handshake._factory, handshake.sock, ssl=self._tls.current, ssl_handshake_timeout=due,
            ssl_shutdown_timeout=timeout))
        handshake.task = task
        task.add_done_callback(handshake.finished)
