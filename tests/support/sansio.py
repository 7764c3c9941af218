"""A worker's request path without sockets, threads or sleeps (docs/design.md §9: protocols
are tested with a recording transport and a loop whose time the test moves).

    stack = Stack("gateway: {routing: {defaultTimeout: 5s}}")   # a real Worker's stages
    svc = stack.register("scan", [endpoint("GET", "/scans/{id}", timeout_ms=2000)])
    client = stack.client()
    client.send(b"GET /scans/7 HTTP/1.1\\r\\nHost: gw\\r\\n\\r\\n")
    stack.run()                                   # the loop's call_soon callbacks: writes
    [req] = svc.requests()                        # REQUEST frames the service was sent
    svc.respond(req.corr, 200, [(b"content-type", b"text/plain")], b"seven")
    [(status, headers, body)] = client.responses()

Everything is the product's (Worker, TransportHub, ServiceConnection, HttpProtocol,
Pipeline, RoutingState, Authenticator, RateLimiter): only the edges are stand-ins.

* FakeLoop: the loop the hub, its TimerWheel and every ServiceConnection's WriteBatch use:
  `call_soon` callbacks run when the test calls `run()`, timers when it `advance()`s time.
* ServiceTransport / ClientTransport: record what is written; closing one calls its
  protocol's connection_lost on the next `run()`, as an asyncio transport does.
* The client side is a real HttpProtocol, the service side a real ServiceConnection fed
  frames a service would send (FrameEncoder). Stand-ins are not possible there: compiled,
  the pipeline and the connection type those objects as their final extension types
  (pipeline.pxd: `conn=ServiceConnection`; connection.pxd: `conn=HttpProtocol`) and refuse
  any other class with a TypeError.
* MemoryLog keeps log lines in memory: JsonLog hands them to a writer thread.
* The Authority's keys are installed as KeyStore installs them, without its fetch (which
  runs in an executor thread): `install_keys`.
* `forbid_io(monkeypatch)` (from an autouse fixture of the test module) fails a test that
  opens a socket or starts a thread.
"""
from __future__ import annotations

import socket
import threading
import uuid

import orjson
import yaml

from stellagw.auth.keys import parse_jwks
from stellagw.config import load_config_text
from stellagw.gateway import Worker
from stellagw.ingress import http as ingress
from stellagw.observe.logs import JsonLog
from stellagw.transport import frame as fr
from stellagw.transport.connection import TimerWheel
from stellagw.transport.hub import WHEEL_TICK, Listener
from stellagw.transport.identity import RegistrationPolicy

LOOPBACK_PEER = ("127.0.0.1", 40001)

# The harness's own settings under every test's: the OpenAPI cache rebuilds on a thread
# after each registration (openapi/cache.py), and the document is not what is tested here.
BASE = {"gateway": {"openapi": {"enabled": False}}}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def settings(yaml_text: str = ""):
    """load_config_text over BASE + `yaml_text` (the product's own validation)."""
    over = yaml.safe_load(yaml_text) if yaml_text.strip() else {}
    return load_config_text(yaml.safe_dump(_merge(BASE, over or {})), env={})


# ---------------------------------------------------------------------- the loop


