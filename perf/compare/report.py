"""The output of ``python -m perf compare``: each target's median round, the rate-limit
rows' differences per round, the table, and what each figure means."""
from __future__ import annotations

from .measuring import WARMUP_S, Settings
from .targets import RL_TARGETS


def median_round(name: str, runs: list[dict]) -> dict:
    """The run of ``name`` with the median CPU-µs/req over the rounds that succeeded (the
    lower median for an even count), with every round's figure attached."""
    ok = sorted((r for r in runs if r["ok"]), key=lambda r: r["cpu_us_per_req"])
    if not ok:
        return runs[0]
    chosen = dict(ok[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["rounds_cpu_us_per_req"] = [r["cpu_us_per_req"] if r["ok"] else None for r in runs]
        chosen["rounds_req_per_s"] = [r["req_per_s"] if r["ok"] else None for r in runs]
        chosen["rounds_failed"] = sum(1 for r in runs if not r["ok"])
        chosen["rounds_steal_util"] = [r.get("steal_util") if r["ok"] else None for r in runs]
    return chosen


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def rate_limit_summary(rounds: list[list[dict]], targets: list[str]) -> dict:
    """Issue 5: each rate-limit row minus gateway-routed of the same round, per request."""
    if "gateway-routed" not in targets:
        return {}
    ref_i = targets.index("gateway-routed")
    out: dict = {}
    for name, (tier, target_us) in RL_TARGETS.items():
        if name not in targets:
            continue
        i = targets.index(name)
        pairs = [(rd[i], rd[ref_i]) for rd in rounds if rd[i]["ok"] and rd[ref_i]["ok"]]
        if not pairs:
            out[tier] = {"target": name, "rounds": 0}
            continue
        d_cpu = [a["cpu_us_per_req"] - b["cpu_us_per_req"] for a, b in pairs]
        d_rps = [100 * (a["req_per_s"] / b["req_per_s"] - 1) for a, b in pairs]
        d_p50 = [1e3 * (a["lat_p50_ms"] - b["lat_p50_ms"]) for a, b in pairs
                 if a.get("lat_p50_ms") is not None and b.get("lat_p50_ms") is not None]
        d_total = [a["total_cpu_us_per_req"] - b["total_cpu_us_per_req"] for a, b in pairs]
        valkey = [a["backend_cpu_us_per_req_by_name"].get("valkey") for a, _ in pairs]
        valkey = [v for v in valkey if v is not None]
        out[tier] = {
            "target": name, "rounds": len(pairs), "target_us": target_us,
            "d_cpu_us_per_req": d_cpu, "d_cpu_us_per_req_median": _median(d_cpu),
            "d_req_per_s_pct": d_rps, "d_req_per_s_pct_median": _median(d_rps),
            "d_p50_1c_us": d_p50, "d_p50_1c_us_median": _median(d_p50) if d_p50 else None,
            "d_total_cpu_us_per_req_median": _median(d_total),
            "valkey_cpu_us_per_req_median": _median(valkey) if valkey else None,
        }
    return out


def render_rate_limit(rl: dict) -> list[str]:
    if not rl:
        return []
    n = max(v["rounds"] for v in rl.values())
    lines = ["rate limiting (issue 5): each row minus gateway-routed (limiting off) of the same "
             "round, per request" + (f"; median of {n} rounds [min .. max]" if n > 1 else "") + ":"]
    for tier, v in rl.items():
        if not v["rounds"]:
            lines.append(f"  {tier:<11} ({v['target']}): no round where both rows ran")
            continue
        d = v["d_cpu_us_per_req_median"]
        spread = (f" [{min(v['d_cpu_us_per_req']):+.1f} .. {max(v['d_cpu_us_per_req']):+.1f}]"
                  if v["rounds"] > 1 else "")
        goal = (f"target ≤ {v['target_us']:g} µs" +
                (" + one Valkey round trip" if tier == "environment" else ""))
        verdict = "within" if d <= v["target_us"] else "OVER"
        text = (f"  {tier:<11} gateway {d:+.1f} CPU-µs/req{spread} ({goal}: {verdict}); "
                f"req/s {v['d_req_per_s_pct_median']:+.1f} %")
        if v["d_p50_1c_us_median"] is not None:
            text += f"; p50 @1c {v['d_p50_1c_us_median']:+.0f} µs"
        if v["valkey_cpu_us_per_req_median"] is not None:
            text += f"; valkey-server {v['valkey_cpu_us_per_req_median']:.1f} CPU-µs/req"
        text += f"; whole benchmark {v['d_total_cpu_us_per_req_median']:+.1f} µs/req"
        lines.append(text)
    lines.append("  (Δ CPU-µs/req within ±1–2 µs is at the noise of one run on a shared VM: use "
                 "--rounds 3 or more and read the spread)")
    return lines


def against_nginx(results: list[dict]) -> list[dict]:
    """Each gateway-routed* row's CPU-µs/req ÷ nginx's of the same round (issue 17's
    benchmark reads the median of these and asks for every one below 1)."""
    nginx = next((r for r in results if r["target"] == "nginx" and r.get("rounds_cpu_us_per_req")),
                 None)
    if nginx is None:
        return []
    out = []
    for r in results:
        if not r["target"].startswith("gateway-routed") or not r.get("rounds_cpu_us_per_req"):
            continue
        ratios = [g / n for g, n in zip(r["rounds_cpu_us_per_req"], nginx["rounds_cpu_us_per_req"])
                  if g is not None and n]
        if ratios:
            out.append({"target": r["target"], "ratios": ratios, "median": _median(ratios),
                        "below_nginx_every_round": all(x < 1 for x in ratios)})
    return out


def render_against_nginx(results: list[dict]) -> list[str]:
    return [f"{a['target']} ÷ nginx per round: " + ", ".join(f"{x:.2f}" for x in a["ratios"])
            + f"; median round {a['median']:.2f}; below nginx in "
            + ("every round" if a["below_nginx_every_round"] else
               f"{sum(x < 1 for x in a['ratios'])} of {len(a['ratios'])} rounds")
            for a in against_nginx(results)]


STEAL_NOTED = 0.02      # of one CPU: below it the hypervisor's share is not worth a word


def _steal_note(steals: list) -> str:
    if not any((v or 0) > STEAL_NOTED for v in steals):
        return ""
    return "; steal % of a CPU " + ", ".join(_f(None if v is None else 100 * v, ".0f")
                                             for v in steals)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def render_table(results: list[dict], s: Settings) -> str:
    base = next((r for r in results if r["ok"]), None)
    base_name = base["target"] if base else "-"
    cols = ["target", "req/s", "p50 ms", "p99 ms", "CPU-µs/req", f"× {base_name}",
            "RSS MB", "srv CPU %",
            f"p50 ms @{s.latency_connections}c" if s.latency_connections else "p50 ms @1c",
            "backend µs/req", "total µs/req", "load CPU %", "other CPU %"]
    rows = []
    for r in results:
        if not r["ok"]:
            rows.append([r["target"], "UNAVAILABLE" if r.get("unavailable") else "FAILED"])
            continue
        ratio = r["cpu_us_per_req"] / base["cpu_us_per_req"] if base and base["cpu_us_per_req"] else None
        rows.append([
            r["target"],
            f"{r['req_per_s']:,.0f}",
            _f(r["p50_ms"], ".3f"),
            _f(r["p99_ms"], ".3f"),
            f"{r['cpu_us_per_req']:.1f}",
            _f(ratio, ".2f"),
            f"{r['rss_bytes'] / 2**20:.1f}",
            f"{100 * r['server_cpu_util']:.0f}",
            _f(r.get("lat_p50_ms"), ".3f"),
            _f(r.get("backend_cpu_us_per_req"), ".1f"),
            _f(r.get("total_cpu_us_per_req"), ".1f"),
            _f(None if r.get("load_cpu_util") is None else 100 * r["load_cpu_util"], ".0f"),
            _f(None if r.get("other_cpu_util") is None else 100 * r["other_cpu_util"], ".0f"),
        ])
    widths = [max([len(c), *(len(row[i]) for row in rows if i < len(row))]) for i, c in enumerate(cols)]
    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells))
    out = [line(cols), line(["-" * w for w in widths])]
    for row in rows:
        out.append(line(row) if len(row) == len(cols) else "  ".join([row[0].ljust(widths[0]), row[1]]))
    return "\n".join(out)


