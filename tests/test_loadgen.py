"""The load generator's fast path (relay.loadgenfast) against a trivial acker and the relay.

The acker (tests.lpdacker) answers 0x00 to everything and counts jobs and
bytes, so these check that every job arrives whole and that the generator's
own CPU per job is what it reports; the relay checks the bytes on the wire are
a real job (plain and over TLS); refusals, closed ports and silent peers give
the failure keys the summary shows.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import trio

from relay import client
from relay.loadgen import LoadResult, load, run_load
from relay.loadgenfast import JobSteps, job_steps
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.lpdacker import Acker
from tests.test_server import delivered
from tests.tlspki import make_pki


@pytest.mark.parametrize(("mode", "order"), [("count", "control-first"),
                                              ("count", "data-first"),
                                              ("stream", "data-first")])
def test_job_steps_are_the_clients_job(mode: str, order: str) -> None:
    data = b"page\n" * 10
    cf, control, (df,) = client.build_job([client.OutFile(name="loadgen", size=len(data),
                                                            data=data)],
                                          user="loadgen", title="load 1234", host="h",
                                          number=1234)
    steps = [b"".join(s) for s in job_steps(1234, queue="q", host="h", data=data, mode=mode,
                                            order=order)]
    ctl = [b"\x02%d %s\n" % (len(control), cf.encode()), control + b"\0"]
    dat = [(b"\x03%d %s\n" % (len(data) if mode == "count" else 0, df.name.encode())),
           data + (b"\0" if mode == "count" else b"")]
    body = ctl + dat if order == "control-first" or mode != "count" else dat + ctl
    assert steps == [b"\x02q\n", *body]


@pytest.mark.parametrize("mode", ["count", "stream"])
def test_one_builder_for_many_jobs_gives_each_its_own(mode: str) -> None:
    data = b"x" * 70_000        # above 64 KiB: the data and its NUL are two strings
    steps = JobSteps(queue="q", host="host-1", data=data, mode=mode, order="data-first")
    for n in (*range(0, 2500, 7), 999, 1000, 1001, 123456):
        cf, control, (df,) = client.build_job(
            [client.OutFile(name="loadgen", size=len(data), data=data)], user="loadgen",
            title=f"load {n}", host="host-1", number=n)
        dat = [b"\x03%d %s\n" % (len(data) if mode == "count" else 0, df.name.encode()),
               data + (b"\0" if mode == "count" else b"")]
        ctl = [b"\x02%d %s\n" % (len(control), cf.encode()), control + b"\0"]
        assert [b"".join(s) for s in steps(n)] == [b"\x02q\n", *(dat + ctl if mode == "count"
                                                                 else ctl + dat)]


def test_fast_path_against_the_acker_counts_every_job_and_its_cpu() -> None:
    with Acker() as acker:
        uri = f"lpd://127.0.0.1:{acker.port}/q"
        result = load(uri, jobs=2000, concurrency=32, size=1024)
        jobs, taken = acker.counts()
    assert (result.ok, result.failures, jobs, taken) == (2000, {}, 2000, 2000 * 1024)
    summary = result.summary()
    assert summary["jobs_per_second"] > 0 and result.percentile(99) > 0
    # The trio path spends 0.5-1 ms a job; the fast path about 0.1 (docs/benchmarks.md).
    assert 0 < result.cpu_ms_per_job < 0.4, summary


def test_fast_path_sends_large_jobs_whole() -> None:
    with Acker() as acker:
        result = load(f"lpd://127.0.0.1:{acker.port}/q", jobs=4, concurrency=2,
                      size=3 << 20)
        assert acker.counts() == (4, 4 * (3 << 20))
    assert (result.ok, result.bytes) == (4, 4 * (3 << 20))


@pytest.mark.parametrize("mode", ["count", "stream"])
def test_fast_path_into_the_relay(tmp_path: Path, mode: str) -> None:
    out = tmp_path / "out"
    with DaemonThread(relay_config(tmp_path, queues={"q": {"destinations": [f"dir://{out}"]}})
                      ) as relay:
        result = load(f"lpd://127.0.0.1:{relay.port}/q", jobs=30, concurrency=4,
                      size=2000, mode=mode)
        metas = delivered(out, "q", n=30)
    assert (result.ok, result.failures) == (30, {})
    titles = sorted(m["title"] for m in metas)
    assert titles == sorted(f"load {n}" for n in range(30))


def _tls_relay(tmp: Path) -> tuple[DaemonThread, str]:
    pki = make_pki(tmp / "pki")
    cfg = relay_config(
        tmp, server={"listen_tls": ["127.0.0.1:0"]},
        tls={"cert": pki.path("server.pem"), "key": pki.path("server.key"),
             "client_ca": pki.path("ca.pem"), "peers": {"branch-7.example.org": ["q"]}},
        queues={"q": {"destinations": [f"dir://{tmp / 'out'}"]}})
    query = f"ca={pki.path('ca.pem')}&cert={pki.path('branch-7.pem')}" \
            f"&key={pki.path('branch-7.key')}"
    return DaemonThread(cfg), query


def test_fast_and_trio_paths_over_mutual_tls(tmp_path: Path) -> None:
    relay, query = _tls_relay(tmp_path)
    with relay:
        assert relay.bound is not None
        uri = f"lpds://127.0.0.1:{relay.bound.lpd[-1][1]}/q?{query}"
        fast = load(uri, jobs=20, concurrency=4, size=1024)

        async def slow() -> LoadResult:
            with trio.fail_after(60):
                return await run_load(parse_destination(uri), jobs=5, concurrency=2,
                                      size=100, first=100)
        trio_result = trio.run(slow)
        metas = delivered(tmp_path / "out", "q", n=25)
    assert (fast.ok, fast.failures) == (20, {})
    assert trio_result.ok == 5
    assert len(metas) == 25 and {m["tls_peer"] for m in metas} == {"branch-7.example.org"}


def test_tls_against_a_plain_port_fails_as_tls(tmp_path: Path) -> None:
    relay, query = _tls_relay(tmp_path)
    with relay:
        result = load(f"lpds://127.0.0.1:{relay.port}/q?{query}", jobs=3, concurrency=3,
                      size=10, io_timeout=5)
    assert result.ok == 0 and sum(result.failures.values()) == 3, result.failures


def _server(answer: bytes | None) -> tuple[socket.socket, threading.Thread]:
    """A listener answering ``answer`` to the first bytes of each connection, or silent."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        held = []
        for _ in range(3):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(100)
            if answer is not None:
                conn.sendall(answer)
                conn.close()
            else:
                held.append(conn)
        for conn in held:
            conn.recv(100)         # until the generator gives up and closes
            conn.close()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(("answer", "key"), [(b"\x01no such queue\n", "0x01"),
                                             (b"\x02", "0x02"), (b"", "closed"),
                                             (None, "timeout")])
def test_failures_by_reply(answer: bytes | None, key: str) -> None:
    listener, thread = _server(answer)
    with listener:
        result = load(f"lpd://127.0.0.1:{listener.getsockname()[1]}/q", jobs=3,
                      concurrency=3, size=10, io_timeout=1.0)
        thread.join(15)
    assert (result.ok, result.failures) == (0, {key: 3})


def test_a_closed_port_is_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = load(f"lpd://127.0.0.1:{port}/q", jobs=5, concurrency=2, size=10)
    assert (result.ok, result.failures) == (0, {"refused": 5})
