"""The ceiling for Python: a raw uvloop + httptools HTTP/1.1 hello server.

Every request, whatever its method or path, is answered with ``200`` and a small
fixed body.  Keep-alive and pipelining are supported; the responses to all the
requests parsed out of one read are written with a single ``transport.write``
(so a non-pipelined request costs exactly one write, and a pipelined burst
does not cost one syscall per response).  There is no routing, no logging and
no Date header: this is the cheapest HTTP server Python can offer, the
baseline that ``python -m perf compare`` measures the gateway and nginx against, and
the hello backend nginx proxies to.

A loopback benchmark tool only, never a server to deploy::

    python -m perf raw-server --host 127.0.0.1 --port 8081
    wrk -t1 -c64 -d10s --latency http://127.0.0.1:8081/

Under a profiler::

    perf record -g -- python -m perf raw-server --port 8081      # then run wrk
    py-spy record -o raw.svg -- python -m perf raw-server --port 8081
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket

import httptools
import uvloop

from . import commands

BODY = b"Hello, World!\n"

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"\r\n" + BODY
)
# Same response for a client that asked to close (HTTP/1.0 without keep-alive,
# or "Connection: close"): say so, then close after the write.
RESPONSE_CLOSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(BODY)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + BODY
)
RESPONSE_400 = (
    b"HTTP/1.1 400 Bad Request\r\n"
    b"Content-Length: 0\r\n"
    b"Connection: close\r\n"
    b"\r\n"
)


class HelloProtocol(asyncio.Protocol):
    """One connection: parse with httptools, answer every complete message."""

    __slots__ = ("transport", "parser", "out", "closing")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        self.closing = False

    # -- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: this server speaks only HTTP/1.1; answer what
            # was complete and hang up.
            self.closing = True
        except httptools.HttpParserError:
            # Data after a message that ended the connection is refused by
            # llhttp too: only a real parse error gets a 400.
            if not self.closing:
                self.out.append(RESPONSE_400)
                self.closing = True
        out = self.out
        if out:
            # One write for every response produced by this read.
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]
            out.clear()
        if self.closing:
            self.transport.close()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        # A client that pipelines without reading: stop reading until the
        # kernel buffer drains instead of queueing responses without bound.
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self.transport.resume_reading()  # type: ignore[union-attr]

    # -- httptools callbacks ----------------------------------------------
    def on_message_complete(self) -> None:
        if self.closing:
            return
        if self.parser.should_keep_alive():
            self.out.append(RESPONSE)
        else:
            self.out.append(RESPONSE_CLOSE)
            self.closing = True


async def serve(host: str, port: int, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        HelloProtocol, host, port, backlog=backlog, reuse_address=True
    )
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set_result, None)
    addr = server.sockets[0].getsockname()
    print(f"raw_server listening on http://{addr[0]}:{addr[1]}/", flush=True)
    try:
        await stop
    finally:
        server.close()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=commands.prog(__name__), description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8081, help="TCP port (default 8081)")
    ap.add_argument("--backlog", type=int, default=4096, help="listen backlog")
    args = ap.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.backlog))
    return 0

