"""TLS contexts for the client listener and the service transport.

TLS 1.3 is negotiated whenever the client offers it (OpenSSL picks the highest common
version); `min_version` lets a site refuse 1.2. A PFX/PKCS#12 bundle (the specification's format)
is converted in memory and handed to OpenSSL through a private temporary file, because
`ssl.SSLContext.load_cert_chain` only reads files.

Certificates are reloaded without a restart (docs/operations.md "Reload"): a listener is
created with one `ReloadingContext.listening` context for good, whose SNI callback — run
for every ClientHello, with or without a server name — moves the handshake onto the
context built from the files last loaded. Connections already up keep the context they
were made with; nothing is closed.
"""
from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass

from ..files import read_regular

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
    # OpenSSL opens the files itself and would wait on a FIFO, or read a device for ever,
    # on the worker's loop: each is checked first (files.read_regular).
    asks = _CLIENT_MODES[tls.client_certificate_mode] != ssl.CERT_NONE
    for name, file in (("certificatePath", path), ("keyPath", tls.key_path),
                       ("clientCaPath", tls.client_ca_path if asks else "")):
        if file:
            try:
                read_regular(file)
            except OSError as exc:
                raise TlsConfigError(f"{key_prefix}.{name}: cannot load {file!r}: {exc}") from exc
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

    data = read_regular(path)
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


def certificate_not_after(tls) -> float | None:
    """The server certificate's notAfter, in Unix seconds (gateway_certificate_not_after:
    an expired certificate loads, and verifying clients then fail every handshake, so the
    date is exported for an alert well before). None when it cannot be read here."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import pkcs12
    path = tls.certificate_path
    try:
        data = read_regular(path)
        if path.lower().endswith((".pfx", ".p12")):
            pw = tls.certificate_password.encode() if tls.certificate_password else None
            cert = pkcs12.load_key_and_certificates(data, pw)[1]
        else:
            cert = x509.load_pem_x509_certificates(data)[0]
        return cert.not_valid_after_utc.timestamp()
    except (OSError, ValueError, TypeError, IndexError, AttributeError):
        return None


def _signature(path: str):
    """What says a file changed: stat follows symlinks, so a Kubernetes Secret's `..data`
    swap shows as another inode; size and mtime catch a file rewritten in place."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def files_of(tls) -> tuple[str, ...]:
    return tuple(p for p in (tls.certificate_path, tls.key_path, tls.client_ca_path) if p)


@dataclass
class ReloadResult:
    reloaded: bool          # a new context is in use for new handshakes
    error: str | None       # why the files were not taken (the old context stays)


class ReloadingContext:
    """A server SSLContext whose certificate, key, client CAs and client-certificate mode
    can change while the listener runs.

    `listening` is what the server is created with; its SNI callback puts each new
    handshake on `current`, the context built from the files last loaded. SSL objects copy
    the verify mode and protocol versions from `listening` when they are made, so those
    are also set on it in place. A failed load keeps `current` and is tried again when the
    files change once more (`changed()`), not every second.
    """

    def __init__(self, tls, key_prefix: str):
        self.key_prefix = key_prefix
        self.tls = tls
        self._signatures = self._stat(tls)
        self.listening = server_context(tls, key_prefix)
        self.current = self.listening
        self.not_after = certificate_not_after(tls)
        self.listening.sni_callback = self._switch
        self.failed_signatures = None   # the files as they were when a load last failed

    @staticmethod
    def _stat(tls):
        return tuple(_signature(p) for p in files_of(tls))

    def _switch(self, ssl_object, server_name, listening):
        current = self.current
        if current is not listening:
            ssl_object.context = current
        return None

    def changed(self) -> bool:
        """The files differ from those last loaded (and from a load that last failed)."""
        now = self._stat(self.tls)
        return now != self._signatures and now != self.failed_signatures

    def reload(self, tls=None) -> ReloadResult:
        """Load the files of `tls` (default: the same settings, files re-read) into a new
        context for new handshakes. Never raises: a file that cannot be used leaves the
        current context in place and says why."""
        tls = tls or self.tls
        signatures = self._stat(tls)
        try:
            ctx = server_context(tls, self.key_prefix)
        except TlsConfigError as exc:
            self.failed_signatures = signatures
            return ReloadResult(False, str(exc))
        self.listening.verify_mode = ctx.verify_mode
        self.listening.minimum_version = ctx.minimum_version
        self.current = ctx
        self.tls = tls
        self.not_after = certificate_not_after(tls)
        self._signatures = signatures
        self.failed_signatures = None
        return ReloadResult(True, None)