class Handle:
    __slots__ = ("when", "callback", "args", "cancelled")

    def __init__(self, when, callback, args):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    """call_soon / call_later / time() as the transport code uses them; nothing runs until
    the test says so."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self._soon: list[Handle] = []
        self._timers: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback, *args):
        handle = Handle(self.now, callback, args)
        self._soon.append(handle)
        return handle

    def call_later(self, delay, callback, *args):
        handle = Handle(self.now + delay, callback, args)
        self._timers.append(handle)
        return handle

    def timers(self) -> list[Handle]:
        """Timers still to fire, soonest first."""
        return sorted((h for h in self._timers if not h.cancelled), key=lambda h: h.when)

    def run(self, limit: int = 10_000) -> int:
        """Run call_soon callbacks, those they schedule included, until none is left."""
        ran = 0
        while self._soon:
            soon, self._soon = self._soon, []
            for handle in soon:
                if not handle.cancelled:
                    handle.callback(*handle.args)
                    ran += 1
            assert ran < limit, "call_soon callbacks keep scheduling each other"
        return ran

    def advance(self, seconds: float) -> None:
        """Move the clock `seconds` on, firing each timer due on the way at its own time."""
        end = self.now + seconds
        self.run()
        while True:
            due = [h for h in self._timers if not h.cancelled and h.when <= end]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self._timers.remove(handle)
            self.now = max(self.now, handle.when)
            handle.callback(*handle.args)
            self.run()
        self._timers = [h for h in self._timers if not h.cancelled]
        self.now = end


# ---------------------------------------------------------------------- transports


class _Transport:
    def __init__(self, loop: FakeLoop, peer):
        self.loop = loop
        self.peer = peer
        self.protocol = None
        self.out = bytearray()
        self.writes = 0
        self.closed = False
        self.aborted = False
        self._lost = False

    def write(self, data):
        assert not self.closed, "write after close"
        self.out += data
        self.writes += 1

    def is_closing(self):
        return self.closed

    def get_write_buffer_size(self):
        return 0            # what is written is at the peer at once (`out`)

    def close(self):
        self._end()

    def abort(self):
        self.aborted = True
        self._end()

    def _end(self):
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.loop.call_soon(self.lose, None)

    def lose(self, exc=None):
        """connection_lost, once (the peer went away, or after close())."""
        if not self._lost:
            self._lost = True
            self.closed = True
            self.protocol.connection_lost(exc)

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer}.get(name, default)


class ServiceTransport(_Transport):
    """The service link's socket: what the gateway writes to the service."""

    def __init__(self, loop, peer=LOOPBACK_PEER):
        super().__init__(loop, peer)
        self.limits = None
        self.buffered = 0          # get_write_buffer_size(): the test says when it is full
        self.paused = False        # reading paused: what the service sends waits in `unread`
        self.unread = []

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False
        if self.unread:
            self.loop.call_soon(self._deliver)

    def _deliver(self):
        while self.unread and not self.paused and not self.closed:
            self.protocol.data_received(self.unread.pop(0))

    def set_write_buffer_limits(self, high=None, low=None):
        self.limits = (high, low)

    def get_write_buffer_size(self):
        return self.buffered


class ClientTransport(_Transport):
    """A client's socket: what the gateway answers it."""

    def __init__(self, loop, peer=("127.0.0.1", 5555)):
        super().__init__(loop, peer)
        self.paused = False
        self.eof = False

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.eof = True

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    @property
    def ended(self):
        return self.closed or self.eof


# ---------------------------------------------------------------------- log, keys


class _NoStream:
    def fileno(self):
        return -1


class MemoryLog(JsonLog):
    """JsonLog whose lines stay here (JsonLog writes them from a thread)."""

    def __init__(self):
        super().__init__("debug", stream=_NoStream(), access_log=True)
        self._kept = bytearray()

    def flush(self) -> None:
        self._kept += self._buf
        self._buf = bytearray()

    def drain(self, timeout: float = 0.0) -> None:
        self.flush()

    def records(self, message: str | None = None) -> list[dict]:
        self.flush()
        out = [orjson.loads(line) for line in self._kept.splitlines()]
        return [r for r in out if message is None or r.get("message") == message]


def install_keys(auth, *signing_keys) -> None:
    """Give the Authenticator's KeyStore these keys as its fetch would (KeyStore._refresh:
    the parsed keys by kid, then loaded), without the executor thread it reads them in."""
    store = auth.keys
    keys = parse_jwks({"keys": [k.public_jwk for k in signing_keys]}, store._algorithms)
    store._all = keys
    store._by_kid = {k.kid: k for k in keys if k.kid is not None}
    store.loaded = True
    store.last_error = ""
    assert auth.ready_reasons() == []


# ---------------------------------------------------------------------- the pipeline, recorded


