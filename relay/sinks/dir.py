"""``dir:///folder`` — the hot-folder sink (SPEC §3.3).

Each job lands in ``<folder>/<queue>/`` as its data files plus a JSON metadata
file ``<job>.json``.  Readers (scripts, archive jobs, watchers) must never see a
partial file, and the spool deletes its copy as soon as ``deliver`` returns, so:

* every file is written under a dot-name (``.<name>.tmp``), made durable,
  then renamed into place; the renames are durable before the metadata that
  announces them, which comes last — the ``.json`` appearing means the job is
  complete, also after a power loss;
* several jobs (up to ``batch``, one queue's waiting ones) go through those
  steps together, so they share three syncs — data, then renames and
  metadata, then the metadata renames — instead of four per job: ``syncfs``
  once per file system where the system has it (32 small files: ~10 ms
  against ~80 ms for an ``fdatasync`` each, measured), ``fdatasync`` of each
  file and ``fsync`` of each folder otherwise.  A job is delivered only after
  the last of them, so a crash mid-batch leaves jobs the spool still has and
  redelivers (overwrites) them;
* file names come from the spool id, never from the wire
  (``<job>-<n>.<ext>``), so a hostile sender cannot pick a path and a
  redelivered job overwrites its earlier copy instead of duplicating it;
* files are created 0640 and folders 0750, or what ``?mode=`` says (folders
  get an x bit wherever the file mode has an r bit), with ``fchmod``/``chmod``
  after creation so the daemon's umask cannot widen or narrow them: hot
  folders hold patient documents (a new file whose mode the batch's first
  ``fstat`` shows already right skips it).  ``?group=`` gives them that group
  (``fchown``, before the mode, since chown may clear mode bits); only what
  the sink creates is touched, never an existing folder;
* bytes move with ``copy_file_range`` (a reflink or in-kernel copy), falling
  back to ``sendfile`` and then a buffered copy, in a worker thread so the
  event loop never waits on the disk (long-lived ones, relay.handoff: no
  thread-cache round and ``prctl`` a batch).  Each phase's file work for the
  whole batch is one call into relay._dirio, which holds no GIL meanwhile:
  a system call from a Python thread is a GIL hand-off with the busy event
  loop (1,000 jobs in batches of 32: 38.7 futex calls a job before, 0.5
  after); each spool file (a segment holds many jobs) is opened once a batch.

A local copy is not timed: it is bounded by the disk, and a thread blocked in
the kernel could not be interrupted anyway.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from relay import _dirio
from relay.durablefiles import fsync_directory
from relay.errors import SinkError, SinkRejected, SinkUnavailable, SpoolFileMissing
from relay.groupcommit import Syncer
from relay.handoff import HandOffPool
from relay.queues import folder_name
from relay.sinks.base import DeliveryJob, Sink, register
from relay.spoolbackend import Body, BodyFiles, open_file_body
from relay.uri import Destination, group_label

__all__ = ["DirSink", "data_file_name", "dir_mode", "extension_for", "group_problem"]

# RFC 1179 format letters -> the extension a reader's tools expect.  "l" (raw,
# what Windows and CUPS send for PCL/PostScript/PDF alike) says nothing about
# the content, so it gets the generic "prn", as does any unknown letter.
_EXTENSIONS = {
    "f": "txt",   # formatted text
    "p": "txt",   # text through pr(1)
    "r": "txt",   # FORTRAN carriage control text
    "o": "ps",    # PostScript
    "d": "dvi",   # TeX DVI
    "t": "troff",  # troff
    "n": "ditroff",  # device-independent troff
    "c": "cif",   # CalTech Intermediate Form
    "g": "plot",  # Berkeley plot
    "v": "ras",   # Sun raster
}

# The spool makes ids; checking them anyway keeps a bug elsewhere from ever
# turning into a path outside the hot folder.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")

# The batches' threads, shared by every hot folder (as many as batches run at once).
_THREADS = HandOffPool("dir-sink")

# Jobs placed together (one queue's waiting jobs, in order): they share the syncs.
BATCH = 32


def extension_for(format_letter: str) -> str:
    """File extension used in hot folders for an RFC 1179 format letter."""
    return _EXTENSIONS.get(format_letter, "prn")


def data_file_name(job_id: str, index: int, format_letter: str) -> str:
    """Name of the ``index``-th (from 1) data file of a job in its hot folder."""
    return f"{job_id}-{index}.{extension_for(format_letter)}"


def dir_mode(file_mode: int) -> int:
    """The mode of the folders for files of ``file_mode``: x wherever r is (0640 -> 0750)."""
    return file_mode | (file_mode & 0o444) >> 2


def group_problem(destination: Destination) -> str | None:
    """Why ``?group=`` cannot be applied by this process (not root, not a member), or None."""
    gid = destination.group
    if gid is None or os.geteuid() == 0 or gid == os.getegid() or gid in os.getgroups():
        return None
    return (f"group {group_label(gid)}: the daemon's user is not a member, so hot-folder "
            "files cannot be given this group")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Perms:
    file_mode: int
    dir_mode: int
    gid: int | None


class DirSink(Sink):
    """Copy each job into ``<path>/<queue>/`` atomically and durably."""

    batch = BATCH

    def describe(self) -> str:
        d = self.destination
        where = f"hot folder {d.path.rstrip('/')}/<queue>/"
        if d.file_mode == 0o640 and d.group is None:
            return where
        group = "" if d.group is None else f", group {group_label(d.group)}"
        return f"{where} (mode {d.file_mode:04o}{group})"

    async def deliver(self, job: DeliveryJob) -> None:
        _, error = await self.deliver_many([job])
        if error is not None:
            raise error

    async def deliver_many(self, jobs: Sequence[DeliveryJob]) -> tuple[int, Exception | None]:
        """Place ``jobs`` (up to ``batch``) with three syncs for all of them, in order.

        A job that cannot be staged (unsafe id, spool file gone, a disk error)
        stops the batch there: the jobs before it are still placed.
        """
        d = self.destination
        perms = _Perms(file_mode=d.file_mode, dir_mode=dir_mode(d.file_mode), gid=d.group)
        return await _THREADS.run_sync(_write_batch, d.path, jobs, perms,
                                       self.context.privacy.name)


def _unavailable(folder: str, exc: OSError, perms: _Perms) -> SinkUnavailable:
    hint = ""
    if perms.gid is not None and exc.errno == errno.EPERM:
        hint = f"; giving files group {group_label(perms.gid)} needs root or membership"
    error = SinkUnavailable(_describe_os_error(folder, exc) + hint)
    error.__cause__ = exc
    return error


def _describe_os_error(folder: str, exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno or 0, "?")
    hint = {
        errno.ENOSPC: " (disk full)",
        errno.EDQUOT: " (quota exceeded)",
        errno.EACCES: " (check the folder's owner and permissions)",
        errno.EPERM: " (check the folder's owner and permissions)",
        errno.EROFS: " (file system is read-only)",
    }.get(exc.errno or 0, "")
    return f"hot folder {folder}: {exc.strerror or exc} [{code}]{hint}"


@dataclass(slots=True)
class _Staged:
    """One job of a batch on its way in: its folder and the dot-files written for it."""

    job: DeliveryJob
    folder: str
    dir_fd: int = -1
    data: list[str] = field(default_factory=list)     # final names; each under .<name>.tmp
    entries: list[dict[str, Any]] = field(default_factory=list)
    sources: list[tuple[str, Body]] = field(default_factory=list)  # (spool path, body)


class _Folders:
    """The batch's open queue folders and the syncs that make what is in them durable.

    ``syncfs`` (one call per file system for the whole batch) where the system
    has it; else ``fdatasync`` of each file just written and ``fsync`` of each
    folder (relay.groupcommit.Syncer).
    """

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self._syncers: dict[str, Syncer] = {}
        self._devices: dict[str, int] = {}

    def open(self, folder: str, perms: _Perms) -> int:
        if folder not in self.fds:
            _ensure_dir(folder, perms)
            self.fds[folder] = fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            # The folder's own descriptor and one fstat for all three syncs.
            self._syncers[folder] = Syncer(folder, dir_fd=fd)
            self._devices[folder] = os.fstat(fd).st_dev
        return self.fds[folder]

    def sync(self, paths: dict[str, list[str]]) -> None:
        """Make ``paths`` (folder -> names in it) and every folder's entries durable."""
        devices: set[int] = set()
        for folder, syncer in self._syncers.items():
            if syncer.method == "syncfs":
                if self._devices[folder] in devices:
                    continue
                devices.add(self._devices[folder])
            syncer.sync([os.path.join(folder, n) for n in paths.get(folder, ())])

    def close(self) -> None:
        for syncer in self._syncers.values():
            syncer.close()
        for fd in self.fds.values():
            os.close(fd)


