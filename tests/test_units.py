"""Durations and sizes as written in the configuration (SPEC §3)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(("text", "seconds"), [
    ("250ms", 0.25),
    ("30s", 30.0),
    ("5m", 300.0),
    ("24h", 86400.0),
    ("2d", 172800.0),
    ("1h30m", 5400.0),
    ("1m30s500ms", 90.5),
    ("0s", 0.0),
    ("0ms", 0.0),
    ("1.5s", 1.5),
    ("0.1s", 0.1),
    (" 10s ", 10.0),
    ("1h 30m", 5400.0),
])
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "30", "0", "-5s", "-0s", "5x", "s", "ms", "5 sec", "1.s", ".5s", "5S", "1e3s",
    "5s-", "5m junk", "nan", "inf", "1,5s",
])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_parse_duration_error_names_accepted_forms() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("60")
    assert '"30s"' in str(info.value) and '"250ms"' in str(info.value)
    assert "'60'" in str(info.value)


def test_parse_duration_negative_is_explained() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-5s")


@pytest.mark.parametrize(("text", "size"), [
    ("0", 0),
    ("512", 512),
    ("512B", 512),
    ("64KiB", 64 * 1024),
    ("1KiB", 1024),
    ("512MiB", 512 * 2**20),
    ("4GiB", 4 * 2**30),
    ("2TiB", 2 * 2**40),
    ("1KB", 1000),
    ("1MB", 10**6),
    ("1GB", 10**9),
    ("1TB", 10**12),
    ("1.5KiB", 1536),
    ("64 KiB", 64 * 1024),
    ("4gib", 4 * 2**30),
    ("1kb", 1000),
])
def test_parse_size_accepts(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", [
    "", "KiB", "-1", "-1KiB", "1K", "1Ki", "1XB", "1.5B", "1.1", "4 GiB extra", "1e3", "0x10",
])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_error_names_accepted_forms() -> None:
    with pytest.raises(ValueError) as info:
        parse_size("4G")
    assert "KiB" in str(info.value) and "'4G'" in str(info.value)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_duration(30)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        parse_size(512)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "text"), [
    (0, "0B"), (512, "512B"), (1024, "1KiB"), (1536, "1.5KiB"), (4 * 2**30, "4GiB"),
    (2**40, "1TiB"), (10**6, "976.6KiB"), (-2048, "-2KiB"),
])
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.25, "250ms"), (30, "30s"), (90, "1m30s"), (5400, "1h30m"),
    (86400, "1d"), (1.5, "1s500ms"), (0.0004, "0s"), (-5, "-5s"),
])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=10**15))
def test_exact_sizes_round_trip(size: int) -> None:
    text = format_size(size)
    if "." not in text:
        assert parse_size(text) == size
    else:  # rounded to one decimal of the unit, for people: within 5 %
        number, unit = float(text[:-3]), text[-3:]
        assert abs(number * parse_size(f"1{unit}") - size) <= size * 0.05


@given(st.integers(min_value=0, max_value=10**10))
def test_durations_round_trip_to_the_millisecond(millis: int) -> None:
    assert parse_duration(format_duration(millis / 1000)) == pytest.approx(millis / 1000)


@given(st.text(max_size=20))
def test_parse_never_raises_anything_but_value_error(text: str) -> None:
    for parse in (parse_duration, parse_size):
        with contextlib.suppress(ValueError):
            parse(text)
