"""stellagw.config: defaults, examples, the specification's YAML, parsing, substitution, errors, dumps."""
from __future__ import annotations

import dataclasses
import os
import pathlib
import pickle
import textwrap
import types
import typing

import pytest
import yaml

from stellagw import config
from stellagw.config import (
    ConfigError, Settings, default_settings, dump_effective, effective_config, load_config,
    load_config_text, parse_duration, parse_size,
)
from tests.support import REPO

ROOT = REPO
EXAMPLES = sorted((ROOT / "examples").glob("gateway*.yaml"))


def load(text: str, env: dict[str, str] | None = None) -> Settings:
    return load_config_text(textwrap.dedent(text), env=env or {})


def error(text: str, env: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    return info.value


# --------------------------------------------------------------------------- defaults

def test_defaults():
    s = default_settings()
    g = s.gateway
    assert g.node.region == "local" and g.node.environment == "dev" and g.node.workers == 1
    assert g.node.node_id  # filled from the host name
    assert (g.http.host, g.http.port, g.http.public_origin) == ("127.0.0.1", 8080, "")
    assert g.http.max_header_bytes == 16 * 1024
    assert g.http.header_read_timeout == 10.0 and g.http.keep_alive_timeout == 75.0
    assert g.http.tls.enabled is False
    assert g.http.tls.client_certificate_mode == "AllowCertificate"
    assert g.http.tls.min_version == "1.2"
    assert (g.transports.tcp.enabled, g.transports.tcp.port) == (True, 9100)
    assert g.transports.tcp.max_frame_size == 16 * 1024 * 1024
    assert (g.transports.tls.enabled, g.transports.tls.port) == (False, 9443)
    assert g.transports.tls.client_certificate_mode == "RequireCertificate"
    assert g.transports.tls.allowed_client_certificate_thumbprints == ()
    assert g.routing.default_timeout == 30.0
    assert g.routing.max_request_body_size == 100 * 1024 * 1024
    assert g.routing.neighbor_regions == ()
    assert g.auth.dpop_max_clock_skew == 60.0 and g.auth.rate_limiting.enabled is False
    assert g.openapi.title == "Stella Ops API" and g.openapi.cache_ttl_seconds == 300
    assert (g.health.heartbeat_interval_seconds, g.health.heartbeat_timeout_seconds,
            g.health.degraded_after_seconds, g.health.check_interval_seconds,
            g.health.unhealthy_threshold) == (10, 30, 15, 5, 3)
    assert g.logging.level == "info" and g.metrics.enabled is True
    rl = s.rate_limiting
    assert rl.process_back_pressure_when_more_than_per_5min == 0
    assert rl.for_instance.rules == () and rl.for_environment is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "gateway:\n", "gateway: null\nrate_limiting:\n"])
def test_empty_documents_give_defaults(text):
    assert load_config_text(text, env={}) == default_settings()


def test_workers_zero_means_cpu_count():
    assert load("gateway: {node: {workers: 0}}").gateway.node.workers == (os.cpu_count() or 1)


def test_frozen():
    s = default_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gateway.http.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.gateway = None  # type: ignore[misc]
    s = load("""
        rate_limiting:
          for_environment:
            microservices: {scanner: {rules: [{max_requests: 1, per_seconds: 1}]}}
        """)
    services = s.rate_limiting.for_environment.microservices
    assert isinstance(services, config.FrozenMap) and dict(services).keys() == {"scanner"}
    with pytest.raises(TypeError):
        services["x"] = None  # type: ignore[index]
    assert isinstance(services["scanner"].rules, tuple)


def test_settings_pickle_and_hash():
    # Workers may receive the settings from the supervisor by pickling.
    s = load_config_text(SEED + textwrap.indent(textwrap.dedent("""
        microservices:
          scanner:
            routes: {reports: {pattern: /api/reports, rules: [{max_requests: 5, per_seconds: 1}]}}
        """), "    "), env=SEED_ENV)
    assert s.rate_limiting.for_environment.microservices["scanner"].routes["reports"].rules[0].max_requests == 5
    copy = pickle.loads(pickle.dumps(s))
    assert copy == s and hash(copy) == hash(s)
    assert {s: 1}[copy] == 1


# --------------------------------------------------------------------------- examples and the specification's

@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_loads(path):
    settings = load_config(path, env={})
    assert isinstance(settings, Settings)
    # What check-config prints for it loads back and prints the same.
    reloaded = load_config_text(dump_effective(settings), env={})
    assert effective_config(reloaded) == effective_config(settings)


def test_examples_present():
    assert {p.name for p in EXAMPLES} >= {"gateway.yaml", "gateway-dev.yaml", "gateway-tls.yaml"}


def test_dev_example_is_what_the_demo_needs():
    g = load_config(ROOT / "examples" / "gateway-dev.yaml", env={}).gateway
    assert (g.http.host, g.http.port, g.transports.tcp.host, g.transports.tcp.port) == (
        "127.0.0.1", 8080, "127.0.0.1", 9100)
    assert g.node.workers == 1 and not g.http.tls.enabled and not g.transports.tls.enabled


def test_tls_example():
    g = load_config(ROOT / "examples" / "gateway-tls.yaml", env={
        "GATEWAY_SERVICE_THUMBPRINTS": "AB:" * 19 + "AB, " + "c" * 64}).gateway
    assert g.http.tls.enabled and g.http.tls.min_version == "1.3"
    assert g.http.public_origin == "https://gw.example.com"
    assert g.transports.tls.enabled and not g.transports.tcp.enabled
    assert g.transports.tls.allowed_client_certificate_thumbprints == ("ab" * 20, "c" * 64)


