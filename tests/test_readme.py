"""The README's printing commands, run exactly as printed, against `lpd-relay serve`.

A private network namespace (its own loopback, so port 515 is ours and no
lpd of the machine can answer) and a private mount namespace with an overlay
on /etc in which /etc/printcap is removed: what a stock Debian LPRng install
looks like, whatever this machine has.  There the relay starts on its
embedded default, as ``make run`` does, and the README's shell block runs
line by line; every job must land in ``lpd-relay-out/ward3/``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.peers.process import require_binary, require_namespaces

ROOT = Path(__file__).resolve().parent.parent


def readme_block() -> list[str]:
    """The shell lines after "Then print to it from anywhere:", comments stripped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Then print to it from anywhere:\s*```sh\n(.*?)```", text, re.S)
    assert block, "README has the printing example"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines()
            if line.strip()]


def test_readme_block_uses_lprng_without_a_local_lpd() -> None:
    lines = readme_block()
    lpr = next(line for line in lines if line.startswith("lpr "))
    # queue@host%port: LPRng connects to the relay itself, not to a local lpd.
    assert re.search(r"-P \S+@127\.0\.0\.1%\d+", lpr), lpr


@pytest.mark.peers
@pytest.mark.root
def test_readme_commands_as_printed(tmp_path: Path) -> None:
    require_namespaces()
    require_binary("lpr")
    require_binary("ip")
    if not Path("/etc/lprng/lpd.conf").exists():
        pytest.skip("LPRng's /etc/lprng/lpd.conf missing (Debian package lprng)")
    lines = readme_block()
    host_had_printcap = Path("/etc/printcap").exists()
    work, upper, scratch = tmp_path / "work", tmp_path / "upper", tmp_path / "ovl-work"
    for d in (work, upper, scratch):
        d.mkdir()
    report = b"%PDF-1.4\n" + os.urandom(3000) + b"\n%%EOF\n"
    (work / "report.pdf").write_bytes(report)
    bin_dir = Path(sys.executable).parent
    script = "\n".join([
        "set -e",
        "ip link set lo up",
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={scratch} /etc",
        "rm -f /etc/printcap",                     # stock Debian: the file is missing
        "command -v sudo >/dev/null || sudo() { \"$@\"; }",
        f"cd {shlex.quote(str(work))}",
        f"PATH={shlex.quote(str(bin_dir))}:$PATH",
        "lpd-relay serve > relay.log 2>&1 &",
        "relay=$!",
        "for i in $(seq 100); do grep -q '^spool ' relay.log && break; sleep 0.1; done",
        "grep -q 'listening for LPD on 0.0.0.0:515' relay.log",
        *lines,
        "for i in $(seq 100); do [ $(ls lpd-relay-out/ward3/*.json | wc -l) -ge 3 ] && break;"
        " sleep 0.1; done",
        "kill $relay; wait $relay || true",
    ])
    result = subprocess.run(["unshare", "-m", "-n", "--propagation", "private",
                             "sh", "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    log = (work / "relay.log").read_text() if (work / "relay.log").exists() else ""
    assert result.returncode == 0, (result.stdout, result.stderr, log)
    metas = [orjson.loads(p.read_bytes())
             for p in sorted((work / "lpd-relay-out" / "ward3").glob("*.json"))]
    datas = [Path(m["files"][0]["path"]).read_bytes() for m in metas]
    assert datas.count(report) == 2, [len(d) for d in datas]     # lpr and lpd-relay send
    assert b"from a pipe\n" in datas
    # The README's `touch /etc/printcap` went into the overlay, not the host's /etc.
    assert (upper / "printcap").exists()
    assert Path("/etc/printcap").exists() == host_had_printcap
