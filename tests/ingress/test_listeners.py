"""Listeners (issue 16 item 5): a port in use stops start-up, workers share only the
supervisor's sockets, and the file-descriptor budget is checked and watched."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import textwrap

import pytest

from stellagw.config import ConfigError, load_config_text

from tests.support.gwtest import ROOT, Served, port_of, request

GET_LIVE = b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n"


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _serve(config_text, tmp_path, *args, name="gw.yaml", timeout=30, preexec_fn=None):
    cfg = tmp_path / name
    cfg.write_text(config_text)
    return subprocess.run([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)


def _config(http, admin, tcp, workers=1):
    return (f"gateway: {{node: {{workers: {workers}, preStopDelay: 0s}}, http: {{port: {http}}}, "
            f"admin: {{port: {admin}}}, transports: {{tcp: {{port: {tcp}}}}}, "
            f"logging: {{accessLog: false}}}}")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_gateway_on_a_used_port_exits_2_naming_the_address(tmp_path, workers):
    http, admin, tcp = _free_ports(3)
    first = Served(config_text=_config(http, admin, tcp, workers), tmp_path=tmp_path)
    try:
        first.wait_listening(workers)
        other_http, other_admin, other_tcp = _free_ports(3)
        for text, key, port in (
                (_config(http, other_admin, other_tcp), "gateway.http.port", http),
                (_config(other_http, admin, other_tcp), "gateway.admin.port", admin),
                (_config(other_http, other_admin, tcp, workers=2), "gateway.transports.tcp.port", tcp)):
            out = _serve(text, tmp_path, name="second.yaml")
            assert out.returncode == 2, out
            assert out.stderr.splitlines() == [
                f"stellagw: address in use: 127.0.0.1:{port} ({key}): another process listens there"]
            assert "listening" not in out.stdout
        # The first one never shared anything: every connection still lands on it.
        for _ in range(20):
            assert request(http, GET_LIVE)[0] == 200
    finally:
        assert first.stop() == 0


def test_a_port_held_by_any_other_program_is_refused_too(tmp_path):
    with socket.socket() as foreign:
        # SO_REUSEPORT on the foreign side is exactly what let a second gateway in before.
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        foreign.bind(("127.0.0.1", 0))
        foreign.listen(8)
        port = foreign.getsockname()[1]
        _, admin, tcp = _free_ports(3)
        out = _serve(_config(port, admin, tcp), tmp_path)
        assert out.returncode == 2 and f"address in use: 127.0.0.1:{port} (gateway.http.port)" in out.stderr
        out = _serve(_config(port, admin, tcp, workers=2), tmp_path)
        assert out.returncode == 2 and f"address in use: 127.0.0.1:{port} (gateway.http.port)" in out.stderr


def test_two_listeners_of_one_configuration_on_one_port_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load_config_text("gateway: {http: {port: 8088}, admin: {port: 8088}}")
    assert err.value.path == "gateway.admin.port" and "gateway.http.port" in err.value.reason
    with pytest.raises(ConfigError) as err:
        load_config_text("gateway: {http: {port: 9101, host: 0.0.0.0}, transports: {tcp: {port: 9101}}}")
    assert err.value.path == "gateway.transports.tcp.port"
    # Different addresses, or port 0, do not collide.
    load_config_text("gateway: {http: {port: 8088, host: 127.0.0.1}, admin: {port: 8088, host: 127.0.0.2}}")
    load_config_text("gateway: {http: {port: 0}, admin: {port: 0}, transports: {tcp: {port: 0}}}")


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    inodes.add(inode)
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def test_workers_serve_on_the_supervisors_sockets_and_get_them_back_after_a_restart(tmp_path):
    import signal
    s = Served(config_text="gateway: {node: {workers: 2, preStopDelay: 0s}, http: {port: 0}, "
                           "transports: {tcp: {port: 0}}}", tmp_path=tmp_path)
    try:
        recs = s.wait_listening(2)
        supervisor = s.proc.pid
        ports = {"http": port_of(recs[0]["http"]), "admin": port_of(recs[0]["admin"]),
                 "tcp": port_of(recs[0]["tcp"])}

        def holders():
            workers = {r["worker"]: r["pid"] for r in recs}
            return {name: {inode: {w for w, pid in workers.items() if inode in _socket_inodes(pid)}
                           for inode in _listening_inodes(port)}
                    for name, port in ports.items()}

        for name, port in ports.items():
            inodes = _listening_inodes(port)
            # One socket per worker in the port's group, every one the supervisor's own.
            assert len(inodes) == 2, name
            assert inodes <= _socket_inodes(supervisor), name
        before = holders()
        assert all(sorted(len(w) for w in by_inode.values()) == [1, 1] for by_inode in before.values())
        os.kill(recs[0]["pid"], signal.SIGKILL)
        [again] = s.wait_listening(1)
        recs = [again if r["worker"] == again["worker"] else r for r in recs]
        # The restarted worker serves on the very sockets its predecessor had.
        assert holders() == before
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------------------- descriptors

def test_max_connections_that_cannot_fit_the_descriptor_limit_is_refused(tmp_path):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    too_many = 50_000_000 if hard == resource.RLIM_INFINITY else hard
    out = _serve(f"gateway: {{http: {{port: 0, maxConnections: {too_many}}}, "
                 f"transports: {{tcp: {{port: 0}}}}}}", tmp_path)
    assert out.returncode == 2 and "listening" not in out.stdout
    [line] = out.stderr.splitlines()
    assert line.startswith("stellagw: configuration error: gateway.http.maxConnections: ")
    assert "RLIMIT_NOFILE" in line


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 1024 if hard == resource.RLIM_INFINITY else min(1024, hard)

    def lower():
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("gateway: {http: {port: 0, maxConnections: 100}, admin: {maxConnections: 4}, "
                   "transports: {tcp: {port: 0, maxConnections: 10}}, node: {preStopDelay: 0s}}")
    s = subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=lower)
    try:
        while b'"listening"' not in s.stdout.readline():
            assert s.poll() is None
        with open(f"/proc/{s.pid}/limits") as f:
            row = next(line for line in f if line.startswith("Max open files"))
        got_soft = row.split()[3]
        expected = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
        assert got_soft == expected or (hard == resource.RLIM_INFINITY and int(got_soft) > low)
    finally:
        s.terminate()
        s.wait(20)


def test_running_out_of_descriptors_is_counted_and_logged_once_per_interval():
    # uvloop never reports EMFILE on accept (libuv accepts and closes the waiting
    # connections), so the worker checks once a second; here in a child process whose
    # limit is squeezed to what it already has open.
    code = textwrap.dedent("""
        import os, resource, sys
        sys.path.insert(0, %r)
        from tests.support.gwtest import NullLog, settings_from
        from stellagw.gateway import Worker
        log = NullLog()
        w = Worker(settings_from("gateway: {http: {port: 0}}"), 0, log=log.log)
        for _ in range(3):
            w._check_descriptors()
        ok = dict(w.fd_exhausted)
        used = len(os.listdir("/proc/self/fd"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (used - 1, hard))
        for _ in range(3):
            w._check_descriptors()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        lines = [l for l in log.lines() if b"out of file descriptors" in l]
        metrics = w.render_metrics().decode()
        print(ok, w.fd_exhausted, len(lines))
        print([l for l in metrics.splitlines() if l.startswith("gateway_fd_exhausted")])
    """ % ROOT)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()[-2:]
    assert first == "{} {'EMFILE': 3} 1"
    assert second == "['gateway_fd_exhausted_total{errno=\"EMFILE\"} 3.0']"
