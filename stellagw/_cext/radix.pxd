# What the compiled pipeline calls in cext/radix.pyx once per request, as a C function
# rather than a Python call (docs/hot-path.md). Its pure-Python twin needs none.

cpdef normalize_path(raw)
