"""Log lines fit one atomic pipe write: at most MAX_LINE (4096) bytes, newline included
(stellagw/observe/logs.py, docs/operations.md "Logs").

clip_record() on its own — long, multibyte and escape-heavy strings at every boundary, and
random records — and JsonLog writing through a real pipe. The gateway end to end (two
workers sharing stdout, 10 KB user agents and long paths) is in tests/operations/test_cli.py.
"""
from __future__ import annotations

import os
import re

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stellagw.observe.logs import ELLIPSIS, MAX_LINE, JsonLog, clip_record


def check_clip(record: dict, limit: int) -> dict:
    """clip_record's promises: fits, is JSON, same fields, clipped strings are prefixes of
    the originals ending in ELLIPSIS and named in `truncated`, the others unchanged."""
    line = clip_record(record, limit)
    assert len(line) <= limit, (len(line), limit)
    out = orjson.loads(line)
    if out.get("truncated") == ["*"]:
        return out
    names = set(out.pop("truncated", []))
    assert out.keys() == record.keys()
    seen = set()

    def walk(before, after, prefix):
        if isinstance(before, dict):
            assert before.keys() == after.keys()
            for k in before:
                walk(before[k], after[k], f"{prefix}{k}.")
        elif isinstance(before, list):
            assert len(before) == len(after)
            for i, (b, a) in enumerate(zip(before, after)):
                walk(b, a, f"{prefix}{i}.")
        elif after != before:
            name = prefix[:-1]
            assert isinstance(before, str) and name in names, name
            assert after.endswith(ELLIPSIS) and before.startswith(after[:-1])
            seen.add(name)
    walk(record, out, "")
    assert seen == names
    return out


def access(**fields):
    record = {"timestamp": "2026-12-07T19:20:26.771Z", "level": "info",
              "message": "Request routed", "correlationId": "4bb5a534000000000003",
              "tenantId": None, "method": "GET", "path": "/rp/secure", "service": "rp",
              "durationMs": 0.25, "status": 200, "auth": "dpop", "client": "127.0.0.1",
              "userAgent": "curl/8", "bytesIn": 0, "bytesOut": 2, "upstream": "rp-1",
              "version": "1.0.0", "timings": {"auth": 0.1, "routing": 0.0}}
    record.update(fields)
    return record


def test_a_short_record_is_written_as_orjson_writes_it():
    record = access()
    assert clip_record(record, MAX_LINE - 1) == orjson.dumps(record)


def test_the_longest_strings_lose_most_short_ones_nothing():
    record = access(userAgent="u" * 10_000, path="/p" * 3_000, client="10.0.0." + "9" * 100)
    out = check_clip(record, MAX_LINE - 1)
    assert set(out) >= {"userAgent", "path"}
    assert out["client"] == record["client"]                # short enough to keep
    assert abs(len(out["userAgent"]) - len(out["path"])) <= 1   # one common size
    assert len(orjson.dumps(out)) > MAX_LINE - 200          # no more clipped than needed
    assert record["userAgent"] == "u" * 10_000              # the caller's record untouched


@pytest.mark.parametrize("unit", ["é", "€", "😀", '"', "\\", "\x01", "\n", "\x7f", "\u2028",
                                  "\\x85", "a\\x9fé"])
def test_multibyte_and_escapes_are_never_cut_at_any_boundary(unit):
    # Every limit over a few units' width: each cut lands on another byte of the unit's
    # UTF-8 or JSON escape (\", \\, \u0001, \n), or inside the gateway's own \xNN.
    base = access(userAgent="x" * 10 + unit * 2000)
    fixed = len(orjson.dumps(access(userAgent="")))
    for limit in range(fixed + 80, fixed + 120):
        out = check_clip(base, limit)
        kept = out["userAgent"][:-1]
        assert kept == base["userAgent"][:len(kept)]      # whole code points (check_clip
        if "\\x" in unit:                                  # parsed the line: whole escapes)
            # Never a dangling "\", "\x" or "\x8" at the end.
            assert re.search(r"\\(x[0-9a-f]?)?$", kept) is None, kept[-8:]


def test_gateway_escapes_are_kept_whole():
    agent = "\\x85" * 3000            # what the ingress writes for C1 bytes (0x80-0x9F)
    for limit in range(3000, 3040):
        kept = check_clip(access(userAgent=agent), limit)["userAgent"][:-1]
        assert len(kept) % 4 == 0 and kept == agent[:len(kept)]


def test_nested_strings_and_lists_are_clipped_and_named():
    record = {"timestamp": "t", "level": "error", "message": "boom",
              "detail": {"error": "e" * 9000, "where": ["short", "w" * 9000]}}
    out = check_clip(record, 2000)
    assert out["detail"]["error"].endswith(ELLIPSIS)
    line = orjson.loads(clip_record(record, 2000))
    assert sorted(line["truncated"]) == ["detail.error", "detail.where.1"]


def test_a_record_without_enough_strings_keeps_its_head():
    record = {"timestamp": "t", "level": "warning", "message": "m" * 500,
              "numbers": list(range(3000))}
    out = orjson.loads(clip_record(record, 1000))
    assert out == {"timestamp": "t", "level": "warning", "message": "m" * 200,
                   "truncated": ["*"]}


TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=3000)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["path", "userAgent", "error", "referer", "query"]),
                       TEXT, max_size=5),
       st.lists(TEXT, max_size=3), st.integers(400, 5000))
def test_random_records_fit_and_keep_their_fields(fields, items, limit):
    check_clip(access(**fields, items=items), limit)


