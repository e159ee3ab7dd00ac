# Included by relay/_core.pyx (one extension module; split only to keep files short).
# Byte-level helpers shared by the server and client sides: names, tokens, counts.

# ---------------------------------------------------------------- helpers

cdef inline object _malformed(str message, object reply=REPLY_BAD_JOB):
    return ProtocolError(message, reply=reply, reason="malformed")


cdef inline str _latin1(const unsigned char* p, Py_ssize_t n):
    return PyUnicode_DecodeLatin1(<const char*>p, n, NULL)


cdef str _shown(const unsigned char* p, Py_ssize_t n):
    """A short printable rendering of wire bytes for error messages."""
    cdef bytes raw = PyBytes_FromStringAndSize(<const char*>p, n if n < 60 else 60)
    return repr(raw) + ("..." if n > 60 else "")


cdef inline bint _is_ctl(unsigned char c) noexcept nogil:
    return c < 0x20 or c == 0x7f


cdef inline bint _is_sep(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x09


cdef int _check_clean(const unsigned char* p, Py_ssize_t n) except -1:
    """Refuse control characters in a command line (spaces and tabs separate)."""
    cdef Py_ssize_t i
    for i in range(n):
        if _is_ctl(p[i]) and p[i] != 0x09:
            raise _malformed("control character in command line " + _shown(p, n))
    return 0


cdef list _tokens(const unsigned char* p, Py_ssize_t n):
    """Split on spaces/tabs and decode latin-1 (the line is already clean)."""
    cdef list out = []
    cdef Py_ssize_t i = 0, start
    while i < n:
        while i < n and _is_sep(p[i]):
            i += 1
        start = i
        while i < n and not _is_sep(p[i]):
            i += 1
        if i > start:
            out.append(_latin1(p + start, i - start))
    return out


cdef int _check_name(const unsigned char* p, Py_ssize_t n, unsigned char first) except -1:
    """Refuse a file name that could act as a path (SPEC §4.3).

    Names are never used as paths by the relay, but a name that could be one
    is a hostile or broken sender either way.  ``first`` is the required
    first letter: 'c' for control files, 'd' for data files ("cfA", "dfA",
    and the HP-style "cA"/"dA" forms all pass).
    """
    cdef Py_ssize_t i
    if n == 0 or n > _MAX_NAME:
        raise _malformed("bad file name length %d" % n)
    if p[0] == 0x2e:  # ".", ".." and hidden names
        raise _malformed("file name starts with '.': " + _shown(p, n))
    for i in range(n):
        if p[i] == 0x2f or p[i] == 0x5c or _is_ctl(p[i]):
            raise _malformed("path-like file name " + _shown(p, n))
    if p[0] != first:
        raise _malformed("file name must start with %r: %s" % (chr(first), _shown(p, n)))
    return 0


cdef long long _parse_count(const unsigned char* p, Py_ssize_t n) noexcept:
    """Digits to a count (saturating at _COUNT_CAP); -1 when not all digits."""
    cdef long long value = 0
    cdef Py_ssize_t i
    if n == 0:
        return -1
    for i in range(n):
        if p[i] < 0x30 or p[i] > 0x39:
            return -1
        if value < _COUNT_CAP:
            value = value * 10 + (p[i] - 0x30)
    return value if value < _COUNT_CAP else _COUNT_CAP


cdef inline bint _is_fake_length(long long count) noexcept:
    # SPEC §4.2: the "until the sender closes" forms real senders put in a
    # header, and only these: LPRng piping stdin (0), old CUPS mode=stream
    # (2**31-1), CUPS mode=stream (999999999999), Windows with "LPR byte
    # counting" off (125899906843000).  Any other count is exact however
    # large: jobs of 4 GiB and more are real (an earlier ">= 2**32 is fake"
    # rule left such senders waiting for an ack that came only at EOF).
    return (count == 0 or count == _INT32_MAX or count == _CUPS_STREAM
            or count == _WINDOWS_FAKE)
