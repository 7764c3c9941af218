"""The fleet view: which services the other gateway pods route, kept in Valkey.

Services dial in to every gateway pod, and find a new pod only when they next resolve the
gateways' name (the SDK's `resolve_interval`). A new pod knows nothing of them until then,
so without this it would answer 404 for services that are there. With
`gateway.node.fleet.valkey` set, every worker publishes the services it has routable (and
their routes) under one entry with an expiry, and a worker that starts reads the union of
the live entries: until each of those services has registered with it, it is not ready,
and a request for one of their routes is answered 503 with Retry-After (the routes are
given to RoutingState.expect()). docs/operations.md, "A new pod: the fleet view".

Layout: three keys sharing one hash tag, so a Valkey Cluster keeps them on one master and
each script runs there in one call:

    {stellagw-fleet:<environment>:<region>}:members   ZSET  member -> expiry (ms, Valkey's clock)
    {stellagw-fleet:<environment>:<region>}:views     HASH  member -> the view (JSON)
    {stellagw-fleet:<environment>:<region>}:digests   HASH  member -> SHA-1 of the view

A member is `<nodeId>/<worker>`. Valkey has no expiry per hash field before version 9,
so the ZSET carries it: a publish sets its own score to now + entryTtl and removes members
whose score has passed (a dead pod's entry), a read takes only members still in the
future. The keys themselves expire entryTtl after the last publish, so a fleet that is
gone leaves nothing behind. The clock is Valkey's (TIME), so pods' clocks do not matter.

Cheap and bounded: a view is sent only when it changed (or Valkey lost it); otherwise a
publish is one EVALSHA of a few bytes. A view is at most MAX_VIEW_BYTES (beyond it the
largest services' routes are left out: readiness still waits for them, their requests get
404 until they register, as before), the fleet at most MAX_MEMBERS entries (the ones
closest to expiry give way), and a read sends each distinct view once (pods route the same
services, so their views are the same bytes).
"""
from __future__ import annotations

import asyncio
import hashlib
import time

import orjson

from ..valkey import (Script, ValkeyAuthError, ValkeyClient, ValkeyConnectionError,
                      ValkeyError, ValkeyProtocolError, ValkeyReplyError, ValkeyTimeout)
from .state import ROUTABLE

VERSION = 1
# Live entries a fleet may hold (pods x workers); a read returns at most this many.
MAX_MEMBERS = 512
# One view's JSON; past it, routes are left out of it (largest services first).
MAX_VIEW_BYTES = 256 * 1024
MAX_SERVICES = 2048

_PUBLISH = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local member, ttl = ARGV[1], tonumber(ARGV[2])
if ARGV[4] == '' then
  if redis.call('HGET', KEYS[3], member) ~= ARGV[3] then
    return -1
  end
else
  redis.call('HSET', KEYS[2], member, ARGV[4])
  redis.call('HSET', KEYS[3], member, ARGV[3])
end
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), member)
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now),
                        'LIMIT', 0, 128)
local over = redis.call('ZCARD', KEYS[1]) - #gone - tonumber(ARGV[5])
if over > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[1], #gone, #gone + over)) do
    if m ~= member and over > 0 then
      gone[#gone + 1] = m
      over = over - 1
    end
  end
end
if #gone > 0 then
  redis.call('ZREM', KEYS[1], unpack(gone))
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('HDEL', KEYS[3], unpack(gone))
end
for i = 1, 3 do
  if redis.call('PTTL', KEYS[i]) < ttl then
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #gone
""")

_READ = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%d', now), '+inf',
                        'LIMIT', 0, tonumber(ARGV[1]))
if #live == 0 then
  return {0, {}}
end
local digests = redis.call('HMGET', KEYS[3], unpack(live))
local seen, pick = {}, {}
for i = 1, #live do
  local d = digests[i]
  if d and not seen[d] then
    seen[d] = true
    pick[#pick + 1] = live[i]
  end
end
if #pick == 0 then
  return {#live, {}}
end
return {#live, redis.call('HMGET', KEYS[2], unpack(pick))}
""")


def _tag(text: str) -> str:
    # Inside the hash tag: a "}" would end it early.
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def keys_for(environment: str, region: str) -> list[str]:
    tag = "{stellagw-fleet:%s:%s}" % (_tag(environment), _tag(region))
    return [tag + ":members", tag + ":views", tag + ":digests"]


# --------------------------------------------------------------------------- views

