"""WebSocket passthrough, service side: one WebSocket's messages as one stream on a service link.

The client's connection is picows' once the service accepted the upgrade
(stellagw/ingress/websocket.py hands it over); WsBridge is the picows listener it is given.
Both directions travel as stream-data frames whose flags keep the message kind and
fragmentation (docs/protocol.md §3.3): client → service as REQUEST_STREAM_DATA under the
service's flow-control window (the client socket is paused while the window is spent);
service → client as RESPONSE_STREAM_DATA, whose credit goes back only while the client's
socket keeps up. Close codes travel both ways; pings are answered by picows at the gateway;
a CANCEL goes to the service when the client goes away, and a service that dies closes the
client with 1011.

Message frames reach picows through send_reuse_external_bytearray, never WSTransport.send:
see _send_frame.
"""
from __future__ import annotations

import asyncio
import codecs

from picows import WSCloseCode, WSListener, WSMsgType

from ..ingress.websocket import MAX_MESSAGE_FRAME
from ..listeners import reset
from . import frame as fr

_KIND_OF = {WSMsgType.TEXT: fr.KIND_TEXT, WSMsgType.BINARY: fr.KIND_BINARY,
            WSMsgType.CONTINUATION: fr.KIND_DATA}
_TYPE_OF = {fr.KIND_TEXT: WSMsgType.TEXT, fr.KIND_BINARY: WSMsgType.BINARY,
            fr.KIND_DATA: WSMsgType.CONTINUATION}
_HEADROOM = 14      # room for the largest frame header; picows requires msg_offset >= 14
_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def _sendable(code: int) -> bool:
    """A close code an endpoint may put on the wire (RFC 6455 §7.4): 1000-4999 but the
    reserved 1004 and the never-sent 1005, 1006 and 1015."""
    return 1000 <= code <= 4999 and code not in (1004, 1005, 1006, 1015)


def _send_frame(ws, msg_type, chunk, fin):
    """One message frame to the client, its bytes copied before anything can reuse them.

    Not ws.send(): on the server side, for a payload over 8192 bytes, picows (since 1.17;
    2.3.1 here) hands the transport `writelines([header, payload])` where `header` is a
    memoryview of its own write buffer, which it reuses for every frame. A uvloop transport
    that cannot write at once (the client reads slower than the service sends) keeps that
    view, not a copy, and the next send() writes its header over it: the queued frame goes
    out with a later frame's header. Seen as a 5 MB message cut short at a fragment
    boundary, its last fragment starting with the stale length bytes 00 00 00 01 00 00,
    and the rest parsed as garbage frames (tests/transport/test_websocket_bridge.py).
    send_reuse_external_bytearray writes the header into the headroom of a buffer of our
    own, used once, and hands the socket one piece, copied into a new bytes object for
    whatever the socket does not take at once. It costs one copy of the chunk here (about
    1 µs per 64 KiB fragment). Used for every size, not only above 8192 bytes: where picows
    switches paths is its own detail and may move.
    """
    buf = bytearray(_HEADROOM)
    buf += chunk
    ws.send_reuse_external_bytearray(msg_type, buf, _HEADROOM, fin)


