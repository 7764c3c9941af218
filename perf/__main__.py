"""``python -m perf <command> [options]``: run one of the commands of perf/commands.py."""
from __future__ import annotations

import importlib
import sys

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
    module = importlib.import_module(command.module)
    try:
        return module.main(argv[1:])
    except KeyboardInterrupt:
        # Ctrl-C, or SIGTERM through _procs.stop_on_sigterm: the commands' finally blocks
        # have stopped their processes by the time it gets here.
        print("interrupted: every process started was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
