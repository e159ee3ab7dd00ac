# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The hot folder's file work for a whole batch, in C without the GIL (relay.sinks.dir).

Why a module of its own and not a ``.pxi`` of ``relay._core``: the core is
sans-I/O by design (it never touches a file), and this is nothing but file
system calls.  Why in C at all: the ``dir://`` sink runs in a worker thread
beside the busy event loop, and every ``os.*`` call there releases and
re-takes the GIL — a futex hand-off with the loop per system call, ~12 calls
a job.  ``stage`` and ``rename_all`` take a whole batch's phase (create the
dot-files and fill them; rename them into place) and release the GIL once
for all of it.

The semantics are the Python ones they replace, call for call:

* a dot-file is created with its mode and then ``fchown``/``fchmod`` so the
  umask cannot widen or narrow it — except that with no group to give, a
  file created new (``O_EXCL``) whose mode the first ``fstat`` of the batch
  in that folder shows already right needs no ``fchmod`` (the umask is the
  same for the rest of the batch); a leftover dot-file (``EEXIST``, after a
  crash) is truncated and gets its mode set as before;
* bytes move with ``copy_file_range``, falling back to ``sendfile`` and then
  a buffered copy only on the errors that mean "not possible here" and only
  before anything was written (``copy_fd``);
* the first failure stops the phase; the caller learns which file and the
  errno, and maps it to the sink's errors exactly as before.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.errno cimport EBADF, EEXIST, EINTR, EINVAL, ENOSYS, EOPNOTSUPP, EXDEV, errno
from libc.stdlib cimport free, malloc

cdef extern from "<fcntl.h>" nogil:
    int openat(int dirfd, const char *path, int flags, ...)
    int O_WRONLY, O_CREAT, O_TRUNC, O_EXCL, O_CLOEXEC

cdef extern from "<sys/stat.h>" nogil:
    ctypedef unsigned int mode_t
    struct stat:
        mode_t st_mode
    int fstat(int fd, stat *buf)
    int fchmod(int fd, mode_t mode)

cdef extern from "<unistd.h>" nogil:
    ctypedef long off_t
    ctypedef long ssize_t
    ssize_t copy_file_range(int fd_in, off_t *off_in, int fd_out, off_t *off_out,
                            size_t length, unsigned int flags)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t pread(int fd, void *buf, size_t count, off_t offset)
    ssize_t write(int fd, const void *buf, size_t count)
    off_t lseek(int fd, off_t offset, int whence)
    int fchown(int fd, unsigned int owner, unsigned int group)
    int close(int fd)
    int SEEK_CUR

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<stdio.h>" nogil:
    int renameat(int olddirfd, const char *oldpath, int newdirfd, const char *newpath)

cdef extern from "<errno.h>" nogil:
    int ENOTSUP

# Copy methods, in the order they are tried; stage()'s errno for a copy that
# ended short of its length (the spool's file is short).
cdef enum:
    _RANGE = 0
    _SENDFILE = 1
    _BUFFERED = 2
    _SHORT = -1

METHOD_RANGE = _RANGE
METHOD_SENDFILE = _SENDFILE
METHOD_BUFFERED = _BUFFERED
SHORT = _SHORT

cdef long long _CHUNK = 64 * 1024 * 1024
cdef size_t _BUFFER = 1024 * 1024


cdef struct _File:
    int dir_fd
    const char *name      # the dot-name to create
    int src_fd            # -1: write ``data`` instead
    long long offset      # -1: from the source's own position
    long long length      # -1: to its end
    const char *data
    long long data_len


cdef inline bint _no_fast_copy(int err) noexcept nogil:
    return (err == EXDEV or err == EINVAL or err == ENOSYS or err == EOPNOTSUPP
            or err == ENOTSUP or err == EBADF)


cdef inline long long _want(long long done, long long length) noexcept nogil:
    if length < 0:
        return _CHUNK
    return _CHUNK if length - done > _CHUNK else length - done


