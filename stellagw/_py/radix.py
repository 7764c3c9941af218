"""Radix path router and request-path normalisation — the pure-Python twin.

Same API and the same results as the compiled ``stellagw._cext.radix`` (cext/radix.pyx);
tests/codecs/test_radix.py checks the two against each other and against a regex-per-template
reference. The rules are written down, with the reasons, in docs/routing.md.
"""
from __future__ import annotations

import re

__all__ = ["FOUND", "NOT_FOUND", "METHOD_NOT_ALLOWED", "MAX_SEGMENTS", "RouteError", "Router",
           "normalize_path"]

FOUND = 0
NOT_FOUND = 1
METHOD_NOT_ALLOWED = 2

# Templates deeper than this are refused; the compiled matcher keeps its parameter
# positions in a fixed C array of this size.
MAX_SEGMENTS = 64

_NOT_FOUND_RESULT = (NOT_FOUND, None, None)

_HEXDIGITS = frozenset(b"0123456789abcdefABCDEF")
# Decoded bytes that stay encoded in the normalised path: '/' must never become a segment
# boundary, '\' is a separator on some backends, and '%' must stay the escape introducer
# so that "%252F" cannot be decoded twice into '/'.
_KEEP = {0x2F: b"%2F", 0x5C: b"%5C", 0x25: b"%25"}
# C0 controls, DEL and C1 controls (U+0080..U+009F), raw or decoded.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_RAW_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# An upper-case HTTP token (RFC 9110 §5.6.2 tchar without lower-case letters), starting
# with a letter so that '*' is not mistaken for a wildcard.
_METHOD = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]*\Z")


class RouteError(ValueError):
    """A template that cannot be added: bad syntax or a conflicting route."""


