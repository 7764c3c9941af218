"""A small HTTP/1.1 load generator on uvloop + httptools, for what wrk cannot do (issue 8).

Two modes, one process, keep-alive connections to one URL on loopback:

* ``open``   -- **open loop at a fixed arrival rate** (what wrk2 / k6's
  constant-arrival-rate do): request *i* is due at start + i / rate and goes out then,
  round-robin over the connections, *pipelined* when a connection still has responses
  outstanding, so a slow server never slows the sender down (no coordinated omission).
  Latency is measured per request from the moment its bytes were handed to the kernel to
  the end of its response (``latency_from_schedule``: from the moment it was due); the lag
  of the send schedule is reported too (if it grows the generator itself was the
  bottleneck, and the run says so). The loop is perf/openloop.pyx (``--engine c``, built by
  ``make build``; ~75 % of a CPU at 41k req/s, most of it the kernel's); ``--engine python`` is
  the uvloop loop it replaced, which sends the due requests in bursts once per tick and
  keeps its CPU 100 % busy. ``--spin``: the C loop polls instead of sleeping and
  yields the CPU between polls (its CPU never idles; see perf/openloop.pyx). ``stops``:
  the spans of ≥ 1 ms in which requests were outstanding and no response came back.
  ``--back-to-back``: closed loop instead (one request in flight per connection, the next
  sent as its response ends, as wrk does), e.g. one connection's round trip with a client
  whose CPU never idles (``--spin``).
* ``closed`` -- ``--connections`` × ``--depth`` requests in flight, each response
  answered with the next request, until ``--requests`` are done. With
  ``--dpop-key/--token`` each request carries ``Authorization: DPoP <token>`` and its own
  **pre-minted DPoP proof** (``stellagw.devauth.premint``: proofs are single-use, so one
  per request; they are minted just before the run, as they go stale after the server's
  ``iat`` window).
* ``hiccups`` -- no server: spin on this CPU for ``--duration`` seconds and report every gap
  of ≥ ``--threshold-us`` in the spin's own progress (the CPU was taken away from it). Run
  pinned, it shows how often and how long that CPU stalls on this machine.

Latencies go into HDR-like log-linear buckets (64 sub-buckets per power of two: < 1.6 %
error at any magnitude). Output: one JSON document on stdout (``--json-out`` also writes it
to a file). With ``--handshake`` the generator connects (and mints), prints ``ready``,
waits for a line on stdin, runs, prints ``done`` and then the JSON -- so a harness can read
the server's CPU exactly around the measured window.

    python -m perf loadgen open --url http://127.0.0.1:8081/ --rate 10000 --duration 10
    taskset -c 0 python -m perf loadgen hiccups --duration 5
    python -m perf loadgen closed --url http://127.0.0.1:8080/bench/hello --requests 50000 \\
        --dpop-key key.pem --token-file token.txt --htu http://127.0.0.1:8080/bench/hello

Loopback only (127.0.0.1 / localhost / ::1), bounded by --duration / --max-seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import socket
import sys
import time
from urllib.parse import urlsplit

import httptools
import uvloop

from . import commands

SUB = 64  # sub-buckets per power of two


# ---------------------------------------------------------------------------------------
# histogram


class Histogram:
    """Log-linear histogram of integer nanoseconds (HdrHistogram's layout, 6 bits of
    precision): exact below 128 ns, then 64 buckets per doubling."""

    __slots__ = ("counts", "n", "total", "max", "min")

    def __init__(self) -> None:
        self.counts = [0] * (SUB * 64)
        self.n = 0
        self.total = 0
        self.max = 0
        self.min = None

    @staticmethod
    def index(v: int) -> int:
        if v < 2 * SUB:
            return v if v > 0 else 0
        e = v.bit_length() - 7          # v >> e lands in [64, 127]
        return e * SUB + (v >> e)

    @staticmethod
    def value(i: int) -> int:
        """Middle of bucket i (ns)."""
        if i < 2 * SUB:
            return i
        e, m = divmod(i, SUB)
        e -= 1
        m += SUB
        return (m << e) + ((1 << e) >> 1)

    def record(self, v: int) -> None:
        self.counts[self.index(v)] += 1
        self.n += 1
        self.total += v
        if v > self.max:
            self.max = v
        if self.min is None or v < self.min:
            self.min = v

    @classmethod
    def from_counts(cls, d: dict) -> "Histogram":
        """From perf/openloop.pyx's histograms: {index: count} plus n/total/max/min."""
        h = cls()
        for i, c in d["counts"].items():
            h.counts[i] = c
        h.n, h.total, h.max, h.min = d["n"], d["total"], d["max"], d["min"]
        return h

    def merge(self, other: "Histogram") -> None:
        for i, c in enumerate(other.counts):
            if c:
                self.counts[i] += c
        self.n += other.n
        self.total += other.total
        self.max = max(self.max, other.max)
        if other.min is not None:
            self.min = other.min if self.min is None else min(self.min, other.min)

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.n))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self.value(i), self.max)
        return self.max

    def summary_ms(self) -> dict:
        out = {f"p{name}_ms": _ms(self.percentile(q))
               for name, q in (("50", 50.0), ("90", 90.0), ("99", 99.0), ("99.9", 99.9))}
        out["max_ms"] = _ms(self.max if self.n else None)
        out["mean_ms"] = _ms(self.total / self.n if self.n else None)
        out["count"] = self.n
        return out


