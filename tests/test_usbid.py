"""``usb://Make/Model?serial=`` against a sysfs-shaped tree the test builds.

The tree copies the Linux usblp layout: ``class/usbmisc/lpN`` links to the
interface's ``usbmisc/lpN``, whose ``device`` link is the USB interface with
the ``ieee1284_id`` attribute; the interface's parent, the USB device, has
``serial``.  The device nodes are FIFOs under a dev root of the test's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from relay.errors import SinkUnavailable
from relay.sinks import make_sink
from relay.uri import parse_destination
from relay.usbid import UsbNotFound, find_printers, parse_device_id, resolve_device
from tests.sinkjobs import job_bytes, make_job
from tests.test_sink_usb import FifoReader, deliver

HP_ID = "MFG:Hewlett-Packard;CMD:PJL,MLC,PCL;MDL:HP LaserJet 1020;CLS:PRINTER;"
EPSON_ID = "MANUFACTURER:EPSON;COMMAND SET:ESC/POS;MODEL:TM-T88V;SN:T88V-0042;"


class FakeSysfs:
    """A sysfs and a /dev with usblp printers plugged in as the test says."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        (self.sys / "class" / "usbmisc").mkdir(parents=True)
        (self.dev / "usb").mkdir(parents=True)

    def plug(self, lp: str, device_id: str, serial: str | None = None, port: str = "1-1") -> Path:
        usb = self.sys / "devices" / "pci0000:00" / "0000:00:14.0" / "usb1" / port
        interface = usb / f"{port}:1.0"
        node = interface / "usbmisc" / lp
        node.mkdir(parents=True)
        (interface / "ieee1284_id").write_text(device_id + "\n")
        if serial is not None:
            (usb / "serial").write_text(serial + "\n")
        os.symlink("../../../" + interface.name, node / "device")
        os.symlink(os.path.relpath(node, self.sys / "class" / "usbmisc"),
                   self.sys / "class" / "usbmisc" / lp)
        fifo = self.dev / "usb" / lp
        os.mkfifo(fifo)
        return fifo

    def unplug(self, lp: str) -> None:
        (self.sys / "class" / "usbmisc" / lp).unlink()
        (self.dev / "usb" / lp).unlink()


@pytest.fixture
def sysfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSysfs:
    tree = FakeSysfs(tmp_path / "root")
    monkeypatch.setenv("LPD_RELAY_SYSFS", str(tree.sys))
    monkeypatch.setenv("LPD_RELAY_DEV", str(tree.dev))
    return tree


def test_parse_device_id_fields() -> None:
    assert parse_device_id(HP_ID)["MDL"] == "HP LaserJet 1020"
    assert parse_device_id(" mfg:X ; mdl : Y;junk;")["MFG"] == "X"
    assert parse_device_id("") == {}


def test_find_printers_reads_every_lp(sysfs: FakeSysfs) -> None:
    sysfs.plug("lp0", HP_ID, serial="00CNBW12345", port="1-1")
    sysfs.plug("lp1", EPSON_ID, port="1-2")
    found = {p.name: p for p in find_printers()}
    assert (found["lp0"].make, found["lp0"].model, found["lp0"].serial) == (
        "Hewlett-Packard", "HP LaserJet 1020", "00CNBW12345")
    assert (found["lp1"].make, found["lp1"].model, found["lp1"].serial) == (
        "EPSON", "TM-T88V", "T88V-0042")          # no USB serial: the 1284 SN field
    assert found["lp1"].device == str(sysfs.dev / "usb" / "lp1")


@pytest.mark.parametrize("uri", [
    "usb://HP/LaserJet%201020?serial=00CNBW12345",     # CUPS: HP for Hewlett-Packard
    "usb://Hewlett-Packard/HP%20LaserJet%201020",
    "usb://hp/laserjet%201020",
])
def test_resolves_the_cups_uri_to_its_lp_device(sysfs: FakeSysfs, uri: str) -> None:
    sysfs.plug("lp0", EPSON_ID, port="1-2")
    sysfs.plug("lp3", HP_ID, serial="00CNBW12345", port="1-1")
    assert resolve_device(parse_destination(uri)) == str(sysfs.dev / "usb" / "lp3")


