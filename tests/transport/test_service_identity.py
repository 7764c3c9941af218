"""Who may register what (docs/service-identity.md): a peer claiming another's service name
is answered HELLO_ACK Forbidden, nothing is registered and the original keeps its traffic;
TLS certificates map to service names; on TCP a registration secret (HMAC, fresh, once) or
loopback peers only. Real sockets, real SDK services and raw frame peers."""
from __future__ import annotations

import copy
import hashlib
import socket
import ssl
import time

import orjson
import pytest

from stellagw.config import ConfigError, load_config_text
from stellagw.service import Response, Service
from stellagw.transport import frame as fr
from stellagw.transport.identity import (
    RegistrationPolicy, certificate_names, is_loopback, registration_key, sign_hello,
)

from tests.support.gwtest import (GatewayThread, NullLog, Pki, Served, is_closed, port_of, request,
                                  settings_from, wait_for)
from tests.support.servicepeer import RawPeer, SdkThread, hello_for

SECRET = "registration-secret-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))


def gateway(transports: dict, log=None) -> GatewayThread:
    return GatewayThread(settings_from(orjson.dumps({"gateway": {
        "http": {"port": 0}, "admin": {"publicEndpoints": ["all"]},
        "transports": transports}}).decode()), log=log).start()


def whoami(svc: Service, path: str) -> Service:
    @svc.get(path)
    async def who(req):
        return Response(svc.instance_id.encode())
    return svc


def get(gw, path):
    return request(gw.port, b"GET %s HTTP/1.1\r\nHost: gw\r\n\r\n" % path.encode())


def registered(gw, service) -> set:
    return gw.call(lambda: {i.instance_id for i in gw.worker.routing.instances.values()
                            if i.service == service})


def metrics(gw) -> str:
    return gw.call(gw.worker.render_metrics).decode()


def refusals(log: NullLog) -> list[dict]:
    return [r for r in map(orjson.loads, log.lines())
            if r.get("message") == "service registration refused"]


# ---------------------------------------------------------------------------- tcp + secret

def test_a_peer_claiming_a_running_service_is_forbidden_and_the_original_keeps_its_traffic():
    log = NullLog()
    gw = gateway({"tcp": {"port": 0, "registrationSecret": SECRET}}, log=log.log)
    owner = SdkThread(whoami(Service("ledger", "1.0.0", gateways=[f"127.0.0.1:{gw.transport_port}"],
                                     instance_id="ledger-owner",
                                     registration_key=registration_key(SECRET, "ledger")),
                             "/t/ledger/who")).start()
    try:
        assert get(gw, "/t/ledger/who")[2] == b"ledger-owner"
        # A higher version would take all of ledger's traffic: signed with the key of the
        # service the intruder does hold, unsigned, and signed for another name.
        claim = hello_for("ledger", "9.0.0", [("GET", "/t/ledger/who")], instance_id="intruder")
        attempts = [
            ("bad_signature", sign_hello(copy.deepcopy(claim), registration_key(SECRET, "intruder"))),
            ("no_signature", claim),
            ("bad_signature", dict(sign_hello(hello_for("intruder", instance_id="intruder"),
                                              registration_key(SECRET, "intruder")),
                                   service="ledger", version="9.0.0",
                                   endpoints=claim["endpoints"])),
        ]
        for reason, hello in attempts:
            peer = RawPeer(gw.transport_port)
            ack = peer.hello(hello)
            assert ack["error"]["code"] == "Forbidden", ack
            peer.wait_closed()
            peer.close()
        assert registered(gw, "ledger") == {"ledger-owner"}
        assert {get(gw, "/t/ledger/who")[2] for _ in range(10)} == {b"ledger-owner"}
        refused = refusals(log)
        assert [(r["service"], r["reason"], r["code"]) for r in refused] == [
            ("ledger", reason, "Forbidden") for reason, _ in attempts]
        assert all(r["peer"].startswith("127.0.0.1:") and r["detail"] for r in refused)
        text = metrics(gw)
        assert 'gateway_service_registrations_refused_total{reason="bad_signature"} 2.0' in text
        assert 'gateway_service_registrations_refused_total{reason="no_signature"} 1.0' in text
        assert 'gateway_service_links_closed_total{reason="refused"} 3.0' in text
    finally:
        owner.stop()
        gw.stop()