def _ms(ns) -> float | None:
    return None if ns is None else round(ns / 1e6, 4)


# ---------------------------------------------------------------------------------------
# connections


class Run:
    def __init__(self, requests_source, hist: Histogram) -> None:
        self.next_request = requests_source   # () -> bytes | None
        self.hist = hist
        self.statuses: collections.Counter = collections.Counter()
        self.completed = 0
        self.sent = 0
        self.errors: collections.Counter = collections.Counter()
        self.conns: list[Conn] = []
        self.done: asyncio.Future | None = None
        self.target = None        # closed mode: requests to complete
        self.closed_mode = False
        self.measuring = True


class Conn(asyncio.Protocol):
    __slots__ = ("run", "transport", "parser", "pending", "lost", "ready", "depth")

    def __init__(self, run: Run, ready: asyncio.Future) -> None:
        self.run = run
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.pending: collections.deque = collections.deque()   # send times (ns)
        self.lost = False
        self.ready = ready

    def connection_made(self, transport) -> None:
        self.transport = transport
        import socket
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not self.ready.done():
            self.ready.set_result(self)

    def connection_lost(self, exc) -> None:
        self.lost = True
        if self.pending:
            self.run.errors["connection closed with requests outstanding"] += len(self.pending)
        elif self.run.done is not None and not self.run.done.done():
            self.run.errors["connection closed"] += 1
        self.pending.clear()
        run = self.run
        if run.closed_mode and run.done is not None and not run.done.done():
            if all(c.lost for c in run.conns):
                run.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.run.errors[f"bad response: {exc}"] += 1
            self.transport.close()

    # httptools callback
    def on_message_complete(self) -> None:
        now = time.perf_counter_ns()
        run = self.run
        t0 = self.pending.popleft()
        status = self.parser.get_status_code()
        if run.measuring:
            run.hist.record(now - t0)
            run.statuses[status] += 1
            run.completed += 1
        if run.closed_mode:
            if run.target is not None and run.sent < run.target:
                self.send(1)
            elif not any(c.pending for c in run.conns) and not run.done.done():
                run.done.set_result(None)

    def send(self, n: int) -> int:
        """Send n requests at once (one write); returns how many went out."""
        if self.lost:
            return 0
        run = self.run
        parts = []
        for _ in range(n):
            req = run.next_request()
            if req is None:
                break
            parts.append(req)
        if not parts:
            return 0
        now = time.perf_counter_ns()
        self.pending.extend([now] * len(parts))
        self.transport.write(parts[0] if len(parts) == 1 else b"".join(parts))
        run.sent += len(parts)
        return len(parts)


def _loopback_target(url: str) -> tuple[str, int, str, str]:
    u = urlsplit(url)
    if u.scheme != "http":
        raise SystemExit("only http:// URLs")
    host = u.hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"loopback targets only (127.0.0.1), not {host!r}")
    port = u.port or 80
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    return host, port, path, u.netloc


def plain_request(method: str, path: str, netloc: str, extra: list[tuple[str, str]] = ()) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {netloc}\r\n"
    for k, v in extra:
        head += f"{k}: {v}\r\n"
    return (head + "\r\n").encode("latin-1")


async def connect_all(run: Run, host: str, port: int, n: int) -> None:
    loop = asyncio.get_running_loop()

    async def one():
        ready = loop.create_future()
        conn = Conn(run, ready)
        await loop.create_connection(lambda: conn, host, port)
        await ready
        return conn

    run.conns = list(await asyncio.gather(*(one() for _ in range(n))))


