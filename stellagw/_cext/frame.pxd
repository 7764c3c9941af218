# What the compiled service connection calls in cext/frame.pyx once per request, as a C
# function rather than a Python call (docs/hot-path.md). Its pure-Python twin needs none.

cpdef tuple decode_response_block(payload, tuple drop)
