"""gzip at the gateway (gateway.compression; docs/http-edge.md "Compression").

Plain (not streamed) answers of a compressible type, at least `minSize` bytes and at most
MAX_SIZE, are gzipped when the client accepts gzip and the service did not encode them
itself; the OpenAPI documents always are (stellagw/health/builtins.py). The ETag of a gzipped
representation is made weak, so If-None-Match (a weak comparison) still matches it while
no cache takes it for the identity bytes. Only zlib from the standard library: brotli would
need a compiled package for a few percent more.
"""
from __future__ import annotations

import zlib


# The most codings accept_gzip reads, over every Accept-Encoding line (browsers send 3 to 5):
# past them the answer goes uncompressed, which is always acceptable (identity). Reading
# each of 7,500 `a,` (16 KB) cost 2 ms a request, and the answer's, 30 times a request's
# own cost (an adversarial probe).
MAX_CODINGS = 32


def accepts_gzip(headers) -> bool:
    """Accept-Encoding (every line) allows gzip (RFC 9110 §12.5.3): named or `*`, q > 0,
    among its first MAX_CODINGS codings."""
    star = None
    left = MAX_CODINGS
    for name, value in headers:
        if name != b"accept-encoding":
            continue
        for item in value.split(b",", left):
            left -= 1
            if left < 0:
                return bool(star)    # the rest of the list, unsplit: not read
            coding, _, params = item.partition(b";")
            coding = coding.strip(b" \t").lower()
            if coding not in (b"gzip", b"x-gzip", b"*"):
                continue
            q = 1.0
            for param in params.split(b";", MAX_CODINGS):     # the same bound on parameters
                key, _, v = param.strip(b" \t").partition(b"=")
                if key.lower() == b"q":
                    try:
                        q = float(v)
                    except ValueError:
                        q = 0.0
            if coding in (b"gzip", b"x-gzip"):
                return q > 0
            if coding == b"*":
                star = q > 0
    return bool(star)


def gzip_bytes(body: bytes, level: int) -> bytes:
    compressor = zlib.compressobj(level, zlib.DEFLATED, 31)   # 31: a gzip wrapper
    return compressor.compress(body) + compressor.flush()


def gzipped(headers: bytes, body: bytes, level: int) -> tuple[bytes, bytes]:
    """The header block and body of the gzip representation of (headers, body)."""
    lines = []
    for line in headers.split(b"\r\n"):
        if line[:6].lower() == b"etag: " and not line[6:8] == b"W/":
            line = b"etag: W/" + line[6:]
        if line:
            lines.append(line)
    lines.append(b"content-encoding: gzip")
    lines.append(b"vary: accept-encoding")
    return b"\r\n".join(lines) + b"\r\n", gzip_bytes(body, level)


# The largest answer gzipped: the SDK's largest plain answer (larger ones it streams, and
# streamed answers are not compressed). A plain answer may be up to maxFrameSize (16 MB),
# and gzip runs on the loop: 16 MB took 250 ms at level 5, 1.1 s at level 9, every
# client of the worker waiting, for each request that asked for it (an adversarial probe).
MAX_SIZE = 1024 * 1024


class Compression:
    """gateway.compression for service answers (and the other built-ins)."""

    __slots__ = ("min_size", "max_size", "level", "exact", "prefixes")

    def __init__(self, settings):
        self.min_size = settings.min_size
        self.max_size = MAX_SIZE
        self.level = settings.level
        types = [t.lower().encode("latin-1") for t in settings.types]
        self.exact = frozenset(t for t in types if not t.endswith(b"/"))
        self.prefixes = tuple(t for t in types if t.endswith(b"/"))

    def applies(self, headers: bytes) -> bool:
        """The answer's own header block has a listed type and no content-encoding. Fields
        are matched at the start of a line: found anywhere, `x-content-type: text/html` or
        a value holding `content-encoding:` chose whether a service's answer was gzipped."""
        low = b"\r\n" + headers.lower()
        if b"\r\ncontent-encoding:" in low:
            return False
        at = low.find(b"\r\ncontent-type:")
        if at < 0:
            return False
        end = low.find(b"\r\n", at + 2)
        ctype = low[at + 15:end if end >= 0 else len(low)].split(b";")[0].strip()
        return ctype in self.exact or ctype.startswith(self.prefixes)
