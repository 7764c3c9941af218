"""Rate limiting: instance sliding windows, the activation gate, the Valkey environment tier
behind a circuit breaker (docs/design.md §5, docs/original-router.md §8; semantics in
docs/rate-limiting.md).

    limiter = RateLimiter(settings, log)           # once per worker
    await limiter.start()
    result = limiter.check(identity_key(sub, client_ip), tenant, service, route, path)
    if result.__class__ is not Decision:           # a PendingCheck: Valkey is being asked
        result = await result                      # (or result.then(callback, *args))
    if not result.allowed:
        status, headers, body = rejection(result, correlation_id)
    ...
    await limiter.close()

Both tiers count per identity (`rules`) and per tenant (`tenant_rules`), plans giving
tenants their own quotas; a denied Decision says which limit (applies_to, rule).

Modules: policy (which rules apply), decision (Decision, the 429), environment (the Lua
script), breaker (the circuit breaker), limiter (RateLimiter, PendingCheck).
"""
from .decision import UNLIMITED, Decision, rate_limit_headers, rejection
from .limiter import PendingCheck, RateLimiter, identity_key

__all__ = ["RateLimiter", "PendingCheck", "Decision", "UNLIMITED", "rejection",
           "rate_limit_headers", "identity_key"]
