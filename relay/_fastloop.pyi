"""Type stubs for the compiled epoll loop (relay/_fastloop.pyx)."""

from typing import Any

IN_LOOP: int
EVENT: int
RAISE: int
LOST: int
SEND: int
TIMEOUT: int
COMMIT: int
CLOSED: int
AWAY: int

class Conn:
    fd: int
    conn: Any
    sock: Any
    host: str
    parser: Any
    last: float
    due: float
    busy: bool
    kind: int
    payload: Any
    jobs: list[Any]
    owed: list[int]
    pipe: Any

class FastLoop:
    fd: int
    def __init__(self, small_file: int) -> None: ...
    @property
    def count(self) -> int: ...
    def close(self) -> None: ...
    def add(self, conn: Any, sock: Any, host: str, now: float) -> list[Conn]: ...
    def poll(self, now: float) -> list[Conn]: ...
    def resume(self, c: Conn, now: float) -> list[Conn]: ...
    def pause(self, c: Conn) -> None: ...
    def unpause(self, c: Conn, now: float) -> list[Conn]: ...
    def release(self, c: Conn, write: bool) -> int: ...
    def out(self) -> list[Conn]: ...
    def drop(self, c: Conn) -> None: ...
    def expired(self, now: float) -> tuple[list[Conn], float]: ...
    def take_all(self) -> list[Conn]: ...
