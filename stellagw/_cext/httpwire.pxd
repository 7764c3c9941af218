# The correlation id functions of cext/httpwire.pyx, for the compiled ingress to call as C
# (once per request each; docs/hot-path.md). Its pure-Python twin needs none.

cpdef str cid_taken(bytes value)
cpdef str cid_made(str prefix, unsigned long long serial)
