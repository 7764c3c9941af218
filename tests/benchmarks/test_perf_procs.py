"""perf/_procs.py's CPU quota (the scorecard's workers part: each worker held to a share of
a CPU by a cgroup), on this machine's real cgroups; skipped where none is writable."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from perf import _procs as procs


def test_a_quota_holds_a_busy_process_to_its_share_and_is_removed():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        try:
            throttling = procs.cpu_quota(busy.pid, 0.2, "test")
        except procs.MissingTool as exc:
            pytest.skip(str(exc))
        group = throttling.group
        start = throttling()
        cpu0, t0 = _cpu(busy.pid), time.monotonic()
        time.sleep(1.0)
        used = (_cpu(busy.pid) - cpu0) / (time.monotonic() - t0)
        after = throttling()
        # the kernel enforces the cap: a busy loop gets at most ~20 % of a CPU (a noisy
        # machine can only give it less)
        assert used <= 0.3, used
        assert after["periods"] > start["periods"] and after["throttled"] > start["throttled"]
    finally:
        busy.kill()
        busy.wait()
    procs.remove_cpu_quota(group)
    assert not os.path.exists(group)


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
