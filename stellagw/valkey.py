"""A small async Valkey/Redis client: one pipelined connection, hiredis.Reader, asyncio.

Why not redis-py/valkey-py: the gateway needs one thing from Valkey (EVALSHA per rate-limit
decision), on the request path, at tens of thousands per second. A connection here is an
asyncio.Protocol whose replies are a FIFO of waiters (docs/design.md §9): every command writes
its packed bytes and appends a future, or a plain callback; data_received feeds hiredis and
resolves them in order. Many outstanding commands share the connection, no pool, no lock.

    client = ValkeyClient.from_url("redis://:secret@cache:6379/2", timeout=0.5)
    await client.execute("SET", "k", "v")            # -> b"OK"
    await client.evalsha(script, keys, args)          # EVALSHA; SCRIPT LOAD on NOSCRIPT
    client.evalsha_then(script, pack_evalsha(script, keys, args), callback)
    await client.close()

evalsha_then() is the rate-limit check's path: callback(reply, error) is called directly
from the loop callback that read the reply (no future, no call_soon hop), exactly once,
and never before evalsha_then() returns.

Failure rules (docs/rate-limiting.md, "Valkey client"):

* A reply error (``-ERR ...``) arrives as a value from ``Reader.gets()`` and fails only its
  own command with ValkeyReplyError; the connection stays up.
* A protocol error (bytes hiredis cannot parse, a reply nobody asked for) kills the
  connection and fails every waiter with ValkeyProtocolError.
* A command without a reply after ``timeout`` seconds fails with ValkeyTimeout, and the
  connection is reset: its late reply would be matched to the next waiter, so the FIFO
  can no longer be trusted. Every other waiter on it fails with ValkeyConnectionError.
  A timer that fires late (this process stalled) first gives the command as long again,
  once, so a reply that arrived meanwhile is read rather than called lost.
* A lost connection fails its waiters; the next command reconnects (lazily). A failed
  connect makes the following commands fail fast for a backoff (50 ms doubling to 2 s)
  instead of each paying a connect timeout.
* execute_undoable(args, undo): a command whose caller may never see its reply (a
  timeout, a cancellation, the connection reset) can still have run, or run later, when
  the server was only slow or stopped. Its `undo` then follows it on the same connection:
  the server runs one connection's commands in order, so the undo runs after the command
  whenever the command runs. Only a connection the server or the network closed can take
  no undo (the command may or may not have run). The DPoP replay cache uses it
  (docs/auth.md, "When Valkey fails").

Accepted addresses: ``redis://``, ``rediss://`` (TLS), ``valkey://``, ``valkeys://`` (TLS),
``unix:///path.sock`` with ``user:password@`` (AUTH) and ``/db`` or ``?db=`` (SELECT), and
the specification's bare ``host:port`` — which, the original being .NET, may carry
StackExchange.Redis options: ``cache:6379,password=...,ssl=true,defaultDatabase=2``.

A Valkey Cluster is named by its seed nodes, several endpoints or ``cluster=true``:
``redis://:pw@10.0.0.1:6379,10.0.0.2:6379`` or ``valkey://cache:6379?cluster=true`` or
``a:6379,b:6379,password=...``; from_url() then gives a ValkeyClusterClient, which has
the same commands and failure rules and sends each command to the master of its key's
hash slot (key_slot(): CRC16 of the hash tag).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import socket
import ssl as _ssl
from binascii import crc_hqx
from collections import deque
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

__all__ = ["ValkeyClient", "ValkeyClusterClient", "Script", "ValkeyError",
           "ValkeyConnectionError", "ValkeyConnectionReset", "ValkeyAuthError", "ValkeyProtocolError", "ValkeyTimeout",
           "ValkeyReplyError", "parse_address", "pack_evalsha", "key_slot", "command_slot",
           "SLOTS"]

DEFAULT_PORT = 6379
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0

# What a reply may make the gateway hold (docs/rate-limiting.md, "Valkey client"). hiredis
# takes an aggregate's count on trust: `*2147483647\r\n` (13 bytes) made it allocate a list
# of 2^31 slots (16 GB of address space), and freeing it at the reset froze the worker's
# loop for 4 s, on every reconnect; a bulk string's length too (`$536870912` buffered
# 250 MB in one command's timeout). The gateway's largest replies are a fleet read (512
# entries, each at most 256 KiB) and CLUSTER SLOTS (16384 ranges), so a count of 7 digits
# or an unparsed element over MAX_PENDING_REPLY_BYTES is a protocol error.
_HUGE_COUNT = re.compile(rb"\n[*~>%|][0-9]{7}")
_COUNT_OVERLAP = 9                      # bytes a header split between two reads can span
MAX_PENDING_REPLY_BYTES = 16 * 1024 * 1024


# --------------------------------------------------------------------------- errors

class ValkeyError(Exception):
    """Base of every error this client raises."""


# A timer that fires this much after its deadline means the loop itself stalled (see
# _Connection._on_timer).
STALL = 0.02


class ValkeyConnectionError(ValkeyError):
    """Cannot connect, the connection was lost or reset, or the client is closed."""


class ValkeyConnectionReset(ValkeyConnectionError):
    """Failed only because an earlier command on the same connection timed out and the
    connection was reset: it says nothing more about the server than that timeout did."""


class ValkeyAuthError(ValkeyConnectionError):
    """The server refused AUTH (wrong password, unknown user, no password set)."""


class ValkeyProtocolError(ValkeyConnectionError):
    """The server sent bytes that are not RESP; the connection was dropped."""


class ValkeyTimeout(ValkeyError, TimeoutError):
    """No reply within the client's timeout; the connection was reset."""


