"""CORS at the gateway (gateway.cors, docs/http-edge.md "CORS"): preflights answered here,
the response headers of allowed cross-origin requests added here, so a browser application
gets the same policy from every service behind the gateway.

The policy is the operator's: a global rule and per-path-prefix overrides, first match wins.
A preflight (OPTIONS with Access-Control-Request-Method) is answered 204 when the origin,
the method (one the route has) and every requested header are allowed, and 403 otherwise;
it never reaches a service and needs no credentials (browsers send none). A request that is
not a preflight goes on as usual; when its Origin is allowed, the gateway adds
Access-Control-Allow-Origin (the origin itself, and Vary: Origin), -Allow-Credentials and
-Expose-Headers to whatever answers it, the gateway's own errors included. Every other
answer on a path under the policy says Vary: Origin too: it would have differed for
another Origin, and a shared cache that kept one answer for all (no Origin, or one not
allowed) would serve it to an allowed page without its Access-Control-Allow-Origin.

Nothing is paid unless gateway.cors has origins.
"""
from __future__ import annotations

from ..routing.radix import FOUND, METHOD_NOT_ALLOWED
from ..replies import error_body

_JSON = b"content-type: application/json\r\n"
_VARY = b"vary: origin\r\n"


class CorsRule:
    __slots__ = ("prefix", "any_origin", "origins", "methods", "headers", "allow_headers_line",
                 "expose_line", "credentials", "max_age")

    def __init__(self, prefix, settings):
        self.prefix = prefix
        origins = tuple(settings.allow_origins)
        self.any_origin = "*" in origins
        self.origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        self.methods = tuple(m.upper() for m in settings.allow_methods)   # empty: the route's
        self.headers = frozenset(h.lower().encode("latin-1") for h in settings.allow_headers)
        self.allow_headers_line = (b"access-control-allow-headers: "
                                   + b", ".join(sorted(self.headers)) + b"\r\n"
                                   if self.headers else b"")
        self.expose_line = (b"access-control-expose-headers: "
                            + ", ".join(settings.expose_headers).encode("latin-1") + b"\r\n"
                            if settings.expose_headers else b"")
        self.credentials = settings.allow_credentials
        self.max_age = int(settings.max_age)

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.origins

    def origin_lines(self, origin: bytes) -> bytes:
        # The origin itself, never "*": with Vary: Origin a cache keeps answers apart, and
        # credentials may be allowed.
        lines = b"access-control-allow-origin: " + origin + b"\r\n" + _VARY
        if self.credentials:
            lines += b"access-control-allow-credentials: true\r\n"
        return lines


class CorsPolicy:
    def __init__(self, settings):
        self.rules = tuple(CorsRule(r.path_prefix, r) for r in settings.routes) + (
            CorsRule("/", settings),)

    def rule(self, path: str) -> CorsRule:
        for rule in self.rules:
            if path.startswith(rule.prefix):
                return rule
        return self.rules[-1]

    def handle(self, req, path: str, router):
        """A preflight's answer, or None (after adding the headers of an allowed origin)."""
        origin = requested = requested_headers = None
        for name, value in req.headers:
            if name == b"origin":
                origin = value
            elif name == b"access-control-request-method":
                requested = value
            elif name == b"access-control-request-headers":
                requested_headers = value if requested_headers is None else (
                    requested_headers + b"," + value)
        if origin is None:
            req.resp_headers += _VARY
            return None
        rule = self.rule(path)
        if req.method != "OPTIONS" or requested is None:
            if rule.allows(origin):
                req.resp_headers += rule.origin_lines(origin) + rule.expose_line
            else:
                req.resp_headers += _VARY
            return None
        method = requested.decode("latin-1").strip().upper()
        code, route, _ = router.match(method, path)
        if code != FOUND and code != METHOD_NOT_ALLOWED:
            return None                     # no such path: the usual 404
        req.route = "cors-preflight"
        if not rule.allows(origin):
            return _refuse(req, "origin not allowed by the CORS policy")
        methods = rule.methods or (method,)
        if code != FOUND or method not in methods:
            return _refuse(req, f"{method} is not allowed by the CORS policy here")
        if requested_headers:
            asked = [h.strip().lower() for h in requested_headers.split(b",") if h.strip()]
            if any(h not in rule.headers for h in asked):
                return _refuse(req, "a requested header is not allowed by the CORS policy")
        req.service = route.service
        lines = (rule.origin_lines(origin)
                 + b"access-control-allow-methods: " + ", ".join(methods).encode() + b"\r\n"
                 + rule.allow_headers_line
                 + b"access-control-max-age: %d\r\n" % rule.max_age)
        return 204, lines, b""


def _refuse(req, message):
    return 403, _JSON, error_body(403, message, req.correlation_id, "cors_refused")
