"""Identity headers (docs/original-router.md §7), the anonymous identity, the scope-override header,
and endpoint RequiringClaims (docs/design.md §2 stages 7–8)."""
from __future__ import annotations

import pytest

from stellagw.auth import AuthFailure, Identity, strip_identity_headers

from tests.support.auth import (ISSUER_PLACEHOLDER, FakeRequest, SigningKey, bearer_request,
                                make_authenticator, mint_token)

ISS = ISSUER_PLACEHOLDER


@pytest.fixture(scope="module")
def key():
    return SigningKey("ES256", kid="k1")


@pytest.fixture
def auth(tmp_path, key):
    return make_authenticator(tmp_path, [key])


def ok(result) -> Identity:
    assert isinstance(result, Identity), result
    return result


def refused(result, status, code, reason=None) -> AuthFailure:
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.code) == (status, code), result
    if reason:
        assert result.reason == reason
    return result


# ---------------------------------------------------------------------- strip

SPOOFED = [
    (b"x-stellaops-tenant", b"victim"), (b"x-stella-tenant", b"victim"),
    (b"x-stellaops-actor", b"admin"), (b"x-stellaops-scopes", b"admin"),
    (b"x-stellaops-project", b"p"), (b"x-stellaops-identity-envelope", b"e"),
    (b"x_stellaops_tenant", b"victim"), (b"x_stella_actor", b"admin"),
    (b"sub", b"admin"), (b"tid", b"victim"), (b"scope", b"admin"), (b"scp", b"admin"),
    (b"cnf", b"x"), (b"x-tenant-id", b"victim"), (b"x_tenant_id", b"victim"),
    (b"x-user-id", b"admin"), (b"x-client-cert", b"pem"), (b"x-forwarded-client-cert", b"pem"),
    (b"x-forwarded-for", b"10.0.0.1"), (b"forwarded", b"for=1.2.3.4"), (b"dpop", b"proof"),
    (b"proxy-authorization", b"x"),
]
KEPT = [(b"host", b"gw"), (b"accept", b"*/*"), (b"authorization", b"Bearer t"),
        (b"x-correlation-id", b"c"), (b"x-stellar", b"kept"), (b"subject", b"kept"),
        (b"content-type", b"application/json")]


def test_strip_removes_every_client_identity_header():
    assert strip_identity_headers(SPOOFED + KEPT) == KEPT
    assert strip_identity_headers(KEPT) == KEPT


def test_spoofed_tenant_is_replaced_by_the_tokens(auth, key):
    req = bearer_request(mint_token(key, ISS, **{"stellaops:tenant": "real"}),
                         extra=[(b"x-stellaops-tenant", b"victim")])
    identity = ok(auth.authenticate(req, ()))
    forwarded = strip_identity_headers(req.headers) + identity.headers()
    tenants = [v for n, v in forwarded if n in (b"x-stellaops-tenant", b"x-stella-tenant")]
    assert tenants == [b"real", b"real"]
    assert req.tenant == "real"


# ---------------------------------------------------------------------- overwrite

def test_identity_headers_from_claims(auth, key):
    token = mint_token(key, ISS, sub="alice", client_id="app", scope="b a",
                       scp=["c", "a"], **{"stellaops:tenant": "t1", "tid": "legacy"})
    identity = ok(auth.authenticate(bearer_request(token), ()))
    assert identity.headers() == [
        (b"x-stellaops-tenant", b"t1"), (b"x-stellaops-actor", b"alice"),
        (b"x-stellaops-scopes", b"a b c"), (b"x-stellaops-client", b"app"),
        (b"x-stella-tenant", b"t1"), (b"x-stella-actor", b"alice"),
        (b"x-stella-scopes", b"a b c"), (b"x-stella-client", b"app")]
    assert identity.scopes == {"a", "b", "c"}
    identity.headers().append((b"x", b"y"))          # a copy: the cached identity is untouched
    assert len(identity.headers()) == 8


def test_tenant_falls_back_to_tid_and_actor_to_client_id(auth, key):
    token = mint_token(key, ISS, tid="legacy-t", drop=("stellaops:tenant", "sub"))
    identity = ok(auth.authenticate(bearer_request(token), ()))
    assert identity.tenant == "legacy-t" and identity.subject == "cli-1"
    assert (b"x-stellaops-actor", b"cli-1") in identity.headers()


def test_no_tenant_claim_no_tenant_header(auth, key):
    identity = ok(auth.authenticate(bearer_request(mint_token(key, ISS, drop=("stellaops:tenant",))), ()))
    assert identity.tenant is None
    assert not [n for n, _ in identity.headers() if n.endswith(b"tenant")]


def test_legacy_headers_can_be_turned_off(tmp_path, key):
    auth = make_authenticator(tmp_path, [key], "enableLegacyHeaders: false")
    identity = ok(auth.authenticate(bearer_request(mint_token(key, ISS)), ()))
    assert all(n.startswith(b"x-stellaops-") for n, _ in identity.headers())
    assert all(n.startswith(b"x-stellaops-") for n, _ in auth.authenticate(FakeRequest(), ()).headers())


