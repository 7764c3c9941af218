# What the compiled ingress calls in cext/httpwire.pyx once or more per request, as C
# functions rather than Python calls (docs/hot-path.md). Its pure-Python twin needs none.

cpdef bytes render_response(bytes line, bytes date, Py_ssize_t length, bytes headers,
                            bytes extra, str cid, bytes connection, bytes body)
cpdef bint host_ok(bytes value) except -1
cpdef tuple split_target(bytes url)
cpdef str cid_taken(bytes value)
cpdef str cid_made(str prefix, unsigned long long serial)
cpdef str method_name(bytes method)
cpdef bytes header_name(bytes raw)
