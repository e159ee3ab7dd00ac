"""LPD control files (RFC 1179 §7): the record, parse, serialize, rewrite.

A control file is a list of lines, each one command letter and a value.  The
record keeps every line in order, so ``serialize()`` gives back the bytes it
was parsed from and nothing a sender wrote is lost on the way through the
relay; typed properties answer the questions the rest of the relay asks
(who, from where, which data files in which format).

``rewrite()`` is what delivery needs (SPEC §5): a fresh job number and
``cfA``/``dfA`` names for the destination, the ``H`` line untouched, ``U``
lines renamed, ``S`` lines dropped, and the other file-name lines (``N`` and
the troff fonts ``1``-``4``) reduced to a base name, so a sender cannot hand
a path such as ``N../../etc/shadow`` on to the destination.  Values are decoded latin-1 so every
byte round-trips; ``as_text()`` re-reads a value as UTF-8 for display.

Pure Python: control files are a few hundred bytes, parsed once per job.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.errors import ProtocolError

# RFC 1179 §7 lists c d f g k l n o p r t v z as formats; LPRng takes every
# lowercase letter as "print this data file in this format".
FORMAT_LETTERS = frozenset(string.ascii_lowercase)
# Command letters: upper- and lowercase letters, and the troff font lines 1-4.
_LETTERS = frozenset(string.ascii_letters + string.digits)
# Data-file letters of a rewritten job, in order: dfA..dfZ, dfa..dfz.
_DF_LETTERS = string.ascii_uppercase + string.ascii_lowercase
# Bytes refused inside a value: controls other than TAB, and DEL.
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BAD_HOST = re.compile(r"[\x00-\x20\x7f/\\]")
# Lines whose value is a file name on the receiving side (RFC 1179 §7.2: N the
# source file, 1-4 troff font files): forwarded as a base name only.
FILE_NAME_LINES = frozenset("N1234")
# The lines whose values are job or file names ([privacy], relay.privacy).
NAME_LINES = frozenset("JNT")
_PATH_SEPARATORS = re.compile(r"[/\\]")
_NAME_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
# cfA / dfA (RFC), cf / df, and the HP-style cA / c prefixes.
_JOB_NAME = re.compile(r"(?P<prefix>[cd]f[A-Za-z]|[cd]f|[cd][A-Za-z]|[cd]?)"
                       r"(?P<digits>[0-9]*)(?P<host>.*)", re.DOTALL)


def _malformed(message: str) -> ProtocolError:
    return ProtocolError(message, reply=3, reason="malformed")


@dataclass(frozen=True, slots=True, kw_only=True)
class PrintFile:
    """One format line: print data file ``name`` as ``format`` (e.g. "l", "f")."""

    format: str
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class JobName:
    """A control- or data-file name split: ``cfA`` + ``123`` + ``host``."""

    prefix: str
    number: str
    host: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ControlFile:
    """The ordered (letter, value) lines of a control file.

    ``newline`` is "\\n", or "\\r\\n" when every line of the original ended so;
    ``final_newline`` is False when the last line had no line end.  Both only
    exist so ``serialize()`` reproduces what was parsed.
    """

    lines: tuple[tuple[str, str], ...]
    newline: str = "\n"
    final_newline: bool = True
    _index: dict[str, str] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.lines:
            raise ValueError("a control file has at least one line")
        if self.newline not in ("\n", "\r\n"):
            raise ValueError(f"newline must be LF or CR LF, not {self.newline!r}")
        index: dict[str, str] = {}
        for letter, value in self.lines:
            if len(letter) != 1 or letter not in _LETTERS:
                raise ValueError(f"bad command letter {letter!r}")
            if _BAD_VALUE.search(value.encode("latin-1")):
                raise ValueError(f"control character in value {value!r}")
            index.setdefault(letter, value)
        object.__setattr__(self, "_index", index)

    def first(self, letter: str) -> str | None:
        """The value of the first ``letter`` line, or None."""
        return self._index.get(letter)

    def values(self, letter: str) -> tuple[str, ...]:
        """The values of every ``letter`` line, in order."""
        return tuple(value for key, value in self.lines if key == letter)

    @property
    def host(self) -> str | None:
        """H: the host the job came from (kept unchanged when forwarding)."""
        return self.first("H")

    @property
    def user(self) -> str | None:
        """P: the user (login name) who submitted the job."""
        return self.first("P")

    @property
    def job_name(self) -> str | None:
        """J: the job name shown in banners and lpq."""
        return self.first("J")

    @property
    def job_class(self) -> str | None:
        """C: the class for the banner page."""
        return self.first("C")

    @property
    def banner(self) -> str | None:
        """L: print a banner page for this user name."""
        return self.first("L")

    @property
    def source_name(self) -> str | None:
        """N: the name of the source file (first N line)."""
        return self.first("N")

    @property
    def title(self) -> str | None:
        """T: title for pr."""
        return self.first("T")

    @property
    def mail(self) -> str | None:
        """M: mail this user when the job is done."""
        return self.first("M")

    @property
    def indent(self) -> int | None:
        """I: indent for the f format, or None when absent or not a number."""
        return _number(self.first("I"))

    @property
    def width(self) -> int | None:
        """W: page width for the f, l and p formats, or None."""
        return _number(self.first("W"))

    @property
    def identifier(self) -> str | None:
        """A: LPRng's job identifier."""
        return self.first("A")

    @property
    def queue_name(self) -> str | None:
        """Q: LPRng's original queue name."""
        return self.first("Q")

    @property
    def accounting(self) -> str | None:
        """R: LPRng's accounting name."""
        return self.first("R")

    @property
    def options(self) -> str | None:
        """Z: filter options (LPRng, CUPS)."""
        return self.first("Z")

    @property
    def print_files(self) -> tuple[PrintFile, ...]:
        """Every format line, in order (a repeated line is another copy)."""
        return tuple(PrintFile(format=letter, name=value)
                     for letter, value in self.lines if letter in FORMAT_LETTERS)

    @property
    def data_files(self) -> tuple[str, ...]:
        """Distinct data-file names referenced by format lines, first seen first."""
        seen = dict.fromkeys(value for letter, value in self.lines if letter in FORMAT_LETTERS)
        return tuple(seen)

    def serialize(self) -> bytes:
        """The control file's bytes (without the transfer's trailing NUL)."""
        text = self.newline.join(letter + value for letter, value in self.lines)
        if self.final_newline:
            text += self.newline
        return text.encode("latin-1")


