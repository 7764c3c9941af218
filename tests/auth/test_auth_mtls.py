"""Certificate-bound tokens: docs/security.md §3a′ (RFC 8705)."""
from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stellagw.auth import AuthFailure, Identity
from stellagw.auth.mtls import certificate_thumbprint

from tests.support.auth import (ISSUER_PLACEHOLDER, DpopClient, SigningKey, b64u, bearer_request,
                                dpop_request, make_authenticator, mint_token)

ISS = ISSUER_PLACEHOLDER


def certificate_der(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def key():
    return SigningKey("ES256", kid="k1")


@pytest.fixture(scope="module")
def cert():
    return certificate_der("client-1")


@pytest.fixture
def auth(tmp_path, key):
    return make_authenticator(tmp_path, [key])


def refused(result, reason):
    assert isinstance(result, AuthFailure), result
    assert (result.status, result.code, result.reason) == (401, "invalid_token", reason), result
    return result


def test_thumbprint_is_base64url_sha256_of_the_der(cert):
    # §3a′ item 3: base64url without padding, not hex.
    assert certificate_thumbprint(cert) == b64u(hashlib.sha256(cert).digest())
    assert "=" not in certificate_thumbprint(cert)


def test_matching_certificate(auth, key, cert):
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    identity = auth.authenticate(bearer_request(token, peer_cert=cert), ())
    assert isinstance(identity, Identity) and identity.binding == "mtls"


def test_other_certificate(auth, key, cert):
    # §3a′ item 4: mismatch → 401 invalid_token.
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    failure = refused(auth.authenticate(bearer_request(token, peer_cert=certificate_der("thief")), ()),
                      "mtls_mismatch")
    assert failure.headers.startswith(b'www-authenticate: Bearer error="invalid_token"')


def test_no_certificate(auth, key, cert):
    # §3a′ item 4: bound token without a client certificate → 401 invalid_token.
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    refused(auth.authenticate(bearer_request(token), ()), "mtls_missing_certificate")


def test_hex_thumbprint_does_not_match(auth, key, cert):
    token = mint_token(key, ISS, cnf={"x5t#S256": hashlib.sha256(cert).hexdigest()})
    refused(auth.authenticate(bearer_request(token, peer_cert=cert), ()), "mtls_mismatch")


def test_certificate_header_is_not_a_certificate(auth, key, cert):
    # §3a′ item 2: only our own TLS session counts; a header naming the cert does not.
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    req = bearer_request(token, extra=[(b"x-client-cert", cert.hex().encode()),
                                       (b"x-forwarded-client-cert", b"Hash=" + cert.hex().encode())])
    refused(auth.authenticate(req, ()), "mtls_missing_certificate")


def test_cached_token_still_checks_the_certificate(auth, key, cert):
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    assert isinstance(auth.authenticate(bearer_request(token, peer_cert=cert), ()), Identity)
    refused(auth.authenticate(bearer_request(token, peer_cert=certificate_der("thief")), ()),
            "mtls_mismatch")


def test_bound_both_ways_needs_both(auth, key, cert):
    # §3a′ item 6: cnf.jkt and cnf.x5t#S256 must both be satisfied.
    client = DpopClient()
    token = mint_token(key, ISS, cnf={"jkt": client.jkt, "x5t#S256": certificate_thumbprint(cert)})
    both = dpop_request(client, token)
    both.conn.peer_cert = cert
    identity = auth.authenticate(both, ())
    assert isinstance(identity, Identity) and identity.binding == "both"
    refused(auth.authenticate(dpop_request(client, token), ()), "mtls_missing_certificate")
    refused(auth.authenticate(bearer_request(token, peer_cert=cert), ()), "dpop_bound_as_bearer")
    thief = dpop_request(DpopClient(), token)
    thief.conn.peer_cert = cert
    refused(auth.authenticate(thief, ()), "dpop_jkt_mismatch")


def test_mtls_disabled_refuses_bound_tokens(tmp_path, key, cert):
    auth = make_authenticator(tmp_path, [key], "mtlsEnabled: false")
    token = mint_token(key, ISS, cnf={"x5t#S256": certificate_thumbprint(cert)})
    refused(auth.authenticate(bearer_request(token, peer_cert=cert), ()), "mtls_disabled")
