"""The PostgreSQL spool's body cache on this node: where a job's bodies are found locally.

A job this node delivers has its bodies in ``<spool_dir>/pg-cache``: a large
one as files of its own (``<id>.cf``, ``<id>.d<n>``), small ones packed one
after the other in a batch file (``batch-<n>.bodies``) — a fetch batch's, or
an intake group's that never became files.  Creating a file costs more here
than a small job's bytes, which is why small bodies share one.  The paths in
``JobMeta`` always name the per-job files; ``locate`` resolves a packed one
to its batch file's range (``relay.spoolbackend.register_locator``), and a
batch file goes once its last body has.  Intake's flush thread and the event
loop both use it: each call is a few dict operations under the GIL, and a
batch is counted before its bodies are located.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from collections.abc import Mapping, Sequence

from relay.durablefiles import unlink_quiet
from relay.spoolformat import JobMeta
from relay.spoolpgdb import write_batch


class BodyCache:
    """Which bodies of the cache directory are packed in which batch file."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._located: dict[str, tuple[str, int, int]] = {}   # body name -> (batch, off, len)
        self._refs = Counter[str]()              # batch file -> bodies still located in it
        self._numbers = itertools.count(1)       # next() is atomic: threads share it

    def new_batch(self) -> str:
        """A fresh batch file's path (not created)."""
        return os.path.join(self.directory, f"batch-{next(self._numbers)}.bodies")

    def keep(self, bodies: Sequence[tuple[str, bytes]]) -> None:
        """Write ``bodies`` (path as ``JobMeta`` names it, bytes) into one new batch file."""
        batch = self.new_batch()
        self.add(batch, write_batch(batch, bodies))

    def add(self, batch: str, where: Mapping[str, tuple[int, int]]) -> None:
        """Bodies (path -> (offset, length)) written in ``batch``."""
        if not where:    # nothing written: no file, and no count a drop would clear
            return
        self._refs[batch] += len(where)   # counted first: a drop may run next
        for path, (offset, length) in where.items():
            self._located[os.path.basename(path)] = (batch, offset, length)

    def locate(self, name: str) -> tuple[str, int, int] | None:
        return self._located.get(name)

    def has(self, path: str) -> bool:
        return os.path.basename(path) in self._located or os.path.exists(path)

    def cached(self, meta: JobMeta) -> bool:
        # A local stat or two per job, like the local spool's own opens: not worth a thread.
        return all(self.has(p) for p in (meta.control_path, *(f.path for f in meta.files)))

    def drop(self, meta: JobMeta) -> None:
        """``meta``'s bodies leave the cache (a batch file with its last one)."""
        for path in (meta.control_path, *(f.path for f in meta.files)):
            where = self._located.pop(os.path.basename(path), None)
            if where is None:
                unlink_quiet(path)
                continue
            batch = where[0]
            self._refs[batch] -= 1
            if self._refs[batch] <= 0:
                del self._refs[batch]
                unlink_quiet(batch)
