"""The OpenAPI document is built on change (issue 19 item 3): the first /openapi.json read
after a real SDK service registers — or leaves — is the new document, with a new ETag, and
a read that arrives while that build runs waits for it without stalling the worker.

Registration is detected on the routed path (the service's own endpoint answers), never by
reading the document: before this change the first read started the rebuild and was
answered from the old snapshot, so each "first read" below would have had no paths."""
from __future__ import annotations

import threading
import time

import orjson
import pytest

import stellagw.openapi.cache as cache_mod

from tests.support.gwtest import GatewayThread, request, settings_from, wait_for
from tests.support.services import ServiceProcess, start_service, stop_services


def get(port, path, extra=b""):
    return request(port, b"GET %s HTTP/1.1\r\nHost: gw\r\n%s\r\n" % (path.encode(), extra))


class Gateway:
    def __init__(self):
        self.gw = GatewayThread(settings_from(
            "gateway: {http: {port: 0}, logging: {accessLog: false}}")).start()
        self.admin = self.gw.worker.admin_address[1]
        self.services: dict[str, ServiceProcess] = {}

    def document(self, extra=b""):
        status, headers, body = get(self.admin, "/openapi.json", extra)
        return status, headers, orjson.loads(body) if status == 200 else None

    def register(self, name):
        # Routed: the HELLO is in this worker's routing state.
        self.services[name] = start_service(name, self.gw.transport_port, wait=self.gw.port)

    def leave(self, name):
        self.services.pop(name).stop()
        # 503: the service is still known, without an instance (routing.serviceExpiry).
        assert wait_for(lambda: get(self.gw.port, f"/t/{name}/whoami")[0] == 503, 20), name

    def close(self):
        stop_services(list(self.services.values()))
        self.gw.stop()


@pytest.fixture
def gateway():
    g = Gateway()
    try:
        yield g
    finally:
        g.close()


def paths(doc) -> set[str]:
    return {p for p in doc["paths"] if p.startswith("/t/")}


def test_first_read_after_a_registration_change_is_the_new_document(gateway):
    status, headers, doc = gateway.document()
    assert status == 200 and paths(doc) == set()
    empty = headers["etag"]

    gateway.register("fresh1")
    status, headers, doc = gateway.document()
    assert status == 200 and "/t/fresh1/whoami" in paths(doc)
    one = headers["etag"]
    assert one != empty
    # The client's copy from before the registration is not current any more.
    assert gateway.document(b"If-None-Match: " + empty.encode() + b"\r\n")[0] == 200
    assert gateway.document(b"If-None-Match: " + one.encode() + b"\r\n")[0] == 304

    gateway.register("fresh2")
    status, headers, doc = gateway.document()
    assert {"/t/fresh1/whoami", "/t/fresh2/whoami"} <= paths(doc)
    two = headers["etag"]
    assert two not in (empty, one)
    status, _, disc = get(gateway.admin, "/.well-known/openapi")
    assert orjson.loads(disc)["etag"] == two
    status, _, yaml_body = get(gateway.admin, "/openapi.yaml")
    assert b"/t/fresh2/whoami" in yaml_body

    gateway.leave("fresh2")
    status, headers, doc = gateway.document()
    assert not any(p.startswith("/t/fresh2/") for p in paths(doc))
    # The same content as with fresh1 alone: the same ETag (it follows the content only).
    assert headers["etag"] == one


def test_a_read_during_the_build_waits_for_it_without_stalling_the_worker(gateway, monkeypatch):
    gateway.document()
    real = cache_mod.build_document
    building = threading.Event()

    def slow_build(*args, **kw):
        building.set()
        time.sleep(0.6)            # on the build thread: the worker's loop must not notice
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "build_document", slow_build)
    before = gateway.gw.worker.openapi.builds
    gateway.register("slowdoc")
    assert building.wait(5)        # started by the registration, not by a read
    result = {}

    def read():
        t0 = time.monotonic()
        result["doc"] = gateway.document()
        result["seconds"] = time.monotonic() - t0

    reader = threading.Thread(target=read)
    reader.start()
    # While the read waits, the same worker answers probes and routed requests at once.
    probes = []
    while reader.is_alive():
        t0 = time.monotonic()
        assert get(gateway.admin, "/health/live")[0] == 200
        assert get(gateway.gw.port, "/t/slowdoc/whoami")[0] == 200
        probes.append(time.monotonic() - t0)
        time.sleep(0.02)
    reader.join()
    status, _, doc = result["doc"]
    assert status == 200 and "/t/slowdoc/whoami" in paths(doc)
    assert len(probes) >= 3 and max(probes) < 0.3, probes
    assert gateway.gw.worker.openapi.builds == before + 1


def test_a_build_that_never_lands_answers_from_the_last_document(gateway, monkeypatch):
    status, headers, _ = gateway.document()
    old = headers["etag"]
    release = threading.Event()
    real = cache_mod.build_document

    def stuck(*args, **kw):
        release.wait(30)
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "build_document", stuck)
    monkeypatch.setattr(cache_mod, "WAIT_LIMIT", 0.5)
    try:
        gateway.register("stuck")
        t0 = time.monotonic()
        status, headers, doc = gateway.document()
        assert status == 200 and headers["etag"] == old and paths(doc) == set()
        assert 0.4 < time.monotonic() - t0 < 5
    finally:
        release.set()
    assert gateway.gw.worker.openapi.wait(10)
    assert wait_for(lambda: "/t/stuck/whoami" in paths(gateway.document()[2]), 5)


def test_changes_faster_than_builds_leave_the_builder_a_bounded_share(gateway, monkeypatch):
    # Links whose ENDPOINTS_UPDATEs (one a second each, within the per-link pacing) change
    # the routes faster than a build takes kept the builder running back to back: 30 such
    # links put other requests' median latency at 0.9 s (its GIL share, its collections).
    # A build now starts BUILD_PACE x its predecessor's duration after it ended, and reads
    # still get the document that covers them.
    from tests.support.servicepeer import RawPeer, hello_for
    gateway.document()
    real = cache_mod.build_document
    spans = []

    def slow_build(*args, **kw):
        t0 = time.monotonic()
        time.sleep(0.3)
        try:
            return real(*args, **kw)
        finally:
            spans.append((t0, time.monotonic()))

    monkeypatch.setattr(cache_mod, "build_document", slow_build)
    peers = []
    t0 = time.monotonic()
    try:
        i = 0
        while time.monotonic() - t0 < 4:
            p = RawPeer(gateway.gw.transport_port)
            assert "error" not in p.hello(hello_for(f"churn{i}",
                                                    endpoints=[("GET", f"/t/churn{i}")]))
            peers.append(p)
            i += 1
            time.sleep(0.1)
        status, _, doc = gateway.document()
        assert status == 200 and f"/t/churn{i - 1}" in paths(doc)   # it waited for it
    finally:
        for p in peers:
            p.close()
    elapsed = spans[-1][1] - t0
    busy = sum(end - start for start, end in spans)
    assert busy / elapsed < 0.4, (busy, elapsed, len(spans))
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start - end >= 0.9 * cache_mod.BUILD_PACE * 0.3 - 0.05