cdef long long _copy_kernel(int src, int dst, long long offset, long long length,
                            bint use_sendfile, int *err) noexcept nogil:
    # copy_file_range or sendfile (the one fallback of the other), in chunks.
    cdef long long total = 0, want
    cdef off_t pos
    cdef off_t *at
    cdef ssize_t n
    while True:
        want = _want(total, length)
        if want == 0:
            return total
        at = NULL
        if offset >= 0:
            pos = <off_t>(offset + total)
            at = &pos
        if use_sendfile:
            n = sendfile(dst, src, at, <size_t>want)
        else:
            n = copy_file_range(src, at, dst, NULL, <size_t>want, 0)
        if n < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        if n == 0:
            return total
        total += n


cdef int _write_all(int fd, const char *data, long long size, int *err) noexcept nogil:
    cdef long long done = 0
    cdef ssize_t n
    while done < size:
        n = write(fd, data + done, <size_t>(size - done))
        if n < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        done += n
    return 0


cdef long long _copy_buffered(int src, int dst, long long offset, long long length,
                              int *err) noexcept nogil:
    cdef char *buf = <char *>malloc(_BUFFER)
    cdef long long total = 0, want
    cdef ssize_t got
    if buf == NULL:
        err[0] = 12  # ENOMEM
        return -1
    try:
        while True:
            want = _want(total, length)
            if want > <long long>_BUFFER:
                want = _BUFFER
            if want == 0:
                return total
            if offset < 0:
                got = read(src, buf, <size_t>want)
            else:
                got = pread(src, buf, <size_t>want, <off_t>(offset + total))
            if got < 0:
                if errno == EINTR:
                    continue
                err[0] = errno
                return -1
            if got == 0:
                return total
            if _write_all(dst, buf, got, err) < 0:
                return -1
            total += got
    finally:
        free(buf)


cdef long long _copy(int src, int dst, long long offset, long long length, int method,
                     int *err) noexcept nogil:
    """copy_file_range, else sendfile, else buffered; -1 with ``err`` set on failure."""
    cdef long long copied
    # A fallback that succeeds leaves no error behind from the method before it.
    if method <= _RANGE:
        copied = _copy_kernel(src, dst, offset, length, False, err)
        # Only fall back before anything was written; later errors are real.
        if copied >= 0 or not _no_fast_copy(err[0]) or lseek(dst, 0, SEEK_CUR) != 0:
            return copied
        err[0] = 0
    if method <= _SENDFILE:
        copied = _copy_kernel(src, dst, offset, length, True, err)
        if copied >= 0 or not _no_fast_copy(err[0]) or lseek(dst, 0, SEEK_CUR) != 0:
            return copied
        err[0] = 0
    return _copy_buffered(src, dst, offset, length, err)


def copy_fd(int src_fd, int dst_fd, long long offset=-1, long long length=-1,
            int method=_RANGE) -> int:
    """Copy ``length`` bytes (-1: to the end) of ``src_fd`` from ``offset`` (-1: its own
    position) to ``dst_fd``, starting with ``method``; the bytes copied, or OSError."""
    cdef int err = 0
    cdef long long copied
    with nogil:
        copied = _copy(src_fd, dst_fd, offset, length, method, &err)
    if copied < 0:
        raise OSError(err, _strerror(err))
    return copied


