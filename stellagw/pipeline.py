"""The request's journey: the ordered stages (the code is in stellagw/_py/pipeline.py).

Each stage either passes the request on, answers it (returns the response), or leaves it
pending (returns None; the answer comes later through `req.conn.respond`). The numbers
follow DESIGN.md §2; stages 1–3 (accept, parse, correlate) happen in stellagw.ingress.http.

    4  built-ins    /health/*, /metrics, /openapi.*
    5  match        normalise the path once, radix router → route + parameters; 404 / 405
    6  authenticate access token + DPoP proof / mTLS certificate             (auth/)
    7  identity     client identity headers stripped, the gateway's own set
    8  authorize    the endpoint's RequiringClaims; 403                       (auth/)
    9  rate-limit   instance windows, then Valkey past the activation gate; 429 (ratelimit/)
    10 select       routable instance by version, region, ping, heartbeat; 503 when none
    11 dispatch     REQUEST frame to the instance; timeout → CANCEL + 504
    12 respond      by the service connection when the RESPONSE arrives

Stages 6–8 and 9 are synchronous on the hot path; each returns something to wait for only
when it must wait for I/O: authentication an awaitable (an unknown signing key, the Valkey
replay check), and the rest of the journey continues in a task; the rate limit a
PendingCheck (the Valkey script), whose reply calls the rest of the journey directly. The
answer then goes out through `req.conn.respond` like any routed answer.

Every routed request runs through these stages, so they are compiled (cext/pipeline.pyx →
stellagw._cext.pipeline) with a pure-Python twin (stellagw._py.pipeline, the one to read);
`select` picks one (STELLAGW_NO_EXTENSIONS=1 forces the twin).
"""
from __future__ import annotations

from ._impl import select

Pipeline = select("pipeline").Pipeline

__all__ = ["Pipeline"]
