"""The error tree shared by every layer, the compiled core included.

The Cython core raises these pure-Python classes (never its own), so callers
catch one family whatever produced the error.  A ``ProtocolError`` carries the
RFC 1179 reply byte the server should answer with and a bounded ``reason`` that
is safe to use as a metric label (SPEC §4.3, §7).
"""

from __future__ import annotations

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


class SpoolError(LpdError):
    """The spool cannot store or read a job."""


class DiskFull(SpoolError):
    """Free space under ``min_free_disk``: new jobs get reply 0x02 (retry later)."""


class SinkError(LpdError):
    """A delivery attempt failed."""


class SinkUnavailable(SinkError):
    """Temporary: destination down, busy, refused, timed out -> retry with backoff."""


class SinkRejected(SinkError):
    """Permanent for this job: the destination refused it -> hold it (never delete)."""
