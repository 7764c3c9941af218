"""``python -m perf compare``: run every target in turn on the same machine, with the same
load generator (wrk) and the same pinning, and print one table::

    python -m perf compare --targets raw,nginx,gateway-health --duration 10

perf/README.md says what each column means and what the targets start.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from .. import _procs, commands
from .measuring import WARMUP_S, Settings, decide_pinning, measure
from ..provenance import machine_info
from .report import against_nginx, median_round, rate_limit_summary, report
from .targets import ALL_TARGETS, TARGETS


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog=commands.prog(__name__),
        description="Benchmark the gateway against raw uvloop+httptools and nginx, side by side (loopback only).",
        epilog="Example: python -m perf compare --targets raw,nginx --duration 5 --json out.json",
    )
    ap.add_argument("--targets", default="raw,nginx",
                    help=f"comma list from {','.join(ALL_TARGETS)}; the first is the × baseline (default raw,nginx)")
    ap.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run (default 10)")
    ap.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    ap.add_argument("--server-cpu", type=int, default=0, help="CPU the measured server is pinned to (default 0)")
    ap.add_argument("--load-cpu", type=int, default=1, help="CPU for wrk and backends (default 1)")
    ap.add_argument("--backend-cpu", type=int, default=None,
                    help="pin the backend (demo service / nginx's hello backend) to this CPU of its "
                         "own instead of the load CPU; needs 3+ usable CPUs (default: load CPU)")
    ap.add_argument("--no-pin", action="store_true", help="do not use taskset")
    ap.add_argument("--latency-connections", type=int, default=1,
                    help="connections of the extra latency pass; 0 skips it (default 1)")
    ap.add_argument("--latency-duration", type=int, default=None,
                    help="seconds of the latency pass (default: --duration)")
    ap.add_argument("--start-timeout", type=float, default=30.0,
                    help="seconds to wait for a target to answer 200 (default 30)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure (and wrk's raw output) to PATH")
    ap.add_argument("--worker-cpu-quota", type=float, default=None, metavar="FRACTION",
                    help="hold each gateway worker to FRACTION of one CPU (a cgroup CFS quota; "
                         "root), all workers on --server-cpu: shows how the instance scales "
                         "with workers on a machine with too few CPUs to give each its own")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole target list N times, interleaved; the table shows each "
                         "target's median round (by CPU-µs/req) and the rate-limit differences are "
                         "paired per round (default 1)")
    args = ap.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in args.targets if t not in ALL_TARGETS]
    if bad or not args.targets:
        ap.error(f"unknown target(s) {bad}; choose from {', '.join(ALL_TARGETS)}")
    if args.duration < 1 or args.connections < 1 or args.threads < 1 or args.rounds < 1:
        ap.error("--duration, --connections, --threads and --rounds must be >= 1")
    if args.latency_duration is None:
        args.latency_duration = args.duration
    if args.worker_cpu_quota is not None and not 0.05 <= args.worker_cpu_quota <= 1.0:
        ap.error("--worker-cpu-quota must be between 0.05 and 1 (a fraction of one CPU)")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = commands.command_line(__name__, argv)
    if not shutil.which("wrk"):
        print("wrk not found: run `sh perf/install-tools.sh`", file=sys.stderr)
        return 2
    pin = decide_pinning(args.server_cpu, args.load_cpu, args.no_pin, args.backend_cpu)
    s = Settings(args.duration, args.connections, args.threads, args.latency_connections,
                 args.latency_duration, args.start_timeout, pin, sys.executable,
                 args.worker_cpu_quota)
    _procs.stop_on_sigterm()
    info = machine_info()
    print(f"pinning: {pin.note}", file=sys.stderr)

    rounds: list[list[dict]] = []
    for rnd in range(args.rounds):
        this_round: list[dict] = []
        for name in args.targets:
            tag = f"[{name}]" if args.rounds == 1 else f"[round {rnd + 1}/{args.rounds}] [{name}]"
            print(f"{tag} running ...", file=sys.stderr, flush=True)
            r = measure(name, TARGETS[name], s)
            r["round"] = rnd + 1
            this_round.append(r)
            if r["ok"]:
                print(f"{tag} {r['req_per_s']:,.0f} req/s, {r['cpu_us_per_req']:.1f} CPU-µs/req",
                      file=sys.stderr, flush=True)
            else:
                print(f"{tag} {'unavailable' if r.get('unavailable') else 'FAILED'}: "
                      f"{r['error'].splitlines()[0]}", file=sys.stderr, flush=True)
        rounds.append(this_round)
    results = [median_round(name, [rd[i] for rd in rounds]) for i, name in enumerate(args.targets)]
    rl = rate_limit_summary(rounds, args.targets)

    print(report(results, s, info, command, rl, args.rounds))
    if args.json:
        doc = {
            "command": command,
            "machine": info,
            "settings": {
                "duration_s": s.duration, "connections": s.connections, "threads": s.threads,
                "latency_connections": s.latency_connections, "latency_duration_s": s.latency_duration,
                "warmup_s": WARMUP_S, "pinning": pin.__dict__,
            },
            "baseline": next((r["target"] for r in results if r["ok"]), None),
            "rounds": args.rounds,
            "results": results,
            "rate_limit": rl,
            "against_nginx": against_nginx(results),
            "all_rounds": rounds if args.rounds > 1 else None,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"json: {args.json}")
    return 0 if all(r["ok"] for rd in rounds for r in rd) else 1
