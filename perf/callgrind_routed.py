"""Regression guard: user-space instructions per routed request, under callgrind (issue 8).

Instruction counts repeat from run to run where timings do not (perf/README.md, Method), so this is
the figure to compare between commits. One command::

    python -m perf callgrind                       # ~40 s
    python -m perf callgrind --n1 2000 --n2 6000 --no-history --keep-dumps /tmp/cg

What it does:

1. writes a gateway config (1 worker, free ports, access log off, and the health timers
   pushed out to an hour so no heartbeat / health check lands in a measured window);
2. starts ``valgrind --tool=callgrind --instr-atstart=no python -m stellagw serve`` pinned to
   ``--server-cpu`` (``PYTHONHASHSEED=0``; pymalloc unless ``--malloc``), and
   ``python -m stellagw demo-service --name bench`` *outside* valgrind on ``--load-cpu``;
3. switches instrumentation on (``callgrind_control -i on``: vgdb reaches the process even
   while it sleeps in epoll_wait), sends ``--warmup`` requests, then measures windows with
   ``callgrind_control -z`` / ``--dump``: an **idle** window (``--idle`` seconds, no
   requests: what the 1-second tick costs), a window of ``--n1`` and one of ``--n2`` routed
   requests (``GET /bench/hello``, one keep-alive connection, one request at a time, so
   every request is the same read → frame → frame → write sequence);
4. instructions per routed request = (Ir(n2) − Ir(n1)) / (n2 − n1), each window's Ir taken
   **without uvloop's timer callbacks** (inclusive Ir of ``TimerHandle._run`` from
   ``callgrind_annotate``): the worker's 1-second tick (~260k Ir: date, deadlines, log flush,
   metrics) and the timeout wheel fire per second of wall time, and a callgrind second holds
   ~50x fewer requests than a native one, so left in they would add ±1 tick / (n2 − n1)
   of noise and a slowdown-dependent share. What a window costs besides requests (the zero
   and dump commands) cancels in the difference. The figure with timers left in, and per
   window with the idle rate subtracted, are printed as cross-checks;
5. appends ``date, commit, dirty, instructions/request, ...`` to
   ``perf/callgrind_history.csv`` and prints the line.

Only the gateway process is counted (user space, all its threads); the service and the
client run natively. Loopback only; every process is stopped at the end.
"""
from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import _procs, commands
from .compare import measuring
from ._procs import HOST, PERF_DIR, REPO_DIR
from .provenance import commit, dirty_files

HISTORY = PERF_DIR / "callgrind_history.csv"
HISTORY_FIELDS = ["date_utc", "commit", "dirty_files", "instr_per_request", "timers_excluded",
                  "instr_per_request_with_timers", "n1", "n2",
                  "ir_n1", "ir_n2", "idle_ir_per_s", "per_req_n1_idle_corrected",
                  "per_req_n2_idle_corrected", "raw_instr_per_request", "warmup", "pymalloc",
                  "python", "valgrind", "wall_s"]


def git_info() -> tuple[str, int | None]:
    """HEAD and the number of changed files in the compiled code."""
    dirty = dirty_files("stellagw", "cext")
    return commit()[0] or "unknown", None if dirty is None else len(dirty)


