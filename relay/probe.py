"""``lpd-relay probe lpd://host[:port]/queue``: the field checklist, automated (SPEC §6).

Pointing the relay at a new receiver used to mean a checklist by hand: does
the name resolve, does the port answer, does ``lpq`` know the queue, does a
job get through with exact byte counts, and if not with ``mode=stream`` or
``mode=windows``, and does the receiver insist on a reserved source port
(FIELD-NOTES: BSD lpd does, LPRng refuses the Windows fake length, cups-lpd
and BSD lpd refuse length 0).  ``probe`` runs that list in order and ends with
a verdict and the exact ``lpd://`` URI that worked, so it can be pasted into
the config as is.

Shape: each check is a step that yields a frozen ``StepResult`` (name, ok,
detail, milliseconds).  Each step runs under its own deadline, set here at
the call site, and the run stops where going on would tell nothing more (no
address, no connection).  The wire work goes through ``relay.client``, the
same code the ``lpd://`` sink uses, so what probe finds is what the sink does.
For ``lpds://`` a ``tls`` step after the connect shows the negotiated version
and cipher, the verified chain and the days until the server certificate
expires; every later step runs inside TLS, and the URI found is ``lpds://``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import getpass
import os
import random
import socket as pysocket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final
from urllib.parse import quote

import orjson
import trio

from relay import client, tls
from relay.errors import ConfigError, OriginPortUnavailable, SinkError
from relay.originports import OriginPortPool
from relay.probematrix import Matrix, cells, empty_matrix, lpr_byte_counting, recommended, render
from relay.units import parse_duration
from relay.uri import Destination, format_hostport, parse_destination

__all__ = ["STEP_TIMEOUT", "ProbeReport", "ProbeRun", "StepResult", "build_test_page",
           "looks_refused", "main_probe", "render", "run_probe", "uri_for"]

STEP_TIMEOUT: Final = 10.0
MODES: Final = ("count", "stream", "windows")     # the order the field checklist tries
RESERVES: Final = ("rfc1179", "privileged")      # CUPS' 721-731 first, then 512-1023
# Words of lpq answers that refuse rather than describe a queue: BSD "unknown
# printer", LPRng "does not exist"/"no permission", BSD's port refusal
# ("Malformed from address", "not on a reserved port").
_REFUSALS: Final = ("unknown printer", "unknown queue", "does not exist", "no such",
                    "not found", "no permission", "not accepting", "denied", "not allowed",
                    "malformed", "reserved port", "privileged port")
# The lpd:// query options (SPEC §3.3), in the order a URI shows them.
_URI_OPTIONS: Final = ("mode", "order", "timeout", "contimeout", "jobnumbers", "reserve",
                       "batch", "banner", "format", "sanitize_title")
_SWITCH_WORDS: Final = {"banner": ("off", "on"), "sanitize_title": ("no", "yes")}


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """One checklist step: what was checked, whether it passed, what was seen, how long."""

    name: str
    ok: bool
    detail: str
    ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ProbeReport:
    """The whole run: the steps in order, a one-line verdict and the URI that works.

    ``modes`` is the mode x order matrix (``relay.probematrix``) when probe
    tried more than the first mode; ``recommended_uri`` the URI to configure
    (``uri`` too, kept for scripts); ``windows_port`` the Windows port
    setting that matches; ``reachability`` one of "answered", "filtered",
    "closed", "no reply" or "" (not connected yet)."""

    target: str
    steps: tuple[StepResult, ...]
    ok: bool
    verdict: str
    uri: str | None
    modes: Matrix | None = None
    recommended_uri: str | None = None
    windows_port: dict[str, bool | None] | None = None
    reachability: str = ""
    tls: dict[str, Any] | None = None     # lpds://: relay.tls.session_summary


class _Refused(Exception):
    """The peer answered, and the answer was no."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        # trio's connect wraps the errno text in "error connecting to (...)"
        text = exc.strerror if isinstance(exc, pysocket.gaierror) or not exc.errno \
            else os.strerror(exc.errno)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__


