"""The real LPD peers the suite talks to, run privately on loopback.

Real senders and receivers (LPRng's ``lpd``/``lpr``/``lpq``/``lprm``, ``rlpr``,
``p910nd``, ``promtool``) are what lpd-relay must interoperate with, so tests
run them rather than imitations. Each program runs on a free 127.0.0.1 port
inside a private mount namespace with its own ``/etc`` files, and long-lived
peers in a private PID namespace (see ``process``). Every helper skips the
calling test with the reason when a program, root, or namespace support is
missing. ``RecordingLpdServer`` is pure Python test equipment: an LPD receiver
that records every byte and can be scripted to misbehave the ways real
receivers do.

The package re-exports every public name, fixtures included, so tests write
``from tests.peers import LprngServer`` and a conftest may declare
``pytest_plugins = ("tests.peers",)``. The modules:

- ``process``: preconditions (``require_*``, free ports), namespaces and private
  ``/etc``, starting and stopping process trees;
- ``received``: ReceivedJob / ReceivedFile, what either receiver got;
- ``lprng``: LprngServer, a private LPRng ``lpd`` with held queues;
- ``clients``: the senders ``lpr``, ``lpq``, ``lprm`` and ``rlpr``;
- ``p910nd``: P910nd, the raw port-9100 printer;
- ``script`` and ``recording``: LpdScript and the RecordingLpdServer it drives;
- ``fixtures``: the pytest fixtures;
- ``haproxy``: HAProxy, a TCP balancer sending PROXY headers;
- ``stunnel``: Stunnel, TLS in front of a plain LPD sender or receiver;
- ``tcp``: TIME_WAIT hygiene for the reserved ports.
"""

from tests.peers.clients import CLIENT_CONF, lpq, lpr, lprm, rlpr
from tests.peers.fixtures import lprng_server, make_lprng_server, p910nd_printer, recording_lpd
from tests.peers.haproxy import HAProxy
from tests.peers.lprng import LprngServer
from tests.peers.p910nd import P910nd
from tests.peers.process import (
    LOOPBACK,
    free_port,
    namespace_argv,
    promtool_path,
    require_binary,
    require_namespaces,
    require_root,
    start_process,
    stop_process_tree,
    wait_listening,
    write_private_etc,
)
from tests.peers.received import ReceivedFile, ReceivedJob
from tests.peers.recording import RecordingLpdServer
from tests.peers.script import REPLY_STEPS, LpdScript, RecordedConnection, lprng_error
from tests.peers.stunnel import Stunnel
from tests.peers.tcp import release_time_wait, time_wait_pairs

__all__ = [
    "CLIENT_CONF",
    "LOOPBACK",
    "REPLY_STEPS",
    "HAProxy",
    "LpdScript",
    "LprngServer",
    "P910nd",
    "ReceivedFile",
    "ReceivedJob",
    "RecordedConnection",
    "RecordingLpdServer",
    "Stunnel",
    "free_port",
    "lpq",
    "lpr",
    "lprm",
    "lprng_error",
    "lprng_server",
    "make_lprng_server",
    "namespace_argv",
    "p910nd_printer",
    "promtool_path",
    "recording_lpd",
    "release_time_wait",
    "require_binary",
    "require_namespaces",
    "require_root",
    "rlpr",
    "start_process",
    "stop_process_tree",
    "time_wait_pairs",
    "wait_listening",
    "write_private_etc",
]