def report(results: list[dict], s: Settings, info: dict, command: str,
           rl: dict | None = None, rounds: int = 1) -> str:
    lines = [
        "",
        f"machine: {info.get('cpu_model') or '?'}, {info['cpus_usable']} usable CPU(s), "
        f"Linux {info['kernel']}, Python {info['python']}"
        + (f", {info['wrk']}" if "wrk" in info else "")
        + (f", {info['nginx']}" if "nginx" in info else ""),
        f"pinning: {s.pin.note}",
        f"load: wrk -t{s.threads} -c{s.connections} -d{s.duration}s after a {WARMUP_S}s warm-up; "
        f"latency pass -c{s.latency_connections} -d{s.latency_duration}s"
        if s.latency_connections > 0 else
        f"load: wrk -t{s.threads} -c{s.connections} -d{s.duration}s after a {WARMUP_S}s warm-up",
        "",
        render_table(results, s),
        "",
        "CPU-µs/req = Δ(utime+stime) of the server's process tree / requests completed by wrk;",
        "× = CPU-µs/req against the first target; srv CPU % = server CPU time / wall time (100 = one core",
        "saturated: below ~90 the server was not the bottleneck and CPU-µs/req reads high);",
        "backend µs/req = the hello backend / demo service, not counted in CPU-µs/req;",
        "total µs/req = server + backend + wrk CPU per request; load CPU % = (backend + wrk) CPU",
        "time / wall time; other CPU % = user+system CPU of everything else on the machine (another",
        "benchmark, a build...) / wall time, in % of one CPU: above ~10 the figures are disturbed; steal:",
        "time the hypervisor gave the VM's CPUs to someone else, named per round and warned of above 2 %.",
        "",
    ]
    if rounds > 1:
        lines[4:4] = [f"rounds: {rounds}, targets interleaved; each row is that target's median "
                      "round by CPU-µs/req"]
        for r in results:
            if r.get("rounds_cpu_us_per_req"):
                lines.append(f"{r['target']}: CPU-µs/req per round "
                             + ", ".join(_f(v, ".1f") for v in r["rounds_cpu_us_per_req"])
                             + "; req/s " + ", ".join(_f(v, ",.0f") for v in r["rounds_req_per_s"])
                             + _steal_note(r.get("rounds_steal_util") or []))
        lines += render_against_nginx(results) + [""]
    if rl:
        lines += render_rate_limit(rl) + [""]
    for r in results:
        if r["ok"]:
            lines.append(f"{r['target']}: {r['layout']}")
            for c in r["server_cmd"]:
                lines.append(f"    server : {c}")
            for c in r["backend_cmd"]:
                lines.append(f"    backend: {c}")
            lines.append(f"    wrk    : {r['wrk_cmd']}")
            if r.get("worker_throttled"):
                lines.append("    quota  : each worker throttled in "
                             + " / ".join(f"{100 * t:.0f}%" for t in r["worker_throttled"])
                             + " of its quota periods (≈100 %: the quota was the bound)")
            if r.get("wrk_latency_cmd"):
                lines.append(f"    latency: {r['wrk_latency_cmd']}")
            if r.get("rl_scope"):
                by = r.get("backend_cpu_us_per_req_by_name") or {}
                lines.append(f"    checked: /metrics after the run: {r['rl_allowed']:,.0f} {r['rl_scope']} "
                             f"decisions allowed (warm-up and latency pass included), "
                             f"{r['rl_rejected']:.0f} refused, {r['rl_valkey_errors']:.0f} Valkey errors"
                             + ("; backend µs/req: " + ", ".join(f"{k} {v:.1f}" for k, v in by.items())
                                if len(by) > 1 else ""))
            warn = []
            if r["non_2xx"]:
                warn.append(f"{r['non_2xx']} non-2xx responses")
            if any(r["socket_errors"].values()):
                warn.append("socket errors " + ", ".join(f"{k} {v}" for k, v in r["socket_errors"].items() if v))
            util = r.get("server_cpu_util")
            ncpu = info.get("cpus_usable", 1)
            if util is not None and not r.get("pinned", True) and ncpu > 1:
                # unpinned: the server may use every CPU; saturated = the machine is busy
                busy = util + (r.get("load_cpu_util") or 0) + (r.get("other_cpu_util") or 0)
                if busy < 0.9 * ncpu:
                    warn.append(f"unpinned and the machine NOT saturated: server {100 * util:.0f}% + "
                                f"load {100 * (r.get('load_cpu_util') or 0):.0f}% + other "
                                f"{100 * (r.get('other_cpu_util') or 0):.0f}% of {ncpu} CPUs "
                                f"(={ncpu * 100}%): the closed loop of wrk's connections, not the CPU, "
                                "set the pace")
            elif r.get("worker_throttled"):
                # quota-bound: saturated = every worker throttled in nearly every period
                low = min(r["worker_throttled"])
                if low < 0.9:
                    warn.append(f"a worker was throttled in only {100 * low:.0f}% of its quota "
                                "periods: its quota did not bound it")
            elif util is not None and util < 0.9 * r.get("server_cpus", 1):
                why = ("the load side (wrk + backend) used "
                       f"{100 * r['load_cpu_util']:.0f}% of a CPU" if r.get("load_cpu_util") is not None
                       else "something else was the bottleneck")
                warn.append(f"server NOT saturated (srv CPU {100 * util:.0f}%): {why}; "
                            "CPU-µs/req reads high at low load")
            if (r.get("other_cpu_util") or 0) > 0.1:
                warn.append(f"other processes used {100 * r['other_cpu_util']:.0f}% of a CPU during "
                            "the run (machine not quiet)")
            if (r.get("steal_util") or 0) > STEAL_NOTED:
                warn.append(f"the hypervisor took {100 * r['steal_util']:.0f}% of a CPU (steal) "
                            "during the run: the figures are disturbed")
            if warn:
                lines.append("    WARNING: " + "; ".join(warn))
        else:
            label = "unavailable" if r.get("unavailable") else "FAILED"
            lines.append(f"{r['target']}: {label}: {r['error']}")
    lines += ["", f"command: {command}"]
    return "\n".join(lines)

