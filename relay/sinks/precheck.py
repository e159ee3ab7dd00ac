"""What ``check-config`` can tell about a local destination before any job.

A ``dir://`` folder that cannot be created (a parent that is a file, or not
writable by this user) and a ``usb://`` printer that is not connected are
warnings, not errors: the admin may fix either before the first job, and a
delivery retries until then.  Both checks only look (``stat``, ``access``,
reading sysfs); nothing is created.
"""

from __future__ import annotations

import os
import stat
from typing import Final

from relay.uri import Destination
from relay.usbid import UsbNotFound, resolve_device

__all__ = ["ANY_CHANGED", "folder_problem", "local_problem", "usb_problem"]

ANY_CHANGED: Final = ('"any" now means any reserved port 1-1023, as in CUPS (it meant '
                      'unprivileged ephemeral ports before); write "none" for those')


def folder_problem(path: str) -> str | None:
    """Why the folder ``path`` cannot be used or created by this process, or None."""
    probe = os.path.abspath(path)
    while True:
        try:
            mode = os.stat(probe).st_mode
            break
        except (FileNotFoundError, NotADirectoryError):
            parent = os.path.dirname(probe)
            if parent == probe:
                return f"folder {path} cannot be created: no existing parent"
            probe = parent
        except OSError as exc:
            return f"folder {path}: cannot look at {probe}: {exc.strerror}"
    verb = "is not writable" if probe == os.path.abspath(path) else "cannot be created"
    if not stat.S_ISDIR(mode):
        return f"folder {path} {verb}: {probe} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"folder {path} {verb}: {probe} is not writable by this user (uid {os.geteuid()})"
    return None


def usb_problem(destination: Destination) -> str | None:
    """Why the printer of a ``usb://`` destination is not there now, or None."""
    if destination.make:
        try:
            resolve_device(destination)
        except UsbNotFound as exc:
            return str(exc)
        return None
    if not os.path.exists(destination.path):
        return f"device {destination.path} does not exist (printer unplugged or switched off?)"
    return None


def local_problem(destination: Destination) -> str | None:
    """The problem of a ``dir://`` or ``usb://`` destination, None for other schemes."""
    if destination.scheme == "dir":
        return folder_problem(destination.path)
    if destination.scheme == "usb":
        return usb_problem(destination)
    return None
