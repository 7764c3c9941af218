"""Build the Cython extensions in cext/ into stellagw._cext.<name>.

Switches (each also an environment variable, so they work through pip):
  --cython-annotate    STELLAGW_CYTHON_ANNOTATE=1  write cext/<name>.html annotate reports
  --debug-build        STELLAGW_DEBUG_BUILD=1      GW_DEBUG checks, line tracing, -O0 -g
  --cython-directives  STELLAGW_CYTHON_DIRECTIVES="a=b,c=d"
  --perf-extensions    STELLAGW_PERF_EXTENSIONS=1  also perf/*.pyx, in place only
STELLAGW_NO_EXTENSIONS=1 skips compilation; the pure-Python twins are used.
"""
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

INCLUDE = os.path.join("cext", "include")

RELEASE_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "embedsignature": True,
}


def _env_flag(name):
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


class build_ext(_build_ext):
    user_options = _build_ext.user_options + [
        ("cython-annotate", None, "write Cython annotate HTML next to each .pyx"),
        ("debug-build", None, "GW_DEBUG invariant checks, line tracing, no optimisation"),
        ("cython-directives=", None, "extra Cython directives: a=b,c=d"),
        ("perf-extensions", None, "also the benchmarks' perf/*.pyx (with --inplace only)"),
    ]
    boolean_options = _build_ext.boolean_options + ["cython-annotate", "debug-build",
                                                    "perf-extensions"]

    def initialize_options(self):
        super().initialize_options()
        self.cython_annotate = None
        self.debug_build = None
        self.cython_directives = None
        self.perf_extensions = None

    def finalize_options(self):
        if self.cython_annotate is None:
            self.cython_annotate = _env_flag("STELLAGW_CYTHON_ANNOTATE")
        if self.debug_build is None:
            self.debug_build = _env_flag("STELLAGW_DEBUG_BUILD")
        if self.cython_directives is None:
            self.cython_directives = os.environ.get("STELLAGW_CYTHON_DIRECTIVES", "")
        if self.perf_extensions is None:
            self.perf_extensions = _env_flag("STELLAGW_PERF_EXTENSIONS")
        if self.perf_extensions:
            # perf/ measures the checkout it sits in: built beside its sources, never
            # into build/, whence a wheel would pick it up.
            if not self.inplace:
                raise SystemExit("--perf-extensions builds in place only: add --inplace")
            self.distribution.ext_modules += perf_extensions()

        from Cython.Build import cythonize

        directives = dict(RELEASE_DIRECTIVES)
        if self.debug_build:
            directives.update(boundscheck=True, wraparound=True, initializedcheck=True,
                              linetrace=True, profile=True)
        for item in filter(None, self.cython_directives.split(",")):
            key, _, value = item.partition("=")
            directives[key.strip()] = value.strip()

        for ext in self.distribution.ext_modules:
            if self.debug_build:
                ext.define_macros += [("GW_DEBUG", "1"), ("CYTHON_TRACE", "1"),
                                      ("CYTHON_TRACE_NOGIL", "1")]
                ext.extra_compile_args = ["-O0", "-g3", "-Wall"]
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(self.cython_annotate),
            include_path=[INCLUDE, "."],   # ".": stellagw/_cext/*.pxd, the codecs' declarations
            # Rebuild C whenever the directives change (debug <-> release).
            force=bool(self.debug_build),
        )
        super().finalize_options()


# Glue compiled from its own .py (Cython pure-Python mode, typed by the .pxd beside it):
# one source that also runs uncompiled (docs/hot-path.md). The module is built in place,
# beside its source; stellagw/_impl.py makes STELLAGW_NO_EXTENSIONS=1 import the .py.
GLUE = ["stellagw/auth/dpop.py", "stellagw/ingress/http.py", "stellagw/pipeline.py",
        "stellagw/routing/table.py", "stellagw/transport/batch.py",
        "stellagw/transport/connection.py"]


def extensions():
    if _env_flag("STELLAGW_NO_EXTENSIONS"):
        return []
    exts = []
    for pyx in sorted(glob.glob(os.path.join("cext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        exts.append(Extension(
            "stellagw._cext." + name,
            [pyx],
            include_dirs=[INCLUDE],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        ))
    for source in GLUE:
        exts.append(Extension(
            os.path.splitext(source)[0].replace("/", "."),
            [source],
            extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        ))
    return exts


def perf_extensions():
    return [Extension("perf." + os.path.splitext(os.path.basename(pyx))[0], [pyx],
                      extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"])
            for pyx in sorted(glob.glob(os.path.join("perf", "*.pyx")))]


setup(ext_modules=extensions(), cmdclass={"build_ext": build_ext})
