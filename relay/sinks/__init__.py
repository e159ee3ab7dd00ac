"""Delivery sinks, one module per destination scheme (SPEC §3.3, §5).

Importing this package imports every sink module so each registers its
scheme; callers then only need ``make_sink(destination, context)``.  The
``lpd://`` sink lives in its own module and is imported when present, so the
local sinks work on their own.
"""

from __future__ import annotations

import importlib
import importlib.util

from relay.sinks import cmd, dir, socket, usb  # noqa: F401  (imported to register)
from relay.sinks.base import (
    DeliveryFile,
    DeliveryJob,
    Sink,
    SinkContext,
    make_sink,
    register,
    registered_schemes,
)

# Only a missing module is tolerated; an lpd sink that fails to import is a
# real error and must surface.
if importlib.util.find_spec("relay.sinks.lpd") is not None:
    importlib.import_module("relay.sinks.lpd")

__all__ = [
    "DeliveryFile",
    "DeliveryJob",
    "Sink",
    "SinkContext",
    "make_sink",
    "register",
    "registered_schemes",
]