cdef int _open_dot(_File *f, unsigned int mode, long long gid, int *exact,
                   int *err) noexcept nogil:
    """Create the dot-file ``f.name`` with ``mode`` exactly (see the module docstring)."""
    cdef int fd
    cdef stat st
    if gid < 0:
        fd = openat(f.dir_fd, f.name, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode)
        if fd >= 0:
            if exact[0] == 0:   # first new file of the batch in this folder: look
                exact[0] = 1 if (fstat(fd, &st) == 0 and (st.st_mode & 0o7777) == mode) else -1
            if exact[0] == 1 or fchmod(fd, mode) == 0:
                return fd
            err[0] = errno
            close(fd)
            return -1
        if errno != EEXIST:
            err[0] = errno
            return -1
    # A leftover (O_TRUNC keeps its owner and mode) or a group to give: set both,
    # group first (chown may clear mode bits), before any byte.
    fd = openat(f.dir_fd, f.name, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
    if fd < 0:
        err[0] = errno
        return -1
    if (gid >= 0 and fchown(fd, <unsigned int>-1, <unsigned int>gid) != 0) or fchmod(fd, mode) != 0:
        err[0] = errno
        close(fd)
        return -1
    return fd


cdef long long _stage_one(_File *f, unsigned int mode, long long gid, int *exact,
                          int *err) noexcept nogil:
    cdef long long done
    cdef int fd = _open_dot(f, mode, gid, exact, err)
    if fd < 0:
        return -1
    if f.src_fd < 0:
        done = -1 if _write_all(fd, f.data, f.data_len, err) < 0 else f.data_len
    else:
        done = _copy(f.src_fd, fd, f.offset, f.length, _RANGE, err)
    if close(fd) != 0 and done >= 0:
        err[0] = errno
        return -1
    return done


def stage(list dir_fds, list names, list src_fds, list offsets, list lengths, list datas,
          unsigned int mode, long long gid) -> tuple:
    """Create and fill each dot-file ``names[i]`` (bytes) in ``dir_fds[i]``, in order.

    File ``i`` is copied from ``src_fds[i]`` (``offsets[i]``, ``lengths[i]``) or, where
    that is -1, written from ``datas[i]`` (bytes).  ``gid`` -1: no group to give.
    Returns ``(sizes, errno, copied)``: the sizes of the files done; on the first failure
    ``errno`` (``SHORT`` when a copy ended short, ``copied`` then its bytes), else 0.
    """
    cdef Py_ssize_t n = len(names), i, done = 0
    cdef _File *files = <_File *>PyMem_Malloc(max(n, 1) * sizeof(_File))
    cdef long long *sizes = <long long *>PyMem_Malloc(max(n, 1) * sizeof(long long))
    cdef int err = 0, exact = 0, last_dir = -1
    cdef long long size = 0
    cdef bytes name, data
    if files == NULL or sizes == NULL:
        PyMem_Free(files)
        PyMem_Free(sizes)
        raise MemoryError()
    try:
        for i in range(n):
            name = names[i]            # bytes, checked: the C side keeps only pointers
            files[i].dir_fd = dir_fds[i]
            files[i].name = PyBytes_AS_STRING(name)
            files[i].src_fd = src_fds[i]
            files[i].offset = offsets[i]
            files[i].length = lengths[i]
            if files[i].src_fd < 0:
                data = datas[i]
                if data is None:
                    raise TypeError(f"file {i} has neither a source nor bytes")
                files[i].data = PyBytes_AS_STRING(data)
                files[i].data_len = PyBytes_GET_SIZE(data)
        with nogil:
            while done < n:
                if files[done].dir_fd != last_dir:   # another folder: look at the mode again
                    last_dir = files[done].dir_fd
                    exact = 0
                size = _stage_one(&files[done], mode, gid, &exact, &err)
                if size < 0:
                    break
                if files[done].src_fd >= 0 and files[done].length >= 0 \
                        and size != files[done].length:
                    err = _SHORT
                    break
                sizes[done] = size
                done += 1
        return [sizes[i] for i in range(done)], err, size
    finally:
        PyMem_Free(files)
        PyMem_Free(sizes)


def rename_all(list dir_fds, list olds, list news) -> tuple:
    """``renameat(dir_fds[i], olds[i], dir_fds[i], news[i])`` in order (names are bytes).

    Returns ``(done, errno)``: how many were renamed, and the first failure's errno or 0.
    """
    cdef Py_ssize_t n = len(olds), i, done = 0
    cdef _File *files = <_File *>PyMem_Malloc(max(n, 1) * sizeof(_File))
    cdef int err = 0
    cdef bytes old, new
    if files == NULL:
        raise MemoryError()
    try:
        for i in range(n):
            old = olds[i]
            new = news[i]
            files[i].dir_fd = dir_fds[i]
            files[i].name = PyBytes_AS_STRING(old)
            files[i].data = PyBytes_AS_STRING(new)
        with nogil:
            while done < n:
                if renameat(files[done].dir_fd, files[done].name, files[done].dir_fd,
                            files[done].data) != 0:
                    err = errno
                    break
                done += 1
        return done, err
    finally:
        PyMem_Free(files)


def _strerror(int err) -> str:
    import os
    return os.strerror(err)
