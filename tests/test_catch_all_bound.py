"""The catch-all admits at most ``max_catch_all_queues`` distinct wire names (each
becomes a hot-folder subfolder); beyond that a new name gets 0x01 and a line at the
0x02 command.  Names already in the spool or on disk count from the start."""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest

from relay.config import config_from_dict
from relay.errors import REPLY_NOT_ACCEPTING, ProtocolError
from relay.queues import QueueRouter, folder_name, hot_folder_names
from tests.daemon import DaemonThread, relay_config
from tests.lpdwire import Job, Wire, send_job
from tests.test_server import delivered


def _names(rng: random.Random, n: int) -> list[str]:
    alphabet = string.ascii_letters + string.digits + "._-/ \u00e9"
    return [rng.choice("abc") + "".join(rng.choices(alphabet, k=rng.randint(1, 20)))
            for _ in range(n)]


def test_router_admits_a_bounded_number_of_distinct_names(tmp_path: Path) -> None:
    cfg = config_from_dict(relay_config(tmp_path, server={"max_catch_all_queues": 50}),
                           "<test>")
    router = QueueRouter(cfg)
    admitted: set[str] = set()
    for name in _names(random.Random(8), 5000):
        try:
            assert router.route(name, new_job=True).name == "*"
            admitted.add(folder_name("*", name))
        except ProtocolError as exc:
            assert exc.reply == REPLY_NOT_ACCEPTING and "max_catch_all_queues" in str(exc)
            assert folder_name("*", name) not in admitted
    assert len(admitted) == 50
    for name in admitted:           # admitted names keep working
        router.route(name, new_job=True)
    router.route("never-seen-before")   # lpq and friends are not bounded: nothing is created


def test_names_on_disk_count_from_the_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for name in ("old1", "old2", ".hidden"):
        (out / name).mkdir(parents=True)
    (out / "a-file").write_text("")
    cfg = config_from_dict(relay_config(tmp_path, server={"max_catch_all_queues": 3}), "<t>")
    router = QueueRouter(cfg)
    assert cfg.queues["*"] and sorted(hot_folder_names(cfg.queues["*"])) == ["old1", "old2"]
    router.seed_catch_all(hot_folder_names(cfg.queues["*"]))
    router.route("new1", new_job=True)
    with pytest.raises(ProtocolError):
        router.route("new2", new_job=True)
    router.route("old2", new_job=True)


def test_the_daemon_refuses_new_names_beyond_the_bound(tmp_path: Path) -> None:
    (tmp_path / "out" / "existing").mkdir(parents=True)
    cfg = relay_config(tmp_path, server={"max_catch_all_queues": 5})
    with DaemonThread(cfg) as relay:
        codes = {}
        for name in ["existing", *(f"q{i}" for i in range(300))]:
            with Wire(relay.port) as w:
                w.send(f"\x02{name}\n".encode())
                codes[name] = (w.reply(), w.read_all() if name == "q9" else b"")
        accepted = [n for n, (c, _) in codes.items() if c == 0]
        assert accepted == ["existing", "q0", "q1", "q2", "q3"]
        code, text = codes["q9"]
        assert code == 0x01 and b"max_catch_all_queues" in text and text.endswith(b"\n")
        assert all(r == 0 for r in send_job(relay.port, Job(queue="q2")))
        delivered(tmp_path / "out", "q2")
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["existing", "q2"]