SEED = """
gateway:
  node:
    region: "eu1"
    nodeId: "gw-eu1-01"
    environment: "prod"

  transports:
    tcp:
      enabled: true
      port: 9100
      maxConnections: 1000
      receiveBufferSize: 65536
      sendBufferSize: 65536
    tls:
      enabled: true
      port: 9443
      certificatePath: "/certs/gateway.pfx"
      certificatePassword: "${GATEWAY_CERT_PASSWORD}"
      clientCertificateMode: "RequireCertificate"
      allowedClientCertificateThumbprints: []

  routing:
    defaultTimeout: "30s"
    maxRequestBodySize: "100MB"
    streamingEnabled: true
    streamingBufferSize: 16384
    neighborRegions: ["eu2", "us1"]

  auth:
    dpopEnabled: true
    dpopMaxClockSkew: "60s"
    mtlsEnabled: true
    rateLimiting:
      enabled: true
      requestsPerMinute: 1000
      burstSize: 100
      redisConnectionString: "${REDIS_URL}" # Valkey (Redis-compatible)

  openapi:
    enabled: true
    cacheTtlSeconds: 300
    title: "Stella Ops API"
    version: "1.0.0"

  health:
    heartbeatIntervalSeconds: 10
    heartbeatTimeoutSeconds: 30
    unhealthyThreshold: 3

rate_limiting:
  process_back_pressure_when_more_than_per_5min: 5000
  for_instance:
    rules:
      - max_requests: 100
        per_seconds: 1
      - max_requests: 1000
        per_seconds: 60
  for_environment:
    valkey_connection: "localhost:6379"
    rules:
      - max_requests: 10000
        per_seconds: 60
    circuit_breaker:
      failure_threshold: 3
      timeout_seconds: 30
      half_open_timeout: 10
"""
SEED_ENV = {"GATEWAY_CERT_PASSWORD": "s3cret", "REDIS_URL": "redis://gw:pw@valkey:6379/0"}


def test_seed_yaml_lands_in_the_right_attributes():
    s = load_config_text(SEED, env=SEED_ENV)
    g = s.gateway
    assert (g.node.region, g.node.node_id, g.node.environment) == ("eu1", "gw-eu1-01", "prod")
    tcp, tls = g.transports.tcp, g.transports.tls
    assert (tcp.enabled, tcp.port, tcp.max_connections) == (True, 9100, 1000)
    assert (tcp.receive_buffer_size, tcp.send_buffer_size) == (65536, 65536)
    assert (tls.enabled, tls.port, tls.certificate_path) == (True, 9443, "/certs/gateway.pfx")
    assert tls.certificate_password == "s3cret"
    assert tls.client_certificate_mode == "RequireCertificate"
    assert g.routing.default_timeout == 30.0
    assert g.routing.max_request_body_size == 100 * 2**20
    assert g.routing.streaming_enabled is True and g.routing.streaming_buffer_size == 16384
    assert g.routing.neighbor_regions == ("eu2", "us1")
    assert g.auth.dpop_enabled and g.auth.mtls_enabled and g.auth.dpop_max_clock_skew == 60.0
    arl = g.auth.rate_limiting
    assert (arl.enabled, arl.requests_per_minute, arl.burst_size) == (True, 1000, 100)
    assert arl.redis_connection_string == "redis://gw:pw@valkey:6379/0"
    assert (g.openapi.enabled, g.openapi.cache_ttl_seconds, g.openapi.version) == (True, 300, "1.0.0")
    assert (g.health.heartbeat_interval_seconds, g.health.heartbeat_timeout_seconds,
            g.health.unhealthy_threshold) == (10, 30, 3)

    rl = s.rate_limiting
    assert rl.process_back_pressure_when_more_than_per_5min == 5000
    assert [(r.max_requests, r.per_seconds) for r in rl.for_instance.rules] == [(100, 1), (1000, 60)]
    env = rl.for_environment
    assert env.valkey_connection == "localhost:6379"
    assert env.valkey_bucket == "stella-router-rate-limit"
    assert [(r.max_requests, r.per_seconds) for r in env.rules] == [(10000, 60)]
    cb = env.circuit_breaker
    assert (cb.failure_threshold, cb.timeout_seconds, cb.half_open_timeout) == (3, 30, 10)
    assert env.microservices == {}


def test_route_overrides():
    s = load("""
        rate_limiting:
          for_environment:
            microservices:
              scanner:
                rules: [{max_requests: 600, per_seconds: 60}]
                routes:
                  reports:
                    pattern: "^/api/scans/[^/]+/report$"
                    match_type: regex
                    rules: [{max_requests: 10, per_seconds: 60}]
                  scan: {pattern: "/api/scans/*", match_type: prefix}
                  health: {pattern: "/health"}
        """)
    svc = s.rate_limiting.for_environment.microservices["scanner"]
    assert svc.rules[0].max_requests == 600
    assert svc.routes["reports"].match_type == "regex"
    assert svc.routes["reports"].rules[0].per_seconds == 60
    assert svc.routes["scan"].match_type == "prefix" and svc.routes["scan"].rules == ()
    assert svc.routes["health"].match_type == "exact"


