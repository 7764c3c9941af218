"""``python -m perf <command> [options]``: run one of the commands of perf/commands.py."""
from __future__ import annotations

import importlib
import sys

from ._procs import run_main
from .commands import COMMANDS


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m perf <command> [options]   (python -m perf <command> --help)", ""]
    for tools in (False, True):
        lines.append("tools the benchmarks start, runnable alone:" if tools else "benchmarks:")
        lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values() if c.tool == tools]
        lines.append("")
    lines += ["Loopback only; every process a command starts is stopped when it ends, also on",
              "Ctrl-C and SIGTERM. perf/README.md explains each figure; make <command> runs one."]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return importlib.import_module(command.module).main(argv[1:])


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
