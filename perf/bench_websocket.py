"""WebSocket messages/s and added latency: through the gateway beside a picows echo server
called directly, in one run (issue 9).

    python -m perf bench-websocket [--seconds 5] [--size 64] [--window 32]

Latency: one client, one message at a time (round trip, p50/p99). Throughput: one client
keeping --window messages in flight. Both targets echo; the gateway path is client → gateway
(picows) → frame protocol → SDK service → back. Loopback only, bounded by --seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import uvloop
from picows import WSListener, WSMsgType, ws_connect, ws_create_server

from . import commands
from ._procs import REPO_DIR, free_port


class Echo(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            transport.send(frame.msg_type, frame.get_payload_as_bytes())


class Client(WSListener):
    def __init__(self):
        self.waiter = None
        self.received = 0
        self.target = 0

    def on_ws_frame(self, transport, frame):
        if frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            self.received += 1
            if self.waiter is not None and self.received >= self.target and not self.waiter.done():
                self.waiter.set_result(None)


async def measure(url: str, seconds: float, size: int, window: int) -> dict:
    transport, client = await ws_connect(Client, url)
    loop = asyncio.get_running_loop()
    payload = b"x" * size
    # latency: one at a time
    lat = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        client.target = client.received + 1
        client.waiter = loop.create_future()
        t0 = time.perf_counter()
        transport.send(WSMsgType.BINARY, payload)
        await client.waiter
        lat.append(time.perf_counter() - t0)
    # throughput: `window` in flight
    sent = 0
    start_received = client.received
    end = time.monotonic() + seconds
    t0 = time.perf_counter()
    while time.monotonic() < end:
        for _ in range(window):
            transport.send(WSMsgType.BINARY, payload)
        sent += window
        client.target = start_received + sent
        client.waiter = loop.create_future()
        await client.waiter
    elapsed = time.perf_counter() - t0
    transport.send_close()
    transport.disconnect()
    lat.sort()
    return {"rtt_p50_ms": lat[len(lat) // 2] * 1e3, "rtt_p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
            "round_trips": len(lat), "msgs_per_s": sent / elapsed}


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args(argv)
    procs = []
    tmp = tempfile.mkdtemp(prefix="stellagw-wsbench-")
    try:
        http, tcp = free_port(), free_port()
        cfg = os.path.join(tmp, "gw.yaml")
        with open(cfg, "w") as f:
            f.write(f"gateway: {{http: {{port: {http}}}, transports: {{tcp: {{port: {tcp}}}}}, "
                    f"logging: {{accessLog: false}}}}\n")
        procs.append(subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", cfg],
                                      cwd=REPO_DIR, stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.services", "--name", "bench",
                                       "--gateway", f"127.0.0.1:{tcp}"], cwd=REPO_DIR))

        async def run():
            direct = await ws_create_server(lambda r: Echo(), "127.0.0.1", 0)
            dport = direct.sockets[0].getsockname()[1]
            deadline = time.monotonic() + 20
            while True:   # wait for the service to register
                try:
                    t, _ = await ws_connect(Client, f"ws://127.0.0.1:{http}/t/bench/ws")
                    t.disconnect()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            results = {"picows direct": await measure(f"ws://127.0.0.1:{dport}/", args.seconds,
                                                      args.size, args.window),
                       "via stellagw": await measure(f"ws://127.0.0.1:{http}/t/bench/ws",
                                                     args.seconds, args.size, args.window)}
            direct.close()
            return results

        results = uvloop.run(run())
        print(f"{'target':<14} {'msgs/s':>10} {'rtt p50 ms':>11} {'rtt p99 ms':>11}")
        for name, r in results.items():
            print(f"{name:<14} {r['msgs_per_s']:>10,.0f} {r['rtt_p50_ms']:>11.3f} {r['rtt_p99_ms']:>11.3f}")
        d, g = results["picows direct"], results["via stellagw"]
        print(f"added latency p50 {g['rtt_p50_ms'] - d['rtt_p50_ms']:.3f} ms, "
              f"p99 {g['rtt_p99_ms'] - d['rtt_p99_ms']:.3f} ms; "
              f"{args.size}-byte messages, window {args.window}")
        print("command: " + commands.command_line(__name__, argv))
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

