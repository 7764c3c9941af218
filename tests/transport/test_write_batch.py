"""transport/batch.py: when a link's encoded frames are written (both ends of a service link
use it), without sockets: a recording loop and transport. Runs compiled and, with
STELLAGW_NO_EXTENSIONS=1, as plain Python."""
from __future__ import annotations

import pytest

from stellagw import _impl
from stellagw.transport import frame as fr
from stellagw.transport.batch import WriteBatch

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

CORR = b"\x01" * 16


class Loop:
    def __init__(self):
        self.soon: list = []

    def call_soon(self, cb, *args):
        self.soon.append((cb, args))

    def run_soon(self):
        soon, self.soon = self.soon, []
        for cb, args in soon:
            cb(*args)


class Transport:
    def __init__(self):
        self.writes: list[bytes] = []

    def write(self, data):
        self.writes.append(bytes(data))


def link(open_=True):
    loop, transport, enc = Loop(), Transport(), fr.FrameEncoder()
    state = {"open": open_, "flushes": 0}

    def flush():
        state["flushes"] += 1
        state["wrote"] = batch.write(transport if state["open"] else None)

    batch = WriteBatch(enc, loop, flush)
    return batch, enc, loop, transport, state


def frames_in(data: bytes) -> int:
    dec = fr.FrameDecoder()
    dec.feed(data)
    n = 0
    while dec.next() is not None:
        n += 1
    return n


def test_the_frames_of_one_iteration_go_out_in_one_write():
    batch, enc, loop, transport, state = link()
    for _ in range(3):
        enc.raw(fr.PING, CORR, b"x")
        batch.added()
    assert transport.writes == [] and len(loop.soon) == 1      # one flush scheduled, not three
    loop.run_soon()
    assert [frames_in(w) for w in transport.writes] == [3] and state["wrote"] is True
    assert len(enc) == 0


def test_a_burst_is_written_every_write_batch_frames():
    batch, enc, loop, transport, _ = link()
    n = 2 * fr.WRITE_BATCH + 3
    for _ in range(n):
        enc.raw(fr.PING, CORR, b"x")
        batch.added()
    assert [frames_in(w) for w in transport.writes] == [fr.WRITE_BATCH, fr.WRITE_BATCH]
    loop.run_soon()
    assert [frames_in(w) for w in transport.writes] == [fr.WRITE_BATCH, fr.WRITE_BATCH, 3]


def test_a_large_frame_is_written_at_once():
    batch, enc, loop, transport, _ = link()
    enc.raw(fr.PING, CORR, b"x")
    batch.added()
    enc.stream_data(fr.RESPONSE_STREAM_DATA, CORR, 0, b"y" * fr.WRITE_BATCH_BYTES)
    batch.added()
    assert [frames_in(w) for w in transport.writes] == [2]
    loop.run_soon()          # the flush scheduled by the first frame finds nothing to write
    assert len(transport.writes) == 1


def test_a_closed_link_writes_nothing_and_the_batch_starts_afresh():
    batch, enc, loop, transport, state = link(open_=False)
    enc.raw(fr.PING, CORR, b"x")
    batch.added()
    loop.run_soon()
    assert transport.writes == [] and state["wrote"] is False
    enc.raw(fr.PING, CORR, b"x")
    batch.added()
    assert len(loop.soon) == 1                  # scheduled again: the last flush reset it


def test_compiled_where_the_glue_is():
    assert _impl.compiled("stellagw.transport.batch") is not _impl.NO_EXTENSIONS