def test_no_match_names_what_was_looked_for_and_found(sysfs: FakeSysfs) -> None:
    sysfs.plug("lp0", HP_ID, serial="00CNBW12345")
    with pytest.raises(UsbNotFound) as info:
        resolve_device(parse_destination("usb://HP/LaserJet%201020?serial=OTHER"))
    text = str(info.value)
    assert "HP/LaserJet 1020 serial OTHER" in text
    assert "lp0 = Hewlett-Packard/HP LaserJet 1020 serial 00CNBW12345" in text


def test_no_printer_at_all_says_where_it_looked(sysfs: FakeSysfs) -> None:
    with pytest.raises(UsbNotFound, match=r"no usblp printer at all under .*/sys/class/usbmisc"):
        resolve_device(parse_destination("usb://EPSON/TM-T88V"))


def test_sink_prints_to_the_matching_device_and_follows_a_replug(
        sysfs: FakeSysfs, tmp_path: Path) -> None:
    sink = make_sink(parse_destination("usb://EPSON/TM-T88V?serial=T88V-0042"))
    assert "EPSON/TM-T88V serial T88V-0042" in sink.describe()
    job = make_job(tmp_path, [b"\x1b@receipt one\n", 5000])
    fifo = sysfs.plug("lp0", EPSON_ID)
    reader = FifoReader(fifo)
    deliver(sink, job)
    assert reader.join() == job_bytes(job)
    # Replugged: the kernel names it lp2 now; the next attempt finds it there.
    sysfs.unplug("lp0")
    fifo = sysfs.plug("lp2", EPSON_ID, port="1-4")
    reader = FifoReader(fifo)
    deliver(sink, job)
    assert reader.join() == job_bytes(job)


def test_sink_without_the_printer_is_a_retry(sysfs: FakeSysfs, tmp_path: Path) -> None:
    sysfs.plug("lp0", HP_ID)
    sink = make_sink(parse_destination("usb://EPSON/TM-T88V"))
    with pytest.raises(SinkUnavailable, match=r"usb: no connected printer is EPSON/TM-T88V "
                                              r"\(any serial\); found: lp0 = "):
        deliver(sink, make_job(tmp_path, [b"x"]), limit=5)


def test_check_config_warns_about_missing_local_destinations(sysfs: FakeSysfs,
                                                             tmp_path: Path) -> None:
    sysfs.plug("lp0", HP_ID)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[server]\nspool_dir = "{tmp_path / "spool"}"\n'
        '[origin_ports]\nrange = "any"\n'
        f'[queues.ward3]\ndestinations = ["usb://EPSON/TM-T88V", "usb://{tmp_path}/lp7", '
        f'"dir://{blocker}/out", "dir://{tmp_path}/new/out", "usb://HP/LaserJet%201020"]\n'
        '[queues.lab]\ndestinations = ["lpd://127.0.0.1/lab?reserve=any", '
        '"lpd://127.0.0.1/lab2?reserve=none"]\n')
    result = subprocess.run([sys.executable, "-m", "relay", "check-config", "-c", str(config)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    # (the fd-limit warning about server.max_connections depends on this machine)
    lines = [line for line in result.stderr.splitlines() if "server.max_connections" not in line]
    assert lines[0].startswith('warning: origin_ports.range: "any" now means any reserved '
                               'port 1-1023, as in CUPS')
    assert lines[1].startswith("warning: queues.ward3.destinations[0]: no connected printer is "
                               "EPSON/TM-T88V (any serial); found: lp0 = Hewlett-Packard/")
    assert lines[2] == (f"warning: queues.ward3.destinations[1]: device {tmp_path}/lp7 does "
                        "not exist (printer unplugged or switched off?)")
    assert lines[3] == (f"warning: queues.ward3.destinations[2]: folder {blocker}/out cannot "
                        f"be created: {blocker} is not a folder")
    assert lines[4].startswith("warning: queues.lab.destinations[0]: reserve=any: \"any\" now")
    assert len(lines) == 5, lines          # the creatable folder, the HP and none: fine
    assert result.stdout.startswith(f"{config}: ok")
