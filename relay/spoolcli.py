"""``lpd-relay spool list | show JOB | retry JOB | purge JOB [-c FILE]`` (SPEC §6).

Works on the spool directory itself, so it needs no running daemon.  When a
daemon does run on that spool (it holds the spool lock), changes go through
it so its in-memory queues stay true: ``retry`` marks the job queued and sends
the daemon an LPD 0x01 for the job's queue (which makes it rescan held jobs);
``purge`` asks it with an LPD 0x05 from loopback as root — the same request
``lprm -Pqueue -a`` makes — and the daemon never removes a job it is delivering.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import errno
import fcntl
import functools
import os
import socket
import sys
import time

import orjson
import trio

from relay import _core, client, progress
from relay.audit import cli_events
from relay.config import Config, InvalidConfig, embedded_default, load_config
from relay.daemoninfo import DAEMON_INFO
from relay.errors import ProtocolError, SinkError, SpoolError
from relay.privacy import Redactor
from relay.queues import QueueRouter
from relay.queuestate import QueueStates
from relay.reprint import ReprintRefused, check_kept, reprint_offline
from relay.spool import JobMeta, Spool


def daemon_running(spool_dir: str) -> bool:
    """True when another process holds the spool lock (a daemon serves this spool)."""
    path = os.path.join(spool_dir, "lock")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _local_listener(config: Config) -> tuple[str, int]:
    """The running daemon's first LPD address, as it recorded it in the spool."""
    info_path = os.path.join(config.server.spool_dir, DAEMON_INFO)
    try:
        with open(info_path, "rb") as f:
            host, port = orjson.loads(f.read())["lpd"][0]
    except (OSError, ValueError, KeyError, IndexError):
        listen = config.server.listen[0]
        host, port = listen.host, listen.port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return str(host), int(port)


