# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The open-loop sender and receiver of ``python -m perf loadgen open``, in C.

Why: the uvloop loop it replaces kept the load CPU 100 % busy at ~40k req/s (libuv's
timers are whole milliseconds, so its 0.5 ms tick spun) and sent the due requests in
bursts of ~20, and on 2 CPUs the service shares that CPU. This loop sleeps to each
request's own due time: at 41k req/s against perf/raw_server.py it used ~75 % of its CPU
(~3 µs per request in user space, ~17 in the kernel's loopback TCP path and wake-ups).

What it does is what ``open`` always did, with a finer schedule: request *i* is due at
``start + i / rate``; the loop sleeps (epoll, ns timeout, 1 ns timer slack) until the next
one is due, sends every due request round-robin over the connections, pipelined when a
connection still has responses outstanding, so a slow server never slows the sender
(no coordinated omission). Two latencies per request, in the log-linear buckets of
``loadgen.Histogram`` (same index function, tested against it):

* from the request's write to the end of its response (``latency``, as before);
* from the moment it was due to the end of its response (``latency_from_schedule``,
  wrk2's measure: it also charges the generator's own lateness).

It also reports the *stops*: spans of at least ``STOP_NS`` (1 ms) in which a request was
outstanding and no response at all came back -- the server side made no progress (a
stalled CPU, a paused VM, a process that was not scheduled). Each is measured from the
later of the previous response and the write of the request that ends it, so it is a lower
bound of the real stop. ``hiccups()`` measures the same thing without any server: a spin
on one CPU that records every gap in its own progress (jHiccup's idea).

Responses must carry ``Content-Length`` (the servers measured here all do); anything
else is counted as an error and the connection is dropped. The sockets are connected in
Python and handed over as file descriptors; the caller keeps them open and closes them.
"""

from libc.stdint cimport uint64_t, int64_t, uint32_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove
from posix.time cimport timespec, clock_gettime, CLOCK_MONOTONIC
from posix.unistd cimport close, read, write


cdef extern from "<errno.h>":
    int errno
    enum:
        EAGAIN
        EINTR


cdef extern from "<string.h>":
    void *memmem(const void *haystack, size_t hlen, const void *needle, size_t nlen)


cdef extern from "<strings.h>":
    int strncasecmp(const char *a, const char *b, size_t n)


cdef extern from *:
    int __builtin_clzll(unsigned long long x) nogil


cdef extern from "<sched.h>":
    int sched_yield() nogil


cdef extern from "<sys/prctl.h>":
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5)
    enum:
        PR_SET_TIMERSLACK


cdef extern from "<sys/epoll.h>":
    ctypedef union epoll_data_t:
        uint32_t u32
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_pwait2(int epfd, epoll_event *events, int maxevents,
                     const timespec *timeout, const void *sigmask)


cdef enum:
    SUB = 64                 # sub-buckets per power of two (loadgen.Histogram's SUB)
    NBUCKETS = 64 * 64
    MAX_HEADER = 65536       # a response head longer than this is an error
    RING = 65536             # outstanding requests per connection before it is an error
    STOP_NS = 1000000        # no response for this long, with requests outstanding: a stop
    MAX_GAPS = 100000        # hiccups() keeps at most this many gaps

# error counters, named as loadgen.py names them
cdef enum:
    E_CLOSED_OUTSTANDING
    E_CLOSED
    E_BAD_RESPONSE
    E_NO_LENGTH
    E_NO_RESPONSE
    E_TOO_MANY
    E_WRITE
    E_NOT_SENT
    N_ERRORS


ctypedef struct Hist:
    uint64_t counts[NBUCKETS]
    uint64_t n
    uint64_t total
    uint64_t max
    uint64_t min


ctypedef struct Conn:
    int fd
    bint lost
    bint want_out
    char *inbuf
    size_t inlen
    size_t incap
    char *outbuf
    size_t outlen
    size_t outcap
    uint64_t *sent_at        # ring of write times (ns), parallel to due_at
    uint64_t *due_at
    uint32_t head
    uint32_t count


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000ULL + <uint64_t>ts.tv_nsec


cdef inline int bucket(uint64_t v) noexcept nogil:
    if v < 2 * SUB:
        return <int>v
    cdef int e = (64 - __builtin_clzll(v)) - 7     # v >> e lands in [64, 127]
    return e * SUB + <int>(v >> e)


cdef inline void record(Hist *h, uint64_t v) noexcept nogil:
    h.counts[bucket(v)] += 1
    h.n += 1
    h.total += v
    if v > h.max:
        h.max = v
    if h.n == 1 or v < h.min:
        h.min = v


def bucket_index(uint64_t v):
    """The bucket of ``v`` ns (for the test that holds this to loadgen.Histogram.index)."""
    return bucket(v)


cdef class OpenLoop:
    cdef Conn *conns
    cdef int nconn
    cdef int ep
    cdef bytes request
    cdef Hist *lat
    cdef Hist *sched
    cdef Hist *lag
    cdef uint64_t lag_max
    cdef uint64_t statuses[600]
    cdef uint64_t errors[N_ERRORS]
    cdef uint64_t completed
    cdef uint64_t sent
    cdef bint measuring
    cdef uint64_t last_done      # when the last response came (or the measured run began)
    cdef uint64_t stops, stop_total, stop_max
    cdef bint chain              # back_to_back(): each response sends the next request
    cdef uint64_t chain_end

    def __cinit__(self, fds, bytes request):
        cdef int i
        cdef epoll_event ev
        self.request = request
        self.nconn = len(fds)
        if self.nconn < 1:
            raise ValueError("at least one connection")
        self.conns = <Conn *>calloc(self.nconn, sizeof(Conn))
        self.lat = <Hist *>calloc(1, sizeof(Hist))
        self.sched = <Hist *>calloc(1, sizeof(Hist))
        self.lag = <Hist *>calloc(1, sizeof(Hist))
        if not (self.conns and self.lat and self.sched and self.lag):
            raise MemoryError()
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            raise OSError(errno, "epoll_create1")
        for i in range(self.nconn):
            c = &self.conns[i]
            c.fd = fds[i]
            c.incap = MAX_HEADER
            c.inbuf = <char *>malloc(c.incap)
            c.sent_at = <uint64_t *>malloc(RING * sizeof(uint64_t))
            c.due_at = <uint64_t *>malloc(RING * sizeof(uint64_t))
            if not (c.inbuf and c.sent_at and c.due_at):
                raise MemoryError()
            ev.events = EPOLLIN
            ev.data.u32 = i
            if epoll_ctl(self.ep, EPOLL_CTL_ADD, c.fd, &ev) < 0:
                raise OSError(errno, "epoll_ctl")
        # the default 50 µs of timer slack would bunch the schedule up
        prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)

    def __dealloc__(self):
        cdef int i
        if self.conns:
            for i in range(self.nconn):
                free(self.conns[i].inbuf)
                free(self.conns[i].outbuf)
                free(self.conns[i].sent_at)
                free(self.conns[i].due_at)
            free(self.conns)
        free(self.lat)
        free(self.sched)
        free(self.lag)
        if self.ep > 0:
            close(self.ep)

    # ----------------------------------------------------------------------- sending

    cdef void drop(self, Conn *c) noexcept:
        """The connection is gone (closed by the server, or a response it could not
        read): its outstanding requests are errors; the caller closes the socket."""
        if c.lost:
            return
        c.lost = True
        self.errors[E_CLOSED_OUTSTANDING] += c.count
        c.count = 0
        epoll_ctl(self.ep, EPOLL_CTL_DEL, c.fd, NULL)

    cdef void fail(self, Conn *c, int error) noexcept:
        """A response that cannot be read: its request is this error, the connection's
        other outstanding requests are lost with it."""
        self.errors[error] += 1
        if c.count:
            c.head = (c.head + 1) % RING
            c.count -= 1
        self.drop(c)

    cdef void flush(self, Conn *c) noexcept:
        cdef ssize_t n
        cdef epoll_event ev
        while c.outlen:
            n = write(c.fd, c.outbuf, c.outlen)
            if n < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                self.errors[E_WRITE] += 1
                self.drop(c)
                return
            memmove(c.outbuf, c.outbuf + n, c.outlen - n)
            c.outlen -= n
        if (c.outlen != 0) != c.want_out:
            c.want_out = c.outlen != 0
            ev.events = EPOLLIN | (EPOLLOUT if c.want_out else 0)
            ev.data.u32 = <uint32_t>(c - self.conns)
            epoll_ctl(self.ep, EPOLL_CTL_MOD, c.fd, &ev)

    cdef void send(self, Conn *c, uint64_t due) noexcept:
        cdef const char *req = self.request
        cdef size_t size = len(self.request)
        cdef ssize_t n = 0
        cdef uint32_t slot
        if c.lost:
            self.errors[E_NOT_SENT] += 1
            return
        if c.count == RING:
            self.errors[E_TOO_MANY] += 1
            return
        if c.outlen == 0:
            n = write(c.fd, req, size)
            if n < 0:
                if errno != EAGAIN and errno != EINTR:
                    self.errors[E_WRITE] += 1
                    self.drop(c)
                    return
                n = 0
        slot = (c.head + c.count) % RING
        c.sent_at[slot] = now_ns()
        c.due_at[slot] = due
        c.count += 1
        self.sent += 1
        if <size_t>n < size:
            if c.outlen + size - n > c.outcap:
                c.outcap = 2 * (c.outlen + size - n)
                c.outbuf = <char *>realloc(c.outbuf, c.outcap)
            memcpy(c.outbuf + c.outlen, req + n, size - n)
            c.outlen += size - n
            self.flush(c)

    # ----------------------------------------------------------------------- receiving

    cdef void receive(self, Conn *c) noexcept:
        cdef ssize_t n, room
        while not c.lost:
            if c.inlen == c.incap:
                c.incap *= 2
                c.inbuf = <char *>realloc(c.inbuf, c.incap)
            room = c.incap - c.inlen
            n = read(c.fd, c.inbuf + c.inlen, room)
            if n > 0:
                c.inlen += n
                self.parse(c)
                if n < room:
                    return      # drained; epoll is level-triggered: no read for EAGAIN
                continue
            if n == 0:
                if c.count == 0:
                    self.errors[E_CLOSED] += 1
                self.drop(c)
            elif errno == EINTR:
                continue
            elif errno != EAGAIN:
                self.drop(c)
            return

    cdef void parse(self, Conn *c) noexcept:
        cdef char *p = c.inbuf
        cdef char *end = c.inbuf + c.inlen
        cdef char *head_end
        cdef char *line
        cdef char *eol
        cdef int64_t length
        cdef int status
        cdef uint64_t t, since
        while p < end:
            head_end = <char *>memmem(p, end - p, b"\r\n\r\n", 4)
            if head_end == NULL:
                if end - p > MAX_HEADER:
                    self.fail(c, E_BAD_RESPONSE)
                    return
                break
            if end - p < 12 or strncasecmp(p, b"HTTP/1.", 7) != 0:
                self.fail(c, E_BAD_RESPONSE)
                return
            status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
            length = -1
            line = <char *>memmem(p, head_end + 2 - p, b"\r\n", 2) + 2
            while line < head_end + 2:
                eol = <char *>memmem(line, head_end + 2 - line, b"\r\n", 2)
                if eol - line > 15 and strncasecmp(line, b"content-length:", 15) == 0:
                    length = 0
                    line += 15
                    while line < eol and line[0] == 32:
                        line += 1
                    while line < eol and 48 <= line[0] <= 57:
                        length = length * 10 + (line[0] - 48)
                        line += 1
                elif eol - line > 18 and strncasecmp(line, b"transfer-encoding:", 18) == 0:
                    length = -1
                    break
                line = eol + 2
            if length < 0 or status < 100 or status > 599:
                self.fail(c, E_NO_LENGTH if length < 0 else E_BAD_RESPONSE)
                return
            if end - (head_end + 4) < length:
                break
            p = head_end + 4 + length
            if c.count == 0:
                self.fail(c, E_BAD_RESPONSE)     # a response nobody asked for
                return
            t = now_ns()
            if self.measuring:
                since = c.sent_at[c.head] if c.sent_at[c.head] > self.last_done else self.last_done
                if t - since >= STOP_NS:
                    self.stops += 1
                    self.stop_total += t - since
                    if t - since > self.stop_max:
                        self.stop_max = t - since
                self.last_done = t
                record(self.lat, t - c.sent_at[c.head])
                record(self.sched, t - c.due_at[c.head])
                self.statuses[status] += 1
                self.completed += 1
            c.head = (c.head + 1) % RING
            c.count -= 1
            if self.chain and t < self.chain_end:
                self.send(c, t)
        c.inlen = end - p
        if c.inlen:
            memmove(c.inbuf, p, c.inlen)

    cdef int poll(self, uint64_t timeout_ns) noexcept:
        cdef epoll_event events[256]
        cdef timespec ts
        cdef int n, i
        cdef Conn *c
        ts.tv_sec = timeout_ns // 1000000000ULL
        ts.tv_nsec = timeout_ns % 1000000000ULL
        n = epoll_pwait2(self.ep, events, 256, &ts, NULL)
        for i in range(n):
            c = &self.conns[events[i].data.u32]
            if events[i].events & EPOLLOUT:
                self.flush(c)
            if events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP):
                self.receive(c)
        return n

    # ----------------------------------------------------------------------- phases

    cdef uint64_t outstanding(self) noexcept:
        cdef uint64_t total = 0
        cdef int i
        for i in range(self.nconn):
            total += self.conns[i].count
        return total

    def paced(self, double rate, double duration, bint measuring, bint spin=False):
        """Send at ``rate`` for ``duration`` seconds; returns (sent, wall seconds).

        ``spin``: poll instead of sleeping, and yield the CPU after every poll that found
        nothing. The generator's CPU then never idles, so no wake-up of an idle CPU (a
        costly exit on a VM) lands in the figures, neither the generator's own nor that of
        a process sharing its CPU, which still runs whenever it is ready."""
        cdef uint64_t start, end, now, due, nxt, limit
        cdef uint64_t sent = 0
        cdef double ns_per = 1e9 / rate
        cdef int rr = 0
        self.measuring = measuring
        start = now_ns()
        self.last_done = start
        end = start + <uint64_t>(duration * 1e9)
        while True:
            now = now_ns()
            # past the end (a late wake-up), what was due inside the window still goes out
            limit = now if now < end else end - 1
            while True:
                due = start + <uint64_t>(sent * ns_per)
                if due > limit:
                    break
                if measuring:
                    record(self.lag, now - due)
                    if now - due > self.lag_max:
                        self.lag_max = now - due
                self.send(&self.conns[rr], due)
                sent += 1
                rr += 1
                if rr == self.nconn:
                    rr = 0
            if now >= end:
                break
            nxt = start + <uint64_t>(sent * ns_per)
            if nxt > end:
                nxt = end
            now = now_ns()
            if spin:
                if self.poll(0) == 0:
                    sched_yield()
            else:
                self.poll(nxt - now if nxt > now else 0)
        return sent, (now_ns() - start) / 1e9

    def back_to_back(self, double duration, bint measuring, bint spin=False):
        """Closed loop for ``duration`` seconds: one request in flight per connection, the
        next sent the moment its response ends (wrk's pattern); returns (sent, wall
        seconds). ``spin`` as for paced(): this CPU never idles between the requests."""
        cdef uint64_t start, end
        cdef uint64_t sent0 = self.sent
        cdef int i
        self.measuring = measuring
        start = now_ns()
        end = start + <uint64_t>(duration * 1e9)
        self.last_done = start
        self.chain = True
        self.chain_end = end
        for i in range(self.nconn):
            self.send(&self.conns[i], now_ns())
        while now_ns() < end:
            if spin:
                if self.poll(0) == 0:
                    sched_yield()
            else:
                self.poll(end - now_ns() if end > now_ns() else 0)
        self.chain = False
        return self.sent - sent0, (now_ns() - start) / 1e9

    def drain(self, double seconds):
        """Read responses until none is outstanding or ``seconds`` pass; returns how many
        are still outstanding (and counts them as errors when measuring)."""
        cdef uint64_t deadline = now_ns() + <uint64_t>(seconds * 1e9)
        cdef uint64_t left
        while self.outstanding() and now_ns() < deadline:
            self.poll(1000000)
        left = self.outstanding()
        if left and self.measuring:
            self.errors[E_NO_RESPONSE] += left
        return left

    def result(self, double drain_s):
        """The counters as plain Python data (the histograms as {index: count})."""
        names = {
            E_CLOSED_OUTSTANDING: "connection closed with requests outstanding",
            E_CLOSED: "connection closed",
            E_BAD_RESPONSE: "bad response",
            E_NO_LENGTH: "response without Content-Length (not supported)",
            E_NO_RESPONSE: f"no response within {drain_s}s after the run",
            E_TOO_MANY: f"more than {RING} requests outstanding on a connection",
            E_WRITE: "write failed",
            E_NOT_SENT: "not sent: its connection was closed",
        }
        return {
            "completed": self.completed,
            "statuses": {k: self.statuses[k] for k in range(600) if self.statuses[k]},
            "errors": {names[k]: self.errors[k] for k in range(N_ERRORS) if self.errors[k]},
            "latency": _hist(self.lat),
            "latency_from_schedule": _hist(self.sched),
            "lag": _hist(self.lag),
            "lag_max_ns": self.lag_max,
            "stops": {"count": self.stops, "total_ns": self.stop_total, "max_ns": self.stop_max},
        }


cdef dict _hist(Hist *h):
    return {"counts": {i: h.counts[i] for i in range(NBUCKETS) if h.counts[i]},
            "n": h.n, "total": h.total, "max": h.max, "min": h.min if h.n else None}


def hiccups(double seconds, uint64_t threshold_ns):
    """Spin for ``seconds`` reading the clock; every gap of at least ``threshold_ns`` between
    two readings (the CPU was taken away: another task, a kernel thread, the hypervisor)
    is returned as (offset ns from the start, gap ns), at most MAX_GAPS of them."""
    cdef uint64_t start = now_ns()
    cdef uint64_t end = start + <uint64_t>(seconds * 1e9)
    cdef uint64_t prev = start, t
    cdef uint64_t *gaps = <uint64_t *>malloc(2 * MAX_GAPS * sizeof(uint64_t))
    cdef Py_ssize_t n = 0, i
    if gaps == NULL:
        raise MemoryError()
    with nogil:
        while prev < end:
            t = now_ns()
            if t - prev >= threshold_ns and n < MAX_GAPS:
                gaps[2 * n] = prev - start
                gaps[2 * n + 1] = t - prev
                n += 1
            prev = t
    try:
        return [(gaps[2 * i], gaps[2 * i + 1]) for i in range(n)]
    finally:
        free(gaps)
