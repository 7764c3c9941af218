"""Pipeline.handle without sockets: stages 4–11 in their order (stellagw/pipeline.py,
docs/design.md §2), on requests the real ingress parsed, with the worker's own router and
RoutingState, Authenticator and RateLimiter configured from settings (tests/support/sansio.py).

Why here: the pipeline has no stage folder of its own (docs/design.md §8: each stage has its
folder, pipeline.py only writes their order). What it decides itself is routing's part of
the journey — normalise and match (5), the WebSocket and body-limit checks on the matched
endpoint, select (10), dispatch with the selected endpoint's timeout (11) — and the rest it
only orders; the Authenticator and the limiter have their own unit tests in auth/ and
ratelimit/. Whole journeys over sockets are e2e/'s.

What reached the service side is read off the service link's transport (REQUEST frames),
not a stand-in's log: compiled, the pipeline types the instance's connection as
ServiceConnection, a final extension type, and refuses any other object. Each refusal test
asserts that nothing reached it.

One source (stellagw/pipeline.py): `make test` runs this module compiled and again with
STELLAGW_NO_EXTENSIONS=1.
"""
from __future__ import annotations

import time

import orjson
import pytest

from stellagw import _impl
from stellagw.transport import frame as fr

from tests.support.auth import DpopClient, SigningKey, mint_token
from tests.support.sansio import Stack, endpoint, forbid_io, install_keys

pytestmark = pytest.mark.twin   # run again uncompiled by `make test` (tests/conftest.py)


@pytest.fixture(autouse=True)
def _unit(monkeypatch):
    forbid_io(monkeypatch)       # no socket, no thread: a unit test

ISSUER = "https://authority.test"
ORIGIN = "https://gw.example.com"
SETTINGS = f"""
gateway:
  http: {{publicOrigin: "{ORIGIN}"}}
  routing: {{defaultTimeout: 7s}}
  auth: {{authority: "{ISSUER}"}}
"""
READ = [{"type": "scope", "value": "scans:read"}]
ENDPOINTS = [
    endpoint("GET", "/scans/{id}", timeout_ms=1500),
    endpoint("DELETE", "/scans/{id}"),
    endpoint("POST", "/scans", max_body_bytes=10),
    endpoint("GET", "/secure/{id}", claims=READ),
    endpoint("GET", "/bound", claims=READ, sender_constrained=True),
    endpoint("GET", "/ws", websocket=True),
]


@pytest.fixture
def key():
    return SigningKey("ES256", kid="k1")


def make(key=None, extra: str = "", endpoints=ENDPOINTS, **hello_fields):
    stack = Stack(SETTINGS + extra)
    if key is not None:
        install_keys(stack.worker.auth, key)
    svc = stack.register("scan", endpoints, **hello_fields) if endpoints else None
    return stack, svc, stack.client()


def ask(stack, client, raw: bytes):
    """One request head (and body) from the client: (what handle returned, the request,
    the responses the client got so far)."""
    before = len(stack.pipeline.handled)
    client.send(raw)
    stack.run()
    handled = stack.pipeline.handled[before:]
    assert len(handled) == 1, handled
    req, result = handled[0]
    return result, req, client.responses()


def get(path: str, *headers: bytes, method: bytes = b"GET") -> bytes:
    return (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: gw.example.com\r\n"
            + b"".join(h + b"\r\n" for h in headers) + b"\r\n")


def refused(stack, svc, client, raw, status):
    """`raw` is answered `status` by the pipeline itself; the service got nothing."""
    sent_before = svc.conn.requests_sent() if svc is not None else 0
    result, req, [(got, headers, body)] = ask(stack, client, raw)
    assert result is not None and result[0] == status == got, (result, got, body)
    error = orjson.loads(body)["error"]
    assert error["trace_id"] == req.correlation_id == headers["x-correlation-id"]
    assert req.pending is None and req.upstream is None
    if svc is not None:
        assert svc.frames() == [] and svc.conn.inflight == {}
        assert svc.conn.requests_sent() == sent_before
    return req, headers, error


# ---------------------------------------------------------------------------- 4. built-ins


def test_builtins_are_answered_before_routing():
    stack, svc, client = make()
    result, req, [(status, _, body)] = ask(stack, client, get("/health/live"))
    assert status == 200 and result[0] == 200 and orjson.loads(body) == {"status": "Healthy"}
    assert svc.frames() == [] and req.service == ""


# ---------------------------------------------------------------------------- 5. match


