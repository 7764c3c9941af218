"""Type stubs for stellagw._cext.frame (cext/frame.pyx); the twin is stellagw._py.frame.

Wire format, limits and error rules: docs/protocol.md.
"""
from collections.abc import Callable, Iterable, Sequence
from typing_extensions import Buffer
from typing import Final, TypeAlias

__all__ = [
    "HEADER_SIZE", "MIN_LENGTH", "DEFAULT_MAX_FRAME_SIZE", "PROTOCOL_VERSION", "MAX_HEADERS",
    "MAX_METHOD_LENGTH", "ZERO_COPY_MIN", "ZERO_CORR",
    "HELLO", "HEARTBEAT", "ENDPOINTS_UPDATE", "REQUEST", "REQUEST_STREAM_DATA", "RESPONSE",
    "RESPONSE_STREAM_DATA", "CANCEL", "HELLO_ACK", "DRAIN", "PING", "PONG", "WINDOW_UPDATE",
    "FLAG_END_STREAM", "FLAG_MORE", "STREAM_KIND_MASK", "KIND_DATA", "KIND_TEXT",
    "KIND_BINARY", "KIND_CLOSE", "KIND_PING", "KIND_PONG", "MAX_WINDOW_INCREMENT",
    "HEADER_KEEP", "HEADER_DROP", "HEADER_CONNECTION", "HEADER_HOST", "HEADER_TE",
    "HEADER_TRACE",
    "FrameError", "FrameTooLarge", "FrameDecoder", "FrameEncoder",
    "decode_request", "decode_response", "decode_response_block", "decode_stream_data",
    "decode_control", "decode_window_update",
]

HEADER_SIZE: Final[int]             # 21: u32 length + u8 type + 16-byte correlation id
MIN_LENGTH: Final[int]              # 17: smallest legal length field
DEFAULT_MAX_FRAME_SIZE: Final[int]  # 16 MiB, a limit on the length field (17 + payload)
PROTOCOL_VERSION: Final[int]        # 1
MAX_HEADERS: Final[int]             # 256
MAX_METHOD_LENGTH: Final[int]       # 16
ZERO_COPY_MIN: Final[int]           # 1024: payloads this long may be memoryviews
ZERO_CORR: Final[bytes]             # 16 zero bytes: connection-level frames

HELLO: Final[int]                   # 1  service -> gateway, JSON
HEARTBEAT: Final[int]               # 2  service -> gateway, JSON
ENDPOINTS_UPDATE: Final[int]        # 3  service -> gateway, JSON
REQUEST: Final[int]                 # 4  gateway -> service, binary
REQUEST_STREAM_DATA: Final[int]     # 5  gateway -> service, flags + chunk
RESPONSE: Final[int]                # 6  service -> gateway, binary
RESPONSE_STREAM_DATA: Final[int]    # 7  service -> gateway, flags + chunk
CANCEL: Final[int]                  # 8  either way, JSON (optional)
HELLO_ACK: Final[int]               # 9  gateway -> service, JSON
DRAIN: Final[int]                   # 10 either way, JSON (optional)
PING: Final[int]                    # 11 either way, opaque <= 64 bytes
PONG: Final[int]                    # 12 either way, echoes the PING's id and payload
WINDOW_UPDATE: Final[int]           # 13 either way, u32 credit for one stream

FLAG_END_STREAM: Final[int]         # 0x01
FLAG_MORE: Final[int]               # 0x10 STREAM_DATA: WebSocket message continues
STREAM_KIND_MASK: Final[int]        # 0x0E
KIND_DATA: Final[int]               # 0x00 HTTP body bytes / WebSocket continuation
KIND_TEXT: Final[int]               # 0x02
KIND_BINARY: Final[int]             # 0x04
KIND_CLOSE: Final[int]              # 0x06 (must carry FLAG_END_STREAM)
KIND_PING: Final[int]               # 0x08
KIND_PONG: Final[int]               # 0x0A
MAX_WINDOW_INCREMENT: Final[int]    # 2**31 - 1