def _number(value: str | None) -> int | None:
    if value is None or not value.strip().isdigit():
        return None
    return int(value)


def as_text(value: str) -> str:
    """A latin-1 decoded value re-read as UTF-8 when it is valid UTF-8 (for display)."""
    raw = value.encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return value


def parse_control_file(data: bytes) -> ControlFile:
    """Parse a control file; ProtocolError(reply=3, reason="malformed") if it is not one.

    LF and CR LF line ends are both accepted (Windows senders), as is a last
    line without a line end.  Refused: an empty file, a NUL or other control
    character inside, a line that does not start with a command letter.
    """
    if not data:
        raise _malformed("empty control file")
    final_newline = data.endswith(b"\n")
    raw_lines = (data[:-1] if final_newline else data).split(b"\n")
    ended = raw_lines if final_newline else raw_lines[:-1]
    crlf = bool(ended) and all(line.endswith(b"\r") for line in ended)
    lines: list[tuple[str, str]] = []
    for raw in raw_lines:
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if not line or chr(line[0]) not in _LETTERS:
            raise _malformed(f"control-file line without a command letter: {raw[:40]!r}")
        if _BAD_VALUE.search(line):
            # A J/N/T value may be a patient's name: the error (logged) names only
            # the line ([privacy], docs/privacy.md).
            shown = f"{chr(line[0])} line" if chr(line[0]) in NAME_LINES else repr(raw[:40])
            raise _malformed(f"control character in control-file line {shown}")
        lines.append((chr(line[0]), line[1:].decode("latin-1")))
    return _checked(tuple(lines), "\r\n" if crlf else "\n", final_newline)


def _checked(lines: tuple[tuple[str, str], ...], newline: str = "\n",
             final_newline: bool = True) -> ControlFile:
    """A ``ControlFile`` of lines checked already, without the constructor's second check.

    For ``parse_control_file`` (each line checked as it was split) and
    ``rewrite`` (lines of a checked file, renamed with checked names): the
    checks were a third of what parsing and rewriting a job's control file
    cost the relay.
    """
    cf = object.__new__(ControlFile)
    object.__setattr__(cf, "lines", lines)
    object.__setattr__(cf, "newline", newline)
    object.__setattr__(cf, "final_newline", final_newline)
    object.__setattr__(cf, "_index", dict(reversed(lines)))   # the first of each letter
    return cf


def base_name(value: str) -> str:
    """A file-name value reduced to its last path component, without controls.

    ``../../etc/shadow`` -> ``shadow``, ``C:\\Users\\a\\doc.pdf`` -> ``doc.pdf``; an
    empty result, ``.`` or ``..`` gives "" (the line is then dropped).
    """
    name = _NAME_CONTROLS.sub("", _PATH_SEPARATORS.split(value)[-1]).strip()
    return "" if name in (".", "..") else name


def split_job_name(name: str) -> JobName:
    """Split ``cfA123host`` into prefix, job number and host.

    3-6 digit numbers are taken whole (RFC 3, FreeBSD 5, LPRng 6).  When the
    digits run into an IPv4 host (Windows: ``cfA123192.168.1.5``) or there are
    more than six of them, the number is the first three.  No digits gives
    an empty number.
    """
    match = _JOB_NAME.fullmatch(name)
    assert match is not None  # the pattern matches every string
    prefix, digits, host = match.group("prefix", "digits", "host")
    if len(digits) > 6 or (len(digits) > 3 and host.startswith(".")):
        digits, host = digits[:3], digits[3:] + host
    return JobName(prefix=prefix, number=digits, host=host)