# ---------------------------------------------------------------------------------------
# modes


async def open_loop(args, request: bytes, handshake) -> dict:
    host, port, _, _ = _loopback_target(args.url)
    hist = Histogram()
    run = Run(lambda: request, hist)
    await connect_all(run, host, port, args.connections)
    # warm-up: a second at the target rate, not recorded
    loop = asyncio.get_running_loop()
    run.done = loop.create_future()
    if args.warmup > 0:
        run.measuring = False
        await _paced(run, args.rate, args.warmup)
        run.measuring = True
    await handshake()
    stats = await _paced(run, args.rate, args.duration)
    # drain: wait for outstanding responses (bounded)
    deadline = time.monotonic() + args.drain
    while any(c.pending for c in run.conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    outstanding = sum(len(c.pending) for c in run.conns)
    if outstanding:
        run.errors[f"no response within {args.drain}s after the run"] += outstanding
    for c in run.conns:
        c.transport.close()
    return _result(args, run, hist, stats["wall_s"], extra={
        "mode": "open", "offered_rate": args.rate, "sent": stats["sent"],
        "schedule_lag_max_ms": round(stats["lag_max_ns"] / 1e6, 3),
        "schedule_lag_p99_ms": _ms(stats["lag"].percentile(99)),
        "generator_behind": stats["lag_max_ns"] > 50e6,
    })


BUILD = "make build (python setup.py build_ext --inplace --perf-extensions)"


def load_openloop():
    """perf/openloop.pyx, built in place with the other extensions; refused when older than
    its source, since a stale loop would measure what the source no longer says."""
    try:
        from . import openloop
    except ImportError as exc:
        raise ImportError(f"perf/openloop.pyx is not built ({exc}): {BUILD}") from exc
    source = os.path.join(os.path.dirname(openloop.__file__), "openloop.pyx")
    if os.path.getmtime(source) > os.path.getmtime(openloop.__file__):
        raise ImportError(f"{openloop.__file__} is older than {source}: {BUILD}")
    return openloop


def open_loop_c(args, request: bytes, handshake) -> dict:
    """``open`` with the sending and receiving in C (perf/openloop.pyx)."""
    openloop = load_openloop()
    host, port, _, _ = _loopback_target(args.url)
    socks = []
    try:
        for _ in range(args.connections):
            sock = socket.create_connection((host, port), timeout=5)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            socks.append(sock)
        ol = openloop.OpenLoop([sk.fileno() for sk in socks], request)
        if args.back_to_back:
            def run(seconds, measuring):
                return ol.back_to_back(seconds, measuring, args.spin)
        else:
            def run(seconds, measuring):
                return ol.paced(args.rate, seconds, measuring, args.spin)
        if args.warmup > 0:
            run(args.warmup, False)
            ol.drain(args.drain)
        handshake()
        sent, wall = run(args.duration, True)
        ol.drain(args.drain)
        raw = ol.result(args.drain)
    finally:
        for sk in socks:
            sk.close()
    run = Run(lambda: None, Histogram.from_counts(raw["latency"]))
    run.completed = raw["completed"]
    run.statuses.update(raw["statuses"])
    run.errors.update(raw["errors"])
    lag = Histogram.from_counts(raw["lag"])
    return _result(args, run, run.hist, wall, extra={
        "mode": "back-to-back" if args.back_to_back else "open", "engine": "c",
        "offered_rate": args.rate, "sent": sent,
        "latency_from_schedule": Histogram.from_counts(raw["latency_from_schedule"]).summary_ms(),
        "schedule_lag_max_ms": round(raw["lag_max_ns"] / 1e6, 3),
        "schedule_lag_p99_ms": _ms(lag.percentile(99)),
        "generator_behind": raw["lag_max_ns"] > 50e6,
        "stops": _stops(raw["stops"]["count"], raw["stops"]["total_ns"], raw["stops"]["max_ns"],
                        wall),
    })


def _stops(count: int, total_ns: int, max_ns: int, wall: float) -> dict:
    return {"count": count, "total_ms": round(total_ns / 1e6, 3), "max_ms": round(max_ns / 1e6, 3),
            "share": round(total_ns / 1e9 / wall, 5) if wall > 0 else None}


def hiccups(args) -> dict:
    gaps = load_openloop().hiccups(args.duration, int(args.threshold_us * 1000))
    res = {"mode": "hiccups", "cpus": sorted(os.sched_getaffinity(0)),
           "duration_s": args.duration, "threshold_us": args.threshold_us,
           "gaps": [[round(at / 1e6, 3), round(gap / 1e6, 3)] for at, gap in gaps],
           "errors": {}}
    res.update(_stops(len(gaps), sum(g for _, g in gaps), max((g for _, g in gaps), default=0),
                      args.duration))
    return res


async def _paced(run: Run, rate: float, duration: float) -> dict:
    """Send at `rate` for `duration` seconds, one batch per ~1 ms loop tick."""
    loop = asyncio.get_running_loop()
    conns = run.conns
    nconn = len(conns)
    rr = 0
    start = time.perf_counter_ns()
    end = start + int(duration * 1e9)
    sent = 0
    lag = Histogram()
    lag_max = 0
    while True:
        now = time.perf_counter_ns()
        if now >= end:
            break
        due = int((now - start) * rate / 1e9) - sent
        if due > 0:
            # the oldest due request was scheduled at start + sent/rate
            behind = now - (start + int(sent * 1e9 / rate))
            lag.record(max(0, behind))
            lag_max = max(lag_max, behind)
            # spread the batch over the connections
            per, extra = divmod(due, nconn)
            if per == 0:
                for _ in range(due):
                    sent += conns[rr].send(1) or 1
                    rr = (rr + 1) % nconn
            else:
                for i in range(nconn):
                    k = per + (1 if i < extra else 0)
                    c = conns[(rr + i) % nconn]
                    sent += c.send(k) or k
                rr = (rr + extra) % nconn
        tick = loop.create_future()
        loop.call_later(0.0005, tick.set_result, None)
        await tick
    wall = (time.perf_counter_ns() - start) / 1e9
    return {"sent": sent, "wall_s": wall, "lag": lag, "lag_max_ns": lag_max}


async def closed_loop(args, source, handshake) -> dict:
    host, port, _, _ = _loopback_target(args.url)
    hist = Histogram()
    run = Run(source, hist)
    run.closed_mode = True
    loop = asyncio.get_running_loop()
    await connect_all(run, host, port, args.connections)
    if args.warmup_requests:
        run.measuring = False
        run.target = args.warmup_requests
        run.done = loop.create_future()
        for c in run.conns:
            c.send(min(args.depth, max(0, run.target - run.sent)))
        await asyncio.wait_for(run.done, args.max_seconds)
        run.measuring = True
    await handshake()
    run.sent = 0
    run.target = args.requests
    run.done = loop.create_future()
    t0 = time.perf_counter()
    for c in run.conns:
        c.send(min(args.depth, max(0, run.target - run.sent)))
    try:
        await asyncio.wait_for(run.done, args.max_seconds)
    except asyncio.TimeoutError:
        run.errors[f"run did not finish within {args.max_seconds}s"] += 1
    wall = time.perf_counter() - t0
    for c in run.conns:
        c.transport.close()
    return _result(args, run, hist, wall, extra={"mode": "closed", "depth": args.depth})


def _result(args, run: Run, hist: Histogram, wall: float, extra: dict) -> dict:
    ok = sum(v for k, v in run.statuses.items() if 200 <= k < 300)
    out = {
        "url": args.url, "connections": args.connections, "wall_s": round(wall, 4),
        "completed": run.completed, "ok_2xx": ok,
        "achieved_rate": round(run.completed / wall, 1) if wall > 0 else None,
        "statuses": {str(k): v for k, v in sorted(run.statuses.items())},
        "errors": dict(run.errors),
        "latency": hist.summary_ms(),
        "histogram": {str(Histogram.value(i)): c for i, c in enumerate(hist.counts) if c},
    }
    out.update(extra)
    return out


# ---------------------------------------------------------------------------------------
# DPoP requests


def dpop_source(args, method: str, path: str, netloc: str, count: int):
    """Pre-mint `count` proofs (one per request) and return a request source."""
    from stellagw.devauth import DpopKey, premint
    with open(args.dpop_key, "rb") as fh:
        key = DpopKey.from_pem(fh.read())
    with open(args.token_file) as fh:
        token = fh.read().strip()
    t0 = time.perf_counter()
    proofs = premint(count, method, args.htu, token, key)
    mint_s = time.perf_counter() - t0
    reqs = collections.deque(
        plain_request(method, path, netloc, [("Authorization", f"DPoP {token}"), ("DPoP", p)])
        for p in proofs)
    del proofs

    def nxt():
        return reqs.popleft() if reqs else None

    return nxt, mint_s, len(reqs[0]) if reqs else 0


# ---------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    hp = sub.add_parser("hiccups", help="no server: how often and how long this CPU stalls")
    hp.add_argument("--duration", type=float, default=5.0)
    hp.add_argument("--threshold-us", type=float, default=500.0,
                    help="report gaps of at least this many µs (default 500)")
    hp.add_argument("--json-out", metavar="PATH")
    for name in ("open", "closed"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--method", default="GET")
        p.add_argument("--connections", type=int, default=32 if name == "open" else 64)
        p.add_argument("--json-out", metavar="PATH")
        p.add_argument("--handshake", action="store_true",
                       help="print 'ready', wait for a stdin line, run, print 'done', then JSON")
        p.add_argument("--max-seconds", type=float, default=120.0,
                       help="hard bound of the measured run (default 120)")
        if name == "open":
            p.add_argument("--rate", type=float, help="requests per second (required but with "
                           "--back-to-back)")
            p.add_argument("--back-to-back", action="store_true",
                           help="c engine: closed loop instead, one request in flight per "
                                "connection, the next sent as its response ends (wrk's "
                                "pattern; with --spin the client's CPU never idles)")
            p.add_argument("--duration", type=float, default=10.0)
            p.add_argument("--warmup", type=float, default=1.0, help="seconds at the rate, not recorded")
            p.add_argument("--drain", type=float, default=5.0)
            p.add_argument("--engine", choices=("c", "python"), default="c",
                           help="c: the loop of perf/openloop.pyx (default; a few µs per "
                                "request); python: the uvloop one (~24 µs per request)")
            p.add_argument("--spin", action="store_true",
                           help="c engine: poll instead of sleeping, yielding the CPU between "
                                "polls (its CPU never idles; a process sharing it still runs "
                                "whenever it is ready)")
        else:
            p.add_argument("--requests", type=int, required=True)
            p.add_argument("--warmup-requests", type=int, default=0)
            p.add_argument("--depth", type=int, default=1, help="requests in flight per connection")
            p.add_argument("--dpop-key", metavar="PEM", help="DPoP private key (PEM)")
            p.add_argument("--token-file", metavar="FILE", help="DPoP-bound access token")
            p.add_argument("--htu", help="the proofs' htu (the gateway's publicOrigin + path)")
    args = ap.parse_args(argv)
    if args.mode == "open" and args.back_to_back and args.engine != "c":
        ap.error("--back-to-back needs --engine c")
    if args.mode == "open" and args.rate is None and not args.back_to_back:
        ap.error("open: --rate is required (or --back-to-back)")
    if args.mode == "open":
        args.max_seconds = max(args.max_seconds, args.duration + args.warmup + args.drain + 10)
    return args


async def amain(args) -> dict:
    _, _, path, netloc = _loopback_target(args.url)

    async def handshake():
        if args.handshake:
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    if args.mode == "open":
        res = await open_loop(args, plain_request(args.method, path, netloc), handshake)
    else:
        total = args.requests + args.warmup_requests
        if args.dpop_key:
            if not (args.token_file and args.htu):
                raise SystemExit("--dpop-key needs --token-file and --htu")
            source, mint_s, size = dpop_source(args, args.method, path, netloc, total)
        else:
            req = plain_request(args.method, path, netloc)
            left = [total]

            def source():
                if left[0] <= 0:
                    return None
                left[0] -= 1
                return req
            mint_s, size = 0.0, len(req)
        res = await closed_loop(args, source, handshake)
        res.update({"dpop": bool(args.dpop_key), "proof_mint_s": round(mint_s, 3),
                    "request_bytes": size})
    if args.handshake:
        print("done", flush=True)
    return res


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.mode == "hiccups":
        res = hiccups(args)
    elif args.mode == "open" and args.engine == "c":
        _, _, path, netloc = _loopback_target(args.url)

        def handshake():
            if args.handshake:
                print("ready", flush=True)
                sys.stdin.readline()

        res = open_loop_c(args, plain_request(args.method, path, netloc), handshake)
        if args.handshake:
            print("done", flush=True)
    else:
        res = uvloop.run(amain(args))
    text = json.dumps(res)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(text + "\n")
    print(text, flush=True)
    return 0 if not res["errors"] else 1

