"""Radix path router and request-path normalisation (public API).

    path = normalize_path(raw_path)          # None -> answer 400
    status, payload, params = router.match(method, path)

The compiled module (cext/radix.pyx) is used when built, else the pure-Python twin
(stellagw/_py/radix.py); STELLAGW_NO_EXTENSIONS=1 forces the twin. Template syntax,
precedence and the normalisation rules are in docs/routing.md.
"""
from .. import _impl

if _impl.NO_EXTENSIONS:
    from .._py import radix as _m
else:
    try:
        from .._cext import radix as _m
    except ImportError as exc:
        _impl.fell_back("radix", exc)
        from .._py import radix as _m

FOUND = _m.FOUND
NOT_FOUND = _m.NOT_FOUND
METHOD_NOT_ALLOWED = _m.METHOD_NOT_ALLOWED
MAX_SEGMENTS = _m.MAX_SEGMENTS
RouteError = _m.RouteError
Router = _m.Router
normalize_path = _m.normalize_path

__all__ = ["FOUND", "NOT_FOUND", "METHOD_NOT_ALLOWED", "MAX_SEGMENTS", "RouteError",
           "Router", "normalize_path"]