async def _admin_channel(host: str, port: int) -> client.Channel:
    """Purge and retry are admin requests (SPEC §12): sent from a reserved port
    when this process may bind one (root), else from an ephemeral one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for source in range(1023, 511, -1) if os.geteuid() == 0 else ():
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((host, source))
            with trio.fail_after(10):
                await sock.connect((host, port))
        except (OSError, trio.TooSlowError) as exc:
            sock.close()
            if getattr(exc, "errno", None) in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                continue
            break
        return client.Channel(sock, timeout=10, peer=f"{host}:{port}")
    return await client.open_channel(host, port, io_timeout=10)


async def _ask_daemon(config: Config, request: bytes) -> str:
    host, port = _local_listener(config)
    ch = await _admin_channel(host, port)
    try:
        await ch.send_all(request)
        return await ch.read_text()
    finally:
        await ch.aclose()


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _list(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    if getattr(args, "delivered", False):
        return _list_delivered(spool)
    jobs = [j for j in spool.jobs() if j.state != "delivered"]   # kept ones: --delivered
    print(f"{'JOB':<13}{'QUEUE':<12}{'STATE':<8}{'USER':<10}{'NUMBER':<8}"
          f"{'BYTES':>10}  {'RECEIVED (UTC)':<20}{'ATTEMPTS':>8}  LAST ERROR")
    for j in jobs:
        print(f"{j.id:<13}{j.queue[:11]:<12}{j.state:<8}{j.user[:9]:<10}{j.number:<8}"
              f"{j.total_bytes:>10}  {_when(j.received):<20}{j.attempts:>8}  "
              f"{j.last_error[:60]}")
    print(f"{len(jobs)} job(s)")
    return 0


def _list_delivered(spool: Spool) -> int:
    """``list --delivered``: the jobs ``[retention]`` keeps, which ``reprint`` takes."""
    jobs = [j for j in spool.jobs() if j.state == "delivered"]
    print(f"{'JOB':<13}{'QUEUE':<12}{'USER':<10}{'NUMBER':<8}{'BYTES':>10}  "
          f"{'RECEIVED (UTC)':<20}DELIVERED (UTC)")
    for j in jobs:
        print(f"{j.id:<13}{j.queue[:11]:<12}{j.user[:9]:<10}{j.number:<8}"
              f"{j.total_bytes:>10}  {_when(j.received):<20}{_when(j.delivered_at)}")
    print(f"{len(jobs)} delivered job(s) kept")
    return 0


def _show(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    job = _get(spool, args.job)
    record = dataclasses.asdict(job)
    record["received_utc"] = _when(job.received)
    if os.geteuid() != 0:   # [privacy] job_names: names in full for root only (docs/privacy.md)
        names = Redactor(config.privacy)
        record["title"], record["job_name"] = names.name(job.title), names.name(job.job_name)
    sys.stdout.write(orjson.dumps(record, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


def _retry(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    job = _get(spool, args.job)
    running = daemon_running(spool.directory)
    try:
        spool.update(dataclasses.replace(job, state="queued", failures=0, next_attempt=0.0),
                     durable=True)
        if job.state == "held":
            spool.events.record("released", job)
    except SpoolError:
        if not running:
            raise
        # A full disk: the daemon releases the job itself (it never needs
        # space for that, docs/spool.md "A full disk").
    if running:
        # 0x01 with the spool id: the daemon releases this job only.
        request = _core.print_waiting(job.queue)[:-1] + f" {job.id}\n".encode()
        trio.run(_ask_daemon, config, request)
        print(f"job {job.id} released; the daemon is delivering it now")
    else:
        print(f"job {job.id} released; it will be delivered when the daemon starts")
    return 0


def _purge(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    job = _get(spool, args.job)
    # With the daemon running it removes the job (only the daemon appends to the
    # segment log): lprm for a queued or held job; a kept delivered job is no
    # queue's, so lpd-relay's lpc ``purge`` names it by its spool id.
    if daemon_running(spool.directory):
        request = (_core.remove_jobs(job.queue, "root", [job.id]) if job.state != "delivered"
                   else ("\x06" + " ".join([job.wire_queue, "root", "purge", job.id])
                         + "\n").encode())
        answer = trio.run(_ask_daemon, config, request)
        sys.stdout.write(answer)
        return 0 if "dequeued" in answer else 1
    spool.remove(job.id)
    spool.events.record("removed", job)
    print(f"{job.control_name} dequeued (job {job.id})")
    return 0


class _NoJob(Exception):
    pass


def _get(spool: Spool, job_id: str | None) -> JobMeta:
    if not job_id:
        raise _NoJob("this action needs a JOB (see `lpd-relay spool list`)")
    try:
        return spool.get(job_id.zfill(12) if job_id.isdigit() else job_id)
    except KeyError:
        raise _NoJob(f"no job {job_id} in the spool") from None


def _purge_each(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    """``purge JOB...``: one after another, with a progress bar on a terminal."""
    bar = progress.bar(total=len(args.jobs), desc="purge", unit="job")
    code = 0
    try:
        for job_id in args.jobs:
            code = max(code, _purge(spool, config, argparse.Namespace(job=job_id)))
            bar.update()
    finally:
        bar.close()
    return code


def _reprint(spool: Spool, config: Config, args: argparse.Namespace) -> int:
    """``reprint JOB [--to QUEUE]``: a kept job as a new one (``relay.reprint``)."""
    job = _get(spool, args.job)
    check_kept(job)
    wire = args.to or job.wire_queue
    if not daemon_running(spool.directory):
        try:
            queue = QueueRouter(config, QueueStates(config.server.spool_dir)).route(wire).name
        except ProtocolError as exc:
            raise ReprintRefused(str(exc)) from None
        meta = trio.run(functools.partial(reprint_offline, spool, job, queue=queue,
                                          wire_queue=wire))
        print(f"job {job.id} reprinted as job {meta.id} on queue {queue}; it will be "
              "delivered when the daemon starts")
        return 0
    request = ("\x06" + " ".join([wire, "root", "reprint", wire, job.id]) + "\n").encode()
    answer = trio.run(_ask_daemon, config, request)
    sys.stdout.write(answer)
    new = answer.split(" reprinted as job ", 1)[1].split()[0] if " as job " in answer else ""
    return 0 if new and _appears(spool, new) else 1


def _appears(spool: Spool, job_id: str, timeout: float = 30.0) -> bool:
    """Whether the daemon committed the reprint ``job_id`` (it copies in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            spool.get(job_id)      # a job of its own files, or a record in the segments
            return True
        except KeyError:
            pass
        time.sleep(0.05)
    print(f"lpd-relay: job {job_id} did not reach the spool; see the daemon's log",
          file=sys.stderr)
    return False


ACTIONS = {"list": _list, "show": _show, "retry": _retry, "purge": _purge_each,
           "reprint": _reprint}


def cli_config(args: argparse.Namespace) -> Config | None:
    """The configuration a spool-side command (spool, ctl, reload) works on.

    ``-c FILE``, else the embedded default's spool; None (said on stderr)
    when the file is invalid, for the caller to exit 2.
    """
    try:
        return load_config(args.config) if args.config else embedded_default(port=5515)
    except InvalidConfig as exc:
        print(f"lpd-relay: invalid configuration:\n{exc}", file=sys.stderr)
        return None


def main_spool(args: argparse.Namespace) -> int:
    if (config := cli_config(args)) is None:
        return 2
    if args.action == "init-db" or config.spool.backend == "postgresql":   # SPEC §10
        from relay.spoolpgcli import main_pg_spool
        return main_pg_spool(config, args)
    spool_dir = str(config.server.spool_dir)
    if not os.path.isdir(os.path.join(spool_dir, "jobs")):
        print(f"lpd-relay: no spool at {spool_dir}", file=sys.stderr)
        return 1
    spool = Spool(spool_dir, fsync=config.server.fsync)
    # purge takes several JOBs; show and retry one (a str from callers of old).
    args.jobs = [args.job] if isinstance(args.job, str) else list(args.job or [None])
    args.job = args.jobs[0]
    try:
        if len(args.jobs) > 1 and args.action != "purge":
            raise _NoJob(f"{args.action} takes one JOB")
        # The audit records of what it changes, by=cli.
        with cli_events(config, spool, args.action in ("retry", "purge", "reprint")):
            return ACTIONS[args.action](spool, config, args)
    except (_NoJob, ReprintRefused) as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2 if "JOB" in str(exc) else 1
    except SpoolError as exc:   # the CLI has no daemon bookkeeping to defer to
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 1
    except (SinkError, OSError, trio.TooSlowError) as exc:
        print(f"lpd-relay: cannot reach the running daemon: {exc}", file=sys.stderr)
        return 1
