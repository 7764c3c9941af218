"""Service-side peers for transport tests: a raw frame peer over a real socket (it sends
exactly what a test says, hostile or not), and an SDK Service running in its own thread."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid

import uvloop

from stellagw.transport import frame as fr


class RawPeer:
    """One connection to a gateway's transport port, frames by hand."""

    def __init__(self, port: int, ssl_ctx=None, rcvbuf: int | None = None, timeout: float = 10.0,
                 max_frame_size: int = fr.DEFAULT_MAX_FRAME_SIZE):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connect: the window the peer advertises is fixed at the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        if ssl_ctx is not None:
            sock = ssl_ctx.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        # What it accepts, as a service holding the gateway to its HELLO's max_frame_size:
        # read_frame raises FrameTooLarge on a longer frame.
        self._dec = fr.FrameDecoder(max_frame_size)

    def send(self, ftype: int, payload: bytes = b"", corr: bytes = fr.ZERO_CORR) -> None:
        """One frame with `payload` verbatim."""
        enc = fr.FrameEncoder()
        enc.raw(ftype, corr, payload)
        self.sock.sendall(enc.take())

    def send_control(self, ftype: int, obj: dict, corr: bytes = fr.ZERO_CORR) -> None:
        enc = fr.FrameEncoder()
        enc.control(ftype, corr, obj)
        self.sock.sendall(enc.take())

    def hello(self, hello: dict) -> dict:
        """Send HELLO, return the HELLO_ACK (with `error` when refused)."""
        self.send_control(fr.HELLO, hello)
        frame = self.read_frame()
        assert frame is not None and frame[0] == fr.HELLO_ACK, frame
        return fr.decode_control(frame[2])

    def read_frame(self, timeout: float = 10.0):
        """The next frame, or None once the gateway closed the connection."""
        self.sock.settimeout(timeout)
        while True:
            frame = self._dec.next()
            if frame is not None:
                return frame[0], bytes(frame[1]), bytes(frame[2])
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self._dec.feed(data)

    def wait_closed(self, timeout: float = 15.0) -> list:
        """Read until the gateway closes (frames read meanwhile are returned)."""
        deadline = time.monotonic() + timeout
        frames = []
        while time.monotonic() < deadline:
            try:
                frame = self.read_frame(max(0.05, deadline - time.monotonic()))
            except (socket.timeout, TimeoutError):
                break
            if frame is None:
                return frames
            frames.append(frame)
        raise AssertionError(f"still open after {timeout}s; read {[f[0] for f in frames]}")

    def close(self) -> None:
        self.sock.close()


def hello_for(service: str, version: str = "1.0.0", endpoints=(), instance_id: str | None = None,
              **extra) -> dict:
    hello = {"protocol": 1, "service": service, "version": version,
             "instance_id": instance_id or f"{service}-{uuid.uuid4().hex[:8]}", "region": "",
             "endpoints": [{"method": m, "path": p, "timeout_ms": 60000} for m, p in endpoints]}
    hello.update(extra)
    return hello


class SdkThread:
    """An SDK Service on its own uvloop in a thread (the test thread stays free to block)."""

    def __init__(self, service):
        self.service = service
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self, wait: bool = True, timeout: float = 10.0) -> "SdkThread":
        self._thread.start()
        self.run(self.service.start())
        if wait:
            self.run(self.service.wait_registered(1, timeout=timeout), timeout + 5)
        return self

    def run(self, coro, timeout: float = 15.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def links(self) -> int:
        return len(self.service._links)

    def stop(self) -> None:
        try:
            self.run(self.service.stop(timeout=2))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
