"""The Debian package (`make deb`, docs/packaging.md), built and checked with Debian's tools.

The source checks (pins, changelog version, the shipped relay.toml) run
everywhere. The rest is marked ``package``: it builds the package with
``make deb`` (cached per source hash under build/package-cache/, so a second
run takes seconds), and needs root and the build tools (``make deb-deps``);
otherwise it is skipped with that reason. It then
- runs lintian on it: any error fails;
- reads it with ``dpkg-deb -I``/``-c``: control fields, the conffile, the
  unit, snippets, man pages, completions, dashboards; no byte code and no
  trace of the build directory in any file;
- installs it with ``dpkg --root`` into a throwaway root, its maintainer
  scripts run for real (chrootless, DPKG_ROOT set, PID 1 not systemd): the
  system user is created there, the unit enabled, the conffile registered;
  ``purge`` takes the conffile and the state away;
- runs the installed relay from that root (its venv moved there, on this
  machine's python3.11, the dependency): ``--version``, and a job sent with
  the installed CLI to the installed daemon on 127.0.0.1 lands in its hot folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from relay import __version__
from relay.config import load_config
from tests.daemon import BANNER_PORT, relay_config, write_config_file

ROOT = Path(__file__).resolve().parent.parent
DEBIAN = ROOT / "debian"
CACHE = ROOT / "build" / "package-cache"
VENV = "/usr/lib/lpd-relay"
BUILD_TIMEOUT = 540   # a fresh build takes well under a minute on 2 cores


def run(*cmd: str | Path, timeout: float = 60, check: bool = True,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=timeout, check=False, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} exited {result.returncode}:\n{result.stdout}\n"
                             f"{result.stderr}")
    return result


# ---- the sources of the package, checked everywhere ----

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_is_pinned_for_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = _pins(DEBIAN / "requirements.txt")
    for requirement in project["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~ \[;]", requirement)[0]).lower()
        assert name in pins, f"{name} (pyproject.toml) is not pinned in debian/requirements.txt"
    build = _pins(DEBIAN / "requirements-build.txt")
    assert int(build["cython"].split(".")[0]) >= 3 and "setuptools" in build


def test_changelog_names_this_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"lpd-relay ({__version__}) "), first


def test_shipped_config_is_valid_and_writes_only_to_the_state_directory() -> None:
    config = load_config(DEBIAN / "relay.toml")
    assert config.server.spool_dir == Path("/var/lib/lpd-relay/spool")
    assert config.metrics.listen is not None
    assert (config.metrics.listen.host, config.metrics.listen.port) == ("127.0.0.1", 9515)
    text = (DEBIAN / "relay.toml").read_text()
    folders = re.findall(r'^[^#\n]*"dir://(/[^"]*)"', text, re.M)
    assert folders and all(f.startswith("/var/lib/lpd-relay/") for f in folders)


# ---- building the package ----

def _why_not_buildable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (dpkg --root runs the maintainer scripts; make deb-deps uses apt-get)"
    check = run("bash", ROOT / "scripts" / "install-deb-deps.sh", "--check", check=False)
    if check.returncode != 0:
        return f"package build tools missing ({check.stderr.strip()}): run `make deb-deps` as root"
    if shutil.which("systemd-sysusers") is None:
        return "systemd-sysusers missing (Debian package systemd), which the postinst runs"
    return None


def _source_files() -> list[Path]:
    listed = run("git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                 "--exclude-standard", check=False)
    if listed.returncode == 0:
        return sorted(ROOT / p for p in listed.stdout.split("\0") if p)
    skip = {".git", ".venv", "build", "dist", "__pycache__"}
    return sorted(p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts))


NOT_PACKAGED = ("tests", "benchmarks", ".ci")   # editing a test needs no new build


def source_hash() -> str:
    """What the package is made of: the tree, and the Debian tools that make it."""
    digest = hashlib.sha256()
    tools = run("dpkg-query", "-W", "debhelper", "dpkg-dev", "python3.11")
    digest.update(tools.stdout.encode())
    for path in _source_files():
        if path.is_file() and path.relative_to(ROOT).parts[0] not in NOT_PACKAGED:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def deb() -> Path:
    reason = _why_not_buildable()
    if reason:
        pytest.skip(reason)
    out = CACHE / source_hash()
    found = sorted(out.glob("lpd-relay_*.deb"))
    if not found:
        for old in CACHE.glob("*"):   # one cached build is enough
            shutil.rmtree(old, ignore_errors=True)
        run("make", "-s", "-C", ROOT, "deb", f"DEB_FLAGS=--dist {out} --no-lintian",
            timeout=BUILD_TIMEOUT)
        found = sorted(out.glob("lpd-relay_*.deb"))
    assert len(found) == 1, found
    return found[0]


F = TypeVar("F", bound=Callable[..., None])


def package(test: F) -> F:
    """A test of the built package: marked, and given time for a fresh build."""
    marked: F = pytest.mark.package(pytest.mark.root(
        pytest.mark.timeout(BUILD_TIMEOUT + 60)(test)))
    return marked


@package
def test_lintian_finds_no_error(deb: Path) -> None:
    result = run("lintian", "--fail-on", "error", "--display-level", ">=warning", deb,
                 timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not re.search(r"^E: ", result.stdout, re.M), result.stdout


@package
def test_control_fields_and_conffile(deb: Path) -> None:
    fields = {name: run("dpkg-deb", "-f", deb, name).stdout.strip()
              for name in ("Package", "Version", "Architecture", "Depends")}
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert fields["Package"] == "lpd-relay" and fields["Version"] == __version__
    assert fields["Architecture"] == arch
    assert deb.name == f"lpd-relay_{__version__}_{arch}.deb"
    depends = [d.strip() for d in fields["Depends"].split(",")]
    assert "python3.11" in depends          # the venv's interpreter, exactly
    assert any("systemd-sysusers" in d for d in depends)
    assert not any("python3-venv" in d or "python3-trio" in d for d in depends)
    assert run("dpkg-deb", "-I", deb, "conffiles").stdout.split() == ["/etc/lpd-relay/relay.toml"]


EXPECTED = [
    "etc/lpd-relay/relay.toml", "usr/bin/lpd-relay", "lib/systemd/system/lpd-relay.service",
    "usr/lib/sysusers.d/lpd-relay.conf", "usr/lib/tmpfiles.d/lpd-relay.conf",
    "usr/share/man/man8/lpd-relay.8.gz", "usr/share/man/man5/lpd-relay.toml.5.gz",
    "usr/share/bash-completion/completions/lpd-relay",
    "usr/share/zsh/vendor-completions/_lpd-relay",
    "usr/share/doc/lpd-relay/copyright", "usr/share/doc/lpd-relay/examples/relay.toml",
    f"{VENV[1:]}/pyvenv.cfg", f"{VENV[1:]}/bin/python3",
    f"{VENV[1:]}/lib/python3.11/site-packages/relay/__main__.py",
]


def _listing(deb: Path) -> list[str]:
    lines = run("dpkg-deb", "-c", deb).stdout.splitlines()
    return [line.split(None, 5)[5].split(" -> ")[0].removeprefix("./") for line in lines]


@package
def test_contents(deb: Path) -> None:
    paths = _listing(deb)
    for path in EXPECTED:
        assert path in paths, f"{path} is not in the package"
    share = [f"usr/share/lpd-relay/grafana/{p.name}" for p in ROOT.glob("deploy/grafana/*.json")]
    share += [f"usr/share/lpd-relay/prometheus/{p.name}"
              for p in ROOT.glob("deploy/prometheus/*.yml")]
    assert share and set(share) <= set(paths)
    core = [p for p in paths if re.search(r"site-packages/relay/_core\.cpython-311-.*\.so$", p)]
    assert len(core) == 1, "the compiled core is not in the package"
    assert not [p for p in paths if p.endswith(".pyc") or "__pycache__" in p]


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("unpacked")
    run("dpkg-deb", "-x", deb, target)
    return target


@package
def test_nothing_names_the_build_directory(unpacked: Path) -> None:
    marker = str(ROOT / "build").encode()
    found = [p for p in unpacked.rglob("*")
             if p.is_file() and not p.is_symlink() and marker in p.read_bytes()]
    assert not found, f"these files name the build tree {marker!r}: {found}"


@package
def test_unit_runs_the_packaged_command(unpacked: Path) -> None:
    unit = (unpacked / "lib/systemd/system/lpd-relay.service").read_text()
    execstart = re.search(r"^ExecStart=[-@:+!]*(\S+)(.*)$", unit, re.M)
    assert execstart, "no ExecStart= in the unit"
    assert (unpacked / execstart.group(1).lstrip("/")).exists(), execstart.group(0)
    config = re.search(r"(?:-c|--config)[ =](\S+)", execstart.group(2))
    assert config is None or config.group(1) == "/etc/lpd-relay/relay.toml"
    wrapper = (unpacked / "usr/bin/lpd-relay").read_text()
    assert f'exec {VENV}/bin/python3 -I -m relay "$@"' in wrapper


# ---- installed into a throwaway root ----

def dpkg_root(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """dpkg on ``root``'s own database; maintainer scripts run here with DPKG_ROOT."""
    return run("dpkg", f"--root={root}", f"--log={root}/var/log/dpkg.log",
               "--force-script-chrootless", "--force-depends", *args, timeout=120)


