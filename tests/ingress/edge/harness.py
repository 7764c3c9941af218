"""Machinery of the adversarial corpus (docs/http-edge.md, issue 15).

* A **recording service**: a real SDK `Service` in its own thread and uvloop loop
  (tests/support/servicepeer.py's SdkThread), dialled into the test gateway, whose
  catch-all endpoints record exactly what reached them — the REQUEST frame's method, path,
  query and header lines, the body once it is complete, and whether a CANCEL came — keyed
  by the per-send marker in the path.
* A **raw client runner**: one fresh TCP connection per send, the bytes cut at seeded random
  points with small sleeps in between, everything read until the gateway closes or goes
  quiet, and the responses parsed (statuses, headers, `connection: close`, stray bytes).
* **Judging**: a case's expectations (statuses, connection kept or closed, what the service
  saw) against what happened, plus invariants every forwarded request must satisfy.

Everything listens and connects on 127.0.0.1 only, and every wait is bounded.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from stellagw.transport import frame as fr
from stellagw.config import ConfigError, load_config_text
from stellagw.service import Response, Service, StreamResponse

from tests.support.gwtest import GatewayThread
from tests.support.servicepeer import SdkThread
from tests.support.auth import DpopClient, SigningKey, jwks, mint_token

PUBLIC_ORIGIN = "http://gw.test"          # gateway.http.publicOrigin: the DPoP htu base
ISSUER = "https://authority.test"         # tokens are checked against a static JWKS file
SCOPE = "edge:read"                       # what /secure/ requires
BODY_LIMIT = 65536                        # gateway.routing.maxRequestBodySize
URL_LIMIT = 2048                          # gateway.http.maxUrlLength
HEADER_LIMIT = 16384                      # gateway.http.maxHeaderBytes (the default, 16KB)
GET_BODY = b"edge-body-0123456789"        # what the recording service answers (20 bytes)
PREFIXES = ("edge", "secure", "getonly", "stream", "ws", "slow", "late", "nowhere")
MARKER_RE = re.compile(r"/(?:%s)/(Z[0-9A-Z]{3})(?=/|$|\?|#|%%|;)" % "|".join(PREFIXES))
MARKER_BYTES_RE = re.compile(rb"/(?:%s)/(Z[0-9A-Z]{3})(?=/| |\?|#|%%|;)" % b"|".join(
    p.encode() for p in PREFIXES))

# Request header names no forwarded request may carry, whatever the case (docs/http-edge.md:
# hop-by-hop fields, client-chosen addresses and method overrides, the corpus' canary).
NEVER_FORWARDED = (
    "transfer-encoding", "connection", "keep-alive", "proxy-connection", "trailer",
    "http2-settings", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip",
    "x-http-method-override", "x-http-method", "x-method-override", "x-original-url",
    "x-rewrite-url", "forwarded", "x-canary",
)


# ================================================================== what a case expects

@dataclass(frozen=True)
class Seen:
    """One request as the service must see it. `{id}` in path and values is the marker."""
    method: str | tuple = "GET"
    path: str | None = None               # the normalised path, exactly; None: any
    body: bytes | None = b""              # None: any (and the request need not complete)
    query: bytes | None = None
    headers: dict = field(default_factory=dict)   # name -> exact value (None: present)
    absent: tuple = ()                    # header names that must not be there
    cancelled: bool | None = False        # CANCEL received; None: either


PARTIAL = "partial"   # nothing, or requests that never completed (REQUEST then CANCEL)


@dataclass(frozen=True)
class Expect:
    statuses: tuple
    closed: bool | None                   # None: either
    seen: tuple | str = ()                # tuple of Seen (in order), or PARTIAL


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes                            # placeholders: {id} (4 bytes), {bearer}, ...
    expect: Expect
    rows: tuple                           # keys of corpus.ROWS (docs/http-edge.md rows)
    source: str                           # RFC section or attack class
    alts: tuple = ()                      # other acceptable outcomes (Expect)
    head: tuple = ()                      # indices of final responses that answer HEAD
    allow_100: bool = False               # an interim 100 may or may not come
    wait_after_head: bool = False         # send the head, wait for an answer, then the rest
    script: tuple = ()                    # ((delay_before, bytes), ...): timed, never cut
    idle: float = 1.0                     # how long silence means "nothing more comes"
    gateway: str = "main"                 # "main" or "deadlines"
    dpop: tuple | None = None             # (method, path) the DPoP proof signs
    oracle: bool = True                   # compare with nginx (timed cases are not)
    max_seconds: float | None = None      # the final answer must come sooner than this
    min_seconds: float | None = None      # ... and not before this (a deadline, not a bug)
    keep_wait: float = 0.3                # after the last expected answer, wait this long
    no_reset: bool = False                # the gateway must not reset the connection
    resp_absent: tuple = ()               # header names no final answer may carry
    silent_close: bool = False            # the close is a deadline's, after a kept answer

    @property
    def head_indices(self):
        if self.head:
            return self.head
        return (0,) if self.raw.startswith(b"HEAD ") else ()


# ================================================================== markers and credentials

_B36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Markers:
    """Four-byte markers (`Z` + three base-36 digits): `{id}` keeps every length intact."""

    def __init__(self, start: int = 0):
        self._n = start
        self._lock = threading.Lock()

    def next(self) -> str:
        with self._lock:
            n = self._n
            self._n += 1
        return "Z" + _B36[n // 1296 % 36] + _B36[n // 36 % 36] + _B36[n % 36]


class Credentials:
    """A signing key whose public half the gateway reads from a JWKS file; tokens and DPoP
    proofs minted for the wall clock of each send."""

    def __init__(self, folder):
        self.key = SigningKey("ES256", kid="edge-1")
        self.client = DpopClient()
        self.jwks_path = str(folder / "edge-jwks.json")
        with open(self.jwks_path, "w") as f:
            json.dump(jwks(self.key), f)

    def bearer(self, scope=SCOPE) -> str:
        return mint_token(self.key, ISSUER, now=time.time(), scope=scope)

    def dpop_token(self) -> str:
        return mint_token(self.key, ISSUER, now=time.time(), scope=SCOPE,
                          cnf={"jkt": self.client.jkt})

    def proof(self, method: str, path: str, token: str) -> str:
        return self.client.proof(method, PUBLIC_ORIGIN + path, token, now=time.time())


def render(case: Case, marker: str, creds: Credentials | None) -> bytes:
    raw = case.raw if not case.script else b"".join(p for _, p in case.script)
    return _fill(raw, case, marker, creds)


def _fill(raw: bytes, case: Case, marker: str, creds: Credentials | None) -> bytes:
    raw = raw.replace(b"{id}", marker.encode())
    if creds is None or b"{" not in raw:
        return raw
    if b"{bearer}" in raw:
        raw = raw.replace(b"{bearer}", creds.bearer().encode())
    if b"{bearer_noscope}" in raw:
        raw = raw.replace(b"{bearer_noscope}", creds.bearer(scope="other:thing").encode())
    if b"{dpop_token}" in raw:
        token = creds.dpop_token()
        raw = raw.replace(b"{dpop_token}", token.encode())
        if b"{dpop_proof}" in raw and case.dpop is not None:
            method, path = case.dpop
            proof = creds.proof(method, path.replace("{id}", marker), token)
            raw = raw.replace(b"{dpop_proof}", proof.encode())
    return raw


# ================================================================== the recording service

@dataclass
class Record:
    marker: str | None
    method: str
    path: str
    query: bytes
    headers: list                 # [(name str lower, value str)], as the frame carried them
    body: bytes
    end_stream: bool              # the REQUEST frame carried the whole body
    seq: int
    complete: bool = False        # the handler got the whole request
    sdk_request: object = None    # the SDK's Request / WebSocket (its .cancelled event)

    @property
    def cancelled(self) -> bool:
        req = self.sdk_request
        return bool(req is not None and req.cancelled.is_set())

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def brief(self) -> str:
        hs = ", ".join(f"{n}: {v[:40]}" for n, v in self.headers
                       if n not in ("x-correlation-id", "user-agent"))
        state = "complete" if self.complete else ("CANCEL" if self.cancelled else "incomplete")
        return (f"{self.method} {self.path}{'?' + self.query.decode('latin-1') if self.query else ''}"
                f" body={self.body[:60]!r}{'…' if len(self.body) > 60 else ''} ({state}) [{hs}]")


class Book:
    """Every request any recording service received, by marker; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._seq = 0
        self.by_marker: dict[str, list[Record]] = {}
        self.strays: list[Record] = []
        self._by_key: dict = {}

    def add(self, key, method, path, query, headers, body, end_stream) -> Record:
        names = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
        marker = marker_of(path)
        if marker is None:
            for n, v in names:
                if n == "x-edge-id":
                    marker = v
        with self._lock:
            self._seq += 1
            rec = Record(marker, method, path, query, names, body, end_stream, self._seq)
            if marker is None:
                self.strays.append(rec)
            else:
                self.by_marker.setdefault(marker, []).append(rec)
            self._by_key[key] = rec
        return rec

    def take(self, key) -> Record | None:
        with self._lock:
            return self._by_key.pop(key, None)

    def records(self, marker: str) -> list[Record]:
        with self._lock:
            return list(self.by_marker.get(marker, ()))


