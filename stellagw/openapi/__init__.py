"""The aggregated OpenAPI document of every registered service (docs/openapi.md).

`build_document(routing_state, ...)` makes the document; `OpenApiCache` serves it at
`/openapi.json`, `/openapi.yaml` and `/.well-known/openapi` with ETags.
"""
from .cache import DISCOVERY_PATH, JSON_PATH, PATHS, YAML_PATH, OpenApiCache, if_none_match
from .document import build_document

__all__ = ["build_document", "OpenApiCache", "if_none_match", "PATHS", "JSON_PATH",
           "YAML_PATH", "DISCOVERY_PATH"]
