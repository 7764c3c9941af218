"""Checking and copying what services send for the aggregated document (docs/openapi.md §4).

A service's HELLO carries, per endpoint, an OpenAPI *operation object* and, per service, its
`components.schemas`. None of it was checked at registration (parse_hello only asks for an
object), and one malformed operation must not make the whole document invalid — a document
that fails validation is useless to every client, not only to that service's. So everything
is copied into new objects through the checkers below, which follow the OpenAPI 3.1.0 schema
(https://spec.openapis.org/oas/3.1/schema/2022-10-07) and the JSON Schema 2020-12 meta-schema:
a field or keyword that does not fit is dropped (or, where the fix is obvious, repaired) and
reported as a warning; the rest of the operation stays. Inputs are never mutated.

URLs a viewer renders as links (externalDocs, an example's externalValue, a link's
operationRef, and `url`/`href`/`uri` members inside extensions) must be absolute http(s)
URLs or references without a scheme (`safe_url`); anything else is dropped with a warning:
Swagger UI and Redoc make them `<a href>`, and `javascript:` there runs in the reader's
browser (docs/openapi.md §4, "URLs").

The same pass rewrites `$ref`s: a service writes `#/components/schemas/Scan`; in the merged
document its schemas are namespaced (`scanner_Scan`), so every reference is rewritten through
the `Source.names` map, and a reference that cannot resolve (unknown schema, another
component type, an external document) is dropped, because one dangling pointer fails the
whole document.
"""
from __future__ import annotations

import datetime
import ipaddress
import math
import re
import uuid
from urllib.parse import unquote

SCHEMA_PREFIX = "#/components/schemas/"
# Depth of service-supplied JSON we copy. The document adds ~10 levels above it and orjson
# refuses to serialise beyond 254; a schema nested this deep is an accident or an attack.
MAX_DEPTH = 64
MAX_CALLBACK_NESTING = 2

PARAM_LOCATIONS = ("query", "header", "path", "cookie")
_STYLES = {"path": ("matrix", "label", "simple"), "query": ("form", "spaceDelimited",
           "pipeDelimited", "deepObject"), "header": ("simple",), "cookie": ("form",)}
_ENCODING_STYLES = ("form", "spaceDelimited", "pipeDelimited", "deepObject")
_RESPONSE_CODE = re.compile(r"^[1-5](?:[0-9]{2}|XX)$")
OPERATION_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")

# JSON Schema 2020-12 keywords by the kind of value the meta-schema demands.
_TYPES = frozenset({"array", "boolean", "integer", "null", "number", "object", "string"})
_SCHEMA_ONE = frozenset({"additionalProperties", "propertyNames", "items", "contains", "not",
                         "if", "then", "else", "unevaluatedItems", "unevaluatedProperties",
                         "contentSchema"})
_SCHEMA_LIST = frozenset({"allOf", "anyOf", "oneOf", "prefixItems"})
_SCHEMA_MAP = frozenset({"properties", "patternProperties", "$defs", "definitions",
                         "dependentSchemas"})
_STRINGS = frozenset({"$comment", "title", "description", "format", "contentEncoding",
                      "contentMediaType"})
_BOOLS = frozenset({"uniqueItems", "readOnly", "writeOnly", "deprecated"})
_NUMBERS = frozenset({"maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"})
_COUNTS = frozenset({"maxLength", "minLength", "maxItems", "minItems", "maxContains",
                     "minContains", "maxProperties", "minProperties"})
# Identifiers that change how `$ref`s resolve (a `$id` makes `#/components/...` inside it
# relative to a resource that has no components) or that we cannot rewrite safely.
_DROPPED = frozenset({"$id", "$schema", "$anchor", "$dynamicAnchor", "$dynamicRef",
                      "$recursiveRef", "$recursiveAnchor", "$vocabulary"})


class Bad(ValueError):
    """A value that cannot be copied into the document."""


class Source:
    """What the checkers need to know about the service whose objects they copy."""

    def __init__(self, service: str, version: str, names: dict, warn, op_ids=None,
                 unique_op_id=None):
        self.service = service
        self.version = version
        self.names = names                  # the service's schema name -> component key
        self.raw_name = {v: k for k, v in names.items()}
        self._warn = warn                   # callable(service, version, operation, at, msg)
        self.op_ids = op_ids or {}          # the service's operationId -> published one
        self.unique_op_id = unique_op_id    # callable(wanted) -> unique published id
        self.operation = None               # "GET /x" while checking an operation
        self.deep_refs = []      # (container, component key, pointer, where, operation)
        self.required_checks = []           # (schema, where, operation): beside `allOf`
        self.default_checks = []            # (schema, where, operation): has `default`

    def warn(self, where: str, message: str, operation=False) -> None:
        """`operation`: for fix-ups after the copy, the operation recorded with the item."""
        self._warn(self.service, self.version,
                   self.operation if operation is False else operation, where, message)


# ---------------------------------------------------------------------------- values

