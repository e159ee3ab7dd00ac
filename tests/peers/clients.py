"""The sending programs: LPRng's ``lpr``/``lpq``/``lprm`` and ``rlpr``.

Each call runs the program once, in a private mount namespace with its own
``/etc/hosts`` and ``/etc/resolv.conf`` (LPRng clients also a private
``/etc/lprng``, rlpr a private ``/etc/services``), and returns the finished
``subprocess.CompletedProcess`` for the test to check.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.peers.process import (
    LOOPBACK,
    namespace_argv,
    require_binary,
    require_namespaces,
    write_private_etc,
)

# Client settings that differ from LPRng's defaults, so a refused job fails at
# once instead of after 3 tries 10 s apart; `conf` lines override them.
CLIENT_CONF = ("printcap_path=/etc/lprng/printcap", "lpr_send_try=1")


@functools.cache
def _client_etc() -> Path:
    """A private etc (hosts, resolv.conf) for the clients, made once per process."""
    root = Path(tempfile.mkdtemp(prefix="lpd-relay-peers-"))
    atexit.register(shutil.rmtree, root, True)
    write_private_etc(root)
    return root


@functools.cache
def _client_conf_dir(lines: tuple[str, ...]) -> Path:
    """A private /etc/lprng for the clients holding ``lines`` as lpd.conf."""
    conf = Path(tempfile.mkdtemp(prefix="lprng-", dir=_client_etc()))
    (conf / "printcap").write_text("")
    (conf / "lpd.conf").write_text("\n".join(lines) + "\n")
    return conf


def _run_client(argv: Sequence[str], binds: Mapping[str, Path | str], *,
                stdin: bytes | None, timeout: float) -> subprocess.CompletedProcess[bytes]:
    require_namespaces()
    full = namespace_argv(argv, binds)
    return subprocess.run(full, input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=timeout, check=False)


def _lprng_client(tool: str, args: Sequence[str], *, stdin: bytes | None, timeout: float,
                  conf: Sequence[str]) -> subprocess.CompletedProcess[bytes]:
    path = require_binary(tool)
    etc = _client_etc()
    binds = {"/etc/lprng": _client_conf_dir((*CLIENT_CONF, *conf)),
             "/etc/hosts": etc / "hosts", "/etc/resolv.conf": etc / "resolv.conf"}
    return _run_client([path, *args], binds, stdin=stdin, timeout=timeout)


def lpr(port: int, queue: str, *files: Path | str, stdin: bytes | None = None,
        stream: bool = False, user: str | None = None, title: str | None = None,
        job_name: str | None = None, host: str = LOOPBACK, args: Sequence[str] = (),
        reserved_port: bool = True, conf: Sequence[str] = (),
        timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
    """Send one job with LPRng's ``lpr -P queue@host%port``.

    Several ``files`` make one job with several data files. With no files,
    ``stdin`` is the data: lpr spools it and sends its length, or with
    ``stream`` (``-k``, "kut-through") sends length 0 and data until close.
    As root lpr binds a reserved source port (512-1023, no SO_REUSEADDR);
    ``reserved_port=False`` makes it use an ephemeral one. ``conf`` adds lpd.conf
    lines for the client, e.g. ``"send_data_first"`` or ``"lpr_send_try=3"``.
    """
    argv = ["-P", f"{queue}@{host}%{port}", *(["-k"] if stream else [])]
    for flag, value in (("-U", user), ("-T", title), ("-J", job_name)):
        if value is not None:
            argv += [flag, value]
    argv += [*args, *map(str, files)]
    conf = [*conf, *([] if reserved_port else ["originate_port="])]
    return _lprng_client("lpr", argv, stdin=stdin, timeout=timeout, conf=conf)


def lpq(port: int, queue: str, *, long: bool = False, host: str = LOOPBACK,
        args: Sequence[str] = (), timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
    """Ask for ``queue``'s state with LPRng's ``lpq`` (``long`` adds ``-l``)."""
    argv = ["-P", f"{queue}@{host}%{port}", *(["-l"] if long else []), *args]
    return _lprng_client("lpq", argv, stdin=None, timeout=timeout, conf=())


def lprm(port: int, queue: str, *jobs: str, user: str | None = None, host: str = LOOPBACK,
         args: Sequence[str] = (), timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
    """Remove jobs with LPRng's ``lprm`` (job numbers, user names or ``all``)."""
    argv = ["-P", f"{queue}@{host}%{port}", *(["-U", user] if user else []), *args, *jobs]
    return _lprng_client("lprm", argv, stdin=None, timeout=timeout, conf=())


def rlpr(port: int, queue: str, *files: Path | str, stdin: bytes | None = None,
         user: str | None = None, title: str | None = None, job_name: str | None = None,
         no_bind: bool = False, host: str = LOOPBACK, args: Sequence[str] = (),
         timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
    """Send one job with ``rlpr`` to ``queue`` at ``host:port``.

    rlpr only dials the ``printer`` service port, so it runs with a private
    /etc/services mapping ``printer`` to ``port``. By default (root) it binds a
    source port in 721-731, which may all sit in TIME_WAIT after a busy test;
    ``no_bind`` passes ``--no-bind`` for an ephemeral port.
    """
    path = require_binary("rlpr")
    with tempfile.TemporaryDirectory(prefix="rlpr-etc-") as tmp:
        binds: dict[str, Path | str] = dict(write_private_etc(Path(tmp), printer_port=port))
        argv = [path, f"--printer={queue}@{host}", "--quiet"]
        for flag, value in (("--user", user), ("--title", title), ("--job", job_name)):
            if value is not None:
                argv.append(f"{flag}={value}")
        argv += [*(["--no-bind"] if no_bind else []), *args, *map(str, files)]
        return _run_client(argv, binds, stdin=stdin, timeout=timeout)
