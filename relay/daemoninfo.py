"""daemon.json: where the running daemon listens, and the outcome of its last reload.

The daemon writes it into its spool directory once it listens (again, until a
full disk takes it) and after each reload; ``lpd-relay spool`` reads it to
reach a daemon bound to port 0, ``lpd-relay reload`` to report what the
reload did.  A module of its own so the commands that read it need not load
the daemon's wiring (``relay.app``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Protocol

import orjson

from relay import log
from relay.durablefiles import overwrite, unlink_quiet, write_atomic


class Listening(Protocol):
    """The server or the intake workers: what they listen on now."""

    def bound(self) -> list[tuple[str, int]]: ...


DAEMON_INFO = "daemon.json"


@dataclass(slots=True)
class DaemonInfo:
    """daemon.json's content: where the daemon listens now and its last reload."""

    spool_dir: os.PathLike[str] | str
    server: Listening
    reload: dict[str, object] | None = None

    def write(self) -> bool:
        return write_daemon_info(self.spool_dir, self.server.bound(), reload=self.reload)


def write_daemon_info(spool_dir: os.PathLike[str] | str, lpd: list[tuple[str, int]], *,
                      reload: dict[str, object] | None = None) -> bool:
    """Where this daemon listens, for ``lpd-relay spool`` to reach it (port 0 included).

    Never stops the daemon: on a full disk the last daemon's file is
    overwritten in place (it has the blocks), else removed so the CLI falls
    back to the configured address; False means "try again later".
    """
    path = os.path.join(os.fspath(spool_dir), DAEMON_INFO)
    info: dict[str, object] = {"pid": os.getpid(), "lpd": [list(a) for a in lpd]}
    if reload is not None:
        info["reload"] = reload
    data = orjson.dumps(info)
    try:
        write_atomic(path, data, fsync=False)
        return True
    except OSError as exc:
        error = str(exc)
    try:
        overwrite(path, data)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            unlink_quiet(path)
    log.event("warning", "daemon_info_unsaved", path=path, error=error)
    return False
