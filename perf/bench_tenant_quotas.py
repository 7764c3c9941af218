"""What tenant quotas cost the instance tier: RateLimiter.check() in a loop, in process.

    taskset -c 1 python -m perf bench-tenant-quotas                    # this checkout
    taskset -c 1 python -m perf bench-tenant-quotas --before /tmp/old  # and an older copy

One invocation runs every configuration in its own child process (same CPU, same
interpreter), interleaved over --rounds rounds, and prints the median and the best ns per
check of each; --before adds the same base configuration run from another copy of the
package (a directory holding a built `stellagw/`), which answers "did the per-request cost
change for a gateway without tenant rules".

Every request is allowed (limits far above the load): the cost of the common case.
Identities: 1,000 subjects in 100 tenants, taken round robin, one service.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

BASE = """
rate_limiting:
  for_instance:
    rules:
      - {max_requests: 100000000, per_seconds: 1}
      - {max_requests: 1000000000, per_seconds: 60}
"""
TENANT = BASE + """\
    tenant_rules:
      - {max_requests: 100000000, per_seconds: 1}
      - {max_requests: 1000000000, per_seconds: 60}
"""
PLANS = TENANT + """\
  plans:
    gold:
      for_instance:
        tenant_rules: [{max_requests: 2000000000, per_seconds: 60}]
  tenants:
""" + "".join(f"    t{i}: {{plan: gold}}\n" for i in range(0, 100, 2))

CONFIGS = {"base": BASE, "tenant": TENANT, "tenant+plans": PLANS}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(config: str, calls: int, repeats: int) -> None:
    from stellagw.config import load_config_text
    from stellagw.ratelimit import RateLimiter
    from stellagw.ratelimit import window as w

    class Log:
        def event(self, *a, **k):
            pass

    rl = RateLimiter(load_config_text(CONFIGS[config], env={}), Log())
    requests = [(f"sub:user{i}", f"t{i % 100}") for i in range(1000)]
    check = rl.check
    work = (requests * (calls // len(requests) + 1))[:calls]
    best = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for key, tenant in work:
            check(key, tenant, "scanner", "/api/x", "/api/x")
        best.append((time.perf_counter_ns() - t0) / calls)
    assert rl.counters["rejected"]["instance"] == 0
    print(min(best), w._m.__name__)


def main(argv: list[str]) -> int:
    from perf import commands

    ap = argparse.ArgumentParser(prog=commands.prog(__name__),
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--before", help="a directory with an older built stellagw/ package")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    runs = [("after", ROOT, name) for name in CONFIGS]
    if args.before:
        runs.insert(0, ("before", os.path.abspath(args.before), "base"))
    results: dict[tuple[str, str], list[float]] = {(t, c): [] for t, _, c in runs}
    impl = {}
    for _ in range(args.rounds):
        for tree_name, tree, config in runs:
            # The child runs this file by its path with -P, so the only stellagw it can
            # import is the tree's (an older tree may have no perf/ package of this shape).
            env = dict(os.environ, PYTHONPATH=tree)
            out = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), config,
                                  str(args.calls), str(args.repeats)],
                                 env=env, cwd=tree, capture_output=True, text=True, check=True)
            ns, module = out.stdout.split()
            results[tree_name, config].append(float(ns))
            impl[tree_name] = module
    base = statistics.median(results["after", "base"])
    print(f"{'tree':8} {'config':14} {'median ns':>10} {'best ns':>8} {'vs after/base':>14}"
          f"   ({args.rounds} rounds, {args.calls} checks x best of {args.repeats})")
    for (tree_name, config), values in results.items():
        med = statistics.median(values)
        print(f"{tree_name:8} {config:14} {med:10.1f} {min(values):8.1f} {med - base:+14.1f}"
              f"   {impl[tree_name]}")
    return 0


if __name__ == "__main__":  # the child of main(): config, calls, repeats
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
