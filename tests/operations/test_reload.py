"""Reload (issue 19 item 1): SIGHUP and `stellagw reload` read the configuration again — a
valid change is applied while clients keep sending, an invalid one is refused naming the
key, settings that need new sockets are named "restart required" — and certificates change
under running listeners. Real `stellagw serve` subprocesses and real SDK services."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import orjson
import pytest

from stellagw import __version__
from stellagw.config import load_config_text
from stellagw.reload import (ConfigSource, changed_keys, check, config_hash, graft,
                             restart_required)
from stellagw.service import Response, Service

from tests.support.gwtest import (ROOT, Pki, Served, connect, port_of, read_response, request, wait_for)
from tests.support.services import ServiceProcess


def cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "stellagw", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def service(name, tcp_port):
    return ServiceProcess(name, tcp_port).start()


def get(port, path, *headers: bytes):
    return request(port, b"GET " + path + b" HTTP/1.1\r\nHost: t\r\n" + b"".join(
        h + b"\r\n" for h in headers) + b"\r\n")


# --------------------------------------------------------------------------- the comparison

def test_changed_keys_name_each_key_and_which_need_a_restart():
    old = load_config_text("gateway: {http: {port: 0}}", env={})
    new = load_config_text("""
gateway:
  http: {port: 8081, maxHeaderBytes: 8KB, tls: {clientCaPath: /ca.pem}}
  node: {workers: 3}
  transports: {tls: {certificatePath: /c.pem, maxConnections: 5}, heldRequestBudget: 8MB}
  cors: {allowOrigins: ["https://a.example"]}
rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 1}]}}
""", env={})
    keys = changed_keys(old, new)
    assert set(keys) == {
        "gateway.http.port", "gateway.http.maxHeaderBytes", "gateway.http.tls.clientCaPath",
        "gateway.node.workers", "gateway.transports.tls.certificatePath",
        "gateway.transports.tls.maxConnections", "gateway.cors.allowOrigins",
        "rate_limiting.for_instance.rules", "gateway.transports.heldRequestBudget"}
    assert {k for k in keys if restart_required(k)} == {
        "gateway.http.port", "gateway.node.workers", "gateway.transports.tls.maxConnections"}


def test_a_kept_key_takes_the_running_value_and_port_zero_is_no_change():
    configured = load_config_text("gateway: {http: {port: 0}, admin: {port: 0}}", env={})
    gw = configured.gateway
    # What runs: port 0 resolved by the bind.
    running = dataclasses.replace(configured, gateway=dataclasses.replace(
        gw, http=dataclasses.replace(gw.http, port=40001),
        admin=dataclasses.replace(gw.admin, port=40002)))
    new = load_config_text("gateway: {http: {port: 0, maxUrlLength: 100}, admin: {port: 0}}", env={})
    assert changed_keys(configured, new) == ["gateway.http.maxUrlLength"]
    applied = graft(new, running, restart_required)
    assert (applied.gateway.http.port, applied.gateway.admin.port) == (40001, 40002)
    assert applied.gateway.http.max_url_length == 100


def test_the_hash_follows_the_configuration_but_never_a_secret():
    a = load_config_text("gateway: {auth: {dpopNonce: {secret: '%s'}}}" % ("x" * 32), env={})
    b = load_config_text("gateway: {auth: {dpopNonce: {secret: '%s'}}}" % ("y" * 32), env={})
    c = load_config_text("gateway: {http: {maxUrlLength: 100}}", env={})
    assert config_hash(a) == config_hash(b) != config_hash(c)
    assert len(config_hash(a)) == 12


@pytest.mark.parametrize("text, key", [
    ("gateway: {http: {maxHeaderBytes: lots}}", "gateway.http.maxHeaderBytes"),
    ("gateway: {cors: {allowOrigins: [nowhere]}}", "gateway.cors.allowOrigins[0]"),
    ("gateway: {http: {tls: {enabled: true, certificatePath: /nonexistent.pem, keyPath: /k}}}",
     "gateway.http.tls.certificatePath"),
    ("rate_limiting: {for_environment: {valkey_connection: 'redis://h:99999'}}",
     "rate_limiting.for_environment.valkey_connection"),
    ("gateway: {http: {maxConnections: 100000000}}", "gateway.http.maxConnections"),
])
def test_an_invalid_file_is_refused_with_its_key(tmp_path, text, key):
    path = tmp_path / "gw.yaml"
    path.write_text("")
    source = ConfigSource(str(path), load_config_text("", env={}))
    path.write_text(text)
    outcome = check(source, source.configured)
    assert outcome.result == "invalid" and outcome.settings is None
    assert outcome.error[0] == key, outcome.error
    assert outcome.hash == source.hash       # what keeps running


@pytest.mark.parametrize("text", ["", "\n  \n", "# being rewritten\n"])
def test_an_empty_file_is_refused_not_read_as_every_default(tmp_path, text):
    # A file truncated in place and caught by a reload before its content came back was
    # valid YAML with every key at its default: rate limits, auth, CORS and the rest were
    # reset until the next reload (an adversarial probe).
    path = tmp_path / "gw.yaml"
    path.write_text("rate_limiting: {for_instance: {rules: [{max_requests: 5, per_seconds: 60}]}}")
    source = ConfigSource(str(path), load_config_text(path.read_text(), env={}))
    path.write_text(text)
    outcome = check(source, source.configured)
    assert outcome.result == "invalid" and outcome.settings is None
    assert outcome.error[0] == str(path) and "empty" in outcome.error[1]
    assert outcome.hash == source.hash


# --------------------------------------------------------------------------- one worker

BASE = """
gateway:
  node: {{workers: 1}}
  http: {{port: {port}, maxHeaderBytes: {header}{hosts}}}
  transports: {{tcp: {{port: 0}}}}
  admin: {{publicEndpoints: [all]}}
  cors: {{allowOrigins: [{origins}]}}
  auth: {{allowScopeHeader: {scopes}}}
  openapi: {{title: {title}}}
{extra}
"""
LIMIT = "rate_limiting: {for_instance: {rules: [{max_requests: 40, per_seconds: 60}]}}"
ONE = BASE.format(port=0, header="16KB", origins='"https://one.example"', scopes="false",
                  title="Before", extra="", hosts="")
TWO = BASE.format(port=0, header="8KB", origins='"https://one.example", "https://two.example"',
                  scopes="true", title="After", extra=LIMIT, hosts=", allowedHosts: [t]")


class Load:
    """Clients that keep sending while the configuration changes: one keep-alive connection,
    and one new connection per request. Every request must get a whole answer."""

    def __init__(self, port, path=b"/t/rl/whoami"):
        self.port, self.path = port, path
        self.answers: list[tuple[float, int, dict]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._keep_alive, daemon=True),
                         threading.Thread(target=self._fresh, daemon=True)]
        for t in self._threads:
            t.start()

    def _req(self):
        return (b"GET " + self.path + b" HTTP/1.1\r\nHost: t\r\n"
                b"Origin: https://two.example\r\n\r\n")

    def _keep_alive(self):
        sock, buf = connect(self.port), bytearray()
        try:
            while not self._stop.is_set():
                try:
                    sock.sendall(self._req())
                    status, headers, _ = read_response(sock, buf)
                except OSError as exc:
                    self.errors.append(f"keep-alive: {exc!r}")
                    return
                self.answers.append((time.monotonic(), status, headers))
                time.sleep(0.01)
        finally:
            sock.close()

    def _fresh(self):
        while not self._stop.is_set():
            try:
                status, headers, _ = request(self.port, self._req())
            except OSError as exc:
                self.errors.append(f"new connection: {exc!r}")
                return
            self.answers.append((time.monotonic(), status, headers))
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(10)
        return self


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    d = tmp_path_factory.mktemp("reload1")
    cfg, pid_file = d / "gateway.yaml", d / "gw.pid"
    cfg.write_text(ONE)
    gw = Served("--config", str(cfg), "--pid-file", str(pid_file))
    rec = gw.wait_listening()[0]
    http, tcp = port_of(rec["http"]), port_of(rec["tcp"])
    svc = service("rl", tcp)
    try:
        svc.wait_routable(http)
        yield gw, cfg, pid_file, http, rec
    finally:
        svc.stop()
        gw.stop()


def test_serve_writes_its_pid_file(one):
    gw, _, pid_file, _, rec = one
    assert int(pid_file.read_text()) == gw.proc.pid == rec["pid"]
    assert len(rec["configHash"]) == 12


def test_a_valid_change_is_applied_while_clients_keep_sending(one):
    gw, cfg, pid_file, http, first = one
    big_header = b"X-Big: " + b"b" * 10_000
    scopes = b"X-StellaOps-Scopes: scans:read"
    assert get(http, b"/t/rl/whoami", big_header)[0] == 200         # under 16KB
    assert get(http, b"/t/rl/whoami", scopes)[0] == 403               # allowScopeHeader: false
    elsewhere = b"GET /t/rl/whoami HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n"
    assert request(http, elsewhere)[0] == 200                          # any host
    assert orjson.loads(get(http, b"/openapi.json")[2])["info"]["title"] == "Before"
    load = Load(http)
    try:
        assert wait_for(lambda: len(load.answers) > 20, 10)
        before = [a for a in load.answers]
        assert all(s == 200 and "access-control-allow-origin" not in h for _, s, h in before)
        cfg.write_text(TWO)
        out = cli("reload", "--pid-file", str(pid_file))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("stellagw reload: ok: configuration ")
        for key in ("gateway.http.maxHeaderBytes", "gateway.http.allowedHosts",
                    "gateway.cors.allowOrigins",
                    "gateway.auth.allowScopeHeader", "gateway.openapi.title",
                    "rate_limiting.for_instance.rules"):
            assert key in out.stdout
        rec = gw.wait_for_log(lambda r: r.get("message") == "configuration reloaded")[0]
        assert rec["result"] == "ok" and rec["configHash"] != first["configHash"]
        t_reload = time.monotonic()
        # The rate limit counts from the reload: 40 a minute for this client, then 429.
        assert wait_for(lambda: any(s == 429 for _, s, _ in load.answers), 20)
        time.sleep(max(0.0, t_reload + 1.0 - time.monotonic()))
    finally:
        load.stop()
    assert load.errors == []
    statuses = {s for _, s, _ in load.answers}
    assert statuses <= {200, 429}, statuses
    later = [h for t, s, h in load.answers if t > t_reload + 0.2]
    # The new origin on the keep-alive connection too: every request runs the new policy.
    assert later and all(h.get("access-control-allow-origin") == "https://two.example"
                         for h in later)
    status, headers, body = get(http, b"/t/rl/whoami")
    assert status == 429 and headers["x-ratelimit-limit"] == "40"
    # New connections have the new header limit; the authenticator and the OpenAPI
    # document are the new configuration's (the first read after the reload).
    assert get(http, b"/health/live", big_header)[0] == 431
    assert get(http, b"/t/rl/whoami", scopes)[0] == 429      # past authentication now
    assert request(http, elsewhere)[0] == 421                # allowedHosts: [t]
    assert orjson.loads(get(http, b"/openapi.json")[2])["info"]["title"] == "After"
    ready = orjson.loads(get(http, b"/health/ready")[2])
    assert ready["config"]["hash"] == rec["configHash"]
    assert ready["config"]["reloads"] == {"ok": 1}
    metrics = get(http, b"/metrics")[2].decode()
    assert 'gateway_config_reloads_total{result="ok"} 1.0' in metrics
    assert f'gateway_build_info{{config_hash="{rec["configHash"]}",version=' in metrics


def test_an_invalid_change_is_refused_and_the_old_configuration_keeps_serving(one):
    gw, cfg, pid_file, http, _ = one
    hash_before = orjson.loads(get(http, b"/health/ready")[2])["config"]["hash"]
    cfg.write_text(TWO.replace('"https://two.example"', '"two.example/path"'))
    out = cli("reload", "--pid-file", str(pid_file))
    assert out.returncode == 2
    assert "gateway.cors.allowOrigins[1]" in out.stderr and hash_before in out.stderr
    rec = gw.wait_for_log(lambda r: r.get("message", "").startswith("configuration reload refused"))[0]
    assert rec["level"] == "error" and rec["key"] == "gateway.cors.allowOrigins[1]"
    assert "origin" in rec["reason"] and rec["configHash"] == hash_before
    # Still the configuration of the last good reload.
    status, headers, _ = get(http, b"/t/rl/whoami", b"Origin: https://two.example")
    assert status in (200, 429) and headers["access-control-allow-origin"] == "https://two.example"
    ready = orjson.loads(get(http, b"/health/ready")[2])["config"]
    assert ready["hash"] == hash_before and ready["reloads"] == {"ok": 1, "invalid": 1}
    # SIGHUP itself (what `stellagw reload` sends), a second time: refused again, logged again.
    os.kill(gw.proc.pid, signal.SIGHUP)
    gw.wait_for_log(lambda r: r.get("key") == "gateway.cors.allowOrigins[1]")


def test_a_port_change_is_named_restart_required_and_not_applied(one):
    gw, cfg, pid_file, http, _ = one
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    rejected = _counter(get(http, b"/metrics")[2], b'gateway_ratelimit_decisions_total{outcome="rejected",scope="instance"}')
    assert rejected > 0
    cfg.write_text(BASE.format(port=free, header="4KB", origins='"https://two.example"',
                               scopes="true", title="After", extra=LIMIT.replace("40", "41"),
                               hosts=", allowedHosts: [t]"))
    out = cli("reload", "--pid-file", str(pid_file))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("stellagw reload: restart_required:")
    assert "restart required for: gateway.http.port" in out.stderr
    rec = gw.wait_for_log(lambda r: r.get("message") == "configuration reload: restart required")[0]
    assert rec["level"] == "warning" and rec["keys"] == ["gateway.http.port"]
    assert set(rec["applied"]) == {"gateway.http.maxHeaderBytes", "gateway.cors.allowOrigins",
                                   "rate_limiting.for_instance.rules"}
    # The rest is applied; the port is not.
    assert get(http, b"/health/live", b"X-Big: " + b"b" * 5000)[0] == 431
    with pytest.raises(OSError):
        connect(free, timeout=1).close()
    metrics = get(http, b"/metrics")[2]
    assert b'gateway_config_reloads_total{result="restart_required"} 1.0' in metrics
    # The rate limiter was rebuilt (new rules): what the old one counted is still counted.
    assert _counter(metrics, b'gateway_ratelimit_decisions_total{outcome="rejected",scope="instance"}') >= rejected


def _counter(metrics: bytes, sample: bytes) -> float:
    for line in metrics.splitlines():
        if line.startswith(sample + b" "):
            return float(line.split()[-1])
    return 0.0


def test_reload_without_a_gateway_says_so(tmp_path):
    pid_file = tmp_path / "gw.pid"
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    pid_file.write_text(f"{proc.pid}\n")   # a process that has exited: a stale pid file
    out = cli("reload", "--pid-file", str(pid_file))
    assert out.returncode == 1 and "stale" in out.stderr
    out = cli("reload", "--pid-file", str(tmp_path / "none.pid"))
    assert out.returncode == 1 and "none.pid" in out.stderr


# --------------------------------------------------------------------------- two workers

TWO_WORKERS = """
gateway:
  node: {{workers: 2, warmupTimeout: 1s}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0}}}}
  admin: {{publicEndpoints: [all]}}
  cors: {{allowOrigins: [{origins}]}}
