"""The performance model of the k6 scenarios (perf/README.md, "k6 scenarios"), as typed
Python.

| type                             | here                                                   |
|----------------------------------|--------------------------------------------------------|
| `GatewayPerformanceObservation`  | one request's pipeline phases (or a quantile of them)  |
| `request_overhead`               | the gateway's overhead, request by request             |
| `PerformanceScenarioConfig`      | the k6 scenarios A–G with their SLO thresholds (data)  |
| `PerformanceCurvePoint`          | one time window: offered vs achieved rate, p50/p95/p99 |
| `PerformanceTestSummary`         | one scenario's run: thresholds, violations, curve      |
| `GatewayPerformanceMetrics`      | the gateway's /metrics text, parsed; deltas; quantiles |

`GatewayPerformanceMetrics` is not what *emits* the metrics (the gateway does that in
`stellagw/observe/metrics.py`): it is the reading side: parse the
Prometheus text exposition, subtract a "before" scrape from an "after" scrape, and compute
per-phase quantiles from histogram buckets exactly as PromQL's `histogram_quantile` does.

No dependency beyond the standard library, so the runner, the tests and a notebook can all
import it (``from perf.k6_scenarios import models``, from the repository's root).
The k6 script (`gateway_performance.k6.js` beside it) carries the same table for standalone use;
tests/benchmarks/test_k6_short.py checks with `k6 inspect` that both agree.
"""
from __future__ import annotations

import json
import math
import operator
import re
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "Threshold", "ThresholdResult", "PerformanceScenarioConfig", "SCENARIOS", "scenario",
    "select_scenarios", "PerformanceCurvePoint", "aggregate_curve", "percentile",
    "GatewayPerformanceObservation", "GatewayPerformanceMetrics", "Histogram",
    "histogram_quantile", "PerformanceTestSummary", "PHASES", "LATENCY_METRICS",
    "format_limit", "request_overhead", "distribution",
]

PHASES = ("auth", "routing", "transport")
# Thresholds on time: the ones a threshold scale (--threshold-scale) stretches. Error rates,
# shares and counts say whether the gateway behaved, which no CPU shortage excuses.
LATENCY_METRICS = frozenset(("http_req_duration", "cid_overhead_p95_ms"))

# --------------------------------------------------------------------------- thresholds

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
        "==": operator.eq, "===": operator.eq, "!=": operator.ne}
_EXPR = re.compile(r"^\s*(avg|min|max|med|count|rate|value|p\(\d+(?:\.\d+)?\))\s*"
                   r"(<=|>=|===|==|!=|<|>)\s*(-?\d+(?:\.\d+)?)\s*$")


@dataclass(frozen=True)
class Threshold:
    """One SLO check in k6's threshold syntax: ``metric`` + ``"p(95)<10"``.

    ``source`` says who evaluates it: ``"k6"`` thresholds go into the script's options
    (filtered to the scenario's samples); ``"derived"`` ones are computed after the run
    from several metrics (the correlation-id overhead of D, the memory growth of G).
    """
    metric: str
    expression: str
    description: str = ""
    source: str = "k6"
    scenario_filter: bool = True   # k6: restrict to {scenario:<name>} samples
    table_expression: str = ""     # the table's own, when ``expression`` is scaled

    def __post_init__(self):
        if not _EXPR.match(self.expression):
            raise ValueError(f"bad threshold expression {self.expression!r}")
        if self.source not in ("k6", "derived"):
            raise ValueError(f"bad threshold source {self.source!r}")

    @property
    def stat(self) -> str:
        return _EXPR.match(self.expression)[1]

    @property
    def op(self) -> str:
        return _EXPR.match(self.expression)[2]

    @property
    def limit(self) -> float:
        return float(_EXPR.match(self.expression)[3])

    @property
    def latency(self) -> bool:
        return self.metric in LATENCY_METRICS

    def scaled(self, factor: float) -> "Threshold":
        """This threshold with its limit times ``factor`` when it is a latency (the k6
        script's THRESHOLD_SCALE does the same, so both spell the expression alike)."""
        if factor == 1 or not self.latency:
            return self
        return replace(self, expression=f"{self.stat}{self.op}{format_limit(self.limit * factor)}",
                       table_expression=self.table_expression or self.expression)

    def k6_key(self, scenario_name: str) -> str:
        """The key under ``options.thresholds`` (a sub-metric filtered to the scenario)."""
        if self.scenario_filter:
            return f"{self.metric}{{scenario:{scenario_name}}}"
        return self.metric

    def check(self, observed: float | None) -> bool:
        """Evaluate against an observed value; no data fails (a silent SLO is not a pass)."""
        if observed is None or (isinstance(observed, float) and math.isnan(observed)):
            return False
        return _OPS[self.op](observed, self.limit)

    def __str__(self) -> str:
        return f"{self.metric} {self.expression}"


@dataclass(frozen=True)
class ThresholdResult:
    threshold: Threshold
    ok: bool
    observed: float | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return {"metric": self.threshold.metric, "expression": self.threshold.expression,
                "table_expression": self.threshold.table_expression or self.threshold.expression,
                "source": self.threshold.source, "description": self.threshold.description,
                "ok": self.ok, "observed": self.observed, "note": self.note}


