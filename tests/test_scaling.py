"""Two relay instances behind one HAProxy frontend, one killed with kill -9 (SPEC §9).

Each instance has its own spool; HAProxy (``send-proxy-v2``, round robin,
``option redispatch``) spreads the jobs.  The destination — LPRng's lpd —
is down at first, so both spools hold acknowledged jobs when instance A is
killed.  New jobs then go to B (a sender sees at most a retryable failure,
and retries); once A is restarted and the destination is up, every job
acknowledged by either instance arrives exactly once.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from tests.daemon import relay_config, write_config_file
from tests.peers import HAProxy, LprngServer, free_port
from tests.relayproc import LoggedRelay
from tests.test_tls import job_stream

pytestmark = pytest.mark.peers

JOBS_BEFORE, JOBS_AFTER = 20, 20


def send(port: int, payload: bytes, tries: int = 5) -> int:
    """Send one job through the balancer, retrying a refused attempt; the failures seen."""
    for failures in range(tries):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10,
                                          source_address=("127.0.0.2", 0)) as s:
                s.sendall(job_stream("q", payload))
                got = b""
                while len(got) < 5 and (chunk := s.recv(16)):
                    got += chunk
            if got == b"\0" * 5:
                return failures
        except OSError:
            pass
    raise AssertionError(f"job {payload!r} not accepted in {tries} tries")


def logged(relays: list[LoggedRelay], total: int) -> list[int]:
    """Each instance's ``job_received`` count, once its log lines reached us.

    The lines come through a pipe read by a thread, so the last job's line can
    still be on its way when its ack has come: wait (at most 5 s) until the
    counts add up to ``total`` or more, then let the caller check them exactly.
    """
    deadline = time.monotonic() + 5
    while True:
        counts = [len(relay.events("job_received")) for relay in relays]
        if sum(counts) >= total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def instance(tmp: Path, name: str, port: int, lpd_port: int) -> LoggedRelay:
    config = relay_config(
        tmp / name, server={"listen": [f"127.0.0.1:{port}"], "proxy_protocol": True,
                            "proxy_trusted": ["127.0.0.1/32"], "allow": ["127.0.0.2/32"]},
        queues={"q": {"destinations": [f"lpd://127.0.0.1:{lpd_port}/q?timeout=2s&reserve=none"]}},
        retry={"initial": "100ms", "max": "500ms"},
        log={"format": "json", "level": "debug"})   # job_received is a debug event
    return LoggedRelay(write_config_file(tmp / f"{name}.toml", config))


def test_two_instances_one_killed_every_job_arrives_once(tmp_path: Path) -> None:
    lpd = LprngServer(tmp_path / "lprng", ["q"], port=free_port())
    ports = [free_port(), free_port()]
    relays = [instance(tmp_path, n, p, lpd.port) for n, p in zip("ab", ports, strict=True)]
    with relays[0], relays[1], \
            HAProxy(tmp_path / "haproxy", ports) as balancer:
        for i in range(JOBS_BEFORE):
            assert send(balancer.port, b"job %d\n" % i) == 0
        spread = logged(relays, JOBS_BEFORE)
        assert spread[0] > 0 and spread[1] > 0 and sum(spread) == JOBS_BEFORE
        relays[0].kill9()                       # acknowledged, undelivered jobs in its spool
        failures = sum(send(balancer.port, b"job %d\n" % i)
                       for i in range(JOBS_BEFORE, JOBS_BEFORE + JOBS_AFTER))
        assert logged([relays[1]], spread[1] + JOBS_AFTER) == [spread[1] + JOBS_AFTER]
        with lpd:
            restarted = instance(tmp_path, "a", ports[0], lpd.port)
            with restarted:
                jobs = lpd.wait_jobs("q", JOBS_BEFORE + JOBS_AFTER, timeout=60)
                payloads = sorted(j.files[0].data for j in jobs)
        assert payloads == sorted(b"job %d\n" % i for i in range(JOBS_BEFORE + JOBS_AFTER))
    print(f"spread before the kill: {spread}; sender failures after it: {failures}")
