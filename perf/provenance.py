"""What a figure was measured on: the commit, what was uncommitted, the machine.

One home for it, so every command's report says the same things the same way. git runs
read-only (GIT_OPTIONAL_LOCKS=0 keeps `git status` from refreshing the index under anyone
working in the same checkout).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from . import _procs
from ._procs import REPO_DIR


def _git(*args: str, repo: Path = REPO_DIR) -> str | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        out = subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def commit(repo: Path = REPO_DIR) -> tuple[str | None, str | None]:
    """HEAD's hash and subject line."""
    head = (_git("log", "-1", "--format=%H%n%s", repo=repo) or "").splitlines()
    return (head[0] if head else None), (head[1] if len(head) > 1 else None)


def dirty_files(*paths: str, repo: Path = REPO_DIR) -> list[str] | None:
    """Tracked files with uncommitted changes (under ``paths`` when given); None when git
    cannot say."""
    status = _git("status", "--porcelain", "--untracked-files=no", *(("--", *paths) if paths else ()),
                  repo=repo)
    return None if status is None else [line[3:] for line in status.splitlines() if line]


def machine_info() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": model,
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpus_online": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    for tool, args in (("wrk", ["-v"]), ("nginx", ["-v"])):
        exe = _procs.which(tool, sbin=True)
        if exe:
            try:
                r = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
                info[tool] = ((r.stdout + r.stderr).strip().splitlines() or [""])[0]
            except (OSError, subprocess.TimeoutExpired):
                pass
    return info