def test_no_route_is_404_and_another_method_405_with_allow():
    stack, svc, client = make()
    req, _, error = refused(stack, svc, client, get("/nothing/here"), 404)
    assert error["message"] == "no route for GET /nothing/here" and req.route == "unmatched"
    req, headers, _ = refused(stack, svc, client, get("/scans/1", method=b"PUT"), 405)
    # HEAD is served by GET (RFC 9110 §9.3.2), so it is allowed where GET is.
    assert sorted(headers["allow"].split(", ")) == ["DELETE", "GET", "HEAD"]
    assert req.route == "unmatched"
    _, headers, _ = refused(stack, svc, client,
                            b"PUT /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n", 405)
    assert headers["allow"] == "POST"


def test_head_is_served_by_the_get_route():
    stack, svc, client = make()
    result, req, answered = ask(stack, client, get("/scans/7", method=b"HEAD"))
    assert result is None and answered == []
    [sent] = svc.requests()
    assert (sent.method, sent.path, sent.timeout_ms) == ("HEAD", "/scans/7", 1500)
    assert req.route == "/scans/{id}"
    svc.respond(sent.corr, 200, [(b"content-type", b"text/plain")], b"seven")
    [(status, headers, body)] = client.responses(head_only=True)
    assert status == 200 and headers["content-length"] == "5"
    assert client.output() == b""                          # no body after a HEAD's head


@pytest.mark.parametrize("target", [b"/scans/%zz", b"/scans/%00", b"/scans/%ff", b"/scans/a%2"])
def test_a_path_that_cannot_be_normalised_is_400(target):
    stack, svc, client = make()
    req, _, error = refused(stack, svc, client, get(target.decode()), 400)
    assert error["message"] == "the request path is not valid" and req.route == "invalid"


def test_the_service_gets_the_normalised_path():
    stack, svc, client = make()
    result, req, _ = ask(stack, client, get("/x/../scans/./%37?full=1"))
    [sent] = svc.requests()
    assert (sent.path, sent.query) == ("/scans/7", b"full=1")
    assert req.route == "/scans/{id}" and req.service == "scan"


# ---------------------------------------------------------------------------- the matched endpoint