def test_hmac_right_wrong_stale_and_replayed():
    gw = gateway({"tcp": {"port": 0, "registrationSecret": SECRET,
                          "registrationMaxClockSkew": "30s"}})
    key = registration_key(SECRET, "billing")
    try:
        signed = sign_hello(hello_for("billing", instance_id="billing-1"), key)
        first = RawPeer(gw.transport_port)
        assert "error" not in first.hello(signed)
        assert registered(gw, "billing") == {"billing-1"}

        def refused(hello):
            peer = RawPeer(gw.transport_port)
            try:
                ack = peer.hello(hello)
                peer.wait_closed()
                return ack["error"]["code"], ack["error"]["message"]
            finally:
                peer.close()

        # The same signed HELLO again, while the first link is up and after it is gone.
        assert refused(signed)[0] == "Forbidden"
        first.close()
        assert wait_for(lambda: not registered(gw, "billing"))
        assert refused(signed)[0] == "Forbidden"
        # The wrong secret; a field changed after signing; a signature from 10 minutes ago.
        assert refused(sign_hello(hello_for("billing"), registration_key("x" * 32, "billing")))[0] == "Forbidden"
        tampered = sign_hello(hello_for("billing", instance_id="billing-2"), key)
        tampered["instance_id"] = "billing-3"
        assert refused(tampered)[0] == "Forbidden"
        code, message = refused(sign_hello(hello_for("billing"), key,
                                           now_ms=int(time.time() * 1000) - 600_000))
        assert code == "Forbidden" and "registrationMaxClockSkew" in message
        assert not registered(gw, "billing")
        reasons = gw.call(lambda: dict(gw.worker.hub.refused))
        assert reasons == {"replayed_signature": 2, "bad_signature": 2, "stale_signature": 1}

        # The SDK signs each link's HELLO itself, from the secret or from its own key.
        url = [f"127.0.0.1:{gw.transport_port}"]
        for kw in ({"registration_secret": SECRET}, {"registration_key": key}):
            svc = SdkThread(whoami(Service("billing", gateways=url, **kw), "/t/billing/who")).start()
            try:
                assert get(gw, "/t/billing/who")[0] == 200
            finally:
                svc.stop()
        wrong = SdkThread(whoami(Service("billing", gateways=url, registration_secret="y" * 32,
                                         reconnect_min=0.05, reconnect_max=0.1),
                                 "/t/billing/who")).start(wait=False)
        try:
            assert wait_for(lambda: gw.call(lambda: gw.worker.hub.refused["bad_signature"]) >= 4)
            assert wrong.links() == 0 and not registered(gw, "billing")
        finally:
            wrong.stop()
    finally:
        gw.stop()


