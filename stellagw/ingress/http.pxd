# C types for stellagw/ingress/http.py when compiled (docs/hot-path.md): the classes become
# extension types whose fields are struct members, internal steps are C calls, and the
# stages that cimport this file (pipeline, transport connection) read a request's fields
# directly. The .py stays the one source and runs as plain Python too.
cimport cython

from stellagw._cext.metrics cimport Histogram, perf_counter
from stellagw._cext.httpwire cimport (cid_made, cid_taken, header_name, host_ok,
                                      method_name, render_response, split_target)

cdef int _PIPELINE_MAX
cdef int _D_NONE, _D_HEADER, _D_BODY, _D_IDLE, _D_LINGER
cdef int _P_PIPELINE, _P_HOLD, _P_FLOW, _P_STOP
cdef int _B_NONE, _B_OPEN
cdef Py_ssize_t _LINGER_BYTES
cdef bytes _JSON_CT, _CLOSE, _KEEP_ALIVE, _CONTINUE
cdef dict _STATUS_LINES
cdef bint _eq(str a, str b)
cdef Py_ssize_t _MAX_CELLS


@cython.final
cdef class EdgeState:
    cdef public double now
    cdef public bytes date_header
    cdef public bint draining


@cython.final
cdef class _Count:
    cdef readonly tuple key
    cdef public long long n


@cython.final
cdef class _Cell:
    cdef readonly str service
    cdef readonly dict durations
    cdef readonly Histogram hist
    cdef readonly dict counts


@cython.final
cdef class Accounting:
    cdef public str cid_prefix
    cdef public unsigned long long cid_counter
    cdef object _worker, _metrics, _log
    cdef dict _cells
    cdef list _unfolded
    cdef object _last_route, _last_method
    cdef int _last_status
    cdef _Cell _last_cell
    cdef _Count _last_count

    cpdef str correlation_id_of(self, value)
    @cython.locals(elapsed=double, by_method=dict, cell=_Cell, count=_Count)
    cpdef request_done(self, Request req, int status)
    cdef _Cell _cell(self, service, method, route)
    @cython.locals(requests=dict, count=_Count)
    cpdef fold(self)
    cdef _log_line(self, Request req, int status, double elapsed)


@cython.final
cdef class Request:
    cdef public object conn
    cdef public str method
    cdef public bytes target
    cdef public bytes query
    cdef public object headers
    cdef public object host
    cdef public object body
    cdef public Py_ssize_t content_length
    cdef public int body_state
    cdef public Py_ssize_t body_limit
    cdef public Py_ssize_t head_size
    cdef public Py_ssize_t body_size
    cdef public list held
    cdef public bint expect_continue
    cdef public str http_version
    cdef public bint keep_alive
    cdef public str correlation_id
    cdef public double started
    cdef public object reject
    cdef public str service
    cdef public str route
    cdef public object tenant
    cdef public object pending
    cdef public object identity
    cdef public bytes resp_headers
    cdef public object span
    cdef public bint websocket
    cdef public object auth
    cdef public object version
    cdef public bint done
    cdef public bytes client_ip
    cdef public object routed
    cdef public bint retried
    cdef public Py_ssize_t bytes_out
    cdef public object upstream
    cdef public double auth_s, route_s, upstream_s


@cython.locals(req=Request)
cdef Request _new_request(conn)


@cython.final
cdef class HttpProtocol:
    # -- read by other parts of the gateway
    cdef public object transport
    cdef public object peer_cert
    cdef public object peername
    cdef public bytes peer_ip
    cdef public object proxied
    cdef object _trust
    cdef bint _trusted
    cdef str _proxy_mode, _peer_text
    cdef object _client_key
    cdef bytes _request_id
    cdef object _gzip
    cdef bytes _proxy_buf
    cdef public str anonymous_key
    cdef public double deadline
    cdef double _held_at        # when reading was last held for our sake (_P_OURS)
    cdef public int deadline_kind

    # -- per server
    cdef object _server
    cdef EdgeState _edge
    cdef Accounting _acct
    cdef object _settings
    cdef object _handle
    cdef Py_ssize_t _max_url, _max_header_bytes, _max_header_count, _max_body
    cdef double _header_timeout, _keep_alive_timeout, _body_timeout
    cdef object _send
    cdef Py_ssize_t _body_window_bytes

    # -- per connection
    cdef object _parser, _p_feed, _p_method, _p_keep_alive
    cdef object _transport_write
    cdef object _queue
    cdef Request _current
    cdef list _out
    cdef bint _closing, _parse_broken, _write_paused
    cdef int _paused
    cdef object _on_writable
    cdef bint _chunked, _stream_keep, _streaming, _stream_drop
    cdef int _stream_status
    cdef Py_ssize_t _requests
    cdef Py_ssize_t _lingering
    cdef Py_ssize_t _writing
    cdef object _unparsed
    cdef bint _unparsed_scheduled

    # -- per request being parsed
    cdef Request _req
    cdef bint _in_body
    cdef bytes _url
    cdef list _headers
    cdef Py_ssize_t _header_bytes
    cdef object _reject
    cdef Py_ssize_t _rate_bytes, _seen, _slack
    cdef list _body_out
    cdef bytes _upgrade_tail
    cdef Request _last
    cdef bint _resync

    cdef _set_parser(self, parser)
    @cython.locals(n=Py_ssize_t, pos=Py_ssize_t, end=Py_ssize_t, req=Request)
    cdef _feed(self, data)
    cdef _parse(self, data)
    @cython.locals(req=Request, out=list)
    cdef _flush_body(self)
    cdef _top_up(self, Py_ssize_t n)
    cdef _refuse(self, int status, str message)
    cdef bytes _absolute_form(self, Request req, bytes url)
    cpdef start_body(self, Request req)
    cpdef resume_body(self, Request req)
    cdef _body_failed(self, Request req, int status, message)
    cdef _failed(self)
    @cython.locals(req=Request)
    cdef _pump(self)
    @cython.locals(req=Request, n=Py_ssize_t)
    cdef bint _pipeline_full(self, Py_ssize_t bytes_limit)
    cpdef _continue(self)
    @cython.locals(req=Request)
    cdef bint _holding(self)
    cdef _run(self, Request req)
    @cython.locals(keep=bint, length=Py_ssize_t)
    cpdef respond(self, Request req, int status, headers, body, bint close=*)
    cdef _write(self, data)
    cdef _finish(self, Request req, int status, bint keep)
    @cython.locals(req=Request)
    cdef _drop_queue(self, int status)
    cdef _close_now(self)
    cdef _linger(self, Py_ssize_t n)
    cdef _pause(self, int reason)
    cdef _resume(self, int reason)
    @cython.locals(req=Request)
    cdef _upgraded(self, data, Py_ssize_t offset)
    cdef bytes _render_error_close(self, int status, str message)
    cdef _set_deadline(self, int kind, double seconds)
    cdef _set_peer(self, str address)
    cdef _proxy_header(self, data)
    cdef _refuse_connection(self, str message, int status=*)
