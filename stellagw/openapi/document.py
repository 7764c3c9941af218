"""One OpenAPI 3.1.0 document from every registered service (docs/openapi.md).

Input is the worker's RoutingState: each route (method, template) names its service and its
candidates (instance, endpoint). The operation of a route comes from the endpoint of its
newest registered instance (semver, `Instance.version_key`; health is ignored so that the
document, and its ETag, do not flap with heartbeats). Everything a service wrote is copied
through `sanitize` (checked, `$ref`s rewritten to namespaced component names); the gateway
adds what it owns: operationId, tags, path parameters, security, its extensions.

The output is deterministic for a given state: paths sorted, methods in a fixed order,
components sorted, ties between instances broken by instance id — the cache hashes the
serialised document into its ETag.
"""
from __future__ import annotations

import re
from urllib.parse import quote

import orjson

from . import sanitize
from .sanitize import OPERATION_METHODS, SCHEMA_PREFIX, Source

OPENAPI_VERSION = "3.1.0"
_NOT_KEY_CHAR = re.compile(r"[^a-zA-Z0-9.\-_]")
_NOT_ID_CHAR = re.compile(r"[^A-Za-z0-9]+")
# Literal template segments are normalised text (docs/routing.md §1): a decoded '?' or '#'
# or a space must be percent-encoded again to be a path in a URL. '%' stays: the only
# escapes left after normalisation (%25 %2F %5C) are already encoded.
_SEGMENT_SAFE = "!$&'()*+,;=:@%-._~"
MAX_WARNINGS = 500
# Steps (sanitize.fits) all of one schema set's `default` checks may take in one build:
# thousands of ordinary defaults take a few each; a default it cannot check is dropped.
DEFAULTS_BUDGET = 200_000
CATCH_ALL_NOTE = (
    "Catch-all: the rest of the request path, zero or more segments joined by '/'. "
    "OpenAPI cannot express a multi-segment path parameter, so send the value's '/' "
    "separators unencoded; an encoded '%2F' stays part of one segment and reaches the "
    "service encoded.")


class _Warnings:
    def __init__(self):
        self.items = []
        self.dropped = 0

    def __call__(self, service, version, operation, at, message):
        if len(self.items) >= MAX_WARNINGS:
            self.dropped += 1
            return
        w = {"service": service, "version": version}
        if operation:
            w["operation"] = operation
        if at:
            w["at"] = at
        w["message"] = message
        self.items.append(w)

    def result(self):
        out = sorted(self.items, key=lambda w: (w["service"] or "", w.get("operation", ""),
                                                w.get("at", ""), w["message"]))
        if self.dropped:
            out.append({"service": None, "version": None,
                        "message": f"{self.dropped} more warnings not shown"})
        return out


def _parse_template(template: str):
    """[(kind, text)] with kind 'lit', 'param' or 'rest' (catch-all)."""
    segs = []
    for seg in template.split("/")[1:]:
        if seg.startswith("{*") and seg.endswith("}"):
            segs.append(("rest", seg[2:-1]))
        elif seg.startswith("{") and seg.endswith("}"):
            segs.append(("param", seg[1:-1]))
        elif seg:
            segs.append(("lit", seg))
    return segs


def _openapi_path(segs, names=None) -> str:
    """The Paths key: literals encoded, `{x}` and `{*x}` both as `{x}` (renamed via names)."""
    if not segs:
        return "/"
    out, i = [], 0
    for kind, text in segs:
        if kind == "lit":
            out.append(quote(text, safe=_SEGMENT_SAFE))
        else:
            out.append("{%s}" % (names[i] if names else text))
            i += 1
    return "/" + "/".join(out)


def _version_sort(instances):
    """Newest version first; equal versions by instance id, then registration order."""
    ordered = sorted(instances, key=lambda i: (i.instance_id, i.registered_at))
    return sorted(ordered, key=lambda i: i.version_key, reverse=True)


def _canonical(value):
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError):
        return ("unserialisable", id(value))


