"""Publishing a job in the group-commit thread: its segment record, or its files.

``Spool.commit`` (``relay.spool``) hands each finished job to the group commit
as a ``Publish``; the flush thread writes them all and then makes the batch
durable with one sync.  A small job is one JOB record appended to the current
segment (``relay.spoolsegjobs``); a large one gets its ``.cf`` and, last,
its ``.json`` (dot-temp and rename) beside the data files it streamed.  A
small job that finds no room for a new segment (a file system smaller than a
segment, or nearly full) is written as files after all: they need only its
size.  Nothing here runs on the event loop.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from relay.durablefiles import disk_error, unlink_quiet, write_file
from relay.errors import DiskFull, SpoolError
from relay.spoolformat import JobMeta, encode_job, encode_state, in_folder
from relay.spooljob import IncomingJob
from relay.spoolsegjobs import SegmentJobs


@dataclass(frozen=True, slots=True)
class Publish:
    """One job to publish in a group commit: its ``.json`` (None: only sync) or its record."""

    job_id: str
    record: bytes | None
    control: bytes
    paths: tuple[str, ...]
    state: bytes | None = None   # a ``.state`` to write before the ``.json`` (held jobs)
    meta: JobMeta | None = None  # a segment job: appended as one record with ``data``
    data: tuple[bytes, ...] = ()
    filed: list[str] = field(default_factory=list)  # the flush wrote a segment job as files
    # Called in the flush thread once the job is durable (``Spool.commit``'s
    # ``on_durable``); what it returns is called once a batch, after every item's.
    notify: Callable[[Publish], Callable[[], None] | None] | None = None


@dataclass(slots=True)
class Staged:
    """A commit under way (``Spool.stage``): what ``Spool.finish`` or ``unstage`` needs."""

    small: bool = False
    meta: JobMeta | None = None
    item: Publish | None = None


def make_item(jobs_dir: str, job: IncomingJob, meta: JobMeta, *, hold: bool,
              small: bool, notify: Callable[[Publish], Callable[[], None] | None] | None = None
              ) -> Publish:
    """What the flush needs of a job: its record (small) or its files' names."""
    state = encode_state(meta) if hold else None
    if small:
        return Publish(meta.id, None, job.control_raw, (), state=state, meta=meta,
                        data=tuple(job.data_parts(meta.files)), notify=notify)
    paths = (meta.control_path, *(f.path for f in meta.files),
             *([os.path.join(jobs_dir, f"{meta.id}.state")] if hold else []),
             os.path.join(jobs_dir, f"{meta.id}.json"))
    return Publish(meta.id, record=encode_job(meta), control=job.control_raw,
                    paths=paths, state=state, notify=notify)

def publish(jobs_dir: str, seg: SegmentJobs, item: Publish) -> tuple[str, ...]:
    """In the flush thread: write one job; returns the files to make durable (none for a
    segment record).  SpoolError (DiskFull) when refused; nothing of the job is left then."""
    if item.meta is not None:
        try:
            seg.append_job(item.meta, item.control, list(item.data), item.state)
            return ()
        except OSError as exc:
            # No room for a new segment (a file system smaller than one, or
            # nearly full): the job gets files, which need only its size.
            if not isinstance(disk_error(exc, ""), DiskFull):
                raise disk_error(exc, f"job {item.job_id} segment record") from exc
        return _publish_files(jobs_dir, seg, item)
    if item.record is None:
        return ()
    tmp = os.path.join(jobs_dir, f".{item.job_id}.json.tmp")
    state = os.path.join(jobs_dir, f"{item.job_id}.state")
    try:
        write_file(os.path.join(jobs_dir, f"{item.job_id}.cf"), item.control)
        if item.state is not None:
            write_file(state, item.state)
        write_file(tmp, item.record)
        os.rename(tmp, os.path.join(jobs_dir, f"{item.job_id}.json"))
    except OSError as exc:
        if item.state is not None:
            unlink_quiet(state)
        raise disk_error(exc, f"job {item.job_id} control file/metadata") from exc
    return item.paths

def _publish_files(jobs_dir: str, seg: SegmentJobs, item: Publish) -> tuple[str, ...]:
    # A segment job written as files after all: data first, then as any job.
    assert item.meta is not None
    meta = in_folder(item.meta, jobs_dir)   # sealed with its segment body names
    written = []
    try:
        for f, data in zip(meta.files, item.data, strict=True):
            written.append(f.path)
            write_file(f.path, data, flags=os.O_EXCL)
        state = [os.path.join(jobs_dir, f"{item.job_id}.state")] if item.state else []
        paths = (*written, meta.control_path, *state,
                 os.path.join(jobs_dir, f"{item.job_id}.json"))
        publish(jobs_dir, seg, replace(item, record=encode_job(meta), meta=None,
                                        paths=paths))
    except (OSError, SpoolError) as exc:
        for path in [*written, meta.control_path]:  # the rest _publish undid
            unlink_quiet(path)
        if isinstance(exc, SpoolError):
            raise
        raise disk_error(exc, f"job {item.job_id} data file") from exc
    item.filed.append("files")
    return paths
