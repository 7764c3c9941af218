"""Which rules apply: the instance rules, and the environment rules for (service, path),
for the base configuration and for each plan (tenant quotas).

Two kinds of rules, side by side at every level: ``rules`` count per identity (the Router's),
``tenant_rules`` per tenant, every identity of the tenant together. Each kind is resolved
on its own; a level without rules of a kind falls through to the less specific one for
that kind.

Environment rules are inherited environment -> microservice -> route with replacement, not
merge (docs/original-router.md §8): the most specific level that has rules wins, and a level without
rules falls through to the less specific one. Route overrides match the request's
normalised path:

* ``exact``  — the whole path, ignoring case and a trailing slash;
* ``prefix`` — a literal, case-sensitive prefix; a trailing ``*`` is dropped
  (``/api/scans/*`` matches ``/api/scans/42``); the longest prefix wins;
* ``regex``  — ``re.search`` (anchor with ``^...$`` for a full match), compiled at startup
  (config.py already rejects a bad one); the longest pattern wins.

A trailing slash is not significant for any of them, as for the router: a prefix or a
regex matches a path when it matches the path with or without its trailing slash.

exact beats prefix beats regex; equal specificity goes to the route written first. A route
without rules (of the kind) is ignored. A plan overlays the base: where it has rules of a
kind at a level, they replace the base's at that level; the route patterns are the base's.
The gateway's ``auth.rateLimiting`` block is mapped onto the same engine here
(docs/rate-limiting.md, "The gateway.auth.rateLimiting block").
"""
from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

from ..config import (EnvironmentLimitSettings, PlanEnvironmentLimitSettings, RateLimitRule,
                      Settings)

__all__ = ["Policy", "Check", "RuleSet", "EnvironmentPolicy", "instance_rules",
           "instance_rule_sets", "environment_settings", "escape", "escape_tag", "IDENTITY",
           "TENANT"]

# Resolutions of (service, path) are cached; the cache is dropped when it reaches this size
# (paths carry ids, so the set of paths is unbounded while the set of answers is tiny).
_CACHE_MAX = 8192
# Only paths this short are cached: a client's path may be as long as maxUrlLength (8 KB),
# and 8,192 of them held 66 MB per microservice with route rules (each plan has its own),
# in every worker. Long paths are matched each time.
_CACHE_PATH_MAX = 256

# Whose requests a rule counts (Decision.applies_to, the 429's "appliesTo").
IDENTITY, TENANT = "identity", "tenant"

ENVIRONMENT_PATH = "rate_limiting.for_environment"
INSTANCE_PATH = "rate_limiting.for_instance"
AUTH_PATH = "gateway.auth.rateLimiting"


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


class RuleSet(NamedTuple):
    """Rules of one kind at one place, with the configuration path of each (what a 429
    names as its "rule")."""
    rules: tuple[tuple[int, int], ...]     # (max_requests, per_seconds), all must pass
    names: tuple[str, ...]


def _rule_set(rules: tuple[RateLimitRule, ...], path: str) -> RuleSet | None:
    if not rules:
        return None
    return RuleSet(tuple((r.max_requests, r.per_seconds) for r in rules),
                   tuple(f"{path}[{i}]" for i in range(len(rules))))


def _overlay(plan_rules, plan_path: str | None, base_rules, base_path: str) -> RuleSet | None:
    """A plan's rules where it has some, else the base's."""
    if plan_rules:
        return _rule_set(plan_rules, plan_path)
    return _rule_set(base_rules, base_path)


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Policy:
    """The environment rules of one kind for one target, and how its counters are named.
    Compared and hashed by identity: one object per (plan, kind, target)."""
    rules: tuple[tuple[int, int], ...]   # (max_requests, per_seconds), all must pass
    service: str
    route: str                           # the config route name, or "*" (service-wide)
    level: str                           # "environment" | "microservice" | "route"
    target: str                          # "<service>:<route>" as it appears in keys
    applies: str = IDENTITY              # whose requests the counters count
    names: tuple[str, ...] = ()          # each rule's configuration path

    @classmethod
    def make(cls, rules, service: str, route: str, level: str, applies: str = IDENTITY,
             names: tuple[str, ...] = ()) -> Policy:
        target = f"{escape(service)}:{escape(route) if route != '*' else '*'}"
        return cls(tuple(rules), service, route, level, target, applies,
                   tuple(names) or ("",) * len(rules))

    @property
    def argv(self) -> tuple[int, ...]:
        """The Lua script's ARGV for this policy alone (every rule on KEYS[1])."""
        return tuple(x for rule in self.rules for x in (*rule, 1))


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Check:
    """One environment check: the identity's policy and the tenant's, either may be None.

    rules / applies / names: every rule of the check, the identity's first, in the order
    of the script's ARGV (the reply's `rule` indexes them). argv: the script's
    `limit, window_s, key` triplets, key 1 = the first counter prefix, 2 = the second.
    identity_only: the check of a request without a tenant (no tenant counters), or None
    when nothing would be left. Compared and hashed by identity."""
    identity: Policy | None
    tenant: Policy | None
    rules: tuple[tuple[int, int], ...]
    applies: tuple[str, ...]
    names: tuple[str, ...]
    argv: tuple[int, ...]
    identity_only: Check | None

    @classmethod
    def make(cls, identity: Policy | None, tenant: Policy | None) -> Check | None:
        if identity is None and tenant is None:
            return None
        parts = [p for p in (identity, tenant) if p is not None]
        argv = tuple(x for k, p in enumerate(parts, 1) for rule in p.rules for x in (*rule, k))
        check = cls(identity, tenant, tuple(r for p in parts for r in p.rules),
                    tuple(p.applies for p in parts for _ in p.rules),
                    tuple(n for p in parts for n in p.names), argv, None)
        alone = check if tenant is None else (cls.make(identity, None) if identity else None)
        object.__setattr__(check, "identity_only", alone)
        return check