class _Entry:
    __slots__ = ("route", "instance", "endpoint", "segs", "key", "names", "method")

    def __init__(self, route, instance, endpoint, segs):
        self.route, self.instance, self.endpoint, self.segs = route, instance, endpoint, segs
        self.method = route.method.lower()
        self.key = None
        self.names = None     # parameter names as published (positional renaming)


class _Builder:
    def __init__(self, state, title, version, server_url, description, token_url,
                 sender_constraints):
        self.routes = state.routes                  # swapped, never mutated: a snapshot
        self.instances = list(state.instances.values())
        self.title, self.version, self.server_url = title, version, server_url
        self.description = description
        self.token_url = token_url
        self.constraints = tuple(c for c in ("dpop", "mtls") if c in sender_constraints)
        self.warn = _Warnings()
        self.components = {}                        # component key -> cleaned schema
        self.taken_keys = set()
        self._next_suffix = {}                      # component key -> the _n to try next
        self.op_ids = set()
        self.sources = []
        self._canon = {}                            # id(schemas dict) -> canonical bytes
        self._published_by = {}                     # component key -> (Source, raw name)

    # ------------------------------------------------------------------ entry point

    def build(self) -> dict:
        services = self._services()
        entries = self._entries()
        ctx = self._schema_sources(services, entries)
        ops = self._operations(entries, ctx)
        self._publish_schemas(ctx)
        self.sources = list(ctx.values())
        self._resolve_deep_refs()
        self._break_ref_cycles()
        self._check_required()
        self._check_defaults()
        return self._assemble(services, entries, ops)

    # ------------------------------------------------------------------ services

    def _services(self):
        by_service = {}
        for inst in self.instances:
            by_service.setdefault(inst.service, []).append(inst)
        return {name: _version_sort(insts) for name, insts in sorted(by_service.items())}

    # ------------------------------------------------------------------ paths

    def _entries(self):
        groups = {}
        for (method, template), route in self.routes.items():
            if not route.candidates:
                continue
            inst = _version_sort([c[0] for c in route.candidates])[0]
            ep = next(e for i, e in route.candidates if i is inst)
            segs = _parse_template(template)
            shape = tuple("{}" if kind != "lit" else text for kind, text in segs)
            groups.setdefault(shape, []).append(_Entry(route, inst, ep, segs))
        entries = []
        for shape in sorted(groups):
            group = groups[shape]
            # OpenAPI: "Templated paths with the same hierarchy but different templated
            # names MUST NOT exist". The router allows GET /a/{id} beside DELETE /a/{key}
            # and /a/{x} beside /a/{*rest}; publish them under one key, parameters
            # renamed by position (names are not on the wire).
            group.sort(key=lambda e: (any(k == "rest" for k, _ in e.segs), e.route.template,
                                      OPERATION_METHODS.index(e.method)
                                      if e.method in OPERATION_METHODS else 99))
            canon = [text for kind, text in group[0].segs if kind != "lit"]
            key = _openapi_path(group[0].segs, canon)
            methods = {}
            for e in group:
                e.key, e.names = key, canon
                other = methods.get(e.method)
                if other is not None:
                    # Only a catch-all can collide here (the router refuses equal shapes):
                    # the single-segment route keeps the slot, the catch-all cannot be said.
                    self.warn(e.route.service, e.instance.version,
                              f"{e.route.method} {e.route.template}", None,
                              f"OpenAPI cannot describe this catch-all beside "
                              f"{other.route.method} {other.route.template} (same path "
                              f"{key}); it is routed but not documented")
                    continue
                methods[e.method] = e
            entries.extend(methods.values())
        entries.sort(key=lambda e: (e.key, OPERATION_METHODS.index(e.method)))
        return entries

    # ------------------------------------------------------------------ schema names

    def _new_key(self, wanted: str, service, version, why_name):
        key = _NOT_KEY_CHAR.sub("_", wanted)
        if key in self.taken_keys:
            # Resume where the last collision on this key stopped: names that all become
            # one key (`bĀC`, `bāC`, ... are all `b_C`) made this loop quadratic.
            n = self._next_suffix.get(key, 2)
            while f"{key}_{n}" in self.taken_keys:
                n += 1
            self._next_suffix[key] = n + 1
            self.warn(service, version, None, f"components.schemas.{why_name}",
                      f"component name {key!r} is already taken; published as {key}_{n}")
            key = f"{key}_{n}"
        self.taken_keys.add(key)
        return key

    def _schema_sources(self, services, entries):
        """A Source per (service, schema set) with its name -> component key map.

        The newest instance's `schemas` are the service's: `<service>_<Name>`. A route
        served only by an older version (removed in the newest) is documented from that
        version, whose schemas may differ: a schema whose whole reference closure equals
        the newest's shares its component, one that differs is published as
        `<service>_<Name>_v<version>`. So no two definitions ever share a name.
        """
        by_service = {}
        for e in entries:
            by_service.setdefault(e.route.service, []).append(e)
        ctx = {}
        for service, insts in services.items():
            newest = insts[0]
            primary = _schemas(newest)
            primary_canon = self._schemas_key(newest)
            names = {}
            for name in sorted(primary):
                names[name] = self._new_key(f"{service}_{name}", service, newest.version, name)
            src = ctx[(service, primary_canon)] = self._source(service, newest.version, names)
            src.schema_names = sorted(primary)           # to publish: all of them
            src.schemas = primary
            # Older schema sets used by some documented route.
            groups = {}
            for e in by_service.get(service, ()):
                canon = self._schemas_key(e.instance)
                if canon != primary_canon:
                    groups.setdefault(canon, []).append(e)
            ordered = sorted(groups.items(), key=lambda kv: _version_sort(
                [e.instance for e in kv[1]])[0].instance_id)
            ordered.sort(key=lambda kv: _version_sort([e.instance for e in kv[1]])[0]
                         .version_key, reverse=True)
            for canon, group_entries in ordered:
                inst = _version_sort([e.instance for e in group_entries])[0]
                schemas = _schemas(inst)
                needed = set()
                for e in group_entries:
                    needed |= sanitize.raw_schema_refs(e.endpoint.openapi)
                names, publish = {}, []
                for name, shared in sorted(_shared_with(needed, schemas, primary).items()):
                    if name not in schemas:
                        continue                     # dangling: warned when copied
                    if shared:
                        names[name] = ctx[(service, primary_canon)].names[name]
                    else:
                        names[name] = self._new_key(f"{service}_{name}_v{inst.version}",
                                                    service, inst.version, name)
                        publish.append(name)
                src = ctx[(service, canon)] = self._source(service, inst.version, names)
                src.schema_names = publish
                src.schemas = schemas
        return ctx

    def _source(self, service, version, names):
        return Source(service, version, names, self.warn)

    def _schemas_key(self, inst):
        # Schema sets compare by content; serialised once per distinct dict per build.
        schemas = _schemas(inst)
        key = self._canon.get(id(schemas))
        if key is None:
            key = self._canon[id(schemas)] = _canonical(schemas)
        return key

    def _publish_schemas(self, ctx):
        for src in ctx.values():
            for name in src.schema_names:
                key = src.names[name]
                self.components[key] = sanitize.schema(src, src.schemas[name],
                                                       f"components.schemas.{name}")
                self._published_by[key] = (src, name)

    # ------------------------------------------------------------------ operations

    def _unique_op_id(self, wanted: str) -> str:
        # Resumes at the last suffix given for `wanted` (as _new_key): thousands of
        # endpoints all declaring one operationId were quadratic.
        op_id, n = wanted, self._next_suffix.get(("op", wanted), 2)
        while op_id in self.op_ids:
            op_id = f"{wanted}_{n}"
            n += 1
        self._next_suffix[("op", wanted)] = n
        self.op_ids.add(op_id)
        return op_id

    def _operations(self, entries, ctx):
        # Pass 1: operation ids (links in pass 2 refer to them by the service's own id).
        declared = {}
        ids = []
        for e in entries:
            raw = e.endpoint.openapi if isinstance(e.endpoint.openapi, dict) else None
            wanted = raw.get("operationId") if raw else None
            if not isinstance(wanted, str) or not wanted:
                wanted = e.method + "_" + (_NOT_ID_CHAR.sub("_", e.route.template).strip("_")
                                           or "root")
                own = None
            else:
                own = wanted
            op_id = self._unique_op_id(f"{e.route.service}.{wanted}")
            if own is not None and op_id != f"{e.route.service}.{own}":
                self.warn(e.route.service, e.instance.version,
                          f"{e.route.method} {e.route.template}", "operationId",
                          f"operationId {own!r} is not unique; published as {op_id!r}")
            if own is not None:
                declared.setdefault(e.route.service, {}).setdefault(own, op_id)
            ids.append(op_id)
        # Pass 2: the operations.
        ops = []
        for e, op_id in zip(entries, ids):
            src = ctx[(e.route.service, self._schemas_key(e.instance))]
            src.op_ids = declared.get(e.route.service, {})
            src.unique_op_id = self._unique_op_id
            # Warnings name the operation and the version it was taken from.
            src.operation = f"{e.route.method} {e.route.template}"
            version, src.version = src.version, e.instance.version
            ops.append(self._operation(e, op_id, src))
            src.operation, src.version = None, version
        return ops

    def _operation(self, e, op_id, src):
        ep = e.endpoint
        raw = ep.openapi if isinstance(ep.openapi, dict) else None
        body = sanitize.operation(src, raw, "") if raw is not None else {}
        op = {}
        if "summary" not in body and raw is None:
            op["summary"] = f"{e.route.method} {e.route.template}"
        op.update(body)
        op["operationId"] = op_id
        op["tags"] = [e.route.service]
        op["parameters"] = self._parameters(e, body.get("parameters", []), src)
        if "responses" not in op:
            op["responses"] = {"default": {"description": f"The response of service "
                                                          f"{e.route.service}"}}
        security, claims = self._security(ep.claims)
        op["security"] = security
        # Key order: the standard fields first, then the gateway's extensions.
        op = {k: op[k] for k in ("summary", "description", "externalDocs", "operationId",
                                 "tags", "parameters", "requestBody", "responses",
                                 "callbacks", "deprecated", "security") if k in op} | {
            k: v for k, v in op.items() if k.startswith("x-")}
        if not op["parameters"]:
            del op["parameters"]
        op["x-stellagw-service"] = e.route.service
        op["x-stellagw-version"] = e.instance.version
        op["x-stellagw-template"] = e.route.template
        if claims:
            op["x-stellagw-claims"] = claims
        if ep.streaming:
            op["x-stellagw-streaming"] = True
        if ep.websocket:
            op["x-stellagw-websocket"] = True
        if raw is None:
            op["x-stellagw-generated"] = True
        return op

    def _parameters(self, e, declared, src):
        """The template's path parameters (declared ones kept, renamed by position, made
        required), then the operation's other parameters in their order."""
        own = [text for kind, text in e.segs if kind != "lit"]
        rename = dict(zip(own, e.names))
        catch_all = {text for kind, text in e.segs if kind == "rest"}
        path_params, others = {}, []
        for p in declared:
            if p["in"] != "path":
                others.append(p)
                continue
            if p["name"] not in rename:
                src.warn(f"parameters.{p['name']}",
                         f"path parameter {p['name']!r} is not in the template "
                         f"{e.route.template}; dropped")
                continue
            path_params[p["name"]] = p
        params = []
        for name in own:
            p = dict(path_params.get(name) or {"name": name, "in": "path", "required": True,
                                                "schema": {"type": "string"}})
            p["name"] = rename[name]
            if name in catch_all:
                p["description"] = (p["description"] + "\n\n" + CATCH_ALL_NOTE
                                    if p.get("description") else CATCH_ALL_NOTE)
                p["x-stellagw-catch-all"] = True
            params.append(p)
        return params + others

    def _security(self, claims):
        """Security requirements for an endpoint's RequiringClaims.

        Every token comes from the Authority and is sender-constrained: DPoP (RFC 9449,
        `Authorization: DPoP` + proof) or mTLS (RFC 8705, certificate-bound). With a token
        URL the token itself is the `oauth2` client-credentials scheme and claims of type
        `scope` are its scopes; OpenAPI 3.1 lets other schemes list "role names", which is
        where the other claims go (and the scopes too when there is no oauth2 scheme).
        """
        scopes, roles, described = [], [], []
        for ctype, value in claims:
            try:
                value = sanitize.literal(value)
            except sanitize.Bad:
                value = repr(value)              # HELLO is JSON: only reachable in tests
            described.append({"type": ctype, "value": value})
            if ctype == "scope" and isinstance(value, str) and value.split():
                scopes.extend(value.split())     # a scope claim is space-delimited
            elif value is None:
                roles.append(ctype)
            elif isinstance(value, str):
                roles.append(f"{ctype}={value}")
            else:
                roles.append(f"{ctype}={orjson.dumps(value).decode()}")
        scopes = list(dict.fromkeys(scopes))
        roles = list(dict.fromkeys(roles))
        oauth2 = self.token_url is not None
        reqs = []
        if oauth2 and self.constraints:
            reqs = [{"oauth2": scopes, c: roles} for c in self.constraints]
        elif oauth2:
            reqs = [{"oauth2": scopes + roles}]
        elif self.constraints:
            reqs = [{c: scopes + roles} for c in self.constraints]
        else:
            reqs = [{"bearer": scopes + roles}]
        if not claims:
            # No claims required: anonymous is allowed, a token is still accepted.
            reqs = [{}] + reqs
        return reqs, described

    # ------------------------------------------------------------------ fix-ups

    def _resolve_deep_refs(self):
        # `#/components/schemas/X/properties/y` must point at something that survived.
        for src in self.sources:
            for container, key, pointer, where, operation in src.deep_refs:
                try:
                    sanitize.resolve_pointer(self.components[key], pointer)
                except KeyError:
                    if container.get("$ref", "").startswith(SCHEMA_PREFIX + key + "/"):
                        del container["$ref"]
                        src.warn(where, f"reference into {key} does not resolve; dropped",
                                 operation)

    def _target(self, ref):
        """(component key, target) of a rewritten reference; KeyError if it is gone."""
        key, _, pointer = ref[len(SCHEMA_PREFIX):].partition("/")
        target = self.components[key]
        return key, sanitize.resolve_pointer(target, pointer) if pointer else target

    def _break_ref_cycles(self):
        # A chain of schemas that are each a `$ref` to the next and loops back (Loop ->
        # Loop, A -> B -> A) describes nothing, and sends resolvers into infinite recursion
        # (openapi-spec-validator dies with RecursionError). Drop the `$ref` closing it.
        # Each node is walked once: a chain already followed from another key ends where
        # it ended then (a hostile service's 10,000-link chain was cubic time when every
        # key re-walked it against a list).
        walked = set()
        for key in sorted(self.components):
            node, node_key, chain = self.components[key], key, set()
            while isinstance(node, dict) and isinstance(node.get("$ref"), str):
                if id(node) in walked:
                    break
                walked.add(id(node))
                chain.add(id(node))
                try:
                    target_key, target = self._target(node["$ref"])
                except KeyError:
                    break
                if id(target) in chain:
                    src, name = self._published_by[node_key]
                    src.warn(f"components.schemas.{name}",
                             f"$ref {node['$ref']!r} closes a cycle of references that "
                             "never reaches a schema; dropped", None)
                    del node["$ref"]
                    break
                node, node_key = target, target_key

    def _resolve(self, ref):
        if not ref.startswith(SCHEMA_PREFIX):
            raise KeyError(ref)
        return self._target(ref)[1]

    def _check_defaults(self):
        for src in self.sources:
            # Per source, so one service's defaults cannot use up another's checks.
            budget = sanitize.StepBudget(DEFAULTS_BUDGET)
            for schema, where, operation in src.default_checks:
                value = schema["default"]
                if value is None and schema.get("nullable") is True:
                    continue                     # OAS 3.0 style; validators accept it
                try:
                    ok = sanitize.fits(value, schema, self._resolve, budget=budget)
                except (sanitize.Budget, re.error, RecursionError, TypeError, ValueError):
                    ok = False
                if not ok:
                    del schema["default"]
                    src.warn(f"{where}.default", "default does not validate against its "
                                                 "schema; dropped", operation)

    def _check_required(self):
        # openapi-spec-validator rejects a schema with allOf whose `required` names a
        # property defined neither in it nor in its allOf/anyOf/oneOf/items/not branches
        # (following references). Such a name can never be satisfied as written: drop it.
        for src in self.sources:
            budget = sanitize.StepBudget(DEFAULTS_BUDGET)       # per source, as defaults
            for schema, where, operation in src.required_checks:
                props = set(schema.get("properties", ()))
                try:
                    props |= self._collect_properties(
                        [sub for kw in ("allOf", "anyOf", "oneOf") for sub in schema.get(kw, ())],
                        budget)
                except sanitize.Budget:
                    # Unchecked, it could make the document invalid: drop it (the schema
                    # only stops saying what is required).
                    del schema["required"]
                    src.warn(where, "required not checked (its schemas are too large); "
                                    "dropped", operation)
                    continue
                missing = [n for n in schema["required"] if n not in props]
                if missing:
                    schema["required"] = [n for n in schema["required"] if n in props]
                    if not schema["required"]:
                        del schema["required"]
                    src.warn(where, f"required {missing} not defined by the schema or its "
                                    "allOf branches; removed from required", operation)

    def _collect_properties(self, schemas, budget):
        # Iterative, each node once, steps taken from `budget`: a chain of 2,000 schemas
        # each an allOf of the next was a RecursionError that failed the whole build (every
        # service's document stuck at the last one), and many `required` checks over one
        # large schema multiplied its size.
        props, seen, todo = set(), set(), list(schemas)
        while todo:
            schema = todo.pop()
            if not isinstance(schema, dict) or id(schema) in seen:
                continue
            seen.add(id(schema))
            own = schema.get("properties")
            budget.left -= 1 + (len(own) if isinstance(own, dict) else 0)
            if budget.left < 0:
                raise sanitize.Budget()
            ref = schema.get("$ref")
            if isinstance(ref, str) and ref.startswith(SCHEMA_PREFIX):
                key, _, pointer = ref[len(SCHEMA_PREFIX):].partition("/")
                target = self.components.get(key)
                if pointer and target is not None:
                    try:
                        target = sanitize.resolve_pointer(target, pointer)
                    except KeyError:
                        target = None
                todo.append(target)
            if isinstance(own, dict):
                props |= own.keys()
            for kw in ("allOf", "anyOf", "oneOf"):
                todo.extend(schema.get(kw, ()))
            todo.extend((schema.get("items"), schema.get("not")))
        return props

    # ------------------------------------------------------------------ the document

    def _assemble(self, services, entries, ops):
        paths = {}
        for e, op in zip(entries, ops):
            paths.setdefault(e.key, {})[e.method] = op
        doc = {"openapi": OPENAPI_VERSION,
               "info": {"title": self.title, "version": self.version}}
        if self.description:
            doc["info"]["description"] = self.description
        if self.server_url:
            doc["servers"] = [{"url": self.server_url}]
        doc["tags"] = [{"name": name, "description": f"Service {name}, version "
                                                      f"{insts[0].version}"}
                       for name, insts in services.items()]
        doc["paths"] = paths
        doc["components"] = {"schemas": {k: self.components[k]
                                         for k in sorted(self.components)},
                             "securitySchemes": self._security_schemes(entries)}
        operations = {}
        for e in entries:
            operations[e.route.service] = operations.get(e.route.service, 0) + 1
        doc["x-stellagw-services"] = [
            {"name": name, "version": insts[0].version,
             "versions": list(dict.fromkeys(i.version for i in insts)),
             "instances": len(insts), "operations": operations.get(name, 0)}
            for name, insts in services.items()]
        warnings = self.warn.result()
        if warnings:
            doc["x-stellagw-warnings"] = warnings
        return doc

    def _security_schemes(self, entries):
        schemes = {}
        if "dpop" in self.constraints:
            schemes["dpop"] = {
                "type": "http", "scheme": "DPoP",
                "description": "An access token from the Authority bound to a DPoP key "
                               "(RFC 9449): send `Authorization: DPoP <token>` and a `DPoP` "
                               "proof header on every request. Listed names are the claims "
                               "the token must carry (`scope` values, `type=value` for "
                               "others)."}
        if "mtls" in self.constraints:
            schemes["mtls"] = {
                "type": "mutualTLS",
                "description": "A client certificate (RFC 8705): the Authority access token "
                               "(`Authorization: Bearer`) must be bound to it (cnf.x5t#S256). "
                               "Listed names are the claims the token must carry."}
        if self.token_url is not None:
            scopes = {}
            for e in entries:
                for ctype, value in e.endpoint.claims:
                    if ctype == "scope" and isinstance(value, str):
                        for s in value.split():
                            scopes.setdefault(s, set()).add(e.route.service)
            schemes["oauth2"] = {
                "type": "oauth2",
                "description": "Tokens come from the Authority (client credentials); they "
                               "must also be sender-constrained (DPoP or mTLS).",
                "flows": {"clientCredentials": {
                    "tokenUrl": self.token_url,
                    "scopes": {s: "Required by " + ", ".join(sorted(svcs))
                               for s, svcs in sorted(scopes.items())}}}}
        if not schemes:
            schemes["bearer"] = {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                 "description": "An access token from the Authority."}
        return schemes


