"""``lpd-relay probe`` for ``socket://`` and ``usb://`` destinations.

Neither has a protocol to ask questions with, and any byte sent would be
printed, so probe sends nothing: a ``socket://`` printer is *reachable* when
a TCP connect succeeds (told apart from filtered and closed as for lpd://),
and a ``usb://`` printer is *writable* when its device (found by path, or by
IEEE 1284 ID for ``usb://Make/Model``) opens for writing; both close at once.
"""

from __future__ import annotations

import os

import trio

from relay.probe import ProbeReport, ProbeRun
from relay.uri import Destination, format_hostport
from relay.usbid import UsbNotFound, resolve_device

__all__ = ["run_local_probe"]


async def run_local_probe(dest: Destination, *, step_timeout: float) -> ProbeReport:
    """Probe a socket:// or usb:// destination without printing anything."""
    if dest.scheme == "socket":
        return await _socket(dest, step_timeout)
    return await _usb(dest, step_timeout)


async def _socket(dest: Destination, step_timeout: float) -> ProbeReport:
    run = ProbeRun(dest, step_timeout)
    where = format_hostport(dest.host, dest.port)
    if not (r := await run.step("resolve", run.checks.resolve)).ok:
        return run.done(False, f"FAIL: cannot resolve {dest.host}: {r.detail}")
    if not (r := await run.connect()).ok:
        return run.done(False, f"FAIL: unreachable: {r.detail}")
    return run.done(True, f"OK: {where} is reachable (nothing was sent, nothing printed)",
                    dest.uri)


async def _usb(dest: Destination, step_timeout: float) -> ProbeReport:
    run = ProbeRun(dest, step_timeout)
    device = dest.path

    async def find() -> str:
        nonlocal device
        device = await trio.to_thread.run_sync(_find, dest)
        return device

    async def open_for_writing() -> str:
        await trio.to_thread.run_sync(_open_close, device)
        return f"{device} opens for writing (nothing was written)"

    if not (found := await run.step("device", find)).ok:
        return run.done(False, f"FAIL: {found.detail}")
    if not (r := await run.step("writable", open_for_writing)).ok:
        return run.done(False, f"FAIL: {device}: {r.detail}")
    run.reachability = "answered"
    return run.done(True, f"OK: {device} is writable", dest.uri)


def _find(dest: Destination) -> str:
    # OSError(0, text): the step shows the text itself, not an errno's words.
    device = dest.path
    if dest.make:
        try:
            device = resolve_device(dest)
        except UsbNotFound as exc:
            raise OSError(0, str(exc)) from None
    if not os.path.exists(device):
        raise OSError(0, f"{device} does not exist (printer unplugged or switched off?)")
    return device


def _open_close(device: str) -> None:
    # Non-blocking: a FIFO without a reader fails at once (ENXIO) instead of hanging.
    fd = os.open(device, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    os.close(fd)