# --------------------------------------------------------------------------- durations and sizes

@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("500ms", 0.5), ("5m", 300.0), ("1h", 3600.0), ("1.5s", 1.5), ("0s", 0.0),
    ("1m30s", 90.0), ("1h 2m 3s", 3723.0), (" 10 s ", 10.0), ("250MS", 0.25), ("45", 45.0),
    (".5s", 0.5), (30, 30.0), (2.5, 2.5), (0, 0.0),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["-1s", -1, "", "s", "30 seconds", "1d", "5m3", "abc", "1e3s",
                                 True, None, [], float("inf"), float("nan"), "1..5s"])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError) as info:
        parse_duration(bad)
    assert "duration" in str(info.value)


@pytest.mark.parametrize("text, size", [
    ("512B", 512), ("16KB", 16384), ("16kb", 16384), ("16 KB", 16384), ("64KiB", 65536),
    ("100MB", 100 * 2**20), ("1MiB", 2**20), ("1GB", 2**30), ("2GiB", 2 * 2**30), ("1.5KB", 1536),
    ("16k", 16384), ("4096", 4096), (0, 0), (65536, 65536),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["-1KB", -5, "1TB", "KB", "1.5B", "12 apples", "", 1.5, True, None])
def test_parse_size_rejects(bad):
    with pytest.raises(ValueError) as info:
        parse_size(bad)
    assert "size" in str(info.value)


# --------------------------------------------------------------------------- ${VAR} substitution

def test_env_substitution_set_default_and_escape():
    s = load("""
        gateway:
          node:
            region: "${REGION}"
            nodeId: "gw-${ZONE:-a}-${INDEX}"
            environment: "$${NOT_A_VAR}"
        """, env={"REGION": "eu2", "INDEX": "7"})
    assert s.gateway.node.region == "eu2"
    assert s.gateway.node.node_id == "gw-a-7"
    assert s.gateway.node.environment == "${NOT_A_VAR}"
    assert type(s.gateway.node.region) is str


def test_env_default_also_covers_empty_variable():
    assert load('gateway: {node: {region: "${R:-eu1}"}}', env={"R": ""}).gateway.node.region == "eu1"


def test_env_values_are_coerced_to_the_field_type():
    s = load("""
        gateway:
          http: {port: "${PORT}", maxHeaderBytes: "${HDR}", headerReadTimeout: "${T}"}
          transports:
            tls:
              enabled: ${TLS}
              certificatePath: /c.pfx
              allowedClientCertificateThumbprints: ${PRINTS}
          routing: {neighborRegions: "${NEIGHBOURS:-}"}
        """, env={"PORT": "9090", "HDR": "32KB", "T": "5s", "TLS": "true",
                  "PRINTS": "aa" * 20 + "," + "BB" * 32})
    g = s.gateway
    assert g.http.port == 9090 and g.http.max_header_bytes == 32768 and g.http.header_read_timeout == 5.0
    assert g.transports.tls.enabled is True
    assert g.transports.tls.allowed_client_certificate_thumbprints == ("aa" * 20, "bb" * 32)
    assert g.routing.neighbor_regions == ()


def test_env_value_of_the_wrong_type():
    e = error("gateway: {http: {port: '${PORT}'}}", env={"PORT": "eighty"})
    assert e.path == "gateway.http.port" and "eighty" in e.reason


def test_missing_env_variable_names_key_and_variable():
    e = error("""
        gateway:
          auth:
            rateLimiting:
              redisConnectionString: "${REDIS_URL}"
        """)
    assert e.path == "gateway.auth.rateLimiting.redisConnectionString"
    assert "REDIS_URL" in e.reason
    assert str(e) == f"{e.path}: {e.reason}"


def test_missing_env_variable_inside_a_list():
    e = error('gateway: {routing: {neighborRegions: ["eu2", "${NEXT}"]}}')
    assert e.path == "gateway.routing.neighborRegions[1]" and "NEXT" in e.reason


@pytest.mark.parametrize("value", ["${}", "${1BAD}", "${A-B}", "abc ${UNCLOSED"])
def test_malformed_reference(value):
    e = error(f'gateway: {{node: {{region: "{value}"}}}}', env={"A": "x"})
    assert e.path == "gateway.node.region"


def test_default_env_is_os_environ(monkeypatch):
    monkeypatch.setenv("STELLAGW_TEST_REGION", "ap1")
    s = load_config_text('gateway: {node: {region: "${STELLAGW_TEST_REGION}"}}')
    assert s.gateway.node.region == "ap1"


# --------------------------------------------------------------------------- errors name the key

@pytest.mark.parametrize("text, path, hint", [
    ("gatway: {}", "gatway", "'gateway'"),
    ("gateway: {nodes: {}}", "gateway.nodes", "'node'"),
    ("gateway: {http: {tls: {minVersoin: '1.3'}}}", "gateway.http.tls.minVersoin", "'minVersion'"),
    ("gateway: {node: {node_id: x}}", "gateway.node.node_id", "'nodeId'"),
    ("gateway: {transports: {udp: {}}}", "gateway.transports.udp", "tcp, tls"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 1, per_seconds: 1}, "
     "{max_requsts: 5, per_seconds: 1}]}}",
     "rate_limiting.for_instance.rules[1].max_requsts", "'max_requests'"),
    ("rate_limiting: {for_environment: {microservices: {scanner: {routes: {r: "
     "{pattern: x, matchType: regex}}}}}}",
     "rate_limiting.for_environment.microservices.scanner.routes.r.matchType", "'match_type'"),
])
def test_unknown_keys(text, path, hint):
    e = error(text)
    assert e.path == path
    assert "unknown" in e.reason and hint in e.reason


