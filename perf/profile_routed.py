"""Profile the gateway on the routed path under wrk load (issue 7 part 5)::

    python -m perf profile flamegraph     # py-spy -> perf/results/flamegraph.svg (make flamegraph)
    python -m perf profile perf-stat      # perf stat -e instructions,cycles (make perf-stat)
    python -m perf profile kernel         # syscalls, packets and CPU per request by where it goes

Both start what ``python -m perf compare --targets gateway-routed`` starts -- ``python -m stellagw
serve`` (supervisor + 1 worker, pinned to ``--server-cpu``) and ``python -m stellagw
demo-service --name bench`` next to wrk on ``--load-cpu`` -- warm up 1 s, then keep
``wrk -t1 -c64 GET /bench/hello`` running while the profiler watches the gateway's processes
for ``--duration`` seconds (10 by default).  ``--target gateway-routed-rl-instance`` /
``gateway-routed-rl-env`` profiles the same path with rate limiting on (compare's targets).  Loopback only, bounded, every process stopped
at the end (perf/_procs.py's process handling).

* ``flamegraph``: ``py-spy record --subprocesses --native -p <supervisor>`` (Python frames
  plus the C/Cython ones: uvloop, httptools, stellagw._cext), SVG written to ``--out``.
  Native unwinding stops the worker for each sample (py-spy has no non-blocking native
  mode), so req/s under the profiler reads lower; ``--no-native`` samples without stopping
  it (Python frames only).
* ``perf-stat``: ``perf stat -e instructions,cycles,task-clock -p <gateway pids>``; prints
  instructions and cycles per request (requests = wrk's rate x the window).  Virtual
  machines often expose no hardware counters: then it prints "not supported here" with the
  reason, and the task-clock per request that the software counter still gives.  No
  ``perf`` at all (Debian: ``apt-get install linux-perf``) is reported the same way.
  Exit status 0 in both cases: "not supported" is an answer, not a failure.

For instruction counts that repeat from run to run use ``python -m perf callgrind``
(``make callgrind``).
"""
from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _procs, commands
from .compare import measuring
from .compare.targets import ALL_TARGETS, TARGETS
from ._procs import PERF_DIR, REPO_DIR

RESULTS = PERF_DIR / "results"


