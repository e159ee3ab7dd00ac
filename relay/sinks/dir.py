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
* files are created 0640 and folders 0750, or what ``?mode=`` says (folders
  get an x bit wherever the file mode has an r bit), with ``fchmod``/``chmod``
  after creation so the daemon's umask cannot widen or narrow them: hot
  folders hold patient documents.  ``?group=`` gives them that group
  (``fchown``, before the mode, since chown may clear mode bits); only what
  the sink creates is touched, never an existing folder;
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
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import trio

from relay.errors import SinkRejected, SinkUnavailable
from relay.groupcommit import fsync_directory
from relay.queues import folder_name
from relay.sinks.base import DeliveryJob, Sink, open_spool_file, register
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

_COPY_CHUNK = 64 * 1024 * 1024
_NO_FAST_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                           errno.ENOTSUP, errno.EBADF})


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

    def describe(self) -> str:
        d = self.destination
        where = f"hot folder {d.path.rstrip('/')}/<queue>/"
        if d.file_mode == 0o640 and d.group is None:
            return where
        group = "" if d.group is None else f", group {group_label(d.group)}"
        return f"{where} (mode {d.file_mode:04o}{group})"

    async def deliver(self, job: DeliveryJob) -> None:
        if not _SAFE_ID.fullmatch(job.id):
            raise SinkRejected(f"job id {job.id!r} is not safe as a file name")
        d = self.destination
        folder = os.path.join(d.path, folder_name(job.queue, job.wire_queue))
        perms = _Perms(file_mode=d.file_mode, dir_mode=dir_mode(d.file_mode), gid=d.group)
        try:
            await trio.to_thread.run_sync(_write_job, folder, job, perms,
                                          self.context.privacy.name)
        except OSError as exc:
            hint = ""
            if d.group is not None and exc.errno == errno.EPERM:
                hint = f"; giving files group {group_label(d.group)} needs root or membership"
            raise SinkUnavailable(_describe_os_error(folder, exc) + hint) from exc


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


def _write_job(folder: str, job: DeliveryJob, perms: _Perms,
               redact: Callable[[str], str]) -> None:
    """Runs in a worker thread: data files, directory fsync, metadata, directory fsync."""
    _ensure_dir(folder, perms)
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        entries: list[dict[str, Any]] = []
        for index, spool_file in enumerate(job.files, start=1):
            name = data_file_name(job.id, index, spool_file.format)
            size = _place(dir_fd, name, functools.partial(_copy_from, spool_file.path), perms)
            entries.append({"name": spool_file.name, "format": spool_file.format,
                            "bytes": size, "path": os.path.join(folder, name)})
        if entries:
            # Data renames must be durable before the metadata that announces them.
            os.fsync(dir_fd)
        document = orjson.dumps(_metadata(job, entries, redact), option=orjson.OPT_INDENT_2)
        _place(dir_fd, f"{job.id}.json", lambda fd: _write_all(fd, document), perms)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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


def _place(dir_fd: int, name: str, fill: Callable[[int], int], perms: _Perms) -> int:
    """Write ``name`` in ``dir_fd`` via ``.<name>.tmp``: fill, fsync, rename; returns size."""
    tmp = f".{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, perms.file_mode,
                 dir_fd=dir_fd)
    try:
        try:
            # O_TRUNC on a leftover keeps its old owner/mode, and the umask
            # narrowed the new one: set both explicitly, before any byte.
            if perms.gid is not None:
                os.fchown(fd, -1, perms.gid)
            os.fchmod(fd, perms.file_mode)
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
    src_fd = open_spool_file(src_path)
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


register("dir", DirSink, check=group_problem)
