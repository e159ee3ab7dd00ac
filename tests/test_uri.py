"""Destination URIs (SPEC §3.3): every form, every option, and precise refusals."""

from __future__ import annotations

import dataclasses
import grp

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.uri import Destination, parse_destination


def test_lpd_defaults() -> None:
    dest = parse_destination("lpd://laptop-ward3.vpn/Ward3")
    assert dest == Destination(uri="lpd://laptop-ward3.vpn/Ward3", scheme="lpd",
                               host="laptop-ward3.vpn", port=515, path="Ward3")
    assert (dest.mode, dest.order, dest.timeout, dest.jobnumbers, dest.reserve, dest.batch) == (
        "count", "control-first", 30.0, 3, None, 1)
    assert dest.name == dest.uri


def test_lpd_every_option() -> None:
    uri = ("lpd://10.0.0.5:5515/HP_Ward3?mode=windows&order=data-first&timeout=250ms"
           "&jobnumbers=6&reserve=privileged&batch=20")
    dest = parse_destination(uri)
    assert (dest.host, dest.port, dest.path) == ("10.0.0.5", 5515, "HP_Ward3")
    assert (dest.mode, dest.order, dest.timeout, dest.jobnumbers, dest.reserve, dest.batch) == (
        "windows", "data-first", 0.25, 6, "privileged", 20)
    assert dest.uri == uri


@pytest.mark.parametrize(("option", "field", "value"), [
    ("mode=count", "mode", "count"), ("mode=stream", "mode", "stream"),
    ("mode=windows", "mode", "windows"), ("order=control-first", "order", "control-first"),
    ("order=data-first", "order", "data-first"), ("timeout=5m", "timeout", 300.0),
    ("jobnumbers=3", "jobnumbers", 3), ("jobnumbers=6", "jobnumbers", 6),
    ("reserve=rfc1179", "reserve", "rfc1179"), ("reserve=privileged", "reserve", "privileged"),
    ("reserve=any", "reserve", "any"), ("batch=1", "batch", 1), ("batch=500", "batch", 500),
    # CUPS' lpd backend spellings, with CUPS' meanings (backend/lpd.c)
    ("reserve=none", "reserve", "none"), ("reserve=yes", "reserve", "rfc1179"),
    ("reserve=off", "reserve", "none"), ("reserve=RFC1179", "reserve", "rfc1179"),
    ("order=control,data", "order", "control-first"),
    ("order=data,control", "order", "data-first"),
    ("order=data%2Ccontrol", "order", "data-first"),
    ("mode=standard", "mode", "count"), ("mode=Stream", "mode", "stream"),
    ("timeout=30", "timeout", 30.0), ("timeout=30s", "timeout", 30.0),
    ("contimeout=5", "contimeout", 5.0), ("contimeout=2m", "contimeout", 120.0),
    ("banner=on", "banner", True), ("banner=off", "banner", False),
    ("banner=yes", "banner", True), ("banner=false", "banner", False),
    ("format=o", "format", "o"), ("format=f", "format", "f"), ("format=l", "format", "l"),
    ("sanitize_title=yes", "sanitize_title", True), ("sanitize_title=no", "sanitize_title", False),
])
def test_lpd_option_values(option: str, field: str, value: object) -> None:
    assert getattr(parse_destination(f"lpd://h/q?{option}"), field) == value


def test_lpd_cups_defaults_keep_the_job_as_sent() -> None:
    dest = parse_destination("lpd://h/q")
    assert (dest.banner, dest.format, dest.sanitize_title, dest.contimeout) == (
        None, None, False, None)
    assert dest.connect_timeout == dest.timeout == 30.0
    assert parse_destination("lpd://h/q?timeout=9&contimeout=4").connect_timeout == 4.0


def test_socket_cups_options() -> None:
    dest = parse_destination("socket://h:9100?waiteof=false&contimeout=3&timeout=20")
    assert (dest.waiteof, dest.contimeout, dest.timeout) == (False, 3.0, 20.0)
    assert parse_destination("socket://h").waiteof is True


def test_usb_make_model_form_is_cups_usb_backend_form() -> None:
    dest = parse_destination("usb://HP/LaserJet%201020?serial=00CNBW12345")
    assert (dest.scheme, dest.path, dest.make, dest.model, dest.serial) == (
        "usb", "", "HP", "LaserJet 1020", "00CNBW12345")
    bare = parse_destination("usb://EPSON/TM-T88V")
    assert (bare.make, bare.model, bare.serial) == ("EPSON", "TM-T88V", "")
    assert parse_destination("usb:///dev/usb/lp1").path == "/dev/usb/lp1"


