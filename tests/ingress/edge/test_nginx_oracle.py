"""nginx as an oracle for the corpus (issue 15; docs/http-edge-oracle.md).

A real nginx (Debian's package, /usr/sbin/nginx; `make test-tools` installs it) runs as a
reverse proxy, in the foreground with its own prefix on a free loopback port, in front of a
raw recording HTTP/1.1 backend. Every corpus case is sent once, whole, to nginx and to the
gateway. A case that nginx refuses (a 4xx/5xx, its backend getting fewer requests) while
the gateway forwards more to its service is a failure, unless `DOCUMENTED_DIFFERENCES`
names it with a reason and docs/http-edge-oracle.md lists it.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .corpus import CASES
from .harness import (BODY_LIMIT, HEADER_LIMIT, MARKER_BYTES_RE, EdgeStack, render, run_case,
                      run_raw)

DOC = Path(__file__).resolve().parents[3] / "docs" / "http-edge-oracle.md"
NGINX = "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else shutil.which("nginx")

# Cases nginx refuses that the gateway forwards on purpose (each one is in the table of
# docs/http-edge-oracle.md, with the same reason).
DOCUMENTED_DIFFERENCES = {
    "path_nul_kept": "a path normalize_path refuses is a 400 on a connection whose framing is "
                     "intact, so the connection stays and the next request is served; nginx "
                     "closes after every 400",
    "path_bad_percent_kept": "as path_nul_kept: the framing is intact, the connection stays",
    "cl_ows": "RFC 9110 §5.5: OWS (SP or HTAB) around a field value is not part of it, so "
              "`Content-Length:\\t 5 ` is 5; nginx 1.22 takes only SP before a value",
    "host_leading_tab": "RFC 9110 §5.5: `Host:\\tgw.test` is the host gw.test; nginx 1.22 "
                        "takes only SP before a value",
}

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx, or `make test-tools`)")

CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    client_max_body_size {body_limit};
    client_body_buffer_size 256k;
    large_client_header_buffers 4 {header_limit};
    client_header_timeout 5s;
    client_body_timeout 5s;
    keepalive_timeout 10s;
    upstream edge_backend {{ server 127.0.0.1:{backend_port}; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://edge_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 5s;
        }}
    }}
}}
"""


