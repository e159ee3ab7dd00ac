"""File primitives shared by the spool, the audit log and the daemon's state files.

Each is a few system calls done the one careful way: a new file gets its mode
whatever the umask (print jobs may be private), a replaced file is never seen
torn (atomic rename), a record rewritten in place needs no new block on a full
disk, an unlink of what is already gone is fine, and ENOSPC/EDQUOT map to the
spool's ``DiskFull``.  The durability of batches (``syncfs``/``fdatasync``,
group commit) is ``relay.groupcommit``'s.
"""

from __future__ import annotations

import contextlib
import errno
import os

from relay.errors import DiskFull, SpoolError

FILE_MODE = 0o640  # spool files: print jobs may be private
DIR_MODE = 0o750


def create(path: str, flags: int) -> int:
    """``os.open(path, O_CREAT | flags)`` with mode FILE_MODE whatever the umask.

    The mode given to open(2) is masked by the umask (022 leaves 0640 alone,
    but 077 makes it 0600 and a careless 0 cannot widen it — yet an operator
    reading the spool as the group relies on exactly 0640), so it is set
    again on the new descriptor: one more system call per file.
    """
    fd = os.open(path, os.O_CREAT | os.O_CLOEXEC | flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return fd


def make_dir(path: str) -> None:
    """Create ``path`` (parents as needed) ending in a DIR_MODE folder whatever the umask.

    An existing folder keeps the mode its owner gave it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return
    os.chmod(path, DIR_MODE)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """os.write until all of ``data`` is written, slicing a memoryview (no copies)."""
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    total = len(view)
    while view:  # bounded: every pass writes at least one byte or raises
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "write returned nothing")
        view = view[n:]
    return total


def write_file(path: str, data: bytes, *, flags: int = os.O_TRUNC) -> None:
    """Create (or with O_EXCL: only create) ``path`` holding ``data``."""
    fd = create(path, os.O_WRONLY | flags)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, *, fsync: bool) -> None:
    """Replace ``path`` by ``data`` via a per-process dot-temp name and rename.

    Readers see the old or the new content, never a torn one; with ``fsync``
    the new content and name are durable on return.  A write that fails (a
    full disk) removes its temp file: it must not hold the space it could not use.
    """
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
    try:
        fd = create(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            write_all(fd, data)
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            unlink_quiet(tmp)
        raise
    if fsync:
        fsync_directory(head)


def overwrite(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Put the JSON ``data`` into the existing file ``path`` in place, in one write.

    For a full disk: no new name, inode or block is needed when ``data`` fits
    in the blocks the file already has (ext4, XFS, tmpfs), else it raises
    ENOSPC before writing anything.  Padded with spaces (JSON ignores them) to
    the old size, so there is no truncate to tear.  Not atomic: a reader or a
    power loss may see a mix of old and new — only for files read leniently.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if len(data) > max(st.st_size, st.st_blocks * 512):
            raise OSError(errno.ENOSPC, "record larger than the blocks the file has")
        padded = data.ljust(st.st_size)
        if os.pwrite(fd, padded, 0) != len(padded):
            raise OSError(errno.EIO, "short write in place")
        if fsync:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def read_file(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def unlink_quiet(path: str) -> None:
    """Unlink; a file already gone is fine (removal is idempotent).

    A directory under a spool name is not ours to remove: left alone.
    """
    with contextlib.suppress(FileNotFoundError, IsADirectoryError):
        os.unlink(path)


def fsync_directory(path: str) -> None:
    """fsync a directory so a rename or unlink in it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_error(exc: OSError, what: str) -> SpoolError:
    """Map an OSError to the spool's error tree: ENOSPC/EDQUOT -> DiskFull."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull(f"{what}: disk full")
    return SpoolError(f"{what}: {exc.strerror or exc}")