def literal(value, depth: int = 0):
    """A deep copy of a JSON value (example, default, enum, extension), or Bad."""
    if depth > MAX_DEPTH:
        raise Bad("nested too deeply")
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 64):
            raise Bad("integer out of the 64-bit range")   # orjson cannot write it
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Bad("not a finite number")               # JSON has no NaN/Infinity
        return value
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            # Data, but resolvers (openapi-spec-validator's included) follow any `$ref`
            # they meet, so one in an example or default is a reference all the same.
            raise Bad("a '$ref' inside a literal value would be resolved as a reference")
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise Bad("object key that is not a string")
            out[k] = literal(v, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [literal(v, depth + 1) for v in value]
    raise Bad(f"a {type(value).__name__} is not a JSON value")


def _copy_literal(src, out, key, value, where, depth):
    try:
        out[key] = literal(value, depth)
    except Bad as exc:
        src.warn(where, f"{exc}; dropped")


def _extension(src, out, key, value, where, depth):
    if key.startswith("x-stellagw-"):
        # Reserved for what the gateway itself publishes; a service must not spoof it.
        src.warn(where, "the x-stellagw- prefix is reserved for the gateway; dropped")
        return
    _copy_literal(src, out, key, value, where, depth)
    if key in out:
        _drop_unsafe_urls(src, out[key], where)


# ---------------------------------------------------------------------------- URLs

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*):")
# Browsers drop leading C0 controls and spaces and every tab and newline before they read
# the scheme ("java\tscript:" is javascript:); none of them belongs in a URL anyway.
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]")
SAFE_SCHEMES = ("http", "https")
UNSAFE_URL = ("must be an absolute http(s) URL or a reference without a scheme "
              "(docs/openapi.md §4, URLs)")


def safe_url(value) -> bool:
    """Whether a viewer may make `value` a link: an absolute http or https URL with a host,
    or a relative reference (no scheme: `/docs`, `guide.html#x`, `//host/p`), with no
    control character or space. `javascript:`, `data:`, `vbscript:`, `file:`... are not."""
    if not isinstance(value, str) or _NOT_IN_URL.search(value):
        return False
    m = _SCHEME.match(value)
    if m is None:
        return True
    if m.group(1).lower() not in SAFE_SCHEMES:
        return False
    rest = value[m.end():]
    return rest[:2] in ("//", "\\\\", "/\\", "\\/") and len(rest) > 2 and rest[2] not in "/\\?#"


def _url_key(key) -> bool:
    k = key.lower() if isinstance(key, str) else ""
    return k.endswith("url") or k.endswith("href") or k.endswith("uri")


