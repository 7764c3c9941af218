# cython: infer_types=True
"""The request's journey: the ordered stages, run on each request's head.

Each stage either passes the request on, answers it (returns the response), or leaves it
pending (returns None; the answer comes later through `req.conn.respond`). Stages 1–3
(accept, parse, correlate) and the edge rules (docs/http-edge.md) happen in
stellagw.ingress.http, which calls `handle` when a request's header section is complete,
before any of its body is read: a refusal costs no body bytes.

    4  built-ins    /health/*, /metrics, /openapi.*
    5  match        normalise the path once, radix router → route + parameters; 404 / 405
                    (HEAD is served by a GET route, RFC 9110 §9.3.2)
    6  authenticate access token + DPoP proof / mTLS certificate             (auth/)
    7  identity     client identity headers stripped, the gateway's own set
    8  authorize    the endpoint's RequiringClaims; 403                       (auth/)
    9  rate-limit   instance windows, then Valkey past the activation gate; 429 (ratelimit/)
    10 select       routable instance by version, region, ping, heartbeat; 503 when none
    11 dispatch     REQUEST frame to the instance; the body follows as it arrives
    12 respond      by the service connection when the RESPONSE arrives

Stages 6–8 and 9 are synchronous on the hot path; each returns something to wait for only
when it must wait for I/O: authentication an awaitable (an unknown signing key, the Valkey
replay check), and the rest of the journey continues in a task; the rate limit a
PendingCheck (the Valkey script), whose reply calls the rest of the journey directly. The
answer then goes out through `req.conn.respond` like any routed answer.

One source, compiled (typed through pipeline.pxd) and run as plain Python under
STELLAGW_NO_EXTENSIONS=1 (docs/hot-path.md).
"""
import asyncio

from .auth import AuthFailure, Identity
from .auth.identity import CREDENTIAL_FIELDS

# handle() passes over a header whose first byte no credential field starts with.
assert {name[0] for name in CREDENTIAL_FIELDS} <= set(b"adx"), CREDENTIAL_FIELDS
from .ingress.cors import CorsPolicy
from .ingress.limits import AllowedHosts
from .ingress.proxy import anonymous_key
from .observe.metrics import perf_counter
from .transport.retry import IDEMPOTENT, RetryBudget
from .ratelimit import UNLIMITED, Decision, rate_limit_headers, rejection
from .replies import error_body
from .routing.radix import FOUND, NOT_FOUND, normalize_path

_JSON = b"content-type: application/json\r\n"


def _outcome(identity):
    if identity.anonymous:
        return "anonymous"
    return identity.binding or "bearer"


def _error(req, status, message, extra_headers=b""):
    return status, _JSON + extra_headers, error_body(status, message, req.correlation_id)


