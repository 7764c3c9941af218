"""URLs in the aggregated OpenAPI document (docs/openapi.md §4, "URLs").

Doc viewers (Swagger UI, Redoc) make externalDocs, an example's externalValue and a link's
operationRef into `<a href>`s, so a service that sent `javascript:alert(1)` there had it run
in the browser of whoever read the gateway's document. Only absolute http(s) URLs and
references without a scheme are published; the rest is dropped with a warning. A real SDK
service registers the hostile fragments with a real gateway worker; the document it serves
keeps the safe URLs and none of the others. Markdown descriptions are passed as they are.
"""
from __future__ import annotations

import orjson
import pytest
from openapi_spec_validator import validate

from stellagw.openapi.sanitize import safe_url
from stellagw.service import Response, Service

from tests.support.gwtest import GatewayThread, request, settings_from
from tests.support.servicepeer import SdkThread

PREFIX = "#/components/schemas/"

UNSAFE = [
    "javascript:alert('op')", "JavaScript:alert('schema')", " javascript:alert('space')",
    "java\tscript:alert('tab')", "java\nscript:alert('newline')", "\x00javascript:x",
    "data:text/html,<script>alert('data')</script>", "vbscript:msgbox('vb')",
    "file:///etc/passwd", "mailto:someone@example.com", "http:///no-host", "https:",
    "http:no-slashes.example", "blob:https://example.com/uuid",
]
SAFE = [
    "https://docs.example.com/scans", "HTTP://docs.example.com", "/docs/scans.html",
    "scans.html#top", "//docs.example.com/p", "#/paths/~1a/get", "https://例え.jp/",
    "javascript%3Aalert(1)",     # no scheme: a relative path, resolved against the document
]


@pytest.mark.parametrize("url", UNSAFE)
def test_unsafe_urls(url):
    assert not safe_url(url)


@pytest.mark.parametrize("url", SAFE)
def test_safe_urls(url):
    assert safe_url(url)


def test_only_strings_are_urls():
    assert not safe_url(None) and not safe_url(42) and not safe_url(["https://a"])


# Each hostile URL carries a marker, so the test can say which one leaked.
def bad(marker: str) -> str:
    return f"javascript:alert('{marker}')"


HOSTILE_SCHEMAS = {
    "Scan": {
        "type": "object",
        "externalDocs": {"url": bad("schema-docs"), "description": "dropped"},
        "properties": {
            "id": {"type": "string",
                   "externalDocs": {"url": "data:text/html,<b>nested-schema-docs</b>"}},
            "report": {"type": "string",
                       "externalDocs": {"url": "https://docs.example.com/report"}},
        },
        "x-logo": {"url": bad("schema-x-logo"), "href": "https://docs.example.com/logo"},
    },
}

HOSTILE_OPERATION = {
    "summary": "Get one scan",
    # Markdown: passed as it is (the viewer renders and sanitises it).
    "description": "See [the guide](javascript:alert('markdown')) <b>bold</b>",
    "externalDocs": {"url": bad("operation-docs")},
    "servers": [{"url": bad("operation-servers")}],
    "x-logo": {"url": " JAVASCRIPT:alert('op-x-logo')", "altText": "logo"},
    "x-codeSamples": [{"lang": "curl", "source": "curl https://gw/<script>",
                       "href": "vbscript:msgbox('code-sample')"}],
    "responses": {"200": {
        "description": "ok",
        "content": {"application/json": {
            "schema": {"$ref": PREFIX + "Scan"},
            "examples": {
                "hostile": {"externalValue": "java\tscript:alert('external-value')"},
                "fine": {"externalValue": "/examples/scan.json"},
            }}},
        "links": {
            "hostile": {"operationRef": bad("operation-ref")},
            "fine": {"operationId": "listScans"},
        }}},
}

SAFE_OPERATION = {
    "operationId": "listScans",
    "externalDocs": {"url": "https://docs.example.com/scans", "description": "kept"},
    "responses": {"200": {"description": "ok"}},
}

