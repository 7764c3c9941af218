"""The Authority's signing keys: OIDC discovery or a static JWKS file, cached and refreshed.

- Discovery: `<issuer>/.well-known/openid-configuration` (OIDC Discovery §4; a trailing
  "/" of the issuer is dropped first), whose `issuer` must equal the configured one
  exactly (§4.3: otherwise a different issuer's keys could be mixed in) and whose
  `jwks_uri` is then fetched. https only, except loopback (the development Authority).
- A static file (`jwksPath`) for air-gapped sites, re-read on the same schedule.
- Refreshed every `keysRefreshInterval`; a token naming an unknown `kid` triggers one
  refetch (single flight: concurrent requests share it) at most every
  `keysMinRefetchInterval`; in between, unknown kids are refused at once (negative cache).
- A failed refresh keeps the last good keys (logged and counted): tokens keep working while
  the Authority is down. Until the first success, `ready_reasons()` says why not.

Key entries are typed: each JWK becomes one `Key` with the set of algorithms its type
allows (∩ the configured list, ∩ its own `alg` when present). Symmetric (`oct`) keys,
keys with private members, `use` other than `sig`, and short RSA keys are skipped.

HTTP client: `urllib.request` run in the loop's default executor. This is a handful of
small GETs every few minutes, off the request path; the stdlib client verifies
certificates with the default context and adds no dependency (and no second TLS stack).
Redirects are refused (a redirect could downgrade https → http), responses are capped at
1 MiB, and every request — its TLS handshake, status line, headers and body — has
keysFetchTimeout in all (_Deadline, _read_by). (The name's DNS lookup is the resolver's.)
"""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from .jose import ALG_KEY_TYPES, PRIVATE_MEMBERS, JoseError, public_key_from_jwk

__all__ = ["Key", "KeyStore", "parse_jwks", "KeysError"]

MAX_DOCUMENT_BYTES = 1 << 20
_LOOPBACK = ("localhost", "127.0.0.1", "::1")


class KeysError(Exception):
    """Why keys could not be loaded; the message is logged and shown on /health/ready."""


class Key:
    __slots__ = ("kid", "kty", "key", "algorithms")

    def __init__(self, kid, kty, key, algorithms):
        self.kid = kid                    # str or None
        self.kty = kty
        self.key = key                    # cryptography public key object
        self.algorithms = algorithms      # tuple[str, ...]: config ∩ key type ∩ jwk "alg"

    def __repr__(self) -> str:
        return f"Key(kid={self.kid!r}, kty={self.kty}, algorithms={self.algorithms})"


def parse_jwks(document, algorithms) -> list[Key]:
    """The usable signing keys of a JWKS document (KeysError when there are none)."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysError("JWKS is not an object with a 'keys' list")
    keys: list[Key] = []
    seen: set = set()
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kty = jwk.get("kty")
        if kty == "oct" or PRIVATE_MEMBERS.intersection(jwk):
            continue       # never a shared secret, never a published private key
        if jwk.get("use") not in (None, "sig"):
            continue
        kid = jwk.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        if kid in seen:
            continue       # duplicate kid: the first one wins, deterministically
        usable = [a for a in algorithms if ALG_KEY_TYPES[a][0] == kty]
        declared = jwk.get("alg")
        if declared is not None:
            usable = [a for a in usable if a == declared]
        key_object = None
        fitting = []
        for alg in usable:
            try:
                key_object = public_key_from_jwk(jwk, alg)
            except JoseError:
                continue
            fitting.append(alg)
        if not fitting:
            continue
        seen.add(kid)
        keys.append(Key(kid, kty, key_object, tuple(fitting)))
    if not keys:
        raise KeysError("JWKS has no usable signing key for the configured algorithms")
    return keys


class _Deadline:
    """Shuts a fetch's connection down when keysFetchTimeout is up, whatever it is waiting for.

    The socket timeout bounds each read, not a phase: an Authority (or a proxy before it)
    that sends its TLS handshake, status line or headers a byte every few seconds held
    the fetch for hours — and with it every request with an unknown kid waiting on it and
    every later refresh (single flight), so keys never rotated again (an adversarial
    probe: a header dripped a byte each 0.3 s outlived a 1 s keysFetchTimeout).

    The connection's socket is made through `connect` (http.client's _create_connection,
    for https and proxy tunnels too); a timer thread shuts its duplicate down at the
    deadline, which ends any blocked read in the fetching thread at once."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list = []
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def connect(self, address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None,
                *args, **kwargs):
        sock = socket.create_connection(address, timeout, source_address, *args, **kwargs)
        # A duplicate: an SSL wrap detaches the socket object it is given, not the socket.
        with self._lock:
            self._socks.append(sock.dup())
            if self.expired:
                self._shut()
        return sock

    def wrap(self, http_class):
        def make(*args, **kwargs):
            connection = http_class(*args, **kwargs)
            connection._create_connection = self.connect
            return connection
        return make

    def _expire(self):
        with self._lock:
            self.expired = True
            self._shut()

    def _shut(self):
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self._timer.cancel()
        with self._lock:
            for sock in self._socks:
                sock.close()
            self._socks = []


