# C types for stellagw/routing/table.py when compiled (docs/hot-path.md): the routing
# table's entries become extension types whose fields the pipeline reads as struct members.
# Python code (state.py, the fleet view, tests) reads and sets them as attributes.
cimport cython


@cython.final
cdef class Endpoint:
    cdef public str method, path
    cdef public object timeout, claims, openapi, max_body
    cdef public bint streaming, websocket, sender_constrained, retryable

    cpdef Endpoint stricter(self, Endpoint other)


@cython.final
cdef class Instance:
    cdef public object service, version, version_key, instance_id, region, conn, status
    cdef public object announced, last_heartbeat, avg_ping_ms, in_flight, error_rate
    cdef public object endpoints, schemas, registered_at, ping_band, late, routes
    cdef public object ejected_until, ejected_reason, ejections, returned_at


@cython.final
cdef class Route:
    cdef public str method, template, service
    cdef public tuple candidates
    cdef public Endpoint policy
    cdef public dict _cache
    cdef public Py_ssize_t _rr
    cdef public object _view

    cpdef pick(self, version)
    cpdef take(self, tuple best)