def _schemas(inst) -> dict:
    return inst.schemas if isinstance(inst.schemas, dict) else {}


def _shared_with(needed, schemas, primary, limit=10_000) -> dict:
    """{name: shared} over the reference closure of `needed` in an older schema set:
    shared when every schema the name's own closure reaches is in the set and equal to the
    newest set's (it can then use the newest's component). One pass over the graph and its
    reverse: a closure per name was quadratic (a 3,000-schema chain in an older version
    held the document build for minutes)."""
    refs, todo = {}, list(needed)
    while todo and len(refs) < limit:
        n = todo.pop()
        if n in refs:
            continue
        refs[n] = sanitize.raw_schema_refs(schemas[n]) if n in schemas else set()
        todo.extend(refs[n] - refs.keys())
    referrers = {}
    for n, targets in refs.items():
        for t in targets:
            referrers.setdefault(t, []).append(n)
    differs = [n for n in refs if not (n in schemas and n in primary
                                       and primary[n] == schemas[n])]
    # A name whose closure (cut at `limit`) was not followed is not known to be equal.
    differs += [t for targets in refs.values() for t in targets if t not in refs]
    tainted, todo = set(), differs
    while todo:
        n = todo.pop()
        if n in tainted:
            continue
        tainted.add(n)
        todo.extend(referrers.get(n, ()))
    return {n: n not in tainted for n in refs}


def build_document(routing_state, title: str, version: str, server_url: str | None = None,
                   *, description: str | None = None, token_url: str | None = None,
                   sender_constraints=("dpop", "mtls")) -> dict:
    """The aggregated OpenAPI 3.1.0 document of everything registered in `routing_state`.

    `token_url`: the Authority's token endpoint; when given, an `oauth2` client-credentials
    scheme carries the `scope` claims. `sender_constraints`: which of "dpop", "mtls" the
    gateway accepts (gateway.auth.dpopEnabled / mtlsEnabled). Never raises on what services
    sent: anything malformed is left out and listed in `x-stellagw-warnings`.
    """
    b = _Builder(routing_state, title, version, server_url, description, token_url,
                 tuple(sender_constraints))
    doc = b.build()
    return doc
