"""The error tree shared by every layer, the compiled core included.

The Cython core raises these pure-Python classes (never its own), so callers
catch one family whatever produced the error.  A ``ProtocolError`` carries the
RFC 1179 reply byte the server should answer with and a bounded ``reason`` that
is safe to use as a metric label (SPEC §4.3, §7).
"""

from __future__ import annotations

import errno

# Reply bytes of SPEC §4.3.  RFC 1179 only says zero = ok, non-zero = not; the
# meanings follow LPRng: 1 = queue not accepting, 2 = retry later, 3 = bad job.
REPLY_OK = 0x00
REPLY_NOT_ACCEPTING = 0x01
REPLY_RETRY_LATER = 0x02
REPLY_BAD_JOB = 0x03

# The only values ``ProtocolError.reason`` and the rejection metric may take.
REJECT_REASONS = ("acl", "unknown_queue", "too_large", "disk_full", "malformed", "timeout",
                  "spool_error")


class LpdError(Exception):
    """Base of every error lpd-relay raises on purpose."""


class ProtocolError(LpdError):
    """The peer's bytes broke RFC 1179 or a configured bound.

    ``reply`` is the byte to send back (``None`` when nothing can be sent, e.g.
    the stream was cut); ``reason`` is one of ``REJECT_REASONS``.
    """

    def __init__(self, message: str, *, reply: int | None = REPLY_BAD_JOB,
                 reason: str = "malformed") -> None:
        super().__init__(message)
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self.reply = reply
        self.reason = reason


class ConfigError(LpdError):
    """Configuration is invalid; ``path`` is the dotted key path (e.g. ``server.listen[1]``)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


class BindError(LpdError):
    """A listening socket could not be bound at start; ``key`` is the config key it came from.

    ``key`` is e.g. ``server.listen[0]`` or ``metrics.listen``, ``address``
    the ``host:port`` and ``error`` the ``OSError`` the system gave.
    """

    def __init__(self, key: str, address: str, error: OSError) -> None:
        super().__init__(f"{key}: cannot listen on {address}: {error.strerror or error}")
        self.key = key
        self.address = address
        self.error = error


class SpoolError(LpdError):
    """The spool cannot store or read a job."""


class DiskFull(SpoolError):
    """Free space under ``min_free_disk``: new jobs get reply 0x02 (retry later)."""


# Why a delivery attempt failed: the ``reason`` label of
# lpdrelay_delivery_retries_total (SPEC §7), defined once.  TCP refused, a
# read/write/run timed out, the connection was reset or closed early, a
# non-zero LPD reply byte, a destination that said "later" or is missing
# (USB device unplugged, ``cmd:`` exit 75 or program not installed), and
# anything else (including a bug in a sink, which raises no ``SinkError``).
RETRY_REASONS = ("refused", "timeout", "reset", "reply", "unavailable", "other")

_ERRNO_REASONS = {
    errno.ECONNREFUSED: "refused",
    errno.ETIMEDOUT: "timeout",
    errno.ECONNRESET: "reset",
    errno.ECONNABORTED: "reset",
    errno.EPIPE: "reset",
}


def reason_for_errno(code: int | None) -> str:
    """The retry reason of a failed socket call's errno (``unavailable`` when none fits)."""
    return _ERRNO_REASONS.get(code or 0, "unavailable")


class SinkError(LpdError):
    """A delivery attempt failed; ``reason`` is one of ``RETRY_REASONS``.

    ``reply`` is the non-zero LPD reply byte the destination answered, and
    ``step`` the protocol step it answered to (``relay.client`` names them),
    when the failure was such an answer; callers read these, never the text.
    """

    default_reason = "other"

    def __init__(self, message: str, *, reason: str | None = None, reply: int | None = None,
                 step: str = "") -> None:
        super().__init__(message)
        reason = reason or ("reply" if reply is not None else self.default_reason)
        if reason not in RETRY_REASONS:
            raise ValueError(f"unknown sink error reason {reason!r}")
        self.reason = reason
        self.reply = reply
        self.step = step


class SinkUnavailable(SinkError):
    """Temporary: destination down, busy, refused, timed out -> retry with backoff."""

    default_reason = "unavailable"


class OriginPortUnavailable(SinkUnavailable):
    """This relay's outbound port pool had no usable source port: the destination said nothing."""


class SinkRejected(SinkError):
    """Permanent for this job: the destination refused it -> hold it (never delete)."""


class SpoolFileMissing(SinkError):
    """The job's own spool file (data or control) cannot be opened: not the destination's fault.

    Raised by ``relay.sinks.base.open_spool_file`` only, whatever the sink.
    The scheduler forgets the job when the spool no longer has it (purged
    while it was being delivered) and holds it otherwise (docs/delivery.md).
    """

    def __init__(self, path: str, error: OSError) -> None:
        super().__init__(f"spool file {path} cannot be read: {error.strerror or error}")
        self.path = path
        self.errno = error.errno
