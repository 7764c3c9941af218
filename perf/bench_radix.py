"""Router throughput: compiled radix router vs pure-Python twin vs dict + regex list.

Builds a realistic table (default 100 services x 10 routes = 1,000 templates, most with
parameters, one catch-all per service), a seeded request mix (mostly hits, some 404/405),
checks that the matchers agree, then prints matches per second for each, each measured
for about --duration seconds in the same run. normalize_path() is measured too.

    make build
    python -m perf bench-radix                    # all matchers, ~2 s each
    python -m perf bench-radix --only c --duration 10
    perf record -g python -m perf bench-radix --only c --duration 10   # then: perf report
"""
from __future__ import annotations

import argparse
import importlib
import random
import re
import sys
import time

from stellagw._py import radix as py_radix

from . import commands

ROUTES = [
    ("GET", "/api/v1/{svc}/items"),
    ("POST", "/api/v1/{svc}/items"),
    ("GET", "/api/v1/{svc}/items/{item_id}"),
    ("PUT", "/api/v1/{svc}/items/{item_id}"),
    ("DELETE", "/api/v1/{svc}/items/{item_id}"),
    ("GET", "/api/v1/{svc}/items/{item_id}/history"),
    ("GET", "/api/v1/{svc}/scans/{scan_id}/results/{result_id}"),
    ("POST", "/api/v1/{svc}/scans/{scan_id}/cancel"),
    ("GET", "/api/v1/{svc}/health"),
    ("GET", "/api/v1/{svc}/files/{*path}"),
]


def table(services: int) -> list[tuple[str, str, str]]:
    out = []
    for i in range(services):
        svc = f"svc{i:03d}"
        for method, template in ROUTES:
            t = template.replace("{svc}", svc)
            out.append((method, t, f"{svc}:{method} {template}"))
    return out


