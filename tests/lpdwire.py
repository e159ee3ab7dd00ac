"""Hand-built LPD byte streams and a blocking wire client for server tests.

Deliberately independent of ``relay._core``'s client builders: the server is
tested against bytes written out here the way each real sender writes them
(FIELD-NOTES "Senders"), not against our own serializer.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

WINDOWS_LENGTH = 125899906843000
CUPS_STREAM_LENGTH = 999999999999


def control_file(*, host: str = "client", user: str = "alice", title: str = "report",
                 data_names: tuple[str, ...] = ("dfA123client",), fmt: str = "l") -> bytes:
    lines = [f"H{host}", f"P{user}", f"J{title}", f"L{user}"]
    for name in data_names:
        lines += [f"{fmt}{name}", f"U{name}", f"N{title}"]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Job:
    queue: str = "q"
    number: str = "123"
    host: str = "client"
    files: list[bytes] = field(default_factory=lambda: [b"hello, printer\n"])
    user: str = "alice"
    title: str = "report"

    @property
    def cf_name(self) -> str:
        return f"cfA{self.number}{self.host}"

    def df_names(self) -> tuple[str, ...]:
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
        return tuple(f"df{letters[i]}{self.number}{self.host}" for i in range(len(self.files)))

    def control(self) -> bytes:
        return control_file(host=self.host, user=self.user, title=self.title,
                            data_names=self.df_names())


class Wire:
    """A blocking client socket with short timeouts, for scripted conversations."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 source_port: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.settimeout(timeout)
        if source_port is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, source_port))
        self.sock.connect((host, port))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> int:
        """One reply byte; -1 when the server closed instead."""
        data = self.sock.recv(1)
        return data[0] if data else -1

    def read_all(self, limit: int = 1 << 20) -> bytes:
        chunks = []
        total = 0
        while total < limit:
            data = self.sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            total += len(data)
        return b"".join(chunks)

    def half_close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_job(port: int, job: Job, *, order: str = "control-first", mode: str = "count",
             nul: bool = True) -> list[int]:
    """Send one job the way a sender in ``mode`` does; return every reply byte.

    mode: "count" (exact lengths), "zero" (LPRng stdin: length 0), "windows"
    (fake 125899906843000, no NUL, half-close), "cups" (999999999999, no NUL).
    In the until-EOF modes the last data file runs to the half-close.
    """
    replies = []
    with Wire(port) as w:
        w.send(b"\x02" + job.queue.encode() + b"\n")
        replies.append(w.reply())
        if replies[-1] != 0:
            return replies
        cf = job.control()
        parts = [("cf", job.cf_name, cf)] + [("df", n, d) for n, d in
                                             zip(job.df_names(), job.files, strict=True)]
        if order == "data-first":
            parts = parts[1:] + parts[:1]
        for i, (kind, name, data) in enumerate(parts):
            last = i == len(parts) - 1
            streamed = kind == "df" and last and mode != "count"
            length = {"zero": 0, "windows": WINDOWS_LENGTH,
                      "cups": CUPS_STREAM_LENGTH}.get(mode, len(data)) if streamed else len(data)
            code = b"\x02" if kind == "cf" else b"\x03"
            w.send(code + str(length).encode() + b" " + name.encode() + b"\n")
            replies.append(w.reply())
            if replies[-1] != 0:
                return replies
            if streamed:
                w.send(data)
                w.half_close()
            else:
                w.send(data + (b"\x00" if nul else b""))
            replies.append(w.reply())
            if replies[-1] != 0:
                return replies
    return replies


def start_data_file(w: Wire, job: Job, length: int | None = None) -> None:
    """Send ``02 queue``, the control file and the first data file's header,
    checking every acknowledgement; the data file's bytes are the caller's."""
    w.send(b"\x02" + job.queue.encode() + b"\n")
    assert w.reply() == 0
    cf = job.control()
    w.send(f"\x02{len(cf)} {job.cf_name}\n".encode())
    assert w.reply() == 0
    w.send(cf + b"\x00")
    assert w.reply() == 0
    size = len(job.files[0]) if length is None else length
    w.send(f"\x03{size} {job.df_names()[0]}\n".encode())
    assert w.reply() == 0
