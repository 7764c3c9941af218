"""Rate-limit window throughput: compiled WindowLimiter vs the pure-Python twin.

A seeded stream of (key, now_ms) checks — by default 10,000 keys with a skewed (Zipf-like)
popularity, a clock advancing 20 µs per check (50,000 checks/s, the per-instance
target), the example configuration's instance rules [(100, 1 s), (1000, 60 s)] — is first run through both
implementations to check that they agree, then each is measured for about --duration
seconds in the same run. The activation gate's FiveMinuteCounter (add + count per request)
and evict_idle() are measured too.

    make build
    python -m perf bench-window                      # both, ~2 s each
    python -m perf bench-window --only c --duration 10
    perf record -g python -m perf bench-window --only c --duration 10   # then: perf report
"""
from __future__ import annotations

import argparse
import importlib
import random
import sys
import time

from stellagw._py import window as py_window

from . import commands


def stream(keys: int, n: int, step_us: int, seed: int) -> list[tuple[str, int]]:
    rnd = random.Random(seed)
    names = [f"t{i % 97}/u{i}:svc{i % 13}" for i in range(keys)]
    weights = [1.0 / (i + 1) for i in range(keys)]
    picks = rnd.choices(names, weights, k=n)
    return [(key, 1_700_000_000_000 + i * step_us // 1000) for i, key in enumerate(picks)]


def measure(fn, checks, duration: float, rebase) -> float:
    """Calls per second of fn(key, now_ms) over checks, repeated for ~duration seconds; the
    clock keeps moving forward across repetitions (rebase gives the offset per round)."""
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    rounds = 0
    while True:
        offset = rebase(rounds)
        for key, now in checks:
            fn(key, now + offset)
        count += len(checks)
        rounds += 1
        t = time.perf_counter()
        if t >= deadline:
            return count / (t - start)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (2)")
    ap.add_argument("--keys", type=int, default=10_000, help="distinct keys (10000)")
    ap.add_argument("--checks", type=int, default=200_000, help="checks in the stream (200000)")
    ap.add_argument("--step-us", type=int, default=20, help="clock advance per check, µs (20)")
    ap.add_argument("--rules", default="100/1,1000/60", help="max/seconds,... (100/1,1000/60)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["c", "py"], action="append",
                    help="measure only these implementations (repeatable)")
    args = ap.parse_args(argv)

    rules = [tuple(int(x) for x in r.split("/")) for r in args.rules.split(",")]
    checks = stream(args.keys, args.checks, args.step_us, args.seed)
    span_ms = checks[-1][1] - checks[0][1] + 1
    try:
        c_window = importlib.import_module("stellagw._cext.window")
    except ImportError as exc:
        print(f"compiled window not built ({exc}); run: python setup.py build_ext --inplace")
        c_window = None
    impls = {}
    if c_window is not None:
        impls["c"] = ("WindowLimiter (Cython)", c_window)
    impls["py"] = ("WindowLimiter (pure Python)", py_window)
    if args.only:
        impls = {k: v for k, v in impls.items() if k in args.only}

    # Agreement first: a fast wrong limiter is worthless.
    results = {k: [] for k in impls}
    for key, (_, mod) in impls.items():
        lim = mod.WindowLimiter(rules)
        results[key] = [lim.hit(k, now) for k, now in checks]
    denied = 0
    if "c" in results and "py" in results:
        for i, (a, b) in enumerate(zip(results["c"], results["py"])):
            if a != b:
                print(f"DISAGREE at check {i} {checks[i]}: c={a} py={b}")
                return 1
    first = next(iter(results.values()))
    denied = sum(1 for r in first if not r[0])

    print(f"rules {rules}, {args.keys} keys, {len(checks)} checks over {span_ms / 1000:g} s of "
          f"fake clock ({denied} denied); {args.duration:g} s per measurement; "
          f"Python {sys.version.split()[0]}")
    rates = {}
    for key, (label, mod) in impls.items():
        lim = mod.WindowLimiter(rules)
        rate = measure(lim.hit, checks, args.duration, lambda r: r * span_ms)
        rates[key] = rate
        print(f"  hit()        {label:28s} {rate:12,.0f} checks/s  {1e9 / rate:7.0f} ns/check"
              f"  ({len(lim)} keys held)")
    if "c" in rates and "py" in rates:
        print(f"  compiled is {rates['c'] / rates['py']:.1f}x the twin")

    for key, (label, mod) in impls.items():
        gate = mod.FiveMinuteCounter()

        def gate_check(_key, now, add=gate.add, count=gate.count):
            add(now)
            count(now)
        rate = measure(gate_check, checks, args.duration, lambda r: r * span_ms)
        label = label.replace("WindowLimiter", "FiveMinuteCounter")
        print(f"  add+count    {label:28s} {rate:12,.0f} /s        {1e9 / rate:7.0f} ns")

    for key, (label, mod) in impls.items():
        lim = mod.WindowLimiter(rules, max_keys=max(args.keys, 1))
        for k, now in checks:
            lim.hit(k, now)
        held = len(lim)
        t0 = time.perf_counter()
        dropped = lim.evict_idle(checks[-1][1] + 60_000)
        dt = time.perf_counter() - t0
        print(f"  evict_idle() {label:28s} {dropped:,} of {held:,} keys in {dt * 1e3:.2f} ms")
    return 0

