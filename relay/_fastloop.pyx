# cython: language_level=3, boundscheck=False, wraparound=False
"""The reading half of plain receive-job sessions, outside trio: one epoll set per process.

Each connection's descriptor is in the loop's own epoll set; trio waits on
that set's descriptor, so one wake-up serves every ready connection.  The
loop reads into the connection's buffer, frames with its own
``relay._core.ServerParser`` and makes each step's decision by a plain call
on the connection's ``relay.connection.Connection`` (the ``relay.jobsteps``
methods: the same checks, the same job assembly), then writes the
acknowledgement itself.  What it does not take it hands back to Python
(``relay.fastsession``), the connection's state untouched: an event it does
not take, a step that raised, a read or write that failed, an
acknowledgement the socket would not take, a complete job (to commit), a
deadline that passed.  It never closes a descriptor; the socket is Python's.

A session's later jobs are pipelined as ``relay.ackqueue`` pipelines them:
each complete job is handed to Python (``Conn.jobs``) while the loop reads
on, and every acknowledgement due after it waits behind its final one
(``Conn.owed``); ``release`` writes those, in order, once Python has the
job's commit (SPEC §4.4).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.errno cimport errno, EAGAIN, EINTR
from libc.string cimport strerror

from relay import _core
from relay.buffers import SMALL

cdef extern from "sys/epoll.h" nogil:
    cdef union epoll_data_t "epoll_data":
        int fd
        void* ptr
    cdef struct epoll_event:
        unsigned int events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLLIN

cdef extern from "unistd.h" nogil:
    ssize_t c_read "read" (int fd, void* buf, size_t count)
    ssize_t c_write "write" (int fd, const void* buf, size_t count)
    int c_close "close" (int fd)

cdef object NEED = _core.NEED_DATA
cdef type T_RJ = _core.ReceiveJob
cdef type T_CS = _core.ControlFileStart
cdef type T_CE = _core.ControlFileEnd
cdef type T_DS = _core.DataFileStart
cdef type T_DC = _core.DataChunk
cdef type T_DE = _core.DataFileEnd
cdef type T_END = _core.EndOfStream

# What a connection leaving the loop asks of Python (Conn.kind).
IN_LOOP = 0   # it has not left: only its ``jobs`` are new
EVENT = 1     # dispatch ``payload``, an event the loop does not take, first
RAISE = 2     # a step raised ``payload``: raise it where the step ran
LOST = 3      # a read or write failed with ``payload`` (an OSError): the peer is gone
SEND = 4      # the acknowledgement did not fit the socket buffer: send it, waiting
TIMEOUT = 6   # the read deadline passed
COMMIT = 7    # ``payload``, the session's first complete job, to commit (then ``resume``)
CLOSED = 8    # the peer closed cleanly between jobs: close (its owed acks sent first)
AWAY = 9      # the epoll set would not take it: Connection serves it (owed acks first)

DEF MAXEV = 64
# What a step asks of _run next.
DEF ACK = 1      # write the acknowledgement, read on
DEF GO_ON = 2    # nothing to say (a data chunk), read on
DEF STOP = 3     # the connection left the loop or waits for its commit
# Reads of one connection before the loop turns to the others (as relay.fastio).
DEF READS_EVERY = 16
cdef double INF = float("inf")


cdef class Conn:
    """One connection in the loop: its ``Connection``, socket and where it stands."""

    cdef public int fd
    cdef public object conn         # relay.connection.Connection
    cdef public object sock         # its trio socket (Python closes it)
    cdef public str host
    cdef public object parser
    cdef bytearray buf
    cdef object view
    cdef public double last         # when its last bytes came (trio's clock)
    cdef public double due          # when its next bytes must have come (INF: not waiting)
    cdef public bint busy           # its job is committing: out of the epoll set
    cdef public int kind            # why it left the loop (the constants above)
    cdef public object payload
    cdef public list jobs           # pipelined complete jobs Python has not taken yet
    # Per pipelined job still committing, in arrival order: the acknowledgements
    # due after it, written only after its own final one (relay.ackqueue's rule).
    cdef public list owed
    cdef public object pipe         # relay.fastpipe.Pipe, once it pipelined a job
    cdef bint queued                # in the loop's output already


cdef class FastLoop:
    """The epoll set and its connections (module docstring)."""

    cdef public int fd
    cdef dict _conns
    cdef list _out
    cdef double _now
    cdef Py_ssize_t _small_file

    def __init__(self, Py_ssize_t small_file):
        self.fd = epoll_create1(EPOLL_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, strerror(errno).decode())
        self._conns = {}
        self._out = []
        self._small_file = small_file

    @property
    def count(self):
        """Connections in the loop, committing ones included."""
        return len(self._conns)

    def close(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1

    def add(self, conn, sock, str host, double now):
        """Take ``conn`` (a fresh ``Connection`` on ``sock``); what left the loop."""
        cdef Conn c = Conn.__new__(Conn)
        c.fd = sock.fileno()
        c.conn, c.sock, c.host = conn, sock, host
        c.parser = conn.parser
        c.buf = bytearray(SMALL)
        c.view = memoryview(c.buf)
        c.last, c.due = now, INF
        c.jobs, c.owed = [], []
        self._conns[c.fd] = c
        self._now = now
        if self._watch(c):
            self._run(c)
        return self._take()

    def poll(self, double now):
        """Serve the ready connections; the ones that left the loop."""
        cdef epoll_event evs[MAXEV]
        cdef int n, i
        self._now = now
        n = epoll_wait(self.fd, evs, MAXEV, 0)
        for i in range(n):
            c = self._conns.get(evs[i].data.fd)
            if c is not None and not (<Conn>c).busy:
                self._run(<Conn>c)
        return self._take()

    def resume(self, Conn c, double now):
        """The job ``c`` was committing is durable: its final ack, then read on."""
        self._now = now
        c.busy, c.due, c.kind = False, INF, IN_LOOP
        if self._conns.get(c.fd) is not c:
            return self._take()
        if self._ack(c) and self._watch(c):
            self._run(c)
        return self._take()

    def pause(self, Conn c):
        """Stop reading ``c`` (its pipeline is full, or a commit failed)."""
        if self._conns.get(c.fd) is c and not c.busy:
            epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)
            c.busy, c.due = True, INF

    def unpause(self, Conn c, double now):
        """Read ``c`` again after ``pause``; what left the loop."""
        self._now = now
        if self._conns.get(c.fd) is c and c.busy and c.kind == IN_LOOP:
            c.busy = False
            if self._watch(c):
                self._run(c)
        return self._take()

    def release(self, Conn c, bint write):
        """The oldest pipelined job of ``c`` is decided: its final acknowledgement and
        those owed behind it written (``write``) or dropped (not acknowledged).  The
        count of those not written because ``c`` left the loop (Python sends them)."""
        cdef Py_ssize_t n = 1 + <Py_ssize_t>c.owed.pop(0)
        cdef ssize_t w
        if not write:
            return 0
        if self._conns.get(c.fd) is not c:
            return n
        zeros = bytes(n)
        while n:
            w = c_write(c.fd, <char*>zeros, n)
            if w > 0:
                n -= w
                continue
            if w < 0 and errno == EINTR:
                continue
            if w < 0 and errno != EAGAIN:
                self._leave(c, LOST, OSError(errno, strerror(errno).decode()))
                return 0
            self._leave(c, SEND, b"")     # the rest is Python's, waiting
            return n
        return 0

    def out(self):
        """What left the loop outside ``add``/``poll``/``resume`` (a ``release``)."""
        return self._take()

    def drop(self, Conn c):
        """Out of the loop, if it still is (Python took it over: a failed commit)."""
        if self._conns.get(c.fd) is c:
            del self._conns[c.fd]
            if not c.busy:
                epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)

    def expired(self, double now):
        """The connections whose read deadline passed leave (TIMEOUT); and the next due."""
        cdef Conn c
        cdef double nearest = INF
        late = []
        for c in self._conns.values():
            if c.busy and c.due == INF:   # committing in a task, its own deadline
                continue
            if c.due <= now:
                late.append(c)
            elif c.due < nearest:
                nearest = c.due
        for c in late:
            self._leave(c, TIMEOUT, None)
        return self._take(), nearest

    def take_all(self):
        """Every connection, out of the loop (its task is ending)."""
        cdef Conn c
        conns = list(self._conns.values())
        for c in conns:
            if not c.busy:
                epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)
        self._conns.clear()
        return conns

    cdef list _take(self):
        cdef Conn c
        out = self._out
        self._out = []
        for c in out:
            c.queued = False
        return out

    cdef void _queue(self, Conn c):
        if not c.queued:
            c.queued = True
            self._out.append(c)

    cdef bint _watch(self, Conn c):
        """Into the epoll set; False: it left the loop (AWAY: the peer is not to blame
        for the set refusing it, e.g. ``fs.epoll.max_user_watches``)."""
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.fd = c.fd
        if epoll_ctl(self.fd, EPOLL_CTL_ADD, c.fd, &ev) == 0:
            return True
        c.busy = True      # not in the set: nothing to take out of it
        self._leave(c, AWAY, None)
        c.busy = False
        return False

    cdef void _leave(self, Conn c, int kind, object payload):
        if self._conns.pop(c.fd, None) is None:
            return
        if not c.busy:
            epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)
        c.kind, c.payload = kind, payload
        self._queue(c)

    cdef bint _ack(self, Conn c):
        cdef char z = 0
        cdef ssize_t n
        cdef list owed = c.owed
        cdef Py_ssize_t last = len(owed) - 1
        if last >= 0:     # behind a job still committing: written after its final ack
            owed[last] = <Py_ssize_t>owed[last] + 1   # (no negative index: wraparound off)
            return True
        while True:
            n = c_write(c.fd, &z, 1)
            if n == 1:
                return True
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno != EAGAIN:
                self._leave(c, LOST, OSError(errno, strerror(errno).decode()))
            else:
                self._leave(c, SEND, None)
            return False

    cdef void _run(self, Conn c):
        """Events to steps until the connection would wait, leaves or commits."""
        cdef int reads = 0, r
        cdef object ev
        k, parser = c.conn, c.parser
        while True:
            try:
                ev = parser.next_event()
                if ev is NEED:
                    if reads >= READS_EVERY:
                        # Level-triggered: the next poll, if bytes are left.  If the
                        # last read took them all, the deadline is what brings it back.
                        c.due = k.deadline.due(parser, self._now)
                        return
                    if not self._read(c, k, parser):
                        return       # would wait (its deadline set), or it left the loop
                    reads += 1
                    continue
                r = self._step(c, k, ev)
            except Exception as exc:   # a step's refusal, error or bug: raised in Connection
                self._leave(c, RAISE, exc)
                return
            if r == STOP or (r == ACK and not self._ack(c)):
                return

    cdef bint _read(self, Conn c, object k, object parser) except -1:
        """Bytes into the parser: True; False when none are there (or it left the loop)."""
        cdef ssize_t n
        while True:
            n = c_read(c.fd, PyByteArray_AS_STRING(c.buf), PyByteArray_GET_SIZE(c.buf))
            if n >= 0:
                break
            if errno == EAGAIN:
                c.due = k.deadline.due(parser, self._now)   # relay.readdeadline's bound
                return False
            if errno != EINTR:
                self._leave(c, LOST, OSError(errno, strerror(errno).decode()))
                return False
        c.last, c.due = self._now, INF
        parser.receive_data(c.view[:n])
        return True

    cdef int _step(self, Conn c, object k, object ev) except -1:
        """One event by the connection's own step: ACK, GO_ON (no reply due) or STOP."""
        cdef type t = type(ev)
        if t is T_DC:
            k.on_data_chunk(ev)
            return GO_ON
        if t is T_RJ:
            k.take_receive_job(ev)
        elif t is T_CS:
            k.take_control_start(ev)
        elif t is T_DS:
            length = ev.length
            if not length or length > self._small_file:
                self._leave(c, EVENT, ev)   # until-close dialects, large files
                return STOP
            k.take_data_start(ev)
        elif t is T_CE or t is T_DE:
            if t is T_CE:
                k.take_control_end(ev)
            else:
                k.take_data_end(ev)
            return self._finished(c, k)
        elif t is T_END and k.job is None:
            self._leave(c, CLOSED, None)
            return STOP
        else:
            self._leave(c, EVENT, ev)
            return STOP
        return ACK

    cdef int _finished(self, Conn c, object k) except -1:
        """After a file: ACK (the job is not complete), GO_ON (a later job of the
        session, pipelined: its ack follows its commit) or STOP (waiting for the
        session's first job's commit, or left the loop)."""
        job = k.job
        if not job.complete():
            return ACK
        k.job = None
        k.completed += 1
        if k.completed > 1:    # as Connection._finish_file: read on while it commits
            c.jobs.append(job)
            c.owed.append(0)
            self._queue(c)
            return GO_ON
        c.busy, c.due = True, INF    # a deadline only if Python gives it one
        epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)
        c.kind, c.payload = COMMIT, job
        self._queue(c)
        return STOP
