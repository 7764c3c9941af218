"""Who may register which service name (docs/service-identity.md).

A HELLO claims a service name, and registering it puts the peer among the instances that
name's traffic goes to: without a check, any peer that can reach the transport port could
claim a running service with a higher version and take all of its traffic. So a listener
decides, before anything is registered, whether the peer may claim the name:

* TLS with `serviceIdentities`: the verified client certificate's names (subject CN, SAN
  DNS names, SHA-256 thumbprint) map to service-name patterns; one of them must match.
* `registrationSecret`: the HELLO carries `auth = {ts, nonce, mac}`, an HMAC-SHA256 over
  the fields that identify the instance, keyed by the service's own key derived from the
  secret (`registration_key`). A key handed to one service claims no other name; `ts` must
  be within `registrationMaxClockSkew` of our clock and each MAC is accepted once.
* Neither configured: TCP takes loopback peers only; TLS a peer with a verified client
  certificate, or a loopback one.

The SDK signs with the same functions (`sign_hello`), so the MAC is defined once.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import time

import orjson

__all__ = ["registration_key", "sign_hello", "hello_mac", "RegistrationPolicy",
           "certificate_names", "is_loopback"]

# Both strings are part of the MAC's definition: changing one invalidates every key and
# signature in use, so a new scheme gets new strings (and the SDK signs with both for a while).
_KEY_CONTEXT = b"stellagw registration key v1\x00"
_MAC_CONTEXT = "stellagw-hello-v1"
_REPLAY_PREFIX = "stellagw:hello:"
_SERVICE_CHARS = "[A-Za-z0-9._-]"


def registration_key(secret: str | bytes, service: str) -> str:
    """The key one service signs its HELLOs with (64 hex digits), derived from the gateway's
    registrationSecret: give a service this rather than the secret, and a leaked key lets
    its holder register only that service."""
    raw = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(raw, _KEY_CONTEXT + service.encode(), hashlib.sha256).hexdigest()


def hello_mac(key: bytes, service, version, instance_id, ts, nonce) -> str:
    # A JSON array: unambiguous whatever the fields hold (no separator can be forged), and
    # the gateway can compute it over whatever a hostile HELLO sent without checking types.
    message = orjson.dumps([_MAC_CONTEXT, service, version, instance_id, ts, nonce])
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_hello(hello: dict, key_hex: str, now_ms: int | None = None) -> dict:
    """Add `auth` to a HELLO: call once per connection, so every HELLO has a fresh nonce."""
    ts = int(time.time() * 1000) if now_ms is None else now_ms
    nonce = secrets.token_urlsafe(16)
    hello["auth"] = {"ts": ts, "nonce": nonce,
                     "mac": hello_mac(bytes.fromhex(key_hex), hello["service"],
                                      hello["version"], hello["instance_id"], ts, nonce)}
    return hello


def is_loopback(peer) -> bool:
    """Whether a peername (host, port, ...) is a loopback address (IPv4-mapped too)."""
    if not peer or not isinstance(peer, tuple):
        return False
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def certificate_names(cert: dict, der: bytes) -> list[str]:
    """The names a verified certificate can be mapped by: `cn:`, `dns:`, `sha256:`."""
    names = []
    for rdn in cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName":
                names.append("cn:" + value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.append("dns:" + value.lower())
    names.append("sha256:" + hashlib.sha256(der).hexdigest())
    return names


def _compile(patterns) -> re.Pattern:
    # Only `*` is special ("any run of name characters"): service names are plain tokens,
    # and fnmatch's [] and ? would make an allow-list harder to read than to write.
    any_run = f"{_SERVICE_CHARS}*"
    alternatives = (any_run.join(re.escape(piece) for piece in p.split("*")) for p in patterns)
    return re.compile("(?:" + "|".join(alternatives) + r")\Z")


class RegistrationPolicy:
    """One listener's rule. `check()` returns None (allowed) or (reason, message): the
    reason is the metric label, the message goes to the log and the HELLO_ACK."""

    __slots__ = ("kind", "identities", "secret", "skew_ms", "replay")

    def __init__(self, kind: str, node, replay):
        self.kind = kind
        identities = getattr(node, "service_identities", None) or {}
        self.identities = {name: _compile(patterns) for name, patterns in identities.items()}
        secret = node.registration_secret
        self.secret = secret.encode() if secret else None
        self.skew_ms = int(node.registration_max_clock_skew * 1000)
        self.replay = replay            # check_and_store(key, ttl_ms): the instance's table

    @property
    def open_to(self) -> str:
        """Who may register when nothing is configured, for the start-up log."""
        if self.identities or self.secret:
            return ""
        return ("loopback peers only" if self.kind == "tcp"
                else "any verified client certificate (any service), and loopback peers")

    def check(self, hello: dict, transport, peer):
        service = hello.get("service")
        name = service if isinstance(service, str) else ""
        if self.identities:
            refusal = self._certificate(name, transport)
            if refusal is not None:
                return refusal
        if self.secret is not None:
            return self._signature(hello, service)
        if self.identities or is_loopback(peer):
            return None
        if self.kind == "tls" and _peer_certificate(transport)[0]:
            return None
        if self.kind == "tls":
            return ("no_certificate", "no client certificate, and not a loopback peer")
        return ("not_loopback",
                f"{peer[0] if peer else 'the peer'} is not a loopback address and "
                f"gateway.transports.tcp.registrationSecret is not set: over TCP only "
                f"services on this host may register")

    def _certificate(self, name, transport):
        cert, der = _peer_certificate(transport)
        if not der or not cert:         # none sent, or not verified (clientCertificateMode)
            return ("no_certificate",
                    "no client certificate: serviceIdentities maps certificates to services")
        names = certificate_names(cert, der)
        for cname in names:
            allowed = self.identities.get(cname)
            if allowed is not None and allowed.match(name):
                return None
        return ("certificate_not_allowed",
                f"no entry of serviceIdentities for this certificate ({', '.join(names)}) "
                f"allows service {name!r}")

    def _signature(self, hello, service):
        auth = hello.get("auth")
        if not isinstance(auth, dict):
            return ("no_signature", "this listener needs a signed HELLO (registrationSecret): "
                                    "`auth` is missing")
        ts, nonce, mac = auth.get("ts"), auth.get("nonce"), auth.get("mac")
        # `mac` ASCII: hmac.compare_digest raises TypeError on a str with anything else, which
        # ended the link as asyncio's "Fatal error on transport", a traceback in the log and
        # no HELLO_ACK (docs/security.md §3d row 56).
        if (not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(nonce, str)
                or not 16 <= len(nonce) <= 64 or not isinstance(mac, str) or not mac.isascii()):
            return ("bad_signature", "`auth` must be {ts: int, nonce: 16-64 chars, mac: hex}")
        key = bytes.fromhex(registration_key(self.secret, service if isinstance(service, str) else ""))
        expected = hello_mac(key, service, hello.get("version"), hello.get("instance_id"), ts, nonce)
        if not hmac.compare_digest(expected, mac):
            return ("bad_signature", "the HELLO's signature does not match (wrong secret or "
                                     "key, or another service's key)")
        skew = int(time.time() * 1000) - ts
        if abs(skew) > self.skew_ms:
            return ("stale_signature", f"signed {skew / 1000:+.1f}s from our clock (at most "
                                       f"registrationMaxClockSkew {self.skew_ms / 1000:g}s)")
        # Checked last: only a valid signature may take a slot in the table. It lives as
        # long as its timestamp could still be accepted.
        if not self.replay.check_and_store(_REPLAY_PREFIX + mac, 2 * self.skew_ms):
            return ("replayed_signature", "this signed HELLO was used before")
        return None


def _peer_certificate(transport):
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return None, None
    return ssl_object.getpeercert() or {}, ssl_object.getpeercert(binary_form=True)
