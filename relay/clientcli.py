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

DATA_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _destination(uri: str) -> Destination:
    dest = parse_destination(uri)
    if dest.scheme != "lpd":
        raise ValueError(f"{uri}: only lpd:// URIs can be used here")
    return dest


def build_job(paths: list[str], *, user: str, title: str | None, host: str,
              number: int) -> tuple[str, bytes, list[client.OutFile]]:
    """Control file and data files for ``paths``, the way LPRng's lpr names them."""
    if len(paths) > len(DATA_LETTERS):
        raise ValueError(f"at most {len(DATA_LETTERS)} files per job")
    lines = [f"H{host}", f"P{user}", f"J{title or os.path.basename(paths[0])}", f"L{user}"]
    files = []
    for letter, path in zip(DATA_LETTERS, paths, strict=False):
        name = f"df{letter}{number:03d}{host}"
        lines += [f"l{name}", f"N{os.path.basename(path)}", f"U{name}"]
        files.append(client.OutFile(name=name, size=os.path.getsize(path), path=path))
    control = ("\n".join(lines) + "\n").encode("utf-8")
    return f"cfA{number:03d}{host}", control, files


async def _send(dest: Destination, args: argparse.Namespace, io_timeout: float) -> None:
    user = args.user or getpass.getuser()
    cf_name, control, files = build_job(args.files, user=user, title=args.title,
                                        host=short_hostname(), number=random.randrange(1000))
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
