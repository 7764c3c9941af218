"""Metrics aggregated in plain dicts and exported on scrape (docs/requirements.md §10, §14).

prometheus-client costs several microseconds per `labels().inc()`; at 50k requests/s that
is a quarter of the budget. So the hot path bumps counters in dicts keyed by label tuples,
and a custom collector turns them into metric families only when /metrics is scraped.

With several workers, /metrics must describe the whole instance whichever worker answers
the scrape: every worker writes a snapshot of its counters into the supervisor's run
directory once a second, and the answering worker sums every worker's snapshot.

The instance's counters must never go backwards (Prometheus reads a decrease as a reset and
counts the whole value again). Two rules keep them monotonic:

- A scrape shows only *published* counts. The answering worker publishes its own snapshot
  first and renders that same snapshot: had it used its live counts while a peer used its
  second-old file, a scrape answered by the peer right after would show less (the issue
  saw 26 decreases in 30 s of 5 Hz scrapes). A worker's published files only grow, and a
  scrape reads each file after every earlier scrape did, so each worker's share never
  shrinks. Snapshots are summed in worker-id order, whoever answers: float sums then round
  the same way in every worker.
- A restarted worker starts from the snapshot its predecessor left — its own counters and
  those of `sources` (rate limiter, authentication events) — so what a dead worker had
  published stays in the sum. What it counted after its last publish is lost, but no scrape
  ever showed it.
"""
from __future__ import annotations

import os

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .. import _impl
from ..files import replace_atomically

# Histogram is compiled (cext/metrics.pyx) when built, else the pure-Python twin
# (stellagw/_py/metrics.py): observe() runs four times per routed request. The bucket bounds
# and the reasons for them live with the implementations.
if _impl.NO_EXTENSIONS:
    from .._py import metrics as _m
else:
    try:
        from .._cext import metrics as _m
    except ImportError as exc:
        _impl.fell_back("metrics", exc)
        from .._py import metrics as _m
Histogram = _m.Histogram
DURATION_BUCKETS = _m.DURATION_BUCKETS
# time.perf_counter, read by the request path as a C call when compiled (the glue cimports
# it: stellagw/_cext/metrics.pxd).
perf_counter = _m.perf_counter
PHASES = ("auth", "routing", "transport", "ratelimit_check")

# gateway_rate_limit_exceeded_total is labelled by tenant, and tenants come from tokens: an
# Authority that issues very many (or puts a caller's input in `tid`) grew this worker's
# dict, its snapshot (written every second) and every scrape without end (12,000 tenants:
# a 1.2 MB scrape). Past this many tenants a worker counts the new ones under one label.
MAX_TENANT_LABELS = 1000
OTHER_TENANTS = "_other"

# gateway_requests_total and gateway_request_duration_seconds are labelled by service,
# method, route template (and status): the services choose the templates (4,096 an
# instance, new ones at every ENDPOINTS_UPDATE or HELLO) and the statuses (200-599), and a
# label set, once counted, stays for the worker's life. A service and its clients made
# 192,000 label sets in 20 s (100 MB, a 7 MB snapshot taking 0.2 s of the loop every
# second), without end. Past these many label sets a worker counts the new ones under
# OTHER_ROUTE (status kept): ~400 bytes a count and ~600 a histogram, 26 MB at most.
MAX_REQUEST_LABELS = 50_000
MAX_DURATION_LABELS = 10_000
OTHER_ROUTE = ("_other", "_other", "_other")


def request_key(requests: dict, key: tuple) -> tuple:
    """The key `key` (service, method, route, status) is counted under in `requests`:
    itself, or OTHER_ROUTE with its status once MAX_REQUEST_LABELS are taken. Claimed at
    once (a count of 0 until the caller's is folded in), so the bound holds whatever
    waits to be folded."""
    if key not in requests:
        if len(requests) >= MAX_REQUEST_LABELS:
            key = (*OTHER_ROUTE, key[3])
        requests.setdefault(key, 0)
    return key


def duration_key(durations: dict, key: tuple) -> tuple:
    """The (service, method, route) histogram key `key` is observed under."""
    if key not in durations and len(durations) >= MAX_DURATION_LABELS:
        return OTHER_ROUTE
    return key



