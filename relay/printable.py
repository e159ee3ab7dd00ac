"""Wire-derived text made inert for terminals and log readers.

Job titles, user, host and file names come from whoever sent the job, and a
byte >= 0x80 decodes (latin-1) to a C1 control: U+009B is a terminal's CSI,
as dangerous as ESC.  Wherever such text is shown — lpq/lprm replies, log
lines — every character that is not printable (C0, DEL, C1, separators other
than the space, format and private-use code points, lone surrogates) is
written as an escape instead: ``\\xNN`` below U+0100, ``\\uNNNN`` in the BMP,
``\\UNNNNNNNN`` above.  Printable text, accents included, is unchanged.
"""

from __future__ import annotations

__all__ = ["escape_char", "printable"]


def escape_char(c: str) -> str:
    """The escape spelling of one character."""
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (see the module docstring)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else escape_char(c) for c in text)