def marker_of(path: str) -> str | None:
    m = MARKER_RE.search(path)
    return m.group(1) if m else None


class RecordingService(Service):
    """A Service whose every REQUEST frame is written down before the SDK acts on it."""

    def __init__(self, book: Book, *args, **kw):
        super().__init__(*args, **kw)
        self.book = book

    def _on_request(self, link, corr, payload):
        flags, _timeout, method, path, query, headers, body = fr.decode_request(payload)
        rec = self.book.add((id(link), corr), method, path, query, headers, bytes(body),
                            bool(flags & fr.FLAG_END_STREAM))
        super()._on_request(link, corr, payload)
        entry = link.requests.get(corr)
        if entry is not None:
            rec.sdk_request = entry[1]


def build_service(book: Book, gateway_tcp_port: int, name: str = "edge") -> RecordingService:
    svc = RecordingService(book, name, "1.0.0", gateways=[f"127.0.0.1:{gateway_tcp_port}"],
                           reconnect_min=0.05, reconnect_max=0.5, resolve_interval=0)

    def done(req, body=None):
        rec = book.take((id(req._link), req._corr))
        if rec is not None:
            rec.body = req.body if body is None else body
            rec.complete = True
            if rec.sdk_request is None:
                rec.sdk_request = req
        return rec

    def query_ms(req) -> int:
        for part in req.query.split(b"&"):
            if part.startswith(b"ms="):
                try:
                    return int(part[3:])
                except ValueError:
                    return 0
        return 0

    async def plain(req):
        done(req)
        return Response(GET_BODY, content_type="text/plain")

    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        svc.route(method, "/edge/{*rest}")(plain)
        svc.route(method, "/secure/{*rest}", claims=[("scope", SCOPE)])(plain)
    svc.get("/getonly/{*rest}")(plain)

    @svc.get("/stream/{*rest}")
    async def stream_out(req):
        done(req)

        async def parts():
            for i in range(3):
                yield b"part-%d;" % i
        return StreamResponse(parts(), content_type="text/plain")

    @svc.post("/stream/{*rest}", streaming=True)
    async def stream_in(req):
        chunks = [c async for c in req.stream()]
        done(req, b"".join(chunks))
        return Response(GET_BODY, content_type="text/plain")

    @svc.websocket("/ws/{*rest}")
    async def ws_echo(ws):
        rec = book.take((id(ws._link), ws._corr))
        if rec is not None:
            rec.complete = True
            rec.sdk_request = ws
        async for message in ws:
            await ws.send(message)

    @svc.get("/slow/{*rest}", timeout=5.0)
    async def slow(req):
        done(req)
        await asyncio.sleep(query_ms(req) / 1000)
        return Response(GET_BODY, content_type="text/plain")

    @svc.get("/late/{*rest}", timeout=0.5)
    async def late(req):
        done(req)
        await asyncio.sleep(3.0)
        return Response(b"too late", content_type="text/plain")

    return svc