def test_unknown_key_lists_allowed_keys():
    e = error("gateway: {logging: {colour: true}}")
    assert e.reason.endswith("(allowed here: level, accessLog)")


@pytest.mark.parametrize("text, path", [
    ("gateway: {http: {port: '8080'}}", "gateway.http.port"),
    ("gateway: {http: {port: 8080.0}}", "gateway.http.port"),
    ("gateway: {http: {port: true}}", "gateway.http.port"),
    ("gateway: {http: {port: 70000}}", "gateway.http.port"),
    ("gateway: {http: {port: -1}}", "gateway.http.port"),
    ("gateway: {node: {workers: 257}}", "gateway.node.workers"),
    ("gateway: {metrics: {enabled: 'yes'}}", "gateway.metrics.enabled"),
    ("gateway: {metrics: {enabled: 1}}", "gateway.metrics.enabled"),
    ("gateway: {node: {region: no}}", "gateway.node.region"),
    ("gateway: {node: {region: ''}}", "gateway.node.region"),
    ("gateway: {openapi: {version: 1.0}}", "gateway.openapi.version"),
    ("gateway: {openapi: {title: null}}", "gateway.openapi.title"),
    ("gateway: {routing: {defaultTimeout: 30 seconds}}", "gateway.routing.defaultTimeout"),
    ("gateway: {routing: {defaultTimeout: 0s}}", "gateway.routing.defaultTimeout"),
    ("gateway: {routing: {maxRequestBodySize: 100 parsecs}}", "gateway.routing.maxRequestBodySize"),
    ("gateway: {routing: {neighborRegions: eu2}}", "gateway.routing.neighborRegions"),
    ("gateway: {routing: {neighborRegions: [eu2, 7]}}", "gateway.routing.neighborRegions[1]"),
    ("gateway: {transports: {tcp: {maxFrameSize: 8GB}}}", "gateway.transports.tcp.maxFrameSize"),
    ("gateway: {node: []}", "gateway.node"),
    ("gateway: 5", "gateway"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 0, per_seconds: 1}]}}",
     "rate_limiting.for_instance.rules[0].max_requests"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 10}]}}",
     "rate_limiting.for_instance.rules[0].per_seconds"),
    ("rate_limiting: {for_instance: {rules: [5]}}", "rate_limiting.for_instance.rules[0]"),
    ("rate_limiting: {process_back_pressure_when_more_than_per_5min: -1}",
     "rate_limiting.process_back_pressure_when_more_than_per_5min"),
    ("rate_limiting: {for_environment: {circuit_breaker: {failure_threshold: 0}}}",
     "rate_limiting.for_environment.circuit_breaker.failure_threshold"),
    ("rate_limiting: {for_environment: {valkey_connection: 'http://x:6379'}}",
     "rate_limiting.for_environment.valkey_connection"),
    ("rate_limiting: {for_environment: {microservices: {scanner: {routes: {r: {match_type: exact}}}}}}",
     "rate_limiting.for_environment.microservices.scanner.routes.r.pattern"),
])
def test_wrong_values_name_the_key(text, path):
    e = error(text)
    assert e.path == path, str(e)
    assert str(e) == f"{path}: {e.reason}"


