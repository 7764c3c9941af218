"""The command line and the process model, as a user runs them: real subprocesses."""
from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import orjson
import pytest

from tests.support import REPO
from tests.support.gwtest import Pki, Served, request, wait_for

ROOT = str(REPO)


def run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "stellagw", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and re.fullmatch(r"stellagw \d+\.\d+\.\d+\n", out.stdout)


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text("gateway:\n  auth:\n    rateLimiting:\n      redisConnectionString: redis://u:hunter2@h:6379\n"
                   "  transports:\n    tls: {certificatePassword: '${PW}', certificatePath: /x.pfx}\n")
    out = subprocess.run([sys.executable, "-m", "stellagw", "check-config", str(cfg)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "PW": "s3cret-pw"})
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout and "s3cret-pw" not in out.stdout
    assert "defaultTimeout: 30s" in out.stdout


@pytest.mark.parametrize("text, key", [
    ("gateway: {routing: {defaultTimeout: 30x}}", "gateway.routing.defaultTimeout"),
    ("gateway: {routing: {maxRequestBodySize: 100XB}}", "gateway.routing.maxRequestBodySize"),
    ("gateway: {http: {port: 70000}}", "gateway.http.port"),
    ("gateway: {node: {workers: many}}", "gateway.node.workers"),
    ("gateway: {nodes: {}}", "gateway.nodes"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_second: 1}]}}",
     "rate_limiting.for_instance.rules[0].per_second"),
    ("gateway: {http: {tls: {enabled: true}}}", "gateway.http.tls.certificatePath"),
    # Round 8E (config fuzzing): these passed check-config, then serve died with a
    # traceback (the first three) or started and failed every client connection (the last).
    ("gateway: {http: {port: 0, backlog: 4294967296}}", "gateway.http.backlog"),
    ("gateway: {http: {port: 0, tcpKeepAlive: 1000000h}}", "gateway.http.tcpKeepAlive"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 4294967296, per_seconds: 1}]}}",
     "rate_limiting.for_instance.rules[0].max_requests"),
    ("gateway: {http: {port: 0, bodyReadTimeout: 1.0e+30}}", "gateway.http.bodyReadTimeout"),
    ('gateway: {http: {port: 0}, admin: {host: "a\\x00b"}}', "gateway.admin.host"),
    # Not the client listener's cap but the transport's took the descriptors: name it.
    ("gateway: {http: {port: 0}, transports: {tcp: {port: 0, maxConnections: 2147483647}}}",
     "gateway.transports.tcp.maxConnections"),
])
def test_bad_config_stops_serve_before_listening_naming_the_key(tmp_path, text, key):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(text)
    out = run_cli("serve", "--config", str(cfg))
    assert out.returncode == 2
    assert key in out.stderr
    assert "listening" not in out.stdout