@pytest.mark.parametrize(("uri", "host", "port"), [
    ("lpd://[::1]/q", "::1", 515),
    ("lpd://[2001:db8::7]:5515/q", "2001:db8::7", 5515),
    ("lpd://[2001:DB8:0:0::7]/q", "2001:db8::7", 515),
    ("lpd://printer_1.example.org:65535/q", "printer_1.example.org", 65535),
    ("LPD://h:1/q", "h", 1),
])
def test_lpd_hosts_and_ports(uri: str, host: str, port: int) -> None:
    dest = parse_destination(uri)
    assert (dest.scheme, dest.host, dest.port) == ("lpd", host, port)


def test_lpd_queue_is_percent_decoded() -> None:
    assert parse_destination("lpd://h/Ward%233").path == "Ward#3"
    assert parse_destination("lpd://h/a/b").path == "a/b"


@pytest.mark.parametrize(("uri", "host", "port"), [
    ("socket://10.1.2.3", "10.1.2.3", 9100),
    ("socket://10.1.2.3:9101", "10.1.2.3", 9101),
    ("socket://[fe80::1]:9100/", "fe80::1", 9100),
])
def test_socket(uri: str, host: str, port: int) -> None:
    dest = parse_destination(uri)
    assert (dest.scheme, dest.host, dest.port, dest.path) == ("socket", host, port, "")


def test_socket_takes_a_timeout() -> None:
    assert parse_destination("socket://p?timeout=2m").timeout == 120.0


def test_usb_and_dir() -> None:
    assert parse_destination("usb:///dev/usb/lp0") == Destination(
        uri="usb:///dev/usb/lp0", scheme="usb", path="/dev/usb/lp0")
    dest = parse_destination("dir:///var/spool/hot%20folder")
    assert (dest.scheme, dest.path, dest.host, dest.port) == (
        "dir", "/var/spool/hot folder", "", 0)


@pytest.mark.parametrize(("uri", "argv"), [
    ("cmd:lp -d ward3 -o raw", ("lp", "-d", "ward3", "-o", "raw")),
    ("cmd:/usr/bin/lp", ("/usr/bin/lp",)),
    ("cmd:lp -t 'two words' -o \"raw\"", ("lp", "-t", "two words", "-o", "raw")),
    ("cmd:sh -c 'cat > /dev/null; exit $X'", ("sh", "-c", "cat > /dev/null; exit $X")),
])
def test_cmd_is_split_like_a_shell_without_expansion(uri: str, argv: tuple[str, ...]) -> None:
    dest = parse_destination(uri)
    assert (dest.scheme, dest.argv) == ("cmd", argv)


def test_dir_mode_and_group() -> None:
    dest = parse_destination("dir:///srv/out")
    assert (dest.file_mode, dest.group) == (0o640, None)
    daemon = grp.getgrnam("daemon").gr_gid
    dest = parse_destination("dir:///srv/out?mode=0660&group=daemon")
    assert (dest.path, dest.file_mode, dest.group) == ("/srv/out", 0o660, daemon)
    assert parse_destination("dir:///srv/out?mode=600&group=4242").group == 4242
    # The same option name is the LPD length form on lpd://.
    assert parse_destination("lpd://h/q?mode=stream").mode == "stream"


