"""Type stubs for stellagw._cext.ingress (cext/ingress.pyx); the twin is stellagw._py.ingress."""
from typing import Any, Callable, Final

PIPELINE_MAX: Final[int]
D_NONE: Final[int]
D_HEADER: Final[int]
D_BODY: Final[int]
D_IDLE: Final[int]

class Request:
    conn: HttpProtocol
    method: str
    target: bytes
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: str
    keep_alive: bool
    correlation_id: str
    started: float
    reject: tuple[int, str] | None
    service: str
    route: str
    tenant: str | None
    state: Any
    pending: Any
    identity: Any
    resp_headers: bytes
    span: Any
    websocket: bool
    auth: str | None
    version: bytes | None
    def header(self, name: bytes) -> bytes | None: ...

class HttpProtocol:
    transport: Any
    peer_cert: bytes | None
    peername: Any
    peer_ip: bytes
    anonymous_key: str
    deadline: float
    deadline_kind: int
    def __init__(self, server: Any) -> None: ...
    def respond(self, req: Request, status: int, headers: bytes, body: bytes,
                close: bool = False) -> None: ...
    def start_stream(self, req: Request, status: int, headers: bytes,
                     on_writable: Callable[[], None]) -> bool: ...
    def stream_chunk(self, req: Request, data: bytes) -> bool: ...
    def end_stream(self, req: Request) -> None: ...
    def abort_stream(self, req: Request) -> None: ...
    def upgrade_to_websocket(self, req: Request, bridge: Any) -> bool: ...
    def check_deadline(self, now: float) -> None: ...
    def close(self) -> None: ...
    def is_idle(self) -> bool: ...
