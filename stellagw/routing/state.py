"""Routing state of one worker: registered instances, their endpoints, health, selection.

Every service instance has one connection to this worker. Its HELLO registers the
instance and its endpoints; the radix router is rebuilt (a new one swapped in) whenever the
set of routes changes; disconnect removes the instance at once.

Selection (seed §6, docs/selection.md): routable health (Healthy or Degraded) → strict
version (when asked; else the newest registered) → region tier (own region, neighbour
regions, the rest) → lowest average ping → freshest heartbeat → round-robin. Pings are
compared in bands and heartbeats by interval, so that instances that are equal for any
practical purpose share the load instead of one taking all of it on a 0.01 ms difference.
"""
from __future__ import annotations

import re
import time

from ..radix import FOUND, METHOD_NOT_ALLOWED, Router, RouteError

HEALTHY, DEGRADED, DRAINING, UNHEALTHY = "Healthy", "Degraded", "Draining", "Unhealthy"
ROUTABLE = (HEALTHY, DEGRADED)
STATUSES = (HEALTHY, DEGRADED, DRAINING, UNHEALTHY)

_SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_ENDPOINTS = 4096
PING_BAND_MS = 1.0   # pings closer than this are equal for selection


class HelloError(ValueError):
    """A HELLO that cannot be registered; the message is logged and the connection closed."""


def semver_key(version: str):
    m = _SEMVER.match(version)
    if m is None:
        raise HelloError(f"version {version!r} is not semver (MAJOR.MINOR.PATCH)")
    major, minor, patch, pre = m.groups()
    # A release sorts after its pre-releases (semver §11).
    return (int(major), int(minor), int(patch), pre is None, pre or "")


class Endpoint:
    """One endpoint as one instance declared it."""

    __slots__ = ("method", "path", "timeout", "streaming", "websocket", "claims", "openapi")

    def __init__(self, method, path, timeout, streaming, websocket, claims, openapi):
        self.method = method
        self.path = path
        self.timeout = timeout          # seconds, or None for routing.defaultTimeout
        self.streaming = streaming
        self.websocket = websocket
        self.claims = claims            # tuple of (type, value)
        self.openapi = openapi          # dict or None


class Instance:
    __slots__ = ("service", "version", "version_key", "instance_id", "region", "conn", "status",
                 "announced", "last_heartbeat", "avg_ping_ms", "in_flight", "error_rate",
                 "endpoints", "schemas", "registered_at")

    def __init__(self, service, version, instance_id, region, conn, endpoints, schemas):
        self.service = service
        self.version = version
        self.version_key = semver_key(version)
        self.instance_id = instance_id
        self.region = region
        self.conn = conn
        self.status = HEALTHY
        self.announced = HEALTHY          # what the service itself said in its last heartbeat
        self.last_heartbeat = time.monotonic()
        self.avg_ping_ms = 0.0
        self.in_flight = 0
        self.error_rate = 0.0
        self.endpoints = endpoints        # list[Endpoint]
        self.schemas = schemas
        self.registered_at = time.time()

    def describe(self) -> dict:
        return {"instanceId": self.instance_id, "version": self.version, "region": self.region,
                "status": self.status, "averagePingMs": round(self.avg_ping_ms, 3),
                "secondsSinceHeartbeat": round(time.monotonic() - self.last_heartbeat, 1),
                "inFlight": self.in_flight}


class Route:
    """One (method, template): the instances that serve it, and a selection cache."""

    __slots__ = ("method", "template", "service", "candidates", "_cache", "_rr")

    def __init__(self, method, template, service):
        self.method = method
        self.template = template
        self.service = service
        self.candidates: list[tuple[Instance, Endpoint]] = []
        self._cache: dict = {}
        self._rr = 0


