"""Outlier ejection arithmetic (docs/selection.md, "Outlier ejection"); RoutingState
applies it (failed, _eject, _readmit)."""
from __future__ import annotations

# The reasons a streak counts, as gateway_outlier_ejections_total{reason} shows them.
SERVER_ERROR, TIMEOUT = "5xx", "timeout"


def ejection_time(base: float, ejections: int, cap: float) -> float:
    """How long the `ejections`-th ejection in a row lasts: an instance that keeps failing
    as soon as it is back stays out longer each time, up to the cap."""
    return min(base * ejections, cap)


def may_eject(healthy: int, ejected: int, percent: int) -> bool:
    """May one more of a service's `healthy` instances (routable by health, those ejected
    included) be ejected while `ejected` are? Never past `percent` of them: with the
    default 50, one of 2 or 3, two of 4, none of 1 — ejecting a service's only instance
    would turn its 500s into 503s and help nobody."""
    return (ejected + 1) * 100 <= healthy * percent
