"""``lpd-relay send | queue | remove``: an lpr, lpq and lprm for any LPD (SPEC §6).

They speak to any RFC 1179 server, not only to the relay, through the same
client code the ``lpd://`` sink uses; an ``lpds://`` URI (with ``ca=``,
``cert=``, ``key=``, ``servername=``) speaks to them inside TLS.  Exit codes:
0 ok, 1 the server refused or could not be reached, 2 usage error.

``send URI -`` reads the job from standard input, the way LPRng's lpr does:
with ``--mode count`` it is first copied to a temporary file so the exact
length can be sent (every receiver accepts that); with ``--mode stream`` or
``windows`` it goes out as it arrives, after a length of 0 (or the Windows
fake length), until our half-close.  On a terminal a large file shows a
progress bar (``relay.progress``); the bytes then go through one reused
buffer so they can be counted, instead of ``sendfile``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator

import trio

from relay import client, progress
from relay.errors import SinkError, SinkRejected
from relay.units import parse_duration
from relay.uri import Destination, parse_destination


def _destination(uri: str) -> Destination:
    dest = parse_destination(uri)
    if dest.scheme not in ("lpd", "lpds"):
        raise ValueError(f"{uri}: only lpd:// and lpds:// URIs can be used here")
    if dest.scheme == "lpds":
        client.tls_context(dest)   # an unreadable ca=, cert= or key= is a usage error
    return dest


class EmptyInput(ValueError):
    """Standard input held no bytes: nothing to print (a usage error, exit 2)."""


STDIN = "-"
STDIN_NAME = "(stdin)"   # the N line LPRng's lpr writes for standard input
CHUNK = 1 << 20


class _CliChannel(client.Channel):
    """A client channel whose data files can come from stdin and show progress."""

    def __init__(self, ch: client.Channel, bar: progress.Progress | None) -> None:
        super().__init__(ch.sock, timeout=ch.timeout, peer=ch.peer)
        self.io = ch.io            # lpds://: the TLS stream
        self.bar = bar

    async def send_file(self, path: str, size: int) -> None:
        if path != STDIN and self.bar is None:
            await super().send_file(path, size)   # zero-copy
            return
        fd = 0 if path == STDIN else os.open(path, os.O_RDONLY)
        buf = bytearray(CHUNK)
        sent = 0
        try:
            while True:
                # stdin may be a pipe or a terminal: read it off the event loop.
                n = await trio.to_thread.run_sync(os.readv, fd, [buf])
                if n == 0:
                    break
                await self.send_all(bytes(memoryview(buf)[:n]))
                sent += n
                if self.bar is not None:
                    self.bar.update(n)
        finally:
            if fd != 0:
                os.close(fd)
        if path != STDIN and sent != size:
            raise SinkRejected(f"{path} has {sent} bytes, expected {size}")


@contextlib.contextmanager
def _documents(paths: list[str], mode: str) -> Iterator[list[client.OutFile]]:
    """The files to send; ``-`` is stdin: spooled to a temporary file in count mode."""
    with contextlib.ExitStack() as stack:
        docs = []
        for p in paths:
            if p == STDIN and mode != "count":
                docs.append(client.OutFile(name=STDIN_NAME, size=0, path=STDIN))
                continue
            if p == STDIN:
                tmp = stack.enter_context(tempfile.NamedTemporaryFile(prefix="lpd-relay-"))
                shutil.copyfileobj(sys.stdin.buffer, tmp, CHUNK)
                tmp.flush()
                if tmp.tell() == 0:
                    raise EmptyInput("standard input is empty, nothing to print")
                p, name = tmp.name, STDIN_NAME
            else:
                name = os.path.basename(p)
            docs.append(client.OutFile(name=name, size=os.path.getsize(p), path=p))
        yield docs


def _bar(files: list[client.OutFile]) -> progress.Progress | None:
    streamed = any(f.path == STDIN for f in files)
    total = sum(f.size for f in files)
    if not progress.on_terminal() or not (streamed or total >= progress.LARGE_FILE):
        return None
    return progress.bar(total=None if streamed else total, desc="send", unit="B", scale=True)


async def _send(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    user = args.user or getpass.getuser()
    with _documents(args.files, args.mode) as documents:
        cf_name, control, files = client.build_job(
            documents, user=user, title=args.title or documents[0].name,
            host=client.short_hostname(), number=random.randrange(1000))
        bar = _bar(files)
        ch = _CliChannel(await client.connect(dest, io_timeout=io_timeout), bar)
        try:
            await client.send_job(ch, queue=dest.path, cf_name=cf_name, control=control,
                                  files=files, mode=args.mode, order=dest.order)
        finally:
            await ch.aclose()
            if bar is not None:
                bar.close()
    total = sum(f.size for f in files)
    size = "streamed" if any(f.path == STDIN for f in files) else f"{total} bytes"
    print(f"sent {cf_name} ({len(files)} file(s), {size}) to {dest.uri}")


async def _queue(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    ch = await client.connect(dest, io_timeout=io_timeout)
    try:
        sys.stdout.write(await client.query(ch, dest.path, long=args.long))
    finally:
        await ch.aclose()


async def _remove(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    ch = await client.connect(dest, io_timeout=io_timeout)
    try:
        agent = args.agent or getpass.getuser()
        sys.stdout.write(await client.remove(ch, dest.path, agent, args.items))
    finally:
        await ch.aclose()


def _run(action, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    try:
        dest = _destination(args.uri)
        timeout = parse_duration(args.timeout)
        files = list(getattr(args, "files", ()))
        if files.count(STDIN) > 1:
            raise ValueError("standard input (-) can be named once")
        if STDIN in files[:-1] and args.mode != "count":
            raise ValueError(f"with --mode {args.mode}, standard input (-) must be the "
                             "last file: it runs until the end of the job")
        for path in files:
            if path == STDIN:
                continue
            if not os.path.isfile(path):
                raise ValueError(f"{path}: not a readable file")
            if os.path.getsize(path) == 0:
                raise ValueError(f"{path}: empty file, nothing to print")
    except ValueError as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(action, dest, args, timeout)
    except EmptyInput as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    except (SinkError, OSError, trio.TooSlowError) as exc:
        print(f"lpd-relay: {dest.uri}: {exc or 'timed out'}", file=sys.stderr)
        return 1
    return 0


def main_send(args: argparse.Namespace) -> int:
    return _run(_send, args)


def main_queue(args: argparse.Namespace) -> int:
    return _run(_queue, args)


def main_remove(args: argparse.Namespace) -> int:
    return _run(_remove, args)
