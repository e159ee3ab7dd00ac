"""A job the relay accepted but cannot rename for an lpd:// destination (SPEC §5):
its control file has no line left to send (only S, U and empty name lines), or
more data files than ``dfA..dfz`` can name.  No retry can send it, so it is
held with the reason, and the queue's next job is delivered; it is never
retried for ever at the head of the queue."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay import client
from relay.client import OutFile
from relay.uri import parse_destination
from tests.daemon import DaemonThread, relay_config
from tests.peers import RecordingLpdServer
from tests.test_server import wait_for


def _send(port: int, cf_name: str, control: bytes, files: list[OutFile]) -> None:
    async def main() -> None:
        with trio.fail_after(20):
            ch = await client.connect(parse_destination(f"lpd://127.0.0.1:{port}/q"),
                                      io_timeout=10)
            try:
                await client.send_job(ch, queue="q", cf_name=cf_name, control=control,
                                      files=files)
            finally:
                await ch.aclose()
    trio.run(main)


def _only_s_and_u() -> tuple[bytes, list[OutFile]]:
    return b"Sdev,inode\nUdfZ999other\n", [OutFile(name="dfA001host", size=5, data=b"page\n")]


def _too_many_files() -> tuple[bytes, list[OutFile]]:
    names = [f"df{i:03d}x001host" for i in range(53)]
    control = b"Hhost\nPnurse\n" + b"".join(b"l%s\n" % n.encode() for n in names)
    return control, [OutFile(name=n, size=2, data=b"p\n") for n in names]


@pytest.mark.parametrize("job", [_only_s_and_u, _too_many_files], ids=["no-line-left",
                                                                       "53-data-files"])
def test_an_unsendable_job_is_held_and_the_next_one_delivered(tmp_path: Path, job) -> None:
    with RecordingLpdServer() as server:
        dest = f"lpd://127.0.0.1:{server.port}/q?batch=1"
        cfg = relay_config(tmp_path, queues={"q": {"destinations": [dest]}},
                           retry={"initial": "100ms", "max": "200ms", "give_up_after": "1h"})
        with DaemonThread(cfg) as relay:
            control, files = job()
            _send(relay.port, "cfA001host", control, files)
            _send(relay.port, "cfA002host", b"Hhost\nPnurse\nldfA002host\n",
                  [OutFile(name="dfA002host", size=5, data=b"good\n")])
            (received,) = server.wait_jobs(1)
            wait_for(lambda: relay.metric("lpdrelay_delivery_attempts_total",
                                          destination=dest, result="rejected") == 1)
            retries = relay.metric("lpdrelay_delivery_attempts_total", destination=dest,
                                   result="retry")
            ok = relay.metric("lpdrelay_delivery_attempts_total", destination=dest,
                              result="ok")
    assert [f.data for f in received.files] == [b"good\n"]
    assert (retries, ok) == (0, 1)