"""


def test_a_burst_of_sighups_is_reloads_in_turn_and_the_supervisor_survives(tmp_path):
    # Two `stellagw reload`s at once, or a reload loop: a SIGHUP that came while one was
    # handled re-entered the handler; both wrote one temporary file, a rename failed, the
    # supervisor exited and left its two workers serving with no one to restart or stop
    # them (5 SIGHUPs 4 ms apart did it; found by an adversarial probe).
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(TWO_WORKERS.format(origins='"https://one.example"'))
    gw = Served("--config", str(cfg))
    try:
        recs = gw.wait_listening(2)
        http = port_of(recs[0]["http"])
        for i in range(60):
            cfg.write_text(TWO_WORKERS.format(origins=f'"https://o{i % 2}.example"'))
            os.kill(gw.proc.pid, signal.SIGHUP)
            time.sleep(0.004)
        time.sleep(1.0)
        assert gw.proc.poll() is None, b"\n".join(gw.lines[-20:]).decode(errors="replace")
        for rec in recs:
            with open(f"/proc/{rec['pid']}/stat") as f:
                assert int(f.read().rsplit(")", 1)[1].split()[1]) == gw.proc.pid   # its ppid
        assert get(http, b"/health/live")[0] == 200
        # A reload after the burst is taken by both workers, and both run it.
        seen = len(gw.lines)
        cfg.write_text(TWO_WORKERS.format(origins='"https://last.example"'))
        os.kill(gw.proc.pid, signal.SIGHUP)

        def reloaded():
            recs = [orjson.loads(line) for line in gw.lines[seen:] if line.startswith(b"{")]
            return {r["worker"]: r["configHash"] for r in recs
                    if r.get("message") == "configuration reloaded"}
        assert wait_for(lambda: len(reloaded()) == 2, 10), gw.lines[seen:]
        [new_hash] = set(reloaded().values())
        assert wait_for(lambda: f'gateway_build_info{{config_hash="{new_hash}",version="{__version__}"}} 2.0'
                        in get(http, b"/metrics")[2].decode(), 5)
    finally:
        assert gw.stop() == 0


def test_sighup_to_two_workers_reloads_both_and_a_restarted_worker_keeps_it(tmp_path):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(TWO_WORKERS.format(origins='"https://one.example"'))
    gw = Served("--config", str(cfg))
    svc = None
    try:
        recs = gw.wait_listening(2)
        http, tcp = port_of(recs[0]["http"]), port_of(recs[0]["tcp"])
        svc = service("rw", tcp)

        def workers_with(origin):
            seen = set()
            for _ in range(40):
                status, headers, body = get(http, b"/t/rw/whoami", b"Origin: " + origin)
                if status == 200 and headers.get("access-control-allow-origin") == origin.decode():
                    seen.add(orjson.loads(get(http, b"/health/ready")[2])["worker"])
            return seen

        svc.wait_routable(http)
        cfg.write_text(TWO_WORKERS.format(origins='"https://new.example"'))
        os.kill(gw.proc.pid, signal.SIGHUP)            # the supervisor
        done = gw.wait_for_log(lambda r: r.get("message") == "configuration reloaded", 2)
        assert {r["worker"] for r in done} == {0, 1}
        assert {r["configHash"] for r in done} != {recs[0]["configHash"]}
        new_hash = done[0]["configHash"]
        # Both workers' counts, once each has published them (once a second).
        assert wait_for(lambda: f'gateway_build_info{{config_hash="{new_hash}",version="{__version__}"}} 2.0'
                        in get(http, b"/metrics")[2].decode(), 5)
        metrics = get(http, b"/metrics")[2].decode()
        assert 'gateway_config_reloads_total{result="ok"} 2.0' in metrics
        assert recs[0]["configHash"] not in metrics

        # A bad file: reported once (by the supervisor), counted by both workers.
        cfg.write_text("gateway: {node: {workers: many}}")
        os.kill(gw.proc.pid, signal.SIGHUP)
        refused = gw.wait_for_log(lambda r: r.get("message", "").startswith(
            "configuration reload refused"))
        assert refused[0]["role"] == "supervisor" and refused[0]["key"] == "gateway.node.workers"
        assert wait_for(lambda: 'gateway_config_reloads_total{result="invalid"} 2.0'
                        in get(http, b"/metrics")[2].decode(), 5)
        time.sleep(0.5)
        assert not any(b"configuration reload refused" in line and b'"worker"' in line
                       for line in gw.lines)

        # A worker that dies is restarted with the configuration its sibling runs.
        victim = orjson.loads(get(http, b"/health/ready")[2])
        pids = {r["worker"]: r["pid"] for r in recs}
        os.kill(pids[victim["worker"]], signal.SIGKILL)
        again = gw.wait_for_log(lambda r: r.get("message") == "listening", timeout=30)[0]
        assert again["configHash"] == new_hash
        assert wait_for(lambda: workers_with(b"https://new.example") == {0, 1}, 20)
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()


# --------------------------------------------------------------------------- certificates

TLS = """
gateway:
  node: {{workers: 1}}
  http:
    port: 0
    tls: {{enabled: true, certificatePath: {cert}, keyPath: {key}, clientCertificateMode: NoCertificate}}
  transports:
    tcp: {{enabled: false}}
    tls: {{enabled: true, port: 0, certificatePath: {cert}, keyPath: {key}, clientCaPath: {ca}}}
  admin: {{publicEndpoints: [all]}}
