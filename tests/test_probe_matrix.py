"""`probe` answers "byte counting on or off, and which order?" (the mode x order matrix),
tells filtered from closed from silent, and probes socket:// and usb:// destinations.

Receivers: a scripted LPD that refuses one length form or one file order (a
thread per connection on loopback), LPRng's lpd, the relay itself; a port whose
connects time out (a listener with a full accept queue: Linux drops the SYNs
then, as a firewall dropping 515 would look); a listener that accepts and
never answers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import orjson
import pytest
import trio

from relay.probe import ProbeReport, render, run_probe
from relay.probelocal import run_local_probe
from relay.probematrix import NOT_STREAMABLE, lpr_byte_counting, recommended
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import LprngServer, free_port, lprng_error, require_root
from tests.test_cups_options import unanswering_port

_HUGE = 2**31 - 1


class PickyLpd:
    """An LPD receiver that refuses some length forms (``count``: an exact length,
    ``stream``: 0, ``windows``: the huge fake one) or one order of the files."""

    def __init__(self, *, forms: tuple[str, ...] = (), order: str | None = None) -> None:
        self.refused_forms, self.refused_order = forms, order
        self.jobs: list[str] = []      # the length form of each complete job
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> PickyLpd:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        self.listener.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            with suppress(TimeoutError):
                conn, _ = self.listener.accept()
                conn.settimeout(10)
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, suppress(OSError, ValueError), conn.makefile("rb") as f:
            line = f.readline()
            if line[:1] in (b"\x03", b"\x04"):
                conn.sendall(b"q is ready\nno entries\n")
            elif line[:1] == b"\x02":
                conn.sendall(b"\x00")
                self._job(conn, f)

    def _job(self, conn: socket.socket, f: object) -> None:
        assert hasattr(f, "readline") and hasattr(f, "read")
        first, form = "", ""
        while line := f.readline():
            kind = "control" if line[:1] == b"\x02" else "data"
            length = int(line[1:].split(b" ")[0])
            first = first or kind
            if kind == "data":
                form = "stream" if length == 0 else "windows" if length >= _HUGE else "count"
            if (kind == "data" and form in self.refused_forms) or \
                    f"{first}-first" == self.refused_order:
                conn.sendall(lprng_error(2, f"{form or first} refused here"))
                return
            conn.sendall(b"\x00")
            if form != "count" and kind == "data":
                f.read()                # until the half-close
                conn.sendall(b"\x00")
                break
            f.read(length + 1)
            conn.sendall(b"\x00")
        self.jobs.append(form)


def probe(uri: str, *, all_modes: bool = False, timeout: float = 5) -> ProbeReport:
    async def main() -> ProbeReport:
        with trio.fail_after(60):
            return await run_probe(parse_destination(uri), all_modes=all_modes,
                                   step_timeout=timeout)
    return trio.run(main)


def probe_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", "probe", *args], capture_output=True,
                          text=True, timeout=90, check=False)


# -- the matrix ------------------------------------------------------------------

def test_first_mode_working_tries_nothing_else_by_default() -> None:
    with PickyLpd() as lpd:
        report = probe(f"lpd://127.0.0.1:{lpd.port}/q")
    assert report.ok and report.modes is None and lpd.jobs == ["count"]
    assert report.recommended_uri == report.uri == f"lpd://127.0.0.1:{lpd.port}/q"


@pytest.mark.parametrize(("refused", "best", "counting"), [
    (("count",), "stream", False),      # stream works, and so does the Windows fake length
    (("count", "stream"), "windows", False),
    (("count", "windows"), "stream", None),
])
def test_count_refused_tries_every_mode_and_order(refused: tuple[str, ...], best: str,
                                                  counting: bool | None) -> None:
    with PickyLpd(forms=refused) as lpd:
        uri = f"lpd://127.0.0.1:{lpd.port}/q"
        report = probe(uri)
    assert report.ok, report
    assert report.modes is not None
    assert report.modes["count"]["control-first"].startswith("refused: ")
    assert "count refused here" in report.modes["count"]["data-first"]
    for mode in ("stream", "windows"):
        cell = report.modes[mode]["control-first"]
        assert cell == "ok" if mode not in refused else cell.startswith("refused: ")
        assert report.modes[mode]["data-first"] == NOT_STREAMABLE
    assert report.recommended_uri == report.uri == f"{uri}?mode={best}"
    assert report.windows_port == {"lpr_byte_counting": counting}
    assert sorted(lpd.jobs) == sorted(m for m in ("stream", "windows") if m not in refused)


def test_receiver_refusing_control_first_gets_data_first() -> None:
    with PickyLpd(order="control-first") as lpd:
        uri = f"lpd://127.0.0.1:{lpd.port}/q"
        report = probe(uri)
    assert report.ok and report.modes is not None
    assert report.modes["count"] == {"control-first": report.modes["count"]["control-first"],
                                     "data-first": "ok"}
    assert "control refused here" in report.modes["count"]["control-first"]
    assert report.modes["stream"]["control-first"].startswith("refused: ")
    assert report.recommended_uri == f"{uri}?order=data-first"
    assert report.windows_port == {"lpr_byte_counting": True}


def test_all_modes_json_is_structured() -> None:
    with PickyLpd(order="data-first") as lpd:
        uri = f"lpd://127.0.0.1:{lpd.port}/q"
        result = probe_cli(uri, "--all-modes", "--json", "--timeout", "5")
    assert result.returncode == 0, result.stdout + result.stderr
    report = orjson.loads(result.stdout)
    assert report["modes"]["count"]["control-first"] == "ok"
    assert report["modes"]["count"]["data-first"].startswith("refused: ")
    assert report["modes"]["stream"] == {"control-first": "ok", "data-first": NOT_STREAMABLE}
    assert report["modes"]["windows"]["control-first"] == "ok"
    assert report["recommended_uri"] == uri
    assert report["windows_port"] == {"lpr_byte_counting": True}
    assert report["reachability"] == "answered"


def test_text_output_shows_the_matrix_and_the_windows_setting() -> None:
    with PickyLpd(forms=("count",)) as lpd:
        report = probe(f"lpd://127.0.0.1:{lpd.port}/q")
    text = render(report)
    assert "modes (length form x file order):" in text
    assert any(line.split()[:2] == ["stream", "ok"] for line in text.splitlines())
    assert 'Windows port: "LPR Byte Counting Enabled" off' in text


def test_recommendation_prefers_counts_then_stream_then_windows() -> None:
    matrix = {"count": {"control-first": "refused: x", "data-first": "ok"},
              "stream": {"control-first": "ok"}, "windows": {"control-first": "ok"}}
    assert recommended(matrix, "control-first") == ("count", "data-first")
    assert lpr_byte_counting(matrix) is True
    assert recommended({"windows": {"control-first": "ok"}}, "control-first") == (
        "windows", "control-first")
    assert recommended({}, "control-first") is None


@pytest.mark.peers
def test_lprng_matrix(tmp_path: Path) -> None:
    # FIELD-NOTES: LPRng takes counts in both orders and length 0, and refuses the
    # Windows fake length.
    with LprngServer(tmp_path / "lprng", queues=("Ward3",)) as lprng:
        uri = f"lpd://127.0.0.1:{lprng.port}/Ward3"
        report = probe(uri, all_modes=True)
    assert report.modes is not None, report
    assert report.modes["count"] == {"control-first": "ok", "data-first": "ok"}
    assert report.modes["stream"]["control-first"] == "ok"
    assert report.modes["windows"]["control-first"].startswith("refused: ")
    assert report.recommended_uri == uri
    assert report.windows_port == {"lpr_byte_counting": True}


def test_the_relay_itself_takes_every_mode(tmp_path: Path) -> None:
    with DaemonThread(relay_config(tmp_path)) as relay:
        uri = f"lpd://127.0.0.1:{relay.port}/Ward3"
        report = probe(uri, all_modes=True)
    assert report.modes is not None, report
    assert {cell for row in report.modes.values() for cell in row.values()} == {
        "ok", NOT_STREAMABLE}
    assert report.recommended_uri == uri


# -- filtered, closed, silent ----------------------------------------------------

def test_filtered_port_is_told_apart_from_a_closed_one() -> None:
    with unanswering_port() as port:
        result = probe_cli(f"lpd://127.0.0.1:{port}/q", "--timeout", "1", "--json")
    report = orjson.loads(result.stdout)
    assert result.returncode == 1
    assert report["reachability"] == "filtered"
    assert report["verdict"] == (f"FAIL: unreachable: filtered (no answer, e.g. {port} "
                                 "blocked on the way back) within 1s")


def test_closed_port_says_refused() -> None:
    port = free_port()
    report = probe(f"lpd://127.0.0.1:{port}/q")
    assert report.reachability == "closed"
    assert report.verdict == (f"FAIL: unreachable: connection refused: closed (refused: "
                              f"nothing listens on port {port})")


@contextmanager
def silent_listener() -> Iterator[int]:
    """Accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            with suppress(TimeoutError):
                held.append(listener.accept()[0])
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def test_connected_but_no_reply_to_the_queue_command() -> None:
    with silent_listener() as port:
        report = probe(f"lpd://127.0.0.1:{port}/q", timeout=1)
    lpq = report.steps[2]
    assert lpq.name == "lpq" and not lpq.ok
    assert lpq.detail == "connected but no reply to the queue command within 1s"
    assert report.reachability == "no reply"