def test_a_websocket_upgrade_to_a_plain_endpoint_is_400_and_a_plain_request_to_a_websocket_426():
    stack, svc, client = make()
    upgrade = (b"Upgrade: websocket", b"Connection: Upgrade", b"Sec-WebSocket-Version: 13",
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
    _, _, error = refused(stack, svc, client, get("/scans/1", *upgrade), 400)
    assert "WebSocket" in error["message"]
    client = stack.client()
    _, headers, _ = refused(stack, svc, client, get("/ws"), 426)
    assert headers["upgrade"] == "websocket" and headers["connection"].lower() == "upgrade"


def test_a_body_over_the_endpoints_limit_is_413_on_the_head():
    stack, svc, client = make()
    raw = b"POST /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 11\r\n\r\n"
    _, _, error = refused(stack, svc, client, raw, 413)
    assert error["message"] == "request body larger than 10 bytes"
    # Within it, the request goes with its body (an ordinary request).
    client = stack.client()
    ask(stack, client, b"POST /scans HTTP/1.1\r\nHost: gw\r\nContent-Length: 10\r\n\r\n0123456789")
    [sent] = svc.requests()
    assert sent.body == b"0123456789" and sent.ended


def test_a_chunked_body_over_the_endpoints_limit_is_cancelled_with_payload_limit_exceeded():
    stack, svc, client = make()
    client.send(b"POST /scans HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"8\r\n01234567\r\n")
    stack.run()
    frames = svc.frames()
    [sent] = svc.requests(frames)            # no length to refuse on the head: dispatched
    body = sent.body + b"".join(fr.decode_stream_data(p)[1] for t, _, p in frames
                                if t == fr.REQUEST_STREAM_DATA)
    client.send(b"8\r\n89abcdef\r\n")        # past 10 bytes
    stack.run()
    [(status, _, _)] = client.responses()
    assert status == 413 and client.transport.ended
    frames = svc.frames()
    cancels = [(c, fr.decode_control(p)) for t, c, p in frames if t == fr.CANCEL]
    assert cancels == [(sent.corr, {"reason": fr.CANCEL_PAYLOAD_LIMIT_EXCEEDED})]
    # What reached the service: the first chunk, never the one past the limit, no end.
    assert body == b"01234567" and not sent.ended
    assert [t for t, _, _ in frames] == [fr.CANCEL]
    assert svc.conn.inflight == {}           # the link holds nothing for it


# ---------------------------------------------------------------------------- 6–8. auth


def test_no_token_where_a_claim_is_required_is_401_with_a_challenge(key):
    stack, svc, client = make(key)
    req, headers, error = refused(stack, svc, client, get("/secure/1"), 401)
    assert "DPoP" in headers["www-authenticate"] and "Bearer" in headers["www-authenticate"]
    assert req.auth.startswith("refused:")


def test_a_token_without_the_scope_is_403(key):
    stack, svc, client = make(key)
    token = mint_token(key, ISSUER, now=time.time(), scope="scans:write")
    _, _, error = refused(stack, svc, client,
                          get("/secure/1", b"Authorization: Bearer " + token.encode()), 403)
    assert error["code"] == "insufficient_scope"


def test_a_token_that_does_not_verify_is_401(key):
    stack, svc, client = make(key)
    other = SigningKey("ES256", kid="k1")                  # same kid, another key
    token = mint_token(other, ISSUER, now=time.time(), scope="scans:read")
    _, headers, error = refused(stack, svc, client,
                                get("/secure/1", b"Authorization: Bearer " + token.encode()), 401)
    assert error["code"] == "invalid_token" and "invalid_token" in headers["www-authenticate"]


def test_an_endpoint_that_needs_a_sender_constrained_token_refuses_a_bearer_one(key):
    stack, svc, client = make(key)
    token = mint_token(key, ISSUER, now=time.time(), scope="scans:read")
    auth = b"Authorization: Bearer " + token.encode()
    _, _, error = refused(stack, svc, client, get("/bound", auth), 401)
    assert "sender-constrained" in error["message"]
    # The same token where the endpoint does not ask for more: it goes through.
    ask(stack, client, get("/secure/1", auth))
    assert len(svc.requests()) == 1


def test_a_dpop_bound_request_reaches_the_service_with_the_gateways_identity_only(key):
    stack, svc, client = make(key)
    dpop = DpopClient()
    now = time.time()
    token = mint_token(key, ISSUER, now=now, scope="scans:read other", cnf={"jkt": dpop.jkt},
                       sub="user-9", client_id="cli-9", **{"stellaops:tenant": "t-9"})
    proof = dpop.proof("GET", ORIGIN + "/bound", token, now=now)
    result, req, answered = ask(stack, client, get(
        "/bound", b"Authorization: DPoP " + token.encode(), b"DPoP: " + proof.encode(),
        b"X-StellaOps-Tenant: spoofed", b"X-Stella-Actor: mallory", b"X-User-Id: mallory"))
    assert result is None and answered == []
    assert req.auth == "dpop" and req.identity.subject == "user-9" and req.tenant == "t-9"
    [sent] = svc.requests()
    h = sent.headers
    assert (h["x-stellaops-tenant"], h["x-stellaops-actor"], h["x-stellaops-client"]) == (
        "t-9", "user-9", "cli-9")
    assert h["x-stellaops-scopes"] == "other scans:read"
    assert "mallory" not in repr(sent.header_list) and "spoofed" not in repr(sent.header_list)
    assert "dpop" not in h                    # a proof is single-use and meant for us
    assert h["authorization"].startswith("DPoP ")   # kept: services may verify it again
    # The same proof again is a replay (RFC 9449 §11.1): refused, the service gets nothing.
    client = stack.client()
    _, headers, _ = refused(stack, None, client, get(
        "/bound", b"Authorization: DPoP " + token.encode(), b"DPoP: " + proof.encode()), 401)
    assert "invalid_dpop_proof" in headers["www-authenticate"]
    assert svc.frames() == []


def test_an_anonymous_request_is_not_timed_as_authentication(key):
    # The auth phase (gateway phase histogram, access log "auth") is the time a credential
    # took to check: none for an anonymous request without a credential field, whose header
    # scan counts as routing; a token's verification counts as auth, not routing.
    stack, svc, client = make(key)
    metrics = stack.worker.metrics
    auth, routing = metrics.phase_histogram("auth"), metrics.phase_histogram("routing")
    _, req, _ = ask(stack, client, get("/scans/1", b"Accept: */*"))
    assert req.auth == "anonymous" and req.auth_s == 0.0 and req.route_s > 0.0
    assert (auth.n, auth.total) == (1, 0.0) and routing.n == 1
    assert routing.total == req.route_s
    token = mint_token(key, ISSUER, now=time.time(), scope="scans:read")
    _, req, _ = ask(stack, stack.client(),
                    get("/secure/1", b"Authorization: Bearer " + token.encode()))
    assert req.auth == "bearer" and req.auth_s > 0.0 and req.route_s > 0.0
    assert (auth.n, auth.total) == (2, req.auth_s) and routing.n == 2
    assert len(svc.requests()) == 2


def test_an_anonymous_request_carries_the_anonymous_identity_not_the_clients():
    stack, svc, client = make()
    ask(stack, client, get("/scans/1", b"X-StellaOps-Tenant: spoofed", b"X-StellaOps-Actor: root"))
    [sent] = svc.requests()
    assert sent.headers["x-stellaops-actor"] == "anonymous"
    assert "x-stellaops-tenant" not in sent.headers and "root" not in repr(sent.header_list)


# ---------------------------------------------------------------------------- 9. rate limit


def test_past_the_limit_is_429_with_its_headers():
    stack, svc, client = make(extra="""
rate_limiting:
  for_instance:
    rules: [{max_requests: 2, per_seconds: 60}]
""")
    for i in range(2):
        ask(stack, client, get(f"/scans/{i}"))
        [sent] = svc.requests()
        svc.respond(sent.corr, 200, (), b"ok")
        [(status, headers, _)] = client.responses()
        assert status == 200 and headers["x-ratelimit-limit"] == "2"
        assert headers["x-ratelimit-remaining"] == str(1 - i)
    _, headers, error = refused(stack, svc, client, get("/scans/3"), 429)
    assert error["code"] == "rate_limit_exceeded" and error["limit"] == 2
    assert error["appliesTo"] == "identity"
    assert 1 <= int(headers["retry-after"]) <= 60
    assert headers["x-ratelimit-limit"] == "2" and headers["x-ratelimit-remaining"] == "0"
    assert headers["x-ratelimit-policy"].startswith("2;w=60")
    assert "x-ratelimit-reset" in headers


def test_a_refused_identity_is_not_counted_against_the_limit(key):
    # Authentication (6) runs before the rate limit (9): refusals spend nothing.
    stack, svc, client = make(key, extra="""
rate_limiting:
  for_instance:
    rules: [{max_requests: 1, per_seconds: 60}]
""")
    for _ in range(3):
        refused(stack, svc, stack.client(), get("/secure/1"), 401)
    ask(stack, client, get("/scans/1"))
    assert len(svc.requests()) == 1


# ---------------------------------------------------------------------------- 10–11. select, dispatch


def test_a_known_service_without_an_instance_is_503_with_retry_after():
    stack, svc, client = make()
    svc.lose()
    stack.run()
    _, headers, error = refused(stack, None, client, get("/scans/1"), 503)
    assert headers["retry-after"] == "5" and error["message"] == "no healthy instance of scan"


def test_a_version_pin_nobody_serves_is_503_naming_it():
    stack, svc, client = make(version="1.4.0")
    _, headers, error = refused(stack, svc, client, get("/scans/1", b"X-Service-Version: 2.0.0"), 503)
    assert error["message"] == "no healthy instance of scan 2.0.0" and headers["retry-after"]
    ask(stack, client, get("/scans/1", b"X-Service-Version: 1.4.0"))
    assert len(svc.requests()) == 1


def test_version_pins_nobody_serves_are_not_remembered():
    # The client chooses X-Service-Version: 500 different pins are 500 refusals that leave
    # nothing behind (the route's ranking cache held one entry per value, without bound).
    stack, svc, client = make(version="1.4.0")
    ask(stack, client, get("/scans/1", b"X-Service-Version: 1.4.0"))
    [sent] = svc.requests()
    svc.respond(sent.corr, 200, (), b"ok")
    assert [s for s, _, _ in client.responses()] == [200]
    route = stack.worker.routing.router.match("GET", "/scans/1")[1]
    cached = dict(route._cache)
    for i in range(500):
        refused(stack, svc, stack.client(),
                get("/scans/1", b"X-Service-Version: 9.%d.0-%s" % (i, b"x" * 64)), 503)
    assert route._cache == cached and "1.4.0" in cached
    ask(stack, client, get("/scans/1", b"X-Service-Version: 1.4.0"))
    assert len(svc.requests()) == 1       # the version it has is served as before


def test_a_request_reaches_the_selected_instance_with_its_endpoint_and_timeout():
    stack, old, client = make(version="1.0.0", instance_id="scan-old")
    new = stack.register("scan", [endpoint("GET", "/scans/{id}", timeout_ms=900)],
                         version="2.0.0", instance_id="scan-new")
    ask(stack, client, get("/scans/1", b"X-Service-Version: 2.0.0"))
    assert old.frames() == []
    [sent] = new.requests()
    assert sent.timeout_ms == 900                      # the selected instance's endpoint
    new.respond(sent.corr, 200, (), b"new")
    ask(stack, client, get("/scans/2", b"X-Service-Version: 1.0.0"))
    assert new.frames() == []
    [sent] = old.requests()
    assert sent.timeout_ms == 1500
    old.respond(sent.corr, 200, (), b"old")
    # No timeout of its own: routing.defaultTimeout.
    ask(stack, client, get("/scans/3", method=b"DELETE"))
    [sent] = old.requests()
    assert (sent.method, sent.timeout_ms) == ("DELETE", 7000)
    [(req, _)] = stack.pipeline.handled[-1:]
    assert req.upstream is old.conn.instance and req.pending.endpoint.timeout is None


def test_compiled_where_the_glue_is():
    assert _impl.compiled("stellagw.pipeline") is not _impl.NO_EXTENSIONS
