"""Routing state of one worker: registered instances, their endpoints, health, selection.

Every service instance has one connection to this worker. Its HELLO registers the
instance and its endpoints; disconnect removes the instance at once. The radix router is
changed in place, route by route, and always holds the same Route object for a template:
a HELLO costs the templates that are new to the router, a disconnect the routes of that
one instance — never the whole table (a storm of 200 instances x 200 endpoints used to
rebuild the router 400 times on the event loop).

A service outlives its instances: when its last instance leaves, its routes stay in the
router with a stand-in candidate that is never routable, so requests get 503 with
Retry-After (a restart, not a missing path) until `service_expiry` seconds pass; then the
routes go and requests get 404. A service with live instances has exactly the routes
they declare.

Selection (seed §6, docs/selection.md): routable health (Healthy or Degraded, not ejected)
→ strict version (when asked; else the configured weights, or the newest version ramped
in, by a sticky key: versions.py) → region tier (own region, neighbour regions, the rest)
→ lowest average ping → freshest heartbeat → round-robin. Pings are
compared in bands and heartbeats by interval, so that instances that are equal for any
practical purpose share the load instead of one taking all of it on a 0.01 ms difference.
A route's ranking is cached until one of its candidates changes in a way selection sees
(its health, its ping band, its heartbeat interval, an ejection), so a heartbeat that
changes none of them touches no cache. While versions share a route's traffic the cached
entry is a Split (a ranking per version) instead of one ranking.

Outlier ejection: a link's consecutive 5xx answers and timeouts (counted by the
connection, which calls `failed`) take its instance out of selection for a growing
interval, never more than outlierDetection.maxEjectionPercent of a service's instances.
"""
from __future__ import annotations

import asyncio
import collections
import re
import time
from time import perf_counter

from .outliers import ejection_time, may_eject
from .radix import FOUND, METHOD_NOT_ALLOWED, Router, RouteError
from .table import DEGRADED, DRAINING, HEALTHY, UNHEALTHY, Endpoint, Instance, Route
from .versions import Split, parse_sticky, ramp_shares, seed_of, thresholds, weight_shares

ROUTABLE = (HEALTHY, DEGRADED)
STATUSES = (HEALTHY, DEGRADED, DRAINING, UNHEALTHY)

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# What a HELLO's free-text fields may not hold (as identity claims may not, auth/identity.py):
# they are shown in health output, logs and the OpenAPI document, and an instance id with
# U+202E or a newline reads as something else there.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
MAX_VERSION = 128
MAX_REGION = 64
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_ENDPOINTS = 4096
PING_BAND_MS = 1.0   # pings closer than this are equal for selection
# The Retry-After of the 503 for a known service with no routable instance: the SDK's
# longest reconnect backoff and the default health check interval are both 5 s, so a
# restarted or recovering instance is back within about that long.
RETRY_AFTER_SECONDS = 5
SERVICE_EXPIRY = 600.0   # seconds; gateway.routing.serviceExpiry's default
# Registration work (HELLOs, disconnects) per event-loop iteration before the rest waits
# for the next one: a storm of them then delays requests by about this, not by its total.
# What waits is done PUMP_SLICE at a time, one slice per iteration: a request crosses the
# loop about three times (client in, service out, service in), so its latency during a
# backlog is about three slices.
BATCH_BUDGET = 0.005
PUMP_SLICE = 0.002
# Forgetting services is spread over loop iterations, this many routes (about 2 ms) at a
# time, so a thousand services expiring together do not stall the loop.
EXPIRY_BATCH = 1024
# Routes of services whose last instance left, kept answering 503 until serviceExpiry: at
# most this many a worker, past it the services that left first are forgotten at once
# (404, as after serviceExpiry). A peer registering service after service with 4,096
# routes each and leaving kept ~7 MB a service for 10 minutes (or for good with
# serviceExpiry 0): without end as it went on.
MAX_PARKED_ROUTES = 16_384
# Defaults of gateway.routing's versionRamp, stickyKey and outlierDetection (configure()
# applies the configured ones).
VERSION_RAMP = 60.0
STICKY_KEY = "identity"
CONSECUTIVE_ERRORS = 5
BASE_EJECTION_TIME = 30.0
MAX_EJECTION_TIME = 300.0
MAX_EJECTION_PERCENT = 50
# A version ramps in only when it joins a service that has served longer than this on the
# worker: a worker that (re)starts sees every version register within a few seconds (the
# SDK's longest reconnect backoff is 5 s) and must not ramp in again a rollout that
# finished long ago. Also how long a version may be without an instance (a reconnect)
# before it counts as new again.
VERSION_SETTLE = 10.0
# The label sets gateway_version_requests_total (service, version) and
# gateway_outlier_ejections_total (service, reason) keep for links that have left: kept for
# the worker's life, so at most this many each; later ones count under OTHER_LABELS.
MAX_LABELS = 1000
OTHER_LABELS = ("_other", "_other")
# While a version ramps, a route's split is worked out again this often: the shares move
# in steps of RAMP_STEP / versionRamp.
RAMP_STEP = 1.0


class HelloError(ValueError):
    """A HELLO that cannot be registered; the message is logged and the connection closed."""


def semver_key(version: str):
    m = _SEMVER.match(version)
    if m is None:
        raise HelloError(f"version {version!r} is not semver (MAJOR.MINOR.PATCH)")
    major, minor, patch, pre = m.groups()
    # A release sorts after its pre-releases (semver §11).
    return (int(major), int(minor), int(patch), pre is None, pre or "")


class _Departed:
    """The candidate of a route whose service has no instance left. It keeps the endpoint
    as last declared (its claims and WebSocket flag are what the pipeline checks before
    selecting) without keeping the dead connection, and is never routable."""

    __slots__ = ()
    status = "Departed"

    def __repr__(self):
        return "<departed>"


DEPARTED = _Departed()


class _SplitMarker(tuple):
    __slots__ = ()


# The cached entry of a route whose unpinned traffic versions share (the Split itself is
# cached beside it): an empty tuple, so select's one test of the entry catches it in C —
# a Split that said so itself (__bool__) would cost the split path a Python call.
SPLIT = _SplitMarker()


