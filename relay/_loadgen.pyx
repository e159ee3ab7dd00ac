# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The load generator's per-job loop in C: plain ``lpd://`` jobs over epoll.

``relay.loadgenfast`` builds every job's byte strings with ``JobSteps``
(the same builders as the client) and hands them over in batches with
``EpollLoad.add``; ``EpollLoad.run`` then drives every connection without
the GIL: non-blocking sockets registered once, edge-triggered for both
directions, one ``send``/``sendmsg`` a step and one ``recv`` a reply, the
next subcommand only after the receiver's acknowledgement, one job a
connection.  Results (latencies, failures by key) are counted into C arrays
and read back once at the end, so no Python runs per job but building its control file (``JobSteps``).

A separate extension module, not part of ``_core``: the protocol core is
sans-I/O and this is nothing but I/O (sockets, a clock, epoll).

Replies are read as ``relay._core.ReplyParser`` reads them, reduced to what
the load generator counts: 0x00 acknowledges (a stray CR/LF before a reply
is skipped); any other first byte is a refusal whose code is that byte (a
printable one is a BSD text line: code 1), counted once its line ends (LF,
EOF or 1024 bytes); EOF with nothing pending is "closed", except after the
last step of a ``stream``/``windows`` job, where a receiver may just close.
TLS (``lpds://``) stays in Python (``relay.loadgenfast.FastLoad``).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, ECONNRESET, EINPROGRESS, EINTR, EPIPE, errno
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close as c_close

import os


include "_loadgen_sys.pxi"


DEF MAX_STEPS = 8          # JobSteps gives 5: the 0x02 line, two headers, two files
DEF MAX_SEGS = 16          # byte strings over all steps
DEF BIG = 65536            # a byte string above this is referenced, not copied
DEF MAX_REPLY_LINE = 1024  # a refusal's line ends here at the latest (as ReplyParser)
DEF EVENTS = 256

# failure keys counted in _Counts.keyed, in this order
DEF F_REFUSED = 0
DEF F_CLOSED = 1
DEF F_TIMEOUT = 2
DEF F_ERROR = 3
_KEYS = ("refused", "closed", "timeout", "error")

# what EpollLoad.run ended on
DEF R_DONE = 0             # nothing open, nothing queued
DEF R_REFILL = 1           # a connection is free and nothing is queued
DEF R_SIGNAL = 2           # epoll_wait was interrupted, or half a second went by:
                           # the caller checks signals (and calls again)
DEF R_OSERROR = 3          # socket() or epoll failed: errno in self._errno


cdef struct Seg:
    const char *p
    Py_ssize_t n

cdef struct Job:
    int nsteps
    int first[MAX_STEPS + 1]   # index in segs of each step's first byte string
    Seg segs[MAX_SEGS]
    char *own                  # the copied small byte strings

cdef struct Conn:
    int fd                     # -1: a free slot
    Job *job
    int step                   # the step sent (or being sent); its reply awaited
    int seg                    # first byte string of the step not yet sent whole
    Py_ssize_t off             # bytes of segs[seg] already sent
    bint connected             # a send succeeded or epoll reported it writable
    int refusing               # the code of a refusal whose line has not ended yet
    int refuse_len
    double start
    double deadline


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class EpollLoad:
    """Plain LPD jobs over at most ``concurrency`` connections at once.

    ``add(jobs)`` queues jobs (each ``job_steps``' list of steps), ``run(more)``
    sends until nothing is open or queued, or (``more``) until a connection
    is free and nothing is queued; it returns how many jobs finished.
    ``latencies()`` and ``failures()`` give the results, ``close()`` fails
    what is still open as "error".
    """

    cdef int _ep
    cdef sockaddr_storage _addr
    cdef socklen_t _addrlen
    cdef int _family
    cdef int _concurrency
    cdef double _timeout
    cdef bint _half_close
    cdef bint _nodelay
    cdef Conn *_conns
    cdef int _open
    cdef Job **_queue
    cdef Py_ssize_t _qhead, _qlen, _qcap
    cdef double *_lat
    cdef Py_ssize_t _nlat, _latcap
    cdef long long _keyed[4]
    cdef long long _codes[256]
    cdef long long _finished
    cdef int _errno
    cdef list _pinned            # the big byte strings jobs point into
    cdef set _pinned_ids

    def __cinit__(self, int family, str host, int port, *, int concurrency,
                  double io_timeout, bint half_close, bint nodelay,
                  unsigned int flowinfo=0, unsigned int scope_id=0):
        self._ep = -1
        self._conns = NULL
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self._set_addr(family, host.encode("ascii"), port, flowinfo, scope_id)
        self._conns = <Conn *>calloc(concurrency, sizeof(Conn))
        if self._conns == NULL:
            raise MemoryError()
        for i in range(concurrency):
            self._conns[i].fd = -1
        self._concurrency = concurrency
        self._timeout = io_timeout
        self._half_close = half_close
        self._nodelay = nodelay
        self._pinned = []
        self._pinned_ids = set()
        self._ep = epoll_create1(EPOLL_CLOEXEC)
        if self._ep < 0:
            raise OSError(errno, os.strerror(errno))

    cdef _set_addr(self, int family, bytes host, int port, unsigned int flowinfo,
                   unsigned int scope_id):
        cdef sockaddr_in *a4 = <sockaddr_in *>&self._addr
        cdef sockaddr_in6 *a6 = <sockaddr_in6 *>&self._addr
        memset(&self._addr, 0, sizeof(sockaddr_storage))
        self._family = family
        if family == AF_INET:
            a4.sin_family = AF_INET
            a4.sin_port = htons(port)
            ok = inet_pton(AF_INET, host, &a4.sin_addr)
            self._addrlen = sizeof(sockaddr_in)
        elif family == AF_INET6:
            a6.sin6_family = AF_INET6
            a6.sin6_port = htons(port)
            a6.sin6_flowinfo = flowinfo
            a6.sin6_scope_id = scope_id
            ok = inet_pton(AF_INET6, host, &a6.sin6_addr)
            self._addrlen = sizeof(sockaddr_in6)
        else:
            raise ValueError("address family %d is neither IPv4 nor IPv6" % family)
        if ok != 1:
            raise ValueError("not a numeric address: %r" % host)

    def __dealloc__(self):
        if self._conns != NULL:
            for i in range(self._concurrency):
                if self._conns[i].fd >= 0:
                    c_close(self._conns[i].fd)
                    free(self._conns[i].job.own)
                    free(self._conns[i].job)
            free(self._conns)
        while self._qlen:
            self._qlen -= 1
            free(self._queue[self._qhead].own)
            free(self._queue[self._qhead])
            self._qhead += 1
        free(self._queue)
        free(self._lat)
        if self._ep >= 0:
            c_close(self._ep)

    @property
    def queued(self):
        """Jobs added and not yet connected."""
        return self._qlen

    @property
    def open(self):
        """Connections under way."""
        return self._open

    def add(self, list jobs):
        """Queue ``jobs``: each a list of steps, each step a list of ``bytes``."""
        cdef Py_ssize_t need = self._qlen + len(jobs)
        cdef Job **grown
        if self._qhead:        # the queue is a FIFO array: move the rest to its start
            memmove(self._queue, self._queue + self._qhead, self._qlen * sizeof(Job *))
            self._qhead = 0
        if need > self._qcap:
            grown = <Job **>realloc(self._queue, need * sizeof(Job *))
            if grown == NULL:
                raise MemoryError()
            self._queue, self._qcap = grown, need
        for steps in jobs:
            self._queue[self._qlen] = self._job(steps)
            self._qlen += 1

    cdef Job *_job(self, list steps) except NULL:
        cdef Job *job = <Job *>calloc(1, sizeof(Job))
        cdef Py_ssize_t small = 0, at = 0
        cdef int k = 0
        cdef bytes part
        if job == NULL:
            raise MemoryError()
        try:
            if not 0 < len(steps) <= MAX_STEPS:
                raise ValueError("a job has 1 to %d steps" % MAX_STEPS)
            for step in steps:
                for part in step:
                    if PyBytes_GET_SIZE(part) <= BIG:
                        small += PyBytes_GET_SIZE(part)
            job.own = <char *>malloc(small or 1)
            if job.own == NULL:
                raise MemoryError()
            for step in steps:
                job.first[job.nsteps] = k
                job.nsteps += 1
                for part in step:
                    if k == MAX_SEGS:
                        raise ValueError("a job has at most %d byte strings" % MAX_SEGS)
                    job.segs[k] = self._seg(part, job.own, &at)
                    k += 1
            job.first[job.nsteps] = k
        except BaseException:
            free(job.own)
            free(job)
            raise
        return job

    cdef Seg _seg(self, bytes part, char *own, Py_ssize_t *at):
        cdef Seg seg
        seg.n = PyBytes_GET_SIZE(part)
        if seg.n > BIG:          # the shared payload: kept alive here, not copied
            if id(part) not in self._pinned_ids:
                self._pinned_ids.add(id(part))
                self._pinned.append(part)
            seg.p = PyBytes_AS_STRING(part)
        else:
            memcpy(own + at[0], PyBytes_AS_STRING(part), seg.n)
            seg.p = own + at[0]
            at[0] += seg.n
        return seg

    def run(self, bint more):
        """Send until nothing is left (or, ``more``, until a refill is due); jobs finished."""
        cdef int why
        cdef long long before = self._finished
        with nogil:
            why = self._loop(more)
        if why == R_SIGNAL:
            PyErr_CheckSignals()
        elif why == R_OSERROR:
            raise OSError(self._errno, os.strerror(self._errno))
        return self._finished - before

    def latencies(self):
        """Seconds from connect to the last acknowledgement, one per job that went through."""
        return [self._lat[i] for i in range(self._nlat)]

    def failures(self):
        """Failed jobs by key: "refused", "closed", "timeout", "error" or a reply "0x01"."""
        out = {_KEYS[i]: self._keyed[i] for i in range(4) if self._keyed[i]}
        out.update({"0x%02x" % i: self._codes[i] for i in range(256) if self._codes[i]})
        return out

    def close(self):
        """Fail every connection still open as "error" (an interrupted run)."""
        for i in range(self._concurrency):
            if self._conns[i].fd >= 0:
                self._fail(&self._conns[i], F_ERROR)

    # ------------------------------------------------------------- the loop

    cdef int _loop(self, bint more) noexcept nogil:
        cdef epoll_event events[EVENTS]
        cdef int n, i
        cdef double now, sweep = _now() + 0.5
        while True:
            while self._qlen and self._open < self._concurrency:
                if not self._connect():
                    return R_OSERROR
            if self._open < self._concurrency and more and not self._qlen:
                return R_REFILL
            if not self._open and not self._qlen:
                return R_DONE
            n = epoll_wait(self._ep, events, EVENTS, 500)
            if n < 0:
                if errno == EINTR:
                    return R_SIGNAL
                self._errno = errno
                return R_OSERROR
            now = _now()
            for i in range(n):
                self._event(&self._conns[events[i].data.u64], events[i].events, now)
            if now >= sweep:
                self._sweep(now)
                # A signal that came while the loop was not in epoll_wait interrupted
                # nothing: the caller checks for one at least every half second.
                return R_SIGNAL

    cdef void _sweep(self, double now) noexcept nogil:
        for i in range(self._concurrency):
            if self._conns[i].fd >= 0 and self._conns[i].deadline < now:
                self._fail(&self._conns[i], F_TIMEOUT)

    cdef bint _connect(self) noexcept nogil:
        """Open the next queued job's connection; False when socket() failed."""
        cdef Conn *c = self._conns
        cdef epoll_event ev
        cdef int one = 1
        cdef int fd = socket(self._family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            self._errno = errno
            return False
        while c.fd >= 0:
            c += 1
        memset(c, 0, sizeof(Conn))
        c.fd = fd
        c.job = self._queue[self._qhead]
        self._qhead += 1
        self._qlen -= 1
        self._open += 1
        c.start = _now()
        c.deadline = c.start + self._timeout
        if self._nodelay:        # the NUL after a big data file may go as a send of its own
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(int))
        if connect(fd, <sockaddr *>&self._addr, self._addrlen) < 0 and errno != EINPROGRESS:
            self._fail(c, F_REFUSED)
            return True
        ev.events = EPOLLIN | EPOLLOUT | EPOLLET      # registered once: the mask never changes
        ev.data.u64 = c - self._conns
        if epoll_ctl(self._ep, EPOLL_CTL_ADD, fd, &ev) < 0:
            self._fail(c, F_ERROR)
            return True
        # On loopback the handshake is done when connect() returns: step 0 goes
        # at once (EAGAIN if not, and the writable edge sends it).
        self._flush(c)
        return True

    cdef void _event(self, Conn *c, unsigned int events, double now) noexcept nogil:
        if c.fd < 0:             # failed earlier in this batch of events
            return
        c.deadline = now + self._timeout
        if not c.connected:
            if events & (EPOLLERR | EPOLLHUP):     # the connect failed
                self._fail(c, F_REFUSED)
                return
            if not events & EPOLLOUT:
                return
        if c.seg < c.job.first[c.step + 1]:
            if not self._flush(c) or c.seg < c.job.first[c.step + 1]:
                return
        if events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            self._readable(c)

    cdef bint _flush(self, Conn *c) noexcept nogil:
        """Send what is left of the step; False when the connection failed."""
        cdef Job *job = c.job
        cdef int end = job.first[c.step + 1]
        cdef iovec iov[MAX_SEGS]
        cdef msghdr msg
        cdef ssize_t sent
        cdef int k
        while c.seg < end:
            if end - c.seg == 1:
                sent = send(c.fd, job.segs[c.seg].p + c.off, job.segs[c.seg].n - c.off,
                            MSG_NOSIGNAL)
            else:
                memset(&msg, 0, sizeof(msghdr))
                for k in range(c.seg, end):
                    iov[k - c.seg].iov_base = <void *>job.segs[k].p
                    iov[k - c.seg].iov_len = job.segs[k].n
                iov[0].iov_base = <void *>(job.segs[c.seg].p + c.off)
                iov[0].iov_len -= c.off
                msg.msg_iov = iov
                msg.msg_iovlen = end - c.seg
                sent = sendmsg(c.fd, &msg, MSG_NOSIGNAL)
            if sent < 0:
                if errno == EAGAIN:
                    return True
                self._fail(c, self._error_key(c))
                return False
            c.connected = True
            self._advance(c, sent)
        if c.step == job.nsteps - 1 and self._half_close:
            shutdown(c.fd, SHUT_WR)         # stream/windows: the data ends here
        return True

    cdef inline void _advance(self, Conn *c, ssize_t sent) noexcept nogil:
        cdef Job *job = c.job
        cdef int end = job.first[c.step + 1]
        sent += c.off
        while c.seg < end and sent >= job.segs[c.seg].n:   # an empty one is sent at once
            sent -= job.segs[c.seg].n
            c.seg += 1
        c.off = sent if c.seg < end else 0

    cdef inline int _error_key(self, Conn *c) noexcept nogil:
        if not c.connected:
            return F_REFUSED
        return F_CLOSED if errno == ECONNRESET or errno == EPIPE else F_ERROR

    cdef void _readable(self, Conn *c) noexcept nogil:
        cdef char buf[4096]
        cdef ssize_t got
        cdef bint first = True
        while c.fd >= 0:
            got = recv(c.fd, buf, sizeof(buf), 0)
            if got < 0:
                if errno != EAGAIN:
                    self._fail(c, self._error_key(c))
                return
            if got == 0:
                self._eof(c)
                return
            if first and got == 1 and buf[0] == 0 and not c.refusing:
                # The plain acknowledgement: what else is there (an EOF) comes
                # with the next step's reply or its reset, so no drain here.
                self._acked(c)
                return
            first = False
            self._replies(c, buf, got)

    cdef void _replies(self, Conn *c, const char *buf, ssize_t n) noexcept nogil:
        cdef unsigned char b
        cdef ssize_t i
        for i in range(n):
            if c.fd < 0:
                return
            b = buf[i]
            if c.refusing:
                c.refuse_len += 1
                if b == 0x0A or c.refuse_len > MAX_REPLY_LINE:
                    self._refused(c)
            elif b == 0x0A or b == 0x0D:
                continue             # "00 0A": a stray line end after a reply byte
            elif b == 0:
                self._acked(c)
            else:                    # a printable first byte: a BSD text refusal (code 1)
                c.refusing = 1 if 0x20 <= b < 0x7f else b
                c.refuse_len = 1

    cdef void _eof(self, Conn *c) noexcept nogil:
        if c.refusing:
            self._refused(c)
        elif c.step == c.job.nsteps - 1 and self._half_close:
            self._acked(c)           # a stream receiver may just close at the end
        else:
            self._fail(c, F_CLOSED)

    cdef void _refused(self, Conn *c) noexcept nogil:
        self._codes[c.refusing] += 1
        self._drop(c)

    cdef void _acked(self, Conn *c) noexcept nogil:
        cdef double end
        if c.step + 1 < c.job.nsteps:
            c.step += 1
            c.seg = c.job.first[c.step]
            c.off = 0
            self._flush(c)
            return
        end = _now()
        if self._nlat == self._latcap and not self._grow_latencies():
            self._keyed[F_ERROR] += 1
        else:
            self._lat[self._nlat] = end - c.start
            self._nlat += 1
        self._drop(c)

    cdef bint _grow_latencies(self) noexcept nogil:
        cdef Py_ssize_t cap = self._latcap * 2 if self._latcap else 4096
        cdef double *grown = <double *>realloc(self._lat, cap * sizeof(double))
        if grown == NULL:
            return False
        self._lat, self._latcap = grown, cap
        return True

    cdef void _fail(self, Conn *c, int key) noexcept nogil:
        self._keyed[key] += 1
        self._drop(c)

    cdef void _drop(self, Conn *c) noexcept nogil:
        c_close(c.fd)                # closing removes it from the epoll set
        c.fd = -1
        free(c.job.own)
        free(c.job)
        c.job = NULL
        self._open -= 1
        self._finished += 1
