"""A full disk during an outage, for real: the spool on a 2 MiB tmpfs that another
process fills to the last byte while the destination is down, in both orders
(full while the relay runs, then kill -9 and a restart on the still-full disk;
full before it starts).  The relay must stay up, answer lpq and lprm, refuse
new jobs with 0x02 and a line, keep its retry bookkeeping, start on the full
disk, drain when the destination returns, and take new jobs again by itself
(docs/spool.md, "A full disk").

Retries wait an hour; each attempt is asked for with 0x01 (which resets the
backoff, SPEC §4.1), so the test decides when attempts happen: two workers
try jobs 0 and 1 — job 0 has a .state from before the disk filled (written in
place), job 1 gets its first one on the full disk (kept in memory)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.daemon import relay_config, write_config_file
from tests.lpdwire import Job, Wire, send_job
from tests.relayproc import LoggedRelay, PrivateTmpfs, wait_until
from tests.test_recovery import closed_port
from tests.test_removal import reserved_wire

pytestmark = pytest.mark.root

PAYLOAD = 100_000   # bytes per job: five fill a quarter of the tmpfs
# 0x01 from a reserved source port (as root), a fresh one each time: no TIME_WAIT clash.
class Printer:
    """A socket:// printer on ``port`` that takes each job to EOF, then closes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.jobs: list[bytes] = []
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            with conn:
                conn.settimeout(30)
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                self.jobs.append(bytes(data))

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[PrivateTmpfs]:
    fs = PrivateTmpfs(tmp_path / "spool", "2m")
    yield fs
    fs.close()


def config(tmp_path: Path, port: int, *, stuck: bool = False) -> Path:
    queues = {"q": {"destinations": [f"socket://127.0.0.1:{port}"], "concurrency": 2}}
    if stuck:   # every job held at once: `false` exits 1 (SPEC §3.3)
        queues["stuck"] = {"destinations": ["cmd:false"]}
    data = relay_config(tmp_path, metrics={"listen": ""},
                        retry={"initial": "1h", "max": "1h", "give_up_after": "24h"},
                        queues=queues)
    return write_config_file(tmp_path / "relay.toml", data)


def payload(i: int) -> bytes:
    return (f"job {i} ".encode() * PAYLOAD)[:PAYLOAD]


def lpq_ids(relay: LoggedRelay) -> list[str]:
    with Wire(relay.port) as w:
        w.send(b"\x04q\n")
        text = w.read_all().decode()
    return [line.rsplit(" ", 1)[1] for line in text.splitlines() if "spool id" in line]


