"""``dir:///folder`` — the hot-folder sink (SPEC §3.3).

Each job lands in ``<folder>/<queue>/`` as its data files plus a JSON metadata
file ``<job>.json``.  Readers (scripts, archive jobs, watchers) must never see a
partial file, and the spool deletes its copy as soon as ``deliver`` returns, so:

* every file is written under a dot-name (``.<name>.tmp``), fsync'd, then
  renamed into place; the directory is fsync'd after the data files and again
  after the metadata, which comes last — the ``.json`` appearing means the job
  is complete, also after a power loss;
* file names come from the spool id, never from the wire
  (``<job>-<n>.<ext>``), so a hostile sender cannot pick a path and a
  redelivered job overwrites its earlier copy instead of duplicating it;
* bytes move with ``os.copy_file_range`` (a reflink or in-kernel copy), falling
  back to ``os.sendfile`` and then a buffered copy, in a worker thread so the
  event loop never waits on the disk.

A local copy is not timed: it is bounded by the disk, and a thread blocked in
the kernel could not be interrupted anyway.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import trio

from relay.errors import SinkRejected, SinkUnavailable
from relay.groupcommit import fsync_directory
from relay.queues import folder_name
from relay.sinks.base import DeliveryJob, Sink, register

__all__ = ["DirSink", "data_file_name", "extension_for"]

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

_COPY_CHUNK = 64 * 1024 * 1024
_NO_FAST_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                           errno.ENOTSUP, errno.EBADF})


def extension_for(format_letter: str) -> str:
    """File extension used in hot folders for an RFC 1179 format letter."""
    return _EXTENSIONS.get(format_letter, "prn")


def data_file_name(job_id: str, index: int, format_letter: str) -> str:
    """Name of the ``index``-th (from 1) data file of a job in its hot folder."""
    return f"{job_id}-{index}.{extension_for(format_letter)}"


class _SpoolFileError(Exception):
    """The job's own spool file could not be read (not the hot folder's fault)."""


class DirSink(Sink):
    """Copy each job into ``<path>/<queue>/`` atomically and durably."""

    def describe(self) -> str:
        return f"hot folder {self.destination.path.rstrip('/')}/<queue>/"

    async def deliver(self, job: DeliveryJob) -> None:
        if not _SAFE_ID.fullmatch(job.id):
            raise SinkRejected(f"job id {job.id!r} is not safe as a file name")
        folder = os.path.join(self.destination.path, folder_name(job.queue, job.wire_queue))
        try:
            await trio.to_thread.run_sync(_write_job, folder, job)
        except _SpoolFileError as exc:
            raise SinkRejected(f"job {job.id}: cannot read its spool file: {exc}") from exc
        except OSError as exc:
            raise SinkUnavailable(_describe_os_error(folder, exc)) from exc


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


def _write_job(folder: str, job: DeliveryJob) -> None:
    """Runs in a worker thread: data files, directory fsync, metadata, directory fsync."""
    _ensure_dir(folder)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries: list[dict[str, Any]] = []
        for index, spool_file in enumerate(job.files, start=1):
            name = data_file_name(job.id, index, spool_file.format)
            size = _place(dir_fd, name, functools.partial(_copy_from, spool_file.path))
            entries.append({"name": spool_file.name, "format": spool_file.format,
                            "bytes": size, "path": os.path.join(folder, name)})
        if entries:
            # Data renames must be durable before the metadata that announces them.
            os.fsync(dir_fd)
        document = orjson.dumps(_metadata(job, entries), option=orjson.OPT_INDENT_2)
        _place(dir_fd, f"{job.id}.json", lambda fd: _write_all(fd, document))
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _metadata(job: DeliveryJob, entries: list[dict[str, Any]]) -> dict[str, Any]:
    received = datetime.fromtimestamp(job.received, UTC)
    return {
        "job": job.id,
        "queue": job.queue,
        "wire_queue": job.wire_queue,
        "peer": job.peer,
        "user": job.user,
        "host": job.host,
        "title": job.title,
        "job_name": job.job_name,
        "number": job.number,
        "received": received.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "files": entries,
    }


def _ensure_dir(path: str) -> None:
    # Create missing folders (the base one too) and fsync each new entry's
    # parent, so the folder itself survives a power loss with the files in it.
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path.rstrip("/")) or "/"
    _ensure_dir(parent)
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    fsync_directory(parent)


def _place(dir_fd: int, name: str, fill: Callable[[int], int]) -> int:
    """Write ``name`` in ``dir_fd`` via ``.<name>.tmp``: fill, fsync, rename; returns size."""
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644,
                 dir_fd=dir_fd)
    try:
        try:
            size = fill(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except Exception:
        # Leave no dot-file behind: a retry rewrites it, but a held job would not.
        _unlink_quietly(tmp, dir_fd)
        raise
    return size


def _unlink_quietly(name: str, dir_fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _write_all(fd: int, data: bytes) -> int:
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.write(fd, view[done:])
    return done


def _copy_from(src_path: str, dst_fd: int) -> int:
    try:
        src_fd = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _SpoolFileError(f"{src_path}: {exc.strerror or exc}") from exc
    try:
        return _copy_fd(src_fd, dst_fd)
    finally:
        os.close(src_fd)


def _copy_fd(src_fd: int, dst_fd: int) -> int:
    """Copy all of ``src_fd``: copy_file_range, else sendfile, else a reused buffer."""
    for fast in (_copy_range, _copy_sendfile):
        try:
            return fast(src_fd, dst_fd)
        except OSError as exc:
            # Only fall back before anything was written; later errors are real.
            if exc.errno not in _NO_FAST_COPY or os.lseek(dst_fd, 0, os.SEEK_CUR) != 0:
                raise
    return _copy_buffered(src_fd, dst_fd)


def _copy_range(src_fd: int, dst_fd: int) -> int:
    total = 0
    while copied := os.copy_file_range(src_fd, dst_fd, _COPY_CHUNK):
        total += copied
    return total


def _copy_sendfile(src_fd: int, dst_fd: int) -> int:
    total = 0
    while copied := os.sendfile(dst_fd, src_fd, None, _COPY_CHUNK):
        total += copied
    return total


def _copy_buffered(src_fd: int, dst_fd: int) -> int:
    buf = bytearray(1024 * 1024)
    view = memoryview(buf)
    total = 0
    while got := os.readv(src_fd, [buf]):
        done = 0
        while done < got:
            done += os.write(dst_fd, view[done:got])
        total += got
    return total


register("dir", DirSink)
