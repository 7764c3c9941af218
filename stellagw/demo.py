"""`stellagw demo`: the gateway on 127.0.0.1:8080 with what to try printed first."""
from __future__ import annotations

import dataclasses
import sys

from .config import default_settings

TRY = """
stellagw demo — the gateway is starting on http://{host}:{port}

Try, in another terminal:
  curl -i http://{host}:{port}/health/live
  curl -i http://{host}:{port}/health/ready
  curl -i http://{host}:{port}/metrics
  curl -i -H 'X-Correlation-Id: my-trace-1' http://{host}:{port}/api/v1/scans/42   # 404: no service yet

Stop with Ctrl-C (a graceful drain).
"""


def settings(port: int = 8080):
    s = default_settings()
    gw = s.gateway
    gw = dataclasses.replace(gw, http=dataclasses.replace(gw.http, host="127.0.0.1", port=port),
                             node=dataclasses.replace(gw.node, workers=1))
    return dataclasses.replace(s, gateway=gw)


def main(port: int = 8080) -> int:
    from .supervisor import serve
    s = settings(port)
    print(TRY.format(host=s.gateway.http.host, port=s.gateway.http.port), file=sys.stderr, flush=True)
    return serve(s)
