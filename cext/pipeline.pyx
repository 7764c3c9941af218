# cython: language_level=3
"""The request's journey, stages 4–12 (compiled).

Compiled twin of stellagw/_py/pipeline.py: the same code line for line with C types (read
the twin). The stages are described in stellagw/pipeline.py.
"""
cimport cython

import asyncio
from time import perf_counter

from stellagw.auth import AuthFailure, Identity
from stellagw.ingress.responses import error_body
from stellagw.radix import FOUND, NOT_FOUND, normalize_path
from stellagw.ratelimit import UNLIMITED, Decision, rate_limit_headers, rejection

_JSON = b"content-type: application/json\r\n"


def _outcome(identity) -> str:
    if identity.anonymous:
        return "anonymous"
    return identity.binding or "bearer"


def _error(req, status, message, extra_headers=b""):
    return status, _JSON + extra_headers, error_body(status, message, req.correlation_id)


cdef object _perf_counter = perf_counter
cdef object _Identity = Identity
cdef object _AuthFailure = AuthFailure
cdef object _Decision = Decision
cdef object _normalize_path = normalize_path
cdef object _rate_limit_headers = rate_limit_headers


@cython.final
cdef class Pipeline:
    cdef object _worker, _builtins, _routing, _auth, _limiter, _metrics
    cdef object _auth_hist, _routing_hist, _tracing
    cdef double _default_timeout
    cdef Py_ssize_t _stream_threshold
    cdef set _tasks

    def __init__(self, worker):
        gw = worker.settings.gateway
        self._worker = worker
        self._builtins = worker.builtins
        self._routing = worker.routing
        self._auth = worker.auth
        self._limiter = worker.limiter
        self._metrics = worker.metrics
        self._auth_hist = worker.metrics.phase_histogram("auth")
        self._routing_hist = worker.metrics.phase_histogram("routing")
        self._tracing = worker.tracing
        self._default_timeout = gw.routing.default_timeout
        # Bodies above this go as REQUEST_STREAM_DATA frames rather than inside REQUEST.
        self._stream_threshold = max(gw.routing.streaming_buffer_size, 64 * 1024)
        self._tasks = set()

    def handle(self, req):
        cdef double t0, t1, t2
        # 4. built-ins
        builtin = self._builtins.get(req.target)
        if builtin is not None:
            return builtin(req)

        # 5. match
        t0 = _perf_counter()
        path = _normalize_path(req.target)
        if path is None:
            req.route = "invalid"
            return _error(req, 400, "the request path is not valid")
        code, route, params = self._routing.router.match(req.method, path)
        if code != FOUND:
            req.route = "unmatched"
            if code == NOT_FOUND:
                return _error(req, 404, f"no route for {req.method} {path}")
            allow = ", ".join(route).encode()
            return _error(req, 405, f"{req.method} is not allowed here",
                          b"allow: " + allow + b"\r\n")
        req.service = route.service
        req.route = route.template
        if req.websocket != route.candidates[0][1].websocket:
            if req.websocket:
                return _error(req, 400, "this endpoint does not accept WebSocket upgrades")
            return _error(req, 426, "this endpoint needs a WebSocket upgrade",
                          b"upgrade: websocket\r\nconnection: upgrade\r\n")
        t1 = _perf_counter()

        # 6–8. authenticate, identity, authorize
        tracing = self._tracing
        if tracing is not None:
            auth_span = tracing.child(tracing.start_route(req), "gateway.auth.validate")
        result = self._auth.authenticate(req, route.candidates[0][1].claims)
        t2 = _perf_counter()
        self._auth_hist.observe(t2 - t1)
        if tracing is not None:
            auth_span.set_attribute("stellagw.auth.outcome", result.__class__.__name__)
            auth_span.end()
        if result.__class__ is _Identity:
            req.identity = result
            req.auth = "anonymous" if result.anonymous else (result.binding or "bearer")
            if result.response_headers:   # a fresh DPoP-Nonce
                req.resp_headers += result.response_headers
        elif result.__class__ is _AuthFailure:
            return self._refuse(req, result)
        else:
            self._spawn(req, self._authenticate_later(req, route, path, result, t1 - t0))
            return None
        # The routing phase: match, then (from t2) the rate-limit decision and selection.
        return self._after_auth(req, route, path, t1 - t0 - t2)

    # ------------------------------------------------------------------ stages 9–11

    cdef _after_auth(self, req, route, path, double routing_s):
        # 9. rate-limit (no key to build when no tier is configured)
        if not self._limiter.enabled:
            return self._after_limit(req, route, path, UNLIMITED, routing_s)
        identity = req.identity
        key = req.conn.anonymous_key if identity.anonymous else "sub:" + identity.subject
        decision = self._limiter.check(key, req.tenant, route.service, route.template, path)
        if decision.__class__ is not _Decision:
            # A PendingCheck: the Valkey reply calls _limit_done directly. Routing time so
            # far counts; the wait from when the check went out does not.
            decision.then(self._limit_done, req, route, path, routing_s + decision.started)
            return None
        return self._after_limit(req, route, path, decision, routing_s)

    cdef _after_limit(self, req, route, path, decision, double routing_s):
        if not decision.allowed:
            self._metrics.rate_limit_exceeded(req.tenant)
            return rejection(decision, req.correlation_id)
        if decision.scope is not None:
            req.resp_headers += _rate_limit_headers(decision)

        # 10. select (X-Service-Version, read by the ingress: a strict semver pin)
        version = req.version
        selected = self._routing.select(route, version.decode("latin-1") if version else None)
        # `routing_s` arrives as (match time − the clock when the decision started), so one
        # clock read here closes the phase (a clock read costs as much as a histogram bucket).
        now = _perf_counter()
        self._routing_hist.observe(routing_s + now)
        if selected is None:
            return _error(req, 503, f"no healthy instance of {route.service}"
                          + (f" {version.decode('latin-1')}" if version else ""))
        instance, endpoint = selected

        # 11. dispatch (12. respond happens when the service answers)
        instance.conn.send_request(req, endpoint, endpoint.timeout or self._default_timeout,
                                   path, self._stream_threshold, now)
        return None

    # ------------------------------------------------------------------ waiting for I/O

    cdef _refuse(self, req, failure):
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
        _answer(req, self._after_auth(req, route, path, routing_s - _perf_counter()))

    def _limit_done(self, decision, req, route, path, spent):
        # Runs inside the Valkey client's reply handling, not in a task: a failing stage
        # still answers the client. One that has gone meanwhile is fine: respond() ignores
        # a closed connection.
        try:
            result = self._after_limit(req, route, path, decision, spent - _perf_counter())
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


cdef _answer(req, result):
    if result is not None:
        req.conn.respond(req, *result)
