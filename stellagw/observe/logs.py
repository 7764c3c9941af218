"""JSON lines (docs/requirements.md §10): one per request plus lifecycle and error events.

Lines are buffered and handed over once a second (or at 64 KiB), because a write per
request would cost a syscall per request. The writing itself happens in a thread: stdout
may be a pipe nobody drains fast enough, and a blocking write must never stop the event
loop (it froze every connection of a worker once its pipe filled). Past MAX_PENDING bytes
waiting, lines are dropped and counted, and the next line that gets through says so.

Never pass a token, proof, key or password to these functions: callers log identifiers,
not credentials.
"""
from __future__ import annotations

import os
import select
import sys
import threading
import time
from collections import deque

import orjson

MAX_PENDING = 16 * 1024 * 1024
# Several workers share one stdout pipe: a write of at most PIPE_BUF bytes to a pipe is
# atomic, a longer one may interleave with another process's mid-line (2,284 of 108,593
# lines spliced with two workers and 3 KB user agents). Lines go out in whole-line pieces of
# at most this; only a single line longer than it can still be cut.
ATOMIC_WRITE = getattr(select, "PIPE_BUF", 4096)

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_FLUSH_AT = 64 * 1024


class JsonLog:
    def __init__(self, level: str = "info", stream=None, access_log: bool = True):
        self.threshold = LEVELS[level]
        self.access_log = access_log and self.threshold <= LEVELS["info"]
        self._fd = (stream or sys.stdout).fileno()
        self._buf = bytearray()
        self._queue: deque[bytes] = deque()
        self._pending = 0
        self.dropped = 0
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._ts_second = -1
        self._ts_prefix = ""
        self.extra: dict = {}

    def _timestamp(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._ts_second:
            self._ts_second = second
            self._ts_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._ts_prefix}.{int((now - second) * 1000):03d}Z"

    def event(self, level: str, message: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        record = {"timestamp": self._timestamp(), "level": level, "message": message}
        if self.extra:
            record.update(self.extra)
        record.update(fields)
        self._append(record)

    def request(self, correlation_id: str, tenant: str | None, method: str, path: str,
                service: str, duration_ms: float, status: int, auth: str | None = None,
                **fields) -> None:
        """One access log line. `fields`: client, userAgent, bytesIn, bytesOut, upstream,
        version, timings (ms per stage) — what the ingress knows of the request."""
        record = {
            "timestamp": self._timestamp(), "level": "info", "message": "Request routed"
            if service else "Request answered",
            "correlationId": correlation_id, "tenantId": tenant, "method": method,
            "path": path, "service": service, "durationMs": round(duration_ms, 3),
            "status": status, "auth": auth,
        }
        if fields:
            record.update(fields)
        self._append(record)

    def _append(self, record: dict) -> None:
        self._buf += orjson.dumps(record)
        self._buf += b"\n"
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand what is buffered to the writer thread; never blocks on the output."""
        if not self._buf:
            return
        data, self._buf = bytes(self._buf), bytearray()
        with self._wake:
            if self._pending + len(data) > MAX_PENDING:
                self.dropped += data.count(b"\n")
                return
            if self.dropped:
                note = orjson.dumps({"timestamp": self._timestamp(), "level": "warning",
                                     "message": "log lines dropped: output too slow",
                                     "dropped": self.dropped}) + b"\n"
                data = note + data
                self.dropped = 0
            self._queue.append(data)
            self._pending += len(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="stellagw-log",
                                                daemon=True)
                self._writer.start()
            self._wake.notify()

    def drain(self, timeout: float = 2.0) -> None:
        """Flush and wait (bounded) until the writer has written everything: at exit."""
        self.flush()
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.005)

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                data = self._queue.popleft()
            try:
                pos, end = 0, len(data)
                while pos < end:
                    stop = data.rfind(b"\n", pos, pos + ATOMIC_WRITE) + 1
                    if stop <= pos:         # one line longer than that: whole, not atomic
                        stop = data.find(b"\n", pos + ATOMIC_WRITE) + 1 or end
                    piece = memoryview(data)[pos:stop]
                    while piece:
                        piece = piece[os.write(self._fd, piece):]
                    pos = stop
            except OSError:
                pass  # output closed: nothing more to do with these lines
            with self._wake:
                self._pending -= len(data)
