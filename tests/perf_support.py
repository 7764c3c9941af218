"""Loading perf/ scripts in tests: perf/ is not a package (its scripts run as
`python perf/x.py`), so a module is loaded by path under a private name."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PERF = Path(__file__).resolve().parent.parent / "perf"


def load_perf(name: str, relpath: str):
    """perf/<relpath> as module `name` (once: later calls return the same module)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, PERF / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while building the class
    spec.loader.exec_module(mod)
    return mod
