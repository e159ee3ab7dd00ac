"""Typed face of relay._dirio: the hot folder's batch file work without the GIL."""

from collections.abc import Sequence

METHOD_RANGE: int
METHOD_SENDFILE: int
METHOD_BUFFERED: int
SHORT: int

def copy_fd(src_fd: int, dst_fd: int, offset: int = -1, length: int = -1,
            method: int = ...) -> int: ...
def stage(dir_fds: list[int], names: list[bytes], src_fds: list[int], offsets: list[int],
          lengths: list[int], datas: Sequence[bytes | None], mode: int,
          gid: int) -> tuple[list[int], int, int]: ...
def rename_all(dir_fds: list[int], olds: list[bytes], news: list[bytes]) -> tuple[int, int]: ...