# --------------------------------------------------------------------------- scenarios A–G

@dataclass(frozen=True)
class PerformanceScenarioConfig:
    """One row of the k6 scenario table (perf/README.md), plus what the runner needs to
    host it.

    Arrival-rate scenarios (C, E, G) also have an offered ``rate`` (requests/s, open loop:
    a fixed arrival rate, so a slow server cannot slow the client and hide latency), and their
    ``vus`` is the VU pool. ``short_*`` is the CI mode (`--env SHORT=1`): seconds, not
    minutes, and fewer VUs.
    """
    key: str                       # "A" … "G"
    name: str                      # k6 scenario name, e.g. "scenario_c_routing_throughput"
    title: str
    purpose: str
    executor: str                  # constant-vus | constant-arrival-rate | ramping-vus
    vus: int
    duration_s: int
    key_metric: str                # the table's "key metric" column, verbatim
    thresholds: tuple[Threshold, ...]
    short_vus: int
    short_duration_s: int
    rate: int | None = None        # offered requests/s (arrival-rate executors)
    short_rate: int | None = None
    routed: bool = True            # goes through routing to a demo service (DPoP when on)
    needs_rate_limit: bool = False
    requests: tuple[str, ...] = ()  # what one iteration sends (documentation)

    def duration(self, short: bool = False) -> int:
        return self.short_duration_s if short else self.duration_s

    def vus_for(self, short: bool = False) -> int:
        return self.short_vus if short else self.vus

    def rate_for(self, short: bool = False) -> int | None:
        return self.short_rate if short else self.rate

    def scaled(self, factor: float) -> "PerformanceScenarioConfig":
        """The scenario with every latency threshold's limit times ``factor``."""
        if factor == 1:
            return self
        return replace(self, thresholds=tuple(t.scaled(factor) for t in self.thresholds))

    @property
    def k6_thresholds(self) -> tuple[Threshold, ...]:
        return tuple(t for t in self.thresholds if t.source == "k6")

    @property
    def derived_thresholds(self) -> tuple[Threshold, ...]:
        return tuple(t for t in self.thresholds if t.source == "derived")

    def k6_threshold_map(self) -> dict[str, list[str]]:
        """``options.thresholds`` as the script builds it for this scenario."""
        out: dict[str, list[str]] = {}
        for t in self.k6_thresholds:
            out.setdefault(t.k6_key(self.name), []).append(t.expression)
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [{"metric": t.metric, "expression": t.expression, "source": t.source,
                            "description": t.description} for t in self.thresholds]
        return d


def format_limit(value: float) -> str:
    """A limit as JavaScript prints the same number (shortest round trip, no trailing
    ``.0``), rounded to 6 decimals so 0.1 × 3 is 0.3 on both sides."""
    text = repr(round(value, 6))
    return text[:-2] if text.endswith(".0") else text


def _t(metric, expression, description="", source="k6", scenario_filter=True) -> Threshold:
    return Threshold(metric, expression, description, source, scenario_filter)


_NO_ERRORS = _t("http_req_failed", "rate<0.001", "error rate < 0.1 % (SLO: docs/operations.md, alerts)")

