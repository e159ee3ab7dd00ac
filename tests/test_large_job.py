"""A large job sent with its exact count, end to end (SPEC §4.2, §4.4).

A real relay process, a sender that writes the count, the bytes and the NUL
and then waits for the ack (no half-close: that is what exposed the old
"count >= 2**32 means until EOF" rule), and a dir:// hot folder whose copy
must be byte-identical (sha256).  The data is generated block by block while
it is sent, so nothing of its size is ever in memory.  ``make test`` runs a
few hundred MiB; the 5 GiB run (counts of 4 GiB and more are real: RPM and
LPRng send them) is marked slow and skips when the disk cannot hold it.
The parser-level 5 GiB checks are in tests/test_large_count.py.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import time
from pathlib import Path

import pytest

from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import Wire
from tests.test_server import delivered

MIB = 2**20
GIB = 2**30
BLOCK = 4 * MIB


def _blocks(seed: int = 515) -> list[bytes]:
    """A few random blocks to cycle through; each sent block is stamped with its index."""
    rng = random.Random(seed)
    return [rng.randbytes(BLOCK) for _ in range(3)]


def _send_exact(port: int, size: int) -> tuple[str, float]:
    """Send one job of ``size`` data bytes with exact counts; its sha256 and the ack wait."""
    base = _blocks()
    cf = b"Hclient\nPalice\nJbig\nldfA001client\nUdfA001client\nNbig.bin\n"
    digest = hashlib.sha256()
    with Wire(port, timeout=300) as w:
        w.send(b"\x02q\n")
        assert w.reply() == 0
        w.send(b"\x02%d cfA001client\n" % len(cf))
        assert w.reply() == 0
        w.send(cf + b"\0")
        assert w.reply() == 0
        w.send(b"\x03%d dfA001client\n" % size)
        assert w.reply() == 0
        sent, index = 0, 0
        while sent < size:
            block = index.to_bytes(8, "big") + base[index % len(base)][8:]
            block = block[:size - sent]
            w.sock.sendall(block)
            digest.update(block)
            sent += len(block)
            index += 1
        w.send(b"\0")
        start = time.monotonic()
        assert w.reply() == 0, "the last file is acknowledged after its count and NUL"
        waited = time.monotonic() - start
    return digest.hexdigest(), waited


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def _run(tmp_path: Path, size: int, max_job_size: str) -> None:
    data = relay_config(tmp_path, server={"max_job_size": max_job_size, "idle_timeout": "60s",
                                          "max_connections": 50},
                        queues={"q": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    data["log"] = {"format": "json", "level": "warning"}
    with RelayProcess(write_config_file(tmp_path / "relay.toml", data)) as relay:
        sent, waited = _send_exact(relay.port, size)
        assert waited < 60, f"ack took {waited:.1f}s: it must not wait for EOF or idle_timeout"
        meta = delivered(tmp_path / "out", "q", 1, timeout=300)[0]
    (file,) = meta["files"]
    assert file["bytes"] == size
    assert _sha256(Path(file["path"])) == sent, "delivered byte for byte, no NUL appended"


def test_a_few_hundred_mib_exact_count_is_acked_and_byte_identical(tmp_path: Path) -> None:
    size = 300 * MIB + 12_345
    if shutil.disk_usage(tmp_path).free < 3 * size:
        pytest.skip(f"needs {3 * size // MIB} MiB free in {tmp_path}")
    _run(tmp_path, size, "512MiB")


@pytest.mark.slow
def test_a_5gib_exact_count_is_acked_and_byte_identical(tmp_path: Path) -> None:
    size = 5 * GIB + 7
    need = 2 * size + GIB       # the spool copy, the hot-folder copy, and headroom
    free = shutil.disk_usage(tmp_path).free
    if free < need:
        pytest.skip(f"needs {need / GIB:.1f} GiB free in {tmp_path}, has {free / GIB:.1f} GiB")
    _run(tmp_path, size, "6GiB")
