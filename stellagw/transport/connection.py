"""One microservice connection, gateway side (docs/protocol.md).

Every routed request is sent and answered through ServiceConnection, so it is compiled
(cext/connection.pyx → stellagw._cext.connection) with a pure-Python twin of the same
behaviour (stellagw._py.connection, the one to read first); `select` picks one
(STELLAGW_NO_EXTENSIONS=1 forces the twin).
"""
from __future__ import annotations

from .._impl import select

_m = select("connection")

ServiceConnection = _m.ServiceConnection
Pending = _m.Pending
INITIAL_WINDOW = _m.INITIAL_WINDOW
HELLO_TIMEOUT = _m.HELLO_TIMEOUT
AWAIT_HELLO, READY, CLOSED = _m.AWAIT_HELLO, _m.READY, _m.CLOSED

__all__ = ["ServiceConnection", "Pending", "INITIAL_WINDOW", "HELLO_TIMEOUT",
           "AWAIT_HELLO", "READY", "CLOSED"]