def uri_for(dest: Destination, **found: Any) -> str:
    """The lpd:// (lpds://) URI for ``dest`` with ``found`` options; only non-default
    options appear (and the TLS ones that are set)."""
    dest = dataclasses.replace(dest, **found)
    options = []
    for f in dataclasses.fields(Destination):
        value = getattr(dest, f.name)
        if f.name in _URI_OPTIONS and value != f.default:
            if f.name in _SWITCH_WORDS:
                text = _SWITCH_WORDS[f.name][bool(value)]
            else:
                text = f"{value:g}s" if isinstance(value, float) else str(value)
            options.append(f"{f.name}={text}")
    for name, field in (("ca", "tls_ca"), ("cert", "tls_cert"), ("key", "tls_key"),
                        ("servername", "servername")):
        if getattr(dest, field):
            options.append(f"{name}={getattr(dest, field)}")
    query = "?" + "&".join(options) if options else ""
    scheme = "lpds" if dest.scheme == "lpds" else "lpd"
    return f"{scheme}://{format_hostport(dest.host, dest.port)}/{quote(dest.path, safe='')}{query}"


def looks_refused(text: str) -> bool:
    """Whether an lpq answer is a refusal: a status byte (cups-lpd) or refusing words."""
    if text and ord(text[0]) < 0x20 and text[0] not in "\t\r\n":
        return True
    lowered = text.lower()
    return any(word in lowered for word in _REFUSALS)


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip(" \t\x00\x01\x02\x03"):
            return line.strip(" \t\x00\x01\x02\x03")[:120]
    return ""


def build_test_page(dest: Destination, host: str) -> tuple[str, bytes, list[client.OutFile]]:
    """A one-page plain-text job saying what it is: (control name, control, files)."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):    # no passwd entry (containers)
        user = "lpdrelay"
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %z")
    data = (f"lpd-relay probe test page\n\n"
            f"This page was sent by 'lpd-relay probe' to check that this printer\n"
            f"queue accepts print jobs. It can be thrown away.\n\n"
            f"Date:  {now}\nFrom:  {host} (user {user})\nQueue: {dest.path} on "
            f"{format_hostport(dest.host, dest.port)}\n").encode()
    page = client.OutFile(name="probe-test-page.txt", size=len(data), data=data)
    return client.build_job([page], user=user, title="lpd-relay probe test page", host=host,
                            number=random.randrange(10 ** dest.jobnumbers),
                            digits=dest.jobnumbers, fmt="f")


class _Checks:
    """The wire side of each step; every method returns the detail or raises."""

    def __init__(self, dest: Destination, io_timeout: float) -> None:
        self.dest = dest
        self.io_timeout = io_timeout
        self.infos: list[Any] = []
        self.ctx: ssl.SSLContext | None = None      # lpds://, set by the tls step
        self.tls: dict[str, Any] | None = None

    async def resolve(self) -> str:
        d = self.dest
        self.infos = await trio.socket.getaddrinfo(d.host, d.port, type=pysocket.SOCK_STREAM)
        addresses = dict.fromkeys(str(info[4][0]) for info in self.infos)
        return ", ".join(addresses)

    async def connect(self) -> str:
        """TCP connect time from an ephemeral port, to each address until one answers."""
        error: OSError = OSError("no address")
        for family, type_, proto, _, addr in self.infos:
            with trio.socket.socket(family, type_, proto) as sock:
                try:
                    await sock.connect(addr)
                except OSError as exc:
                    error = exc
                    continue
                return f"{format_hostport(str(addr[0]), addr[1])} from port {sock.getsockname()[1]}"
        raise error

    async def handshake(self) -> str:
        """lpds://: the TLS handshake; the version, cipher, chain and days to expiry."""
        self.ctx = client.tls_context(self.dest)
        ch = await self._open(None)
        try:
            assert isinstance(ch.io, tls.TlsStream)
            self.tls = tls.session_summary(ch.io)
        finally:
            await ch.aclose()
        return tls.session_line(self.tls)

    async def _open(self, reserve: str | None) -> client.Channel:
        # A short linger: probe runs once, nobody waits on the port afterwards.
        pool = None if reserve is None else OriginPortPool.for_reserve(reserve, linger=1.0)
        return await client.connect(self.dest, pool, io_timeout=self.io_timeout, ctx=self.ctx)

    async def lpq(self, reserve: str | None = None) -> str:
        ch = await self._open(reserve)
        try:
            text = await client.query(ch, self.dest.path, long=False)
        finally:
            await ch.aclose()
        first = _first_line(text)
        if looks_refused(text):
            raise _Refused(first or f"status byte 0x{ord(text[0]):02x}")
        return f"queue known: {first}" if first else "queue known (empty answer)"

    async def send(self, mode: str, reserve: str | None = None,
                   order: str | None = None) -> str:
        cf_name, control, files = build_test_page(self.dest, client.short_hostname())
        ch = await self._open(reserve)
        try:
            await client.send_job(ch, queue=self.dest.path, cf_name=cf_name, control=control,
                                  files=files, mode=mode, order=order or self.dest.order)
        finally:
            await ch.aclose()
        return f"accepted {cf_name} ({files[0].size} bytes)"