class WsBridge(WSListener):
    """One WebSocket: the client side (picows) ⇄ one stream on a service connection."""

    def __init__(self, conn, pending):
        self.conn = conn            # the ServiceConnection
        self.pending = pending      # its Pending (corr, window for our sends)
        self.ws = None
        self.client_paused = False
        self.reading_paused = False
        self.closed = False
        self._held: list[tuple[int, bytes]] = []   # client frames waiting for service credit
        self.on_closed = None       # the worker's count of open WebSockets, told once
        self.on_cut = None          # told the reason when a client is cut (send_timeout, send_rate)
        self.send_deadline = None   # its SendDeadline (the ingress gives it), armed at the close
        self.budget = None          # the worker: responseBufferBudget while paused for writing
        self._sending = False
        self.disconnected = False   # picows' connection is gone
        # The client's message under way: None between messages, else its kind, and for
        # TEXT the UTF-8 decoder that checks it across its fragments (RFC 6455 §5.4, §8.1).
        self._message = None
        self._utf8 = None
        self._pong = None           # the payload of the last PING not yet answered

    # ---------------------------------------------------------------- client → service

    def on_ws_connected(self, transport):
        self.ws = transport

    def on_ws_frame(self, transport, frame):
        msg_type = frame.msg_type
        if msg_type == WSMsgType.CLOSE:
            code = frame.get_close_code()
            reason = (frame.get_close_message() or b"")[:123]
            code = int(code) if code is not None else 0
            if not _sendable(code):
                code, reason = None, b""   # no code, or one that must not be sent
            self._to_service(fr.KIND_CLOSE | fr.FLAG_END_STREAM,
                             fr.ws_close_payload(code, reason.decode("utf-8", "replace")))
            if self._held:
                # No window left for the CLOSE (a service that is not reading): the client is
                # gone all the same. What waited for credit is dropped and the service gets
                # CANCEL, instead of the request and these bytes being held until it reads.
                self._held.clear()
                self.conn.ws_client_gone(self.pending)
            # Echo the close (RFC 6455 §5.5.1) and end the connection.
            transport.send_close(WSCloseCode(code) if code else WSCloseCode.OK)
            self._disconnect()
            self.closed = True
            return
        kind = _KIND_OF.get(msg_type)
        if kind is not None and not self._client_frame_ok(transport, frame, kind):
            return
        if kind is None:
            # PING/PONG, answered here and not passed on: the client's keep-alive keeps the
            # WebSocket from going idle (streamIdleTimeout), which picows' own answering
            # would hide from us.
            if msg_type == WSMsgType.PING:
                # One PONG, for the last PING, once this read's frames are done (RFC 6455
                # §5.5.3 allows it): a PONG for each was a send syscall each, 10,000 of them
                # for one 60 KB write of empty PINGs.
                if self._pong is None:
                    asyncio.get_running_loop().call_soon(self._send_pong)
                self._pong = frame.get_payload_as_bytes()
                return
            self.conn.ws_client_active(self.pending)
            return
        if kind == fr.KIND_DATA and not frame.fin and not frame.payload_size:
            # An empty continuation that does not end its message says nothing (from_service
            # skips it the other way; RFC 6455 §5.4 lets an intermediary refragment). Relayed,
            # each was a frame on the service's link that no window counts: 10,000 of them
            # from one 60 KB client write, and as many frames for the service to decode.
            self.conn.ws_client_active(self.pending)
            return
        flags = kind | (0 if frame.fin else fr.FLAG_MORE)
        self._to_service(flags, frame.get_payload_as_bytes())

    def _send_pong(self):
        payload, self._pong = self._pong, None
        if self.ws is not None and not self.closed and not self.disconnected:
            self.ws.send_pong(payload)
            self.conn.ws_client_active(self.pending)

    def _client_frame_ok(self, transport, frame, kind):
        """RFC 6455's rules for a client's message frame, checked before any of it goes to
        the service (each was relayed once, found by an adversarial probe): no RSV bit (no
        extension is agreed), a frame within the cap even when picows delivers it whole
        with its 1009, a continuation only inside a message and a new message only outside
        one, and TEXT that is UTF-8. Else the connection is failed (§7.1.7)."""
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            return self._fail(transport, WSCloseCode.PROTOCOL_ERROR, "RSV bit set")
        if frame.payload_size > MAX_MESSAGE_FRAME:
            return self._fail(transport, WSCloseCode.MESSAGE_TOO_BIG, "frame too large")
        if kind == fr.KIND_DATA:
            if self._message is None:
                return self._fail(transport, WSCloseCode.PROTOCOL_ERROR,
                                  "continuation outside a message")
        elif self._message is not None:
            return self._fail(transport, WSCloseCode.PROTOCOL_ERROR,
                              "new message inside a fragmented one")
        else:
            self._message = kind
            if kind == fr.KIND_TEXT:
                self._utf8 = _utf8_decoder()
        if self._utf8 is not None:
            try:
                self._utf8.decode(frame.get_payload_as_memoryview(), frame.fin)
            except UnicodeDecodeError:
                return self._fail(transport, WSCloseCode.INVALID_TEXT, "TEXT is not UTF-8")
        if frame.fin:
            self._message = self._utf8 = None
        return True

    def _fail(self, transport, code, reason):
        # The service hears the same close code; the client gets it and the connection ends.
        self._to_service(fr.KIND_CLOSE | fr.FLAG_END_STREAM, fr.ws_close_payload(int(code), reason))
        if self._held:
            self._held.clear()
            self.conn.ws_client_gone(self.pending)
        transport.send_close(code, reason.encode())
        self._disconnect()
        self.closed = True
        return False

    def _to_service(self, flags, chunk):
        pending = self.pending
        if self.conn.inflight.get(pending.corr) is not pending:
            return
        self._held.append((flags, chunk))
        self._send_held()
        if self._held and not self.reading_paused and self.ws is not None:
            # Out of credit: hold the rest and stop reading the client until the service
            # grants more (WINDOW_UPDATE) — backpressure instead of buffering.
            self.reading_paused = True
            self._reading()

    def on_credit(self):
        """The service granted more window."""
        self._send_held()
        if not self._held and self.reading_paused and self.ws is not None:
            self.reading_paused = False
            self._reading()

    def _reading(self):
        # The client is read while the service has credit for it and the client reads what
        # we write: picows answers each PING with a PONG, and a client sending pings but
        # reading nothing had us hold every PONG (20 MB of pings, 20 MB held).
        transport = self.ws.underlying_transport
        if self.reading_paused or self.client_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _send_held(self):
        """The held client frames, in order, as far as the window goes. A message frame larger
        than what is left of the window goes in pieces (MORE on all but the frame's last, the
        rest as DATA, protocol.md §3.3): a client frame may be up to MAX_MESSAGE_FRAME (1 MiB)
        and the service's whole window smaller (256 KiB by default), and the service grants
        only what it received, so a frame held until it fits stalled its WebSocket for ever.
        A CLOSE is never split: it waits for room. No piece is longer than a frame to the
        service carries (conn.max_chunk: its HELLO's max_frame_size, protocol.md §1); a
        CLOSE (at most 125 bytes) always fits."""
        pending = self.pending
        held = self._held
        max_chunk = self.conn.max_chunk
        while held:
            if self.conn.hold_for_link(pending):
                return      # the service has not read what it was sent: on_credit() later
            flags, chunk = held[0]
            size = len(chunk)
            room = min(pending.window, max_chunk)
            if size > room:
                kind = flags & fr.STREAM_KIND_MASK
                if room <= 0 or kind == fr.KIND_CLOSE:
                    return
                size = room
                view = memoryview(chunk)
                held[0] = (fr.KIND_DATA | (flags & fr.FLAG_MORE), view[size:])
                flags, chunk = kind | fr.FLAG_MORE, view[:size]
            else:
                del held[0]
            pending.window -= size
            self.conn.send_stream_chunk(pending, flags, chunk)

    def on_ws_disconnected(self, transport):
        self.disconnected = True
        if self.budget is not None:
            self.budget.client_caught_up(self)
        on_closed, self.on_closed = self.on_closed, None
        if on_closed is not None:
            on_closed()
        if not self.closed:
            self.closed = True
            self.conn.ws_client_gone(self.pending)

    def pause_writing(self):
        self.client_paused = True
        if self.ws is not None:
            self._reading()
            self._watch_send()
            if self.budget is not None:
                self.budget.client_backlogged(self)     # which may cut it at once

    def resume_writing(self):
        self.client_paused = False
        if self.budget is not None:
            self.budget.client_caught_up(self)
        if self.ws is not None:
            self._reading()
        self.conn.ws_client_writable(self.pending)

    # ---------------------------------------------------------------- service → client

    def from_service(self, flags, chunk) -> bool:
        """One RESPONSE_STREAM_DATA frame. Returns False when the stream is over."""
        ws = self.ws
        if ws is None or self.closed:
            return False
        kind = flags & fr.STREAM_KIND_MASK
        if kind == fr.KIND_CLOSE:
            code, reason = fr.parse_ws_close(chunk)
            if code and not _sendable(code):
                # A code no endpoint may send: the service's error, said so.
                code, reason = int(WSCloseCode.INTERNAL_ERROR), ""
            ws.send_close(WSCloseCode(code) if code else WSCloseCode.OK,
                          reason.encode()[:123] if reason else None)
            self._disconnect()
            self.closed = True
            return False
        msg_type = _TYPE_OF.get(kind)
        # An empty DATA frame is skipped only where it says nothing: with MORE, or ending the
        # stream (the close follows). Alone it ends a fragmented message, which the client
        # must see, or that message never completes.
        if msg_type is not None and (chunk or kind != fr.KIND_DATA
                                     or not flags & (fr.FLAG_MORE | fr.FLAG_END_STREAM)):
            _send_frame(ws, msg_type, chunk, not flags & fr.FLAG_MORE)
            if self.client_paused and self.budget is not None:
                # What the service's window still lets in while the client takes nothing.
                self.budget.client_backlogged(self)
        if flags & fr.FLAG_END_STREAM:
            ws.send_close(WSCloseCode.OK)
            self._disconnect()
            self.closed = True
            return False
        return True

    def abort(self, code=WSCloseCode.INTERNAL_ERROR, reason=b"service unavailable"):
        """The service is gone: 1011 to the client (RFC 6455 §7.4.1)."""
        if self.ws is not None and not self.closed:
            self.closed = True
            self.ws.send_close(code, reason)
            self._disconnect()

    def _disconnect(self):
        """Close the client's connection once it has what it is owed (the close frame, the
        last messages), but not for ever: one that takes nothing of it for sendTimeout is
        cut, as an HTTP client is (listeners.SendDeadline, docs/http-edge.md)."""
        self.ws.disconnect()
        self._watch_send()

    def _watch_send(self):
        # Armed at the close and whenever the client stops taking what it is sent (paused
        # for writing): an open WebSocket whose client read nothing, or a few bytes now and
        # then, held its connection, its buffers and the service's handler until
        # streamIdleTimeout (5 minutes) — or for ever, reading just enough to keep messages
        # moving — where an HTTP client is cut after sendTimeout.
        if self.send_deadline is not None and not self._sending:
            self._sending = True
            self._check_send()

    def _check_send(self):
        if self.disconnected:
            self._sending = False
            return
        transport = self.ws.underlying_transport
        loop = asyncio.get_running_loop()
        reason = self.send_deadline.expired(transport, loop.time())
        if reason is not None:
            self._sending = False
            if self.on_cut is not None:
                self.on_cut(reason)
            reset(transport)
        elif self.send_deadline.since:          # still owed: look again in a second
            loop.call_later(1.0, self._check_send)
        else:
            self._sending = False               # all taken: armed again by the next pause

    def buffered(self):
        """Bytes written to the client and not yet handed to its socket."""
        if self.ws is None or self.disconnected:
            return 0
        return self.ws.underlying_transport.get_write_buffer_size()

    def cut(self, reason):
        """Reset the client's connection (RST), counted by `reason`."""
        if self.ws is None or self.disconnected:
            return
        if self.on_cut is not None:
            self.on_cut(reason)
        reset(self.ws.underlying_transport)

    def going_away(self, reason=b"gateway shutting down"):
        """The gateway stops (the drain's deadline), or the service after its DRAIN: 1001,
        going away (RFC 6455 §7.4.1)."""
        self.abort(WSCloseCode.GOING_AWAY, reason)

    def idle_close(self):
        """No message either way for streamIdleTimeout: 1001, going away (RFC 6455 §7.4.1)."""
        self.abort(WSCloseCode.GOING_AWAY, b"idle")
