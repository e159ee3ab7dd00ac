"""``lpd-relay loadgen``: bounded LPD load with rates and latencies (SPEC §8).

Sends ``--jobs`` jobs of ``--size`` bytes over ``--concurrency`` connections
at once (one job per connection, as real senders do) to an ``lpd://`` or
``lpds://`` URI and reports jobs/s, MB/s, latency p50/p99, failures by reply
code, and its own CPU per job (user + system, every process, the system part
too), so a result near the generator's own limit shows as such.  The
command runs the fast path (``relay.loadgenfast``: plain jobs in a compiled
epoll loop, ~0.1 ms of CPU a 1 KiB job, most of it the kernel's loopback
TCP); ``run_load`` is the same load on trio for callers already inside an
event loop.  ``--processes N`` splits the jobs and the connections
over N forked processes.  Every run is bounded in count and by a per-job
timeout, and stops by itself.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import trio

from relay import client, progress
from relay.client import short_hostname
from relay.errors import SinkError
from relay.loadgenfast import run_fast
from relay.units import parse_size
from relay.uri import Destination, parse_destination


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadResult:
    jobs: int
    ok: int
    seconds: float
    bytes: int
    latencies: tuple[float, ...]        # seconds, successful jobs, sorted
    failures: dict[str, int]            # "0x02", "closed", "timeout", ...
    cpu_seconds: float = 0.0            # the generator's own CPU, all its processes
    cpu_system_seconds: float = 0.0     # the kernel's part of it (loopback: the peer's too)
    processes: int = 1

    @property
    def cpu_ms_per_job(self) -> float:
        return self.cpu_seconds / self.jobs * 1000 if self.jobs else 0.0

    @property
    def cpu_system_ms_per_job(self) -> float:
        return self.cpu_system_seconds / self.jobs * 1000 if self.jobs else 0.0

    @property
    def jobs_per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6 if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        index = min(len(self.latencies) - 1, round(p / 100 * (len(self.latencies) - 1)))
        return self.latencies[index]

    def summary(self) -> dict[str, object]:
        return {"jobs": self.jobs, "ok": self.ok, "seconds": round(self.seconds, 3),
                "jobs_per_second": round(self.jobs_per_second, 1),
                "mb_per_second": round(self.mb_per_second, 2),
                "p50_ms": round(self.percentile(50) * 1000, 2),
                "p99_ms": round(self.percentile(99) * 1000, 2),
                "loadgen_cpu_ms_per_job": round(self.cpu_ms_per_job, 3),
                "loadgen_cpu_system_ms_per_job": round(self.cpu_system_ms_per_job, 3),
                "processes": self.processes, "failures": self.failures}


def _failure_key(exc: BaseException) -> str:
    text = str(exc)
    marker = text.find("answered 0x")
    if marker >= 0:
        return text[marker + 9:marker + 13]
    if isinstance(exc, trio.TooSlowError):
        return "timeout"
    if "closed" in text:
        return "closed"
    return "refused" if "connect" in text else "error"


async def run_load(dest: Destination, *, jobs: int, concurrency: int, size: int,
                   mode: str = "count", io_timeout: float = 30.0,
                   payload: bytes | None = None, first: int = 0,
                   done: Callable[[], object] | None = None) -> LoadResult:
    """Send ``jobs`` jobs, at most ``concurrency`` at once; ``done()`` after each one.

    Jobs are numbered from ``first`` (their titles and control-file names).
    """
    cpu = _process_cpu()
    data = make_payload(size, payload)
    ctx = client.tls_context(dest) if dest.scheme == "lpds" else None
    host = short_hostname()
    document = client.OutFile(name="loadgen", size=len(data), data=data)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    limiter = trio.CapacityLimiter(concurrency)

    async def one(n: int) -> None:
        try:
            await attempt(n)
        finally:
            if done is not None:
                done()

    async def attempt(n: int) -> None:
        async with limiter:
            cf_name, control, files = client.build_job(
                [document], user="loadgen", title=f"load {n}", host=host, number=n)
            start = time.perf_counter()
            try:
                ch = await client.connect(dest, io_timeout=io_timeout, ctx=ctx)
                try:
                    await client.send_job(
                        ch, queue=dest.path, cf_name=cf_name, control=control, files=files,
                        mode=mode, order=dest.order)
                finally:
                    await ch.aclose()
            except (SinkError, OSError, trio.TooSlowError) as exc:
                failures[_failure_key(exc)] += 1
                return
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for n in range(first, first + jobs):
            nursery.start_soon(one, n)
    seconds = time.perf_counter() - started
    total, system = (a - b for a, b in zip(_process_cpu(), cpu, strict=True))
    return LoadResult(jobs=jobs, ok=len(latencies), seconds=seconds,
                      bytes=len(latencies) * len(data), latencies=tuple(sorted(latencies)),
                      failures=dict(failures), cpu_seconds=total, cpu_system_seconds=system)


def _process_cpu() -> tuple[float, float]:
    """This process's CPU seconds so far, and the system (kernel) part of them."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def make_payload(size: int, payload: bytes | None = None) -> bytes:
    """A job's data: ``payload`` cut or padded to ``size``, else random MiBs repeated."""
    data = payload if payload is not None else os.urandom(min(size, 1 << 20)) * \
        (size // (1 << 20) or 1)
    return data[:size].ljust(size, b"x")


def load(uri: str, *, jobs: int, concurrency: int, size: int, mode: str = "count",
         first: int = 0, io_timeout: float = 30.0, payload: bytes | None = None,
         done: Callable[[], object] | None = None) -> LoadResult:
    """The fast path in this process: ``jobs`` jobs to ``uri`` (lpd:// or lpds://)."""
    dest = parse_destination(uri)
    ctx = client.tls_context(dest) if dest.scheme == "lpds" else None
    return run_fast(dest, jobs=jobs, concurrency=concurrency, data=make_payload(size, payload),
                    mode=mode, io_timeout=io_timeout, first=first, ctx=ctx, done=done)


def _one_process(uri: str, jobs: int, concurrency: int, size: int, mode: str,
                 first: int) -> LoadResult:
    return load(uri, jobs=jobs, concurrency=concurrency, size=size, mode=mode, first=first)


def run_load_processes(uri: str, *, jobs: int, concurrency: int, size: int,
                       mode: str = "count", processes: int = 2) -> LoadResult:
    """``load`` split over ``processes`` forked processes; one merged result.

    Jobs and connections are shared out as evenly as they go; the rate is
    over the wall time of the whole run, the CPU summed over the processes.
    """
    processes = max(1, min(processes, jobs, concurrency))
    shares = [jobs // processes + (i < jobs % processes) for i in range(processes)]
    conns = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    firsts = [sum(shares[:i]) for i in range(processes)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        parts = pool.starmap(_one_process, [(uri, shares[i], conns[i], size, mode, firsts[i])
                                            for i in range(processes)])
    seconds = time.perf_counter() - started
    failures: Counter[str] = Counter()
    for part in parts:
        failures.update(part.failures)
    return LoadResult(jobs=jobs, ok=sum(p.ok for p in parts), seconds=seconds,
                      bytes=sum(p.bytes for p in parts),
                      latencies=tuple(sorted(x for p in parts for x in p.latencies)),
                      failures=dict(failures), cpu_seconds=sum(p.cpu_seconds for p in parts),
                      cpu_system_seconds=sum(p.cpu_system_seconds for p in parts),
                      processes=processes)


def main_loadgen(args: argparse.Namespace) -> int:
    try:
        dest = parse_destination(args.uri)
        if dest.scheme not in ("lpd", "lpds"):
            raise ValueError("loadgen sends to lpd:// and lpds:// URIs only")
        if dest.scheme == "lpds":
            client.tls_context(dest)        # an unreadable ca=, cert= or key=: exit 2
        size = parse_size(args.size)
        processes = getattr(args, "processes", 1)
        if args.jobs < 1 or args.concurrency < 1 or processes < 1:
            raise ValueError("--jobs, --concurrency and --processes must be at least 1")
    except ValueError as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    if processes > 1:
        result = run_load_processes(args.uri, jobs=args.jobs, concurrency=args.concurrency,
                                    size=size, mode=args.mode, processes=processes)
    else:
        result = _with_bar(args, size)
    _report(result, getattr(args, "json", False))
    return 0 if result.ok == result.jobs else 1


def _with_bar(args: argparse.Namespace, size: int) -> LoadResult:
    bar = progress.bar(total=args.jobs, desc="loadgen", unit="job")
    try:
        return load(args.uri, jobs=args.jobs, concurrency=args.concurrency, size=size,
                    mode=args.mode, done=bar.update)
    finally:
        bar.close()


def _report(result: LoadResult, as_json: bool) -> None:
    summary = result.summary()
    if as_json:
        sys.stdout.write(orjson.dumps(summary).decode() + "\n")
        return
    print(f"{result.ok}/{result.jobs} jobs in {result.seconds:.2f}s: "
          f"{result.jobs_per_second:.1f} jobs/s, {result.mb_per_second:.2f} MB/s, "
          f"latency p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms")
    print(f"loadgen CPU {result.cpu_ms_per_job:.3f} ms per job "
          f"({result.cpu_system_ms_per_job:.3f} of it system; "
          f"{result.processes} process{'es' if result.processes > 1 else ''})")
    for key, count in sorted(result.failures.items()):
        print(f"  failed {key}: {count}")