def requests(services: int, n: int, seed: int) -> list[tuple[str, str]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        svc = f"svc{rnd.randrange(services):03d}"
        item = str(rnd.randrange(10**6))
        kind = rnd.random()
        if kind < 0.30:
            out.append(("GET", f"/api/v1/{svc}/items/{item}"))
        elif kind < 0.45:
            out.append((rnd.choice(["GET", "POST"]), f"/api/v1/{svc}/items"))
        elif kind < 0.55:
            out.append((rnd.choice(["PUT", "DELETE"]), f"/api/v1/{svc}/items/{item}"))
        elif kind < 0.65:
            out.append(("GET", f"/api/v1/{svc}/items/{item}/history"))
        elif kind < 0.75:
            out.append(("GET", f"/api/v1/{svc}/scans/{item}/results/r{item[:3]}"))
        elif kind < 0.80:
            out.append(("POST", f"/api/v1/{svc}/scans/{item}/cancel"))
        elif kind < 0.88:
            out.append(("GET", f"/api/v1/{svc}/health"))
        elif kind < 0.94:
            out.append(("GET", f"/api/v1/{svc}/files/css/{item}/site.css"))
        elif kind < 0.97:
            out.append(("GET", f"/api/v1/{svc}/nothing/{item}"))           # 404
        else:
            out.append(("PATCH", f"/api/v1/{svc}/items/{item}"))           # 405
    return out


class RegexMatcher:
    """The usual baseline: a dict for fully literal (method, path), then a list of
    per-template regexes tried in order (param templates before catch-alls)."""

    def __init__(self, routes):
        self.static = {}
        self.patterns = []
        catchalls = []
        for method, template, endpoint in routes:
            if "{" not in template:
                self.static[(method, template)] = endpoint
                continue
            rx = ""
            for seg in template[1:].split("/"):
                if seg.startswith("{*"):
                    rx += r"(?:/(?P<%s>.*))?" % seg[2:-1]
                elif seg.startswith("{"):
                    rx += r"/(?P<%s>[^/]+)" % seg[1:-1]
                else:
                    rx += "/" + re.escape(seg)
            entry = (method, re.compile(rx + r"\Z").match, endpoint)
            (catchalls if "{*" in template else self.patterns).append(entry)
        self.patterns += catchalls

    def match(self, method, path):
        endpoint = self.static.get((method, path))
        if endpoint is not None:
            return (0, endpoint, None)
        allow = None
        for m, rx, endpoint in self.patterns:
            hit = rx(path)
            if hit is not None:
                if m == method:
                    return (0, endpoint, hit.groupdict())
                allow = allow or set()
                allow.add(m)
        if allow:
            return (2, tuple(sorted(allow)), None)
        return (1, None, None)


def measure(fn, reqs, duration: float) -> float:
    """Calls per second of fn(method, path) over reqs, repeated for ~duration seconds."""
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        for method, path in reqs:
            fn(method, path)
        count += len(reqs)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def measure_normalize(fn, raws, duration: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + duration
    while True:
        for raw in raws:
            fn(raw)
        count += len(raws)
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per measurement (2)")
    ap.add_argument("--services", type=int, default=100, help="services x 10 routes (100)")
    ap.add_argument("--requests", type=int, default=10_000, help="distinct requests (10000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--only", choices=["c", "py", "regex"], action="append",
                    help="measure only these matchers (repeatable)")
    ap.add_argument("--no-normalize", action="store_true", help="skip normalize_path()")
    args = ap.parse_args(argv)

    routes = table(args.services)
    reqs = requests(args.services, args.requests, args.seed)
    try:
        c_radix = importlib.import_module("stellagw._cext.radix")
    except ImportError as exc:
        print(f"compiled router not built ({exc}); run: python setup.py build_ext --inplace")
        c_radix = None

    matchers = {}
    if c_radix is not None:
        matchers["c"] = ("radix (Cython)", c_radix.Router())
    matchers["py"] = ("radix (pure Python)", py_radix.Router())
    for _, router in matchers.values():
        for method, template, endpoint in routes:
            router.add(method, template, endpoint)
    matchers["regex"] = ("dict + regex list", RegexMatcher(routes))
    if args.only:
        matchers = {k: v for k, v in matchers.items() if k in args.only}

    # Agreement first: a fast wrong router is worthless.
    reference = py_radix.Router()
    for method, template, endpoint in routes:
        reference.add(method, template, endpoint)
    statuses = [0, 0, 0]
    for method, path in reqs:
        want = reference.match(method, path)
        statuses[want[0]] += 1
        for key, (label, m) in matchers.items():
            got = m.match(method, path)
            if key == "regex":
                same = got[:2] == want[:2]
            else:
                same = got == want
            if not same:
                print(f"DISAGREE {label}: {method} {path}: {got} != {want}")
                return 1

    print(f"{len(routes)} templates ({args.services} services x {len(ROUTES)}), "
          f"{len(reqs)} requests: {statuses[0]} found, {statuses[1]} 404, "
          f"{statuses[2]} 405; {args.duration:g} s per measurement; Python {sys.version.split()[0]}")
    results = {}
    for key, (label, m) in matchers.items():
        rate = measure(m.match, reqs, args.duration)
        results[key] = rate
        print(f"  match  {label:22s} {rate:12,.0f} /s  {1e9 / rate:8.0f} ns/match")
    if "regex" in results:
        for key in ("c", "py"):
            if key in results:
                print(f"  {matchers[key][0]} is {results[key] / results['regex']:.1f}x the regex list")

    if not args.no_normalize:
        raws = [path.encode() for _, path in reqs]
        raws[::7] = [r.replace(b"/items/", b"/./items/%2e%2e/items/") for r in raws[::7]]
        impls = []
        if c_radix is not None and (not args.only or "c" in args.only):
            impls.append(("normalize_path (Cython)", c_radix.normalize_path))
        if not args.only or "py" in args.only:
            impls.append(("normalize_path (Python)", py_radix.normalize_path))
        for label, fn in impls:
            rate = measure_normalize(fn, raws, args.duration)
            print(f"  {label:29s} {rate:12,.0f} /s  {1e9 / rate:8.0f} ns/path")
    return 0

