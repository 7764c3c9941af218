"""The served document: built once per routing change, with ETags (docs/openapi.md §5).

`respond()` is what the built-in endpoints answer with. Its fast path — the document is current —
is two comparisons and returning prebuilt bytes: the JSON body, its ETag, the header block
and the discovery document are all made once per build, the YAML once per build. A build
is needed when `routing_state.generation` moved *and* the set of routes moved (health
changes bump the generation but cannot change the document: the routes dict is swapped,
never mutated, on every register/unregister — holding it makes identity a cheap and exact
test), or when `ttl_seconds` passed since the last check (a safety net; 0 disables it). A
rebuild that produces the same bytes keeps the old snapshot, so the ETag and
`generated_at` only change when the content does.

With `background`, the cache listens to the routing state: a registration change starts
the rebuild at once (once per loop iteration, however many HELLOs it carried), not on the
next read, and a built-in handler asks `defer()` first: a read that finds the routes moved
past the snapshot waits for that build without blocking the loop — its handler runs again
when the build lands — so the first read after a change is the new document, never the
old one under a valid ETag.
"""
from __future__ import annotations

import asyncio
import datetime
import gc
import hashlib
import re
import threading
import time

import orjson
import yaml

from ..replies import error_body
from .document import build_document

JSON_PATH = b"/openapi.json"
YAML_PATH = b"/openapi.yaml"
DISCOVERY_PATH = b"/.well-known/openapi"
PATHS = (JSON_PATH, YAML_PATH, DISCOVERY_PATH)

