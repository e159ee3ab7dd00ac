"""Shared test helper: drive the protocol core over a list of chunks.

A plain function rather than a fixture, so hypothesis tests can call it too
(tests import it as ``tests.conftest.parse_chunks``).

``impl="py"`` drives the pure-Python reference parser of the benchmarks
instead (aiohttp-style "c"/"py" ids): both must give the same events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from benchmarks.reference_parser import ReferenceParser
from relay import _core
from tests.peers.postgres import PostgresCluster, require_postgres


def _as_core(ev: Any) -> Any:
    """A reference-parser event as the equivalent core event."""
    if not dataclasses.is_dataclass(ev):
        return ev
    fields = {f.name: getattr(ev, f.name) for f in dataclasses.fields(ev)}
    return getattr(_core, type(ev).__name__)(**fields)


def parse_chunks(chunks: Iterable[bytes | bytearray | memoryview], impl: str = "c",
                 **limits: int) -> list[Any]:
    """Feed ``chunks`` then EOF to a fresh ServerParser; the events, normalised.

    Consecutive DataChunk payloads are copied out (a chunk is only valid until
    the next receive_data) and merged, so any split of a stream gives the
    same list.  Raises what the parser raises.
    """
    parser: Any = (_core.ServerParser if impl == "c" else ReferenceParser)(**limits)
    need_data = _core.NEED_DATA if impl == "c" else "NEED_DATA"
    events: list[Any] = []
    for chunk in [*chunks, b""]:
        parser.receive_data(chunk)
        while (ev := _as_core(parser.next_event())) is not need_data:
            if isinstance(ev, _core.DataChunk):
                data = bytes(ev.data)
                if events and isinstance(events[-1], _core.DataChunk):
                    data = bytes(events.pop().data) + data
                ev = _core.DataChunk(data=data)
            events.append(ev)
            if isinstance(ev, _core.EndOfStream):
                return events
    raise AssertionError("no EndOfStream after EOF")



@pytest.fixture(scope="session")
def cluster() -> Iterator[PostgresCluster]:
    """One private PostgreSQL cluster for every test module that asks for it
    (each test makes its own database); skips where PostgreSQL is missing."""
    require_postgres()
    with PostgresCluster() as pg:
        yield pg
