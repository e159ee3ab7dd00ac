"""The real LPD peers the suite talks to, run privately on loopback.

Real senders and receivers (LPRng's ``lpd``/``lpr``/``lpq``/``lprm``, ``rlpr``,
``p910nd``, ``promtool``) are what lpd-relay must interoperate with, so tests
run them rather than imitations. Each program runs on a free 127.0.0.1 port,
inside a private mount namespace whose bind mounts give it its own
``/etc/lprng``, ``/etc/hosts``, ``/etc/resolv.conf`` and ``/etc/services``:
system files are never touched, and LPRng's two host lookups per job never
wait on DNS (FIELD-NOTES "Running the real peers in tests"). Long-lived peers
also get a private PID namespace, so stopping them by PID ends all they forked.

Every helper skips the calling test (``pytest.skip``) with the reason when a
program, root, or namespace support is missing. ``RecordingLpdServer`` is pure
Python test equipment: an LPD receiver that records every byte and can be
scripted to misbehave the ways real receivers do.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import tty
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import pytest
import trio

LOOPBACK = "127.0.0.1"
# Job-file lengths meaning "data runs until the sender closes" (SPEC §4.2).
_STREAM_LENGTH_MIN = 2**31 - 1
_T = TypeVar("_T")


# --------------------------------------------------------------------------
# What a receiver got
# --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedFile:
    """One data file of a received job.

    ``name`` is the transfer name as it came off the wire (RecordingLpdServer),
    or as LPRng stored it: LPRng renumbers a job whose number is taken and
    writes a digit host as ``ADDR<ip>``, e.g. ``dfA125ADDR10.1.2.3``.
    """

    name: str          # e.g. "dfA123client"
    format: str        # control-file letter that printed it, e.g. "f", "l"
    title: str         # the N line for this file ("" if none)
    data: bytes
    declared_length: int | None = None  # wire length (RecordingLpdServer only)


@dataclass(frozen=True, slots=True, kw_only=True)
class ReceivedJob:
    """A job as a receiver stored it.

    ``control`` maps each upper-case control-file letter to its first value.
    ``raw_control`` is the control file byte for byte where the receiver kept
    it (RecordingLpdServer); LPRng never keeps it: it parses the control file
    into its job ticket ``hfA<n>``, whose text is ``ticket``.
    """

    queue: str
    control: Mapping[str, str]
    files: tuple[ReceivedFile, ...]
    raw_control: bytes | None = None
    control_name: str = ""     # "cfA123client"; for LPRng its ticket name "hfA123"
    ticket: str | None = None
    number: int | None = None  # LPRng's job number (after any renumbering)

    @property
    def user(self) -> str:
        return self.control.get("P", "")

    @property
    def host(self) -> str:
        return self.control.get("H", "")

    @property
    def title(self) -> str:
        return self.control.get("T", "")

    @property
    def job_name(self) -> str:
        return self.control.get("J", "")

    @property
    def data(self) -> bytes:
        """All data files' bytes, in order."""
        return b"".join(f.data for f in self.files)


# --------------------------------------------------------------------------
# Preconditions: ports, binaries, root, namespaces
# --------------------------------------------------------------------------