class Pipeline:
    def __init__(self, worker):
        gw = worker.settings.gateway
        self._worker = worker
        self._set_builtins(worker.builtins)
        self._routing = worker.routing
        self._router = worker.routing.router   # changed in place, never replaced
        self._auth = worker.auth
        self._set_anonymous(worker.auth.anonymous)
        self._limiter = worker.limiter
        self._limited = worker.limiter.enabled     # fixed for a limiter's life
        self._metrics = worker.metrics
        self._auth_hist = worker.metrics.phase_histogram("auth")
        self._routing_hist = worker.metrics.phase_histogram("routing")
        self._tracing = worker.tracing
        self._default_timeout = gw.routing.default_timeout
        # Bodies above this go as REQUEST_STREAM_DATA frames rather than inside REQUEST.
        self._stream_threshold = max(gw.routing.streaming_buffer_size, 64 * 1024)
        self._tasks = set()
        self._dispatched = 0                 # requests sent to a service (the retry budget's base)
        self._retries = RetryBudget(gw.retries)
        # gateway.cors: None while no origin is allowed (the request path then tests nothing).
        self._cors = CorsPolicy(gw.cors) if gw.cors.enabled else None
        self._hosts = AllowedHosts(gw.http.allowed_hosts) if gw.http.allowed_hosts else None

    def reconfigure(self, worker):
        """A configuration reload (stellagw/reload.py): the worker's new collaborators and
        settings, for every stage that starts from now on. Live connections hold this one
        Pipeline, so they see them too; a request already waiting (a key fetch, Valkey)
        finishes with the objects it is waiting on."""
        gw = worker.settings.gateway
        self._set_builtins(worker.builtins)
        self._auth = worker.auth
        self._set_anonymous(worker.auth.anonymous)
        self._limiter = worker.limiter
        self._limited = worker.limiter.enabled
        self._default_timeout = gw.routing.default_timeout
        self._stream_threshold = max(gw.routing.streaming_buffer_size, 64 * 1024)
        self._cors = CorsPolicy(gw.cors) if gw.cors.enabled else None
        self._hosts = AllowedHosts(gw.http.allowed_hosts) if gw.http.allowed_hosts else None
        self._retries.configure(gw.retries)

    def _set_builtins(self, builtins):
        self._builtins = builtins
        # The second bytes their paths start with ("/h", "/m", ...): most routed paths are
        # passed over on that byte, in C, without hashing the parser's new bytes object.
        lead = bytearray(256)
        for path in builtins:
            lead[path[1] if len(path) > 1 else 0] = 1
        self._builtin_lead = bytes(lead)

    def _set_anonymous(self, identity):
        # The anonymous identity (or None) and what a request it answers gets from it, read
        # once: an Identity is immutable.
        self._anonymous = identity
        self._anonymous_outcome = _outcome(identity) if identity is not None else None
        self._anonymous_headers = identity.response_headers if identity is not None else b""

    def handle(self, req):
        # 4. built-ins
        target = req.target
        if len(target) < 2 or self._builtin_lead[target[1]]:
            builtin = self._builtins.get(target)
            if builtin is not None:
                return builtin(req)

        # 4b. the host: what a service builds links from (X-Forwarded-Host). Not asked of
        # the built-ins: balancers' health checks name the pod's address.
        if self._hosts is not None and not self._hosts.allows(req.host):
            req.route = "misdirected"
            return _error(req, 421, "this gateway does not serve that host")

        # 5. match
        t0 = perf_counter()
        path = normalize_path(req.target)
        if path is None:
            req.route = "invalid"
            return _error(req, 400, "the request path is not valid")
        method = req.method
        router = self._router
        if self._cors is not None:
            answer = self._cors.handle(req, path, router)   # a preflight's answer, or None
            if answer is not None:
                return answer
        code, found, params = router.match(method, path)
        if code != FOUND and method == "HEAD":
            code, found, params = router.match("GET", path)
        if code != FOUND:
            req.route = "unmatched"
            if code == NOT_FOUND:
                return _error(req, 404, f"no route for {method} {path}")
            allow = list(found)         # 405: the methods the path has
            if "GET" in allow and "HEAD" not in allow:
                allow.append("HEAD")
            return _error(req, 405, f"{method} is not allowed here",
                          b"allow: " + ", ".join(allow).encode() + b"\r\n")
        route = found
        req.service = route.service
        req.route = route.template
        req.routed = route
        # What the instances of this route declared, the strictest of them: whichever is
        # selected below gets nothing its declaration refuses (routing/table.py, Route).
        endpoint = route.policy
        if req.websocket != endpoint.websocket:
            if req.websocket:
                return _error(req, 400, "this endpoint does not accept WebSocket upgrades")
            return _error(req, 426, "this endpoint needs a WebSocket upgrade",
                          b"upgrade: websocket\r\nconnection: upgrade\r\n")
        limit = endpoint.max_body
        if limit is not None and limit < req.body_limit:
            # The endpoint's own limit (its HELLO): a larger body is refused on the head,
            # a chunked one when it passes it (the ingress counts against body_limit).
            if req.content_length > limit:
                return _error(req, 413, "request body larger than %d bytes" % limit)
            req.body_limit = limit
        # 6–8. authenticate, identity, authorize
        tracing = self._tracing
        auth_span = None
        if tracing is not None:
            auth_span = tracing.child(tracing.start_route(req), "gateway.auth.validate")
        claims = endpoint.claims
        result = None
        if self._anonymous is not None and not claims:
            # No credential field: anonymous, as the Authenticator would answer, without
            # its Python header scan (a third of an anonymous request's pipeline).
            result = self._anonymous
            for field in req.headers:
                name = field[0]
                # Most names are passed over on their first byte, in C, without hashing
                # the parser's new bytes object for the set.
                first = name[0] if name else 0
                if ((first == 97 or first == 100 or first == 120)      # a, d, x
                        and name in CREDENTIAL_FIELDS):
                    result = None
                    break
        if result is None:
            t1 = perf_counter()
            result = self._auth.authenticate(req, claims, endpoint.sender_constrained)
            t2 = perf_counter()
            req.auth_s = t2 - t1
        else:
            # Anonymous without a credential field: nothing was checked, so nothing is
            # timed (auth 0; the scan above counts as routing). Two clock reads fewer on
            # that path (docs/hot-path.md).
            t1 = t2 = t0
        self._auth_hist.observe(req.auth_s)
        if auth_span is not None:
            auth_span.set_attribute("stellagw.auth.outcome", result.__class__.__name__)
            auth_span.end()
        if result is self._anonymous:
            req.identity = result
            req.auth = self._anonymous_outcome
            if self._anonymous_headers:
                req.resp_headers += self._anonymous_headers
        elif type(result) is Identity:
            req.identity = result
            req.auth = _outcome(result)
            if result.response_headers:   # a fresh DPoP-Nonce
                req.resp_headers += result.response_headers
        elif type(result) is AuthFailure:
            return self._refuse(req, result)
        else:
            self._spawn(req, self._authenticate_later(req, route, path, result, t1 - t0))
            return None
        # The routing phase: match, then (from t2) the rate-limit decision and selection.
        return self._after_auth(req, route, path, t1 - t0 - t2)

    # ------------------------------------------------------------------ stages 9–11

    def _after_auth(self, req, route, path, routing_s):
        # 9. rate-limit (no key to build when no tier is configured)
        if not self._limited:
            return self._after_limit(req, route, path, UNLIMITED, routing_s)
        identity = req.identity
        if identity.anonymous:
            # The connection's key, unless a trusted proxy named another client.
            key = (req.conn.anonymous_key if req.client_ip is req.conn.peer_ip
                   else anonymous_key(req.client_ip))
        else:
            key = "sub:" + identity.subject
        decision = self._limiter.check(key, req.tenant, route.service, route.template, path)
        if decision.__class__ is not Decision:
            # A PendingCheck: the Valkey reply calls _limit_done directly. Routing time so
            # far counts; the wait from when the check went out does not.
            decision.then(self._limit_done, req, route, path, routing_s + decision.started)
            return None
        return self._after_limit(req, route, path, decision, routing_s)

    def _after_limit(self, req, route, path, decision, routing_s):
        if decision is not UNLIMITED:          # which allows and adds no header
            if not decision.allowed:
                self._metrics.rate_limit_exceeded(req.tenant)
                return rejection(decision, req.correlation_id)
            if decision.scope is not None:
                req.resp_headers += rate_limit_headers(decision)

        # 10. select (X-Service-Version, read by the ingress: a strict semver pin)
        version = req.version
        pinned = version.decode("latin-1") if version else None
        selected = route.pick(pinned)       # the cached ranking's next, in C
        if selected is None:
            selected = self._routing.select(route, pinned, req)   # req: a split's sticky key
        # `routing_s` arrives as (match time − the clock when the decision started), so one
        # clock read here closes the phase (a clock read costs as much as a histogram bucket).
        now = perf_counter()
        req.route_s = routing_s + now
        self._routing_hist.observe(routing_s + now)
        if selected is None:
            # A known service without a routable instance (restarting, all draining): 503
            # with Retry-After, never 404 (docs/selection.md).
            return _error(req, 503, f"no healthy instance of {route.service}"
                          + (f" {version.decode('latin-1')}" if version else ""),
                          self._routing.retry_after)
        instance, endpoint = selected
        if req.done:
            return None     # decided after the client left (a key fetch, Valkey)

        # 11. dispatch (12. respond happens when the service answers)
        self._dispatched += 1
        conn = instance.conn
        conn.send_request(req, endpoint, endpoint.timeout or self._default_timeout, path,
                          self._stream_threshold, now)
        return None

    def retry(self, req, path, failed, endpoint):
        """The link to `failed` broke, or its service cancelled, before any answer to `req`:
        send it once more elsewhere when it may repeat and the budget allows. True when
        sent (the connection then answers nothing itself). transport/retry.py says when."""
        budget = self._retries
        route = req.routed
        if not budget.enabled or req.done or req.retried or route is None:
            return False
        if req.method not in IDEMPOTENT and not endpoint.retryable:
            budget.count(req.service, "not_idempotent")
            return False
        selected = self._elsewhere(req, failed)
        if selected is None:
            budget.count(req.service, "no_instance")
            return False
        if not budget.allow(self._dispatched):
            budget.count(req.service, "budget")
            return False
        budget.count(req.service, "retried")
        req.retried = True
        self._send_to(req, path, selected)
        return True

    def reroute(self, req, path, failed, sent_at):
        """`req` waited for `failed`'s link to take more and never reached it (the link
        dropped, or the instance is draining: transport/connection.py, _held). It goes to
        another instance as a first try would: nothing was sent, so neither the method nor
        the retry budget matters. True when sent.

        Its timeout still runs from `sent_at`, when it was first dispatched: restarted at
        each move, a request bounced between a service's instances (each paused, draining
        and back) outlived its timeout for as long as they kept it up (3 s → 18 s in an
        adversarial probe; docs/security.md §3d, "rerouted requests keep their deadline")."""
        if req.done or req.routed is None:
            return False
        selected = self._elsewhere(req, failed)
        if selected is None:
            return False
        self._send_to(req, path, selected, sent_at)
        return True

    def _elsewhere(self, req, failed):
        """(instance, endpoint) for `req` other than `failed`, of the same version, or None."""
        version = req.version
        selected = self._routing.select(req.routed,
                                        version.decode("latin-1") if version else None, req)
        if selected is None or selected[0] is failed:
            return None
        return selected

    def _send_to(self, req, path, selected, sent_at=-1.0):
        instance, endpoint = selected
        req.pending = None
        self._dispatched += 1
        instance.conn.send_request(req, endpoint, endpoint.timeout or self._default_timeout,
                                   path, self._stream_threshold,
                                   sent_at if sent_at >= 0.0 else perf_counter())

    # ------------------------------------------------------------------ waiting for I/O

    def _refuse(self, req, failure):
        self._metrics.auth_failed(failure.reason)
        req.auth = "refused:" + failure.reason
        return (failure.status, _JSON + failure.headers,
                error_body(failure.status, failure.message, req.correlation_id, failure.code))

    async def _authenticate_later(self, req, route, path, pending, routing_s):
        result = await pending
        if result.__class__ is AuthFailure:
            _answer(req, self._refuse(req, result))
            return
        req.identity = result
        req.auth = _outcome(result)
        if result.response_headers:
            req.resp_headers += result.response_headers
        _answer(req, self._after_auth(req, route, path, routing_s - perf_counter()))

    def _limit_done(self, decision, req, route, path, spent):
        # Runs inside the Valkey client's reply handling, not in a task: a failing stage
        # still answers the client. One that has gone meanwhile is fine: respond() ignores
        # a closed connection.
        try:
            result = self._after_limit(req, route, path, decision, spent - perf_counter())
        except Exception as exc:  # noqa: BLE001 -- the client still gets an answer
            self._worker.log.event("error", "pipeline callback failed",
                                   correlationId=req.correlation_id, error=repr(exc))
            result = _error(req, 500, "internal error")
        _answer(req, result)

    def _spawn(self, req, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, req))

    def _done(self, task, req):
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # A bug in a stage: the client still gets an answer, and we get the error.
        self._worker.log.event("error", "pipeline task failed", correlationId=req.correlation_id,
                               error=repr(task.exception()))
        req.conn.respond(req, *_error(req, 500, "internal error"))


def _answer(req, result):
    if result is not None:
        req.conn.respond(req, result[0], result[1], result[2])
