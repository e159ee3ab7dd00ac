"""import-printcap on printcaps as LPRng's and FreeBSD's documentation write them
(relay/printcap.py); every result must pass the real ``check-config``."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from relay import printcap
from tests.daemon import DaemonThread, relay_config
from tests.peers import LprngServer

# FreeBSD handbook style: backslash continuations, a description as the last
# name, BSD remote entries with an empty lp= and rm/rp, numeric mx#.
FREEBSD = r"""#
#  /etc/printcap for host rose - a local and a remote printer
#
bamboo|ps|PS|S|panasonic|Panasonic KX-P4455 PostScript v51.4:\
        :lp=/dev/lpt0:sd=/var/spool/lpd/bamboo:sh:mx#0:\
        :if=/usr/local/libexec/psif:lf=/var/log/lpd-errs:

rattan|line|diablo|lp|Diablo 630 Line Printer:\
        :lp=:rm=orchid:rp=rattan:sd=/var/spool/lpd/rattan:

# rm only: the remote queue is "lp", as lpd assumes
teak|remote teak:\
        :rm=teak.example.org:sd=/var/spool/lpd/teak:
"""

# LPRng reference manual style: lp=queue@host[%port], lp=host%port for a
# network printer, ':'-led continuation lines without backslashes, a .template
# pulled in with tc=, :client: / :server: entries of one name, %P, a pipe.
LPRNG = r"""# LPRng printcap
.common:sd=/var/spool/lpd/%P
  :mx=0:sh
lp|Lp:lp=lp@h4.private
laser
  |hp4|HP_Laser
  :lp=laser@10.0.0.1%5515:tc=.common