@pytest.mark.parametrize("claims", [{"sub": "a\r\nx-stellaops-tenant: evil"}, {"stellaops:tenant": "t\n"},
                                    {"scope": "a\x00b"}, {"scope": "a\tb"}, {"scp": "x\r"}, {"scp": ["a", "b\n"]},
                                    {"tid": 5, "stellaops:tenant": None}, {"client_id": ""},
                                    {"scope": ["list"]}, {"scp": [1, 2]},
                                    # C1 controls and invisible text-direction or line
                                    # characters reached services as identity (a probe)
                                    {"stellaops:tenant": "t\u0085"}, {"sub": "u\u009b1m"},
                                    {"sub": "admin\u202enimda"}, {"stellaops:tenant": "t\u2028x"},
                                    {"sub": "\ufeffroot"}, {"scope": "a\u200bb"},
                                    # lone surrogates (a JSON escape): 500s (a probe)
                                    {"sub": "\ud800"}, {"stellaops:tenant": "t\udfff"}])
def test_claims_that_cannot_be_forwarded_are_refused(auth, key, claims):
    result = auth.authenticate(bearer_request(mint_token(key, ISS, **claims)), ())
    refused(result, 401, "invalid_token", "token_claims")


# ---------------------------------------------------------------------- anonymous

def test_anonymous_identity(auth):
    identity = ok(auth.authenticate(FakeRequest(headers=[(b"x-stellaops-tenant", b"victim")]), ()))
    assert identity.anonymous and identity.subject == "anonymous" and identity.tenant is None
    assert identity.headers() == [(b"x-stellaops-actor", b"anonymous"),
                                  (b"x-stella-actor", b"anonymous")]
    assert identity.binding is None and identity.scopes == frozenset()


def test_anonymous_only_where_no_claims_are_required(auth):
    failure = refused(auth.authenticate(FakeRequest(), (("scope", "read"),)), 401, "unauthorized",
                      "missing_token")
    assert b"error=" not in failure.headers


def test_required_means_a_token_everywhere(tmp_path, key):
    auth = make_authenticator(tmp_path, [key], "required: true")
    refused(auth.authenticate(FakeRequest(), ()), 401, "unauthorized", "missing_token")
    ok(auth.authenticate(bearer_request(mint_token(key, ISS)), ()))


def test_a_bad_token_is_never_downgraded_to_anonymous(auth, key):
    refused(auth.authenticate(bearer_request(mint_token(key, "https://other")), ()), 401,
            "invalid_token")


# ---------------------------------------------------------------------- scope-override header

@pytest.mark.parametrize("name", [b"x-stellaops-scopes", b"x-stella-scopes", b"x_stellaops_scopes"])
def test_scope_header_forbidden_by_default(auth, key, name):
    req = bearer_request(mint_token(key, ISS), extra=[(name, b"admin")])
    refused(auth.authenticate(req, ()), 403, "scope_header_forbidden", "scope_header")
    refused(auth.authenticate(FakeRequest(headers=[(name, b"admin")]), ()), 403,
            "scope_header_forbidden")


def test_scope_header_may_only_narrow_when_allowed(tmp_path, key):
    auth = make_authenticator(tmp_path, [key], "allowScopeHeader: true")
    req = bearer_request(mint_token(key, ISS, scope="read write"),
                         extra=[(b"x-stellaops-scopes", b"read admin")])
    identity = ok(auth.authenticate(req, ()))
    assert identity.scopes == {"read"}
    assert (b"x-stellaops-scopes", b"read") in identity.headers()
    refused(auth.authenticate(req, (("scope", "write"),)), 403, "insufficient_scope")


# ---------------------------------------------------------------------- authorisation

def test_scope_requirements(auth, key):
    token = mint_token(key, ISS, scope="read", scp=["scan"])
    ok(auth.authenticate(bearer_request(token), (("scope", "read"), ("scope", "scan"))))
    failure = refused(auth.authenticate(bearer_request(token), (("scope", "read"), ("scope", "admin"))),
                      403, "insufficient_scope", "insufficient_scope")
    assert failure.headers.startswith(b'www-authenticate: Bearer error="insufficient_scope"')
    assert b'scope="admin"' in failure.headers
    ok(auth.authenticate(bearer_request(token), (("scope", None),)))
    refused(auth.authenticate(bearer_request(mint_token(key, ISS, drop=("scope",))), (("scope", None),)),
            403, "insufficient_scope")


def test_claim_requirements(auth, key):
    token = mint_token(key, ISS, roles=["admin", "ops"], inst="i-1", level=3, beta=True)
    for requirement in [("roles", "ops"), ("inst", "i-1"), ("inst", None), ("level", "3"),
                        ("beta", "true"), ("stellaops:tenant", "t-1")]:
        ok(auth.authenticate(bearer_request(token), (requirement,)))
    for requirement in [("roles", "root"), ("inst", "i-2"), ("missing", None), ("level", "4"),
                        ("stellaops:tenant", "t-2")]:
        refused(auth.authenticate(bearer_request(token), (requirement,)), 403, "forbidden", "forbidden")


def test_malformed_requirements_fail_closed(auth, key):
    token = mint_token(key, ISS)
    for requirements in [(("scope",),), ((1, 2),), ("xy",)]:
        assert isinstance(auth.authenticate(bearer_request(token), requirements), AuthFailure)


def test_scope_challenge_never_carries_unsafe_text(auth, key):
    token = mint_token(key, ISS)
    failure = auth.authenticate(bearer_request(token), (("scope", 'a"\r\nx: y'),))
    assert b"\r\nx: y" not in failure.headers and b'scope="' not in failure.headers