def _write_batch(base: str, jobs: Sequence[DeliveryJob], perms: _Perms,
                 redact: Callable[[str], str]) -> tuple[int, Exception | None]:
    """Runs in a worker thread: every job's data files, one sync, their renames and
    metadata, one sync, the metadata renames, one sync.  Returns (placed, error)."""
    folders = _Folders()
    sources = BodyFiles()
    staged: list[_Staged] = []
    try:
        planned, error = _plan(base, jobs, folders, sources, perms)
        staged, stage_error = _stage(planned, folders, perms)
        error = stage_error or error
        if staged:
            _publish(staged, folders, perms, redact)
    except OSError as exc:
        # A sync or rename failed: nothing of the batch counts as placed (a
        # redelivery overwrites whatever did land).
        for job_files in staged:
            _unlink_dot_files(job_files, folders)
        return 0, _unavailable(staged[0].folder if staged else base, exc, perms)
    finally:
        sources.close()
        folders.close()
    return len(staged), error


def _plan(base: str, jobs: Sequence[DeliveryJob], folders: _Folders, sources: BodyFiles,
          perms: _Perms) -> tuple[list[_Staged], SinkError | None]:
    """Each job's folder (made and opened), file names and spool bodies, in order, up
    to the first job that cannot be placed (unsafe id, folder, spool file gone)."""
    planned: list[_Staged] = []
    for job in jobs:
        try:
            planned.append(_plan_job(base, job, folders, sources, perms))
        except SinkError as exc:   # rejected, unavailable, or SpoolFileMissing
            return planned, exc
    return planned, None


