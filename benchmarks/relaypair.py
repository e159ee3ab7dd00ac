"""Relay -> relay forwarding, measured end to end: the helper the benchmarks share.

Relay B takes jobs into its spool (``fsync = "always"``) and writes them to a
``dir://`` hot folder; relay A forwards its queue to ``lpd://B/q`` with no
options (its defaults: origin ports 721-731 when root, batching when it finds
B is an lpd-relay).  The load generator feeds A; the clock stops when B's hot
folder holds every job's metadata file, and every job is checked there once
(count and checksum).  A's and B's CPU come from ``/proc/<pid>/stat``.

A's failed delivery attempts are counted too (its ``/metrics`` at the end of
the round: attempts that did not deliver, by retry reason, and connects that
waited for an origin port): each one costs the queue a backoff of up to a
second, so a slow round with failures says why it was slow, and a failure in
a benchmark is a finding to report, not noise.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import pagecache, sinkcheck
from benchmarks.report import tree_cpu
from relay import _core, client
from relay.loadgen import load, run_load
from relay.uri import parse_destination
from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.peers import free_port
from tests.relayproc import relay_lpq

# B's dir:// queue runs 4 deliveries at once, as the intake rows' relay does.
# With 16, the jobs of each arriving session were split into batches of a
# few jobs, one hot-folder sync each: B spent 1.44 ms of CPU a job instead
# of 0.98 (3 alternating rounds of 5,000 jobs, load average 6.5-9.8).
B_CONCURRENCY = 4


@dataclass(frozen=True, slots=True)
class Attempts:
    """A sender's delivery attempts that did not deliver, from its ``/metrics``."""

    failed: int = 0                  # lpdrelay_delivery_attempts_total, result != ok
    reasons: dict[str, int] = field(default_factory=dict)   # retries by reason
    port_waits: int = 0              # lpdrelay_origin_port_exhausted_total
    connects: int = 0                # pooled connects (lpdrelay_origin_port_wait_seconds_count)

    def describe(self) -> str:
        """``0 failed attempts`` or ``2 failed attempts (reset 2), 1 origin-port wait``."""
        text = f"{self.failed} failed attempt{'s' if self.failed != 1 else ''}"
        if self.reasons:
            text += " (" + ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())) + ")"
        if self.port_waits:
            text += f", {self.port_waits} origin-port wait{'s' if self.port_waits != 1 else ''}"
        return text


@dataclass(frozen=True, slots=True)
class PairResult:
    jobs_per_second: float
    sender_cpu_ms_per_job: float
    loadgen_cpu_ms_per_job: float
    feed_jobs_per_second: float          # the load generator's own rate into A
    attempts: Attempts = field(default_factory=Attempts)   # A's failed attempts


def metrics_url(relay: RelayProcess) -> str:
    """The ``/metrics`` address a relay started with ``metrics=True`` prints last."""
    assert relay.proc is not None and relay.proc.stdout is not None
    line = relay.proc.stdout.readline()     # the banner line after "spool ..."
    match = re.search(r"metrics on (http://\S+)", line)
    assert match, f"no metrics line in the banner: {line!r}"
    return match.group(1)


