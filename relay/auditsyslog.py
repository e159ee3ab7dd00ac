"""Shipping the audit log to a syslog collector: RFC 5424 over TCP or TLS (RFC 5425).

The audit file itself is the buffer: ``SyslogShipper`` reads records from
the chain's files (``FILE.N`` … ``FILE``) in ``seq`` order and sends each as
one RFC 5424 message — the record's keys as structured data
``[lpdrelay@32473 …]`` and its JSON line as MSG — framed by octet counting
(RFC 5425 §4.3, which rsyslog's imtcp also reads over plain TCP).  Nothing is
kept in memory beyond the batch being sent, so a collector away for days
costs only the disk the audit log uses anyway.

Syslog over TCP has no acknowledgements.  What the collector's TCP stack
has acknowledged is known, though: a record counts as *confirmed* once the
socket's send queue (``SIOCOUTQ``) is empty after it was written and the
connection is still ESTABLISHED ``CONFIRM_GRACE`` later (an RST empties the
send queue too, and a collector stopping may drop what it had not read).
The last confirmed ``seq`` is kept in ``FILE.syslog``; after a reconnect (or
a restart) sending resumes after it.  The window for duplicates is what was
sent in the last ``CONFIRM_GRACE`` or not yet TCP-acknowledged when the
connection broke (duplicates carry the same ``seq``); a record is lost only
if the collector acknowledged it, stayed connected that long, and died
before storing it (docs/audit.md, "Shipping to syslog").
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import socket
import ssl
import struct
import termios
from collections import deque
from typing import Any

import orjson
import trio

from relay import log
from relay.audit import AuditLog
from relay.auditchain import rotated
from relay.config import AuditConfig
from relay.durablefiles import write_atomic
from relay.metrics import Metrics

__all__ = ["SyslogShipper", "frame"]

PRI = 85                 # facility 10 (security/authorization), severity 5 (notice): IHE ATNA
SD_ID = "lpdrelay@32473"  # 32473: the enterprise number RFC 5612 sets aside for examples
BATCH = 512              # records per send
RETRY_INITIAL, RETRY_MAX = 1.0, 30.0
# A record counts as delivered once the collector's TCP acknowledged it and the
# connection stayed up this long after (time for the collector to store it).
CONFIRM_GRACE = 2.0
POLL = 1.0               # look for records other processes appended, and for confirmations
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TCP_ESTABLISHED = 1    # linux/tcp_states.h
_SIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)   # same number as SIOCOUTQ on Linux


def _sd_value(value: object) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")
    return _CONTROL.sub("?", text)   # wire text must not end the message early


def frame(record: dict[str, Any], line: bytes, *, hostname: str, procid: int) -> bytes:
    """One record as an octet-counted RFC 5424 message (RFC 5425 §4.3)."""
    params = " ".join(f'{key}="{_sd_value(value)}"' for key, value in record.items())
    header = (f"<{PRI}>1 {record.get('ts', '-')} {hostname} lpd-relay {procid} "
              f"{str(record.get('event', '-'))[:32] or '-'} [{SD_ID} {params}] ")
    message = header.encode("utf-8") + line.rstrip(b"\n")
    return b"%d " % len(message) + message


class _Reader:
    """Records of the chain from ``next_seq`` on, read as they are appended (a tail -F)."""

    def __init__(self, path: str, next_seq: int) -> None:
        self.path = path
        self.next = next_seq
        self._file: Any = None
        self._rest = b""

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _locate(self) -> None:
        """Open the newest file whose first record is not after ``next`` (else the oldest)."""
        self.close()
        files = rotated(self.path)
        chosen = files[0] if files else None
        for file in reversed(files):
            with open(file, "rb") as f:
                first = f.readline()
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                if first.endswith(b"\n") and int(orjson.loads(first)["seq"]) <= self.next:
                    chosen = file
                    break
        if chosen is not None:
            self._file = open(chosen, "rb")  # noqa: SIM115 - kept open across reads
        self._rest = b""

    def _moved_on(self) -> bool:
        # The open file is no longer FILE (rotated, or an older one): the chain goes on elsewhere.
        try:
            return os.fstat(self._file.fileno()).st_ino != os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _advance(self) -> None:
        """From a file read to its end that is no longer FILE, on to the next newer one."""
        current = os.fstat(self._file.fileno()).st_ino
        files = rotated(self.path)
        for older, newer in itertools.pairwise(files):
            with contextlib.suppress(FileNotFoundError):
                if os.stat(older).st_ino == current:
                    self.close()
                    self._file = open(newer, "rb")  # noqa: SIM115 - kept open across reads
                    self._rest = b""
                    return
        self._locate()   # our file was dropped by rotate_keep meanwhile

    def read(self, limit: int = BATCH) -> list[tuple[dict[str, Any], bytes]]:
        """Up to ``limit`` whole records with seq >= ``next``; blocking file I/O (a thread)."""
        found: list[tuple[dict[str, Any], bytes]] = []
        for _ in range(2 * limit + 2):   # bounded: each pass reads a chunk or moves files
            if self._file is None:
                self._locate()
                if self._file is None:
                    return found
            chunk = self._file.read(1 << 16)
            if not chunk:
                if self._rest or not self._moved_on():
                    return found
                self._advance()
                continue
            lines = (self._rest + chunk).split(b"\n")
            self._rest = lines.pop()
            for line in lines:
                self._take(line + b"\n", found)
            if len(found) >= limit:
                return found
        return found

    def _take(self, line: bytes, found: list[tuple[dict[str, Any], bytes]]) -> None:
        try:
            record = orjson.loads(line)
            seq = int(record["seq"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return   # not a record: `audit verify` names it; shipping goes on
        if seq >= self.next:
            found.append((record, line))
            self.next = seq + 1


def established(sock: socket.socket) -> bool:
    """The TCP connection is ESTABLISHED: the collector has not closed or reset it."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] == _TCP_ESTABLISHED


def unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer's TCP has not acknowledged (SIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


class SyslogShipper:
    """Sends the audit log to ``[audit] syslog``; ``run`` until cancelled."""

    def __init__(self, audit: AuditLog, config: AuditConfig, metrics: Metrics | None = None
                 ) -> None:
        scheme, _, hostport = config.syslog.partition("://")
        host, _, port = hostport.rpartition(":")
        self.host, self.port, self.tls = host.strip("[]"), int(port), scheme == "tls"
        self.config = config
        self.audit = audit
        self.metrics = metrics
        self.state_path = audit.path + ".syslog"
        self.confirmed = self._load_state()
        self._wake = trio.Event()
        self.hostname = (socket.gethostname() or "-").split(" ")[0][:255]
        audit.on_written = self.wake

    def _load_state(self) -> int:
        try:
            with open(self.state_path, "rb") as f:
                return int(orjson.loads(f.read())["confirmed"])
        except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            return 0

    def _save_state(self) -> None:
        with contextlib.suppress(OSError):   # lost: only duplicates after a restart
            write_atomic(self.state_path, orjson.dumps({"confirmed": self.confirmed}),
                         fsync=False)

    def wake(self) -> None:
        self._wake.set()

    def _backlog(self) -> None:
        if self.metrics is not None:
            self.metrics.audit_syslog_backlog_records.set(
                max(0, self.audit.last_seq - self.confirmed))

    def _context(self) -> ssl.SSLContext:
        ca = os.fspath(self.config.syslog_ca) if self.config.syslog_ca else None
        context = ssl.create_default_context(cafile=ca)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.config.syslog_cert is not None:
            key = self.config.syslog_key
            context.load_cert_chain(os.fspath(self.config.syslog_cert),
                                    os.fspath(key) if key else None)
        return context

    async def run(self) -> None:
        """Connect, ship, and on any failure count it and reconnect with backoff."""
        delay = RETRY_INITIAL
        while True:
            self._backlog()
            try:
                shipped = await self._session()
            except Exception as exc:   # any failure: count, log, reconnect; never the daemon's
                shipped = False
                while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
                    exc = exc.exceptions[0]
                if self.metrics is not None:
                    self.metrics.audit_syslog_failures_total.inc()
                log.event("warning", "audit_syslog_failed", destination=self.config.syslog,
                          error=str(exc) or type(exc).__name__, retry_in=delay)
            delay = RETRY_INITIAL if shipped else min(RETRY_MAX, delay * 2)
            await trio.sleep(delay)

    async def _session(self) -> bool:
        tcp = await trio.open_tcp_stream(self.host, self.port)
        stream: trio.abc.Stream = tcp
        try:
            if self.tls:
                stream = trio.SSLStream(tcp, self._context(), server_hostname=self.host)
                await stream.do_handshake()
            log.event("info", "audit_syslog_connected", destination=self.config.syslog,
                      resume_after=self.confirmed)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_close, stream)
                await self._ship(stream, tcp.socket)
        finally:
            await trio.aclose_forcefully(stream)
        return True  # pragma: no cover - _ship returns only by raising

    async def _ship(self, stream: trio.abc.Stream, sock: Any) -> None:
        reader = _Reader(self.audit.path, self.confirmed + 1)
        sent = acked = self.confirmed
        grace: deque[tuple[float, int]] = deque()   # (when TCP-acknowledged, seq)
        try:
            while True:
                wake, self._wake = self._wake, trio.Event()
                batch = await trio.to_thread.run_sync(reader.read)
                if batch:
                    pid = os.getpid()
                    await stream.send_all(b"".join(
                        frame(rec, line, hostname=self.hostname, procid=pid)
                        for rec, line in batch))
                    sent = int(batch[-1][0]["seq"])
                now = trio.current_time()
                if sent > acked and established(sock) and unacknowledged(sock) == 0:
                    acked = sent
                    grace.append((now, sent))
                self._confirm(grace, now, sock)
                if len(batch) < BATCH:
                    timeout = 0.05 if sent > acked else CONFIRM_GRACE / 4 if grace else POLL
                    with trio.move_on_after(timeout):
                        await wake.wait()
        finally:
            reader.close()

    def _confirm(self, grace: deque[tuple[float, int]], now: float, sock: Any) -> None:
        """Records TCP-acknowledged ``CONFIRM_GRACE`` ago, the connection still up, are sent."""
        while grace and now - grace[0][0] >= CONFIRM_GRACE and established(sock):
            self.confirmed = grace.popleft()[1]
            self._save_state()
        self._backlog()


async def _watch_close(stream: trio.abc.Stream) -> None:
    """A collector sends nothing; end of stream means it went away (raise to reconnect)."""
    while await stream.receive_some(4096):
        pass
    raise trio.BrokenResourceError("the collector closed the connection")
