"""gateway.http.allowedHosts: a request naming another host gets 421 and reaches no service
(docs/http-edge.md, "Host"). Without it a client chose the X-Forwarded-Host a service
builds its links from (password resets, redirects)."""
from __future__ import annotations

import orjson
import pytest

from stellagw.config import ConfigError

from tests.ingress.test_client_address import connect_proto
from tests.ingress.test_ingress_protocol import responses
from tests.support.gwtest import Served, port_of, request, settings_from
from tests.support.services import ServiceProcess

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

CFG = "gateway: {http: {allowedHosts: [API.example.com, '*.apps.example.com', '::1']}}"


def test_the_configuration_normalises_each_host_and_names_a_bad_one():
    hosts = settings_from(CFG).gateway.http.allowed_hosts
    assert hosts == ("api.example.com", "*.apps.example.com", "[::1]")
    with pytest.raises(ConfigError) as err:
        settings_from("gateway: {http: {allowedHosts: [a.example.com, 'https://b.example.com']}}")
    assert err.value.path == "gateway.http.allowedHosts[1]"
    assert settings_from("").gateway.http.allowed_hosts == ()


@pytest.mark.parametrize("raw", [
    b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: API.Example.COM:8443\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: api.example.com.\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: eu.apps.example.com\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: [0:0::1]:8080\r\n\r\n",
    b"GET http://x.apps.example.com/a HTTP/1.1\r\nHost: evil.test\r\n\r\n",
])
def test_a_request_for_an_allowed_host_is_served(raw):
    seen, proto, t = connect_proto(CFG)
    proto.data_received(raw)
    assert len(seen.reqs) == 1 and not t.ended


@pytest.mark.parametrize("raw", [
    b"POST /a HTTP/1.1\r\nHost: evil.test\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /a HTTP/1.1\r\nHost: apps.example.com\r\n\r\n",             # only its subdomains
    b"GET /a HTTP/1.1\r\nHost: api.example.com.evil.test\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: [::2]\r\n\r\n",
    b"GET http://evil.test/a HTTP/1.1\r\nHost: api.example.com\r\n\r\n",  # its authority counts
    b"GET /a HTTP/1.0\r\n\r\n",                                         # no host to judge
])
def test_a_request_for_another_host_gets_421_and_reaches_nothing(raw):
    seen, proto, t = connect_proto(CFG)
    proto.data_received(raw + b"GET /a HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
    [(status, headers, body)] = responses(t.out)
    assert status == 421 and orjson.loads(body)["error"]["code"] == "misdirected_request"
    # Nothing of it, nor of what followed on the connection, went anywhere.
    assert seen.reqs == [] and t.ended


def test_end_to_end_the_service_sees_only_allowed_hosts(tmp_path):
    cfg = ("gateway:\n  node: {workers: 1}\n  http: {port: 0, allowedHosts: [t, gw.example.com]}\n"
           "  transports: {tcp: {port: 0}}\n")
    gw = Served(config_text=cfg, tmp_path=tmp_path)
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port, admin = port_of(rec["http"]), port_of(rec["admin"])
        svc = ServiceProcess("ca", port_of(rec["tcp"])).start().wait_routable(
            port, raw=b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        status, _, body = request(port, b"GET /t/ca/whoami HTTP/1.1\r\nHost: gw.example.com\r\n\r\n")
        assert status == 200
        assert orjson.loads(body)["headers"]["x-forwarded-host"] == "gw.example.com"
        status, _, _ = request(port, b"GET /t/ca/whoami HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        assert status == 421
        # The admin listener is probed by the pod's address: not judged.
        status, _, _ = request(admin, b"GET /health/live HTTP/1.1\r\nHost: 10.1.2.3:9090\r\n\r\n")
        assert status == 200
        records = gw.wait_for_log(lambda r: r.get("status") == 421)
        assert records[0].get("service") in (None, "")
    finally:
        if svc is not None:
            svc.stop()
        assert gw.stop() == 0