def test_missing_config_file_and_bad_arguments():
    out = run_cli("serve", "--config", "/nonexistent/gw.yaml")
    assert out.returncode == 2 and "/nonexistent/gw.yaml" in out.stderr
    out = run_cli("serve", "--workers", "x")
    assert out.returncode == 2 and "invalid int value" in out.stderr
    out = run_cli("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr
    out = run_cli("serve", "--workers", "-1")
    assert out.returncode == 2 and "--workers" in out.stderr


@pytest.mark.parametrize("case", ["missing", "directory", "not_pem", "key_mismatch", "ca_missing"])
def test_check_config_loads_the_certificates_as_serve_does(tmp_path, case):
    # Round 8E (config fuzzing): each of these passed check-config (exit 0) and then
    # stopped serve with exit 2; check-config must say so first, naming the key.
    pki = Pki(tmp_path)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    cert, key, ca, where = pki.server_cert, pki.server_key, "", "gateway.http.tls.certificatePath"
    if case == "missing":
        cert = str(tmp_path / "none.pem")
    elif case == "directory":
        cert = str(tmp_path)
    elif case == "not_pem":
        cert = str(tmp_path / "garbage.pem")
    elif case == "key_mismatch":
        key = pki.client_key
    else:
        ca, where = str(tmp_path / "none-ca.pem"), "gateway.http.tls.clientCaPath"
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway: {{http: {{port: 0, tls: {{enabled: true, certificatePath: '{cert}', "
                   f"keyPath: '{key}', clientCaPath: '{ca}'}}}}}}")
    out = run_cli("check-config", str(cfg))
    assert out.returncode == 2, out
    assert where in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""
    cfg.write_text(f"gateway: {{http: {{port: 0, tls: {{enabled: true, "
                   f"certificatePath: '{pki.server_cert}', keyPath: '{pki.server_key}'}}}}}}")
    assert run_cli("check-config", str(cfg)).returncode == 0


def test_unusable_certificate_is_a_config_error(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway: {{http: {{port: 0, tls: {{enabled: true, certificatePath: {tmp_path}/none.pem, "
                   f"keyPath: {tmp_path}/none.key}}}}}}")
    out = run_cli("serve", "--config", str(cfg))
    assert out.returncode == 2 and "gateway.http.tls.certificatePath" in out.stderr


def test_serve_single_worker_answers_and_stops_on_sigterm(tmp_path):
    s = Served("--port", "0", "--workers", "1", config_text="gateway: {transports: {tcp: {port: 0}}}",
               tmp_path=tmp_path)
    try:
        [rec] = s.wait_listening()
        port = int(rec["http"].rsplit(":", 1)[1])
        status, _, body = request(port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status == 200
    finally:
        assert s.stop(signal.SIGTERM) == 0


def test_two_workers_share_the_port_and_a_dead_worker_is_restarted(tmp_path):
    s = Served("--port", "0", "--workers", "2", config_text="gateway: {transports: {tcp: {port: 0}}}",
               tmp_path=tmp_path)
    try:
        recs = s.wait_listening(2)
        ports = {int(r["http"].rsplit(":", 1)[1]) for r in recs}
        assert len(ports) == 1
        port = ports.pop()
        # Which worker answers is a readiness detail: the admin listener's.
        admin = {int(r["admin"].rsplit(":", 1)[1]) for r in recs}.pop()
        seen = set()
        for _ in range(200):
            _, _, body = request(admin, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
            seen.add(orjson.loads(body)["worker"])
            if len(seen) == 2:
                break
        assert seen == {0, 1}, "SO_REUSEPORT should spread connections over both workers"
        assert _restarts(admin) == {"died": 0, "stalled": 0}
        victim = recs[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        [again] = s.wait_listening(1)[:1]
        assert again["pid"] != victim and again["worker"] == recs[0]["worker"]
        assert request(port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
        # Counted by the supervisor, read in the scrape of whichever worker answers it.
        assert all(_restarts(admin) == {"died": 1, "stalled": 0} for _ in range(10))
    finally:
        assert s.stop() == 0


def _restarts(admin_port: int) -> dict:
    status, _, body = request(admin_port, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200
    found = re.findall(rb'^gateway_worker_restarts_total\{reason="(\w+)"\} (\S+)$', body, re.M)
    return {reason.decode(): float(n) for reason, n in found}


def _children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return {int(p) for p in f.read().split()}


@pytest.mark.parametrize("when", ["serving", "starting"])
def test_a_stalled_worker_is_killed_and_restarted(tmp_path, when):
    # A frozen worker (SIGSTOP: as a loop stuck in a bug would look) keeps its share of new
    # connections through SO_REUSEPORT and answers none of them. The supervisor sees its
    # heartbeat stop, kills it and starts another in its place. "starting": frozen the
    # moment the supervisor forks it (after its predecessor was killed), before it can beat
    # once — its listening socket is the supervisor's and queues its share of connections
    # from the start, so a worker hung while starting is as much a black hole.
    s = Served("--port", "0", "--workers", "2",
               config_text="gateway: {node: {workerStallTimeout: 2s}, transports: {tcp: {port: 0}}}",
               tmp_path=tmp_path)
    frozen = None
    try:
        recs = s.wait_listening(2)
        port = int(recs[0]["http"].rsplit(":", 1)[1])
        if when == "serving":
            frozen = recs[0]["pid"]
        else:
            workers = _children(s.proc.pid)
            os.kill(recs[0]["pid"], signal.SIGKILL)
            assert wait_for(lambda: _children(s.proc.pid) - workers, timeout=10, interval=0.001)
            [frozen] = _children(s.proc.pid) - workers
        os.kill(frozen, signal.SIGSTOP)
        [stalled] = s.wait_for_log(lambda r: r.get("message") == "worker stalled; killing it")
        assert stalled["pid"] == frozen and stalled["worker"] == recs[0]["worker"]
        assert stalled["silentSeconds"] >= 2
        frozen = None
        [again] = s.wait_listening(1)
        assert again["pid"] != stalled["pid"] and again["worker"] == recs[0]["worker"]
        # Every new connection is answered again, whichever worker the kernel picks.
        assert all(request(port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n")[0] == 200
                   for _ in range(20))
        admin = int(again["admin"].rsplit(":", 1)[1])
        assert _restarts(admin) == {"died": int(when == "starting"), "stalled": 1}
    finally:
        if frozen is not None:
            try:
                os.kill(frozen, signal.SIGCONT)
            except ProcessLookupError:
                pass
        assert s.stop() == 0


def test_workers_sharing_stdout_never_splice_each_others_log_lines(tmp_path):
    # Each worker's log thread wrote its batch (up to 64 KiB) in one write; to a pipe only
    # PIPE_BUF bytes are written atomically, and two workers' batches interleaved mid-line
    # (2,284 of 108,593 lines spliced with 3 KB user agents; an adversarial probe).
    s = Served("--port", "0", "--workers", "2",
               config_text="gateway: {transports: {tcp: {port: 0}}}", tmp_path=tmp_path)
    try:
        recs = s.wait_listening(2)
        port = int(recs[0]["http"].rsplit(":", 1)[1])
        raw = (b"GET /health/live HTTP/1.1\r\nHost: gw\r\nUser-Agent: " + b"u" * 3000
               + b"\r\n\r\n")
        stop = time.monotonic() + 2.0

        def client():
            from tests.support.gwtest import connect, read_response
            while time.monotonic() < stop:
                with connect(port, timeout=10) as c:
                    buf = bytearray()
                    for _ in range(50):
                        c.sendall(raw)
                        assert read_response(c, buf)[0] == 200
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        assert s.stop() == 0
    bad = []
    for line in s.lines:
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            bad.append(line[:120])
    answered = sum(1 for line in s.lines if b'"path":"/health/live"' in line)
    assert answered > 1000 and not bad, (answered, len(bad), bad[:3])


def test_no_log_line_is_longer_than_one_atomic_pipe_write(tmp_path):
    # A single line over PIPE_BUF (4096) was still written in pieces another worker's write
    # could land between: a 10 KB user agent or a long path in the access log. Every line
    # now fits, its longest strings clipped with "…" and named in "truncated".
    from tests.support.gwtest import connect, read_response
    max_line, ellipsis = 4096, "…"           # docs/operations.md, "Logs"
    s = Served("--port", "0", "--workers", "2",
               config_text="gateway: {transports: {tcp: {port: 0}}}", tmp_path=tmp_path)
    agent = ("Mozilla/5.0 \"quoted\" é€😀 \\ " * 300).encode()[:10_000]    # UTF-8: C1 bytes too
    long_path = b"/nope/" + b"%C3%A9a\"b" * 700          # under maxUrlLength (8192)
    requests = [
        b"GET /health/live HTTP/1.1\r\nHost: gw\r\nUser-Agent: " + agent + b"\r\n\r\n",
        b"GET " + long_path + b"?q=" + b"x" * 500 + b" HTTP/1.1\r\nHost: gw\r\n"
        b"User-Agent: " + agent[:3000] + b"\r\n\r\n",
    ]
    try:
        recs = s.wait_listening(2)
        port = int(recs[0]["http"].rsplit(":", 1)[1])

        statuses = []

        def client():
            with connect(port, timeout=10) as c:
                buf = bytearray()
                for i in range(150):
                    c.sendall(requests[i % 2])
                    statuses.append(read_response(c, buf)[0])
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(set(statuses)) == [200, 404] and len(statuses) == 900
        assert s.wait_for_log(lambda r: r.get("path", "").startswith("/nope/"), count=450)
    finally:
        assert s.stop() == 0
    records = []
    for line in s.lines:
        assert len(line) + 1 <= max_line, len(line)          # the newline included
        records.append(orjson.loads(line))                   # no line spliced
    live = [r for r in records if r.get("path") == "/health/live"]
    nope = [r for r in records if r.get("path", "").startswith("/nope/")]
    assert len(live) == 450 and len(nope) == 450
    for r in live:
        assert r["truncated"] == ["userAgent"] and r["userAgent"].endswith(ellipsis)
    for r in nope:
        assert "path" in r["truncated"] and r["path"].endswith(ellipsis)
        assert r["path"].startswith("/nope/")
    assert sum("truncated" in r for r in records) == len(live) + len(nope)


def test_a_stdout_nobody_reads_never_stalls_the_gateway(tmp_path):
    # Regression: the access log once wrote to stdout from the event loop; when the pipe
    # filled (64 KiB, ~150 lines) the worker froze with every connection on it.
    import socket as _socket
    with _socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(f"gateway: {{http: {{port: {port}}}, transports: {{tcp: {{port: 0}}}}}}")
    proc = subprocess.Popen([sys.executable, "-m", "stellagw", "serve", "--config", str(cfg)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _answers(port), timeout=15)
        from tests.support.gwtest import connect, read_response
        with connect(port, timeout=10) as s:
            buf = bytearray()
            for i in range(600):   # ~600 log lines: several times the pipe's capacity
                s.sendall(b"GET /health/live HTTP/1.1\r\nHost: gw\r\nX-Correlation-Id: c%d\r\n\r\n" % i)
                assert read_response(s, buf)[0] == 200
    finally:
        proc.kill()
        proc.wait()


def _answers(port):
    try:
        return request(port, b"GET /health/live HTTP/1.1\r\nHost: gw\r\n\r\n", timeout=1)[0] == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------- network errors
#
# Every failure to reach something is one line on stderr with the URL tried and the reason,
# exit code 1, and no traceback: what a newcomer sees when a port in the demo's banner is
# wrong, a gateway is down or a certificate is not trusted.

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Listener:
    """A loopback port that accepts connections and answers each with ``reply`` (optionally
    inside TLS), or, with ``reply=None``, never accepts: the kernel completes the handshake
    and the request waits in the backlog unanswered."""

    def __init__(self, reply: bytes | None, tls: ssl.SSLContext | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.reply, self.tls = reply, tls
        if reply is not None:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.settimeout(5)
                if self.tls is not None:
                    conn = self.tls.wrap_socket(conn, server_side=True)
                conn.recv(65536)
                conn.sendall(self.reply)
            except OSError:
                pass   # the client gave up on our certificate: that is the test
            finally:
                conn.close()

    def close(self):
        self.sock.close()


def _one_line_error(out, url: str, *words: str) -> str:
    assert out.returncode == 1, (out.returncode, out.stderr)
    err = out.stderr.strip()
    assert "Traceback" not in out.stderr and len(err.splitlines()) == 1, out.stderr
    assert url in err, err
    for word in words:
        assert word in err, err
    return err


def test_call_to_a_closed_port_names_the_url():
    url = f"http://127.0.0.1:{_closed_port()}/api/v1/scans/42"
    _one_line_error(run_cli("call", "--token", "t", url), url, "connection refused")


def test_call_whose_authority_is_down_names_the_discovery_url():
    # The demo's old failure: an Authority on another port than `call` assumed.
    authority = f"http://127.0.0.1:{_closed_port()}"
    err = _one_line_error(run_cli("call", "--authority", authority, "http://127.0.0.1:1/x"),
                          authority + "/.well-known/openid-configuration",
                          "cannot get a token", "connection refused")
    assert "127.0.0.1:1/x" not in err, "the request itself was never tried"


def test_call_that_gets_no_answer_times_out_naming_the_url():
    silent = _Listener(None)
    try:
        url = f"http://127.0.0.1:{silent.port}/slow"
        out = run_cli("call", "--token", "t", "--timeout", "0.5", url)
        _one_line_error(out, url, "no answer within 0.5 s")
    finally:
        silent.close()


@pytest.mark.parametrize("server", ["plain-http", "untrusted-certificate"])
def test_call_tls_failures_name_the_url(tmp_path, server):
    tls = None
    if server == "untrusted-certificate":
        from tests.support.gwtest import Pki
        pki = Pki(tmp_path)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(pki.server_cert, pki.server_key)
    listener = _Listener(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", tls)
    try:
        url = f"https://127.0.0.1:{listener.port}/x"
        err = _one_line_error(run_cli("call", "--token", "t", url), url, "TLS")
        if server == "untrusted-certificate":
            assert "not trusted" in err, err
    finally:
        listener.close()


def test_token_endpoint_error_names_the_token_endpoint():
    from stellagw.devauth import DevAuthority
    auth = DevAuthority(port=0).start_in_thread()
    try:
        out = run_cli("call", "--authority", auth.issuer, "--client-secret", "wrong",
                      "http://127.0.0.1:1/x")
        _one_line_error(out, auth.token_endpoint, "cannot get a token", "401", "invalid_client")
    finally:
        auth.stop()


def test_call_refuses_a_url_that_is_not_http():
    out = run_cli("call", "--token", "t", "127.0.0.1:8080/x")
    assert out.returncode == 2 and "127.0.0.1:8080/x" in out.stderr
    assert "Traceback" not in out.stderr


def test_ws_errors_name_the_url():
    url = f"ws://127.0.0.1:{_closed_port()}/api/v1/policies/watch"
    _one_line_error(run_cli("ws", url), url, "connection refused")
    # Something that answers HTTP, but not with an upgrade.
    plain = _Listener(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    try:
        url = f"ws://127.0.0.1:{plain.port}/nowhere"
        _one_line_error(run_cli("ws", url), url, "404")
    finally:
        plain.close()
    silent = _Listener(None)
    try:
        url = f"ws://127.0.0.1:{silent.port}/x"
        _one_line_error(run_cli("ws", "--timeout", "0.5", url), url, "0.5 s")
    finally:
        silent.close()


def test_dev_authority_on_a_taken_port_names_the_address():
    taken = _Listener(None)
    try:
        out = run_cli("dev-authority", "--ephemeral", "--port", str(taken.port))
        _one_line_error(out, f"127.0.0.1:{taken.port}", "cannot listen", "in use")
    finally:
        taken.close()