raw9100:lp=10.1.2.3%9100:tc=.common:filter=/usr/lib/lpd/ifhp
usbprn:lp=/dev/usb/lp0:tc=.common
pipe:lp=|/usr/bin/lp -d frontdesk:tc=.common
ward3:client:lp=ward3@printsrv
ward3:server:lp=Ward3@laptop-ward3.vpn%515:sd=/var/spool/lpd/%P:ah
colon:lp=q\:x@host
"""


def run(text: str) -> tuple[printcap.Imported, list[str]]:
    warnings: list[str] = []
    imported = printcap.convert(printcap.parse_printcap(text),
                                lambda p, m: warnings.append(f"{p}: {m}"))
    return imported, warnings


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def check_config(tmp_path: Path, toml_text: str) -> None:
    path = tmp_path / "imported.toml"
    path.write_text(toml_text)
    result = cli("check-config", "-c", str(path))
    assert result.returncode == 0, result.stderr + toml_text


def test_field_syntax() -> None:
    assert printcap.parse_field("sd=/var/spool/lpd/x") == ("sd", "/var/spool/lpd/x")
    assert printcap.parse_field("mx#0") == ("mx", 0)
    assert printcap.parse_field("mx#1000") == ("mx", 1000)
    assert printcap.parse_field("sh") == ("sh", True)
    assert printcap.parse_field("sh@") == ("sh", False)
    assert printcap.parse_field("  ") is None


def test_freebsd_printcap() -> None:
    imported, warnings = run(FREEBSD)
    assert imported.queues == {
        "bamboo": {"aliases": ["ps", "S", "panasonic"], "destinations": ["usb:///dev/lpt0"]},
        "rattan": {"aliases": ["line", "diablo", "lp"],
                   "destinations": ["lpd://orchid/rattan"]},
        "teak": {"destinations": ["lpd://teak.example.org/lp"]},
    }
    assert "bamboo: field if not carried over (the relay forwards the job's bytes; " \
           "it runs no filters)" in warnings
    assert any(w.startswith("rattan: field sd not carried over") for w in warnings)
    # sh and mx#0 need nothing: the relay prints no banners and has no limit here.
    assert not any(" sh " in w or " mx " in w for w in warnings)


def test_lprng_printcap() -> None:
    imported, warnings = run(LPRNG)
    q = imported.queues
    assert q["lp"] == {"destinations": ["lpd://h4.private/lp"]}   # "Lp" is "lp" again
    assert q["laser"] == {"aliases": ["hp4", "HP_Laser"],
                          "destinations": ["lpd://10.0.0.1:5515/laser"]}
    assert q["raw9100"] == {"destinations": ["socket://10.1.2.3:9100"]}
    assert q["usbprn"] == {"destinations": ["usb:///dev/usb/lp0"]}
    assert q["pipe"] == {"destinations": ["cmd:/usr/bin/lp -d frontdesk"]}
    # lpd's view: the :server: entry, not the :client: one of the same name.
    assert q["ward3"] == {"destinations": ["lpd://laptop-ward3.vpn/Ward3"]}
    assert q["colon"] == {"destinations": ["lpd://host/q:x"]}   # "\\:" is a colon
    assert "raw9100: field filter not carried over (the relay forwards the job's bytes; " \
           "it runs no filters)" in warnings
    assert any(w.startswith("ward3: field ah not carried over") for w in warnings)
    assert any(w.startswith("ward3: a client-only entry") for w in warnings)
    assert not any(w.startswith(".common") for w in warnings)
    # %P was expanded inside the template for each printer.
    assert any("laser: field sd not carried over" in w for w in warnings)


def test_tc_loops_and_missing_targets_warn() -> None:
    imported, warnings = run("a:tc=.b:lp=q@h\n.b:tc=.b:sh\nc:tc=.missing:rm=h\n")
    assert set(imported.queues) == {"a", "c"}
    assert any("tc=.missing names no entry" in w for w in warnings)


def test_no_destination_and_bad_names_are_skipped() -> None:
    imported, warnings = run("nolp:sd=/x\nfile:lp=/var/log/out\nbad host:lp=q@h\n")
    assert imported.queues == {}
    assert "nolp: no destination (neither lp nor rm); skipped" in warnings
    assert any(w.startswith("file: field lp not carried over") for w in warnings)


def test_max_job_size_when_every_printer_has_one() -> None:
    imported, _ = run("a:lp=q@h:mx#100\nb:lp=r@h:mx=2048\n")
    assert imported.data()["server"] == {"spool_dir": printcap.SPOOL_DIR,
                                         "max_job_size": 2048 * 1024}
    imported, warnings = run("a:lp=q@h:mx#100\nb:lp=r@h\n")
    assert "max_job_size" not in imported.data()["server"]  # type: ignore[operator]
    assert any(w.startswith("a: field mx not carried over") for w in warnings)


@pytest.mark.parametrize("text", [FREEBSD, LPRNG], ids=["freebsd", "lprng"])
def test_cli_output_passes_check_config(tmp_path: Path, text: str) -> None:
    source = tmp_path / "printcap"
    source.write_text(text)
    result = cli("import-printcap", str(source))
    assert result.returncode == 0, result.stderr
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines())
    assert tomllib.loads(result.stdout)["queues"]
    check_config(tmp_path, result.stdout)


def test_cli_reads_stdin(tmp_path: Path) -> None:
    for args in ((), ("-",)):
        result = cli("import-printcap", *args, stdin=FREEBSD)
        assert result.returncode == 0, result.stderr
        assert "[queues.rattan]" in result.stdout


def test_cli_failures(tmp_path: Path) -> None:
    result = cli("import-printcap", str(tmp_path / "missing"))
    assert result.returncode == 1 and "missing" in result.stderr
    result = cli("import-printcap", stdin="# nothing\n")
    assert result.returncode == 1 and "no printer" in result.stderr


def test_the_printcap_the_suite_writes_for_lprng(tmp_path: Path) -> None:
    """The printcap tests/peers/lprng.py gives LPRng (written, lpd not started)."""
    server = LprngServer(tmp_path / "lprng", queues={"q": "", "big": "mx=10"})
    server._write_config()
    text = (tmp_path / "lprng" / "etc" / "lprng" / "printcap").read_text()
    imported, warnings = run(text)
    assert imported.queues == {"q": {"destinations": [f"dir://{printcap.HOT_FOLDER}"]},
                               "big": {"destinations": [f"dir://{printcap.HOT_FOLDER}"]}}
    assert any(w.startswith("q: lp=/dev/null") for w in warnings)
    assert any(w.startswith("q: field ah not carried over") for w in warnings)
    # la@ / ar@ switch accounting off: nothing to warn about.
    assert not any(" la " in w or " ar " in w for w in warnings)
    source = tmp_path / "printcap"
    source.write_text(text)
    result = cli("import-printcap", str(source))
    assert result.returncode == 0
    check_config(tmp_path, result.stdout)


@pytest.mark.peers
def test_imported_queue_forwards_to_lprng(tmp_path: Path) -> None:
    """The imported destination works: a job for an alias reaches the LPRng named in lp=."""
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        text = f"ward3|Ward3|HP_Ward3:lp=q@127.0.0.1%{lprng.port}:sd=/var/spool/lpd/%P:sh\n"
        imported, _ = run(text)
        data = relay_config(tmp_path, queues=imported.queues)
        doc = tmp_path / "page.txt"
        doc.write_bytes(b"imported from a printcap\n")
        with DaemonThread(data) as relay:
            result = cli("send", f"lpd://127.0.0.1:{relay.port}/HP_Ward3", str(doc))
            assert result.returncode == 0, result.stderr
            (job,) = lprng.wait_jobs("q", 1, timeout=30)
    assert job.files[0].data == doc.read_bytes()
