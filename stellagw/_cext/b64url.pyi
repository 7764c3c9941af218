"""Type stubs for stellagw._cext.b64url (cext/b64url.pyx); the twin is stellagw._py.b64url."""

__all__ = ["decode", "encode", "split", "json_object"]

def decode(part: bytes) -> bytes | None:
    """Strict base64url (URL-safe alphabet, no padding, non-empty) → bytes, or None."""

def encode(data: bytes) -> str:
    """base64url without padding, as str."""

def split(token: bytes) -> tuple[bytes, bytes, bytes] | None:
    """The three non-empty parts of a compact JWS, or None."""

def json_object(part: bytes) -> dict | None:
    """A base64url part holding a JSON object → the dict, or None."""
