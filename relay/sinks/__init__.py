"""Delivery sinks, one module per destination scheme (SPEC §3.3, §5).

Importing this package imports every sink module so each registers its
scheme; callers then only need ``make_sink(destination, context)``.
``config_warnings`` lists what the sinks can tell is wrong before any attempt
(a ``cmd:`` program not on PATH), as "KEY: message" lines for ``check-config``;
the scheduler marks those destinations DOWN at start with the same words.  The
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
    the admin may install the program or add the group before the first job)."""
    return [f"{destination_key(queue.name, index)}: {problem}"
            for queue in config.queues.values()
            for index, destination in enumerate(queue.destinations)
            if (problem := destination_problem(destination)) is not None]


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