# ================================================================== gateways

MAIN_YAML = f"""
gateway:
  http:
    port: 0
    publicOrigin: "{PUBLIC_ORIGIN}"
    maxUrlLength: {URL_LIMIT}
    headerReadTimeout: 5s
    keepAliveTimeout: 10s
    shutdownTimeout: 2s
  transports: {{tcp: {{port: 0}}}}
  routing: {{maxRequestBodySize: {BODY_LIMIT}, defaultTimeout: 5s}}
  auth:
    authority: "{ISSUER}"
    jwksPath: "{{jwks}}"
  logging: {{level: error, accessLog: false}}
"""

# Short deadlines for the timed cases. bodyReadTimeout and minBodyRate (docs/http-edge.md,
# "Deadlines") are dropped while the configuration does not know them yet.
DEADLINE_YAML = MAIN_YAML.replace("headerReadTimeout: 5s", "headerReadTimeout: 1s").replace(
    "keepAliveTimeout: 10s", "keepAliveTimeout: 3s\n    bodyReadTimeout: 1s\n    minBodyRate: 100")


def load_settings(text: str):
    """The settings, with any key the configuration does not know (yet) left out."""
    for _ in range(8):
        try:
            return load_config_text(text, env={})
        except ConfigError as exc:
            m = re.match(r"gateway\.http\.(\w+): unknown key", str(exc))
            if not m:
                raise
            text = "\n".join(line for line in text.splitlines()
                             if not line.strip().startswith(m.group(1) + ":"))
    return load_config_text(text, env={})