_JSON_TYPE = b"application/json"
_YAML_TYPE = b"application/yaml"      # RFC 9512
_ETAG = re.compile(rb'[ \t]*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)   # libyaml when available
# A read waiting for a build is answered from the last document after this long: a build
# that hangs (a pathological schema) must not hold requests forever.
WAIT_LIMIT = 10.0


# The most list members if_none_match reads: a client revalidates with its one cached tag
# (a few at most). Past them the answer is the document, which is always correct. Reading
# each of 7,500 `a,` (16 KB) cost 3.5 ms a request (an adversarial probe).
MAX_TAGS = 32


def if_none_match(header: bytes | None, etag: bytes) -> bool:
    """RFC 9110 §13.1.2 for GET/HEAD: weak comparison against a list (its first MAX_TAGS
    members), or `*`."""
    if header is None:
        return False
    header = header.strip(b" \t")
    if header == b"*":
        return True                   # the document always has a current representation
    pos, end = 0, len(header)
    left = MAX_TAGS
    while pos < end:
        left -= 1
        if left < 0:
            return False
        m = _ETAG.match(header, pos)
        if m is None:
            # An unparsable member (or an empty list element): skip to the next one.
            comma = header.find(b",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        if m.group(1) == etag:        # weak comparison: W/ prefix ignored, opaque tags equal
            return True
        pos = m.end()
    return False


def _etag(body: bytes, suffix: bytes = b"") -> bytes:
    return b'"' + hashlib.blake2b(body, digest_size=16).hexdigest().encode() + suffix + b'"'


class _Representation:
    __slots__ = ("body", "etag", "ok_headers", "not_modified_headers")

    def __init__(self, body: bytes, etag: bytes, content_type: bytes, cache_control: bytes):
        self.body = body
        self.etag = etag
        # RFC 9110 §15.4.5: a 304 carries the ETag and Cache-Control a 200 would.
        self.not_modified_headers = (b"etag: " + etag + b"\r\n"
                                     b"cache-control: " + cache_control + b"\r\n")
        self.ok_headers = (b"content-type: " + content_type + b"\r\n"
                           b"x-content-type-options: nosniff\r\n" + self.not_modified_headers)


class _Snapshot:
    """One built document and everything served from it. Immutable once made (except the
    YAML, filled in once, on first request)."""

    def __init__(self, doc: dict, cache_control: bytes, generated_at: float):
        body = orjson.dumps(doc)
        self.json = _Representation(body, _etag(body), _JSON_TYPE, cache_control)
        self.cache_control = cache_control
        self.generated_at = generated_at
        self._yaml = None
        self._yaml_lock = threading.Lock()
        info = doc.get("info", {})
        discovery = {
            "openapi_json": JSON_PATH.decode(),
            "openapi_yaml": YAML_PATH.decode(),
            "etag": self.json.etag.decode(),
            "generated_at": datetime.datetime.fromtimestamp(
                generated_at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "openapi": doc.get("openapi"),
            "title": info.get("title"),
            "version": info.get("version"),
            "services": [{k: s[k] for k in ("name", "version", "instances")}
                         for s in doc.get("x-stellagw-services", ())],
        }
        body = orjson.dumps(discovery)
        self.discovery = _Representation(body, _etag(body), _JSON_TYPE, cache_control)

    @property
    def yaml(self) -> _Representation:
        rep = self._yaml
        if rep is None:
            with self._yaml_lock:
                rep = self._yaml
                if rep is None:
                    # From the JSON bytes, so that both formats carry exactly the same
                    # content; safe_dump semantics (SafeDumper), libyaml when present.
                    body = yaml.dump(orjson.loads(self.json.body), Dumper=_Dumper,
                                     sort_keys=False, allow_unicode=True,
                                     default_flow_style=False).encode()
                    # The YAML bytes are a function of the JSON's, so the JSON hash
                    # identifies them too; the suffix keeps the two validators distinct.
                    rep = self._yaml = _Representation(body, self.json.etag[:-1] + b'-yaml"',
                                                       _YAML_TYPE, self.cache_control)
        return rep


class _StateView:
    """What a build reads, taken on the caller's thread: the routes dict (swapped, never
    mutated) and a copy of the instances dict (mutated in place on register/unregister).
    Instances, endpoints and their openapi/schemas objects do not change once registered,
    so a build can run on another thread from this."""

    __slots__ = ("routes", "instances", "generation", "epoch", "args")

    def __init__(self, state, epoch, args):
        self.generation = state.generation
        self.routes = state.routes
        self.instances = dict(state.instances)
        self.epoch = epoch                # OpenApiCache._epoch when taken
        self.args = args                  # the build's title, version ... (never mutated)


# While registrations wait in the routing state's queue, a rebuild looks again this often.
_STORM_RETRY = 0.05
# A background build starts no sooner than this many times the last one's duration after
# it ended: the builder's share of the worker is at most 1/(1 + BUILD_PACE). Unpaced, 30
# links each sending a 300 KB ENDPOINTS_UPDATE a second (within the per-link pacing) kept
# it building back to back, and its GIL share and garbage collections put other
# requests' median latency at 0.9 s.
BUILD_PACE = 3.0


class OpenApiCache:
    """The aggregated document of one worker, rebuilt when routing changes.

    `max_age`: None (default) sends `Cache-Control: public, no-cache` — clients may store
    the document but revalidate on each use (a 304 of a few bytes), so a deploy is visible
    at once; a number sends `public, max-age=<n>` instead (what upstream did, with 60).

    `background`: build on a thread, never on the event loop (1,000 endpoints: ~60 ms for
    the JSON, ~400 ms more for the YAML — far too long to stall a worker), starting as soon
    as the routing state reports a registration change. A read that arrives before the
    build lands waits for it when its handler asks `defer()`; `respond()` alone answers at
    once from the previous snapshot. Only the very first document, when there is nothing
    to serve yet, is built inline; `warm()` at worker start makes that the (tiny) empty
    document. Without `background`, builds run inline and the YAML is made on its first
    request.
    """

    paths = PATHS

    def __init__(self, routing_state, title: str, version: str, ttl_seconds: float,
                 server_url: str | None = None, *, description: str | None = None,
                 token_url: str | None = None, sender_constraints=("dpop", "mtls"),
                 max_age: int | None = None, background: bool = False,
                 clock=time.monotonic, wall_clock=time.time):
        self._state = routing_state
        self._build_args = dict(title=title, version=version, server_url=server_url,
                                description=description, token_url=token_url,
                                sender_constraints=tuple(sender_constraints))
        self.ttl = float(ttl_seconds)
        self.background = background
        self._clock, self._wall_clock = clock, wall_clock
        self._cache_control = (b"public, no-cache" if max_age is None
                               else b"public, max-age=%d" % max(0, int(max_age)))
        self._snapshot: _Snapshot | None = None
        self._generation = None          # routing generation the snapshot is current for
        self._routes = None              # the routes dict it was built from (identity)
        self._checked_at = 0.0
        self._lock = threading.Lock()    # guards the fields above and `_building`
        self._building: threading.Thread | None = None
        self._epoch = 0                  # invalidate() calls so far
        self._built = (-1, -1)           # (generation, epoch) of the view the last build read
        self.builds = 0                  # documents built (tests, metrics)
        self.last_error: BaseException | None = None
        # Loop-thread only: reads waiting for a build, [req, handler, generation and epoch
        # the read saw, timeout handle]; the one being answered; the loop that background
        # builds report to; a rebuild already scheduled for this iteration's changes.
        self._waiting: list = []
        self._answering = None
        self._loop = None
        self._kick_scheduled = False
        self._next_build_at = 0.0        # clock: no background build before (BUILD_PACE)
        self._paced_kick = None          # the timer of a build waiting for that
        if background:
            routing_state.listeners.append(self._routing_changed)

    # ------------------------------------------------------------------ freshness

    def _stale(self) -> bool:
        if self._state.generation != self._generation:
            return True
        return self.ttl > 0 and self._clock() - self._checked_at >= self.ttl

    def current(self) -> _Snapshot:
        """The snapshot to serve. Fast path: it is current. Otherwise at most one build
        runs per change: inline, or (background) on a thread while the last snapshot is
        served. Raises RuntimeError only if no document could ever be built."""
        snap = self._snapshot
        if snap is not None and not self._stale():
            return snap
        with self._lock:
            if self._building is not None:
                pass                                    # one build at a time
            elif self._snapshot is not None and not self._stale():
                pass                                    # another thread just finished
            else:
                view = None if self._paced() else self._plan()
                if view is not None:
                    if self.background and self._snapshot is not None:
                        self._building = threading.Thread(
                            target=self._build, args=(view, True), daemon=True,
                            name="stellagw-openapi")
                        self._building.start()
                    else:
                        self._build(view, False)
        if self._snapshot is None:
            raise RuntimeError("the OpenAPI document could not be built") from self.last_error
        return self._snapshot

    def _plan(self) -> _StateView | None:
        """Under the lock: None if no build is needed after all, else what to build from."""
        state = self._state
        timed_out = self.ttl > 0 and self._clock() - self._checked_at >= self.ttl
        if self._snapshot is not None and state.routes is self._routes and not timed_out:
            # Only health moved (or nothing the document shows): no build.
            self._generation = state.generation
            return None
        self.builds += 1
        return _StateView(state, self._epoch, self._build_args)

    def _paced(self) -> bool:
        return self.background and self._snapshot is not None \
            and self._clock() < self._next_build_at

    def _build(self, view: _StateView, threaded: bool) -> None:
        snap = error = None
        started = self._clock()
        # No collection while the builder runs: the document is millions of fresh objects,
        # and each full collection they set off scanned the whole heap with the GIL held,
        # stopping the loop too (half the build's time, and the loop's p99 doubled).
        # Documents hold no cycles; what the loop makes meanwhile waits for the next one.
        collecting = threaded and gc.isenabled()
        if collecting:
            gc.disable()
        try:
            doc = build_document(view, **view.args)
            snap = _Snapshot(doc, self._cache_control, self._wall_clock())
            if threaded:
                snap.yaml                 # rendered here, off the event loop
        except Exception as exc:          # a bug must not take the endpoint down for good
            error = exc
        finally:
            if collecting:
                gc.enable()
        if threaded:
            with self._lock:
                self._install(view, snap, error)
                ended = self._clock()
                self._next_build_at = ended + BUILD_PACE * (ended - started)
                self._building = None
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._landed)
                except RuntimeError:      # the worker's loop closed during the build
                    pass
        else:
            self._install(view, snap, error)

    def _install(self, view, snap, error) -> None:
        # On failure the previous document stays; the failed state counts as checked, so
        # the next attempt is on the next change or TTL, not on every request.
        self.last_error = error
        if snap is not None and (self._snapshot is None
                                 or snap.json.body != self._snapshot.json.body):
            self._snapshot = snap         # same bytes: keep the old ETag and generated_at
        # A build that started before an invalidate() leaves the document due: the next
        # check (or `_landed`) builds again, with what the invalidation brought.
        current = view.epoch == self._epoch
        self._generation = view.generation if current else None
        self._routes = view.routes if current else None
        self._checked_at = self._clock()
        self._built = (view.generation, view.epoch)

    def warm(self) -> None:
        """Build now (at worker start: the registry is empty, so this is cheap)."""
        try:
            self.current()
        except RuntimeError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a background build in flight (tests, shutdown); True when idle."""
        thread = self._building
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def invalidate(self) -> None:
        """Rebuild (e.g. after a configuration reload): at once with `background` when
        called on the loop, else on the next request."""
        with self._lock:
            self._epoch += 1              # a build running now read what is stale
            self._generation = None
            self._routes = None
        if self.background:
            self._routing_changed("invalidated", None)

    def reconfigure(self, title: str, version: str, ttl_seconds: float,
                    server_url: str | None, sender_constraints) -> None:
        """A configuration reload: the next document is built with these. A build already
        running read the old ones, so the rebuild waits for it to land (reads meanwhile
        wait for the new document as after a registration: `defer()`)."""
        with self._lock:
            self._build_args = dict(self._build_args, title=title, version=version,
                                    server_url=server_url,
                                    sender_constraints=tuple(sender_constraints))
            self.ttl = float(ttl_seconds)
        loop = _running_loop()

        def again():
            if self._building is not None and loop is not None:
                loop.call_later(0.02, again)
                return
            self.invalidate()
        again()

    # ------------------------------------------------------------------ built on change
    #
    # Everything below runs on the worker's loop thread, except `_build` on its own.

    def _routing_changed(self, event, instance, **extra) -> None:
        """RoutingState listener: start the rebuild now rather than on the next read."""
        if event == "health":
            return                        # the generation moves, the document cannot
        loop = _running_loop()
        if loop is None:                  # no loop (tools, unit tests): build right away
            self._kick()
            return
        self._loop = loop
        if not self._kick_scheduled:
            # After this iteration's other callbacks: a storm of HELLOs read in one
            # iteration is one build, not one per HELLO.
            self._kick_scheduled = True
            loop.call_soon(self._kick)

    def _kick(self) -> None:
        """Start a background build if the routes moved past the snapshot (or the TTL ran
        out). With one already running, nothing: `_landed` looks again when it is in."""
        self._kick_scheduled = False
        if self._loop is not None and self._state.pending():
            # A registration storm is being worked through (routing/state.py spreads it
            # over loop iterations): one build when it is over, not one per iteration —
            # each build's garbage and its thread's share of the GIL stalled the loop.
            self._kick_scheduled = True
            self._loop.call_later(_STORM_RETRY, self._kick)
            return
        wait = self._next_build_at - self._clock()
        if wait > 0 and self._loop is not None and self._snapshot is not None:
            if self._paced_kick is None:          # reads meanwhile wait for it (defer)
                self._paced_kick = self._loop.call_later(wait, self._kick_paced)
            return
        with self._lock:
            if self._building is not None:
                return
            view = self._plan()
            if view is not None:
                if self._snapshot is None:
                    self._build(view, False)
                else:
                    self._building = threading.Thread(target=self._build, args=(view, True),
                                                      daemon=True, name="stellagw-openapi")
                    self._building.start()
        if self._building is None:
            self._answer_waiting()

    def _kick_paced(self) -> None:
        self._paced_kick = None
        self._kick()

    def _landed(self) -> None:
        """A background build was installed: build again if the routes moved while it ran,
        then answer the reads it covers."""
        if self._state.routes is not self._routes:
            self._kick()
        self._answer_waiting()

    def _answer_waiting(self) -> None:
        # A read is covered by a build that read its generation and epoch or later ones;
        # with no build running, nothing newer is coming (only health moved since), so all
        # are.
        waiting, self._waiting = self._waiting, []
        idle = self._building is None and self._paced_kick is None
        generation, epoch = self._built
        for item in waiting:
            if idle or (item[2] <= generation and item[3] <= epoch):
                item[4].cancel()
                self._answer(item)
            else:
                self._waiting.append(item)

    def _gave_up(self, item) -> None:
        if item in self._waiting:
            self._waiting.remove(item)
            self._answer(item)

    def _answer(self, item) -> None:
        req, handler = item[0], item[1]
        self._answering = req             # its handler's defer() now says no
        try:
            result = handler(req)
        except Exception as exc:          # as the ingress does for a handler that raises
            result = (500, b"content-type: application/json\r\n",
                      error_body(500, "internal error", req.correlation_id))
            if self._loop is not None:
                self._loop.call_exception_handler(
                    {"message": "OpenAPI handler failed", "exception": exc})
        finally:
            self._answering = None
        if result is not None:
            req.conn.respond(req, *result)

    def defer(self, req, handler) -> bool:
        """For a built-in handler, before it answers: True when the routes moved past the
        document and the build for them is under way. `handler(req)` is then run again when
        that build lands (or after WAIT_LIMIT) and its answer sent on `req.conn`; meanwhile
        the loop serves others. False: answer now (`respond()`), the document is current.
        """
        if not self.background or req is self._answering:
            return False
        snap = self._snapshot
        if snap is None or not self._stale():
            return False
        state = self._state
        if state.routes is self._routes:
            # Only health moved, or only the TTL ran out: a TTL rebuild almost never changes
            # the content, so it is not worth a wait.
            return False
        loop = _running_loop()
        if loop is None:
            return False
        self._loop = loop
        self._kick()
        if self._building is None and self._paced_kick is None:
            return False                  # nothing to wait for (a failed build, say)
        item = [req, handler, state.generation, self._epoch, None]
        item[4] = loop.call_later(WAIT_LIMIT, self._gave_up, item)
        self._waiting.append(item)
        return True

    # ------------------------------------------------------------------ accessors

    def json(self) -> bytes:
        return self.current().json.body

    def yaml(self) -> bytes:
        return self.current().yaml.body

    @property
    def etag(self) -> bytes:
        return self.current().json.etag

    def document(self) -> dict:
        return orjson.loads(self.json())

    # ------------------------------------------------------------------ HTTP

    def respond(self, path: bytes, if_none_match_header: bytes | None = None
                ) -> tuple[int, bytes, bytes]:
        """(status, header lines, body) for GET/HEAD of one of `PATHS`."""
        try:
            snap = self.current()
        except RuntimeError:
            return (503, b"content-type: application/json\r\nretry-after: 5\r\n",
                    error_body(503, "the OpenAPI document is not available", ""))
        if path == JSON_PATH:
            rep = snap.json
        elif path == YAML_PATH:
            rep = snap.yaml
        elif path == DISCOVERY_PATH:
            rep = snap.discovery
        else:
            return (404, b"content-type: application/json\r\n",
                    error_body(404, "not an OpenAPI document path", ""))
        if if_none_match(if_none_match_header, rep.etag):
            return 304, rep.not_modified_headers, b""
        return 200, rep.ok_headers, rep.body


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
