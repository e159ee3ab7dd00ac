"""Test jobs for the sink tests: real files in a temporary folder.

``make_job`` writes each data file into ``tmp_path/spool`` and returns a frozen
record shaped like the spool's ``JobMeta`` (it satisfies
``relay.sinks.base.DeliveryJob``), so sink tests need no spool.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

_ids = itertools.count(1)


@dataclass(frozen=True, slots=True, kw_only=True)
class JobFile:
    name: str
    format: str
    bytes: int
    path: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Job:
    id: str
    queue: str
    wire_queue: str
    peer: str
    received: float
    control_name: str
    control_path: str
    number: str
    user: str
    host: str
    title: str
    job_name: str
    files: tuple[JobFile, ...]


def pattern_file(path: Path, size: int, seed: int = 0) -> Path:
    """Write ``size`` bytes of a cheap, position-dependent pattern (not all one byte)."""
    block = bytes((i * 7 + seed) & 0xFF for i in range(251)) * 4177  # ~1 MiB, odd period
    with path.open("wb") as out:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            out.write(chunk)
            left -= len(chunk)
    return path


def make_job(
    tmp_path: Path,
    contents: Sequence[bytes | int],
    *,
    formats: Iterable[str] | None = None,
    queue: str = "ward3",
    wire_queue: str | None = None,
    user: str = "alice",
    host: str = "ward3-pc",
    title: str = "discharge letter",
    received: float = 1_700_000_000.25,
) -> Job:
    """A job whose data files hold ``contents`` (bytes, or an int = size of a pattern file)."""
    serial = next(_ids)
    job_id = f"j{serial:06d}"
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    letters = list(formats) if formats is not None else ["l"] * len(contents)
    files = []
    for index, (content, letter) in enumerate(zip(contents, letters, strict=True)):
        path = spool / f"{job_id}.d{index}"
        if isinstance(content, int):
            pattern_file(path, content, seed=index)
        else:
            path.write_bytes(content)
        wire = f"df{chr(ord('A') + index)}{serial % 1000:03d}{host}"
        files.append(JobFile(name=wire, format=letter, bytes=path.stat().st_size, path=str(path)))
    control = spool / f"{job_id}.cf"
    control.write_bytes(f"H{host}\nP{user}\nJ{title}\n".encode())
    return Job(id=job_id, queue=queue, wire_queue=wire_queue or queue, peer="127.0.0.1:721",
               received=received, control_name=f"cfA{serial % 1000:03d}{host}",
               control_path=str(control), number=f"{serial % 1000:03d}", user=user, host=host,
               title=title, job_name=title, files=tuple(files))


def job_bytes(job: Job) -> bytes:
    """All data files of ``job`` concatenated (for small jobs)."""
    return b"".join(Path(f.path).read_bytes() for f in job.files)


def job_digest(job: Job) -> tuple[int, str]:
    """(total size, sha256) of all data files in order, read in chunks."""
    digest = hashlib.sha256()
    total = 0
    for spool_file in job.files:
        with open(spool_file.path, "rb") as src:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
    return total, digest.hexdigest()
