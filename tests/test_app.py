"""The daemon's choices made before it runs: where intake runs, what is forked first.

The daemon itself runs in the tests of what it wires (tests/daemon.py starts
``app.run`` in-process); here ``serve``'s start is stopped short of trio, so
the choice made from the configuration alone is seen on its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest

from relay import app, servecli
from relay.config import config_from_dict
from tests.daemon import relay_config, write_config_file

_PG = {"backend": "postgresql", "dsn": "postgresql://relay@127.0.0.1:1/relay"}


def test_the_configured_postgresql_spool_keeps_intake_in_one_process(tmp_path: Path) -> None:
    local = config_from_dict(relay_config(tmp_path, server={"workers": 2}), "<test>")
    shared = config_from_dict(relay_config(tmp_path, server={"workers": 2}, spool=_PG),
                              "<test>")
    assert app.one_process_reason(local) == ""
    assert app.one_process_reason(shared) == "[spool] backend = postgresql configured"


@pytest.mark.parametrize(("spool", "forked"), [({}, True), (_PG, False)], ids=["local", "pg"])
def test_serve_forks_the_workers_helper_only_for_workers_that_will_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spool: dict[str, Any],
        forked: bool) -> None:
    data = relay_config(tmp_path, server={"workers": 2}, **({"spool": spool} if spool else {}))
    path = write_config_file(tmp_path / "relay.toml", data)
    calls: list[str] = []
    monkeypatch.setattr(servecli.log, "configure", lambda **_: None)
    monkeypatch.setattr(servecli.forkserver, "prefork", lambda: calls.append("prefork"))
    monkeypatch.setattr(servecli.trio, "run", lambda main: calls.append("run"))
    assert servecli.main_serve(argparse.Namespace(config=str(path))) == 0
    assert calls == (["prefork", "run"] if forked else ["run"])