def make_root(base: Path) -> Path:
    for sub in ("var/lib/dpkg/info", "var/lib/dpkg/updates", "var/log"):
        (base / sub).mkdir(parents=True)
    for name in ("status", "available"):
        (base / "var/lib/dpkg" / name).touch()
    return base


@pytest.fixture(scope="module")
def installed(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_root(tmp_path_factory.mktemp("root"))
    dpkg_root(root, "-i", deb)
    # The dependency, python3.11, is this machine's: link it into the root.
    (root / "usr/bin/python3.11").symlink_to("/usr/bin/python3.11")
    wrapper = (root / "usr/bin/lpd-relay").read_text().replace(VENV, f"{root}{VENV}")
    (root / "lpd-relay").write_text(wrapper)
    return root


def installed_cli(root: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return run("sh", root / "lpd-relay", *args, cwd=root)


@package
def test_maintainer_scripts_ran_in_the_root(installed: Path) -> None:
    passwd = (installed / "etc/passwd").read_text()
    assert re.search(r"^lpd-relay:x:\d+:\d+:", passwd, re.M), passwd
    wants = installed / "etc/systemd/system/multi-user.target.wants/lpd-relay.service"
    assert wants.is_symlink()
    status = (installed / "var/lib/dpkg/status").read_text()
    assert re.search(r"^Status: install ok installed$", status, re.M)
    assert re.search(r"^Conffiles:\n /etc/lpd-relay/relay.toml [0-9a-f]{32}$", status, re.M)


@package
def test_installed_relay_runs_from_its_own_venv(installed: Path) -> None:
    assert installed_cli(installed, "--version").stdout.strip() == f"lpd-relay {__version__}"
    where = run(installed / VENV.lstrip("/") / "bin/python3", "-I", "-c",
                "import relay, relay._core, trio; print(relay._core.__file__, trio.__version__)")
    core, trio_version = where.stdout.split()
    assert core.startswith(f"{installed}{VENV}/lib/python3.11/site-packages/relay/_core.")
    assert trio_version == _pins(DEBIAN / "requirements.txt")["trio"]
    checked = installed_cli(installed, "check-config", "-c", installed / "etc/lpd-relay/relay.toml")
    assert ": ok (" in checked.stdout


def _start(root: Path, config: Path) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(["sh", str(root / "lpd-relay"), "serve", "-c", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=root)
    assert proc.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(b.startswith("spool ") for b in banner):
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"installed relay exited {proc.wait(10)}: {banner}")
        banner.append(line.rstrip())
    ports = [m for b in banner if (m := BANNER_PORT.search(b))]
    assert ports, banner
    return proc, int(ports[0].group(2))


def _wait_for_json(folder: Path, timeout: float) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(folder.glob("*.json"))
        if found:
            return found
        time.sleep(0.05)
    return []


@package
def test_job_through_the_installed_relay(installed: Path, tmp_path: Path) -> None:
    config = write_config_file(tmp_path / "relay.toml", relay_config(tmp_path))
    payload = tmp_path / "report.txt"
    payload.write_bytes(b"through the packaged relay\n" * 100)
    proc, port = _start(installed, config)
    try:
        installed_cli(installed, "send", f"lpd://127.0.0.1:{port}/ward3", payload,
                      "--user", "alice", "--title", "report")
        found = _wait_for_json(tmp_path / "out" / "ward3", timeout=20)
        assert len(found) == 1, "the job did not land in the hot folder"
        meta = json.loads(found[0].read_text())
        assert meta["user"] == "alice" and meta["wire_queue"] == "ward3"
        data = Path(meta["files"][0]["path"])
        assert data.read_bytes() == payload.read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


@package
def test_upgrade_remove_and_purge(deb: Path, tmp_path: Path) -> None:
    root = make_root(tmp_path / "root")
    dpkg_root(root, "-i", deb)
    conffile = root / "etc/lpd-relay/relay.toml"
    conffile.write_text(conffile.read_text() + "# edited by the admin\n")
    dpkg_root(root, "-i", deb)   # the same version again: prerm upgrade, postinst configure
    assert conffile.read_text().endswith("# edited by the admin\n")
    (root / "var/lib/lpd-relay/spool").mkdir(parents=True, exist_ok=True)
    dpkg_root(root, "--remove", "lpd-relay")
    assert (root / "etc/lpd-relay/relay.toml").exists()        # remove keeps configuration
    assert (root / "var/lib/lpd-relay/spool").is_dir()          # and the spool
    assert not (root / VENV.lstrip("/")).exists()
    dpkg_root(root, "--purge", "lpd-relay")
    assert not (root / "etc/lpd-relay").exists()
    assert not (root / "var/lib/lpd-relay").exists()
    assert "lpd-relay:" in (root / "etc/passwd").read_text()   # system users stay
