# Included by relay/_core.pyx (one extension module; split only to keep files short).
# The server-side events: immutable values, cheap to create.

# --------------------------------------------------------------------- events

# Events are values: compared, hashed and shown by the fields named in
# __match_args__.  They hold only str/bytes/int/tuple/memoryview, so they
# cannot be part of a reference cycle (no_gc), and they are allocated from
# small freelists (a job makes about seven).

cdef tuple _values(object ev):
    return tuple([getattr(ev, name) for name in type(ev).__match_args__])


cdef object _event_eq(object a, object b, bint equal):
    if type(b) is not type(a):
        return NotImplemented
    return (_values(a) == _values(b)) == equal


cdef Py_hash_t _event_hash(object ev) except -1:
    # A writable memoryview is unhashable; its content is hashed instead.
    return hash((type(ev).__name__,) + tuple([bytes(v) if type(v) is memoryview else v
                                              for v in _values(ev)]))


cdef str _event_repr(object ev):
    fields = ", ".join([f"{n}={v!r}" for n, v in zip(type(ev).__match_args__, _values(ev))])
    return f"{type(ev).__name__}({fields})"


# Each event class repeats its four dunder methods instead of inheriting them
# from a shared base: Cython allows a freelist only on a base type, and the
# freelist (no malloc per event) is what makes small jobs cheap to parse.

@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class Command:
    """A one-shot command: 0x01 print waiting, 0x03/0x04 lpq, 0x05 lprm, 0x06 lpc.

    For 0x06 (LPRng) the operands are the user, the operation and its options.
    """

    __match_args__ = ("code", "queue", "operands")
    cdef readonly int code
    cdef readonly str queue
    cdef readonly tuple operands

    def __init__(self, *, int code, str queue, operands=()):
        self.code = code
        self.queue = queue
        self.operands = tuple(operands)
        if not all(type(op) is str for op in self.operands):
            raise TypeError("operands must be strings")

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class ReceiveJob:
    """0x02 queue LF: a job transfer session (or a re-sent queue line)."""

    __match_args__ = ("queue",)
    cdef readonly str queue

    def __init__(self, *, str queue):
        self.queue = queue

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class ControlFileStart:
    """Subcommand 0x02: a control file of ``length`` bytes follows."""

    __match_args__ = ("name", "length")
    cdef readonly str name
    cdef readonly object length

    def __init__(self, *, str name, length):
        self.name = name
        self.length = int(length)

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class ControlFileEnd:
    """The whole control file (its trailing NUL not included)."""

    __match_args__ = ("name", "data")
    cdef readonly str name
    cdef readonly bytes data

    def __init__(self, *, str name, bytes data):
        self.name = name
        self.data = data

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class DataFileStart:
    """Subcommand 0x03: a data file follows; ``length`` None = until EOF."""

    __match_args__ = ("name", "length")
    cdef readonly str name
    cdef readonly object length

    def __init__(self, *, str name, length):
        self.name = name
        self.length = None if length is None else int(length)

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class DataChunk:
    """Body bytes: a slice of the buffer given to receive_data (valid until the next call)."""

    __match_args__ = ("data",)
    cdef readonly object data

    def __init__(self, *, data):
        self.data = data if type(data) is memoryview else memoryview(data)

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)


    def __repr__(self):
        cdef Py_ssize_t n = len(self.data)
        head = bytes(self.data[:32])
        return "DataChunk(data=<%d bytes: %r%s>)" % (n, head, "..." if n > 32 else "")


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class DataFileEnd:
    """End of a data file: ``size`` body bytes; ``terminated`` = its NUL was seen."""

    __match_args__ = ("name", "size", "terminated")
    cdef readonly str name
    cdef readonly object size
    cdef readonly bint terminated

    def __init__(self, *, str name, size, bint terminated):
        self.name = name
        self.size = int(size)
        self.terminated = terminated

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class AbortJob:
    """Subcommand 0x01: forget the job received so far in this session."""

    __match_args__ = ()

    def __init__(self):
        pass

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)


@cython.final
@cython.no_gc
@cython.freelist(8)
cdef class EndOfStream:
    """EOF at a clean boundary: the peer is done."""

    __match_args__ = ()

    def __init__(self):
        pass

    def __eq__(self, other):
        return _event_eq(self, other, True)

    def __ne__(self, other):
        return _event_eq(self, other, False)

    def __hash__(self):
        return _event_hash(self)

    def __repr__(self):
        return _event_repr(self)