def cli_list(fs: PrivateTmpfs, cfg: Path) -> list[str]:
    """The job ids ``lpd-relay spool list`` prints, run inside the namespace."""
    res = subprocess.run([*fs.wrapper, sys.executable, "-m", "relay", "spool", "list",
                          "-c", str(cfg)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return [line.split()[0] for line in res.stdout.splitlines() if line[:1].isdigit()
            and " job(s)" not in line]


def refused_full(relay: LoggedRelay) -> bytes:
    """A new job's first answer on the full disk (the whole answer, code first)."""
    with Wire(relay.port) as w:
        w.send(b"\x02q\n")
        return w.read_all()


def failures(relay: LoggedRelay) -> int:
    return len(relay.events("delivery_failed"))


def attempt_now(relay: LoggedRelay, n: int = 2) -> None:
    """0x01: try the queue now; wait for ``n`` more failed attempts."""
    before = failures(relay)
    with reserved_wire(relay.port) as w:
        w.send(b"\x01q\n")
        assert w.reply() == 0
    wait_until(lambda: failures(relay) >= before + n)


def attempts_on_disk(fs: PrivateTmpfs, job_id: str) -> int | None:
    """The attempt count in the job's .state (None: no .state file)."""
    path = fs.inside(fs.path / "jobs" / f"{job_id}.state")
    return int(orjson.loads(path.read_bytes())["attempts"]) if path.exists() else None


def spool_jobs(fs: PrivateTmpfs) -> list[str]:
    return sorted(p.name for p in fs.inside(fs.path / "jobs").iterdir() if p.suffix == ".json")


def test_full_while_running_then_kill9_and_restart_on_the_full_disk(
        tmp_path: Path, tmpfs: PrivateTmpfs) -> None:
    t0 = time.monotonic()
    timeline: dict[str, float] = {}
    port = closed_port()
    cfg = config(tmp_path, port)
    relay = LoggedRelay(cfg, wrapper=tmpfs.wrapper).start()
    printer = None
    try:
        assert all(r == 0 for r in send_job(relay.port, Job(number="000", files=[payload(0)])))
        wait_until(lambda: failures(relay) == 1)   # job 0 failed once: it has a .state
        for i in range(1, 5):
            assert all(r == 0 for r in send_job(relay.port, Job(number=f"{i:03d}",
                                                               files=[payload(i)])))
        ids = lpq_ids(relay)
        assert len(ids) == 5 and attempts_on_disk(tmpfs, ids[0]) == 1
        tmpfs.fill()
        timeline["disk full"] = time.monotonic() - t0
        # Failed attempts go on, their bookkeeping with no byte free to write:
        # job 0's in place, job 1's (its first) kept in memory.
        for _ in range(3):
            attempt_now(relay)
        assert attempts_on_disk(tmpfs, ids[0]) == 4
        assert attempts_on_disk(tmpfs, ids[1]) is None
        assert [e["job"] for e in relay.events("spool_write_deferred")] == [ids[1]]
        assert relay.alive() and lpq_ids(relay) == ids == cli_list(tmpfs, cfg)
        answer = refused_full(relay)
        assert answer.startswith(b"\x02lpd-relay: ") and b"disk" in answer, answer
        # lprm answers and removes, freeing space; something else takes it again.
        with Wire(relay.port) as w:
            w.send(b"\x05q alice 004\n")
            assert b"dequeued" in w.read_all()
        assert lpq_ids(relay) == ids[:4]
        tmpfs.fill("filler2")
        assert relay.alive() and not relay.tracebacks()
        timeline["checked while full"] = time.monotonic() - t0
        # The lprm freed space for a moment: a retry in it may have saved job 1's count.
        on_disk = attempts_on_disk(tmpfs, ids[1])
        relay.kill9()
        assert tmpfs.free() == 0
        relay = LoggedRelay(cfg, wrapper=tmpfs.wrapper).start()
        timeline["restarted on the full disk"] = time.monotonic() - t0
        assert any("4 job(s) recovered" in line for line in relay.banner), relay.banner
        assert lpq_ids(relay) == ids[:4]
        # The start tries jobs 0 and 1 once more.  What the crash cost: job 1's
        # retry count kept only in memory (the count on disk, if any, stays); no job.
        wait_until(lambda: failures(relay) >= 2)
        assert (attempts_on_disk(tmpfs, ids[0]), attempts_on_disk(tmpfs, ids[1])) == (5, on_disk)
        assert refused_full(relay).startswith(b"\x02lpd-relay: ")
        printer = Printer(port)
        timeline["destination up"] = time.monotonic() - t0
        with reserved_wire(relay.port) as w:
            w.send(b"\x01q\n")
            assert w.reply() == 0
        wait_until(lambda: len(printer.jobs) >= 4 and not spool_jobs(tmpfs))
        timeline["drained"] = time.monotonic() - t0
        assert sorted(printer.jobs) == [payload(i) for i in range(4)]
        assert tmpfs.free() >= 4 * PAYLOAD
        # Intake resumes by itself: nothing was restarted or cleaned up.
        assert all(r == 0 for r in send_job(relay.port, Job(number="005", files=[b"again\n"])))
        wait_until(lambda: len(printer.jobs) == 5)
        timeline["new job delivered"] = time.monotonic() - t0
        assert printer.jobs[4] == b"again\n" and relay.alive()
        assert not relay.tracebacks()
    finally:
        relay.kill9() if relay.alive() else None
        if printer is not None:
            printer.close()
    print("full-disk timeline (s):", {k: round(v, 2) for k, v in timeline.items()})


def test_full_before_start_starts_lists_releases_and_drains(
        tmp_path: Path, tmpfs: PrivateTmpfs) -> None:
    port = closed_port()
    cfg = config(tmp_path, port, stuck=True)
    relay = LoggedRelay(cfg, wrapper=tmpfs.wrapper).start()
    try:
        for i in range(3):
            assert all(r == 0 for r in send_job(relay.port, Job(number=f"{i:03d}",
                                                               files=[payload(i)])))
        assert all(r == 0 for r in send_job(relay.port, Job(queue="stuck", number="100")))
        wait_until(lambda: relay.events("job_held"))
    finally:
        assert relay.terminate() == 0
    tmpfs.fill()
    relay = LoggedRelay(cfg, wrapper=tmpfs.wrapper).start()
    printer = None
    try:
        assert any("4 job(s) recovered" in line for line in relay.banner), relay.banner
        # No id block could be reserved: it started anyway, and refuses intake.
        wait_until(lambda: relay.events("spool_ids_not_reserved"))
        assert len(lpq_ids(relay)) == 3
        assert refused_full(relay).startswith(b"\x02lpd-relay: ")
        attempt_now(relay)
        # `spool retry` cannot write on the full disk; the daemon releases the
        # job itself, tries it, and holds it again (in place: attempts 2).
        held = [i for i in cli_list(tmpfs, cfg) if i not in lpq_ids(relay)]
        res = subprocess.run([*tmpfs.wrapper, sys.executable, "-m", "relay", "spool", "retry",
                              held[0], "-c", str(cfg)], capture_output=True, text=True,
                             timeout=60, check=False)
        assert res.returncode == 0, res.stdout + res.stderr
        wait_until(lambda: relay.events("job_held"))
        assert attempts_on_disk(tmpfs, held[0]) == 2
        assert relay.alive()
        printer = Printer(port)
        with reserved_wire(relay.port) as w:
            w.send(b"\x01q\n")
            assert w.reply() == 0
        wait_until(lambda: len(printer.jobs) >= 3 and spool_jobs(tmpfs) == [f"{held[0]}.json"])
        assert sorted(printer.jobs) == [payload(i) for i in range(3)]
        assert all(r == 0 for r in send_job(relay.port, Job(number="003", files=[b"more\n"])))
        wait_until(lambda: len(printer.jobs) == 4)
        assert not relay.tracebacks()
    finally:
        relay.kill9() if relay.alive() else None
        if printer is not None:
            printer.close()