def _drop_unsafe_urls(src, value, where, depth=0):
    """In a copied extension value: members named like a URL (`url`, `href`, `logoUrl`,
    `uri`...) whose string is not safe_url are removed (Redoc's `x-logo` is `{url, href}`;
    what other viewers and plugins do with `x-` objects is anyone's guess)."""
    if depth > MAX_DEPTH:
        return
    if isinstance(value, dict):
        for k in list(value):
            v = value[k]
            if isinstance(v, str) and _url_key(k) and not safe_url(v):
                del value[k]
                src.warn(f"{where}.{k}", f"{UNSAFE_URL}; dropped")
            else:
                _drop_unsafe_urls(src, v, f"{where}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _drop_unsafe_urls(src, v, f"{where}[{i}]", depth + 1)


def _is_str(v):
    return isinstance(v, str)


def _is_bool(v):
    return isinstance(v, bool)


def _is_number(v):
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return -(1 << 63) <= v < (1 << 64)       # what orjson can write
    return isinstance(v, float) and math.isfinite(v)


def _is_count(v):
    return (_is_number(v) and v >= 0 and (isinstance(v, int) or float(v).is_integer()))


def _is_string_set(v):
    return (isinstance(v, list) and all(isinstance(s, str) for s in v)
            and len(set(v)) == len(v))


# ---------------------------------------------------------------------------- references

def _unescape_token(token: str) -> str:
    # A fragment is a percent-encoded JSON pointer (RFC 6901 §6): decode, then ~1 and ~0.
    return unquote(token).replace("~1", "/").replace("~0", "~")


def rewrite_ref(src: Source, ref, where: str):
    """(new ref, component key, pointer below the component) or None (dropped, warned)."""
    if not isinstance(ref, str):
        src.warn(where, "'$ref' must be a string; dropped")
        return None
    if not ref.startswith(SCHEMA_PREFIX):
        src.warn(where, f"reference {ref!r} does not point into #/components/schemas (a "
                        "service can only refer to the schemas it sent in HELLO); dropped")
        return None
    token, sep, tail = ref[len(SCHEMA_PREFIX):].partition("/")
    name = _unescape_token(token)
    key = src.names.get(name)
    if key is None:
        src.warn(where, f"reference to schema {name!r}, which the service did not send; "
                        "dropped")
        return None
    return SCHEMA_PREFIX + key + sep + tail, key, tail


def resolve_pointer(target, pointer: str):
    """Follow a JSON pointer (without its leading '/') into `target`; KeyError if absent."""
    for token in pointer.split("/"):
        token = _unescape_token(token)
        if isinstance(target, dict) and token in target:
            target = target[token]
        elif isinstance(target, list) and token.isdigit() and int(token) < len(target):
            target = target[int(token)]
        else:
            raise KeyError(token)
    return target


def raw_schema_refs(value, limit: int = 100_000) -> set:
    """Names of the schemas `value` refers to (`$ref` and discriminator mappings), read
    leniently from unchecked input: used only to find which schemas an older version needs."""
    names, stack, seen = set(), [value], 0
    while stack and seen < limit:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(SCHEMA_PREFIX):
                names.add(_unescape_token(ref[len(SCHEMA_PREFIX):].partition("/")[0]))
            disc = node.get("discriminator")
            if isinstance(disc, dict) and isinstance(disc.get("mapping"), dict):
                for v in disc["mapping"].values():
                    if isinstance(v, str):
                        if v.startswith(SCHEMA_PREFIX):
                            names.add(_unescape_token(v[len(SCHEMA_PREFIX):].partition("/")[0]))
                        elif "/" not in v and "#" not in v:
                            names.add(v)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return names


# ---------------------------------------------------------------------------- schemas

def _json_type_ok(value, types) -> bool:
    for t in types:
        if ((t == "null" and value is None) or (t == "boolean" and isinstance(value, bool))
                or (t == "string" and isinstance(value, str))
                or (t == "array" and isinstance(value, list))
                or (t == "object" and isinstance(value, dict))
                or (t == "number" and _is_number(value))
                or (t == "integer" and _is_number(value) and float(value).is_integer())):
            return True
    return False


def schema(src: Source, value, where: str, depth: int = 0):
    """A checked copy of a JSON Schema (2020-12 + the OAS 3.1 dialect)."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, dict):
        src.warn(where, "a schema must be an object or a boolean; replaced by {}")
        return {}
    if depth > MAX_DEPTH:
        src.warn(where, "schema nested too deeply; replaced by {}")
        return {}
    out = {}
    for k, v in value.items():
        w = f"{where}.{k}"
        if k == "$ref":
            r = rewrite_ref(src, v, w)
            if r is not None:
                out[k] = r[0]
                if r[2]:
                    src.deep_refs.append((out, r[1], r[2], w, src.operation))
        elif k in _SCHEMA_ONE:
            out[k] = schema(src, v, w, depth + 1)
        elif k in _SCHEMA_LIST:
            if isinstance(v, list) and v:
                out[k] = [schema(src, s, f"{w}[{i}]", depth + 1) for i, s in enumerate(v)]
            else:
                src.warn(w, "must be a non-empty list of schemas; dropped")
        elif k in _SCHEMA_MAP:
            if isinstance(v, dict):
                m = out[k] = {}
                for name, s in v.items():
                    if k == "patternProperties" and not _regex_ok(name):
                        src.warn(f"{w}.{name}", "not a valid regular expression (of at most "
                                 f"{MAX_PATTERN_CHARS} characters); dropped")
                        continue
                    m[name] = schema(src, s, f"{w}.{name}", depth + 1)
            else:
                src.warn(w, "must be an object of schemas; dropped")
        elif k in _STRINGS:
            _keep_if(src, out, k, v, _is_str(v), w, "must be a string")
        elif k == "pattern":
            _keep_if(src, out, k, v, _is_str(v) and _regex_ok(v), w,
                     f"must be a valid regular expression of at most {MAX_PATTERN_CHARS} "
                     "characters")
        elif k in _BOOLS:
            _keep_if(src, out, k, v, _is_bool(v), w, "must be a boolean")
        elif k in _NUMBERS:
            _keep_if(src, out, k, v, _is_number(v), w, "must be a number")
        elif k == "multipleOf":
            _keep_if(src, out, k, v, _is_number(v) and v > 0, w, "must be a number > 0")
        elif k in _COUNTS:
            _keep_if(src, out, k, v, _is_count(v), w, "must be a non-negative integer")
        elif k == "type":
            ok = (v in _TYPES) if isinstance(v, str) else (
                isinstance(v, list) and bool(v) and _is_string_set(v)
                and all(t in _TYPES for t in v))
            _keep_if(src, out, k, list(v) if isinstance(v, list) else v, ok, w,
                     f"must be one of {sorted(_TYPES)} or a list of them")
        elif k == "required":
            _keep_if(src, out, k, list(v) if isinstance(v, list) else v,
                     _is_string_set(v), w, "must be a list of distinct strings")
        elif k in ("enum", "examples"):
            if isinstance(v, list):
                _copy_literal(src, out, k, v, w, depth + 1)
            else:
                src.warn(w, "must be a list; dropped")
        elif k in ("const", "default", "example"):
            _copy_literal(src, out, k, v, w, depth + 1)
        elif k == "dependentRequired":
            ok = isinstance(v, dict) and all(_is_string_set(x) for x in v.values())
            _keep_if(src, out, k, {a: list(b) for a, b in v.items()} if ok else v, ok, w,
                     "must map names to lists of distinct strings")
        elif k == "dependencies":
            if isinstance(v, dict):
                m = out[k] = {}
                for name, dep in v.items():
                    m[name] = (list(dep) if _is_string_set(dep)
                               else schema(src, dep, f"{w}.{name}", depth + 1))
            else:
                src.warn(w, "must be an object; dropped")
        elif k == "discriminator":
            _put(out, k, _discriminator(src, v, w))
        elif k == "xml":
            _put(out, k, _object(src, v, w, depth, {"name": _is_str, "namespace": _is_str,
                                                   "prefix": _is_str, "attribute": _is_bool,
                                                   "wrapped": _is_bool}))
        elif k == "externalDocs":
            _put(out, k, external_docs(src, v, w, depth))
        elif k in _DROPPED:
            src.warn(w, f"{k} is not supported in aggregated schemas (it changes how "
                        "references resolve); dropped")
        elif k.startswith("x-"):
            _extension(src, out, k, v, w, depth + 1)
        else:
            # Unknown keywords are legal in JSON Schema (annotations, OAS 3.0's `nullable`).
            _copy_literal(src, out, k, v, w, depth + 1)
    if "default" in out:
        src.default_checks.append((out, where, src.operation))
    _explicit_discriminator_mapping(src, out)
    if "allOf" in out and "required" in out:
        src.required_checks.append((out, where, src.operation))
    return out


def _keep_if(src, out, key, value, ok, where, why):
    if ok:
        out[key] = value
    else:
        src.warn(where, f"{why}; dropped")


_REGEX_CACHE: dict = {}
# The longest `pattern` (or patternProperties name, or `format: regex` value) kept. Python's
# `re` keeps each compiled pattern in its module cache (512 of them), ~20 bytes a character,
# and _REGEX_CACHE the text: eight instances with a 1 MB pattern each left a worker at
# 280 MB after they had all gone, and the caches' bounds allowed gigabytes. Longer ones are
# dropped (with a warning) without being compiled; at the bound re's cache holds ~20 MB.
MAX_PATTERN_CHARS = 2048


def _regex_ok(pattern: str) -> bool:
    if len(pattern) > MAX_PATTERN_CHARS:
        return False
    ok = _REGEX_CACHE.get(pattern)
    if ok is None:
        try:
            re.compile(pattern)
            ok = True
        except (re.error, RecursionError, OverflowError):
            ok = False
        if len(_REGEX_CACHE) < 4096:
            _REGEX_CACHE[pattern] = ok
    return ok


class Budget(Exception):
    """`fits` gave up: the check is too expensive (recursive schemas under anyOf...)."""


class StepBudget:
    """Steps left for a set of `fits` checks together (one service's defaults in one build):
    10,000 steps per check alone let a service with thousands of defaults over a large
    `enum` hold the document build for minutes."""

    def __init__(self, steps: int):
        self.left = steps


def fits(value, schema, resolve, max_steps: int = 10_000,
         budget: StepBudget | None = None) -> bool:
    """Whether `value` validates against `schema` (JSON Schema 2020-12 assertions).

    Validators check every `default` against its schema, and one wrong default fails the
    whole document. This covers the assertion keywords and the formats the Python standard
    library can check; what it does not know it accepts. `resolve(ref)` returns the target
    of a `#/components/schemas/...` reference (KeyError if none). Raises Budget after
    `max_steps` steps (a schema visit, an `enum` member, a `required` name, a pattern tried
    on a key, a pair of items compared for `uniqueItems`), or when `budget` runs out (what
    this check used is taken from it): recursive schemas under anyOf/oneOf can otherwise
    take exponential time, and long lists quadratic.
    """
    steps = max_steps if budget is None else min(max_steps, budget.left)
    check = _Fits(resolve, steps)
    try:
        return check(value, schema, 0)
    finally:
        if budget is not None:
            budget.left -= steps - check.steps


class _Fits:
    def __init__(self, resolve, steps):
        self.resolve, self.steps = resolve, steps

    def _spend(self, n: int) -> None:
        self.steps -= n
        if self.steps < 0:
            self.steps = 0
            raise Budget()

    def __call__(self, value, schema, depth) -> bool:
        if depth > 32:
            raise Budget()
        self._spend(1)
        if schema is True or not isinstance(schema, dict):
            return schema is not False
        d = depth + 1
        ref = schema.get("$ref")
        if isinstance(ref, str):
            try:
                target = self.resolve(ref)
            except KeyError:
                target = True
            if not self(value, target, d):
                return False
        t = schema.get("type")
        if t is not None and not _json_type_ok(value, [t] if isinstance(t, str) else t):
            return False
        if "enum" in schema:
            self._spend(len(schema["enum"]))
        if "enum" in schema and not any(_json_equal(value, e) for e in schema["enum"]):
            return False
        if "const" in schema and not _json_equal(value, schema["const"]):
            return False
        if _is_number(value):
            if not _number_fits(value, schema):
                return False
        elif isinstance(value, str):
            n = len(value)
            if n < schema.get("minLength", 0) or n > schema.get("maxLength", math.inf):
                return False
            if "pattern" in schema and not re.search(schema["pattern"], value):
                return False
        elif isinstance(value, list):
            if not self._array(value, schema, d):
                return False
        elif isinstance(value, dict):
            if not self._object(value, schema, d):
                return False
        if not _format_fits(value, schema.get("format")):
            return False
        if not all(self(value, s, d) for s in schema.get("allOf", ())):
            return False
        if "anyOf" in schema and not any(self(value, s, d) for s in schema["anyOf"]):
            return False
        if "oneOf" in schema and sum(self(value, s, d) for s in schema["oneOf"]) != 1:
            return False
        if "not" in schema and self(value, schema["not"], d):
            return False
        if "if" in schema:
            branch = schema.get("then" if self(value, schema["if"], d) else "else", True)
            if not self(value, branch, d):
                return False
        return True

    def _array(self, v, schema, d) -> bool:
        if len(v) < schema.get("minItems", 0) or len(v) > schema.get("maxItems", math.inf):
            return False
        if schema.get("uniqueItems") is True:
            self._spend(len(v) * (len(v) - 1) // 2)
            for i, a in enumerate(v):
                if any(_json_equal(a, b) for b in v[i + 1:]):
                    return False
        prefix = schema.get("prefixItems", ())
        if not all(self(item, s, d) for item, s in zip(v, prefix)):
            return False
        if "items" in schema and not all(self(x, schema["items"], d) for x in v[len(prefix):]):
            return False
        if "contains" in schema:
            n = sum(self(x, schema["contains"], d) for x in v)
            if n < schema.get("minContains", 1) or n > schema.get("maxContains", math.inf):
                return False
        return True

    def _object(self, v, schema, d) -> bool:
        self._spend(len(schema.get("required", ()))
                    + len(v) * len(schema.get("patternProperties", ())))
        if any(k not in v for k in schema.get("required", ())):
            return False
        if not schema.get("minProperties", 0) <= len(v) <= schema.get("maxProperties", math.inf):
            return False
        props = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        for k, x in v.items():
            matched = k in props
            if matched and not self(x, props[k], d):
                return False
            for pat, s in patterns.items():
                if re.search(pat, k):
                    matched = True
                    if not self(x, s, d):
                        return False
            if not matched and "additionalProperties" in schema \
                    and not self(x, schema["additionalProperties"], d):
                return False
            if "propertyNames" in schema and not self(k, schema["propertyNames"], d):
                return False
        for k, needed in schema.get("dependentRequired", {}).items():
            if k in v and any(n not in v for n in needed):
                return False
        for k, s in schema.get("dependentSchemas", {}).items():
            if k in v and not self(v, s, d):
                return False
        return True


def _json_equal(a, b) -> bool:
    # JSON equality: 1 == 1.0, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    return a == b


def _number_fits(v, schema) -> bool:
    if v < schema.get("minimum", -math.inf) or v > schema.get("maximum", math.inf):
        return False
    if "exclusiveMinimum" in schema and v <= schema["exclusiveMinimum"]:
        return False
    if "exclusiveMaximum" in schema and v >= schema["exclusiveMaximum"]:
        return False
    m = schema.get("multipleOf")
    if m is not None:
        if isinstance(v, int) and isinstance(m, int):
            return v % m == 0
        q = v / m
        return math.isfinite(q) and q == int(q)
    return True


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _format_fits(value, fmt) -> bool:
    # The formats OAS 3.1 validators assert that need nothing beyond the standard library.
    if fmt is None:
        return True
    if fmt == "int32" and isinstance(value, int) and not isinstance(value, bool):
        return -(1 << 31) <= value < (1 << 31)
    if fmt == "int64" and isinstance(value, int) and not isinstance(value, bool):
        return -(1 << 63) <= value < (1 << 63)
    if not isinstance(value, str):
        return True
    try:
        if fmt == "date":
            return bool(_DATE.match(value)) and bool(datetime.date.fromisoformat(value))
        if fmt == "email":
            return "@" in value
        if fmt == "ipv4":
            ipaddress.IPv4Address(value)
        elif fmt == "ipv6":
            ipaddress.IPv6Address(value)
        elif fmt == "uuid":
            uuid.UUID(value)
            return all(value[i] == "-" for i in (8, 13, 18, 23))
        elif fmt == "regex":
            return _regex_ok(value)
    except (ValueError, IndexError):
        return False
    return True


def _discriminator(src, value, where):
    if not isinstance(value, dict) or not isinstance(value.get("propertyName"), str):
        src.warn(where, "a discriminator needs a string propertyName; dropped")
        return None
    out = {"propertyName": value["propertyName"]}
    for k, v in value.items():
        w = f"{where}.{k}"
        if k == "mapping":
            if not isinstance(v, dict):
                src.warn(w, "must be an object of strings; dropped")
                continue
            mapping = out["mapping"] = {}
            for tag, target in v.items():
                if isinstance(target, str) and "/" not in target and "#" not in target:
                    target = SCHEMA_PREFIX + target       # a bare schema name (OAS §4.8.25)
                r = rewrite_ref(src, target, f"{w}.{tag}")
                if r is not None:
                    mapping[tag] = r[0]
        elif k.startswith("x-"):
            _extension(src, out, k, v, w, 1)
        elif k != "propertyName":
            src.warn(w, "unknown discriminator field; dropped")
    return out


def _explicit_discriminator_mapping(src, out):
    # Without a mapping, a discriminator value names the schema ("Cat" -> Cat). Namespacing
    # renamed Cat to scanner_Cat, so write the old implicit mapping out explicitly.
    disc = out.get("discriminator")
    if not isinstance(disc, dict):
        return
    mapping = disc.get("mapping", {})
    added = False
    for kw in ("oneOf", "anyOf"):
        for sub in out.get(kw, ()):
            ref = sub.get("$ref") if isinstance(sub, dict) else None
            if not isinstance(ref, str) or not ref.startswith(SCHEMA_PREFIX):
                continue
            key = ref[len(SCHEMA_PREFIX):]
            raw = src.raw_name.get(key)
            if raw is not None and raw != key and raw not in mapping:
                mapping[raw] = ref
                added = True
    if added:
        disc["mapping"] = mapping


def _object(src, value, where, depth, fields: dict, extensions=True):
    """A small fixed-field object: each field must pass its check, unknown ones drop."""
    if not _inline_object(src, value, where, None):
        return None
    out = {}
    for k, v in value.items():
        check = fields.get(k)
        if check is not None:
            _keep_if(src, out, k, v, check(v), f"{where}.{k}", "has the wrong type")
        elif extensions and k.startswith("x-"):
            _extension(src, out, k, v, f"{where}.{k}", depth + 1)
        else:
            src.warn(f"{where}.{k}", "unknown field; dropped")
    return out


def external_docs(src, value, where, depth):
    out = _object(src, value, where, depth, {"url": _is_str, "description": _is_str})
    if out is not None and "url" in out and not safe_url(out["url"]):
        src.warn(f"{where}.url", f"{UNSAFE_URL}; externalDocs dropped")
        return None
    if out is not None and "url" not in out:
        src.warn(where, "externalDocs needs a url; dropped")
        return None
    return out


# ---------------------------------------------------------------------------- fields

# The OpenAPI objects around a schema (operation, parameter, header, media type, request
# body, response, link, path item) are all copied the same way: each field the kind defines
# goes through the rule its table gives it (the `_*_FIELDS` tables at the end of this
# module), `x-` fields are copied as extensions, and any other field is dropped with a
# warning. A rule is `rule(src, out, key, value, where, ctx)`: it stores its checked copy
# of `value` in `out[key]`, or warns and stores nothing. `ctx` carries what a kind's rules
# need besides the value: a parameter's location, an operation's callback nesting.

# Parameter and header fields that OAS defines only beside `schema` (how the value is
# serialised); they are collected apart so _schema_or_content can drop them beside `content`.
_BESIDE_SCHEMA = frozenset({"style", "explode", "allowReserved", "example", "examples"})


def _copy_fields(src, value: dict, where, rules: dict, what: str, ctx=None, out=None,
                 beside_schema=None) -> dict:
    """Copy the fields of `value`, an object of kind `what` ("a header"), into `out` (a new
    dict by default) through `rules`. With `beside_schema`, the _BESIDE_SCHEMA fields are
    stored there instead."""
    out = {} if out is None else out
    for k, v in value.items():
        w = f"{where}.{k}" if where else k      # only an operation is copied at the root
        rule = rules.get(k)
        if rule is not None:
            into = out if beside_schema is None or k not in _BESIDE_SCHEMA else beside_schema
            rule(src, into, k, v, w, ctx)
        elif k.startswith("x-"):
            _extension(src, out, k, v, w, 1)
        else:
            src.warn(w, f"not a field of {what}; dropped")
    return out


def _inline_object(src, value, where, what, refs=None) -> bool:
    """Whether `value` can be copied as an object of kind `what` ("a header", or None to
    name no kind): it must be an object and, where `refs` names the kind ("header"), not a
    reference — HELLO carries only schemas, so no other component could resolve."""
    if not isinstance(value, dict):
        src.warn(where, f"{what} must be an object; dropped" if what
                 else "must be an object; dropped")
        return False
    if refs is not None and "$ref" in value:
        src.warn(where, f"{refs} references are not supported; dropped")
        return False
    return True


def _put(out, key, copy):
    """Store a nested object's copy unless its checker dropped it (None, and warned)."""
    if copy is not None:
        out[key] = copy


def _checked(test, why):
    """Rule: keep the value as sent when `test(value)` holds; else drop it, saying `why`."""
    def rule(src, out, key, value, where, ctx):
        _keep_if(src, out, key, value, test(value), where, why)
    return rule


def _nested(check, **kw):
    """Rule: store the copy `check(src, value, where, **kw)` makes of a nested object."""
    def rule(src, out, key, value, where, ctx):
        _put(out, key, check(src, value, where, **kw))
    return rule


def _ignored(src, out, key, value, where, ctx):
    """Rule for a field the gateway replaces or has already read: not copied, no warning."""


def _literal_field(src, out, key, value, where, ctx):
    """Rule for a field that holds any JSON value (an example, a link's requestBody)."""
    _copy_literal(src, out, key, value, where, 1)


# ---------------------------------------------------------------------------- operations

def operation(src: Source, value: dict, where: str, callback_nesting: int = 0) -> dict:
    """The service-authored part of an Operation Object. operationId, tags and security
    are the gateway's (the builder sets them); servers would point clients past the
    gateway and are dropped."""
    return _copy_fields(src, value, where, _OPERATION_FIELDS, "an OpenAPI 3.1 operation",
                        callback_nesting)


def _parameters_field(src, out, key, value, where, ctx):
    # An operation's or a path item's `parameters`.
    if isinstance(value, list):
        params = [p for p in (parameter(src, p, f"{where}[{i}]")
                              for i, p in enumerate(value)) if p is not None]
        out[key] = _unique_parameters(src, params, where)
    else:
        src.warn(where, "must be a list; dropped")


def _callbacks_field(src, out, key, value, where, nesting):
    if nesting >= MAX_CALLBACK_NESTING:
        src.warn(where, "callbacks nested too deeply; dropped")
        return
    cbs = callbacks(src, value, where, nesting + 1)
    if cbs:
        out[key] = cbs


def _operation_id_field(src, out, key, value, where, nesting):
    if nesting and isinstance(value, str) and value and src.unique_op_id:
        # Operation ids are unique across the document, callbacks included.
        out[key] = src.unique_op_id(f"{src.service}.{value}")
    elif not isinstance(value, str):
        src.warn(where, "must be a string; ignored")


def _unique_parameters(src, params, where):
    # "The list MUST NOT include duplicated parameters" (a name + location pair).
    seen, out = set(), []
    for p in params:
        key = (p["name"], p["in"])
        if key in seen:
            src.warn(where, f"{p['in']} parameter {p['name']!r} listed twice; the second dropped")
            continue
        seen.add(key)
        out.append(p)
    return out


def parameter(src, value, where):
    if not _inline_object(src, value, where, "a parameter"):
        return None
    if "$ref" in value:
        src.warn(where, "parameter references are not supported (HELLO carries only "
                        "schemas); dropped")
        return None
    name, loc = value.get("name"), value.get("in")
    if not isinstance(name, str) or not name or loc not in PARAM_LOCATIONS:
        src.warn(where, f"a parameter needs a name and 'in' one of {list(PARAM_LOCATIONS)}; "
                        "dropped")
        return None
    schema_only = {}
    out = _copy_fields(src, value, where, _PARAMETER_FIELDS, "a parameter", loc,
                       out={"name": name, "in": loc}, beside_schema=schema_only)
    _schema_or_content(src, out, schema_only, where)
    if loc == "path":
        out["required"] = True           # a path parameter is always required (OAS §4.8.12)
    return out


def _parameter_style_field(src, out, key, value, where, loc):
    _keep_if(src, out, key, value, value in _STYLES[loc], where,
             f"must be one of {list(_STYLES[loc])} for {loc} parameters")


def _query_only_field(src, out, key, value, where, loc):
    _keep_if(src, out, key, value, _is_bool(value) and loc == "query", where,
             "must be a boolean, and only on query parameters")


def _schema_or_content(src, out, schema_only, where):
    if "schema" in out and "content" in out:
        src.warn(where, "has both schema and content; content dropped")
        del out["content"]
    if "schema" not in out and "content" not in out:
        src.warn(where, "has neither schema nor content; schema {} added")
        out["schema"] = {}
    if "schema" in out:
        out.update(schema_only)
    elif schema_only:
        src.warn(where, f"{sorted(schema_only)} only apply beside a schema; dropped")


def header(src, value, where):
    if not _inline_object(src, value, where, "a header", refs="header"):
        return None
    schema_only = {}
    out = _copy_fields(src, value, where, _HEADER_FIELDS, "a header",
                       beside_schema=schema_only)
    _schema_or_content(src, out, schema_only, where)
    return out


def _map(src, value, where, item):
    if not _inline_object(src, value, where, None):
        return None
    out = {}
    for k, v in value.items():
        _put(out, k, item(src, v, f"{where}.{k}"))
    return out


def examples(src, value, where):
    return _map(src, value, where, example)


def example(src, value, where):
    if isinstance(value, dict) and "$ref" in value:
        src.warn(where, "example references are not supported; dropped")
        return None
    out = _object(src, {k: v for k, v in value.items() if k != "value"}
                  if isinstance(value, dict) else value, where, 1,
                  {"summary": _is_str, "description": _is_str, "externalValue": _is_str})
    if out is None:
        return None
    if "externalValue" in out and not safe_url(out["externalValue"]):
        src.warn(f"{where}.externalValue", f"{UNSAFE_URL}; dropped")
        del out["externalValue"]
    if "value" in value:
        if "externalValue" in out:
            src.warn(where, "value and externalValue are exclusive; externalValue dropped")
            del out["externalValue"]
        _copy_literal(src, out, "value", value["value"], f"{where}.value", 2)
    return out


def content(src, value, where, single=False):
    out = _map(src, value, where, media_type)
    if out is not None and single and len(out) != 1:
        src.warn(where, "must have exactly one media type here; dropped")
        return None
    return out


def media_type(src, value, where):
    if not _inline_object(src, value, where, "a media type object"):
        return None
    return _copy_fields(src, value, where, _MEDIA_TYPE_FIELDS, "a media type object")


def encoding(src, value, where):
    if not _inline_object(src, value, where, "an encoding"):
        return None
    out = _object(src, {k: v for k, v in value.items() if k != "headers"}, where, 1,
                  {"contentType": _is_str, "style": lambda v: v in _ENCODING_STYLES,
                   "explode": _is_bool, "allowReserved": _is_bool})
    if "headers" in value:
        _put(out, "headers", _map(src, value["headers"], f"{where}.headers", header))
    return out


def request_body(src, value, where):
    if not _inline_object(src, value, where, None, refs="requestBody"):
        return None
    out = _copy_fields(src, value, where, _REQUEST_BODY_FIELDS, "a request body")
    if "content" not in out:
        src.warn(where, "a request body needs content; dropped")
        return None
    return out


def responses(src, value, where):
    if not _inline_object(src, value, where, None):
        return None
    out = {}
    for code, v in value.items():
        if isinstance(code, int) and not isinstance(code, bool):
            code = str(code)
        w = f"{where}.{code}"
        if isinstance(code, str) and code.startswith("x-"):
            _extension(src, out, code, v, w, 1)
        elif code == "default" or (isinstance(code, str) and _RESPONSE_CODE.match(code)):
            _put(out, code, response(src, v, w, code))
        else:
            src.warn(w, "not a status code (100-599, 1XX-5XX) or 'default'; dropped")
    if not any(not k.startswith("x-") for k in out):
        src.warn(where, "no usable response left")
        return None
    return out


def response(src, value, where, code):
    if not _inline_object(src, value, where, "a response", refs="response"):
        return None
    out = _copy_fields(src, value, where, _RESPONSE_FIELDS, "a response")
    if "description" not in out:
        src.warn(where, "a response needs a description (OAS 3.1); one added")
        out = {"description": f"{code} response", **out}
    return out


def link(src, value, where):
    if not _inline_object(src, value, where, "a link", refs="link"):
        return None
    out = _copy_fields(src, value, where, _LINK_FIELDS, "a link")
    if "operationId" in out and "operationRef" in out:
        del out["operationRef"]      # paths are rewritten here; the id is the stable one
    if "operationId" not in out and "operationRef" not in out:
        src.warn(where, "a link needs operationId or operationRef; dropped")
        return None
    return out


def _link_operation_id_field(src, out, key, value, where, ctx):
    if _is_str(value):
        out[key] = src.op_ids.get(value, value)   # the published (namespaced) id
    else:
        src.warn(where, "must be a string; dropped")


def _link_parameters_field(src, out, key, value, where, ctx):
    if isinstance(value, dict):
        out[key] = {n: e for n, e in value.items() if isinstance(e, str)}
        if len(out[key]) != len(value):
            src.warn(where, "parameter values must be runtime expressions (strings); "
                            "others dropped")
    else:
        src.warn(where, "must be an object; dropped")


def callbacks(src, value, where, nesting):
    if not _inline_object(src, value, where, None):
        return None
    out = {}
    for name, cb in value.items():
        w = f"{where}.{name}"
        if not isinstance(cb, dict) or "$ref" in cb:
            src.warn(w, "a callback must be an object of path items (no references); dropped")
            continue
        items = {}
        for expr, item in cb.items():
            # Every key is an expression: the 3.1 schema validates even x- keys of a
            # callback as path items (additionalProperties), so extensions cannot live here.
            _put(items, expr, _callback_path_item(src, item, f"{w}.{expr}", nesting))
        out[name] = items
    return out


def _callback_path_item(src, value, where, nesting):
    if not isinstance(value, dict) or "$ref" in value:
        src.warn(where, "a path item must be an object (no references); dropped")
        return None
    return _copy_fields(src, value, where, _PATH_ITEM_FIELDS, "a path item", nesting)


def _callback_operation_field(src, out, key, value, where, nesting):
    if isinstance(value, dict):
        out[key] = operation(src, value, where, nesting)
    else:
        src.warn(where, "an operation must be an object; dropped")


# ---------------------------------------------------------------------------- field tables
# Last, because the rules name checkers from all over the module (and the kinds nest in a
# cycle: header -> content -> media type -> encoding -> header).

_STRING = _checked(_is_str, "must be a string")
_BOOLEAN = _checked(_is_bool, "must be a boolean")
_SCHEMA = _nested(schema, depth=1)
_EXAMPLES = _nested(examples)
_CONTENT = _nested(content)

# A header is a parameter without name and in (OAS §4.8.21): the same fields, but a header's
# style can only be `simple` and the query-only fields do not apply.
_SERIALISED_FIELDS = {
    "description": _STRING, "required": _BOOLEAN, "deprecated": _BOOLEAN,
    "explode": _BOOLEAN, "example": _literal_field, "examples": _EXAMPLES,
    "schema": _SCHEMA, "content": _nested(content, single=True),
}
_PARAMETER_FIELDS = {
    **_SERIALISED_FIELDS,
    "name": _ignored, "in": _ignored,                   # checked before the copy
    "style": _parameter_style_field,
    "allowEmptyValue": _query_only_field, "allowReserved": _query_only_field,
}
_HEADER_FIELDS = {
    **_SERIALISED_FIELDS,
    "style": _checked(lambda v: v == "simple", "must be 'simple'"),
}
_MEDIA_TYPE_FIELDS = {
    "schema": _SCHEMA, "example": _literal_field, "examples": _EXAMPLES,
    "encoding": _nested(_map, item=encoding),
}
_REQUEST_BODY_FIELDS = {"description": _STRING, "required": _BOOLEAN, "content": _CONTENT}
_RESPONSE_FIELDS = {
    "description": _STRING, "content": _CONTENT,
    "headers": _nested(_map, item=header), "links": _nested(_map, item=link),
}
_LINK_FIELDS = {
    "operationId": _link_operation_id_field,
    "operationRef": _checked(safe_url, UNSAFE_URL), "description": _STRING,
    "parameters": _link_parameters_field,
    "requestBody": _literal_field,
    "server": _ignored,                         # clients reach services via the gateway
}
_OPERATION_FIELDS = {
    "summary": _STRING, "description": _STRING, "deprecated": _BOOLEAN,
    "externalDocs": _nested(external_docs, depth=0),
    "parameters": _parameters_field,
    "requestBody": _nested(request_body),
    "responses": _nested(responses),
    "callbacks": _callbacks_field,
    "operationId": _operation_id_field,
    "tags": _ignored, "security": _ignored, "servers": _ignored,   # the gateway's own
}
_PATH_ITEM_FIELDS = {
    **{method: _callback_operation_field for method in OPERATION_METHODS},
    "summary": _STRING, "description": _STRING,
    "parameters": _parameters_field,
    "servers": _ignored,
}
