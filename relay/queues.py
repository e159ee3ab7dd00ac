"""Queue routing: the queue name a sender used -> the configured queue (SPEC §3.2, §4.3).

``QueueRouter`` precomputes one dict from every configured name and alias
(case-folded under ``queue_names = "case-insensitive"``), so ``route`` is one
dict lookup per job.  A name nobody configured falls to the ``"*"`` catch-all
if there is one, else it is refused with reply 0x01 and one printable line
naming the queue as received; under ``queue_names = "exact"`` a case-only
mismatch also names the configured spelling, because that mismatch is the
most common field failure (Windows share "Ward3" vs. queue "ward3").

A queue an operator disabled (``relay.queuestate``) refuses new jobs the
same way, with a line saying so; lpq and lprm still work.

``folder_name`` turns a queue into one safe path component for hot folders;
names from the wire are never used as paths as they are (SPEC §4.3).  A hot
folder under the catch-all gets one subfolder per distinct wire name, so the
router admits at most ``max_catch_all_queues`` distinct names (by folder) into
the catch-all for new jobs, counting those already in the spool and on disk
(``seed_catch_all``, ``hot_folder_names``); beyond that a new name is refused
with 0x01 like an unknown queue.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

from relay.config import CATCH_ALL, Config, QueueConfig
from relay.errors import REPLY_NOT_ACCEPTING, ProtocolError
from relay.queuestate import QueueStates

__all__ = ["QueueRouter", "folder_name", "hot_folder_names", "sanitize_name"]

_SHOWN_MAX = 64
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9._-]")


def sanitize_name(name: str) -> str:
    """A wire name fit for one log or reply line: printable ASCII only, at most 64 chars.

    Anything else becomes "?"; a longer name is cut and ends in "...".
    """
    # Cut first: a hostile 100 KiB name must cost no more than a short one.
    head = name[:_SHOWN_MAX + 1]
    shown = "".join(ch if " " <= ch <= "~" else "?" for ch in head)
    if len(shown) > _SHOWN_MAX:
        shown = shown[:_SHOWN_MAX - 3] + "..."
    return shown


def folder_name(queue: str, wire_queue: str) -> str:
    """One safe path component for a job's hot-folder subdirectory.

    ``queue`` is the configured queue name, ``wire_queue`` the name as
    received; the catch-all ``"*"`` uses the wire name.  Characters outside
    ``[A-Za-z0-9._-]`` become "_", the result is 1..64 characters and never
    starts with "." (so never "." or ".." and never hidden).  Distinct names
    may share a folder ("a/b" and "a_b"); the job's metadata keeps the exact
    name.
    """
    source = wire_queue if queue == CATCH_ALL else queue
    safe = _UNSAFE_PATH_CHARS.sub("_", source[:_SHOWN_MAX])
    if safe.startswith("."):
        safe = "_" + safe[1:]
    return safe or "_"


class QueueRouter:
    """Maps wire queue names to configured queues; built once from a ``Config``."""

    def __init__(self, config: Config, states: QueueStates | None = None) -> None:
        self._states = states
        self._fold = config.server.queue_names != "exact"
        self._queues: tuple[QueueConfig, ...] = tuple(config.queues.values())
        self._catch_all = config.queues.get(CATCH_ALL)
        self._table: dict[str, QueueConfig] = {}
        # Exact mode only: casefolded spelling -> configured spelling, for the hint.
        self._spellings: dict[str, str] = {}
        # Folder names of the wire names the catch-all took jobs for (bounded).
        self._catch_all_names: set[str] = set()
        self._catch_all_max = config.server.max_catch_all_queues
        for queue in self._queues:
            for name in (queue.name, *queue.aliases):
                if name == CATCH_ALL:
                    continue
                self._table[name.casefold() if self._fold else name] = queue
                self._spellings.setdefault(name.casefold(), name)

    def route(self, wire_name: str, *, new_job: bool = False) -> QueueConfig:
        """The queue for ``wire_name``, or ``ProtocolError`` (reply 0x01, "unknown_queue").

        ``new_job``: a job is about to be received for this name (0x02), so a
        name new to the catch-all counts against ``max_catch_all_queues``.
        """
        queue = self._table.get(wire_name.casefold() if self._fold else wire_name)
        if queue is None and self._catch_all is not None:
            if new_job:
                self._admit_catch_all(wire_name)
            queue = self._catch_all
        if queue is not None:
            if new_job and self._states is not None and self._states.get(queue.name).disabled:
                raise ProtocolError(f"queue '{sanitize_name(wire_name)}' is disabled (lpc "
                                    "disable): not accepting jobs", reply=REPLY_NOT_ACCEPTING,
                                    reason="unknown_queue")
            return queue
        raise ProtocolError(self._refusal(wire_name), reply=REPLY_NOT_ACCEPTING,
                            reason="unknown_queue")

    def seed_catch_all(self, names: Iterable[str]) -> None:
        """Count wire (or folder) names the catch-all already has, at start.

        These stay admitted even beyond the bound: their jobs and folders exist.
        """
        self._catch_all_names.update(folder_name(CATCH_ALL, name) for name in names)

    def _admit_catch_all(self, wire_name: str) -> None:
        folder = folder_name(CATCH_ALL, wire_name)
        if folder in self._catch_all_names:
            return
        if len(self._catch_all_names) >= self._catch_all_max:
            raise ProtocolError(
                f"queue '{sanitize_name(wire_name)}' refused: the catch-all already takes "
                f"{self._catch_all_max} queue names (max_catch_all_queues)",
                reply=REPLY_NOT_ACCEPTING, reason="unknown_queue")
        self._catch_all_names.add(folder)

    def _refusal(self, wire_name: str) -> str:
        message = f"queue '{sanitize_name(wire_name)}' unknown"
        if self._fold:
            return message
        configured = self._spellings.get(wire_name.casefold())
        if configured is None:
            return message
        return (f"{message}; the configured queue is '{sanitize_name(configured)}' "
                "(queue names are exact)")

    @property
    def catch_all(self) -> QueueConfig | None:
        """The ``"*"`` queue, when one is configured."""
        return self._catch_all

    def configured_names(self) -> tuple[str, ...]:
        """Configured queue names (including "*"), in config order: the bounded metric labels."""
        return tuple(queue.name for queue in self._queues)


def hot_folder_names(queue: QueueConfig) -> list[str]:
    """The subfolders already in ``queue``'s ``dir://`` destinations (for the catch-all bound).

    A folder that cannot be read counts nothing: it has no subfolders the
    relay could add to.
    """
    names: list[str] = []
    for dest in queue.destinations:
        if dest.scheme != "dir":
            continue
        try:
            with os.scandir(dest.path) as entries:
                names += [e.name for e in entries
                          if not e.name.startswith(".") and e.is_dir(follow_symlinks=False)]
        except OSError:
            continue
    return names
