# What the compiled pipeline calls in cext/radix.pyx once per request, as C rather than
# Python calls (docs/hot-path.md): normalize_path and Router.match. Declaring Router here
# makes its fields, and its tree's nodes, part of this file too. The pure-Python twin needs
# none of it.
cimport cython


@cython.final
cdef class _Node:
    cdef dict literal                 # segment -> _Node, or None
    cdef _Node param                  # child for a '{name}' segment, or None
    cdef dict handlers                # method -> _Route ending here, or None
    cdef dict catchall                # method -> _Route for a '{*name}' here, or None
    cdef tuple not_allowed            # (METHOD_NOT_ALLOWED, sorted methods, None)
    cdef tuple catch_not_allowed      # the same for the catch-all routes


@cython.final
cdef class Router:
    cdef _Node _root                  # the tree; '/' is the root itself
    cdef dict _static                 # full literal path (with and without a trailing '/') -> _Node
    # (method, template) -> endpoint, in insertion order; a dict so that remove() costs the
    # same with 40,000 routes as with 4.
    cdef dict _routes
    cdef dict _shapes                 # (method, shape) -> template, for conflict messages

    cpdef tuple match(self, str method, str path)


cpdef normalize_path(raw)
