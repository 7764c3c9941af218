"""The client-facing HTTP/1.1 protocol: httptools callbacks on a uvloop transport.

One HttpProtocol per client connection. Requests are parsed into `Request` objects and
queued; the pipeline answers them strictly in arrival order (pipelining), either at once
(built-ins, local errors) or later (routed requests) through `respond()`.

Error policy (STYLE §17): malformed HTTP or a broken limit → a JSON error answer and the
connection closed after it; nothing raised out of `data_received`.

Every routed request runs through this protocol's callbacks, so it is compiled
(cext/ingress.pyx → stellagw._cext.ingress) with a pure-Python twin (stellagw._py.ingress)
of the same behaviour; `select` picks one (STELLAGW_NO_EXTENSIONS=1 forces the twin).
"""
from __future__ import annotations

from .._impl import select

_m = select("ingress")

HttpProtocol = _m.HttpProtocol
Request = _m.Request
Accounting = _m.Accounting
PIPELINE_MAX = _m.PIPELINE_MAX
D_NONE, D_HEADER, D_BODY, D_IDLE = _m.D_NONE, _m.D_HEADER, _m.D_BODY, _m.D_IDLE

__all__ = ["HttpProtocol", "Request", "Accounting", "PIPELINE_MAX", "D_NONE", "D_HEADER", "D_BODY", "D_IDLE"]