class ProbeRun:
    """One probe run: the steps so far, each under its own deadline."""

    def __init__(self, dest: Destination, step_timeout: float) -> None:
        self.dest = dest
        self.step_timeout = step_timeout
        self.checks = _Checks(dest, io_timeout=min(dest.timeout, step_timeout))
        self.steps: list[StepResult] = []
        self.error: BaseException | None = None    # what failed the last step
        self.timed_out = False                     # whether the last step ran out of time
        self.reachability = ""
        self.matrix: Matrix | None = None

    async def step(self, name: str, action: Callable[[], Awaitable[str]],
                   on_timeout: str = "no answer") -> StepResult:
        """Run one step; any failure becomes a result, not an error."""
        start = time.perf_counter()
        ok = False
        self.error = None
        self.timed_out = False
        try:
            with trio.fail_after(self.step_timeout):
                detail = await action()
            ok = True
        except trio.TooSlowError:
            self.timed_out = True
            detail = f"{on_timeout} within {self.step_timeout:g}s"
        except (SinkError, OSError, ValueError, _Refused) as exc:
            self.error = exc
            detail = _describe(exc)
        result = StepResult(name=name, ok=ok, detail=detail,
                            ms=round((time.perf_counter() - start) * 1000, 1))
        self.steps.append(result)
        return result

    async def reserved(self, what: str, check: Callable[[str], Awaitable[str]]) -> str | None:
        """Retry ``check`` from a reserved source port; the reserve= value that worked."""
        try:
            OriginPortPool.for_reserve(RESERVES[0]).check_privilege()
        except ConfigError:
            self.steps.append(StepResult(name="reserved port", ok=False, ms=0.0,
                                         detail="cannot test reserved ports: not root"))
            return None
        for reserve in RESERVES:
            result = await self.step(f"{what} reserve={reserve}", partial(check, reserve))
            if result.ok:
                return reserve
            if not isinstance(self.error, OriginPortUnavailable):   # the peer said no
                return None
        return None

    def done(self, ok: bool, verdict: str, uri: str | None = None) -> ProbeReport:
        windows = None if self.matrix is None else {
            "lpr_byte_counting": lpr_byte_counting(self.matrix)}
        return ProbeReport(target=self.dest.uri, steps=tuple(self.steps), ok=ok,
                           verdict=verdict, uri=uri, modes=self.matrix, recommended_uri=uri,
                           windows_port=windows, reachability=self.reachability,
                           tls=self.checks.tls)

    async def connect(self) -> StepResult:
        """The TCP connect step, telling filtered (no answer) from closed (refused)."""
        port = self.dest.port
        result = await self.step("connect", self.checks.connect, on_timeout=(
            f"filtered (no answer, e.g. {port} blocked on the way back)"))
        if result.ok:
            self.reachability = "answered"
        elif self.timed_out:
            self.reachability = "filtered"
        elif isinstance(self.error, ConnectionRefusedError):
            self.reachability = "closed"
            self.steps[-1] = dataclasses.replace(result, detail=(
                f"{result.detail}: closed (refused: nothing listens on port {port})"))
        return self.steps[-1]

    async def lpq(self) -> StepResult:
        result = await self.step("lpq", self.checks.lpq,
                                 on_timeout="connected but no reply to the queue command")
        if self.timed_out:
            self.reachability = "no reply"
        return result

    async def matrix_cells(self, send: Callable[..., Awaitable[str]]) -> None:
        """Try every (mode, order) cell not yet in the matrix; a refusal is a cell's text."""
        assert self.matrix is not None
        for mode, order in cells(self.dest.order):
            if order in self.matrix[mode]:
                continue
            name = f"print mode={mode}" + ("" if order == self.dest.order else f" order={order}")
            result = await self.step(name, partial(send, mode, None, order))
            self.matrix[mode][order] = "ok" if result.ok else f"refused: {result.detail}"


