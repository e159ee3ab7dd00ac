# Included by relay/_core.pyx (one extension module; split only to keep files short).
# The sender side: request bytes and the receiver's replies.

# ------------------------------------------------------------- client side

cdef bytes _wire_token(str value, str what):
    """Encode one protocol token; refuse what would break the line framing."""
    cdef bytes raw = value.encode("latin-1")
    cdef unsigned char c
    if not raw:
        raise ValueError("empty %s" % what)
    for c in raw:
        if c <= 0x20 or c == 0x7f:
            raise ValueError("%s %r contains a space or control character" % (what, value))
    return raw


def receive_job(str queue):
    """``\\x02queue\\n``: start a job transfer (RFC 1179 §5.2)."""
    return b"\x02" + _wire_token(queue, "queue name") + b"\n"


def control_header(str name, size):
    """``\\x02<size> <name>\\n``: a control file of exactly ``size`` bytes follows."""
    if size < 1:
        raise ValueError("a control file has at least one byte")
    return b"\x02%d %s\n" % (size, _wire_token(name, "control file name"))


def data_header(str name, size, str mode="count"):
    """``\\x03<count> <name>\\n`` with the count ``mode`` asks for.

    "count" sends the exact size (an empty file gives count 0, which LPRng
    reads as until-EOF), "stream" sends 0 and "windows" 125899906843000; for
    the last two the data runs until the sender half-closes.
    """
    cdef object count
    if mode == "count":
        if size < 0:
            raise ValueError("negative data file size")
        count = size
    elif mode == "stream":
        count = LENGTH_STREAM
    elif mode == "windows":
        count = LENGTH_WINDOWS
    else:
        raise ValueError("unknown data-file mode %r (count, stream, windows)" % (mode,))
    return b"\x03%d %s\n" % (count, _wire_token(name, "data file name"))


def abort_job():
    """``\\x01\\n``: abort the job being transferred."""
    return b"\x01\n"


def print_waiting(str queue):
    """``\\x01queue\\n``: print any waiting jobs."""
    return b"\x01" + _wire_token(queue, "queue name") + b"\n"


def queue_state(str queue, *, bint long=False, items=()):
    """``\\x03``/``\\x04`` queue state (short/long) for optional users or job numbers."""
    cdef list parts = [_wire_token(queue, "queue name")]
    parts.extend([_wire_token(item, "list item") for item in items])
    return (b"\x04" if long else b"\x03") + b" ".join(parts) + b"\n"


def remove_jobs(str queue, str agent, items):
    """``\\x05queue agent [item...]\\n``: remove jobs (lprm)."""
    cdef list parts = [_wire_token(queue, "queue name"), _wire_token(agent, "agent")]
    parts.extend([_wire_token(item, "list item") for item in items])
    return b"\x05" + b" ".join(parts) + b"\n"


@cython.final
cdef class Reply:
    """One answer from a receiver: ``code`` 0 = ok; -1 = closed without one."""

    __match_args__ = ("code", "message")
    cdef readonly int code
    cdef readonly str message

    def __init__(self, *, int code, str message=""):
        self.code = code
        self.message = message

    def __eq__(self, other):
        if type(other) is not Reply:
            return NotImplemented
        return self.code == (<Reply>other).code and self.message == (<Reply>other).message

    def __hash__(self):
        return hash((self.code, self.message))

    def __repr__(self):
        return "Reply(code=%r, message=%r)" % (self.code, self.message)


cdef class ReplyParser:
    """Client side: the receiver's status bytes, with the field's quirks.

    - ``\\x00`` is ok at once; a stray LF after a reply byte ("00 0A") is
      skipped before the next reply.
    - a non-zero byte below 0x20 is an LPRng-style refusal: the code, then
      text up to LF or EOF as the message (cups-lpd sends the bare byte and
      closes: empty message).  Every known receiver closes after a refusal,
      so waiting for the LF or EOF costs nothing.
    - a printable first byte is a BSD plain-text refusal line: code 1 and
      the line as the message.
    - EOF with nothing pending is ``Reply(code=-1, message="connection closed")``.

    A message is cut at 1024 bytes and the rest of its line skipped.
    """

    cdef bytearray _buf
    cdef bint _eof
    cdef bint _skip_line

    def __init__(self):
        self._buf = bytearray()

    def feed(self, data):
        """Add bytes read from the peer; ``b""`` means EOF."""
        if self._eof:
            raise RuntimeError("feed() after EOF")
        if len(data) == 0:
            self._eof = True
            return
        self._buf += data
        if len(self._buf) > 16 * _MAX_REPLY_LINE:
            raise ProtocolError("reply stream too long", reply=None, reason="malformed")

    def take_ok(self, Py_ssize_t most):
        """Consume up to ``most`` buffered ok replies (0x00) in a row; how many.

        A pipelining sender's replies are mostly ok: counting them here costs
        no ``Reply`` per step.  Stops before anything else (a refusal, or
        nothing more buffered): ``next_reply`` reads that one.  Stray line
        ends between them are skipped, as ``next_reply`` skips them.
        """
        cdef bytearray buf = self._buf
        cdef Py_ssize_t i = 0, n = len(buf), k = 0
        cdef unsigned char c
        if self._skip_line:
            return 0
        while i < n and k < most:
            c = buf[i]
            if c == 0:
                k += 1
            elif c != 0x0A and c != 0x0D:
                break
            i += 1
        if i:
            del buf[:i]
        return k

    def next_reply(self):
        """The next ``Reply``, or ``NEED_DATA``."""
        cdef bytearray buf = self._buf
        cdef Py_ssize_t nl, end
        if self._skip_line:
            nl = buf.find(b"\n")
            if nl < 0:
                del buf[:]
                return _NEED if not self._eof else Reply(code=-1, message="connection closed")
            del buf[:nl + 1]
            self._skip_line = False
        while buf and buf[0] in (0x0A, 0x0D):
            del buf[0]  # "00 0A": a stray line end after a reply byte
        if not buf:
            if self._eof:
                return Reply(code=-1, message="connection closed")
            return _NEED
        if buf[0] == 0:
            del buf[0]
            return Reply(code=0, message="")
        nl = buf.find(b"\n")
        if nl < 0 and not self._eof and len(buf) <= _MAX_REPLY_LINE:
            return _NEED
        if 0 <= nl <= _MAX_REPLY_LINE:
            end = nl
            del_to = nl + 1
        else:
            end = min(len(buf), _MAX_REPLY_LINE)
            del_to = end
            self._skip_line = not self._eof
        line = bytes(buf[:end])
        del buf[:del_to]
        return _reply_from_line(line)


cdef object _reply_from_line(bytes line):
    cdef int code
    if 0x20 <= line[0] < 0x7f:
        code = 1  # BSD lpd refuses hosts/ports with a plain text line
        text = line
    else:
        code = line[0]
        text = line[1:]
    return Reply(code=code, message=text.decode("utf-8", "replace").strip())