def _plan_job(base: str, job: DeliveryJob, folders: _Folders, sources: BodyFiles,
              perms: _Perms) -> _Staged:
    if not _SAFE_ID.fullmatch(job.id):
        raise SinkRejected(f"job id {job.id!r} is not safe as a file name")
    folder = os.path.join(base, folder_name(job.queue, job.wire_queue))
    try:
        dir_fd = folders.open(folder, perms)
    except OSError as exc:
        raise _unavailable(folder, exc, perms) from exc
    staged = _Staged(job=job, folder=folder, dir_fd=dir_fd)
    for index, spool_file in enumerate(job.files, start=1):
        staged.data.append(data_file_name(job.id, index, spool_file.format))
        staged.sources.append((spool_file.path, sources.open(spool_file.path, spool_file.bytes)))
    return staged


def _stage(planned: list[_Staged], folders: _Folders,
           perms: _Perms) -> tuple[list[_Staged], SinkError | None]:
    """Write every planned job's data files under dot-names, in one call without the
    GIL (not yet durable, not yet visible); the jobs before a failing one are kept."""
    owners = [job for job in planned for _ in job.data]
    bodies = [body for job in planned for _, body in job.sources]
    sizes, err, copied = _dirio.stage(
        [job.dir_fd for job in owners], [_dot(n) for job in planned for n in job.data],
        [b.fd for b in bodies], [b.offset for b in bodies], [b.length for b in bodies],
        [None] * len(bodies), perms.file_mode, -1 if perms.gid is None else perms.gid)
    names = [name for job in planned for name in job.data]
    for i, size in enumerate(sizes):
        job = owners[i]
        spool_file = job.job.files[len(job.entries)]
        job.entries.append({"name": spool_file.name, "format": spool_file.format,
                            "bytes": size, "path": os.path.join(job.folder, names[i])})
    if not err:
        return planned, None
    failed = owners[len(sizes)]
    _unlink_dot_files(failed, folders)
    kept = planned[:next(i for i, job in enumerate(planned) if job is failed)]
    if err == _dirio.SHORT:
        path, body = failed.sources[len(failed.entries)]
        return kept, SpoolFileMissing(path, OSError(errno.EIO, f"{copied} of {body.length} bytes"))
    return kept, _unavailable(failed.folder, OSError(err, os.strerror(err)), perms)


def _dot(name: str) -> bytes:
    return os.fsencode(f".{name}.tmp")


def _check(err: int) -> None:
    if err:
        raise OSError(err, os.strerror(err))


