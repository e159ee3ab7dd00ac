"""A queued job made ready for ``lpd://``: its rewritten control file and data files.

The control file is read from the spool, parsed and rewritten for the
destination (``relay.controlfile.rewrite``: this sink's job number and host
name, the URI's ``banner``/``format``/``sanitize_title``, ``[privacy]``
redaction).  A small job's data comes back loaded (its range of the spool:
a segment record); a larger one as its spool file, for ``sendfile``.

``RunBodies`` reads the bodies of a run of jobs (a pipelined session's)
with each spool file opened once: a segment holds many small jobs, and
opening it per body was an ``openat`` and a ``close`` per control file and
per data file.
"""

from __future__ import annotations

import dataclasses

from relay import _core, client
from relay.controlfile import parse_control_file, redact_names, rewrite
from relay.errors import LpdError, SinkRejected
from relay.sinks.base import DeliveryFile, DeliveryJob, SinkContext, open_body, open_control
from relay.sinks.lpdoverlap import small_job
from relay.spoolbackend import BodyFiles, locate_body
from relay.uri import Destination

# (control-file name, rewritten control file, data files): a job ready to send.
Prepared = tuple[str, bytes, list[client.OutFile]]


class RunBodies:
    """Bodies of a run of jobs read through one descriptor per spool file (``close`` ends it).

    Only for the local spool (``SinkContext.bodies`` None): its bodies are
    whole files or segment ranges, read through ``relay.spoolbackend.BodyFiles``;
    any other backend's are read through it, one ``open_body`` each.
    """

    def __init__(self, context: SinkContext) -> None:
        self._context = context
        self._files = BodyFiles() if context.bodies is None else None

    def control(self, job: DeliveryJob) -> bytes:
        """The job's raw control file; ``SpoolFileMissing`` when the spool lost it."""
        if self._files is not None and (where := locate_body(job.control_path)) is not None:
            return self._files.range(*where).read()
        with open_control(self._context, job) as body:
            return body.read()

    def data(self, file: DeliveryFile) -> bytes:
        """A data file's bytes, all of them (a small job's)."""
        if self._files is not None:
            return self._files.open(file.path, file.bytes).read()
        with open_body(self._context, file) as body:
            return body.read()

    def close(self) -> None:
        if self._files is not None:
            self._files.close()

    def __enter__(self) -> RunBodies:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def prepare(job: DeliveryJob, dest: Destination, context: SinkContext, number: int,
            host: str, bodies: RunBodies) -> Prepared:
    """(control-file name, rewritten control file, data files to send) for ``job``."""
    cf_name, control, sent = _rewritten(job, dest, context, number, host, bodies)
    if small_job(job):
        files = [client.OutFile(name=name, size=f.bytes, data=bodies.data(f)) for name, f in sent]
    else:
        files = [client.OutFile(name=name, size=f.bytes, path=f.path) for name, f in sent]
    return cf_name, control, files


def inline(job: DeliveryJob, dest: Destination, context: SinkContext, number: int,
           host: str, bodies: RunBodies) -> tuple[str, bytes, int]:
    """A small job's subcommands as one string (control file first, data in memory), for a pipelined
    session: (control-file name, the bytes, how many data files they carry)."""
    cf_name, control, sent = _rewritten(job, dest, context, number, host, bodies)
    parts = [_core.control_header(cf_name, len(control)), control, b"\x00"]
    for name, f in sent:
        parts += [_core.data_header(name, f.bytes), bodies.data(f), b"\x00"]
    return cf_name, b"".join(parts), len(sent)


def _rewritten(job: DeliveryJob, dest: Destination, context: SinkContext, number: int,
               host: str, bodies: RunBodies
               ) -> tuple[str, bytes, list[tuple[str, DeliveryFile]]]:
    """(control-file name, rewritten control file, (new name, spool file) of each data
    file to send)."""
    raw = bodies.control(job)       # SpoolFileMissing is not "unreadable"
    try:
        cf = parse_control_file(raw)
    except LpdError as exc:
        raise SinkRejected(f"spooled control file unreadable: {exc}") from exc
    if context.privacy.downstream:     # [privacy] strip_downstream
        cf = redact_names(cf, context.privacy.name)
    try:
        new_cf, cf_name, names = rewrite(cf, number=number, host=host, digits=dest.jobnumbers,
                                         banner=dest.banner, fmt=dest.format,
                                         sanitize_title=dest.sanitize_title)
    except LpdError as exc:     # the job's own lines: no retry can send it
        raise SinkRejected(f"spooled control file cannot be sent: {exc}") from exc
    sent = [(names[f.name], f) for f in job.files if f.name in names and f.bytes > 0]
    if len(sent) < len(names):
        # An empty data file cannot be sent with an exact count: a count of 0
        # means "until EOF" to every receiver.  It prints nothing, so it and
        # the control lines naming it are left out.
        empty = {names[f.name] for f in job.files if f.name in names and f.bytes == 0}
        kept = tuple(line for line in new_cf.lines if line[1] not in empty)
        new_cf = dataclasses.replace(new_cf, lines=kept or new_cf.lines[:1])
    return cf_name, new_cf.serialize(), sent
