"""Recovery: telling acknowledged jobs from debris in ``jobs/`` at start-up.

SPEC §4.4 keeps an acknowledged job through ``kill -9`` and power loss and
discards a partial one at restart.  The rule (docs/spool.md) is that a job
exists iff its ``.json`` parses and every file it lists has the recorded size;
the sweep applies it to every id it finds and removes everything else.  That
rule is the spool's whole crash-safety argument, so it sits here on its own, to
be read against the layout; ``Spool.recover`` (``relay.spool``) calls it once,
with the spool lock held and before any id is handed out, which is what makes
unlinking whatever does not qualify safe.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from relay.durablefiles import read_file, unlink_quiet
from relay.spoolformat import LIVE_RE, TEMP_RE, JobMeta, decode_job, with_state


def sweep(jobs_dir: str, names: list[str], *, known: dict[str, JobMeta],
          count_discard: Callable[[int], None]) -> tuple[list[JobMeta], int]:
    """Remove the debris among ``names``, the files of ``jobs_dir``.

    Returns the jobs with their delivery state, in arrival order, and the
    highest id seen, debris included.  Each job's immutable record goes into
    ``known``; each partial job removed is reported to ``count_discard`` with
    its bytes.
    """
    groups: dict[str, list[str]] = {}
    for name in names:
        if TEMP_RE.fullmatch(name):
            unlink_quiet(os.path.join(jobs_dir, name))  # torn write of some job
        elif m := LIVE_RE.fullmatch(name):
            groups.setdefault(m.group(1), []).append(name)
    jobs = []
    for job_id in sorted(groups, key=int):
        meta = _check(jobs_dir, job_id, groups[job_id], known, count_discard)
        if meta is not None:
            jobs.append(meta)
    return jobs, max(map(int, groups), default=0)


def _check(jobs_dir: str, job_id: str, names: list[str], known: dict[str, JobMeta],
           count_discard: Callable[[int], None]) -> JobMeta | None:
    sizes = {}
    for name in names:
        st = os.lstat(os.path.join(jobs_dir, name))
        sizes[name] = st.st_size if stat.S_ISREG(st.st_mode) else -1
    try:
        meta = decode_job(read_file(os.path.join(jobs_dir, f"{job_id}.json")) or b"",
                          job_id, jobs_dir)
        want = {f"{job_id}.cf": meta.control_bytes}
        want.update((os.path.basename(f.path), f.bytes) for f in meta.files)
        if any(sizes.get(name) != size for name, size in want.items()):
            raise ValueError("a file is missing or short")
    except ValueError:  # orjson.JSONDecodeError is a ValueError
        if names != [f"{job_id}.state"]:  # a lone .state is a removal's leftover
            count_discard(sum(
                max(size, 0) for name, size in sizes.items()
                if not name.endswith((".json", ".state"))))  # job bytes, as discard() counts
        for name in names:
            unlink_quiet(os.path.join(jobs_dir, name))
        return None
    for name in set(names) - set(want) - {f"{job_id}.json", f"{job_id}.state"}:
        unlink_quiet(os.path.join(jobs_dir, name))
    known[job_id] = meta
    state = f"{job_id}.state"
    return with_state(meta, read_file(os.path.join(jobs_dir, state)) if state in sizes
                      else None)