def failed_attempts(url: str) -> Attempts:
    """A relay's failed delivery attempts so far, from its ``/metrics`` at ``url``."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    failed = waits = connects = 0
    reasons: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "lpdrelay_delivery_attempts_total" and s.labels["result"] != "ok":
                failed += int(s.value)
            elif s.name == "lpdrelay_delivery_retries_total" and s.value:
                reasons[s.labels["reason"]] = reasons.get(s.labels["reason"], 0) + int(s.value)
            elif s.name == "lpdrelay_origin_port_exhausted_total":
                waits += int(s.value)
            elif s.name == "lpdrelay_origin_port_wait_seconds_count":
                connects += int(s.value)
    return Attempts(failed, reasons, waits, connects)


def _config(tmp: Path, name: str, destination: str, fsync: str = "always",
            concurrency: int = 1, port: int = 0, retry: str = "1h",
            metrics: bool = False) -> Path:
    data = relay_config(
        tmp / name, server={"spool_dir": str(tmp / name / "spool"), "fsync": fsync,
                            "max_connections": 2000, "max_connections_per_host": 2000},
        metrics={"listen": "127.0.0.1:0" if metrics else ""},
        log={"format": "json", "level": "warning"},
        retry={"initial": retry, "max": retry},
        queues={"q": {"destinations": [destination], "concurrency": concurrency}})
    data["server"]["listen"] = [f"127.0.0.1:{port}"]
    (tmp / name).mkdir(parents=True, exist_ok=True)
    return write_config_file(tmp / name / "relay.toml", data)


def _wait_delivered(folder: Path, jobs: int, timeout: float) -> None:
    """Until ``folder`` has ``jobs`` jobs; fails after ``timeout``, or a minute with none new."""
    sinkcheck.wait_for_jobs(folder, jobs, timeout=timeout, stall=60)


def _check_sink(folder: Path, jobs: int, payload: bytes) -> None:
    """Every job exactly once and intact: ``jobs`` metadata files, each data file = payload."""
    metas = [n for n in os.listdir(folder) if n.endswith(".json")]
    assert len(metas) == jobs, f"{len(metas)} jobs at the sink, expected {jobs}"
    want = hashlib.sha256(payload).digest()
    datas = [n for n in os.listdir(folder) if not n.endswith(".json") and not n.startswith(".")]
    assert len(datas) == jobs, f"{len(datas)} data files at the sink, expected {jobs}"
    for name in datas:
        assert hashlib.sha256((folder / name).read_bytes()).digest() == want, name


def relay_to_relay(tmp: Path, *, jobs: int, feed_concurrency: int = 16,
                   size: int = 1024, query: str = "", fsync_b: str = "always",
                   b_concurrency: int = B_CONCURRENCY) -> PairResult:
    """Feed ``jobs`` jobs into A -> lpd://B/q``query``; time until all are at B."""
    payload = os.urandom(size)
    out = tmp / "B" / "out"
    b_cfg = _config(tmp, "B", f"dir://{out}", fsync_b, concurrency=b_concurrency)
    # B is up throughout: a failed attempt (the ports 721-731 held by another
    # program on this host) is retried within a second, not after an hour.
    with RelayProcess(b_cfg) as b, RelayProcess(_config(
            tmp, "A", f"lpd://127.0.0.1:{b.port}/q{query}", retry="1s", metrics=True)) as a:
        assert a.proc is not None and b.proc is not None
        a_metrics = metrics_url(a)
        cpu0, lg0 = tree_cpu(a.proc.pid), time.process_time()
        start = time.perf_counter()
        # The load generator's fast path (~0.1 ms of CPU a job, not the trio
        # client's ~0.9): it shares the two cores with A and B.
        sent = load(f"lpd://127.0.0.1:{a.port}/q", jobs=jobs, concurrency=feed_concurrency,
                    size=size, payload=payload)
        lg = time.process_time() - lg0
        assert sent.ok == jobs, sent.failures
        try:
            _wait_delivered(out / "q", jobs, timeout=120 + jobs / 20)
        except TimeoutError as exc:    # say where the jobs are: A's queue as lpq shows it
            raise TimeoutError(f"{exc}; A's lpq: {relay_lpq(a.port)[:400]!r}") from None
        seconds = time.perf_counter() - start
        cpu = tree_cpu(a.proc.pid) - cpu0
        attempts = failed_attempts(a_metrics)
    _check_sink(out / "q", jobs, payload)
    return PairResult(jobs / seconds, cpu / jobs * 1000, lg / jobs * 1000, sent.jobs_per_second,
                      attempts)


