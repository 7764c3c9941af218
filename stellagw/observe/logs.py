"""JSON lines (docs/requirements.md §10): one per request plus lifecycle and error events.

Lines are buffered and handed over once a second (or at 64 KiB), because a write per
request would cost a syscall per request. The writing itself happens in a thread: stdout
may be a pipe nobody drains fast enough, and a blocking write must never stop the event
loop (it froze every connection of a worker once its pipe filled). Past MAX_PENDING bytes
waiting, lines are dropped and counted, and the next line that gets through says so.

Every line is at most MAX_LINE bytes, newline included, so that several workers writing
to one pipe never splice each other's lines (see ATOMIC_WRITE). A record that would be
longer has its longest strings clipped (clip_record) — a 10 KB user agent, path or error
text — each ending in "…", and the line names them in `"truncated": [...]`
(docs/operations.md, "Logs").

Never pass a token, proof, key or password to these functions: callers log identifiers,
not credentials.
"""
from __future__ import annotations

import logging
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
# at most this, and no line is longer than MAX_LINE (4096, Linux's PIPE_BUF).
ATOMIC_WRITE = getattr(select, "PIPE_BUF", 4096)
MAX_LINE = 4096
ELLIPSIS = "…"

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
        self.dropped = 0                # since the last note that said so
        # gateway_log_lines_dropped_total: the note above is written only once the output
        # takes lines again, which a stuck log collector never does.
        self.dropped_total = 0
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
        line = orjson.dumps(record)
        if len(line) >= MAX_LINE:       # no room for the newline: rare, clipped
            line = clip_record(record, MAX_LINE - 1)
        self._buf += line
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
                lines = data.count(b"\n")
                self.dropped += lines
                self.dropped_total += lines
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
                    if stop <= pos:         # a line longer than PIPE_BUF (< MAX_LINE): whole
                        stop = data.find(b"\n", pos + ATOMIC_WRITE) + 1 or end
                    piece = memoryview(data)[pos:stop]
                    while piece:
                        piece = piece[os.write(self._fd, piece):]
                    pos = stop
            except OSError:
                pass  # output closed: nothing more to do with these lines
            with self._wake:
                self._pending -= len(data)


# ------------------------------------------------------------ what libraries log

_FORMATTER = logging.Formatter()


class LibraryLogs(logging.Handler):
    """What the libraries say through Python's `logging` (picows, asyncio, OpenTelemetry ...),
    as records of the worker's JSON log. Without a handler, Python's last-resort one wrote
    their warnings and errors to stderr as raw text, beside the JSON log, past its escaping
    and clipping: every WebSocket client that sent a bad frame wrote a line of picows' (an
    adversarial probe). At most one record a second per logger (picows' per-connection
    loggers count as one); the next one says how many were left out."""

    def __init__(self, log: JsonLog, loop):
        super().__init__(logging.WARNING)
        self._log = log
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._last: dict[str, list] = {}      # logger -> [second of its last record, left out]

    def emit(self, record: logging.LogRecord) -> None:
        try:
            name = record.name
            if name.rpartition(".")[2].isdigit():     # picows: one child logger per socket
                name = name.rpartition(".")[0]
            second = int(record.created)
            last = self._last.get(name)
            if last is not None and last[0] == second:
                last[1] += 1
                return
            left_out = last[1] if last is not None else 0
            if last is not None:
                last[0], last[1] = second, 0
            elif len(self._last) < 256:
                self._last[name] = [second, 0]
            fields = {"logger": name, "message": record.getMessage()}
            if record.exc_info and record.exc_info[1] is not None:
                # asyncio's "Exception in callback ..." and the like: where it came from is
                # what an operator needs (clipped, as any long string, to the line's size).
                fields["error"] = repr(record.exc_info[1])
                fields["traceback"] = _FORMATTER.formatException(record.exc_info)
            if left_out:
                fields["leftOut"] = left_out
            level = "error" if record.levelno >= logging.ERROR else "warning"
            if threading.get_ident() == self._loop_thread:
                self._write(level, fields)
            else:                   # JsonLog's buffer belongs to the loop's thread
                self._loop.call_soon_threadsafe(self._write, level, fields)
        except Exception:           # a log line must never take the caller down
            self.handleError(record)

    def _write(self, level: str, fields: dict) -> None:
        message = fields.pop("message")
        self._log.event(level, message, **fields)


_UNRAISABLE = logging.getLogger("unraisable")


def _unraisable(unraisable) -> None:
    """sys.unraisablehook: an exception nothing could raise further goes to the JSON log
    as a record of logger `unraisable` (at most one a second, as every library record),
    not to stderr as Python's default does. A TLS client sending a server name that is not
    ASCII made the ssl module's SNI callback write 'Exception ignored in: b'...'' and a
    traceback to stderr on every handshake (docs/security.md §3d row 57)."""
    try:
        where = repr(unraisable.object)[:200] if unraisable.object is not None else ""
        _UNRAISABLE.error("%s%s", unraisable.err_msg or "Exception ignored in",
                          f": {where}" if where else "",
                          exc_info=(unraisable.exc_type, unraisable.exc_value,
                                    unraisable.exc_traceback))
    except Exception:
        pass


