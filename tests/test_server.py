"""The inbound server on real loopback sockets: every sender dialect of SPEC §4.2,
every refusal of §4.3, limits, lpq/lprm, and no debris left behind."""

from __future__ import annotations

import json
import re
import socket
import time
from pathlib import Path

import orjson
import pytest

from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Job, Wire, send_job, start_data_file


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def delivered(out: Path, queue: str, n: int = 1,
              timeout: float = 10.0) -> list[dict]:  # type: ignore[type-arg]
    folder = out / queue

    def ready() -> list[dict] | None:  # type: ignore[type-arg]
        metas = sorted(folder.glob("*.json")) if folder.exists() else []
        return [orjson.loads(p.read_bytes()) for p in metas] if len(metas) >= n else None
    return wait_for(ready, timeout)


def spool_files(tmp_path: Path) -> list[Path]:
    """Files of jobs in the spool (its lock and id counter are not jobs)."""
    return [p for p in (tmp_path / "spool" / "jobs").rglob("*") if p.is_file()]


def file_bytes(meta: dict) -> list[bytes]:  # type: ignore[type-arg]
    return [Path(f["path"]).read_bytes() for f in meta["files"]]


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path)) as daemon:
        yield daemon


@pytest.mark.parametrize(("order", "mode"), [
    ("control-first", "count"), ("data-first", "count"), ("control-first", "zero"),
    ("control-first", "windows"), ("control-first", "cups"),
])
def test_every_sender_dialect_is_delivered_byte_exact(relay, tmp_path, order, mode):  # type: ignore[no-untyped-def]
    payload = bytes(range(256)) * 100 + b"end"
    replies = send_job(relay.port, Job(files=[payload]), order=order, mode=mode)
    assert replies and all(r == 0 for r in replies), replies
    (meta,) = delivered(tmp_path / "out", "q")
    assert meta["user"] == "alice" and meta["queue"] in ("q", "*")
    assert file_bytes(meta) == [payload]
    assert meta["files"][0]["bytes"] == len(payload)


def test_several_data_files_six_digit_number_and_ip_host(relay, tmp_path):  # type: ignore[no-untyped-def]
    files = [b"first file\n", b"second file\n" * 1000, b"third\n"]
    assert all(r == 0 for r in send_job(relay.port, Job(number="123456", files=files)))
    assert all(r == 0 for r in send_job(relay.port, Job(number="042", host="192.168.1.5")))
    metas = delivered(tmp_path / "out", "q", 2)
    by_number = {m["number"]: m for m in metas}
    assert file_bytes(by_number["123456"]) == files
    assert by_number["042"]["host"] == "192.168.1.5"


def test_missing_trailing_nul_before_half_close_is_kept(relay, tmp_path):  # type: ignore[no-untyped-def]
    job = Job(files=[b"no nul follows"])
    with Wire(relay.port) as w:
        start_data_file(w, job)
        w.send(job.files[0])
        w.half_close()
        assert w.reply() == 0
    (meta,) = delivered(tmp_path / "out", "q")
    assert file_bytes(meta) == [b"no nul follows"]


def test_two_jobs_in_one_session(relay, tmp_path):  # type: ignore[no-untyped-def]
    with Wire(relay.port) as w:
        w.send(b"\x02q\n")
        assert w.reply() == 0
        for number in ("101", "102"):
            job = Job(number=number, files=[number.encode() * 10])
            for code, name, data in ((b"\x02", job.cf_name, job.control()),
                                     (b"\x03", job.df_names()[0], job.files[0])):
                w.send(code + f"{len(data)} {name}\n".encode())
                assert w.reply() == 0
                w.send(data + b"\x00")
                assert w.reply() == 0
    metas = delivered(tmp_path / "out", "q", 2)
    assert sorted(m["number"] for m in metas) == ["101", "102"]


def refused(port: int, stream: bytes) -> tuple[int, bytes]:
    """Send ``stream``; return the first byte the server answered and the rest.

    (-1, b"") when it closed without a word — by FIN or, since it did not read
    what we sent, by a reset.
    """
    with Wire(port) as w:
        try:
            w.send(stream)
            data = w.read_all()
        except ConnectionResetError:
            return -1, b""
    return (data[0] if data else -1), data[1:]