class EdgeStack:
    """The main gateway and the short-deadline gateway, each with a recording service."""

    def __init__(self, tmp_folder, deadlines: bool = True):
        self.creds = Credentials(tmp_folder)
        self.book = Book()
        self.markers = Markers()
        self.gateways: dict[str, GatewayThread] = {}
        self.services: list[SdkThread] = []
        kinds = {"main": MAIN_YAML}
        if deadlines:
            kinds["deadlines"] = DEADLINE_YAML
        try:
            for kind, text in kinds.items():
                settings = load_settings(text.replace("{jwks}", self.creds.jwks_path))
                gw = GatewayThread(settings).start()
                self.gateways[kind] = gw
                svc = SdkThread(build_service(self.book, gw.transport_port, "edge")).start()
                self.services.append(svc)
            for kind in self.gateways:
                self._wait_routable(kind)
        except BaseException:
            self.close()
            raise

    def port(self, kind: str = "main") -> int:
        return self.gateways[kind].port

    def _wait_routable(self, kind: str, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            marker = self.markers.next()
            raw = b"GET /edge/%s/ready HTTP/1.1\r\nHost: gw.test\r\n\r\n" % marker.encode()
            out = run_raw(self.port(kind), raw, None, expect_n=1, idle=0.5, keep_wait=0.0)
            if out.statuses == [200]:
                return
            time.sleep(0.05)
        raise AssertionError(f"the recording service is not routable through the {kind} gateway")

    def close(self):
        for svc in self.services:
            try:
                svc.stop()
            except Exception:  # noqa: BLE001 -- a teardown must go on
                pass
        for gw in self.gateways.values():
            try:
                gw.stop()
            except Exception:  # noqa: BLE001
                pass


# ================================================================== the raw client

@dataclass
class Resp:
    status: int
    version: bytes
    headers: list                 # [(name lower, value)] as str
    body: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def closes(self) -> bool:
        value = self.header("connection") or ""
        return "close" in [t.strip().lower() for t in value.split(",")]


@dataclass
class Outcome:
    responses: list
    closed: bool                  # the gateway closed (FIN or RST) within the read window
    reset: bool
    received: int                 # bytes received in all
    extra: bytes                  # bytes that are no HTTP response
    send_error: str | None
    elapsed: float
    marker: str = ""
    sent: bytes = b""
    pieces: int = 1

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    def brief(self) -> str:
        parts = [f"statuses={self.statuses}", "closed" if self.closed else "kept"]
        if self.reset:
            parts.append("(reset)")
        if self.extra:
            parts.append(f"stray bytes {self.extra[:80]!r}")
        if self.send_error:
            parts.append(f"send: {self.send_error}")
        return " ".join(parts)


def parse_responses(buf: bytes, head_indices=(), closed=False):
    """(responses, leftover, garbage): complete responses in order; `garbage` says the
    leftover is not the start of a response (it will never parse)."""
    out = []
    pos = 0
    finals = 0
    n = len(buf)
    while pos < n:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            rest = buf[pos:]
            return out, rest, not (rest.startswith(b"HTTP/") or b"HTTP/".startswith(rest))
        lines = buf[pos:end].split(b"\r\n")
        m = re.match(rb"(HTTP/\d\.\d) (\d{3})(?: .*)?$", lines[0])
        if not m:
            return out, buf[pos:], True
        version, status = m.group(1), int(m.group(2))
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                return out, buf[pos:], True
            headers.append((name.strip().lower().decode("latin-1"),
                            value.strip().decode("latin-1")))
        resp = Resp(status, version, headers, b"")
        body_at = end + 4
        if 100 <= status < 200 and status != 101:
            out.append(resp)
            pos = body_at
            continue
        is_head = finals in head_indices
        finals += 1
        if status == 101:
            out.append(resp)
            return out, b"", False        # what follows is WebSocket
        te = resp.header("transfer-encoding")
        cl = resp.header("content-length")
        if is_head or status in (204, 304):
            pos = body_at
        elif te is not None and te.lower() == "chunked":
            p = body_at
            body = bytearray()
            while True:
                le = buf.find(b"\r\n", p)
                if le < 0:
                    return out, buf[pos:], False
                size_text = buf[p:le].split(b";")[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    return out, buf[pos:], True
                if size == 0:
                    te_end = buf.find(b"\r\n\r\n", le)
                    if te_end < 0:
                        return out, buf[pos:], False
                    p = te_end + 4
                    break
                if le + 2 + size + 2 > n:
                    return out, buf[pos:], False
                body += buf[le + 2:le + 2 + size]
                p = le + 2 + size + 2
            resp.body = bytes(body)
            pos = p
        elif cl is not None:
            try:
                length = int(cl)
            except ValueError:
                return out, buf[pos:], True
            if body_at + length > n:
                return out, buf[pos:], False
            resp.body = buf[body_at:body_at + length]
            pos = body_at + length
        else:
            if not closed:                # delimited by the close
                return out, buf[pos:], False
            resp.body = buf[body_at:]
            pos = n
        out.append(resp)
    return out, b"", False


def cut(data: bytes, rng: random.Random | None, max_pieces: int = 8):
    """((delay, piece), ...): the bytes in up to `max_pieces` pieces, cut at random points
    (half of them next to a CR or LF), with sleeps of up to 8 ms between them."""
    if rng is None or len(data) < 2:
        return ((0.0, data),)
    near = [i for i in range(1, len(data)) if data[i - 1:i] in (b"\r", b"\n")
            or data[i:i + 1] in (b"\r", b"\n")]
    k = rng.randint(1, min(max_pieces - 1, len(data) - 1))
    points = set()
    for _ in range(k):
        if near and rng.random() < 0.5:
            points.add(rng.choice(near))
        else:
            points.add(rng.randint(1, len(data) - 1))
    edges = [0, *sorted(points), len(data)]
    return tuple((0.0 if i == 0 else rng.uniform(0.0, 0.008), data[a:b])
                 for i, (a, b) in enumerate(zip(edges, edges[1:])))


def run_raw(port: int, data: bytes, rng: random.Random | None = None, *, pieces=None,
            expect_n: int | None = None, head_indices=(), wait_after_head: bool = False,
            idle: float = 1.0, keep_wait: float = 0.3, close_wait: float = 2.5,
            total: float = 10.0) -> Outcome:
    """Send `data` on a fresh connection to 127.0.0.1:`port` and read what comes back.

    Reading ends when the gateway closes, when `expect_n` final responses are in and
    nothing more comes for `keep_wait` (`close_wait` when the last says `connection:
    close`), when nothing comes for `idle`, or after `total` seconds.
    """
    t0 = time.monotonic()
    deadline = t0 + total
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(2.0)
    buf = bytearray()
    state = {"closed": False, "reset": False}
    send_error = None

    def pump(timeout: float, settle: bool = True) -> bool:
        """Read for up to `timeout`; with `settle`, return once data came and then 50 ms
        passed without more."""
        got = False
        end = min(time.monotonic() + timeout, deadline)
        while not state["closed"]:
            left = end - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select([sock], [], [], left)
            if not r:
                break
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, ConnectionAbortedError):
                state["closed"] = state["reset"] = True
                break
            except socket.timeout:
                continue
            if not chunk:
                state["closed"] = True
                break
            buf.extend(chunk)
            got = True
            if settle:
                end = min(end, time.monotonic() + 0.05)
        return got

    if pieces is None:
        if wait_after_head and b"\r\n\r\n" in data:
            at = data.index(b"\r\n\r\n") + 4
            head = cut(data[:at], rng)
            pieces = head + ((-1.0, data[at:]),) if data[at:] else head
        else:
            pieces = cut(data, rng)
    try:
        for delay, piece in pieces:
            if delay < 0:                 # wait for an answer to the head (or 0.5 s)
                end = time.monotonic() + 0.5
                while time.monotonic() < end and not state["closed"]:
                    if pump(0.05) and b"\r\n\r\n" in buf:
                        break
            elif delay:
                pump(delay, settle=False)
            if state["closed"]:
                break
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError) as exc:
                send_error = type(exc).__name__
                break
            except socket.timeout:
                send_error = "send timed out (the gateway stopped reading)"
                break
        while not state["closed"] and time.monotonic() < deadline:
            responses, _, _ = parse_responses(bytes(buf), head_indices)
            finals = [r for r in responses if not (100 <= r.status < 200) or r.status == 101]
            if expect_n is not None and len(finals) >= expect_n:
                wait = close_wait if finals and finals[-1].closes else keep_wait
                if finals and finals[-1].status == 101:
                    wait = keep_wait
            else:
                wait = idle
            if wait <= 0 or not pump(wait):
                break
    finally:
        sock.close()
    responses, rest, garbage = parse_responses(bytes(buf), head_indices, closed=state["closed"])
    return Outcome(responses, state["closed"], state["reset"], len(buf),
                   bytes(rest) if (rest and (garbage or state["closed"])) else b"",
                   send_error, time.monotonic() - t0, pieces=len(pieces))


