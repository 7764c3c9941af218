"""Compiled or pure Python: how each compiled module of the gateway is chosen.

Two kinds (docs/hot-path.md):

* Codecs (frame, radix, window, metrics, b64url, httpwire, replaytable) are written twice:
  cext/<name>.pyx and a pure-Python twin stellagw/_py/<name>.py, a reference they are tested
  against. The module of the stage that uses a codec (CODECS below) imports one of them by
  a plain import a reader and a tool can follow::

      from .. import _impl

      if _impl.NO_EXTENSIONS:
          from .._py import radix as _m
      else:
          try:
              from .._cext import radix as _m
          except ImportError as exc:
              _impl.fell_back("radix", exc)
              from .._py import radix as _m

* Glue (GLUE below) is one .py file, compiled by Cython in place beside it (typed by the
  .pxd next to it). Python imports the compiled module when it is there.

STELLAGW_NO_EXTENSIONS=1 selects the twins and makes the glue import from its .py source
(debugging, no compiler). Without it a missing compiled codec falls back to its twin with a
warning; `compiled(name)` says what was loaded, and tests/codecs/test_extensions.py fails on a
fallback of either kind.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

NO_EXTENSIONS = os.environ.get("STELLAGW_NO_EXTENSIONS", "").lower() not in ("", "0", "false", "no")

# Modules compiled from their own .py (setup.py GLUE).
GLUE = ("stellagw.auth.dpop", "stellagw.ingress.http", "stellagw.pipeline",
        "stellagw.routing.table", "stellagw.transport.batch", "stellagw.transport.connection")
# The codecs: cext/<name>.pyx, each with its twin stellagw/_py/<name>.py (a test keeps this
# list equal to cext/*.pyx: the wheel ships no .pyx to look at), and the module that
# imports it for its stage.
CODECS = {
    "b64url": "stellagw.auth.jose",
    "frame": "stellagw.transport.frame",
    "httpwire": "stellagw.ingress.wire",
    "metrics": "stellagw.observe.metrics",
    "radix": "stellagw.routing.radix",
    "replaytable": "stellagw.auth.replay",
    "window": "stellagw.ratelimit.window",
}

_fell_back: set[str] = set()


def fell_back(name: str, exc: ImportError) -> None:
    """The compiled codec `name` did not import: say so (its module then uses the twin)."""
    _fell_back.add(name)
    warnings.warn(f"stellagw: compiled module {name!r} not available ({exc}); "
                  f"using the pure-Python twin", RuntimeWarning, stacklevel=2)


def compiled(name: str) -> bool:
    """True when the compiled module `name` was loaded: a codec (by the module CODECS names
    for it), or a glue module (its dotted name, e.g. "stellagw.ingress.http") from its
    extension."""
    if name in GLUE:
        mod = importlib.import_module(name)
        return not mod.__file__.endswith(".py")
    importlib.import_module(CODECS[name])
    return not NO_EXTENSIONS and name not in _fell_back


def not_compiled() -> list[str]:
    """Every codec and glue module that runs uncompiled here (an image's build check)."""
    return [name for name in (*CODECS, *GLUE) if not compiled(name)]


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Under STELLAGW_NO_EXTENSIONS=1, the glue modules come from their .py even where the
    compiled extension sits beside it (an in-place build)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in GLUE or not path:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path:
            source = os.path.join(entry, leaf)
            if os.path.exists(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


if NO_EXTENSIONS and not any(isinstance(f, _SourceFirst) for f in sys.meta_path):
    sys.meta_path.insert(0, _SourceFirst())
