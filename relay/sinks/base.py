"""What every delivery sink shares: the job it is handed, its base class, the registry.

A sink is a small object with one async hook, ``deliver(job)`` (the shape of
aiosmtpd's handlers): it either returns, meaning the job is *durably* at its
destination and the spool may delete its copy, or raises
``relay.errors.SinkUnavailable`` (temporary: the scheduler retries with backoff)
or ``relay.errors.SinkRejected`` (permanent for this job: it is held).

Sinks never import the spool: they see a job through the read-only
``DeliveryJob`` / ``DeliveryFile`` protocols below, which the spool's records
satisfy structurally.  Each sink module registers a factory for its URI scheme;
``make_sink`` builds the right one for a ``relay.uri.Destination``.

A spool file is opened only through ``open_spool_file``, so a job whose file
vanished (purged while it was being delivered) means the same in every sink:
``relay.errors.SpoolFileMissing``.  A scheme may also register a ``check``,
run at config time and at start, that names a problem visible before any
attempt (a ``cmd:`` program not on PATH): ``destination_problem``.

``open_spool_file``, ``stream_file`` and ``stream_body`` live in
``relay.streams`` (the outbound client uses them without loading any sink)
and are re-exported here for the sinks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relay.privacy import KEEP, Redactor
from relay.spoolbackend import Body, BodySource, open_file_body
from relay.streams import open_spool_file, stream_body, stream_file

if TYPE_CHECKING:
    from relay.uri import Destination

__all__ = [
    "Body",
    "DeliveryFile",
    "DeliveryJob",
    "Sink",
    "SinkContext",
    "SinkFactory",
    "destination_problem",
    "make_sink",
    "open_body",
    "open_control",
    "open_spool_file",
    "register",
    "registered_schemes",
    "stream_body",
    "stream_file",
]

class DeliveryFile(Protocol):
    """One data file of a job, as the spool stores it."""

    @property
    def name(self) -> str:
        """The wire name (``dfA123host``): a label, never a path."""

    @property
    def format(self) -> str:
        """The control-file format letter (``l``, ``f``, ``o``, ...)."""

    @property
    def bytes(self) -> int:
        """Size of the spool file."""

    @property
    def path(self) -> str:
        """Absolute path of the spool file holding the data."""


class DeliveryJob(Protocol):
    """A spooled job as a sink sees it (read-only; ``relay.spool.JobMeta`` fits)."""

    @property
    def id(self) -> str:
        """Spool job id: unique, safe as a file-name component."""

    @property
    def queue(self) -> str:
        """Configured queue name, ``"*"`` for the catch-all."""

    @property
    def wire_queue(self) -> str:
        """Queue name exactly as the sender spelled it."""

    @property
    def peer(self) -> str:
        """Sender address (``host:port``)."""

    @property
    def received(self) -> float:
        """When the job was committed to the spool (epoch seconds)."""

    @property
    def control_name(self) -> str:
        """Wire name of the control file (``cfA123host``)."""

    @property
    def control_path(self) -> str:
        """Absolute path of the spooled control file."""

    @property
    def number(self) -> str:
        """Job number from the control-file name."""

    @property
    def user(self) -> str:
        """``P`` line: the user the job is for."""

    @property
    def host(self) -> str:
        """``H`` line: the host the job came from."""

    @property
    def title(self) -> str:
        """``T`` line (or empty)."""

    @property
    def job_name(self) -> str:
        """``J`` line (or empty)."""

    @property
    def files(self) -> tuple[DeliveryFile, ...]:
        """Data files in the order the control file prints them."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SinkContext:
    """Daemon-wide things a sink may need; new fields get defaults, so callers never break.

    ``origin_ports`` is the shared outbound source-port pool (SPEC §5) used by the
    ``lpd://`` sink; typed loosely here so this module does not depend on it.
    ``bodies`` is the spool the jobs come from (``relay.spoolbackend.BodySource``):
    sinks read bodies through it (``open_body``/``open_control``); None means
    a local spool whose bodies are whole files at their paths.
    """

    origin_ports: object | None = None
    bodies: BodySource | None = None
    metrics: object | None = None       # relay.metrics.Metrics in the daemon (lpds:// uses it)
    privacy: Redactor = KEEP            # [privacy]: job names in metadata and downstream


