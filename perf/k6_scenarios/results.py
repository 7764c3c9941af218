"""Reading what k6 wrote: the `--out json=` point stream and the handleSummary export.

The point stream is NDJSON (gzip when the name ends in .gz): ``{"type": "Point", "metric":
…, "data": {"time": RFC 3339 with nanoseconds, "value": …, "tags": {…}}}``. Only the four
metrics the curve needs are decoded; the rest are skipped by a substring test before any
JSON parsing (a 2-minute run at 1000 req/s is ~1.5 million lines).
"""
from __future__ import annotations

import calendar
import gzip
import json
import re
from pathlib import Path

try:
    import orjson as _json_fast  # a dependency of stellagw itself
    _loads = _json_fast.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

CURVE_METRICS = (b'"http_req_duration"', b'"http_req_failed"', b'"dropped_iterations"', b'"vus"')
_CURVE_NAMES = frozenset(("http_req_duration", "http_req_failed", "dropped_iterations", "vus"))
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
_epoch_cache: dict[str, int] = {}


def parse_time(text: str) -> float:
    """RFC 3339 (k6 writes nanoseconds) to epoch seconds."""
    m = _TIME.match(text)
    if not m:
        raise ValueError(f"bad k6 timestamp {text!r}")
    base, frac, tz = m.groups()
    secs = _epoch_cache.get(base)
    if secs is None:
        secs = calendar.timegm((int(base[0:4]), int(base[5:7]), int(base[8:10]),
                                int(base[11:13]), int(base[14:16]), int(base[17:19]), 0, 0, 0))
        if len(_epoch_cache) > 100000:
            _epoch_cache.clear()
        _epoch_cache[base] = secs
    t = float(secs)
    if frac:
        t += int(frac) / (10 ** len(frac))
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


def _open(path: Path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def read_points(path: Path, scenario: str | None = None) -> list[tuple]:
    """``[(t, metric, value, tags)]`` of the curve metrics, optionally one scenario's only
    (``vus`` carries no scenario tag and is always kept)."""
    out = []
    with _open(path) as f:
        for line in f:
            if b'"Point"' not in line or not any(m in line for m in CURVE_METRICS):
                continue
            rec = _loads(line)
            metric = rec.get("metric")
            if rec.get("type") != "Point" or metric not in _CURVE_NAMES:
                continue
            data = rec["data"]
            tags = data.get("tags") or {}
            if scenario and metric != "vus" and tags.get("scenario") != scenario:
                continue
            out.append((parse_time(data["time"]), metric, data["value"], tags))
    return out


def load_summary(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def threshold_verdicts(summary: dict) -> dict[tuple[str, str], tuple[bool, float | None, int | None]]:
    """``{(metric key, expression): (ok, observed, samples)}`` from the handleSummary export.

    ``samples`` is how many values the metric got (rates: passes + fails; trends and
    counters: count), None when the summary does not say. k6 passes a threshold whose
    metric got no samples; the caller decides what that means.
    """
    out = {}
    for key, m in (summary.get("metrics") or {}).items():
        values = m.get("values") or {}
        if m.get("type") == "rate":
            samples = int(values.get("passes", 0) + values.get("fails", 0))
        elif "count" in values and m.get("type") in ("trend", "counter"):
            samples = int(values["count"]) if m.get("type") == "trend" else None
        else:
            samples = None
        for expr, verdict in (m.get("thresholds") or {}).items():
            stat = re.split(r"[<>=!]", expr, maxsplit=1)[0].strip()
            observed = values.get(stat)
            if observed is None and stat == "p(50)":
                observed = values.get("med")
            out[(key, expr)] = (bool(verdict.get("ok")), observed, samples)
    return out


def metric_values(summary: dict, name: str) -> dict:
    return ((summary.get("metrics") or {}).get(name) or {}).get("values") or {}
