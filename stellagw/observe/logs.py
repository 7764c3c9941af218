"""JSON lines (seed §10): one per request plus lifecycle and error events.

Lines are buffered and written at most once per 100 ms (or at 64 KiB), because a write
per request would cost a syscall per request. Never pass a token, proof, key or password
to these functions: callers log identifiers, not credentials.
"""
from __future__ import annotations

import os
import sys
import time

import orjson

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_FLUSH_AT = 64 * 1024


class JsonLog:
    def __init__(self, level: str = "info", stream=None, access_log: bool = True):
        self.threshold = LEVELS[level]
        self.access_log = access_log and self.threshold <= LEVELS["info"]
        self._fd = (stream or sys.stdout).fileno()
        self._buf = bytearray()
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
                service: str, duration_ms: float, status: int) -> None:
        self._append({
            "timestamp": self._timestamp(), "level": "info", "message": "Request routed"
            if service else "Request answered",
            "correlationId": correlation_id, "tenantId": tenant, "method": method,
            "path": path, "service": service, "durationMs": round(duration_ms, 3),
            "status": status,
        })

    def _append(self, record: dict) -> None:
        self._buf += orjson.dumps(record)
        self._buf += b"\n"
        if len(self._buf) >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data, self._buf = bytes(self._buf), bytearray()
        try:
            while data:
                data = data[os.write(self._fd, data):]
        except BlockingIOError:
            # stdout is a pipe that is full: keep the rest rather than block the loop.
            self._buf[:0] = data
        except OSError:
            pass