class ValkeyReplyError(ValkeyError):
    """An error reply (``-CODE message``) to one command. ``code`` is its first word."""

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        return self.message.split(" ", 1)[0]


# hiredis returns this (not False, which is ambiguous) when no whole reply is buffered.
_INCOMPLETE = object()


# --------------------------------------------------------------------------- scripts

class Script:
    """A Lua script known by its SHA1, so EVALSHA sends 40 bytes instead of the source."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str | bytes):
        self.source = source.encode() if isinstance(source, str) else bytes(source)
        self.sha = hashlib.sha1(self.source).hexdigest()

    def __repr__(self) -> str:
        return f"Script(sha={self.sha})"


def pack_evalsha(script: Script, keys=(), args=()) -> bytes:
    """The EVALSHA command as bytes for evalsha_then(); callers that send the same command
    again and again keep it (packing formats every number with sprintf)."""
    return hiredis.pack_command(("EVALSHA", script.sha, len(keys), *keys, *args))


# --------------------------------------------------------------------------- addresses

# StackExchange.Redis options that have no meaning here and are accepted and ignored, so a
# connection string written for the original .NET Router still loads.
_SE_IGNORED = {"abortconnect", "allowadmin", "asynctimeout", "channelprefix", "configchannel",
               "configcheckseconds", "connectretry", "keepalive", "name", "proxy",
               "resolvedns", "responsetimeout", "servicename", "synctimeout", "tiebreaker",
               "version", "checkcertificaterevocation", "setlib", "protocol"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: str, what: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{what} must be true or false, got {value!r}")


def _db(value: str) -> int:
    try:
        db = int(value)
    except ValueError:
        raise ValueError(f"database must be a number, got {value!r}") from None
    if db < 0:
        raise ValueError(f"database must be >= 0, got {db}")
    return db


def _host_port(text: str) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):                       # [::1]:6379
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""                      # a name, or a bare IPv6 address
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"port must be a number in {text!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {text!r}")
    return host, number


def _tls_context(query: dict[str, str]) -> _ssl.SSLContext:
    ctx = _ssl.create_default_context(cafile=query.get("ssl_ca_certs") or None)
    reqs = query.get("ssl_cert_reqs", "required").lower()
    if reqs in ("none", "cert_none"):
        ctx.check_hostname = False
        ctx.verify_mode = _ssl.CERT_NONE
    elif reqs in ("optional", "cert_optional"):
        ctx.check_hostname = False
        ctx.verify_mode = _ssl.CERT_OPTIONAL
    elif reqs not in ("required", "cert_required"):
        raise ValueError(f"ssl_cert_reqs must be none, optional or required, got {reqs!r}")
    if "ssl_check_hostname" in query and ctx.verify_mode == _ssl.CERT_REQUIRED:
        ctx.check_hostname = _bool(query["ssl_check_hostname"], "ssl_check_hostname")
    if query.get("ssl_certfile"):
        ctx.load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile") or None)
    return ctx


def parse_address(url: str) -> dict:
    """The client's keyword arguments for a URL or a bare ``host:port[,opt=value...]``:
    ``host`` and ``port`` for one server, ``nodes`` (a list of (host, port), the seeds) for
    a cluster -- several endpoints, or ``cluster=true``.

    Raises ValueError naming what is wrong. Passwords are percent-decoded from URLs.
    """
    url = url.strip()
    if not url:
        raise ValueError("empty Valkey address")
    if "://" not in url:
        return _parse_bare(url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    # The netloc is split here, not by urlsplit: a cluster's seeds are a comma-separated
    # list of endpoints, which urlsplit would read as one host with a bad port.
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, colon, password = userinfo.partition(":")
    kw: dict = {"username": unquote(username) if username else None,
                "password": unquote(password) if colon and password else None}
    if scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path in {url!r}")
        if _cluster_option(query.get("cluster"), 1):
            raise ValueError("a cluster is reached over TCP, not a unix socket")
        kw["path"] = unquote(parts.path)
        if "db" in query:
            kw["db"] = _db(query["db"])
        return kw
    if scheme not in ("redis", "rediss", "valkey", "valkeys"):
        raise ValueError(f"unknown scheme {parts.scheme!r}: use redis, rediss, valkey, "
                         f"valkeys or unix")
    endpoints = [h for h in hosts.split(",") if h.strip()]
    if not endpoints:
        raise ValueError(f"no host in {url!r}")
    _endpoints(kw, [_host_port(unquote(h)) for h in endpoints], query.get("cluster"))
    path = parts.path.strip("/")
    if path:
        kw["db"] = _db(path)
    if "db" in query:
        kw["db"] = _db(query["db"])
    if scheme in ("rediss", "valkeys"):
        kw["ssl"] = _tls_context(query)
    return kw


def _cluster_option(value: str | None, endpoints: int) -> bool:
    """Cluster mode: as the option says, else when several endpoints are given (one server
    has one address; several can only be a cluster's seeds)."""
    if value is None:
        return endpoints > 1
    cluster = _bool(value, "cluster")
    if not cluster and endpoints > 1:
        raise ValueError("several endpoints are the seeds of a cluster: drop cluster=false "
                         "or name one endpoint")
    return cluster


def _endpoints(kw: dict, endpoints: list[tuple[str, int]], cluster: str | None) -> None:
    if _cluster_option(cluster, len(endpoints)):
        kw["nodes"] = list(dict.fromkeys(endpoints))
    else:
        kw["host"], kw["port"] = endpoints[0]


def _parse_bare(text: str) -> dict:
    """``host:port`` plus StackExchange.Redis ``,key=value`` options; as there, every item
    without ``=`` is an endpoint."""
    kw: dict = {}
    endpoints = []
    cluster = None
    tls = False
    tls_host = None
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            endpoints.append(_host_port(item))
            continue
        k = key.strip().lower()
        if k == "password":
            kw["password"] = value or None
        elif k == "user":
            kw["username"] = value or None
        elif k == "defaultdatabase":
            kw["db"] = _db(value)
        elif k == "ssl":
            tls = _bool(value, "ssl")
        elif k == "sslhost":
            tls_host = value
        elif k == "cluster":
            cluster = value
        elif k == "connecttimeout":
            try:
                kw["connect_timeout"] = int(value) / 1000
            except ValueError:
                raise ValueError(f"connectTimeout must be milliseconds, got {value!r}") from None
        elif k not in _SE_IGNORED:
            raise ValueError(f"unknown option {key.strip()!r} in the connection string")
    if not endpoints:
        raise ValueError(f"no endpoint in {text!r}")
    _endpoints(kw, endpoints, cluster)
    if tls:
        kw["ssl"] = _ssl.create_default_context()
        if tls_host:
            kw["server_hostname"] = tls_host
    return kw


# --------------------------------------------------------------------------- one connection

class _Connection(asyncio.Protocol):
    """One socket: writes commands, matches replies to a FIFO of (future, callback, deadline),
    one of future and callback None."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, name: str):
        self._loop = loop
        self._timeout = timeout
        self._name = name
        self._reader = hiredis.Reader(protocolError=ValkeyProtocolError,
                                      replyError=ValkeyReplyError,
                                      notEnoughData=_INCOMPLETE)
        self._waiters: deque[tuple[asyncio.Future | None, Callable | None, float]] = deque()
        self._pending_writes: list[bytes] = []   # packed commands of this loop iteration
        self._timer: asyncio.TimerHandle | None = None
        self._stalled_for = 0.0         # the deadline a late timer last gave more time
        # future -> packed undo, for execute_undoable()'s commands still in the FIFO
        self._undos: dict[asyncio.Future, bytes] = {}
        self._tail = b"\n"              # the end of the last read (_HUGE_COUNT across reads)
        self.transport: asyncio.Transport | None = None
        self.lost = False               # no more commands: reconnect
        # The server answered READONLY: it is a replica now (a failover). New commands go
        # to a new connection, which may lead to the new master (a DNS name, a managed
        # service's endpoint, a proxy); this one closes once its last reply is read.
        # Without it the old master answered READONLY for good (redis-py, Jedis and
        # StackExchange.Redis reconnect on it too).
        self.retiring = False

    # --- transport callbacks

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        waiters = self._waiters
        tail = self._tail
        if _HUGE_COUNT.search(data) is not None \
                or _HUGE_COUNT.search(tail + data[:_COUNT_OVERLAP]) is not None:
            self._abort(ValkeyProtocolError(
                f"{self._name}: protocol error: an aggregate of a million elements or more"))
            return
        self._tail = data[-_COUNT_OVERLAP:] if len(data) >= _COUNT_OVERLAP \
            else (tail + data)[-_COUNT_OVERLAP:]
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except (ValkeyProtocolError, MemoryError) as exc:
                self._abort(ValkeyProtocolError(
                    f"{self._name}: protocol error: {exc or exc.__class__.__name__}"))
                return
            if reply is _INCOMPLETE:
                if reader.len() > MAX_PENDING_REPLY_BYTES:
                    self._abort(ValkeyProtocolError(
                        f"{self._name}: protocol error: an element over "
                        f"{MAX_PENDING_REPLY_BYTES} bytes"))
                return
            if not waiters:
                self._abort(ValkeyProtocolError(f"{self._name}: a reply nobody asked for"))
                return
            fut, callback, _ = waiters.popleft()
            if reply.__class__ is ValkeyReplyError and reply.code == "READONLY":
                self.retiring = True
            if self.retiring and not waiters and not self.transport.is_closing():
                self.transport.close()      # every reply read: nothing is cut
            if callback is not None:
                if reply.__class__ is ValkeyReplyError:
                    self._call(callback, None, reply)
                else:
                    self._call(callback, reply, None)
                if self.lost:           # the callback closed the client: its waiters failed
                    return
            elif fut.done():            # the caller gave up (cancelled); the reply is dropped
                if self._undos:
                    undo = self._undos.pop(fut, None)
                    if undo is not None and reply.__class__ is not ValkeyReplyError:
                        # It ran, and nobody heard: undo it, behind it on this connection.
                        self.request(undo, _ignore)
                continue
            else:
                if self._undos:
                    self._undos.pop(fut, None)
                if reply.__class__ is ValkeyReplyError:
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        # Nothing can follow the commands any more: whether they ran is unknown.
        self._undos.clear()
        if self._waiters:
            err = ValkeyConnectionError(f"{self._name}: connection lost"
                                        + (f": {exc}" if exc else ""))
            self._fail_all(err, err)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- commands

    def request(self, packed: bytes, callback: Callable | None = None) -> asyncio.Future | None:
        """Send one packed command; its reply (or error) goes to the future returned, or,
        given a callback, to callback(reply, error) (and None is returned).

        Commands of one loop iteration go out in one write (every write is a syscall; a
        gateway under load sends many rate-limit checks per iteration)."""
        fut = None if callback is not None else self._loop.create_future()
        deadline = self._loop.time() + self._timeout
        self._waiters.append((fut, callback, deadline))
        pending = self._pending_writes
        pending.append(packed)
        if len(pending) == 1:
            self._loop.call_soon(self._flush)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)
        return fut

    def request_undoable(self, packed: bytes, undo: bytes) -> asyncio.Future:
        """request(packed), with `undo` sent behind it on this connection should its
        caller not get the reply (see execute_undoable)."""
        fut = self.request(packed)
        self._undos[fut] = undo
        return fut

    def _take_undos(self) -> bytes:
        """The undos of every command in the FIFO (their callers will not get a reply),
        in order, and forgotten."""
        undos = self._undos
        if not undos:
            return b""
        found = [undos[fut] for fut, _, _ in self._waiters if fut in undos]
        undos.clear()
        return b"".join(found)

    def _flush(self) -> None:
        pending, self._pending_writes = self._pending_writes, []
        if pending and not self.lost and not self.transport.is_closing():
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _on_timer(self) -> None:
        # One timer for the whole FIFO: every command has the same timeout, so the oldest
        # waiter always has the earliest deadline; re-armed lazily for the next one.
        self._timer = None
        if not self._waiters:
            return
        deadline = self._waiters[0][2]
        now = self._loop.time()
        if deadline > now:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        late = now - deadline
        if late > STALL and self._stalled_for != deadline:
            # The timer fired late: this process, not the server, was not running (a long
            # callback, a collection, CPU throttling, SIGSTOP). The loop runs due timers
            # before it reads sockets, so the reply may be waiting unread. Give the command
            # that much time again (at most the timeout), once, with reads first: else a
            # 0.4 s stall reset a healthy connection, failed every check on it, and opened
            # the rate limiter's breaker for its timeout (docs/security.md §3d row 37).
            self._stalled_for = deadline
            self._timer = self._loop.call_at(now + min(late, self._timeout), self._on_timer)
            return
        self._abort(ValkeyTimeout(f"{self._name}: no reply within {self._timeout:g} s"),
                    ValkeyConnectionReset(f"{self._name}: connection reset after an earlier "
                                          f"command timed out"))

    def _call(self, callback: Callable, reply, error: Exception | None) -> None:
        # A callback runs inside data_received or _fail_all: what it raises must not stop
        # the replies after it from reaching their waiters.
        try:
            callback(reply, error)
        except Exception as exc:  # noqa: BLE001 -- reported like a failing loop callback
            self._loop.call_exception_handler({
                "message": f"{self._name}: a Valkey reply callback failed",
                "exception": exc, "protocol": self})

    def _fail_all(self, first: Exception, rest: Exception) -> None:
        waiters, self._waiters = self._waiters, deque()
        exc = first
        for fut, callback, _ in waiters:
            if callback is not None:
                self._call(callback, None, exc)
            elif not fut.done():
                fut.set_exception(exc)
            exc = rest

    def _abort(self, first: Exception, rest: Exception | None = None) -> None:
        """Drop the connection: every waiter fails (the first with `first`)."""
        self.lost = True
        undos = self._take_undos()
        self._fail_all(first, rest or first)
        if self.transport is not None:
            if undos:
                # Behind the commands already written; close(), not abort(), which would
                # drop them from the transport's buffer.
                self.transport.write(undos)
                self.transport.close()
            else:
                self.transport.abort()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            undos = self._take_undos()
            if undos and not self.transport.is_closing():
                self.transport.write(undos)
            self.transport.close()


# --------------------------------------------------------------------------- the client

class _Client:
    """What both clients share: the address parsing entry point and the EVALSHA forms built
    on each client's own _evalsha_packed() and evalsha_then()."""

    name = ""

    @classmethod
    def from_url(cls, url: str, timeout: float = 0.5, **overrides):
        """A ValkeyClient for a redis://, rediss://, valkey://, valkeys://, unix:// URL or a
        bare ``host:port`` (see the module docstring), or a ValkeyClusterClient when the
        address names a cluster; keyword arguments override the URL's."""
        kw = parse_address(url)
        kw.setdefault("timeout", timeout)
        kw.update(overrides)
        return (ValkeyClusterClient if "nodes" in kw else ValkeyClient)(**kw)

    async def evalsha(self, script: Script, keys=(), args=()):
        """EVALSHA the script; on NOSCRIPT (a restarted or flushed server) SCRIPT LOAD it
        and try once more."""
        return await self._evalsha_packed(script, pack_evalsha(script, keys, args))

    def evalsha_future(self, script: Script, keys=(), args=()) -> asyncio.Future:
        """evalsha() as a Future, without a coroutine or a Task (see evalsha_then)."""
        fut = asyncio.get_running_loop().create_future()

        def settle(reply, error):
            if not fut.done():
                if error is None:
                    fut.set_result(reply)
                else:
                    fut.set_exception(error)

        self.evalsha_then(script, pack_evalsha(script, keys, args), settle)
        return fut

    def _then(self, coro, callback) -> None:
        """Run coro as a Task; its outcome goes to callback(reply, error)."""
        def done(task: asyncio.Task) -> None:
            if task.cancelled():
                error = ValkeyConnectionError(f"{self.name}: command cancelled")
            else:
                error = task.exception()
            try:
                callback(None if error is not None else task.result(), error)
            except Exception as exc:  # noqa: BLE001 -- as _Connection._call
                task.get_loop().call_exception_handler({
                    "message": f"{self.name}: a Valkey reply callback failed", "exception": exc})

        asyncio.ensure_future(coro).add_done_callback(done)


class ValkeyClient(_Client):
    """A lazily (re)connecting, pipelined client. Create it anywhere; use it on one loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
                 path: str | None = None, username: str | None = None,
                 password: str | None = None, db: int = 0,
                 ssl: _ssl.SSLContext | bool | None = None, server_hostname: str | None = None,
                 timeout: float = 0.5, connect_timeout: float | None = None):
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self.host, self.port, self.path = host, port, path
        self.username, self.db = username, db
        self._password = password
        if ssl is True:
            ssl = _ssl.create_default_context()
        self.ssl = ssl or None
        self.server_hostname = server_hostname
        self.timeout = timeout
        self.connect_timeout = connect_timeout if connect_timeout is not None else timeout
        # --- per-connection state
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task | None = None
        self._backoff = 0.0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._closed = False
        self.connects = 0               # successful connections so far (1 + reconnects)

    @property
    def name(self) -> str:
        """Where it connects, without credentials (for logs and errors)."""
        if self.path:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'valkeys' if self.ssl else 'valkey'}://{host}:{self.port}/{self.db}"

    def __repr__(self) -> str:
        return f"ValkeyClient({self.name})"

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.lost

    # --- commands

    async def execute(self, *args):
        """Run one command; returns its reply (bytes, int, None, list...). Raises
        ValkeyReplyError, ValkeyTimeout or ValkeyConnectionError (all ValkeyError)."""
        return await self._send(hiredis.pack_command(args))

    async def execute_undoable(self, args, undo):
        """execute(*args); should the reply not reach the caller (it gave up, a timeout or
        protocol error reset the connection, close()), the command `undo` is sent behind it
        on the same connection, and runs after it if it runs at all. Not when the
        connection was lost (closed by the server or the network): then nothing can follow
        it, and whether it ran is unknown. `undo` must be harmless when the command did
        not run (a compare-and-delete, say): it is sent whenever the reply was not heard."""
        return await self._send(hiredis.pack_command(args), undo=hiredis.pack_command(undo))

    async def _send(self, packed: bytes, asking: bool = False, undo: bytes | None = None):
        conn = await self._live()
        if asking:
            # A cluster's ASK redirection: ASKING admits the one command after it on the same
            # connection; queued together, they go out in one write, in this order. Its
            # reply is OK, and the command's own reply says everything else.
            conn.request(_ASKING, _ignore)
        if undo is not None:
            return await conn.request_undoable(packed, undo)
        return await conn.request(packed)

    async def _live(self) -> _Connection:
        conn = self._conn
        if conn is None or conn.lost or conn.retiring or conn.transport.is_closing():
            conn = await self._connect()
        return conn

    async def _evalsha_packed(self, script: Script, command: bytes, asking: bool = False):
        try:
            return await self._send(command, asking)
        except ValkeyReplyError as exc:
            if exc.code != "NOSCRIPT":
                raise
        await self.execute("SCRIPT", "LOAD", script.source)
        return await self._send(command, asking)

    def evalsha_then(self, script: Script, command: bytes, callback) -> None:
        """EVALSHA without a coroutine, a Task or a future: `command` is
        pack_evalsha(script, keys, args), and callback(reply, error) -- error a ValkeyError,
        else None -- is called exactly once, never before this returns; on a live
        connection directly from the loop callback that read the reply. Connecting and
        NOSCRIPT reloads take the coroutine path. What the callback raises is reported to
        the loop's exception handler."""
        conn = self._conn
        if conn is None or conn.lost or conn.retiring or conn.transport.is_closing():
            self._then(self._evalsha_packed(script, command), callback)
            return

        def on_reply(reply, error):
            if error is not None and error.__class__ is ValkeyReplyError \
                    and error.code == "NOSCRIPT":
                self._then(self._evalsha_packed(script, command), callback)
            else:
                callback(reply, error)

        conn.request(command, on_reply)

    async def close(self) -> None:
        """Close the connection; waiting and later commands fail with ValkeyConnectionError."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()                # first: a waiter's callback sees a lost connection
            err = ValkeyConnectionError(f"{self.name}: client closed")
            conn._fail_all(err, err)

    # --- connecting

    async def _connect(self) -> _Connection:
        if self._closed:
            raise ValkeyConnectionError(f"{self.name}: client closed")
        task = self._connecting
        if task is None:
            loop = asyncio.get_running_loop()
            wait = self._retry_at - loop.time()
            if wait > 0:
                raise ValkeyConnectionError(
                    f"{self.name}: not connected, next attempt in {wait * 1000:.0f} ms "
                    f"(last error: {self._last_error})")
            # A task of its own: a caller that is cancelled must not cancel the connect the
            # other callers are waiting for.
            task = self._connecting = loop.create_task(self._open())
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = None
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    conn = await self._handshake(loop)
            except TimeoutError:
                raise ValkeyConnectionError(
                    f"cannot connect to {self.name}: no answer within "
                    f"{self.connect_timeout:g} s") from None
            except OSError as exc:
                raise ValkeyConnectionError(
                    f"cannot connect to {self.name}: {exc.strerror or exc}") from exc
        except BaseException as exc:
            if conn is not None:
                conn.close()
            self._backoff = min(max(self._backoff * 2, _BACKOFF_MIN), _BACKOFF_MAX)
            self._retry_at = loop.time() + self._backoff
            self._last_error = str(exc) or exc.__class__.__name__
            raise
        finally:
            self._connecting = None
        if self._closed:                # close() ran while the handshake was in flight
            conn.close()
            raise ValkeyConnectionError(f"{self.name}: client closed")
        self._backoff = 0.0
        self._retry_at = 0.0
        self._conn = conn
        self.connects += 1
        return conn

    async def _handshake(self, loop) -> _Connection:
        def factory():
            return _Connection(loop, self.timeout, self.name)
        if self.path:
            _, conn = await loop.create_unix_connection(factory, self.path, ssl=self.ssl)
        else:
            hostname = (self.server_hostname or self.host) if self.ssl else None
            _, conn = await loop.create_connection(factory, self.host, self.port, ssl=self.ssl,
                                                   server_hostname=hostname)
        try:
            # Pipelined: AUTH and SELECT go out together, then both replies are awaited.
            auth = select = None
            if self._password is not None:
                args = ("AUTH", self.username, self._password) if self.username else \
                    ("AUTH", self._password)
                auth = conn.request(hiredis.pack_command(args))
            if self.db:
                select = conn.request(hiredis.pack_command(("SELECT", self.db)))
            if auth is not None:
                try:
                    await auth
                except ValkeyReplyError as exc:
                    raise ValkeyAuthError(f"{self.name}: AUTH refused: {exc}") from None
            if select is not None:
                try:
                    await select
                except ValkeyReplyError as exc:
                    raise ValkeyConnectionError(f"{self.name}: SELECT {self.db} refused: "
                                                f"{exc}") from None
        except BaseException:
            conn.close()
            raise
        return conn


# --------------------------------------------------------------------------- Valkey Cluster

SLOTS = 16384
# A background reload of the slot map starts at most this often (errors that may mean the
# map changed come in bursts: every request to a lost master fails).
_REFRESH_INTERVAL = 0.5
# Slots of packed EVALSHA commands kept (the rate limiter sends the same ones again and
# again); cleared when full, like the limiter's own cache of those commands.
_PACKED_SLOTS_MAX = 4096
_ASKING = hiredis.pack_command(("ASKING",))
# Each node is a connection per worker, outside the descriptors the connection caps
# reserve (listeners.FD_HEADROOM, 256 spare, which every cluster client, the Authority's
# fetches and the log share). A CLUSTER SLOTS naming 500 masters took them all at start
# (SCRIPT LOAD goes to every master): every client and service connection was then closed
# unanswered; a MOVED to a new address each time could do the same between two reloads of
# the map. A map naming more masters is refused; past MAX_NODES, a redirection to an
# address not yet known is not followed (the map is reloaded, as for any MOVED).
MAX_MASTERS = 64
MAX_NODES = MAX_MASTERS + 16
_SCRIPT_COMMANDS = frozenset((b"EVAL", b"EVALSHA", b"EVAL_RO", b"EVALSHA_RO", b"FCALL",
                              b"FCALL_RO"))
# Commands without a key: they go to one node (SCRIPT to every master). Any other command's
# first argument is its key.
_KEYLESS = frozenset((b"PING", b"ECHO", b"TIME", b"INFO", b"CLUSTER", b"SCRIPT", b"FUNCTION",
                      b"KEYS", b"SCAN", b"RANDOMKEY", b"DBSIZE", b"FLUSHALL", b"FLUSHDB",
                      b"CONFIG", b"CLIENT", b"COMMAND", b"DEBUG", b"LATENCY", b"SLOWLOG",
                      b"ROLE", b"WAIT", b"LASTSAVE", b"MEMORY"))


def _ignore(reply, error) -> None:
    pass


def _as_bytes(arg) -> bytes:
    if isinstance(arg, str):
        return arg.encode()
    if isinstance(arg, (bytes, bytearray, memoryview)):
        return bytes(arg)
    return str(arg).encode()            # a number, as hiredis.pack_command writes it


def key_slot(key) -> int:
    """The cluster hash slot of a key: CRC16/XMODEM (binascii.crc_hqx, the cluster
    specification's CRC16) of its hash tag -- what lies between the first "{" and the
    next "}", when that is not empty -- or else of the whole key, modulo 16384."""
    if key.__class__ is not bytes:
        key = _as_bytes(key)
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return crc_hqx(key, 0) & 0x3FFF


def command_slot(args) -> int | None:
    """The slot a command runs in: its first key's (EVAL, EVALSHA, FCALL: the first of its
    KEYS), or None for a command without a key. A command's keys must share one slot (hash
    tags), as every command the gateway sends does."""
    name = _as_bytes(args[0]).upper()
    if name in _SCRIPT_COMMANDS:
        return key_slot(args[3]) if len(args) > 3 and int(args[2]) > 0 else None
    if name in _KEYLESS or len(args) < 2:
        return None
    return key_slot(args[1])


def _packed_slot(command: bytes) -> int | None:
    """command_slot() of a packed command (what evalsha_then() is given): only the first
    four arguments are read."""
    args = []
    pos = command.index(b"\r\n") + 2
    for _ in range(min(4, int(command[1:pos - 2]))):
        end = command.index(b"\r\n", pos)
        start = end + 2
        pos = start + int(command[pos + 1:end])
        args.append(command[start:pos])
        pos += 2
    return command_slot(args)


class ValkeyClusterClient(_Client):
    """A Valkey Cluster client with ValkeyClient's interface (docs/operations.md, "Valkey
    Cluster").

    Commands are routed, not bounced: each goes to the master that owns its key's slot,
    over that master's own ValkeyClient (one pipelined connection each, with its own
    reconnect and backoff). The slot map comes from CLUSTER SLOTS, asked of the masters
    known and then the seeds, before the first command and again in the background after
    anything that may mean it changed: a MOVED redirection, a node that cannot be reached
    or times out, CLUSTERDOWN. A MOVED is followed once, to the node it names (which owns
    that slot from then on); an ASK (a slot being migrated) once, with ASKING. Every other
    failure fails the command like ValkeyClient's do: the caller's policy (fail open,
    on-error) decides, as with one server.

    Keyless commands go to one master, except SCRIPT (LOAD, FLUSH, EXISTS), which goes to
    every master and answers with the first one's reply: scripts are cached per node.
    """

    def __init__(self, nodes, *, username: str | None = None, password: str | None = None,
                 db: int = 0, ssl: _ssl.SSLContext | bool | None = None,
                 server_hostname: str | None = None, timeout: float = 0.5,
                 connect_timeout: float | None = None):
        if not nodes:
            raise ValueError("a cluster needs at least one seed node")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if ssl is True:
            ssl = _ssl.create_default_context()
        self.seeds = [(host, int(port)) for host, port in nodes]
        self.ssl = ssl or None
        self.timeout = timeout
        self._node_kw = {"username": username, "password": password, "db": db,
                         "ssl": self.ssl, "server_hostname": server_hostname,
                         "timeout": timeout, "connect_timeout": connect_timeout}
        self._nodes: dict[tuple[str, int], ValkeyClient] = {}
        self._slots: list[ValkeyClient | None] | None = None      # None until first loaded
        self._masters: list[ValkeyClient] = []
        self._packed_slots: dict[bytes, int | None] = {}
        self._refreshing: asyncio.Task | None = None
        self._refresh_timer: asyncio.TimerHandle | None = None
        self._refresh_after = 0.0
        self._closed = False
        self.redirects = {"moved": 0, "ask": 0}
        self.refreshes = 0              # slot maps loaded

    @property
    def name(self) -> str:
        """The seeds, in the address form that configures this client, without credentials."""
        seeds = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.seeds)
        return f"{'valkeys' if self.ssl else 'valkey'}://{seeds}?cluster=true"

    def __repr__(self) -> str:
        return f"ValkeyClusterClient({self.name})"

    @property
    def connected(self) -> bool:
        return any(node.connected for node in self._nodes.values())

    @property
    def connects(self) -> int:
        return sum(node.connects for node in self._nodes.values())

    def owner(self, slot: int) -> tuple[str, int] | None:
        """The (host, port) this client sends the slot's commands to; None when unknown."""
        node = self._slots[slot] if self._slots is not None else None
        return (node.host, node.port) if node is not None else None

    # --- commands

    async def execute(self, *args):
        """Run one command on the master of its key's slot (see the class)."""
        command = hiredis.pack_command(args)
        slot = command_slot(args)
        if slot is not None or _as_bytes(args[0]).upper() != b"SCRIPT":
            return await self._run(slot, command, None)
        if self._slots is None:
            await self._load()
        replies = await asyncio.gather(*(node._send(command) for node in self._masters),
                                       return_exceptions=True)
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        if not replies:
            raise ValkeyConnectionError(f"{self.name}: the slot map names no master")
        return replies[0]

    async def _evalsha_packed(self, script: Script, command: bytes):
        return await self._run(self._slot_of(command), command, script)

    async def execute_undoable(self, args, undo):
        """As ValkeyClient.execute_undoable(), on the master of the command's slot: `undo`
        must name a key of the same slot, so it goes to the same node's connection."""
        command = hiredis.pack_command(args)
        return await self._run(command_slot(args), command, None, hiredis.pack_command(undo))

    def evalsha_then(self, script: Script, command: bytes, callback) -> None:
        """As ValkeyClient.evalsha_then(): on the slot's master's connection, the callback
        is called from the reply handling; redirections and a first slot map take the
        coroutine path."""
        slots = self._slots
        slot = self._slot_of(command)
        node = slots[slot] if slots is not None and slot is not None else None
        if node is None:
            self._then(self._run(slot, command, script), callback)
            return

        def on_reply(reply, error):
            if error is not None:
                follow = self._after(node, error, command, script)
                if follow is not None:
                    self._then(follow, callback)
                    return
            callback(reply, error)

        node.evalsha_then(script, command, on_reply)

    def _slot_of(self, command: bytes) -> int | None:
        cache = self._packed_slots
        slot = cache.get(command, -1)
        if slot == -1:
            if len(cache) >= _PACKED_SLOTS_MAX:
                cache.clear()
            slot = cache[command] = _packed_slot(command)
        return slot

    async def _run(self, slot: int | None, command: bytes, script: Script | None,
                   undo: bytes | None = None):
        node = await self._owner(slot)
        try:
            if script is not None:
                return await node._evalsha_packed(script, command)
            return await node._send(command, undo=undo)
        except ValkeyError as exc:
            follow = self._after(node, exc, command, script, undo)
            if follow is None:
                raise
        return await follow

    def _after(self, node: ValkeyClient, error: Exception, command: bytes,
               script: Script | None, undo: bytes | None = None):
        """After a failed command: a coroutine that follows a MOVED or ASK redirection,
        or None (the error stands). An error that may mean the slot map changed reloads it
        in the background."""
        if error.__class__ is ValkeyReplyError:
            code = error.code
            if code == "MOVED" or code == "ASK":
                return self._follow(node, error, command, script, undo)
            if code != "CLUSTERDOWN":
                return None         # the command's own error (WRONGTYPE, NOSCRIPT, ...)
        self._refresh_soon()
        return None

    async def _follow(self, node: ValkeyClient, error: ValkeyReplyError, command: bytes,
                      script: Script | None, undo: bytes | None = None):
        # "MOVED <slot> <host>:<port>": the slot is served there now (resharded, failed
        # over); "ASK ...": only this key, while the slot migrates. An empty host means the
        # node that answered. Followed once: a second redirection is the command's error.
        kind, slot, address = error.message.split(" ", 2)
        host, _, port = address.rpartition(":")
        try:
            target = self._node(host or node.host, int(port), redirected=True)
        except ValkeyConnectionError:
            self._refresh_soon()
            raise
        asking = kind == "ASK"
        self.redirects["ask" if asking else "moved"] += 1
        if not asking:
            if self._slots is not None:
                self._slots[int(slot)] = target
            self._refresh_soon()
        if script is not None:
            return await target._evalsha_packed(script, command, asking)
        return await target._send(command, asking, undo)

    # --- the slot map

    async def _owner(self, slot: int | None) -> ValkeyClient:
        if self._slots is None:
            await self._load()
        if slot is None:
            if not self._masters:
                raise ValkeyConnectionError(f"{self.name}: the slot map names no master")
            return self._masters[0]
        node = self._slots[slot]
        if node is None:
            self._refresh_soon()
            raise ValkeyConnectionError(f"{self.name}: no node serves slot {slot}")
        return node

    async def _load(self) -> None:
        """Wait for a slot map (the first one: commands cannot be routed without it), no
        longer than one server's connect and reply may take, however many seeds the
        reload tries (it goes on in the background for the commands after this one)."""
        if self._closed:
            raise ValkeyConnectionError(f"{self.name}: client closed")
        task = self._refreshing or self._start_refresh()
        wait = self._node_kw["connect_timeout"] or self.timeout
        try:
            async with asyncio.timeout(wait + self.timeout):
                await asyncio.shield(task)
        except TimeoutError:        # (the reload fails with ValkeyConnectionError only)
            raise ValkeyTimeout(f"{self.name}: no slot map within "
                                f"{wait + self.timeout:g} s") from None

    def _refresh_soon(self) -> None:
        """Reload the map in the background: now, or when the interval since the last
        reload has passed (one reload for a burst of errors, and none of them lost)."""
        if self._refreshing is not None or self._refresh_timer is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        wait = self._refresh_after - loop.time()
        if wait > 0:
            self._refresh_timer = loop.call_later(wait, self._refresh_due)
        else:
            self._start_refresh()

    def _refresh_due(self) -> None:
        self._refresh_timer = None
        self._refresh_soon()

    def _start_refresh(self) -> asyncio.Task:
        loop = asyncio.get_running_loop()
        self._refresh_after = loop.time() + _REFRESH_INTERVAL
        task = self._refreshing = loop.create_task(self._refresh())
        task.add_done_callback(self._refreshed)
        return task

    def _refreshed(self, task: asyncio.Task) -> None:
        self._refreshing = None
        _retrieve(task)

    async def _refresh(self) -> None:
        """CLUSTER SLOTS from the first node that answers: the masters known, then the
        seeds (all of them may have moved since the map was loaded)."""
        candidates = dict.fromkeys([*self._masters, *(self._node(h, p) for h, p in self.seeds)])
        error: Exception | None = None
        for node in candidates:
            try:
                reply = await node.execute("CLUSTER", "SLOTS")
                await self._apply(node, reply)
                return
            except (ValkeyError, ValueError, TypeError, IndexError) as exc:
                error = exc
        raise ValkeyConnectionError(f"{self.name}: no node gave the slot map "
                                    f"(last error: {error})")

    async def _apply(self, asked: ValkeyClient, reply) -> None:
        slots: list[ValkeyClient | None] = [None] * SLOTS
        masters: list[ValkeyClient] = []
        named = {(entry[2][0], entry[2][1]) for entry in reply}
        if len(named) > MAX_MASTERS:
            raise ValueError(f"{asked.name} names {len(named)} masters; at most "
                             f"{MAX_MASTERS} are used")
        for first, last, (host, port, *_), *_replicas in reply:
            # An unknown endpoint ("?", empty or null) means the address that was asked.
            node = self._node(host.decode() if host and host != b"?" else asked.host, port)
            slots[first:last + 1] = [node] * (last + 1 - first)
            if node not in masters:
                masters.append(node)
        if not masters:
            # A node that has not joined (or has lost its nodes.conf) knows no slots.
            raise ValueError(f"{asked.name} knows no slots")
        self._slots, self._masters = slots, masters
        self.refreshes += 1
        # A node that left the map (replaced, demoted to a replica) is closed, unless it
        # is a seed: the next reload may need to ask it.
        keep = {(n.host, n.port) for n in masters}.union(self.seeds)
        for address in [a for a in self._nodes if a not in keep]:
            await self._nodes.pop(address).close()

    def _node(self, host: str, port: int, redirected: bool = False) -> ValkeyClient:
        node = self._nodes.get((host, port))
        if node is None:
            if self._closed:
                raise ValkeyConnectionError(f"{self.name}: client closed")
            if redirected and len(self._nodes) >= MAX_NODES:
                raise ValkeyConnectionError(f"{self.name}: a redirection to {host}:{port}, "
                                            f"with {len(self._nodes)} nodes known already")
            node = self._nodes[(host, port)] = ValkeyClient(host, port, **self._node_kw)
        return node

    async def close(self) -> None:
        """Close every node's connection; waiting and later commands fail with
        ValkeyConnectionError."""
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._refresh_timer is not None:
            self._refresh_timer.cancel()
            self._refresh_timer = None
        nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            await node.close()


def _retrieve(task: asyncio.Task) -> None:
    # Nobody may be left awaiting a failed connect; don't let asyncio log it as unretrieved.
    if not task.cancelled():
        task.exception()