# Values check-config used to accept that the gateway could not run with (config fuzzing,
# round 8E): a traceback at start (backlog, maxHeaderCount, rate-limit rules past the C
# window's 2**31-1, tcpKeepAlive past TCP_KEEPIDLE's limit), a start whose every client
# connection then failed (maxHeaderBytes 2**64, bodyReadTimeout 1e30: Py_ssize_t overflow),
# "Cannot allocate memory" (replayCache.maxEntries), or a sub-millisecond interval sent to
# services as 0 ms (a heartbeat busy loop).
@pytest.mark.parametrize("text, path, words", [
    ("gateway: {http: {backlog: 4294967296}}", "gateway.http.backlog", ["2147483647"]),
    ("gateway: {http: {maxConnections: 18446744073709551616}}", "gateway.http.maxConnections",
     ["2147483647"]),
    ("gateway: {http: {maxHeaderCount: 18446744073709551616}}", "gateway.http.maxHeaderCount",
     ["2147483647"]),
    ("gateway: {http: {maxUrlLength: 9223372036854775808}}", "gateway.http.maxUrlLength",
     ["2147483647"]),
    ("gateway: {http: {maxHeaderBytes: 18446744073709551616}}", "gateway.http.maxHeaderBytes",
     ["1099511627776"]),
    ("gateway: {http: {bodyReadTimeout: 1.0e+30}}", "gateway.http.bodyReadTimeout",
     ["at most 8760h"]),
    ("gateway: {http: {headerReadTimeout: 1000000h}}", "gateway.http.headerReadTimeout",
     ["at most 8760h"]),
    ("gateway: {http: {minBodyRate: 2GB}}", "gateway.http.minBodyRate", ["1073741824"]),
    ("gateway: {http: {minSendRate: 2GB}}", "gateway.http.minSendRate", ["1073741824"]),
    ("gateway: {http: {tcpKeepAlive: 10h}}", "gateway.http.tcpKeepAlive", ["at most 32767s"]),
    ("gateway: {transports: {tcp: {receiveBufferSize: 4294967296}}}",
     "gateway.transports.tcp.receiveBufferSize", ["2147483647"]),
    ("gateway: {transports: {tls: {sendBufferSize: 4GB}}}",
     "gateway.transports.tls.sendBufferSize", ["2147483647"]),
    ("gateway: {auth: {replayCache: {maxEntries: 2147483647}}}",
     "gateway.auth.replayCache.maxEntries", ["16777216"]),
    ("gateway: {auth: {rateLimiting: {requestsPerMinute: 4294967296}}}",
     "gateway.auth.rateLimiting.requestsPerMinute", ["2147483647"]),
    ("gateway: {health: {heartbeatIntervalSeconds: 0.0001}}",
     "gateway.health.heartbeatIntervalSeconds", ["at least 1ms"]),
    ("gateway: {node: {fleet: {publishInterval: 0.0000001s}}}",
     "gateway.node.fleet.publishInterval", ["at least 1ms"]),
    ("gateway: {node: {workerStallTimeout: 0.0005}}", "gateway.node.workerStallTimeout",
     ["0 or at least 1ms"]),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 4294967296, per_seconds: 1}]}}",
     "rate_limiting.for_instance.rules[0].max_requests", ["2147483647"]),
    ("rate_limiting: {for_instance: {tenant_rules: [{max_requests: 1, per_seconds: 2147483648}]}}",
     "rate_limiting.for_instance.tenant_rules[0].per_seconds", ["2147483647"]),
    ("rate_limiting: {for_environment: {circuit_breaker: {timeout_seconds: .inf}}}",
     "rate_limiting.for_environment.circuit_breaker.timeout_seconds", ["finite"]),
    ("rate_limiting: {for_environment: {circuit_breaker: {half_open_timeout: 1.0e+30}}}",
     "rate_limiting.for_environment.circuit_breaker.half_open_timeout", ["at most 8760h"]),
    ("gateway: {http: {trustedProxies: [10.0.0.0/8, 10.0.0.7/8]}}",
     "gateway.http.trustedProxies[1]", ["host bits", "10.0.0.0/8", "10.0.0.7"]),
    ("gateway: {http: {trustedProxies: ['2001:db8::1/32']}}", "gateway.http.trustedProxies[0]",
     ["host bits"]),
    # 32-bit milliseconds in the REQUEST frame: every request answered 500 at run time.
    ("gateway: {routing: {defaultTimeout: 8760h}}", "gateway.routing.defaultTimeout",
     ["at most 1h"]),
    # Accepted, then never usable: DPoP's htu never matched, the keys never fetched, the
    # readiness never reached, a header value no client parses.
    ('gateway: {http: {publicOrigin: "https://gw ex.com"}}', "gateway.http.publicOrigin",
     ["not a host name"]),
    ('gateway: {http: {publicOrigin: "https://gw.example.com:0"}}', "gateway.http.publicOrigin",
     ["port 0"]),
    ('gateway: {auth: {authority: "https://auth.exämple.com"}}', "gateway.auth.authority",
     ["xn--"]),
    ('gateway: {cors: {allowMethods: ["GET, POST"]}}', "gateway.cors.allowMethods[0]",
     ["not an HTTP method"]),
    ('gateway: {health: {requiredServices: ["scanner service"]}}',
     "gateway.health.requiredServices[0]", ["not a service name"]),
    # A NUL in a listen address: TypeError in the socket layer, a traceback at start.
    ('gateway: {http: {host: "a\\x00b"}}', "gateway.http.host", ["control character"]),
    ('gateway: {admin: {host: "127.0.0.1\\n"}}', "gateway.admin.host", ["control character"]),
    ('gateway: {transports: {tls: {host: " ::1"}}}', "gateway.transports.tls.host", ["whitespace"]),
    ('gateway: {transports: {tcp: {host: "[::1]"}}}', "gateway.transports.tcp.host",
     ["without brackets (::1)"]),
    # Below a few requests' worth nothing could wait for a slow link (docs/security.md §3d,
    # "held request budget").
    ('gateway: {transports: {heldRequestBudget: 64KB}}', "gateway.transports.heldRequestBudget",
     []),
])
def test_values_the_gateway_cannot_run_with_are_refused(text, path, words):
    e = error(text)
    assert e.path == path, str(e)
    for word in words:
        assert word in e.reason, str(e)


@pytest.mark.parametrize("text, path, lines", [
    ("gateway:\n  http:\n    port: 8080\n    host: 0.0.0.0\n    port: 9090\n",
     "gateway.http.port", "lines 3 and 5"),
    ("gateway: {}\nrate_limiting: {}\ngateway: {http: {port: 1}}\n", "gateway", "lines 1 and 3"),
    ("rate_limiting:\n  for_instance:\n    rules:\n"
     "      - {max_requests: 1, per_seconds: 1, max_requests: 500}\n",
     "rate_limiting.for_instance.rules[0].max_requests", "lines 4 and 4"),
])
def test_a_key_given_twice_is_refused_naming_it(text, path, lines):
    # YAML keeps the last silently: the gateway started with a value the reader of the
    # top of the file did not expect (config fuzzing, round 8E).
    e = error(text)
    assert e.path == path, str(e)
    assert "twice" in e.reason and lines in e.reason, str(e)


