"""Pure-Python twins of the Cython modules in stellagw._cext.

Each module here has the same public API as its compiled twin and is tested against it
(tests/codecs/). They are used when STELLAGW_NO_EXTENSIONS=1 is set, or
when the compiled module is missing (with a warning).
"""
