"""Server-level fuzzing: the real relay process against thousands of mutated and
edge-case sessions (seeded, bounded in count and time).  After each batch it must
still answer, take and deliver a normal job, keep no debris in its spool and have
logged no traceback (issue: one connection can never stop the server)."""

from __future__ import annotations

import random
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.daemon import RelayProcess, relay_config, write_config_file
from tests.lpdwire import CUPS_STREAM_LENGTH, WINDOWS_LENGTH, Job
from tests.test_connection_faults import assert_healthy, log_wrapper

BATCH = 250


def _file(code: bytes, name: str, data: bytes, length: int | None = None) -> bytes:
    count = len(data) if length is None else length
    return code + f"{count} {name}\n".encode() + data


def valid_session(rng: random.Random) -> bytes:
    """One job as some real sender writes it (FIELD-NOTES "Senders")."""
    job = Job(queue=rng.choice(["q", "Q", "ward3", "lp"]), number=f"{rng.randint(0, 999):03d}",
              host=rng.choice(["client", "10.1.2.3", "h"]),
              files=[rng.randbytes(rng.randint(0, 2000)) for _ in range(rng.randint(1, 3))])
    cf = job.control()
    if rng.random() < 0.2:
        cf = cf.replace(b"\n", b"\r\n")
    parts = [_file(b"\x02", job.cf_name, cf) + b"\x00"]
    names = job.df_names()
    mode = rng.choice(["count", "count", "zero", "windows", "cups", "nonul"])
    for i, data in enumerate(job.files):
        last = i == len(job.files) - 1
        if last and mode in ("zero", "windows", "cups"):
            length = {"zero": 0, "windows": WINDOWS_LENGTH, "cups": CUPS_STREAM_LENGTH}[mode]
            parts.append(_file(b"\x03", names[i], data, length))
        else:
            parts.append(_file(b"\x03", names[i], data) + (b"" if mode == "nonul" else b"\x00"))
    if rng.random() < 0.5:   # data first: the control file goes last (unless streamed)
        parts = parts[1:] + parts[:1] if mode not in ("zero", "windows", "cups") else parts
    return b"\x02" + job.queue.encode() + b"\n" + b"".join(parts)


def _splice(rng: random.Random, s: bytes, insert: bytes) -> bytes:
    at = rng.randint(0, len(s))
    return s[:at] + insert + s[at:]


def _huge_count(rng: random.Random, s: bytes) -> bytes:
    count = rng.choice([b"99999999999999999999999", b"-1", b"4294967296", b"2147483647",
                        b"1048577", b"0", b"18446744073709551616", b"1e9", b" 5"])
    at = s.find(b"\x03", 3)
    if at < 0:
        return s
    end = s.find(b" ", at)
    return s[:at + 1] + count + s[end:] if end > 0 else s


def _bad_name(rng: random.Random, s: bytes) -> bytes:
    bad = rng.choice([b"../../etc/passwd", b"dfA001/evil", b".hidden", b"dfA" + b"x" * 300,
                      b"dfA001\x01h", b"dfA001\xc3\xa9\x9b", b"", b"cfA001h dfB", b"/abs"])
    at = s.rfind(b" ", 0, rng.randint(1, len(s)))
    end = s.find(b"\n", at)
    return s[:at + 1] + bad + s[end:] if at > 0 and end > 0 else s


def _many_files(rng: random.Random, s: bytes) -> bytes:
    n = rng.choice([1030, 200])
    return b"\x02q\n" + b"".join(_file(b"\x03", f"dfA{i:03d}h", b"x") + b"\x00" for i in range(n))


def _command(rng: random.Random, s: bytes) -> bytes:
    code = rng.choice([b"\x01", b"\x03", b"\x04", b"\x05", b"\x06", b"\x07", b"\x00", b"\xff"])
    words = [rng.choice([b"q", b"root", b"-all", b"all", b"alice", b"123", rng.randbytes(5)])
             for _ in range(rng.randint(0, 6))]
    return code + rng.choice([b"q", b"*", b"", rng.randbytes(8)]) + b" " + b" ".join(words) + b"\n"


MUTATIONS: list[Callable[[random.Random, bytes], bytes]] = [
    lambda rng, s: s,                                                      # as sent
    lambda rng, s: s[:rng.randint(0, len(s))],                             # truncated
    lambda rng, s: bytes(b ^ (1 << rng.randrange(8)) if rng.random() < 0.01 else b
                         for b in s),                                      # byte flips
    lambda rng, s: _splice(rng, s, rng.randbytes(rng.randint(1, 40))),     # garbage inside
    lambda rng, s: _splice(rng, s, rng.choice([b"\x03q\n", b"\x05q root all\n",
                                               b"\x01\n", b"\x02q\n", b"\x01q\n"])),
    _huge_count, _bad_name, _command,
    lambda rng, s: s + s[rng.randint(0, len(s)):],                         # a tail re-sent
    lambda rng, s: rng.randbytes(rng.randint(0, 3000)),                    # noise
    lambda rng, s: s.replace(b"\n", b"\r\n"),
    lambda rng, s: b"\x02" + rng.randbytes(rng.randint(1, 30)) + b"\n" + s[3:],
]


def run_session(port: int, stream: bytes, rng: random.Random) -> int:
    """Send it all, end the stream; the first byte answered (-1: none). Bounded."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(stream)
            if rng.random() < 0.85:
                s.shutdown(socket.SHUT_WR)
            else:
                return -2                                   # just go away
            first, deadline = -1, time.monotonic() + 10
            while data := s.recv(65536):
                if first < 0:
                    first = data[0]
                assert time.monotonic() < deadline, "the relay kept a finished session open"
            return first
        except (ConnectionResetError, BrokenPipeError):
            return -3


def fuzz(tmp_path: Path, sessions: int, budget: float, seed: int) -> Counter[int]:
    log = tmp_path / "relay.log"
    data = relay_config(tmp_path, server={
        "max_job_size": "1MiB", "idle_timeout": "3s", "command_timeout": "2s",
        "max_connections_per_host": 10000, "graceful_timeout": "1s"},
        metrics={"listen": ""}, log={"format": "json", "level": "warning"})
    cfg = write_config_file(tmp_path / "relay.toml", data)
    rng = random.Random(seed)
    answers: Counter[int] = Counter()
    start = time.monotonic()
    with RelayProcess(cfg, wrapper=log_wrapper(log)) as relay:
        done = 0
        while done < sessions and time.monotonic() - start < budget:
            for _ in range(BATCH):
                base = valid_session(rng)
                mutate = _many_files if rng.random() < 0.005 else rng.choice(MUTATIONS)
                answers[run_session(relay.port, mutate(rng, base), rng)] += 1
                done += 1
            assert_healthy(relay, tmp_path, log, f"{done % 1000:03d}")
    answers[-100] = done   # the number of sessions, for the report
    return answers


def test_fuzzed_sessions_never_stop_the_relay(tmp_path: Path) -> None:
    answers = fuzz(tmp_path, sessions=2000, budget=25, seed=1179)
    assert answers[-100] >= 1000, answers
    assert answers[0] and answers[3], answers   # both accepted and refused jobs occurred


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzzed_sessions_never_stop_the_relay_long(tmp_path: Path) -> None:
    answers = fuzz(tmp_path, sessions=20000, budget=420, seed=515)
    assert answers[-100] >= 10000, answers
