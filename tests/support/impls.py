"""A codec's two implementations, for its tests: the compiled module (stellagw._cext.<name>,
cext/<name>.pyx) and its pure-Python twin (stellagw._py.<name>).

    FRAME = Codec("frame")
    @pytest.mark.parametrize("impl", FRAME.params)    # "c" (skipped with the reason when
    def test_x(impl):                                 #  not built), "py"
        mod = FRAME.of(impl)
    @FRAME.needs_compiled
    def test_compiled_is_the_twin(): ...

With STELLAGW_NO_EXTENSIONS=1 only the twin is tested (the run `make test` makes of the
glue, which then imports the twins).

A glue module has one source: `uncompiled("stellagw.auth.dpop")` runs its .py in this
process beside the extension built from it, for tests that hold the two to each other.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import pytest

from stellagw import _impl


class Codec:
    def __init__(self, name: str):
        self.name = name
        self.twin = importlib.import_module(f"stellagw._py.{name}")
        self.compiled, self.why_not = _compiled(name)
        self.needs_compiled = pytest.mark.skipif(self.compiled is None, reason=self.why_not or "")
        self.params = [pytest.param("c", marks=self.needs_compiled), "py"]
        # What is there to compare: the twin, and the compiled module when it is.
        self.available = [self.twin] + ([self.compiled] if self.compiled is not None else [])
        # The module the package uses (a codec's public module imports one of the two).
        self.selected = self.compiled if self.compiled is not None else self.twin

    def of(self, param: str):
        if param == "c" and self.compiled is None:
            pytest.skip(self.why_not)
        return self.compiled if param == "c" else self.twin


def _compiled(name: str):
    if _impl.NO_EXTENSIONS:
        return None, "STELLAGW_NO_EXTENSIONS=1: testing the pure-Python twin only"
    try:
        return importlib.import_module(f"stellagw._cext.{name}"), None
    except ImportError as exc:
        return None, f"stellagw._cext.{name} not built ({exc}); run make build"


def uncompiled(name: str):
    """The glue module `name` (e.g. "stellagw.auth.dpop") run from its .py, beside the
    compiled one this process imported: a fresh module object, not put in sys.modules,
    whose imports are the package's own (docs/hot-path.md)."""
    home = importlib.import_module(name.rpartition(".")[0])
    source = os.path.join(os.path.dirname(home.__file__), name.rpartition(".")[2] + ".py")
    spec = importlib.util.spec_from_file_location(name, source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.__file__.endswith(".py")
    return module
