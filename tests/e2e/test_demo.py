"""The README's first command: `stellagw demo` gives real routed, authenticated traffic, and
the commands its banner prints work as printed."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import orjson

from stellagw.demo import banner
from stellagw.devauth import DpopKey
from stellagw.devauth.client import call, fetch_token

from tests.support.gwtest import ROOT, request, wait_for


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _commands(text: str, program: str) -> list[list[str]]:
    """The banner's `<program> ...` lines as argv lists (trailing `# comments` dropped)."""
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if line.strip().startswith(program)]


def test_banner_names_the_authority_only_off_its_default_port():
    # `stellagw call` assumes the Authority on 8400: the default banner stays as short as
    # the README's, any other port is passed to every call.
    default = banner(8080, 9100, 8400, 9090)
    assert "--authority" not in default
    other = banner(18080, 19100, 18400, 19090)
    calls = _commands(other, "python3 -m stellagw call")
    assert len(calls) == 3
    for argv in calls:
        assert argv[argv.index("--authority") + 1] == "http://127.0.0.1:18400"
    # Every URL printed is on a port in use: the client port or the admin one.
    ports = {int(p) for p in re.findall(r"://127\.0\.0\.1:(\d+)", other)}
    assert ports == {18080, 19090, 18400}
    assert "127.0.0.1:19100" in other


def test_demo_routes_authenticated_traffic_streams_and_websockets(tmp_path):
    http, tport, aport, admin = _free_ports(4)
    env = {**os.environ, "STELLAGW_STATE_DIR": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, "-m", "stellagw", "demo", "--port", str(http),
                             "--transport-port", str(tport), "--authority-port", str(aport),
                             "--admin-port", str(admin)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    # Read stderr as it comes: the banner is there, and a full pipe would stall the demo.
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(demo.stderr), daemon=True)
    reader.start()
    try:
        def ready():
            try:
                # The details of readiness are on the admin listener.
                status, _, body = request(admin, b"GET /health/ready HTTP/1.1\r\nHost: gw\r\n\r\n")
            except OSError:
                return False
            return status == 200 and {"scanner", "policy"} <= set(orjson.loads(body)["services"])
        assert wait_for(ready, 30)
        base = f"http://127.0.0.1:{http}"
        # No token: 401 with a DPoP challenge.
        status, headers, _ = request(http, b"GET /api/v1/scans/42 HTTP/1.1\r\nHost: gw\r\n\r\n")
        assert status == 401
        # A DPoP-bound token from the demo's Authority: routed, identity headers set by us.
        key = DpopKey.generate()
        token = fetch_token(f"http://127.0.0.1:{aport}/token", "demo-client", "demo-secret",
                            "scans:read scans:write", dpop_key=key)["access_token"]
        status, _, body = call(base + "/api/v1/scans/42", token=token, dpop_key=key)
        assert status == 200 and orjson.loads(body)["tenant"] == "tenant-1"
        status, _, body = call(base + "/api/v1/scans/42/report", token=token, dpop_key=key)
        assert status == 200 and body.count(b"finding") == 5
        assert os.path.exists(tmp_path / "dev-authority-keys.pem")
        _try_the_banner("".join(lines), http, tport, aport, admin)
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(20)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()


def _try_the_banner(text: str, http: int, tport: int, aport: int, admin: int) -> None:
    """Run what the banner says to run, as printed (the ports here are not the defaults)."""
    assert "Stop with Ctrl-C" in text, text
    assert f"http://127.0.0.1:{aport}" in text and f"127.0.0.1:{tport}" in text
    py = [sys.executable, "-m", "stellagw"]
    calls = _commands(text, "python3 -m stellagw call")
    assert len(calls) == 3
    for argv in calls:
        out = subprocess.run(py + argv[3:], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (argv, out.stderr)
        if argv[-1].endswith("/report"):
            assert out.stdout.count("finding") == 5
    # The WebSocket line, through the CLI a newcomer uses.
    [ws] = _commands(text, "python3 -m stellagw ws")
    out = subprocess.run(py + ws[3:] + ["--wait", "0.5"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert '"verdict":"deny"' in out.stdout, out.stderr
    # The curl lines' URLs answer as their comments say (curl itself may not be installed).
    urls = dict.fromkeys(re.findall(r"curl [^\n]*?(http://[^\s;]+)", text))
    assert len(urls) >= 5
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for url in urls:
        try:
            with direct.open(url, timeout=10) as resp:
                status = resp.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        expected = 401 if url.endswith("/scans/42") else 200
        assert status == expected, (url, status)
