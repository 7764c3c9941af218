"""Which rules apply: the instance rules, and the environment rules for (service, path).

Environment rules are inherited environment -> microservice -> route with replacement, not
merge (docs/original-router.md §8): the most specific level that has rules wins, and a level without
rules falls through to the less specific one. Route overrides match the request's
normalised path:

* ``exact``  — the whole path, ignoring case and a trailing slash;
* ``prefix`` — a literal, case-sensitive prefix; a trailing ``*`` is dropped
  (``/api/scans/*`` matches ``/api/scans/42``); the longest prefix wins;
* ``regex``  — ``re.search`` (anchor with ``^...$`` for a full match), compiled at startup
  (config.py already rejects a bad one); the longest pattern wins.

exact beats prefix beats regex; equal specificity goes to the route written first. A route
without rules is ignored. The gateway's ``auth.rateLimiting`` block is mapped onto the same
engine here (docs/rate-limiting.md, "The gateway.auth.rateLimiting block").
"""
from __future__ import annotations

import dataclasses
import re

from ..config import EnvironmentLimitSettings, RateLimitRule, Settings

__all__ = ["Policy", "EnvironmentPolicy", "instance_rules", "environment_settings", "escape",
           "escape_tag"]

# Resolutions of (service, path) are cached; the cache is dropped when it reaches this size
# (paths carry ids, so the set of paths is unbounded while the set of answers is tiny).
_CACHE_MAX = 8192


def escape(text: str) -> str:
    """Percent-escape the characters that delimit a Valkey key (``{ } : %``) so that
    distinct (identity, service, route) triples can never produce the same key and an
    identity cannot move the hash tag."""
    if "%" in text or "{" in text or "}" in text or ":" in text:
        text = (text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
                .replace(":", "%3A"))
    return text


def escape_tag(text: str) -> str:
    """Percent-escape ``{ } %`` for text inside a key's hash tag (``:`` is harmless there:
    the tag ends at the ``}``)."""
    if "%" in text or "{" in text or "}" in text:
        text = text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return text


def _rules(rules: tuple[RateLimitRule, ...]) -> tuple[tuple[int, int], ...]:
    return tuple((r.max_requests, r.per_seconds) for r in rules)


@dataclasses.dataclass(frozen=True, slots=True)
class Policy:
    """The environment rules for one target, and how its counters are named."""
    rules: tuple[tuple[int, int], ...]   # (max_requests, per_seconds), all must pass
    service: str
    route: str                           # the config route name, or "*" (service-wide)
    level: str                           # "environment" | "microservice" | "route"
    target: str                          # "<service>:<route>" as it appears in keys
    argv: tuple[int, ...]                # the Lua script's ARGV: limit, window, limit, window...

    @classmethod
    def make(cls, rules, service: str, route: str, level: str) -> Policy:
        argv = tuple(x for rule in rules for x in rule)
        target = f"{escape(service)}:{escape(route) if route != '*' else '*'}"
        return cls(rules, service, route, level, target, argv)


def _normal_exact(path: str) -> str:
    path = path.lower().rstrip("/")
    return path or "/"


