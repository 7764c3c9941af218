"""OpenAPI aggregation: the merged 3.1 document, namespacing, security, caching, ETags."""
from __future__ import annotations

import copy
import random
import threading
import time

import orjson
import pytest
import yaml
from openapi_spec_validator import validate

from stellagw.openapi import OpenApiCache, build_document, if_none_match
from stellagw.openapi import cache as cache_mod
from stellagw.routing.state import RoutingState

PREFIX = "#/components/schemas/"


def hello(service, version="1.0.0", instance="i1", endpoints=(), schemas=None):
    h = {"service": service, "version": version, "instance_id": instance, "region": "eu1",
         "endpoints": list(endpoints)}
    if schemas is not None:
        h["schemas"] = schemas
    return h


def json_op(ref, code="200"):
    return {"responses": {code: {"description": "ok", "content": {
        "application/json": {"schema": {"$ref": PREFIX + ref}}}}}}


SCANNER_SCHEMAS = {
    "Scan": {"type": "object", "required": ["id"],
             "properties": {"id": {"type": "string"},
                            "findings": {"type": "array",
                                         "items": {"$ref": PREFIX + "Finding"}}}},
    "Finding": {"type": "object", "properties": {"severity": {"enum": ["low", "high"]}}},
    "Error": {"type": "object", "properties": {"code": {"type": "integer"}}},
}
POLICY_SCHEMAS = {
    "Scan": {"type": "object", "properties": {"policy": {"type": "string"},
                                              "error": {"$ref": PREFIX + "Error"}}},
    "Error": {"type": "object", "properties": {"reason": {"type": "string"}}},
}


def scanner_endpoints():
    return [
        {"method": "GET", "path": "/api/v1/scans/{id}",
         "claims": [{"type": "scope", "value": "scans.read"}],
         "openapi": {"operationId": "getScan", "summary": "Get one scan",
                     **json_op("Scan"),
                     "parameters": [{"name": "id", "in": "path", "schema": {"type": "string",
                                                                            "format": "uuid"}}]}},
        {"method": "POST", "path": "/api/v1/scans",
         "claims": [{"type": "scope", "value": "scans.write"},
                    {"type": "stellaops:tenant", "value": "acme"}],
         "openapi": {"operationId": "startScan",
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"$ref": PREFIX + "Scan"}}}},
                     "responses": {"202": {"description": "accepted"},
                                   "default": {"description": "error", "content": {
                                       "application/json": {"schema": {
                                           "$ref": PREFIX + "Error"}}}}}}},
        {"method": "GET", "path": "/api/v1/scans/{id}/report", "streaming": True},
        {"method": "GET", "path": "/files/{*rest}", "openapi": {"summary": "Download"}},
    ]


def policy_endpoints():
    return [
        {"method": "GET", "path": "/api/v1/policies/{id}",
         "openapi": {"operationId": "getScan", **json_op("Scan")}},
        {"method": "DELETE", "path": "/api/v1/policies/{key}",
         "claims": [{"type": "role", "value": "admin"}],
         "openapi": {"operationId": "remove", **json_op("Error", "404")}},
    ]


def two_services(state=None, **kw):
    state = state or RoutingState("eu1")
    state.register(object(), hello("scanner", endpoints=scanner_endpoints(),
                                   schemas=copy.deepcopy(SCANNER_SCHEMAS)))
    state.register(object(), hello("policy", endpoints=policy_endpoints(),
                                   schemas=copy.deepcopy(POLICY_SCHEMAS)))
    return state


def build(state, **kw):
    doc = build_document(state, "Stella Ops API", "1.0.0", **kw)
    validate(orjson.loads(orjson.dumps(doc)))       # exactly what is served, validated
    assert_refs_resolve(doc)
    return doc


def walk(node):
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            yield n
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)


def resolve(doc, ref):
    assert ref.startswith("#/"), ref
    target = doc
    for token in ref[2:].split("/"):
        target = target[token.replace("~1", "/").replace("~0", "~")]
    return target


def assert_refs_resolve(doc):
    for node in walk(doc):
        ref = node.get("$ref")
        if isinstance(ref, str):
            resolve(doc, ref)
        disc = node.get("discriminator")
        if isinstance(disc, dict):
            for target in disc.get("mapping", {}).values():
                resolve(doc, target)


def warnings(doc):
    return doc.get("x-stellagw-warnings", [])


# ---------------------------------------------------------------------------- document

def test_two_services_with_the_same_schema_names_never_collide():
    doc = build(two_services())
    schemas = doc["components"]["schemas"]
    assert set(schemas) == {"scanner_Scan", "scanner_Finding", "scanner_Error",
                            "policy_Scan", "policy_Error"}
    # Refs were rewritten inside operations and inside schemas, per service.
    scan = doc["paths"]["/api/v1/scans/{id}"]["get"]
    assert scan["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": PREFIX + "scanner_Scan"}
    assert schemas["scanner_Scan"]["properties"]["findings"]["items"] == {
        "$ref": PREFIX + "scanner_Finding"}
    assert schemas["policy_Scan"]["properties"]["error"] == {"$ref": PREFIX + "policy_Error"}
    pol = doc["paths"]["/api/v1/policies/{id}"]
    assert pol["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": PREFIX + "policy_Scan"}
    assert resolve(doc, PREFIX + "policy_Error")["properties"] == {"reason": {"type": "string"}}
    assert "x-stellagw-warnings" not in doc


def test_operations_ids_tags_and_gateway_extensions():
    doc = build(two_services())
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {"title": "Stella Ops API", "version": "1.0.0"}
    get = doc["paths"]["/api/v1/scans/{id}"]["get"]
    assert get["operationId"] == "scanner.getScan" and get["tags"] == ["scanner"]
    assert get["summary"] == "Get one scan"
    # Two services may both say "getScan": namespacing keeps the ids unique.
    assert doc["paths"]["/api/v1/policies/{id}"]["get"]["operationId"] == "policy.getScan"
    report = doc["paths"]["/api/v1/scans/{id}/report"]["get"]
    assert report["operationId"] == "scanner.get_api_v1_scans_id_report"
    assert report["x-stellagw-generated"] is True and report["x-stellagw-streaming"] is True
    assert report["responses"] == {"default": {"description": "The response of service scanner"}}
    assert report["parameters"] == [{"name": "id", "in": "path", "required": True,
                                     "schema": {"type": "string"}}]
    # A declared path parameter is kept (and made required).
    assert get["parameters"] == [{"name": "id", "in": "path", "required": True,
                                  "schema": {"type": "string", "format": "uuid"}}]
    assert [t["name"] for t in doc["tags"]] == ["policy", "scanner"]
    assert doc["x-stellagw-services"] == [
        {"name": "policy", "version": "1.0.0", "versions": ["1.0.0"], "instances": 1,
         "operations": 2},
        {"name": "scanner", "version": "1.0.0", "versions": ["1.0.0"], "instances": 1,
         "operations": 4}]
    assert list(doc["paths"]) == sorted(doc["paths"])