def test_hostile_names_and_lines_are_refused_and_server_keeps_serving(relay, tmp_path):  # type: ignore[no-untyped-def]
    hostile = [
        b"\x02q\n\x02" + b"10 ../../etc/passwd\n",
        b"\x02q\n\x0310 dfA001/evil\n",
        b"\x02q\n\x0310 .hidden\n",
        b"\x02q\n\x02" + b"9" * 2000 + b"\n",
        b"\x09garbage\n",
        b"\x02" + b"q" * 5000 + b"\n",
    ]
    for stream in hostile:
        code, _ = refused(relay.port, stream)
        # 0x00 may precede the refusal (the 02 queue line itself was fine).
        assert code in (0x00, 0x03), (stream[:20], code)
    assert relay.metric("lpdrelay_jobs_rejected_total", reason="malformed") >= len(hostile)
    assert all(r == 0 for r in send_job(relay.port, Job()))
    delivered(tmp_path / "out", "q")
    wait_for(lambda: not spool_files(tmp_path) or None)


def test_truncated_job_is_discarded_never_delivered(relay, tmp_path):  # type: ignore[no-untyped-def]
    job = Job(files=[b"x" * 1000])
    with Wire(relay.port) as w:
        start_data_file(w, job)
        w.send(b"x" * 10)
    wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="malformed") >= 1)
    wait_for(lambda: not spool_files(tmp_path) or None)
    assert not (tmp_path / "out" / "q").exists()


def test_unknown_queue_exact_names_configured_name(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, server={"queue_names": "exact"},
                       queues={"Ward3": {"destinations": [f"dir://{tmp_path / 'out'}"]}})
    with DaemonThread(cfg) as relay:
        code, message = refused(relay.port, b"\x02ward3\n")
        assert code == 0x01
        assert b"ward3" in message and b"Ward3" in message and message.endswith(b"\n")
        assert all(r == 0 for r in send_job(relay.port, Job(queue="Ward3")))
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="unknown_queue") == 1


def test_case_insensitive_routing_and_aliases(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, queues={"ward3": {
        "aliases": ["HP_Ward3"], "destinations": [f"dir://{tmp_path / 'out'}"]}})
    with DaemonThread(cfg) as relay:
        for name in ("WARD3", "hp_ward3"):
            assert all(r == 0 for r in send_job(relay.port, Job(queue=name)))
        metas = delivered(tmp_path / "out", "ward3", 2)
        assert {m["wire_queue"] for m in metas} == {"WARD3", "hp_ward3"}


def test_job_over_max_job_size_is_refused(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"max_job_size": "4KiB"})) as relay:
        replies = send_job(relay.port, Job(files=[b"y" * 10000]))
        assert replies[-1] == 0x03
        replies = send_job(relay.port, Job(files=[b"y" * 10000]), mode="zero")
        assert replies[-1] in (0x03, -1)
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="too_large") == 2
        wait_for(lambda: not spool_files(tmp_path) or None)


def test_disk_below_min_free_gets_retry_later(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"min_free_disk": "1000TiB"})) as relay:
        code, _ = refused(relay.port, b"\x02q\n")
        assert code == 0x02
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="disk_full") == 1


def test_acl_closes_without_reading(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"allow": ["10.0.0.0/8"]})) as relay:
        code, rest = refused(relay.port, b"\x02q\n")
        assert (code, rest) == (-1, b"")
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="acl") == 1


def test_reserved_port_required(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"require_reserved_port": True})) as relay:
        code, message = refused(relay.port, b"\x02q\n")
        assert code == 0x01 and b"1024" in message


def test_idle_client_is_dropped_and_partial_discarded(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"idle_timeout": "500ms"})) as relay:
        with Wire(relay.port) as w:
            w.send(b"\x02q\n")
            assert w.reply() == 0
            w.send(b"\x03100 dfA001client\n")
            assert w.reply() == 0
            w.send(b"x" * 10)   # then silence: a slowloris
            start = time.monotonic()
            assert w.read_all() == b""
            assert time.monotonic() - start < 5
        assert relay.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 1
        wait_for(lambda: not spool_files(tmp_path) or None)