class _ServicePolicy:
    """The route overrides of one microservice, indexed for matching."""

    def __init__(self, service: str, settings, fallback: Policy | None):
        rules = _rules(settings.rules)
        self.default = Policy.make(rules, service, "*", "microservice") if rules else fallback
        self.exact: dict[str, Policy] = {}
        prefixes: list[tuple[str, Policy]] = []
        regexes: list[tuple[str, re.Pattern, Policy]] = []
        for name, route in settings.routes.items():
            route_rules = _rules(route.rules)
            if not route_rules:
                continue                 # nothing to say: the service level applies
            policy = Policy.make(route_rules, service, name, "route")
            if route.match_type == "exact":
                self.exact.setdefault(_normal_exact(route.pattern), policy)
            elif route.match_type == "prefix":
                prefix = route.pattern[:-1] if route.pattern.endswith("*") else route.pattern
                prefixes.append((prefix, policy))
            else:
                regexes.append((route.pattern, re.compile(route.pattern), policy))
        # Stable sorts: equal lengths keep the order of the configuration.
        prefixes.sort(key=lambda p: len(p[0]), reverse=True)
        regexes.sort(key=lambda r: len(r[0]), reverse=True)
        self.prefixes = tuple(prefixes)
        self.regexes = tuple((rx.search, policy) for _, rx, policy in regexes)
        self.has_routes = bool(self.exact or self.prefixes or self.regexes)
        self._cache: dict[str, Policy | None] = {}

    def resolve(self, path: str) -> Policy | None:
        if not self.has_routes:
            return self.default
        try:
            return self._cache[path]
        except KeyError:
            pass
        policy = self.exact.get(_normal_exact(path))
        if policy is None:
            for prefix, candidate in self.prefixes:
                if path.startswith(prefix):
                    policy = candidate
                    break
        if policy is None:
            for search, candidate in self.regexes:
                if search(path) is not None:
                    policy = candidate
                    break
        if policy is None:
            policy = self.default
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[path] = policy
        return policy


class EnvironmentPolicy:
    """resolve(service, path) -> the Policy of the environment check, or None (no rules)."""

    def __init__(self, env: EnvironmentLimitSettings):
        self._env_rules = _rules(env.rules)
        self._services: dict[str, _ServicePolicy] = {}
        self._defaults: dict[str, Policy | None] = {}
        for service, settings in env.microservices.items():
            self._services[service] = _ServicePolicy(service, settings,
                                                     self._default(service))

    def _default(self, service: str) -> Policy | None:
        try:
            return self._defaults[service]
        except KeyError:
            policy = (Policy.make(self._env_rules, service, "*", "environment")
                      if self._env_rules else None)
            # Service names come from registered microservices (a bounded set), so this
            # dict stays small; each service gets its own counters under the defaults.
            self._defaults[service] = policy
            return policy

    def resolve(self, service: str, path: str) -> Policy | None:
        svc = self._services.get(service)
        if svc is None:
            return self._default(service)
        return svc.resolve(path)

    @property
    def has_rules(self) -> bool:
        """False when no level anywhere has a rule: the environment check never runs."""
        return bool(self._env_rules) or any(
            s.default is not None or s.has_routes for s in self._services.values())


# --------------------------------------------------------------------------- settings mapping

def instance_rules(settings: Settings) -> tuple[tuple[int, int], ...]:
    """rate_limiting.for_instance.rules, plus gateway.auth.rateLimiting when enabled:
    (burstSize per 1 s) unless burstSize is 0, and (requestsPerMinute per 60 s)."""
    rules = list(_rules(settings.rate_limiting.for_instance.rules))
    auth = settings.gateway.auth.rate_limiting
    if auth.enabled:
        if auth.burst_size > 0:
            rules.append((auth.burst_size, 1))
        rules.append((auth.requests_per_minute, 60))
    return tuple(rules)


def environment_settings(settings: Settings) -> tuple[EnvironmentLimitSettings | None, str]:
    """The environment tier's settings and its Valkey address ("" when it has none).

    rate_limiting.for_environment when present; its valkey_connection falls back to
    gateway.auth.rateLimiting.redisConnectionString. With no for_environment, an enabled
    auth.rateLimiting block with a redisConnectionString makes one: requestsPerMinute per
    60 s for every service, default circuit breaker and bucket.
    """
    env = settings.rate_limiting.for_environment
    auth = settings.gateway.auth.rate_limiting
    redis = auth.redis_connection_string if auth.enabled else ""
    if env is not None:
        return env, env.valkey_connection or redis
    if redis:
        rule = RateLimitRule(max_requests=auth.requests_per_minute, per_seconds=60)
        return EnvironmentLimitSettings(valkey_connection=redis, rules=(rule,)), redis
    return None, ""