class Recorder:
    """The worker's pipeline as the ingress calls it: each (request, what handle returned)
    is kept; everything else (retry, reconfigure) is the real Pipeline's."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.handled: list[tuple] = []

    def handle(self, req):
        result = self.pipeline.handle(req)
        self.handled.append((req, result))
        return result

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


# ---------------------------------------------------------------------- the service side


def endpoint(method: str, path: str, **fields) -> dict:
    """One HELLO endpoint (protocol.md §4.1): timeout_ms, streaming, websocket, claims
    ([{type, value}]), max_body_bytes, sender_constrained, retryable."""
    return {"method": method, "path": path, **fields}


def hello(service: str, endpoints, version: str = "1.0.0", instance_id: str | None = None,
          **extra) -> dict:
    out = {"protocol": fr.PROTOCOL_VERSION, "service": service, "version": version,
           "instance_id": instance_id or f"{service}-{uuid.uuid4().hex[:8]}", "region": "",
           "endpoints": list(endpoints)}
    out.update(extra)
    return out


class Sent:
    """A REQUEST frame the gateway wrote to the service."""

    def __init__(self, corr, payload):
        (self.flags, self.timeout_ms, self.method, self.path, self.query, headers,
         self.body) = fr.decode_request(payload)
        self.corr = corr
        self.header_list = headers
        self.headers = {}
        for name, value in headers:
            self.headers.setdefault(name.decode(), value.decode())

    @property
    def ended(self) -> bool:
        return bool(self.flags & fr.FLAG_END_STREAM)


class ServiceLink:
    """A service's end of one link: frames in through data_received, what the gateway wrote
    read back from the transport."""

    def __init__(self, stack, peer=LOOPBACK_PEER):
        self.stack = stack
        hub = stack.worker.hub
        self.conn = hub._accept(stack.listener)       # as the listener's factory does
        self.transport = ServiceTransport(stack.loop, peer)
        self.transport.protocol = self.conn
        self.conn.connection_made(self.transport)
        self._read = 0
        self._decoder = fr.FrameDecoder()
        self.instance = None

    # -- to the gateway

    def feed(self, data: bytes, mode: str = "whole") -> None:
        """`mode`: whole, bytes (one at a time) or cut (pieces of 1..13 bytes)."""
        if mode == "whole":
            self._received(data)
            return
        step = 1 if mode == "bytes" else None
        i, n = 0, 0
        while i < len(data) and not self.transport.closed:   # a closed link reads nothing
            n = step or (n % 13) + 1
            self._received(data[i:i + n])
            i += n

    def _received(self, data: bytes) -> None:
        if self.transport.paused or self.transport.unread:   # the gateway is not reading
            self.transport.unread.append(data)
        else:
            self.conn.data_received(data)

    def send(self, build, mode: str = "whole") -> None:
        """`build(encoder)`: encode frames as a service would, then feed them."""
        enc = fr.FrameEncoder()
        build(enc)
        self.feed(enc.take(), mode)

    def control(self, ftype: int, obj: dict, corr: bytes = fr.ZERO_CORR) -> None:
        self.send(lambda enc: enc.control(ftype, corr, obj))

    def raw(self, ftype: int, payload: bytes = b"", corr: bytes = fr.ZERO_CORR) -> None:
        self.send(lambda enc: enc.raw(ftype, corr, payload))

    def respond(self, corr: bytes, status: int, headers=(), body: bytes = b"",
                end: bool = True, mode: str = "whole") -> None:
        self.send(lambda enc: enc.response(corr, status, list(headers),
                                           fr.FLAG_END_STREAM if end else 0, body), mode)

    def stream(self, corr: bytes, chunk: bytes, end: bool = False) -> None:
        self.send(lambda enc: enc.stream_data(fr.RESPONSE_STREAM_DATA, corr,
                                              fr.FLAG_END_STREAM if end else 0, chunk))

    def window_update(self, corr: bytes, increment: int) -> None:
        self.send(lambda enc: enc.window_update(corr, increment))

    def hello(self, payload: dict) -> dict | None:
        """Send HELLO; the HELLO_ACK's payload, or None when nothing came back."""
        self.control(fr.HELLO, payload)
        self.stack.run()
        acks = [f for f in self.frames() if f[0] == fr.HELLO_ACK]
        return fr.decode_control(acks[0][2]) if acks else None

    def lose(self) -> None:
        """The link drops (the service died): connection_lost now."""
        self.transport.lose(None)

    # -- from the gateway

    def frames(self) -> list[tuple[int, bytes, bytes]]:
        """(type, correlation id, payload) of the frames written since the last call."""
        data = bytes(self.transport.out[self._read:])
        self._read = len(self.transport.out)
        self._decoder.feed(data)
        out = []
        while (frame := self._decoder.next()) is not None:
            out.append((frame[0], bytes(frame[1]), bytes(frame[2])))
        return out

    def requests(self, frames=None) -> list[Sent]:
        frames = self.frames() if frames is None else frames
        return [Sent(corr, payload) for ftype, corr, payload in frames if ftype == fr.REQUEST]

    @property
    def open(self) -> bool:
        return not self.transport.closed


# ---------------------------------------------------------------------- the client side


