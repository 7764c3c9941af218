"""The `htu` comparison of DPoP proofs (RFC 9449 §4.3 (9)): RFC 3986 normalisation."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ["normalize_uri"]

_URI = re.compile(r"[!-~]+")           # visible ASCII only: no spaces, controls or non-ASCII
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _percent(match: re.Match) -> str:
    char = chr(int(match[1], 16))
    # RFC 3986 §6.2.2.2: decode unreserved characters, uppercase the hex of the rest.
    return char if char in _UNRESERVED else "%" + match[1].upper()


def _remove_dot_segments(path: str) -> str:
    if "." not in path:
        return path
    segments = path.split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i, segment in enumerate(segments):
        if segment == "..":
            if len(out) > 1:
                out.pop()
            if i == last:
                out.append("")
        elif segment == ".":
            if i == last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out)


def normalize_uri(uri: str) -> str | None:
    """RFC 3986 syntax- and scheme-based normalisation, without query and fragment.

    Lowercase scheme and host, default port dropped, percent-encoding normalised, dot
    segments removed, empty path → "/"; the path's case is kept. None when it is not an
    absolute http(s) URI (or carries userinfo). Whitespace and controls are refused up
    front because `urlsplit` silently deletes tabs and newlines.
    """
    if not _URI.fullmatch(uri):
        return None
    try:
        parts = urlsplit(uri)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host or "@" in parts.netloc:
        return None
    if ":" in host:
        host = f"[{host}]"
    default = 443 if scheme == "https" else 80
    port_text = f":{port}" if port is not None and port != default else ""
    path = _remove_dot_segments(_PERCENT.sub(_percent, parts.path)) or "/"
    return f"{scheme}://{host}{port_text}{path}"