# FrameEncoder.request_forward: what a client header's kind (its classification) does
HEADER_KEEP: Final[int]             # 0 forwarded
HEADER_DROP: Final[int]             # 1 never forwarded
HEADER_CONNECTION: Final[int]       # 2 dropped, and so is every header its value names
HEADER_HOST: Final[int]             # 3 forwarded, and its value becomes x-forwarded-host
HEADER_TE: Final[int]               # 4 dropped; "trailers" is forwarded again on HTTP/1.1
HEADER_TRACE: Final[int]            # 5 forwarded unless keep_trace is false

Payload: TypeAlias = bytes | memoryview
Header: TypeAlias = tuple[bytes, bytes]

class FrameError(ValueError):
    """Malformed frame or frame field; the message names the field or limit."""

class FrameTooLarge(FrameError):
    """A frame longer than max_frame_size (FrameDecoder.next, and every FrameEncoder method)."""
    length: int     # the length field; from an encoder, the length reached when it stopped
    limit: int      # the max_frame_size
    def __init__(self, message: str, length: int, limit: int) -> None: ...

class FrameDecoder:
    def __init__(self, max_frame_size: int = ...) -> None: ...
    def feed(self, data: Buffer) -> None: ...
    def next(self) -> tuple[int, bytes, Payload] | None:
        """(ftype, corr, payload) or None. payload: use before the next feed(), or copy."""
    def at_frame_boundary(self) -> bool: ...

def decode_request(payload: Buffer) -> tuple[int, int, str, str, bytes, list[Header], bytes]:
    """(flags, timeout_ms, method, path, query, headers, body)"""
def decode_response(payload: Buffer) -> tuple[int, int, list[Header], bytes]:
    """(flags, status, headers, body)"""
def decode_response_block(payload: Buffer,
                          drop: tuple[bytes, ...]) -> tuple[int, int, bytes, bytes]:
    """(flags, status, b"name: value\\r\\n" lines of the headers not named in drop, body);
    with b"connection" in drop, also without the fields a connection field names"""
def decode_stream_data(payload: Buffer) -> tuple[int, bytes]:
    """(flags, chunk)"""
def decode_control(payload: Buffer) -> dict[str, object]: ...
def decode_window_update(payload: Buffer) -> int: ...

class FrameEncoder:
    def __init__(self, max_frame_size: int = ...) -> None: ...
    def set_max_frame_size(self, max_frame_size: int) -> None: ...
    def request(self, corr: Buffer, method: str, path: str, query: Buffer | str,
                headers: Iterable[tuple[Buffer | str, Buffer | str]], timeout_ms: int,
                flags: int, body: Buffer) -> None: ...
    def request_forward(self, corr: Buffer, method: str, path: str, query: Buffer | str,
                        headers: Sequence[Header], timeout_ms: int, flags: int, body: Buffer,
                        classes: dict[bytes, int], classify: Callable[[bytes], int],
                        http11: bool, keep_trace: bool,
                        identity: Iterable[tuple[Buffer | str, Buffer | str]],
                        peer_ip: Buffer | str, scheme: Buffer | str,
                        correlation_id: str) -> None:
        """request() with the client's headers filtered and the gateway's appended, as
        stellagw.transport.headers.request_headers() states (classes: name -> HEADER_*)."""
    def response(self, corr: Buffer, status: int,
                 headers: Iterable[tuple[Buffer | str, Buffer | str]], flags: int,
                 body: Buffer) -> None: ...
    def stream_data(self, ftype: int, corr: Buffer, flags: int, chunk: Buffer) -> None: ...
    def control(self, ftype: int, corr: Buffer, obj: dict[str, object] | None) -> None: ...
    def window_update(self, corr: Buffer, increment: int) -> None: ...
    def raw(self, ftype: int, corr: Buffer, payload: Buffer) -> None: ...
    def __len__(self) -> int: ...
    def take(self) -> bytes: ...