def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    """Path of ``name`` on PATH (or sbin), else skip the test."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{name} not installed (scripts/install-peers.sh installs it)")
    return path


def require_root(why: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"needs root: {why}")


@functools.cache
def _namespace_problem() -> str | None:
    """Why private mount/PID namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "needs root for private mount namespaces"
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} not installed"
    probe = ["unshare", "--mount", "--propagation", "private",
             "--pid", "--fork", "--kill-child", "true"]
    try:
        res = subprocess.run(probe, capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return "unshare probe timed out"
    if res.returncode != 0:
        return f"unshare failed: {res.stderr.decode(errors='replace').strip()}"
    return None


def require_namespaces() -> None:
    """Skip unless private mount and PID namespaces work (root, unshare)."""
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(problem)


def namespace_argv(argv: Sequence[str], binds: Mapping[str, Path | str], *,
                   pid_namespace: bool = False) -> list[str]:
    """``argv`` wrapped to run with ``binds`` (system path -> our path) mounted.

    The mounts live in a private mount namespace, so nothing outside sees them.
    A system path that does not exist is left alone (mount needs a target;
    glibc treats a missing resolv.conf as "nameserver 127.0.0.1" anyway).
    With ``pid_namespace`` the program is PID 1 of its own PID namespace, so
    killing it ends everything it forked.
    """
    lines = ["set -e"]
    for target, source in binds.items():
        lines.append(f"if [ -e {shlex.quote(target)} ]; then "
                     f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}; fi")
    lines.append('exec "$@"')
    head = ["unshare", "--mount", "--propagation", "private"]
    if pid_namespace:
        head += ["--pid", "--fork", "--kill-child"]
    return [*head, "sh", "-c", "\n".join(lines), "peers-ns", *argv]


def write_private_etc(directory: Path, *, printer_port: int | None = None) -> dict[str, Path]:
    """Write hosts, resolv.conf (and services) into ``directory``; return binds.

    hosts names this machine and localhost on 127.0.0.1 and resolv.conf points
    at 127.0.0.1, so every lookup is answered at once or refused at once.
    ``printer_port`` maps the ``printer`` service there (rlpr dials only it).
    """
    directory.mkdir(parents=True, exist_ok=True)
    name = socket.gethostname()
    (directory / "hosts").write_text(
        f"127.0.0.1 localhost {name} client\n::1 localhost ip6-localhost\n")
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    binds = {"/etc/hosts": directory / "hosts", "/etc/resolv.conf": directory / "resolv.conf"}
    if printer_port is not None:
        (directory / "services").write_text(_services_text(printer_port))
        binds["/etc/services"] = directory / "services"
    return binds


def _services_text(printer_port: int) -> str:
    try:
        lines = Path("/etc/services").read_text().splitlines()
    except OSError:
        lines = []
    kept = [ln for ln in lines if ln.split("#")[0].split()[:1] != ["printer"]]
    return "\n".join([*kept, f"printer\t\t{printer_port}/tcp\t\tspooler"]) + "\n"


# --------------------------------------------------------------------------
# Processes: start, wait for the listener, stop the whole tree by PID
# --------------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    """PIDs of every descendant of ``pid`` (children first found via /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; ppid is the 2nd field after ")".
        ppid = int(stat_line.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        kids = parents.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


# Peers started and not yet stopped, so a test process that ends without
# stopping them (an error between start and stop) still stops them at exit.
_LIVE: set[subprocess.Popen[bytes]] = set()


def start_process(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a peer in its own session, output to ``log_path``.

    Started from the main thread, the peer also gets a parent-death signal
    (``setpriv --pdeathsig``): should the test process die without stopping it,
    the kernel kills it. (That signal fires when the starting *thread* ends,
    so it is not used from worker threads.)
    """
    argv = list(argv)
    if threading.current_thread() is threading.main_thread() and shutil.which("setpriv"):
        argv = ["setpriv", "--pdeathsig", "KILL", *argv]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    _LIVE.add(proc)
    return proc


@atexit.register
def _stop_leftovers() -> None:
    for proc in list(_LIVE):
        stop_process_tree(proc, grace=0.5)


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def stop_process_tree(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """Stop ``proc`` and all its descendants: SIGTERM, then SIGKILL after ``grace``.

    Signals go to the PIDs found under ``proc`` only. A PID-namespace init
    ignores SIGTERM it has no handler for; the SIGKILL step covers it.
    """
    if proc.poll() is None:
        _signal_all([*_descendants(proc.pid), proc.pid], signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_all([*_descendants(proc.pid), proc.pid], signal.SIGKILL)
            proc.wait(timeout=grace)
    # Anything that outlived its parent (re-parented to init): kill it too.
    _signal_all(_descendants(proc.pid), signal.SIGKILL)
    _LIVE.discard(proc)


def _socket_inodes(pids: Sequence[int]) -> set[str]:
    """Inode numbers of the sockets the processes ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    return inodes


def _listening(port: int, pids: Sequence[int]) -> bool:
    """Whether one of ``pids`` listens on TCP ``port`` (read from /proc, no connect).

    Matching the socket's inode, not just the port, tells our program's
    listener from another one that grabbed the port first.
    """
    inodes = _socket_inodes(pids)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if (cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port
                    and cols[9] in inodes):
                return True
    return False


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    """Wait until ``port`` listens; False if ``proc`` exited or time ran out.

    Readiness is read from /proc rather than by connecting, because a probe
    connection would be a job (p910nd) or a log line (lpd) of its own.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _listening(port, [proc.pid, *_descendants(proc.pid)]):
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --------------------------------------------------------------------------
# LPRng lpd
# --------------------------------------------------------------------------

class LprngServer:
    """A private LPRng ``lpd -F`` on 127.0.0.1:<free port>.

    Every queue is a held queue (printcap ``ah``, auto-hold): a received job
    stays in the queue's spool directory as LPRng stored it - its job ticket
    ``hfA<n>`` and its data files under their transfer names - until the test
    ends, so ``wait_jobs`` can read exactly what LPRng accepted. ``queues`` is a
    sequence of names or a mapping name -> extra printcap fields (``"mx=10"``).
    """

    def __init__(self, workdir: Path, queues: Sequence[str] | Mapping[str, str] = ("q",),
                 *, port: int = 0, conf_extra: Sequence[str] = (),
                 startup_timeout: float = 10.0) -> None:
        self.workdir = workdir
        self.queues: dict[str, str] = (dict(queues) if isinstance(queues, Mapping)
                                       else {q: "" for q in queues})
        self.conf_extra = tuple(conf_extra)
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port = port
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "lpd.log"

    def spool_dir(self, queue: str) -> Path:
        """The spool directory LPRng keeps ``queue``'s jobs in."""
        return self.workdir / "spool" / queue

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        """Start lpd. A given port, or the port of an earlier start, is kept
        (a restart after ``stop`` keeps the address and the held jobs)."""
        require_namespaces()
        require_binary("lpd")
        fixed = self.port != 0
        # Another test may grab a free port between our probe and lpd's bind.
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            self._write_config()
            if self._launch():
                return
        raise RuntimeError(f"LPRng lpd did not start on port {self.port}:\n"
                           f"{_tail(self.log_path)}")

    def _launch(self) -> bool:
        etc = self.workdir / "etc"
        binds: dict[str, Path | str] = {"/etc/lprng": etc / "lprng",
                                        **write_private_etc(etc)}
        argv = namespace_argv([require_binary("lpd"), "-F"], binds, pid_namespace=True)
        self._proc = start_process(argv, self.log_path)
        if wait_listening(self._proc, self.port, self.startup_timeout):
            return True
        stop_process_tree(self._proc)
        self._proc = None
        return False

    def _write_config(self) -> None:
        w = self.workdir
        conf_dir = w / "etc" / "lprng"
        for d in (conf_dir, w / "tmp", w / "run", *map(self.spool_dir, self.queues)):
            d.mkdir(parents=True, exist_ok=True)
        conf = [
            f"lpd_listen_port={LOOPBACK}%{self.port}", f"lpd_port={self.port}",
            f"lockfile={w / 'run' / 'lpd'}", f"unix_socket_path={w / 'run' / 'socket'}",
            "printcap_path=/etc/lprng/printcap", "lpd_printcap_path=/etc/lprng/lpd_printcap",
            "perms_path=/etc/lprng/lpd.perms",
            f"default_tmp_dir={w / 'tmp'}", f"server_tmp_dir={w / 'tmp'}",
            # Stay root: the spool sits under the test's private 0700 tmp dir.
            "user=root", "group=root", "done_jobs=0", *self.conf_extra,
        ]
        (conf_dir / "lpd.conf").write_text("\n".join(conf) + "\n")
        (conf_dir / "lpd.perms").write_text("DEFAULT ACCEPT\n")
        (conf_dir / "printcap").write_text("".join(
            f"{q}:sd={self.spool_dir(q)}:lp=/dev/null:sh:mx=0:la@:ar@:ah"
            f"{':' + extra if extra else ''}\n" for q, extra in self.queues.items()))

    def stop(self) -> None:
        """Stop lpd and everything it forked (its PID namespace ends)."""
        if self._proc is not None:
            stop_process_tree(self._proc)
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """What lpd wrote to stderr (its log under ``-F``)."""
        return _tail(self.log_path, 100_000)

    def jobs(self, queue: str) -> list[ReceivedJob]:
        """The complete jobs in ``queue`` now, in arrival order."""
        if queue not in self.queues:
            raise KeyError(f"no queue {queue!r} in this LprngServer: {list(self.queues)}")
        found = []
        for hf in self.spool_dir(queue).glob("hfA*"):
            entry = _read_lprng_job(queue, hf)
            if entry is not None:
                found.append(entry)
        return [job for _, job in sorted(found, key=lambda pair: pair[0])]

    def wait_jobs(self, queue: str, n: int, timeout: float = 10.0) -> list[ReceivedJob]:
        """Wait until ``queue`` holds at least ``n`` complete jobs; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(queue)
            if len(jobs) >= n:
                return jobs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"LPRng queue {queue!r} holds {len(jobs)} of {n} jobs "
                                   f"after {timeout}s; lpd log:\n{_tail(self.log_path)}")
            time.sleep(0.02)


def _parse_ticket(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


def _read_lprng_job(queue: str, hf: Path) -> tuple[tuple[int, int, int], ReceivedJob] | None:
    """One held job from its ticket, or None while LPRng is still receiving it.

    While a job arrives its ticket carries ``incoming_time``; the final ticket
    is written after the data files were renamed to their transfer names.
    """
    try:
        text = hf.read_text(errors="surrogateescape")
    except OSError:
        return None
    t = _parse_ticket(text)
    if not t.get("hf_name") or "incoming_time" in t or "hfdatafiles" not in t:
        return None
    files = []
    for entry in filter(None, t["hfdatafiles"].split("\x01")):
        info = _parse_ticket(entry.replace("\x02", "\n"))
        try:
            data = (hf.parent / info["dftransfername"]).read_bytes()
        except (KeyError, OSError):
            return None
        if len(data) != int(float(info.get("size", "-1"))):
            return None
        files.append(ReceivedFile(name=info["dftransfername"], format=info.get("format", ""),
                                  title=info.get("N", ""), data=data))
    control = {k: v for k, v in t.items() if len(k) == 1 and k.isupper()}
    number = int(t.get("number", "0"))
    order = (int(t.get("job_time", "0"), 0), int(t.get("job_time_usec", "0"), 0), number)
    return order, ReceivedJob(queue=queue, control=control, files=tuple(files),
                              control_name=t["hf_name"], ticket=text, number=number)


# --------------------------------------------------------------------------
# LPRng clients: lpr, lpq, lprm
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# rlpr
# --------------------------------------------------------------------------

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


# --------------------------------------------------------------------------
# p910nd (raw port 9100+N)
# --------------------------------------------------------------------------

class P910nd:
    """``p910nd -d`` (foreground) on 127.0.0.1:9100+N, printing into a pipe we read.

    p910nd only listens on 9100+N for one digit N, so the free N is chosen at
    start (ten candidates; another one is tried if the bind races). Its lock
    file lives under a private /var/lock, so instances never wait on each
    other. The "printer" is a FIFO we drain; with ``bidirectional`` (``-b``)
    it is a raw pty instead, and ``reply`` makes the printer talk back.
    Jobs are split by p910nd's own log line "Finished job: n/m bytes".
    """

    def __init__(self, workdir: Path, *, bidirectional: bool = False,
                 startup_timeout: float = 5.0) -> None:
        self.workdir = workdir
        self.bidirectional = bidirectional
        self.startup_timeout = startup_timeout
        self.host = LOOPBACK
        self.port = 0
        self.log_path = workdir / "p910nd.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self._fds: list[int] = []
        self.device = ""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        require_namespaces()
        require_binary("p910nd")
        require_binary("stdbuf")  # line-buffers p910nd's log so job ends show at once
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "lock" / "p910nd").mkdir(parents=True, exist_ok=True)
        read_fd = self._open_device()
        self._reader = threading.Thread(target=self._drain, args=(read_fd,), daemon=True)
        self._reader.start()
        for n in self._free_numbers():
            if self._launch(n):
                return
        self.stop()
        pytest.skip("no free port among 127.0.0.1:9100-9109 for p910nd")

    def _open_device(self) -> int:
        """Create the printer device; return the fd we read printer output from."""
        if self.bidirectional:
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no CR/LF rewriting: bytes pass unchanged
            self._fds = [master, slave]  # keep the slave open: it holds raw mode
            self.device = os.ttyname(slave)
            os.set_blocking(master, False)
            return master
        fifo = self.workdir / "printer"
        with contextlib.suppress(FileNotFoundError):
            fifo.unlink()
        os.mkfifo(fifo, 0o600)
        self.device = str(fifo)
        # Opened before p910nd starts, so its blocking open for writing succeeds.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        self._fds = [fd]
        return fd

    @staticmethod
    def _free_numbers() -> list[int]:
        candidates = []
        for n in range(10):
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((LOOPBACK, 9100 + n))
                except OSError:
                    continue
            candidates.append(n)
        return candidates

    def _launch(self, n: int) -> bool:
        argv = ["stdbuf", "-oL", require_binary("p910nd"), "-d", "-i", LOOPBACK,
                "-f", self.device, *(["-b"] if self.bidirectional else []), str(n)]
        binds = {"/var/lock": self.workdir / "lock"}
        self._proc = start_process(namespace_argv(argv, binds, pid_namespace=True),
                                   self.log_path)
        self.port = 9100 + n
        if wait_listening(self._proc, self.port, self.startup_timeout):
            return True
        stop_process_tree(self._proc, grace=0.2)
        self._proc = None
        return False

    def _drain(self, fd: int) -> None:
        """Copy printer output into our buffer until stopped (bounded waits)."""
        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:  # pty without a writer reports EIO
                chunk = b""
            if not chunk:
                time.sleep(0.01)  # no writer between jobs: EOF until p910nd reopens
                continue
            with self._lock:
                self._buf += chunk

    def reply(self, data: bytes) -> None:
        """Bidirectional mode: the printer sends ``data`` back to the client."""
        if not self.bidirectional:
            raise RuntimeError("reply() needs P910nd(bidirectional=True)")
        os.write(self._fds[0], data)

    @property
    def received(self) -> bytes:
        """Every byte p910nd has written to the printer so far."""
        with self._lock:
            return bytes(self._buf)

    def finished_jobs(self) -> list[int]:
        """Printer byte counts of the jobs p910nd reports finished, in order."""
        counts = []
        for line in _tail(self.log_path, 1_000_000).splitlines():
            if line.startswith("Finished job:"):
                counts.append(int(line.split(":")[1].split("/")[0]))
        return counts

    def wait_jobs(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """Wait for ``n`` finished connections; return each one's printed bytes."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.finished_jobs()
            data = self.received
            if len(counts) >= n and len(data) >= sum(counts):
                jobs, at = [], 0
                for count in counts:
                    jobs.append(data[at:at + count])
                    at += count
                return jobs
            if time.monotonic() >= deadline:
                raise TimeoutError(f"p910nd finished {len(counts)} of {n} jobs, "
                                   f"{len(data)} bytes; log:\n{_tail(self.log_path)}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop p910nd (by PID, with its namespace), then the reader thread."""
        if self._proc is not None:
            # As its namespace's init without a SIGTERM handler p910nd ignores
            # SIGTERM, and it has nothing to clean up: SIGKILL comes quickly.
            stop_process_tree(self._proc, grace=0.2)
            self._proc = None
        self._stop.set()
        if self._reader is not None:
            self._reader.join(timeout=2)
            self._reader = None
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


# --------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------

def promtool_path() -> str:
    """Path of Prometheus' ``promtool``, else skip the test."""
    return require_binary("promtool")


# --------------------------------------------------------------------------
# RecordingLpdServer: a scriptable LPD receiver in pure Python
# --------------------------------------------------------------------------

REPLY_STEPS = ("job", "control_header", "control_file", "data_header", "data_file")


def lprng_error(code: int, message: str) -> bytes:
    """A refusal the way LPRng sends it: the code byte, one text line."""
    return bytes([code]) + message.encode() + b"\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class LpdScript:
    """How a RecordingLpdServer answers; the default is a well-behaved receiver.

    Reply steps, in protocol order: ``job`` (after ``02 queue``),
    ``control_header``/``data_header`` (after a ``02``/``03`` file line),
    ``control_file``/``data_file`` (after the file's bytes). ``replies`` maps a
    step to the bytes sent there (default ``b"\\x00"``), or to a list of them
    indexed by connection number (the last repeats): ``[b"\\x02", b"\\x00"]``
    refuses the first attempt and accepts every later one.
    """

    replies: Mapping[str, bytes | Sequence[bytes]] = field(default_factory=dict)
    trailing: bytes = b""          # sent after every reply, e.g. b"\n" (stray LF)
    delay: float = 0.0             # seconds before each reply
    silent_at: str | None = None   # at this step: never reply, keep the connection
    close_at: str | None = None    # at this step: close without replying
    close_after_refusal: bool = True   # LPRng closes after a non-zero reply
    queues: frozenset[str] | None = None   # None: any queue; else others get 0x01
    status_text: bytes = b"no entries\n"   # answer to 03/04 (lpq)
    remove_text: bytes = b""               # answer to 05 (lprm)

    def reply(self, step: str, connection: int) -> bytes:
        value = self.replies.get(step, b"\x00")
        if isinstance(value, bytes):
            return value
        return value[min(connection, len(value) - 1)]


@dataclass(slots=True, kw_only=True)
class RecordedConnection:
    """One inbound connection: every byte received and every reply sent."""

    index: int
    peer: tuple[str, int]
    data: bytearray = field(default_factory=bytearray)
    replies: list[tuple[str, bytes]] = field(default_factory=list)
    command: int | None = None   # first byte: 1 print, 2 job, 3/4 lpq, 5 lprm
    queue: str = ""
    ended: str = ""              # "eof", "closed", "reset", "idle", "stopped", "error ..."


@dataclass(slots=True, kw_only=True)
class _WireFile:
    kind: str                # "control" | "data"
    name: str
    declared: int
    data: bytes
    acked: bool


class _SessionEnd(Exception):
    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class _Session:
    """One connection to the RecordingLpdServer (blocking socket, own thread)."""

    def __init__(self, server: RecordingLpdServer, sock: socket.socket,
                 record: RecordedConnection) -> None:
        self.server, self.sock, self.rec = server, sock, record
        self.script = server.script
        self.buf = bytearray()

    def _fill(self) -> bool:
        """Receive more bytes; False at EOF. Bounded by stop and idle timeout."""
        deadline = time.monotonic() + self.server.idle_timeout
        while not self.server.stopping.is_set():
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise _SessionEnd("idle") from None
                continue
            except OSError as exc:
                raise _SessionEnd("reset") from exc
            if chunk:
                self.buf += chunk
                with self.server.lock:
                    self.rec.data += chunk
            return bool(chunk)
        raise _SessionEnd("stopped")

    def read_line(self) -> str | None:
        """One command line without LF (and CR); None at EOF."""
        while b"\n" not in self.buf:
            if not self._fill():
                return None
        line, _, rest = bytes(self.buf).partition(b"\n")
        self.buf = bytearray(rest)
        return line.rstrip(b"\r").decode("latin-1")

    def read_exact(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        data, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return data

    def read_to_eof(self) -> bytes:
        while self._fill():
            pass
        data, self.buf = bytes(self.buf), bytearray()
        return data

    def send(self, data: bytes) -> None:
        # The short receive timeout (to notice stop) must not cut a send short.
        self.sock.settimeout(self.server.idle_timeout)
        try:
            self.sock.sendall(data)
        finally:
            self.sock.settimeout(0.1)

    def answer(self, step: str) -> bool:
        """Reply at ``step`` as scripted; True if the reply was an ack (0x00)."""
        if step == self.script.close_at:
            raise _SessionEnd("closed")
        if step == self.script.silent_at:
            self.read_to_eof()  # keep recording until the peer gives up
            raise _SessionEnd("eof")
        reply = self.script.reply(step, self.rec.index)
        if self.server.stopping.wait(self.script.delay):
            raise _SessionEnd("stopped")
        if reply:
            self.send(reply + self.script.trailing)
            with self.server.lock:
                self.rec.replies.append((step, reply))
        if reply[:1] not in (b"", b"\x00") and self.script.close_after_refusal:
            raise _SessionEnd("closed")
        return reply[:1] == b"\x00"

    def run(self) -> None:
        line = self.read_line()
        if not line:
            raise _SessionEnd("eof")
        self.rec.command, self.rec.queue = ord(line[0]), line[1:].split(" ")[0]
        if self.rec.command == 2:
            self.receive_job()
        elif self.rec.command in (3, 4):
            self.send(self.script.status_text)
        elif self.rec.command == 5:
            self.send(self.script.remove_text)
        raise _SessionEnd("closed")

    def receive_job(self) -> None:
        files: list[_WireFile] = []
        try:
            if self.script.queues is not None and self.rec.queue not in self.script.queues:
                self.send(lprng_error(1, f"queue {self.rec.queue} does not exist"))
                return
            if self.answer("job"):
                self._receive_files(files)
        finally:
            self.server.add_jobs(self.rec.queue, files)

    def _receive_files(self, files: list[_WireFile]) -> None:
        while (line := self.read_line()) is not None:
            if line[:1] == "\x01":     # abort: forget this session's files
                files.clear()
                continue
            if line[:1] not in ("\x02", "\x03"):
                raise _SessionEnd(f"error: unexpected subcommand {line[:20]!r}")
            kind = "control" if line[0] == "\x02" else "data"
            length_text, _, name = line[1:].partition(" ")
            length = int(length_text)
            if not self.answer(f"{kind}_header"):
                continue
            data = self._read_file(length)
            if data is None:
                raise _SessionEnd("eof")  # truncated: the job never completes
            acked = self.answer(f"{kind}_file")
            files.append(_WireFile(kind=kind, name=name, declared=length, data=data,
                                   acked=acked))

    def _read_file(self, length: int) -> bytes | None:
        """A file's bytes; a 0 or huge length means "until the sender closes"."""
        if length == 0 or length >= _STREAM_LENGTH_MIN:
            return self.read_to_eof()  # kept raw, a final NUL (if sent) included
        data = self.read_exact(length)
        if data is None:
            return None
        end = self.read_exact(1)   # the NUL; LPRng-style senders may close instead
        if end not in (None, b"\x00"):
            self.buf[:0] = end
        return data


def _parse_control(raw: bytes) -> tuple[dict[str, str], list[tuple[str, str]], list[str]]:
    """Upper-case letters, (format, data file) pairs and N titles of a control file."""
    control: dict[str, str] = {}
    printed: list[tuple[str, str]] = []
    titles: list[str] = []
    for line in raw.rstrip(b"\x00").decode("latin-1").splitlines():
        line = line.rstrip("\r")
        if not line:
            continue
        letter, value = line[0], line[1:]
        if letter == "N":
            titles.append(value)
        elif letter.isupper():
            control.setdefault(letter, value)
        elif letter.islower() and value not in (name for _, name in printed):
            printed.append((letter, value))
    return control, printed, titles


def _assemble_jobs(queue: str, files: Sequence[_WireFile]) -> list[ReceivedJob]:
    """Group acknowledged files into jobs: each control file with the data it names."""
    controls = [f for f in files if f.kind == "control" and f.acked]
    data = {f.name: f for f in files if f.kind == "data" and f.acked}
    jobs = []
    for cf in controls:
        control, printed, titles = _parse_control(cf.data)
        if not all(name in data for _, name in printed):
            continue  # a named data file never arrived: not a complete job
        got = tuple(ReceivedFile(name=name, format=fmt, data=data[name].data,
                                 title=titles[i] if i < len(titles) else "",
                                 declared_length=data[name].declared)
                    for i, (fmt, name) in enumerate(printed))
        jobs.append(ReceivedJob(queue=queue, control=control, files=got,
                                raw_control=cf.data, control_name=cf.name))
    return jobs


class RecordingLpdServer:
    """A pure-Python LPD receiver on a free loopback port, for misbehaving peers.

    It records every byte of every connection (``connections``, ``received``)
    and the jobs it acknowledged completely (``jobs``), answering as ``script``
    says (see LpdScript). It runs in its own threads, so trio tests use it as is
    and wait with ``await wait_jobs_async(n)``. ``script`` may be replaced
    between connections.
    """

    def __init__(self, script: LpdScript | None = None, *, host: str = LOOPBACK,
                 port: int = 0, idle_timeout: float = 30.0) -> None:
        self.script = script or LpdScript()
        self.host = host
        self.port = port
        self.idle_timeout = idle_timeout
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self._connections: list[RecordedConnection] = []
        self._jobs: list[ReceivedJob] = []
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        # A fixed port may be reused right after an earlier server closed it.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((self.host, self.port))
        self._listener.listen(128)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept_loop, self._listener)

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self.lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self.stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                rec = RecordedConnection(index=len(self._connections), peer=peer[:2])
                self._connections.append(rec)
            self._spawn(self._serve, conn, rec)

    def _serve(self, conn: socket.socket, rec: RecordedConnection) -> None:
        conn.settimeout(0.1)
        try:
            _Session(self, conn, rec).run()
        except _SessionEnd as end:
            how = end.how
        except (OSError, ValueError, IndexError) as exc:
            how = f"error {exc!r}"
        finally:
            conn.close()
        with self.lock:
            rec.ended = how

    def add_jobs(self, queue: str, files: Sequence[_WireFile]) -> None:
        jobs = _assemble_jobs(queue, files)
        with self.lock:
            self._jobs += jobs

    def stop(self) -> None:
        """Close the listener and every connection thread (bounded joins)."""
        self.stopping.set()
        if self._listener is not None:
            self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=2)

    @property
    def connections(self) -> list[RecordedConnection]:
        with self.lock:
            return list(self._connections)

    @property
    def jobs(self) -> list[ReceivedJob]:
        with self.lock:
            return list(self._jobs)

    @property
    def received(self) -> bytes:
        """Every byte received, connection after connection."""
        with self.lock:
            return b"".join(bytes(c.data) for c in self._connections)

    def wait_jobs(self, n: int, timeout: float = 10.0) -> list[ReceivedJob]:
        """Block until ``n`` complete jobs were acknowledged; return them all."""
        return self._wait(lambda: self.jobs, n, timeout, "jobs")

    def wait_connections(self, n: int, timeout: float = 10.0) -> list[RecordedConnection]:
        """Block until ``n`` connections have ended; return them all."""
        return self._wait(lambda: [c for c in self.connections if c.ended], n, timeout,
                          "ended connections")

    def _wait(self, get: Callable[[], list[_T]], n: int, timeout: float,
              what: str) -> list[_T]:
        deadline = time.monotonic() + timeout
        while len(items := get()) < n:
            if time.monotonic() >= deadline or self.stopping.is_set():
                raise TimeoutError(f"{len(items)} of {n} {what} after {timeout}s; "
                                   f"received {self.received[:300]!r}")
            time.sleep(0.01)
        return items

    async def wait_jobs_async(self, n: int) -> list[ReceivedJob]:
        """``wait_jobs`` for trio tests; bound it with ``trio.fail_after``.

        The waiting happens in a worker thread that trio abandons on
        cancellation; that thread ends by itself within 60 s or at ``stop``.
        """
        return await trio.to_thread.run_sync(self.wait_jobs, n, 60.0, abandon_on_cancel=True)


# --------------------------------------------------------------------------
# Fixtures: use with `pytest_plugins = ("tests.peers",)` in the root conftest,
# or build the objects above directly in a `with` block.
# --------------------------------------------------------------------------

@pytest.fixture
def lprng_server(tmp_path: Path) -> Iterator[LprngServer]:
    """A private LPRng lpd with held queues ``q`` and ``Ward3``."""
    with LprngServer(tmp_path / "lprng", queues=("q", "Ward3")) as server:
        yield server


@pytest.fixture
def make_lprng_server(tmp_path: Path) -> Iterator[Callable[..., LprngServer]]:
    """Factory: ``make_lprng_server(queues, **options)``; all stopped at teardown."""
    with contextlib.ExitStack() as stack:
        def make(queues: Sequence[str] | Mapping[str, str] = ("q",),
                 **options: Any) -> LprngServer:
            workdir = Path(tempfile.mkdtemp(prefix="lprng-", dir=tmp_path))
            return stack.enter_context(LprngServer(workdir, queues, **options))
        yield make


@pytest.fixture
def recording_lpd() -> Iterator[RecordingLpdServer]:
    """A well-behaved RecordingLpdServer; set ``.script`` to make it misbehave."""
    with RecordingLpdServer() as server:
        yield server


@pytest.fixture
def p910nd_printer(tmp_path: Path) -> Iterator[P910nd]:
    """A p910nd raw printer on 127.0.0.1:9100+N printing into a pipe."""
    with P910nd(tmp_path / "p910nd") as printer:
        yield printer


# --------------------------------------------------------------------------
# TIME_WAIT hygiene for the reserved ports
# --------------------------------------------------------------------------

def time_wait_pairs() -> set[tuple[int, int]]:
    """(local port, remote port) of every IPv4 TIME_WAIT socket (state 06)."""
    pairs = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "06":
            pairs.add((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)))
    return pairs


def release_time_wait(ports: range, remote_port: int, host: str = LOOPBACK) -> None:
    """Move our TIME_WAITs from ``ports`` to ``host:remote_port`` onto the other side.

    After a test whose sender closed first, reserved ports stay in TIME_WAIT
    for 60 s and programs that bind them without SO_REUSEADDR (LPRng, rlpr)
    fail.  Reusing each pair once (Linux allows it for our own TIME_WAIT with
    SO_REUSEADDR and timestamps) with a listener that closes first leaves the
    TIME_WAIT on the listener's port instead.  Call it after the real
    receiver on ``remote_port`` has stopped.
    """
    pending = sorted(p for p, r in time_wait_pairs() if r == remote_port and p in ports)
    if not pending:
        return
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, remote_port))
        listener.listen(len(pending))
        listener.settimeout(5)
        for local in pending:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.settimeout(5)
                try:
                    s.bind((host, local))
                    s.connect((host, remote_port))
                except OSError:
                    continue          # not reusable after all: it simply expires
                conn, _ = listener.accept()
                conn.close()          # the listener's FIN first
                s.recv(1)
