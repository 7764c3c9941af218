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
"""
from __future__ import annotations

import asyncio
import time
from time import perf_counter

from ..valkey import (ValkeyAuthError, ValkeyClient, ValkeyConnectionError, ValkeyError,
                      ValkeyProtocolError, ValkeyReplyError, ValkeyTimeout, pack_evalsha)
from .window import FiveMinuteCounter, WindowLimiter, wall_ms
from .breaker import CLOSED, HALF_OPEN, CircuitBreaker
from .decision import UNLIMITED, Decision
from .environment import SCRIPT, counter_prefix, parse_reply
from .policy import EnvironmentPolicy, environment_settings, instance_rules

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
    """The `key` for check(): "sub:<subject>" when authenticated, else "ip:<address>"."""
    return f"sub:{subject}" if subject else f"ip:{client_address}"


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
        }
        self.check_observer = None   # callable(seconds) per environment check (a histogram)
        self._allowed = self._counters["allowed"]
        self._rejected = self._counters["rejected"]
        self._by_service = self._counters["rejected_by_service"]
        self._skipped = self._counters["environment_skipped"]

        # --- instance tier
        rules = instance_rules(settings)
        self.instance_rules = rules
        self._instance = WindowLimiter(rules, max_keys) if rules else None

        # --- environment tier
        self._policy: EnvironmentPolicy | None = None
        self.client: ValkeyClient | None = None
        self.breaker: CircuitBreaker | None = None
        self._bucket = ""
        self._commands: dict[tuple[str, str], bytes] = {}
        env, address = environment_settings(settings)
        if env is not None:
            policy = EnvironmentPolicy(env)
            if not address:
                log.event("warning", "rate_limiting.for_environment has no valkey_connection "
                                     "(nor gateway.auth.rateLimiting.redisConnectionString): "
                                     "the environment tier is off")
            elif not policy.has_rules:
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

        # --- activation gate (it only ever decides whether to ask Valkey)
        self._threshold = rl.process_back_pressure_when_more_than_per_5min
        self._gate = (FiveMinuteCounter() if self._threshold > 0 and self._policy is not None
                      else None)

        self.enabled = self._instance is not None or self._policy is not None
        self._instance_only = self._instance is not None and self._policy is None
        self._evict_handle: asyncio.TimerHandle | None = None
        self._error_logged: dict[str, float] = {}
        self._error_suppressed: dict[str, int] = {}

    @property
    def counters(self) -> dict:
        inst = self._instance
        if inst is not None:
            # The instance tier counts its decisions in C (WindowLimiter.decide()).
            self._allowed["instance"] = inst.allowed_count
            self._rejected["instance"] = inst.denied_count
        return self._counters

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Arm idle-key eviction; load the script into Valkey (best effort: a Valkey that is
        down now only means failing open until it answers)."""
        loop = asyncio.get_running_loop()
        if self._instance is not None and self._evict_handle is None:
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
        inst = self._instance
        counters = self._counters["instance_keys_evicted"]
        counters["idle"] += inst.evict_idle(self._now_ms())
        counters["capacity"] = inst.capacity_evictions
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
                self._instance_denied(service)
            return decision

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
                self._instance_denied(service)
                return decision

        resolver = self._policy
        if resolver is None:
            return decision
        if gate is not None and gate.count(now) <= self._threshold:
            self._skipped["gate"] += 1
            return decision
        policy = resolver.resolve(service, path)
        if policy is None:
            self._skipped["no_rules"] += 1
            return decision
        breaker = self.breaker
        if breaker.state != CLOSED and not breaker.allow():
            self._skipped["breaker_open"] += 1
            return decision
        return self._environment(decision, identity, service, policy)

    def _instance_denied(self, service: str) -> None:
        k = ("instance", service)
        self._by_service[k] = self._by_service.get(k, 0) + 1

    def _environment(self, instance: Decision, identity: str, service: str, policy):
        """Send the EVALSHA; a PendingCheck, or the instance decision when it cannot even
        be sent (failing open)."""
        commands = self._commands
        # One Policy per target ("<service>:<route>"), so the target names the policy.
        ck = (identity, policy.target)
        command = commands.get(ck)
        if command is None:
            if len(commands) >= COMMAND_CACHE_MAX:
                commands.clear()
            command = commands[ck] = pack_evalsha(
                SCRIPT, (counter_prefix(self._bucket, identity, policy),), policy.argv)
        pending = PendingCheck(self, instance, service, self.breaker.state == HALF_OPEN)
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
        self.breaker.failure(f"{_error_type(exc)}: {exc}")
        return instance

    def _count_check(self, started: float) -> None:
        elapsed = perf_counter() - started
        counters = self._counters
        counters["environment_checks"] += 1
        counters["environment_check_us"] += int(elapsed * 1e6)
        if self.check_observer is not None:
            self.check_observer(elapsed)

    def _environment_decided(self, reply, instance: Decision, service: str,
                             started: float) -> Decision:
        try:
            allowed, _rule, current, limit, window, reset_ms, now_ms, _ = parse_reply(reply)
            reset_s = -(-(now_ms + reset_ms) // 1000)
            if allowed:
                decision = Decision(True, "environment", limit, limit - current, reset_s, 0,
                                    current, window)
            else:
                decision = Decision(False, "environment", limit, 0, reset_s,
                                    max(1, -(-reset_ms // 1000)), current, window)
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

    __slots__ = ("_limiter", "_instance", "_service", "_probe", "_done", "_callback",
                 "_args", "_decision", "started")

    def __init__(self, limiter: RateLimiter, instance: Decision, service: str, probe: bool):
        self._limiter = limiter
        self._instance = instance
        self._service = service
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
                                                    self.started)
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
