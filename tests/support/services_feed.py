"""tests.support.services plus a slow feed, for the dashboard's live test:
`python -m tests.support.services_feed --name NAME --gateway HOST:PORT`.

GET /t/<name>/feed is declared streaming and sends 8 small chunks 60 ms apart, as a
progress feed or server-sent events do: its duration (~0.5 s) is how long the feed lasts
whatever the machine's load, far past the 50 ms latency SLO. tests.support.services' own /stream
finishes as fast as loopback copies a MiB, so it cannot show that."""
from __future__ import annotations

import argparse
import asyncio

from stellagw.service import StreamResponse

from tests.support.services import build


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--gateway", action="append", required=True)
    a = p.parse_args()
    svc = build(a.name, a.gateway, "local", "1.0.0", None)

    @svc.get(f"/t/{a.name}/feed", streaming=True)
    async def feed(req):
        async def body():
            for i in range(8):
                yield b"data: %d\n\n" % i
                await asyncio.sleep(0.06)
        return StreamResponse(body(), content_type="text/event-stream")

    svc.run()


if __name__ == "__main__":
    main()
