"""A plain pure-Python parser of the LPD server stream: the benchmark baseline.

It follows the same rules as ``relay._core.ServerParser`` (docs/protocol.md)
and produces equivalent events as ordinary slotted dataclasses, written the way
one would write it without Cython: ``bytes.find`` for lines, a ``bytearray``
for partial input, ``memoryview`` slices for bodies.  It is used only by the
benchmarks (speed ratio) and by the tests (ids "c"/"py": both parsers must
give the same events), never by the relay itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.errors import ProtocolError

NEED_DATA = "NEED_DATA"
# SPEC §4.2: the only counts that mean "until EOF" whatever max_job is (LPRng
# 0, old CUPS 2**31-1, CUPS mode=stream, Windows byte counting off); any
# other count is exact, however large, unless it is above max_job.
_FAKE = (0, 2147483647, 999999999999, 125899906843000)


@dataclass(slots=True)
class Command:
    code: int
    queue: str
    operands: tuple[str, ...]


@dataclass(slots=True)
class ReceiveJob:
    queue: str


@dataclass(slots=True)
class ControlFileStart:
    name: str
    length: int


@dataclass(slots=True)
class ControlFileEnd:
    name: str
    data: bytes


@dataclass(slots=True)
class DataFileStart:
    name: str
    length: int | None


@dataclass(slots=True)
class DataChunk:
    data: memoryview


@dataclass(slots=True)
class DataFileEnd:
    name: str
    size: int
    terminated: bool


@dataclass(slots=True)
class AbortJob:
    pass


@dataclass(slots=True)
class EndOfStream:
    pass


def _malformed(message: str, reply: int | None = 3) -> ProtocolError:
    return ProtocolError(message, reply=reply, reason="malformed")


def _has_control(raw: bytes) -> bool:
    return any((c < 0x20 and c != 9) or c == 0x7F for c in raw)


def _check_name(raw: bytes, first: bytes) -> str:
    if not 0 < len(raw) <= 255 or raw.startswith(b"."):
        raise _malformed(f"bad file name {raw[:60]!r}")
    if b"/" in raw or b"\\" in raw or _has_control(raw) or b"\t" in raw:
        raise _malformed(f"path-like file name {raw[:60]!r}")
    if not raw.startswith(first):
        raise _malformed(f"file name must start with {first!r}")
    return raw.decode("latin-1")


class ReferenceParser:
    """Same surface as ServerParser: receive_data / next_event / NEED_DATA."""

    def __init__(self, *, max_line: int = 1024, max_control: int = 65536,
                 max_job: int = 4 * 2**30) -> None:
        self.max_line, self.max_control, self.max_job = max_line, max_control, max_job
        self.state = "command"
        self.data = b""
        self.pos = 0
        self.eof = False
        self.partial = bytearray()
        self.name = ""
        self.remaining = 0
        self.size = 0
        self.control = b""

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof:
            raise RuntimeError("receive_data() after EOF")
        self.data = data if type(data) is bytes else bytes(data)
        self.pos = 0
        if not len(data):
            self.eof = True

    def next_event(self) -> Any:
        while True:
            event = getattr(self, "_" + self.state)()
            if event is not None:
                return event

    def _line(self) -> bytes | None:
        """A whole line (CR LF stripped), None when more data is needed."""
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            self.partial += self.data[self.pos:]
            self.pos = len(self.data)
            if len(self.partial) > self.max_line:
                raise _malformed("command line too long")
            return None
        line = bytes(self.partial) + self.data[self.pos:end]
        self.partial.clear()
        self.pos = end + 1
        if len(line) > self.max_line:
            raise _malformed("command line too long")
        return line[:-1] if line.endswith(b"\r") else line

    def _at_line(self) -> bytes | str | None:
        if self.pos == len(self.data):
            if not self.eof:
                return NEED_DATA
            if self.partial:
                raise _malformed("connection closed inside a command line", None)
            self.state = "closed"
            return None
        return self._line()

    def _command(self) -> Any:
        line = self._at_line()
        if not isinstance(line, bytes):
            return line
        if not line:
            raise _malformed("empty command line")
        code, rest = line[0], line[1:]
        if _has_control(rest) or not 1 <= code <= 6:
            raise _malformed("bad command line")
        tokens = [t.decode("latin-1") for t in rest.replace(b"\t", b" ").split()]
        if not tokens or (code == 2 and len(tokens) != 1) or (code == 5 and len(tokens) < 2) \
                or (code == 6 and len(tokens) < 3):
            raise _malformed("bad command operands")
        if code == 2:
            self.state = "subcommand"
            return ReceiveJob(queue=tokens[0])
        self.state = "drain"
        return Command(code=code, queue=tokens[0], operands=tuple(tokens[1:]))

    def _subcommand(self) -> Any:
        line = self._at_line()
        if not isinstance(line, bytes):
            return line
        if not line or _has_control(line[1:]):
            raise _malformed("bad subcommand line")
        if line[0] == 1:
            return AbortJob()
        tokens = line[1:].replace(b"\t", b" ").split()
        if line[0] not in (2, 3) or not 1 <= len(tokens) <= 2:
            raise _malformed("bad subcommand line")
        if not tokens[0].isdigit():
            if line[0] == 2 and len(tokens) == 1:
                return ReceiveJob(queue=tokens[0].decode("latin-1"))  # re-sent queue line
            raise _malformed("bad file length")
        if len(tokens) == 1:
            raise _malformed("subcommand without a file name")
        count = int(tokens[0])
        fake = count in _FAKE
        if line[0] == 2:
            self.name = _check_name(tokens[1], b"c")
            if fake:
                raise _malformed("control file with a fake length")
            if count > self.max_control:
                raise ProtocolError("control file too large", reason="too_large")
            self.remaining, self.state = count, "control_body"
            return ControlFileStart(name=self.name, length=count)
        self.name = _check_name(tokens[1], b"d")
        self.size = 0
        if fake or count > self.max_job:
            self.state = "data_stream"
            return DataFileStart(name=self.name, length=None)
        self.remaining, self.state = count, "data_body"
        return DataFileStart(name=self.name, length=count)

    def _control_body(self) -> Any:
        take = self.data[self.pos:self.pos + self.remaining - len(self.partial)]
        self.partial += take
        self.pos += len(take)
        if len(self.partial) < self.remaining:
            if self.eof:
                raise _malformed("connection closed inside a control file", None)
            return NEED_DATA
        self.control = bytes(self.partial)
        self.partial.clear()
        self.state = "trailer"
        return None

    def _data_body(self) -> Any:
        if self.pos == len(self.data):
            if self.eof:
                raise _malformed("connection closed inside a data file", None)
            return NEED_DATA
        chunk = memoryview(self.data)[self.pos:self.pos + self.remaining]
        self.pos += len(chunk)
        self.remaining -= len(chunk)
        self.size += len(chunk)
        if not self.remaining:
            self.state = "trailer"
        return DataChunk(data=chunk)

    def _data_stream(self) -> Any:
        if self.pos == len(self.data):
            if self.eof:
                self.state = "subcommand"
                return DataFileEnd(name=self.name, size=self.size, terminated=False)
            return NEED_DATA
        chunk = memoryview(self.data)[self.pos:]
        self.pos = len(self.data)
        self.size += len(chunk)
        if self.size > self.max_job:
            raise ProtocolError("data file too large", reason="too_large")
        return DataChunk(data=chunk)

    def _trailer(self) -> Any:
        if self.pos < len(self.data):
            byte = self.data[self.pos]
            if byte not in (0, 1, 2, 3):
                raise _malformed("no NUL after a file")
            self.pos += byte == 0
            terminated = byte == 0
        elif self.eof:
            terminated = False
        else:
            return NEED_DATA
        self.state = "subcommand"
        if self.control:
            data, self.control = self.control, b""
            return ControlFileEnd(name=self.name, data=data)
        return DataFileEnd(name=self.name, size=self.size, terminated=terminated)

    def _drain(self) -> Any:
        self.pos = len(self.data)
        if self.eof:
            self.state = "closed"
            return None
        return NEED_DATA

    def _closed(self) -> Any:
        return EndOfStream()