def sanitized_title(title: str) -> str:
    """``title`` as CUPS' lpd backend sends it with ``sanitize_title``: every
    character but ASCII letters, digits and white space becomes ``_``, and
    at most 99 characters are kept (RFC 1179 §7.2's J limit)."""
    return "".join(c if c.isascii() and (c.isalnum() or c.isspace()) else "_"
                   for c in title[:99])


def rewrite(cf: ControlFile, *, number: int, host: str, digits: int = 3,
            banner: bool | None = None, fmt: str | None = None,
            sanitize_title: bool = False) -> tuple[ControlFile, str, dict[str, str]]:
    """Rename a job for a destination (SPEC §5), shaped by the URI's options.

    Returns the new control file, its name ``cfA<number><host>`` and the map
    from old data-file names to ``dfA..dfZ, dfa..dfz`` (first reference
    first).  Format and U lines follow the new names; U lines naming no data
    file of the job and all S (symlink) lines are dropped; N and font lines
    (1-4) keep only their ``base_name`` (dropped when nothing is left); every
    other line, H included, is kept.  The result uses LF line ends.

    The CUPS lpd backend's options (SPEC §3.3): ``banner`` True adds an
    ``L`` line for the ``P`` user when the job has none, False removes every
    ``L`` line, None keeps what the sender wrote; ``fmt`` gives every format
    line that letter; ``sanitize_title`` reduces ``J`` with ``sanitized_title``.

    A job that cannot be renamed (more data files than ``dfA..dfz``, or no line
    left to send) raises ``ProtocolError`` (reason "malformed"): the job's own
    lines, so the lpd:// sink holds it rather than retrying.
    """
    if not 3 <= digits <= 6:
        raise ValueError("job numbers have 3 to 6 digits")
    if number < 0:
        raise ValueError("negative job number")
    if not host or _BAD_HOST.search(host) or len(host) > 200:
        raise ValueError(f"host {host!r} cannot be part of a file name")
    host.encode("latin-1")      # as a control-file value must be (UnicodeEncodeError)
    if fmt is not None and (len(fmt) != 1 or fmt not in _LETTERS):
        raise ValueError(f"bad command letter {fmt!r}")
    job = f"{number % 10**digits:0{digits}d}{host}"
    names = cf.data_files
    if len(names) > len(_DF_LETTERS):
        raise _malformed(f"{len(names)} data files; at most {len(_DF_LETTERS)} can be named")
    mapping = {old: f"df{_DF_LETTERS[i]}{job}" for i, old in enumerate(names)}
    lines = _renamed(cf, mapping, fmt)
    if banner is False:
        lines = [line for line in lines if line[0] != "L"]
    elif banner and cf.banner is None and cf.user is not None:
        at = next(i for i, line in enumerate(lines) if line[0] == "P") + 1
        lines.insert(at, ("L", cf.user))
    if sanitize_title:
        lines = [("J", sanitized_title(v)) if k == "J" else (k, v) for k, v in lines]
    if not lines:
        # Only S lines, U lines naming no file of the job, N or font lines with
        # no base name: nothing a destination could be sent.
        raise _malformed("no control-file line is left for the destination "
                         "(only S, U and name lines without a file of this job)")
    # Every line is one of cf's (checked), a base name or a sanitized title of
    # one (characters only removed or replaced), or names made of checked parts.
    return _checked(tuple(lines)), f"cfA{job}", mapping


def redact_names(cf: ControlFile, name: Callable[[str], str]) -> ControlFile:
    """``cf`` with every J, N and T value replaced by ``name(value)``.

    ``[privacy] strip_downstream``: the destination sees the job's names as
    the policy shows them (``relay.privacy``); every other line is unchanged.
    """
    lines = tuple((k, name(v)) if k in NAME_LINES else (k, v) for k, v in cf.lines)
    return ControlFile(lines=lines, newline=cf.newline)


def _renamed(cf: ControlFile, mapping: dict[str, str], fmt: str | None) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    for letter, value in cf.lines:
        if letter in FORMAT_LETTERS:
            lines.append((fmt or letter, mapping[value]))
        elif letter == "U":
            # U = unlink after printing: only meaningful for this job's files.
            if value in mapping:
                lines.append((letter, mapping[value]))
        elif letter in FILE_NAME_LINES:
            # A path here would name a file on the destination: keep the base name.
            if name := base_name(value):
                lines.append((letter, name))
        elif letter != "S":  # S = symlink check data of the original host
            lines.append((letter, value))
    return lines