SCENARIOS: dict[str, PerformanceScenarioConfig] = {s.name: s for s in (
    PerformanceScenarioConfig(
        "A", "scenario_a_health_baseline", "Health Baseline",
        "Sub-ms health probe overhead: gateway-only path, no routing, no auth",
        "constant-vus", 10, 60, "P95 < 10 ms",
        (_t("http_req_duration", "p(95)<10", "health probe P95 < 10 ms"), _NO_ERRORS),
        short_vus=5, short_duration_s=5, routed=False,
        requests=("GET /health/live",)),
    PerformanceScenarioConfig(
        "B", "scenario_b_openapi_etag", "OpenAPI Aggregation",
        "Spec cache under concurrent readers; If-None-Match → 304",
        "constant-vus", 50, 75, "P95 < 200 ms",
        (_t("http_req_duration", "p(95)<200", "OpenAPI P95 < 200 ms"),
         _t("http_req_failed", "rate<0.01", "no failures (404 tolerated until /openapi.json exists)")),
        short_vus=10, short_duration_s=5, routed=False,
        requests=("GET /openapi.json [If-None-Match]",)),
    PerformanceScenarioConfig(
        "C", "scenario_c_routing_throughput", "Routing Throughput",
        "Mixed-method routing at a fixed offered rate (open loop)",
        "constant-arrival-rate", 200, 120, "P50 < 2 ms, P99 < 5 ms",
        (_t("http_req_duration", "p(50)<2", "routed P50 < 2 ms"),
         _t("http_req_duration", "p(99)<5", "routed P99 < 5 ms"), _NO_ERRORS),
        short_vus=20, short_duration_s=5, rate=1000, short_rate=200,
        requests=("GET /api/v1/scans/{id}", "POST /api/v1/scans", "GET /api/v1/policies",
                  "GET /bench/hello")),
    PerformanceScenarioConfig(
        "D", "scenario_d_correlation_id", "Correlation ID",
        "Propagation overhead: the same route with and without X-Correlation-Id",
        "constant-vus", 20, 60, "P95 < 5 ms overhead",
        (_t("cid_echoed", "rate>0.999", "X-Correlation-Id echoed unchanged", scenario_filter=False),
         _NO_ERRORS,
         _t("cid_overhead_p95_ms", "value<5",
            "P95(with header) − P95(without) < 5 ms", source="derived")),
        short_vus=10, short_duration_s=5,
        requests=("GET /api/v1/policies [X-Correlation-Id on every other iteration]",)),
    PerformanceScenarioConfig(
        "E", "scenario_e_rate_limit_boundary", "Rate Limit Boundary",
        "Offer twice the instance limit: about half must be 429 with Retry-After",
        "constant-arrival-rate", 100, 60, "Retry-After header",
        (_t("ratelimit_retry_after", "rate>0.999", "every 429 carries Retry-After",
            scenario_filter=False),
         _t("ratelimited", "rate>0.3", "429 share > 30 % at 2× the limit", scenario_filter=False),
         _t("ratelimited", "rate<0.7", "429 share < 70 % at 2× the limit", scenario_filter=False),
         _t("http_req_failed", "rate<0.001", "nothing but 200 and 429")),
        short_vus=20, short_duration_s=5, rate=200, short_rate=200, needs_rate_limit=True,
        requests=("GET /bench/hello",)),
    PerformanceScenarioConfig(
        "F", "scenario_f_connection_ramp", "Connection Ramp",
        "Transport saturation: ramp to 1000 VUs, one keep-alive connection each, ~1 req/s",
        "ramping-vus", 1000, 120, "No 503 responses",
        (_t("status_503", "count<1", "no 503 responses", scenario_filter=False),
         _t("http_req_failed", "rate<0.01", "error rate < 1 % during the ramp")),
        short_vus=100, short_duration_s=10,
        requests=("GET /bench/hello, then sleep 1 s",)),
    PerformanceScenarioConfig(
        "G", "scenario_g_soak", "Steady-State Soak",
        "Memory leaks / resource exhaustion at a steady offered rate",
        "constant-arrival-rate", 50, 600, "Stable memory",
        (_t("http_req_duration", "p(99)<50", "P99 < 50 ms (SLO: docs/operations.md, alerts)"), _NO_ERRORS,
         _t("gateway_rss_growth_pct", "value<10",
            "gateway RSS: last 20 % of the run vs the 20–40 % mark", source="derived")),
        short_vus=10, short_duration_s=10, rate=500, short_rate=100,
        requests=("mix of C",)),
)}


def scenario(ref: str) -> PerformanceScenarioConfig:
    """By k6 name (``scenario_c_routing_throughput``), letter (``C``/``c``) or a unique
    part of the name (``routing``)."""
    ref = ref.strip()
    if ref in SCENARIOS:
        return SCENARIOS[ref]
    for s in SCENARIOS.values():
        if ref.upper() == s.key:
            return s
    hits = [s for s in SCENARIOS.values() if ref.lower() in s.name]
    if len(hits) == 1:
        return hits[0]
    raise KeyError(f"unknown scenario {ref!r}; one of: "
                   + ", ".join(f"{s.key}={s.name}" for s in SCENARIOS.values()))


def select_scenarios(spec: str) -> list[PerformanceScenarioConfig]:
    """``all`` or a comma list of references (see :func:`scenario`), in table order."""
    if spec.strip().lower() in ("", "all"):
        return list(SCENARIOS.values())
    chosen = {scenario(part).name for part in spec.split(",") if part.strip()}
    return [s for s in SCENARIOS.values() if s.name in chosen]


# --------------------------------------------------------------------------- curves