class Sink(abc.ABC):
    """One destination; ``deliver`` is called once per job attempt.

    Sinks hold no per-job state between calls, so the scheduler may run
    ``concurrency`` deliveries on one sink object at once.
    """

    # How many queued jobs one delivery may carry (``lpd://...?batch=N``).
    batch = 1

    @property
    def per_attempt(self) -> int:
        """How many queued jobs one ``deliver_many`` call is handed (default ``batch``)."""
        return self.batch

    def __init__(self, destination: Destination, context: SinkContext) -> None:
        self.destination = destination
        self.context = context

    @abc.abstractmethod
    async def deliver(self, job: DeliveryJob) -> None:
        """Deliver ``job`` durably, or raise ``SinkUnavailable`` / ``SinkRejected``."""

    async def deliver_many(self, jobs: Sequence[DeliveryJob]) -> tuple[int, Exception | None]:
        """Deliver ``jobs`` in order, stopping at the first failure.

        Returns how many were delivered and the error that stopped the rest
        (``None`` when all went).  Sinks that can carry several jobs in one
        exchange override it; this default is one ``deliver`` each.
        """
        for i, job in enumerate(jobs):
            try:
                await self.deliver(job)
            except Exception as exc:  # the scheduler classifies it
                return i, exc
        return len(jobs), None

    async def aclose(self) -> None:  # noqa: B027  (an optional hook: most sinks hold nothing)
        """Release long-lived resources (connections, pools); the default has none."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The one line printed at start, saying where jobs go."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.destination.uri}>"


SinkFactory = Callable[["Destination", SinkContext], Sink]
DestinationCheck = Callable[["Destination"], "str | None"]

_factories: dict[str, SinkFactory] = {}
_checks: dict[str, DestinationCheck] = {}


def register(scheme: str, factory: SinkFactory, *, check: DestinationCheck | None = None) -> None:
    """Make ``make_sink`` build ``factory(destination, context)`` for ``scheme``.

    ``check(destination)``, when given, returns a problem that makes the
    destination unusable before any attempt (or None); see ``destination_problem``.

    Registering a different factory for a taken scheme is a programming error
    (two modules claiming one scheme), so it raises instead of silently winning.
    """
    existing = _factories.get(scheme)
    if existing is not None and existing is not factory:
        raise ValueError(f"sink scheme {scheme!r} is already registered to {existing!r}")
    _factories[scheme] = factory
    if check is not None:
        _checks[scheme] = check


def destination_problem(destination: Destination) -> str | None:
    """What stops ``destination`` working now, known without trying it (or None).

    Cheap and side-effect free (a PATH lookup, a group membership), so
    ``check-config`` and the daemon's start both call it.
    """
    check = _checks.get(destination.scheme)
    return check(destination) if check is not None else None


def open_body(context: SinkContext, file: DeliveryFile) -> Body:
    """One data file of a job as a descriptor range, read through the job's spool.

    ``SpoolFileMissing`` when the spool no longer has it, whatever the backend.
    """
    if context.bodies is not None:
        return context.bodies.open_body(file)  # type: ignore[arg-type]  # a FileMeta
    return open_file_body(file.path, 0, file.bytes)


def open_control(context: SinkContext, job: DeliveryJob) -> Body:
    """The raw control file of a job, read through its spool (see ``open_body``)."""
    if context.bodies is not None:
        return context.bodies.open_control(job)  # type: ignore[arg-type]  # a JobMeta
    return open_file_body(job.control_path)


def registered_schemes() -> tuple[str, ...]:
    """Schemes that have a sink, sorted (for messages and docs)."""
    return tuple(sorted(_factories))


def make_sink(destination: Destination, context: SinkContext | None = None) -> Sink:
    """Build the sink for ``destination``; an unknown scheme raises ``ValueError``."""
    factory = _factories.get(destination.scheme)
    if factory is None:
        known = ", ".join(registered_schemes()) or "none"
        raise ValueError(
            f"no sink for scheme {destination.scheme!r} in {destination.uri!r} (known: {known})"
        )
    return factory(destination, context if context is not None else SinkContext())
