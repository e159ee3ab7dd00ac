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
    run: list[bytes] = []   # the payloads of consecutive DataChunks, joined once
    for chunk in [*chunks, b""]:
        parser.receive_data(chunk)
        while (ev := _as_core(parser.next_event())) is not need_data:
            if isinstance(ev, _core.DataChunk):
                run.append(bytes(ev.data))
                continue
            if run:
                events.append(_core.DataChunk(data=b"".join(run)))
                run.clear()
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


# ---- running in parallel (pytest-xdist, ``make test``: -n N --dist loadgroup) ----
#
# Tests run side by side in several worker processes.  Almost every test owns
# what it uses (port 0, tmp_path, private mount/network/PID namespaces), but a
# few share something machine-wide; each such test is put into one xdist group
# here, and ``--dist loadgroup`` runs a group's tests one after another on one
# worker.  A test belongs to at most one group (xdist makes a test with two
# group marks a group of its own), so a test needing two of these resources
# goes under one name.  Keys are node-id prefixes: a module or one test.
XDIST_GROUPS: dict[str, tuple[str, ...]] = {
    # Tests that need ports below 1024 on the host's loopback to themselves:
    # rlpr's 721-731 (no SO_REUSEADDR), the origin-port pool tests that walk
    # 721-731 and read their TIME_WAITs from /proc/net/tcp, the probe's reuse
    # of 512-1023 TIME_WAITs, the reserve=any/rfc1179 source-port checks, and
    # port 515 held or probed by choose_default_port.  (Any relay forwarding
    # over lpd:// uses 721-731 by default, with SO_REUSEADDR: those tests
    # share the ports with each other and stay ungrouped.)
    "reserved-ports": (
        "tests/test_originports.py",
        "tests/test_forwarding.py",
        "tests/test_probe.py::test_finds_that_a_reserved_port_is_required",
        "tests/test_cups_options.py::test_reserve_any_is_a_reserved_port_like_cups",
        "tests/test_cups_options.py::test_reserve_rfc1179_is_721_to_731",
        "tests/test_peers.py::test_rlpr_sends_an_rfc1179_job_from_a_reserved_port",
        "tests/test_config.py::test_choose_default_port_",
        "tests/test_startup.py::test_no_permission_for_port_515",
    ),
    # The Debian package: one build into build/package-cache/ of the checkout
    # (module fixtures, so once per worker that runs any of it), lintian, and
    # dpkg with its maintainer scripts.
    "deb-package": ("tests/test_package.py",),
}


def xdist_group_of(nodeid: str) -> str | None:
    """The group of the test ``nodeid`` in XDIST_GROUPS, or None."""
    for group, prefixes in XDIST_GROUPS.items():
        if nodeid.startswith(prefixes):
            return group
    return None


# Groups whose tests also need nothing else beside them: tests outside the
# group use the same resource (every relay delivering over lpd:// takes
# 721-731 by default), and these tests count what they see there, e.g. one
# origin-port acquisition per delivery attempt.  They are marked ``exclusive``;
# ``make test`` runs them after the parallel part, one at a time.
EXCLUSIVE_GROUPS = frozenset({"reserved-ports"})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The groups as ``xdist_group`` marks too (and ``exclusive``), for ``-m``."""
    for item in items:
        group = xdist_group_of(item.nodeid)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
            if group in EXCLUSIVE_GROUPS:
                item.add_marker(pytest.mark.exclusive)


@pytest.hookimpl(tryfirst=True, optionalhook=True)   # without pytest-xdist: unused
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` that reads the groups from the node ids itself.

    xdist's own loadgroup learns a test's group from an ``@group`` suffix the
    worker writes into the node id, which pytest 9.2's structured node ids no
    longer take (pytest-xdist issue 1386: the tests are then spread as if
    ungrouped, silently).  This scheduler asks XDIST_GROUPS instead; every
    other test is a work unit of its own, as under ``--dist load``.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class TableGroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid) or super()._split_scope(nodeid)

    return TableGroupScheduling(config, log)