async def run_probe(dest: Destination, *, send: bool = True, all_modes: bool = False,
                    step_timeout: float = STEP_TIMEOUT) -> ProbeReport:
    """Run the checklist against ``dest`` (an lpd:// destination) and judge it.

    ``mode`` and ``reserve`` of ``dest`` are what probe looks for, so they are
    ignored; ``order``, ``jobnumbers`` and ``timeout`` are used and kept.
    With ``all_modes``, or when the first mode fails, every mode is tried in
    both orders and the report carries the matrix.
    """
    run = ProbeRun(dest, step_timeout)
    checks, queue = run.checks, dest.path
    if not (r := await run.step("resolve", checks.resolve)).ok:
        return run.done(False, f"FAIL: cannot resolve {dest.host}: {r.detail}")
    if not (r := await run.connect()).ok:
        return run.done(False, f"FAIL: unreachable: {r.detail}")
    if dest.scheme == "lpds" and not (r := await run.step("tls", checks.handshake)).ok:
        return run.done(False, f"FAIL: {r.detail}")
    lpq = await run.lpq()
    if not send:
        reserve = None if lpq.ok else await run.reserved("lpq", checks.lpq)
        if lpq.ok or reserve is not None:
            uri = uri_for(dest, mode="count", reserve=reserve)
            return run.done(True, f"OK: queue {queue!r} answered lpq at {uri} "
                                  "(no test job sent)", uri)
        return run.done(False, f"FAIL: queue {queue!r} refused: {lpq.detail}")
    first = await run.step(f"print mode={MODES[0]}", partial(checks.send, MODES[0]))
    run.matrix = empty_matrix()
    run.matrix["count"][dest.order] = "ok" if first.ok else f"refused: {first.detail}"
    if first.ok and not all_modes:
        run.matrix = None
    elif isinstance(run.error, SinkError) and run.error.step == client.RECEIVE_JOB_STEP:
        pass   # refused before any file was offered: another length form cannot help
    else:
        await run.matrix_cells(checks.send)
    if (best := recommended(run.matrix or {"count": {dest.order: "ok"}}, dest.order)):
        uri = uri_for(dest, mode=best[0], order=best[1], reserve=None)
        return run.done(True, f"OK: {uri} works", uri)
    return await _reserved_search(run, first.detail if lpq.ok else lpq.detail)


async def _reserved_search(run: ProbeRun, refusal: str) -> ProbeReport:
    # Every mode refused or cut off from an ephemeral port: the receiver may
    # check the source port (BSD lpd without -W, some printers; FIELD-NOTES).
    dest, checks = run.dest, run.checks
    reserve = await run.reserved(f"print mode={MODES[0]}", partial(checks.send, MODES[0]))
    if reserve is not None:
        if run.matrix is not None:
            run.matrix["count"][dest.order] = f"ok with reserve={reserve}"
        uri = uri_for(dest, mode=MODES[0], reserve=reserve)
        return run.done(True, f"OK: {uri} works (a reserved source port is required)", uri)
    return run.done(False, f"FAIL: queue {dest.path!r} refused: {refusal}")


def main_probe(args: argparse.Namespace) -> int:
    """``lpd-relay probe``: 0 a working URI was found (with --no-print: lpq answered;
    socket://, usb://: reachable, writable), 1 not, 2 usage error."""
    try:
        dest = parse_destination(args.uri)
        if dest.scheme not in ("lpd", "lpds", "socket", "usb"):
            raise ValueError(f"{args.uri}: probe checks lpd://, lpds://, socket:// and "
                             "usb:// destinations only")
        step_timeout = float(args.timeout) if args.timeout.isdigit() \
            else parse_duration(args.timeout)
        if step_timeout <= 0:
            raise ValueError(f"--timeout must be more than 0s, got {args.timeout!r}")
    except ValueError as exc:
        print(f"lpd-relay: {exc}", file=sys.stderr)
        return 2
    if dest.scheme in ("lpd", "lpds"):
        report = trio.run(partial(run_probe, dest, send=not args.no_print,
                                  all_modes=args.all_modes, step_timeout=step_timeout))
    else:
        from relay.probelocal import run_local_probe  # it imports this module
        report = trio.run(partial(run_local_probe, dest, step_timeout=step_timeout))
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report) + b"\n")
        sys.stdout.flush()
    else:
        sys.stdout.write(render(report))
    return 0 if report.ok else 1