def _bindable(port: int) -> bool:
    """Whether ``port`` binds now as the relay's origin-port pool binds it (SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def wait_reserved_ports_bindable(timeout: float = 65.0) -> None:
    """Until ports 721-731 bind again (at most ``timeout``: TIME_WAIT lasts 60 s).

    LPRng binds its source ports (512-1023) without SO_REUSEADDR and closes
    first, so the TIME_WAITs its forwarding leaves on 721-731 refuse every
    bind there, SO_REUSEADDR or not, and cannot be moved off
    (``release_time_wait``).  A relay round right after the baseline then
    failed ~50 attempts, one a second, until they expired (90 jobs/s
    instead of ~300): the baseline's doing, not the relay's.
    """
    deadline = time.monotonic() + timeout
    while not all(_bindable(p) for p in range(721, 732)) and time.monotonic() < deadline:
        time.sleep(0.25)


def _print_waiting(port: int, queue: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(_core.print_waiting(queue))
        s.recv(16)


def drain_cpu(tmp: Path, *, jobs: int, size: int = 1024, query: str = "",
              fsync_b: str = "always") -> tuple[float, float]:
    """The sender alone: (jobs/s, A's CPU ms per job) delivering ``jobs`` already spooled.

    A takes every job while B is down (its queue backs off for an hour);
    then B starts on the port A forwards to, 0x01 wakes A's queue, and A's
    CPU is counted from there until B's hot folder has every job.
    """
    port, out, payload = free_port(), tmp / "B" / "out", os.urandom(size)
    with RelayProcess(_config(tmp, "A", f"lpd://127.0.0.1:{port}/q{query}")) as a:
        assert a.proc is not None
        dest = parse_destination(f"lpd://127.0.0.1:{a.port}/q")
        sent = trio.run(lambda: run_load(dest, jobs=jobs, concurrency=16, size=size,
                                         payload=payload))
        assert sent.ok == jobs, sent.failures
        with RelayProcess(_config(tmp, "B", f"dir://{out}", fsync_b, concurrency=B_CONCURRENCY,
                                  port=port)):
            time.sleep(0.2)   # A's in-flight first attempt has failed and backed off
            cpu0, start = tree_cpu(a.proc.pid), time.perf_counter()
            _print_waiting(a.port, "q")
            _wait_delivered(out / "q", jobs, timeout=120 + jobs / 20)
            seconds = time.perf_counter() - start
            cpu = tree_cpu(a.proc.pid) - cpu0
    _check_sink(out / "q", jobs, payload)
    return jobs / seconds, cpu / jobs * 1000


# --- one large job: into the spool, and forwarded relay -> relay ----------------------

def make_big_file(path: Path, size: int) -> Path:
    """``size`` bytes of random data (1 MiB blocks) at ``path``."""
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(max(1, size >> 20)):
            f.write(block)
    return path


def raw_receiver_mb_s(path: Path, out: Path, *, fsync: bool = True, warm: int = 0) -> float:
    """Baseline: a sender's ``sendfile`` into a receiver doing recv_into + write (+ fsync).

    The clock runs from the connect until the receiver's fsync returned, as
    the relay's runs until its final acknowledgement (after its commit).
    ``warm`` bytes of free memory are made ready first (``benchmarks.pagecache``),
    in the big-job functions below too.
    """
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while n := conn.recv_into(buf):
                os.write(fd, view[:n])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
            conn.close()
            done.set()
    thread = threading.Thread(target=receive, daemon=True)
    thread.start()
    size = path.stat().st_size
    pagecache.warm(out.parent, warm)
    start = time.perf_counter()
    with socket.create_connection(server.getsockname()) as s, open(path, "rb") as f:
        s.sendfile(f)
    done.wait(600)
    seconds = time.perf_counter() - start
    thread.join(10)
    server.close()
    sinkcheck.same_file(out, path)     # the baseline's sink counts too: all bytes, intact
    out.unlink()
    return size / seconds / 1e6


def send_big(uri: str, path: Path) -> float:
    """One job of ``path``'s bytes to ``uri`` (lpd:// or lpds://, sendfile); its MB/s."""
    size = path.stat().st_size
    dest = parse_destination(uri)

    async def main() -> None:
        ch = await client.connect(dest, io_timeout=120)
        try:
            await client.send_job(ch, queue="q", cf_name="cfA001bench",
                                  control=b"Hbench\nPbench\nldfA001bench\n",
                                  files=[client.OutFile(name="dfA001bench", size=size,
                                                        path=str(path))])
        finally:
            await ch.aclose()
    start = time.perf_counter()
    trio.run(main)
    return size / (time.perf_counter() - start) / 1e6


def big_into_spool_mb_s(tmp: Path, path: Path, *, warm: int = 0) -> float:
    """One job of ``path``'s size into a relay (``fsync = "always"``) until its final ack."""
    with RelayProcess(_config(tmp, "B", f"socket://127.0.0.1:{free_port()}")) as b:
        pagecache.warm(tmp, warm)
        start = time.perf_counter()
        send_big(f"lpd://127.0.0.1:{b.port}/q?reserve=none", path)
        rate = path.stat().st_size / (time.perf_counter() - start) / 1e6
    sinkcheck.spooled_big_job(tmp / "B" / "spool", path)
    return rate


def _queued_bytes(port: int) -> int:
    """Total size of the jobs relay ``port``'s lpq lists for queue q (0 when none)."""
    text = relay_lpq(port)
    sizes = [int(m) for m in re.findall(r"(\d+) bytes", text)]
    return sum(sizes)


def big_forwarded_mb_s(tmp: Path, path: Path, *, warm: int = 0) -> float:
    """One spooled job of ``path``'s size, A -> lpd://B/q, until B holds all of it.

    A takes the job while B is down; B (fsync always, its own destination
    down, so the job stays in its queue) starts, 0x01 wakes A, and the clock
    stops when B's lpq lists the job at its full size (B lists a job only
    once committed).
    """
    port, size = free_port(), path.stat().st_size
    with RelayProcess(_config(tmp, "A", f"lpd://127.0.0.1:{port}/q")) as a:
        send_big(f"lpd://127.0.0.1:{a.port}/q?reserve=none", path)
        b_cfg = _config(tmp, "B", f"socket://127.0.0.1:{free_port()}", port=port)
        with RelayProcess(b_cfg) as b:
            time.sleep(0.2)   # A's in-flight first attempt has failed and backed off
            pagecache.warm(tmp, warm)
            start = time.perf_counter()
            _print_waiting(a.port, "q")
            deadline = start + 600
            while _queued_bytes(b.port) < size:
                if time.perf_counter() > deadline:
                    raise TimeoutError("the large job never reached B")
                time.sleep(0.02)
            rate = size / (time.perf_counter() - start) / 1e6
    sinkcheck.spooled_big_job(tmp / "B" / "spool", path)
    return rate
