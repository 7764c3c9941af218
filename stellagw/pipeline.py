"""The request's journey: the ordered stages, written here and nowhere else.

Each stage either passes the request on, answers it (returns the response), or leaves it
pending (returns None and answers later through `req.conn.respond`). The numbers follow
DESIGN.md §2; stages 1–3 (accept, parse, correlate) happen in stellagw.ingress.http.

    4 built-ins   /health/*, /metrics (and /openapi.* once aggregation lands)
    5 match       radix router → endpoint + parameters; 404 / 405
    6-9           authenticate, identity, authorize, rate-limit   (later issues)
    10-12         select, dispatch, respond                          (the router issue)
"""
from __future__ import annotations

from .health import builtins
from .ingress.responses import error_body

_JSON_HEADERS = b"content-type: application/json\r\n"


class Pipeline:
    def __init__(self, worker):
        self._builtins = builtins.table(worker)

    def handle(self, req):
        # 4. built-ins
        builtin = self._builtins.get(req.target)
        if builtin is not None:
            return builtin(req)
        # 5. match — no services can register yet, so nothing else matches.
        req.route = "unmatched"
        return (404, _JSON_HEADERS,
                error_body(404, "no route for %s %s" % (req.method, req.target.decode("utf-8", "replace")),
                           req.correlation_id))
