"""The README's first command: `stellagw demo` gives real routed, authenticated traffic."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import orjson

from stellagw.devauth import DpopKey
from stellagw.devauth.client import call, fetch_token

from .gwtest import ROOT, request, wait_for


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_demo_routes_authenticated_traffic_streams_and_websockets(tmp_path):
    http, tport, aport, admin = _free_ports(4)
    env = {**os.environ, "STELLAGW_STATE_DIR": str(tmp_path)}
    demo = subprocess.Popen([sys.executable, "-m", "stellagw", "demo", "--port", str(http),
                             "--transport-port", str(tport), "--authority-port", str(aport),
                             "--admin-port", str(admin)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
        # The WebSocket endpoint, through the CLI a newcomer uses.
        out = subprocess.run([sys.executable, "-m", "stellagw", "ws",
                              f"ws://127.0.0.1:{http}/api/v1/policies/watch", "nginx:latest",
                              "--wait", "0.5"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert '"verdict":"deny"' in out.stdout, out.stderr
        assert os.path.exists(tmp_path / "dev-authority-keys.pem")
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            demo.wait(20)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait()