class Client:
    """One client connection: a real HttpProtocol on a recording transport."""

    def __init__(self, stack, peer=("127.0.0.1", 5555)):
        self.stack = stack
        self.transport = ClientTransport(stack.loop, peer)
        self.proto = ingress.HttpProtocol(stack.worker)
        self.transport.protocol = self.proto
        self.proto.connection_made(self.transport)
        self._read = 0

    def send(self, raw: bytes) -> None:
        self.proto.data_received(raw)

    def get(self, path: str, *headers: bytes, method: str = "GET") -> None:
        self.send(method.encode() + b" " + path.encode() + b" HTTP/1.1\r\nHost: gw\r\n"
                  + b"".join(h + b"\r\n" for h in headers) + b"\r\n")

    def leave(self) -> None:
        """The client goes away (its connection is lost)."""
        self.transport.lose(None)

    def output(self) -> bytes:
        """Bytes written to the client since the last call."""
        data = bytes(self.transport.out[self._read:])
        self._read = len(self.transport.out)
        return data

    def responses(self, head_only: bool = False) -> list[tuple[int, dict, bytes]]:
        """The whole responses written since the last call (content-length or chunked)."""
        return parse_responses(self.output(), head_only)


def parse_responses(raw: bytes, head_only: bool = False) -> list[tuple[int, dict, bytes]]:
    out = []
    buf = bytes(raw)
    while buf:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {buf!r}"
        lines = head.split(b"\r\n")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            name, value = k.strip().lower().decode(), v.strip().decode()
            # A repeated field is one list (RFC 9110 §5.3): WWW-Authenticate, one per scheme.
            headers[name] = headers[name] + ", " + value if name in headers else value
        status = int(lines[0].split()[1])
        if head_only:
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = bytearray()
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2:]
                if size == 0:
                    break
            body = bytes(body)
        else:
            n = int(headers.get("content-length", 0))
            body, rest = rest[:n], rest[n:]
        out.append((status, headers, body))
        buf = rest
    return out


# ---------------------------------------------------------------------- the worker


class Stack:
    """A Worker built from `yaml_text` whose hub runs on a FakeLoop, with one TCP listener's
    rules (identity policy, limits) and no socket."""

    def __init__(self, yaml_text: str = "", loop: FakeLoop | None = None):
        self.loop = loop or FakeLoop()
        self.log = MemoryLog()
        self.settings = settings(yaml_text)
        self.worker = Worker(self.settings, 0, log=self.log)
        self.worker.started = True
        self.worker.now = self.loop.now
        hub = self.worker.hub
        # What TransportHub.start does, without a server: the loop, the wheel, a listener.
        hub.loop = self.loop
        hub.wheel = TimerWheel(self.loop, WHEEL_TICK)
        gw = self.settings.gateway
        node = gw.transports.tcp
        self.listener = Listener("tcp", node, {0: 9100}, None,
                                 RegistrationPolicy("tcp", node, hub._replay),
                                 gw.health.heartbeat_timeout_seconds)
        hub._listeners.append(self.listener)
        self.pipeline = Recorder(self.worker.pipeline)
        self.worker.pipeline = self.pipeline          # before any HttpProtocol reads it

    @property
    def routing(self):
        return self.worker.routing

    @property
    def hub(self):
        return self.worker.hub

    def run(self) -> int:
        return self.loop.run()

    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)
        self.worker.now = self.loop.now

    def link(self, peer=LOOPBACK_PEER) -> ServiceLink:
        """A service connection made, nothing sent yet."""
        return ServiceLink(self, peer)

    def register(self, service: str, endpoints, **hello_fields) -> ServiceLink:
        """A link whose HELLO was acknowledged."""
        link = self.link()
        ack = link.hello(hello(service, endpoints, **hello_fields))
        assert ack is not None and "error" not in ack, ack
        link.instance = link.conn.instance
        return link

    def client(self, peer=("127.0.0.1", 5555)) -> Client:
        return Client(self, peer)


# ---------------------------------------------------------------------- the guard


def forbid_io(monkeypatch) -> None:
    """Make a test fail that opens a socket or starts a thread: these are unit tests. A
    module calls it from an autouse fixture of its own."""
    def refused(*args, **kwargs):
        raise AssertionError("a socket-free test opened a socket")

    def no_thread(self, *args, **kwargs):
        raise AssertionError(f"a thread-free test started a thread ({self.name})")
    monkeypatch.setattr(socket, "socket", refused)
    monkeypatch.setattr(socket, "socketpair", refused)
    monkeypatch.setattr(threading.Thread, "start", no_thread)