def _publish(staged: list[_Staged], folders: _Folders, perms: _Perms,
             redact: Callable[[str], str]) -> None:
    # Data durable before it is renamed into place; the renames durable
    # before the metadata that announces them; the metadata renames durable
    # before the spool may forget the jobs.  Each phase's file work is one
    # call without the GIL (relay._dirio).
    folders.sync(_dot_names(staged, data=True))
    data = [(job.dir_fd, name) for job in staged for name in job.data]
    _check(_dirio.rename_all([fd for fd, _ in data], [_dot(n) for _, n in data],
                             [os.fsencode(n) for _, n in data])[1])
    documents = [orjson.dumps(_metadata(job.job, job.entries, redact),
                              option=orjson.OPT_INDENT_2) for job in staged]
    fds = [job.dir_fd for job in staged]
    metas = [f"{job.job.id}.json" for job in staged]
    _, err, _ = _dirio.stage(fds, [_dot(n) for n in metas], [-1] * len(staged),
                             [0] * len(staged), [-1] * len(staged), documents,
                             perms.file_mode, -1 if perms.gid is None else perms.gid)
    _check(err)
    folders.sync(_dot_names(staged, data=False))
    _check(_dirio.rename_all(fds, [_dot(n) for n in metas], [os.fsencode(n) for n in metas])[1])
    folders.sync({})


def _dot_names(staged: list[_Staged], *, data: bool) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for job in staged:
        files = job.data if data else [f"{job.job.id}.json"]
        names.setdefault(job.folder, []).extend(f".{n}.tmp" for n in files)
    return names


def _unlink_dot_files(staged: _Staged, folders: _Folders) -> None:
    # Leave no dot-file behind: a retry rewrites it, but a held job would not.
    dir_fd = folders.fds.get(staged.folder)
    if dir_fd is None:
        return
    for name in [*staged.data, f"{staged.job.id}.json"]:
        _unlink_quietly(f".{name}.tmp", dir_fd)


def _metadata(job: DeliveryJob, entries: list[dict[str, Any]],
              redact: Callable[[str], str]) -> dict[str, Any]:
    # ``redact``: [privacy] job_names for the J/T values (relay.privacy).
    received = datetime.fromtimestamp(job.received, UTC)
    return {
        "job": job.id,
        "queue": job.queue,
        "wire_queue": job.wire_queue,
        "peer": job.peer,
        "user": job.user,
        "host": job.host,
        "title": redact(job.title),
        "job_name": redact(job.job_name),
        "number": job.number,
        "received": received.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "files": entries,
        # SPEC §9: the client certificate's name, for jobs that came over TLS
        **({"tls_peer": tp} if (tp := getattr(job, "tls_peer", "")) else {}),
    }


def _ensure_dir(path: str, perms: _Perms) -> None:
    # Create missing folders (the base one too) and fsync each new entry's
    # parent, so the folder itself survives a power loss with the files in it.
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    _ensure_dir(parent, perms)
    try:
        os.mkdir(path, perms.dir_mode)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    # mkdir's mode went through the umask: set the real one (group first).
    if perms.gid is not None:
        os.chown(path, -1, perms.gid)
    os.chmod(path, perms.dir_mode)
    fsync_directory(parent)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _copy_from(src_path: str, length: int, dst_fd: int) -> int:
    """The body ``src_path`` names, ``length`` bytes, wherever it lies.

    A small job's body is a range of a segment file (relay.spoolbackend):
    copied from there with offsets, not through a memory file of its own
    (that was a memfd, a write, a seek and a failed copy_file_range a file).
    """
    with open_file_body(src_path, 0, length) as body:   # SpoolFileMissing when gone
        copied = _copy_fd(body.fd, dst_fd, body.offset, body.length)
    if copied != length:
        raise SpoolFileMissing(src_path, OSError(errno.EIO, f"{copied} of {length} bytes"))
    return copied


def _copy_fd(src_fd: int, dst_fd: int, offset: int | None = None, length: int = -1) -> int:
    """Copy ``src_fd`` (from ``offset``, ``length`` bytes; None/-1: from where it is, to
    its end): copy_file_range, else sendfile, else a reused buffer (relay._dirio)."""
    return _dirio.copy_fd(src_fd, dst_fd, -1 if offset is None else offset, length)


def _copy_buffered(src_fd: int, dst_fd: int, offset: int | None, length: int) -> int:
    """The last of ``_copy_fd``'s fallbacks on its own: read and write through a buffer."""
    return _dirio.copy_fd(src_fd, dst_fd, -1 if offset is None else offset, length,
                          _dirio.METHOD_BUFFERED)


register("dir", DirSink, check=group_problem)
