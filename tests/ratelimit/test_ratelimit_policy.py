"""Which rules apply (stellagw/ratelimit/policy.py): inheritance, route matching, the
gateway.auth.rateLimiting mapping. No server, no clock."""
from __future__ import annotations

import pytest

from stellagw.config import ConfigError, load_config_text
from stellagw.ratelimit.policy import (EnvironmentPolicy, environment_settings, escape,
                                       escape_tag, instance_rules)

ENV = """
rate_limiting:
  for_environment:
    valkey_connection: "localhost:6379"
    rules:
      - {max_requests: 1000, per_seconds: 60}
    microservices:
      scanner:
        rules:
          - {max_requests: 500, per_seconds: 60}
        routes:
          scan_exact:
            pattern: /api/scans/
            match_type: exact
            rules: [{max_requests: 1, per_seconds: 1}]
          scans_prefix:
            pattern: /api/scans/*
            match_type: prefix
            rules: [{max_requests: 2, per_seconds: 1}]
          scans_deep_prefix:
            pattern: /api/scans/export/*
            match_type: prefix
            rules: [{max_requests: 3, per_seconds: 1}]
          reports_regex:
            pattern: ^/api/[a-z]+/reports/\\d+$
            match_type: regex
            rules: [{max_requests: 4, per_seconds: 1}]
          any_report_regex:
            pattern: /reports/
            match_type: regex
            rules: [{max_requests: 5, per_seconds: 1}]
          no_rules:
            pattern: /api/quiet
            match_type: exact
          case_prefix:
            pattern: /API/Upper*
            match_type: prefix
            rules: [{max_requests: 6, per_seconds: 1}]
      orders:
        routes:
          bulk:
            pattern: /orders/bulk
            rules: [{max_requests: 7, per_seconds: 10}, {max_requests: 70, per_seconds: 3600}]
      ledger:
        rules:
          - {max_requests: 8, per_seconds: 60}
"""


@pytest.fixture(scope="module")
def policy():
    return EnvironmentPolicy(load_config_text(ENV, env={}).rate_limiting.for_environment)


@pytest.mark.parametrize("service, path, level, route, rules", [
    # exact: case-insensitive, trailing slash ignored; beats every prefix and regex.
    ("scanner", "/api/scans", "route", "scan_exact", ((1, 1),)),
    ("scanner", "/API/Scans/", "route", "scan_exact", ((1, 1),)),
    # prefix: literal, the longest wins.
    ("scanner", "/api/scans/42", "route", "scans_prefix", ((2, 1),)),
    ("scanner", "/api/scans/export/7", "route", "scans_deep_prefix", ((3, 1),)),
    ("scanner", "/api/scans/exports", "route", "scans_prefix", ((2, 1),)),
    # prefix is case-sensitive.
    ("scanner", "/API/Upper/x", "route", "case_prefix", ((6, 1),)),
    ("scanner", "/api/upper/x", "microservice", "*", ((500, 60),)),
    # regex: search; the longest pattern wins; prefix beats regex.
    ("scanner", "/api/vuln/reports/12", "route", "reports_regex", ((4, 1),)),
    ("scanner", "/api/vuln/reports/x", "route", "any_report_regex", ((5, 1),)),
    ("scanner", "/api/scans/reports/12", "route", "scans_prefix", ((2, 1),)),
    # no matching route -> the microservice's rules; a route without rules is ignored.
    ("scanner", "/api/other", "microservice", "*", ((500, 60),)),
    ("scanner", "/api/quiet", "microservice", "*", ((500, 60),)),
    # a microservice without rules falls through to the environment defaults...
    ("orders", "/orders/list", "environment", "*", ((1000, 60),)),
    # ...but its routes still apply, replacing (not merging with) the defaults.
    ("orders", "/orders/bulk", "route", "bulk", ((7, 10), (70, 3600))),
    ("ledger", "/anything", "microservice", "*", ((8, 60),)),
    # unknown service: the environment defaults, counted per service.
    ("billing", "/x", "environment", "*", ((1000, 60),)),
])
def test_resolution(policy, service, path, level, route, rules):
    check = policy.resolve(service, path)
    got = check.identity
    assert check.tenant is None and check.identity_only is check
    assert (got.level, got.route, got.rules, got.service) == (level, route, rules, service)
    assert check.argv == tuple(x for rule in rules for x in (*rule, 1))
    assert check.rules == rules and check.applies == ("identity",) * len(rules)
    assert got.target == f"{service}:{route}"
    # Each rule is named by its configuration path (what a 429 says).
    where = {"environment": "rate_limiting.for_environment",
             "microservice": f"rate_limiting.for_environment.microservices.{service}",
             "route": f"rate_limiting.for_environment.microservices.{service}.routes.{route}"}
    assert check.names == tuple(f"{where[level]}.rules[{i}]" for i in range(len(rules)))
    # Cached answers are the same.
    assert policy.resolve(service, path) is check


