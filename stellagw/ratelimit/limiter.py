"""RateLimiter: the rate-limit stage's one object (docs/original-router.md §8, decision flow).

    1. instance tier, always: per-key sliding windows in this process (WindowLimiter);
       deny -> 429 (scope "instance").
    2. activation gate: a local count of the last 5 minutes of requests; at or below
       process_back_pressure_when_more_than_per_5min the environment check is skipped
       (0 = always check).
    3. environment tier: the rules resolved for (service, path); none -> skipped.
    4. circuit breaker open -> skipped (fail open).
    5. one EVALSHA in Valkey; deny -> 429 (scope "environment"); any error -> fail open.

check() answers synchronously whenever Valkey is not asked (steps 1-4) and returns a
PendingCheck only for step 5, so most requests never touch the event loop. The pending
check calls its continuation (`then`) directly from the loop callback that read Valkey's
reply: no Task, no future, no call_soon hop. A Valkey outage can only ever make the
gateway more permissive, never a 5xx or a 401.

Keys: `key` is the caller's identity, "sub:<subject>" for an authenticated request or
"ip:<client address>" for an anonymous one (identity_key() builds it); `tenant` (the tid
claim) prefixes it. The instance counter is "<service>:<tenant>/<key>", the environment
counter "{<bucket>:<tenant>/<key>}:<service>:<route>:<window>:<index>".

Tenant quotas: tenant_rules count every identity of a tenant together, under the key
"<tenant>/*" in both tiers ("<service>:<tenant>/*" in this process). A request of a tenant
is checked against its identity's rules and its tenant's as one set, counted in both only
when all pass. rate_limiting.tenants maps a tenant to a plan, whose rules replace the
base's where it has some. A request without a tenant (anonymous, or a token without one)
meets the identity rules only.
"""
from __future__ import annotations

import asyncio
import time
from time import perf_counter

from ..valkey import (ValkeyAuthError, ValkeyClient, ValkeyConnectionError,
                      ValkeyConnectionReset, ValkeyError, ValkeyProtocolError, ValkeyReplyError,
                      ValkeyTimeout, pack_evalsha)
from .window import FiveMinuteCounter, WindowLimiter, wall_ms
from .breaker import CLOSED, HALF_OPEN, CircuitBreaker
from .decision import UNLIMITED, Decision
from .environment import SCRIPT, counter_prefixes, parse_reply
from .policy import (AUTH_PATH, IDENTITY, TENANT, EnvironmentPolicy, environment_settings,
                     instance_rule_sets)

__all__ = ["RateLimiter", "PendingCheck", "identity_key", "VALKEY_TIMEOUT", "MAX_KEYS"]

# The environment check runs on the request path: a Valkey that does not answer within this
# is a failure (fail open; the breaker counts it). Loopback/LAN Valkey answers in < 1 ms.
VALKEY_TIMEOUT = 0.25
# Instance-tier keys held at most (LRU beyond); ~0.5 KiB each with the two rules of docs/requirements.md §9.
MAX_KEYS = 100_000
# How often idle instance keys are dropped.
EVICT_INTERVAL = 1.0
# At most one log line per Valkey error type per this many seconds (the counters count all).
ERROR_LOG_INTERVAL = 10.0
# Packed EVALSHA commands kept per (identity, policy), so a returning identity costs no key
# building and no packing (hiredis formats every number with sprintf); the dict is cleared
# when it reaches this size (identities are unbounded, the busy ones come straight back).
COMMAND_CACHE_MAX = 4096


def identity_key(subject: str | None, client_address: str) -> str:
    """The `key` for check(): "sub:<subject>" when authenticated, else "ip:<address>" —
    the address as the ingress folds it (ingress.proxy.anonymous_key: an IPv6 /64 is one
    client)."""
    return f"sub:{subject}" if subject else f"ip:{client_address}"