class Client:
    """One keep-alive connection; one request at a time; checks every response is 200."""

    def __init__(self, port: int, path: str):
        self.req = f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
        self.sock = socket.create_connection((HOST, port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def one(self) -> int:
        self.sock.sendall(self.req)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = self.buf[:end].decode("latin-1")
                m = re.search(r"(?im)^content-length:\s*(\d+)", head)
                if not m:
                    raise RuntimeError(f"response without content-length: {head!r}")
                total = end + 4 + int(m.group(1))
                if len(self.buf) >= total:
                    status = int(head.split(" ", 2)[1])
                    self.buf = self.buf[total:]
                    return status
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("gateway closed the connection")
            self.buf += chunk

    def many(self, n: int) -> None:
        for i in range(n):
            status = self.one()
            if status != 200:
                raise RuntimeError(f"request {i} answered {status}")

    def close(self) -> None:
        self.sock.close()


def control(pid: int, *args: str, timeout: float = 120) -> str:
    r = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0 or "Error" in r.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed: {r.stdout}{r.stderr}")
    return r.stdout


def dump_total(outdir: Path, before: set[Path]) -> tuple[int, Path]:
    """Ir of the newest dump file (callgrind writes <out>.<n> per dump)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        new = sorted(set(outdir.glob("callgrind.out*")) - before, key=lambda p: p.stat().st_mtime)
        for p in reversed(new):
            text = p.read_text(errors="replace")
            m = re.search(r"^(?:summary|totals):\s*(\d+)", text, re.M)
            if m:
                return int(m.group(1)), p
        time.sleep(0.1)
    raise RuntimeError("no callgrind dump appeared")


TIMER_FN = re.compile(r"^\s*([\d,]+)\s.*:__pyx_f_6uvloop_4loop_11TimerHandle__run(?:'\d+)?\s")


def timer_ir(dump: Path) -> int | None:
    """Inclusive Ir of uvloop's TimerHandle._run in a dump: every call_later callback
    (the worker's 1-second tick, the timeout wheel's turns). They fire per second of wall
    time, and under callgrind a second holds ~50x fewer requests than natively, so they are
    taken out of the per-request figure. None when the symbol is not found."""
    if not shutil.which("callgrind_annotate"):
        return None
    r = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(dump)],
                       capture_output=True, text=True, timeout=120)
    total, found = 0, False
    for line in r.stdout.splitlines():
        m = TIMER_FN.match(line)
        if m:
            total += int(m.group(1).replace(",", ""))
            found = True
    return total if found else None


def measure_window(pid: int, outdir: Path, label: str, work) -> tuple[int, float, int | None]:
    control(pid, "-z")
    before = set(outdir.glob("callgrind.out*"))
    t0 = time.monotonic()
    work()
    wall = time.monotonic() - t0
    control(pid, f"--dump={label}")
    ir, path = dump_total(outdir, before)
    return ir, wall, timer_ir(path)


def measure_server(args, pid: int, port: int, path: str, outdir: Path, name: str) -> dict:
    """Instrument, warm up, then the idle / n1 / n2 windows; returns the figures."""
    control(pid, "-i", "on")
    client = Client(port, path)
    say = lambda m: print(f"[callgrind] {name}: {m}", file=sys.stderr, flush=True)  # noqa: E731
    say(f"instrumented; {args.warmup} warm-up requests ...")
    client.many(args.warmup)
    time.sleep(0.5)
    idle_ir, idle_wall, idle_t = measure_window(pid, outdir, f"{name}-idle", lambda: time.sleep(args.idle))
    idle_rate = idle_ir / idle_wall
    say(f"idle: {idle_ir:,} Ir in {idle_wall:.1f}s")
    ir1, w1, t1 = measure_window(pid, outdir, f"{name}-n{args.n1}", lambda: client.many(args.n1))
    say(f"{args.n1} requests: {ir1:,} Ir in {w1:.1f}s")
    ir2, w2, t2 = measure_window(pid, outdir, f"{name}-n{args.n2}", lambda: client.many(args.n2))
    say(f"{args.n2} requests: {ir2:,} Ir in {w2:.1f}s")
    client.close()
    dn = args.n2 - args.n1
    raw_per_req = (ir2 - ir1) / dn
    t1_, t2_ = t1 or 0, t2 or 0      # no timer ran at all (raw server): nothing to take out
    timers_known = (t1 is not None and t2 is not None) or name == "raw"
    per_req = ((ir2 - t2_) - (ir1 - t1_)) / dn if timers_known else raw_per_req
    return {
        "instr_per_request": round(per_req),
        "timers_excluded": timers_known,
        "instr_per_request_with_timers": round(raw_per_req),
        "timer_ir_n1": t1, "timer_ir_n2": t2, "timer_ir_idle": idle_t,
        "n1": args.n1, "n2": args.n2, "ir_n1": ir1, "ir_n2": ir2,
        "wall_n1_s": round(w1, 2), "wall_n2_s": round(w2, 2),
        "idle_ir_per_s": round(idle_rate),
        "per_req_n1_idle_corrected": round((ir1 - idle_rate * w1) / args.n1),
        "per_req_n2_idle_corrected": round((ir2 - idle_rate * w2) / args.n2),
    }


def run(args) -> dict:
    for tool in ("valgrind", "callgrind_control"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found (apt-get install valgrind)")
    pin = measuring.decide_pinning(args.server_cpu, args.load_cpu, args.no_pin)
    t_start = time.monotonic()
    head, dirty = git_info()
    vg_version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    result: dict = {"commit": head, "dirty_files": dirty, "warmup": args.warmup,
                    "pymalloc": not args.malloc, "python": sys.version.split()[0],
                    "valgrind": vg_version}
    env = _procs.py_env()
    env["PYTHONHASHSEED"] = "0"
    if args.malloc:
        env["PYTHONMALLOC"] = "malloc"
    with tempfile.TemporaryDirectory(prefix="stellagw-callgrind-") as tmpname:
        tmp = Path(tmpname)
        outdir = Path(args.keep_dumps) if args.keep_dumps else tmp
        outdir.mkdir(parents=True, exist_ok=True)
        vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
              f"--callgrind-out-file={outdir}/callgrind.out.%p", "--vgdb=yes"]
        # our client runs next to the service, off the server's CPU
        if pin.enabled:
            os.sched_setaffinity(0, {pin.load_cpu})

        # -- the gateway, routed ----------------------------------------------------------
        procs = measuring.ProcSet(tmp)
        try:
            http_port, tcp_port = _procs.free_port(), _procs.free_port()
            cfg = tmp / "gateway.yaml"
            cfg.write_text(
                "# written by python -m perf callgrind\n"
                "gateway:\n"
                "  node: {workers: 1}\n"
                f"  http: {{host: {HOST}, port: {http_port}}}\n"
                f"  transports: {{tcp: {{host: {HOST}, port: {tcp_port}}}}}\n"
                "  logging: {accessLog: false}\n"
                "  health: {heartbeatIntervalSeconds: 3600, degradedAfterSeconds: 7200,\n"
                "           heartbeatTimeoutSeconds: 7200, checkIntervalSeconds: 3600}\n")
            gw_cmd = pin.wrap(pin.server_cpu, [*vg, sys.executable, "-m", "stellagw", "serve",
                                               "--config", str(cfg)])
            result["gateway_cmd"] = shlex.join(gw_cmd)
            print("[callgrind] starting the gateway under callgrind ...", file=sys.stderr, flush=True)
            gw = procs.start("gateway", gw_cmd, env=env)
            measuring.wait_http_ok(http_port, "/health/live", procs, args.start_timeout)
            svc = procs.start("service", pin.wrap(pin.load_cpu, [
                sys.executable, "-m", "stellagw", "demo-service", "--gateway",
                f"{HOST}:{tcp_port}", "--name", "bench"]), env=_procs.py_env())
            measuring.wait_http_ok(http_port, "/bench/hello", procs, args.start_timeout)
            result["service_cmd"] = shlex.join(svc.cmd)
            # valgrind runs python in this very process (taskset and valgrind exec)
            result.update(measure_server(args, gw.popen.pid, http_port, "/bench/hello", outdir, "gateway"))
            procs.check_alive()
        finally:
            procs.stop_all()

        # -- the baseline: raw uvloop + httptools hello server, the same way ---------------
        if not args.no_raw:
            procs = measuring.ProcSet(tmp)
            try:
                port = _procs.free_port()
                raw_cmd = pin.wrap(pin.server_cpu, [*vg, *commands.argv(
                    "raw-server", "--host", HOST, "--port", str(port))])
                result["raw_cmd"] = shlex.join(raw_cmd)
                print("[callgrind] starting the raw server under callgrind ...", file=sys.stderr, flush=True)
                raw = procs.start("raw", raw_cmd, env=env)
                measuring.wait_http_ok(port, "/", procs, args.start_timeout)
                r = measure_server(args, raw.popen.pid, port, "/", outdir, "raw")
                result["raw_instr_per_request"] = r["instr_per_request"]
                result["raw_detail"] = r
                procs.check_alive()
            finally:
                procs.stop_all()
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    result["date_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return result


def previous_entry(path: Path) -> dict | None:
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError:
        return None
    return rows[-1] if rows else None


def append_history(result: dict, path: Path) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(result)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--warmup", type=int, default=500, help="requests before measuring (default 500)")
    ap.add_argument("--n1", type=int, default=1000, help="requests in the first window (default 1000)")
    ap.add_argument("--n2", type=int, default=3000, help="requests in the second window (default 3000)")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of the idle window (default 3)")
    ap.add_argument("--malloc", action="store_true", help="PYTHONMALLOC=malloc (default: pymalloc)")
    ap.add_argument("--no-raw", action="store_true",
                    help="skip the baseline (the raw server measured the same way)")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--start-timeout", type=float, default=120.0)
    ap.add_argument("--history", default=str(HISTORY), help=f"CSV to append to (default {HISTORY.relative_to(REPO_DIR)})")
    ap.add_argument("--no-history", action="store_true", help="do not append to the CSV")
    ap.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    ap.add_argument("--keep-dumps", metavar="DIR",
                    help="write the callgrind dumps there and keep them (for callgrind_annotate); "
                         "default: a temporary directory, removed")
    args = ap.parse_args(argv)
    if not 0 < args.n1 < args.n2:
        ap.error("need 0 < --n1 < --n2")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = commands.command_line(__name__, argv)
    _procs.stop_on_sigterm()
    try:
        res = run(args)
    except (measuring.TargetFailed, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"callgrind_routed: FAILED: {exc}", file=sys.stderr)
        return 1
    res["command"] = command
    res["previous"] = previous_entry(Path(args.history))
    if not args.no_history:
        append_history(res, Path(args.history))
    dirty = res["dirty_files"]
    how = ("timer callbacks excluded" if res["timers_excluded"]
           else "uvloop TimerHandle._run not found: timers INCLUDED")
    print(f"instructions per routed request (gateway, user space): {res['instr_per_request']:,}"
          f"   [(Ir({res['n2']}) − Ir({res['n1']})) / {res['n2'] - res['n1']}, {how}]")
    print(f"  with the timer callbacks (1-s tick, timeout wheel) left in: "
          f"{res['instr_per_request_with_timers']:,}; timers per window: "
          f"{res['timer_ir_n1']} / {res['timer_ir_n2']} Ir (idle {res['timer_ir_idle']} Ir in {args.idle:g} s)")
    print(f"  windows: {res['n1']} req → {res['ir_n1']:,} Ir ({res['wall_n1_s']} s), "
          f"{res['n2']} req → {res['ir_n2']:,} Ir ({res['wall_n2_s']} s); idle tick cost "
          f"{res['idle_ir_per_s']:,} Ir/s; per request with idle subtracted: "
          f"{res['per_req_n1_idle_corrected']:,} / {res['per_req_n2_idle_corrected']:,}")
    print(f"  commit {res['commit']}" + (f" + {dirty} uncommitted file(s) in stellagw/ cext/"
                                         if dirty else "") +
          f"; {'pymalloc' if res['pymalloc'] else 'PYTHONMALLOC=malloc'}; {res['valgrind']}; "
          f"{res['wall_s']} s")
    if res.get("raw_instr_per_request"):
        print(f"baseline, raw uvloop+httptools server measured the same way: "
              f"{res['raw_instr_per_request']:,} instructions per request → gateway = "
              f"{res['instr_per_request'] / res['raw_instr_per_request']:.1f}× raw")
    prev = res.get("previous")
    if prev:
        try:
            pv = int(float(prev["instr_per_request"]))
            print(f"previous entry in the history: {pv:,} ({prev['commit'][:12]}, {prev['date_utc']}) → "
                  f"{res['instr_per_request'] - pv:+,} ({(res['instr_per_request'] / pv - 1) * 100:+.2f}%)")
        except (KeyError, ValueError):
            pass
    print(f"  gateway: {res['gateway_cmd']}")
    if res.get("raw_cmd"):
        print(f"  raw    : {res['raw_cmd']}")
    if not args.no_history:
        print(f"  appended to {args.history}")
    print(f"command: {command}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0