def test_lpq_lists_waiting_jobs_and_lprm_removes(tmp_path):  # type: ignore[no-untyped-def]
    # A destination that refuses connections keeps the jobs in the spool.
    cfg = relay_config(tmp_path, queues={"ward3": {"destinations": ["socket://127.0.0.1:1"]}},
                       retry={"initial": "1h", "max": "1h", "give_up_after": "24h"})
    with DaemonThread(cfg) as relay:
        for number, user in (("201", "alice"), ("202", "bob")):
            assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3", number=number,
                                                                user=user)))
        _, short = refused(relay.port, b"\x03ward3\n")
        text = bytes([_]) + short if _ >= 0 else b""
        assert b"201" in text and b"202" in text and b"alice" in text
        assert b"socket://127.0.0.1:1" in text
        _, long_ = refused(relay.port, b"\x04ward3\n")
        assert b"spool id" in bytes([_]) + long_
        _, removal = refused(relay.port, b"\x05ward3 bob 202\n")
        assert b"dequeued" in bytes([_]) + removal
        _, after = refused(relay.port, b"\x03ward3\n")
        after = bytes([_]) + after
        # Job numbers as lpq's job column shows them: the DOWN line's retry
        # time (1h +- jitter, e.g. "2028 s") may contain the digits too.
        listed = re.findall(rb"^\S+\s+\S+\s+(\d+)\s", after, re.M)
        assert b"202" not in listed and b"201" in listed
        _, none = refused(relay.port, b"\x05ward3 mallory 201\n")
        assert b"no matching jobs" in bytes([_]) + none


def test_many_concurrent_connections(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"max_connections": 50})) as relay:
        socks = []
        try:
            for _ in range(300):
                s = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
                socks.append(s)
            # Beyond max_connections the server neither crashes nor lets clients
            # hang: they are told to retry later, and a fresh client is served
            # once slots free up.
            for s in socks[:299]:
                s.close()
            assert all(r == 0 for r in send_job(relay.port, Job()))
        finally:
            for s in socks:
                s.close()
        delivered(tmp_path / "out", "q")
        assert relay.bound is not None


def test_hot_folder_metadata_keys(relay, tmp_path):  # type: ignore[no-untyped-def]
    send_job(relay.port, Job(title="quarterly"))
    (meta,) = delivered(tmp_path / "out", "q")
    for key in ("job", "queue", "user", "host", "title", "received", "files"):
        assert key in meta, key
    assert json.dumps(meta)  # plain JSON types only
    assert not [p for p in (tmp_path / "out" / "q").iterdir() if p.name.startswith(".")]


def test_thousand_concurrent_connections_all_served(tmp_path):  # type: ignore[no-untyped-def]
    import trio

    from relay.loadgen import run_load
    from relay.uri import parse_destination
    cfg = relay_config(tmp_path, server={"max_connections_per_host": 2000})
    with DaemonThread(cfg) as relay:
        dest = parse_destination(f"lpd://127.0.0.1:{relay.port}/q")
        result = trio.run(lambda: run_load(dest, jobs=1000, concurrency=1000, size=512))
        assert result.ok == 1000, result.failures
        delivered(tmp_path / "out", "q", 1000, timeout=120)
        assert relay.metric("lpdrelay_jobs_received_total", queue="*") == 1000


def test_per_host_connection_limit_says_retry_later(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"max_connections_per_host": 3})) as relay:
        idle = [Wire(relay.port) for _ in range(3)]
        try:
            wait_for(lambda: relay.metric("lpdrelay_inbound_connections") >= 3)
            code, message = refused(relay.port, b"\x02q\n")
            assert code == 0x02 and b"too many connections" in message
        finally:
            for w in idle:
                w.close()
        wait_for(lambda: relay.metric("lpdrelay_inbound_connections") == 0)
        assert all(r == 0 for r in send_job(relay.port, Job()))