def run_case(stack: EdgeStack, case: Case, seed: int | None) -> Outcome:
    """One send of `case`: uncut (seed None) or cut by random.Random(seed)."""
    marker = stack.markers.next()
    creds = stack.creds
    rng = None if seed is None else random.Random(seed)
    expect_n = len([s for s in case.expect.statuses if not (100 <= s < 200) or s == 101])
    if case.script:
        pieces = tuple((delay, _fill(p, case, marker, creds)) for delay, p in case.script)
        data = b"".join(p for _, p in pieces)
    else:
        pieces = None
        data = render(case, marker, creds)
    out = run_raw(stack.port(case.gateway), data, rng, pieces=pieces, expect_n=expect_n,
                  head_indices=case.head_indices, wait_after_head=case.wait_after_head,
                  idle=case.idle, keep_wait=case.keep_wait,
                  total=max(10.0, case.idle + case.keep_wait + 5,
                            sum(d for d, _ in case.script) + case.idle + 2))
    out.marker = marker
    out.sent = data
    return out


# ================================================================== judging

def record_invariants(rec: Record) -> list[str]:
    """What no forwarded request may look like, whatever the case."""
    problems = []
    names = [n for n, _ in rec.headers]
    for name in NEVER_FORWARDED:
        if name in names:
            problems.append(f"the service saw `{name}: {rec.values(name)[0][:60]}`")
    if "upgrade" in names and not rec.path.startswith("/ws/"):
        problems.append(f"the service saw `upgrade: {rec.values('upgrade')[0]}`")
    te = rec.values("te")
    if te and te != ["trailers"]:
        problems.append(f"the service saw `te: {te[0]}`")
    xff = rec.values("x-forwarded-for")
    if xff != ["127.0.0.1"]:
        problems.append(f"x-forwarded-for is {xff} (want the gateway's own ['127.0.0.1'])")
    if len(rec.values("host")) > 1:
        problems.append(f"the service saw {len(rec.values('host'))} host lines")
    if len(rec.values("x-forwarded-host")) > 1:
        problems.append("the service saw several x-forwarded-host lines")
    return problems