def percentile(sorted_values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default, and k6's trend stat)."""
    n = len(sorted_values)
    if n == 0:
        return None
    if n == 1:
        return sorted_values[0]
    pos = (n - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@dataclass(frozen=True)
class PerformanceCurvePoint:
    """One window of a run: what was offered, what came back, how fast.

    ``requests`` are completed HTTP requests whose sample time falls in the window;
    ``dropped`` are k6 ``dropped_iterations`` (arrivals an open-loop executor could not
    start: no free VU) — so ``offered_rps`` is what the scenario asked for and
    ``achieved_rps`` what the gateway served. The ``*_cpu_pct`` and ``steal_pct`` are the
    machine's over the window (machine.py), in % of one CPU (steal: of all CPUs' time),
    when the runner watched it.
    """
    window_start: float            # epoch seconds
    window_seconds: float
    requests: int
    failed: int
    dropped: int = 0
    vus: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    status_counts: Mapping[str, int] = field(default_factory=dict)
    gateway_cpu_pct: float | None = None
    load_cpu_pct: float | None = None
    other_cpu_pct: float | None = None
    steal_pct: float | None = None

    @property
    def achieved_rps(self) -> float:
        return self.requests / self.window_seconds if self.window_seconds else 0.0

    @property
    def offered_rps(self) -> float:
        return (self.requests + self.dropped) / self.window_seconds if self.window_seconds else 0.0

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["status_counts"] = dict(self.status_counts)
        d.update(offered_rps=round(self.offered_rps, 3), achieved_rps=round(self.achieved_rps, 3),
                 error_rate=round(self.error_rate, 6))
        return d


def aggregate_curve(samples: Iterable[tuple], window_s: float = 5.0,
                    start: float | None = None, end: float | None = None) -> list[PerformanceCurvePoint]:
    """Bucket k6 samples into fixed windows.

    A sample is ``(t, metric, value, tags)`` with ``t`` in epoch seconds and ``metric`` one
    of k6's: ``http_req_duration`` (ms; one per request; failed when its
    ``expected_response`` tag is ``"false"``, which is what k6's ``http_req_failed``
    counts), ``dropped_iterations``, ``vus``. Other metrics are ignored. ``start`` defaults to the
    first sample's time and ``end`` to the last one's; empty windows in between are kept
    (a stall is a point on the curve, not a gap). The last window is usually partial: its
    ``window_seconds`` is the time it really covers, so its rates are not understated.
    """
    if window_s <= 0:
        raise ValueError("window_s must be > 0")
    samples = [s for s in samples if s[1] in _CURVE_METRICS]
    if not samples:
        return []
    times = [s[0] for s in samples]
    return _aggregate(samples, window_s, min(times) if start is None else start,
                      max(times) if end is None else end)


_CURVE_METRICS = frozenset(("http_req_duration", "dropped_iterations", "vus"))


def _aggregate(samples, window_s, origin, end) -> list[PerformanceCurvePoint]:
    n = max(1, math.floor((end - origin) / window_s) + 1)
    # The last window usually covers only up to ``end``. A sliver (under half a window) is
    # folded into the window before it; otherwise its rates are taken over the time it
    # really covers — either way no rate is computed over time that did not happen.
    tail = end - (origin + (n - 1) * window_s)
    fold = n > 1 and tail < window_s / 2
    seconds = [window_s] * n
    if fold:
        n -= 1
        seconds = [window_s] * n
        seconds[-1] = window_s + max(tail, 0.0)
    elif 0 < tail < window_s:
        seconds[-1] = tail
    acc = [{"d": [], "failed": 0, "dropped": 0, "vus": 0, "vus_seen": False, "status": {}}
           for _ in range(n)]
    for t, metric, value, tags in samples:
        i = math.floor((t - origin) / window_s)
        if i < 0 or t > end:
            continue
        i = min(i, n - 1)
        a = acc[i]
        if metric == "http_req_duration":
            a["d"].append(float(value))
            tags = tags or {}
            status = tags.get("status")
            if status is not None:
                a["status"][str(status)] = a["status"].get(str(status), 0) + 1
            if tags.get("expected_response") == "false":
                a["failed"] += 1
        elif metric == "dropped_iterations":
            a["dropped"] += int(value)
        elif metric == "vus":
            a["vus"] = max(a["vus"], int(value))
            a["vus_seen"] = True
    points = []
    vus = 0
    for i, a in enumerate(acc):
        d = sorted(a["d"])
        # k6 samples `vus` about once a second: a window without a sample keeps the last level.
        vus = a["vus"] if a["vus"] or a["vus_seen"] else vus
        points.append(PerformanceCurvePoint(
            window_start=origin + i * window_s, window_seconds=seconds[i], requests=len(d),
            failed=a["failed"], dropped=a["dropped"], vus=vus,
            p50_ms=percentile(d, 0.50), p95_ms=percentile(d, 0.95), p99_ms=percentile(d, 0.99),
            status_counts=a["status"]))
    return points


# --------------------------------------------------------------------------- /metrics

@dataclass(frozen=True)
class Histogram:
    """Cumulative buckets ``[(upper_bound, count), …, (inf, total)]`` plus sum and count."""
    buckets: tuple[tuple[float, float], ...]
    sum: float = 0.0
    count: float = 0.0

    def quantile(self, q: float) -> float | None:
        return histogram_quantile(q, self.buckets)

    def __sub__(self, other: "Histogram") -> "Histogram":
        theirs = dict(other.buckets)
        return Histogram(tuple((le, c - theirs.get(le, 0.0)) for le, c in self.buckets),
                         self.sum - other.sum, self.count - other.count)

    def __add__(self, other: "Histogram") -> "Histogram":
        theirs = dict(other.buckets)
        les = sorted(set(dict(self.buckets)) | set(theirs))
        mine = dict(self.buckets)
        return Histogram(tuple((le, mine.get(le, 0.0) + theirs.get(le, 0.0)) for le in les),
                         self.sum + other.sum, self.count + other.count)


def histogram_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """PromQL's ``histogram_quantile`` over cumulative ``(le, count)`` buckets.

    Linear interpolation inside the bucket holding rank ``q·total``; the first bucket's
    lower bound is 0 (when its bound is positive); a rank in the +Inf bucket returns the
    highest finite bound. ``None`` when there are no observations.
    """
    b = sorted((float(le), float(c)) for le, c in buckets)
    if not b or not math.isinf(b[-1][0]):
        return None
    total = b[-1][1]
    if total <= 0 or math.isnan(total):
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    prev_le, prev_c = 0.0, 0.0
    for i, (le, c) in enumerate(b):
        if c >= rank:
            if math.isinf(le):
                return b[-2][0] if len(b) > 1 else None
            if i == 0 and le <= 0:
                return le
            lower = prev_le if i > 0 else (0.0 if le > 0 else le)
            in_bucket = c - prev_c
            if in_bucket <= 0:
                return le
            return lower + (le - lower) * (rank - prev_c) / in_bucket
        prev_le, prev_c = le, c
    return None  # pragma: no cover - the +Inf bucket always matches


_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(?:\s+\d+)?\s*$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?\s*')


def _unescape(v: str) -> str:
    return v.replace('\\"', '"').replace("\\n", "\n").replace("\\\\", "\\")


def _value(text: str) -> float:
    if text in ("+Inf", "Inf"):
        return math.inf
    if text == "-Inf":
        return -math.inf
    return float(text)


@dataclass(frozen=True)
class GatewayPerformanceObservation:
    """One request's journey through the pipeline phases, in milliseconds.

    Built for a single request (``status``/``service``/``correlation_id`` set; from the
    gateway's access log: :meth:`from_access_log`), or, from /metrics, as "the q-quantile
    request": each phase's q-quantile taken from its own histogram (``quantile`` set), or
    as the mean request (``quantile`` None, from a /metrics reading). Phases a build does
    not observe yet stay None. ``transport_ms`` is the service round trip (the access log's
    ``timings.upstream``).
    """
    total_ms: float | None
    auth_ms: float | None = None
    routing_ms: float | None = None
    transport_ms: float | None = None
    status: int | None = None
    service: str | None = None
    correlation_id: str | None = None
    quantile: float | None = None

    @classmethod
    def from_access_log(cls, record: Mapping) -> "GatewayPerformanceObservation":
        """One request line of the gateway's JSON log (docs/operations.md §7)."""
        timings = record.get("timings") or {}
        return cls(total_ms=record.get("durationMs"), auth_ms=timings.get("auth"),
                   routing_ms=timings.get("routing"), transport_ms=timings.get("upstream"),
                   status=record.get("status"), service=record.get("service"),
                   correlation_id=record.get("correlationId"))

    @property
    def gateway_ms(self) -> float | None:
        """Time the gateway itself spent: total minus the service round trip, for one
        request (or the mean request: a difference of means is the mean difference). Not for
        a quantile: the p99 request's total and the p99 round trip are different requests,
        so their difference is nobody's overhead."""
        if self.total_ms is None or self.quantile is not None:
            return None
        return self.total_ms - (self.transport_ms or 0.0)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gateway_ms"] = self.gateway_ms
        return d


def distribution(values: Iterable[float]) -> dict:
    """``{"count", "p50_ms", "p95_ms", "p99_ms", "max_ms", "mean_ms"}`` of values in ms."""
    v = sorted(values)
    return {"count": len(v), "p50_ms": percentile(v, 0.50), "p95_ms": percentile(v, 0.95),
            "p99_ms": percentile(v, 0.99), "max_ms": v[-1] if v else None,
            "mean_ms": sum(v) / len(v) if v else None}


OVERHEAD_ROWS = {
    "gateway": "the gateway's own time: durationMs − timings.upstream",
    "upstream": "the service round trip: timings.upstream",
    "client_minus_upstream": "k6's duration − timings.upstream (matched by correlation id)",
    "outside_gateway": "k6's duration − durationMs: k6, the kernel, loopback",
}


def request_overhead(observations: Iterable[GatewayPerformanceObservation],
                     client_ms: Mapping[str, float] | None = None) -> dict:
    """The overhead as a distribution over requests: each request's own difference first,
    then its percentiles (never a difference of two percentiles).

    ``observations`` are single requests (:meth:`GatewayPerformanceObservation.from_access_log`);
    ``client_ms`` maps a correlation id to the duration k6 measured for that request, so
    the client's view is matched request by request. Rows: :data:`OVERHEAD_ROWS`.
    """
    client_ms = client_ms or {}
    rows: dict[str, list[float]] = {k: [] for k in OVERHEAD_ROWS}
    requests = matched = 0
    for o in observations:
        if o.total_ms is None:
            continue
        requests += 1
        rows["gateway"].append(o.gateway_ms)
        upstream = o.transport_ms or 0.0
        if o.transport_ms is not None:
            rows["upstream"].append(upstream)
        k6 = client_ms.get(o.correlation_id)
        if k6 is not None:
            matched += 1
            if o.transport_ms is not None:
                rows["client_minus_upstream"].append(k6 - upstream)
            rows["outside_gateway"].append(k6 - o.total_ms)
    return {"requests": requests, "matched": matched,
            "rows": {k: distribution(v) for k, v in rows.items()}}


class GatewayPerformanceMetrics:
    """The gateway's /metrics exposition (text format 0.0.4), parsed into samples.

    ``samples`` maps a metric sample name (``gateway_requests_total``,
    ``gateway_auth_duration_seconds_bucket`` …) to ``{frozenset(labels.items()): value}``.
    ``after - before`` subtracts counters and histogram buckets and keeps the gauges of
    ``after`` (so a delta answers "what happened during the run").
    """

    def __init__(self, samples: dict[str, dict[frozenset, float]] | None = None,
                 types: dict[str, str] | None = None):
        self.samples = samples or {}
        self.types = types or {}

    # -- reading --------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "GatewayPerformanceMetrics":
        samples: dict[str, dict[frozenset, float]] = {}
        types: dict[str, str] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 4 and parts[1] == "TYPE":
                    types[parts[2]] = parts[3].strip()
                continue
            m = _LINE.match(line)
            if not m:
                raise ValueError(f"cannot parse metrics line: {raw!r}")
            name, _, labels, value = m.groups()
            lab = frozenset((k, _unescape(v)) for k, v in _LABEL.findall(labels or ""))
            samples.setdefault(name, {})[lab] = _value(value)
        return cls(samples, types)

    @classmethod
    def scrape(cls, url: str, timeout: float = 5.0) -> "GatewayPerformanceMetrics":
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=timeout) as resp:
            return cls.parse(resp.read().decode("utf-8", "replace"))

    def _type_of(self, name: str) -> str:
        for base in (name, re.sub(r"_(bucket|sum|count|total|created)$", "", name)):
            if base in self.types:
                return self.types[base]
        return "untyped"

    def __sub__(self, before: "GatewayPerformanceMetrics") -> "GatewayPerformanceMetrics":
        out: dict[str, dict[frozenset, float]] = {}
        for name, series in self.samples.items():
            kind = self._type_of(name)
            old = before.samples.get(name, {})
            if kind in ("counter", "histogram", "summary"):
                # A counter lower than before was reset (a restarted process): count from 0.
                out[name] = {k: (v - old.get(k, 0.0)) if v >= old.get(k, 0.0) else v
                             for k, v in series.items()}
            else:
                out[name] = dict(series)
        return GatewayPerformanceMetrics(out, dict(self.types))

    # -- queries ------------------------------------------------------------------------
    def series(self, name: str, where=None, **labels) -> list[tuple[dict, float]]:
        """``[(labels, value)]`` of ``name`` whose labels include ``labels`` and, when
        given, satisfy ``where(labels)``."""
        want = set(labels.items())
        out = []
        for k, v in self.samples.get(name, {}).items():
            if want <= k:
                lab = dict(k)
                if where is None or where(lab):
                    out.append((lab, v))
        return out

    def sum(self, name: str, where=None, **labels) -> float:
        return sum(v for _, v in self.series(name, where, **labels))

    def has(self, name: str) -> bool:
        return name in self.samples

    def histogram(self, name: str, where=None, **labels) -> Histogram | None:
        """Every series of histogram ``name`` matching ``labels`` (and ``where``), summed
        per ``le`` — PromQL's ``sum by (le) (…)``."""
        by_le: dict[float, float] = {}
        for lab, v in self.series(name + "_bucket", where, **labels):
            le = _value(lab["le"])
            by_le[le] = by_le.get(le, 0.0) + v
        if not by_le:
            return None
        return Histogram(tuple(sorted(by_le.items())), self.sum(name + "_sum", where, **labels),
                         self.sum(name + "_count", where, **labels))

    def quantile_ms(self, name: str, q: float, where=None, **labels) -> float | None:
        h = self.histogram(name, where, **labels)
        v = h.quantile(q) if h is not None and h.count > 0 else None
        return None if v is None else v * 1000.0

    def phase_quantiles(self, qs=(0.5, 0.95)) -> dict[str, dict]:
        """``{phase: {"count": n, "p50_ms": …, "p95_ms": …, "mean_ms": …}}`` for the
        gateway's auth / routing / transport histograms (None where not observed)."""
        out = {}
        for phase in PHASES:
            name = f"gateway_{phase}_duration_seconds"
            h = self.histogram(name)
            row: dict[str, Any] = {"count": int(h.count) if h else 0}
            for q in qs:
                row[f"p{round(q * 100)}_ms"] = self.quantile_ms(name, q)
            row["mean_ms"] = (h.sum / h.count * 1000.0) if h and h.count else None
            out[phase] = row
        return out

    def observation(self, q: float, where=None, **labels) -> GatewayPerformanceObservation:
        """The q-quantile request: total from ``gateway_request_duration_seconds``
        (restricted by ``labels``/``where``, e.g. ``service="bench"``), each phase from its
        own histogram (the phases carry no labels)."""
        ph = {p: self.quantile_ms(f"gateway_{p}_duration_seconds", q) for p in PHASES}
        return GatewayPerformanceObservation(
            total_ms=self.quantile_ms("gateway_request_duration_seconds", q, where, **labels),
            auth_ms=ph["auth"], routing_ms=ph["routing"], transport_ms=ph["transport"],
            service=labels.get("service"), quantile=q)

    def mean_observation(self, where=None, **labels) -> GatewayPerformanceObservation:
        """Means (histogram sum / count) instead of quantiles: exact even where the buckets
        are coarse (a phase that always lands in the first bucket has no useful quantile)."""
        def mean(name, w=None, **lab):
            h = self.histogram(name, w, **lab)
            return h.sum / h.count * 1000.0 if h is not None and h.count > 0 else None
        return GatewayPerformanceObservation(
            total_ms=mean("gateway_request_duration_seconds", where, **labels),
            auth_ms=mean("gateway_auth_duration_seconds"),
            routing_ms=mean("gateway_routing_duration_seconds"),
            transport_ms=mean("gateway_transport_duration_seconds"),
            service=labels.get("service"), quantile=None)

    def requests_by_status(self, exclude_paths=("/metrics",)) -> dict[str, int]:
        out: dict[str, int] = {}
        for lab, v in self.series("gateway_requests_total"):
            if lab.get("path") in exclude_paths:
                continue
            out[lab.get("status", "?")] = out.get(lab.get("status", "?"), 0) + int(v)
        return {k: v for k, v in sorted(out.items()) if v}

    def summary(self) -> dict:
        """The figures a run report shows, from a delta (see ``__sub__``)."""
        by_status = self.requests_by_status()
        total = sum(by_status.values())
        five = sum(v for k, v in by_status.items() if k.startswith("5"))
        return {
            "requests": total,
            "by_status": by_status,
            "error_rate_5xx": (five / total) if total else 0.0,
            "rate_limited": int(self.sum("gateway_ratelimit_total")),
            "auth_failures": {lab.get("reason", "?"): int(v)
                              for lab, v in self.series("gateway_auth_failures_total") if v},
            "frames": {lab.get("type", "?"): int(v)
                       for lab, v in self.series("gateway_transport_frames_total") if v},
            "active_connections": {lab.get("service", "?"): int(v)
                                   for lab, v in self.series("gateway_active_connections")},
            "phases": self.phase_quantiles(),
            "request_p50_ms": self.quantile_ms("gateway_request_duration_seconds", 0.5),
            "request_p95_ms": self.quantile_ms("gateway_request_duration_seconds", 0.95),
            "request_p99_ms": self.quantile_ms("gateway_request_duration_seconds", 0.99),
            "resident_memory_bytes": (self.sum("process_resident_memory_bytes")
                                      if self.has("process_resident_memory_bytes") else None),
        }


# --------------------------------------------------------------------------- run summary

@dataclass
class PerformanceTestSummary:
    """One scenario's run: configuration, threshold verdicts, curve and gateway breakdown.

    ``status`` is ``passed`` / ``failed`` (thresholds violated) / ``skipped`` (the stack
    cannot host it, with ``notes`` saying why) / ``error`` (the run itself broke).
    ``machine`` is how busy the machine was (machine.py's ``MachineWatch.verdict``): when
    it says ``reliable: false`` the figures are indicative only, whatever the status.
    ``overhead`` is :func:`request_overhead` of the scenario's requests.
    """
    scenario: PerformanceScenarioConfig
    short: bool
    started_at: float
    finished_at: float
    status: str = "passed"
    thresholds: list[ThresholdResult] = field(default_factory=list)
    curve: list[PerformanceCurvePoint] = field(default_factory=list)
    observations: list[GatewayPerformanceObservation] = field(default_factory=list)
    gateway: dict = field(default_factory=dict)       # GatewayPerformanceMetrics.summary()
    k6: dict = field(default_factory=dict)            # totals from the k6 summary
    environment: dict = field(default_factory=dict)   # versions, auth mode, CPUs, ports
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    overhead: dict = field(default_factory=dict)

    @property
    def reliable(self) -> bool | None:
        """None when the machine was not watched (the run broke before k6 started)."""
        return self.machine.get("reliable") if self.machine else None

    @property
    def violations(self) -> list[ThresholdResult]:
        return [r for r in self.thresholds if not r.ok]

    @property
    def passed(self) -> bool:
        return self.status == "passed" and not self.violations

    def finalize(self) -> "PerformanceTestSummary":
        """Set ``status`` from the verdicts (skipped / error stay as they are)."""
        if self.status in ("passed", "failed"):
            self.status = "failed" if self.violations or not self.thresholds else "passed"
        return self

    @property
    def total_requests(self) -> int:
        return sum(p.requests for p in self.curve)

    def totals(self) -> dict:
        reqs = self.total_requests
        failed = sum(p.failed for p in self.curve)
        dropped = sum(p.dropped for p in self.curve)
        span = sum(p.window_seconds for p in self.curve)
        return {"requests": reqs, "failed": failed, "dropped": dropped,
                "achieved_rps": (reqs / span) if span else 0.0,
                "error_rate": (failed / reqs) if reqs else 0.0}

    def to_dict(self) -> dict:
        return {
            "scenario": self.scenario.name, "key": self.scenario.key,
            "title": self.scenario.title, "short": self.short, "status": self.status,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "config": self.scenario.to_dict(),
            "thresholds": [r.to_dict() for r in self.thresholds],
            "violations": [r.to_dict() for r in self.violations],
            "totals": self.totals(),
            "curve": [p.to_dict() for p in self.curve],
            "observations": [o.to_dict() for o in self.observations],
            "gateway": self.gateway, "k6": self.k6, "environment": self.environment,
            "notes": list(self.notes), "reliable": self.reliable, "machine": self.machine,
            "overhead": self.overhead,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_markdown(self) -> str:
        s = self.scenario
        mode = "short" if self.short else "full"
        rate = s.rate_for(self.short)
        flag = " — **UNRELIABLE**: indicative figures" if self.reliable is False else ""
        lines = [f"### {s.key} — {s.title} (`{s.name}`, {mode}): **{self.status.upper()}**{flag}", "",
                 f"{s.purpose}. {s.executor}, {s.vus_for(self.short)} VUs, "
                 f"{s.duration(self.short)} s" + (f", {rate} req/s offered" if rate else "")
                 + f"; key metric: {s.key_metric}.", ""]
        lines += _machine_markdown(self.machine)
        for note in self.notes:
            lines.append(f"- {note}")
        if self.notes:
            lines.append("")
        if self.thresholds:
            lines += ["| threshold | source | observed | result |", "|---|---|---|---|"]
            for r in self.thresholds:
                obs = "—" if r.observed is None else _fmt(r.observed)
                t = r.threshold
                scaled = f" (table: `{t.table_expression}`)" if t.table_expression else ""
                lines.append(f"| `{t.metric} {t.expression}`{scaled} | "
                             f"{t.source} | {obs} | {'ok' if r.ok else '**VIOLATED**'}"
                             + (f" ({r.note})" if r.note else "") + " |")
            lines.append("")
        if self.curve:
            lines += ["| t (s) | VUs | offered rps | achieved rps | p50 ms | p95 ms | p99 ms | errors "
                      "| gw CPU % | load CPU % | other CPU % | steal % |",
                      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            t0 = self.curve[0].window_start
            for p in self.curve:
                lines.append(f"| {p.window_start - t0:.0f} | {p.vus} | {p.offered_rps:.0f} | "
                             f"{p.achieved_rps:.0f} | {_fmt(p.p50_ms)} | {_fmt(p.p95_ms)} | "
                             f"{_fmt(p.p99_ms)} | {p.error_rate * 100:.2f} % | "
                             f"{_pct(p.gateway_cpu_pct)} | {_pct(p.load_cpu_pct)} | "
                             f"{_pct(p.other_cpu_pct)} | {_pct(p.steal_pct)} |")
            tot = self.totals()
            lines += ["", f"Total {tot['requests']} requests, {tot['achieved_rps']:.0f} req/s, "
                      f"{tot['error_rate'] * 100:.3f} % failed, {tot['dropped']} dropped arrivals.", ""]
        lines += _overhead_markdown(self.overhead)
        if self.observations:
            lines += ["Gateway's own view (/metrics after − before; each column is the quantile of "
                      "its own histogram, so a row's columns are not one request and do not add up):", "",
                      "| quantile | request ms | auth ms | routing ms | transport ms |",
                      "|---|---:|---:|---:|---:|"]
            for o in self.observations:
                label = "mean" if o.quantile is None else f"p{round(o.quantile * 100)}"
                lines.append(f"| {label} | {_fmt(o.total_ms)} | "
                             f"{_fmt(o.auth_ms)} | {_fmt(o.routing_ms)} | {_fmt(o.transport_ms)} |")
            g = self.gateway
            if g:
                lines += ["", f"Gateway counted {g.get('requests', 0)} requests {g.get('by_status', {})}, "
                          f"{g.get('rate_limited', 0)} rate-limited, auth failures "
                          f"{g.get('auth_failures') or 'none'}."]
            lines.append("")
        return "\n".join(lines)


def _machine_markdown(m: dict) -> list[str]:
    if not m:
        return []
    verdict = ("quiet" if m.get("reliable") else
               "**not quiet — unreliable**: " + "; ".join(m.get("reasons") or []))
    lines = [f"Machine during the run ({m.get('seconds', 0)} s watched): {verdict}. Gateway "
             f"{_pct(m.get('gateway_cpu_pct'))} % of a CPU, load side (k6, services, runner; "
             f"{m.get('load_cpus', '?')} CPU(s)) {_pct(m.get('load_cpu_pct'))} % of a CPU, other "
             f"processes {_pct(m.get('other_cpu_pct'))} % of a CPU (peak second "
             f"{_pct(m.get('other_cpu_peak_pct'))} %), steal {_pct(m.get('steal_pct'))} %."]
    top = m.get("top_other_processes") or []
    if top:
        lines.append("Other processes' CPU over the run: " + ", ".join(
            f"{p['name']} (pid {p['pid']}) {p['cpu_pct']:.0f} %" for p in top) + ".")
    lines += [f"- {note}" for note in m.get("notes") or []]
    return lines + [""]


def _overhead_markdown(o: dict) -> list[str]:
    if not o:
        return []
    if not o.get("requests"):
        return [f"Overhead per request: not measured ({o.get('why', 'no access log lines')}).", ""]
    lines = [f"Overhead per request (the gateway's access log, {o['requests']} requests; "
             f"{o['matched']} matched to k6's samples by correlation id): each request's own "
             "difference, then its percentiles.", "",
             "| per request | count | p50 ms | p95 ms | p99 ms | max ms | mean ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, label in OVERHEAD_ROWS.items():
        d = o["rows"].get(key) or {}
        if d.get("count"):
            lines.append(f"| {label} | {d['count']} | {_fmt(d['p50_ms'])} | {_fmt(d['p95_ms'])} | "
                         f"{_fmt(d['p99_ms'])} | {_fmt(d['max_ms'])} | {_fmt(d['mean_ms'])} |")
    return lines + [""]


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0f}"


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.1 or v == 0:
        return f"{v:.2f}"
    return f"{v:.3f}"   # the gateway's own time is tens of µs
