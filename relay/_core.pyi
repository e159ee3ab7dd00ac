"""Typed face of the compiled LPD protocol core (relay/_core.pyx).

Sans-I/O: feed bytes, pull events.  See docs/protocol.md for the state
machine, the length rules and each tolerance.
"""

import enum
from collections.abc import Iterable
from typing import Final, Literal, TypeAlias

from typing_extensions import Buffer

class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

NEED_DATA: Final = _NeedData.NEED_DATA

LENGTH_WINDOWS: Final[int]
"""The fake length Windows sends with "LPR byte counting" off (until EOF)."""
LENGTH_STREAM: Final[int]
"""Length 0: the data runs until the sender half-closes (LPRng, CUPS)."""
FAKE_LENGTHS: Final[frozenset[int]]
"""Every data-file count read as "until EOF" whatever max_job is (SPEC §4.2)."""

class Command:
    """A one-shot command: 0x01 print waiting, 0x03/0x04 lpq, 0x05 lprm."""

    __match_args__ = ("code", "queue", "operands")
    @property
    def code(self) -> int: ...
    @property
    def queue(self) -> str: ...
    @property
    def operands(self) -> tuple[str, ...]: ...
    def __init__(self, *, code: int, queue: str, operands: Iterable[str] = ()) -> None: ...

class ReceiveJob:
    """0x02 queue LF: a job transfer session (or a re-sent queue line)."""

    __match_args__ = ("queue",)
    @property
    def queue(self) -> str: ...
    def __init__(self, *, queue: str) -> None: ...

class ControlFileStart:
    """Subcommand 0x02: a control file of ``length`` bytes follows."""

    __match_args__ = ("name", "length")
    @property
    def name(self) -> str: ...
    @property
    def length(self) -> int: ...
    def __init__(self, *, name: str, length: int) -> None: ...

class ControlFileEnd:
    """The whole control file (its trailing NUL not included)."""

    __match_args__ = ("name", "data")
    @property
    def name(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    def __init__(self, *, name: str, data: bytes) -> None: ...

class DataFileStart:
    """Subcommand 0x03: a data file follows; ``length`` None = until EOF."""

    __match_args__ = ("name", "length")
    @property
    def name(self) -> str: ...
    @property
    def length(self) -> int | None: ...
    def __init__(self, *, name: str, length: int | None) -> None: ...

class DataChunk:
    """Body bytes: a slice of the buffer given to receive_data (valid until the next call)."""

    __match_args__ = ("data",)
    @property
    def data(self) -> memoryview: ...
    def __init__(self, *, data: Buffer) -> None: ...

class DataFileEnd:
    """End of a data file: ``size`` body bytes; ``terminated`` = its NUL was seen."""

    __match_args__ = ("name", "size", "terminated")
    @property
    def name(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def terminated(self) -> bool: ...
    def __init__(self, *, name: str, size: int, terminated: bool) -> None: ...

class AbortJob:
    """Subcommand 0x01: forget the job received so far in this session."""

    __match_args__ = ()
    def __init__(self) -> None: ...

class EndOfStream:
    """EOF at a clean boundary: the peer is done."""

    __match_args__ = ()
    def __init__(self) -> None: ...

ServerEvent: TypeAlias = (
    Command | ReceiveJob | ControlFileStart | ControlFileEnd | DataFileStart
    | DataChunk | DataFileEnd | AbortJob | EndOfStream
)

class ServerParser:
    """Server side of an LPD connection: bytes in, events out."""

    def __init__(
        self, *, max_line: int = 1024, max_control: int = 65536, max_job: int = 4 * 2**30
    ) -> None: ...
    def release(self) -> None: ...
    def receive_data(self, data: Buffer) -> None:
        """Feed bytes; ``b""`` means EOF.  Only after NEED_DATA (or first)."""
    def next_event(self) -> ServerEvent | Literal[_NeedData.NEED_DATA]:
        """The next event, or ``NEED_DATA``; raises ProtocolError on a bad stream."""
    @property
    def body_remaining(self) -> int:
        """Bytes still due in a counted data body; -1 in an until-EOF body; else 0."""
    def consume_body(self, n: int) -> None:
        """Account for ``n`` body bytes the caller moved itself (e.g. os.splice)."""
    @property
    def buffered(self) -> int:
        """Size of the internal buffer's content (a partial line or control file)."""

def receive_job(queue: str) -> bytes:
    """``\\x02queue\\n``: start a job transfer."""
def control_header(name: str, size: int) -> bytes:
    """``\\x02<size> <name>\\n``."""
def data_header(name: str, size: int, mode: str = "count") -> bytes:
    """``\\x03<count> <name>\\n`` with the count ``mode`` asks for."""
def abort_job() -> bytes:
    """``\\x01\\n``."""
def print_waiting(queue: str) -> bytes:
    """``\\x01queue\\n``."""
def queue_state(queue: str, *, long: bool = False, items: Iterable[str] = ()) -> bytes:
    """``\\x03``/``\\x04`` queue state, optionally for some users or job numbers."""
def remove_jobs(queue: str, agent: str, items: Iterable[str]) -> bytes:
    """``\\x05queue agent [item...]\\n``."""

class Reply:
    """One answer from a receiver: ``code`` 0 = ok; -1 = closed without one."""

    __match_args__ = ("code", "message")
    @property
    def code(self) -> int: ...
    @property
    def message(self) -> str: ...
    def __init__(self, *, code: int, message: str = "") -> None: ...

class ReplyParser:
    """Client side: the receiver's status bytes, with the field's quirks."""

    def __init__(self) -> None: ...
    def feed(self, data: Buffer) -> None:
        """Add bytes read from the peer; ``b""`` means EOF."""
    def take_ok(self, most: int) -> int:
        """Consume up to ``most`` buffered ok replies (0x00) in a row; how many."""
    def next_reply(self) -> Reply | Literal[_NeedData.NEED_DATA]:
        """The next ``Reply``, or ``NEED_DATA``."""
