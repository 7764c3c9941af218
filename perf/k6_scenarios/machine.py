"""What a k6 run measured on, and whether the machine was quiet while it ran.

* :func:`provenance`: the commit of this checkout and its uncommitted (tracked) files, the
  CPU model, the number of CPUs, the kernel.
* :class:`MachineWatch`: once a second, the CPU of the gateway, of the load side (k6, the
  services, this runner) and of everything else on the machine, and the steal time — from
  /proc/stat (the whole machine) and psutil (our processes). :meth:`MachineWatch.verdict`
  marks the run **unreliable** when the machine was not quiet (:data:`QUIET`): another
  tenant's CPU or a hypervisor's steal lands in every latency figure and nothing in k6's
  numbers shows it.

The limits are perf/README.md's ("Is the machine quiet?"); ``other`` is the machine's
user + nice + system time minus our processes' user + system time, in % of one CPU; steal
is % of all CPUs' time. A process that started and ended between two samples is counted in
``other`` but cannot be named.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import psutil

from .._procs import REPO_DIR
from ..provenance import commit, dirty_files, machine_info

PROC_STAT = "/proc/stat"
# A run is unreliable when, over the scenario, other processes used more than
# other_cpu_mean_pct of one CPU on average, or more than other_cpu_peak_pct of one CPU in
# any one second, or the hypervisor stole more than steal_pct of all CPUs' time.
QUIET = {"other_cpu_mean_pct": 10.0, "other_cpu_peak_pct": 50.0, "steal_pct": 5.0}
# Not a reason to distrust the machine, but said: the load side's CPUs ran full, so k6 (or
# a service) was the bottleneck and its queueing is in the latencies.
LOAD_SATURATED_PCT = 90.0
TOP_OTHERS = 8


def provenance(repo: Path = REPO_DIR) -> dict:
    """The commit and uncommitted tracked files of ``repo``, and the machine."""
    head, subject = commit(repo)
    info = machine_info()
    return {
        "commit": head, "subject": subject, "dirty_files": dirty_files(repo=repo),
        "cpu_model": info.get("cpu_model"), "cpus_usable": info.get("cpus_usable"),
        "cpus_online": info.get("cpus_online"), "kernel": info.get("kernel"),
        "python": info.get("python"),
    }


# --------------------------------------------------------------------------- /proc/stat

@dataclass(frozen=True)
class CpuTimes:
    """The aggregate ``cpu`` line of /proc/stat, in seconds."""
    busy: float    # user + nice + system: what processes' utime + stime add up to
    steal: float
    total: float   # every field but guest time (already inside user)


def read_proc_stat(path: str = PROC_STAT) -> CpuTimes:
    with open(path) as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                break
        else:
            raise ValueError(f"{path}: no aggregate cpu line")
    v += [0] * (10 - len(v))
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    return CpuTimes(busy=(user + nice + system) / hz, steal=steal / hz,
                    total=(user + nice + system + idle + iowait + irq + softirq + steal) / hz)


def cpu_seconds(pids) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[pid] = t.user + t.system
    return out


def all_processes() -> dict[int, tuple[float, str]]:
    """``{pid: (user + system seconds, name)}`` of every process we may read."""
    out = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        t = p.info.get("cpu_times")
        if t is not None:
            out[p.pid] = (t.user + t.system, p.info.get("name") or "?")
    return out


# --------------------------------------------------------------------------- watching

@dataclass(frozen=True)
class Tick:
    """One sampling interval: CPU seconds used in it, by whom."""
    t0: float
    t1: float
    gateway_s: float | None   # None: the gateway's processes are not known here
    load_s: float             # ours but not the gateway's: k6, services, this runner
    other_s: float
    steal_s: float
    total_s: float            # all CPUs' time in the interval (/proc/stat)
    rss: int | None = None    # the gateway's, at t1

    def pct(self, seconds: float | None) -> float | None:
        return None if seconds is None else 100.0 * seconds / (self.t1 - self.t0)


class MachineWatch(threading.Thread):
    """Samples the machine every ``interval`` seconds from :meth:`start` to :meth:`stop`.

    ``gateway_pids()`` and ``own_pids()`` are asked at every tick (k6 starts after the
    watch, workers restart): the gateway's processes, and all processes whose CPU is the
    run's own (a superset). ``rss()`` is the gateway's RSS (or None). ``on_tick(tick)`` is
    called from this thread after each tick (progress lines).
    """

    def __init__(self, gateway_pids: Callable[[], list[int]], own_pids: Callable[[], list[int]],
                 load_cpus: int, *, interval: float = 1.0, proc_stat: str = PROC_STAT,
                 rss: Callable[[], int | None] | None = None,
                 on_tick: Callable[[Tick], None] | None = None):
        super().__init__(daemon=True, name="machine-watch")
        self.gateway_pids, self.own_pids = gateway_pids, own_pids
        self.load_cpus = load_cpus
        self.interval = interval
        self.proc_stat = proc_stat
        self.rss = rss
        self.on_tick = on_tick
        self.ticks: list[Tick] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._last = self._snapshot()
        self._others0 = all_processes()
        self._ours_seen: set[int] = set()
        self.top_others: list[dict] = []

    def _snapshot(self):
        return time.time(), read_proc_stat(self.proc_stat), cpu_seconds(self.own_pids())

    def tick(self) -> Tick:
        with self._lock:
            t0, stat0, ours0 = self._last
            gw = set(self.gateway_pids())
            t1, stat1, ours1 = now = self._snapshot()
            # A process new since the last tick started inside it: all its CPU is this tick's.
            delta = {pid: s - ours0.get(pid, 0.0) for pid, s in ours1.items()}
            self._ours_seen |= delta.keys()
            ours = sum(delta.values())
            gw_s = sum(d for pid, d in delta.items() if pid in gw) if gw else None
            tick = Tick(t0, t1, gateway_s=gw_s, load_s=ours - (gw_s or 0.0),
                        other_s=max(0.0, (stat1.busy - stat0.busy) - ours),
                        steal_s=stat1.steal - stat0.steal, total_s=stat1.total - stat0.total,
                        rss=self.rss() if self.rss else None)
            self._last = now
            self.ticks.append(tick)
        if self.on_tick is not None:
            self.on_tick(tick)
        return tick

    def run(self):
        while not self._halt.wait(self.interval):
            self.tick()

    def stop(self) -> None:
        """The last (partial) tick, and the other processes that used CPU meanwhile."""
        self._halt.set()
        if self.is_alive():
            self.join(5)
        if time.time() - self._last[0] > 0.05:
            self.tick()
        wall = self.ticks[-1].t1 - self.ticks[0].t0 if self.ticks else 0.0
        self.top_others = top_others(self._others0, all_processes(), self._ours_seen, wall)

    def verdict(self, limits: dict | None = None) -> dict:
        return verdict(self.ticks, self.load_cpus, self.top_others, limits)


def top_others(before: dict, after: dict, ours: set[int], wall: float,
               n: int = TOP_OTHERS) -> list[dict]:
    """The other processes that used the most CPU between two :func:`all_processes`."""
    if wall <= 0:
        return []
    rows = []
    for pid, (s, name) in after.items():
        if pid in ours or pid == os.getpid():
            continue
        used = s - before.get(pid, (0.0, name))[0]
        if used / wall >= 0.01:
            rows.append({"pid": pid, "name": name, "cpu_pct": round(100.0 * used / wall, 1)})
    rows.sort(key=lambda r: -r["cpu_pct"])
    return rows[:n]


def verdict(ticks: list[Tick], load_cpus: int, top: list[dict] | None = None,
            limits: dict | None = None) -> dict:
    """Means over the ticks, the worst second, and whether the machine was quiet."""
    limits = {**QUIET, **(limits or {})}
    seconds = sum(t.t1 - t.t0 for t in ticks)
    if not ticks or seconds <= 0:
        return {"reliable": None, "reasons": ["the machine was not watched"], "seconds": 0}
    pct = lambda s: round(100.0 * s / seconds, 1)  # noqa: E731
    gw = [t.gateway_s for t in ticks]
    total = sum(t.total_s for t in ticks)
    out = {
        "seconds": round(seconds, 1),
        "gateway_cpu_pct": None if None in gw else pct(sum(gw)),
        "load_cpu_pct": pct(sum(t.load_s for t in ticks)),
        "load_cpus": load_cpus,
        "other_cpu_pct": pct(sum(t.other_s for t in ticks)),
        "other_cpu_peak_pct": round(max(t.pct(t.other_s) for t in ticks), 1),
        "steal_pct": round(100.0 * sum(t.steal_s for t in ticks) / total, 2) if total > 0 else 0.0,
        "limits": limits,
        "top_other_processes": list(top or []),
    }
    reasons = []
    if out["other_cpu_pct"] > limits["other_cpu_mean_pct"]:
        reasons.append(f"other processes used {out['other_cpu_pct']:.0f} % of a CPU on average "
                       f"(limit {limits['other_cpu_mean_pct']:g} %)")
    if out["other_cpu_peak_pct"] > limits["other_cpu_peak_pct"]:
        reasons.append(f"other processes used {out['other_cpu_peak_pct']:.0f} % of a CPU in one "
                       f"second (limit {limits['other_cpu_peak_pct']:g} %)")
    if out["steal_pct"] > limits["steal_pct"]:
        reasons.append(f"the hypervisor stole {out['steal_pct']:.1f} % of the CPU time "
                       f"(limit {limits['steal_pct']:g} %)")
    out["reliable"] = not reasons
    out["reasons"] = reasons
    notes = []
    if out["load_cpu_pct"] >= LOAD_SATURATED_PCT * max(1, load_cpus):
        notes.append(f"the load side used {out['load_cpu_pct']:.0f} % of a CPU, on {load_cpus} CPU(s): "
                     "k6 or a service was the bottleneck, and its queueing is in the latencies")
    out["notes"] = notes
    return out


def with_machine(curve: list, ticks: list[Tick]) -> list:
    """Each curve point with the machine's CPU over its window (ticks weighted by overlap)."""
    out = []
    for p in curve:
        w0, w1 = p.window_start, p.window_start + p.window_seconds
        acc = {"gw": 0.0, "load": 0.0, "other": 0.0, "steal": 0.0, "total": 0.0, "wall": 0.0}
        gw_known = True
        for t in ticks:
            f = max(0.0, min(w1, t.t1) - max(w0, t.t0)) / (t.t1 - t.t0)
            if f <= 0:
                continue
            gw_known &= t.gateway_s is not None
            acc["gw"] += f * (t.gateway_s or 0.0)
            acc["load"] += f * t.load_s
            acc["other"] += f * t.other_s
            acc["steal"] += f * t.steal_s
            acc["total"] += f * t.total_s
            acc["wall"] += f * (t.t1 - t.t0)
        if acc["wall"] <= 0:
            out.append(p)
            continue
        share = lambda s: round(100.0 * s / acc["wall"], 1)  # noqa: E731
        out.append(replace(p, gateway_cpu_pct=share(acc["gw"]) if gw_known else None,
                           load_cpu_pct=share(acc["load"]), other_cpu_pct=share(acc["other"]),
                           steal_pct=round(100.0 * acc["steal"] / acc["total"], 1) if acc["total"] else None))
    return out