def test_json_log_writes_no_line_over_max_line():
    r, w = os.pipe()
    with os.fdopen(w, "wb", buffering=0) as stream:
        log = JsonLog("debug", stream=stream)
        log.request("c1", None, "GET", "/" + "p" * 9000, "", 1.0, 404,
                    userAgent="é" * 6000, client="127.0.0.1")
        log.event("error", "service failed", error='"' * 5000)
        log.request("c2", None, "GET", "/short", "", 1.0, 200, userAgent="curl/8")
        log.drain()
    with os.fdopen(r, "rb") as f:
        lines = f.read().split(b"\n")
    assert lines[-1] == b""
    records = [orjson.loads(line) for line in lines[:-1]]
    assert all(len(line) + 1 <= MAX_LINE for line in lines[:-1])
    assert sorted(records[0]["truncated"]) == ["path", "userAgent"]
    assert records[1]["truncated"] == ["error"] and records[1]["error"].endswith(ELLIPSIS)
    assert "truncated" not in records[2] and records[2]["path"] == "/short"


# ------------------------------------------------- what the libraries say, as JSON lines

def test_an_exception_in_a_loop_callback_is_a_record_with_its_traceback(tmp_path):
    import asyncio
    import logging

    import uvloop

    from stellagw.observe.logs import install_library_logs
    path = tmp_path / "out.log"

    async def main():
        with open(path, "w") as out:
            log = JsonLog("info", stream=out)
            handler = install_library_logs(log, asyncio.get_running_loop())
            try:
                def boom():
                    raise ValueError("boom on purpose")
                for _ in range(3):                  # one second: one record, two left out
                    asyncio.get_running_loop().call_soon(boom)
                await asyncio.sleep(0.05)
                log.flush()
                await asyncio.sleep(0.3)
            finally:
                logging.getLogger().removeHandler(handler)
    uvloop.run(main())
    [record] = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert record["logger"] == "asyncio" and record["level"] == "error"
    assert record["error"] == "ValueError('boom on purpose')"
    assert "in boom" in record["traceback"] and "leftOut" not in record


def test_library_warnings_are_json_records_at_most_one_a_second(tmp_path):
    """picows logged each client's bad WebSocket frame through Python's last-resort handler:
    a raw text line on stderr per connection, beside the JSON log (an adversarial probe)."""
    import socket
    import time

    from tests.support.gwtest import Served, port_of
    from tests.support.services import ServiceProcess

    gw = Served(config_text="gateway: {node: {workers: 1}, http: {port: 0}, "
                            "transports: {tcp: {port: 0}}}", tmp_path=tmp_path)
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("ca", port_of(rec["tcp"])).start()     # stopped if not routable
        svc.wait_routable(port)
        upgrade = (b"GET /t/ca/ws HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n")

        def bad_frame():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(upgrade)
                assert s.recv(4096).startswith(b"HTTP/1.1 101")
                s.sendall(b"\x81\x05hello")         # unmasked: RFC 6455 §5.1
                while s.recv(4096):
                    pass
        for _ in range(5):
            bad_frame()
        time.sleep(1.1)
        bad_frame()                                 # a new second: says what was left out
        records = gw.wait_for_log(lambda r: r.get("logger") == "stellagw.websocket", 2)
        time.sleep(0.5)
        records += [r for r in (orjson.loads(line) for line in gw.lines[gw._seen:]
                                if line.startswith(b"{"))
                    if r.get("logger") == "stellagw.websocket"]
        assert all("WS parser error" in r["message"] and r["level"] == "error" for r in records)
        # Six bad frames: each either written or counted as left out.
        assert 2 <= len(records) <= 3
        assert len(records) + sum(r.get("leftOut", 0) for r in records) == 6
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
    assert [line for line in gw.lines if not line.startswith(b"{")] == []


def test_a_log_output_nobody_reads_drops_lines_serves_on_and_counts_them(tmp_path):
    """docs/security.md §3d row 46: a stuck log collector (stdout a pipe nobody reads) never
    makes a request wait; past 16 MiB waiting, lines are dropped — and counted where an
    operator can see it while the output is stuck, not only in a line written once it
    takes lines again."""
    import subprocess
    import sys
    import time

    from tests.support.gwtest import ROOT, connect, port_of, read_response, request
    from tests.support.services import ServiceProcess
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  admin: {publicEndpoints: [all]}\n  http: {port: 0}\n"
                   "  transports: {tcp: {port: 0}}\n")
    gw = subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    svc = None
    try:
        head, listening = b"", None
        while listening is None:                # read up to that line, then never again
            head += os.read(gw.stdout.fileno(), 4096)
            listening = re.search(rb'[^\n]*"listening"[^\n]*\n', head)
        rec = orjson.loads(listening.group())
        port = port_of(rec["http"])
        svc = ServiceProcess("lg", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        raw = (b"GET /t/lg/whoami HTTP/1.1\r\nHost: gw\r\nUser-Agent: " + b"u" * 3500
               + b"\r\n\r\n")
        sock, buf = connect(port), bytearray()
        dropped, sent = 0.0, 0
        end = time.monotonic() + 30
        while not dropped and time.monotonic() < end:
            for _ in range(500):
                sock.sendall(raw)
                status, _, body = read_response(sock, buf)      # within connect()'s 5 s
                assert status == 200 and orjson.loads(body)["instance"].startswith("lg")
                sent += 1
            metrics = request(port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2].decode()
            line = [m for m in metrics.splitlines()
                    if m.startswith("gateway_log_lines_dropped_total")]
            dropped = float(line[0].split()[-1]) if line else 0.0
        sock.close()
        assert dropped > 0, f"{sent} requests, nothing counted"
    finally:
        if svc is not None:
            svc.stop()
        gw.kill()
        gw.wait()
