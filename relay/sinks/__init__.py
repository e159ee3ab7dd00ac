"""Delivery sinks, one module per destination scheme (SPEC §3.3, §5).

Importing this package imports every sink module so each registers its
scheme; callers then only need ``make_sink(destination, context)``.
``config_warnings`` lists what the sinks can tell is wrong before any attempt
(a ``cmd:`` program not on PATH), as "KEY: message" lines for ``check-config``;
the scheduler marks those destinations DOWN at start with the same words.
``check-config`` also warns about a ``dir://`` folder that cannot be created,
a ``usb://`` printer that is not there now (``relay.sinks.precheck``; not DOWN
at start: it may be plugged in later) and every ``any`` port range, which
means 1-1023 now as in CUPS, where it meant ephemeral ports before.  The
``lpd://`` sink lives in its own module and is imported when present, so the
local sinks work on their own.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

from relay.configschema import key_path
from relay.sinks import cmd, dir, socket, usb  # noqa: F401  (imported to register)
from relay.sinks.base import (
    DeliveryFile,
    DeliveryJob,
    Sink,
    SinkContext,
    destination_problem,
    make_sink,
    register,
    registered_schemes,
)
from relay.sinks.precheck import ANY_CHANGED, local_problem

if TYPE_CHECKING:
    from relay.config import Config

# Only a missing module is tolerated; an lpd sink that fails to import is a
# real error and must surface.
if importlib.util.find_spec("relay.sinks.lpd") is not None:
    importlib.import_module("relay.sinks.lpd")
if importlib.util.find_spec("relay.sinks.lpds") is not None:
    importlib.import_module("relay.sinks.lpds")



def destination_key(queue: str, index: int) -> str:
    """The config key of a queue's ``index``-th destination: ``queues.NAME.destinations[i]``."""
    return f"{key_path('queues', queue)}.destinations[{index}]"


def config_warnings(config: Config) -> list[str]:
    """"KEY: message" for each destination that cannot work as things stand (not an error:
    the admin may install the program, plug in the printer or add the group before the
    first job), and for each ``any`` port range, whose meaning changed."""
    warnings = []
    if config.origin_ports.range_text.lower() == "any":
        warnings.append(f"origin_ports.range: {ANY_CHANGED}")
    for queue in config.queues.values():
        for index, destination in enumerate(queue.destinations):
            key = destination_key(queue.name, index)
            if destination.reserve == "any":
                warnings.append(f"{key}: reserve=any: {ANY_CHANGED}")
            problem = destination_problem(destination) or local_problem(destination)
            if problem is not None:
                warnings.append(f"{key}: {problem}")
    return warnings


__all__ = [
    "DeliveryFile",
    "DeliveryJob",
    "Sink",
    "SinkContext",
    "config_warnings",
    "destination_key",
    "destination_problem",
    "make_sink",
    "register",
    "registered_schemes",
]