def test_catch_all_becomes_a_documented_single_parameter():
    doc = build(two_services())
    op = doc["paths"]["/files/{rest}"]["get"]
    (param,) = op["parameters"]
    assert param["name"] == "rest" and param["in"] == "path" and param["required"] is True
    assert param["x-stellagw-catch-all"] is True and "zero or more segments" in param["description"]
    assert op["x-stellagw-template"] == "/files/{*rest}"


def test_same_shape_templates_share_one_path_with_parameters_renamed():
    # GET /api/v1/policies/{id} and DELETE /api/v1/policies/{key}: OpenAPI forbids two
    # paths of the same hierarchy, so both live under one key.
    doc = build(two_services())
    assert "/api/v1/policies/{key}" not in doc["paths"]
    delete = doc["paths"]["/api/v1/policies/{id}"]["delete"]
    assert delete["parameters"][0]["name"] == "id"
    assert delete["x-stellagw-template"] == "/api/v1/policies/{key}"


def test_catch_all_beside_a_single_segment_route():
    s = RoutingState("eu1")
    s.register(object(), hello("files", endpoints=[
        {"method": "GET", "path": "/files/{name}"},
        {"method": "PUT", "path": "/files/{*path}"},
        {"method": "GET", "path": "/files/{*path}"}]))
    doc = build(s)
    item = doc["paths"]["/files/{name}"]
    assert set(item) == {"get", "put"}
    assert item["get"]["x-stellagw-template"] == "/files/{name}"
    assert item["put"]["parameters"][0]["x-stellagw-catch-all"] is True
    (w,) = warnings(doc)
    assert w["operation"] == "GET /files/{*path}" and "cannot describe" in w["message"]


def test_claims_become_security_requirements():
    doc = build(two_services(), token_url="https://authority.example/connect/token")
    schemes = doc["components"]["securitySchemes"]
    assert schemes["dpop"] == {**schemes["dpop"], "type": "http", "scheme": "DPoP"}
    assert schemes["mtls"]["type"] == "mutualTLS"
    cc = schemes["oauth2"]["flows"]["clientCredentials"]
    assert cc["tokenUrl"] == "https://authority.example/connect/token"
    assert set(cc["scopes"]) == {"scans.read", "scans.write"}
    paths = doc["paths"]
    assert paths["/api/v1/scans/{id}"]["get"]["security"] == [
        {"oauth2": ["scans.read"], "dpop": []}, {"oauth2": ["scans.read"], "mtls": []}]
    post = paths["/api/v1/scans"]["post"]
    assert post["security"] == [
        {"oauth2": ["scans.write"], "dpop": ["stellaops:tenant=acme"]},
        {"oauth2": ["scans.write"], "mtls": ["stellaops:tenant=acme"]}]
    assert post["x-stellagw-claims"] == [{"type": "scope", "value": "scans.write"},
                                         {"type": "stellaops:tenant", "value": "acme"}]
    # No claims: anonymous allowed (the empty requirement), a token still accepted.
    assert paths["/files/{rest}"]["get"]["security"][0] == {}


def test_security_without_token_url_and_with_one_sender_constraint():
    doc = build(two_services(), sender_constraints=("dpop",))
    schemes = doc["components"]["securitySchemes"]
    assert set(schemes) == {"dpop"}
    assert doc["paths"]["/api/v1/scans"]["post"]["security"] == [
        {"dpop": ["scans.write", "stellaops:tenant=acme"]}]
    assert doc["paths"]["/files/{rest}"]["get"]["security"] == [{}, {"dpop": []}]


def test_newest_version_supplies_the_operation_and_the_schemas():
    s = RoutingState("eu1")
    for inst, version in (("a", "1.2.0"), ("b", "1.10.0"), ("c", "1.9.0")):
        s.register(object(), hello("scanner", version, inst, endpoints=[
            {"method": "GET", "path": "/scans", "openapi": {"summary": f"v{version}",
                                                            **json_op("Scan")}}],
            schemas={"Scan": {"title": f"scan {version}"}}))
    doc = build(s)
    op = doc["paths"]["/scans"]["get"]
    assert op["summary"] == "v1.10.0" and op["x-stellagw-version"] == "1.10.0"
    assert doc["components"]["schemas"] == {"scanner_Scan": {"title": "scan 1.10.0"}}
    assert doc["x-stellagw-services"][0]["versions"] == ["1.10.0", "1.9.0", "1.2.0"]
    assert doc["x-stellagw-services"][0]["instances"] == 3


def test_a_route_only_an_older_version_serves_keeps_its_own_schemas():
    s = RoutingState("eu1")
    shared = {"type": "object", "properties": {"code": {"type": "integer"}}}
    s.register(object(), hello("scanner", "1.0.0", "old", endpoints=[
        {"method": "GET", "path": "/v1/legacy", "openapi": json_op("Legacy")},
        {"method": "GET", "path": "/v1/err", "openapi": json_op("Error")}],
        schemas={"Legacy": {"type": "object", "properties": {
            "scan": {"$ref": PREFIX + "Scan"}}},
            "Scan": {"type": "string"}, "Error": shared}))
    s.register(object(), hello("scanner", "2.0.0", "new", endpoints=[
        {"method": "GET", "path": "/v2/scans", "openapi": json_op("Scan")}],
        schemas={"Scan": {"type": "object"}, "Error": shared}))
    doc = build(s)
    schemas = doc["components"]["schemas"]
    assert schemas["scanner_Scan"] == {"type": "object"}            # the newest's
    assert schemas["scanner_Scan_v1.0.0"] == {"type": "string"}     # differs: versioned
    assert schemas["scanner_Legacy_v1.0.0"]["properties"]["scan"] == {
        "$ref": PREFIX + "scanner_Scan_v1.0.0"}
    assert "scanner_Error_v1.0.0" not in schemas                    # equal: shared
    assert doc["paths"]["/v1/err"]["get"]["responses"]["200"]["content"][
        "application/json"]["schema"] == {"$ref": PREFIX + "scanner_Error"}


