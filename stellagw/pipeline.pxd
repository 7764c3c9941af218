# C types for stellagw/pipeline.py when compiled (docs/hot-path.md).
cimport cython

from stellagw.ingress.http cimport Request, HttpProtocol
from stellagw._cext.metrics cimport Histogram, perf_counter
from stellagw._cext.radix cimport Router, normalize_path
from stellagw.routing.table cimport Endpoint, Instance, Route
from stellagw.transport.connection cimport ServiceConnection

cdef bytes _JSON
cdef frozenset CREDENTIAL_FIELDS
cdef frozenset IDEMPOTENT
cdef object UNLIMITED


@cython.final
cdef class Pipeline:
    cdef object _worker, _routing, _auth, _limiter, _metrics, _anonymous
    cdef Router _router
    cdef str _anonymous_outcome
    cdef bytes _anonymous_headers
    cdef dict _builtins
    cdef bytes _builtin_lead
    cdef Histogram _auth_hist, _routing_hist
    cdef object _tracing
    cdef double _default_timeout
    cdef Py_ssize_t _stream_threshold
    cdef set _tasks
    cdef object _cors
    cdef object _hosts
    cdef public object _retries
    cdef unsigned long long _dispatched
    cdef bint _limited

    @cython.locals(t0=double, t1=double, t2=double, field=tuple, route=Route,
                   endpoint=Endpoint, name=bytes, first=int, target=bytes)
    cpdef handle(self, Request req)
    cdef _after_auth(self, Request req, Route route, path, double routing_s)
    @cython.locals(now=double, conn=ServiceConnection, instance=Instance, endpoint=Endpoint)
    cdef _after_limit(self, Request req, Route route, path, decision, double routing_s)
    cdef _refuse(self, Request req, failure)


cdef _answer(Request req, result)
cdef str _outcome(identity)