class _Service:
    __slots__ = ("name", "links", "routes", "ghosts", "members", "versions", "left",
                 "expected", "parked")

    def __init__(self, name):
        self.name = name
        self.links = 0                    # registered instances (links) of it on this worker
        self.routes: dict[tuple[str, str], Route] = {}
        self.ghosts = False               # some route has only the DEPARTED candidate
        # Known from the other gateways only (expect()): never registered here. Its routes
        # give way to any service that registers one of them.
        self.expected = False
        # Its entries of RoutingState.instances: the ejection cap counts them.
        self.members: dict[tuple, Instance] = {}
        self.versions: dict[str, _Version] = {}
        # Its versions without a link, in the order they lost their last one: forgotten
        # VERSION_SETTLE after (they then count as new anyway). Kept for the life of the
        # service, a record per version ever seen let a peer that churns instances with a
        # fresh version each (beside one that stays) grow this without end, and made
        # each join scan them all.
        self.left: dict[str, _Version] = {}
        self.parked = 0                   # routes it left answering 503 (RoutingState._parked)


class _Version:
    """A version of a service on this worker: its links, and the start of its ramp."""

    __slots__ = ("links", "since", "ramp_from", "gone_at")

    def __init__(self, since, ramp_from):
        self.links = 0
        self.since = since                # when it (last) became new
        self.ramp_from = ramp_from        # None: not ramped (already serving, or no ramp)
        self.gone_at = 0.0                # when its last link left


class _Policy:
    """gateway.routing.services.<name>, as selection reads it."""

    __slots__ = ("weights", "kind", "name")

    def __init__(self, weights, kind, name):
        self.weights = weights            # {version: weight}; empty: the ramp rule
        self.kind = kind                  # the sticky key (versions.parse_sticky)
        self.name = name


def parse_hello(hello: dict) -> tuple[str, str, str, str, list[Endpoint], dict]:
    """Validate a HELLO payload; returns (service, version, instance_id, region, endpoints, schemas)."""
    service, version, instance_id, region, raw, schemas = _parse_head(hello)
    return service, version, instance_id, region, _parse_endpoints(raw), schemas


def _parse_head(hello: dict) -> tuple[str, str, str, str, list, dict]:
    """The HELLO but its endpoints (a cost per HELLO, not per endpoint)."""
    if not isinstance(hello, dict):
        raise HelloError("HELLO payload must be a JSON object")

    def text(key, pattern=None, required=True, default=""):
        value = hello.get(key, default)
        if not isinstance(value, str) or (required and not value):
            raise HelloError(f"HELLO field {key!r} must be a non-empty string")
        if pattern is not None and not pattern.match(value):
            raise HelloError(f"HELLO field {key!r} has a bad value {value!r}")
        return value

    service = text("service", _NAME)
    version = text("version")
    if len(version) > MAX_VERSION:
        # Unbounded, a 1 MB pre-release was shown in every health answer and named
        # OpenAPI components (`<service>_<Name>_v<version>`).
        raise HelloError(f"HELLO field 'version' longer than {MAX_VERSION} characters")
    semver_key(version)
    instance_id = text("instance_id")
    if len(instance_id) > 128:
        raise HelloError("HELLO field 'instance_id' longer than 128 characters")
    region = text("region", required=False, default="") or ""
    if len(region) > MAX_REGION:
        raise HelloError(f"HELLO field 'region' longer than {MAX_REGION} characters")
    for key, value in (("instance_id", instance_id), ("region", region)):
        if _CONTROL.search(value):
            raise HelloError(f"HELLO field {key!r} holds a control or invisible character")
    raw = hello.get("endpoints")
    if not isinstance(raw, list):
        raise HelloError("HELLO field 'endpoints' must be a list (it may be empty and "
                         "followed by ENDPOINTS_UPDATE)")
    if len(raw) > MAX_ENDPOINTS:
        raise HelloError(f"HELLO lists more than {MAX_ENDPOINTS} endpoints")
    schemas = hello.get("schemas") or {}
    if not isinstance(schemas, dict):
        raise HelloError("HELLO field 'schemas' must be an object")
    return service, version, instance_id, region, raw, schemas


def _parse_endpoints(raw: list) -> list[Endpoint]:
    endpoints, seen = [], set()
    # A HELLO may list 4,096 endpoints and arrive with a hundred others in one loop
    # iteration, so the common case (no claims, no openapi) takes the short paths.
    for i, ep in enumerate(raw):
        if ep.__class__ is not dict:
            raise HelloError(f"endpoints[{i}] must be an object")
        method = ep.get("method")
        path = ep.get("path")
        if method.__class__ is not str or method not in _METHODS:
            raise HelloError(f"endpoints[{i}].method {method!r} is not one of {sorted(_METHODS)}")
        if path.__class__ is not str or not path.startswith("/"):
            raise HelloError(f"endpoints[{i}].path must be a template starting with '/'")
        key = (method, path)
        if key in seen:
            raise HelloError(f"endpoints[{i}]: {method} {path} listed twice")
        seen.add(key)
        timeout = ep.get("timeout_ms")
        if timeout is not None and (timeout.__class__ is not int or not 0 < timeout <= 3_600_000):
            raise HelloError(f"endpoints[{i}].timeout_ms must be an integer in 1..3600000")
        claims = ep.get("claims")
        if claims:
            if not isinstance(claims, list) or not all(
                    isinstance(c, dict) and isinstance(c.get("type"), str) for c in claims):
                raise HelloError(f"endpoints[{i}].claims must be a list of {{type, value}} objects")
            claims = tuple((c["type"], c.get("value")) for c in claims)
        else:
            claims = ()
        openapi = ep.get("openapi")
        if openapi is not None and not isinstance(openapi, dict):
            raise HelloError(f"endpoints[{i}].openapi must be an object")
        max_body = ep.get("max_body_bytes")
        if max_body is not None and (max_body.__class__ is not int or not 0 <= max_body < 2**53):
            raise HelloError(f"endpoints[{i}].max_body_bytes must be an integer >= 0")
        bound = ep.get("sender_constrained", False)
        if bound.__class__ is not bool:
            raise HelloError(f"endpoints[{i}].sender_constrained must be true or false")
        retryable = ep.get("retryable", False)
        if retryable.__class__ is not bool:
            raise HelloError(f"endpoints[{i}].retryable must be true or false")
        endpoints.append(Endpoint(method, path, timeout / 1000.0 if timeout else None,
                                  bool(ep.get("streaming")), bool(ep.get("websocket")),
                                  claims, openapi, max_body, bound, retryable))
    return endpoints


