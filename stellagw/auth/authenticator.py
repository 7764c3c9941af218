"""The Authenticator: stages 6–8 of the request's journey (docs/design.md §2, docs/auth.md).

`Authenticator.authenticate(req, endpoint_claims)` is the stage. It returns an `Identity`
(go on), an `AuthFailure` (answer it), or — only when it has to wait for I/O (an unknown
`kid` refetch, the Valkey replay check) — an awaitable resolving to one of those. It never
raises for anything a client sends. The order of the checks:

 1. headers: at most one `Authorization` (400), the scheme (`Bearer` / `DPoP`, any case),
    no credentials → `anonymous` when allowed, else 401 with the bare challenges
 2. access token: size cap, then the verified-token cache, else full verification
    (tokens.py), unknown kid → one rate-limited single-flight refetch, then retry once
 3. sender constraint:
    - `cnf.jkt` + `Bearer` → 401 (RFC 9449 §7.2); `DPoP` scheme needs `cnf.jkt`
    - `DPoP`: exactly one `DPoP` header (a comma-joined value counts as more), proof checks
      (dpop.py), ath, jkt binding, nonce
    - `cnf.x5t#S256` → the client certificate of this TLS session (mtls.py)
 4. scope-override header → 403 unless allowScopeHeader (then it can only narrow)
 5. endpoint RequiringClaims → 403 `insufficient_scope` / `forbidden` (claims.py)
 6. DPoP `jti` replay: in-process cache, then Valkey when configured (outage policy)

No logging and no allocation beyond the result on the success path; failures are logged
at debug level only (a flood of bad tokens must not become a flood of log lines), with the
reason label and correlation id, never the token or proof.
"""
from __future__ import annotations

import asyncio
import hashlib
import inspect
import time

from .claims import challenge_scope, unmet
from .errors import AuthFailure, Challenges, Refusal
from .identity import SCOPE_OVERRIDE_HEADERS, Identity, anonymous_identity
from .keys import KeyStore
from .mtls import check_certificate_binding
from .nonce import NonceIssuer
from .replay import LocalReplayCache, ValkeyReplayCache
from .tokens import TokenVerifier, UnknownKey

__all__ = ["Authenticator"]

VALKEY_RETRY_AFTER = 1.0     # seconds Valkey is left alone after a failure

_BEARER = b"bearer"
_DPOP = b"dpop"