def parse_hello(hello: dict) -> tuple[str, str, str, str, list[Endpoint], dict]:
    """Validate a HELLO payload; returns (service, version, instance_id, region, endpoints, schemas)."""
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
    semver_key(version)
    instance_id = text("instance_id")
    if len(instance_id) > 128:
        raise HelloError("HELLO field 'instance_id' longer than 128 characters")
    region = text("region", required=False, default="") or ""
    raw = hello.get("endpoints")
    if not isinstance(raw, list):
        raise HelloError("HELLO field 'endpoints' must be a list (it may be empty and "
                         "followed by ENDPOINTS_UPDATE)")
    if len(raw) > MAX_ENDPOINTS:
        raise HelloError(f"HELLO lists more than {MAX_ENDPOINTS} endpoints")
    endpoints, seen = [], set()
    for i, ep in enumerate(raw):
        if not isinstance(ep, dict):
            raise HelloError(f"endpoints[{i}] must be an object")
        method = ep.get("method")
        path = ep.get("path")
        if method not in _METHODS:
            raise HelloError(f"endpoints[{i}].method {method!r} is not one of {sorted(_METHODS)}")
        if not isinstance(path, str) or not path.startswith("/"):
            raise HelloError(f"endpoints[{i}].path must be a template starting with '/'")
        if (method, path) in seen:
            raise HelloError(f"endpoints[{i}]: {method} {path} listed twice")
        seen.add((method, path))
        timeout = ep.get("timeout_ms")
        if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool)
                                    or not 0 < timeout <= 3_600_000):
            raise HelloError(f"endpoints[{i}].timeout_ms must be an integer in 1..3600000")
        claims = ep.get("claims") or []
        if not isinstance(claims, list) or not all(
                isinstance(c, dict) and isinstance(c.get("type"), str) for c in claims):
            raise HelloError(f"endpoints[{i}].claims must be a list of {{type, value}} objects")
        openapi = ep.get("openapi")
        if openapi is not None and not isinstance(openapi, dict):
            raise HelloError(f"endpoints[{i}].openapi must be an object")
        endpoints.append(Endpoint(method, path, timeout / 1000.0 if timeout else None,
                                  bool(ep.get("streaming")), bool(ep.get("websocket")),
                                  tuple((c["type"], c.get("value")) for c in claims), openapi))
    schemas = hello.get("schemas") or {}
    if not isinstance(schemas, dict):
        raise HelloError("HELLO field 'schemas' must be an object")
    return service, version, instance_id, region, endpoints, schemas


