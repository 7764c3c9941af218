"""10,000 keep-alive clients + 100 service connections: errors and the gateway's memory
(issue 8: RSS at 10,000 open connections, target ≤ 150 MB).

    python -m perf connections                      # ~1 minute: connect, 20 s of light load
    python -m perf connections --soak 600           # RSS every 10 s for 10 minutes + slope
    python -m perf connections --workers 2 --clients 10000 --interval 5 --duration 30

What it does, all on 127.0.0.1:

1. lifts its own RLIMIT_NOFILE (``resource.setrlimit``, to --nofile) and starts the gateway
   as ``prlimit --nofile=N:N -- taskset -c 0 python -m stellagw serve`` (``maxConnections``
   raised to --clients + 1000, backlog 4096, access log off, --workers workers);
2. opens --services **service connections** from this process, speaking the frame protocol
   directly with ``stellagw.transport.frame.FrameEncoder``/``FrameDecoder`` (no SDK process per
   service): HELLO with one endpoint (``GET /connNNN/hello``, service ``connNNN``), the
   HEARTBEATs the HELLO_ACK asks for, PONG for PING, and a 200 RESPONSE for every
   REQUEST. With several workers each instance also dials the other workers' private ports
   (docs/protocol.md §4.2), as the SDK does -- so --services × --workers connections;
3. opens --clients **HTTP/1.1 keep-alive connections** (256 connects in flight at a time) and
   keeps them all open; each sends ``GET /connNNN/hello`` (NNN = client % services) once
   every --interval seconds, phases spread evenly (10,000 / 5 s = 2,000 requests/s);
4. checks: every request answered 200 within --request-timeout, no connection closed by the
   gateway, every client answered at least once; reads the RSS of the whole gateway
   instance (supervisor + workers: psutil tree; also PSS, which counts pages shared by forked
   workers once) before anything connects, with the services, with all clients, and at the
   end. Target: ≤ --rss-target-mb (150) with all connections open.

``--soak SECONDS`` keeps the load on for that long, samples the RSS every --sample-every
(10) s, and prints the series and its least-squares slope (MB per minute and per hour):
flat memory means a slope near 0 once the connections are open.

The client side runs pinned to --load-cpu (the gateway to --server-cpu). Bounded: every
phase has a timeout; every process started here is stopped at the end.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from pathlib import Path

import httptools
import psutil
import uvloop

from stellagw.transport import frame as fr

from . import _procs, commands
from .compare import measuring
from ._procs import HOST
from .loadgen import Histogram

MB = 2 ** 20


# ---------------------------------------------------------------------------------------
# memory


def gateway_memory(root_pid: int, pss: bool = True) -> dict:
    procs = _procs.tree([root_pid])
    # `prlimit` and `taskset` exec, so the root is the gateway itself
    out = {"processes": 0, "rss": 0, "pss": 0 if pss else None, "per_process": []}
    for p in procs:
        try:
            if pss:
                mi = p.memory_full_info()
                out["pss"] += mi.pss
            else:
                mi = p.memory_info()
            out["rss"] += mi.rss
            out["processes"] += 1
            out["per_process"].append({"pid": p.pid, "rss_mb": round(mi.rss / MB, 1)})
        except psutil.Error:
            pass
    out["rss_mb"] = round(out["rss"] / MB, 1)
    out["pss_mb"] = round(out["pss"] / MB, 1) if pss else None
    return out


def slope_per_min(series: list[tuple[float, float]]) -> float | None:
    if len(series) < 2:
        return None
    n = len(series)
    mx = sum(t for t, _ in series) / n
    my = sum(v for _, v in series) / n
    sxx = sum((t - mx) ** 2 for t, _ in series)
    if sxx == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in series) / sxx * 60.0


# ---------------------------------------------------------------------------------------
# fake services: the frame protocol, straight


class Stats:
    def __init__(self) -> None:
        self.errors: collections.Counter = collections.Counter()
        self.service_requests = 0
        self.heartbeats = 0
        self.pings = 0


class ServiceConn(asyncio.Protocol):
    """One connection of one service instance to one gateway worker."""

    def __init__(self, svc: "FakeService", stats: Stats, stopping) -> None:
        self.svc, self.stats, self.stopping = svc, stats, stopping
        self.transport = None
        self.dec = fr.FrameDecoder()
        self.enc = fr.FrameEncoder()
        self.flush_scheduled = False
        self.acked = asyncio.get_running_loop().create_future()
        self.hb = None
        self.key = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.enc.control(fr.HELLO, fr.ZERO_CORR, self.svc.hello)
        self._flush()

    def connection_lost(self, exc) -> None:
        if self.hb is not None:
            self.hb.cancel()
        if not self.acked.done():
            self.acked.set_exception(ConnectionError(f"closed before HELLO_ACK: {exc}"))
        elif not self.stopping():
            self.stats.errors[f"service connection closed by the gateway ({exc})"] += 1
        self.transport = None

    def data_received(self, data) -> None:
        try:
            self.dec.feed(data)
            while (f := self.dec.next()) is not None:
                self.on_frame(*f)
        except fr.FrameError as exc:
            self.stats.errors[f"frame error from the gateway: {exc}"] += 1
            self.transport.close()

    def on_frame(self, ftype, corr, payload) -> None:
        if ftype == fr.REQUEST:
            self.stats.service_requests += 1
            self.enc.response(corr, 200, [(b"content-type", b"text/plain")], fr.FLAG_END_STREAM,
                              b"hello\n")
            self._schedule()
        elif ftype == fr.PING:
            self.stats.pings += 1
            self.enc.raw(fr.PONG, corr, bytes(payload))
            self._schedule()
        elif ftype == fr.HELLO_ACK:
            ack = fr.decode_control(payload)
            if "error" in ack:
                if not self.acked.done():
                    self.acked.set_exception(ConnectionError(f"HELLO refused: {ack['error']}"))
                return
            if self.hb is None:
                interval = ack.get("heartbeat_interval_ms", 10000) / 1000.0
                self.hb = asyncio.get_running_loop().call_later(interval, self.beat, interval)
            if not self.acked.done():
                self.acked.set_result(ack)
            else:
                self.svc.on_ack(ack)   # a later HELLO_ACK: the worker set changed
        elif ftype == fr.DRAIN:
            pass
        # CANCEL / WINDOW_UPDATE: nothing to do for one-frame responses

    def beat(self, interval) -> None:
        if self.transport is None:
            return
        self.stats.heartbeats += 1
        self.enc.control(fr.HEARTBEAT, fr.ZERO_CORR, {
            "instance_id": self.svc.instance_id, "status": "Healthy", "in_flight": 0,
            "error_rate": 0.0, "sent_ms": int(time.time() * 1000)})
        self._schedule()
        self.hb = asyncio.get_running_loop().call_later(interval, self.beat, interval)

    def _schedule(self) -> None:
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if self.transport is not None and len(self.enc):
            self.transport.write(self.enc.take())


class FakeService:
    """One instance: a HELLO with one endpoint, one connection per gateway worker."""

    def __init__(self, index: int, stats: Stats, stopping) -> None:
        self.name = f"conn{index:03d}"
        self.path = f"/{self.name}/hello"
        self.instance_id = f"{self.name}-perf-{os.getpid()}"
        self.hello = {"protocol": fr.PROTOCOL_VERSION, "service": self.name, "version": "1.0.0",
                      "instance_id": self.instance_id, "region": "",
                      "endpoints": [{"method": "GET", "path": self.path}],
                      "sdk": "perf.connections"}
        self.stats, self.stopping = stats, stopping
        self.links: dict[tuple, ServiceConn] = {}
        self.host = HOST

    async def dial(self, host: str, port: int) -> tuple | None:
        loop = asyncio.get_running_loop()
        conn = ServiceConn(self, self.stats, self.stopping)
        await loop.create_connection(lambda: conn, host, port)
        ack = await asyncio.wait_for(conn.acked, 15)
        key = (ack.get("node_id"), ack.get("worker_id"))
        if key in self.links:          # protocol.md §4.2 step 3: keep one per worker
            conn.transport.close()
            return None
        self.links[key] = conn
        conn.key = key
        return conn, ack

    async def start(self, port: int) -> None:
        first = await self.dial(self.host, port)
        if first is None:
            return
        await self._dial_missing(first[1])

    def on_ack(self, ack) -> None:
        asyncio.ensure_future(self._dial_missing(ack))

    async def _dial_missing(self, ack) -> None:
        node = ack.get("node_id")
        for w in ack.get("workers") or ():
            if (node, w.get("worker_id")) in self.links:
                continue
            await self.dial(w.get("host") or self.host, int(w["port"]))

    def close(self) -> None:
        for c in self.links.values():
            if c.transport is not None:
                c.transport.close()


# ---------------------------------------------------------------------------------------
# HTTP clients


class Client(asyncio.Protocol):
    __slots__ = ("pool", "transport", "parser", "sent_at", "req", "answered", "closed", "path")

    def __init__(self, pool: "ClientPool", req: bytes) -> None:
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.sent_at = None
        self.req = req
        self.answered = 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.pool.stopping():
            self.pool.stats.errors[f"client connection closed by the gateway ({exc})"] += 1
        self.transport = None

    def data_received(self, data) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.pool.stats.errors[f"bad HTTP response: {exc}"] += 1

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if self.sent_at is None:
            self.pool.stats.errors["unsolicited response"] += 1
            return
        self.pool.hist.record(time.perf_counter_ns() - self.sent_at)
        self.sent_at = None
        self.answered += 1
        self.pool.responses += 1
        if status != 200:
            self.pool.stats.errors[f"status {status}"] += 1

    def fire(self, now_ns: int, timeout_ns: int) -> None:
        if self.transport is None:
            return
        if self.sent_at is not None:
            if now_ns - self.sent_at > timeout_ns:
                self.pool.stats.errors["request timed out"] += 1
                self.sent_at = None
            else:
                return  # still waiting: skip this turn rather than pipeline
        self.sent_at = now_ns
        self.pool.requests += 1
        self.transport.write(self.req)


class ClientPool:
    def __init__(self, stats: Stats, stopping) -> None:
        self.stats, self.stopping = stats, stopping
        self.clients: list[Client] = []
        self.hist = Histogram()
        self.requests = 0
        self.responses = 0

    async def open(self, port: int, n: int, paths: list[str], concurrency: int = 256) -> float:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        t0 = time.monotonic()

        async def one(i: int) -> Client:
            req = f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
            c = Client(self, req)
            async with sem:
                for attempt in range(5):
                    try:
                        await loop.create_connection(lambda: c, HOST, port)
                        return c
                    except OSError as exc:
                        if attempt == 4:
                            raise ConnectionError(f"client {i}: {exc}") from None
                        await asyncio.sleep(0.2 * (attempt + 1))

        self.clients = list(await asyncio.gather(*(one(i) for i in range(n))))
        return time.monotonic() - t0

    async def load(self, interval: float, duration: float, timeout: float, on_tick=None) -> None:
        """Each client fires once per `interval`, phases spread; ticks of 50 ms."""
        n = len(self.clients)
        tick = 0.05
        slots = max(1, int(round(interval / tick)))
        start = time.monotonic()
        k = 0
        timeout_ns = int(timeout * 1e9)
        while True:
            now = time.monotonic()
            if now - start >= duration:
                break
            slot = k % slots
            now_ns = time.perf_counter_ns()
            for i in range(slot, n, slots):
                self.clients[i].fire(now_ns, timeout_ns)
            k += 1
            if on_tick is not None:
                on_tick(now - start)
            await asyncio.sleep(max(0.0, start + k * tick - time.monotonic()))

    async def drain(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any(c.sent_at is not None for c in self.clients):
                return 0
            await asyncio.sleep(0.05)
        left = sum(1 for c in self.clients if c.sent_at is not None)
        self.stats.errors["no response at the end of the run"] += left
        return left

    def close(self) -> None:
        for c in self.clients:
            if c.transport is not None:
                c.transport.close()


# ---------------------------------------------------------------------------------------
# the run


async def scenario(args, gw_pid: int, http_port: int, tcp_port: int, procs, log) -> dict:
    stopping_flag = [False]
    stopping = lambda: stopping_flag[0]  # noqa: E731
    stats = Stats()
    res: dict = {}
    mem = {"idle": gateway_memory(gw_pid)}
    log(f"gateway idle: RSS {mem['idle']['rss_mb']} MB ({mem['idle']['processes']} processes)")

    services = [FakeService(i, stats, stopping) for i in range(args.services)]
    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(s.start(tcp_port) for s in services)), 60)
    res["service_connections"] = sum(len(s.links) for s in services)
    log(f"{args.services} service instances registered over {res['service_connections']} "
        f"connections in {time.monotonic() - t0:.1f}s")
    paths = [s.path for s in services]
    # every route answers before the clients come
    probe = ClientPool(stats, stopping)
    await probe.open(http_port, len(paths), paths, 32)
    deadline = time.monotonic() + 30
    while True:
        probe.hist = Histogram()
        before = sum(stats.errors.values())
        for c in probe.clients:
            c.fire(time.perf_counter_ns(), 10 ** 10)
        await probe.drain(10)
        bad = sum(stats.errors.values()) - before
        if not bad:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"routes not all answering 200 after 30 s: {dict(stats.errors)}")
        stats.errors.clear()
        await asyncio.sleep(0.5)
    stopping_flag[0] = True
    probe.close()
    await asyncio.sleep(0.2)
    stopping_flag[0] = False
    mem["services"] = gateway_memory(gw_pid)
    log(f"with the services: RSS {mem['services']['rss_mb']} MB")

    pool = ClientPool(stats, stopping)
    log(f"opening {args.clients} client connections ...")
    res["connect_s"] = round(await asyncio.wait_for(
        pool.open(http_port, args.clients, paths), 180), 2)
    await asyncio.sleep(1.0)
    mem["connected"] = gateway_memory(gw_pid)
    log(f"{args.clients} clients connected in {res['connect_s']} s: RSS "
        f"{mem['connected']['rss_mb']} MB")

    series: list[tuple[float, float]] = []
    load_s = args.soak or args.duration
    # the first rounds allocate each connection's buffers: the slope starts after them
    settle = max(2 * args.interval, 30.0)
    next_sample = [0.0]

    def on_tick(elapsed: float) -> None:
        if elapsed >= next_sample[0]:
            m = gateway_memory(gw_pid, pss=False)
            series.append((round(elapsed, 1), m["rss_mb"]))
            next_sample[0] += args.sample_every
            if args.soak:
                log(f"  t={elapsed:6.0f}s RSS {m['rss_mb']} MB, {pool.responses} responses, "
                    f"{sum(stats.errors.values())} errors")

    log(f"light load: each client one request every {args.interval:g} s "
        f"({args.clients / args.interval:,.0f} req/s) for {load_s:g} s ...")
    t_load = time.monotonic()
    cpu0 = measuring.cpu_snapshot([gw_pid])
    await pool.load(args.interval, load_s, args.request_timeout, on_tick)
    await pool.drain(args.request_timeout)
    load_wall = time.monotonic() - t_load
    cpu1 = measuring.cpu_snapshot([gw_pid])
    mem["loaded"] = gateway_memory(gw_pid)
    series.append((round(load_wall, 1), mem["loaded"]["rss_mb"]))
    still_open = sum(1 for c in pool.clients if not c.closed)
    never = sum(1 for c in pool.clients if c.answered == 0)
    if load_s >= args.interval and never:
        stats.errors["clients never answered"] += never
    procs.check_alive()
    stopping_flag[0] = True
    pool.close()
    for s in services:
        s.close()
    await asyncio.sleep(0.3)
    res.update({
        "clients": args.clients, "clients_open_at_end": still_open,
        "requests": pool.requests, "responses": pool.responses,
        "offered_rate": round(args.clients / args.interval, 1),
        "achieved_rate": round(pool.responses / load_wall, 1),
        "latency": pool.hist.summary_ms(),
        "service_requests": stats.service_requests, "heartbeats_sent": stats.heartbeats,
        "pings_answered": stats.pings,
        "errors": dict(stats.errors),
        "gateway_cpu_us_per_req": round(measuring.cpu_delta(cpu0, cpu1) / max(1, pool.responses) * 1e6, 1),
        "gateway_cpu_util": round(measuring.cpu_delta(cpu0, cpu1) / load_wall, 3),
        "memory": mem, "rss_series_mb": series,
        "rss_settle_s": settle,
        "rss_slope_mb_per_min": slope_per_min([x for x in series if x[0] >= settle]),
    })
    return res


def write_config(tmp: Path, args, http_port: int, tcp_port: int) -> Path:
    cfg = tmp / "gateway.yaml"
    cfg.write_text(
        "# written by python -m perf connections\n"
        "gateway:\n"
        f"  node: {{workers: {args.workers}}}\n"
        "  http:\n"
        f"    host: {HOST}\n"
        f"    port: {http_port}\n"
        # room for every client and the probe, yet within the descriptors the gateway
        # checks it has at start-up (a container's hard limit can be 20,000)
        f"    maxConnections: {args.clients + 1000}\n"
        "    backlog: 4096\n"
        "  transports:\n"
        f"    tcp: {{host: {HOST}, port: {tcp_port}, maxConnections: {max(1000, 4 * args.services)}}}\n"
        "  logging: {accessLog: false}\n")
    return cfg


def run(args, log) -> dict:
    nofile = _procs.raise_nofile(args.nofile)
    if nofile[0] < args.clients + args.services * args.workers + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {nofile[0]}: too low for {args.clients} clients "
                         f"(run as root or raise the hard limit)")
    pin = measuring.decide_pinning(args.server_cpu, args.load_cpu, args.no_pin)
    result: dict = {"nofile_self": nofile[0], "nofile_wanted": args.nofile}
    with tempfile.TemporaryDirectory(prefix="stellagw-connections-") as tmpname:
        tmp = Path(tmpname)
        procs = measuring.ProcSet(tmp)
        try:
            http_port, tcp_port = _procs.free_port(), _procs.free_port()
            cfg = write_config(tmp, args, http_port, tcp_port)
            nf_soft, nf_hard = nofile      # what we got; the gateway gets the same
            cmd = ["prlimit", f"--nofile={nf_soft}:{nf_hard}", "--",
                   *pin.wrap(pin.server_cpu, [sys.executable, "-m", "stellagw", "serve",
                                              "--config", str(cfg)])]
            result["gateway_cmd"] = shlex.join(cmd)
            gw = procs.start("gateway", cmd, env=_procs.py_env())
            measuring.wait_http_ok(http_port, "/health/live", procs, args.start_timeout)
            try:
                result["nofile_gateway"] = psutil.Process(gw.popen.pid).rlimit(psutil.RLIMIT_NOFILE)[0]
            except psutil.Error:
                result["nofile_gateway"] = None
            if pin.enabled:
                os.sched_setaffinity(0, {pin.load_cpu})
            result["layout"] = (f"gateway ({'supervisor + ' if args.workers > 1 else ''}"
                                f"{args.workers} worker{'s' if args.workers > 1 else ''}) on CPU "
                                f"{pin.server_cpu}; clients + fake services (this process) on CPU "
                                f"{pin.load_cpu}" if pin.enabled else "unpinned")
            bound = args.start_timeout + 300 + (args.soak or args.duration) + 60
            result.update(uvloop.run(asyncio.wait_for(
                scenario(args, gw.popen.pid, http_port, tcp_port, procs, log), bound)))
            result["ok"] = not result["errors"]
        except (measuring.TargetFailed, RuntimeError, ConnectionError, asyncio.TimeoutError, OSError) as exc:
            result["ok"] = False
            result["failure"] = f"{type(exc).__name__}: {exc}"
            try:
                result["gateway_log_tail"] = procs.procs[0].log_tail(20) if procs.procs else ""
            except Exception:
                pass
        finally:
            procs.stop_all()
    return result


def report(res: dict, args, command: str) -> str:
    lines = []
    if "failure" in res:
        lines.append(f"FAILED: {res['failure']}")
        if res.get("gateway_log_tail"):
            lines.append(res["gateway_log_tail"])
    mem = res.get("memory", {})
    if mem:
        def row(k, label):
            m = mem.get(k)
            return (f"  {label:<34} RSS {m['rss_mb']:7.1f} MB   PSS {m['pss_mb']:7.1f} MB   "
                    f"({m['processes']} process{'es' if m['processes'] > 1 else ''})") if m else ""
        lines += ["gateway instance memory (supervisor + workers, psutil tree):",
                  row("idle", "started, nothing connected"),
                  row("services", f"+ {res.get('service_connections')} service connections"),
                  row("connected", f"+ {args.clients:,} client connections"),
                  row("loaded", f"after {args.soak or args.duration:g} s of light load")]
        loaded = mem.get("loaded") or mem.get("connected")
        if loaded and mem.get("services"):
            per = (loaded["rss"] - mem["services"]["rss"]) / max(1, args.clients)
            lines.append(f"  per client connection: {per / 1024:.1f} KB RSS")
            verdict = "PASS" if loaded["rss_mb"] <= args.rss_target_mb else "FAIL"
            lines.append(f"  target ≤ {args.rss_target_mb:g} MB with all connections open: "
                         f"{verdict} ({loaded['rss_mb']} MB)")
    if "requests" in res:
        lat = res["latency"]
        lines += [
            f"load: {res['clients']:,} clients × 1 request / {args.interval:g} s "
            f"({res['offered_rate']:,.0f} req/s offered, {res['achieved_rate']:,.0f} answered/s); "
            f"{res['requests']:,} requests, {res['responses']:,} responses; p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; gateway {res['gateway_cpu_us_per_req']} "
            f"CPU-µs/req at {100 * res['gateway_cpu_util']:.0f}% CPU",
            f"services: {res['service_connections']} connections, {res['service_requests']:,} requests "
            f"served, {res['heartbeats_sent']} heartbeats, {res['pings_answered']} pings answered; "
            f"clients still open at the end: {res['clients_open_at_end']:,}/{res['clients']:,}; "
            f"connect time {res['connect_s']} s",
            "errors: " + ("none" if not res["errors"] else
                          "; ".join(f"{k}: {v}" for k, v in res["errors"].items())),
        ]
        series = res.get("rss_series_mb") or []
        slope = res.get("rss_slope_mb_per_min")
        lines.append("RSS series (s, MB): " + ", ".join(f"({t:g}, {v})" for t, v in series))
        used = [x for x in series if x[0] >= res.get("rss_settle_s", 0)]
        if slope is not None and len(used) >= 3:
            lines.append(f"RSS slope after the first {res['rss_settle_s']:g} s: {slope:+.3f} MB/min "
                         f"({slope * 60:+.1f} MB/h) over {len(used)} samples; {used[0][1]} MB at "
                         f"{used[0][0]:g} s → {used[-1][1]} MB at {used[-1][0]:g} s")
        else:
            lines.append(f"RSS slope: n/a (needs 3 samples after the first "
                         f"{res.get('rss_settle_s', 0):g} s: use --soak)")
    lines += [f"fd limits: this process {res.get('nofile_self')}, gateway {res.get('nofile_gateway')}"
              + (f" (wanted {res['nofile_wanted']}; the hard limit caps it here)"
                 if res.get("nofile_self", 0) < res.get("nofile_wanted", 0) else ""),
              f"layout: {res.get('layout', '-')}",
              f"gateway: {res.get('gateway_cmd', '-')}",
              f"command: {command}"]
    return "\n".join(l for l in lines if l)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    ap.add_argument("--interval", type=float, default=5.0,
                    help="seconds between two requests of one client (default 5)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of light load (default 20)")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                    help="soak for this long instead, sampling RSS every --sample-every seconds")
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--request-timeout", type=float, default=10.0)
    ap.add_argument("--rss-target-mb", type=float, default=150.0)
    ap.add_argument("--nofile", type=int, default=65536, help="RLIMIT_NOFILE for us and the gateway")
    ap.add_argument("--server-cpu", type=int, default=0)
    ap.add_argument("--load-cpu", type=int, default=1)
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--start-timeout", type=float, default=30.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.clients < 1 or args.services < 1 or args.interval <= 0:
        ap.error("--clients, --services and --interval must be positive")
    if args.soak and args.soak > 24 * 3600:
        ap.error("--soak is bounded to 24 h")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = commands.command_line(__name__, argv)
    _procs.stop_on_sigterm()
    log = lambda msg: print(f"[connections] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    res = run(args, log)
    res["command"] = command
    print(report(res, args, command))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res.get("ok") else 1

