"""Redaction of job names: the one policy for J, N and T values leaving a job (SPEC §11).

Job names and titles in hospitals carry patient names.  ``[privacy]
job_names`` says how such a value is shown wherever it leaves the job itself
— log lines, hot-folder metadata, lpq answers to peers outside
``server.admin_allow``, ``spool list/show`` for non-admins:

* ``keep``: unchanged (the default, today's behaviour);
* ``hash``: ``sha256:`` and the first 16 hex digits of the value's SHA-256 —
  the same name gives the same tag, so an admin can still match jobs
  without reading the name;
* ``drop``: the empty string.

An empty value stays empty under every policy (nothing to hide, and a tag of
the empty string would only suggest a name that was never there).  The job's
own control file is delivered unchanged unless ``strip_downstream`` is set;
then its J, N and T lines are rewritten the same way
(``relay.controlfile.redact_names``).  This module is pure: no I/O, no config
loading; callers hand it the ``PrivacyConfig``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from relay.config import PrivacyConfig

__all__ = ["KEEP", "Redactor", "redact"]

HASH_DIGITS = 16


def redact(value: str, policy: str) -> str:
    """``value`` as ``policy`` ("keep" | "hash" | "drop") shows it."""
    if not value or policy == "keep":
        return value
    if policy == "drop":
        return ""
    if policy != "hash":
        raise ValueError(f"job_names policy must be keep, hash or drop, not {policy!r}")
    # surrogateescape: wire bytes that are no UTF-8 hash as the bytes they were.
    digest = hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()
    return f"sha256:{digest[:HASH_DIGITS]}"


@dataclass(frozen=True, slots=True)
class Redactor:
    """A ``PrivacyConfig`` applied: ``name()`` for displays, ``downstream`` for sinks."""

    config: PrivacyConfig

    @property
    def active(self) -> bool:
        """Whether any value is changed at all (keep: the callers skip the work)."""
        return self.config.job_names != "keep"

    @property
    def downstream(self) -> bool:
        """Whether control files sent downstream have their J/N/T lines rewritten."""
        return self.config.strip_downstream and self.active

    def name(self, value: str) -> str:
        """A J/N/T value (or a title made of one) as it may be shown."""
        return redact(value, self.config.job_names)


KEEP = Redactor(PrivacyConfig())
