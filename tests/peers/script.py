"""How the RecordingLpdServer answers (LpdScript) and what it recorded.

Values only: a test builds an LpdScript to make the receiver misbehave the
ways real receivers do, and reads RecordedConnection to see every byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

REPLY_STEPS = ("job", "control_header", "control_file", "data_header", "data_file")


def lprng_error(code: int, message: str) -> bytes:
    """A refusal the way LPRng sends it: the code byte, one text line."""
    return bytes([code]) + message.encode() + b"\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class LpdScript:
    """How a RecordingLpdServer answers; the default is a well-behaved receiver.

    Reply steps, in protocol order: ``job`` (after ``02 queue``),
    ``control_header``/``data_header`` (after a ``02``/``03`` file line),
    ``control_file``/``data_file`` (after the file's bytes). ``replies`` maps a
    step to the bytes sent there (default ``b"\\x00"``), or to a list of them
    indexed by connection number (the last repeats): ``[b"\\x02", b"\\x00"]``
    refuses the first attempt and accepts every later one.
    """

    replies: Mapping[str, bytes | Sequence[bytes]] = field(default_factory=dict)
    trailing: bytes = b""          # sent after every reply, e.g. b"\n" (stray LF)
    delay: float = 0.0             # seconds before each reply
    silent_at: str | None = None   # at this step: never reply, keep the connection
    close_at: str | None = None    # at this step: close without replying
    close_after_refusal: bool = True   # LPRng closes after a non-zero reply
    queues: frozenset[str] | None = None   # None: any queue; else others get 0x01
    status_text: bytes = b"no entries\n"   # answer to 03/04 (lpq)
    remove_text: bytes = b""               # answer to 05 (lprm)
    # Seconds between the sender's close and taking its job (cups-lpd submits
    # then), per connection number (the last repeats); () takes it at once.
    take_delay: Sequence[float] = ()

    def reply(self, step: str, connection: int) -> bytes:
        value = self.replies.get(step, b"\x00")
        if isinstance(value, bytes):
            return value
        return value[min(connection, len(value) - 1)]


@dataclass(slots=True, kw_only=True)
class RecordedConnection:
    """One inbound connection: every byte received and every reply sent."""

    index: int
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    command: int | None = None   # first byte: 1 print, 2 job, 3/4 lpq, 5 lprm
    queue: str = ""
    ended: str = ""              # "eof", "closed", "reset", "idle", "stopped", "error ..."