def normalize_path(raw: bytes | str) -> str | None:
    """Return the normalised, percent-decoded form of a request path, or None if invalid."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            return None
    elif not isinstance(raw, bytes):
        raise TypeError(f"normalize_path() expects bytes or str, not {type(raw).__name__}")
    if not raw.startswith(b"/"):
        return None
    if _RAW_CONTROL.search(raw) is not None:
        return None
    parts = raw.split(b"%")
    out = [parts[0].replace(b"\\", b"%5C")]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEXDIGITS or part[1] not in _HEXDIGITS:
            return None
        byte = int(part[:2], 16)
        out.append(_KEEP.get(byte) or bytes((byte,)))
        out.append(part[2:].replace(b"\\", b"%5C"))
    try:
        text = b"".join(out).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(text) is not None:
        return None
    # RFC 3986 §5.2.4 remove_dot_segments on the decoded segments, so "%2e%2E" is "..";
    # empty segments ("//") are dropped; ".." at the root stays at the root.
    segments = text[1:].split("/")
    stack: list[str] = []
    for seg in segments:
        if seg == "..":
            if stack:
                stack.pop()
        elif seg and seg != ".":
            stack.append(seg)
    if not stack:
        return "/"
    last = segments[-1]
    trailing = last == "" or last == "." or last == ".."
    return "/" + "/".join(stack) + ("/" if trailing else "")


def _decode_value(seg: str) -> str:
    # Only three escapes can occur in a normalised path; '%25' goes last so that
    # "%252F" becomes "%2F", never '/'.
    if "%" not in seg:
        return seg
    return seg.replace("%2F", "/").replace("%5C", "\\").replace("%25", "%")


class _Route:
    __slots__ = ("method", "template", "endpoint", "names", "catchall", "found")

    def __init__(self, method, template, endpoint, names, catchall):
        self.method = method          # upper-case method token
        self.template = template      # as given to add()
        self.endpoint = endpoint      # opaque to the router
        self.names = names            # parameter names in path order (catch-all last)
        self.catchall = catchall      # True when the last name is a '{*name}'
        # The whole result, built once, for routes without parameters.
        self.found = (FOUND, endpoint, None) if not names else None


class _Node:
    __slots__ = ("literal", "param", "handlers", "catchall",
                 "not_allowed", "catch_not_allowed")

    def __init__(self):
        self.literal = None           # dict segment -> _Node, or None
        self.param = None             # _Node for a '{name}' segment, or None
        self.handlers = None          # dict method -> _Route ending here, or None
        self.catchall = None          # dict method -> _Route for '{*name}' here, or None
        self.not_allowed = None       # (METHOD_NOT_ALLOWED, sorted methods, None)
        self.catch_not_allowed = None  # same for the catch-all routes


def _parse(template):
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
    parts = template[1:].split("/")
    if len(parts) > MAX_SEGMENTS:
        raise RouteError(f"template {template!r}: more than {MAX_SEGMENTS} segments")
    out = []
    names = set()
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
            if not _NAME.match(name):
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


class Router:
    """Match (method, normalised path) against templates; see docs/routing.md."""

    __slots__ = ("_root", "_static", "_routes", "_shapes")

    def __init__(self):
        self._root = _Node()
        self._static = {}    # full literal path (with and without trailing '/') -> _Node
        # (method, template) -> endpoint, in insertion order; a dict so that remove() costs
        # the same with 40,000 routes as with 4.
        self._routes = {}
        self._shapes = {}    # (method, shape) -> template, for conflict messages

    def __len__(self):
        return len(self._routes)

    def routes(self):
        return [(method, template, endpoint)
                for (method, template), endpoint in self._routes.items()]

    def add(self, method, template, endpoint):
        if not isinstance(method, str) or not _METHOD.match(method):
            raise RouteError(f"template {template!r}: method {method!r} is not an "
                             f"upper-case HTTP token")
        parsed = _parse(template)
        shape = "/" + "/".join(text if kind == "l" else ("{}" if kind == "p" else "{*}")
                               for kind, text in parsed)
        other = self._shapes.get((method, shape))
        if other is not None:
            raise RouteError(f"template {template!r}: {method} {shape} is already "
                             f"routed by {other!r}")
        node = self._root
        static = True
        for kind, text in parsed:
            if kind == "l":
                if node.literal is None:
                    node.literal = {}
                child = node.literal.get(text)
                if child is None:
                    child = node.literal[text] = _Node()
                node = child
            elif kind == "p":
                static = False
                if node.param is None:
                    node.param = _Node()
                node = node.param
            else:
                static = False
        names = tuple(text for kind, text in parsed if kind != "l")
        catch = bool(parsed) and parsed[-1][0] == "c"
        route = _Route(method, template, endpoint, names, catch)
        if catch:
            if node.catchall is None:
                node.catchall = {}
            node.catchall[method] = route
            node.catch_not_allowed = (METHOD_NOT_ALLOWED, tuple(sorted(node.catchall)), None)
        else:
            if node.handlers is None:
                node.handlers = {}
            node.handlers[method] = route
            node.not_allowed = (METHOD_NOT_ALLOWED, tuple(sorted(node.handlers)), None)
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
        node = self._root
        trail = []           # (parent, literal segment, or None for the parameter child)
        shape = []
        catch = False
        # The template was valid when added, so its segments need no checking here.
        for seg in (template[1:].split("/") if template != "/" else ()):
            if seg[0] != "{":
                shape.append(seg)
                trail.append((node, seg))
                node = node.literal[seg]
            elif seg[1] == "*":
                shape.append("{*}")
                catch = True
            else:
                shape.append("{}")
                trail.append((node, None))
                node = node.param
        shape = "/" + "/".join(shape)
        del self._shapes[(method, shape)]
        if catch:
            del node.catchall[method]
            if node.catchall:
                node.catch_not_allowed = (METHOD_NOT_ALLOWED, tuple(sorted(node.catchall)), None)
            else:
                node.catchall = node.catch_not_allowed = None
        else:
            del node.handlers[method]
            if node.handlers:
                node.not_allowed = (METHOD_NOT_ALLOWED, tuple(sorted(node.handlers)), None)
            else:
                node.handlers = node.not_allowed = None
                # match() reads the handlers of an indexed node without a check.
                if shape in self._static:
                    del self._static[shape]
                    self._static.pop(shape + "/", None)
        while trail and node.literal is None and node.param is None \
                and node.handlers is None and node.catchall is None:
            parent, seg = trail.pop()
            if seg is None:
                parent.param = None
            else:
                del parent.literal[seg]
                if not parent.literal:
                    parent.literal = None
            node = parent
        return endpoint

    def match(self, method, path):
        node = self._static.get(path)
        if node is not None:
            route = node.handlers.get(method)
            if route is not None:
                return route.found
        if not path.startswith("/"):
            return _NOT_FOUND_RESULT
        # A trailing slash is not significant: "/a/" matches "/a".
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        segs = path[1:].split("/") if len(path) > 1 else []
        caps = [0] * (MAX_SEGMENTS + 1)
        miss = []
        route = _walk(self._root, segs, 0, len(segs), method, caps, 0, miss)
        if route is None:
            if not miss:
                return _NOT_FOUND_RESULT
            if len(miss) == 1:
                return miss[0]
            allow = set()
            for result in miss:
                allow.update(result[1])
            return (METHOD_NOT_ALLOWED, tuple(sorted(allow)), None)
        if route.found is not None:
            return route.found
        params = {}
        names = route.names
        last = len(names) - 1
        for k, name in enumerate(names):
            i = caps[k]
            if k == last and route.catchall:
                # The rest of the path stays in normalised (path) form: decoding '%2F' here
                # would let "..%2F" become a traversal once the value is reused as a path.
                params[name] = "/".join(segs[i:])
            else:
                params[name] = _decode_value(segs[i])
        return (FOUND, route.endpoint, params)


def _walk(node, segs, i, n, method, caps, depth, miss):
    """Depth-first search in precedence order: literal, parameter, catch-all."""
    if i == n:
        if node.handlers is not None:
            route = node.handlers.get(method)
            if route is not None:
                return route
            miss.append(node.not_allowed)
    else:
        seg = segs[i]
        if node.literal is not None:
            child = node.literal.get(seg)
            if child is not None:
                route = _walk(child, segs, i + 1, n, method, caps, depth, miss)
                if route is not None:
                    return route
        if node.param is not None and seg:
            caps[depth] = i
            route = _walk(node.param, segs, i + 1, n, method, caps, depth + 1, miss)
            if route is not None:
                return route
    if node.catchall is not None:
        route = node.catchall.get(method)
        if route is not None:
            caps[depth] = i
            return route
        miss.append(node.catch_not_allowed)
    return None