class Metrics:
    """One worker's metrics. Everything the request path touches is a dict or an int."""

    def __init__(self, run_dir: str | None = None, worker_id: int = 0,
                 frame_names: dict[int, str] | None = None):
        """`frame_names`: frame type -> the name gateway_transport_frames_total shows
        (the gateway passes transport.frame.FRAME_TYPE_NAMES); a type without one shows
        its number."""
        self.frame_names = frame_names or {}
        self.requests: dict[tuple, int] = {}          # (service, method, path, status) -> count
        self.durations: dict[tuple, Histogram] = {}   # (service, method, path) -> histogram
        self.active_connections: dict[str, int] = {}  # service ("ingress" for clients) -> open
        self.frames: dict[int, int] = {}              # frame type -> count (both directions)
        self.phases: dict[str, Histogram] = {}        # "auth" | "routing" | "transport"
        self.auth_failures: dict[str, int] = {}       # reason -> count
        self.rate_limited: dict[str, int] = {}        # tenant -> count
        self.gauges: dict[str, float] = {}            # name -> value (endpoints, instances ...)
        # Counters kept by other parts (rate limiter, auth events): callables returning
        # {family name: (help, label names, [(label values, value), ...])}, summed over
        # workers like everything else. A name ending in "_gauge" is exported as a gauge
        # under the name without that suffix (still summed: e.g. workers with an open breaker).
        self.sources: list = []
        # Callables that fold counts kept elsewhere (in C on the request path) into these
        # dicts: each runs before a snapshot, so what is published and scraped includes them.
        self.folds: list = []
        self._run_dir = run_dir
        self._worker_id = worker_id
        # What a predecessor's sources had counted: the sources themselves restart from zero.
        self._extra_base: dict = {}
        # The last snapshot read from each peer's file, for a read that fails (the file is
        # replaced atomically, but an I/O error must not take a worker out of the sum).
        self._peers: dict[str, dict] = {}
        self._published: dict | None = None   # this worker's last snapshot the others can see
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if run_dir:
            self._resume()

    # ------------------------------------------------------------------ the hot path

    def request_done(self, service: str, method: str, path: str, status: int,
                     seconds: float) -> None:
        requests = self.requests
        key = request_key(requests, (service, method, path, status))
        requests[key] += 1
        hkey = duration_key(self.durations, (service, method, path))
        hist = self.durations.get(hkey)
        if hist is None:
            hist = self.durations[hkey] = Histogram()
        hist.observe(seconds)

    def phase_histogram(self, name: str) -> Histogram:
        """The histogram of one phase, for callers that observe it on the hot path directly."""
        hist = self.phases.get(name)
        if hist is None:
            hist = self.phases[name] = Histogram()
        return hist

    def phase(self, name: str, seconds: float) -> None:
        hist = self.phases.get(name)
        if hist is None:
            hist = self.phases[name] = Histogram()
        hist.observe(seconds)

    def connection_opened(self, service: str = "ingress") -> None:
        self.active_connections[service] = self.active_connections.get(service, 0) + 1

    def connection_closed(self, service: str = "ingress") -> None:
        self.active_connections[service] = self.active_connections.get(service, 0) - 1

    def auth_failed(self, reason: str) -> None:
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def rate_limit_exceeded(self, tenant: str | None) -> None:
        key = tenant or "anonymous"
        counts = self.rate_limited
        if key not in counts and len(counts) >= MAX_TENANT_LABELS:
            key = OTHER_TENANTS
        counts[key] = counts.get(key, 0) + 1

    # ------------------------------------------------------------------ several workers

    def snapshot(self) -> dict:
        for fold in self.folds:
            fold()
        return {
            "requests": [[*k, v] for k, v in self.requests.items()],
            "durations": [[*k, h.counts, h.total, h.n] for k, h in self.durations.items()],
            "connections": list(self.active_connections.items()),
            "frames": list(self.frames.items()),
            "phases": [[k, h.counts, h.total, h.n] for k, h in self.phases.items()],
            "auth_failures": list(self.auth_failures.items()),
            "rate_limited": list(self.rate_limited.items()),
            "extra": self._extra(),
            "rss": _rss_bytes(),
        }

    def carry(self, families: dict) -> None:
        """Counts of a source's object that was replaced (a configuration reload rebuilt the
        rate limiter), in the sources' shape: kept in what this worker exports from now on,
        as a predecessor's are, so no counter goes back. Gauges are not carried."""
        for name, (help_text, labels, samples) in families.items():
            if name.endswith("_gauge"):
                continue
            base = self._extra_base.setdefault(name, [help_text, list(labels), {}])[2]
            for lv, v in samples:
                if v:
                    lv = tuple(lv)
                    base[lv] = base.get(lv, 0) + v

    def _extra(self) -> dict:
        out = {}
        for source in self.sources:
            for name, (help_text, labels, samples) in source().items():
                out[name] = [help_text, list(labels), [[*lv, v] for lv, v in samples]]
        for name, (help_text, labels, base) in self._extra_base.items():
            entry = out.setdefault(name, [help_text, labels, []])
            live = {tuple(lv): i for i, (*lv, _v) in enumerate(entry[2])}
            for lv, v in base.items():
                i = live.get(lv)
                if i is None:
                    entry[2].append([*lv, v])
                else:
                    entry[2][i][-1] += v
        return out

    def publish(self, snap: dict | None = None) -> None:
        """Write this worker's snapshot for the others (once a second, and before this
        worker answers a scrape)."""
        if not self._run_dir:
            return
        if snap is None:
            snap = self.snapshot()
        try:
            replace_atomically(os.path.join(self._run_dir, f"worker-{self._worker_id}.json"),
                               orjson.dumps(snap))
        except OSError:
            # The run directory full, or gone with a supervisor that failed (it removes it
            # as it stops the workers): the others miss this snapshot, nothing more. Raised,
            # it failed every tick and the drain itself, whose worker then never exited.
            return
        self._published = snap

    def _instance_snapshots(self) -> list[dict]:
        """Every worker's published snapshot, this one's fresh, in worker-id order."""
        own = self.snapshot()
        if not self._run_dir:
            return [own]
        try:
            self.publish(own)
        except OSError:
            # The run directory is unusable (disk full ...): show what the others still
            # read in this worker's file, or a peer's scrape after this one would show less.
            own = self._published or own
        found = {self._worker_id: own}
        own_name = f"worker-{self._worker_id}.json"
        try:
            names = os.listdir(self._run_dir)
        except OSError:
            names = list(self._peers)
        for name in names:
            if name == SUPERVISOR_FILE:
                wid = -1
            elif not (name.startswith("worker-") and name.endswith(".json")) or name == own_name:
                continue
            else:
                try:
                    wid = int(name[len("worker-"):-len(".json")])
                except ValueError:
                    continue
            try:
                with open(os.path.join(self._run_dir, name), "rb") as f:
                    snap = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                snap = self._peers.get(name)
                if snap is None:
                    continue
            self._peers[name] = snap
            found[wid] = snap
        return [found[wid] for wid in sorted(found)]

    def _resume(self) -> None:
        path = os.path.join(self._run_dir, f"worker-{self._worker_id}.json")
        try:
            with open(path, "rb") as f:
                snap = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            return
        view = _View()
        view.add(snap, counters_only=True)
        # Bound here, in __init__, and never again: the hot path keeps these dicts
        # (Accounting's cells, the hub's frame counts, the pipeline's phase histograms).
        self.requests, self.durations, self.frames = view.requests, view.durations, view.frames
        self.phases, self.auth_failures, self.rate_limited = view.phases, view.auth_failures, view.rate_limited
        self._extra_base = {name: entry for name, entry in view.extra.items()
                            if not name.endswith("_gauge")}

    def render(self) -> bytes:
        return generate_latest(self.registry)