@pytest.mark.parametrize("text, path, number", [
    ("gateway: {http: {port: 0700}}", "gateway.http.port", "448"),
    ("gateway: {node: {workers: 010}}", "gateway.node.workers", "8"),
    ("gateway: {http: {maxHeaderCount: 0x10}}", "gateway.http.maxHeaderCount", "16"),
    ("gateway: {admin: {port: 0b1}}", "gateway.admin.port", "1"),
    ("gateway: {routing: {defaultTimeout: 1:30}}", "gateway.routing.defaultTimeout", "90"),
    ("rate_limiting: {for_instance: {rules: [{max_requests: 0100, per_seconds: 1}]}}",
     "rate_limiting.for_instance.rules[0].max_requests", "64"),
])
def test_numbers_in_another_base_are_refused(text, path, number):
    # YAML 1.1 reads 0700 as octal 448: `port: 0700` listened on 448 (round 8E).
    e = error(text)
    assert e.path == path, str(e)
    assert f"as the number {number}" in e.reason, str(e)
    assert load("gateway: {http: {port: 1_000}, routing: {defaultTimeout: 90}}").gateway.http.port == 1000


def test_merge_keys_still_override():
    s = load("""
        gateway:
          http: &h {host: 127.0.0.1, port: 8080}
          admin: {<<: *h, port: 9000}
    """)
    assert (s.gateway.admin.host, s.gateway.admin.port) == ("127.0.0.1", 9000)


def test_the_largest_accepted_values_load():
    # The bounds themselves are valid (and serve: checked by hand in round 8E).
    s = load("""
        gateway:
          http: {backlog: 2147483647, maxHeaderBytes: 1099511627776, bodyReadTimeout: 8760h,
                 minBodyRate: 1GB, tcpKeepAlive: 32767, headerReadTimeout: 1ms}
          auth: {replayCache: {maxEntries: 16777216}}
        rate_limiting:
          for_instance: {rules: [{max_requests: 2147483647, per_seconds: 2147483647}]}
    """)
    assert s.gateway.http.backlog == 2147483647
    assert s.gateway.http.body_read_timeout == 365 * 24 * 3600
    assert s.gateway.http.header_read_timeout == 0.001
    assert s.gateway.auth.replay_cache.max_entries == 1 << 24


@pytest.mark.parametrize("text, path, words", [
    ("gateway: {logging: {level: verbose}}", "gateway.logging.level", ["debug, info, warning, error"]),
    ("gateway: {http: {tls: {clientCertificateMode: Required}}}",
     "gateway.http.tls.clientCertificateMode", ["RequireCertificate"]),
    ("gateway: {http: {tls: {minVersion: '1.1'}}}", "gateway.http.tls.minVersion", ["1.2, 1.3"]),
    ("rate_limiting: {for_environment: {microservices: {s: {routes: {r: {pattern: x, match_type: glob}}}}}}",
     "rate_limiting.for_environment.microservices.s.routes.r.match_type", ["exact, prefix, regex"]),
])
def test_bad_enum(text, path, words):
    e = error(text)
    assert e.path == path
    assert all(w in e.reason for w in words)


def test_enums_are_case_insensitive_and_canonicalised():
    s = load("gateway: {logging: {level: WARNING}, http: {tls: {clientCertificateMode: requirecertificate, "
             "minVersion: 1.3}}}")
    assert s.gateway.logging.level == "warning"
    assert s.gateway.http.tls.client_certificate_mode == "RequireCertificate"
    assert s.gateway.http.tls.min_version == "1.3"


def test_bad_regex_names_the_route_pattern():
    e = error("""
        rate_limiting:
          for_environment:
            microservices:
              scanner:
                routes:
                  reports:
                    pattern: "^/api/(scans"
                    match_type: regex
        """)
    assert e.path == "rate_limiting.for_environment.microservices.scanner.routes.reports.pattern"
    assert "regular expression" in e.reason


@pytest.mark.parametrize("pattern, refused", [
    ("^/api/(a+)+$", True), ("^/api/(/[^/]+)*$", True), ("^(?:a|b+)*$", True),
    ("^/api/(/[^/]++)*$", False), ("^(?>(a+))+$", False), ("^/api/scans/[^/]+/report$", False),
])
def test_regex_routes_with_nested_repeats_are_refused(pattern, refused):
    # Round 8E: re.search runs on every request path of the service, without a time limit;
    # "^/api/(a+)+$" took 0.58 s for 24 a's, doubling per character (one request, a stuck
    # worker). A possessive or atomic inner repeat is the way out the error names.
    text = f"""
        rate_limiting:
          for_environment:
            microservices:
              scanner:
                routes:
                  r: {{pattern: '{pattern}', match_type: regex, rules: [{{max_requests: 1, per_seconds: 1}}]}}
    """
    where = "rate_limiting.for_environment.microservices.scanner.routes.r.pattern"
    if refused:
        e = error(text)
        assert e.path == where and "possessive" in e.reason, str(e)
    else:
        load(text)


def test_regex_is_only_compiled_for_regex_routes():
    load("""
        rate_limiting:
          for_environment:
            microservices: {scanner: {routes: {r: {pattern: "/api/(scans", match_type: prefix}}}}
        """)