def _match_seen(seen: Seen, rec: Record, marker: str) -> list[str]:
    p = []
    methods = seen.method if isinstance(seen.method, tuple) else (seen.method,)
    if rec.method not in methods:
        p.append(f"method {rec.method} (want {'/'.join(methods)})")
    if seen.path is not None and rec.path != seen.path.replace("{id}", marker):
        p.append(f"path {rec.path!r} (want {seen.path.replace('{id}', marker)!r})")
    if seen.query is not None and rec.query != seen.query.replace(b"{id}", marker.encode()):
        p.append(f"query {rec.query!r} (want {seen.query!r})")
    if seen.body is not None:
        if not rec.complete:
            p.append("the request never completed at the service")
        elif rec.body != seen.body.replace(b"{id}", marker.encode()):
            p.append(f"body {rec.body[:80]!r} (want {seen.body[:80]!r})")
    for name, value in seen.headers.items():
        got = rec.values(name)
        if value is None:
            if not got:
                p.append(f"no `{name}`")
        elif got != [value.replace("{id}", marker)]:
            p.append(f"`{name}` is {got} (want [{value.replace('{id}', marker)!r}])")
    for name in seen.absent:
        if rec.values(name):
            p.append(f"`{name}: {rec.values(name)[0][:60]}` reached the service")
    if seen.cancelled is not None and rec.cancelled != seen.cancelled:
        p.append("CANCEL received" if rec.cancelled else "no CANCEL")
    return p