# The supervisor's counters (worker restarts): it answers no scrape, so it leaves them in the
# run directory, in a snapshot's shape, and every worker's scrape adds them to its sum.
SUPERVISOR_FILE = "supervisor.json"


def publish_supervisor(run_dir: str, families: dict) -> None:
    """`families` as a source returns them: {name: (help, label names, [(values, n), ...])}.
    The counts only grow, and the file is replaced whole: no scrape sees them go back."""
    replace_atomically(os.path.join(run_dir, SUPERVISOR_FILE), orjson.dumps({"extra": {
        name: [help_text, list(labels), [[*lv, v] for lv, v in samples]]
        for name, (help_text, labels, samples) in families.items()}}))


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _View:
    """The sum of several workers' snapshots."""

    def __init__(self):
        self.requests, self.durations, self.connections = {}, {}, {}
        self.frames, self.phases, self.auth_failures, self.rate_limited = {}, {}, {}, {}
        self.extra: dict = {}   # name -> [help, labels, {label values: value}]
        self.rss = 0

    def add(self, snap: dict, counters_only: bool = False) -> None:
        for *k, v in snap.get("requests", ()):
            k = tuple(k)
            self.requests[k] = self.requests.get(k, 0) + v
        for *k, counts, total, _n in snap.get("durations", ()):
            self.durations.setdefault(tuple(k), Histogram()).add(counts, total)
        for k, counts, total, _n in snap.get("phases", ()):
            self.phases.setdefault(k, Histogram()).add(counts, total)
        for target, key in ((self.frames, "frames"), (self.auth_failures, "auth_failures"),
                            (self.rate_limited, "rate_limited")):
            for k, v in snap.get(key, ()):
                target[k] = target.get(k, 0) + v
        for name, (help_text, labels, samples) in snap.get("extra", {}).items():
            entry = self.extra.setdefault(name, [help_text, labels, {}])
            for *lv, v in samples:
                lv = tuple(lv)
                entry[2][lv] = entry[2].get(lv, 0) + v
        if not counters_only:
            self.rss += snap.get("rss", 0)
            for k, v in snap.get("connections", ()):
                self.connections[k] = self.connections.get(k, 0) + v


