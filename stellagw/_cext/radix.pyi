"""Type stubs for stellagw._cext.radix (cext/radix.pyx); the twin is stellagw._py.radix."""
from typing import Final

__all__ = ["FOUND", "NOT_FOUND", "METHOD_NOT_ALLOWED", "MAX_SEGMENTS", "RouteError", "Router",
           "normalize_path"]

FOUND: Final[int]               # 0
NOT_FOUND: Final[int]           # 1
METHOD_NOT_ALLOWED: Final[int]  # 2
MAX_SEGMENTS: Final[int]        # 64: deepest template add() accepts

class RouteError(ValueError):
    """A bad template or a conflicting route; the message names the template."""

def normalize_path(raw: bytes | str) -> str | None:
    """The normalised, percent-decoded path used for matching, or None (answer 400)."""

class Router:
    def __init__(self) -> None: ...
    def add(self, method: str, template: str, endpoint: object) -> None: ...
    def remove(self, method: str, template: str) -> object:
        """Take (method, template) out; returns its endpoint, or None when absent."""
    def match(self, method: str, path: str) -> (
        tuple[int, object, dict[str, str] | None]       # (FOUND, endpoint, params)
        | tuple[int, None, None]                         # (NOT_FOUND, None, None)
        | tuple[int, tuple[str, ...], None]              # (METHOD_NOT_ALLOWED, allow, None)
    ): ...
    def __len__(self) -> int: ...
    def routes(self) -> list[tuple[str, str, object]]: ...