def test_component_names_are_sanitised_and_never_collide():
    s = RoutingState("eu1")
    s.register(object(), hello("a_b", endpoints=[
        {"method": "GET", "path": "/ab", "openapi": json_op("C")}],
        schemas={"C": {"title": "ab.C"}}))
    s.register(object(), hello("a", endpoints=[
        {"method": "GET", "path": "/a", "openapi": json_op("b_C")},
        {"method": "GET", "path": "/page", "openapi": json_op("Page%601")},
        {"method": "GET", "path": "/sr", "openapi": json_op("Scan%20Result")},
        {"method": "GET", "path": "/slash", "openapi": json_op("a~1b")}],
        schemas={"b_C": {"title": "a.b_C"}, "Page`1": {"title": "generic"},
                 "Scan Result": {"title": "spaced"}, "a/b": {"title": "slashed"}}))
    doc = build(s)
    schemas = doc["components"]["schemas"]

    def target(path):
        ref = doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"][
            "schema"]["$ref"]
        return resolve(doc, ref)["title"]

    assert target("/ab") == "ab.C" and target("/a") == "a.b_C"
    assert target("/page") == "generic" and target("/sr") == "spaced"
    assert target("/slash") == "slashed"
    assert len(schemas) == 5
    assert any("already taken" in w["message"] for w in warnings(doc))


def test_discriminator_mappings_follow_the_renamed_schemas():
    s = RoutingState("eu1")
    s.register(object(), hello("pets", endpoints=[
        {"method": "GET", "path": "/pets", "openapi": json_op("Pet")}], schemas={
        "Pet": {"oneOf": [{"$ref": PREFIX + "Cat"}, {"$ref": PREFIX + "Dog"}],
                "discriminator": {"propertyName": "kind", "mapping": {"doggo": "Dog"}}},
        "Cat": {"type": "object", "properties": {"kind": {"type": "string"}}},
        "Dog": {"type": "object", "properties": {"kind": {"type": "string"}}}}))
    doc = build(s)
    disc = doc["components"]["schemas"]["pets_Pet"]["discriminator"]
    # The explicit mapping is rewritten; the implicit ones (by schema name) made explicit.
    assert disc["mapping"] == {"doggo": PREFIX + "pets_Dog", "Cat": PREFIX + "pets_Cat",
                               "Dog": PREFIX + "pets_Dog"}


def test_no_services_is_still_a_valid_document():
    doc = build(RoutingState("eu1"), server_url="https://gw.example.com")
    assert doc["paths"] == {} and doc["servers"] == [{"url": "https://gw.example.com"}]


# ---------------------------------------------------------------------------- malformed input

def _deep(n):
    s = {"type": "string"}
    for _ in range(n):
        s = {"type": "array", "items": s}
    return s


def _schema_op(schema):
    return {"responses": {"200": {"description": "ok",
                                  "content": {"application/json": {"schema": schema}}}}}


BAD_OPERATIONS = [
    ("responses not an object", {"responses": "nope"}, "responses"),
    ("response without description", {"responses": {"200": {}}}, "description"),
    ("bad status code", {"responses": {"999": {"description": "x"}}}, "999"),
    ("parameter without in", {"parameters": [{"name": "q"}]}, "parameters[0]"),
    ("parameter with bad schema",
     {"parameters": [{"name": "q", "in": "query", "schema": {"type": 5}}]}, "type"),
    ("parameter reference", {"parameters": [{"$ref": "#/components/parameters/X"}]},
     "parameters[0]"),
    ("path parameter not in the template",
     {"parameters": [{"name": "other", "in": "path", "schema": {}}]}, "other"),
    ("request body without content", {"requestBody": {"description": "x"}}, "requestBody"),
    ("dangling schema ref", _schema_op({"$ref": PREFIX + "Nope"}), "Nope"),
    ("external ref", _schema_op({"$ref": "https://evil.example/x.json#/A"}), "evil"),
    ("component ref of another kind",
     {"responses": {"200": {"$ref": "#/components/responses/Ok"}}}, "responses.200"),
    ("deep ref that does not resolve",
     _schema_op({"$ref": PREFIX + "Scan/properties/nope"}), "does not resolve"),
    ("unknown operation field", {"foo": 1}, "foo"),
    ("summary not a string", {"summary": 5}, "summary"),
    ("operationId not a string", {"operationId": 7}, "operationId"),
    ("default of the wrong type", _schema_op({"type": "integer", "default": "s"}), "default"),
    ("bad regex", _schema_op({"type": "string", "pattern": "["}), "pattern"),
    ("$id in a schema", _schema_op({"$id": "https://x/y", "type": "string"}), "$id"),
    ("integer beyond 64 bits", _schema_op({"type": "integer", "example": 2 ** 70}), "example"),
    ("NaN default", _schema_op({"type": "number", "default": float("nan")}), "default"),
    ("nested too deeply", _schema_op(_deep(300)), "too deeply"),
    ("spoofed gateway extension", {"x-stellagw-service": "evil"}, "reserved"),
    ("required not defined beside allOf",
     _schema_op({"allOf": [{"$ref": PREFIX + "Scan"}], "required": ["id", "ghost"]}),
     "ghost"),
    ("param with schema and content",
     {"parameters": [{"name": "q", "in": "query", "schema": {},
                      "content": {"application/json": {}}}]}, "content"),
    ("path style on a query parameter",
     {"parameters": [{"name": "q", "in": "query", "schema": {}, "style": "matrix"}]}, "style"),
    ("example with value and externalValue",
     _schema_op({}) | {"responses": {"200": {"description": "ok", "content": {
         "application/json": {"examples": {"e": {"value": 1, "externalValue": "http://x"}}}}}}},
     "externalValue"),
    ("link without target",
     {"responses": {"200": {"description": "ok", "links": {"l": {"description": "x"}}}}},
     "links"),
]


