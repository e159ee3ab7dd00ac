# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The sans-I/O LPD protocol core (RFC 1179 as real senders speak it).

Everything protocol-shaped lives here and nothing else does: no sockets, no
trio, no files, no clock, no logging.  The server feeds bytes with
``ServerParser.receive_data()`` and pulls events with ``next_event()`` until
it gets ``NEED_DATA`` (the h11 model); the client side is a handful of header
builders plus ``ReplyParser`` for the peer's status bytes.

Why Cython: a relay sees every byte of every job.  Command lines are parsed
in C, events are cheap immutable extension objects, and data-file bodies are
handed out as ``memoryview`` slices of the caller's own buffer, so bulk data
is never copied here (``consume_body()`` even lets the I/O layer move it with
``os.splice`` without the parser seeing it).  Only a partial command line or
a partial control file is copied, into one small buffer bounded by
``max_line`` / ``max_control``.

Every refusal is a ``relay.errors.ProtocolError`` carrying the reply byte and
a bounded reason.  One extension module, in four files: this one (the
server's state machine), ``_events.pxi`` (the event values), ``_wire.pxi``
(byte-level checks shared by both sides) and ``_client.pxi`` (the sender's
bytes and ``ReplyParser``), joined with Cython's ``include``.  The state machine, the length rules and each tolerance
(with the sender it exists for) are described in docs/protocol.md.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.memoryview cimport PyMemoryView_Check, PyMemoryView_FromObject, PyMemoryView_GET_BUFFER
from cpython.unicode cimport PyUnicode_DecodeLatin1
from libc.string cimport memchr, memcpy

import enum
from relay.errors import REPLY_BAD_JOB, ProtocolError

# Fake data-file lengths that mean "until the sender closes" (SPEC §4.2,
# FIELD-NOTES): Windows with "LPR byte counting" off sends 125899906843000,
# CUPS mode=stream 999999999999 or 2147483647 on old builds, and LPRng
# piping stdin sends 0.  A count above max_job means the same; every other
# count is exact (see _is_fake_length in _wire.pxi).
LENGTH_WINDOWS = 125899906843000
LENGTH_STREAM = 0
FAKE_LENGTHS = frozenset((0, 2147483647, 999999999999, 125899906843000))
cdef long long _INT32_MAX = 2147483647
cdef long long _CUPS_STREAM = 999999999999
cdef long long _WINDOWS_FAKE = 125899906843000
# Counts are saturated here while parsing digits; a count this big is above
# any max_job (the configuration bounds max_job_size far below it).
cdef long long _COUNT_CAP = 1LL << 60
# RFC 1179 file names are short ("cfA123host"); longer ones smell of abuse.
cdef Py_ssize_t _MAX_NAME = 255
# A refused reply line is bounded too; lpq text is never read by ReplyParser.
cdef Py_ssize_t _MAX_REPLY_LINE = 1024


class _NeedData(enum.Enum):
    """Type of the ``NEED_DATA`` sentinel (an enum so type checkers can narrow)."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self):
        return "NEED_DATA"

    def __str__(self):
        return "NEED_DATA"


NEED_DATA = _NeedData.NEED_DATA
cdef object _NEED = NEED_DATA


include "_events.pxi"
include "_wire.pxi"

# ------------------------------------------------------------- server side

cdef enum State:
    ST_COMMAND          # first line of the connection
    ST_SUBCOMMAND       # inside 0x02: subcommand lines
    ST_CONTROL_BODY     # counted control file, copied to the buffer
    ST_DATA_BODY        # counted data file, handed out as slices
    ST_DATA_STREAM      # data file that runs until EOF
    ST_TRAILER          # the NUL after a counted file
    ST_DRAIN            # after a one-shot command: discard until EOF
    ST_CLOSED           # EndOfStream delivered
    ST_ERROR            # a ProtocolError was raised


cdef class ServerParser:
    """Server side of one LPD connection: bytes in, events out.

    ``receive_data(buf)`` (``b""`` = EOF) is allowed first and after each
    ``NEED_DATA``; ``next_event()`` returns one event at a time or raises
    ``ProtocolError``.  ``DataChunk.data`` slices ``buf`` itself, so ``buf``
    must not be reused until the parser has asked for more data and the
    chunks have been written.  Bounds: ``max_line`` per command line,
    ``max_control`` per control file, ``max_job`` per data file.
    """

    cdef int _state
    cdef Py_ssize_t _max_line
    cdef Py_ssize_t _max_control
    cdef long long _max_job
    # The caller's current buffer: a reference is kept, and for non-bytes
    # objects a buffer export pins the memory, until the input is consumed.
    cdef object _data
    cdef object _mv
    cdef Py_buffer _view
    cdef bint _has_view
    cdef const unsigned char* _ptr
    cdef Py_ssize_t _len
    cdef Py_ssize_t _pos
    cdef bint _eof
    cdef bint _want_data
    # The small internal buffer: a partial line or a partial control file.
    cdef unsigned char* _buf
    cdef Py_ssize_t _buf_len
    cdef Py_ssize_t _buf_cap
    # The file being received.
    cdef str _name
    cdef bint _is_control
    cdef long long _remaining
    cdef long long _size
    cdef bytes _control

    def __init__(self, *, Py_ssize_t max_line=1024, Py_ssize_t max_control=65536,
                 long long max_job=4 * 2**30):
        if max_line < 2 or max_control < 1 or max_job < 1:
            raise ValueError("max_line, max_control and max_job must be positive")
        self._max_line = max_line
        self._max_control = max_control
        # Counts saturate at _COUNT_CAP; a bound at or above it would let a
        # saturated (absurd) count pass as exact, so it is clamped below.
        self._max_job = max_job if max_job < _COUNT_CAP else _COUNT_CAP - 1
        self._state = ST_COMMAND
        self._want_data = True

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
        PyMem_Free(self._buf)

    # -- public surface

    def release(self):
        """Drop the caller's buffer (its reference and export): the connection ended.

        Afterwards the parser holds nothing of the caller's, so a reference
        cycle through an exception's traceback cannot leave a buffer export
        for the garbage collector to trip over ("memoryview has 1 exported
        buffer"); the parser is not fed again.
        """
        self._release()

    def receive_data(self, data):
        """Feed bytes; ``b""`` means EOF.  Only after NEED_DATA (or first)."""
        if self._state == ST_ERROR:
            raise RuntimeError("receive_data() after a ProtocolError")
        if self._eof:
            raise RuntimeError("receive_data() after EOF")
        if not self._want_data:
            raise RuntimeError("receive_data() before next_event() returned NEED_DATA")
        if PyBytes_CheckExact(data):
            self._ptr = <const unsigned char*>PyBytes_AS_STRING(data)
            self._len = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &self._view, PyBUF_SIMPLE)
            self._has_view = True
            self._ptr = <const unsigned char*>self._view.buf
            self._len = self._view.len
        self._data = data
        self._pos = 0
        self._want_data = False
        if self._len == 0:
            self._eof = True

    def next_event(self):
        """The next event, or ``NEED_DATA``; raises ProtocolError on a bad stream."""
        if self._state == ST_ERROR:
            raise RuntimeError("next_event() after a ProtocolError")
        if self._want_data:
            return _NEED
        try:
            return self._next()
        except ProtocolError:
            self._state = ST_ERROR
            self._release()
            raise

    @property
    def body_remaining(self):
        """Bytes still due in a counted data body; -1 in an until-EOF body; else 0."""
        if self._state == ST_DATA_BODY:
            return self._remaining
        if self._state == ST_DATA_STREAM:
            return -1
        return 0

    def consume_body(self, long long n):
        """Account for ``n`` body bytes the caller moved itself (e.g. os.splice).

        Only between NEED_DATA and the next receive_data(), inside a body.
        """
        if n < 0:
            raise ValueError("negative byte count")
        if n == 0:
            return
        if not self._want_data or self._eof:
            raise RuntimeError("consume_body() only after next_event() returned NEED_DATA")
        if self._state == ST_DATA_BODY:
            if n > self._remaining:
                raise ValueError("consume_body(%d) beyond the %d bytes due" % (n, self._remaining))
            self._remaining -= n
            self._size += n
            if self._remaining == 0:
                self._state = ST_TRAILER
        elif self._state == ST_DATA_STREAM:
            if self._size + n > self._max_job:
                self._state = ST_ERROR
                raise ProtocolError("data file exceeds max_job", reply=REPLY_BAD_JOB,
                                    reason="too_large")
            self._size += n
        else:
            raise RuntimeError("consume_body() outside a data-file body")

    @property
    def buffered(self):
        """Size of the internal buffer's content (a partial line or control file)."""
        return self._buf_len

    # -- the loop: each reader returns an event, None (go on) or _NEED

    cdef object _next(self):
        cdef object ev
        while True:
            if self._state == ST_DATA_BODY:
                ev = self._read_data_body()
            elif self._state == ST_SUBCOMMAND:
                ev = self._read_line(True)
            elif self._state == ST_TRAILER:
                ev = self._read_trailer()
            elif self._state == ST_CONTROL_BODY:
                ev = self._read_control_body()
            elif self._state == ST_DATA_STREAM:
                ev = self._read_data_stream()
            elif self._state == ST_COMMAND:
                ev = self._read_line(False)
            elif self._state == ST_DRAIN:
                ev = self._read_drain()
            else:
                return EndOfStream.__new__(EndOfStream)
            if ev is not None:
                if ev is _NEED:
                    self._release()
                    self._want_data = True
                return ev

    cdef void _release(self) noexcept:
        self._data = None
        self._mv = None
        self._ptr = NULL
        self._len = 0
        self._pos = 0
        if self._has_view:
            self._has_view = False
            PyBuffer_Release(&self._view)

    cdef object _slice(self, Py_ssize_t start, Py_ssize_t end):
        """A memoryview of the caller's bytes [start, end) (whole buffer = no slice)."""
        cdef object mv = self._mv
        cdef Py_buffer* view
        if mv is None:
            mv = self._data if PyMemoryView_Check(self._data) else PyMemoryView_FromObject(self._data)
            view = PyMemoryView_GET_BUFFER(mv)
            if view.ndim != 1 or view.itemsize != 1 or (
                    view.format != NULL and (view.format[0] != 66 or view.format[1] != 0)):
                mv = mv.cast("B")  # bodies are sliced in bytes: 1-D, format "B"
            self._mv = mv
        if start == 0 and end == self._len:
            return mv
        return mv[start:end]

    cdef int _append(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef unsigned char* grown
        if self._buf_len + n > self._buf_cap:
            cap = self._buf_cap * 2 if self._buf_cap else 256
            while cap < self._buf_len + n:
                cap *= 2
            grown = <unsigned char*>PyMem_Realloc(self._buf, cap)
            if grown == NULL:
                raise MemoryError()
            self._buf = grown
            self._buf_cap = cap
        memcpy(self._buf + self._buf_len, p, n)
        self._buf_len += n
        return 0

    cdef int _take_line(self, const unsigned char** line, Py_ssize_t* n) except -1:
        """1 and the line (LF excluded, CR stripped) when whole; 0 = need more.

        The caller resets ``_buf_len`` once it has used the line.  EOF is the
        caller's business (pos == len).
        """
        cdef const unsigned char* start = self._ptr + self._pos
        cdef Py_ssize_t avail = self._len - self._pos
        cdef const unsigned char* nl = <const unsigned char*>memchr(start, 10, avail)
        cdef Py_ssize_t k
        if nl == NULL:
            if self._buf_len + avail > self._max_line:
                raise _malformed("command line longer than %d bytes" % self._max_line)
            self._append(start, avail)
            self._pos = self._len
            return 0
        k = nl - start
        if self._buf_len + k > self._max_line:
            raise _malformed("command line longer than %d bytes" % self._max_line)
        self._pos += k + 1
        if self._buf_len == 0:
            line[0] = start
        else:
            self._append(start, k)
            line[0] = self._buf
            k = self._buf_len
        # Some senders end lines with CR LF; the CR is not part of the line.
        if k and line[0][k - 1] == 13:
            k -= 1
        n[0] = k
        return 1

    cdef object _eof_in_line(self):
        """EOF while waiting for a line: clean at a boundary, else a cut stream."""
        if self._buf_len:
            raise _malformed("connection closed inside a command line", None)
        self._state = ST_CLOSED
        return EndOfStream.__new__(EndOfStream)

    cdef object _read_line(self, bint subcommand):
        """A command (outside a job) or subcommand (inside 0x02) line, then its event."""
        cdef const unsigned char* p
        cdef Py_ssize_t n
        if self._pos == self._len:
            return self._eof_in_line() if self._eof else _NEED
        if not self._take_line(&p, &n):
            return None
        try:
            return self._on_subcommand(p, n) if subcommand else self._on_command(p, n)
        finally:
            self._buf_len = 0

    cdef object _on_command(self, const unsigned char* p, Py_ssize_t n):
        cdef unsigned char code
        cdef list tokens
        cdef ReceiveJob rj
        cdef Command cmd
        if n == 0:
            raise _malformed("empty command line")
        code = p[0]
        _check_clean(p + 1, n - 1)
        if code == 0x07:
            # LPRng block transfer: one ack for a whole job in one counted
            # block; our per-file events and acks do not fit it.  LPRng only
            # uses it when configured to (send_block_format), so refuse.
            raise _malformed("LPRng block transfer (0x07) is not supported")
        if code < 0x01 or code > 0x06:
            raise _malformed("unknown command byte 0x%02x" % code)
        tokens = _tokens(p + 1, n - 1)
        if not tokens:
            raise _malformed("command 0x%02x without a queue name" % code)
        if code == 0x02:
            # LPRng: "\2queue\n" takes exactly one operand.
            if len(tokens) != 1:
                raise _malformed("receive-job line with extra operands " + _shown(p, n))
            self._state = ST_SUBCOMMAND
            rj = ReceiveJob.__new__(ReceiveJob)
            rj.queue = tokens[0]
            return rj
        if code == 0x05 and len(tokens) < 2:
            raise _malformed("remove-jobs line without an agent")
        # LPRng's control request (lpc): "\6queue user operation [options]".
        if code == 0x06 and len(tokens) < 3:
            raise _malformed("control request without a user and an operation")
        # 0x01/0x03/0x04/0x05/0x06 are one-shot: the server answers and closes.
        self._state = ST_DRAIN
        cmd = Command.__new__(Command)
        cmd.code = code
        cmd.queue = tokens[0]
        cmd.operands = tuple(tokens[1:])
        return cmd


    cdef object _on_subcommand(self, const unsigned char* p, Py_ssize_t n):
        cdef unsigned char code
        cdef Py_ssize_t i = 1, c0, c1, n0, n1
        cdef long long count
        if n == 0:
            raise _malformed("empty subcommand line")
        code = p[0]
        _check_clean(p + 1, n - 1)
        if code == 0x01:
            return AbortJob.__new__(AbortJob)
        if code != 0x02 and code != 0x03:
            raise _malformed("unknown subcommand byte 0x%02x" % code)
        # "<count> SP <name>", tokens found in place (no list, no copies).
        while i < n and _is_sep(p[i]):
            i += 1
        c0 = i
        while i < n and not _is_sep(p[i]):
            i += 1
        c1 = i
        while i < n and _is_sep(p[i]):
            i += 1
        n0 = i
        while i < n and not _is_sep(p[i]):
            i += 1
        n1 = i
        while i < n and _is_sep(p[i]):
            i += 1
        if i != n or c1 == c0:
            raise _malformed("bad subcommand line " + _shown(p, n))
        count = _parse_count(p + c0, c1 - c0)
        if count < 0:
            if code == 0x02 and n1 == n0:
                # Old senders (Apple Desktop Printing, per LPRng) re-send
                # "\2queue\n" mid-job; LPRng tolerates it, so do we.
                return self._resent_queue(p + c0, c1 - c0)
            raise _malformed("bad file length in " + _shown(p, n))
        if n1 == n0:
            raise _malformed("subcommand without a file name " + _shown(p, n))
        if code == 0x02:
            return self._start_control(p + n0, n1 - n0, count)
        return self._start_data(p + n0, n1 - n0, count)

    cdef object _resent_queue(self, const unsigned char* p, Py_ssize_t n):
        cdef ReceiveJob rj = ReceiveJob.__new__(ReceiveJob)
        rj.queue = _latin1(p, n)
        return rj

    cdef object _start_control(self, const unsigned char* p, Py_ssize_t n, long long count):
        cdef ControlFileStart ev
        _check_name(p, n, 0x63)  # 'c'
        if _is_fake_length(count):
            # Only data files may run until EOF; a control file must be counted.
            raise _malformed("control file with length %d" % count)
        if count > self._max_control:
            raise ProtocolError("control file of %d bytes exceeds max_control" % count,
                                reply=REPLY_BAD_JOB, reason="too_large")
        self._name = _latin1(p, n)
        self._is_control = True
        self._remaining = count
        self._size = 0
        self._state = ST_CONTROL_BODY
        ev = ControlFileStart.__new__(ControlFileStart)
        ev.name = self._name
        ev.length = count
        return ev

    cdef object _start_data(self, const unsigned char* p, Py_ssize_t n, long long count):
        cdef DataFileStart ev
        _check_name(p, n, 0x64)  # 'd'
        self._name = _latin1(p, n)
        self._is_control = False
        self._size = 0
        ev = DataFileStart.__new__(DataFileStart)
        ev.name = self._name
        if _is_fake_length(count) or count > self._max_job:
            # A count above max_job is read as "until EOF" too (SPEC §4.2):
            # the job is kept if what really arrives fits, and refused
            # (too_large) as soon as the body grows past max_job.
            self._remaining = -1
            self._state = ST_DATA_STREAM
            ev.length = None
        else:
            self._remaining = count
            self._state = ST_DATA_BODY
            ev.length = count
        return ev

    cdef object _read_control_body(self):
        cdef Py_ssize_t avail = self._len - self._pos
        cdef Py_ssize_t need = <Py_ssize_t>self._remaining - self._buf_len
        if self._buf_len == 0 and avail >= need:
            # The usual case: the whole control file is in this buffer.
            self._control = PyBytes_FromStringAndSize(<const char*>(self._ptr + self._pos), need)
            self._pos += need
        else:
            if avail == 0:
                if self._eof:
                    raise _malformed("connection closed inside control file %r" % self._name,
                                     None)
                return _NEED
            if avail > need:
                avail = need
            self._append(self._ptr + self._pos, avail)
            self._pos += avail
            if self._buf_len < self._remaining:
                return None
            self._control = PyBytes_FromStringAndSize(<const char*>self._buf, self._buf_len)
            self._buf_len = 0
        self._size = self._remaining
        self._remaining = 0
        self._state = ST_TRAILER
        return None

    cdef object _read_data_body(self):
        cdef Py_ssize_t avail = self._len - self._pos
        cdef Py_ssize_t take
        cdef DataChunk ev
        if avail == 0:
            if self._eof:
                # A plausible count cut short is a truncated job (SPEC §4.2).
                raise _malformed("connection closed with %d bytes of %r still due"
                                 % (self._remaining, self._name), None)
            return _NEED
        take = avail if avail < self._remaining else <Py_ssize_t>self._remaining
        ev = DataChunk.__new__(DataChunk)
        ev.data = self._slice(self._pos, self._pos + take)
        self._pos += take
        self._remaining -= take
        self._size += take
        if self._remaining == 0:
            self._state = ST_TRAILER
        return ev

    cdef object _read_data_stream(self):
        cdef Py_ssize_t avail = self._len - self._pos
        cdef DataChunk ev
        if avail == 0:
            if self._eof:
                # Until-EOF bodies are kept byte for byte: a final NUL, if
                # the sender wrote one, stays in the data (we cannot tell it
                # from content).
                self._state = ST_SUBCOMMAND
                return self._data_end(False)
            return _NEED
        if self._size + avail > self._max_job:
            raise ProtocolError("data file %r exceeds max_job" % self._name,
                                reply=REPLY_BAD_JOB, reason="too_large")
        ev = DataChunk.__new__(DataChunk)
        ev.data = self._slice(self._pos, self._len)
        self._pos = self._len
        self._size += avail
        return ev

    cdef object _read_trailer(self):
        cdef bint terminated
        cdef unsigned char c
        if self._pos < self._len:
            c = self._ptr[self._pos]
            if c == 0:
                self._pos += 1
                terminated = True
            elif c == 0x01 or c == 0x02 or c == 0x03:
                # Missing NUL, next subcommand already here: tolerated, the
                # byte stays for the subcommand reader.
                terminated = False
            else:
                raise _malformed("byte 0x%02x where the NUL after %r was due" % (c, self._name))
        elif self._eof:
            terminated = False  # missing NUL before EOF (LPRng accepts it too)
        else:
            return _NEED
        self._state = ST_SUBCOMMAND
        if self._is_control:
            return self._control_end()
        return self._data_end(terminated)

    cdef object _control_end(self):
        cdef ControlFileEnd ev = ControlFileEnd.__new__(ControlFileEnd)
        ev.name = self._name
        ev.data = self._control
        self._control = None
        return ev

    cdef object _data_end(self, bint terminated):
        cdef DataFileEnd ev = DataFileEnd.__new__(DataFileEnd)
        ev.name = self._name
        ev.size = self._size
        ev.terminated = terminated
        return ev

    cdef object _read_drain(self):
        # After a one-shot command nothing more is meaningful: discard
        # whatever arrives (nothing is buffered) until the peer closes.
        self._pos = self._len
        if self._eof:
            self._state = ST_CLOSED
            return EndOfStream.__new__(EndOfStream)
        return _NEED


include "_client.pxi"
