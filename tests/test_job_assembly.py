"""A job whose every step was acknowledged is never dropped silently (SPEC §4.2):
a file the control file does not name, or a last control file naming a file not
sent, is refused on the wire naming the file; a connection that ends with such a
job keeps it held with the reason — in lpq, `spool list`, the log and the gauge."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from relay.spool import Spool
from tests.daemon import DaemonThread, RelayProcess, relay_config, write_config_file
from tests.lpdwire import Wire, control_file
from tests.test_server import spool_files, wait_for


def _section(w: Wire, code: bytes, name: str, data: bytes) -> tuple[int, int | None]:
    """Send one file; the reply to its header and, when that was 0, to its body."""
    w.send(code + f"{len(data)} {name}\n".encode())
    head = w.reply()
    if head != 0:
        return head, None
    w.send(data + b"\x00")
    return head, w.reply()


def _session(port: int, parts: list[tuple[bytes, str, bytes]]) -> tuple[list[int], bytes]:
    """``\\2q``, then each (code, name, data) while acknowledged; every reply, and the text
    of a refusal."""
    replies: list[int] = []
    with Wire(port) as w:
        w.send(b"\x02q\n")
        replies.append(w.reply())
        for code, name, data in parts:
            head, body = _section(w, code, name, data)
            replies += [head] if body is None else [head, body]
            if replies[-1] != 0:
                return replies, w.read_all()
        w.half_close()
        return replies, w.read_all()


def _cf(*names: str) -> bytes:
    return control_file(host="h", data_names=names)


DATA = b"hello\n"
REFUSED = {
    # control first: the data file's header names a file the control file does not list
    "case differs, control first": ([(b"\x02", "cfA001h", _cf("dfa001h")),
                                     (b"\x03", "dfA001h", DATA)], "dfA001h"),
    "other host, control first": ([(b"\x02", "cfA001h", _cf("dfA001other")),
                                   (b"\x03", "dfA001h", DATA)], "dfA001h"),
    "path, control first": ([(b"\x02", "cfA001h", _cf("../../etc/passwd")),
                             (b"\x03", "dfA001h", DATA)], "dfA001h"),
    # data first: the control file, the last step, names a file that never came
    "case differs, data first": ([(b"\x03", "dfA001h", DATA),
                                  (b"\x02", "cfA001h", _cf("dfa001h"))], "dfa001h"),
    "other host, data first": ([(b"\x03", "dfA001h", DATA),
                                (b"\x02", "cfA001h", _cf("dfA001other"))], "dfA001other"),
    "extra name, data first": ([(b"\x03", "dfA001h", DATA),
                                (b"\x02", "cfA001h", _cf("dfA001h", "dfB001h"))], "dfB001h"),
    "path, data first": ([(b"\x03", "dfA001h", DATA),
                          (b"\x02", "cfA001h", _cf("/etc/passwd"))], "/etc/passwd"),
}


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path)) as daemon:
        yield daemon


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_file_the_job_cannot_have_is_refused_naming_it(relay, tmp_path, case):  # type: ignore[no-untyped-def]
    parts, named = REFUSED[case]
    replies, text = _session(relay.port, parts)
    assert replies[-1] == 0x03, replies
    assert named.encode() in text and text.endswith(b"\n"), text
    assert relay.metric("lpdrelay_jobs_rejected_total", reason="malformed") == 1
    wait_for(lambda: not spool_files(tmp_path) or None)
    assert not (tmp_path / "out").exists()   # nothing delivered, nothing held


HELD = {
    "extra name": ([(b"\x02", "cfA001h", _cf("dfA001h", "dfB001h")),
                    (b"\x03", "dfA001h", DATA)], "control file names dfB001h, never sent"),
    "case differs": ([(b"\x02", "cfA002h", _cf("dfa002h"))],
                     "control file names dfa002h, never sent"),
    "path": ([(b"\x02", "cfA003h", _cf("dfA003h", "../etc/shadow")), (b"\x03", "dfA003h", DATA)],
             "control file names ../etc/shadow, never sent"),
}


def test_an_acknowledged_incomplete_job_is_held_with_the_reason(tmp_path: Path) -> None:
    data = relay_config(tmp_path)
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with DaemonThread(data) as relay:
        for parts, _ in HELD.values():
            replies, _text = _session(relay.port, parts)
            assert set(replies) == {0}, replies     # every step acknowledged, then EOF
        wait_for(lambda: relay.metric("lpdrelay_jobs_held_total", queue="*") == len(HELD))
        wait_for(lambda: relay.metric("lpdrelay_spool_jobs", queue="*", state="held")
                 == len(HELD), timeout=15)
        with Wire(relay.port) as w:
            w.send(b"\x04q\n")
            assert w.read_all().count(b"held") >= len(HELD)
        listing = subprocess.run([sys.executable, "-m", "relay", "spool", "list", "-c", str(cfg)],
                                 capture_output=True, text=True, timeout=60, check=False)
        for _, reason in HELD.values():
            assert reason[:40] in listing.stdout, listing.stdout
        time.sleep(0.3)
        assert not (tmp_path / "out").exists()  # never delivered while held
    jobs = Spool(tmp_path / "spool").jobs()
    assert [(j.state, j.last_error) for j in jobs] == [("held", r) for _, r in HELD.values()]


def test_held_job_is_written_held_before_it_exists(tmp_path: Path) -> None:
    """Crash safety: the .state of a held job precedes its .json, so no restart sees
    it queued; a restart keeps it held."""
    spool = Spool(tmp_path / "spool", fsync=True, segment_threshold=0)  # the file layout
    spool.recover()

    async def hold() -> None:
        job = spool.begin(queue="q", wire_queue="q", peer="127.0.0.1:1")
        job.set_control("cfA001h", _cf("dfA001h", "dfB001h"), number="001", user="u",
                        host="h", title="", job_name="", formats={})
        writer = job.open_data("dfA001h")
        writer.write(b"data")
        writer.close()
        await spool.commit(job, hold="control file names dfB001h, never sent")
        await spool.aclose()
    trio.run(hold)
    jobs = tmp_path / "spool" / "jobs"
    (state,) = jobs.glob("*.state")
    (record,) = jobs.glob("*.json")
    assert state.stat().st_mtime_ns <= record.stat().st_mtime_ns
    again = Spool(tmp_path / "spool")
    (job,) = again.recover().jobs
    assert job.state == "held" and "dfB001h" in job.last_error


def test_held_job_survives_kill_and_stays_held(tmp_path: Path) -> None:
    data = relay_config(tmp_path, metrics={"listen": ""})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    with RelayProcess(cfg) as relay:
        replies, _ = _session(relay.port, HELD["extra name"][0])
        assert set(replies) == {0}
        wait_for(lambda: Spool(tmp_path / "spool").jobs() or None)
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGKILL)
        relay.proc.wait(10)
    with RelayProcess(cfg):
        time.sleep(0.5)
        (job,) = Spool(tmp_path / "spool").jobs()
        assert job.state == "held"
        assert not (tmp_path / "out").exists()


def test_a_job_left_at_a_file_boundary_by_timeout_or_reset_is_held(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path, server={"idle_timeout": "500ms"})
    parts = HELD["extra name"][0]
    with DaemonThread(cfg) as relay:
        for how in ("timeout", "reset"):
            with Wire(relay.port) as w:
                w.send(b"\x02q\n")
                assert w.reply() == 0
                for code, name, data in parts:
                    assert _section(w, code, name, data) == (0, 0)
                if how == "timeout":
                    assert w.read_all() == b""          # dropped after idle_timeout
                else:
                    w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                      struct.pack("ii", 1, 0))
        wait_for(lambda: relay.metric("lpdrelay_jobs_held_total", queue="*") == 2)
        # Cut inside a file instead: the sender knows it did not finish; discarded.
        with Wire(relay.port) as w:
            w.send(b"\x02q\n")
            assert w.reply() == 0
            code, name, data = parts[0]
            assert _section(w, code, name, data) == (0, 0)
            w.send(b"\x03100 dfA001h\n")
            assert w.reply() == 0
            w.send(b"x" * 10)
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="malformed") == 1)
        time.sleep(0.2)
    jobs = Spool(tmp_path / "spool").jobs()
    assert [j.state for j in jobs] == ["held", "held"]
