"""TLS contexts for the client listener and the service transport.

TLS 1.3 is negotiated whenever the client offers it (OpenSSL picks the highest common
version); `min_version` lets a site refuse 1.2. A PFX/PKCS#12 bundle (the specification's format)
is converted in memory and handed to OpenSSL through a private temporary file, because
`ssl.SSLContext.load_cert_chain` only reads files.
"""
from __future__ import annotations

import os
import ssl
import tempfile

_CLIENT_MODES = {
    "NoCertificate": ssl.CERT_NONE,
    "AllowCertificate": ssl.CERT_OPTIONAL,
    "RequireCertificate": ssl.CERT_REQUIRED,
}


class TlsConfigError(Exception):
    """A certificate or key that cannot be used; the message names the file and the key."""


def server_context(tls, key_prefix: str) -> ssl.SSLContext:
    """Build a server SSLContext from a tls settings node (see docs/configuration.md)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if getattr(tls, "min_version", "1.2") == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.set_alpn_protocols(["http/1.1"])
    path = tls.certificate_path
    try:
        if path.lower().endswith((".pfx", ".p12")):
            _load_pkcs12(ctx, path, tls.certificate_password)
        else:
            ctx.load_cert_chain(path, tls.key_path or None,
                                password=tls.certificate_password or None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"{key_prefix}.certificatePath: cannot load {path!r}: {exc}") from exc

    mode = _CLIENT_MODES[tls.client_certificate_mode]
    if mode != ssl.CERT_NONE:
        ca = tls.client_ca_path
        if not ca:
            if mode == ssl.CERT_REQUIRED:
                raise TlsConfigError(f"{key_prefix}.clientCaPath: RequireCertificate needs the CA "
                                     "that signs client certificates")
            # Without a CA we cannot verify a client certificate, so we do not ask for one.
            mode = ssl.CERT_NONE
        else:
            try:
                ctx.load_verify_locations(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise TlsConfigError(f"{key_prefix}.clientCaPath: cannot load {ca!r}: {exc}") from exc
    ctx.verify_mode = mode
    return ctx


def _load_pkcs12(ctx: ssl.SSLContext, path: str, password: str) -> None:
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption, Encoding, PrivateFormat, pkcs12)

    with open(path, "rb") as f:
        data = f.read()
    pw = password.encode() if password else None
    key, cert, extra = pkcs12.load_key_and_certificates(data, pw)
    if key is None or cert is None:
        raise ValueError("the PKCS#12 file holds no key and certificate")
    # Re-encrypt the key for the temp file so it never lies on disk in clear.
    secret = os.urandom(24).hex().encode()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(secret))
    pem += cert.public_bytes(Encoding.PEM)
    for c in extra or ():
        pem += c.public_bytes(Encoding.PEM)
    fd, tmp = tempfile.mkstemp(prefix="stellagw-", suffix=".pem")
    try:
        os.write(fd, pem)
        os.close(fd)
        ctx.load_cert_chain(tmp, password=secret)
    finally:
        os.unlink(tmp)