class _Collector:
    def __init__(self, metrics: Metrics):
        self._m = metrics

    def collect(self):
        view = _View()
        for snap in self._m._instance_snapshots():
            view.add(snap)

        total = CounterMetricFamily(
            "gateway_requests", "HTTP requests answered by the gateway",
            labels=("service", "method", "path", "status"))
        errors = CounterMetricFamily(
            "gateway_errors", "Requests answered with a 4xx or 5xx status",
            labels=("service", "status"))
        limited = CounterMetricFamily("gateway_ratelimit", "Requests answered 429",
                                      labels=("service",))
        err_sums: dict = {}
        rl_sums: dict = {}
        for (service, method, path, status), count in view.requests.items():
            total.add_metric((service, method, path, str(status)), count)
            if status >= 400:
                err_sums[(service, str(status))] = err_sums.get((service, str(status)), 0) + count
            if status == 429:
                rl_sums[service] = rl_sums.get(service, 0) + count
        for labels, count in err_sums.items():
            errors.add_metric(labels, count)
        for service, count in rl_sums.items():
            limited.add_metric((service,), count)
        yield total
        yield errors
        yield limited

        hist = HistogramMetricFamily(
            "gateway_request_duration_seconds",
            "Time from the request's last byte to its response, by route template",
            labels=("service", "method", "path"))
        for (service, method, path), h in view.durations.items():
            hist.add_metric((service, method, path), h.buckets(), h.total)
        yield hist

        for name in PHASES:
            fam = HistogramMetricFamily(f"gateway_{name}_duration_seconds",
                                        f"Time spent in the {name} phase of a request")
            h = view.phases.get(name)
            if h is not None:
                fam.add_metric((), h.buckets(), h.total)
            yield fam

        conns = GaugeMetricFamily(
            "gateway_active_connections",
            "Open connections: 'ingress' for HTTP clients, else the service's name",
            labels=("service",))
        for service, count in view.connections.items():
            conns.add_metric((service,), count)
        yield conns

        frames = CounterMetricFamily("gateway_transport_frames",
                                     "Frames on service connections, by type", labels=("type",))
        for ftype, count in view.frames.items():
            frames.add_metric((self._m.frame_names.get(int(ftype)) or str(ftype),), count)
        yield frames

        auth = CounterMetricFamily("gateway_auth_failures", "Requests refused by authentication",
                                   labels=("reason",))
        for reason, count in view.auth_failures.items():
            auth.add_metric((reason,), count)
        yield auth

        rl = CounterMetricFamily("gateway_rate_limit_exceeded",
                                 "Requests refused by rate limiting", labels=("tenant",))
        for tenant, count in view.rate_limited.items():
            rl.add_metric((tenant,), count)
        yield rl

        yield GaugeMetricFamily("process_resident_memory_bytes",
                                "Resident memory of the gateway's workers, summed", value=view.rss)

        for name, (help_text, labels, samples) in sorted(view.extra.items()):
            if name.endswith("_gauge"):
                fam = GaugeMetricFamily(name[:-len("_gauge")], help_text, labels=labels)
            else:
                fam = CounterMetricFamily(name, help_text, labels=labels)
            for lv, v in samples.items():
                fam.add_metric(lv, v)
            yield fam