@pytest.mark.parametrize("name, bad, needle", BAD_OPERATIONS, ids=[b[0] for b in BAD_OPERATIONS])
def test_malformed_parts_are_skipped_and_reported(name, bad, needle):
    s = two_services()
    s.register(object(), hello("broken", endpoints=[
        {"method": "GET", "path": "/broken/{id}", "openapi": {"summary": "kept", **bad}},
        {"method": "GET", "path": "/fine", "openapi": {"summary": "fine"}}],
        schemas={"Scan": {"type": "object", "properties": {"id": {"type": "string"}}}}))
    doc = build(s)
    op = doc["paths"]["/broken/{id}"]["get"]
    if name != "summary not a string":
        assert op["summary"] == "kept"                  # the rest of the operation stays
    assert op["operationId"].startswith("broken.")
    assert doc["paths"]["/fine"]["get"]["summary"] == "fine"
    mine = [w for w in warnings(doc) if w["service"] == "broken"]
    assert mine, "a warning names the service"
    assert all(w["operation"] == "GET /broken/{id}" for w in mine)
    assert any(needle in w.get("at", "") + " " + w["message"] for w in mine), mine
    # The other services are untouched.
    assert doc["paths"]["/api/v1/scans/{id}"]["get"]["summary"] == "Get one scan"


def test_malformed_component_schemas_are_replaced_and_reported():
    s = RoutingState("eu1")
    s.register(object(), hello("svc", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("Bad")}],
        schemas={"Bad": 5, "Loop": {"$ref": PREFIX + "Loop"},
                 "Worse": {"properties": {"a": {"minimum": "zero"}}}}))
    doc = build(s)
    schemas = doc["components"]["schemas"]
    assert schemas["svc_Bad"] == {} and schemas["svc_Worse"] == {"properties": {"a": {}}}
    assert {w.get("at") for w in warnings(doc)} >= {
        "components.schemas.Bad", "components.schemas.Worse.properties.a.minimum"}


def test_reference_cycles_that_never_reach_a_schema_are_broken():
    s = RoutingState("eu1")
    s.register(object(), hello("svc", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("A")}],
        schemas={"A": {"$ref": PREFIX + "B"}, "B": {"$ref": PREFIX + "A"},
                 "Tree": {"type": "object", "properties": {   # recursion with content: fine
                     "children": {"type": "array", "items": {"$ref": PREFIX + "Tree"}}}}}))
    doc = build(s)
    schemas = doc["components"]["schemas"]
    assert schemas["svc_A"] == {"$ref": PREFIX + "svc_B"} and schemas["svc_B"] == {}
    assert schemas["svc_Tree"]["properties"]["children"]["items"] == {"$ref": PREFIX + "svc_Tree"}
    (w,) = warnings(doc)
    assert w["at"] == "components.schemas.B" and "cycle" in w["message"]


# A hostile service's HELLO (1 MB) must not hold the document build: the build is one at a
# time, so every service's changes would wait behind it. The work is counted, not timed.