def test_listens_on_ipv4_and_ipv6(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, server={"listen": ["127.0.0.1:0", "[::1]:0"]})
    with DaemonThread(cfg) as relay:
        assert relay.bound is not None
        (host4, port4), (host6, port6) = relay.bound.lpd
        assert host4 == "127.0.0.1" and host6 == "::1"
        with Wire(port6, host="::1") as w:
            w.send(b"\x02q\n")
            assert w.reply() == 0
        assert all(r == 0 for r in send_job(port4, Job()))
        delivered(tmp_path / "out", "q")


def test_print_waiting_command_wakes_a_backed_off_queue(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, queues={"ward3": {"destinations": ["socket://127.0.0.1:1"]}},
                       retry={"initial": "1h", "max": "1h", "give_up_after": "24h"})
    with DaemonThread(cfg) as relay:
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3")))
        dest = "socket://127.0.0.1:1"
        wait_for(lambda: relay.metric("lpdrelay_delivery_attempts_total", destination=dest,
                                      result="retry") == 1)
        code, _ = refused(relay.port, b"\x01ward3\n")   # lpc start / "print waiting jobs"
        assert code == 0
        # Backoff reset: the job is tried again at once instead of in an hour.
        wait_for(lambda: relay.metric("lpdrelay_delivery_attempts_total", destination=dest,
                                      result="retry") == 2)


def test_beyond_max_connections_a_client_is_told_at_once(tmp_path):  # type: ignore[no-untyped-def]
    with DaemonThread(relay_config(tmp_path, server={"max_connections": 3})) as relay:
        held = [Wire(relay.port) for _ in range(3)]
        try:
            wait_for(lambda: relay.metric("lpdrelay_inbound_connections") >= 3)
            start = time.monotonic()
            code, message = refused(relay.port, b"\x02q\n")
            assert code == 0x02 and b"max_connections" in message and message.endswith(b"\n")
            assert time.monotonic() - start < 3
        finally:
            for w in held:
                w.close()
        wait_for(lambda: relay.metric("lpdrelay_inbound_connections") == 0)
        assert all(r == 0 for r in send_job(relay.port, Job()))


def _trickle(w: Wire, data: bytes, pause: float, budget: float) -> float:
    """Send ``data`` a byte at a time until the server closes; seconds it took."""
    start = time.monotonic()
    try:
        for byte in data:
            w.send(bytes([byte]))
            time.sleep(pause)
            assert time.monotonic() - start < budget, "trickling client never dropped"
        return time.monotonic() - start
    except (BrokenPipeError, ConnectionResetError):
        return time.monotonic() - start


def test_a_trickled_command_line_hits_command_timeout(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, server={"idle_timeout": "5s", "command_timeout": "600ms"})
    with DaemonThread(cfg) as relay, Wire(relay.port) as w:
        w.send(b"\x02q\n")
        assert w.reply() == 0
        # A byte every 100 ms never trips the 5 s idle_timeout.
        took = _trickle(w, b"\x03100 dfA001client" * 10, pause=0.1, budget=4)
        assert took < 3
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 1)
        wait_for(lambda: not spool_files(tmp_path) or None)


def test_a_trickled_data_file_hits_min_transfer_rate(tmp_path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, server={"idle_timeout": "5s", "command_timeout": "500ms",
                                         "min_transfer_rate": "100B"})
    with DaemonThread(cfg) as relay, Wire(relay.port) as w:
        start_data_file(w, Job(files=[b"x" * 100_000]))
        # 20 bytes/s, a fifth of the rate asked for; each byte well inside idle_timeout.
        took = _trickle(w, b"x" * 100_000, pause=0.05, budget=4)
        assert took < 3
        wait_for(lambda: relay.metric("lpdrelay_jobs_rejected_total", reason="timeout") == 1)
        wait_for(lambda: not spool_files(tmp_path) or None)
    # A sender at a fair rate is not cut: 400 bytes in 1 s with a 100 B/s floor.
    with DaemonThread(cfg) as relay, Wire(relay.port) as w:
        job = Job(files=[b"y" * 400])
        start_data_file(w, job)
        for i in range(0, 400, 40):
            w.send(job.files[0][i:i + 40])
            time.sleep(0.1)
        w.send(b"\x00")
        assert w.reply() == 0
        delivered(tmp_path / "out", "q")