def routable_view(routing) -> dict[str, list]:
    """{service: sorted [method, template, websocket]} of the services `routing` (a
    RoutingState) has a routable instance of: what this worker would route now."""
    view: dict[str, set] = {}
    for (method, template), route in routing.routes.items():
        for instance, endpoint in route.candidates:
            if instance.status in ROUTABLE:
                view.setdefault(route.service, set()).add(
                    (method, template, 1 if endpoint.websocket else 0))
                break
    # A service whose instances all declared no endpoint yet still counts.
    for instance in list(routing.instances.values()):
        if instance.status in ROUTABLE:
            view.setdefault(instance.service, set())
    return {name: sorted(routes) for name, routes in view.items()}


def departed_view(routing) -> dict[str, list]:
    """{service: sorted [method, template, websocket]} of the services `routing` keeps
    without an instance (restarting, until serviceExpiry): 503 here, so on a new pod too."""
    return {name: sorted(routes) for name, routes in routing.route_view().items()
            if not routing.services[name].links}


def encode_view(view: dict[str, list], limit: int = MAX_VIEW_BYTES,
                departed: dict[str, list] | None = None) -> tuple[bytes, str, int]:
    """(JSON, digest, services whose routes were left out to fit `limit`). The JSON is
    canonical (sorted), so pods that route the same services write the same bytes.
    `departed` (departed_view) goes in only whole and within the limit; an older gateway
    reads past it."""
    names = sorted(view)[:MAX_SERVICES]
    services = {name: [list(r) for r in view[name]] for name in names}
    left_out = 0
    if departed:
        gone = {name: [list(r) for r in departed[name]]
                for name in sorted(departed)[:MAX_SERVICES] if name not in services}
        doc = orjson.dumps({"v": VERSION, "services": services, "departed": gone},
                           option=orjson.OPT_SORT_KEYS)
        if gone and len(doc) <= limit:
            return doc, hashlib.sha1(doc).hexdigest(), left_out
    while True:
        doc = orjson.dumps({"v": VERSION, "services": services}, option=orjson.OPT_SORT_KEYS)
        if len(doc) <= limit:
            return doc, hashlib.sha1(doc).hexdigest(), left_out
        largest = max((n for n in services if services[n] is not None),
                      key=lambda n: len(services[n]), default=None)
        if largest is None:
            # Names alone do not fit: the first ones that do (MAX_SERVICES names of 64
            # characters fit the default limit; a smaller limit is a test's).
            while len(doc) > limit and services:
                services.pop(max(services))
                doc = orjson.dumps({"v": VERSION, "services": services},
                                   option=orjson.OPT_SORT_KEYS)
            return doc, hashlib.sha1(doc).hexdigest(), left_out
        services[largest] = None
        left_out += 1


class FleetView:
    """The union of the live entries: `services` {name: set of (method, template,
    websocket)}, an empty set when no entry listed its routes; `members`: live entries
    (0: nothing published, a first pod); `bad`: entries that could not be read."""

    def __init__(self, members: int = 0):
        self.members = members
        self.services: dict[str, set] = {}
        self.departed: dict[str, set] = {}     # kept without an instance by some entry
        self.bad = 0

    def add(self, raw) -> None:
        try:
            doc = orjson.loads(raw)
            services = doc["services"]
            if doc.get("v") != VERSION or not isinstance(services, dict):
                raise ValueError("not a fleet view")
            for name, routes in services.items():
                known = self.services.setdefault(str(name), set())
                for method, template, websocket in routes or ():
                    if isinstance(method, str) and isinstance(template, str):
                        known.add((method, template, bool(websocket)))
            departed = doc.get("departed") or {}
            if not isinstance(departed, dict):
                raise ValueError("not a fleet view")
            for name, routes in departed.items():
                known = self.departed.setdefault(str(name), set())
                for method, template, websocket in routes or ():
                    if isinstance(method, str) and isinstance(template, str):
                        known.add((method, template, bool(websocket)))
        except (ValueError, TypeError, KeyError, AttributeError):
            # A newer gateway's format, or garbage: those services are not waited for.
            self.bad += 1


# --------------------------------------------------------------------------- Valkey

class FleetStore:
    """Publishing one member's view and reading the fleet's, over a ValkeyClient or a
    ValkeyClusterClient. Errors are the client's (ValkeyError): the caller decides."""

    def __init__(self, client, environment: str, region: str,
                 max_members: int = MAX_MEMBERS):
        self.client = client
        self.keys = keys_for(environment, region)
        self.max_members = max_members
        self._sent: tuple[list[str], str] | None = None    # (keys, digest) Valkey has

    def locate(self, environment: str, region: str) -> None:
        """Publish under these (a reload changed the region; the old entry expires)."""
        self.keys = keys_for(environment, region)

    async def publish(self, member: str, doc: bytes, digest: str, ttl: float) -> int:
        """This member's view, live for `ttl` seconds from now: the whole view only when
        Valkey does not have this digest already. Returns the dead entries it removed."""
        ttl_ms = max(1, int(ttl * 1000))
        if self._sent == (self.keys, digest):
            gone = await self.client.evalsha(
                _PUBLISH, self.keys, [member, ttl_ms, digest, b"", self.max_members])
            if gone != -1:
                return gone
        self._sent = None
        gone = await self.client.evalsha(
            _PUBLISH, self.keys, [member, ttl_ms, digest, doc, self.max_members])
        self._sent = (list(self.keys), digest)
        return gone

    async def read(self) -> FleetView:
        members, raws = await self.client.evalsha(_READ, self.keys, [self.max_members])
        view = FleetView(int(members))
        for raw in raws:
            if raw is not None:
                view.add(raw)
        return view


