"""The load generator's compiled loop (relay._loadgen) against fake receivers and the relay.

Each fake receiver speaks the job's exchange over a real loopback socket and
at one step answers otherwise: a refusal (LPRng's code byte and line,
cups-lpd's bare byte and close, BSD's text line), a close, a reset, silence.
The compiled loop must count each as the Python loop (``FastLoad``, the
readable reference) does, in every data-file mode; against a real relay
every job of every mode and order arrives once, under its own title.
"""

from __future__ import annotations

import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import orjson
import pytest

from relay.loadgen import LoadResult, load, make_payload
from relay.loadgenfast import FastLoad, run_fast
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.lpdacker import Acker
from tests.test_cli import cli
from tests.test_server import delivered, file_bytes

MODES = ["count", "stream", "windows"]
STEP_NAMES = ["receive", "control header", "control file", "data header", "data file"]


class FakeReceiver:
    """Acknowledges each step of every job but step ``at``, where it does ``action``.

    ``action``: ``b"..."`` sends those bytes and closes; "close" closes;
    "reset" closes with a RST (SO_LINGER 0); "stall" answers nothing and
    holds the connection until the sender gives up; "eof" (the data file of
    a stream job) reads to the sender's half-close and closes without a reply.
    Every other step is answered ``ack``.
    """

    def __init__(self, at: int, action: bytes | str, *, ack: bytes = b"\0",
                 host: str = "127.0.0.1") -> None:
        self.at, self.action, self.ack = at, action, ack
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeReceiver:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, conn.makefile("rb") as reader:  # type: BinaryIO
            for step in self._steps(reader):
                if step == self.at:
                    self._act(conn, reader)
                    return
                conn.sendall(self.ack)

    def _steps(self, reader: BinaryIO) -> Iterator[int]:
        """Read the job step by step, yielding each step's number once it is in."""
        reader.readline()
        yield 0
        for file in range(2):
            header = reader.readline()
            yield 1 + 2 * file
            if self.at == 2 + 2 * file and self.action in ("stall", "eof"):
                yield 2 + 2 * file     # its body is read (or not) by the action
                return
            count = int(header[1:header.index(b" ")])
            if header[:1] == b"\x03" and count in (0, 125899906843000):
                reader.read()          # until the sender's half-close
            else:
                reader.read(count + 1)
            yield 2 + 2 * file

    def _act(self, conn: socket.socket, reader: BinaryIO) -> None:
        if isinstance(self.action, bytes):
            conn.sendall(self.action)
        elif self.action == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif self.action == "eof":
            reader.read()
        elif self.action == "stall":
            while not self._stop.is_set() and conn.recv(4096):
                pass                   # until the sender closes


def _both(port: int, mode: str, *, jobs: int = 3, timeout: float = 1.0,
          host: str = "127.0.0.1") -> dict[str, LoadResult]:
    """The same load through the compiled loop ("c") and the Python one ("py")."""
    dest = parse_destination(f"lpd://{host}:{port}/q")
    data = make_payload(100)
    compiled = run_fast(dest, jobs=jobs, concurrency=2, data=data, mode=mode,
                        io_timeout=timeout)
    reference = FastLoad(dest, jobs=jobs, concurrency=2, data=data, mode=mode,
                         io_timeout=timeout)
    return {"c": compiled, "py": reference.result(reference.run())}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("at", "action", "key"), [
    (0, b"\x01no such queue\n", "0x01"),      # LPRng: code byte, a line
    (2, b"\x02", "0x02"),                     # cups-lpd: the bare byte, then close
    (1, b"no permission to print\n", "0x01"),  # BSD lpd: a text line
    (4, b"\x07", "0x07"),
    (3, "close", "closed"),
    (2, "reset", "closed"),
], ids=["lprng-refusal", "bare-byte", "bsd-text", "data-refused", "close", "reset"])
def test_each_refusal_counts_as_in_python(mode: str, at: int, action: bytes | str,
                                          key: str) -> None:
    with FakeReceiver(at, action) as peer:
        results = _both(peer.port, mode)
    for impl, result in results.items():
        assert (impl, result.ok, result.failures) == (impl, 0, {key: 3})


@pytest.mark.parametrize("mode", MODES)
def test_a_silent_receiver_times_out(mode: str) -> None:
    with FakeReceiver(2, "stall") as peer:
        started = time.monotonic()
        results = _both(peer.port, mode, jobs=2)
        assert time.monotonic() - started < 10
    for impl, result in results.items():
        assert (impl, result.ok, result.failures) == (impl, 0, {"timeout": 2})


@pytest.mark.parametrize("mode", MODES)
def test_a_close_after_the_data_ends_a_stream_job(mode: str) -> None:
    # A stream receiver may take the data to EOF and close without a reply:
    # the job went through.  In count mode the sender waits for the 0x00
    # and the receiver for an EOF that never comes: a timeout.
    with FakeReceiver(4, "eof") as peer:
        results = _both(peer.port, mode)
    want = {} if mode != "count" else {"timeout": 3}
    for impl, result in results.items():
        assert (impl, result.ok, result.failures) == (impl, 3 - sum(want.values()), want)


