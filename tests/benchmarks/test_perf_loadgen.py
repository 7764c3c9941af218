"""``python -m perf loadgen`` open mode and its C loop (perf/openloop.pyx), against real
sockets.

The latency figures of issue 8 come from this generator, so what it counts is checked
here: every request it sends is answered and counted once, responses split or coalesced
across reads are parsed, what it cannot parse is an error (never a silent success), and
its histogram buckets are loadgen.Histogram's. Its stop detector and ``hiccups`` mode (the
figures that say how much of a tail is the machine's) are checked against a server that
pauses and a CPU shared with a busy loop.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time

import pytest

from perf import commands, loadgen
from perf._procs import REPO_DIR


@pytest.fixture(scope="module")
def openloop():
    return loadgen.load_openloop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def raw_server():
    port = _free_port()
    p = subprocess.Popen(commands.argv("raw-server", "--port", str(port)), cwd=REPO_DIR,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError("python -m perf raw-server did not start")
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
    finally:
        p.kill()
        p.wait()


def run(*args: str) -> tuple[int, dict]:
    p = subprocess.run(commands.argv("loadgen", "open", *args), cwd=REPO_DIR,
                       capture_output=True, text=True, timeout=120)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    assert lines, p.stderr[-2000:]
    return p.returncode, json.loads(lines[-1])


def test_buckets_are_the_python_histograms(openloop):
    rnd = random.Random(8)
    values = list(range(0, 5000))
    values += [(1 << k) + d for k in range(7, 62) for d in (-1, 0, 1)]
    values += [rnd.randrange(1 << 40) for _ in range(20000)]
    assert [openloop.bucket_index(v) for v in values] == [loadgen.Histogram.index(v) for v in values]


@pytest.mark.parametrize("spin", [False, True])
def test_every_request_is_sent_on_schedule_and_counted_once(raw_server, spin):
    rc, res = run("--url", raw_server, "--rate", "2000", "--duration", "0.5", "--warmup", "0.1",
                  "--connections", "4", *(["--spin"] if spin else []))
    assert rc == 0
    assert res["engine"] == "c" and res["errors"] == {}
    assert res["sent"] == 1000                       # due at i / 2000 s, i < 1000
    assert res["completed"] == res["ok_2xx"] == 1000
    assert res["statuses"] == {"200": 1000}
    assert res["latency"]["count"] == res["latency_from_schedule"]["count"] == 1000
    # measured from the write vs. from the due time: the second can only be later
    assert 0 < res["latency"]["p50_ms"] <= res["latency_from_schedule"]["p50_ms"] + 0.001
    assert sum(res["histogram"].values()) == 1000


def test_the_python_loop_reports_the_same_document(raw_server):
    rc, res = run("--url", raw_server, "--rate", "2000", "--duration", "0.3", "--warmup", "0",
                  "--connections", "2", "--engine", "python")
    assert rc == 0 and res["errors"] == {} and res["completed"] > 0
    _, c = run("--url", raw_server, "--rate", "2000", "--duration", "0.3", "--warmup", "0",
               "--connections", "2")
    common = {"url", "connections", "wall_s", "completed", "ok_2xx", "achieved_rate", "statuses",
              "errors", "latency", "histogram", "mode", "offered_rate", "sent",
              "schedule_lag_max_ms", "schedule_lag_p99_ms", "generator_behind"}
    assert common <= res.keys() and common <= c.keys()


class _Server:
    """A loopback server whose answers are written by ``reply(conn, requests_so_far)``."""

    def __init__(self, reply):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.reply = reply
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        buf, seen = b"", 0
        with conn:
            while data := conn.recv(65536):
                buf += data
                n = buf.count(b"\r\n\r\n")
                buf = buf[buf.rfind(b"\r\n\r\n") + 4:] if n else buf
                seen += n
                if self.reply(conn, seen) is False:
                    return

    def close(self):
        self.sock.close()


def run_against(reply, *args: str) -> tuple[int, dict]:
    """``loadgen open`` against a _Server answering with ``reply``."""
    srv = _Server(reply)
    try:
        return run("--url", srv.url, "--warmup", "0", *args)
    finally:
        srv.close()


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def test_responses_split_and_coalesced_across_reads():
    answered = [0]

    def reply(conn, seen):
        # answer in pairs, the two responses cut into three writes at odd places
        while seen - answered[0] >= 2:
            two = OK.replace(b"Content-Length", b"content-length") + OK
            for part in (two[:7], two[7:len(OK) + 3], two[len(OK) + 3:]):
                conn.sendall(part)
                time.sleep(0.0002)
            answered[0] += 2

    rc, res = run_against(reply, "--rate", "1000", "--duration", "0.2", "--connections", "1")
    assert rc == 0, res["errors"]
    assert res["sent"] == res["completed"] == 200
    assert res["statuses"] == {"200": 200}


def test_what_it_cannot_parse_is_an_error_not_a_success():
    def reply(conn, seen):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")

    rc, res = run_against(reply, "--rate", "200", "--duration", "0.2", "--connections", "2",
                          "--drain", "0.5")
    assert rc == 1
    assert res["completed"] == 0 and res["statuses"] == {}
    assert res["errors"]["response without Content-Length (not supported)"] == 2
    # the connections are gone: every request due after that is an error too, each once
    assert sum(res["errors"].values()) == res["sent"] > 2


def test_a_server_that_closes_loses_its_outstanding_requests_as_errors():
    answered = [0]

    def reply(conn, seen):
        while answered[0] < min(seen, 2):
            conn.sendall(OK)
            answered[0] += 1
        if seen >= 3:
            return False          # close without answering the third

    rc, res = run_against(reply, "--rate", "1000", "--duration", "0.1", "--connections", "1",
                          "--drain", "0.5")
    assert rc == 1
    assert res["completed"] == 2
    errors = res["errors"]
    assert errors["connection closed with requests outstanding"] >= 1   # the third, at least
    # every request but the two answered is an error, once
    assert sum(errors.values()) == res["sent"] - 2
    assert set(errors) <= {"connection closed with requests outstanding",
                           "not sent: its connection was closed"}


def test_a_server_that_pauses_is_reported_as_a_stop():
    paused, answered, server = [], {}, threading.Lock()

    def reply(conn, seen):
        with server:              # one server: while it sleeps, no connection is answered
            if seen >= 25 and not paused:
                paused.append(seen)
                time.sleep(0.08)  # the request path makes no progress for 80 ms
            conn.sendall(OK * (seen - answered.get(conn, 0)))
            answered[conn] = seen

    rc, res = run_against(reply, "--rate", "1000", "--duration", "0.3", "--connections", "2")
    assert rc == 0, res["errors"]
    assert paused and res["completed"] == res["sent"] == 300
    stops = res["stops"]
    assert stops["count"] >= 1
    # a lower bound of the pause: from the later of the last response and the stalled
    # request's write, and that request was written after the previous response
    assert 60 <= stops["max_ms"] <= stops["total_ms"]
    assert stops["share"] == pytest.approx(stops["total_ms"] / 1000 / res["wall_s"], rel=0.01)


def test_hiccups_sees_the_time_another_task_takes_its_cpu():
    """Two CPU-bound processes on one CPU: the scheduler gives each about half, so the
    spin must report gaps adding up to a good part of its run."""
    cpu = min(os.sched_getaffinity(0))

    def pin():
        os.sched_setaffinity(0, {cpu})

    busy = subprocess.Popen([sys.executable, "-c", "import time\ne = time.time() + 20\n"
                             "while time.time() < e: pass"], preexec_fn=pin)
    try:
        p = subprocess.run(commands.argv("loadgen", "hiccups", "--duration", "1.0",
                                         "--threshold-us", "200"), cwd=REPO_DIR,
                           capture_output=True, text=True, timeout=120, preexec_fn=pin)
    finally:
        busy.kill()
        busy.wait()
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(p.stdout.splitlines()[-1])
    assert res["cpus"] == [cpu]
    assert res["count"] == len(res["gaps"]) >= 1
    assert res["total_ms"] == pytest.approx(sum(g for _, g in res["gaps"]), abs=0.01 * res["count"])
    assert res["share"] >= 0.2
    assert all(0 <= at < 1000 and gap >= 0.2 for at, gap in res["gaps"])


def test_back_to_back_keeps_one_request_in_flight_per_connection():
    in_flight, answered = [], {}

    def reply(conn, seen):
        in_flight.append(seen - answered.get(conn, 0))
        conn.sendall(OK * (seen - answered.get(conn, 0)))
        answered[conn] = seen

    rc, res = run_against(reply, "--back-to-back", "--spin", "--duration", "0.3",
                          "--connections", "1")
    assert rc == 0, res["errors"]
    assert res["mode"] == "back-to-back"
    assert res["completed"] == res["sent"] > 50
    assert max(in_flight) == 1            # never a second request before the answer
    assert res["latency"]["count"] == res["completed"]


def test_open_needs_a_rate_unless_back_to_back():
    p = subprocess.run(commands.argv("loadgen", "open", "--url", "http://127.0.0.1:1/"),
                       cwd=REPO_DIR, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--rate is required" in p.stderr