class RecordingBackend:
    """A raw HTTP/1.1 server on 127.0.0.1 that records each request's bytes by marker and
    answers 200 with `connection: close`."""

    def __init__(self):
        self.by_marker: dict[str, list[bytes]] = {}
        self.unmarked: list[bytes] = []
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        backend = self

        class Proto(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.buf = bytearray()

            def data_received(self, data):
                self.buf += data
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end + 4])
                m = re.search(rb"\r\ncontent-length:[ \t]*(\d+)", head, re.I)
                need = end + 4 + (int(m.group(1)) if m else 0)
                if re.search(rb"\r\ntransfer-encoding:[ \t]*chunked", head, re.I):
                    done = self.buf.find(b"\r\n0\r\n\r\n", end)
                    if done < 0 and not self.buf[end + 4:].startswith(b"0\r\n\r\n"):
                        return
                    need = len(self.buf)
                if len(self.buf) < need:
                    return
                backend.record(bytes(self.buf[:need]))
                self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                                     b"content-length: 2\r\nconnection: close\r\n\r\nok")
                self.transport.close()

        async def main():
            self.server = await self.loop.create_server(Proto, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
            self._ready.set()
        self.loop.run_until_complete(main())
        self.loop.run_forever()

    def record(self, raw: bytes):
        first = raw.split(b"\r\n", 1)[0]
        m = MARKER_BYTES_RE.search(first + b" ")
        marker = m.group(1).decode() if m else None
        if marker is None:
            h = re.search(rb"\r\nx-edge-id:[ \t]*(Z[0-9A-Z]{3})", raw, re.I)
            marker = h.group(1).decode() if h else None
        with self._lock:
            if marker is None:
                self.unmarked.append(raw)
            else:
                self.by_marker.setdefault(marker, []).append(raw)

    def records(self, marker: str) -> list[bytes]:
        with self._lock:
            return list(self.by_marker.get(marker, ()))

    def close(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    def __init__(self, folder: Path, backend_port: int):
        self.prefix = folder
        os.chmod(folder, 0o755)
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (folder / d).mkdir(mode=0o777, exist_ok=True)
            os.chmod(folder / d, 0o777)     # the worker may run as nobody
        self.port = free_port()
        conf = folder / "nginx.conf"
        conf.write_text(CONF.format(prefix=folder, port=self.port, backend_port=backend_port,
                                    body_limit=BODY_LIMIT, header_limit=f"{HEADER_LIMIT // 1024}k"))
        self.proc = subprocess.Popen([NGINX, "-p", str(folder), "-c", str(conf),
                                      "-e", str(folder / "error.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited: {self.proc.stderr.read().decode(errors='replace')}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("nginx did not listen within 10 s")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()           # the master (our child) stops its worker
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def oracle_cases():
    return [c for c in CASES if c.oracle and not c.script and c.gateway == "main"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    backend = RecordingBackend()
    nginx = None
    stack = None
    try:
        nginx = Nginx(tmp_path_factory.mktemp("nginx"), backend.port)
        stack = EdgeStack(tmp_path_factory.mktemp("edge-oracle"), deadlines=False)

        def via_nginx(case):
            marker = stack.markers.next()
            out = run_raw(nginx.port, render(case, marker, stack.creds), None,
                          expect_n=len([s for s in case.expect.statuses if s >= 200]) or None,
                          head_indices=case.head_indices, idle=1.0)
            out.marker = marker
            return out

        cases = oracle_cases()
        with ThreadPoolExecutor(8) as pool:
            ng = list(pool.map(via_nginx, cases))
            gw = list(pool.map(lambda c: run_case(stack, c, None), cases))
        time.sleep(0.3)
        rows = []
        for case, n_out, g_out in zip(cases, ng, gw):
            rows.append({
                "case": case, "nginx": n_out.statuses, "nginx_closed": n_out.closed,
                "nginx_backend": len(backend.records(n_out.marker)),
                "gateway": g_out.statuses, "gateway_closed": g_out.closed,
                # A REQUEST the gateway cancelled (its body was refused while streaming)
                # is not a forwarded request: only complete ones count.
                "gateway_service": len([r for r in stack.book.records(g_out.marker)
                                        if r.complete and not r.cancelled]),
            })
        yield rows
    finally:
        if stack is not None:
            stack.close()
        if nginx is not None:
            nginx.stop()
        backend.close()


def nginx_refuses_what_we_forward(row) -> bool:
    refused = any(s >= 400 for s in row["nginx"])
    return refused and row["gateway_service"] > row["nginx_backend"]


def test_nginx_refuses_nothing_we_forward(oracle):
    bad = []
    for row in oracle:
        name = row["case"].name
        if nginx_refuses_what_we_forward(row) and name not in DOCUMENTED_DIFFERENCES:
            bad.append(f"{name}: nginx {row['nginx']} (its backend got {row['nginx_backend']}), "
                       f"gateway {row['gateway']} (its service got {row['gateway_service']})")
    assert not bad, ("nginx refuses these and the gateway forwards them; fix the gateway, or "
                     "say why in DOCUMENTED_DIFFERENCES and docs/http-edge-oracle.md:\n  "
                     + "\n  ".join(bad))


def test_documented_differences_are_in_the_doc():
    names = {c.name for c in CASES}
    text = DOC.read_text(encoding="utf-8")
    for name, reason in DOCUMENTED_DIFFERENCES.items():
        assert name in names, f"{name} is no corpus case"
        assert reason.strip(), name
        assert f"`{name}`" in text, f"{name} is not in docs/http-edge-oracle.md"


def test_the_oracle_answers(oracle):
    """nginx itself works here: the plain request reaches its backend."""
    row = next(r for r in oracle if r["case"].name == "http11_get")
    assert row["nginx"] == [200] and row["nginx_backend"] == 1, row
