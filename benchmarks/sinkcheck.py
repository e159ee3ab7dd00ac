"""Every job of a benchmark run counted and checksummed where it ended up.

A benchmark's rate means nothing if jobs were lost or sent twice, so each
row's harness checks its sink after the clock stopped: exactly the jobs it
sent, each once (by the title the load generator gives job ``n``, ``load
<n>``, so a lost job and a duplicate cannot cancel out in a count), each
data file's SHA-256 equal to the payload's.  A failed check raises
``SinkMismatch`` and so fails the round and its row.

Sinks: a ``dir://`` hot folder (its ``<job>.json`` metadata files and the
data files they name), an LPRng queue's held jobs (``tests.peers``), and a
spool holding one large job (its data file, hashed in 1 MiB reads).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import orjson

from tests.peers import LprngServer


class SinkMismatch(AssertionError):
    """The sink does not hold exactly the jobs sent, each once and intact."""


def titles(jobs: int, first: int = 0, prefix: str = "load ") -> set[str]:
    """The titles the load generator gives jobs ``first`` .. ``first + jobs - 1``."""
    return {f"{prefix}{n}" for n in range(first, first + jobs)}


def check_titles(where: str, seen: Iterable[str], jobs: int, first: int = 0,
                 prefix: str = "load ") -> None:
    """``seen`` is each of the titles ``titles`` names exactly once."""
    counts = Counter(seen)
    want = titles(jobs, first, prefix)
    twice = sorted(t for t, c in counts.items() if c > 1)
    missing = sorted(want - counts.keys())
    extra = sorted(counts.keys() - want)
    if twice or missing or extra or sum(counts.values()) != jobs:
        raise SinkMismatch(
            f"{where}: {sum(counts.values())} jobs for {jobs} sent; duplicated "
            f"{len(twice)} {twice[:3]}, missing {len(missing)} {missing[:3]}, "
            f"unknown {len(extra)} {extra[:3]}")


def dir_sink(folder: Path, jobs: int, payload: bytes | None, first: int = 0) -> None:
    """``folder`` (a hot folder's queue folder) holds exactly jobs ``first``.., intact.

    ``payload`` None: the titles only (the caller checked the bytes already).
    """
    want = hashlib.sha256(payload).digest() if payload is not None else None
    metas = [n for n in os.listdir(folder) if n.endswith(".json")]
    found, named = [], set()
    for name in metas:
        meta = orjson.loads((folder / name).read_bytes())
        found.append(str(meta["title"]))
        for entry in meta["files"]:
            path = Path(entry["path"])
            named.add(path.name)
            if want is not None and hashlib.sha256(path.read_bytes()).digest() != want:
                raise SinkMismatch(f"{folder}: {path.name} of {meta['title']!r} is corrupt")
    check_titles(str(folder), found, jobs, first)
    stray = {n for n in os.listdir(folder)
             if not n.endswith(".json") and not n.startswith(".")} - named
    if stray:
        raise SinkMismatch(f"{folder}: {len(stray)} data files no job names: "
                           f"{sorted(stray)[:3]}")


def lprng_queue(server: LprngServer, queue: str, jobs: int, payload: bytes,
                first: int = 0) -> None:
    """LPRng's held ``queue`` has exactly jobs ``first``.. once, every data file intact."""
    held = server.jobs(queue)
    for job in held:
        if [f.data for f in job.files] != [payload]:
            raise SinkMismatch(f"LPRng {queue}: job {job.control.get('J')!r} is corrupt")
    check_titles(f"LPRng queue {queue}", (job.control.get("J", "") for job in held),
                  jobs, first)


def file_sha256(path: Path | str) -> bytes:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


_SENT: dict[tuple[str, int, int], bytes] = {}


def sent_sha256(path: Path) -> bytes:
    """``file_sha256`` of a file a benchmark sends, once per (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SENT:
        _SENT[key] = file_sha256(path)
    return _SENT[key]


def same_file(received: Path, sent: Path) -> None:
    """A raw receiver's file holds every byte of ``sent``, intact."""
    if received.stat().st_size != sent.stat().st_size or \
            file_sha256(received) != sent_sha256(sent):
        raise SinkMismatch(f"{received}: not the {sent.stat().st_size} bytes sent")


def spooled_big_job(spool_dir: Path, sent: Path) -> None:
    """The spool at ``spool_dir`` (its relay stopped) holds one job: the bytes of ``sent``."""
    import trio

    from relay.spool import Spool
    spool = Spool(spool_dir, fsync=False)
    spool.recover()
    try:
        held = spool.jobs()
        if len(held) != 1 or len(held[0].files) != 1:
            raise SinkMismatch(f"{spool_dir}: {len(held)} jobs, expected the one large job")
        data = held[0].files[0]
        if data.bytes != sent.stat().st_size or file_sha256(data.path) != sent_sha256(sent):
            raise SinkMismatch(f"{spool_dir}: the large job is not the bytes sent")
    finally:
        trio.run(spool.aclose)


def _count(folder: Path) -> int:
    try:
        return sum(1 for n in os.listdir(folder) if n.endswith(".json"))
    except FileNotFoundError:
        return 0


def wait_for_jobs(folder: Path, jobs: int, *, timeout: float, stall: float = 60.0) -> None:
    """Until hot folder ``folder`` holds ``jobs`` metadata files.

    ``TimeoutError`` after ``timeout`` seconds, or sooner once ``stall``
    seconds passed without a new job: a delivery that stopped is a failure
    to report (with the count reached), not something to wait out.
    """
    start = time.monotonic()
    deadline = start + timeout
    seen, progress = -1, start
    while (now := time.monotonic()) < deadline:
        count = _count(folder)
        if count >= jobs:
            return
        if count != seen:
            seen, progress = count, now
        elif now - progress > stall:
            raise TimeoutError(f"{count} of {jobs} jobs reached {folder}; none new in "
                               f"{stall:g}s ({now - start:.0f}s in)")
        time.sleep(0.01)
    raise TimeoutError(f"{_count(folder)} of {jobs} jobs reached {folder} in {timeout:g}s")


def spool_jobs(spool_dir: Path, jobs: int, payload: bytes, first: int = 0) -> None:
    """The spool at ``spool_dir`` (its relay stopped) holds exactly jobs ``first``..,
    each once by title, every data file's bytes ``payload``."""
    import trio

    from relay.spool import Spool
    spool = Spool(spool_dir, fsync=False)
    spool.recover()
    try:
        held = spool.jobs()
        for meta in held:
            for file in meta.files:
                with spool.open_body(file) as body:
                    if body.read() != payload:
                        raise SinkMismatch(f"{spool_dir}: {meta.title!r} is corrupt")
        check_titles(str(spool_dir), (m.title for m in held), jobs, first)
    finally:
        trio.run(spool.aclose)
