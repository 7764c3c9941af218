# What the compiled service connection calls in cext/frame.pyx once per request, as C
# functions rather than Python calls (docs/hot-path.md). Its pure-Python twin needs none.

cpdef tuple decode_response_block(payload, tuple drop)
cpdef bytes corr_id(bytes prefix, unsigned long long serial)
