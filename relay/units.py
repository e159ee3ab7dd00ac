"""Durations and sizes as people write them in the configuration (SPEC §3).

Durations are strings such as ``"250ms"``, ``"30s"``, ``"5m"``, ``"24h"`` or a
sum such as ``"1h30m"``; sizes are ``"512"``, ``"512B"``, ``"64KiB"``,
``"4GiB"`` or SI ``"1MB"``.  A bare number is refused for a duration because
"60" could mean seconds or minutes, while a bare number of bytes is
unambiguous.  Parsing is exact (``fractions.Fraction``), so ``"1.5KiB"`` is
1536 bytes and ``"0.1s"`` does not pick up float noise before the final
conversion.  The ``format_*`` functions give short human output that
``parse_*`` reads back.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

# Seconds per duration unit.  "d" is accepted because give_up_after is often
# a number of days; longer units (weeks, months) are vague and left out.
_DURATION_UNITS: dict[str, Fraction] = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
}

# Bytes per size unit, keyed case-folded so "kib", "KiB" and "KIB" all work:
# admins type these by hand and no reading of "mb" as millibits makes sense.
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_NUMBER = r"\d+(?:\.\d+)?"
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|s|m|h|d)")
_DURATION_WHOLE = re.compile(rf"(?:{_NUMBER}\s*(?:ms|s|m|h|d)\s*)+")
_SIZE = re.compile(rf"({_NUMBER})\s*([A-Za-z]*)")

# More digits than any sane value has: refused before exact arithmetic (and
# int()'s 4300-digit guard) sees them.
_MAX_DIGITS = 24

_DURATION_FORMS = 'a duration such as "250ms", "30s", "5m", "24h", "2d" or "1h30m"'
_SIZE_FORMS = ('a size such as "512", "512B", "64KiB", "4GiB", "1MB" '
               "(units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")


def parse_duration(text: str) -> float:
    """Return the number of seconds ``text`` stands for.

    Raises ``ValueError`` naming the accepted forms for negatives, bare
    numbers, unknown units and anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected {_DURATION_FORMS}, got {text!r}")
    stripped = text.strip()
    if stripped.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {text!r}")
    if not _DURATION_WHOLE.fullmatch(stripped):
        raise ValueError(f"expected {_DURATION_FORMS}, got {text!r}")
    if any(len(number) > _MAX_DIGITS for number, _ in _DURATION_PART.findall(stripped)):
        raise ValueError(f"duration too large: {text[:40]!r}")
    total = sum(
        (Fraction(number) * _DURATION_UNITS[unit]
         for number, unit in _DURATION_PART.findall(stripped)),
        Fraction(0),
    )
    return float(total)


def parse_size(text: str) -> int:
    """Return the number of bytes ``text`` stands for.

    Fractions are allowed only when they come to whole bytes (``"1.5KiB"``).
    Raises ``ValueError`` naming the accepted forms otherwise.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected {_SIZE_FORMS}, got {text!r}")
    if text.strip().startswith("-"):
        raise ValueError(f"a size cannot be negative, got {text!r}")
    match = _SIZE.fullmatch(text.strip())
    if match is None or match.group(2).casefold() not in _SIZE_UNITS:
        raise ValueError(f"expected {_SIZE_FORMS}, got {text!r}")
    if len(match.group(1)) > _MAX_DIGITS:
        raise ValueError(f"size too large: {text[:40]!r}")
    value = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).casefold()]
    if value.denominator != 1:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(value)


# Largest unit first, so the shortest exact spelling wins.
_SIZE_OUT = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_size(n: int) -> str:
    """Short human form of ``n`` bytes: ``"4GiB"``, ``"1.5KiB"``, ``"512B"``.

    Exact multiples print without decimals (and parse back exactly); other
    values are rounded to one decimal in the largest unit that fits.
    """
    if n < 0:
        return "-" + format_size(-n)
    for unit, factor in _SIZE_OUT:
        if n >= factor:
            if n % factor == 0:
                return f"{n // factor}{unit}"
            return f"{n / factor:.1f}{unit}"
    return f"{n}B"


_DURATION_OUT = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1))


def format_duration(seconds: float) -> str:
    """Short human form of a duration: ``"250ms"``, ``"1m30s"``, ``"24h"``.

    Rounded to the millisecond; the result parses back with ``parse_duration``.
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts: list[str] = []
    for unit, factor in _DURATION_OUT:
        count, millis = divmod(millis, factor)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