# -- socket:// and usb:// --------------------------------------------------------

def local(uri: str, timeout: float = 5) -> ProbeReport:
    async def main() -> ProbeReport:
        with trio.fail_after(30):
            return await run_local_probe(parse_destination(uri), step_timeout=timeout)
    return trio.run(main)


def test_socket_printer_is_reachable_and_nothing_is_printed() -> None:
    with silent_listener() as port:
        report = local(f"socket://127.0.0.1:{port}")
    assert report.ok and report.reachability == "answered"
    assert report.verdict == (f"OK: 127.0.0.1:{port} is reachable "
                              "(nothing was sent, nothing printed)")


def test_socket_printer_filtered_and_closed() -> None:
    with unanswering_port() as port:
        filtered = local(f"socket://127.0.0.1:{port}", timeout=1)
    assert not filtered.ok and filtered.reachability == "filtered"
    closed = local(f"socket://127.0.0.1:{free_port()}")
    assert not closed.ok and closed.reachability == "closed"


def test_usb_device_writable_missing_and_without_reader(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        report = local(f"usb://{os.ttyname(slave)}")
    finally:
        os.close(slave)
        os.close(master)
    assert report.ok and report.verdict.endswith("is writable")
    missing = local(f"usb://{tmp_path}/lp9")
    assert not missing.ok and "does not exist (printer unplugged" in missing.verdict
    fifo = tmp_path / "lp0"
    os.mkfifo(fifo)
    no_reader = local(f"usb://{fifo}")
    assert not no_reader.ok and no_reader.steps[-1].name == "writable"


def test_usb_make_model_probe_names_what_it_found(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.test_usbid import HP_ID, FakeSysfs
    tree = FakeSysfs(tmp_path / "root")
    monkeypatch.setenv("LPD_RELAY_SYSFS", str(tree.sys))
    monkeypatch.setenv("LPD_RELAY_DEV", str(tree.dev))
    tree.plug("lp0", HP_ID, serial="X1")
    report = local("usb://EPSON/TM-T88V")
    assert not report.ok
    assert "no connected printer is EPSON/TM-T88V (any serial); found: lp0 = " in report.verdict
    result = probe_cli("usb://HP/LaserJet%201020?serial=X1", "--json")
    assert result.returncode == 1          # found, but a FIFO without a reader
    assert orjson.loads(result.stdout)["steps"][0]["detail"] == str(tree.dev / "usb" / "lp0")


_NETNS_SCRIPT = """
set -e
ip link set lo up
nft add table inet probe_test
nft add chain inet probe_test out '{ type filter hook output priority 0; }'
nft add rule inet probe_test out tcp sport 5515 drop
"$1" -c 'import socket, time; s = socket.create_server(("127.0.0.1", 5515)); time.sleep(20)' &
listener=$!
sleep 0.5
set +e
"$1" -m relay probe lpd://127.0.0.1:5515/q --timeout 1 --json
rc=$?
kill "$listener"
exit $rc
"""


@pytest.mark.root
def test_filtered_by_a_firewall_dropping_the_answers(tmp_path: Path) -> None:
    # The seed's case: the receiver listens, but its SYN-ACKs are dropped on the
    # way back (nftables in a network namespace of this test's own).
    require_root("network namespaces and nftables")
    for tool in ("unshare", "nft", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    result = subprocess.run(["unshare", "--net", "sh", "-c", _NETNS_SCRIPT, "sh",
                             sys.executable], capture_output=True, text=True, timeout=60,
                            check=False, cwd=Path(__file__).resolve().parent.parent)
    if "Operation not permitted" in result.stderr:
        pytest.skip(f"no network namespaces here: {result.stderr.strip()[:200]}")
    assert result.returncode == 1, result.stdout + result.stderr
    report = orjson.loads(result.stdout)
    assert report["reachability"] == "filtered"
    assert report["steps"][1]["detail"] == ("filtered (no answer, e.g. 5515 blocked on the way "
                                            "back) within 1s")