"""


def _tls_get(sock: ssl.SSLSocket, buf: bytearray):
    sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return read_response(sock, buf)[0]


def _dial(port, ctx):
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def test_each_listener_exports_its_certificates_not_after_and_one_past_it_is_logged(tmp_path):
    """docs/operations.md "Rotate": an expired certificate still loads (refusing it would
    turn a failed renewal into a crash loop) and every client that verifies it then fails
    its handshake. Each worker exports the notAfter each TLS listener serves, for
    GatewayCertificateExpiresSoon, and logs a certificate loaded past it."""
    from stellagw.devauth.pki import issue_cert, make_ca, write_pem
    ca, ca_key = make_ca()
    cert, key = issue_cert(ca, ca_key, "localhost", dns=["localhost"], days=-60 / 86400)
    cert_path = write_pem(str(tmp_path / "server.pem"), cert)
    key_path = write_pem(str(tmp_path / "server.key"), key=key)
    ca_path = write_pem(str(tmp_path / "ca.pem"), ca)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(TLS.format(cert=cert_path, key=key_path, ca=ca_path))
    gw = Served("--config", str(cfg))
    try:
        expired = gw.wait_for_log(lambda r: r.get("message") == "certificate expired", count=2)
        rec = gw.wait_listening()[0]
        assert sorted(r["listener"] for r in expired) == ["http", "transport"]
        metrics = request(port_of(rec["admin"]), b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")[2]
        not_after = cert.not_valid_after_utc.timestamp()
        for listener in (b"http", b"transport"):
            sample = b'gateway_certificate_not_after{listener="%s",worker="0"} ' % listener
            [line] = [m for m in metrics.splitlines() if m.startswith(sample)]
            assert abs(float(line[len(sample):]) - not_after) < 1, line
    finally:
        gw.stop()


def test_certificates_swapped_on_disk_serve_new_connections_while_old_ones_continue(tmp_path):
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
    old_pki, new_pki = Pki(tmp_path / "old"), Pki(tmp_path / "new")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(old_pki.server_cert, cert)
    shutil.copy(old_pki.server_key, key)
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(TLS.format(cert=cert, key=key, ca=old_pki.ca_path))
    gw = Served("--config", str(cfg))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    svc = None
    try:
        rec = gw.wait_listening()[0]
        https, tls_port = port_of(rec["http"]), port_of(rec["tls"])
        with open(new_pki.server_cert, "rb") as f:
            new_der = ssl.PEM_cert_to_DER_cert(f.read().decode())

        old_conn, buf = _dial(https, old_pki.client_context()), bytearray()
        assert _tls_get(old_conn, buf) == 200
        # A service linked over TLS before the swap (client certificate of the old CA).
        svc_ctx = ssl.create_default_context(cafile=old_pki.ca_path)
        svc_ctx.load_cert_chain(old_pki.client_cert, old_pki.client_key)
        svc = Service("sec", gateways=[f"127.0.0.1:{tls_port}"], ssl=svc_ctx,
                      server_hostname="localhost", reconnect_min=0.05, reconnect_max=0.2)

        @svc.get("/t/sec/x")
        async def x(req):
            return Response(b"over tls")
        asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
        asyncio.run_coroutine_threadsafe(svc.wait_registered(1, timeout=10), loop).result(15)
        assert wait_for(lambda: routed(https, old_pki) == b"over tls", 10)

        # The files change on disk (key first: a certificate without its key is refused, and
        # tried again when the key is there).
        shutil.copy(new_pki.server_key, key)
        shutil.copy(new_pki.server_cert, cert)
        reloaded = gw.wait_for_log(lambda r: r.get("message") == "certificates reloaded", 2)
        assert {(r["listener"], r["why"]) for r in reloaded} == {("http", "file changed"),
                                                                  ("transport", "file changed")}

        new_conn = _dial(https, new_pki.client_context())
        assert new_conn.getpeercert(binary_form=True) == new_der
        assert _tls_get(new_conn, bytearray()) == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            _dial(https, old_pki.client_context())
        # The connection made before goes on, with the certificate it was made with.
        assert _tls_get(old_conn, buf) == 200 and _tls_get(old_conn, buf) == 200
        assert old_conn.getpeercert(binary_form=True) != new_der

        # The service transport: new links get the new certificate; the client CA is the
        # old one still, so the old client certificate is accepted.
        ctx = ssl.create_default_context(cafile=new_pki.ca_path)
        ctx.load_cert_chain(old_pki.client_cert, old_pki.client_key)
        link = _dial(tls_port, ctx)
        assert link.getpeercert(binary_form=True) == new_der
        link.close()
        # The service's link made before the swap carries requests still, never redialled.
        assert routed(https, new_pki) == b"over tls"
        assert sum(b'"service registered"' in line for line in gw.lines) == 1

        # SIGHUP reads them again too.
        os.kill(gw.proc.pid, signal.SIGHUP)
        again = gw.wait_for_log(lambda r: r.get("message") == "certificates reloaded", 2)
        assert {(r["listener"], r["why"]) for r in again} == {("http", "SIGHUP"),
                                                              ("transport", "SIGHUP")}
        metrics = get_tls(https, new_pki, b"/metrics")
        assert 'gateway_certificate_reloads_total{listener="http",result="ok"} 2.0' in metrics
        old_conn.close()
        new_conn.close()
    finally:
        if svc is not None:
            asyncio.run_coroutine_threadsafe(svc.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        gw.stop()


def routed(port, pki) -> bytes:
    with _dial(port, pki.client_context()) as s:
        s.sendall(b"GET /t/sec/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, body = read_response(s)
        return body if status == 200 else b"%d" % status


def get_tls(port, pki, path) -> str:
    with _dial(port, pki.client_context()) as s:
        s.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return read_response(s)[2].decode()


def test_a_fifo_or_device_in_place_of_a_file_is_refused_and_the_worker_keeps_serving(tmp_path):
    """docs/security.md §3d row 45: OpenSSL opened the certificate itself on the worker's
    loop — a FIFO put in its place (the file watch, or a SIGHUP) blocked every client of
    the worker for good; /dev/zero would be read for ever. Files are checked first."""
    pki = Pki(tmp_path)
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    pid_file = tmp_path / "gw.pid"
    cfg = tmp_path / "gateway.yaml"
    good = (f"gateway:\n  http: {{port: 0, tls: {{enabled: true, certificatePath: {cert}, "
            f"keyPath: {key}}}}}\n  transports: {{tcp: {{port: 0}}}}\n")
    cfg.write_text(good)
    gw = Served("--config", str(cfg), "--pid-file", str(pid_file))
    svc = None

    def whoami(timeout=3.0):
        try:
            with socket.create_connection(("127.0.0.1", https), timeout=timeout) as raw, \
                    pki.client_context().wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"GET /t/ff/whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
                status, _, body = read_response(s)
                return orjson.loads(body)["instance"] if status == 200 else status
        except OSError as exc:
            return repr(exc)

    try:
        rec = gw.wait_listening()[0]
        https = port_of(rec["http"])
        svc = service("ff", port_of(rec["tcp"]))
        assert wait_for(lambda: isinstance(whoami(), str) and whoami().startswith("ff"), 20)
        instance = whoami()

        # The certificate becomes a FIFO nobody writes: the file watch sees it change.
        cert.unlink()
        os.mkfifo(cert)
        failed = gw.wait_for_log(lambda r: r.get("message", "").startswith(
            "certificate reload failed"), timeout=5)[0]
        assert "not a regular file" in failed["error"]
        assert [whoami() for _ in range(5)] == [instance] * 5
        # And SIGHUP: refused with the key, at once.
        done = cli("reload", "--pid-file", str(pid_file), timeout=20)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "gateway.http.tls.certificatePath" in done.stderr
        assert "not a regular file" in done.stderr
        # The key as a device that never ends.
        cert.unlink()
        shutil.copy(pki.server_cert, cert)
        key.unlink()
        os.symlink("/dev/zero", key)
        done = cli("reload", "--pid-file", str(pid_file), timeout=20)
        assert done.returncode == 2 and "gateway.http.tls.keyPath" in done.stderr, done.stderr
        assert [whoami() for _ in range(5)] == [instance] * 5
        # The configuration file itself as a FIFO.
        key.unlink()
        shutil.copy(pki.server_key, key)
        cfg.unlink()
        os.mkfifo(cfg)
        done = cli("reload", "--pid-file", str(pid_file), timeout=20)
        assert done.returncode == 2 and "not a regular file" in done.stderr, done.stderr
        assert [whoami() for _ in range(5)] == [instance] * 5
        cfg.unlink()
        cfg.write_text(good)
        done = cli("reload", "--pid-file", str(pid_file), timeout=20)
        assert done.returncode == 0, done.stderr
        assert whoami() == instance
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()


BOMB = "x-anchors:\n  a0: &a0 [\"https://x.example\"]\n" + "".join(
    f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))


@pytest.mark.parametrize("extra, reason", [
    ("x: &loop [*loop]\n", "a recursive alias"),
    (BOMB, "more than 100000 values once its aliases are expanded"),
], ids=["recursive-alias", "billion-laughs"])
def test_a_file_whose_aliases_never_end_is_refused_and_both_workers_serve_on(tmp_path, extra,
                                                                            reason):
    """docs/security.md §3d row 50: a recursive alias raised RecursionError in the
    supervisor's SIGHUP handler, and the supervisor stopped every worker (the gateway
    exited 1); nine levels of ten aliases (1 KB) were expanded to 10^9 values."""
    pid_file = tmp_path / "gw.pid"
    cfg = tmp_path / "gateway.yaml"
    good = ("gateway:\n  node: {workers: 2}\n  http: {port: 0}\n"
            "  transports: {tcp: {port: 0}}\n")
    cfg.write_text(good)
    gw = Served("--config", str(cfg), "--pid-file", str(pid_file))
    svc = None
    try:
        rec = gw.wait_listening(count=2)[0]
        port = port_of(rec["http"])
        svc = service("al", port_of(rec["tcp"])).wait_routable(port, timeout=20)
        cfg.write_text(good + extra)
        done = cli("reload", "--pid-file", str(pid_file), timeout=20)   # 10^9 values: never
        assert done.returncode == 2, done.stdout + done.stderr
        assert "<file>" in done.stderr and reason in done.stderr
        assert gw.proc.poll() is None
        for _ in range(10):
            status, _, body = get(port, b"/t/al/whoami")
            assert status == 200 and orjson.loads(body)["instance"].startswith("al")
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()


def test_a_verdict_that_cannot_be_written_does_not_end_the_supervisor(tmp_path):
    """docs/security.md §3d row 51: an error in the supervisor's SIGHUP handler (here the
    verdict file beside the pid file cannot be written, as in a full or read-only /run)
    surfaced in its wait loop, and the supervisor stopped every worker."""
    pid_file = tmp_path / "gw.pid"
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway:\n  node: {workers: 2}\n  http: {port: 0}\n"
                   "  transports: {tcp: {port: 0}}\n")
    gw = Served("--config", str(cfg), "--pid-file", str(pid_file))
    svc = None
    try:
        rec = gw.wait_listening(count=2)[0]
        port = port_of(rec["http"])
        svc = service("vw", port_of(rec["tcp"])).wait_routable(port, timeout=20)
        blocker = tmp_path / f"gw.pid.reload.{gw.proc.pid}.tmp"   # where it writes first
        blocker.mkdir()
        done = cli("reload", "--pid-file", str(pid_file), "--timeout", "3", timeout=20)
        assert done.returncode == 1 and "no verdict" in done.stderr, done.stderr
        time.sleep(2.5)                  # past preStopDelay: a drain would have begun
        assert gw.proc.poll() is None
        for _ in range(10):
            status, headers, body = get(port, b"/t/vw/whoami")
            assert status == 200 and orjson.loads(body)["instance"].startswith("vw")
            assert headers.get("connection") != "close"      # not draining
        gw.wait_for_log(lambda r: r.get("message") == "configuration reload failed in the "
                        "supervisor" and "Is a directory" in r.get("error", ""), timeout=5)
        blocker.rmdir()
        assert cli("reload", "--pid-file", str(pid_file)).returncode == 0
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()