def test_a_signature_that_is_not_ascii_is_refused_like_any_wrong_one(tmp_path):
    """docs/security.md §3d row 56: a `mac` with a non-ASCII character made
    hmac.compare_digest raise; the link ended unanswered, logged as a fatal transport error
    with its traceback. It is a bad signature, and a signed SDK service still registers."""
    gw = Served(config_text=f"""
gateway:
  node: {{workers: 1, preStopDelay: 0s}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0, registrationSecret: "{SECRET}"}}}}
""", tmp_path=tmp_path)
    try:
        rec = gw.wait_listening()[0]
        tcp, http = port_of(rec["tcp"]), port_of(rec["http"])
        for mac in ("\u00e9" * 64, "0" * 63 + "\u0660"):
            peer = RawPeer(tcp)
            try:
                ack = peer.hello(hello_for("billing", endpoints=[("GET", "/t/billing/who")],
                                           auth={"ts": int(time.time() * 1000),
                                                 "nonce": "n" * 16, "mac": mac}))
                assert ack["error"]["code"] == "Forbidden", ack
                assert "`auth` must be" in ack["error"]["message"]
                peer.wait_closed()
            finally:
                peer.close()
        url = [f"127.0.0.1:{tcp}"]
        svc = SdkThread(whoami(Service("billing", gateways=url, registration_secret=SECRET),
                               "/t/billing/who")).start()
        try:
            status, _, body = request(http, b"GET /t/billing/who HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert status == 200 and b"billing" in body, body
        finally:
            svc.stop()
    finally:
        assert gw.stop() == 0
    assert not [line for line in gw.lines if b"Fatal error" in line or b"Traceback" in line]

def test_a_signed_hello_is_accepted_once_by_the_whole_instance(tmp_path):
    """Replayed to another worker of the same instance (its private port), a signed HELLO is
    refused too: the workers share the instance's replay table."""
    gw = Served(config_text=f"""
gateway:
  node: {{workers: 2}}
  http: {{port: 0}}
  transports: {{tcp: {{port: 0, registrationSecret: "{SECRET}"}}}}
""", tmp_path=tmp_path)
    try:
        tcp = port_of(gw.wait_listening(2)[0]["tcp"])
        hello = sign_hello(hello_for("multi"), registration_key(SECRET, "multi"))
        first = RawPeer(tcp)
        ack = first.hello(hello)
        assert "error" not in ack and len(ack["workers"]) == 2, ack
        [other] = [w for w in ack["workers"] if w["worker_id"] != ack["worker_id"]]
        second = RawPeer(other["port"])
        refused = second.hello(hello)
        assert refused["error"]["code"] == "Forbidden", refused
        assert "used before" in refused["error"]["message"]
        # The SDK's own HELLO to that worker (fresh nonce) is accepted.
        fresh = RawPeer(other["port"])
        assert "error" not in fresh.hello(sign_hello(hello_for("multi"),
                                                     registration_key(SECRET, "multi")))
        for peer in (first, second, fresh):
            peer.close()
    finally:
        assert gw.stop() == 0


def test_sdk_reads_its_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("STELLAGW_REGISTRATION_SECRET", SECRET)
    hello = Service("envsvc").hello()
    policy = RegistrationPolicy("tcp", _node(registration_secret=SECRET), _Replay())
    assert policy.check(hello, None, ("10.0.0.9", 1)) is None
    monkeypatch.setenv("STELLAGW_REGISTRATION_KEY", registration_key(SECRET, "other"))
    assert policy.check(Service("envsvc").hello(), None, ("10.0.0.9", 1))[0] == "bad_signature"
    with pytest.raises(ValueError):
        Service("envsvc", registration_key="not-hex")


# ---------------------------------------------------------------------------- tcp, no secret

class _FakeTransport:
    """Stands in for a connection from a non-loopback address (tests dial loopback only)."""

    def __init__(self, peer):
        self.peer = peer
        self.written = bytearray()
        self.closed = False

    def get_extra_info(self, name, default=None):
        return self.peer if name == "peername" else default

    def write(self, data):
        self.written += data

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def close(self):
        self.closed = True

    abort = close


def test_without_a_secret_only_loopback_peers_register_over_tcp():
    log = NullLog()
    gw = gateway({"tcp": {"port": 0}}, log=log.log)
    try:
        peer = RawPeer(gw.transport_port)
        assert "error" not in peer.hello(hello_for("local", instance_id="local-1"))
        assert registered(gw, "local") == {"local-1"}

        # The same HELLO from 10.1.2.3, through the real connection and hub.
        def remote():
            hub = gw.worker.hub
            conn = hub._accept(hub._listeners[0])
            transport = _FakeTransport(("10.1.2.3", 40000))
            conn.connection_made(transport)
            enc = fr.FrameEncoder()
            enc.control(fr.HELLO, fr.ZERO_CORR, hello_for("local", "2.0.0", instance_id="remote-1"))
            conn.data_received(enc.take())
            conn.connection_lost(None)
            return transport
        transport = gw.call(remote)
        dec = fr.FrameDecoder()
        dec.feed(bytes(transport.written))
        ftype, _, payload = dec.next()
        ack = fr.decode_control(payload)
        assert ftype == fr.HELLO_ACK and ack["error"]["code"] == "Forbidden", ack
        assert "loopback" in ack["error"]["message"] and transport.closed
        assert registered(gw, "local") == {"local-1"}
        [line] = refusals(log)
        assert (line["peer"], line["service"], line["reason"]) == ("10.1.2.3:40000", "local",
                                                                  "not_loopback")
        peer.close()
    finally:
        gw.stop()


def test_loopback_addresses():
    assert is_loopback(("127.0.0.1", 1)) and is_loopback(("127.3.4.5", 1))
    assert is_loopback(("::1", 1, 0, 0)) and is_loopback(("::ffff:127.0.0.1", 1, 0, 0))
    assert not is_loopback(("10.0.0.1", 1)) and not is_loopback(("::ffff:10.0.0.1", 1, 0, 0))
    assert not is_loopback(None) and not is_loopback("/run/x.sock")


# ---------------------------------------------------------------------------- tls

def _tls(pki, identities=None, **extra):
    tls = {"enabled": True, "port": 0, "certificatePath": pki.server_cert,
           "keyPath": pki.server_key, "clientCaPath": pki.ca_path,
           "clientCertificateMode": "RequireCertificate", **extra}
    if identities is not None:
        tls["serviceIdentities"] = identities
    return {"tcp": {"enabled": False}, "tls": tls}


def _client(pki, cert, key):
    ctx = ssl.create_default_context(cafile=pki.ca_path)
    ctx.load_cert_chain(cert, key)
    return ctx


def test_tls_certificates_name_the_services_they_may_register(pki):
    other = hashlib.sha256(pki.other_cert_der).hexdigest()
    gw = gateway(_tls(pki, {"cn:client-1": ["trusted", "team-*"],
                            # written as a certificate viewer prints it
                            "sha256:" + ":".join(other[i:i + 2].upper() for i in range(0, 64, 2)):
                                ["other"]}))
    port = gw.worker.transport_addresses["tls"][1]
    one, two = (_client(pki, pki.client_cert, pki.client_key),
                _client(pki, pki.other_cert, pki.other_key))

    def ack(ctx, service):
        peer = RawPeer(port, ssl_ctx=ctx)
        try:
            return peer.hello(hello_for(service, endpoints=[("GET", f"/t/{service}/who")]))
        finally:
            peer.close()
    try:
        for ctx, service, allowed in ((one, "trusted", True), (one, "team-a", True),
                                      (one, "teamx", False), (one, "other", False),
                                      (two, "other", True), (two, "trusted", False)):
            result = ack(ctx, service)
            assert ("error" not in result) == allowed, (service, result)
            if not allowed:
                assert result["error"]["code"] == "Forbidden"
                assert "serviceIdentities" in result["error"]["message"]
        assert gw.call(lambda: gw.worker.hub.refused) == {"certificate_not_allowed": 3}
        # The SDK over TLS, allowed, serves; the refused names route nowhere.
        svc = SdkThread(whoami(Service("team-b", gateways=[f"127.0.0.1:{port}"], ssl=one,
                                       server_hostname="localhost"), "/t/team-b/who")).start()
        try:
            assert get(gw, "/t/team-b/who")[0] == 200
        finally:
            svc.stop()
        assert get(gw, "/t/teamx/who")[0] == 404
    finally:
        gw.stop()


def test_tls_without_identities_admits_any_verified_certificate(pki):
    gw = gateway(_tls(pki))
    port = gw.worker.transport_addresses["tls"][1]
    try:
        peer = RawPeer(port, ssl_ctx=_client(pki, pki.other_cert, pki.other_key))
        assert "error" not in peer.hello(hello_for("anything"))
        peer.close()
    finally:
        gw.stop()


class _SslObject:
    def __init__(self, cert, der):
        self.cert, self.der = cert, der

    def getpeercert(self, binary_form=False):
        return self.der if binary_form else self.cert


class _TlsTransport:
    def __init__(self, cert, der):
        self.ssl = _SslObject(cert, der)

    def get_extra_info(self, name, default=None):
        return self.ssl if name == "ssl_object" else default


class _Replay:
    def __init__(self):
        self.seen = set()

    def check_and_store(self, key, ttl_ms):
        fresh = key not in self.seen
        self.seen.add(key)
        return fresh


def _node(**kw):
    from stellagw.config import TlsTransportSettings
    return TlsTransportSettings(**kw)


def test_certificate_names_and_patterns():
    cert = {"subject": ((("countryName", "EU"),), (("commonName", "scanner"),)),
            "subjectAltName": (("DNS", "Scanner.StellaOps.svc"), ("IP Address", "10.0.0.1"))}
    der = b"certificate"
    thumb = hashlib.sha256(der).hexdigest()
    assert certificate_names(cert, der) == ["cn:scanner", "dns:scanner.stellaops.svc",
                                            "sha256:" + thumb]
    transport = _TlsTransport(cert, der)

    def allowed(identities, service):
        policy = RegistrationPolicy("tls", _node(service_identities=identities), _Replay())
        return policy.check({"service": service}, transport, ("10.0.0.2", 1)) is None
    assert allowed({"dns:scanner.stellaops.svc": ("scanner",)}, "scanner")
    assert allowed({"cn:scanner": ("scan*",)}, "scanner-eu")
    assert not allowed({"cn:scanner": ("scan*",)}, "policy")
    assert not allowed({"cn:scanner": ("scan.er",)}, "scanner")    # '.' is a character
    assert allowed({"sha256:" + thumb: ("*",)}, "anything")
    assert not allowed({"cn:Scanner": ("*",)}, "scanner")          # exact names
    assert not allowed({"cn:scanner": ("scanner",)}, ["scanner"])  # not a name at all
    # No certificate at all, and one the handshake did not verify.
    for no_cert in (_TlsTransport(None, None), _TlsTransport({}, der)):
        policy = RegistrationPolicy("tls", _node(service_identities={"cn:scanner": ("*",)}),
                                    _Replay())
        assert policy.check({"service": "scanner"}, no_cert, ("127.0.0.1", 1))[0] == "no_certificate"
    # Without identities: a verified certificate, or loopback.
    open_tls = RegistrationPolicy("tls", _node(), _Replay())
    assert open_tls.check({"service": "x"}, transport, ("10.0.0.2", 1)) is None
    assert open_tls.check({"service": "x"}, _TlsTransport(None, None), ("127.0.0.1", 1)) is None
    assert open_tls.check({"service": "x"}, _TlsTransport(None, None),
                          ("10.0.0.2", 1))[0] == "no_certificate"


def test_certificate_and_secret_together_must_both_hold():
    cert, der = {"subject": ((("commonName", "svc"),),)}, b"der"
    policy = RegistrationPolicy("tls", _node(service_identities={"cn:svc": ("svc",)},
                                             registration_secret=SECRET), _Replay())
    transport = _TlsTransport(cert, der)
    assert policy.check(hello_for("svc"), transport, ("10.0.0.2", 1))[0] == "no_signature"
    assert policy.check(sign_hello(hello_for("svc"), registration_key(SECRET, "svc")),
                        transport, ("10.0.0.2", 1)) is None


# ---------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("transports, path, words", [
    ({"tcp": {"registrationSecret": "short"}}, "gateway.transports.tcp.registrationSecret",
     ["32 characters"]),
    ({"tcp": {"registrationMaxClockSkew": "0s"}},
     "gateway.transports.tcp.registrationMaxClockSkew", ["greater than 0"]),
    ({"tls": {"serviceIdentities": {"uri:spiffe://x": ["a"]}}},
     "gateway.transports.tls.serviceIdentities.uri:spiffe://x", ["cn:", "dns:", "sha256:"]),
    ({"tls": {"serviceIdentities": {"sha256:abcd": ["a"]}}},
     "gateway.transports.tls.serviceIdentities.sha256:abcd", ["64 hex"]),
    ({"tls": {"serviceIdentities": {"cn:a": ["bad name"]}}},
     "gateway.transports.tls.serviceIdentities.cn:a[0]", ["service name pattern"]),
    ({"tls": {"serviceIdentities": {"cn:a": []}}},
     "gateway.transports.tls.serviceIdentities.cn:a", ["at least one"]),
    ({"tls": {"serviceIdentities": {"dns:A.svc": ["a"], "dns:a.svc": ["b"]}}},
     "gateway.transports.tls.serviceIdentities.dns:a.svc", ["same certificate name"]),
    ({"tls": {"enabled": True, "certificatePath": "c.pem", "keyPath": "k.pem",
              "clientCertificateMode": "RequireCertificate",
              "serviceIdentities": {"cn:a": ["a"]}}},
     "gateway.transports.tls.serviceIdentities", ["clientCaPath"]),
    ({"tcp": {"writeBufferHighWater": "2MB", "writeBufferLimit": "1MB"}},
     "gateway.transports.tcp.writeBufferLimit", ["writeBufferHighWater"]),
])
def test_bad_identity_configuration_names_the_key(transports, path, words):
    with pytest.raises(ConfigError) as info:
        load_config_text(orjson.dumps({"gateway": {"transports": transports}}).decode(), env={})
    assert info.value.path == path, info.value
    assert all(w in info.value.reason for w in words), info.value.reason