def test_no_rules_anywhere_means_no_environment_check():
    env = load_config_text("""
rate_limiting:
  for_environment:
    valkey_connection: "localhost:6379"
    microservices:
      scanner:
        routes:
          one: {pattern: /one, rules: [{max_requests: 1, per_seconds: 1}]}
""", env={}).rate_limiting.for_environment
    policy = EnvironmentPolicy(env)
    assert policy.has_rules
    assert policy.resolve("scanner", "/two") is None
    assert policy.resolve("billing", "/one") is None
    assert policy.resolve("scanner", "/one").rules == ((1, 1),)
    assert not policy.has_tenant_rules
    empty = EnvironmentPolicy(load_config_text(
        "rate_limiting:\n  for_environment:\n    valkey_connection: x:1\n", env={})
        .rate_limiting.for_environment)
    assert not empty.has_rules


def test_route_names_are_escaped_in_keys():
    env = load_config_text("""
rate_limiting:
  for_environment:
    valkey_connection: "localhost:6379"
    microservices:
      scanner:
        routes:
          "odd:{name}%":
            pattern: /odd
            rules: [{max_requests: 1, per_seconds: 1}]
""", env={}).rate_limiting.for_environment
    got = EnvironmentPolicy(env).resolve("scanner", "/odd").identity
    assert got.route == "odd:{name}%"
    assert got.target == "scanner:odd%3A%7Bname%7D%25"
    assert escape("a:b") == "a%3Ab" and escape("plain") == "plain"
    assert escape_tag("sub:x{y}") == "sub:x%7By%7D"


def test_bad_regex_is_rejected_by_config():
    with pytest.raises(ConfigError) as info:
        load_config_text("""
rate_limiting:
  for_environment:
    microservices:
      scanner:
        routes:
          broken: {pattern: "/api/(unclosed", match_type: regex,
                   rules: [{max_requests: 1, per_seconds: 1}]}
""", env={})
    assert "rate_limiting.for_environment.microservices.scanner.routes.broken.pattern" in str(info.value)


# ---------------------------------------------------------------------------------------
# gateway.auth.rateLimiting mapped onto the same engine


def _settings(text):
    return load_config_text(text, env={})


def test_instance_rules_from_for_instance_only():
    s = _settings("""
rate_limiting:
  for_instance:
    rules: [{max_requests: 100, per_seconds: 1}, {max_requests: 1000, per_seconds: 60}]
""")
    assert instance_rules(s) == ((100, 1), (1000, 60))
    assert environment_settings(s) == (None, "")


def test_auth_rate_limiting_disabled_is_ignored():
    s = _settings("""
gateway:
  auth:
    rateLimiting: {enabled: false, requestsPerMinute: 10, burstSize: 2,
                   redisConnectionString: "redis://cache:6379"}
""")
    assert instance_rules(s) == ()
    assert environment_settings(s) == (None, "")


def test_auth_rate_limiting_adds_burst_and_per_minute_rules():
    s = _settings("""
gateway:
  auth:
    rateLimiting: {enabled: true, requestsPerMinute: 1000, burstSize: 100}
rate_limiting:
  for_instance:
    rules: [{max_requests: 5000, per_seconds: 300}]
""")
    assert instance_rules(s) == ((5000, 300), (100, 1), (1000, 60))
    assert environment_settings(s) == (None, "")
    no_burst = _settings("gateway: {auth: {rateLimiting: {enabled: true, "
                         "requestsPerMinute: 60, burstSize: 0}}}")
    assert instance_rules(no_burst) == ((60, 60),)


def test_auth_redis_connection_string_makes_an_environment_tier():
    s = _settings("""
gateway:
  auth:
    rateLimiting: {enabled: true, requestsPerMinute: 600, burstSize: 50,
                   redisConnectionString: "redis://cache:6379/1"}
""")
    env, address = environment_settings(s)
    assert address == "redis://cache:6379/1"
    assert EnvironmentPolicy(env).resolve("svc", "/x").rules == ((600, 60),)
    assert env.valkey_bucket == "stella-router-rate-limit"
    assert env.circuit_breaker.failure_threshold == 5


def test_for_environment_wins_and_borrows_the_auth_connection():
    s = _settings("""
gateway:
  auth:
    rateLimiting: {enabled: true, redisConnectionString: "redis://fallback:6379"}
rate_limiting:
  for_environment:
    rules: [{max_requests: 10, per_seconds: 60}]
""")
    env, address = environment_settings(s)
    assert address == "redis://fallback:6379"
    assert EnvironmentPolicy(env).resolve("svc", "/x").rules == ((10, 60),)
    own = _settings("""
gateway:
  auth:
    rateLimiting: {enabled: true, redisConnectionString: "redis://fallback:6379"}
rate_limiting:
  for_environment:
    valkey_connection: "primary:6379"
    rules: [{max_requests: 10, per_seconds: 60}]
""")
    assert environment_settings(own)[1] == "primary:6379"


def test_long_paths_are_resolved_but_never_cached(policy):
    """A client's path may be as long as maxUrlLength: 8,192 of 8 KB held 66 MB per
    microservice with route rules (docs/security.md §3d, "path caches"). Each long path
    still gets its route's rules; only short ones are remembered."""
    svc = policy._services["scanner"]
    svc._cache.clear()
    for i in range(200):
        long_path = "/api/scans/%05d/" % i + "a" * 8000
        assert policy.resolve("scanner", long_path).identity.route == "scans_prefix"
    assert not [p for p in svc._cache if len(p) > 256]
    assert policy.resolve("scanner", "/api/scans/42").identity.route == "scans_prefix"
    assert "/api/scans/42" in svc._cache
