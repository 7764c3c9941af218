"""HTTP/1.1 wire pieces of the client edge: the response head and the checks of the fields
the gateway judges itself (Host, Transfer-Encoding).

Compiled (cext/httpwire.pyx) with a pure-Python twin (stellagw/_py/httpwire.py);
STELLAGW_NO_EXTENSIONS=1 forces the twin. The rules are docs/http-edge.md's.
"""
from .. import _impl

if _impl.NO_EXTENSIONS:
    from .._py import httpwire as _m
else:
    try:
        from .._cext import httpwire as _m
    except ImportError as exc:
        _impl.fell_back("httpwire", exc)
        from .._py import httpwire as _m

render_response = _m.render_response
host_ok = _m.host_ok
transfer_coding = _m.transfer_coding
split_target = _m.split_target
cid_taken = _m.cid_taken
cid_made = _m.cid_made
method_name = _m.method_name
header_name = _m.header_name
COMMON_HEADER_NAMES = _m.COMMON_HEADER_NAMES
TE_NONE, TE_CHUNKED, TE_OTHER, TE_BAD = _m.TE_NONE, _m.TE_CHUNKED, _m.TE_OTHER, _m.TE_BAD

__all__ = ["render_response", "host_ok", "transfer_coding", "split_target", "cid_taken",
           "cid_made", "method_name", "header_name", "COMMON_HEADER_NAMES", "TE_NONE",
           "TE_CHUNKED", "TE_OTHER", "TE_BAD"]