@pytest.mark.parametrize("section", ["gateway.http.tls", "gateway.transports.tls"])
def test_tls_needs_certificate_and_key(section):
    *parents, leaf = section.split(".")

    def doc(body: dict) -> str:
        tree: dict = {leaf: body}
        for name in reversed(parents):
            tree = {name: tree}
        return yaml.safe_dump(tree)

    e = error(doc({"enabled": True}))
    assert e.path == f"{section}.certificatePath"
    e = error(doc({"enabled": True, "certificatePath": "/c/gw.crt"}))
    assert e.path == f"{section}.keyPath"
    load(doc({"enabled": True, "certificatePath": "/c/gw.crt", "keyPath": "/c/gw.key"}))
    load(doc({"enabled": True, "certificatePath": "/c/gw.P12"}))
    load(doc({"enabled": False, "certificatePath": "/c/gw.crt"}))


@pytest.mark.parametrize("origin, ok", [
    ("https://gw.example.com", "https://gw.example.com"),
    ("http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ("HTTPS://GW.Example.com:443", "https://gw.example.com"), ("http://[::1]:80", "http://[::1]"),
    ("gw.example.com", None), ("ftp://gw.example.com", None), ("https://gw.example.com/api", None),
    ("https://user:pw@gw.example.com", None), ("https://gw.example.com?x=1", None),
])
def test_public_origin(origin, ok):
    text = f'gateway: {{http: {{publicOrigin: "{origin}"}}}}'
    if ok:
        assert load(text).gateway.http.public_origin == ok
    else:
        assert error(text).path == "gateway.http.publicOrigin"


def test_thumbprints_normalised_and_checked():
    sha1 = "AB:CD:" + "EF:" * 17 + "01"
    s = load(f'gateway: {{transports: {{tls: {{allowedClientCertificateThumbprints: ["{sha1}", "{"F" * 64}"]}}}}}}')
    assert s.gateway.transports.tls.allowed_client_certificate_thumbprints == (
        "abcd" + "ef" * 17 + "01", "f" * 64)
    e = error('gateway: {transports: {tls: {allowedClientCertificateThumbprints: [abc]}}}')
    assert e.path == "gateway.transports.tls.allowedClientCertificateThumbprints[0]"


def test_degraded_must_come_before_unhealthy():
    e = error("gateway: {health: {degradedAfterSeconds: 40, heartbeatTimeoutSeconds: 30}}")
    assert e.path == "gateway.health.degradedAfterSeconds"


def test_top_level_must_be_a_mapping():
    e = error("- gateway\n")
    assert e.path == "<root>"


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert info.value.path == "<file>" and str(missing) in info.value.reason
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)  # a directory
    assert info.value.path == "<file>"


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("gateway:\n  http:\n    port: [8080\n  routing: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    e = info.value
    assert e.path == "<file>" and str(path) in e.reason and "line " in e.reason and "column " in e.reason
    assert e.source == str(path)


def test_errors_from_a_file_carry_the_source(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("gateway: {http: {port: x}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.path == "gateway.http.port" and info.value.source == str(path)


# --------------------------------------------------------------------------- effective config

def test_effective_config_masks_secrets():
    s = load_config_text(SEED, env=SEED_ENV)
    eff = effective_config(s)
    tls = eff["gateway"]["transports"]["tls"]
    assert tls["certificatePassword"] == config.MASK
    assert eff["gateway"]["auth"]["rateLimiting"]["redisConnectionString"] == config.MASK
    assert eff["rate_limiting"]["for_environment"]["valkey_connection"] == config.MASK
    # Empty secrets stay empty, so the dump shows what is *not* set.
    assert eff["gateway"]["http"]["tls"]["certificatePassword"] == ""
    assert eff["gateway"]["routing"]["defaultTimeout"] == "30s"
    assert eff["gateway"]["routing"]["maxRequestBodySize"] == "100MB"

    text = dump_effective(s)
    assert "s3cret" not in text and "pw@" not in text and "gw:pw" not in text
    plain = effective_config(s, mask_secrets=False)
    assert plain["gateway"]["transports"]["tls"]["certificatePassword"] == "s3cret"


def test_passwords_inside_urls_are_masked_everywhere():
    assert config._mask_url_password("redis://user:pw@host:6379/0") == f"redis://user:{config.MASK}@host:6379/0"
    assert config._mask_url_password("valkey://:pw@host") == f"valkey://:{config.MASK}@host"
    assert config._mask_url_password("redis://host:6379") == "redis://host:6379"
    s = load('gateway: {openapi: {title: "see https://bob:hunter2@docs.example.com"}}')
    assert "hunter2" not in dump_effective(s)


def test_dump_effective_round_trips():
    no_secrets = SEED.replace('"localhost:6379"', '""')
    s = load_config_text(no_secrets, env={"GATEWAY_CERT_PASSWORD": "", "REDIS_URL": ""})
    assert load_config_text(dump_effective(s), env={}) == s
    odd = load("""
        gateway:
          node: {region: "$${LITERAL}"}
          http: {headerReadTimeout: 1.2345s, keepAliveTimeout: 250ms, maxHeaderBytes: 1000}
          openapi: {title: "no"}
        rate_limiting:
          for_environment:
            microservices:
              scanner:
                routes: {r: {pattern: "^/a$", match_type: regex, rules: [{max_requests: 2, per_seconds: 3}]}}
        """)
    assert odd.gateway.node.region == "${LITERAL}"
    assert load_config_text(dump_effective(odd), env={}) == odd


def test_dump_is_yaml_shaped_with_original_names():
    eff = yaml.safe_load(dump_effective(default_settings()))
    assert set(eff) == {"gateway", "rate_limiting"}
    assert "maxHeaderBytes" in eff["gateway"]["http"]
    assert "process_back_pressure_when_more_than_per_5min" in eff["rate_limiting"]


# --------------------------------------------------------------------------- docs cover every key

def _key_paths(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    paths = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.metadata['yaml']}" if prefix else f.metadata["yaml"]
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if dataclasses.is_dataclass(hint):
            paths += _key_paths(hint, path)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(args[0]):
            paths += _key_paths(args[0], path + "[]")
        elif typing.get_origin(hint) is not None and dataclasses.is_dataclass(args[-1]):
            if typing.get_origin(hint) is types.UnionType:  # optional section
                paths += _key_paths(args[0], path)
            else:  # mapping of names
                paths += _key_paths(args[-1], path + ".<name>")
        else:
            paths.append(path)
    return paths


def test_docs_describe_every_key():
    docs = (ROOT / "docs" / "configuration.md").read_text()
    paths = _key_paths(Settings, "")
    assert len(paths) > 80
    missing = [p for p in paths if f"`{p}`" not in docs]
    assert not missing, f"docs/configuration.md lacks: {missing}"


# --------------------------------------------------------------------------- gateway.auth (auth issue)

def test_auth_defaults():
    a = default_settings().gateway.auth
    assert a.required is False and a.authority == "" and a.jwks_path == ""
    assert a.audiences == ("stellaops-gateway",)
    assert a.algorithms == ("ES256", "RS256", "PS256", "EdDSA")
    assert a.require_at_jwt_typ is False and a.max_token_bytes == 8192
    assert (a.keys_refresh_interval, a.keys_min_refetch_interval) == (300.0, 30.0)
    assert (a.dpop_nonce.enabled, a.dpop_nonce.secret, a.dpop_nonce.lifetime) == (False, "", 300.0)
    assert (a.replay_cache.valkey, a.replay_cache.on_valkey_error, a.replay_cache.max_entries) == (
        "", "local", 100000)
    assert a.enable_legacy_headers is True and a.allow_scope_header is False


@pytest.mark.parametrize("alg, words", [("HS256", ["MAC"]), ("hs512", ["MAC"]), ("none", ["none"]),
                                        ("None", ["none"]), ("ES257", ["unsupported", "ES256"])])
def test_auth_algorithms_refuse_mac_none_and_unknown(alg, words):
    e = error(f"gateway: {{auth: {{algorithms: [ES256, {alg}]}}}}")
    assert e.path == "gateway.auth.algorithms[1]"
    assert all(w in e.reason for w in words), e.reason


def test_auth_lists_must_not_be_empty():
    assert error("gateway: {auth: {algorithms: []}}").path == "gateway.auth.algorithms"
    assert error("gateway: {auth: {audiences: []}}").path == "gateway.auth.audiences"
    s = load('gateway: {auth: {algorithms: "${ALGS}"}}', env={"ALGS": "ES256,EdDSA,ES256"})
    assert s.gateway.auth.algorithms == ("ES256", "EdDSA")


@pytest.mark.parametrize("text, path", [
    ("gateway: {auth: {required: true}}", "gateway.auth.authority"),
    ("gateway: {auth: {jwksPath: /etc/jwks.json}}", "gateway.auth.authority"),
    ("gateway: {auth: {authority: 'http://authority.example.com'}}", "gateway.auth.authority"),
    ("gateway: {auth: {authority: 'authority.example.com'}}", "gateway.auth.authority"),
    ("gateway: {auth: {authority: 'https://a.example?x=1'}}", "gateway.auth.authority"),
    ("gateway: {auth: {dpopNonce: {secret: short}}}", "gateway.auth.dpopNonce.secret"),
    ("gateway: {auth: {dpopNonce: {lifetime: 0s}}}", "gateway.auth.dpopNonce.lifetime"),
    ("gateway: {auth: {replayCache: {onValkeyError: bypass}}}", "gateway.auth.replayCache.onValkeyError"),
    ("gateway: {auth: {replayCache: {valkey: 'http://x:6379'}}}", "gateway.auth.replayCache.valkey"),
    ("gateway: {auth: {maxTokenBytes: 100}}", "gateway.auth.maxTokenBytes"),
])
def test_auth_bad_values_name_the_key(text, path):
    assert error(text).path == path


def test_auth_valid_forms():
    s = load("""
        gateway:
          auth:
            required: true
            authority: "http://127.0.0.1:5000"
            dpopNonce: {enabled: true, secret: "0123456789abcdef0123456789abcdef"}
            replayCache: {valkey: "redis://:pw@valkey:6379/0", onValkeyError: REJECT}
        """)
    a = s.gateway.auth
    assert a.required and a.authority == "http://127.0.0.1:5000"
    assert a.replay_cache.on_valkey_error == "reject"
    eff = effective_config(s)["gateway"]["auth"]
    assert eff["dpopNonce"]["secret"] == config.MASK and eff["replayCache"]["valkey"] == config.MASK
    assert load_config_text(dump_effective(load("gateway: {auth: {authority: 'https://a.example'}}")),
                            env={}).gateway.auth.authority == "https://a.example"