def test_identity_configuration_is_normalised_and_round_trips():
    from stellagw.config import dump_effective
    text = orjson.dumps({"gateway": {"transports": {"tls": {"serviceIdentities": {
        "sha256:" + "AB:" * 31 + "AB": ["scanner"], "DNS:Policy.SVC": ["policy", "policy-*"],
        "cn:reports": "${REPORT_SERVICES}"}}}}}).decode()
    s = load_config_text(text, env={"REPORT_SERVICES": "reports,reports-*"})
    ids = s.gateway.transports.tls.service_identities
    assert dict(ids) == {"sha256:" + "ab" * 32: ("scanner",), "dns:policy.svc": ("policy", "policy-*"),
                         "cn:reports": ("reports", "reports-*")}
    assert load_config_text(dump_effective(s), env={}) == s
    secret = load_config_text(f'gateway: {{transports: {{tcp: {{registrationSecret: "{SECRET}"}}}}}}',
                              env={})
    assert SECRET not in dump_effective(secret)


def _counter(admin, name) -> dict:
    _, _, body = request(admin, b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    out = {}
    for line in body.decode().splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            out[labels.split('reason="')[1].split('"')[0]] = float(value)
    return out


def test_tls_links_in_their_handshake_count_against_max_connections(tmp_path, pki):
    """docs/security.md §3d row 58: the TLS listener's handshakes were uvloop's, outside
    maxConnections, so any peer held descriptors in them (7,300 within 2 s, 10 s each) and
    made each fail as expensively as it liked. Now they count, the next is reset at accept;
    an address failing 4 handshakes in a second is reset for the rest of it. A service
    with its certificate still registers, and is reached."""
    (tmp_path / "foreign").mkdir()
    foreign = Pki(tmp_path / "foreign")         # a CA the gateway does not trust
    transports = _tls(pki, maxConnections=3)
    gw = Served(config_text=orjson.dumps({"gateway": {
        "node": {"workers": 1, "preStopDelay": "0s"}, "http": {"port": 0},
        "transports": transports}}).decode(), tmp_path=tmp_path)
    held = []
    try:
        rec = gw.wait_listening()[0]
        port, http, admin = port_of(rec["tls"]), port_of(rec["http"]), port_of(rec["admin"])

        def silent(source="127.0.0.1"):
            sock = socket.socket()
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            return sock
        held += [silent(), silent(), silent()]
        time.sleep(0.3)
        extra = silent("127.0.0.3")
        held.append(extra)
        assert is_closed(extra, 2)                  # reset at once, not at HELLO_TIMEOUT
        for sock in held[:3]:
            assert not is_closed(sock, 0.05)
            sock.close()
        assert wait_for(lambda: _counter(admin, "gateway_service_links_closed_total").get(
            "tls_handshake_limit") == 1, 5)

        bad = _client(pki, foreign.client_cert, foreign.client_key)
        for _ in range(10):
            try:
                RawPeer(port, ssl_ctx=bad, timeout=2).hello(hello_for("x"))
            except (ssl.SSLError, OSError, AssertionError):
                pass
        assert wait_for(lambda: _counter(admin, "gateway_service_links_closed_total").get(
            "tls_handshake_failures", 0) >= 2, 5)

        time.sleep(1.1)                             # the address's second is over
        svc = SdkThread(whoami(Service("team-b", gateways=[f"127.0.0.1:{port}"],
                                       ssl=_client(pki, pki.client_cert, pki.client_key),
                                       server_hostname="localhost"), "/t/team-b/who")).start()
        try:
            status, _, body = request(http, b"GET /t/team-b/who HTTP/1.1\r\nHost: gw\r\n\r\n")
            assert status == 200 and body == svc.service.instance_id.encode(), body
        finally:
            svc.stop()
    finally:
        for sock in held:
            sock.close()
        assert gw.stop() == 0
