"""The supervisor when the system refuses it a process (docs/security.md §3d row 52): a
worker died and its restart's fork() failed — EAGAIN at a cgroup's pids.max, ENOMEM under
the memory pressure that often killed the worker — and the OSError ended the supervisor,
which stopped the worker still serving: one death took the whole gateway down.

Needs the cgroup v1 pids controller, writable (root in a container); skipped otherwise."""
from __future__ import annotations

import os
import signal
import time

import orjson
import psutil
import pytest

from tests.support.gwtest import Served, port_of, request, wait_for
from tests.support.services import ServiceProcess

PIDS = "/sys/fs/cgroup/pids"


def test_a_worker_whose_restart_cannot_fork_is_tried_again_and_the_others_serve_on(tmp_path):
    if not os.access(os.path.join(PIDS, "cgroup.procs"), os.W_OK):
        pytest.skip("needs a writable cgroup v1 pids controller")
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  node: {workers: 2}\n  http: {port: 0}\n"
                   "  transports: {tcp: {port: 0}}\n")
    gw = Served("--config", str(cfg))
    group = os.path.join(PIDS, f"stellagw-test-{os.getpid()}")
    os.mkdir(group)
    svc = None

    def whoami():
        status, _, body = request(port, b"GET /t/fk/whoami HTTP/1.1\r\nHost: gw\r\n\r\n",
                                  timeout=1)
        return orjson.loads(body)["instance"] if status == 200 else status

    try:
        rec = gw.wait_listening(count=2)[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("fk", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        supervisor = psutil.Process(gw.proc.pid)
        # The supervisor alone in a group that allows no more tasks than it has: its
        # next fork() fails with EAGAIN. Its workers stay where they were.
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(supervisor.pid))
        with open(os.path.join(group, "pids.current")) as f:
            current = f.read().strip()
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write(current)
        first, second = supervisor.children()
        first.send_signal(signal.SIGKILL)
        gw.wait_for_log(lambda r: r.get("message", "").startswith("cannot restart a worker"),
                        timeout=5)
        time.sleep(1.5)
        assert gw.proc.poll() is None, "the supervisor ended"
        assert second.is_running() and second.status() != psutil.STATUS_ZOMBIE
        # The worker still running serves, with the service linked to it.
        os.kill(second.pid, 0)
        served = []
        for _ in range(6):
            try:
                served.append(whoami())
            except OSError:       # a connection queued for the worker not yet restarted
                pass
        assert served and all(str(i).startswith("fk") for i in served), served
        # Once a process may be made again, the worker is back.
        with open(os.path.join(group, "pids.max"), "w") as f:
            f.write("max")
        gw.wait_for_log(lambda r: r.get("message") == "worker restarted", timeout=5)
        assert wait_for(lambda: len(supervisor.children()) == 2, 5)
        assert whoami().startswith("fk")
    finally:
        if gw.proc.poll() is None:
            with open(os.path.join(PIDS, "cgroup.procs"), "w") as f:
                f.write(str(gw.proc.pid))
        if svc is not None:
            svc.stop()
        gw.stop()
        wait_for(lambda: not open(os.path.join(group, "cgroup.procs")).read().strip(), 5)
        os.rmdir(group)


def test_workers_drain_and_exit_when_their_supervisor_is_killed(tmp_path, monkeypatch):
    """docs/security.md §3d row 53: a supervisor killed outright (SIGKILL, the OOM killer)
    left its workers serving on the ports for good, unwatched (no restart, reload or stall
    watchdog), where a new `serve` would share them. And a supervisor that failed removed
    its run directory as it stopped them: their drain raised on it, and they never exited
    (the run directory is removed here too)."""
    import glob
    import shutil
    monkeypatch.setenv("TMPDIR", str(tmp_path))     # where the supervisor makes it
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  node: {workers: 2, preStopDelay: 0s}\n  http: {port: 0}\n"
                   "  transports: {tcp: {port: 0}}\n")
    gw = Served("--config", str(cfg))
    svc, workers = None, []
    try:
        rec = gw.wait_listening(count=2)[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("or", port_of(rec["tcp"])).start().wait_routable(port, timeout=20)
        workers = psutil.Process(gw.proc.pid).children()
        assert len(workers) == 2
        [run_dir] = glob.glob(str(tmp_path / "stellagw-run-*"))
        shutil.rmtree(run_dir)
        gw.proc.kill()
        gw.proc.wait()
        assert wait_for(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE
                                        for w in workers), 10), "workers outlived it"
        # They drained as on SIGTERM, each logging it.
        gw.wait_for_log(lambda r: r.get("message") == "stopped", count=2, timeout=5)
        with pytest.raises(OSError):
            request(port, b"GET /t/or/whoami HTTP/1.1\r\nHost: gw\r\n\r\n", timeout=1)
    finally:
        if svc is not None:
            svc.stop()
        for w in workers:             # orphans are not our children any more
            try:
                w.kill()
            except psutil.NoSuchProcess:
                pass
        gw.stop()