# Fields viewers render as links: none may hold an unsafe URL.
URL_KEYS = ("url", "href", "externalValue", "operationRef", "termsOfService")


def url_values(node, at=""):
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, str) and (k in URL_KEYS or k.lower().endswith(("url", "href"))):
                yield f"{at}.{k}", v
            else:
                yield from url_values(v, f"{at}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from url_values(v, f"{at}[{i}]")


@pytest.fixture
def gateway():
    gw = GatewayThread(settings_from(
        "gateway: {http: {port: 0}, logging: {accessLog: false}}")).start()
    svc = Service("docs", "1.0.0", gateways=[f"127.0.0.1:{gw.transport_port}"],
                  schemas=HOSTILE_SCHEMAS, reconnect_min=0.05, reconnect_max=0.5)

    @svc.get("/docs/scans/{id}", openapi=HOSTILE_OPERATION)
    async def one(req):
        return Response.json({})

    @svc.get("/docs/scans", openapi=SAFE_OPERATION)
    async def many(req):
        return Response.json([])

    sdk = SdkThread(svc).start()
    try:
        yield gw
    finally:
        sdk.stop()
        gw.stop()


def test_a_service_cannot_publish_unsafe_urls(gateway):
    admin = gateway.worker.admin_address[1]
    status, _, body = request(admin, b"GET /openapi.json HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert status == 200
    doc = orjson.loads(body)
    validate(doc)
    one = doc["paths"]["/docs/scans/{id}"]["get"]
    many = doc["paths"]["/docs/scans"]["get"]

    # Nothing a viewer links to is unsafe, and no hostile marker is left anywhere but in
    # the Markdown description.
    leaked = [(at, v) for at, v in url_values(doc) if not safe_url(v)]
    assert leaked == []
    text = body.decode()
    for marker in ("schema-docs", "nested-schema-docs", "schema-x-logo", "operation-docs",
                   "operation-servers", "op-x-logo", "code-sample", "external-value",
                   "operation-ref"):
        assert marker not in text, marker
    assert one["description"] == HOSTILE_OPERATION["description"]      # Markdown: as sent

    # The safe ones stay.
    assert many["externalDocs"] == SAFE_OPERATION["externalDocs"]
    scan = doc["components"]["schemas"]["docs_Scan"]
    assert "externalDocs" not in scan and "externalDocs" not in scan["properties"]["id"]
    assert scan["properties"]["report"]["externalDocs"] == {
        "url": "https://docs.example.com/report"}
    assert scan["x-logo"] == {"href": "https://docs.example.com/logo"}
    assert one["x-logo"] == {"altText": "logo"}
    assert one["x-codeSamples"] == [{"lang": "curl", "source": "curl https://gw/<script>"}]
    assert "externalDocs" not in one and "servers" not in one
    media = one["responses"]["200"]["content"]["application/json"]
    assert media["examples"]["fine"] == {"externalValue": "/examples/scan.json"}
    assert "externalValue" not in media["examples"]["hostile"]
    links = one["responses"]["200"]["links"]
    assert "hostile" not in links and links["fine"] == {"operationId": "docs.listScans"}

    # Every drop is reported, where it happened.
    warned = {(w.get("operation"), w["at"]) for w in doc["x-stellagw-warnings"]
              if "http(s) URL" in w["message"]}
    assert warned == {
        (None, "components.schemas.Scan.externalDocs.url"),
        (None, "components.schemas.Scan.properties.id.externalDocs.url"),
        (None, "components.schemas.Scan.x-logo.url"),
        ("GET /docs/scans/{id}", "externalDocs.url"),
        ("GET /docs/scans/{id}", "x-logo.url"),
        ("GET /docs/scans/{id}", "x-codeSamples[0].href"),
        ("GET /docs/scans/{id}",
         "responses.200.content.application/json.examples.hostile.externalValue"),
        ("GET /docs/scans/{id}", "responses.200.links.hostile.operationRef"),
    }
    # The document's own URLs come from configuration only.
    assert set(doc["info"]) == {"title", "version"}
