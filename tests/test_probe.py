"""`lpd-relay probe` (SPEC §6) against real receivers on loopback: LPRng's lpd,
scripted receivers that refuse a length form or a non-reserved source port, a
closed port, and the relay itself."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import trio

from relay import cli
from relay.probe import ProbeReport, looks_refused, run_probe, uri_for
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import (
    LpdScript,
    LprngServer,
    RecordedConnection,
    RecordingLpdServer,
    free_port,
    release_time_wait,
    require_root,
)

TEST_PAGE = b"lpd-relay probe test page"


def probe(uri: str, *, send: bool = True) -> ProbeReport:
    async def main() -> ProbeReport:
        with trio.fail_after(30):
            return await run_probe(parse_destination(uri), send=send, step_timeout=5)
    return trio.run(main)


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "probe", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def names(report: ProbeReport) -> list[str]:
    return [s.name for s in report.steps]


# -- the pieces

def test_uri_shows_only_non_default_options() -> None:
    dest = parse_destination("lpd://[::1]:515/Ward%233?mode=windows&reserve=any&order=data-first")
    assert uri_for(dest, mode="count", reserve=None) == \
        "lpd://[::1]:515/Ward%233?order=data-first"
    assert uri_for(dest, mode="stream", reserve="rfc1179") == \
        "lpd://[::1]:515/Ward%233?mode=stream&order=data-first&reserve=rfc1179"


def test_uri_keeps_the_cups_options_it_was_given() -> None:
    dest = parse_destination("lpd://h/q?banner=off&format=o&sanitize_title=yes&contimeout=5"
                             "&timeout=60")
    found = uri_for(dest, mode="count", reserve=None)
    assert found == ("lpd://h:515/q?timeout=60s&contimeout=5s&banner=off&format=o"
                     "&sanitize_title=yes")
    again = parse_destination(found)
    assert (again.banner, again.format, again.sanitize_title, again.contimeout) == (
        False, "o", True, 5.0)


@pytest.mark.parametrize(("text", "refused"), [
    ("q is ready\nno entries\n", False),
    ("Printer: q@host 0 jobs (autohold)\n", False),
    ("", False),
    ("Printer: x@host - ERROR: spool queue for 'x' does not exist on server host\n", True),
    ("lpd: unknown printer x\n", True),
    ("\x01", True),
])
def test_lpq_refusals(text: str, refused: bool) -> None:
    assert looks_refused(text) is refused


@pytest.mark.parametrize("uri", ["dir:///srv/out", "cmd:lp -d x", "lpd://127.0.0.1", "not a uri"])
def test_usage_errors_exit_2(uri: str) -> None:
    assert cli.main(["probe", uri]) == 2


# -- real receivers

@pytest.mark.peers
def test_lprng_takes_count_mode(tmp_path: Path) -> None:
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as lprng:
        uri = f"lpd://127.0.0.1:{lprng.port}/Ward3"
        result = probe_cli(uri)
        (job,) = lprng.wait_jobs("Ward3", 1)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line[:1] for line in lines[1:5]] == ["✓"] * 4
    assert f"OK: {uri} works" in lines and f"uri: {uri}" in lines
    assert "stream" not in result.stdout
    assert TEST_PAGE in job.files[0].data


@pytest.mark.peers
def test_lprng_unknown_queue_fails(tmp_path: Path) -> None:
    with LprngServer(tmp_path / "lprng", queues=("q",)) as lprng:
        report = probe(f"lpd://127.0.0.1:{lprng.port}/nope")
    assert not report.ok and report.uri is None
    assert report.verdict.startswith("FAIL: queue 'nope' refused: ")
    assert "does not exist" in report.verdict
    # Refused at "receive job": other length forms cannot help, so none is tried.
    assert "print mode=stream" not in names(report)


def test_refused_receive_job_stops_the_mode_search() -> None:
    # The refusal's words name no step: probe reads the error's step attribute.
    with RecordingLpdServer(LpdScript(replies={"job": b"\x01go away\n"})) as server:
        report = probe(f"lpd://127.0.0.1:{server.port}/q")
    assert not report.ok
    assert "print mode=count" in names(report)
    assert "print mode=stream" not in names(report)
    assert "go away" in report.steps[3].detail


def test_closed_port_is_unreachable() -> None:
    port = free_port()
    result = probe_cli(f"lpd://127.0.0.1:{port}/q")
    assert result.returncode == 1
    assert "FAIL: unreachable: connection refused" in result.stdout
    assert "✗ connect" in result.stdout and "lpq" not in result.stdout


def test_no_print_sends_no_job(capsys: pytest.CaptureFixture[str]) -> None:
    with RecordingLpdServer() as server:
        uri = f"lpd://127.0.0.1:{server.port}/q"
        assert cli.main(["probe", uri, "--no-print"]) == 0
        server.wait_connections(2)
        commands = [c.command for c in server.connections]
    out = capsys.readouterr().out
    assert 2 not in commands and 3 in commands
    assert "queue known: no entries" in out and f"uri: {uri}" in out
    assert "print" not in out


def test_no_print_fails_when_lpq_refuses() -> None:
    script = LpdScript(status_text=b"lpd: unknown printer nope\n")
    with RecordingLpdServer(script) as server:
        report = probe(f"lpd://127.0.0.1:{server.port}/nope", send=False)
    assert not report.ok
    assert report.verdict == "FAIL: queue 'nope' refused: lpd: unknown printer nope"


def test_json_report() -> None:
    with RecordingLpdServer() as server:
        uri = f"lpd://127.0.0.1:{server.port}/q"
        result = probe_cli(uri, "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["uri"] == uri and report["ok"] is True
    assert report["verdict"] == f"OK: {uri} works"
    assert [s["name"] for s in report["steps"]] == \
        ["resolve", "connect", "lpq", "print mode=count"]
    assert all(s["ok"] and s["ms"] >= 0 and s["detail"] for s in report["steps"])


def test_the_relay_itself(tmp_path: Path) -> None:
    with DaemonThread(relay_config(tmp_path)) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/Ward3"
        report = probe(uri)
        deadline = time.monotonic() + 10
        while not (landed := list((tmp_path / "out").glob("**/*.json"))):
            assert time.monotonic() < deadline, "the test page never reached the hot folder"
            time.sleep(0.05)
    assert report.ok and report.uri == uri, report
    assert "Ward3 is ready" in report.steps[2].detail
    pages = [p for p in landed[0].parent.iterdir() if p.suffix != ".json"]
    assert any(TEST_PAGE in p.read_bytes() for p in pages)


class ReservedPortsOnly(RecordingLpdServer):
    """An LPD like BSD lpd without -W: a peer on port >= 1024 gets a text line, then close."""

    def _serve(self, conn: socket.socket, rec: RecordedConnection) -> None:
        if rec.peer[1] < 1024:
            super()._serve(conn, rec)
            return
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):   # read the command line, then refuse
                conn.recv(1024)
                conn.sendall(b"lpd: Malformed from address\n")
                conn.shutdown(socket.SHUT_WR)
        with self.lock:
            rec.ended = "refused port"


@pytest.mark.root
@pytest.mark.parametrize("send", [True, False])
def test_finds_that_a_reserved_port_is_required(send: bool) -> None:
    require_root("binding reserved source ports")
    with ReservedPortsOnly() as server:
        uri = f"lpd://127.0.0.1:{server.port}/q"
        report = probe(uri, send=send)
        peers = [c.peer[1] for c in server.connections]
    release_time_wait(range(512, 1024), server.port)
    assert report.ok, report
    assert report.uri == f"{uri}?reserve=rfc1179"
    lpq = report.steps[2]
    assert not lpq.ok and "Malformed from address" in lpq.detail
    what = "print mode=count" if send else "lpq"
    assert report.steps[-1].name == f"{what} reserve=rfc1179" and report.steps[-1].ok
    assert any(721 <= p <= 731 for p in peers)
    if send:
        assert "a reserved source port is required" in report.verdict
