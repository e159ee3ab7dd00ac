"""Who may remove what (SPEC §12): a user removes only jobs sent from its own address;
root / -all removal and the release of every held job only from admin_allow and a
reserved source port.  A refusal is a line of text; the jobs stay."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from relay import status
from relay.spool import JobMeta, Spool
from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Job, Wire, control_file, send_job
from tests.test_server import wait_for

DOWN = "socket://127.0.0.1:1"


def meta(job_id: str, *, user: str = "alice", peer: str = "127.0.0.1:5000",
         host: str = "client") -> JobMeta:
    return JobMeta(id=job_id, queue="q", wire_queue="q", peer=peer, received=0.0,
                   control_name=f"cfA{job_id}{host}", control_path="/x", number=job_id,
                   user=user, host=host, title="", job_name="", files=())


def chosen(jobs: list[JobMeta], agent: str, *items: str, host: str, admin: bool) -> list[str]:
    return [j.id for j in status.select_for_removal(jobs, agent=agent, items=items, host=host,
                                                    admin=admin)]


def test_a_user_removes_only_own_jobs_sent_from_the_asking_address() -> None:
    jobs = [meta("1"), meta("2", peer="10.0.0.9:700"), meta("3", user="bob"),
            meta("4", peer="10.0.0.9:1", host="127.0.0.1"),
            meta("5", peer="[::ffff:127.0.0.1]:9")]
    assert chosen(jobs, "alice", host="127.0.0.1", admin=False) == ["1", "4", "5"]
    assert chosen(jobs, "alice", host="10.0.0.9", admin=True) == ["2", "4"]
    assert chosen(jobs, "alice", "2", host="127.0.0.2", admin=False) == []
    assert chosen(jobs, "root", host="127.0.0.1", admin=True) == ["1", "2", "3", "4", "5"]
    assert chosen(jobs, "-all", "bob", host="::1", admin=True) == ["3"]
    assert chosen(jobs, "root", host="127.0.0.1", admin=False) == []


def wire_from(port: int, source: str = "127.0.0.1", source_port: int = 0) -> Wire:
    """A Wire to the relay on 127.0.0.1 from the address (and port) ``source``."""
    w = Wire.__new__(Wire)
    w.sock = socket.socket()
    try:
        w.sock.settimeout(10)
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        w.sock.bind((source, source_port))
        w.sock.connect(("127.0.0.1", port))
    except BaseException:
        w.sock.close()
        raise
    return w


def reserved_wire(port: int) -> Wire:
    """A client socket bound to a free reserved source port (we are root)."""
    for source in range(1023, 600, -1):
        try:
            return wire_from(port, source_port=source)
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
    raise AssertionError("no reserved source port free")


def ask(w: Wire, request: bytes) -> bytes:
    with w:
        w.send(request)
        return w.read_all()


@pytest.fixture
def relay(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = relay_config(tmp_path, queues={"ward3": {"destinations": [DOWN]}},
                       retry={"initial": "1h", "max": "1h", "give_up_after": "24h"})
    with DaemonThread(cfg) as daemon:
        for number, user in (("201", "alice"), ("202", "bob")):
            job = Job(queue="ward3", number=number, user=user)
            assert all(r == 0 for r in send_job(daemon.port, job))
        yield daemon


def jobs_left(tmp_path: Path) -> list[str]:
    return [j.number for j in Spool(tmp_path / "spool").jobs()]


def test_removal_from_another_host_claiming_the_user_is_refused(relay, tmp_path):  # type: ignore[no-untyped-def]
    text = ask(wire_from(relay.port, "127.0.0.2"), b"\x05ward3 alice 201\n")
    assert text == b"no matching jobs\n"
    text = ask(wire_from(relay.port, "127.0.0.2"), b"\x05ward3 alice\n")
    assert text == b"no matching jobs\n"
    assert jobs_left(tmp_path) == ["201", "202"]


@pytest.mark.parametrize("agent", ["root", "-all"])
@pytest.mark.parametrize("source", ["127.0.0.2", "127.0.0.1"])
def test_privileged_removal_without_a_reserved_port_is_refused(relay, tmp_path, agent, source):  # type: ignore[no-untyped-def]
    text = ask(wire_from(relay.port, source), f"\x05ward3 {agent} all\n".encode())
    assert text.startswith(b"lpd-relay: ") and b"reserved source port" in text, text
    assert text.endswith(b"\n") and text.count(b"\n") == 1
    assert jobs_left(tmp_path) == ["201", "202"]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a reserved source port needs root")
def test_root_removal_from_a_reserved_port_on_loopback_works(relay, tmp_path):  # type: ignore[no-untyped-def]
    text = ask(reserved_wire(relay.port), b"\x05ward3 root 202\n")
    assert b"dequeued" in text, text
    assert jobs_left(tmp_path) == ["201"]


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a reserved source port needs root")
def test_a_reserved_port_outside_admin_allow_is_not_admin(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path, server={"admin_allow": ["127.0.0.9/32"]},
                       queues={"ward3": {"destinations": [DOWN]}},
                       retry={"initial": "1h", "max": "1h"})
    with DaemonThread(cfg) as relay:
        assert all(r == 0 for r in send_job(relay.port, Job(queue="ward3")))
        text = ask(reserved_wire(relay.port), b"\x05ward3 root\n")
        assert b"admin_allow" in text
        assert jobs_left(tmp_path) == ["123"]


def test_the_owner_removes_own_job_from_its_address(relay, tmp_path):  # type: ignore[no-untyped-def]
    text = ask(Wire(relay.port), b"\x05ward3 alice\n")
    assert b"dequeued" in text
    assert jobs_left(tmp_path) == ["202"]


def _hold_one(port: int, number: str) -> None:
    """A job held at intake: its control file names a file it never sends."""
    cf = control_file(host="h", data_names=(f"dfA{number}h",))
    with Wire(port) as w:
        w.send(b"\x02ward3\n")
        assert w.reply() == 0
        w.send(f"\x02{len(cf)} cfA{number}h\n".encode())
        assert w.reply() == 0
        w.send(cf + b"\x00")
        assert w.reply() == 0


def test_releasing_every_held_job_needs_an_admin(tmp_path: Path) -> None:
    cfg = relay_config(tmp_path, queues={"ward3": {"destinations": [DOWN]}},
                       retry={"initial": "1h", "max": "1h"})
    with DaemonThread(cfg) as relay:
        _hold_one(relay.port, "301")
        wait_for(lambda: relay.metric("lpdrelay_jobs_held_total", queue="ward3") == 1)
        assert ask(Wire(relay.port), b"\x01ward3\n") == b"\x00"
        assert [j.state for j in Spool(tmp_path / "spool").jobs()] == ["held"]
        if os.geteuid() != 0:
            pytest.skip("releasing from a reserved source port needs root")
        assert ask(reserved_wire(relay.port), b"\x01ward3\n") == b"\x00"
        wait_for(lambda: [j.state for j in Spool(tmp_path / "spool").jobs()] == ["queued"])


def test_admin_allow_default_is_loopback() -> None:
    from relay.config import config_from_dict
    server = config_from_dict({}, "<test>").server
    assert [str(n) for n in server.admin_allow] == ["127.0.0.0/8", "::1/128"]
