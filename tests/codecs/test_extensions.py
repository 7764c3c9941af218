"""Guard: the suite must run against the compiled Cython modules, not silently against the
pure-Python twins of the codecs (which the differential tests compare them with) or the
uncompiled source of the glue (docs/hot-path.md)."""
from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from stellagw import _impl
from tests.support import REPO

ROOT = str(REPO)
EXTENSIONS = sorted(os.path.splitext(os.path.basename(p))[0]
                    for p in glob.glob(os.path.join(ROOT, "cext", "*.pyx")))


def test_every_extension_has_a_pure_python_twin():
    assert EXTENSIONS, "no cext/*.pyx found"
    for name in EXTENSIONS:
        assert os.path.exists(os.path.join(ROOT, "stellagw", "_py", name + ".py")), name


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="STELLAGW_NO_EXTENSIONS=1 selects the twins")
@pytest.mark.parametrize("name", EXTENSIONS)
def test_compiled_module_loaded(name):
    assert _impl.compiled(name), (
        f"stellagw._cext.{name} did not load: run `make build` (or pip install -e .)")
    mod = sys.modules[f"stellagw._cext.{name}"]
    assert mod.__file__.endswith((".so", ".pyd"))


_WITHOUT = """
import importlib.abc, sys, warnings
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname == "stellagw._cext.{name}":
            raise ImportError("not built (test)")
sys.meta_path.insert(0, Missing())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import {home}
from stellagw import _impl
from tests.support import REPO
print(_impl.compiled("{name}"), "stellagw._py.{name}" in sys.modules,
      [str(w.message) for w in caught if w.category is RuntimeWarning])
"""


@pytest.mark.parametrize("name", EXTENSIONS)
def test_a_missing_compiled_codec_falls_back_to_its_twin_with_a_warning(name):
    code = _WITHOUT.format(name=name, home=_impl.CODECS[name])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=ROOT,
                         env={k: v for k, v in os.environ.items() if k != "STELLAGW_NO_EXTENSIONS"})
    assert out.returncode == 0, out.stderr[-1500:]
    assert out.stdout.startswith("False True ["), out.stdout
    assert f"compiled module {name!r} not available (not built (test))" in out.stdout


@pytest.mark.parametrize("name", EXTENSIONS)
def test_each_module_imports_first_in_a_fresh_interpreter(name):
    """Either twin, or the module that imports it for its stage, imported before anything
    else of stellagw (a tool, a test) loads: no import cycle through that package."""
    mods = [f"stellagw._py.{name}", _impl.CODECS[name]] + (
        [] if _impl.NO_EXTENSIONS else [f"stellagw._cext.{name}"])
    for mod in mods:
        out = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, f"import {mod}: {out.stderr[-1500:]}"


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="STELLAGW_NO_EXTENSIONS=1 runs the glue uncompiled")
@pytest.mark.parametrize("name", _impl.GLUE)
def test_compiled_glue_loaded(name):
    assert _impl.compiled(name), f"{name} runs uncompiled: run `make build` (or pip install -e .)"


def _glue_from_source(prelude=""):
    code = (prelude + "import importlib, stellagw._impl as i; "
            "print(all(importlib.import_module(m).__file__.endswith('.py') for m in i.GLUE))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=ROOT, env={**os.environ, "STELLAGW_NO_EXTENSIONS": "1"})
    assert out.stdout.strip() == "True", out.stderr[-1500:]


def test_no_extensions_runs_the_glue_from_its_source():
    _glue_from_source()


def test_the_glue_runs_from_its_source_without_cython_installed():
    # The decorators that need `cython` (freelists) fall back to stellagw/_cython_shadow.py.
    _glue_from_source("import sys; sys.modules['cython'] = None; ")


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="STELLAGW_NO_EXTENSIONS=1 runs the glue uncompiled")
def test_request_and_pending_come_from_freelists():
    # One of each per routed request: a freelist keeps the last 64 freed for reuse, where
    # without one each is a malloc and a free (Cython dropped the .pxd's freelist directive).
    # 100 made, then dropped: 64 go back to the freelist, still allocated; without it, 100
    # blocks would be freed.
    import gc

    from stellagw.ingress.http import Request
    from stellagw.transport.connection import Pending
    for cls in (Request, Pending):
        gc.disable()
        try:
            made = [cls.__new__(cls) for _ in range(100)]   # the freelist is empty now
            before = sys.getallocatedblocks()
            del made
            freed = before - sys.getallocatedblocks()
        finally:
            gc.enable()
        assert freed < 70, (cls.__name__, freed)


def test_every_glue_module_has_its_pxd_and_is_built():
    with open(os.path.join(ROOT, "setup.py")) as f:
        setup_py = f.read()
    for name in _impl.GLUE:
        source = name.replace(".", "/") + ".py"
        assert os.path.exists(os.path.join(ROOT, source[:-3] + ".pxd")), source
        assert f'"{source}"' in setup_py, source


def test_the_codec_list_is_cext():
    assert EXTENSIONS == sorted(_impl.CODECS)


@pytest.mark.skipif(_impl.NO_EXTENSIONS, reason="STELLAGW_NO_EXTENSIONS=1 runs uncompiled")
def test_nothing_runs_uncompiled():
    # What the Dockerfile's build check asserts in the image.
    assert _impl.not_compiled() == []
