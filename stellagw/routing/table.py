"""The routing table's entries: Endpoint, Instance and Route, and a route's round robin.

RoutingState (state.py) makes, ranks and caches them; the pipeline reads them on every
request (a route's labels and first endpoint, the selected instance's link and endpoint).
One source, compiled (typed through table.pxd, so the pipeline reads their fields as C
struct members and picks from a route's cached ranking in C) and run as plain Python under
STELLAGW_NO_EXTENSIONS=1 (docs/hot-path.md).
"""
import time

HEALTHY, DEGRADED, DRAINING, UNHEALTHY = "Healthy", "Degraded", "Draining", "Unhealthy"


class Endpoint:
    """One endpoint as one instance declared it."""

    __slots__ = ("method", "path", "timeout", "streaming", "websocket", "claims", "openapi",
                 "max_body", "sender_constrained", "retryable")

    def __init__(self, method, path, timeout, streaming, websocket, claims, openapi,
                 max_body=None, sender_constrained=False, retryable=False):
        self.method = method
        self.path = path
        self.timeout = timeout          # seconds, or None for routing.defaultTimeout
        self.streaming = streaming
        self.websocket = websocket
        self.claims = claims            # tuple of (type, value)
        self.openapi = openapi          # dict or None
        self.max_body = max_body        # bytes, or None for routing.maxRequestBodySize
        # Unbound Bearer tokens refused here (auth.requireSenderConstraint, per endpoint)
        self.sender_constrained = sender_constrained
        # May be sent again after a broken link though its method is not idempotent
        # (transport/retry.py): the service says it copes with a repeat.
        self.retryable = retryable

    def same_as(self, other) -> bool:
        return (self.method == other.method and self.path == other.path
                and self.timeout == other.timeout and self.streaming == other.streaming
                and self.websocket == other.websocket and self.claims == other.claims
                and self.openapi == other.openapi and self.max_body == other.max_body
                and self.sender_constrained == other.sender_constrained
                and self.retryable == other.retryable)

    def stricter(self, other):
        """What the gateway checks before it selects, for a route two instances declare
        differently (a rollout that adds a claim): every claim of both, the smaller body
        limit, a sender constraint if either asks. The rest (timeout, streaming, retries)
        is each instance's own, read from the one selected. `self` when it already asks for
        all `other` does: a new object only where the policy grows."""
        if other is self:
            return self
        more = [c for c in other.claims if c not in self.claims]
        limit = self.max_body
        if other.max_body is not None and (limit is None or other.max_body < limit):
            limit = other.max_body
        if not more and limit == self.max_body and (self.sender_constrained
                                                    or not other.sender_constrained):
            return self
        return Endpoint(self.method, self.path, self.timeout, self.streaming, self.websocket,
                        self.claims + tuple(more), self.openapi, limit,
                        self.sender_constrained or other.sender_constrained, self.retryable)


class Instance:
    __slots__ = ("service", "version", "version_key", "instance_id", "region", "conn", "status",
                 "announced", "last_heartbeat", "avg_ping_ms", "in_flight", "error_rate",
                 "endpoints", "schemas", "registered_at", "ping_band", "late", "routes",
                 "ejected_until", "ejected_reason", "ejections", "returned_at")

    def __init__(self, service, version, version_key, instance_id, region, conn, endpoints,
                 schemas):
        self.service = service
        self.version = version
        self.version_key = version_key    # semver_key(version): how versions sort
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
        # What selection ranks by, as of the last heartbeat or health check: ranking reads
        # these rather than the clock, so a cached ranking is exactly as fresh as they are.
        self.ping_band = 0
        self.late = 0                     # whole heartbeat intervals since the last one
        # The Route of each endpoint while registered: a disconnect storm touches these
        # directly, without a lookup per endpoint.
        self.routes = ()
        # Outlier ejection: out of selection until this clock time (0.0: in), why, how many
        # ejections in a row (each longer), and when it last came back.
        self.ejected_until = 0.0
        self.ejected_reason = ""
        self.ejections = 0
        self.returned_at = float("-inf")

    def describe(self, now: float | None = None) -> dict:
        out = {"instanceId": self.instance_id, "version": self.version, "region": self.region,
               "status": self.status, "averagePingMs": round(self.avg_ping_ms, 3),
               "secondsSinceHeartbeat": round(time.monotonic() - self.last_heartbeat, 1),
               "inFlight": self.in_flight}
        if self.ejected_until:
            left = self.ejected_until - (time.monotonic() if now is None else now)
            out["ejected"] = {"reason": self.ejected_reason, "ejections": self.ejections,
                              "secondsLeft": round(max(0.0, left), 1)}
        return out


class Route:
    """One (method, template): the instances that serve it, and a selection cache.

    The router holds one Route per template for as long as the template is routed, so a
    request that waited (authentication, rate limit) selects among the candidates of the
    moment it selects. `candidates` is a tuple, replaced on change and never mutated."""

    __slots__ = ("method", "template", "service", "candidates", "policy", "_cache", "_rr",
                 "_view")

    def __init__(self, method, template, service):
        self.method = method
        self.template = template
        self.service = service
        self.candidates = ()              # ((Instance, Endpoint), ...): set by assign()
        # What is checked before selection (WebSocket or not, body limit, claims, sender
        # constraint): the strictest of the candidates' declarations, so the instance
        # selected afterwards — whichever it is, a retry's too — never gets a request its
        # own declaration refuses (docs/routing.md, "One route, several declarations").
        self.policy = None
        self._cache = {}
        self._rr = 0
        self._view = None                 # frozen copy in RoutingState.routes, or None

    def assign(self, candidates):
        """Replace the candidates and the policy that goes with them. Instances declaring an
        endpoint alike share one Endpoint (RoutingState), so this is one pointer comparison
        per candidate but where declarations differ."""
        self.candidates = candidates
        policy = last = None
        for _, ep in candidates:
            if ep is not last:
                policy = ep if policy is None else policy.stricter(ep)
                last = ep
        self.policy = policy

    def pick(self, version):
        """The next of the ranking cached for `version` (round robin), or None when none is
        cached, none is routable or versions split it: RoutingState.select decides then.
        The pipeline calls this first, as C, and select only when it says None."""
        best = self._cache.get(version)
        if not best:
            return None
        return self.take(best)

    def take(self, best):
        """The next of `best`, a ranking of this route's (round robin)."""
        self._rr += 1
        return best[self._rr % len(best)]
