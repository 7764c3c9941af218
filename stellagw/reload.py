"""Reload: configuration and certificates without a restart (docs/operations.md "Reload").

SIGHUP — or `stellagw reload`, which sends it — makes the gateway read its configuration
file again. The file is checked first, as at start (keys, certificates that must load, the
file-descriptor budget, Valkey addresses): an invalid one is refused with the key and the
reason, and the running configuration stays. A valid one is compared with the running one,
key by key:

- keys that need new sockets or processes (`RESTART_REQUIRED`: ports, hosts, workers, the
  admin listener, the transports apart from their certificates, tracing ...) keep their
  running value and are named in a "restart required" warning;
- everything else is swapped in by each worker at once, on its loop, between two requests:
  request limits for the connections accepted from then on, and the Pipeline's
  collaborators — authentication, rate limits, CORS, built-ins — for every request that
  starts from then on, whatever its connection (Pipeline.reconfigure). A request already
  waiting on something (an Authority key fetch, Valkey) finishes with what it started
  with; the objects replaced are closed some seconds later (`RETIRE_AFTER`).

Certificates (gateway.http.tls, gateway.transports.tls) are read again on every SIGHUP
and whenever their files change (checked on the worker's one-second tick): new handshakes
get the new ones, established connections keep theirs (ingress/tls.py).

With several workers the supervisor checks the file once (one log line for a bad file,
not one per worker), keeps the result for the workers it will restart, writes it into its
run directory and forwards SIGHUP; each worker applies it. With one worker, the worker
does both.

Exported: gateway_config_reloads_total{result} (ok, unchanged, restart_required,
invalid, failed), gateway_certificate_reloads_total{listener,result},
gateway_build_info{version,config_hash} (1 per worker running that configuration), and
the configuration's hash on the admin listener's /health/ready.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import os
import pickle
import time
from typing import Any, Callable

import orjson

from . import __version__
from .files import read_regular, replace_atomically
from .config import ConfigError, default_settings, effective_config, load_config

# Keys whose new value needs new sockets or processes: named in the log, never applied.
RESTART_REQUIRED = (
    "gateway.node.workers", "gateway.node.nodeId",
    "gateway.http.host", "gateway.http.port", "gateway.http.backlog", "gateway.http.tcpKeepAlive",
    "gateway.http.tls.enabled",
    "gateway.admin.enabled", "gateway.admin.host", "gateway.admin.port",
    # Listeners, their caps, buffers and registration rules are built once per worker.
    "gateway.transports",
    # With several workers the replay table is made once, before the workers are forked.
    "gateway.auth.replayCache.maxEntries",
    # The exporter's thread and the tracer provider live as long as the process.
    "gateway.tracing",
    # The fleet's Valkey client is made at start, and the fleet is read only then.
    "gateway.node.fleet.valkey", "gateway.node.fleet.timeout",
)
# Under RESTART_REQUIRED but live: the service transport's certificates and client checks,
# and the worker's budget for requests waiting on slow links (the hub reads it per request).
LIVE = frozenset(f"gateway.transports.tls.{key}" for key in (
    "certificatePath", "keyPath", "certificatePassword", "clientCertificateMode",
    "clientCaPath", "minVersion")) | {"gateway.transports.heldRequestBudget"}

# How long a replaced authenticator or rate limiter is kept for the requests inside it: a
# Valkey check waits 250 ms at most, an unknown-kid refetch keysFetchTimeout (5 s).
RETIRE_AFTER = 10.0
RESULTS = ("ok", "unchanged", "restart_required", "invalid", "failed")


def restart_required(key: str) -> bool:
    if key in LIVE:
        return False
    return any(key == r or key.startswith(r + ".") for r in RESTART_REQUIRED)


# --------------------------------------------------------------------------- comparing

def _fields(section) -> list[tuple[str, str]]:
    return [(f.name, f.metadata.get("yaml", f.name)) for f in dataclasses.fields(section)]


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _sections(a, b) -> bool:
    return dataclasses.is_dataclass(a) and type(a) is type(b)


def changed_keys(old, new, path: str = "") -> list[str]:
    """The dotted YAML keys whose values differ (a list, map or optional section that
    differs anywhere is named as a whole)."""
    if _sections(old, new):
        out = []
        for attr, key in _fields(old):
            out += changed_keys(getattr(old, attr), getattr(new, attr), _join(path, key))
        return out
    return [path] if old != new else []


def graft(target, source, pick: Callable[[str], bool], path: str = ""):
    """`target` with every value whose key `pick` accepts taken from `source`."""
    if _sections(target, source):
        changes = {}
        for attr, key in _fields(target):
            mine = getattr(target, attr)
            value = graft(mine, getattr(source, attr), pick, _join(path, key))
            if value is not mine:
                changes[attr] = value
        return dataclasses.replace(target, **changes) if changes else target
    return source if pick(path) and target != source else target


def config_hash(settings) -> str:
    """12 hex digits of SHA-256 over the effective configuration, secrets masked: shown on
    /health/ready and as a metric label, so a secret must not be guessable from it (a
    rotated secret alone does not change it)."""
    doc = orjson.dumps(effective_config(settings, mask_secrets=True), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(doc).hexdigest()[:12]


# --------------------------------------------------------------------------- checking

class ConfigSource:
    """Where the running configuration came from, how to read it again, and what it was
    as configured (command-line overrides applied, ports not yet resolved: a port 0 the
    file asks for is not a change)."""

    def __init__(self, path: str | None, configured, overrides: Callable = lambda s: s,
                 pid_file: str | None = None, reader: Callable | None = None):
        """`path` None: the defaults (`serve` without --config); `reader`: where settings
        made in code come from instead of a file (the demo: the same ones again)."""
        self.path = path
        self.overrides = overrides
        self._reader = reader
        self.configured = configured
        self.hash = config_hash(configured)
        self.pid_file = pid_file
        self.seq = 0                 # reload attempts so far (the supervisor's record number)
        self.loaded_at = time.time()

    def read(self):
        if self._reader is not None:
            return self._reader()
        settings = load_config(self.path) if self.path else default_settings()
        return self.overrides(settings)


class Outcome:
    """What one reload attempt found. `settings`: what to run (None when invalid)."""

    def __init__(self, result: str, settings=None, configured=None, hash: str = "",
                 changed=(), restart=(), error: tuple[str, str] | None = None):
        self.result = result
        self.settings = settings
        self.configured = configured
        self.hash = hash
        self.changed = list(changed)       # keys applied
        self.restart = list(restart)       # keys left as they run
        self.error = error                 # (key, reason)
        self.seq = 0

    def status(self) -> dict:
        out = {"seq": self.seq, "result": self.result, "configHash": self.hash,
               "changed": self.changed, "restartRequired": self.restart}
        if self.error:
            out["key"], out["reason"] = self.error
        return out


def check_certificates(settings) -> None:
    """Load every enabled listener's certificate, as at start: a bad one is a configuration
    error naming the key (TlsConfigError)."""
    from .ingress.tls import server_context
    gw = settings.gateway
    if gw.http.tls.enabled:
        server_context(gw.http.tls, "gateway.http.tls")
    if gw.transports.tls.enabled:
        server_context(gw.transports.tls, "gateway.transports.tls")


def _check_addresses(settings) -> None:
    """Valkey addresses are parsed when the components are built; a bad one must be refused
    here, with its key, not fail the swap in every worker."""
    from .ratelimit.policy import environment_settings
    from .valkey import parse_address
    gw = settings.gateway
    env, address = environment_settings(settings)
    checks = [("gateway.auth.replayCache.valkey", gw.auth.replay_cache.valkey),
              ("gateway.node.fleet.valkey", gw.node.fleet.valkey)]
    if env is not None and address:
        key = ("rate_limiting.for_environment.valkey_connection"
               if settings.rate_limiting.for_environment is not None
               and settings.rate_limiting.for_environment.valkey_connection
               else "gateway.auth.rateLimiting.redisConnectionString")
        checks.append((key, address))
    for key, url in checks:
        if url:
            try:
                parse_address(url)
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from None


def _empty(path: str) -> bool:
    """No content but blank lines and comments (a missing file is load_config's to say)."""
    try:
        text = read_regular(path).decode("utf-8", errors="replace")
    except OSError:
        return False            # load_config says why
    return not any(line.strip() and not line.lstrip().startswith("#")
                   for line in text.splitlines())


def check(source: ConfigSource, running) -> Outcome:
    """Read the file again and decide what a reload does; changes nothing itself.
    `running`: the settings in force (ports resolved)."""
    from .ingress.tls import TlsConfigError
    from .listeners import raise_fd_limit
    if source.path and _empty(source.path):
        # Valid YAML, and every key at its default: far more likely a file caught while
        # being rewritten in place than what anyone means. Taken, it reset rate limits,
        # auth, CORS and the rest until the next reload (an adversarial probe).
        return Outcome("invalid", hash=source.hash, error=(
            source.path, "the file is empty: a reload would set every key back to its "
                         "default (a file being rewritten?); nothing was changed"))
    try:
        configured = source.read()
        check_certificates(configured)
        raise_fd_limit(configured)
        _check_addresses(configured)
    except ConfigError as exc:
        return Outcome("invalid", hash=source.hash, error=(exc.path, exc.reason))
    except TlsConfigError as exc:
        key, _, reason = str(exc).partition(": ")
        return Outcome("invalid", hash=source.hash, error=(key, reason))
    except Exception as exc:  # noqa: BLE001 -- a file the checks did not foresee is refused:
        # raised here, it ended the supervisor's SIGHUP handler, and the supervisor
        # stopped every worker (an adversarial probe).
        return Outcome("invalid", hash=source.hash, error=(
            "<file>", f"cannot be read as a configuration: {exc!r}"[:500]))
    changed = changed_keys(source.configured, configured)
    restart = [k for k in changed if restart_required(k)]
    applied = [k for k in changed if not restart_required(k)]
    # What runs from now on: the file's values, except where a restart would be needed.
    configured = graft(configured, source.configured, restart_required)
    settings = graft(configured, running, restart_required)   # ports as bound
    result = "restart_required" if restart else "ok" if applied else "unchanged"
    return Outcome(result, settings, configured, config_hash(configured), applied, restart)


def log_outcome(log, source: ConfigSource, outcome: Outcome) -> None:
    """The one place a reload's verdict is logged (the supervisor's, or the only worker's)."""
    where = source.path or "<defaults>"
    if outcome.result == "invalid":
        key, reason = outcome.error
        log.event("error", "configuration reload refused: the running configuration is kept",
                  key=key, reason=reason, config=where, configHash=source.hash)
        return
    if outcome.restart:
        log.event("warning", "configuration reload: restart required", keys=outcome.restart,
                  applied=outcome.changed, config=where, configHash=outcome.hash)


def accept(source: ConfigSource, outcome: Outcome) -> None:
    """The outcome becomes what the source describes (for the next comparison, and for a
    worker started after it)."""
    if outcome.settings is not None:
        source.configured = outcome.configured
        if outcome.hash != source.hash:
            source.loaded_at = time.time()
        source.hash = outcome.hash


# --------------------------------------------------------------------------- files

def status_path(pid_file: str) -> str:
    return pid_file + ".reload"


def write_status(source: ConfigSource, outcome: Outcome) -> None:
    """`stellagw reload` waits for this (next to the pid file) to learn the verdict."""
    if not source.pid_file:
        return
    replace_atomically(status_path(source.pid_file),
                       orjson.dumps({**outcome.status(), "pid": os.getpid()}))


def read_status(pid_file: str) -> dict | None:
    try:
        with open(status_path(pid_file), "rb") as f:
            return orjson.loads(f.read())
    except (OSError, orjson.JSONDecodeError):
        return None


def _record_path(run_dir: str) -> str:
    return os.path.join(run_dir, "reload.pickle")


def write_record(run_dir: str, outcome: Outcome) -> None:
    """For the workers: the supervisor's verdict and the settings to run. The run
    directory is the supervisor's own (mkdtemp, mode 0700), read by its children only."""
    replace_atomically(_record_path(run_dir), pickle.dumps(outcome))


def read_record(run_dir: str) -> Outcome | None:
    try:
        with open(_record_path(run_dir), "rb") as f:
            return pickle.loads(f.read())
    except (OSError, pickle.UnpicklingError, EOFError):
        return None


# --------------------------------------------------------------------------- a worker

class Reloader:
    """One worker's side: SIGHUP, the certificate files' watch, the swap, the counters."""

    def __init__(self, worker, source: ConfigSource | None, run_dir: str | None = None):
        self.worker = worker
        self.source = source
        # With several workers the supervisor decides and writes a record there.
        self.run_dir = run_dir if run_dir and source is not None else None
        self.seq = source.seq if source is not None else 0
        self.hash = source.hash if source is not None else config_hash(worker.settings)
        self.loaded_at = source.loaded_at if source is not None else time.time()
        self.counts: dict[str, int] = {}
        self.cert_counts: dict[tuple, int] = {}
        self.http_tls = None           # ingress.tls.ReloadingContext of the client listener
        self._lock = asyncio.Lock()
        self._tasks: set = set()
        self._certs_loaded: set = set()   # listeners apply() gave new certificate settings
        worker.metrics.sources.append(self._families)

    # ------------------------------------------------------------------ triggers

    def signalled(self) -> None:
        """SIGHUP (from the loop's signal handler)."""
        task = asyncio.ensure_future(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def catch_up(self) -> None:
        """A worker (re)started while the supervisor handled a SIGHUP may have missed the
        signal (it is ignored until the loop's handler is in): look at the record."""
        if self.run_dir is not None:
            record = read_record(self.run_dir)
            if record is not None and record.seq > self.seq:
                self.signalled()

    def _done(self, task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.worker.log.event("error", "reload failed", error=repr(task.exception()))

    def tick(self) -> None:
        """Once a second: certificate files that changed on disk are loaded."""
        for name, ctx, reload in self._tls_listeners():
            try:
                if ctx.changed():
                    self._certificates(name, reload(None), "file changed")
            except Exception as exc:  # noqa: BLE001 -- the worker's tick must go on
                self.worker.log.event("error", "certificate reload failed; the loaded "
                                      "certificates stay in use", listener=name,
                                      why="file changed", error=repr(exc))

    # ------------------------------------------------------------------ the reload

    async def reload(self) -> None:
        worker = self.worker
        async with self._lock:
            while not worker.started and not worker._drain_started:
                await asyncio.sleep(0.05)    # start() builds what a swap would replace
            if worker._drain_started:
                return
            outcome = self._outcome()
            if outcome is not None:
                await self._take(outcome)
            # Certificates are read again on every SIGHUP, whatever the file said (unless
            # the new configuration's were loaded just now).
            for name, ctx, reload in self._tls_listeners():
                if name not in self._certs_loaded:
                    self._certificates(name, reload(None), "SIGHUP")
            self._certs_loaded.clear()
            worker.log.flush()

    def _outcome(self) -> Outcome | None:
        """The supervisor's verdict not yet taken, or (one worker) this worker's own."""
        if self.run_dir is not None:
            record = read_record(self.run_dir)
            if record is None or record.seq <= self.seq:
                return None
            self.seq = record.seq
            return record
        source = self.source
        if source is None:
            return None
        outcome = check(source, self.worker.settings)
        source.seq += 1
        outcome.seq = self.seq = source.seq
        log_outcome(self.worker.log, source, outcome)
        return outcome

    async def _take(self, outcome: Outcome) -> None:
        log = self.worker.log
        result = outcome.result
        if outcome.settings is not None and result != "unchanged":
            try:
                await self.apply(outcome)
            except Exception as exc:   # noqa: BLE001 -- a bug must not take the worker down
                result = "failed"
                log.event("error", "configuration reload failed; the running configuration "
                          "is kept", error=repr(exc), configHash=self.hash)
        if result not in ("invalid", "failed"):
            if outcome.hash != self.hash:
                self.loaded_at = time.time()
            self.hash = outcome.hash
            log.event("info", "configuration reloaded", result=result, configHash=self.hash,
                      changed=outcome.changed, restartRequired=outcome.restart)
            if self.run_dir is None:
                accept(self.source, outcome)
        self.count(result)
        if self.run_dir is None:
            outcome.result = result
            write_status(self.source, outcome)

    async def apply(self, outcome: Outcome) -> None:
        """Swap `outcome.settings` in. What can fail or must wait is built first; the swap
        itself has no await, so no request sees half of it."""
        from .auth import Authenticator
        from .health import builtins
        from .health.admin import AdminServer
        from .ingress.compress import Compression
        from .ingress.limits import HttpLimits
        from .ingress.proxy import TrustedProxies
        from .ratelimit import RateLimiter
        from .transport import headers as forward_headers
        from .transport.connection import INITIAL_WINDOW

        w = self.worker
        old, new = w.settings, outcome.settings
        og, ng = old.gateway, new.gateway
        http_limits = HttpLimits(ng)
        trusted = TrustedProxies(ng.http.trusted_proxies) or None
        compression = Compression(ng.compression) if ng.compression.enabled else None

        limiter = None
        if (old.rate_limiting, og.auth.rate_limiting) != (new.rate_limiting, ng.auth.rate_limiting):
            limiter = RateLimiter(new, w.log)
            limiter.check_observer = w.limiter.check_observer
            await limiter.start()        # loads its script; a Valkey that is down fails open
        # The authenticator last: take_over() hands it the running one's keys and clients,
        # so nothing that could fail may come between that and the swap.
        auth = retire_auth = None
        if (og.auth, og.http.public_origin) != (ng.auth, ng.http.public_origin):
            auth = Authenticator(new, w.log, on_event=w._auth_event)
            retire_auth = auth.take_over(w.auth)
            if auth.keys is not w.auth.keys:
                # Keys from somewhere else: the old authenticator serves until the new one
                # has them (or its first fetch failed: then it says why, as at start).
                await auth.start()
        if w._drain_started:
            # Stopping meanwhile: nothing is swapped; only what is the new ones' alone stops.
            if limiter is not None:
                await limiter.close()
            if auth is not None and auth.keys is not w.auth.keys:
                auth.keys.stop()
            return

        # ---- the swap
        w.settings = new
        w.http_settings = http_limits
        w.trusted_proxies = trusted
        w.compression = compression
        if og.http.strip_request_headers != ng.http.strip_request_headers:
            forward_headers.configure(ng.http.strip_request_headers)
        _set_logging(w.log, ng.logging)
        self._routing(og, ng)
        # As the hub computes it (transport/hub.py): the stream chunk of new requests.
        w.hub.chunk_size = max(1024, min(ng.routing.streaming_buffer_size, INITIAL_WINDOW))
        w.hub.stream_idle_timeout = ng.routing.stream_idle_timeout      # streams from now on
        w.hub.max_response_head = ng.routing.max_response_header_bytes  # answers from now on
        w.hub.held.budget = ng.transports.held_request_budget         # requests from now on
        retired_limiter = None
        if auth is not None:
            w.auth = auth
        if limiter is not None:
            before = w._counter_sources()
            retired_limiter, w.limiter = w.limiter, limiter
            # Its counts go on in the metrics: a counter that fell back would read as a
            # restart. (What it counts after this, for checks already sent, is not seen.)
            w.metrics.carry(_released(before, w._counter_sources()))
        oa = ng.openapi
        constraints = tuple(k for k, on in (("dpop", ng.auth.dpop_enabled),
                                            ("mtls", ng.auth.mtls_enabled)) if on)
        if (og.openapi, og.http.public_origin, og.auth.dpop_enabled, og.auth.mtls_enabled) != (
                oa, ng.http.public_origin, ng.auth.dpop_enabled, ng.auth.mtls_enabled):
            w.openapi.reconfigure(oa.title, oa.version, oa.cache_ttl_seconds,
                                  ng.http.public_origin or None, constraints)
        w.builtins = builtins.table(w)
        if w.admin is not None:
            fresh = AdminServer(w)       # its limits and table, built as at start
            w.admin.http_settings = fresh.http_settings
            w.admin.pipeline = fresh.pipeline
        w.pipeline.reconfigure(w)

        # ---- after the swap
        for name, ctx, reload in self._tls_listeners():
            tls = ng.http.tls if name == "http" else ng.transports.tls
            if tls != ctx.tls:
                self._certs_loaded.add(name)
                self._certificates(name, reload(tls), "configuration")
        loop = asyncio.get_running_loop()
        if retire_auth is not None:
            loop.call_later(RETIRE_AFTER, retire_auth)
        if retired_limiter is not None:
            loop.call_later(RETIRE_AFTER, lambda: self._spawn(retired_limiter.close()))

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _routing(self, og, ng) -> None:
        routing = self.worker.routing
        health = ng.health
        routing.heartbeat_interval = health.heartbeat_interval_seconds
        routing.degraded_after = health.degraded_after_seconds
        routing.unhealthy_after = health.heartbeat_timeout_seconds
        if (og.routing, og.node.region) == (ng.routing, ng.node.region):
            return
        configure = getattr(routing, "configure", None)
        if configure is not None:
            # gateway.routing as a whole (weights, ramps, sticky keys, outlier detection):
            # the routing state keeps its instances and works every ranking out again.
            configure(ng.routing, ng.node.region)
            return
        routing.service_expiry = ng.routing.service_expiry
        routing.allow_overlap = ng.routing.allow_overlapping_services
        routing.region = ng.node.region
        routing.neighbors = tuple(ng.routing.neighbor_regions)
        # Rankings are cached per live Route (routing/state.py) and dropped only by changes
        # of their instances; a region's preference changes every one of them.
        for route in list(getattr(routing, "_routes", {}).values()):
            cache = getattr(route, "_cache", None)
            if cache is not None:
                cache.clear()

    # ------------------------------------------------------------------ certificates

    def _tls_listeners(self):
        out = []
        if self.http_tls is not None:
            out.append(("http", self.http_tls, self.http_tls.reload))
        hub_ctx = getattr(self.worker.hub, "tls_context", None)
        if hub_ctx is not None:
            out.append(("transport", hub_ctx, lambda tls: self.worker.hub.reload_tls(tls)))
        return out

    def check_expiry(self) -> None:
        """A warning for each listener serving a certificate past its notAfter: it loads,
        and every client that verifies it then fails its handshake."""
        now = time.time()
        for name, ctx, _ in self._tls_listeners():
            if ctx.not_after is not None and ctx.not_after <= now:
                self.worker.log.event(
                    "warning", "certificate expired", listener=name,
                    notAfter=datetime.datetime.fromtimestamp(
                        ctx.not_after, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))

    def _certificates(self, listener: str, result, why: str) -> None:
        if result is None:
            return
        key = (listener, "ok" if result.reloaded else "failed")
        self.cert_counts[key] = self.cert_counts.get(key, 0) + 1
        if result.reloaded:
            self.worker.log.event("info", "certificates reloaded", listener=listener, why=why)
            self.check_expiry()
        else:
            self.worker.log.event("warning", "certificate reload failed; the loaded "
                                  "certificates stay in use", listener=listener, why=why,
                                  error=result.error)

    # ------------------------------------------------------------------ what it shows

    def count(self, result: str) -> None:
        self.counts[result] = self.counts.get(result, 0) + 1

    def describe(self) -> dict:
        return {"hash": self.hash, "loadedAt": datetime.datetime.fromtimestamp(
                    self.loaded_at, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                "reloads": dict(self.counts)}

    def _families(self) -> dict:
        return {
            "gateway_config_reloads": (
                "Configuration reloads (SIGHUP), by result: ok, unchanged, restart_required "
                "(applied but for keys that need a restart), invalid (refused), failed",
                ("result",), [((k,), v) for k, v in self.counts.items()]),
            "gateway_certificate_reloads": (
                "Certificate reloads of a TLS listener (http, transport), by result",
                ("listener", "result"), [(k, v) for k, v in self.cert_counts.items()]),
            "gateway_build_info_gauge": (
                "The version and configuration running: 1 per worker", ("version", "config_hash"),
                [((__version__, self.hash), 1)]),
            # Per worker (a gauge is summed over workers by its labels): each reports the
            # certificate it serves, which differ only while a reload reaches them.
            "gateway_certificate_not_after_gauge": (
                "The notAfter of the certificate a TLS listener (http, transport) serves, "
                "in Unix seconds", ("listener", "worker"),
                [((name, str(self.worker.worker_id)), ctx.not_after)
                 for name, ctx, _ in self._tls_listeners() if ctx.not_after is not None]),
        }


def _set_logging(log, logging) -> None:
    from .observe.logs import LEVELS
    log.threshold = LEVELS[logging.level]
    log.access_log = logging.access_log and log.threshold <= LEVELS["info"]


def _released(before: dict, after: dict) -> dict:
    """Per family and labels, what `before` counted that `after` no longer does."""
    out: dict[str, Any] = {}
    for name, (help_text, labels, samples) in before.items():
        now = {tuple(lv): v for lv, v in after.get(name, (None, None, ()))[2]}
        gone = [(lv, v - now.get(tuple(lv), 0)) for lv, v in samples
                if v - now.get(tuple(lv), 0) > 0]
        if gone:
            out[name] = (help_text, labels, gone)
    return out