def _normal_exact(path: str) -> str:
    path = path.lower().rstrip("/")
    return path or "/"


class _Matcher:
    """One kind's route overrides of one microservice, indexed for matching."""

    def __init__(self, default: Policy | None, routes: list[tuple[str, str, str, Policy]]):
        self.default = default
        self.exact: dict[str, Policy] = {}
        prefixes: list[tuple[str, Policy]] = []
        regexes: list[tuple[str, re.Pattern, Policy]] = []
        for _name, pattern, match_type, policy in routes:
            if match_type == "exact":
                self.exact.setdefault(_normal_exact(pattern), policy)
            elif match_type == "prefix":
                prefixes.append((pattern[:-1] if pattern.endswith("*") else pattern, policy))
            else:
                regexes.append((pattern, re.compile(pattern), policy))
        # Stable sorts: equal lengths keep the order of the configuration.
        prefixes.sort(key=lambda p: len(p[0]), reverse=True)
        regexes.sort(key=lambda r: len(r[0]), reverse=True)
        self.prefixes = tuple(prefixes)
        self.regexes = tuple((rx.search, policy) for _, rx, policy in regexes)
        self.has_routes = bool(self.exact or self.prefixes or self.regexes)

    def match(self, path: str) -> Policy | None:
        policy = self.exact.get(_normal_exact(path))
        if policy is None and (self.prefixes or self.regexes):
            # The router ignores a trailing slash (docs/routing.md rule 10): `/a` and `/a/`
            # are one endpoint, so they must meet one override. A pattern that takes either
            # spelling takes both; otherwise `^/a$` missed `/a/` and `/a/*` missed `/a`, and
            # a client escaped a route's tighter rules by adding or dropping the slash.
            bare = path.rstrip("/") or "/"
            slashed = bare if bare == "/" else bare + "/"
            for prefix, candidate in self.prefixes:
                if bare.startswith(prefix) or slashed.startswith(prefix):
                    return candidate
            for search, candidate in self.regexes:
                if search(bare) is not None or search(slashed) is not None:
                    return candidate
        return policy if policy is not None else self.default


class _ServicePolicy:
    """The checks of one microservice: both kinds matched, combined, cached per path."""

    def __init__(self, service: str, matchers: tuple[_Matcher, _Matcher]):
        self.matchers = matchers
        self.has_routes = any(m.has_routes for m in matchers)
        self.checks: dict[tuple, Check | None] = {}
        self.default = self._check(matchers[0].default, matchers[1].default)
        self._cache: dict[str, Check | None] = {}

    def _check(self, identity: Policy | None, tenant: Policy | None) -> Check | None:
        # One Check per pair, so a command cached per (identity, check) is per counter set.
        try:
            return self.checks[identity, tenant]
        except KeyError:
            check = self.checks[identity, tenant] = Check.make(identity, tenant)
            return check

    def resolve(self, path: str) -> Check | None:
        if not self.has_routes:
            return self.default
        try:
            return self._cache[path]
        except KeyError:
            pass
        identity, tenant = self.matchers
        check = self._check(identity.match(path), tenant.match(path))
        if len(path) > _CACHE_PATH_MAX:
            return check
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[path] = check
        return check