def mismatches(exp: Expect, case: Case, out: Outcome, recs: list[Record]) -> list[str]:
    p = []
    got = out.statuses
    if case.allow_100:
        got = [s for s in got if s != 100]
    if tuple(got) != tuple(exp.statuses):
        p.append(f"statuses {got} (want {list(exp.statuses)})")
    if exp.closed is not None and out.closed != exp.closed:
        p.append("closed" if out.closed else "kept open (want close)")
    if exp.closed and not case.silent_close and out.responses and out.responses[-1].status >= 200 \
            and not out.responses[-1].closes and tuple(got) == tuple(exp.statuses):
        p.append("the last answer has no `connection: close`")
    if exp.seen == PARTIAL:
        done = [r for r in recs if r.complete and not r.cancelled]
        if done:
            p.append(f"the service got the whole request: {done[0].brief()}")
    else:
        if len(recs) != len(exp.seen):
            p.append(f"the service saw {len(recs)} request(s) (want {len(exp.seen)})"
                     + "".join(f"\n      seen: {r.brief()}" for r in recs))
        else:
            for i, (seen, rec) in enumerate(zip(exp.seen, recs)):
                mm = _match_seen(seen, rec, out.marker)
                if mm:
                    p.append(f"request {i}: " + "; ".join(mm) + f"\n      seen: {rec.brief()}")
    return p


def judge(case: Case, out: Outcome, recs: list[Record]) -> list[str]:
    """Empty when the outcome is acceptable; else what is wrong (against the main
    expectation, however the alternatives failed too)."""
    problems = []
    for rec in recs:
        problems += record_invariants(rec)
    if out.extra:
        problems.append(f"bytes after the last response that are no response: {out.extra[:100]!r}")
    if case.max_seconds is not None and out.elapsed > case.max_seconds + 1.0:
        problems.append(f"took {out.elapsed:.1f} s (want under {case.max_seconds} s)")
    if case.min_seconds is not None and out.elapsed < case.min_seconds:
        problems.append(f"over after {out.elapsed:.1f} s (want at least {case.min_seconds} s)")
    if case.no_reset and out.reset:
        problems.append("the gateway reset the connection (no lingering read)")
    for resp in out.responses:
        for name in case.resp_absent:
            if resp.status >= 200 and resp.header(name) is not None:
                problems.append(f"the {resp.status} answer carries `{name}: {resp.header(name)}`")
    main = mismatches(case.expect, case, out, recs)
    if main and any(not mismatches(alt, case, out, recs) for alt in case.alts):
        main = []
    return main + problems


def describe(case: Case, out: Outcome, recs: list[Record], problems: list[str],
             label: str) -> str:
    seen = "nothing" if not recs else "; ".join(r.brief() for r in recs)
    return (f"[{label}] {case.name} ({case.source}) marker {out.marker}: got {out.brief()}, "
            f"service saw {seen}\n    - " + "\n    - ".join(problems))


def expected_text(case: Case) -> str:
    e = case.expect
    seen = ("REQUEST then CANCEL, or nothing" if e.seen == PARTIAL else
            "nothing" if not e.seen else f"{len(e.seen)} request(s)")
    conn = {True: "close", False: "kept", None: "either"}[e.closed]
    return f"{list(e.statuses)} {conn}, service: {seen}"
