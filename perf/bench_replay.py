"""The DPoP replay check: one table for the instance (issue 16) beside a dict per worker.

Three measurements, each printed side by side with the per-worker cache it replaced
(`LocalReplayCache`, an OrderedDict of key → expiry in each worker):

1. **check_and_store**, ns per call through the interface the Authenticator uses, on fresh
   keys (every proof's `jti` is new: the common case) and on replays, in steady state: a
   clock advancing 1 ms per check (1,000 proofs/s) with a 65 s TTL, so ~65,000 entries are
   live and expired ones are being replaced, in a table sized for the default
   `replayCache.maxEntries` (100,000). The shared table compiled (cext/replaytable.pyx) and
   its pure-Python twin.
2. **two processes at once**, the same fresh-key stream split over two forked processes
   that insert into one shared table at the same time (its mutex contended) beside two
   processes with a dict each: ns per check in each process. Both CPUs are needed: run it on
   a quiet machine.
3. **per DPoP request**: `Authenticator.authenticate()` over fresh proofs with real tokens
   and every proof check but the signature's own work (stubbed, as
   perf/stub_signature does), the replay cache swapped between rounds (each a new cache
   holding 65,000 live entries first); µs per request, the median of interleaved rounds.
   The difference is what the choice costs a DPoP request.

4. **instructions** (`--instructions`, ~2 min, needs valgrind): measurement 1 under
   callgrind, which counts what wall-clock time on a shared machine cannot: instructions per
   `check_and_store` on fresh keys in steady state, for a harness whose cache does nothing
   but read the clock, the dict and the compiled table — (Ir(60k checks) − Ir(20k)) / 40k,
   the same start-up and warm-up in both runs.

    python -m perf bench-replay --cpu 1         # 1-3, ~15 s
    python -m perf bench-replay --rounds 5 --proofs 10000
    python -m perf bench-replay --only 4        # instructions under callgrind
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stellagw import _impl
from stellagw._py import replaytable as py_table
from stellagw.auth.replay import LocalReplayCache, SharedReplayCache, replay_key

from . import commands
from ._procs import py_env

MAX_ENTRIES = 100_000
TTL_MS = 65_000
STEP_S = 0.001


def compiled():
    try:
        return importlib.import_module("stellagw._cext.replaytable")
    except ImportError:
        return None


class Clock:
    """A clock that advances STEP_S per read: one read per check_and_store."""

    def __init__(self):
        self.t = 1_000_000.0

    def __call__(self):
        self.t += STEP_S
        return self.t


def stream(n: int, tag: str) -> list[str]:
    jkt = "x" * 43                     # a thumbprint's length; the jti part is what varies
    return [replay_key(jkt, f"{tag}-{i}") for i in range(n)]


def per_call_ns(cache, keys) -> float:
    check = cache.check_and_store
    t = time.perf_counter()
    for k in keys:
        check(k, TTL_MS)
    return (time.perf_counter() - t) / len(keys) * 1e9


def caches(c_mod):
    out = [("per-worker dict (before)", lambda clock: LocalReplayCache(MAX_ENTRIES, clock))]
    if c_mod is not None:
        out.append(("shared table, compiled",
                    lambda clock: SharedReplayCache(c_mod.ReplayTable(MAX_ENTRIES), clock)))
    out.append(("shared table, Python twin",
                lambda clock: SharedReplayCache(py_table.ReplayTable(MAX_ENTRIES), clock)))
    return out


def bench_calls(c_mod, n: int) -> None:
    print(f"1. check_and_store, ns per call (steady state: ~{TTL_MS // 1000}k live of "
          f"{MAX_ENTRIES // 1000}k maxEntries; fresh keys, then replays of them)")
    print(f"   {'cache':28s} {'fresh':>9s} {'replay':>9s}")
    for name, make in caches(c_mod):
        count = n if "twin" not in name else max(2000, n // 20)
        clock = Clock()
        cache = make(clock)
        per_call_ns(cache, stream(150_000 if "twin" not in name else 2000, "warm"))
        keys = stream(count, "run")
        fresh = per_call_ns(cache, keys)
        clock.t -= STEP_S * count           # still live: these are replays
        replay = per_call_ns(cache, keys)
        print(f"   {name:28s} {fresh:9.0f} {replay:9.0f}")


def bench_two_processes(c_mod, n: int) -> None:
    if c_mod is None:
        print("2. two processes: skipped (cext/replaytable.pyx not built)")
        return
    print("2. two processes inserting at the same time, ns per check in each (fresh keys)")
    for name, shared in (("a dict in each (before)", None),
                         ("one shared table, compiled", c_mod.ReplayTable(MAX_ENTRIES))):
        go_r, go_w = os.pipe()
        outs = []
        pids = []
        for p in range(2):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    cpus = sorted(os.sched_getaffinity(0) | set(range(os.cpu_count() or 1)))
                    os.sched_setaffinity(0, {cpus[p % len(cpus)]})
                    clock = Clock()
                    cache = (LocalReplayCache(MAX_ENTRIES, clock) if shared is None
                             else SharedReplayCache(shared, clock))
                    keys = stream(n, f"p{p}")
                    per_call_ns(cache, stream(50_000, f"w{p}"))
                    os.read(go_r, 1)
                    os.write(w, str(per_call_ns(cache, keys)).encode())
                finally:
                    os._exit(0)
            os.close(w)
            outs.append(r)
            pids.append(pid)
        time.sleep(0.5)
        os.write(go_w, b"xx")
        figures = [float(os.read(r, 64)) for r in outs]
        for pid in pids:
            os.waitpid(pid, 0)
        for fd in outs + [go_r, go_w]:
            os.close(fd)
        print(f"   {name:28s} " + "  ".join(f"{f:7.0f}" for f in figures))


def bench_requests(c_mod, proofs: int, rounds: int) -> None:
    import stellagw.auth.dpop as dpop
    from tests.support.auth import (ISSUER_PLACEHOLDER, DpopClient, SigningKey,
                                    dpop_request, make_authenticator, mint_token)
    from stellagw.auth import Identity

    # A module global, compiled or not: the check looks it up on every call.
    dpop.verify_signature = lambda alg, key, signing_input, signature: True
    key = SigningKey("ES256", kid="k1")
    with tempfile.TemporaryDirectory() as tmp:
        auth = make_authenticator(Path(tmp), [key])
    client = DpopClient()
    token = mint_token(key, ISSUER_PLACEHOLDER, cnf={"jkt": client.jkt})
    url = "https://gw.example.com/api/items"
    variants = [("per-worker dict (before)", lambda: LocalReplayCache(MAX_ENTRIES))]
    if c_mod is not None:
        variants.append(("shared table, compiled",
                         lambda: SharedReplayCache(c_mod.ReplayTable(MAX_ENTRIES))))
    print(f"3. Authenticator.authenticate() per DPoP request, µs (signature stubbed; "
          f"{proofs} fresh proofs per round, {rounds} rounds, median; "
          f"stellagw.auth.dpop {'compiled' if _impl.compiled('stellagw.auth.dpop') else 'uncompiled'})")
    print(f"   signing {proofs * rounds * len(variants)} proofs ...", flush=True)
    reqs = [[dpop_request(client, token, proof=client.proof("GET", url, token))
             for _ in range(proofs)] for _ in range(rounds * len(variants))]
    figures = {name: [] for name, _ in variants}
    batch = iter(reqs)
    occupants = stream(65_000, "occupant")
    for _ in range(rounds):
        for name, make in variants:
            auth.replay = make()
            # Occupied as in steady state (and the table's pages touched): ~65k live entries.
            for k in occupants:
                auth.replay.check_and_store(k, TTL_MS)
            auth.authenticate(dpop_request(client, token, proof=client.proof("GET", url, token)), ())
            todo = next(batch)
            authenticate = auth.authenticate
            t = time.perf_counter()
            for req in todo:
                result = authenticate(req, ())
            figures[name].append((time.perf_counter() - t) / len(todo) * 1e6)
            assert isinstance(result, Identity), result
    base = statistics.median(figures[variants[0][0]])
    for name, values in figures.items():
        med = statistics.median(values)
        print(f"   {name:28s} {med:6.2f}  ({' / '.join(f'{v:.2f}' for v in values)})"
              + ("" if name == variants[0][0] else f"  {med - base:+.2f} µs per request"))


class NullCache:
    """What a check costs besides the cache: the call and the clock read."""

    def __init__(self, clock):
        self._clock = clock

    def check_and_store(self, key, ttl_ms):
        return int(self._clock() * 1000) != 0


def ir_child(variant: str, n: int) -> None:
    """One callgrind run: the same keys, warm-up and clock whatever n is."""
    keys = stream(70_000 + 60_000, "ir")
    clock = Clock()
    if variant == "null":
        cache = NullCache(clock)
    elif variant == "dict":
        cache = LocalReplayCache(MAX_ENTRIES, clock)
    else:
        cache = SharedReplayCache(compiled().ReplayTable(MAX_ENTRIES, bytes(16)), clock)
    check = cache.check_and_store
    for k in keys[:70_000]:
        check(k, TTL_MS)
    for k in keys[70_000:70_000 + n]:
        check(k, TTL_MS)


def bench_instructions(c_mod) -> None:
    valgrind = shutil.which("valgrind")
    if valgrind is None or c_mod is None:
        print("4. instructions: skipped (needs valgrind and the compiled table)")
        return
    print("4. instructions per check_and_store under callgrind (fresh keys, steady state)")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("null", "dict", "table"):
            totals = []
            for n in (20_000, 60_000):
                dump = os.path.join(tmp, f"{variant}.{n}")
                subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={dump}",
                                *commands.argv("bench-replay", "--ir-child", variant, str(n))],
                               check=True, capture_output=True,
                               env={**py_env(), "PYTHONHASHSEED": "0"})
                with open(dump) as f:
                    totals.append(next(int(line.split()[1]) for line in f
                                       if line.startswith(("summary:", "totals:"))))
            out[variant] = (totals[1] - totals[0]) / 40_000
    base = out["null"]
    for variant, name in (("null", "no cache (the call, the clock)"),
                          ("dict", "per-worker dict (before)"),
                          ("table", "shared table, compiled")):
        extra = "" if variant == "null" else f"   {out[variant] - base:7,.0f} beyond the call"
        print(f"   {name:32s} {out[variant]:7,.0f}{extra}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200_000, help="checks per figure in 1 and 2")
    ap.add_argument("--proofs", type=int, default=5_000, help="proofs per round in 3")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds in 3")
    ap.add_argument("--only", choices=["1", "2", "3", "4"], help="one measurement")
    ap.add_argument("--instructions", action="store_true", help="also 4 (callgrind, ~2 min)")
    ap.add_argument("--ir-child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, help="pin to this CPU (1 and 3; 2 uses two CPUs)")
    args = ap.parse_args(argv)
    if args.ir_child:
        ir_child(args.ir_child[0], int(args.ir_child[1]))
        return 0
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    c_mod = None if os.environ.get("STELLAGW_NO_EXTENSIONS") else compiled()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"compiled table: {'yes' if c_mod else 'no'}")
    if args.only in (None, "1"):
        bench_calls(c_mod, args.calls)
    if args.only in (None, "2"):
        bench_two_processes(c_mod, args.calls)
    if args.only in (None, "3"):
        bench_requests(c_mod, args.proofs, args.rounds)
    if args.only == "4" or (args.only is None and args.instructions):
        bench_instructions(c_mod)
    return 0

