# C types for stellagw/transport/connection.py when compiled (docs/hot-path.md).
cimport cython

from stellagw.ingress.http cimport Request, HttpProtocol
from stellagw._cext.metrics cimport Histogram, perf_counter
from stellagw._cext.frame cimport (FrameDecoder, FrameEncoder, corr_id,
                                   decode_response_block)
from stellagw.routing.table cimport Endpoint
from stellagw.transport.batch cimport WriteBatch

cdef Py_ssize_t _MAX_WINDOW
cdef bytes _JSON
cdef int _AWAIT_HELLO, _READY, _CLOSED, _B_OPEN
cdef int _REQUEST, _RESPONSE, _RESPONSE_STREAM_DATA, _REQUEST_STREAM_DATA, _FLAG_END_STREAM
cdef Py_ssize_t _STREAM_OVERHEAD
cdef Py_ssize_t _MAX_PING


@cython.final
cdef class TimerWheel:
    cdef object _loop, _time, _handle, _turn_cb
    cdef double _tick
    cdef public dict buckets
    cdef double _pos
    cdef double _last_slot
    cdef set _last_bucket
    @cython.locals(deadline=double, slot=double, buckets=dict, bucket=set)
    cpdef arm(self, Pending pending, double timeout, double now=*)


@cython.final
cdef class Pending:
    cdef public object corr, span, ws, path
    cdef public set bucket
    cdef public Request req
    cdef public ServiceConnection owner
    cdef public double deadline, timeout, sent_at
    cdef public bint streaming, body_open, body_end
    cdef public Py_ssize_t unacked, body_pos, window
    cdef public list inline, body
    cdef public object endpoint
    cdef public bint replayable
    cdef public int held
    cdef public Py_ssize_t held_size, held_spare


@cython.final
cdef class ServiceConnection:
    # -- read by other parts of the gateway (hub, routing, WebSocket bridge)
    cdef public object transport, instance, peer
    cdef public int state
    cdef public dict inflight
    cdef public Py_ssize_t peer_window
    cdef readonly Py_ssize_t max_chunk         # largest stream-data chunk a frame carries
    # -- per worker
    cdef object _hub, _routing, _metrics, _log, _loop
    cdef dict _frame_counts
    cdef Histogram _transport_hist
    # -- per connection
    cdef FrameDecoder _decoder
    cdef FrameEncoder _encoder
    cdef object _hello_timer, _scheme, _updates, _beats, _pings, _slicing
    cdef WriteBatch _writes
    cdef TimerWheel _wheel
    cdef bint _opened, _write_paused, _release_scheduled, _small_frames, _ping_paused
    cdef bint _ignore_paused, _drained
    cdef int _read_holds
    cdef Py_ssize_t _ignored_count
    cdef double _ignored_until
    cdef object _held
    cdef Py_ssize_t _held_threshold
    cdef Py_ssize_t _held_dead
    cdef int _failures
    cdef Py_ssize_t _frames, _frames_seen, _write_limit
    cdef long long _requests_sent, _responses_received
    cdef double _quiet_since, _paused_since, _ping_since
    cdef bytes _corr_prefix, _ping_sent
    cdef Pending _out                          # a streamed answer's pieces held in this read
    cdef list _out_chunks
    cdef unsigned long long _corr_next

    @cython.locals(pending=Pending)
    cdef _on_control(self, ftype, corr, payload)
    @cython.locals(pending=Pending, flags=int, status=int, conn=HttpProtocol)
    cdef _on_response(self, bytes corr, payload)
    @cython.locals(pending=Pending, flags=int)
    cdef _on_stream_data(self, bytes corr, payload)
    cdef _stream_to_client(self, Pending pending, chunk)
    @cython.locals(pending=Pending, chunks=list)
    cdef _flush_out(self)
    cdef _grant(self, Pending pending)
    @cython.locals(window=Py_ssize_t)
    cdef _credit(self, Pending pending, Py_ssize_t increment)
    @cython.locals(pending=Pending, req=Request, held_size=Py_ssize_t)
    cpdef send_request(self, Request req, Endpoint endpoint, double timeout, path,
                       Py_ssize_t stream_threshold, double sent_at)
    @cython.locals(req=Request)
    cdef _dispatch(self, Pending pending, Endpoint endpoint, double timeout, path,
                   Py_ssize_t stream_threshold, double sent_at)
    cdef _hold(self, Pending pending, Py_ssize_t size)
    @cython.locals(size=Py_ssize_t, rest=Py_ssize_t)
    cdef Py_ssize_t _held_room(self, Request req, Py_ssize_t stream_threshold) except -2
    cdef _refuse_held(self, Request req)
    @cython.locals(req=Request)
    cdef _send_elsewhere(self, Pending pending, bint draining)
    @cython.locals(pending=Pending, kind=int, req=Request)
    cpdef _release_held(self)
    @cython.locals(req=Request)
    cdef _send_head(self, Pending pending, path, int flags, body)
    cdef int _send_head_within(self, Pending pending, path, body, streamed) except -2
    @cython.locals(req=Request)
    cdef int _head_too_large(self, Pending pending, exc) except -2
    cdef bint _send_whole(self, Pending pending, path, body, bint streamed) except -1
    @cython.locals(req=Request, held=list, n=Py_ssize_t)
    cpdef bint request_body(self, Pending pending, chunk, bint end) except -1
    @cython.locals(queue=list, pos=Py_ssize_t, n=Py_ssize_t, end=Py_ssize_t, last=bint,
                   chunk_size=Py_ssize_t)
    cdef _send_body(self, Pending pending)
    cdef _rearm(self, Pending pending)
    cdef _timeout(self, Pending pending)
    cdef _failed(self, reason)
    cdef _client_gone(self, Pending pending, reason)
    cdef _cancel(self, Pending pending, reason)
    cdef _finish(self, Pending pending)
    cdef _fail(self, Pending pending, int status, message)
    cdef _lost(self, Pending pending, message)
    cdef _count_sent(self, int ftype, int n=*)
    cdef _schedule_flush(self)
    cdef _close_link(self, reason, detail, bint graceful)
    cdef _release_buffers(self)


@cython.locals(pending=Pending)
cdef Pending _new_pending(bytes corr, Request req, ServiceConnection owner, double sent_at,
                          Py_ssize_t window, double timeout)
cdef _disarm(Pending pending)
@cython.locals(size=Py_ssize_t)
cdef Py_ssize_t _held_size(Request req) except -1
cdef _reply_error(Request req, int status, message)