def log(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


def gateway_pids(st: measuring.Started) -> list[int]:
    return [p.pid for p in _procs.tree([st.measured[0].popen.pid])]


def start_load(procs: measuring.ProcSet, s: measuring.Settings, st: measuring.Started, seconds: int) -> _procs.Proc:
    cmd = measuring.wrk_cmd(s, st.port, st.path, s.connections, seconds, st.pin)
    log("load: " + shlex.join(cmd))
    return procs.start("wrk-profile", cmd)


def finish_load(procs: measuring.ProcSet, wrk: _procs.Proc, seconds: int) -> dict:
    try:
        wrk.popen.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        raise measuring.TargetFailed("wrk did not finish") from None
    procs.procs.remove(wrk)
    text = wrk.log.read_text(errors="replace")
    if wrk.popen.returncode != 0:
        raise measuring.TargetFailed(f"wrk exited {wrk.popen.returncode}:\n{text}")
    return measuring.parse_wrk(text)


def under_load(args, s: measuring.Settings, procs: measuring.ProcSet, st: measuring.Started,
               cmd: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the profiler ``cmd`` while wrk loads the target (from 1 s before it to 2 s past
    --duration); returns the profiler's result and wrk's figures."""
    wrk = start_load(procs, s, st, args.duration + 2)
    time.sleep(1)
    log("$ " + shlex.join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 60)
    return r, finish_load(procs, wrk, args.duration + 2)


def flamegraph(args, s: measuring.Settings, procs: measuring.ProcSet, st: measuring.Started) -> int:
    pyspy = shutil.which("py-spy")
    if not pyspy:
        print("flamegraph: not supported here: py-spy not found (pip install py-spy)")
        return 0
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    root = st.measured[0].popen.pid
    cmd = [pyspy, "record", "--subprocesses", "-p", str(root), "--duration", str(args.duration),
           "--rate", str(args.rate), "--format", "flamegraph", "-o", str(out)]
    # --native needs the target stopped while its stack is read (py-spy refuses it with
    # --nonblocking): each sample pauses the worker for a moment, so req/s reads lower.
    cmd += ["--native"] if args.native else ["--nonblocking"]
    # py-spy samples from the load CPU: the measured worker keeps its CPU.
    cmd = s.pin.wrap(s.pin.load_cpu, cmd)
    r, load = under_load(args, s, procs, st, cmd)
    if r.returncode != 0 or not out.exists():
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        print(f"flamegraph: py-spy failed (exit {r.returncode}): " + " | ".join(tail))
        if args.native:
            print("  try again without native frames: python -m perf profile flamegraph --no-native")
        return 1
    samples = re.search(r"Samples: (\d+)", r.stdout + r.stderr)
    print(f"flamegraph: {out.relative_to(REPO_DIR) if out.is_relative_to(REPO_DIR) else out} "
          f"({out.stat().st_size / 1024:.0f} KiB"
          + (f", {samples.group(1)} samples" if samples else "")
          + f"; gateway under {load['req_per_s']:,.0f} req/s on {st.path}, "
          f"{'native + ' if args.native else ''}Python frames, {args.duration} s at {args.rate} Hz)")
    print(f"  layout: {st.layout}")
    print(f"  py-spy: {shlex.join(cmd)}")
    return 0


PERF_EVENTS = ("instructions", "cycles", "task-clock")


def perf_stat(args, s: measuring.Settings, procs: measuring.ProcSet, st: measuring.Started) -> int:
    perf = shutil.which("perf")
    if not perf:
        print("perf-stat: not supported here: `perf` is not installed "
              "(Debian: apt-get install linux-perf)")
        return 0
    pids = gateway_pids(st)
    outfile = Path(args.tmp) / "perf-stat.csv"
    cmd = [perf, "stat", "-x", ",", "-o", str(outfile), "-e", ",".join(PERF_EVENTS),
           "-p", ",".join(map(str, pids)), "--", "sleep", str(args.duration)]
    cmd = s.pin.wrap(s.pin.load_cpu, cmd)
    r, load = under_load(args, s, procs, st, cmd)
    text = outfile.read_text(errors="replace") if outfile.exists() else ""
    if r.returncode != 0 and not text:
        why = (r.stderr or r.stdout).strip().splitlines()
        print(f"perf-stat: not supported here: perf stat failed (exit {r.returncode}): "
              + (why[-1] if why else "no output")
              + " (kernel.perf_event_paranoid, a container without CAP_PERFMON/CAP_SYS_ADMIN?)")
        return 0
    values: dict[str, float | None] = {}
    for line in text.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[2] in PERF_EVENTS:
            try:
                values[f[2]] = float(f[0])
            except ValueError:          # "<not supported>" / "<not counted>"
                values[f[2]] = None
    n = load["req_per_s"] * args.duration     # requests in the window, at wrk's rate
    who = ("the gateway's one process: with workers: 1 the supervisor runs the worker itself"
           if len(pids) == 1 else "supervisor + workers")
    print(f"perf-stat: gateway pid(s) {','.join(map(str, pids))} ({who}), {args.duration} s "
          f"under {load['req_per_s']:,.0f} req/s (~{n:,.0f} requests in the window)")
    hw = [e for e in ("instructions", "cycles") if values.get(e) is not None]
    if hw:
        for e in hw:
            print(f"  {e:<12} {values[e]:>16,.0f}   {values[e] / n:>10,.0f} per request")
        if len(hw) == 2 and values["cycles"]:
            print(f"  IPC          {values['instructions'] / values['cycles']:.2f}")
    else:
        print("  instructions, cycles: not supported here: the CPU's hardware counters are not "
              "exposed to this machine (a VM without a virtual PMU; perf says <not supported>)")
    if values.get("task-clock") is not None:
        print(f"  task-clock   {values['task-clock']:>16,.1f} ms  {values['task-clock'] * 1e3 / n:>10,.1f} "
              "CPU-µs per request (software counter)")
    print(f"  layout: {st.layout}")
    print(f"  perf: {shlex.join(cmd)}")
    return 0


# The syscalls a proxy spends a request on, counted per request by `kernel` (tracepoints).
SYSCALLS = ("read", "write", "readv", "writev", "recvfrom", "sendto", "recvmsg", "sendmsg",
            "epoll_wait", "epoll_pwait", "epoll_ctl")
# Where `kernel` splits the CPU time: the first of these entry points on a sample's stack
# names its share; a sample with no syscall on its stack is user space.
SHARES = (("write", ("ksys_write", "do_writev", "__sys_sendto", "__sys_sendmsg")),
          ("read", ("ksys_read", "do_readv", "__sys_recvfrom", "__sys_recvmsg")),
          ("epoll", ("do_epoll_wait", "do_epoll_pwait.part.0", "__x64_sys_epoll_pwait",
                     "__x64_sys_epoll_wait")))


def cpu_shares(script: str) -> dict[str, float]:
    """`perf script -F period,ip,sym` of call-stack samples -> {share: ns} (SHARES, "other
    kernel" for any other syscall, "user space" for a sample outside every syscall)."""
    shares: dict[str, float] = {}
    for sample in script.split("\n\n"):
        lines = sample.strip().splitlines()
        if not lines:
            continue
        period = float(lines[0].split()[0])
        frames = {ln.split()[-1] for ln in lines[1:] if ln.split()}
        name = next((n for n, entries in SHARES if frames & set(entries)), None)
        if name is None:
            name = "other kernel" if "entry_SYSCALL_64_after_hwframe" in frames else "user space"
        shares[name] = shares.get(name, 0.0) + period
    return shares


def kernel(args, s: measuring.Settings, procs: measuring.ProcSet, st: measuring.Started) -> int:
    """Per request under load: the syscalls made and packets sent (perf stat on
    tracepoints), then where the CPU time goes (perf record of cpu-clock with call
    stacks): in write, read and epoll syscalls -- each including the kernel work it triggers,
    on loopback the peer's receive path and its wake-up -- and in user space."""
    perf = shutil.which("perf")
    if not perf:
        print("kernel: not supported here: `perf` is not installed (Debian: apt-get install linux-perf)")
        return 0
    pids = ",".join(map(str, gateway_pids(st)))
    events = [f"syscalls:sys_enter_{n}" for n in SYSCALLS] + ["net:net_dev_xmit", "context-switches"]
    out = Path(args.tmp) / "kernel-stat.csv"
    cmd = s.pin.wrap(s.pin.load_cpu, [perf, "stat", "-x", ",", "-o", str(out), "-e", ",".join(events),
                                      "-p", pids, "--", "sleep", str(args.duration)])
    r, load = under_load(args, s, procs, st, cmd)
    text = out.read_text(errors="replace") if out.exists() else ""
    if r.returncode != 0 and not text:
        why = (r.stderr or r.stdout).strip().splitlines()
        print(f"kernel: not supported here: perf stat failed (exit {r.returncode}): "
              + (why[-1] if why else "no output") + " (tracepoints need root or perf_event_paranoid <= -1)")
        return 0
    n = load["req_per_s"] * args.duration
    print(f"kernel: {args.target} pid(s) {pids}, {args.duration} s under {load['req_per_s']:,.0f} req/s")
    for line in text.splitlines():
        f = line.split(",")
        if len(f) >= 3 and f[0].replace(".", "", 1).isdigit() and float(f[0]) > 0:
            name = f[2].replace("syscalls:sys_enter_", "")
            print(f"  {name:<18} {float(f[0]) / n:8.3f} per request")
    data = Path(args.tmp) / "kernel.data"
    cmd = s.pin.wrap(s.pin.load_cpu, [perf, "record", "-q", "-e", "cpu-clock", "-F", "2000", "-g",
                                      "-o", str(data), "-p", pids, "--", "sleep", str(args.duration)])
    r, load = under_load(args, s, procs, st, cmd)
    script = subprocess.run([perf, "script", "-i", str(data), "-F", "period,ip,sym"],
                            capture_output=True, text=True, timeout=300)
    if r.returncode != 0 or script.returncode != 0:
        print("kernel: perf record failed: " + (r.stderr or script.stderr).strip()[-300:])
        return 0
    shares = cpu_shares(script.stdout)
    total = sum(shares.values())
    n = load["req_per_s"] * args.duration
    print(f"  CPU per request (perf record, {args.duration} s at {load['req_per_s']:,.0f} req/s): "
          f"{total / 1e3 / n:.1f} µs")
    for name in ("write", "read", "epoll", "other kernel", "user space"):
        if name in shares:
            print(f"  {name:<18} {shares[name] / 1e3 / n:6.2f} µs  {100 * shares[name] / total:5.1f} %")
    print(f"  layout: {st.layout}")
    return 0


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("flamegraph", "perf-stat", "kernel"))
    ap.add_argument("--duration", type=int, default=10, help="seconds profiled (default 10)")
    ap.add_argument("--out", default=str(RESULTS / "flamegraph.svg"),
                    help="flamegraph SVG (default perf/results/flamegraph.svg)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (default 250)")
    ap.add_argument("--no-native", dest="native", action="store_false",
                    help="py-spy without native (C/Cython) frames")
    ap.add_argument("--target", default="gateway-routed",
                    choices=[t for t in ALL_TARGETS if t.startswith("gateway-routed") and t != "gateway-routed-2w"]
                    + ["nginx"],
                    help="which compare target to profile (default gateway-routed; "
                         "gateway-routed-rl-env profiles the environment rate-limit check; "
                         "nginx, for `kernel` only, the same figures for nginx)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    args = ap.parse_args(argv)
    if args.target == "nginx" and args.what != "kernel":
        ap.error("--target nginx is for `kernel` only")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk not found: run `sh perf/install-tools.sh`", file=sys.stderr)
        return 2
    pin = measuring.decide_pinning(args.server_cpu, args.load_cpu, args.no_pin)
    s = measuring.Settings(args.duration, args.connections, 1, 0, 0, args.start_timeout, pin,
                     sys.executable)
    _procs.stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="stellagw-profile-") as tmpname:
        args.tmp = tmpname
        procs = measuring.ProcSet(Path(tmpname))
        try:
            st = TARGETS[args.target](s, procs, Path(tmpname))
            measuring.run_wrk(procs, measuring.wrk_cmd(s, st.port, st.path, s.connections, measuring.WARMUP_S, st.pin),
                        measuring.WARMUP_S)
            procs.check_alive()
            fn = {"flamegraph": flamegraph, "perf-stat": perf_stat, "kernel": kernel}[args.what]
            return fn(args, s, procs, st)
        except (measuring.TargetUnavailable, measuring.TargetFailed, subprocess.TimeoutExpired) as exc:
            print(f"{args.what}: FAILED: {exc}")
            return 1
        finally:
            procs.stop_all()

