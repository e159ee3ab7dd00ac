"""``lpd-relay send | queue | remove``: an lpr, lpq and lprm for any LPD (SPEC §6).

They speak to any RFC 1179 server, not only to the relay, through the same
client code the ``lpd://`` sink uses.  Exit codes: 0 ok, 1 the server refused
or could not be reached, 2 usage error.
"""

from __future__ import annotations

import argparse
import getpass
import os
import random
import sys

import trio

from relay import client
from relay.errors import SinkError
from relay.sinks.lpd import short_hostname
from relay.units import parse_duration
from relay.uri import Destination, parse_destination


def _destination(uri: str) -> Destination:
    dest = parse_destination(uri)
    if dest.scheme != "lpd":
        raise ValueError(f"{uri}: only lpd:// URIs can be used here")
    return dest


def _documents(paths: list[str]) -> list[client.OutFile]:
    return [client.OutFile(name=os.path.basename(p), size=os.path.getsize(p), path=p)
            for p in paths]


async def _send(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    user = args.user or getpass.getuser()
    documents = await trio.to_thread.run_sync(_documents, args.files)
    cf_name, control, files = client.build_job(
        documents, user=user, title=args.title or documents[0].name, host=short_hostname(),
        number=random.randrange(1000))
    ch = await client.open_channel(dest.host, dest.port, io_timeout=io_timeout)
    try:
        await client.send_job(ch, queue=dest.path, cf_name=cf_name, control=control,
                              files=files, mode=args.mode, order=dest.order)
    finally:
        await ch.aclose()
    total = sum(f.size for f in files)
    print(f"sent {cf_name} ({len(files)} file(s), {total} bytes) to {dest.uri}")


async def _queue(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    ch = await client.open_channel(dest.host, dest.port, io_timeout=io_timeout)
    try:
        sys.stdout.write(await client.query(ch, dest.path, long=args.long))
    finally:
        await ch.aclose()


async def _remove(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    ch = await client.open_channel(dest.host, dest.port, io_timeout=io_timeout)
    try:
        agent = args.agent or getpass.getuser()
        sys.stdout.write(await client.remove(ch, dest.path, agent, args.items))
    finally:
        await ch.aclose()


def _run(action, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    try:
        dest = _destination(args.uri)
        timeout = parse_duration(args.timeout)
        for path in getattr(args, "files", ()):
            if not os.path.isfile(path):
                raise ValueError(f"{path}: not a readable file")
            if os.path.getsize(path) == 0:
                raise ValueError(f"{path}: empty file, nothing to print")
    except ValueError as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(action, dest, args, timeout)
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