class RoutingState:
    def __init__(self, region: str, neighbor_regions=(), heartbeat_interval: float = 10.0,
                 degraded_after: float = 15.0, unhealthy_after: float = 30.0):
        self.region = region
        self.neighbors = tuple(neighbor_regions)
        self.heartbeat_interval = heartbeat_interval
        self.degraded_after = degraded_after
        self.unhealthy_after = unhealthy_after
        # (service, instance_id, connection) -> Instance. Keyed by connection too: a service
        # that briefly holds two links to this worker (a reconnect racing the old link's
        # death) is two candidates until one closes, never a registration lost.
        self.instances: dict[tuple, Instance] = {}
        self.routes: dict[tuple[str, str], Route] = {}
        self.router = Router()
        self.generation = 0          # bumped on every change; OpenAPI and caches key on it
        self.listeners = []          # callables(event, instance) for openapi/metrics/logs

    # ------------------------------------------------------------------ registration

    def register(self, conn, hello: dict) -> Instance:
        service, version, instance_id, region, endpoints, schemas = parse_hello(hello)
        key = (service, instance_id, id(conn))
        old = self.instances.get(key)
        for ep in endpoints:
            route = self.routes.get((ep.method, ep.path))
            if route is not None and route.service != service:
                raise HelloError(f"{ep.method} {ep.path} is already served by service "
                                 f"{route.service!r}")
        # Build the new router before touching any state: a template the router refuses
        # must leave nothing half-registered.
        instance = Instance(service, version, instance_id, region, conn, endpoints, schemas)
        routes = dict(self.routes)
        copied = set()   # copy-on-write: self.routes stays untouched until the swap
        if old is not None:
            # ENDPOINTS_UPDATE: the same connection re-registers; its old entries go.
            for k, route in list(routes.items()):
                if any(c[0] is old for c in route.candidates):
                    route = routes[k] = _copy_route(route)
                    copied.add(k)
                    route.candidates = [c for c in route.candidates if c[0] is not old]
                    if not route.candidates:
                        del routes[k]
                        copied.discard(k)
        for ep in endpoints:
            k = (ep.method, ep.path)
            route = routes.get(k)
            if route is None:
                route = routes[k] = Route(ep.method, ep.path, service)
                copied.add(k)
            elif k not in copied:
                route = routes[k] = _copy_route(route)
                copied.add(k)
            route.candidates.append((instance, ep))
        router = _build_router(routes)
        self.routes, self.router = routes, router
        self.instances[key] = instance
        self._changed("registered", instance)
        return instance

    def unregister(self, instance: Instance, reason: str = "disconnected") -> None:
        key = (instance.service, instance.instance_id, id(instance.conn))
        if self.instances.get(key) is not instance:
            return
        del self.instances[key]
        routes = {}
        for k, route in self.routes.items():
            if any(inst is instance for inst, _ in route.candidates):
                route = _copy_route(route)
                route.candidates = [c for c in route.candidates if c[0] is not instance]
                if not route.candidates:
                    continue
            routes[k] = route
        self.routes, self.router = routes, _build_router(routes)
        instance.status = UNHEALTHY
        self._changed("unregistered", instance, reason=reason)

    def _changed(self, event, instance, **extra):
        self.generation += 1
        for route in self.routes.values():
            route._cache.clear()
        for listener in self.listeners:
            listener(event, instance, **extra)

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
        self._refresh(instance, instance.last_heartbeat)

    def check_health(self, now: float | None = None) -> None:
        """Run every health.checkInterval: ages turn Healthy into Degraded, then Unhealthy."""
        now = time.monotonic() if now is None else now
        for instance in list(self.instances.values()):
            self._refresh(instance, now)

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
        if status != instance.status:
            instance.status = status
            self._changed("health", instance)
        elif instance.announced == HEALTHY:
            # Ping and heartbeat age feed selection: drop the caches of this instance's routes.
            for route in self.routes.values():
                if route._cache:
                    route._cache.clear()

    # ------------------------------------------------------------------ lookup and selection

    def match(self, method: str, path: str):
        return self.router.match(method, path)

    def select(self, route: Route, version: str | None = None):
        """(instance, endpoint) to send this request to, or None when none is routable."""
        best = route._cache.get(version)
        if best is None:
            best = route._cache[version] = self._rank(route, version)
        if not best:
            return None
        route._rr += 1
        return best[route._rr % len(best)]

    def _rank(self, route: Route, version: str | None) -> tuple:
        cands = [c for c in route.candidates if c[0].status in ROUTABLE]
        if version is not None:
            cands = [c for c in cands if c[0].version == version]
        elif cands:
            newest = max(c[0].version_key for c in cands)
            cands = [c for c in cands if c[0].version_key == newest]
        if not cands:
            return ()
        now = time.monotonic()
        interval = self.heartbeat_interval

        def key(c):
            inst = c[0]
            tier = (0 if inst.region == self.region
                    else 1 if inst.region in self.neighbors else 2)
            return (tier, int(inst.avg_ping_ms // PING_BAND_MS), inst.status != HEALTHY,
                    int((now - inst.last_heartbeat) // interval))

        keyed = sorted(((key(c), i, c) for i, c in enumerate(cands)), key=lambda t: (t[0], t[1]))
        top = keyed[0][0]
        return tuple(c for k, _, c in keyed if k == top)

    def describe(self) -> dict:
        services: dict[str, list] = {}
        for inst in self.instances.values():
            services.setdefault(inst.service, []).append(inst.describe())
        return services


def _copy_route(route: Route) -> Route:
    new = Route(route.method, route.template, route.service)
    new.candidates = list(route.candidates)
    new._rr = route._rr
    return new


def _build_router(routes: dict) -> Router:
    router = Router()
    for (method, template), route in routes.items():
        try:
            router.add(method, template, route)
        except RouteError as exc:
            raise HelloError(f"{method} {template}: {exc}") from exc
    return router


__all__ = ["RoutingState", "Instance", "Endpoint", "Route", "HelloError", "parse_hello",
           "FOUND", "METHOD_NOT_ALLOWED", "HEALTHY", "DEGRADED", "DRAINING", "UNHEALTHY"]
