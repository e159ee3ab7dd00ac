"""Control files: parse, properties, serialize round trip, job names, rewrite."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.controlfile import (
    ControlFile,
    JobName,
    PrintFile,
    as_text,
    base_name,
    parse_control_file,
    rewrite,
    sanitized_title,
    split_job_name,
)
from relay.errors import ProtocolError

# RFC 1179 §7 style job from a BSD lpr: two copies of one file, then another.
BSD = (b"Hws12.example.org\nPalice\nJquarterly.ps\nCA\nLalice\nMalice\n"
       b"odfA042ws12.example.org\nodfA042ws12.example.org\nldfB042ws12.example.org\n"
       b"UdfA042ws12.example.org\nUdfB042ws12.example.org\nNquarterly.ps\nNnotes.txt\n"
       b"Sdev 1234\nI8\nW132\nT\xc3\xa9t\xc3\xa9\n")
# Windows port monitor: H P J l U N lines (FIELD-NOTES).
WINDOWS = (b"HPRINTSRV01\r\nPsvc_print\r\nJMicrosoft Word - Report\r\nldfA123PRINTSRV01\r\n"
           b"UdfA123PRINTSRV01\r\nNReport\r\n")
LPRNG = (b"Hlaptop\nPbob\nA bob@laptop+123456\nQward3\nRacct\nZduplex\nJjob\n"
         b"fdfA123456laptop\n")


def test_bsd_job_properties() -> None:
    cf = parse_control_file(BSD)
    assert (cf.host, cf.user, cf.job_name, cf.job_class, cf.banner, cf.mail) == (
        "ws12.example.org", "alice", "quarterly.ps", "A", "alice", "alice")
    assert cf.source_name == "quarterly.ps"
    assert cf.values("N") == ("quarterly.ps", "notes.txt")
    assert (cf.indent, cf.width) == (8, 132)
    assert cf.title is not None and as_text(cf.title) == "été"
    assert cf.print_files == (PrintFile(format="o", name="dfA042ws12.example.org"),
                              PrintFile(format="o", name="dfA042ws12.example.org"),
                              PrintFile(format="l", name="dfB042ws12.example.org"))
    assert cf.data_files == ("dfA042ws12.example.org", "dfB042ws12.example.org")
    assert cf.serialize() == BSD


def test_lprng_extras() -> None:
    cf = parse_control_file(LPRNG)
    assert (cf.identifier, cf.queue_name, cf.accounting, cf.options) == (
        " bob@laptop+123456", "ward3", "acct", "duplex")
    assert cf.title is None and cf.width is None
    assert cf.print_files == (PrintFile(format="f", name="dfA123456laptop"),)


def test_crlf_and_missing_final_newline_round_trip() -> None:
    cf = parse_control_file(WINDOWS)
    assert (cf.newline, cf.host, cf.job_name) == ("\r\n", "PRINTSRV01", "Microsoft Word - Report")
    assert cf.serialize() == WINDOWS
    bare = b"Hh\nPu\nldfA1h"
    cf2 = parse_control_file(bare)
    assert not cf2.final_newline and cf2.data_files == ("dfA1h",)
    assert cf2.serialize() == bare


@pytest.mark.parametrize("raw", [b"", b"\n", b"Hh\n\nPu\n", b"Hh\nPu\0\n", b" leading\n",
                                 b"#comment\n", b"Hh\nP\x1bu\n", b"Hh\rx\n", b"\0"])
def test_malformed(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_control_file(raw)
    assert (info.value.reply, info.value.reason) == (3, "malformed")


def test_record_validates_when_built_directly() -> None:
    with pytest.raises(ValueError):
        ControlFile(lines=())
    with pytest.raises(ValueError):
        ControlFile(lines=(("H", "a\nb"),))
    with pytest.raises(ValueError):
        ControlFile(lines=(("HP", "x"),))


@pytest.mark.parametrize(("name", "expected"), [
    ("cfA123host", JobName(prefix="cfA", number="123", host="host")),
    ("dfB123456laptop.example", JobName(prefix="dfB", number="123456", host="laptop.example")),
    ("cfA12345bsdhost", JobName(prefix="cfA", number="12345", host="bsdhost")),
    ("cfA123192.168.1.5", JobName(prefix="cfA", number="123", host="192.168.1.5")),
    ("dfA007010.0.0.1", JobName(prefix="dfA", number="007", host="010.0.0.1")),
    ("cA123host", JobName(prefix="cA", number="123", host="host")),
    ("cfA1234567host", JobName(prefix="cfA", number="123", host="4567host")),
    ("cfAhost", JobName(prefix="cfA", number="", host="host")),
])
def test_split_job_name(name: str, expected: JobName) -> None:
    assert split_job_name(name) == expected


def test_rewrite_renames_consistently_and_keeps_h() -> None:
    cf = parse_control_file(BSD)
    new, cf_name, mapping = rewrite(cf, number=7, host="relay1")
    assert cf_name == "cfA007relay1"
    assert mapping == {"dfA042ws12.example.org": "dfA007relay1",
                       "dfB042ws12.example.org": "dfB007relay1"}
    assert new.host == "ws12.example.org"
    assert new.values("U") == ("dfA007relay1", "dfB007relay1")
    assert new.values("S") == ()
    assert [p.name for p in new.print_files] == ["dfA007relay1"] * 2 + ["dfB007relay1"]
    assert new.values("N") == cf.values("N")
    # Everything but the renamed and dropped lines is kept in order.
    kept = [line for line in cf.lines if line[0] not in "olUS"]
    assert [line for line in new.lines if line[0] not in "olUS"] == kept


def test_rewrite_numbers_letters_and_line_ends() -> None:
    names = [f"dfX{i:03d}src" for i in range(53)]
    lines = (*tuple(("l", n) for n in names[:52]), ("U", "dfZ999other"), ("H", "src"))
    new, cf_name, mapping = rewrite(ControlFile(lines=lines, newline="\r\n"), number=1234567,
                                    host="r", digits=6)
    assert cf_name == "cfA234567r"
    assert list(mapping.values())[:3] == ["dfA234567r", "dfB234567r", "dfC234567r"]
    assert list(mapping.values())[25:27] == ["dfZ234567r", "dfa234567r"]
    assert list(mapping.values())[-1] == "dfz234567r"
    assert new.values("U") == () and new.newline == "\n"
    too_many = ControlFile(lines=tuple(("l", n) for n in names))
    with pytest.raises(ProtocolError):
        rewrite(too_many, number=1, host="r")
    for bad in ["", "a/b", "a b", "..\\x"]:
        with pytest.raises(ValueError):
            rewrite(new, number=1, host=bad)


_LETTER = st.sampled_from("HPJCLNTMIWAQRZSUflopdtnrgcvx1234")
_VALUE = st.binary(max_size=40).map(
    lambda b: bytes(c for c in b if (c >= 0x20 and c != 0x7f) or c == 9).decode("latin-1"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_LETTER, _VALUE), min_size=1, max_size=20),
       st.sampled_from(["\n", "\r\n"]), st.booleans())
def test_parse_serialize_round_trip(lines: list[tuple[str, str]], newline: str,
                                    final: bool) -> None:
    # A CR at the very end of a value would read as part of a CR LF.
    lines = [(k, v.rstrip("\r")) for k, v in lines]
    cf = ControlFile(lines=tuple(lines), newline=newline if len(lines) > 1 or final else "\n",
                     final_newline=final)
    raw = cf.serialize()
    assert parse_control_file(raw) == cf
    assert parse_control_file(raw).serialize() == raw


@pytest.mark.parametrize(("value", "forwarded"), [
    ("../../etc/shadow", "shadow"),
    ("/etc/passwd", "passwd"),
    ("C:\\Users\\alice\\report.pdf", "report.pdf"),
    ("dir/sub\\name\x9b.ps", "name.ps"),
    ("report.pdf", "report.pdf"),
    ("..", None),
    ("a/..", None),
    ("/", None),
    (" ", None),
])
@pytest.mark.parametrize("letter", ["N", "1", "2", "3", "4"])
def test_rewrite_reduces_file_name_lines_to_a_base_name(letter: str, value: str,
                                                        forwarded: str | None) -> None:
    cf = ControlFile(lines=(("H", "src"), ("P", "alice"), ("l", "dfA001src"), (letter, value),
                            ("J", "a/b job")))
    new, _, _ = rewrite(cf, number=1, host="relay")
    assert new.values(letter) == (() if forwarded is None else (forwarded,))
    assert new.values("J") == ("a/b job",) and new.host == "src"   # not file names: kept
    wire = new.serialize()
    assert b"/" not in wire.replace(b"a/b job", b"") and b"\\" not in wire
    assert not any(0x80 <= c <= 0x9f or (c < 0x20 and c != 0x0a) for c in wire)


# -- the CUPS lpd backend's options (banner, format, sanitize_title) ---------------

_JOB = b"Hwin\nPnurse\nJQ3 (final)\nldfA1win\nUdfA1win\nldfB1win\n"


def test_rewrite_banner_on_adds_l_after_p_unless_present() -> None:
    new, _, _ = rewrite(parse_control_file(_JOB), number=1, host="r", banner=True)
    assert [k for k, _ in new.lines][:3] == ["H", "P", "L"] and new.banner == "nurse"
    given_l = parse_control_file(b"Hwin\nPnurse\nLclerk\nldfA1win\n")
    assert rewrite(given_l, number=1, host="r", banner=True)[0].values("L") == ("clerk",)
    no_user = parse_control_file(b"Hwin\nldfA1win\n")
    assert rewrite(no_user, number=1, host="r", banner=True)[0].values("L") == ()


def test_rewrite_banner_off_drops_every_l_and_none_keeps_them() -> None:
    cf = parse_control_file(b"Hwin\nPnurse\nLnurse\nLagain\nldfA1win\n")
    assert rewrite(cf, number=1, host="r", banner=False)[0].values("L") == ()
    assert rewrite(cf, number=1, host="r")[0].values("L") == ("nurse", "again")


def test_rewrite_format_sets_every_format_line_and_keeps_u_lines() -> None:
    new, _, mapping = rewrite(parse_control_file(_JOB), number=1, host="r", fmt="o")
    assert [(p.format, p.name) for p in new.print_files] == [
        ("o", mapping["dfA1win"]), ("o", mapping["dfB1win"])]
    assert new.values("U") == (mapping["dfA1win"],)
    assert new.values("l") == ()


def test_rewrite_sanitize_title_only_touches_j() -> None:
    cf = parse_control_file(b"Hwin\nPnurse\nJQ3 (final)/\xfc\nNa (b).txt\nldfA1win\n")
    new, _, _ = rewrite(cf, number=1, host="r", sanitize_title=True)
    assert new.job_name == "Q3 _final___" and new.source_name == "a (b).txt"
    assert rewrite(cf, number=1, host="r")[0].job_name == "Q3 (final)/\xfc"
    assert sanitized_title("x" * 120) == "x" * 99


_LINE = st.tuples(st.sampled_from("HPJLNTUSlfo1"),
                  st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                        blacklist_characters="\x7f"), max_size=12))


@settings(max_examples=200, deadline=None)
@given(lines=st.lists(_LINE, min_size=1, max_size=8), crlf=st.booleans(), final=st.booleans())
def test_parsed_and_rewritten_files_equal_checked_construction(
        lines: list[tuple[str, str]], crlf: bool, final: bool) -> None:
    """parse_control_file and rewrite skip the constructor's checks: what they
    build equals, and answers as, the same lines built with the checks."""
    newline = "\r\n" if crlf else "\n"
    text = newline.join(k + v for k, v in lines) + (newline if final else "")
    parsed = parse_control_file(text.encode("latin-1"))
    built = ControlFile(lines=parsed.lines, newline=parsed.newline,
                        final_newline=parsed.final_newline)
    assert parsed == built and parsed.serialize() == built.serialize()
    for letter in "HPJLNTUSlfo1":
        assert parsed.first(letter) == built.first(letter)
    try:
        new, _, _ = rewrite(parsed, number=7, host="relay", fmt="f", banner=True)
    except ProtocolError:   # nothing left (only S lines): refused, "malformed"
        assert all(k in "SU" or (k in "N1" and not base_name(v)) for k, v in parsed.lines)
        return
    checked = ControlFile(lines=new.lines)
    assert new == checked and new.user == checked.user and new.banner == checked.banner


def test_rewrite_still_refuses_a_bad_format_letter_and_host() -> None:
    cf = parse_control_file(b"Hh\nPu\nldfA001h\n")
    with pytest.raises(ValueError):
        rewrite(cf, number=1, host="relay", fmt="ab")
    with pytest.raises(UnicodeEncodeError):
        rewrite(cf, number=1, host="r\u0142")
