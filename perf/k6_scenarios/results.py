"""Reading what k6 and the gateway wrote: k6's `--out json=` point stream (live, as k6
writes it, and from the file kept of it), the handleSummary export, and the gateway's
access log.

The point stream is NDJSON (gzip when the name ends in .gz): ``{"type": "Point", "metric":
…, "data": {"time": RFC 3339 with nanoseconds, "value": …, "tags": {…}, "metadata":
{"cid": …}}}``. Only the three metrics the curve needs are decoded; the rest are skipped by
a substring test before any JSON parsing (a 2-minute run at 1000 req/s is ~1.5 million
lines). The script puts each request's correlation id in the sample's metadata (not a tag:
k6 keeps every tag set it has seen for the whole run), so a k6 sample and the gateway's log
line of the same request can be matched.
"""
from __future__ import annotations

import calendar
import gzip
import json
import re
import threading
import time
from pathlib import Path

from .models import GatewayPerformanceObservation

try:
    import orjson as _json_fast  # a dependency of stellagw itself
    _loads = _json_fast.loads
except ImportError:  # pragma: no cover
    _loads = json.loads

CURVE_METRICS = (b'"http_req_duration"', b'"dropped_iterations"', b'"vus"')
_CURVE_NAMES = frozenset(("http_req_duration", "dropped_iterations", "vus"))
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


def _is_curve_point(line: bytes) -> bool:
    return b'"Point"' in line and any(m in line for m in CURVE_METRICS)


def _point(line: bytes, scenario: str | None, cids: dict | None):
    """``(t, metric, value, tags)`` of one curve-metric line, or None; a request's duration
    goes into ``cids`` under its correlation id."""
    rec = _loads(line)
    metric = rec.get("metric")
    if rec.get("type") != "Point" or metric not in _CURVE_NAMES:
        return None
    data = rec["data"]
    tags = data.get("tags") or {}
    if scenario and metric != "vus" and tags.get("scenario") != scenario:
        return None
    if cids is not None and metric == "http_req_duration":
        cid = (data.get("metadata") or {}).get("cid")
        if cid:
            cids[cid] = data["value"]
    return parse_time(data["time"]), metric, data["value"], tags


def read_points(path: Path, scenario: str | None = None, cids: dict | None = None) -> list[tuple]:
    """``[(t, metric, value, tags)]`` of the curve metrics, optionally one scenario's only
    (``vus`` carries no scenario tag and is always kept); with ``cids``, each request's
    duration (ms) by its correlation id too."""
    out = []
    with _open(path) as f:
        for line in f:
            if _is_curve_point(line):
                sample = _point(line, scenario, cids)
                if sample is not None:
                    out.append(sample)
    return out


class PointStream(threading.Thread):
    """k6's point stream, read from its stdout (``--out json=-``) while it runs.

    The curve metrics' lines are kept in ``points`` (gzip, for :func:`read_points` after
    the run; all of k6's lines would be about ten times as many); the parsed samples wait
    in memory until :meth:`take` hands them to the progress line. Anything on stdout that is not JSON (the handleSummary
    text) goes to ``text``.
    """

    def __init__(self, pipe, points: Path, text: Path, scenario: str):
        super().__init__(daemon=True, name="k6-points")
        self.pipe, self.points, self.text, self.scenario = pipe, points, text, scenario
        self.lines = 0
        self.error: BaseException | None = None
        self._pending: list[tuple] = []
        self._lock = threading.Lock()

    def run(self):
        try:
            with gzip.open(self.points, "wb", compresslevel=1) as gz, open(self.text, "wb") as text:
                for line in self.pipe:
                    self.lines += 1
                    if not line.startswith(b"{"):
                        text.write(line)
                    elif _is_curve_point(line):
                        gz.write(line)
                        sample = _point(line, self.scenario, None)
                        if sample is not None:
                            with self._lock:
                                self._pending.append(sample)
        except BaseException as exc:  # surfaced by the runner after k6 ends
            self.error = exc
            for _ in self.pipe:  # never leave k6 blocked on a full pipe
                pass

    def take(self, until: float | None = None) -> list[tuple]:
        """The samples read so far with a time before ``until`` (all of them: None)."""
        with self._lock:
            if until is None:
                out, self._pending = self._pending, []
            else:
                out = [s for s in self._pending if s[0] < until]
                self._pending = [s for s in self._pending if s[0] >= until]
        return out


def read_access_log(path: Path, prefix: str, offset: int = 0, expect: int = 0,
                    settle_s: float = 1.5, timeout_s: float = 6.0) -> list[GatewayPerformanceObservation]:
    """The gateway's request lines (docs/operations.md §7) whose correlation id starts with
    ``prefix``, from byte ``offset`` on, as single-request observations.

    A worker hands its buffered lines to its writer thread at 64 KiB or on its 1 s tick:
    wait until ``expect`` such lines are there, or the file has not grown for ``settle_s``
    (longer than a tick), at most ``timeout_s``.
    """
    key = b'"correlationId":"' + prefix.encode()
    deadline = time.monotonic() + timeout_s
    size, still_since = -1, time.monotonic()
    while True:
        out = []
        with open(path, "rb") as f:
            f.seek(offset)
            for line in f:
                if key in line:
                    try:
                        rec = _loads(line)
                    except ValueError:   # a line cut by the writer mid-way
                        continue
                    out.append(GatewayPerformanceObservation.from_access_log(rec))
        now = time.monotonic()
        grown = path.stat().st_size
        if grown != size:
            size, still_since = grown, now
        if len(out) >= expect or now - still_since >= settle_s or now >= deadline:
            return out
        time.sleep(0.1)


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