@pytest.mark.parametrize(("uri", "fragment"), [
    ("dir:///o?mode=rw-r-----", "option mode: expected an octal file mode such as 0640"),
    ("dir:///o?mode=0890", "expected an octal file mode"),
    ("dir:///o?mode=64", "expected an octal file mode"),
    ("dir:///o?mode=01640", "expected an octal file mode"),
    ("dir:///o?mode=4640", "from 0400 to 0777"),
    ("dir:///o?mode=0040", "that the owner can read"),
    ("dir:///o?group=no-such-group-xyz", "no group named 'no-such-group-xyz'"),
    ("dir:///o?group=4294967295", "out of range"),
    ("dir:///o?group=", "no group named ''"),
    ("dir:///o?mode=0640&mode=0600", "option 'mode' is given twice"),
    ("usb:///dev/lp0?group=lp", "option 'group' is only valid for dir://"),
    ("dir:///o?timeout=5s", "option 'timeout' is only valid for lpd:// and socket://"),
    ("dir:///o?colour=red", "unknown option 'colour' (valid for dir://: group, mode)"),
])
def test_dir_option_refusals(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_destination(uri)
    assert fragment in str(info.value)


def test_destination_is_frozen() -> None:
    dest = parse_destination("socket://p")
    with pytest.raises(dataclasses.FrozenInstanceError):
        dest.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(("uri", "fragment"), [
    ("http://h/q", "unknown destination 'http://h/q'"),
    ("laptop/Ward3", "unknown destination"),
    ("", "unknown destination"),
    ("lpd:h/q", "expected lpd://host[:port]/queue"),
    ("lpd://h", "missing queue name"),
    ("lpd://h/", "missing queue name"),
    ("lpd:///q", "missing host"),
    ("lpd://h:0/q", "port must be 1..65535, got '0'"),
    ("lpd://h:65536/q", "port must be 1..65535, got '65536'"),
    ("lpd://h:/q", "port must be 1..65535, got ''"),
    ("lpd://h:abc/q", "port must be 1..65535, got 'abc'"),
    ("lpd://::1/q", "IPv6 addresses must be in brackets"),
    ("lpd://[::zz]/q", "'[::zz]' is not a bracketed IPv6 address"),
    ("lpd://[::1/q", "is not a bracketed IPv6 address"),
    ("lpd://[::1]x/q", "unexpected 'x' after the IPv6 address"),
    ("lpd://user@h/q", "user information"),
    ("lpd://bad host/q", "'bad host' is not a valid host name"),
    ("lpd://h/q#x", "'#' is not allowed"),
    ("lpd://h/a%20b", "queue name 'a b' contains spaces or control characters"),
    ("lpd://h/a%0Ab", "contains spaces or control characters"),
    ("lpd://h/q?colour=red", "unknown option 'colour' (valid for lpd://: banner, batch,"),
    ("lpd://h/q?mode=raw",
     "option mode: expected count or stream or windows (also: standard), got 'raw'"),
    ("lpd://h/q?order=last", "option order: expected control-first or data-first"),
    ("lpd://h/q?timeout=30x", "option timeout: expected a duration"),
    ("lpd://h/q?contimeout=0", "option contimeout: must be more than 0s"),
    ("lpd://h/q?order=data-control", "option order: expected control-first or data-first "
                                     "(also: control,data, data,control)"),
    ("lpd://h/q?banner=maybe", "option banner: expected on/off"),
    ("lpd://h/q?format=x", "option format: expected one format letter of cdfglnoprtv"),
    ("lpd://h/q?format=ll", "option format: expected one format letter"),
    ("lpd://h/q?sanitize_title=2", "option sanitize_title: expected on/off"),
    ("socket://h?waiteof=perhaps", "option waiteof: expected on/off"),
    ("lpd://h/q?waiteof=false", "option 'waiteof' is only valid for socket://"),
    ("socket://h?banner=on", "option 'banner' is only valid for lpd://"),
    ("usb:///dev/usb/lp0?serial=X", "serial= goes with usb://Make/Model"),
    ("usb://HP/?serial=X", "expected usb:///dev/usb/lp0"),
    ("usb://HP/a/b", "expected usb:///dev/usb/lp0"),
    ("lpd://h/q?timeout=0s", "option timeout: must be more than 0s"),
    ("lpd://h/q?jobnumbers=5", "option jobnumbers: expected 3 or 6, got '5'"),
    ("lpd://h/q?reserve=maybe", "option reserve: expected none or rfc1179 or any or privileged"),
    ("lpd://h/q?batch=0", "option batch: expected a whole number of jobs, 1 or more"),
    ("lpd://h/q?batch=-1", "option batch"),
    ("lpd://h/q?batch=\uff12", "option batch"),  # a full-width digit
    ("lpd://h/q?mode", "option 'mode' needs a value"),
    ("lpd://h/q?mode=count&mode=stream", "option 'mode' is given twice"),
    ("socket://h?mode=stream", "option 'mode' is only valid for dir:// and lpd://"),
    ("socket://h/q", "socket:// takes no path"),
    ("socket://:9100", "missing host"),
    ("usb://dev/usb/lp0", "expected usb:///dev/usb/lp0"),
    ("usb:///", "expected usb:///dev/usb/lp0"),
    ("usb:///dev/usb/lp0?timeout=5s", "option 'timeout' is only valid for lpd:// and socket://"),
    ("dir:out", "relative folders are not accepted"),
    ("dir://out", "relative folders are not accepted"),
    ("dir:///srv/out?batch=2", "option 'batch' is only valid for lpd://"),
    ("dir:///srv/%00", "expected dir:///"),
    ("cmd:", "cmd: needs a program"),
    ("cmd:   ", "surrounding spaces"),
    ("cmd:'' -d x", "cmd: needs a program"),
    ("cmd:lp 'unbalanced", "cannot split the command line: No closing quotation"),
    ("cmd://lp", "cmd: takes a command line"),
    (" lpd://h/q", "surrounding spaces"),
    ("lpd://h/q\n", "control characters"),
])
def test_refusals_are_precise(uri: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_destination(uri)
    assert fragment in str(info.value)


def test_refuses_non_strings() -> None:
    with pytest.raises(ValueError, match="expected a destination URI string"):
        parse_destination(515)  # type: ignore[arg-type]


@given(st.text(max_size=80))
def test_any_text_gives_a_destination_or_value_error(text: str) -> None:
    try:
        dest = parse_destination(text)
    except ValueError:
        return
    assert dest.scheme in ("lpd", "socket", "usb", "cmd", "dir")
    assert dest.uri == text


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126,
                                      blacklist_characters="/?#%"), min_size=1, max_size=40))
def test_lpd_queue_names_survive_quoting(queue: str) -> None:
    from urllib.parse import quote
    assert parse_destination(f"lpd://h/{quote(queue, safe='')}").path == queue