class RoutingState:
    def __init__(self, region: str, neighbor_regions=(), heartbeat_interval: float = 10.0,
                 degraded_after: float = 15.0, unhealthy_after: float = 30.0,
                 service_expiry: float = SERVICE_EXPIRY):
        self.region = region
        self.neighbors = tuple(neighbor_regions)
        self.heartbeat_interval = heartbeat_interval
        self.degraded_after = degraded_after
        self.unhealthy_after = unhealthy_after
        self.service_expiry = service_expiry    # seconds; 0 = a service is never forgotten
        # (service, instance_id, connection) -> Instance. Keyed by connection too: a service
        # that briefly holds two links to this worker (a reconnect racing the old link's
        # death) is two candidates until one closes, never a registration lost.
        self.instances: dict[tuple, Instance] = {}
        self.services: dict[str, _Service] = {}
        self.router = Router()
        self.generation = 0          # bumped on every change; OpenAPI and caches key on it
        self.listeners = []          # callables(event, instance) for openapi/metrics/logs
        # The pipeline's extra header on its 503 "no healthy instance".
        self.retry_after = b"retry-after: %d\r\n" % RETRY_AFTER_SECONDS
        # called (conn, message) when a HELLO that had to wait turns out invalid; without
        # it the link is closed.
        self.on_refused = None
        self._routes: dict[tuple[str, str], Route] = {}   # everything in the router
        # The same by (method, first segment): what a new template of another service is
        # compared with for overlap (docs/routing.md, "Templates of different services").
        self._heads = _Heads()
        self.allow_overlap = False   # gateway.routing.allowOverlappingServices
        self._snapshot: dict | None = None
        # Services without an instance -> when the last one left, oldest first (dict order).
        self._departed: dict[str, float] = {}
        self._parked = 0                # routes of the services in _departed (MAX_PARKED_ROUTES)
        self._expiring = False       # an expiry batch is scheduled on the loop
        # Registration work that did not fit in its loop iteration, in arrival order, and
        # the HELLOs among it (an Instance handed out, not yet registered).
        self._work: collections.deque = collections.deque()
        self._queued: dict[Instance, tuple] = {}
        self._spent = 0.0            # registration work done in this loop iteration (s)
        self._batch = False          # _end_batch is scheduled
        self._pumping = False        # _pump is scheduled
        # Versions and outliers (configure() sets them from gateway.routing). The clock is
        # the monotonic one the loop uses; tests give their own.
        self.clock = time.monotonic
        self.log = None              # JsonLog for ejections; None: not logged
        self.version_ramp = VERSION_RAMP
        self.sticky = parse_sticky(STICKY_KEY)
        self._policies: dict[str, _Policy] = {}
        self.consecutive_errors = CONSECUTIVE_ERRORS
        self.base_ejection_time = BASE_EJECTION_TIME
        self.max_ejection_time = MAX_EJECTION_TIME
        self.max_ejection_percent = MAX_EJECTION_PERCENT
        # Metrics: requests of instances that left, per (service, version); ejections per
        # (service, reason).
        self._retired: dict[tuple[str, str], int] = {}
        self._ejection_counts: dict[tuple[str, str], int] = {}

    def configure(self, settings, region: str | None = None) -> None:
        """Apply gateway.routing (a RoutingSettings; and gateway.node.region when given):
        at start and on a reload. Registered instances, their health, ejections under way
        and ramps under way stay; every ranking is worked out again with the new rules.
        Turning outlier detection off (consecutiveErrors 0) returns every ejected instance
        at once; other changes to it apply to the next ejection."""
        if region is not None:
            self.region = region
        self.neighbors = tuple(settings.neighbor_regions)
        self.service_expiry = settings.service_expiry
        self.allow_overlap = settings.allow_overlapping_services
        self.version_ramp = settings.version_ramp
        self.sticky = parse_sticky(settings.sticky_key)
        policies = {}
        for name, svc in settings.services.items():
            kind, field = parse_sticky(svc.sticky_key) if svc.sticky_key else self.sticky
            policies[name] = _Policy(dict(svc.weights), kind, field)
        self._policies = policies
        od = settings.outlier_detection
        self.consecutive_errors = od.consecutive_errors
        self.base_ejection_time = od.base_ejection_time
        self.max_ejection_time = od.max_ejection_time
        self.max_ejection_percent = od.max_ejection_percent
        if not self.consecutive_errors:
            now = self.clock()
            for instance in list(self.instances.values()):
                if instance.ejected_until:
                    self._readmit(instance, now)
        for route in self._routes.values():
            route._cache.clear()

    @property
    def routes(self) -> dict:
        """(method, template) -> Route for every route some instance serves, for readers on
        other threads (the OpenAPI build): a new dict after every registration change and
        the same one otherwise, so identity says whether anything moved; the Routes in it
        are frozen copies. Built on first use after a change, not once per change."""
        snap = self._snapshot
        if snap is None:
            snap = {}
            for key, route in self._routes.items():
                if route.candidates[0][0] is not DEPARTED:
                    view = route._view
                    if view is None:
                        view = route._view = _copy_route(route)
                    snap[key] = view
            self._snapshot = snap
        return snap

    # ------------------------------------------------------------------ registration
    #
    # A storm (hundreds of HELLOs or disconnects in one loop iteration) must not stall
    # the loop: registration work runs at once while this iteration has spent less than
    # BATCH_BUDGET on it and nothing is waiting; after that it waits in `_work` and
    # `_pump` runs it, PUMP_SLICE per iteration. A waiting HELLO has its header checked
    # at once and gets its Instance (the connection acknowledges it); its endpoints are
    # checked and routed when its turn comes, and if they are refused then, the link is
    # closed (on_refused). A waiting disconnect is unroutable at once: its instance is
    # Unhealthy and out of `instances`.

    def register(self, conn, hello: dict) -> Instance:
        loop = _running_loop()
        if loop is None:
            return self._register(conn, *parse_hello(hello))
        if self._admit(loop):
            t0 = perf_counter()
            try:
                return self._register(conn, *parse_hello(hello))
            finally:
                self._spent += perf_counter() - t0
        service, version, instance_id, region, raw, schemas = _parse_head(hello)
        instance = Instance(service, version, semver_key(version), instance_id, region, conn, [],
                            schemas)
        self._queued[instance] = (conn, raw, time.monotonic())
        self._queue(loop, self._register_queued, instance)
        return instance

    def _register_queued(self, instance: Instance) -> None:
        job = self._queued.pop(instance, None)
        if job is None:
            return                   # an earlier HELLO of its link was refused
        conn, raw, arrived = job
        try:
            self._register(conn, instance.service, instance.version, instance.instance_id,
                           instance.region, _parse_endpoints(raw), instance.schemas, instance)
        except HelloError as exc:
            instance.status = UNHEALTHY
            # The link is closed: what waits behind it, and what it registered before (when
            # this was an ENDPOINTS_UPDATE; the connection holds only the refused one now).
            self._cancel_link(conn)
            key = (instance.service, instance.instance_id, id(conn))
            current = self.instances.get(key)
            if current is not None:
                self._take_out(key, current)
                self._unregister(current, "endpoints update refused", arrived)
            self._changed("refused", instance, reason=str(exc))
            if self.on_refused is not None:
                self.on_refused(conn, str(exc))
            elif getattr(conn, "transport", None) is not None:
                conn.transport.close()

    def _register(self, conn, service, version, instance_id, region, endpoints, schemas,
                  instance: Instance | None = None) -> Instance:
        key = (service, instance_id, id(conn))
        old = self.instances.get(key)
        routes = self._routes
        fresh = []
        yielded = []
        for ep in endpoints:
            route = routes.get((ep.method, ep.path))
            if route is None:
                fresh.append(ep)
            elif route.service == service:
                cands = route.candidates
                if (cands and cands[0][0] is not DEPARTED and route.policy.websocket != ep.websocket
                        and (len(cands) > 1 or cands[0][0] is not old)):
                    # Checked before selection, so all its instances must agree: one that
                    # is not a WebSocket endpoint would be handed an upgrade (or the other
                    # way round). The others' agreement is kept by this very check.
                    raise HelloError(
                        f"{ep.method} {ep.path}: {'a' if ep.websocket else 'not a'} WebSocket "
                        f"endpoint, unlike the connected instances of {service!r} (serve the "
                        "change on a new path, or once they are gone)")
            else:
                owner = self.services.get(route.service)
                if owner is not None and owner.expected:
                    # What another gateway said, during a rollout that moved the route
                    # perhaps: a service that is here decides.
                    yielded.append((owner, route))
                    fresh.append(ep)
                    continue
                gone = (" (no instance of it is connected; its routes are kept for "
                        "routing.serviceExpiry)" if route.candidates[0][0] is DEPARTED else "")
                raise HelloError(f"{ep.method} {ep.path} is already served by service "
                                 f"{route.service!r}{gone}")
        if fresh and not self.allow_overlap:
            for ep in fresh:
                other = self._heads.overlapping(ep.method, ep.path, service, yielded)
                if other is not None:
                    raise HelloError(
                        f"{ep.method} {ep.path} overlaps {other.method} {other.template} of "
                        f"service {other.service!r}: some requests would match both, and the "
                        "more specific would take them (gateway.routing.allowOverlappingServices)")
        for owner, route in yielded:
            self._drop(owner, route)
            if not owner.routes:
                del self.services[owner.name]
        # New templates go into the router first: one it refuses must leave nothing
        # half-registered. Nothing after this loop can fail.
        router = self.router
        added = []
        try:
            for ep in fresh:
                route = Route(ep.method, ep.path, service)
                router.add(ep.method, ep.path, route)
                added.append(route)
        except RouteError as exc:
            for route in added:
                router.remove(route.method, route.template)
            raise HelloError(f"{ep.method} {ep.path}: {exc}") from exc

        if instance is None:
            instance = Instance(service, version, semver_key(version), instance_id, region, conn,
                                endpoints, schemas)
        svc = self.services.get(service)
        if svc is None:
            svc = self.services[service] = _Service(service)
        own = svc.routes
        for route in added:
            routes[(route.method, route.template)] = own[(route.method, route.template)] = route
            self._heads.add(route)
        # ENDPOINTS_UPDATE: the same link registers again; its old entries make way.
        emptied = self._detach(old) if old is not None else ()
        mine = instance.routes = []
        declared = instance.endpoints = []
        for ep in endpoints:
            route = own[(ep.method, ep.path)]
            mine.append(route)
            cands = route.candidates
            if cands:
                # Instances that declare an endpoint alike share one Endpoint: a storm
                # leaves a quarter as many objects for the collector to walk.
                same = cands[-1][1]
                if same is not ep and same.same_as(ep):
                    ep = same
            declared.append(ep)
            if cands and cands[0][0] is not DEPARTED:
                route.assign(cands + ((instance, ep),))
            else:
                route.assign(((instance, ep),))
            route._cache.clear()
            route._view = None
        for route, _ in emptied:
            if not route.candidates:
                self._drop(svc, route)
        if svc.ghosts and endpoints:
            # The service is back: it has the routes its instances declare now. (A HELLO
            # with no endpoints yet, to be followed by ENDPOINTS_UPDATE, keeps them.)
            for route in [r for r in own.values() if r.candidates[0][0] is DEPARTED]:
                self._drop(svc, route)
            svc.ghosts = False
        if self._departed.pop(service, None) is not None:
            self._parked -= svc.parked
            svc.parked = 0
        svc.expected = False
        if old is None:
            svc.links += 1
            self._version_joined(svc, version)
        elif old is not instance:
            # ENDPOINTS_UPDATE on the same link: its ejection goes on.
            instance.ejected_until, instance.ejected_reason = old.ejected_until, old.ejected_reason
            instance.ejections, instance.returned_at = old.ejections, old.returned_at
        self.instances[key] = svc.members[key] = instance
        self._snapshot = None
        self._changed("registered", instance)
        return instance

    def expect(self, service: str, routes, departed_at: float | None = None) -> int:
        """Routes of a service the other gateways route but that has not registered here
        yet (a new gateway, routing/fleet.py): each gets the DEPARTED stand-in, so a
        request for it is answered 503 with Retry-After, as for a service restarting,
        not 404. `routes`: (method, template, websocket) triples. A template that is
        taken, or that the router refuses, is left out; a service already here is left
        alone. The first registration of the service replaces them (its HELLO's
        endpoints are its routes), and one of another service takes the template over.
        `departed_at` (time.monotonic()): a sibling worker's service (a restarted worker's
        warm start), held as a service whose last instance left then — kept against other
        services' templates and forgotten after serviceExpiry, as on the sibling.
        Returns the routes added."""
        if service in self.services or not _NAME.match(service):
            return 0
        svc = _Service(service)
        svc.ghosts = True
        svc.expected = departed_at is None
        router = self.router
        for method, template, websocket in routes:
            key = (method, template)
            if (method not in _METHODS or template.__class__ is not str
                    or not template.startswith("/") or key in self._routes):
                continue
            route = Route(method, template, service)
            try:
                router.add(method, template, route)
            except RouteError:
                continue
            route.assign(((DEPARTED, Endpoint(method, template, None, False,
                                              bool(websocket), (), None)),))
            self._routes[key] = svc.routes[key] = route
            self._heads.add(route)
        if not svc.routes:
            return 0
        self.services[service] = svc
        if departed_at is not None:
            self._departed[service] = departed_at
        self.generation += 1
        return len(svc.routes)

    def route_view(self) -> dict:
        """{service: sorted [method, template, websocket]} of every service with routes
        here, with an instance or departed (not those known from the fleet only): what a
        sibling worker that restarts answers 503 for until they register, never 404."""
        view = {}
        for name, svc in self.services.items():
            if svc.expected:
                continue
            routes = []
            for (method, template), route in svc.routes.items():
                cands = route.candidates
                routes.append([method, template, 1 if cands and cands[0][1].websocket else 0])
            view[name] = sorted(routes)
        return view

    def withdraw(self, service: str) -> bool:
        """Forget the routes expect() gave a service that never registered here (404
        from then on); a service that did register is left to the usual rules."""
        svc = self.services.get(service)
        if svc is None or not svc.expected or svc.links:
            return False
        for route in list(svc.routes.values()):
            self._drop(svc, route)
        del self.services[service]
        self.generation += 1
        return True

    def expected(self) -> list[str]:
        """Services known from expect() only."""
        return [name for name, svc in self.services.items() if svc.expected]

    def _version_joined(self, svc: _Service, version: str) -> None:
        now = self.clock()
        _forget_versions(svc, now)
        record = svc.versions.get(version)
        if record is not None and not record.links and now - record.gone_at > VERSION_SETTLE:
            record = None                # gone long enough to be new again
        svc.left.pop(version, None)
        if record is None:
            # Ramped in only beside a version that has been serving a while: see
            # VERSION_SETTLE.
            serving = any(r.links and now - r.since >= VERSION_SETTLE
                          for v, r in svc.versions.items() if v != version)
            record = svc.versions[version] = _Version(
                now, now if serving and self.version_ramp > 0 else None)
        record.links += 1

    def unregister(self, instance: Instance, reason: str = "disconnected") -> None:
        loop = _running_loop()
        if instance in self._queued:
            # Its HELLO (or ENDPOINTS_UPDATE) still waits: the disconnect waits behind it,
            # so the outcome is the one of the same events without a wait. Marked gone
            # now, it is never selectable in between.
            instance.status = instance.announced = UNHEALTHY
            self._queue(loop, self._unregister_queued, instance, reason, time.monotonic())
            return
        key = (instance.service, instance.instance_id, id(instance.conn))
        if self.instances.get(key) is not instance:
            return
        self._take_out(key, instance)
        if loop is None:
            self._unregister(instance, reason)
        elif self._admit(loop):
            t0 = perf_counter()
            self._unregister(instance, reason)
            self._spent += perf_counter() - t0
        else:
            self._queue(loop, self._unregister, instance, reason, time.monotonic())

    def _unregister_queued(self, instance: Instance, reason: str, left: float) -> None:
        key = (instance.service, instance.instance_id, id(instance.conn))
        if self.instances.get(key) is instance:      # not if its HELLO was refused
            self._take_out(key, instance)
            self._unregister(instance, reason, left)

    def _take_out(self, key, instance: Instance) -> None:
        """What must not wait: the instance is no longer selectable, nor listed."""
        del self.instances[key]
        svc = self.services.get(instance.service)
        if svc is not None:
            svc.members.pop(key, None)
        self._retire(instance)
        instance.status = UNHEALTHY
        self._stale(instance)

    def _retire(self, instance: Instance) -> None:
        """Its requests stay in gateway_version_requests_total after its link leaves (no
        request is sent on it after this: it is no longer selectable)."""
        sent = _sent(instance.conn)
        if sent:
            key = (instance.service, instance.version)
            if key not in self._retired and len(self._retired) >= MAX_LABELS:
                key = OTHER_LABELS
            self._retired[key] = self._retired.get(key, 0) + sent

    def _cancel_link(self, conn) -> None:
        for waiting in [i for i, job in self._queued.items() if job[0] is conn]:
            del self._queued[waiting]

    def _unregister(self, instance: Instance, reason: str, left: float | None = None) -> None:
        """`left`: when the link closed, if that was before this ran (expiry counts from it)."""
        svc = self.services[instance.service]
        svc.links -= 1
        record = svc.versions.get(instance.version)
        if record is not None:
            record.links -= 1
            if not record.links:
                record.gone_at = now = self.clock()
                svc.left[instance.version] = record
                _forget_versions(svc, now)
        emptied = self._detach(instance)
        if svc.links:
            # Others remain: the routes only this instance declared go with it.
            for route, _ in emptied:
                self._drop(svc, route)
        elif svc.routes:
            # The last one: its routes stay, answering 503, until the service expires.
            for route, ep in emptied:
                route.assign(((DEPARTED, ep),))
            svc.ghosts = True
            self._departed[svc.name] = time.monotonic() if left is None else left
            svc.parked = len(svc.routes)
            self._parked += svc.parked
            if self._parked > MAX_PARKED_ROUTES and not self._expiring:
                self._expire(time.monotonic())
        else:
            del self.services[svc.name]
        self._snapshot = None
        self._changed("unregistered", instance, reason=reason)

    def _detach(self, instance: Instance) -> list:
        """Take the instance out of its routes' candidates; [(route, endpoint)] of those it
        leaves with none (for the caller to drop or keep)."""
        emptied = []
        for route, ep in zip(instance.routes, instance.endpoints):
            cands = route.candidates
            if len(cands) == 1 and cands[0][0] is instance:
                route.assign(())
                emptied.append((route, ep))
            else:
                route.assign(tuple([c for c in cands if c[0] is not instance]))
            route._cache.clear()
            route._view = None
        instance.routes = ()
        return emptied

    def _drop(self, svc: _Service, route: Route) -> None:
        key = (route.method, route.template)
        self.router.remove(route.method, route.template)
        del self._routes[key]
        del svc.routes[key]
        self._heads.discard(route)

    def _changed(self, event, instance, **extra):
        self.generation += 1
        for listener in self.listeners:
            listener(event, instance, **extra)

    # ------------------------------------------------------------------ work per loop iteration

    def _admit(self, loop) -> bool:
        """May registration work run now, in this loop iteration?"""
        if self._work:
            return False             # after what waits: registrations keep their order
        if not self._batch:
            # A callback queued now runs after every I/O callback of this iteration.
            self._batch = True
            self._spent = 0.0
            loop.call_soon(self._end_batch)
        return self._spent < BATCH_BUDGET

    def _end_batch(self) -> None:
        self._batch = False

    def _queue(self, loop, fn, *args) -> None:
        self._work.append((fn, args))
        if not self._pumping:
            self._pumping = True
            loop.call_soon(self._pump)

    def _pump(self) -> None:
        work = self._work
        deadline = perf_counter() + PUMP_SLICE
        try:
            while work:
                fn, args = work.popleft()
                fn(*args)
                if perf_counter() >= deadline:
                    break
        finally:                     # a failing job must not strand the ones behind it
            if work:
                _running_loop().call_soon(self._pump)
            else:
                self._pumping = False

    def pending(self) -> int:
        """Registrations and disconnects still waiting for their turn (0 in a quiet state)."""
        return len(self._work)

    def _expire(self, now: float) -> None:
        """Forget services whose last instance left service_expiry ago: their routes leave
        the router (404 from then on). EXPIRY_BATCH routes per loop iteration."""
        self._expiring = False
        budget = EXPIRY_BATCH
        departed = self._departed
        while departed:
            name, gone_at = next(iter(departed.items()))
            if self._parked <= MAX_PARKED_ROUTES and (
                    self.service_expiry <= 0 or now - gone_at < self.service_expiry):
                return
            svc = self.services[name]
            own = svc.routes
            while own and budget:
                self._drop(svc, next(iter(own.values())))
                budget -= 1
            # What is published from the routes (the fleet view, the siblings' routes file)
            # is rewritten when the generation moves: without this a forgotten service was
            # still offered as departed until some other change.
            self.generation += 1
            if own:
                break
            del departed[name]
            del self.services[name]
            self._parked -= svc.parked
        else:
            return
        loop = _running_loop()
        if loop is None:             # tools, tests: finish now
            self._expire(now)
        else:
            self._expiring = True
            loop.call_soon(self._expire, now)

    # ------------------------------------------------------------------ health

    def heartbeat(self, instance: Instance, status: str | None, in_flight=None,
                  error_rate=None, ping_ms: float | None = None) -> None:
        instance.last_heartbeat = time.monotonic()
        if status in STATUSES:
            instance.announced = status
        if isinstance(in_flight, int):
            instance.in_flight = in_flight
        if isinstance(error_rate, (int, float)):
            instance.error_rate = float(error_rate)
        if ping_ms is not None:
            # Exponential moving average: one slow round trip must not flip selection.
            instance.avg_ping_ms = (ping_ms if instance.avg_ping_ms == 0.0
                                    else 0.8 * instance.avg_ping_ms + 0.2 * ping_ms)
        if instance not in self._queued:     # a waiting HELLO has no routes to re-rank yet
            self._refresh(instance, instance.last_heartbeat)

    def check_health(self, now: float | None = None) -> None:
        """Run every health.checkInterval: ages turn Healthy into Degraded, then Unhealthy;
        services gone longer than service_expiry are forgotten."""
        now = time.monotonic() if now is None else now
        for instance in list(self.instances.values()):
            if instance.ejected_until and now >= instance.ejected_until:
                self._readmit(instance, now)     # its timer's backstop (and without a loop)
            self._refresh(instance, now)
        if self._departed and self.service_expiry > 0 and not self._expiring:
            self._expire(now)

    def _refresh(self, instance: Instance, now: float) -> None:
        if instance.announced in (DRAINING, UNHEALTHY):
            status = instance.announced
        else:
            age = now - instance.last_heartbeat
            if age >= self.unhealthy_after:
                status = UNHEALTHY
            elif age >= self.degraded_after or instance.announced == DEGRADED:
                status = DEGRADED
            else:
                status = HEALTHY
        band = int(instance.avg_ping_ms // PING_BAND_MS)
        late = int((now - instance.last_heartbeat) // self.heartbeat_interval)
        if status != instance.status:
            instance.status, instance.ping_band, instance.late = status, band, late
            self._stale(instance)
            self._changed("health", instance)
        elif band != instance.ping_band or late != instance.late:
            instance.ping_band, instance.late = band, late
            self._stale(instance)

    def _stale(self, instance: Instance) -> None:
        """Drop the rankings of the routes this instance is a candidate of (only those: the
        others do not rank it)."""
        for route in instance.routes:
            route._cache.clear()

    # ------------------------------------------------------------------ lookup and selection

    def match(self, method: str, path: str):
        return self.router.match(method, path)

    def select(self, route: Route, version: str | None = None, req=None):
        """(instance, endpoint) to send this request to, or None when none is routable: the
        pipeline answers 503 with `retry_after` (also for a service whose last instance
        left less than service_expiry ago). `req` gives the sticky key when versions
        share the route's unpinned traffic (without it they share it evenly)."""
        picked = route.pick(version)      # the cached ranking's next: the common case
        if picked is not None:
            return picked
        # Not ranked yet, nothing routable, or SPLIT (false for pick's test too).
        # (Inline rather than a method: a split pays for each Python call.)
        best = route._cache.get(version)
        if best is None:
            best = self._ranked(route, version)
        if best is SPLIT:
            split = route._cache[Split]
            if split.expires and self.clock() >= split.expires:
                # A ramp moved on: the shares (or, once it ended, one ranking) anew.
                best = self._ranked(route, version)
                split = route._cache.get(Split) if best is SPLIT else None
            if split is not None:
                best = split.pick(req)
        if not best:
            return None
        return route.take(best)

    def _ranked(self, route: Route, version):
        """Rank and cache: a ranking as it is, a split as SPLIT with the Split beside it
        (under the key Split; only unpinned selection splits, so one per route)."""
        best = self._rank(route, version)
        cache = route._cache
        if best.__class__ is Split:
            cache[Split] = best
            best = SPLIT
        elif version is None:
            cache.pop(Split, None)      # a ramp that ended
        elif not best:
            # A pin no routable instance has: not kept. The client chooses the header, so
            # keeping each value would let one client grow the cache without bound; the
            # cache holds the route's own versions only (and recomputing an empty answer
            # scans the route's candidates, what this computation just did).
            return best
        cache[version] = best
        return best

    def _rank(self, route: Route, version: str | None):
        cands = [c for c in route.candidates
                 if c[0].status in ROUTABLE and not c[0].ejected_until]
        if version is not None:
            return self._best([c for c in cands if c[0].version == version])
        versions = {c[0].version: c[0].version_key for c in cands}
        if len(versions) < 2:
            return self._best(cands)
        order = sorted(versions, key=versions.__getitem__, reverse=True)   # newest first
        policy = self._policies.get(route.service)
        shares = expires = None
        if policy is not None and policy.weights:
            shares = weight_shares(order, policy.weights)
        if shares is None:
            svc = self.services.get(route.service)
            records = svc.versions if svc is not None else {}
            now = self.clock()
            shares, until = ramp_shares(
                [getattr(records.get(v), "ramp_from", None) for v in order], now,
                self.version_ramp)
            if until:
                expires = min(now + RAMP_STEP, until)
        taking = [(v, share) for v, share in zip(order, shares) if share > 0]
        if len(taking) == 1 and not expires:
            return self._best([c for c in cands if c[0].version == taking[0][0]])
        kind, name = (policy.kind, policy.name) if policy is not None else self.sticky
        return Split(thresholds([share for _, share in taking]),
                     [self._best([c for c in cands if c[0].version == v]) for v, _ in taking],
                     [v for v, _ in taking], expires or 0.0, kind, name,
                     seed_of(route.service))

    def _best(self, cands: list) -> tuple:
        """The candidates selection ranks first: region tier, ping band, health, heartbeat."""
        if not cands:
            return ()

        def key(c):
            inst = c[0]
            tier = (0 if inst.region == self.region
                    else 1 if inst.region in self.neighbors else 2)
            return (tier, inst.ping_band, inst.status != HEALTHY, inst.late)

        keyed = sorted(((key(c), i, c) for i, c in enumerate(cands)), key=lambda t: (t[0], t[1]))
        top = keyed[0][0]
        return tuple(c for k, _, c in keyed if k == top)

    # ------------------------------------------------------------------ outlier ejection

    def failed(self, instance: Instance, streak: int, reason: str) -> None:
        """`instance` answered 5xx or timed out (`reason`), the `streak`-th time in a row on
        its link (the connection counts; any other answer resets it). At
        outlierDetection.consecutiveErrors it is ejected, if the service can spare it.
        Back from an ejection, one failure before any success ejects it again."""
        limit = self.consecutive_errors
        if (not limit or streak < limit or instance.ejected_until
                or instance.status not in ROUTABLE):
            return
        svc = self.services.get(instance.service)
        key = (instance.service, instance.instance_id, id(instance.conn))
        if svc is None or svc.members.get(key) is not instance:
            return                       # left meanwhile, or still waiting to register
        healthy = ejected = 0
        for member in svc.members.values():
            if member.status in ROUTABLE:
                healthy += 1
                if member.ejected_until:
                    ejected += 1
        if not may_eject(healthy, ejected, self.max_ejection_percent):
            if streak == limit and self.log is not None:
                self.log.event("warning", "outlier kept in selection", service=instance.service,
                               instance=instance.instance_id, version=instance.version,
                               reason=reason, consecutive=streak, healthy=healthy,
                               ejected=ejected, maxEjectionPercent=self.max_ejection_percent)
            return
        self._eject(instance, reason, streak)

    def _eject(self, instance: Instance, reason: str, streak: int) -> None:
        now = self.clock()
        if now - instance.returned_at >= self.max_ejection_time:
            instance.ejections = 0       # it stayed in long enough: start over
        instance.ejections += 1
        seconds = ejection_time(self.base_ejection_time, instance.ejections,
                                self.max_ejection_time)
        until = instance.ejected_until = now + seconds
        instance.ejected_reason = reason
        self._stale(instance)
        counted = (instance.service, reason)
        if counted not in self._ejection_counts and len(self._ejection_counts) >= MAX_LABELS:
            counted = (OTHER_LABELS[0], reason)
        self._ejection_counts[counted] = self._ejection_counts.get(counted, 0) + 1
        if self.log is not None:
            self.log.event("warning", "instance ejected", service=instance.service,
                           instance=instance.instance_id, version=instance.version,
                           reason=reason, consecutive=streak, seconds=round(seconds, 3),
                           ejections=instance.ejections)
        loop = _running_loop()
        if loop is not None:
            loop.call_later(seconds, self._readmit, instance, None, until)

    def _readmit(self, instance: Instance, now: float | None = None,
                 until: float | None = None) -> None:
        """Back into selection (`until`: only if that ejection is still the one under way)."""
        if not instance.ejected_until or (until is not None and instance.ejected_until != until):
            return
        instance.ejected_until = 0.0
        instance.returned_at = self.clock() if now is None else now
        self._stale(instance)
        key = (instance.service, instance.instance_id, id(instance.conn))
        if self.log is not None and self.instances.get(key) is instance:
            self.log.event("info", "instance returned", service=instance.service,
                           instance=instance.instance_id, version=instance.version,
                           ejections=instance.ejections)

    def counters(self) -> dict:
        """A Metrics source (observe/metrics.py): requests per version, ejections."""
        by_version = dict(self._retired)
        ejected: dict[str, int] = {}
        for inst in self.instances.values():
            sent = _sent(inst.conn)
            if sent:
                key = (inst.service, inst.version)
                by_version[key] = by_version.get(key, 0) + sent
            if inst.ejected_until:
                ejected[inst.service] = ejected.get(inst.service, 0) + 1
        return {
            "gateway_version_requests": (
                "Requests sent to each version of a service (pinned or not, retries too)",
                ("service", "version"), list(by_version.items())),
            "gateway_outlier_ejections": (
                "Instances taken out of selection for consecutive 5xx answers or timeouts",
                ("service", "reason"), list(self._ejection_counts.items())),
            "gateway_outlier_ejected_gauge": (
                "Instances out of selection now as outliers (each worker's links)",
                ("service",), [((name,), n) for name, n in ejected.items()]),
        }

    def describe(self) -> dict:
        services: dict[str, list] = {}
        now = self.clock()
        for inst in self.instances.values():
            services.setdefault(inst.service, []).append(inst.describe(now))
        return services


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Heads:
    """Every route's template shape, by (method, first segment), to find a template of
    another service that some request would match as well as a new one. Without the check
    a service could declare `/api/users/me` beside another's `/api/users/{id}` and take
    that one user's requests (the more specific template wins, docs/routing.md §3), past
    any identity check on names. Shapes: a literal segment is itself, a parameter "{",
    a catch-all "{*"; routes whose first segment is not a literal sit under "{"."""

    def __init__(self):
        self._by: dict[tuple, dict] = {}       # (method, head) -> {Route: shape}

    @staticmethod
    def _shape(template: str) -> tuple:
        parts = template.split("/")[1:]
        if parts == [""]:
            return ()
        return tuple("{*" if p.startswith("{*") else "{" if p.startswith("{") else p
                     for p in parts)

    @staticmethod
    def _head(shape: tuple) -> str:
        if not shape:
            return "/"
        return "{" if shape[0].startswith("{") else shape[0]

    def add(self, route: Route) -> None:
        shape = self._shape(route.template)
        self._by.setdefault((route.method, self._head(shape)), {})[route] = shape

    def discard(self, route: Route) -> None:
        key = (route.method, self._head(self._shape(route.template)))
        group = self._by.get(key)
        if group is not None:
            group.pop(route, None)
            if not group:
                del self._by[key]

    def overlapping(self, method: str, template: str, service: str, leaving) -> Route | None:
        """A route of another service some request would match as well as `template`
        (routes in `leaving`, pairs (owner, route) about to be dropped, excepted)."""
        shape = self._shape(template)
        head = self._head(shape)
        if head == "{":
            groups = [g for (m, _), g in self._by.items() if m == method]
        else:
            groups = [self._by.get((method, head), {}), self._by.get((method, "{"), {})]
        gone = {id(route) for _, route in leaving}
        for group in groups:
            for route, other in group.items():
                if route.service != service and id(route) not in gone and _overlap(shape, other):
                    return route
        return None


def _overlap(a: tuple, b: tuple) -> bool:
    """Whether some path matches both shapes: literals equal, a parameter any one segment,
    a catch-all any rest (none included)."""
    n = min(len(a), len(b))
    for i in range(n):
        x, y = a[i], b[i]
        if x == "{*" or y == "{*":
            return True
        if x != y and x != "{" and y != "{":
            return False
    if len(a) == len(b):
        return True
    return (a if len(a) > len(b) else b)[n] == "{*"


def _forget_versions(svc: _Service, now: float) -> None:
    """Drop the version records that have had no link for VERSION_SETTLE."""
    left = svc.left
    while left:
        version, record = next(iter(left.items()))
        if now - record.gone_at <= VERSION_SETTLE:
            return
        del left[version]
        if svc.versions.get(version) is record and not record.links:
            del svc.versions[version]


def _sent(conn) -> int:
    """Requests sent on a link (ServiceConnection.requests_sent): counted by the link, so
    counting requests per version costs the request path nothing."""
    sent = getattr(conn, "requests_sent", None)
    return sent() if sent is not None else 0


def _copy_route(route: Route) -> Route:
    new = Route(route.method, route.template, route.service)
    new.candidates = route.candidates
    new.policy = route.policy
    new._rr = route._rr
    return new


__all__ = ["RoutingState", "Instance", "Endpoint", "Route", "HelloError", "parse_hello",
           "FOUND", "METHOD_NOT_ALLOWED", "HEALTHY", "DEGRADED", "DRAINING", "UNHEALTHY",
           "DEPARTED", "RETRY_AFTER_SECONDS"]
