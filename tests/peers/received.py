"""What a receiver got: the job records LprngServer and RecordingLpdServer return.

Both receivers describe a job the same way, so a test's assertions read the
same whichever peer stored it. Frozen values, built once where the job is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedFile:
    """One data file of a received job.

    ``name`` is the transfer name as it came off the wire (RecordingLpdServer),
    or as LPRng stored it: LPRng renumbers a job whose number is taken and
    writes a digit host as ``ADDR<ip>``, e.g. ``dfA125ADDR10.1.2.3``.
    """

    name: str          # e.g. "dfA123client"
    format: str        # control-file letter that printed it, e.g. "f", "l"
    title: str         # the N line for this file ("" if none)
    data: bytes
    declared_length: int | None = None  # wire length (RecordingLpdServer only)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedJob:
    """A job as a receiver stored it.

    ``control`` maps each upper-case control-file letter to its first value.
    ``raw_control`` is the control file byte for byte where the receiver kept
    it (RecordingLpdServer); LPRng never keeps it: it parses the control file
    into its job ticket ``hfA<n>``, whose text is ``ticket``.
    """

    queue: str
    control: Mapping[str, str]
    files: tuple[ReceivedFile, ...]
    raw_control: bytes | None = None
    control_name: str = ""     # "cfA123client"; for LPRng its ticket name "hfA123"
    ticket: str | None = None
    number: int | None = None  # LPRng's job number (after any renumbering)

    @property
    def user(self) -> str:
        return self.control.get("P", "")

    @property
    def host(self) -> str:
        return self.control.get("H", "")

    @property
    def title(self) -> str:
        return self.control.get("T", "")

    @property
    def job_name(self) -> str:
        return self.control.get("J", "")

    @property
    def data(self) -> bytes:
        """All data files' bytes, in order."""
        return b"".join(f.data for f in self.files)
