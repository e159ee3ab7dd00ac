"""``lpd-relay send URI -``: the job from standard input (relay/clientcli.py).

Count mode spools stdin to a temporary file and sends its exact length;
stream and windows modes send it as it comes, after length 0 or the Windows
fake length.  Checked on the wire (RecordingLpdServer records every byte) and
end to end through a real relay process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.peers import LprngServer, RecordingLpdServer
from tests.test_server import delivered, file_bytes

WINDOWS_FAKE_LENGTH = 125899906843000


def send(uri: str, *args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "relay", "send", uri, *args],
                          input=stdin, capture_output=True, timeout=60, check=False)


def data_headers(wire: bytes) -> list[tuple[int, str]]:
    """(declared length, name) of every data-file subcommand on the wire."""
    return [(int(m.group(1)), m.group(2).decode())
            for m in re.finditer(rb"\x03(\d+) (df[A-Za-z]\S+)\n", wire)]


@pytest.mark.parametrize(("mode", "declared"), [
    ("count", None), ("stream", 0), ("windows", WINDOWS_FAKE_LENGTH)])
def test_stdin_on_the_wire(mode: str, declared: int | None) -> None:
    payload = os.urandom(300_000)
    with RecordingLpdServer() as server:
        result = send(f"lpd://127.0.0.1:{server.port}/q", "-", "--mode", mode,
                      "--user", "dora", stdin=payload)
        assert result.returncode == 0, result.stderr
        (job,) = server.wait_jobs(1)
        wire = server.received
    assert job.files[0].data == payload
    assert job.control["P"] == "dora"
    # The document is named as LPRng's lpr names standard input.
    assert job.files[0].title == "(stdin)"
    ((length, _),) = data_headers(wire)
    assert length == (len(payload) if declared is None else declared)
    assert (b"streamed" if declared is not None else b"300000 bytes") in result.stdout


def test_stdin_after_a_file_in_one_job(tmp_path: Path) -> None:
    first = tmp_path / "cover.txt"
    first.write_bytes(b"cover page\n")
    with RecordingLpdServer() as server:
        uri = f"lpd://127.0.0.1:{server.port}/q"
        assert send(uri, str(first), "-", "--mode", "stream", stdin=b"body\n").returncode == 0
        (job,) = server.wait_jobs(1)
        lengths = [n for n, _ in data_headers(server.received)]
    assert [f.data for f in job.files] == [b"cover page\n", b"body\n"]
    assert lengths == [len(b"cover page\n"), 0]   # only the last file is streamed


def test_stdin_usage_errors(tmp_path: Path) -> None:
    doc = tmp_path / "a.txt"
    doc.write_bytes(b"x")
    uri = "lpd://127.0.0.1:9/q"   # never reached: every case fails before connecting
    empty = send(uri, "-", "--mode", "count", stdin=b"")
    assert empty.returncode == 2 and b"standard input is empty" in empty.stderr
    twice = send(uri, "-", "-", stdin=b"x")
    assert twice.returncode == 2 and b"once" in twice.stderr
    not_last = send(uri, "-", str(doc), "--mode", "stream", stdin=b"x")
    assert not_last.returncode == 2 and b"must be the last file" in not_last.stderr


@pytest.mark.parametrize("mode", ["count", "stream"])
def test_stdin_through_a_real_relay(tmp_path: Path, mode: str) -> None:
    payload = b"%!PS\n" + os.urandom(1 << 20) + b"\n"
    config = write_config_file(tmp_path / "relay.toml", relay_config(tmp_path))
    with RelayProcess(config) as relay:
        result = send(f"lpd://127.0.0.1:{relay.port}/ward3", "-", "--mode", mode,
                      stdin=payload)
        assert result.returncode == 0, result.stderr
        (meta,) = delivered(tmp_path / "out", "ward3")
    assert file_bytes(meta) == [payload]
    assert meta["files"][0]["bytes"] == len(payload)


@pytest.mark.peers
def test_stdin_to_lprng(tmp_path: Path) -> None:
    """LPRng takes both: the exact count, and length 0 read to the end (FIELD-NOTES)."""
    payload = b"%!PS\n" + os.urandom(200_000) + b"\n"
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        uri = f"lpd://127.0.0.1:{lprng.port}/q"
        for mode in ("count", "stream"):
            result = send(uri, "-", "--mode", mode, "--user", "erin", stdin=payload)
            assert result.returncode == 0, result.stderr
        jobs = lprng.wait_jobs("q", 2)
    assert [j.files[0].data for j in jobs] == [payload, payload]
    assert {j.control.get("P") for j in jobs} == {"erin"}
