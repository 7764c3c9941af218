"""A worker whose event loop stops turning is killed by the supervisor, then restarted.

A worker stuck in a loop, a deadlock or a blocking call answers nothing, yet the kernel
keeps handing it a share of the new connections (SO_REUSEPORT) and its own are held: a
black hole for 1/N of the clients that no one sees but them. Each worker writes the time
into its slot of a small shared map once a second (Worker._tick); the supervisor, polling
for dead children, reads the slots, and a worker silent for `node.workerStallTimeout` gets
SIGKILL (it could not drain) and is restarted like any dead worker (docs/operations.md).

A new worker's slot holds the time it was started: it is judged from then, so one that
hangs before its loop first turns is killed too. It matters as much as a stall later: the
worker's listening socket exists before it does (the supervisor's), and the kernel queues
its share of new connections there from the start. With one worker there is no supervisor;
an orchestrator's liveness probe covers that case.
"""
from __future__ import annotations

import mmap
import struct
import time

_SLOT = struct.Struct("d")


class Heartbeats:
    """One slot per worker in an anonymous shared map, made before the workers are forked."""

    def __init__(self, workers: int):
        self._map = mmap.mmap(-1, _SLOT.size * workers)    # MAP_SHARED | MAP_ANONYMOUS

    def beat(self, worker_id: int) -> None:
        """The worker is alive (its loop turned): CLOCK_MONOTONIC is one clock machine-wide."""
        _SLOT.pack_into(self._map, _SLOT.size * worker_id, time.monotonic())

    def silent_for(self, worker_id: int, now: float) -> float:
        """Seconds since the worker's last beat, or since it was started (`beat` by the
        supervisor before the fork)."""
        return now - _SLOT.unpack_from(self._map, _SLOT.size * worker_id)[0]