def install_library_logs(log: JsonLog, loop) -> LibraryLogs:
    """Route the process's `logging` records, and its unraisable exceptions, into `log` (a
    worker process: one per process)."""
    handler = LibraryLogs(log, loop)
    root = logging.getLogger()
    root.addHandler(handler)
    if root.level > logging.WARNING or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    sys.unraisablehook = _unraisable
    return handler


# ---------------------------------------------------------------------------- clipping

def clip_record(record: dict, limit: int) -> bytes:
    """`record` as one JSON object of at most `limit` bytes (orjson's form), its longest
    strings shortened; `record` itself is not changed.

    The strings, at any depth, are cut to one common size, the largest that makes the line
    fit ("water-filling": the longest lose most, short ones nothing), each ending in
    ELLIPSIS, and `"truncated"` names them ("userAgent", "timings.name", "items.0").
    Strings are cut as Python strings, between code points, before they are serialised:
    the JSON escapes and UTF-8 sequences orjson writes are never cut; and a cut is moved
    before a backslash among the last three characters kept, so the `\\xNN` escapes the
    gateway writes into user agents stay whole too. When cutting every string to a few
    bytes is not enough (a record of many numbers), the line keeps only timestamp, level,
    the message's start and `"truncated": ["*"]`.
    """
    record = _copy(record)
    line = orjson.dumps(record)
    if len(line) <= limit:
        return line
    leaves: list = []
    _strings(record, "", leaves)
    leaves.sort(key=lambda leaf: leaf[3], reverse=True)
    for _ in range(4):
        excess = len(line) - limit
        if excess <= 0:
            return line
        cap = _common_size(leaves, excess)
        if cap is None:
            break
        clipped = []
        for i, (holder, key, name, size) in enumerate(leaves):
            if size <= cap:
                break
            value = holder[key]
            keep = _prefix_within(value, cap - _ELLIPSIS_BYTES)
            holder[key] = value[:keep] + ELLIPSIS
            leaves[i] = (holder, key, name, len(orjson.dumps(holder[key])) - 2)
            clipped.append(name)
        names = record.get("truncated") if isinstance(record.get("truncated"), list) else []
        record["truncated"] = names + [n for n in clipped if n not in names]
        line = orjson.dumps(record)
        leaves.sort(key=lambda leaf: leaf[3], reverse=True)
    if len(line) <= limit:
        return line
    return orjson.dumps({"timestamp": record.get("timestamp"), "level": record.get("level"),
                         "message": str(record.get("message", ""))[:200], "truncated": ["*"]})


_ELLIPSIS_BYTES = len(ELLIPSIS.encode("utf-8"))
_MIN_SIZE = 16                  # bytes a clipped string keeps at least, ellipsis included
_TRUNCATED_KEY = len(b',"truncated":')


def _copy(value):
    """Dicts and lists copied (a clip must not change what the caller holds)."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _strings(value, prefix: str, out: list) -> None:
    """Every string longer than _MIN_SIZE bytes (in JSON, quotes aside) in `value`:
    (holder, key, dotted name, size)."""
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(item, str):
            size = len(orjson.dumps(item)) - 2
            if size > _MIN_SIZE:
                out.append((value, key, f"{prefix}{key}", size))
        elif isinstance(item, (dict, list)):
            _strings(item, f"{prefix}{key}.", out)


def _common_size(leaves: list, excess: int):
    """The largest size (bytes, ellipsis included) that, every longer string cut to it,
    saves `excess` bytes plus what the `"truncated"` list takes; None when even
    _MIN_SIZE does not. `leaves` longest first."""
    def saves(cap: int) -> int:
        saved, names = 0, []
        for _, _, name, size in leaves:
            if size <= cap:
                break
            saved += size - cap
            names.append(name)
        return saved - _TRUNCATED_KEY - len(orjson.dumps(names))

    if not leaves or saves(_MIN_SIZE) < excess:
        return None
    low, high = _MIN_SIZE, leaves[0][3]        # saves(low) >= excess > saves(high) = ...
    while low < high:
        mid = (low + high + 1) // 2
        if saves(mid) >= excess:
            low = mid
        else:
            high = mid - 1
    return low


def _prefix_within(text: str, budget: int) -> int:
    """The most code points of `text` whose JSON form (quotes aside) takes at most
    `budget` bytes, not cut just after a backslash (see clip_record)."""
    if budget <= 0:
        return 0
    low, high = 0, min(len(text), budget)     # every code point takes at least one byte
    while low < high:
        mid = (low + high + 1) // 2
        if len(orjson.dumps(text[:mid])) - 2 <= budget:
            low = mid
        else:
            high = mid - 1
    if low < len(text):
        backslash = text.rfind("\\", max(0, low - 3), low)
        if backslash >= 0:
            low = backslash
    return low
