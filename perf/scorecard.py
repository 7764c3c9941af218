"""The scorecard of issue 8's targets: every performance target of the gateway, measured
beside its baseline, in one command (short mode by default, ~4 minutes on the 2-CPU VM)::

    python -m perf scorecard                          # all six, short
    python -m perf scorecard --only latency,auth      # some of them
    python -m perf scorecard --full                   # longer runs (~12 minutes)

Parts (``--only`` names), each printed with the exact command that reproduces it alone:

1. ``cpu``          CPU per routed request (no auth, 64 keep-alive clients, a small body)
                    vs nginx per proxied request and raw uvloop+httptools:
                    ``python -m perf compare --targets raw,gateway-routed,nginx``.
2. ``workers``      2 workers vs 1, req/s ratio, twice: each worker held to 0.4 of the
                    server CPU by a cgroup quota (``python -m perf compare --targets
                    gateway-routed,gateway-routed-2w --worker-cpu-quota 0.4``: twice the CPU
                    in workers, wrk + service on the load CPU), and unpinned (``--no-pin``:
                    2 CPUs cannot give 2 workers, the service and wrk CPUs of their own).
3. ``latency``      latency overhead at 50 % of the gateway's measured maximum rate
                    (open loop: ``python -m perf loadgen open``, its loop in perf/openloop.pyx,
                    since wrk2 is not in Debian): gateway p50/p99 minus the raw server's
                    at the same rate with the same generator (polling, yielding its CPU
                    between polls), in two layouts (the service beside the generator; the
                    service beside the gateway), 3 rounds each, and the 1-connection p50
                    (wrk -c1).
4. ``connections``  10,000 keep-alive clients + 100 service connections, light load, RSS
                    of the gateway instance: ``python -m perf connections``.
5. ``auth``         DPoP-authenticated vs unauthenticated routed requests, CPU-µs/req of the
                    gateway each, same gateway, same load generator (``python -m perf
                    loadgen closed``, one pre-minted proof per request), plus one ES256
                    verification timed in-process (the gateway's own
                    ``stellagw.auth.jose.verify_signature``): everything but the signature =
                    authenticated − unauthenticated − verification.
6. ``callgrind``    user-space instructions per routed request under callgrind, beside the
                    raw server's: ``python -m perf callgrind`` (appends to
                    ``perf/callgrind_history.csv``; ``--no-history`` here skips that).

Ends with one table: target | figure | baseline | command. Loopback only; every run is
bounded in time; every process started is stopped (perf/_procs.py's process handling).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _procs, commands
from .compare import measuring
from .compare.targets import start_gateway_routed, start_raw
from ._procs import HOST, PERF_DIR, REPO_DIR

PY = sys.executable
PARTS = ("cpu", "workers", "latency", "connections", "auth", "callgrind")


def log(msg: str) -> None:
    print(f"[scorecard] {msg}", file=sys.stderr, flush=True)


def rel(cmd: list[str]) -> str:
    """A command as the user types it from the repository root."""
    return shlex.join("python" if c == PY else c for c in cmd)


def run_tool(cmd: list[str], timeout: float, json_path: Path) -> tuple[dict | None, str]:
    """Run one of the perf tools, its stdout shown as it comes; returns its --json."""
    log("$ " + rel(cmd))
    try:
        p = subprocess.run(cmd, cwd=REPO_DIR, timeout=timeout, stdout=subprocess.PIPE,
                           stderr=None, text=True, start_new_session=False)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    print(p.stdout.rstrip(), flush=True)
    try:
        return json.loads(json_path.read_text()), ""
    except (OSError, ValueError) as exc:
        return None, f"exit {p.returncode}, no JSON ({exc})"


# ---------------------------------------------------------------------------------------
# 1, 2: compare


def part_cpu(args, tmp: Path) -> list[dict]:
    out = tmp / "cpu.json"
    cmd = commands.argv("compare", "--targets", "raw,gateway-routed,nginx",
                        "--duration", str(args.duration),
                        "--latency-duration", str(max(2, args.duration // 2)), "--json", str(out))
    doc, err = run_tool(cmd, 600, out)
    command = rel(cmd[:-2])
    if doc is None:
        return [{"target": "1 CPU/routed request", "figure": f"FAILED: {err}", "baseline": "-",
                 "command": command}]
    r = {x["target"]: x for x in doc["results"]}
    gw, ngx, raw = r.get("gateway-routed", {}), r.get("nginx", {}), r.get("raw", {})
    if not gw.get("ok"):
        fig = f"FAILED: {gw.get('error', '?').splitlines()[0]}"
    else:
        fig = (f"{gw['cpu_us_per_req']:.1f} CPU-µs/req (srv CPU {100 * gw['server_cpu_util']:.0f}%, "
               f"{gw['req_per_s']:,.0f} req/s, other {100 * gw.get('other_cpu_util', 0):.0f}%)")
    base = []
    if ngx.get("ok"):
        ratio = f" → {gw['cpu_us_per_req'] / ngx['cpu_us_per_req']:.2f}× nginx" if gw.get("ok") else ""
        base.append(f"nginx {ngx['cpu_us_per_req']:.1f} (srv {100 * ngx['server_cpu_util']:.0f}%){ratio}")
    if raw.get("ok"):
        base.append(f"raw {raw['cpu_us_per_req']:.1f} (srv {100 * raw['server_cpu_util']:.0f}%)")
    return [{"target": "1 CPU/routed request", "figure": fig, "baseline": "; ".join(base) or "-",
             "command": command}]


def part_workers(args, tmp: Path) -> list[dict]:
    """Two runs of 1 vs 2 workers. With a CPU quota per worker (both workers on the server
    CPU, each held to 0.4 of it by a cgroup; wrk + service on the load CPU): does the
    instance serve twice as much when it has twice the CPU in workers? That is the target's
    question on a machine with too few CPUs to give each worker its own. Unpinned: what 2
    workers give on this machine as it is (gateway, service and wrk share both CPUs)."""
    runs = {}
    for label, extra in (("quota", ["--worker-cpu-quota", "0.4"]), ("unpinned", ["--no-pin"])):
        out = tmp / f"workers-{label}.json"
        cmd = commands.argv("compare", "--targets", "gateway-routed,gateway-routed-2w",
                            *extra, "--duration", str(args.duration), "--latency-connections", "0",
                            "--json", str(out))
        doc, err = run_tool(cmd, 600, out)
        runs[label] = (doc, err, rel(cmd[:-2]))
    command = " ; ".join(c for _, _, c in runs.values())
    figs, bases = [], []
    for label, (doc, err, cmd) in runs.items():
        if doc is None:
            figs.append(f"{label}: FAILED: {err}")
            continue
        r = {x["target"]: x for x in doc["results"]}
        one, two = r.get("gateway-routed", {}), r.get("gateway-routed-2w", {})
        if not (one.get("ok") and two.get("ok")):
            bad = one if not one.get("ok") else two
            figs.append(f"{label}: FAILED: {bad.get('error', '?').splitlines()[0]}")
            continue
        ratio = two["req_per_s"] / one["req_per_s"]
        if label == "quota":
            thr = min(one["worker_throttled"] + two["worker_throttled"])
            figs.append(f"quota 0.4 CPU/worker: 2w {two['req_per_s']:,.0f} req/s = {ratio:.2f}× 1w "
                        f"(gw {two['cpu_us_per_req']:.1f} vs {one['cpu_us_per_req']:.1f} CPU-µs/req; "
                        f"every worker throttled in ≥ {100 * thr:.0f}% of periods)")
            bases.append(f"quota: 1w {one['req_per_s']:,.0f} req/s; workers on CPU 0, wrk + service on CPU 1")
        else:
            figs.append(f"unpinned: 2w {ratio:.2f}× 1w (gw {two['cpu_us_per_req']:.1f} / total "
                        f"{two['total_cpu_us_per_req']:.1f} CPU-µs/req)")
            bases.append(f"unpinned: 1w {one['req_per_s']:,.0f} req/s; gateway, service and wrk "
                         f"share all {len(os.sched_getaffinity(0))} CPUs")
    return [{"target": "2 workers", "figure": "; ".join(figs), "baseline": "; ".join(bases),
             "command": command}]


# ---------------------------------------------------------------------------------------
# 3: latency overhead, open loop


def loadgen(cmd_args: list[str], pin: measuring.Pinning, timeout: float, tmp: Path,
            watch: dict | None = None) -> dict:
    """Run ``python -m perf loadgen`` pinned to the load CPU. With `watch` ({"server": pids,
    "backend": pids}) the CPU of those trees, of the generator and of the whole machine is
    read exactly around the measured window (--handshake) and derived figures are added:
    server_cpu_us_per_req, server_cpu_util, backend_cpu_us_per_req, load_cpu_util (backend
    + generator), other_cpu_util (the rest of the machine)."""
    cmd = pin.wrap(pin.load_cpu, commands.argv("loadgen", *cmd_args))
    snaps: dict = {}

    def handshake(phase):
        snaps[phase] = ({k: measuring.cpu_snapshot(v) for k, v in groups.items()},
                        measuring.machine_cpu_s(), time.monotonic(),
                        {k: measuring.cpu_split(v) for k, v in groups.items()})

    if watch is not None:
        cmd.append("--handshake")
    else:
        handshake = None
    env = _procs.py_env()
    p = subprocess.Popen(cmd, cwd=REPO_DIR, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=_procs.child_setup)
    groups = dict(watch or {}, loadgen=[p.pid])
    deadline = time.monotonic() + timeout
    try:
        if handshake is not None:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise measuring.TargetFailed(f"loadgen: expected 'ready', got {line!r}: {p.stderr.read()[-2000:]}")
            handshake("before")
            p.stdin.write("go\n")
            p.stdin.flush()
            line = p.stdout.readline()
            handshake("after")
            if line.strip() != "done":
                raise measuring.TargetFailed(f"loadgen: expected 'done', got {line!r}: {p.stderr.read()[-2000:]}")
            # readline() may have buffered the result line already, which communicate()
            # (reading the pipe itself) would never see: read the rest through the buffer.
            out = p.stdout.read()
            err = p.stderr.read()
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        else:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        _procs.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise measuring.TargetFailed(f"loadgen did not finish in {timeout:.0f}s: {rel(cmd)}")
    finally:
        if p.poll() is None:
            _procs.killpg(p.pid, signal.SIGKILL)
            p.wait()
    lines = [l for l in out.splitlines() if l.startswith("{")]
    if not lines:
        raise measuring.TargetFailed(f"loadgen printed no result (exit {p.returncode}): {err[-2000:]}")
    res = json.loads(lines[-1])
    res["cmd"] = rel(cmd)
    if watch is not None:
        (b, m0, t0, sb), (a, m1, t1, sa) = snaps["before"], snaps["after"]
        d = {k: measuring.cpu_delta(b[k], a[k]) for k in groups}
        wall, n = t1 - t0, max(1, res["completed"])
        res["server_cpu_us_per_req"] = d.get("server", 0.0) / n * 1e6
        # user / system apart, per request: where the CPU of each group goes
        res["split_us_per_req"] = {k: [(sa[k][i] - sb[k][i]) / n * 1e6 for i in (0, 1)]
                                   for k in groups}
        res["server_cpu_util"] = d.get("server", 0.0) / wall
        res["backend_cpu_us_per_req"] = d.get("backend", 0.0) / n * 1e6
        res["backend_cpu_util"] = d.get("backend", 0.0) / wall
        res["beside_cpu_util"] = d.get("beside", 0.0) / wall
        res["load_cpu_util"] = (d.get("backend", 0.0) + d["loadgen"]) / wall
        res["other_cpu_util"] = max(0.0, (m1 - m0) - sum(d.values())) / wall
    return res


def part_latency(args, tmp: Path) -> list[dict]:
    """Two gateway layouts and the raw server at the same rate, the same generator, several
    rounds (perf/README.md, "Issue 8")."""
    pin = measuring.decide_pinning(0, 1, args.no_pin)
    run_s = args.duration
    lat1_s = max(2, args.duration // 2)
    s = measuring.Settings(args.duration, 64, 1, 1, lat1_s, 30.0, pin, PY)
    # On 2 CPUs the service shares a CPU with something. "gateway-routed": with the
    # generator, the gateway alone on the server CPU. "svc@srv": with the gateway (like a
    # sidecar), the generator alone on the load CPU. Both at half the maximum of the first
    # layout. (Half the second layout's own maximum was tried: gateway + service still fill
    # ~98 % of their CPU there, as their cost per request rises when they batch less.) The
    # generator spins, yielding its CPU between polls: the load CPU never idles, so neither
    # the generator's wake-ups nor the service's (when it shares that CPU) pay for waking an
    # idle vCPU; sleeping there instead read ~+130 µs p50 in the first layout.
    targets = [("gateway-routed", start_gateway_routed, s, True)]
    if pin.enabled:
        beside = dataclasses.replace(s, pin=dataclasses.replace(pin, backend_cpu=pin.server_cpu))
        targets.append(("gw-routed-svc@srv", start_gateway_routed, beside, False))
    targets.append(("raw", start_raw, s, False))
    command = ("python -m perf scorecard --only latency" + (" --full" if args.full else "")
               + (f" --latency-rounds {args.latency_rounds}" if args.latency_rounds != 3 else ""))
    rate = None
    maximum = None
    rows: dict = {}
    c1: dict = {}
    c1s: dict = {}
    stalls = machine_stalls(run_s)
    try:
        for name, start, s, probe in targets:
            sub = tmp / f"lat-{name}"
            sub.mkdir()
            procs = measuring.ProcSet(sub)
            try:
                st = start(s, procs, sub)
                url = f"http://{HOST}:{st.port}{st.path}"
                measuring.run_wrk(procs, measuring.wrk_cmd(s, st.port, st.path, 64, 1), 1)
                if probe:
                    wcmd = measuring.wrk_cmd(s, st.port, st.path, 64, s.duration)
                    wrk, _ = measuring.run_wrk(procs, wcmd, s.duration)
                    rate = round(0.5 * wrk["req_per_s"])
                    maximum = (wrk["req_per_s"], rel(wcmd), st.layout)
                    log(f"{name} max {wrk['req_per_s']:,.0f} req/s → open loop at {rate:,}")
                beside_server = s.pin.enabled and s.pin.backend == s.pin.server_cpu
                backends = [p.popen.pid for p in st.backends]
                # load CPU % is about the load CPU: a service beside the gateway is not on it
                # (nor is it "other": it is read as a group of its own).
                watch = {"server": [p.popen.pid for p in st.measured],
                         "backend": [] if beside_server else backends,
                         "beside": backends if beside_server else []}
                for _ in range(args.latency_rounds):
                    lg = loadgen(["open", "--url", url, "--rate", str(rate), "--duration",
                                  str(run_s), "--connections", "32", "--spin"],
                                 pin, run_s + 60, sub, watch)
                    procs.check_alive()
                    lg["layout"] = st.layout
                    rows.setdefault(name, []).append(lg)
                lcmd = measuring.wrk_cmd(s, st.port, st.path, 1, lat1_s)
                w1, _ = measuring.run_wrk(procs, lcmd, lat1_s)
                c1[name] = (w1["p50_ms"], w1["p99_ms"], rel(lcmd))
                # The same round trip from a client whose CPU never idles, as in the rows
                # above: wrk sleeps between its requests, and on this VM each wake-up of an
                # idle CPU costs ~15-20 µs -- two more of them in the layout whose service
                # sits beside the client.
                b2b = loadgen(["open", "--url", url, "--back-to-back", "--spin", "--duration",
                               str(lat1_s), "--connections", "1"], pin, lat1_s + 60, sub)
                c1s[name] = (b2b["latency"]["p50_ms"], b2b["latency"]["p99_ms"], b2b["cmd"])
            finally:
                procs.stop_all()
    except (measuring.TargetFailed, measuring.TargetUnavailable) as exc:
        print(f"latency: FAILED: {exc}")
        return [{"target": "3 latency overhead", "figure": f"FAILED: {str(exc).splitlines()[0]}",
                 "baseline": "-", "command": command}]

    mx, wcmd, layout = maximum
    print(f"\n== 3. latency overhead, open loop at {rate:,} req/s = 50% of {mx:,.0f} req/s "
          f"({layout}; {wcmd})")
    print(f"{'row':<27}{'achieved':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>8}{'p99.9 ms':>9}"
          f"{'max ms':>8}{'p99 due':>8}{'gw µs/req':>10}{'gw CPU%':>8}{'svc CPU%':>9}"
          f"{'load CPU%':>10}{'other%':>7}{'stops':>10}  errors")
    for rname, runs_ in rows.items():
        for i, x in enumerate(runs_, 1):
            L = x["latency"]
            err = sum(x["errors"].values()) + sum(v for k, v in x["statuses"].items() if not k.startswith("2"))
            svc = x["beside_cpu_util"] if "svc@srv" in rname else x["backend_cpu_util"]
            print(f"{rname + f' #{i}':<27}{x['achieved_rate']:>9,.0f}{L['p50_ms']:>8.3f}{L['p90_ms']:>8.3f}"
                  f"{L['p99_ms']:>8.3f}{L['p99.9_ms']:>9.3f}{L['max_ms']:>8.3f}"
                  f"{x['latency_from_schedule']['p99_ms']:>8.3f}"
                  f"{x['server_cpu_us_per_req']:>10.1f}{100 * x['server_cpu_util']:>8.0f}"
                  f"{100 * svc:>9.0f}{100 * x['load_cpu_util']:>10.0f}{100 * x['other_cpu_util']:>7.0f}"
                  f"{x['stops']['count']:>4} {x['stops']['max_ms']:>5.1f}  {err}" + ("  (generator fell behind its schedule)" if x.get("generator_behind") else ""))
    print("user / system CPU-µs per request, first round of each row (srv = the gateway or the "
          "raw server, svc = demo service, gen = generator):")
    for rname, runs_ in rows.items():
        sp = runs_[0]["split_us_per_req"]
        svc = sp.get("beside") if "svc@srv" in rname else sp.get("backend")
        parts = [f"srv {sp['server'][0]:.1f} / {sp['server'][1]:.1f}"]
        if svc and sum(svc) > 0:
            parts.append(f"svc {svc[0]:.1f} / {svc[1]:.1f}")
        parts.append(f"gen {sp['loadgen'][0]:.1f} / {sp['loadgen'][1]:.1f}")
        print(f"    {rname:<22}" + ", ".join(parts))

    def med(name, q):
        return statistics.median(x["latency"][q] for x in rows[name])

    def stops(name):
        runs_ = rows[name]
        return (f"{name} {statistics.median(x['stops']['count'] for x in runs_):.0f} a round, "
                f"{statistics.median(x['stops']['total_ms'] for x in runs_):.0f} ms in all "
                f"(longest {max(x['stops']['max_ms'] for x in runs_):.1f} ms)")

    figs = []
    for name, _, _, _ in targets[:-1]:
        d50 = med(name, "p50_ms") - med("raw", "p50_ms")
        d99 = med(name, "p99_ms") - med("raw", "p99_ms")
        lo = min(x["latency"]["p99_ms"] for x in rows[name]) - med("raw", "p99_ms")
        hi = max(x["latency"]["p99_ms"] for x in rows[name]) - med("raw", "p99_ms")
        spread = f" [{lo * 1000:+.0f} .. {hi * 1000:+.0f}]" if len(rows[name]) > 1 else ""
        print(f"overhead ({name} − raw, medians of {len(rows[name])}): p50 {d50 * 1000:+.0f} µs, "
              f"p99 {d99 * 1000:+.0f} µs{spread}")
        figs.append(f"{name} ({rate:,}/s): {d50 * 1000:+.0f} µs p50, {d99 * 1000:+.0f} µs p99{spread}")
    stop_text = ", ".join(stops(name) for name in rows)
    print("the request path stopped (≥ 1 ms with requests outstanding and no response; "
          "median of the rounds): " + stop_text)
    if stalls:
        print(f"the machine alone, before the rows ({stalls['cmd']}): " + stalls["text"])
    for name in c1:
        if name != "raw":
            d1 = c1[name][0] - c1["raw"][0]
            ds = c1s[name][0] - c1s["raw"][0]
            print(f"1 connection ({name} − raw): p50 {ds * 1000:+.0f} µs ({c1s[name][0]:.3f} vs "
                  f"{c1s['raw'][0]:.3f} ms) from a client that never idles (loadgen "
                  f"--back-to-back --spin); wrk -c1: {d1 * 1000:+.0f} µs "
                  f"({c1[name][0]:.3f} vs {c1['raw'][0]:.3f} ms)")
            figs.append(f"{name} 1 conn. p50 {ds * 1000:+.0f} µs (wrk -c1 {d1 * 1000:+.0f})")
    print("latency = from the request's write to the end of its response, open loop (requests go "
          "out on schedule, pipelined if need be; perf/openloop.pyx --spin); p99 due = p99 from "
          "the moment each request was due (the generator's own lateness included); gw = the gateway's "
          "processes; svc = the demo service; load CPU % = generator + service when the service "
          "is on the load CPU (the generator spins: ~100 %); other % = the rest of the machine "
          "(> ~10: disturbed); stops = how many times the request path stopped for ≥ 1 ms "
          "(requests outstanding, no response), and the longest, ms")
    others = [x["other_cpu_util"] for runs_ in rows.values() for x in runs_]
    if max(others) > 0.1:
        print(f"WARNING: other processes used up to {100 * max(others):.0f}% "
              "of a CPU during these runs: the tails are not the gateway's alone")
    for rname, runs_ in rows.items():
        print(f"{rname}: {runs_[0]['layout']}\n    load : {runs_[0]['cmd']}")
    for name, (_, _, cmd1) in c1.items():
        print(f"{name} 1c: {cmd1}\n    and: {c1s[name][2]}")
    print(f"command: {command}")
    base = (f"raw p50 {med('raw', 'p50_ms'):.3f} / p99 {med('raw', 'p99_ms'):.3f} ms; "
            f"1 conn. p50 {c1s['raw'][0]:.3f} ms (wrk -c1 {c1['raw'][0]:.3f})")
    figs.append("stops ≥ 1 ms a round: " + stop_text)
    if stalls:
        figs.append("the machine alone: " + stalls["text"])
    return [{"target": "3 latency overhead", "figure": "; ".join(figs), "baseline": base,
             "command": command}]


def machine_stalls(seconds: float) -> dict | None:
    """Spin on every usable CPU at once for `seconds` (``loadgen hiccups``, pinned) and
    say how often and how long each CPU was taken away: the floor under any tail measured
    on this machine. Nothing else of ours runs meanwhile."""
    if not shutil.which("taskset"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    procs = [subprocess.Popen(_procs.taskset(cpu, commands.argv(
                                  "loadgen", "hiccups", "--duration", str(seconds))),
                              cwd=REPO_DIR, env=_procs.py_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cpu in cpus]
    parts = []
    for cpu, p in zip(cpus, procs):
        try:
            out, _ = p.communicate(timeout=seconds + 120)
            doc = json.loads(out.splitlines()[-1])
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            for q in procs:     # no spinner may outlive this: it would take a CPU from the rows
                q.kill()
                q.wait()
            return None
        parts.append(f"CPU {cpu}: {doc['count']} stalls ≥ {doc['threshold_us']:.0f} µs, "
                     f"{doc['total_ms']:.1f} ms in all ({100 * doc['share']:.2f} %), longest "
                     f"{doc['max_ms']:.1f} ms")
    return {"text": "; ".join(parts),
            "cmd": f"taskset -c N python -m perf loadgen hiccups --duration {seconds:g}, "
                   "every CPU at once"}


# ---------------------------------------------------------------------------------------
# 4: connections


def part_connections(args, tmp: Path) -> list[dict]:
    out = tmp / "conn.json"
    cmd = commands.argv("connections", "--duration", str(60 if args.full else 20))
    if args.soak:
        cmd = commands.argv("connections", "--soak", str(args.soak))
    doc, err = run_tool(cmd + ["--json", str(out)], 900 + args.soak, out)
    command = rel(cmd)
    if doc is None or "memory" not in doc or "loaded" not in doc.get("memory", {}):
        why = err or (doc or {}).get("failure", "?")
        return [{"target": "4 10k connections", "figure": f"FAILED: {why}", "baseline": "-",
                 "command": command}]
    m = doc["memory"]
    errors = sum(doc["errors"].values())
    fig = (f"RSS {m['loaded']['rss_mb']:.0f} MB (PSS {m['loaded']['pss_mb']:.0f}) with "
           f"{doc['clients']:,} clients + {doc['service_connections']} service conns; "
           f"{errors} errors, {doc['responses']:,} responses")
    if doc.get("rss_slope_mb_per_min") is not None and args.soak:
        fig += f"; slope {doc['rss_slope_mb_per_min']:+.2f} MB/min"
    base = (f"target ≤ 150 MB: {'PASS' if m['loaded']['rss_mb'] <= 150 else 'FAIL'}; idle "
            f"{m['idle']['rss_mb']:.0f} MB, +{(m['loaded']['rss'] - m['services']['rss']) / doc['clients'] / 1024:.1f} KB/conn")
    return [{"target": "4 10k connections", "figure": fig, "baseline": base, "command": command}]


# ---------------------------------------------------------------------------------------
# 5: authenticated path


def es256_cost(pin: measuring.Pinning) -> dict:
    cmd = pin.wrap(pin.server_cpu, commands.argv("es256-timing"))
    r = subprocess.run(cmd, cwd=REPO_DIR, env=_procs.py_env(), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise measuring.TargetFailed(f"ES256 timing failed: {r.stderr[-1500:]}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    doc["cmd"] = rel(cmd)
    return doc


def part_auth(args, tmp: Path) -> list[dict]:
    from stellagw.devauth import DevAuthority, DpopKey
    from stellagw.devauth.client import htu_of

    pin = measuring.decide_pinning(0, 1, args.no_pin)
    n = args.auth_requests or (100_000 if args.full else 30_000)
    warm = 2000
    conns = 64
    command = "python -m perf scorecard --only auth" + (" --full" if args.full else "")
    sub = tmp / "auth"
    sub.mkdir()
    procs = measuring.ProcSet(sub)
    authority = None
    rows: dict = {}
    try:
        authority = DevAuthority(HOST, 0, lifetime=3600).start_in_thread()
        es = es256_cost(pin)
        key = DpopKey.generate("ES256")
        token = authority.authority.mint(jkt=key.thumbprint())
        (sub / "key.pem").write_bytes(key.private_key.private_bytes(*_pem_args()))
        (sub / "token.txt").write_text(token)
        # The second gateway checks everything of a proof but its signature
        # (perf/stub_signature/sitecustomize.py): "everything but the signature" measured
        # directly, beside the subtraction of an ES256 check timed in another process.
        for stubbed in (False, True):
            gsub = sub / ("stubbed" if stubbed else "real")
            gsub.mkdir()
            env = _procs.py_env()
            if stubbed:
                env["PYTHONPATH"] = str(PERF_DIR / "stub_signature") + os.pathsep + env["PYTHONPATH"]
            http_port, tcp_port = _procs.free_port(), _procs.free_port()
            origin = f"http://{HOST}:{http_port}"
            cfg = gsub / "gateway.yaml"
            cfg.write_text(
                "# written by python -m perf scorecard (auth)\n"
                "gateway:\n"
                "  node: {workers: 1}\n"
                f"  http: {{host: {HOST}, port: {http_port}, publicOrigin: \"{origin}\"}}\n"
                f"  transports: {{tcp: {{host: {HOST}, port: {tcp_port}}}}}\n"
                "  logging: {accessLog: false}\n"
                "  auth:\n"
                f"    authority: \"{authority.issuer}\"\n"
                "    audiences: [stellaops-gateway]\n"
                "    required: false\n"
                "    replayCache: {maxEntries: 1000000}\n")
            gw = procs.start("gateway-stubbed" if stubbed else "gateway", pin.wrap(pin.server_cpu, [
                PY, "-m", "stellagw", "serve", "--config", str(cfg)]), env=env)
            measuring.wait_http_ok(http_port, "/health/live", procs, 30)
            svc = procs.start("demo-service", pin.wrap(pin.load_cpu, [
                PY, "-m", "stellagw", "demo-service", "--gateway", f"{HOST}:{tcp_port}",
                "--name", "bench"]), env=_procs.py_env())
            measuring.wait_http_ok(http_port, "/bench/hello", procs, 30)
            url = origin + "/bench/hello"
            _check_auth_enforced(http_port, url, token, key, procs)
            runs = (("unauthenticated", []),
                    ("DPoP", ["--dpop-key", str(sub / "key.pem"), "--token-file",
                              str(sub / "token.txt"), "--htu", htu_of(url)]))
            for label, extra in runs:
                lg = loadgen(["closed", "--url", url, "--requests", str(n), "--warmup-requests",
                              str(warm), "--connections", str(conns), *extra], pin, 180, gsub,
                             {"server": [gw.popen.pid], "backend": [svc.popen.pid]})
                procs.check_alive()
                label = label + (" (sig. stubbed)" if stubbed else "")
                rows[label] = lg
                log(f"auth: {label}: {lg['achieved_rate']:,.0f} req/s, "
                    f"{lg['server_cpu_us_per_req']:.1f} gateway CPU-µs/req")
            procs.stop_all()
    except (measuring.TargetFailed, measuring.TargetUnavailable, OSError, RuntimeError) as exc:
        print(f"auth: FAILED: {exc}")
        return [{"target": "5 DPoP auth path", "figure": f"FAILED: {str(exc).splitlines()[0]}",
                 "baseline": "-", "command": command}]
    finally:
        procs.stop_all()
        if authority is not None:
            try:
                authority.stop()
            except Exception:
                pass
    u, a = rows["unauthenticated"], rows["DPoP"]
    us, as_ = rows["unauthenticated (sig. stubbed)"], rows["DPoP (sig. stubbed)"]
    verify = es.get("gateway_verify_signature_us") or es["pyjwt_us"]
    rest = a["server_cpu_us_per_req"] - u["server_cpu_us_per_req"] - verify
    direct = as_["server_cpu_us_per_req"] - us["server_cpu_us_per_req"]
    print(f"\n== 5. authenticated path: {n:,} requests each after {warm:,} warm-up, {conns} "
          f"connections, 1 in flight each; one pre-minted proof per request")
    print(f"{'requests':<30}{'req/s':>9}{'gw µs/req':>11}{'gw CPU %':>10}{'svc µs/req':>11}"
          f"{'load CPU%':>10}{'other CPU%':>11}{'p50 ms':>9}{'p99 ms':>9}{'req bytes':>10}  statuses / errors")
    for label, x in rows.items():
        print(f"{label:<30}{x['achieved_rate']:>9,.0f}{x['server_cpu_us_per_req']:>11.1f}"
              f"{100 * x['server_cpu_util']:>10.0f}{x['backend_cpu_us_per_req']:>11.1f}"
              f"{100 * x['load_cpu_util']:>10.0f}{100 * x['other_cpu_util']:>11.0f}"
              f"{x['latency']['p50_ms']:>9.3f}{x['latency']['p99_ms']:>9.3f}{x['request_bytes']:>10}  "
              f"{x['statuses']} {x['errors'] or ''}"
              + (f"  (minted in {x['proof_mint_s']} s)" if x.get("dpop") else ""))
    print(f"ES256 verification in-process (median, CPU {pin.server_cpu if pin.enabled else '-'}): "
          f"gateway verify_signature {es.get('gateway_verify_signature_us', float('nan')):.1f} µs, "
          f"pyjwt {es['pyjwt_us']:.1f} µs, cryptography alone {es['cryptography_us']:.1f} µs")
    print(f"DPoP − unauthenticated = {a['server_cpu_us_per_req'] - u['server_cpu_us_per_req']:.1f} µs/req; "
          f"minus one verification ({verify:.1f}) = {rest:.1f} µs/req for everything but the signature")
    print(f"measured directly (a gateway checking everything of a proof but its signature, "
          f"perf/stub_signature): DPoP − unauthenticated = {direct:.1f} µs/req "
          f"(unauthenticated there: {us['server_cpu_us_per_req']:.1f})")
    for label, x in rows.items():
        print(f"    {label}: {x['cmd']}")
    print(f"command: {command}")
    bad = [l for l, x in rows.items()
           if x["errors"] or any(not k.startswith("2") for k in x["statuses"])]
    fig = (f"DPoP {a['server_cpu_us_per_req']:.1f} CPU-µs/req (srv {100 * a['server_cpu_util']:.0f}%); "
           f"− unauth − ES256 = {rest:.1f} µs for the rest; signature stubbed: DPoP − unauth = "
           f"{direct:.1f} µs (unauth {us['server_cpu_us_per_req']:.1f})"
           + (f"; ERRORS in {bad}" if bad else ""))
    base = (f"unauth {u['server_cpu_us_per_req']:.1f} (srv {100 * u['server_cpu_util']:.0f}%); "
            f"ES256 verify {verify:.1f} µs in-process")
    return [{"target": "5 DPoP auth path", "figure": fig, "baseline": base, "command": command}]


def _pem_args():
    from cryptography.hazmat.primitives import serialization
    return (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())


def _check_auth_enforced(port: int, url: str, token: str, key, procs) -> None:
    """The gateway must have the Authority's keys and really verify: a fresh proof → 200,
    the same proof again → 401 (replay), no token → 200 (anonymous allowed)."""
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        procs.check_alive()
        proof = key.proof("GET", url, token)
        status = _get(port, "/bench/hello", {"Authorization": f"DPoP {token}", "DPoP": proof})
        if status == 200:
            replay = _get(port, "/bench/hello", {"Authorization": f"DPoP {token}", "DPoP": proof})
            anon = _get(port, "/bench/hello", {})
            if replay != 401 or anon != 200:
                raise measuring.TargetFailed(f"auth probe: replayed proof → {replay} (want 401), "
                                       f"no token → {anon} (want 200)")
            return
        time.sleep(0.2)
    raise measuring.TargetFailed(f"an authenticated request never answered 200 (last {status}): "
                           "the gateway has no Authority keys?")


def _get(port: int, path: str, headers: dict) -> int:
    import http.client
    c = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        c.request("GET", path, headers=headers)
        r = c.getresponse()
        r.read()
        return r.status
    finally:
        c.close()


# ---------------------------------------------------------------------------------------
# 6: callgrind


def part_callgrind(args, tmp: Path) -> list[dict]:
    out = tmp / "cg.json"
    cmd = commands.argv("callgrind")
    if args.no_history:
        cmd.append("--no-history")
    doc, err = run_tool(cmd + ["--json", str(out)], 600, out)
    command = rel(cmd)
    if doc is None:
        return [{"target": "6 callgrind instr/req", "figure": f"FAILED: {err}", "baseline": "-",
                 "command": command}]
    fig = (f"{doc['instr_per_request']:,} instr/routed req (commit {doc['commit'][:9]}"
           + (f" + {doc['dirty_files']} changed files" if doc.get("dirty_files") else "") + ")")
    base = "-"
    if doc.get("raw_instr_per_request"):
        base = (f"raw server {doc['raw_instr_per_request']:,} instr/req → "
                f"{doc['instr_per_request'] / doc['raw_instr_per_request']:.1f}× raw")
    prev = doc.get("previous")
    if prev:
        base += f"; previous {int(float(prev['instr_per_request'])):,} ({prev['commit'][:9]})"
    return [{"target": "6 callgrind instr/req", "figure": fig, "baseline": base, "command": command}]


# ---------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    cols = ("target", "figure", "baseline", "command")
    widths = [max(len(c), *(len(r[c]) for r in rows)) for c in cols]
    widths[-1] = len("command")
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = [line(cols), "-+-".join("-" * w for w in widths)]
    out += [line([r[c] for c in cols]) for r in rows]
    return "\n".join(out)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma list from {','.join(PARTS)}")
    ap.add_argument("--full", action="store_true", help="longer runs (10 s instead of 5 s, more requests)")
    ap.add_argument("--duration", type=int, default=None, help="seconds per measured run (5 short, 10 full)")
    ap.add_argument("--auth-requests", type=int, default=None, help="requests per auth run (30k short, 100k full)")
    ap.add_argument("--soak", type=int, default=0, help="connections: soak this many seconds instead")
    ap.add_argument("--no-history", action="store_true", help="callgrind: do not append to the CSV")
    ap.add_argument("--no-pin", action="store_true", help="latency/auth: do not pin")
    ap.add_argument("--latency-rounds", type=int, default=3,
                    help="latency: open-loop runs per row; medians and the range are shown")
    ap.add_argument("--json", metavar="PATH", help="write the closing table as JSON")
    args = ap.parse_args(argv)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    bad = [p for p in args.only if p not in PARTS]
    if bad:
        ap.error(f"unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if args.duration is None:
        args.duration = 10 if args.full else 5
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = commands.command_line(__name__, argv)
    _procs.stop_on_sigterm()
    t0 = time.monotonic()
    rows: list[dict] = []
    funcs = {"cpu": part_cpu, "workers": part_workers, "latency": part_latency,
             "connections": part_connections, "auth": part_auth, "callgrind": part_callgrind}
    with tempfile.TemporaryDirectory(prefix="stellagw-scorecard-") as tmpname:
        tmp = Path(tmpname)
        for part in PARTS:
            if part not in args.only:
                continue
            print(f"\n######## {part}", flush=True)
            log(f"{part} ...")
            try:
                rows += funcs[part](args, tmp)
            except Exception as exc:  # one broken part must not hide the others
                rows.append({"target": part, "figure": f"FAILED: {type(exc).__name__}: {exc}",
                             "baseline": "-", "command": "-"})
    print(f"\n######## scorecard of issue 8's targets ({time.monotonic() - t0:.0f} s; "
          f"{len(os.sched_getaffinity(0))} CPUs; {'short' if not args.full else 'full'} mode)")
    print(table(rows))
    print(f"command: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    return 0 if all("FAILED" not in r["figure"] for r in rows) else 1

