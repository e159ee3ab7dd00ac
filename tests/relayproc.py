"""A relay subprocess whose log is kept, and a private tmpfs another process can fill.

``LoggedRelay`` reads the relay's stdout for the whole run (a relay whose
log pipe fills up would block on its next line) and keeps the JSON events,
so a test can wait for an event and learn the metrics address.
``PrivateTmpfs`` mounts a small tmpfs in a mount namespace of its own, held
open by a sleeping process, so it outlives a relay killed with ``kill -9``
and a restart finds it as it was: the relay and ``dd`` enter it with nsenter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from relay import client
from tests.daemon import ROOT, RelayProcess

METRICS_LINE = re.compile(r"metrics on http://([0-9.]+):(\d+)/metrics")


class LoggedRelay(RelayProcess):
    """``RelayProcess`` that drains and keeps its log (stderr, joined to stdout)."""

    def __init__(self, config_file: Path, *, wrapper: tuple[str, ...] = ()) -> None:
        super().__init__(config_file, wrapper=(*wrapper, "sh", "-c", 'exec "$@" 2>&1', "sh"))

    def start(self, timeout: float = 30) -> LoggedRelay:
        super().start(timeout)
        self.lines: list[str] = list(self.banner)
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        threading.Thread(target=lambda: self.lines.extend(
            line.rstrip("\n") for line in iter(out.readline, "")), daemon=True).start()
        return self

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            if line.startswith("{"):
                ev = orjson.loads(line)
                if ev.get("event") == name:
                    found.append(ev)
        return found

    def metrics_url(self, timeout: float = 10) -> str:
        found = wait_until(lambda: next((m for line in list(self.lines)
                                         if (m := METRICS_LINE.search(line))), None), timeout)
        return f"http://{found.group(1)}:{found.group(2)}/metrics"

    def tracebacks(self) -> list[str]:
        return [line for line in list(self.lines) if "Traceback" in line]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def wait_until(check: Callable[[], Any], timeout: float = 20, step: float = 0.05) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


class PrivateTmpfs:
    """A tmpfs of ``size`` at ``path``, visible only in its own mount namespace."""

    def __init__(self, path: Path, size: str) -> None:
        if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("nsenter")):
            pytest.skip("needs root, unshare and nsenter for a private tmpfs")
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        script = 'mount -t tmpfs -o "size=$1" tmpfs "$0" && echo ready && exec sleep 600'
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(path), size],
            stdout=subprocess.PIPE, text=True)
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.close()
            pytest.skip("cannot mount a tmpfs in a private mount namespace")

    @property
    def wrapper(self) -> tuple[str, ...]:
        """An argv prefix that runs a command inside the namespace."""
        return ("nsenter", "-t", str(self.holder.pid), "-m", f"--wd={ROOT}", "--")

    def inside(self, path: Path) -> Path:
        """``path`` (under the tmpfs) as this process can reach it."""
        return Path(f"/proc/{self.holder.pid}/root{path}")

    def free(self) -> int:
        st = os.statvfs(self.inside(self.path))
        return st.f_bavail * st.f_frsize

    def fill(self, name: str = "filler") -> None:
        """Another process takes every free byte (dd stops at ENOSPC)."""
        subprocess.run([*self.wrapper, "dd", "if=/dev/zero", f"of={self.path / name}",
                        "bs=4k", "oflag=append", "conv=notrunc"],
                       capture_output=True, timeout=60, check=False)
        assert self.free() == 0

    def close(self) -> None:
        if self.holder.poll() is None:
            self.holder.kill()
        self.holder.wait(10)


def relay_lpq(port: int, queue: str = "q", *, long: bool = False) -> str:
    """The relay at ``port``'s lpq answer for ``queue``, through the relay's own client."""
    async def main() -> str:
        ch = await client.open_channel("127.0.0.1", port, io_timeout=10)
        try:
            return await client.query(ch, queue, long=long)
        finally:
            await ch.aclose()
    return trio.run(main)
