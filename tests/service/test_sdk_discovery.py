"""How the SDK finds gateways behind a name when the name lists pods that are not ready
(deploy/kubernetes/service.yaml publishes them, so services find a new pod before it is
ready: docs/operations.md, "A new pod: the fleet view"): a terminating gateway stays in
the name for a while, refusing once its listeners close."""
from __future__ import annotations

import asyncio
import threading
import time

from tests.support import services as test_services
from tests.support.gwtest import GatewayThread, NullLog, settings_from, wait_for
from tests.support.valkey_server import free_port


def test_a_terminating_gateway_left_in_the_name_holds_up_nothing():
    """The transport Service publishes not-ready pods (so services find a new pod before
    it is ready), which leaves a terminating pod in the name until it is gone. After its
    DRAIN a service looks the name up again: the gateways it is linked to are not dialled
    a second time, the one that refuses is retried alone, and a new one is found."""
    port = free_port()
    logs, gws = {}, {}

    def gateway(host):
        logs[host] = NullLog()
        gws[host] = GatewayThread(settings_from(
            f"gateway: {{node: {{nodeId: gw-{host}}}, http: {{port: 0}}, "
            f"transports: {{tcp: {{host: {host}, port: {port}}}}}}}"),
            log=logs[host].log).start()

    counts: dict[str, int] = {}

    def registered(host):
        # (lines() hands out each line once)
        counts[host] = counts.get(host, 0) + sum(b'"service registered"' in line
                                                 for line in logs[host].lines())
        return counts[host]

    gateway("127.0.0.1")
    gateway("127.0.0.2")
    addresses = ["127.0.0.1", "127.0.0.2"]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    svc = test_services.build("term", [f"gw.test:{port}"], "local", "1.0.0", "term-1")
    svc.resolve_interval = 0.1
    unreachable = []
    svc._log = lambda message, **kw: unreachable.append(kw) if message == "gateway unreachable" \
        else None

    async def resolve(host):
        return list(addresses)
    svc._addresses = resolve
    try:
        asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
        asyncio.run_coroutine_threadsafe(svc.wait_registered(2), loop).result(10)
        before = {host: registered(host) for host in gws}
        assert before == {"127.0.0.1": 1, "127.0.0.2": 1}
        gws["127.0.0.2"].drain()                  # DRAIN, then its listener refuses
        assert wait_for(lambda: len(unreachable) >= 2, 5)
        gateway("127.0.0.3")
        addresses.append("127.0.0.3")             # scale-up while the other terminates
        assert wait_for(lambda: len(svc._links) == 2 and registered("127.0.0.3") == 1, 5)
        assert registered("127.0.0.1") == 1       # never dialled again
        assert all("127.0.0.2" in kw["error"] for kw in unreachable), unreachable
        addresses.remove("127.0.0.2")             # the pod is gone from the name
        time.sleep(0.5)
        settled = len(unreachable)
        time.sleep(0.6)
        assert len(unreachable) == settled
    finally:
        asyncio.run_coroutine_threadsafe(svc.stop(timeout=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        for gw in gws.values():
            gw.stop()


def test_an_address_that_left_the_name_and_came_back_is_dialled_again():
    # Pod IPs are reused: a new gateway given the address of one that is gone is new.
    port = free_port()
    gws = []

    def gateway(node):
        gws.append(GatewayThread(settings_from(
            f"gateway: {{node: {{nodeId: {node}}}, http: {{port: 0}}, "
            f"transports: {{tcp: {{host: 127.0.0.2, port: {port}}}}}}}")).start())

    gateway("old")
    addresses = ["127.0.0.2"]
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    svc = test_services.build("reuse", [f"gw.test:{port}"], "local", "1.0.0", "reuse-1")
    svc.resolve_interval = 0.1
    svc._log = lambda message, **kw: None

    async def resolve(host):
        return list(addresses)
    svc._addresses = resolve
    try:
        asyncio.run_coroutine_threadsafe(svc.start(), loop).result(10)
        assert wait_for(lambda: {key[0] for key in svc._links} == {"old"}, 5)
        gws[0].drain()
        addresses.clear()                          # the pod is gone, and so is its address
        time.sleep(0.3)
        gateway("new")
        addresses.append("127.0.0.2")              # ... given to a new pod
        assert wait_for(lambda: {key[0] for key in svc._links} == {"new"}, 5)
    finally:
        asyncio.run_coroutine_threadsafe(svc.stop(timeout=1), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        for gw in gws:
            gw.stop()


def test_two_discoveries_dial_a_new_address_once():
    # The periodic lookup and the rediscovery after another gateway's DRAIN may find the
    # same new address together: one dials it (and retries it if it fails), the other
    # passes it by. Both dialling made two links to one worker: two registrations, one
    # link closed again (it made test_a_terminating_gateway_... fail now and then).
    svc = test_services.build("once", ["gw.test:9100"], "local", "1.0.0", "once-1")
    svc._log = lambda message, **kw: None
    dialled, release = [], None

    class Link:
        def __init__(self):
            self.acked = asyncio.get_running_loop().create_future()

    async def addresses(host):
        return ["127.0.0.3"]

    async def connect(addr, port, host):
        dialled.append(addr)
        await release.wait()
        link = Link()
        link.acked.set_result({"node_id": "gw-3", "worker_id": 0})
        return link

    adopted = []
    svc._addresses, svc._connect = addresses, connect
    svc._adopt = lambda link, ack, addr, origin: adopted.append(addr)

    async def main():
        nonlocal release
        release = asyncio.Event()
        first = asyncio.ensure_future(svc._discover("gw.test", 9100, only_new=True))
        second = asyncio.ensure_future(svc._discover("gw.test", 9100))
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)

    asyncio.run(main())
    assert dialled == ["127.0.0.3"] and adopted == ["127.0.0.3"]
    assert svc._dialling == set()
