"""WebSocket passthrough, client side: the connection handed from our HTTP protocol to picows.

The upgrade request goes through the whole pipeline like any request (authenticated with
its DPoP proof, authorized, rate-limited) and reaches the service as a REQUEST that keeps
its stream open. When the service answers 101, the client connection is handed to a
picows server protocol, which does the RFC 6455 handshake (Sec-WebSocket-Accept) and
framing; the gateway never writes a WebSocket implementation of its own. The messages
then travel over the service link: stellagw/transport/websocket.py (WsBridge, the picows
listener given here).
"""
from __future__ import annotations

import logging

from picows.picows import WSAutoPingStrategy, WSProtocol

MAX_MESSAGE_FRAME = 1024 * 1024   # picows refuses larger client frames (1009 Message Too Big)
_LOG = logging.getLogger("stellagw.websocket")


def raw_upgrade_request(req) -> bytes:
    """The request head as the client sent it, for picows to validate and answer."""
    target = req.target + (b"?" + req.query if req.query else b"")
    lines = [b"GET " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in req.headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def hand_over(http_protocol, req, bridge, tail: bytes) -> None:
    """Switch the client transport from our HTTP protocol to a picows server protocol."""
    transport = http_protocol.transport
    proto = WSProtocol(
        None, None, False,                  # host_port, ws_path, is_client_side
        lambda upgrade_request: bridge,     # picows answers 101 for the listener we give it
        _LOG, True, 10.0,                   # logger, disconnect_on_exception, handshake timeout
        False, 20.0, 20.0, WSAutoPingStrategy.PING_WHEN_IDLE,   # no pings from us
        False,                              # pings: WsBridge answers them (they count
                                            # as activity, streamIdleTimeout)
        MAX_MESSAGE_FRAME, None, 16 * 1024)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    data = raw_upgrade_request(req) + tail
    while data:
        buf = proto.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        proto.buffer_updated(n)
        data = data[n:]
    transport.resume_reading()
