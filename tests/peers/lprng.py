"""A private LPRng ``lpd`` as the receiver, and reading the jobs it held.

Every queue holds its jobs (printcap ``ah``), so what LPRng accepted is read
back from its spool: the job ticket ``hfA<n>`` and the data files it names.
lpd runs as PID 1 of its own PID namespace with a private ``/etc/lprng``.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.peers.process import (
    LOOPBACK,
    Service,
    free_port,
    log_tail,
    namespace_argv,
    require_binary,
    require_namespaces,
    start_listening,
    write_private_etc,
)
from tests.peers.received import ReceivedFile, ReceivedJob


class LprngServer(Service):
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
                           f"{log_tail(self.log_path)}")

    def _launch(self) -> bool:
        etc = self.workdir / "etc"
        binds: dict[str, Path | str] = {"/etc/lprng": etc / "lprng",
                                        **write_private_etc(etc)}
        argv = namespace_argv([require_binary("lpd"), "-F"], binds, pid_namespace=True)
        self._proc = start_listening(argv, self.log_path, self.port, self.startup_timeout)
        return self._proc is not None

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
        self._stop_process()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        """What lpd wrote to stderr (its log under ``-F``)."""
        return log_tail(self.log_path, 100_000)

    def _tickets(self, queue: str) -> list[Path]:
        """The job tickets in ``queue``'s spool directory, complete jobs or not."""
        if queue not in self.queues:
            raise KeyError(f"no queue {queue!r} in this LprngServer: {list(self.queues)}")
        return list(self.spool_dir(queue).glob("hfA*"))

    def jobs(self, queue: str) -> list[ReceivedJob]:
        """The complete jobs in ``queue`` now, in arrival order."""
        found = []
        for hf in self._tickets(queue):
            entry = _read_lprng_job(queue, hf)
            if entry is not None:
                found.append(entry)
        return [job for _, job in sorted(found, key=lambda pair: pair[0])]

    def wait_jobs(self, queue: str, n: int, timeout: float = 10.0) -> list[ReceivedJob]:
        """Wait until ``queue`` holds at least ``n`` complete jobs; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            # A complete job is read from its ticket, so there are never fewer
            # tickets than complete jobs: reading the jobs (each ticket and data
            # file whole) waits until there are n tickets at least.
            if len(self._tickets(queue)) >= n:
                jobs = self.jobs(queue)
                if len(jobs) >= n:
                    return jobs
            if time.monotonic() >= deadline:
                held = len(self.jobs(queue))
                raise TimeoutError(f"LPRng queue {queue!r} holds {held} of {n} jobs "
                                   f"after {timeout}s; lpd log:\n{log_tail(self.log_path)}")
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