class _Guarded:
    """A handler whose connections are made through the request's _Deadline."""
    guard: _Deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(self.guard.wrap(http_class), req, **kwargs)


class _GuardedHTTP(_Guarded, urllib.request.HTTPHandler):
    def __init__(self, guard):
        super().__init__()
        self.guard = guard


class _GuardedHTTPS(_Guarded, urllib.request.HTTPSHandler):
    def __init__(self, guard, context):
        super().__init__(context=context)
        self.guard = guard


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, "redirects are not followed", headers, fp)


def _check_url(url: object, what: str) -> str:
    if not isinstance(url, str):
        raise KeysError(f"{what} is missing")
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return url
    raise KeysError(f"{what} must be an https URL")


# After a failed fetch, an unknown kid may ask for the next this soon, not only after
# keysMinRefetchInterval: an Authority restarting with a new key (a replica behind its
# address) is back within seconds, and its tokens were refused meanwhile for the whole
# interval. Doubled after each failure in a row, up to keysMinRefetchInterval: a long
# outage is not asked more often than before (single flight: one fetch per worker).
FAILED_REFETCH_RETRY = 1.0


class KeyStore:
    def __init__(self, *, authority: str, jwks_path: str, algorithms, refresh_interval: float,
                 min_refetch_interval: float, timeout: float = 5.0, log=None, on_event=None,
                 on_change=None, clock=time.monotonic):
        self.authority = authority
        self.jwks_path = jwks_path
        self._algorithms = tuple(algorithms)
        self._refresh_interval = refresh_interval
        self._min_refetch = min_refetch_interval
        self._timeout = timeout
        self._log = log
        self._event = on_event or (lambda name: None)
        self._on_change = on_change
        self._clock = clock
        self.configured = bool(authority or jwks_path)

        self._by_kid: dict[str, Key] = {}
        self._all: list[Key] = []
        self._fingerprint: frozenset = frozenset()
        self.loaded = False
        self.last_error = "not fetched yet"
        self._last_refetch = float("-inf")     # last unknown-kid refetch (the rate limit)
        self._failures = 0                     # fetches failed in a row
        self._inflight: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._tls = ssl.create_default_context()

    # ------------------------------------------------------------------ lookups (sync, hot path)

    def get(self, kid: str | None) -> Key | None:
        if kid is None:
            # No kid: acceptable only when there is exactly one key to try (OIDC Core §10.1).
            return self._all[0] if len(self._all) == 1 else None
        return self._by_kid.get(kid)

    @property
    def failing(self) -> bool:
        """The last fetch failed: a kid not among the keys may be the Authority's all the same."""
        return bool(self.last_error)

    def ready_reasons(self) -> list[str]:
        if self.configured and not self.loaded:
            return [f"no Authority keys yet: {self.last_error}"]
        return []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """First load (a failure is logged, not raised), then the refresh loop."""
        if not self.configured:
            return
        await self._single_flight()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _refresh_loop(self) -> None:
        while True:
            # Until keys load, retry at the refetch rate rather than waiting minutes.
            delay = self._refresh_interval if self.loaded else max(1.0, min(
                self._min_refetch, self._refresh_interval))
            await asyncio.sleep(delay)
            try:
                await self._single_flight()
            except asyncio.CancelledError:
                raise
            except Exception:      # noqa: BLE001 -- the loop must survive anything
                pass

    def request_refetch(self):
        """Refetch for an unknown kid: the running fetch, a new one, or None (rate-limited)."""
        if not self.configured:
            return None
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None            # not inside the event loop: nothing can wait for a fetch
        now = self._clock()
        wait = self._min_refetch
        if self.failing:
            wait = min(wait, FAILED_REFETCH_RETRY * 2 ** min(max(self._failures - 1, 0), 16))
        if now - self._last_refetch < wait:
            self._event("keys_refetch_rate_limited")
            return None
        self._last_refetch = now
        self._event("keys_refetch_unknown_kid")
        return self._start_fetch()

    def _single_flight(self):
        if self._inflight is not None and not self._inflight.done():
            return self._inflight
        return self._start_fetch()

    def _start_fetch(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()      # before the coroutine exists: none leaks
        self._inflight = loop.create_task(self._refresh())
        return self._inflight

    async def _refresh(self) -> bool:
        """Fetch and install; True when the key set changed. Never raises."""
        loop = asyncio.get_running_loop()
        try:
            keys, fingerprint = await loop.run_in_executor(None, self._load_keys)
        except Exception as exc:  # noqa: BLE001 -- any failure keeps the last good keys
            self.last_error = _describe(exc)
            self._failures += 1
            self._event("keys_refresh_failed")
            if self._log is not None:
                self._log.event("warning", "Authority keys refresh failed", error=self.last_error,
                                keptKeys=len(self._all), authority=self.authority or self.jwks_path)
            return False
        changed = fingerprint != self._fingerprint
        self._all = keys
        self._by_kid = {k.kid: k for k in keys if k.kid is not None}
        self._fingerprint = fingerprint
        was_loaded, self.loaded = self.loaded, True
        self.last_error = ""
        self._failures = 0
        self._event("keys_refreshed")
        if changed:
            if self._log is not None:
                self._log.event("info", "Authority keys loaded" if not was_loaded else
                                "Authority keys changed", kids=[k.kid for k in keys])
            if self._on_change is not None:
                self._on_change()
        return changed

    # ------------------------------------------------------------------ blocking I/O (executor)

    def _load_keys(self):
        """The keys and their fingerprint. Parsed here, off the loop: a 1 MiB JWKS of 2,600
        RSA keys took 130 ms to parse and fingerprint, a stall of every request on the
        worker (an adversarial probe)."""
        keys = parse_jwks(self._load_blocking(), self._algorithms)
        return keys, frozenset((k.kid, k.kty, k.algorithms, _public_numbers(k)) for k in keys)

    def _load_blocking(self):
        if self.jwks_path:
            try:
                with open(self.jwks_path, "rb") as f:
                    raw = f.read(MAX_DOCUMENT_BYTES + 1)
            except OSError as exc:
                raise KeysError(f"cannot read {self.jwks_path}: {exc.strerror or exc}") from None
            return _json(raw, self.jwks_path)
        issuer = self.authority
        discovery = self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        if not isinstance(discovery, dict) or discovery.get("issuer") != issuer:
            raise KeysError("discovery document names a different issuer than gateway.auth.authority")
        jwks_uri = _check_url(discovery.get("jwks_uri"), "discovery jwks_uri")
        return self._get_json(jwks_uri)

    def _get_json(self, url: str):
        _check_url(url, "URL")
        request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                       "User-Agent": "stellagw"})
        guard = _Deadline(self._timeout)
        # An opener per request (a few every few minutes): its handlers carry the deadline.
        opener = urllib.request.build_opener(_GuardedHTTP(guard), _GuardedHTTPS(guard, self._tls),
                                             _NoRedirect())
        try:
            with opener.open(request, timeout=self._timeout) as response:
                raw = _read_by(response, guard.deadline, self._timeout)
        except urllib.error.HTTPError as exc:
            raise KeysError(f"GET {url}: HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
            if guard.expired:
                raise KeysError(f"GET {url}: {_late(self._timeout)}") from None
            reason = getattr(exc, "reason", exc)
            raise KeysError(f"GET {url}: {reason}") from None
        finally:
            guard.close()
        if guard.expired:          # cut at the deadline: what came is not the document
            raise KeysError(f"GET {url}: {_late(self._timeout)}")
        return _json(raw, url)


def _late(timeout: float) -> str:
    return f"the response took longer than keysFetchTimeout ({timeout:g} s)"


def _read_by(response, deadline: float, timeout: float) -> bytes:
    """The body, up to MAX_DOCUMENT_BYTES + 1 bytes (_json refuses more), by `deadline`.

    The socket timeout bounds each read, not the body: an Authority, or a proxy before it,
    that sends a byte every few seconds would hold the fetch — and every request with an
    unknown kid waiting on it — for days. So each read waits at most what is left until
    the deadline, and a body not complete by then fails the fetch."""
    sock = getattr(getattr(response.fp, "raw", None), "_sock", None)   # http.client's socket
    late = _late(timeout)
    parts, size = [], 0
    while size <= MAX_DOCUMENT_BYTES:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(late)
        if sock is not None:
            sock.settimeout(left)
        try:
            chunk = response.read1(65536)
        except TimeoutError:
            raise TimeoutError(late) from None
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


def _json(raw: bytes, source: str):
    if len(raw) > MAX_DOCUMENT_BYTES:
        raise KeysError(f"{source}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        raise KeysError(f"{source}: not JSON") from None


def _public_numbers(key: Key):
    try:
        return repr(key.key.public_numbers())
    except AttributeError:       # Ed25519/Ed448 have raw bytes instead
        from cryptography.hazmat.primitives import serialization
        return key.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _describe(exc: Exception) -> str:
    text = str(exc) or exc.__class__.__name__
    return text[:300]
