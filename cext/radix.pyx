# cython: language_level=3
"""Radix path router and request-path normalisation (compiled).

The pure-Python twin is stellagw/_py/radix.py; both give the same results (tests/codecs/test_radix.py
runs them differentially). The rules and their reasons are in docs/routing.md.

Hot path: normalize_path() and Router.match() run once per request. match() allocates
nothing for a route without parameters: the (FOUND, endpoint, None) and
(METHOD_NOT_ALLOWED, allow, None) tuples are built at add() time.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8

import re as _re

__all__ = ["FOUND", "NOT_FOUND", "METHOD_NOT_ALLOWED", "MAX_SEGMENTS", "RouteError", "Router",
           "normalize_path"]


cdef enum:
    _FOUND = 0
    _NOT_FOUND = 1
    _METHOD_NOT_ALLOWED = 2
    # Templates deeper than this are refused, so parameter positions fit a C array.
    _MAX_SEGMENTS = 64
    # normalize_path() decodes into the stack below this output size, else the heap.
    _STACK_OUT = 2048

FOUND = _FOUND
NOT_FOUND = _NOT_FOUND
METHOD_NOT_ALLOWED = _METHOD_NOT_ALLOWED
MAX_SEGMENTS = _MAX_SEGMENTS

cdef tuple _NOT_FOUND_RESULT = (_NOT_FOUND, None, None)

cdef object _NAME = _re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z").match
# An upper-case HTTP token (RFC 9110 §5.6.2 tchar without lower-case letters), starting
# with a letter so that '*' is not mistaken for a wildcard.
cdef object _METHOD = _re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*\Z").match


class RouteError(ValueError):
    """A template that cannot be added: bad syntax or a conflicting route."""


# ---------------------------------------------------------------------------------------
# normalize_path

cdef inline int _unhex(unsigned char c) noexcept nogil:
    if c >= c'0' and c <= c'9':
        return c - c'0'
    if c >= c'a' and c <= c'f':
        return c - c'a' + 10
    if c >= c'A' and c <= c'F':
        return c - c'A' + 10
    return -1


cdef bint _utf8_ok(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (RFC 3629: no overlongs, no surrogates, <= U+10FFFF), and no C1
    controls (U+0080..U+009F, encoded C2 80..C2 9F) — the same set CPython's strict
    decoder accepts, minus C1."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, b1
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        if c < 0xC2 or c > 0xF4 or i + 1 >= n:
            return False
        b1 = s[i + 1]
        if (b1 & 0xC0) != 0x80:
            return False
        if c < 0xE0:
            if c == 0xC2 and b1 < 0xA0:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and b1 < 0xA0) or (c == 0xED and b1 > 0x9F):
                return False
            i += 3
        else:
            if i + 3 >= n or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            if (c == 0xF0 and b1 < 0x90) or (c == 0xF4 and b1 > 0x8F):
                return False
            i += 4
    return True


cdef inline Py_ssize_t _put_escape(char *out, Py_ssize_t o, char a, char b) noexcept nogil:
    out[o] = c'%'
    out[o + 1] = a
    out[o + 2] = b
    return o + 3


cdef Py_ssize_t _normalize(const unsigned char *p, Py_ssize_t n, char *out) noexcept nogil:
    """Write the normalised path of p[0:n] into out (room for 3*n bytes); return its
    length, or -1 when the path is invalid. p[0] is '/'."""
    cdef Py_ssize_t i = 1, o = 1, seg_o = 1, j
    cdef int c, hi, lo
    cdef bint high = False       # the current segment holds bytes >= 0x80
    cdef bint at_end
    out[0] = c'/'
    while True:
        at_end = i >= n
        if at_end or p[i] == c'/':
            # End of a segment out[seg_o:o]; RFC 3986 §5.2.4 on the *decoded* segment, so
            # "%2e%2E" is a dot-segment too. UTF-8 is checked here, before a ".." can drop
            # the segment, so an invalid byte anywhere in the request rejects it.
            if high and not _utf8_ok(<const unsigned char *>out + seg_o, o - seg_o):
                return -1
            high = False
            if o == seg_o or (o - seg_o == 1 and out[seg_o] == c'.'):
                o = seg_o                    # "//" and "/./" vanish
            elif o - seg_o == 2 and out[seg_o] == c'.' and out[seg_o + 1] == c'.':
                o = seg_o
                if seg_o > 1:                # ".." above the root stays at the root
                    j = seg_o - 2
                    while out[j] != c'/':
                        j -= 1
                    o = j + 1
            elif not at_end:
                out[o] = c'/'
                o += 1
            if at_end:
                return o
            i += 1
            seg_o = o
            continue
        c = p[i]
        if c == c'%':
            if i + 2 >= n:                  # truncated escape
                return -1
            hi = _unhex(p[i + 1])
            lo = _unhex(p[i + 2])
            if hi < 0 or lo < 0:
                return -1
            c = (hi << 4) | lo
            i += 3
            # '/' never becomes a segment boundary, '\' is a separator on some backends,
            # and '%' stays the escape introducer so "%252F" is not decoded twice.
            if c == 0x2F:
                o = _put_escape(out, o, c'2', c'F')
                continue
            if c == 0x5C:
                o = _put_escape(out, o, c'5', c'C')
                continue
            if c == 0x25:
                o = _put_escape(out, o, c'2', c'5')
                continue
        else:
            i += 1
            if c == 0x5C:                    # a raw '\' is literal: canonical form %5C
                o = _put_escape(out, o, c'5', c'C')
                continue
        if c < 0x20 or c == 0x7F:            # C0 controls and DEL, raw or decoded
            return -1
        if c >= 0x80:
            high = True
        out[o] = <char>c
        o += 1


cpdef normalize_path(raw):
    """normalize_path(raw: bytes | str) -> str | None

    The normalised, percent-decoded request path used for matching, or None when the
    path is invalid (the gateway answers 400). See docs/routing.md."""
    cdef const unsigned char *p
    cdef Py_ssize_t n, o
    cdef char stack_out[_STACK_OUT]
    cdef char *out
    if isinstance(raw, str):
        try:
            p = <const unsigned char *>PyUnicode_AsUTF8AndSize(raw, &n)
        except UnicodeEncodeError:           # lone surrogates
            return None
    elif isinstance(raw, bytes):
        p = <const unsigned char *>PyBytes_AS_STRING(raw)
        n = PyBytes_GET_SIZE(raw)
    else:
        raise TypeError(f"normalize_path() expects bytes or str, not {type(raw).__name__}")
    if n == 0 or p[0] != c'/':
        return None
    if 3 * n <= _STACK_OUT:
        out = stack_out
    else:
        out = <char *>PyMem_Malloc(3 * n)
        if out == NULL:
            raise MemoryError()
    try:
        o = _normalize(p, n, out)
        if o < 0:
            return None
        return PyUnicode_DecodeUTF8(out, o, NULL)
    finally:
        if out != stack_out:
            PyMem_Free(out)


cdef inline str _decode_value(str seg):
    # Only three escapes can occur in a normalised path; '%25' goes last so that
    # "%252F" becomes "%2F", never '/'.
    if "%" not in seg:
        return seg
    return seg.replace("%2F", "/").replace("%5C", "\\").replace("%25", "%")


# ---------------------------------------------------------------------------------------
# Router
#
# Nodes and routes are built at add() time, never per request, so no freelist.

@cython.final
cdef class _Route:
    cdef readonly str method          # upper-case method token
    cdef readonly str template        # as given to add()
    cdef readonly object endpoint     # opaque to the router
    cdef tuple names                  # parameter names in path order (catch-all last)
    cdef bint catchall                # the last name is a '{*name}'
    cdef tuple found                  # (FOUND, endpoint, None) when there are no names

    def __cinit__(self, str method, str template, object endpoint, tuple names,
                  bint catchall):
        self.method = method
        self.template = template
        self.endpoint = endpoint
        self.names = names
        self.catchall = catchall
        self.found = (_FOUND, endpoint, None) if not names else None


@cython.final
cdef class _Node:
    pass        # its fields: stellagw/_cext/radix.pxd


ctypedef struct _Search:
    Py_ssize_t caps[_MAX_SEGMENTS + 1]  # segment index of each parameter, in path order
    PyObject *miss                      # first 405 result met (borrowed from its node)
    bint multi                          # more than one node matched the path, not the method


@cython.wraparound(True)   # cold path: negative slices are clearer
cdef list _parse(object template):
    """Split a template into [(kind, text)], kind 'l' literal, 'p' param, 'c' catch-all."""
    if not isinstance(template, str):
        raise RouteError(f"template {template!r}: must be a str")
    if not template.startswith("/"):
        raise RouteError(f"template {template!r}: must start with '/'")
    if template == "/":
        return []
    if template.endswith("/"):
        raise RouteError(f"template {template!r}: must not end with '/' "
                         f"(a trailing slash is not significant for matching)")
    cdef list parts = template[1:].split("/")
    if len(parts) > _MAX_SEGMENTS:
        raise RouteError(f"template {template!r}: more than {_MAX_SEGMENTS} segments")
    cdef list out = []
    cdef set names = set()
    cdef Py_ssize_t k
    cdef str seg, name, kind
    for k, seg in enumerate(parts):
        if not seg:
            raise RouteError(f"template {template!r}: empty segment ('//')")
        if "{" in seg or "}" in seg:
            if not (seg.startswith("{") and seg.endswith("}")) or seg.count("{") != 1 \
                    or seg.count("}") != 1:
                raise RouteError(f"template {template!r}: unbalanced or partial-segment "
                                 f"parameter {seg!r} (a parameter is a whole segment)")
            name = seg[1:-1]
            kind = "p"
            if name.startswith("*"):
                kind = "c"
                name = name[1:]
                if k != len(parts) - 1:
                    raise RouteError(f"template {template!r}: catch-all {seg!r} "
                                     f"must be the last segment")
            if not name:
                raise RouteError(f"template {template!r}: empty parameter name")
            if _NAME(name) is None:
                raise RouteError(f"template {template!r}: invalid parameter name {name!r}")
            if name in names:
                raise RouteError(f"template {template!r}: duplicate parameter name {name!r}")
            names.add(name)
            out.append((kind, name))
        else:
            if seg == "." or seg == ".." or normalize_path("/" + seg) != "/" + seg:
                raise RouteError(f"template {template!r}: literal segment {seg!r} is not "
                                 f"in normalised form (see normalize_path)")
            out.append(("l", seg))
    return out


cdef _Route _walk(_Node node, list segs, Py_ssize_t i, Py_ssize_t n, str method,
                  Py_ssize_t depth, _Search *s):
    """Depth-first search in precedence order: literal, parameter, catch-all. Each node is
    visited at most once per call, so the search is linear in the size of the tree."""
    cdef PyObject *hit
    cdef _Route route
    cdef str seg
    if i == n:
        if node.handlers is not None:
            hit = PyDict_GetItem(node.handlers, method)
            if hit != NULL:
                return <_Route>hit
            _note_miss(s, node.not_allowed)
    else:
        seg = <str>PyList_GET_ITEM(segs, i)
        if node.literal is not None:
            hit = PyDict_GetItem(node.literal, seg)
            if hit != NULL:
                route = _walk(<_Node>hit, segs, i + 1, n, method, depth, s)
                if route is not None:
                    return route
        if node.param is not None and len(seg) > 0:
            s.caps[depth] = i
            route = _walk(node.param, segs, i + 1, n, method, depth + 1, s)
            if route is not None:
                return route
    if node.catchall is not None:
        hit = PyDict_GetItem(node.catchall, method)
        if hit != NULL:
            s.caps[depth] = i
            return <_Route>hit
        _note_miss(s, node.catch_not_allowed)
    return None


cdef inline void _note_miss(_Search *s, tuple result) noexcept:
    if s.miss == NULL:
        s.miss = <PyObject *>result
    elif s.miss != <PyObject *>result:
        s.multi = True


cdef void _collect_allow(_Node node, list segs, Py_ssize_t i, Py_ssize_t n, set allow):
    """Slow path for a 405 where several templates match the path: union their methods."""
    cdef str seg
    cdef _Node child
    if i == n:
        if node.handlers is not None:
            allow.update(node.handlers)
    else:
        seg = segs[i]
        if node.literal is not None:
            child = node.literal.get(seg)
            if child is not None:
                _collect_allow(child, segs, i + 1, n, allow)
        if node.param is not None and seg:
            _collect_allow(node.param, segs, i + 1, n, allow)
    if node.catchall is not None:
        allow.update(node.catchall)


@cython.final
cdef class Router:
    """Match (method, normalised path) against templates; see docs/routing.md."""

    # Its fields: stellagw/_cext/radix.pxd.

    def __init__(self):
        self._root = _Node()
        self._static = {}
        self._routes = {}
        self._shapes = {}

    def __len__(self):
        return len(self._routes)

    def routes(self):
        """[(method, template, endpoint)] in insertion order."""
        return [(method, template, endpoint)
                for (method, template), endpoint in self._routes.items()]

    @cython.wraparound(True)
    def add(self, method, template, endpoint):
        """Add a route; RouteError for a bad template or a (method, shape) already routed."""
        if not isinstance(method, str) or _METHOD(method) is None:
            raise RouteError(f"template {template!r}: method {method!r} is not an "
                             f"upper-case HTTP token")
        cdef list parsed = _parse(template)
        cdef str shape = "/" + "/".join([
            text if kind == "l" else ("{}" if kind == "p" else "{*}")
            for kind, text in parsed])
        other = self._shapes.get((method, shape))
        if other is not None:
            raise RouteError(f"template {template!r}: {method} {shape} is already "
                             f"routed by {other!r}")
        cdef _Node node = self._root, child
        cdef bint static = True
        cdef str kind, text
        for kind, text in parsed:
            if kind == "l":
                if node.literal is None:
                    node.literal = {}
                child = node.literal.get(text)
                if child is None:
                    child = _Node()
                    node.literal[text] = child
                node = child
            elif kind == "p":
                static = False
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                static = False
        cdef tuple names = tuple([text for kind, text in parsed if kind != "l"])
        cdef bint catch = len(parsed) > 0 and parsed[-1][0] == "c"
        cdef _Route route = _Route(method, template, endpoint, names, catch)
        if catch:
            if node.catchall is None:
                node.catchall = {}
            node.catchall[method] = route
            node.catch_not_allowed = (_METHOD_NOT_ALLOWED, tuple(sorted(node.catchall)), None)
        else:
            if node.handlers is None:
                node.handlers = {}
            node.handlers[method] = route
            node.not_allowed = (_METHOD_NOT_ALLOWED, tuple(sorted(node.handlers)), None)
            if static:
                self._static[shape] = node
                if shape != "/":
                    self._static[shape + "/"] = node
        self._shapes[(method, shape)] = template
        self._routes[(method, template)] = endpoint

    def remove(self, method, template):
        """Take out the route added as (method, template) and return its endpoint; KeyError
        when there is none. Matching afterwards is exactly that of a router built without
        it: emptied nodes are pruned, the 405 tuples and the literal index follow."""
        endpoint = self._routes.pop((method, template))
        cdef str tmpl = template, seg
        cdef _Node node = self._root
        cdef list trail = []              # (parent, literal segment, or None for the parameter child)
        cdef list shape_parts = []
        cdef bint catch = False
        # The template was valid when added, so its segments need no checking here.
        for seg in (tmpl[1:].split("/") if tmpl != "/" else ()):
            if seg[0] != "{":
                shape_parts.append(seg)
                trail.append((node, seg))
                node = <_Node>node.literal[seg]
            elif seg[1] == "*":
                shape_parts.append("{*}")
                catch = True
            else:
                shape_parts.append("{}")
                trail.append((node, None))
                node = node.param
        cdef str shape = "/" + "/".join(shape_parts)
        del self._shapes[(method, shape)]
        if catch:
            del node.catchall[method]
            if node.catchall:
                node.catch_not_allowed = (_METHOD_NOT_ALLOWED, tuple(sorted(node.catchall)), None)
            else:
                node.catchall = None
                node.catch_not_allowed = None
        else:
            del node.handlers[method]
            if node.handlers:
                node.not_allowed = (_METHOD_NOT_ALLOWED, tuple(sorted(node.handlers)), None)
            else:
                node.handlers = None
                node.not_allowed = None
                # match() reads the handlers of an indexed node without a check.
                if shape in self._static:
                    del self._static[shape]
                    self._static.pop(shape + "/", None)
        cdef _Node parent
        while (len(trail) > 0 and node.literal is None and node.param is None
               and node.handlers is None and node.catchall is None):
            parent, seg = trail.pop()
            if seg is None:
                parent.param = None
            else:
                del parent.literal[seg]
                if not parent.literal:
                    parent.literal = None
            node = parent
        return endpoint

    cpdef tuple match(self, str method, str path):
        """match(method, path) -> (FOUND, endpoint, params | None) | (NOT_FOUND, None, None)
        | (METHOD_NOT_ALLOWED, allow, None); path is the output of normalize_path()."""
        cdef PyObject *hit
        cdef _Node node
        cdef _Route route
        cdef _Search s
        cdef list segs
        cdef Py_ssize_t n, k, j, last, off
        cdef dict params
        cdef str name
        # Fully literal templates: one dict lookup, no split, a prebuilt result.
        hit = PyDict_GetItem(self._static, path)
        if hit != NULL:
            hit = PyDict_GetItem((<_Node>hit).handlers, method)
            if hit != NULL:
                return (<_Route>hit).found
        if not path.startswith("/"):
            return _NOT_FOUND_RESULT
        # A trailing slash is not significant: "/a/" matches "/a".
        if len(path) > 1 and path.endswith("/"):
            path = path[:len(path) - 1]
        if len(path) > 1:
            segs = path[1:].split("/")
        else:
            segs = []
        n = PyList_GET_SIZE(segs)
        s.miss = NULL
        s.multi = False
        route = _walk(self._root, segs, 0, n, method, 0, &s)
        if route is None:
            if s.miss == NULL:
                return _NOT_FOUND_RESULT
            if not s.multi:
                return <tuple>s.miss
            allow = set()
            _collect_allow(self._root, segs, 0, n, allow)
            return (_METHOD_NOT_ALLOWED, tuple(sorted(allow)), None)
        if route.found is not None:
            return route.found
        params = {}
        last = len(route.names) - 1
        for k in range(last + 1):
            name = <str>route.names[k]
            if k == last and route.catchall:
                # The rest of the path stays in normalised (path) form: decoding '%2F' here
                # would let "..%2F" become a traversal once the value is reused as a path.
                off = 1
                for j in range(s.caps[k]):
                    off += len(<str>PyList_GET_ITEM(segs, j)) + 1
                params[name] = path[off:]
            else:
                params[name] = _decode_value(<str>PyList_GET_ITEM(segs, s.caps[k]))
        return (_FOUND, route.endpoint, params)
