"""Run a real relay for tests: in a background thread, or as a subprocess.

Both bind port 0 on loopback and report the real ports; both are stopped by
the test that started them (the subprocess by its PID).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio
from prometheus_client import CollectorRegistry

from relay import app
from relay.config import Config, config_from_dict

ROOT = Path(__file__).resolve().parent.parent


def relay_config(tmp: Path, *, server: Mapping[str, Any] | None = None,
                 queues: Mapping[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    """A config dict on loopback with a tmp spool and a hot folder catch-all."""
    data: dict[str, Any] = {
        "server": {"listen": ["127.0.0.1:0"], "spool_dir": str(tmp / "spool"),
                   "min_free_disk": "0B", "idle_timeout": "10s", **(server or {})},
        "metrics": {"listen": "127.0.0.1:0"},
        "log": {"format": "json", "level": "info"},
        "queues": dict(queues) if queues is not None else
        {"*": {"destinations": [f"dir://{tmp / 'out'}"]}},
    }
    data.update(sections)
    return data


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)   # ints, and strings: JSON's escapes are TOML's


def to_toml(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """The few TOML shapes a relay config uses: tables, strings, numbers, lists."""
    lines = []
    scalars = {k: v for k, v in data.items() if not isinstance(v, Mapping)}
    if prefix and scalars:
        lines.append("[" + ".".join(map(_toml_key, prefix)) + "]")
    lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items()]
    for key, table in data.items():
        if isinstance(table, Mapping):
            lines.append(to_toml(table, (*prefix, key)))
    return "\n".join(lines)


def write_config_file(path: Path, data: Mapping[str, Any]) -> Path:
    """``data`` (e.g. from relay_config) as the TOML file a relay process reads."""
    path.write_text(to_toml(data) + "\n")
    return path


class DaemonThread:
    """``app.run`` in a thread with its own trio loop; context manager."""

    def __init__(self, config: Config | Mapping[str, Any]) -> None:
        self.config = config if isinstance(config, Config) else \
            config_from_dict(dict(config), "<test>")
        self.registry = CollectorRegistry()
        self.bound: app.Bound | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    @property
    def port(self) -> int:
        assert self.bound is not None
        return self.bound.lpd[0][1]

    def metric(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self._scope:
                async with trio.open_nursery() as nursery:
                    self.bound = await nursery.start(
                        lambda task_status: app.run(self.config, registry=self.registry,
                                                    task_status=task_status))
                    self._started.set()
        try:
            trio.run(main)
        except BaseException as exc:  # reported to the test in __enter__/__exit__
            self.error = exc
        finally:
            self._started.set()

    def __enter__(self) -> DaemonThread:
        self._thread.start()
        self._started.wait(30)
        if self.error is not None or self.bound is None:
            raise RuntimeError(f"relay did not start: {self.error!r}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._token is not None and self._scope is not None:
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.error is not None:
            raise self.error


BANNER_PORT = re.compile(r"listening for LPD on \[?([0-9a-f.:]+)\]?:(\d+)")


class RelayProcess:
    """``python -m relay serve -c FILE`` as a child process."""

    def __init__(self, config_file: Path, *, env: Mapping[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        """``wrapper`` is an argv prefix, e.g. a private mount namespace to run in."""
        self.config_file = config_file
        self.wrapper = wrapper
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.banner: list[str] = []

    def start(self, timeout: float = 30) -> RelayProcess:
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "relay", "serve", "-c", str(self.config_file)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env,
            cwd=ROOT)
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"relay exited with {self.proc.wait()}")
            self.banner.append(line.rstrip())
            if line.startswith("spool "):
                match = next(BANNER_PORT.search(b) for b in self.banner if BANNER_PORT.search(b))
                self.port = int(match.group(2))
                return self
        raise RuntimeError("relay did not print its banner in time")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
