"""Choose the compiled or the pure-Python implementation of an extension module.

STELLAGW_NO_EXTENSIONS=1 selects the pure-Python twins (debugging, no compiler). Without
it a missing compiled module falls back to the twin with a warning, and `compiled(name)`
says which one was loaded: the guard test in tests/test_extensions.py fails on a fallback.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

NO_EXTENSIONS = os.environ.get("STELLAGW_NO_EXTENSIONS", "").lower() not in ("", "0", "false", "no")

_loaded: dict[str, bool] = {}


def select(name: str) -> ModuleType:
    """Return stellagw._cext.<name>, or stellagw._py.<name> when that cannot be used."""
    if not NO_EXTENSIONS:
        try:
            mod = importlib.import_module(f"stellagw._cext.{name}")
        except ImportError as exc:
            warnings.warn(f"stellagw: compiled module {name!r} not available ({exc}); "
                          f"using the pure-Python twin", RuntimeWarning, stacklevel=2)
        else:
            _loaded[name] = True
            return mod
    _loaded[name] = False
    return importlib.import_module(f"stellagw._py.{name}")


def compiled(name: str) -> bool:
    """True when the compiled module `name` was selected by select()."""
    if name not in _loaded:
        select(name)
    return _loaded[name]