def error_type(exc: BaseException) -> str:
    """The label of a failure, as the rate limiter labels its Valkey errors."""
    for cls, name in ((ValkeyTimeout, "timeout"), (ValkeyAuthError, "auth"),
                      (ValkeyProtocolError, "protocol"), (ValkeyConnectionError, "connection"),
                      (ValkeyReplyError, "reply"), (ValueError, "bad_reply"),
                      (TypeError, "bad_reply")):
        if isinstance(exc, cls):
            return name
    return "other"


# --------------------------------------------------------------------------- one worker

# How often a warming worker looks at what has registered.
_POLL = 0.05
_FAILURES = (ValkeyError, ValueError, TypeError, TimeoutError)


class FleetMember:
    """One worker's part (stellagw/gateway.py): read the fleet at start, wait for its
    services (readiness says what is missing), then publish this worker's view every
    publishInterval until it drains. Valkey's failures never touch serving: a read that
    fails is a first pod's start, a publish that fails is counted and logged once (and
    once more when publishing works again)."""

    def __init__(self, worker):
        node = worker.settings.gateway.node
        self.worker = worker
        self.client = ValkeyClient.from_url(node.fleet.valkey, timeout=node.fleet.timeout)
        self.store = FleetStore(self.client, node.environment, node.region)
        self.member = f"{worker.node_id}/{worker.worker_id}"
        self.state = "starting"
        self.fleet_members = 0
        self.fleet_services = 0
        self.missing: set | None = None      # services still awaited, while warming
        self.failures: dict[str, int] = {}   # publishes, by error type
        self.warmups: dict[str, int] = {}    # outcome -> 1
        self.warmup_seconds = 0.0
        self.oversize = 0
        self._failing = False
        self._encoded = (None, b"", "")      # (routing generation, JSON, digest)
        self._tasks: set = set()
        self._closed = False

    @property
    def _settings(self):
        return self.worker.settings.gateway.node.fleet

    # ------------------------------------------------------------------ start

    async def read(self) -> FleetView | BaseException:
        """The fleet's union, or the failure (the caller logs it)."""
        timeout = self._settings.timeout
        try:
            # A script not yet loaded costs a second command, a cluster's slot map one more.
            return await asyncio.wait_for(self.store.read(), 4 * timeout)
        except _FAILURES as exc:
            return exc

    def seed(self, view) -> set:
        """Give the fleet's services this worker lacks their routes (503, not 404, until
        they register). Returns the services to wait for."""
        if not isinstance(view, FleetView):
            return set()
        routing = self.worker.routing
        here = self._routable()
        for name, routes in view.services.items():
            if name not in here:
                routing.expect(name, routes)
        # Services the other pods keep without an instance (restarting): 503 here too,
        # never 404, forgotten after serviceExpiry; not waited for (a new pod answered
        # 404 for a service that was restarting while it started).
        now = time.monotonic()
        for name, routes in view.departed.items():
            if name not in view.services:
                routing.expect(name, routes, departed_at=now)
        return set(view.services)

    def begin(self, view, expected: set, t0: float) -> None:
        """After the client listener is up: wait for `expected`, then publish."""
        self._spawn(self._run(view, expected, t0))

    async def _run(self, view, expected: set, t0: float) -> None:
        await self._warm_up(view, expected, t0)
        while not self._closed and not self.worker._drain_started:
            await self.publish()
            await asyncio.sleep(self._settings.publish_interval)

    async def _warm_up(self, view, expected: set, t0: float) -> None:
        log = self.worker.log
        fs = self._settings
        name = self.client.name
        if view is None:
            self._done("disabled", t0)
            return
        if not isinstance(view, FleetView):
            self._done("unavailable", t0)
            log.event("warning", "fleet view unavailable: ready without waiting for the "
                      "fleet's services", valkey=name, error=f"{error_type(view)}: {view}")
            return
        self.fleet_members, self.fleet_services = view.members, len(view.services)
        if not expected:
            self._done("empty", t0)
            log.event("info", "fleet view empty: ready at once (no gateway of the fleet "
                      "routes a service: the first pod, or none published within entryTtl)",
                      valkey=name, members=view.members, unreadable=view.bad)
            return
        self.state = "warming"
        self.missing = expected - self._routable()
        log.event("info", "fleet warming up", services=len(expected), members=view.members,
                  missing=len(self.missing), timeout=fs.warmup_timeout)
        log.flush()
        routing = self.worker.routing
        try:
            while not self.worker._drain_started and not self._closed:
                self.missing = expected - self._routable()
                # Read each time: a reload may change it while this waits.
                if not self.missing or time.monotonic() - t0 >= self._settings.warmup_timeout:
                    break
                await asyncio.sleep(_POLL)
        finally:
            missing = sorted(self.missing or ())
            self.missing = None
            # The services that never came: the usual rules (404) from now on.
            for service in routing.expected():
                routing.withdraw(service)
            outcome = ("stopped" if self.worker._drain_started or self._closed
                       else "timeout" if missing else "complete")
            ms = self._done(outcome, t0)
            log.event("info" if not missing else "warning", "fleet warm", ms=ms,
                      missing=missing[:20], missingCount=len(missing), services=len(expected),
                      members=view.members)
            log.flush()

    def _done(self, outcome: str, t0: float) -> int:
        seconds = max(0.0, time.monotonic() - t0)
        self.state = outcome
        self.warmups[outcome] = self.warmups.get(outcome, 0) + 1
        if outcome in ("complete", "timeout", "stopped"):
            self.warmup_seconds += seconds
        return round(seconds * 1000)

    def _routable(self) -> set:
        return {i.service for i in list(self.worker.routing.instances.values())
                if i.status in ROUTABLE}

    # ------------------------------------------------------------------ publishing

    async def publish(self) -> bool:
        """This worker's view, once (sent whole only when it changed). Never raises."""
        worker = self.worker
        node = worker.settings.gateway.node
        routing = worker.routing
        generation, doc, digest = self._encoded
        if generation != routing.generation:
            doc, digest, left_out = encode_view(routable_view(routing),
                                                departed=departed_view(routing))
            self._encoded = (routing.generation, doc, digest)
            if left_out and not self.oversize:
                worker.log.event("warning", "fleet view too large: some services' routes are "
                                 "left out of it", services=left_out, bytes=len(doc))
            self.oversize = left_out
        self.store.locate(node.environment, node.region)
        try:
            await asyncio.wait_for(self.store.publish(self.member, doc, digest,
                                                      node.fleet.entry_ttl),
                                   4 * node.fleet.timeout)
        except _FAILURES as exc:
            kind = error_type(exc)
            self.failures[kind] = self.failures.get(kind, 0) + 1
            if not self._failing:
                self._failing = True
                worker.log.event("warning", "fleet publish failed; serving is not affected, "
                                 "new pods may start without waiting for this one's services",
                                 valkey=self.client.name, error=f"{kind}: {exc}")
            return False
        if self._failing:
            self._failing = False
            worker.log.event("info", "fleet publish works again", valkey=self.client.name,
                             failures=sum(self.failures.values()))
        return True

    # ------------------------------------------------------------------ the rest

    def reasons(self) -> list[str]:
        missing = self.missing
        if not missing:
            return []
        names = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        return [f"starting: {len(missing)} service(s) the fleet routes have not registered: "
                f"{names}"]

    def describe(self) -> dict:
        out = {"state": self.state, "members": self.fleet_members,
               "services": self.fleet_services}
        if self.missing:
            out["missing"] = sorted(self.missing)[:100]
        return out

    def counters(self) -> dict:
        """A Metrics source (observe/metrics.py)."""
        return {
            "gateway_fleet_publish_failures": (
                "Publishes of this gateway's fleet view that failed, by Valkey error type "
                "(serving is not affected)", ("type",),
                [((k,), v) for k, v in self.failures.items()]),
            "gateway_fleet_warmups": (
                "Starts by how the wait for the fleet's services ended: complete, timeout, "
                "stopped, empty (nothing published), unavailable (Valkey), disabled",
                ("outcome",), [((k,), v) for k, v in self.warmups.items()]),
            "gateway_fleet_warmup_seconds": (
                "Seconds from start to ready spent waiting for the fleet's services",
                (), [((), self.warmup_seconds)]),
            "gateway_fleet_missing_services_gauge": (
                "Services the fleet routes that have not registered here, while waiting",
                (), [((), len(self.missing or ()))]),
        }

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.worker.log.event("error", "fleet task failed", error=repr(task.exception()))

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await self.client.close()


__all__ = ["FleetMember", "FleetStore", "FleetView", "routable_view", "departed_view",
           "encode_view", "keys_for",
           "error_type", "MAX_MEMBERS", "MAX_VIEW_BYTES"]
