"""deploy/systemd: the unit checked by systemd's own tools, offline (PID 1 is not needed).

``systemd-analyze verify`` runs with ``--root`` on a throwaway tree holding
systemd's own units, the unit and a stand-in ``/usr/bin/lpd-relay`` (verify
checks that ExecStart= is executable), with ``--man=no --generators=no`` so
nothing of the running machine is consulted; any warning fails the test.
``systemd-sysusers`` and ``systemd-tmpfiles`` apply the snippets to that
root, and the directories must end up owned by the user sysusers made.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from relay.config import config_from_dict
from relay.configsections import SERVER

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "lpd-relay.service"
SYSUSERS = ROOT / "deploy" / "systemd" / "lpd-relay.sysusers"
TMPFILES = ROOT / "deploy" / "systemd" / "lpd-relay.tmpfiles"
OPERATIONS = ROOT / "docs" / "operations.md"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def service() -> dict[str, list[str]]:
    """The [Service] section, each key with every value it is given."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package systemd)")
    return path


def fake_root(tmp_path: Path) -> Path:
    if not SYSTEM_UNITS.is_dir():
        pytest.skip(f"{SYSTEM_UNITS} missing: systemd's own units are needed to resolve targets")
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    stand_in = root / "usr/bin/lpd-relay"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    return root


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    root = fake_root(tmp_path)
    result = subprocess.run([analyze, "verify", f"--root={root}", "--man=no",
                             "--generators=no", UNIT.name],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_verify_catches_a_typo(tmp_path: Path) -> None:
    """The check above can fail: a misspelt key is reported."""
    analyze = tool("systemd-analyze")
    root = fake_root(tmp_path)
    unit = root / "etc/systemd/system" / UNIT.name
    unit.write_text(unit.read_text().replace("ProtectHome=", "ProtectHoem="))
    result = subprocess.run([analyze, "verify", f"--root={root}", "--man=no",
                             "--generators=no", UNIT.name],
                            capture_output=True, text=True, timeout=60, check=False)
    assert "ProtectHoem" in result.stderr


def test_unit_is_notify_sandboxed_and_capped() -> None:
    s = service()
    assert s["Type"] == ["notify"]
    assert s["User"] == ["lpd-relay"]
    assert s["StateDirectory"] == ["lpd-relay"]
    assert s["AmbientCapabilities"] == s["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
                       ("Restart", "on-failure")):
        assert s[key] == [value], key
    # Written only where it writes: the state directory.
    assert s["ReadWritePaths"] == ["/var/lib/lpd-relay"]
    # systemctl reload: the CLI's SIGHUP, which fails when the daemon refuses the file.
    assert s["ExecReload"] == ["/usr/bin/lpd-relay reload -c /etc/lpd-relay/relay.toml"]
    # Two descriptors per connection at the default max_connections, plus room.
    max_connections = int(SERVER["max_connections"][1])  # type: ignore[call-overload]
    assert int(s["LimitNOFILE"][0]) >= 2 * max_connections + 1024
    assert int(re.sub(r"\D", "", s["WatchdogSec"][0])) > 0


def test_sysusers_and_tmpfiles_apply_to_a_root(tmp_path: Path) -> None:
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={root}", str(SYSUSERS)], check=True,
                   capture_output=True, timeout=60)
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc/passwd").read_text().splitlines()}
    assert "lpd-relay" in users
    uid = int(users["lpd-relay"][2])
    assert uid < 1000 and users["lpd-relay"][6] == "/usr/sbin/nologin"
    groups = (root / "etc/group").read_text()
    assert re.search(r"^lp:x:\d+:.*lpd-relay", groups, re.M), groups
    subprocess.run([tmpfiles, f"--root={root}", "--create", str(TMPFILES)], check=True,
                   capture_output=True, timeout=60)
    spool = root / "var/lib/lpd-relay/spool"
    assert spool.is_dir() and spool.stat().st_uid == uid
    assert oct(spool.stat().st_mode & 0o777) == "0o750"


def test_packaged_config_in_docs_spools_in_the_state_directory() -> None:
    text = OPERATIONS.read_text()
    block = re.search(r"```toml\n# /etc/lpd-relay/relay.toml\n(.*?)```", text, re.S)
    assert block, "docs/operations.md shows the packaged /etc/lpd-relay/relay.toml"
    config = config_from_dict(tomllib.loads(block.group(1)), "operations.md")
    assert str(config.server.spool_dir).startswith("/var/lib/lpd-relay/")
    assert "/var/lib/lpd-relay/spool" in TMPFILES.read_text()


def test_docs_name_the_real_unit_file() -> None:
    for doc in (ROOT / "docs" / "origin-ports.md", ROOT / "deploy/prometheus/alerts.yml"):
        assert "deploy/systemd/lpd-relay.service" in doc.read_text(), doc


def test_unit_parses_as_ini() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert set(parser.sections()) == {"Unit", "Service", "Install"}
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_sandbox_exposure_is_low(tmp_path: Path) -> None:
    """systemd's own rating, offline: 3.3 of 10 when written ("OK"); fail above 4.0."""
    analyze = tool("systemd-analyze")
    root = fake_root(tmp_path)
    result = subprocess.run([analyze, "security", "--offline=true", "--threshold=40",
                             f"--root={root}", UNIT.name],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert match and float(match.group(1)) <= 4.0, result.stdout[-300:]
