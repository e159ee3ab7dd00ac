"""Queue routing (SPEC §3.2, §4.3) and safe hot-folder names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import Config, load_config
from relay.errors import REPLY_NOT_ACCEPTING, ProtocolError
from relay.queues import QueueRouter, folder_name, sanitize_name

WARD3 = """
[queues.ward3]
aliases = ["Ward3", "HP_Ward3"]
destinations = ["lpd://laptop-ward3.vpn/Ward3?mode=count", "socket://10.1.2.3:9100"]

[queues.Lab]
destinations = ["socket://10.1.2.4"]
"""

CATCH_ALL = """
[queues."*"]
destinations = ["dir:///srv/lpd-relay-out"]
"""


def _config(tmp_path: Path, body: str, *, exact: bool = False) -> Config:
    mode = "exact" if exact else "case-insensitive"
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\nqueue_names = "{mode}"\n{body}', encoding="utf-8")
    return load_config(path)


def _refusal(router: QueueRouter, name: str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        router.route(name)
    assert info.value.reply == REPLY_NOT_ACCEPTING
    assert info.value.reason == "unknown_queue"
    return info.value


@pytest.mark.parametrize(("wire", "queue"), [
    ("ward3", "ward3"), ("WARD3", "ward3"), ("Ward3", "ward3"), ("hp_ward3", "ward3"),
    ("HP_WARD3", "ward3"), ("lab", "Lab"), ("LAB", "Lab"), ("Lab", "Lab"),
])
def test_case_insensitive_matches_names_and_aliases(tmp_path: Path, wire: str,
                                                   queue: str) -> None:
    router = QueueRouter(_config(tmp_path, WARD3))
    assert router.route(wire).name == queue


def test_case_insensitive_uses_casefold(tmp_path: Path) -> None:
    router = QueueRouter(_config(tmp_path, '[queues."Straße"]\ndestinations = ["socket://p"]\n'))
    assert router.route("STRASSE").name == "Straße"


@pytest.mark.parametrize(("wire", "queue"), [
    ("ward3", "ward3"), ("Ward3", "ward3"), ("HP_Ward3", "ward3"), ("Lab", "Lab"),
])
def test_exact_matches_exact_spellings(tmp_path: Path, wire: str, queue: str) -> None:
    router = QueueRouter(_config(tmp_path, WARD3, exact=True))
    assert router.route(wire).name == queue


def test_unknown_queue_is_refused_with_one_line(tmp_path: Path) -> None:
    router = QueueRouter(_config(tmp_path, WARD3))
    assert str(_refusal(router, "ward4")) == "queue 'ward4' unknown"


@pytest.mark.parametrize(("wire", "configured"), [
    ("WARD3", "ward3"), ("hp_ward3", "HP_Ward3"), ("lab", "Lab"),
])
def test_exact_case_only_mismatch_names_the_configured_spelling(
        tmp_path: Path, wire: str, configured: str) -> None:
    router = QueueRouter(_config(tmp_path, WARD3, exact=True))
    assert str(_refusal(router, wire)) == (
        f"queue '{wire}' unknown; the configured queue is '{configured}' "
        "(queue names are exact)")


def test_catch_all_takes_everything_else(tmp_path: Path) -> None:
    router = QueueRouter(_config(tmp_path, WARD3 + CATCH_ALL))
    assert router.route("ward3").name == "ward3"
    assert router.route("anything").name == "*"
    assert router.route("").name == "*"
    assert router.route("../../etc/passwd").name == "*"


def test_exact_case_mismatch_with_catch_all_goes_to_catch_all(tmp_path: Path) -> None:
    router = QueueRouter(_config(tmp_path, WARD3 + CATCH_ALL, exact=True))
    assert router.route("WARD3").name == "*"
    assert router.route("Ward3").name == "ward3"


def test_configured_names_are_the_bounded_labels(tmp_path: Path) -> None:
    router = QueueRouter(_config(tmp_path, WARD3 + CATCH_ALL))
    assert router.configured_names() == ("ward3", "Lab", "*")
    router.route("some-wire-name")
    assert "some-wire-name" not in router.configured_names()


@pytest.mark.parametrize("hostile", [
    "../../etc/passwd", "/etc/passwd", "a\nb", "\x00\x01\x02", "q\r\n\x1b[2J", "é" * 10,
    "x" * 100 * 1024, "\n" * 100 * 1024, "'; rm -rf /", "\udcff",
])
def test_hostile_names_are_refused_safely(tmp_path: Path, hostile: str) -> None:
    router = QueueRouter(_config(tmp_path, WARD3, exact=True))
    message = str(_refusal(router, hostile))
    assert message.startswith("queue '") and message.endswith("' unknown")
    assert message.isascii() and message.isprintable()
    assert len(message) <= len("queue '' unknown") + 64


def test_sanitize_name() -> None:
    assert sanitize_name("Ward3") == "Ward3"
    assert sanitize_name("a\nb\x00c") == "a?b?c"
    assert sanitize_name("é") == "?"
    assert sanitize_name("x" * 64) == "x" * 64
    assert sanitize_name("x" * 65) == "x" * 61 + "..."
    assert len(sanitize_name("y" * 100_000)) == 64


@pytest.mark.parametrize(("queue", "wire", "folder"), [
    ("ward3", "WARD3", "ward3"),
    ("HP_Ward3.v2-a", "x", "HP_Ward3.v2-a"),
    ("*", "Ward3", "Ward3"),
    ("*", "../../etc", "_._.._etc"),
    ("*", "..", "_."),
    ("*", ".", "_"),
    ("*", ".hidden", "_hidden"),
    ("*", "", "_"),
    ("*", "a/b\\c", "a_b_c"),
    ("*", "a\x00b\nc", "a_b_c"),
    ("*", "café", "caf_"),
    ("*", "x" * 100 * 1024, "x" * 64),
    ("we:ird", "x", "we_ird"),
])
def test_folder_name(queue: str, wire: str, folder: str) -> None:
    assert folder_name(queue, wire) == folder


@given(st.text(max_size=200), st.sampled_from(["*", "ward3", ".x", "a/b", ""]))
def test_folder_name_is_always_one_safe_component(wire: str, queue: str) -> None:
    name = folder_name(queue, wire)
    assert 1 <= len(name) <= 64
    assert not name.startswith(".")
    assert os.sep not in name and "\0" not in name
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for ch in name)


def test_folder_name_stays_inside_a_real_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for wire in ("../escape", "/abs", "..", "a/../../b", "\x00"):
        folder = out / folder_name("*", wire)
        folder.mkdir()
        assert folder.resolve().parent == out.resolve()
    assert not (tmp_path / "escape").exists()