class EnvironmentPolicy:
    """resolve(service, path) -> the Check of the environment tier, or None (no rules).

    env: the base settings; plan / plan_path: a plan's for_environment overlaid on them.
    default_names: the configuration paths of the environment-level identity rules when
    they are not under rate_limiting.for_environment (the auth block's)."""

    def __init__(self, env: EnvironmentLimitSettings,
                 plan: PlanEnvironmentLimitSettings | None = None, plan_path: str = "",
                 default_names: tuple[str, ...] | None = None):
        self._env = (_overlay(plan and plan.rules, f"{plan_path}.rules", env.rules,
                              f"{ENVIRONMENT_PATH}.rules"),
                     _overlay(plan and plan.tenant_rules, f"{plan_path}.tenant_rules",
                              env.tenant_rules, f"{ENVIRONMENT_PATH}.tenant_rules"))
        if default_names is not None and self._env[0] is not None and not (plan and plan.rules):
            self._env = (RuleSet(self._env[0].rules, default_names), self._env[1])
        self._services: dict[str, _ServicePolicy] = {}
        self._defaults: dict[str, Check | None] = {}
        plan_services = plan.microservices if plan is not None else {}
        for service in {**env.microservices, **plan_services}:
            self._services[service] = self._service(service, env.microservices.get(service),
                                                    plan_services.get(service), plan_path)

    def _service(self, service: str, base, plan, plan_path: str) -> _ServicePolicy:
        base_path = f"{ENVIRONMENT_PATH}.microservices.{service}"
        own_path = f"{plan_path}.microservices.{service}"
        matchers = []
        for kind, applies in (("rules", IDENTITY), ("tenant_rules", TENANT)):
            level = _overlay(plan and getattr(plan, kind), f"{own_path}.{kind}",
                             base and getattr(base, kind), f"{base_path}.{kind}")
            if level is not None:
                default = Policy.make(level.rules, service, "*", "microservice", applies,
                                      level.names)
            else:
                default = self._env_default(service, applies)
            routes = []
            for name, route in (base.routes.items() if base is not None else ()):
                override = plan.routes.get(name) if plan is not None else None
                own = _overlay(override and getattr(override, kind),
                               f"{own_path}.routes.{name}.{kind}", getattr(route, kind),
                               f"{base_path}.routes.{name}.{kind}")
                if own is None:
                    continue             # nothing to say: the service level applies
                routes.append((name, route.pattern, route.match_type,
                               Policy.make(own.rules, service, name, "route", applies,
                                           own.names)))
            matchers.append(_Matcher(default, routes))
        return _ServicePolicy(service, tuple(matchers))

    def _env_default(self, service: str, applies: str) -> Policy | None:
        level = self._env[0 if applies == IDENTITY else 1]
        if level is None:
            return None
        return Policy.make(level.rules, service, "*", "environment", applies, level.names)

    def resolve(self, service: str, path: str) -> Check | None:
        svc = self._services.get(service)
        if svc is not None:
            return svc.resolve(path)
        try:
            return self._defaults[service]
        except KeyError:
            # Service names come from registered microservices (a bounded set), so this
            # dict stays small; each service gets its own counters under the defaults.
            check = self._defaults[service] = Check.make(
                self._env_default(service, IDENTITY), self._env_default(service, TENANT))
            return check

    @property
    def has_rules(self) -> bool:
        """False when no level anywhere has a rule: the environment check never runs."""
        return any(level is not None for level in self._env) or any(
            s.default is not None or s.has_routes for s in self._services.values())

    @property
    def has_tenant_rules(self) -> bool:
        return self._env[1] is not None or any(
            s.matchers[1].default is not None or s.matchers[1].has_routes
            for s in self._services.values())


# --------------------------------------------------------------------------- settings mapping

def instance_rules(settings: Settings) -> tuple[tuple[int, int], ...]:
    """rate_limiting.for_instance.rules, plus gateway.auth.rateLimiting when enabled:
    (burstSize per 1 s) unless burstSize is 0, and (requestsPerMinute per 60 s)."""
    rules = instance_rule_sets(settings)[0]
    return rules.rules if rules is not None else ()


def instance_rule_sets(settings: Settings,
                       plan: str | None = None) -> tuple[RuleSet | None, RuleSet | None]:
    """(identity, tenant) rules of the instance tier, of the base or of a plan.

    The base identity rules are instance_rules(); a plan's for_instance.rules replace all
    of them, the auth block's included (a plan that raises a quota must be able to raise
    it everywhere)."""
    inst = settings.rate_limiting.for_instance
    identity = _rule_set(inst.rules, f"{INSTANCE_PATH}.rules")
    auth = settings.gateway.auth.rate_limiting
    if auth.enabled:
        rules = list(identity.rules) if identity else []
        names = list(identity.names) if identity else []
        if auth.burst_size > 0:
            rules.append((auth.burst_size, 1))
            names.append(f"{AUTH_PATH}.burstSize")
        rules.append((auth.requests_per_minute, 60))
        names.append(f"{AUTH_PATH}.requestsPerMinute")
        identity = RuleSet(tuple(rules), tuple(names))
    tenant = _rule_set(inst.tenant_rules, f"{INSTANCE_PATH}.tenant_rules")
    if plan is not None:
        own = settings.rate_limiting.plans[plan].for_instance
        path = f"rate_limiting.plans.{plan}.for_instance"
        identity = _rule_set(own.rules, f"{path}.rules") or identity
        tenant = _rule_set(own.tenant_rules, f"{path}.tenant_rules") or tenant
    return identity, tenant


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
