"""Find the ``/dev/usb/lpN`` of a ``usb://Make/Model?serial=SN`` destination.

CUPS names a USB printer by its IEEE 1284 device ID, not by the lpN the kernel
gave it, and an admin copies that URI from ``lpinfo -v``.  The Linux usblp
driver publishes each printer's device ID as the ``ieee1284_id`` attribute of
its USB interface: ``/sys/class/usbmisc/lpN/device/ieee1284_id``, a line of
``KEY:value;`` fields (``MFG``/``MANUFACTURER``, ``MDL``/``MODEL``,
``SN``/``SERN``/``SERIALNUMBER``).  The USB serial number CUPS prefers is
the ``serial`` attribute of the USB device, the interface's parent.

Resolution runs at every delivery attempt, since a printer replugged comes
back as another lpN; no match is a reason to retry, and the message names
what was looked for and every printer that was found.  The roots come from
``LPD_RELAY_SYSFS`` (default ``/sys``) and ``LPD_RELAY_DEV`` (default
``/dev``): they exist for tests and for unusual systems.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from relay.uri import Destination

__all__ = ["PrinterId", "UsbNotFound", "find_printers", "parse_device_id", "resolve_device"]

_MAKE_KEYS = ("MFG", "MANUFACTURER")
_MODEL_KEYS = ("MDL", "MODEL")
_SERIAL_KEYS = ("SN", "SERN", "SERIALNUMBER")
# CUPS shortens this manufacturer's name in its URIs.
_MAKE_ALIASES = {"hewlett-packard": "hp"}


class UsbNotFound(LookupError):
    """No connected printer matches the destination; the text says what was seen."""


@dataclass(frozen=True, slots=True, kw_only=True)
class PrinterId:
    """One usblp printer: its lpN, device node, and IEEE 1284 identity."""

    name: str       # "lp0"
    device: str     # "/dev/usb/lp0"
    make: str
    model: str
    serial: str

    def label(self) -> str:
        return f"{self.name} = {self.make or '?'}/{self.model or '?'} serial {self.serial or '?'}"


def parse_device_id(text: str) -> dict[str, str]:
    """``MFG:HP;MDL:LaserJet 1020;`` -> {"MFG": "HP", "MDL": "LaserJet 1020"} (keys upper)."""
    fields: dict[str, str] = {}
    for item in text.strip().split(";"):
        key, colon, value = item.partition(":")
        if colon:
            fields.setdefault(key.strip().upper(), value.strip())
    return fields


def _first(fields: dict[str, str], keys: tuple[str, ...]) -> str:
    return next((fields[k] for k in keys if fields.get(k)), "")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return ""


def find_printers() -> list[PrinterId]:
    """Every usblp printer the sysfs tree shows, in lpN order."""
    sysfs = Path(os.environ.get("LPD_RELAY_SYSFS") or "/sys")
    dev = Path(os.environ.get("LPD_RELAY_DEV") or "/dev")
    try:
        names = sorted(os.listdir(sysfs / "class" / "usbmisc"))
    except OSError:
        return []
    found = []
    for name in names:
        if not name.startswith("lp"):
            continue
        interface = sysfs / "class" / "usbmisc" / name / "device"
        fields = parse_device_id(_read(interface / "ieee1284_id"))
        serial = _read(interface / ".." / "serial") or _first(fields, _SERIAL_KEYS)
        found.append(PrinterId(name=name, device=str(dev / "usb" / name),
                               make=_first(fields, _MAKE_KEYS),
                               model=_first(fields, _MODEL_KEYS), serial=serial))
    return found


def _same_make(a: str, b: str) -> bool:
    a, b = a.casefold(), b.casefold()
    return _MAKE_ALIASES.get(a, a) == _MAKE_ALIASES.get(b, b)


def _same_model(wanted: str, found: PrinterId) -> bool:
    # Some printers repeat the make inside MDL ("HP LaserJet 1020").
    model = found.model.casefold()
    for make in (found.make.casefold(), _MAKE_ALIASES.get(found.make.casefold(), "")):
        if make and model.startswith(make + " "):
            model = model[len(make) + 1:]
            break
    return wanted.casefold() in (found.model.casefold(), model)


def matches(destination: Destination, printer: PrinterId) -> bool:
    """Whether ``printer`` is the one ``usb://Make/Model[?serial=]`` names."""
    return (_same_make(destination.make, printer.make)
            and _same_model(destination.model, printer)
            and (not destination.serial or destination.serial == printer.serial))


def wanted_label(destination: Destination) -> str:
    serial = f" serial {destination.serial}" if destination.serial else " (any serial)"
    return f"{destination.make}/{destination.model}{serial}"


def resolve_device(destination: Destination) -> str:
    """The device node of the printer ``destination`` names; ``UsbNotFound`` if none."""
    printers = find_printers()
    for printer in printers:
        if matches(destination, printer):
            return printer.device
    root = os.environ.get("LPD_RELAY_SYSFS") or "/sys"
    seen = "; ".join(p.label() for p in printers) or \
        f"no usblp printer at all under {root}/class/usbmisc"
    raise UsbNotFound(f"no connected printer is {wanted_label(destination)}; found: {seen}")
