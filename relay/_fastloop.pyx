# cython: language_level=3, boundscheck=False, wraparound=False
"""PROTOTYPE: plain receive-job sessions of small jobs outside trio (one epoll set).

Reads, frames with ``relay._core.ServerParser`` and writes the intermediate
acknowledgements itself; hands Python a list of (kind, conn) at each poll.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from libc.errno cimport errno, EAGAIN, EINTR

from relay import _core

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
        EPOLL_CTL_MOD
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

DEF MAXEV = 64
DEF SMALL_FILE = 65536


cdef class Conn:
    cdef public int fd
    cdef public object parser
    cdef public bytearray buf
    cdef public object view
    cdef public object token        # the server's per-connection record
    cdef public object queue
    cdef public str wire_queue
    cdef public str control_name
    cdef public bytes control
    cdef public tuple wanted
    cdef public list files          # [(name, bytearray)]
    cdef bytearray _cur
    cdef public bint busy

    def reset_job(self):
        self.control_name = None
        self.control = None
        self.wanted = None
        self.files = []
        self._cur = None


cdef class FastLoop:
    cdef public int fd
    cdef object _route, _control
    cdef object _config
    cdef dict _conns
    cdef list _out

    def __init__(self, config, route, control):
        self.fd = epoll_create1(EPOLL_CLOEXEC)
        if self.fd < 0:
            raise OSError(errno, "epoll_create1")
        self._config = config
        self._route = route
        self._control = control
        self._conns = {}
        self._out = []

    def add(self, int fd, token):
        cdef Conn c = Conn.__new__(Conn)
        cdef epoll_event ev
        cfg = self._config
        c.fd = fd
        c.parser = _core.ServerParser(max_line=1024, max_control=cfg.max_control_size,
                                      max_job=cfg.max_job_size)
        c.buf = bytearray(4096)
        c.view = memoryview(c.buf)
        c.token = token
        c.queue = None
        c.reset_job()
        ev.events = EPOLLIN
        ev.data.fd = fd
        if epoll_ctl(self.fd, EPOLL_CTL_ADD, fd, &ev) < 0:
            raise OSError(errno, "epoll_ctl")
        self._conns[fd] = c
        self._out = []
        self._run(c)
        return self._take()

    cdef list _take(self):
        out = self._out
        self._out = []
        return out

    def poll(self):
        cdef epoll_event evs[MAXEV]
        cdef int n, i
        n = epoll_wait(self.fd, evs, MAXEV, 0)
        for i in range(n):
            c = self._conns.get(evs[i].data.fd)
            if c is not None:
                self._run(<Conn>c)
        return self._take()

    def resume(self, Conn c):
        """The job's commit returned: the final ack, then read on."""
        cdef epoll_event ev
        c.busy = False
        if not self._ack(c):
            return self._take()
        ev.events = EPOLLIN
        ev.data.fd = c.fd
        epoll_ctl(self.fd, EPOLL_CTL_MOD, c.fd, &ev)
        self._run(c)
        return self._take()

    def finish(self, Conn c, kind):
        """Python is done with c (failed commit, refusal): close it."""
        self._close(c, kind)
        return self._take()

    cdef bint _ack(self, Conn c):
        cdef char z = 0
        if c_write(c.fd, &z, 1) != 1:
            self._close(c, "lost")
            return False
        return True

    cdef void _close(self, Conn c, kind):
        if self._conns.pop(c.fd, None) is None:
            return
        epoll_ctl(self.fd, EPOLL_CTL_DEL, c.fd, NULL)
        c.parser.release()
        c_close(c.fd)
        self._out.append((kind, c))

    cdef void _run(self, Conn c):
        cdef ssize_t n
        cdef object ev
        cdef type t
        cdef epoll_event e
        parser = c.parser
        while True:
            ev = parser.next_event()
            if ev is NEED:
                n = c_read(c.fd, PyByteArray_AS_STRING(c.buf), PyByteArray_GET_SIZE(c.buf))
                if n < 0:
                    if errno == EAGAIN or errno == EINTR:
                        return
                    self._close(c, "lost")
                    return
                parser.receive_data(c.view[:n])
                continue
            t = type(ev)
            if t is T_DC:
                if c._cur is not None:
                    c._cur += ev.data
                continue
            if t is T_CS or t is T_DS:
                if t is T_DS:
                    length = ev.length
                    if length is None or length > SMALL_FILE:
                        self._close(c, "handover")
                        return
                    c._cur = bytearray()
                    c.files.append((ev.name, c._cur))
                if not self._ack(c):
                    return
                continue
            if t is T_RJ:
                if c.queue is None:
                    q = self._route(c, ev.queue)
                    if q is None:
                        self._close(c, "handover")
                        return
                    c.queue, c.wire_queue = q, ev.queue
                if not self._ack(c):
                    return
                continue
            if t is T_CE:
                c.control_name, c.control = ev.name, ev.data
                c.wanted = self._control(c, ev.data)
                if c.wanted is None:
                    self._close(c, "handover")
                    return
            elif t is T_DE:
                c._cur = None
            elif t is T_END:
                self._close(c, "closed" if c.control is None and not c.files else "partial")
                return
            else:
                self._close(c, "handover")
                return
            if c.control is not None and len(c.files) >= len(c.wanted) and self._complete(c):
                c.busy = True
                e.events = 0
                e.data.fd = c.fd
                epoll_ctl(self.fd, EPOLL_CTL_MOD, c.fd, &e)
                self._out.append(("job", c))
                return
            if not self._ack(c):
                return

    cdef bint _complete(self, Conn c):
        names = {f[0] for f in c.files}
        for w in c.wanted:
            if w not in names:
                return False
        return True