class Authenticator:
    def __init__(self, settings, log, on_event=None, *, valkey=None, clock=time.time):
        """`valkey`: a `stellagw.valkey.ValkeyClient` (anything with `async execute(*args)`)
        for the shared replay cache; when None and `replayCache.valkey` is set, one is
        made in `start()`. `clock`: wall-clock seconds (tests pin it)."""
        gw = settings.gateway
        auth = gw.auth
        self._auth = auth
        self._log = log
        self._event = on_event or (lambda name: None)
        self._clock = clock
        self._required = auth.required
        self._dpop_enabled = auth.dpop_enabled
        self._mtls_enabled = auth.mtls_enabled
        self._allow_scope_header = auth.allow_scope_header
        self._require_bound = auth.require_sender_constraint
        self._max_token_bytes = auth.max_token_bytes
        self._anonymous = anonymous_identity(auth.enable_legacy_headers)
        # What authenticate() answers a request without CREDENTIAL_FIELDS when neither
        # auth.required nor the endpoint's claims ask for more: the pipeline's fast path.
        self.anonymous = None if auth.required else self._anonymous
        self._origin = gw.http.public_origin
        self._scheme = "https" if gw.http.tls.enabled else "http"
        self._challenges = Challenges(auth.algorithms, auth.dpop_enabled)

        self.keys = KeyStore(authority=auth.authority, jwks_path=auth.jwks_path,
                             algorithms=auth.algorithms,
                             refresh_interval=auth.keys_refresh_interval,
                             min_refetch_interval=auth.keys_min_refetch_interval,
                             timeout=auth.keys_fetch_timeout, log=log, on_event=self._event,
                             on_change=self._keys_changed)
        self.tokens = TokenVerifier(auth, self.keys)
        nonce = auth.dpop_nonce
        self.nonces = NonceIssuer(nonce.secret, nonce.lifetime) if nonce.enabled else None
        # Imported here, not at the top: both DPoP twins import this package's modules, so
        # a package that selected one while loading could find it half-loaded.
        from .dpop import DpopVerifier   # noqa: PLC0415
        self.proofs = DpopVerifier(auth.algorithms, auth.dpop_max_clock_skew,
                                   auth.max_token_bytes, self.nonces)
        replay = auth.replay_cache
        self.replay = LocalReplayCache(replay.max_entries,
                                       on_evict_live=lambda: self._event("dpop_replay_evicted_live"))
        self._valkey_client = valkey
        self._own_valkey = False
        self.shared_replay = ValkeyReplayCache(valkey) if valkey is not None else None
        self._valkey_reject = replay.on_valkey_error == "reject"
        self._valkey_timeout = replay.timeout
        self._valkey_down_until = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self.shared_replay is None and self._auth.replay_cache.valkey:
            self._valkey_client = _connect_valkey(self._auth.replay_cache.valkey,
                                                  self._valkey_timeout)
            self._own_valkey = True
            self.shared_replay = ValkeyReplayCache(self._valkey_client)
        await self.keys.start()

    def stop(self) -> None:
        self.keys.stop()
        if self._own_valkey and self._valkey_client is not None:
            close = getattr(self._valkey_client, "close", None)
            if close is not None:
                result = close()
                if inspect.isawaitable(result):
                    try:
                        asyncio.get_running_loop().create_task(result)
                    except RuntimeError:      # no loop any more: nothing left to close
                        result.close()

    def take_over(self, previous: "Authenticator"):
        """A configuration reload: carry on from the Authenticator this one replaces, so
        that nothing clients rely on starts over — the proofs seen (a replay stays one),
        the Authority's keys while they come from the same place with the same schedule
        (no "no keys yet" window), the Valkey replay client while its address is the same.
        Call start() afterwards only when `self.keys is not previous.keys` (new keys to
        fetch): the Valkey client is made here.

        `previous` goes on serving the requests already inside it. Returns `retire()`, to
        call once they are done: it stops what `previous` has that this one did not take."""
        old, new = previous._auth, self._auth
        self.replay = previous.replay     # replayCache.maxEntries needs a restart
        same_keys = (old.authority, old.jwks_path, old.algorithms, old.keys_refresh_interval,
                     old.keys_min_refetch_interval, old.keys_fetch_timeout) == (
                    new.authority, new.jwks_path, new.algorithms, new.keys_refresh_interval,
                    new.keys_min_refetch_interval, new.keys_fetch_timeout)
        if same_keys:
            self.keys = previous.keys
            # A key removed from now on must also leave this one's verified-token cache.
            self.keys._on_change = self._keys_changed
            self.tokens = TokenVerifier(new, self.keys)
            previous.tokens.clear()
        if (previous._valkey_client is not None
                and old.replay_cache.valkey == new.replay_cache.valkey):
            self._valkey_client = previous._valkey_client
            self._own_valkey, previous._own_valkey = previous._own_valkey, False
            self.shared_replay = previous.shared_replay
            self._valkey_down_until = previous._valkey_down_until
        elif new.replay_cache.valkey:
            # What start() would do (it connects lazily): start() is not called when the
            # keys were taken over.
            self._valkey_client = _connect_valkey(new.replay_cache.valkey, self._valkey_timeout)
            self._own_valkey = True
            self.shared_replay = ValkeyReplayCache(self._valkey_client)

        def retire():
            if previous.keys is self.keys:
                # stop() would end the refresh loop this one now runs on.
                previous.keys = KeyStore(authority="", jwks_path="", algorithms=(),
                                         refresh_interval=1.0, min_refetch_interval=0.0)
            previous.stop()
        return retire

    def ready_reasons(self) -> list[str]:
        return self.keys.ready_reasons()

    def _keys_changed(self) -> None:
        # A removed key must not keep validating tokens out of the cache.
        self.tokens.clear()

    # ------------------------------------------------------------------ the stage

    def authenticate(self, req, endpoint_claims, sender_constrained=False):
        """`sender_constrained`: the endpoint refuses unbound Bearer tokens (its HELLO);
        auth.requireSenderConstraint does so everywhere."""
        try:
            result = self._authenticate(req, endpoint_claims,
                                        sender_constrained or self._require_bound)
        except Exception as exc:  # noqa: BLE001 -- the stage never raises
            return self._internal_error(req, exc)
        if isinstance(result, Identity):
            req.tenant = result.tenant
        return result

    def _authenticate(self, req, endpoint_claims, bound):
        authorization = None
        n_authorization = 0
        proof = None
        n_proofs = 0
        host = None
        scope_header = None
        for name, value in req.headers:
            if name == b"authorization":
                authorization = value
                n_authorization += 1
            elif name == b"dpop":
                proof = value
                # An intermediary may have joined two fields with a comma (docs/security.md
                # §3a item 4); a JWS never contains one.
                n_proofs += 1 + value.count(b",")
            elif name == b"host":
                host = value
            elif name in SCOPE_OVERRIDE_HEADERS:
                scope_header = value

        if n_authorization > 1:
            return self._fail(req, None, "invalid_request",
                              "more than one Authorization header", "multiple_authorization", 400)
        scheme = token = None
        if authorization is not None:
            space = authorization.find(b" ")
            word = authorization[:space].lower() if space > 0 else authorization.lower()
            if word in (_BEARER, _DPOP):
                scheme = "DPoP" if word == _DPOP else "Bearer"
                token = authorization[space + 1:].lstrip(b" ") if space > 0 else b""
                if not token or b" " in token or b"," in token:
                    return self._fail(req, scheme, "invalid_request",
                                      "Authorization header is malformed", "malformed_authorization", 400)
            # Another scheme (Basic, ...) is not ours: the request counts as carrying no token.

        if token is None:
            if self._required or endpoint_claims:
                return self._fail(req, None, "unauthorized", "authentication required",
                                  "missing_token")
            identity = self._anonymous
            if scope_header is not None and not self._allow_scope_header:
                return self._scope_header_forbidden(req)
            return identity

        if scheme == "DPoP" and not self._dpop_enabled:
            return self._fail(req, "Bearer", "invalid_token", "the DPoP scheme is not enabled",
                              "dpop_disabled")
        if len(token) > self._max_token_bytes:
            return self._fail(req, scheme, "invalid_token", "access token is too large",
                              "token_too_large")
        if not self.keys.configured:
            return self._fail(req, scheme, "invalid_token", "no Authority is configured",
                              "no_authority")

        now = self._clock()
        digest = hashlib.sha256(token).digest()
        info = self.tokens.cached(digest, now)
        if info is None:
            try:
                info = self.tokens.verify(token, digest, now)
            except Refusal as refusal:
                return self._refused(req, scheme, refusal)
            if isinstance(info, UnknownKey):
                return self._unknown_key(req, scheme, token, digest, proof, n_proofs, host,
                                         scope_header, endpoint_claims, bound)
        return self._after_token(req, scheme, info, digest, proof, n_proofs, host, scope_header,
                                 endpoint_claims, now, bound)

    def _unknown_key(self, req, scheme, token, digest, proof, n_proofs, host, scope_header,
                     endpoint_claims, bound):
        if not self.keys.loaded:
            return self._fail(req, scheme, "temporarily_unavailable",
                              "the Authority's keys are not available yet", "keys_unavailable", 503)
        pending = self.keys.request_refetch()
        if pending is None:
            return self._unknown_kid(req, scheme)
        return self._after_refetch(pending, req, scheme, token, digest, proof, n_proofs, host,
                                   scope_header, endpoint_claims, bound)

    async def _after_refetch(self, pending, req, scheme, token, digest, proof, n_proofs, host,
                             scope_header, endpoint_claims, bound):
        try:
            await asyncio.shield(pending)    # a cancelled request must not cancel the fetch
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 -- the store logged it; the kid stays unknown
            pass
        try:
            now = self._clock()
            try:
                info = self.tokens.verify(token, digest, now)
            except Refusal as refusal:
                return self._refused(req, scheme, refusal)
            if isinstance(info, UnknownKey):
                return self._unknown_kid(req, scheme)
            result = self._after_token(req, scheme, info, digest, proof, n_proofs, host,
                                       scope_header, endpoint_claims, now, bound)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            return self._internal_error(req, exc)
        if isinstance(result, Identity):
            req.tenant = result.tenant
        return result

    def _after_token(self, req, scheme, info, digest, proof, n_proofs, host, scope_header,
                     endpoint_claims, now, bound=False):
        identity = info.identity
        jkt = info.jkt
        result = None
        try:
            if jkt is not None:
                if not self._dpop_enabled:
                    raise Refusal("invalid_token", "DPoP-bound tokens are not accepted here",
                                  "dpop_disabled")
                if scheme == "Bearer":
                    # RFC 9449 §7.2: "MUST reject a DPoP-bound access token received as a
                    # bearer token".
                    raise Refusal("invalid_token", "DPoP-bound access token sent with the Bearer scheme",
                                  "dpop_bound_as_bearer")
                if n_proofs == 0:
                    raise Refusal("invalid_dpop_proof", "DPoP proof is missing", "dpop_missing")
                if n_proofs > 1:
                    raise Refusal("invalid_dpop_proof", "more than one DPoP proof", "dpop_multiple")
                htu = self._expected_htu(req, host)
                if htu is None:
                    raise Refusal("invalid_dpop_proof", "the request URI cannot be determined",
                                  "dpop_htu")
                result = self.proofs.check(proof, req.method, htu, info.ath, jkt, now)
            elif scheme == "DPoP":
                raise Refusal("invalid_token", "access token is not DPoP-bound", "not_dpop_bound")
            if info.x5t is not None:
                if not self._mtls_enabled:
                    raise Refusal("invalid_token", "certificate-bound tokens are not accepted here",
                                  "mtls_disabled")
                check_certificate_binding(info.x5t, req.conn.peer_cert)
            elif jkt is None and bound:
                # RFC 9449 §1 / RFC 8705 §3: a token anyone who holds it can replay.
                raise Refusal("invalid_token", "this endpoint needs a sender-constrained token "
                              "(DPoP or mTLS)", "not_sender_constrained")
        except Refusal as refusal:
            return self._refused(req, scheme, refusal)

        if scope_header is not None:
            if not self._allow_scope_header:
                return self._scope_header_forbidden(req)
            requested = frozenset(scope_header.decode("latin-1").split())
            identity = identity.with_scopes(identity.scopes & requested)

        if endpoint_claims:
            if identity.tenant is None and any(
                    isinstance(r, tuple) and r and r[0] == "tenant" for r in endpoint_claims):
                # An endpoint that declares a `tenant` claim serves tenant-scoped data: a
                # token without a tenant is refused before anything else (upstream §7).
                return self._fail(req, None, "TENANT_REQUIRED",
                                  "this endpoint needs a token issued for a tenant",
                                  "tenant_required", 403)
            missing, other = unmet(identity, endpoint_claims)
            if missing:
                return self._fail(req, scheme, "insufficient_scope",
                                  "the access token lacks a required scope", "insufficient_scope",
                                  403, scope=challenge_scope(missing))
            if other:
                return self._fail(req, None, "forbidden",
                                  "the access token lacks a required claim", "forbidden", 403)

        if result is None:
            return identity
        if result.nonce_age is not None and result.nonce_age > self.nonces.lifetime / 2:
            # RFC 9449 §8.2: hand out the next nonce on success, before this one expires.
            identity = identity.with_response_headers(
                b"dpop-nonce: " + self.nonces.current(now).encode() + b"\r\n")
        return self._replay_check(req, scheme, result, identity)

    # ------------------------------------------------------------------ replay

    def _replay_check(self, req, scheme, result, identity):
        # The instance's table first, storing: a same-instance replay never waits for
        # Valkey, and two workers given one proof at once cannot both go on. With
        # onValkeyError: reject, a request that then gets no judgement from Valkey forgets
        # it again (_valkey_outage): it was never served (docs/auth.md, "When Valkey fails").
        if not self.replay.check_and_store(result.replay_key, result.ttl_ms):
            return self._fail(req, scheme, "invalid_dpop_proof", "DPoP proof has been used before",
                              "dpop_replay")
        if self.shared_replay is None:
            return identity
        if time.monotonic() < self._valkey_down_until:
            return self._valkey_outage(req, scheme, result, identity)
        return self._shared_replay_check(req, scheme, result, identity)

    async def _shared_replay_check(self, req, scheme, result, identity):
        reject = self._valkey_reject
        bound = self._valkey_timeout
        if self._own_valkey:
            # Our ValkeyClient times its commands out itself, leaving out time this process
            # was not running (stellagw/valkey.py). The loop runs due timers before it reads
            # sockets, so a bound as short here fired first after a stall of the worker and
            # failed every check in flight, as an outage: a 0.4 s stall was a second of 503s
            # under reject (docs/security.md §3d row 38). Here only a backstop.
            bound = 2 * bound + 1.0
        try:
            # asyncio.timeout, not wait_for: no extra Task per request. The client has its
            # own timeout too; this one also bounds an injected client.
            async with asyncio.timeout(bound):
                stored = await self.shared_replay.check_and_store(result.replay_key, result.ttl_ms,
                                                                  reject)
        except asyncio.CancelledError:
            # The request is gone unanswered: under reject the client undoes its SET too.
            if reject:
                self.replay.discard(result.replay_key)
            raise
        except Exception as exc:  # noqa: BLE001 -- ValkeyError, timeout, protocol: all an outage
            # (CancelledError is a BaseException: a cancelled request is not an outage.)
            self._valkey_down_until = time.monotonic() + VALKEY_RETRY_AFTER
            if self._log is not None:
                self._log.event("warning", "DPoP replay cache (Valkey) failed",
                                error=exc.__class__.__name__,
                                policy="reject" if self._valkey_reject else "local")
            identity = self._valkey_outage(req, scheme, result, identity)
        else:
            if not stored:
                return self._fail(req, scheme, "invalid_dpop_proof",
                                  "DPoP proof has been used before", "dpop_replay")
        # authenticate() sets the tenant only for an answer it has at once; this one came
        # later, so it is set here, on every way an identity leaves (the "local" fallback
        # too: without it, the requests in flight when Valkey failed were rate-limited as
        # tenantless identities, a fresh counter, no tenant rules, no plan).
        if isinstance(identity, Identity):
            req.tenant = identity.tenant
        return identity

    def _valkey_outage(self, req, scheme, result, identity):
        if self._valkey_reject:
            # Refused without a judgement on the proof: it stays usable for the client's
            # retry. Valkey's copy, should the SET run late, is undone by the client
            # (ValkeyReplayCache, undo_unanswered). Only "reject" forgets: under "local" the
            # request goes on, so its jti must stay.
            self.replay.discard(result.replay_key)
            self._event("dpop_replay_valkey_reject")
            return self._fail(req, scheme, "temporarily_unavailable",
                              "the DPoP replay cache is unavailable", "replay_cache_unavailable", 503)
        # "local": the in-process cache has already accepted this jti; counted, never silent.
        self._event("dpop_replay_valkey_fallback")
        return identity

    # ------------------------------------------------------------------ helpers

    def _expected_htu(self, req, host):
        target = req.target.decode("latin-1")
        if self._origin:
            return self._origin + target
        # No publicOrigin: scheme of our listener + the client's Host header (docs/auth.md
        # explains the risk). The comparison normalises both sides.
        if not host:
            return None
        return f"{self._scheme}://{host.decode('latin-1')}{target}"

    def _scope_header_forbidden(self, req):
        return self._fail(req, None, "scope_header_forbidden",
                          "a client may not set the scopes header", "scope_header", 403)

    def _refused(self, req, scheme, refusal: Refusal):
        nonce = None
        if refusal.code == "use_dpop_nonce":
            nonce = self.nonces.current(self._clock())
        if refusal.code in ("invalid_dpop_proof", "use_dpop_nonce"):
            scheme = "DPoP"
        return self._fail(req, scheme, refusal.code, refusal.message, refusal.reason,
                          refusal.status, nonce=nonce)

    def _unknown_kid(self, req, scheme):
        if self.keys.failing:
            # The Authority's keys could not be fetched: its new key perhaps (a restart with
            # rotated keys). Not "bad token" (a client would throw a good one away): 503.
            return self._fail(req, scheme, "temporarily_unavailable",
                              "the Authority's keys cannot be fetched", "keys_unavailable", 503)
        return self._fail(req, scheme, "invalid_token", "access token signing key is unknown",
                          "unknown_kid")

    def _fail(self, req, scheme, code, message, reason, status=401, nonce=None, scope=None):
        failure = self._challenges.failure(scheme, code, message, reason, status, nonce, scope)
        log = self._log
        if log is not None and getattr(log, "threshold", 100) <= 10:
            log.event("debug", "authentication refused", reason=reason, status=status,
                      correlationId=getattr(req, "correlation_id", ""))
        return failure

    def _internal_error(self, req, exc):
        self._event("internal_error")
        if self._log is not None:
            self._log.event("error", "authentication failed internally", error=exc.__class__.__name__,
                            correlationId=getattr(req, "correlation_id", ""))
        return AuthFailure(500, "internal_error", "authentication failed internally", b"",
                           "internal_error")


def _connect_valkey(url: str, timeout: float):
    """A ValkeyClient for `url`; it connects lazily on the first command."""
    from ..valkey import ValkeyClient   # noqa: PLC0415 -- only when configured
    return ValkeyClient.from_url(url, timeout=timeout)
