"""Pytest fixtures for the peers.

Use them with ``pytest_plugins = ("tests.peers",)`` in the root conftest
(``tests.peers`` re-exports them), or build the objects directly in a
``with`` block.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.peers.lprng import LprngServer
from tests.peers.p910nd import P910nd
from tests.peers.recording import RecordingLpdServer


@pytest.fixture
def lprng_server(tmp_path: Path) -> Iterator[LprngServer]:
    """A private LPRng lpd with held queues ``q`` and ``Ward3``."""
    with LprngServer(tmp_path / "lprng", queues=("q", "Ward3")) as server:
        yield server


@pytest.fixture
def make_lprng_server(tmp_path: Path) -> Iterator[Callable[..., LprngServer]]:
    """Factory: ``make_lprng_server(queues, **options)``; all stopped at teardown."""
    with contextlib.ExitStack() as stack:
        def make(queues: Sequence[str] | Mapping[str, str] = ("q",),
                 **options: Any) -> LprngServer:
            workdir = Path(tempfile.mkdtemp(prefix="lprng-", dir=tmp_path))
            return stack.enter_context(LprngServer(workdir, queues, **options))
        yield make


@pytest.fixture
def recording_lpd() -> Iterator[RecordingLpdServer]:
    """A well-behaved RecordingLpdServer; set ``.script`` to make it misbehave."""
    with RecordingLpdServer() as server:
        yield server


@pytest.fixture
def p910nd_printer(tmp_path: Path) -> Iterator[P910nd]:
    """A p910nd raw printer on 127.0.0.1:9100+N printing into a pipe."""
    with P910nd(tmp_path / "p910nd") as printer:
        yield printer