@pytest.mark.parametrize("mode", MODES)
def test_a_stray_line_end_after_an_ack_is_skipped(mode: str) -> None:
    with FakeReceiver(-1, "", ack=b"\0\n") as peer:     # "00 0A" at every step
        results = _both(peer.port, mode, jobs=20)
    for impl, result in results.items():
        assert (impl, result.ok, result.failures) == (impl, 20, {})


def test_refused_connections_and_progress() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ticks: list[int] = []
    result = load(f"lpd://127.0.0.1:{port}/q", jobs=600, concurrency=8, size=10,
                  done=lambda: ticks.append(1))
    assert (result.ok, result.failures, len(ticks)) == (0, {"refused": 600}, 600)


@pytest.mark.parametrize(("mode", "order"), [("count", "control-first"),
                                              ("count", "data-first"),
                                              ("stream", "control-first"),
                                              ("windows", "control-first")])
def test_every_mode_into_the_relay(tmp_path: Path, mode: str, order: str) -> None:
    out = tmp_path / "out"
    with DaemonThread(relay_config(tmp_path, queues={"q": {"destinations": [f"dir://{out}"]}})
                      ) as relay:
        result = load(f"lpd://127.0.0.1:{relay.port}/q?order={order}", jobs=300,
                      concurrency=16, size=3000, mode=mode, first=1000)
        metas = delivered(out, "q", n=300)
    assert (result.ok, result.failures, result.bytes) == (300, {}, 300 * 3000)
    assert sorted(m["title"] for m in metas) == sorted(f"load {n}" for n in range(1000, 1300))
    assert result.cpu_ms_per_job > 0 and len(result.latencies) == 300


@pytest.mark.parametrize("mode", MODES)
def test_large_jobs_into_the_relay_arrive_whole(tmp_path: Path, mode: str) -> None:
    # 300 KiB: partial sends, the data referenced (not copied) by every job,
    # the NUL of a count job after it, the half-close of a stream job.
    out = tmp_path / "out"
    payload = make_payload(300_000)
    with DaemonThread(relay_config(tmp_path, queues={"q": {"destinations": [f"dir://{out}"]}})
                      ) as relay:
        result = load(f"lpd://127.0.0.1:{relay.port}/q", jobs=12, concurrency=4,
                      size=300_000, mode=mode, payload=payload)
        metas = delivered(out, "q", n=12, timeout=30)
    assert (result.ok, result.failures) == (12, {})
    assert all(file_bytes(m) == [payload] for m in metas)


def test_ipv6_loopback() -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with FakeReceiver(-1, "", host="::1") as peer:
        results = _both(peer.port, "count", jobs=10, host="[::1]")
    assert peer.accepted == 20
    for impl, result in results.items():
        assert (impl, result.ok, result.failures) == (impl, 10, {})


def test_the_command_reports_its_cpu_and_the_kernels_part() -> None:
    with Acker() as acker:
        uri = f"lpd://127.0.0.1:{acker.port}/q"
        text = cli("loadgen", uri, "--jobs", "500", "--concurrency", "16", "--size", "1KiB")
        as_json = cli("loadgen", uri, "--jobs", "500", "--concurrency", "16", "--size", "1KiB",
                      "--json")
        assert acker.counts() == (1000, 1000 * 1024)
    assert text.returncode == 0, text.stderr
    line = re.search(r"loadgen CPU ([\d.]+) ms per job \(([\d.]+) of it system; 1 process\)",
                     text.stdout)
    assert line is not None, text.stdout
    assert 0 < float(line[2]) <= float(line[1])
    summary = orjson.loads(as_json.stdout)
    assert summary["ok"] == 500
    assert 0 < summary["loadgen_cpu_system_ms_per_job"] <= summary["loadgen_cpu_ms_per_job"]


def test_an_interrupt_stops_the_loop_at_once() -> None:
    # The loop runs without the GIL; a signal ends its epoll_wait and is
    # raised in Python (the command exits 1), not after the 30 s I/O timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        # A command started as a background job inherits SIGINT ignored (POSIX), and
        # so would loadgen if this suite ran as one: a handler here is reset to the
        # default by exec, so loadgen starts with SIGINT as a terminal's would be.
        before = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-X", "faulthandler", "-m", "relay", "loadgen",
                 f"lpd://127.0.0.1:{silent.getsockname()[1]}/q", "--jobs", "10",
                 "--concurrency", "2", "--size", "10"], stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
        finally:
            signal.signal(signal.SIGINT, before)
        try:
            deadline = time.monotonic() + 30
            while len(_established(silent.getsockname()[1])) < 2:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                # Where it hangs: faulthandler prints every thread's stack on SIGABRT.
                proc.send_signal(signal.SIGABRT)
                _, err = proc.communicate(timeout=10)
                pytest.fail("loadgen went on after SIGINT; its threads:\n"
                            + err.decode(errors="replace")[-6000:])
            assert code == 1
            assert time.monotonic() - started < 5
        finally:
            if proc.poll() is None:
                proc.kill()           # our own child, by its handle
                proc.wait(5)


def _established(port: int) -> list[str]:
    """Established connections to ``port`` on loopback (from /proc/net/tcp)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as table:
        return [line for line in table if line.split()[2:3] == [want]
                and line.split()[3] == "01"]
