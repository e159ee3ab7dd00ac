"""Which files make a job: the control file and every data file it names (SPEC §4.2).

``JobAssembly`` is the connection's record of the job being received; the
rule it serves (docs/protocol.md "Job assembly in the server") is that a job
is complete once its control file and each data file its format lines name
have arrived, in either order, and that a job missing a named file is
refused while a reply is due or held with ``hold_reason`` when none is.
"""

from __future__ import annotations

from relay import controlfile
from relay.queues import sanitize_name
from relay.spool import IncomingJob

__all__ = ["JobAssembly"]


class JobAssembly:
    """The job being received: complete once its control file and every data file
    that control file names have arrived (control-first or data-first)."""

    __slots__ = ("control", "incoming", "opened", "received", "streamed", "wanted")

    def __init__(self, incoming: IncomingJob) -> None:
        self.incoming = incoming
        self.control: controlfile.ControlFile | None = None
        self.wanted: tuple[str, ...] = ()    # the data files the control file names
        self.received: set[str] = set()
        self.opened = 0                      # data files started, re-sent ones included
        self.streamed = 0

    def set_control(self, cf: controlfile.ControlFile) -> None:
        self.control = cf
        self.wanted = cf.data_files

    def missing(self) -> list[str]:
        """Names the control file lists that have not arrived (complete: none)."""
        return [name for name in self.wanted if name not in self.received]

    def complete(self) -> bool:
        return self.control is not None and not self.missing()

    def hold_reason(self) -> str:
        """Why a job ended incomplete is held, naming the files that never came."""
        missing = [sanitize_name(n) for n in self.missing()]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        return f"control file names {', '.join(missing[:3])}{more}, never sent"