def _escape_tenant(tenant: str) -> str:
    """A tenant as check() writes it in keys: "/" and "%" percent-escaped, so the split
    of "<tenant>/<key>" is unambiguous."""
    if "/" in tenant or "%" in tenant:
        tenant = tenant.replace("%", "%25").replace("/", "%2F")
    return tenant


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, ValkeyTimeout):
        return "timeout"
    if isinstance(exc, ValkeyAuthError):
        return "auth"
    if isinstance(exc, ValkeyProtocolError):
        return "protocol"
    if isinstance(exc, ValkeyConnectionError):
        return "connection"
    if isinstance(exc, ValkeyReplyError):
        return "reply"
    if isinstance(exc, ValueError):
        return "bad_reply"
    return "other"


class _Limits:
    """What applies to the requests of one plan (or of the base configuration): the
    instance windows per identity and per tenant, and the environment policy."""

    __slots__ = ("identity", "tenant", "environment")

    def __init__(self, identity: WindowLimiter | None, tenant: WindowLimiter | None,
                 environment: EnvironmentPolicy | None):
        self.identity = identity
        self.tenant = tenant
        self.environment = environment


class RateLimiter:
    """Built once per worker from the whole Settings; see the module docstring.

    now_ms: the clock, Unix milliseconds (injected by tests); it also drives the breaker
    when given. counters: plain ints (nested dicts) for the metrics exporter:

        allowed / rejected          {"instance": n, "environment": n}
        rejected_by_service         {("instance"|"environment", service): n}
        environment_skipped         {"gate": n, "no_rules": n, "breaker_open": n}
        environment_checks          n (EVALSHA round trips), environment_check_us (sum, µs)
        valkey_errors               {"timeout"|"connection"|"auth"|"protocol"|"reply"|
                                     "bad_reply"|"other": n}  (each one failed open)
        breaker_trips               {"failure_threshold"|"probe_failed"|"probe_timeout": n}
        breaker_transitions         {"closed->open": n, "open->half_open": n, ...}
        instance_keys_evicted       {"idle": n, "capacity": n}
        rejected_by_limit           {("instance"|"environment", "identity"|"tenant"): n}
    """

    def __init__(self, settings, log, now_ms=None, *, valkey_timeout: float = VALKEY_TIMEOUT,
                 max_keys: int = MAX_KEYS):
        self._log = log
        self._now_ms = now_ms or wall_ms
        self._clock = now_ms            # None: WindowLimiter.decide() reads wall_ms() in C
        rl = settings.rate_limiting
        self._counters: dict = {
            "allowed": {"instance": 0, "environment": 0},
            "rejected": {"instance": 0, "environment": 0},
            "rejected_by_service": {},
            "environment_skipped": {"gate": 0, "no_rules": 0, "breaker_open": 0},
            "environment_checks": 0,
            "environment_check_us": 0,
            "valkey_errors": {},
            "breaker_trips": {},
            "breaker_transitions": {},
            "instance_keys_evicted": {"idle": 0, "capacity": 0},
            "rejected_by_limit": {},
        }
        self.check_observer = None   # callable(seconds) per environment check (a histogram)
        self._allowed = self._counters["allowed"]
        self._rejected = self._counters["rejected"]
        self._by_service = self._counters["rejected_by_service"]
        self._skipped = self._counters["environment_skipped"]
        self._by_limit = self._counters["rejected_by_limit"]

        # --- instance tier: one WindowLimiter per rule set (a plan that keeps the base's
        # identity rules shares the base's limiter: the keys are per identity anyway).
        base_identity, base_tenant = instance_rule_sets(settings)
        self.instance_rules = base_identity.rules if base_identity else ()
        self._instance = self._window(base_identity, IDENTITY, max_keys)
        base_tenant_window = self._window(base_tenant, TENANT, max_keys)
        self._windows = [w for w in (self._instance, base_tenant_window) if w is not None]

        # --- environment tier
        self._policy: EnvironmentPolicy | None = None
        self.client: ValkeyClient | None = None
        self.breaker: CircuitBreaker | None = None
        self._bucket = ""
        self._commands: dict[tuple, bytes] = {}
        env, address = environment_settings(settings)
        plan_policies: dict[str, EnvironmentPolicy] = {}
        if env is not None:
            auth_made = rl.for_environment is None
            policy = EnvironmentPolicy(
                env, default_names=(f"{AUTH_PATH}.requestsPerMinute",) if auth_made else None)
            for name, plan in rl.plans.items():
                if plan.for_environment is not None:
                    plan_policies[name] = EnvironmentPolicy(
                        env, plan.for_environment, f"rate_limiting.plans.{name}.for_environment")
            if not address:
                log.event("warning", "rate_limiting.for_environment has no valkey_connection "
                                     "(nor gateway.auth.rateLimiting.redisConnectionString): "
                                     "the environment tier is off")
            elif not (policy.has_rules or any(p.has_rules for p in plan_policies.values())):
                log.event("info", "rate_limiting.for_environment has no rules at any level: "
                                  "the environment tier is off")
            else:
                # A bad address raises ValueError here, when the gateway is being built.
                self.client = ValkeyClient.from_url(address, timeout=valkey_timeout)
                clock = (lambda: self._now_ms() / 1000) if now_ms else time.monotonic
                self.breaker = CircuitBreaker(env.circuit_breaker, log, self._counters,
                                              clock=clock, name=self.client.name)
                self._policy = policy
                self._bucket = env.valkey_bucket
        if self._policy is None:
            plan_policies = {}

        # --- what applies to whom: the base, and each plan (shared by its tenants)
        self._base = _Limits(self._instance, base_tenant_window, self._policy)
        plans: dict[str, _Limits] = {}
        for name in rl.plans:
            identity, tenant = instance_rule_sets(settings, name)
            plans[name] = _Limits(
                self._instance if identity == base_identity else self._window(identity, IDENTITY,
                                                                             max_keys),
                base_tenant_window if tenant == base_tenant else self._window(tenant, TENANT,
                                                                             max_keys),
                plan_policies.get(name, self._policy))
            for w in (plans[name].identity, plans[name].tenant):
                if w is not None and w not in self._windows:
                    self._windows.append(w)
        # Keyed as check() escapes a tenant for keys (injective), so it looks up what it has.
        self._tenants = {_escape_tenant(tenant): plans[entry.plan]
                         for tenant, entry in rl.tenants.items()}
        # Tenant-aware checking is needed when some tenant is treated unlike an identity of
        # the base: tenant rules anywhere, or a tenant on a plan. Otherwise check() runs
        # exactly as before tenant quotas existed.
        self._per_tenant = bool(self._tenants) or base_tenant_window is not None or (
            self._policy is not None and self._policy.has_tenant_rules)

        # --- activation gate (it only ever decides whether to ask Valkey)
        self._threshold = rl.process_back_pressure_when_more_than_per_5min
        self._gate = (FiveMinuteCounter() if self._threshold > 0 and self._policy is not None
                      else None)

        self.enabled = bool(self._windows) or self._policy is not None
        self._instance_only = (self._instance is not None and self._policy is None
                               and not self._per_tenant)
        # Only instance windows, some of them per tenant: check()'s second shortcut.
        self._instance_tenants = self._per_tenant and self._policy is None and self.enabled
        self._evict_handle: asyncio.TimerHandle | None = None
        self._error_logged: dict[str, float] = {}
        self._error_suppressed: dict[str, int] = {}

    @staticmethod
    def _window(rules, applies: str, max_keys: int) -> WindowLimiter | None:
        if rules is None:
            return None
        return WindowLimiter(rules.rules, max_keys, applies_to=applies, names=rules.names)

    @property
    def counters(self) -> dict:
        if self._windows:
            # The instance tier counts its decisions in C (WindowLimiter.decide()), each
            # request in the one limiter its check was made on.
            self._allowed["instance"] = sum(w.allowed_count for w in self._windows)
            self._rejected["instance"] = sum(w.denied_count for w in self._windows)
        return self._counters

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Arm idle-key eviction; load the script into Valkey (best effort: a Valkey that is
        down now only means failing open until it answers)."""
        loop = asyncio.get_running_loop()
        if self._windows and self._evict_handle is None:
            self._evict_handle = loop.call_later(EVICT_INTERVAL, self._evict)
        if self.client is not None:
            try:
                await self.client.execute("SCRIPT", "LOAD", SCRIPT.source)
            except ValkeyError as exc:
                self._count_error(exc)
                self._log.event("warning", "environment rate limiting: Valkey not available "
                                           "at start; failing open until it is",
                                valkey=self.client.name, error=str(exc))
            else:
                self._log.event("info", "environment rate limiting ready",
                                valkey=self.client.name, script=SCRIPT.sha)

    async def close(self) -> None:
        if self._evict_handle is not None:
            self._evict_handle.cancel()
            self._evict_handle = None
        if self.client is not None:
            await self.client.close()

    def _evict(self) -> None:
        counters = self._counters["instance_keys_evicted"]
        now = self._now_ms()
        for w in self._windows:
            counters["idle"] += w.evict_idle(now)
        counters["capacity"] = sum(w.capacity_evictions for w in self._windows)
        self._evict_handle = asyncio.get_running_loop().call_later(EVICT_INTERVAL, self._evict)

    # --- the check -----------------------------------------------------------------------------

    def check(self, key: str, tenant: str | None, service: str, route: str, path: str):
        """Decision, or a PendingCheck when Valkey must be asked (see the module).

        key: identity_key(sub, client address); tenant: the tid claim or None; service: the
        matched microservice; route: its route template (unused for keys: the environment
        overrides match `path`, the normalised request path)."""
        if tenant:
            if "/" in tenant or "%" in tenant:
                tenant = tenant.replace("%", "%25").replace("/", "%2F")
            identity = f"{tenant}/{key}"
        else:
            identity = key
        if self._instance_only:
            # Every routed request comes here when only the instance tier is configured
            # (issue #5): one C call reads the clock, counts and builds the Decision.
            clock = self._clock
            decision = self._instance.decide(f"{service}:{identity}",
                                             None if clock is None else clock())
            if not decision.allowed:
                self._instance_denied(service, decision)
            return decision
        if self._per_tenant:
            # Tenant rules or plans: their own method, so that without them this one (and
            # its frame) is what it was before tenant quotas.
            return self._check_tenant(key, tenant, identity, service, path)

        gate = self._gate
        inst = self._instance
        # Only the local tiers read this clock; the environment tier uses Valkey's.
        now = self._now_ms() if gate is not None or inst is not None else 0
        if gate is not None:
            gate.add(now)

        decision = UNLIMITED
        if inst is not None:
            decision = inst.decide(f"{service}:{identity}", now)
            if not decision.allowed:
                self._instance_denied(service, decision)
                return decision

        resolver = self._policy
        if resolver is None:
            return decision
        return self._to_environment(decision, resolver, gate, now, identity, tenant, key,
                                    service, path)

    def _check_tenant(self, key: str, tenant: str | None, identity: str, service: str,
                      path: str):
        """check() when some tenant is treated apart (tenant rules, plans); tenant and
        identity come escaped from check(), and _tenants is keyed by escaped names."""
        clock = self._clock
        if tenant:
            limits = self._tenants.get(tenant, self._base)
            window = limits.tenant
        else:
            limits = self._base
            window = None
        inst = limits.identity
        if self._instance_tenants:
            # Only the instance tier: still one C call per request.
            if window is not None:
                now = None if clock is None else clock()
                if inst is not None:
                    decision = inst.decide_with(f"{service}:{identity}", window,
                                                f"{service}:{tenant}/*", now)
                else:
                    decision = window.decide(f"{service}:{tenant}/*", now)
            elif inst is not None:
                decision = inst.decide(f"{service}:{identity}", None if clock is None else clock())
            else:
                return UNLIMITED
            if not decision.allowed:
                self._instance_denied(service, decision)
            return decision

        gate = self._gate
        # Only the local tiers read this clock; the environment tier uses Valkey's.
        now = (self._now_ms() if gate is not None or inst is not None or window is not None
               else 0)
        if gate is not None:
            gate.add(now)

        decision = UNLIMITED
        if window is not None:
            if inst is not None:
                decision = inst.decide_with(f"{service}:{identity}", window,
                                            f"{service}:{tenant}/*", now)
            else:
                decision = window.decide(f"{service}:{tenant}/*", now)
        elif inst is not None:
            decision = inst.decide(f"{service}:{identity}", now)
        if not decision.allowed:
            self._instance_denied(service, decision)
            return decision

        resolver = limits.environment
        if resolver is None:
            return decision
        return self._to_environment(decision, resolver, gate, now, identity, tenant, key,
                                    service, path)

    def _to_environment(self, decision: Decision, resolver, gate, now, identity: str,
                        tenant: str | None, key: str, service: str, path: str):
        """The environment tier once the instance tier allowed: skipped below the gate's
        threshold, without rules for the route, or while the breaker is open."""
        if gate is not None and gate.count(now) <= self._threshold:
            self._skipped["gate"] += 1
            return decision
        check = resolver.resolve(service, path)
        if check is not None and not tenant:
            # A request without a tenant is checked by its identity's rules alone
            # (without tenant rules identity_only is the check itself).
            check = check.identity_only
        if check is None:
            self._skipped["no_rules"] += 1
            return decision
        breaker = self.breaker
        if breaker.state != CLOSED and not breaker.allow():
            self._skipped["breaker_open"] += 1
            return decision
        return self._environment(decision, identity, tenant, key, service, check)

    def _instance_denied(self, service: str, decision: Decision) -> None:
        k = ("instance", service)
        self._by_service[k] = self._by_service.get(k, 0) + 1
        k = ("instance", decision.applies_to)
        self._by_limit[k] = self._by_limit.get(k, 0) + 1

    def _environment(self, instance: Decision, identity: str, tenant: str | None, key: str,
                     service: str, check):
        """Send the EVALSHA; a PendingCheck, or the instance decision when it cannot even
        be sent (failing open)."""
        commands = self._commands
        # One Check per counter set (and a tenant is on one plan), so (identity, check)
        # names the command.
        ck = (identity, check)
        command = commands.get(ck)
        if command is None:
            if len(commands) >= COMMAND_CACHE_MAX:
                commands.clear()
            command = commands[ck] = pack_evalsha(
                SCRIPT, counter_prefixes(self._bucket, check, identity, tenant, key), check.argv)
        pending = PendingCheck(self, instance, service, check, self.breaker.state == HALF_OPEN)
        try:
            self.client.evalsha_then(SCRIPT, command, pending._on_reply)
        except Exception as exc:  # noqa: BLE001 -- fail open on anything, count it, log it
            pending._done = True
            return self._environment_failed(exc, instance, pending.started)
        return pending

    def _environment_failed(self, exc: BaseException, instance: Decision,
                            started: float) -> Decision:
        self._count_check(started)
        self._count_error(exc)
        if not isinstance(exc, ValkeyConnectionReset):
            # A check that failed only because another one timed out and the connection was
            # reset is not one more failure of the server: counted, it made one 0.3 s
            # hiccup under load worth every check in flight (50 "consecutive failures"), and
            # the breaker opened on the first (docs/security.md §3d row 39).
            self.breaker.failure(f"{_error_type(exc)}: {exc}")
        return instance

    def _count_check(self, started: float) -> None:
        elapsed = perf_counter() - started
        counters = self._counters
        counters["environment_checks"] += 1
        counters["environment_check_us"] += int(elapsed * 1e6)
        if self.check_observer is not None:
            self.check_observer(elapsed)

    def _environment_decided(self, reply, instance: Decision, service: str, check,
                             started: float) -> Decision:
        try:
            allowed, rule, current, limit, window, reset_ms, now_ms, _ = parse_reply(reply)
            reset_s = -(-(now_ms + reset_ms) // 1000)
            applies, name = check.applies[rule], check.names[rule]
            if allowed:
                decision = Decision(True, "environment", limit, limit - current, reset_s, 0,
                                    current, window, applies, name)
            else:
                decision = Decision(False, "environment", limit, 0, reset_s,
                                    max(1, -(-reset_ms // 1000)), current, window, applies,
                                    name)
        # A reply we cannot read fails open too, as do numbers beyond Decision's int64.
        except Exception as exc:  # noqa: BLE001
            return self._environment_failed(exc, instance, started)
        self._count_check(started)
        self.breaker.success()
        if allowed:
            self._allowed["environment"] += 1
            # Headers describe the tighter of the two tiers.
            if instance.scope is not None and instance.remaining <= decision.remaining:
                return instance
            return decision
        self._rejected["environment"] += 1
        k = ("environment", service)
        self._by_service[k] = self._by_service.get(k, 0) + 1
        k = ("environment", applies)
        self._by_limit[k] = self._by_limit.get(k, 0) + 1
        return decision

    def _count_error(self, exc: BaseException) -> None:
        kind = _error_type(exc)
        errors = self._counters["valkey_errors"]
        errors[kind] = errors.get(kind, 0) + 1
        now = time.monotonic()
        last = self._error_logged.get(kind)
        if last is not None and now - last < ERROR_LOG_INTERVAL:
            self._error_suppressed[kind] = self._error_suppressed.get(kind, 0) + 1
            return
        self._error_logged[kind] = now
        suppressed = self._error_suppressed.pop(kind, 0)
        self._log.event("warning", "environment rate limit check failed; failing open",
                        errorType=kind, error=str(exc) or exc.__class__.__name__,
                        valkey=self.client.name if self.client else None,
                        **({"similarSinceLastLog": suppressed} if suppressed else {}))


class PendingCheck:
    """An environment check waiting for Valkey: what RateLimiter.check() returns instead of
    a Decision.

        pending.then(callback, *args)   # callback(decision, *args), exactly once
        decision = await pending        # or this; cancelling the awaiting task cancels it
        pending.cancel()                # the callback is never called

    The callback runs directly from the loop callback that read Valkey's reply or the
    error (timeout, lost connection...), or from then() itself when the check is decided
    already. The limiter's counters and breaker are updated before it runs, so what it
    raises (reported to the loop's exception handler) changes nothing here. `started`
    is the perf_counter() when the command went out.
    """

    __slots__ = ("_limiter", "_instance", "_service", "_check", "_probe", "_done",
                 "_callback", "_args", "_decision", "started")

    def __init__(self, limiter: RateLimiter, instance: Decision, service: str, check,
                 probe: bool):
        self._limiter = limiter
        self._instance = instance
        self._service = service
        self._check = check             # the policy.Check sent: it names the reply's rule
        self._probe = probe             # the half-open breaker's one probe
        self._done = False              # decided or cancelled
        self._callback = None
        self._args = ()
        self._decision: Decision | None = None   # decided before then() was called
        self.started = perf_counter()

    def then(self, callback, *args) -> None:
        self._callback = callback
        self._args = args
        decision = self._decision
        if decision is not None:
            self._decision = None
            callback(decision, *args)

    def cancel(self) -> None:
        """Give up: whatever Valkey answers is discarded, and in half-open a cancelled
        probe lets the next check probe."""
        if not self._done:
            self._done = True
            self._callback = None
            if self._probe:
                self._limiter.breaker.abandon()

    def _on_reply(self, reply, error) -> None:
        if self._done:
            return
        self._done = True
        limiter = self._limiter
        if error is None:
            decision = limiter._environment_decided(reply, self._instance, self._service,
                                                    self._check, self.started)
        else:
            decision = limiter._environment_failed(error, self._instance, self.started)
        callback = self._callback
        if callback is None:
            self._decision = decision
        else:
            callback(decision, *self._args)

    def __await__(self):
        fut = _Awaiter(self)
        self.then(_settle, fut)
        return (yield from fut)


class _Awaiter(asyncio.Future):
    """What `await pending` waits on. Cancelling the awaiting task cancels the check at
    once: a loop iteration later (when the task would see it), Valkey's reply may have
    been read and counted already."""

    def __init__(self, pending: PendingCheck):
        super().__init__()
        self._pending = pending

    def cancel(self, msg=None) -> bool:
        self._pending.cancel()
        return super().cancel(msg)


def _settle(decision: Decision, fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(decision)