def count_calls(monkeypatch, owner, name):
    """Count the calls of owner.name (a function, or a method on a class) for the test;
    returns the one-element counter."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args):
        calls[0] += 1
        return real(*args)
    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_long_chain_of_references_is_walked_once_not_once_per_key(monkeypatch):
    from stellagw.openapi import document
    n = 2000       # A 136 KB HELLO; the walk was cubic (every key re-walked the chain)
    s = RoutingState("eu1")
    s.register(object(), hello("evil", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("S0")}],
        schemas={f"S{i}": {"$ref": PREFIX + f"S{(i + 1) % n}"} for i in range(n)}))
    s.register(object(), hello("good", endpoints=[
        {"method": "GET", "path": "/g", "openapi": json_op("A")}],
        schemas={"A": {"$ref": PREFIX + "B"}, "B": {"$ref": PREFIX + "A"}}))
    calls = count_calls(monkeypatch, document._Builder, "_target")
    doc = build_document(s, "t", "1")
    assert calls[0] <= 2 * (n + 2)
    schemas = doc["components"]["schemas"]
    closed = [k for k, v in schemas.items() if k.startswith("evil_") and "$ref" not in v]
    assert len(closed) == 1                       # the one cycle, broken once
    assert schemas["good_A"] == {"$ref": PREFIX + "good_B"} and schemas["good_B"] == {}
    assert sorted(w["service"] for w in warnings(doc)) == ["evil", "good"]


def test_an_older_versions_reference_chain_is_compared_in_one_pass(monkeypatch):
    from stellagw.openapi import document
    n = 1500       # each schema's closure walked again per schema: quadratic
    chain = {f"S{i}": {"type": "object", "properties": {"next": {"$ref": PREFIX + f"S{i + 1}"}}}
             for i in range(n)}
    shared = {"E0": {"type": "object", "properties": {"e": {"$ref": PREFIX + "E1"}}},
              "E1": {"type": "integer"}}
    s = RoutingState("eu1")
    s.register(object(), hello("svc", "1.0.0", "old", endpoints=[
        {"method": "GET", "path": "/old", "openapi": json_op("S0")},
        {"method": "GET", "path": "/err", "openapi": json_op("E0")}],
        schemas={**chain, f"S{n}": {"type": "string"}, **shared}))
    s.register(object(), hello("svc", "2.0.0", "new", endpoints=[
        {"method": "GET", "path": "/new", "openapi": json_op("S0")}],
        schemas={**chain, f"S{n}": {"type": "integer"}, **shared}))   # only the tail differs
    calls = count_calls(monkeypatch, document.sanitize, "raw_schema_refs")
    doc = build_document(s, "t", "1")
    assert calls[0] <= 2 * (n + 10)
    schemas = doc["components"]["schemas"]
    # Every link of the chain reaches the tail that differs: all versioned; E0/E1 shared.
    assert schemas["svc_S0_v1.0.0"]["properties"]["next"] == {"$ref": PREFIX + "svc_S1_v1.0.0"}
    assert schemas[f"svc_S{n}_v1.0.0"] == {"type": "string"}
    assert "svc_E0_v1.0.0" not in schemas and "svc_E1_v1.0.0" not in schemas
    assert doc["paths"]["/err"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"] == {"$ref": PREFIX + "svc_E0"}


def test_one_services_default_checks_share_one_budget_and_spare_the_others(monkeypatch):
    from stellagw.openapi import document
    s = RoutingState("eu1")
    # 2,000 defaults against a 20,000-member enum (218 KB): 40 million comparisons.
    s.register(object(), hello("evil", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("O")}],
        schemas={"E": {"enum": list(range(20_000))},
                 "O": {"type": "object", "properties": {
                     f"p{i}": {"$ref": PREFIX + "E", "default": -1} for i in range(2000)}}}))
    s.register(object(), hello("good", endpoints=[
        {"method": "GET", "path": "/g", "openapi": json_op("G")}],
        schemas={"G": {"type": "object", "properties": {
            f"p{i}": {"enum": ["a", "b"], "default": "b"} for i in range(100)}}}))
    calls = count_calls(monkeypatch, document.sanitize, "_json_equal")
    doc = build_document(s, "t", "1")
    assert calls[0] <= document.DEFAULTS_BUDGET + 1000
    schemas = doc["components"]["schemas"]
    assert not any("default" in p for p in schemas["evil_O"]["properties"].values())
    assert all(p["default"] == "b" for p in schemas["good_G"]["properties"].values())
    assert {w.get("service") for w in warnings(doc)} - {None} == {"evil"}   # + "n more"


def test_names_that_all_collide_are_numbered_without_rescanning(monkeypatch):
    from stellagw.openapi import document
    n = 3000       # each collision probed _2, _3, ... from the start again: quadratic
    lookups = [0]

    class CountingSet(set):
        def __contains__(self, item):
            lookups[0] += 1
            return super().__contains__(item)
    init = document._Builder.__init__

    def counted_init(self, *a):
        init(self, *a)
        self.taken_keys, self.op_ids = CountingSet(), CountingSet()
    monkeypatch.setattr(document._Builder, "__init__", counted_init)
    s = RoutingState("eu1")
    s.register(object(), hello("a", endpoints=[   # every name becomes the key a_b_C
        {"method": "GET", "path": f"/a/{i}", "openapi": {"operationId": "same"}}
        for i in range(n)], schemas={"b" + chr(0x100 + i) + "C": {} for i in range(n)}))
    doc = build_document(s, "t", "1")
    assert lookups[0] <= 8 * n
    assert len(doc["components"]["schemas"]) == n and "a_b_C_3000" in doc["components"]["schemas"]
    op_ids = {op["get"]["operationId"] for op in doc["paths"].values()}
    assert len(op_ids) == n and {"a.same", "a.same_2", f"a.same_{n}"} <= op_ids


def test_a_deep_allof_chain_under_required_does_not_fail_everyones_document():
    n = 2000       # recursion per link: RecursionError, the build failed, nothing published
    s = RoutingState("eu1")
    schemas = {f"S{i}": {"allOf": [{"$ref": PREFIX + f"S{i + 1}"}]} for i in range(n)}
    schemas[f"S{n}"] = {"type": "object", "properties": {"a": {}}}
    schemas["R"] = {"allOf": [{"$ref": PREFIX + "S0"}], "required": ["a", "zz"]}
    s.register(object(), hello("evil", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("R")}], schemas=schemas))
    s.register(object(), hello("good", endpoints=[{"method": "GET", "path": "/g"}]))
    doc = build_document(s, "t", "1")
    assert set(doc["paths"]) == {"/x", "/g"}
    assert doc["components"]["schemas"]["evil_R"]["required"] == ["a"]   # found at the end


def test_required_checks_over_one_large_schema_share_a_budget():
    n = 3000       # 3,000 checks x 3,000 properties each
    s = RoutingState("eu1")
    schemas = {"Big": {"type": "object", "properties": {f"p{i}": {} for i in range(n)}}}
    schemas.update({f"R{i}": {"allOf": [{"$ref": PREFIX + "Big"}], "required": ["p1", "zz"]}
                    for i in range(n)})
    s.register(object(), hello("evil", endpoints=[
        {"method": "GET", "path": "/x", "openapi": json_op("Big")}], schemas=schemas))
    s.register(object(), hello("good", endpoints=[{"method": "GET", "path": "/g"}],
                               schemas={"G": {"allOf": [{"type": "object", "properties": {
                                   "a": {}}}], "required": ["a", "b"]}}))
    doc = build_document(s, "t", "1")
    schemas = doc["components"]["schemas"]
    checked = [k for k in schemas if k.startswith("evil_R") and "required" in schemas[k]]
    assert 0 < len(checked) < 100             # the first ones, until the budget ran out
    assert all(schemas[k]["required"] == ["p1"] for k in checked)
    assert all("required" not in schemas[f"evil_R{i}"] for i in range(n - 100, n))
    assert schemas["good_G"]["required"] == ["a"]                  # the other service: checked


def test_input_objects_are_never_mutated():
    state = two_services()
    before = [copy.deepcopy((i.schemas, [e.openapi for e in i.endpoints]))
              for i in state.instances.values()]
    build(state)
    assert before == [(i.schemas, [e.openapi for e in i.endpoints])
                      for i in state.instances.values()]


# ---------------------------------------------------------------------------- determinism

def test_equal_state_gives_identical_bytes_whatever_the_registration_order():
    a = two_services()
    b = RoutingState("eu1")
    b.register(object(), hello("policy", endpoints=policy_endpoints(),
                               schemas=copy.deepcopy(POLICY_SCHEMAS)))
    b.register(object(), hello("scanner", endpoints=scanner_endpoints(),
                               schemas=copy.deepcopy(SCANNER_SCHEMAS)))
    assert orjson.dumps(build(a)) == orjson.dumps(build(b))


# ---------------------------------------------------------------------------- the cache

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def make_cache(state, ttl=300, **kw):
    clock = Clock()
    return OpenApiCache(state, "Stella Ops API", "1.0.0", ttl, clock=clock, **kw), clock


def test_built_once_per_change_and_not_for_health():
    state = two_services()
    cache, _ = make_cache(state)
    for _ in range(50):
        cache.respond(b"/openapi.json", None)
        cache.respond(b"/openapi.yaml", None)
        cache.respond(b"/.well-known/openapi", None)
    assert cache.builds == 1
    inst = next(iter(state.instances.values()))
    state.heartbeat(inst, "Degraded")              # bumps the generation, not the routes
    gen = state.generation
    cache.json()
    assert cache.builds == 1 and cache._generation == gen
    state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
    cache.json()
    cache.json()
    assert cache.builds == 2


def test_ttl_rebuilds_and_an_equal_document_keeps_its_etag():
    cache, clock = make_cache(two_services(), ttl=60)
    etag, discovery = cache.etag, cache.respond(b"/.well-known/openapi", None)[2]
    clock.now += 59
    cache.json()
    assert cache.builds == 1
    clock.now += 1
    assert cache.etag == etag and cache.builds == 2
    # Same content: the old snapshot (and its generated_at) is kept.
    assert cache.respond(b"/.well-known/openapi", None)[2] == discovery


def test_ttl_zero_means_rebuild_only_on_change():
    cache, clock = make_cache(two_services(), ttl=0)
    cache.json()
    clock.now += 10 ** 6
    cache.json()
    assert cache.builds == 1


def test_etag_changes_when_a_service_registers_or_leaves():
    state = two_services()
    cache, _ = make_cache(state)
    etag = cache.etag
    assert etag.startswith(b'"') and etag.endswith(b'"') and not etag.startswith(b"W/")
    inst = state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
    etag2 = cache.etag
    assert etag2 != etag
    # A second instance of a service changes the instance count, hence the document.
    state.register(object(), hello("late", instance="i2",
                                   endpoints=[{"method": "GET", "path": "/late"}]))
    etag3 = cache.etag
    assert etag3 not in (etag, etag2)
    state.unregister(inst)
    state.unregister(next(i for i in state.instances.values() if i.service == "late"))
    assert cache.etag == etag                      # back to the same content, same ETag


def test_if_none_match_gives_304():
    cache, _ = make_cache(two_services())
    status, headers, body = cache.respond(b"/openapi.json", None)
    etag = cache.etag
    assert status == 200 and body == cache.json()
    lines = headers.split(b"\r\n")
    assert headers.endswith(b"\r\n") and lines[-1] == b""
    assert b"content-type: application/json" in lines
    assert b"etag: " + etag in lines and b"cache-control: public, no-cache" in lines
    for inm in (etag, b"W/" + etag, b'"nope", ' + etag, b'  "x" ,W/' + etag + b' ', b"*",
                b'"a,b", ' + etag):
        status, headers, body = cache.respond(b"/openapi.json", inm)
        assert (status, body) == (304, b""), inm
        assert b"etag: " + etag in headers and b"cache-control" in headers
    for inm in (b'"nope"', etag[1:-1], b"", b'W/"' + etag, b"garbage"):
        assert cache.respond(b"/openapi.json", inm)[0] == 200, inm
    # Each representation has its own validator.
    yaml_etag = cache.respond(b"/openapi.yaml", None)[1].split(b"etag: ")[1].split(b"\r\n")[0]
    assert yaml_etag != etag
    assert cache.respond(b"/openapi.yaml", etag)[0] == 200
    assert cache.respond(b"/openapi.yaml", yaml_etag)[0] == 304


def test_if_none_match_parser():
    assert if_none_match(b'"a", "b"', b'"b"')
    assert if_none_match(b'W/"b"', b'"b"')
    assert not if_none_match(None, b'"b"')
    assert not if_none_match(b'"a",,', b'"b"')
    assert if_none_match(b'junk, "b"', b'"b"')


def test_if_none_match_reads_only_the_first_tags():
    # Each member of a 16 KB If-None-Match was matched: 3.5 ms a request on a public
    # OpenAPI endpoint (an adversarial probe). Past MAX_TAGS the document is sent (always
    # a correct answer).
    from stellagw.openapi.cache import MAX_TAGS
    assert if_none_match(b"a, " * (MAX_TAGS - 1) + b'"b"', b'"b"')
    assert not if_none_match(b"a, " * MAX_TAGS + b'"b"', b'"b"')
    assert not if_none_match(b'"x", ' * 3000 + b'"b"', b'"b"')
    cache, _ = make_cache(two_services())
    cache.respond(b"/openapi.json", None)
    assert cache.respond(b"/openapi.json", b"a," * 7000 + cache.etag)[0] == 200
    assert cache.respond(b"/openapi.json", b"a," * 8 + cache.etag)[0] == 304


def test_yaml_has_the_same_content_as_json():
    cache, _ = make_cache(two_services(), token_url="https://authority.example/token")
    status, headers, body = cache.respond(b"/openapi.yaml", None)
    assert status == 200 and b"content-type: application/yaml" in headers
    assert yaml.safe_load(body) == orjson.loads(cache.json())
    assert cache.yaml() is cache.yaml()            # dumped once per snapshot


def test_discovery_document():
    cache, _ = make_cache(two_services())
    status, headers, body = cache.respond(b"/.well-known/openapi", None)
    d = orjson.loads(body)
    assert status == 200 and b"content-type: application/json" in headers
    assert d["openapi_json"] == "/openapi.json" and d["openapi_yaml"] == "/openapi.yaml"
    assert d["etag"] == cache.etag.decode() and d["title"] == "Stella Ops API"
    assert d["generated_at"].endswith("Z")
    assert [s["name"] for s in d["services"]] == ["policy", "scanner"]
    etag = headers.split(b"etag: ")[1].split(b"\r\n")[0]
    assert cache.respond(b"/.well-known/openapi", etag)[0] == 304


def test_max_age_option_and_unknown_path():
    cache, _ = make_cache(two_services(), max_age=60)
    assert b"cache-control: public, max-age=60\r\n" in cache.respond(b"/openapi.json", None)[1]
    assert cache.respond(b"/openapi.xml", None)[0] == 404


def test_a_failing_build_serves_the_last_document_and_is_not_retried_per_request(monkeypatch):
    state = two_services()
    cache, _ = make_cache(state)
    good = cache.json()
    calls = []

    def broken(*a, **kw):
        calls.append(1)
        raise RuntimeError("bug")

    monkeypatch.setattr(cache_mod, "build_document", broken)
    state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
    for _ in range(5):
        assert cache.json() == good
    assert len(calls) == 1 and isinstance(cache.last_error, RuntimeError)
    fresh, _ = make_cache(state)
    assert fresh.respond(b"/openapi.json", None)[0] == 503


def test_served_document_validates_with_everything_at_once():
    # Every malformed operation above in one service, through the cache: the served
    # bytes (JSON and YAML) validate and every reference resolves.
    state = two_services()
    state.register(object(), hello("broken", endpoints=[
        {"method": "GET", "path": f"/b{i}", "openapi": bad}
        for i, (_, bad, _) in enumerate(BAD_OPERATIONS)], schemas={"Scan": {"type": "object"}}))
    cache, _ = make_cache(state, token_url="https://authority.example/token")
    doc = orjson.loads(cache.json())
    validate(doc)
    assert_refs_resolve(doc)
    assert len(doc["paths"]) == 5 + len(BAD_OPERATIONS)     # policies share one path
    validate(yaml.safe_load(cache.yaml()))


def test_background_build_serves_the_previous_document_meanwhile(monkeypatch):
    state = two_services()
    cache, _ = make_cache(state, background=True)
    cache.warm()                                   # the first document is built inline
    old = cache.etag
    started, gate = threading.Event(), threading.Event()
    real = cache_mod.build_document

    def slow(*args, **kw):
        started.set()
        assert gate.wait(10)
        return real(*args, **kw)

    monkeypatch.setattr(cache_mod, "build_document", slow)
    state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
    t0 = time.perf_counter()
    for _ in range(200):                           # cheap while building: the old document
        status, headers, body = cache.respond(b"/openapi.json", None)
        assert status == 200 and b"etag: " + old in headers
        assert cache.respond(b"/openapi.yaml", None)[0] == 200
    assert time.perf_counter() - t0 < 1.0
    assert started.wait(10) and cache.builds == 2  # one build for the change, not 400
    # The state may move on during the build; the build works on what it was given.
    state.register(object(), hello("later", endpoints=[{"method": "GET", "path": "/later"}]))
    gate.set()
    assert cache.wait(10)
    assert cache._snapshot._yaml is not None       # rendered on the build thread
    mid = cache.etag                               # starts the build for "later"
    assert cache.wait(10)
    new = cache.etag
    assert len({old, mid, new}) == 3 and cache.builds == 3
    doc = orjson.loads(cache.json())
    assert {"/late", "/later"} <= set(doc["paths"])


class _Conn:
    def __init__(self):
        self.answers = []

    def respond(self, req, status, headers, body):
        self.answers.append((req, status, headers, body))


class _Req:
    def __init__(self, target=b"/openapi.json"):
        self.target = target
        self.conn = _Conn()
        self.correlation_id = "c"


def _handler(cache):
    def handler(req):
        if cache.defer(req, handler):
            return None
        return cache.respond(req.target, None)
    return handler


def test_a_registration_on_the_loop_starts_the_build_and_one_iteration_is_one_build():
    import asyncio

    async def main():
        state = RoutingState("eu1")
        cache, _ = make_cache(state, background=True)
        cache.warm()
        assert cache.builds == 1
        # Ten HELLOs read in one loop iteration: one build, started without any read.
        for i in range(10):
            state.register(object(), hello(f"s{i}", endpoints=[{"method": "GET", "path": f"/s{i}"}]))
        assert cache.builds == 1                   # scheduled after this iteration's work
        for _ in range(200):
            await asyncio.sleep(0.01)
            if cache.builds >= 2 and cache._building is None:
                break
        assert cache.builds == 2
        assert cache.wait(10)
        assert {f"/s{i}" for i in range(10)} <= set(orjson.loads(cache.json())["paths"])
        # Health moves the generation, not the routes: nothing is built for it.
        state.heartbeat(next(iter(state.instances.values())), "Degraded")
        await asyncio.sleep(0.05)
        assert cache.builds == 2

    asyncio.run(main())


def test_defer_holds_a_read_until_the_build_for_its_routes_lands(monkeypatch):
    import asyncio

    async def main():
        state = two_services()
        cache, _ = make_cache(state, background=True)
        cache.warm()
        handler = _handler(cache)
        current = _Req()
        assert handler(current)[0] == 200          # current: answered at once
        gate = threading.Event()
        real = cache_mod.build_document

        def gated(*a, **kw):
            assert gate.wait(10)
            return real(*a, **kw)

        monkeypatch.setattr(cache_mod, "build_document", gated)
        state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
        waiting = _Req()
        assert handler(waiting) is None            # answered later, on its connection
        yaml_waiting = _Req(b"/openapi.yaml")
        assert handler(yaml_waiting) is None
        assert cache.respond(b"/openapi.json", None)[0] == 200   # respond() alone: old one
        await asyncio.sleep(0.05)
        assert waiting.conn.answers == [] and cache.builds == 2
        gate.set()
        for _ in range(500):
            await asyncio.sleep(0.01)
            if waiting.conn.answers and yaml_waiting.conn.answers:
                break
        [(req, status, headers, body)] = waiting.conn.answers
        assert req is waiting and status == 200 and "/late" in orjson.loads(body)["paths"]
        assert b"etag: " + cache.etag in headers
        assert b"/late" in yaml_waiting.conn.answers[0][3]
        assert cache.builds == 2                   # the reads started no build of their own

    asyncio.run(main())


def test_a_change_during_a_build_is_built_next_and_its_reads_wait_for_that(monkeypatch):
    import asyncio

    async def main():
        state = two_services()
        cache, _ = make_cache(state, background=True)
        cache.warm()
        handler = _handler(cache)
        gates = [threading.Event(), threading.Event()]
        real = cache_mod.build_document
        calls = []

        def gated(*a, **kw):
            gate = gates[len(calls)]
            calls.append(1)
            assert gate.wait(10)
            return real(*a, **kw)

        monkeypatch.setattr(cache_mod, "build_document", gated)
        state.register(object(), hello("one", endpoints=[{"method": "GET", "path": "/one"}]))
        await asyncio.sleep(0.05)                  # build 1 (for /one) runs
        early = _Req()
        assert handler(early) is None
        state.register(object(), hello("two", endpoints=[{"method": "GET", "path": "/two"}]))
        late = _Req()
        assert handler(late) is None
        gates[0].set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if early.conn.answers:
                break
        # The first build covers the early read only; the late one waits for build 2,
        # which started on its own when build 1 landed.
        assert "/one" in orjson.loads(early.conn.answers[0][3])["paths"]
        assert late.conn.answers == [] and len(calls) == 2
        gates[1].set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if late.conn.answers:
                break
        assert {"/one", "/two"} <= set(orjson.loads(late.conn.answers[0][3])["paths"])

    asyncio.run(main())


def test_an_invalidation_during_a_build_is_not_lost(monkeypatch):
    # A configuration reload changes what the document says while a build (for a
    # registration) runs with the old title: that build lands, and another follows with the
    # new one; a read held meanwhile gets the new one.
    import asyncio

    async def main():
        state = two_services()
        cache, _ = make_cache(state, background=True)
        cache.warm()
        handler = _handler(cache)
        gate = threading.Event()
        real = cache_mod.build_document
        titles = []

        def gated(view, **kw):
            titles.append(kw["title"])
            if len(titles) == 1:
                assert gate.wait(10)
            return real(view, **kw)

        monkeypatch.setattr(cache_mod, "build_document", gated)
        state.register(object(), hello("late", endpoints=[{"method": "GET", "path": "/late"}]))
        await asyncio.sleep(0.05)                  # the registration's build runs
        cache._build_args = dict(cache._build_args, title="Renamed")
        cache.invalidate()
        read = _Req()
        assert handler(read) is None
        gate.set()
        for _ in range(300):
            await asyncio.sleep(0.01)
            if read.conn.answers:
                break
        doc = orjson.loads(read.conn.answers[0][3])
        assert titles == ["Stella Ops API", "Renamed"]
        assert doc["info"]["title"] == "Renamed" and "/late" in doc["paths"]
        assert orjson.loads(cache.json())["info"]["title"] == "Renamed"

    asyncio.run(main())


# A seeded fuzz: random damage to a rich operation and its schemas must never make the
# document invalid (nor the build raise).
_P = PREFIX
_RICH_OP = {
    "summary": "s", "operationId": "op", "externalDocs": {"url": "https://x"},
    "parameters": [{"name": "id", "in": "path", "schema": {"type": "string"}},
                   {"name": "q", "in": "query", "schema": {"type": "integer", "minimum": 0,
                                                            "default": 1},
                    "style": "form", "explode": True, "examples": {"a": {"value": 1}}},
                   {"name": "h", "in": "header",
                    "content": {"application/json": {"schema": {"$ref": _P + "A"}}}}],
    "requestBody": {"content": {"application/json": {
        "schema": {"$ref": _P + "A"},
        "encoding": {"f": {"contentType": "text/plain", "headers": {"X": {"schema": {}}}}}}}},
    "responses": {
        "200": {"description": "ok", "headers": {"X-R": {"schema": {"type": "string"}}},
                "content": {"application/json": {"schema": {
                    "allOf": [{"$ref": _P + "A"}], "required": ["a"],
                    "properties": {"b": {"$ref": _P + "B/properties/x"}}}}},
                "links": {"l": {"operationId": "op", "parameters": {"id": "$response.body#/id"}}}},
        "default": {"description": "e", "content": {"application/json": {"schema": {
            "oneOf": [{"$ref": _P + "A"}, {"$ref": _P + "B"}],
            "discriminator": {"propertyName": "k"}}}}}},
    "callbacks": {"cb": {"{$request.body#/url}": {"post": {
        "operationId": "cbop", "responses": {"200": {"description": "ok"}}}}}},
    "x-extra": {"a": [1, 2]},
}
_RICH_SCHEMAS = {
    "A": {"type": "object", "properties": {"a": {"type": "integer"}, "k": {"type": "string"}},
          "required": ["a"]},
    "B": {"type": "object", "properties": {"x": {"type": "string", "pattern": "^a+$"},
                                           "k": {"type": "string"}},
          "additionalProperties": {"$ref": _P + "A"}},
}
_JUNK = [None, 5, -1, 1.5, "x", "", True, [], {}, [1], {"a": 1}, {"$ref": _P + "A"},
         {"$ref": _P + "Z"}, {"$ref": "#/x"}, ["a", "a"], {"type": "string"}, "path",
         "matrix", {"description": "d"}, {"200": {"description": "x"}}, 2 ** 70, "["]
_KEYS = ["type", "$ref", "required", "default", "name", "in", "style", "content", "schema",
         "description", "foo", "allOf", "enum", "items", "value", "externalValue",
         "operationId", "discriminator", "x-stellagw-x"]


def _damage(obj, rng):
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 8)):
        nodes, stack = [], [((), obj)]
        while stack:
            path, node = stack.pop()
            nodes.append((path, node))
            items = (node.items() if isinstance(node, dict)
                     else enumerate(node) if isinstance(node, list) else ())
            stack.extend((path + (k,), v) for k, v in items)
        path, node = rng.choice(nodes)
        if not path:
            continue
        parent = obj
        for k in path[:-1]:
            parent = parent[k]
        r = rng.random()
        if r < 0.5:
            parent[path[-1]] = copy.deepcopy(rng.choice(_JUNK))
        elif r < 0.7 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(node, dict):
            node[rng.choice(_KEYS)] = copy.deepcopy(rng.choice(_JUNK))
    return obj


@pytest.mark.parametrize("seed", range(4))
def test_fuzzed_operations_and_schemas_still_give_a_valid_document(seed):
    rng = random.Random(seed)
    for _ in range(40):
        s = RoutingState("eu1")
        s.register(object(), hello("svc", endpoints=[
            {"method": "GET", "path": "/a/{id}", "openapi": _damage(_RICH_OP, rng)}],
            schemas=_damage(_RICH_SCHEMAS, rng)))
        doc = build_document(s, "t", "1", token_url="https://authority.example/token")
        try:
            validate(orjson.loads(orjson.dumps(doc)))
        except RecursionError:
            # python-openapi/openapi-spec-validator#400: its allOf "required" check recurses
            # without a cycle guard on recursive schemas that are perfectly valid.
            continue
        assert_refs_resolve(doc)


def test_long_patterns_are_dropped_uncompiled():
    """A service's `pattern` was compiled whatever its length, and Python's `re` keeps
    each compiled pattern in its module cache (~20 bytes a character, 512 of them): eight
    instances with a 1 MB pattern each left a worker at 280 MB after they had gone
    (docs/security.md §3d, "long patterns"). Past MAX_PATTERN_CHARS they are dropped."""
    import re as re_mod

    from stellagw.openapi import sanitize
    limit = getattr(sanitize, "MAX_PATTERN_CHARS", 2048)
    long_pattern = "^long" + "a" * limit
    name_pattern = "^name" + "b" * limit
    schemas = {"Long": {"type": "string", "pattern": long_pattern},
               "Short": {"type": "string", "pattern": "^[a-z]{1,8}$"},
               "Props": {"type": "object", "patternProperties": {name_pattern: {},
                                                                  "^x-": {}}}}
    s = RoutingState("eu1")
    s.register(object(), hello("svc", endpoints=[
        {"method": "GET", "path": "/a", "openapi": json_op("Long")},
        {"method": "GET", "path": "/b", "openapi": json_op("Short")},
        {"method": "GET", "path": "/c", "openapi": json_op("Props")}], schemas=schemas))
    doc = build_document(s, "t", "1")
    got = doc["components"]["schemas"]
    assert "pattern" not in got["svc_Long"] and got["svc_Short"]["pattern"] == "^[a-z]{1,8}$"
    assert list(got["svc_Props"]["patternProperties"]) == ["^x-"]
    assert any("at most 2048 characters" in w["message"] for w in warnings(doc))
    assert long_pattern not in sanitize._REGEX_CACHE and name_pattern not in sanitize._REGEX_CACHE
    assert not [k for k in re_mod._cache if isinstance(k, tuple) and len(k) > 1
                and isinstance(k[1], str) and len(k[1]) > limit]
