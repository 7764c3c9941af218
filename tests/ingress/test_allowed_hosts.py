"""gateway.http.allowedHosts: a request naming another host gets 421 and reaches no service
(docs/http-edge.md, "Host"). Without it a client chose the X-Forwarded-Host a service
builds its links from (password resets, redirects)."""
from __future__ import annotations

import orjson
import pytest

from stellagw.config import ConfigError

from tests.support.gwtest import Served, connect, port_of, read_response, request, settings_from
from tests.support.services import ServiceProcess

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)

HOSTS = "[t, API.example.com, '*.apps.example.com', '::1']"


def test_the_configuration_normalises_each_host_and_names_a_bad_one():
    hosts = settings_from(f"gateway: {{http: {{allowedHosts: {HOSTS}}}}}").gateway.http.allowed_hosts
    assert hosts == ("t", "api.example.com", "*.apps.example.com", "[::1]")
    with pytest.raises(ConfigError) as err:
        settings_from("gateway: {http: {allowedHosts: [a.example.com, 'https://b.example.com']}}")
    assert err.value.path == "gateway.http.allowedHosts[1]"
    assert settings_from("").gateway.http.allowed_hosts == ()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = (f"gateway:\n  node: {{workers: 1}}\n  http: {{port: 0, allowedHosts: {HOSTS}}}\n"
           "  transports: {tcp: {port: 0}}\n")
    gw = Served(config_text=cfg, tmp_path=tmp_path_factory.mktemp("hosts"))
    svc = None
    try:
        rec = gw.wait_listening()[0]
        port = port_of(rec["http"])
        svc = ServiceProcess("ca", port_of(rec["tcp"])).start()     # stopped if not routable
        svc.wait_routable(port, raw=b"GET /t/ca/whoami HTTP/1.1\r\nHost: t\r\n\r\n")
        yield port, port_of(rec["admin"])
    finally:
        if svc is not None:
            svc.stop()
        gw.stop()


def uploads(port):
    status, _, body = request(port, b"GET /t/ca/uploads HTTP/1.1\r\nHost: t\r\n\r\n")
    assert status == 200
    return orjson.loads(body)["uploads"]


def upload(port, head, cid):
    """POST to the service's upload endpoint (it records each correlation id it sees)."""
    with connect(port) as s:
        s.sendall(b"POST /t/ca/upload HTTP/1.1\r\n" + head + b"X-Correlation-Id: " + cid
                  + b"\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = read_response(s)
    return status, body


@pytest.mark.parametrize("head", [
    b"Host: api.example.com\r\n",
    b"Host: API.Example.COM:8443\r\n",
    b"Host: api.example.com.\r\n",
    b"Host: eu.apps.example.com\r\n",
    b"Host: [0:0::1]:8080\r\n",
])
def test_a_request_for_an_allowed_host_is_served(served, head):
    port, _ = served
    status, body = upload(port, head, b"ok-%d" % abs(hash(head)))
    assert status == 200 and orjson.loads(body)["bytes"] == 5
    status, _, body = request(port, b"GET /t/ca/whoami HTTP/1.1\r\n" + head + b"\r\n")
    host = head.split(b": ", 1)[1].strip().decode()
    assert status == 200 and orjson.loads(body)["headers"]["x-forwarded-host"] == host


@pytest.mark.parametrize("target, head", [
    (b"/t/ca/upload", b"Host: evil.test\r\n"),
    (b"/t/ca/upload", b"Host: apps.example.com\r\n"),           # only its subdomains
    (b"/t/ca/upload", b"Host: api.example.com.evil.test\r\n"),
    (b"/t/ca/upload", b"Host: [::2]\r\n"),
    (b"http://evil.test/t/ca/upload", b"Host: api.example.com\r\n"),   # its authority counts
])
def test_a_request_for_another_host_gets_421_and_reaches_no_service(served, target, head):
    port, _ = served
    cid = b"misdirected-%d" % abs(hash(target + head))
    with connect(port) as s:
        s.sendall(b"POST " + target + b" HTTP/1.1\r\n" + head + b"X-Correlation-Id: " + cid
                  + b"\r\nContent-Length: 5\r\n\r\nhello")
        status, headers, body = read_response(s)
    assert status == 421 and orjson.loads(body)["error"]["code"] == "misdirected_request"
    assert cid.decode() not in uploads(port)


def test_no_host_to_judge_is_421_but_the_built_ins_are_not_judged(served):
    port, admin = served
    # HTTP/1.0 without Host: nothing to judge.
    status, _, _ = request(port, b"GET /t/ca/whoami HTTP/1.0\r\n\r\n")
    assert status == 421
    # A balancer's health check on the client port, and the kubelet's on the admin
    # listener, name the pod's address.
    for p in (port, admin):
        status, _, _ = request(p, b"GET /health/ready HTTP/1.1\r\nHost: 10.1.2.3:8080\r\n\r\n")
        assert status == 200


def test_a_large_upload_for_another_host_is_not_read_and_its_connection_ends(served):
    # Decided on the head: the 100 MB it announces is neither read into the gateway nor
    # sent on, and the connection is let go once the answer is out (the lingering close
    # drains a little, then shuts).
    port, _ = served
    with connect(port) as s:
        s.sendall(b"POST /t/ca/upload HTTP/1.1\r\nHost: evil.test\r\n"
                  b"X-Correlation-Id: misdirected-large\r\nContent-Length: 104857600\r\n\r\n")
        assert s.recv(64).startswith(b"HTTP/1.1 421 ")
        s.settimeout(5)
        sent, chunk, ended = 0, b"x" * 65536, False
        try:
            while sent < 100 * 2**20:
                sent += s.send(chunk)
        except TimeoutError:
            pass                    # held open, unread: not let go
        except OSError:
            ended = True            # reset, or the gateway's side closed
        assert ended and sent < 32 * 2**20, sent
    assert "misdirected-large" not in uploads(port)
