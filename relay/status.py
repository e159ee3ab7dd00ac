"""lpq and lprm answers (RFC 1179 §5.3-§5.5), in the BSD lpd text layout.

FIELD-NOTES: no status byte precedes lpq text; the server writes text and
closes.  The short form is BSD's table (Rank, Owner, Job, Files, Total Size);
the long form adds one block per job.  Both list the relay's own jobs for the
queue and, since a relay's queue is only as good as where it forwards to, the
destination's state and next retry — the view CUPS loses once a job is
forwarded (FIELD-NOTES pain point 9).

Every field that came from a sender or a destination (queue as asked, titles,
user, host and file names, error texts) is shown through
``relay.printable.printable``, and each finished line once more: a job's title
can never drive the terminal of whoever runs lpq (C0, DEL and C1 controls,
U+009B CSI included, come out as backslash-x escapes).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from relay import __version__
from relay.printable import printable as _p
from relay.spool import JobMeta

# The last headline line of the daemon's answers: another lpd-relay forwarding here
# reads it (``lpd://`` sends it several jobs per 0x02 session then).  A line
# of its own, after the "destination" lines, so lpq parsers that read the
# first line (LPRng's lpq, probe) and the job table see what they always saw.
SERVER_MARKER = "server lpd-relay"
SERVER_LINE = f"{SERVER_MARKER}/{__version__} (several jobs per connection)"


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationState:
    name: str
    up: bool | None          # None: not tried yet
    active: bool             # the destination jobs go to now
    last_error: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueState:
    queue: str
    jobs: tuple[JobMeta, ...]            # queued and held, arrival order
    in_flight: frozenset[str]            # ids being delivered now
    destinations: tuple[DestinationState, ...]
    next_retry: float | None = None      # epoch seconds, when backing off
    server: str = ""                     # SERVER_LINE from the daemon; "" leaves it out
    notice: str = ""                     # operator state (lpc), e.g. "disabled, printing stopped"


def redacted(state: QueueState, name: Callable[[str], str]) -> QueueState:
    """``state`` with each job's title and job name as ``name`` shows them ([privacy]:
    lpq answers to peers outside ``server.admin_allow``, ``relay.privacy``)."""
    jobs = tuple(dataclasses.replace(j, title=name(j.title), job_name=name(j.job_name))
                 for j in state.jobs)
    return dataclasses.replace(state, jobs=jobs)


def _rank(index: int, job: JobMeta, in_flight: frozenset[str]) -> str:
    if job.id in in_flight:
        return "active"
    if job.state == "held":
        return "held"
    n = index + 1
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _headline(state: QueueState) -> list[str]:
    lines = []
    if state.notice:
        lines.append(f"{_p(state.queue)} is {state.notice}")
        lines += [] if state.jobs else ["no entries"]
    elif not state.jobs:
        lines += [f"{_p(state.queue)} is ready", "no entries"]
    else:
        printing = "and printing" if state.in_flight else "and waiting"
        lines.append(f"{_p(state.queue)} is ready {printing}")
    for dest in state.destinations:
        mark = "up" if dest.up else ("not tried yet" if dest.up is None else "DOWN")
        active = " (active)" if dest.active else ""
        err = f": {_p(dest.last_error)}" if dest.last_error and not dest.up else ""
        lines.append(f"destination {_p(dest.name)} {mark}{active}{err}")
    if state.next_retry:
        wait = max(0.0, state.next_retry - time.time())
        lines.append(f"next retry in {wait:.0f}s")
    if state.server:
        lines.append(state.server)
    return lines


def is_relay_answer(text: str) -> bool:
    """True when an lpq answer came from an lpd-relay (its ``SERVER_LINE``)."""
    return any(line.startswith(SERVER_MARKER + "/") for line in text.splitlines()[:40])


def _matches(job: JobMeta, items: Sequence[str]) -> bool:
    return not items or job.number in items or job.id in items or job.user in items


def render(state: QueueState, *, long: bool, items: Sequence[str] = ()) -> str:
    """The text lpq shows; ``items`` (job numbers or users) filter the rows."""
    lines = _headline(state)
    rows = [(i, j) for i, j in enumerate(state.jobs) if _matches(j, items)]
    if rows and not long:
        lines.append(f"{'Rank':<7}{'Owner':<11}{'Job':<5}{'Files':<38}Total Size")
        for i, job in rows:
            files = ", ".join(f.name for f in job.files) or job.control_name
            lines.append(f"{_rank(i, job, state.in_flight):<7}{_p(job.user)[:10]:<11}"
                         f"{_p(job.number):<5}{_p(job.title or files)[:37]:<38}"
                         f"{job.total_bytes} bytes")
    for i, job in rows if long else ():
        lines.append("")
        lines.append(f"{_p(job.user)}: {_rank(i, job, state.in_flight):<20}"
                     f"[job {_p(job.number)} {_p(job.host)}] spool id {job.id}")
        for f in job.files:
            lines.append(f"        {_p(f.name):<40}{f.bytes} bytes")
        if job.attempts:
            lines.append(f"        attempts {job.attempts}, last error: {_p(job.last_error)}")
    return _text(lines)


def _text(lines: Iterable[str]) -> str:
    # Each line once more through printable(): nothing raw, whatever a field held.
    return "".join(_p(line) + "\n" for line in lines)


PRIVILEGED_AGENTS = ("-all", "root")


def _same_host(job: JobMeta, host: str) -> bool:
    # The address recorded at intake, or an H line that is that address.
    # Host names in H are not resolved: no DNS on the request path.
    return _address(job.peer.rsplit(":", 1)[0]) == host or _address(job.host) == host


def _address(text: str) -> str:
    try:
        addr = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return text
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def select_for_removal(jobs: Iterable[JobMeta], *, agent: str, items: Sequence[str],
                       host: str, admin: bool) -> list[JobMeta]:
    """The jobs an lprm request names (RFC 1179 §5.5: agent, then users/job numbers).

    ``-all`` (LPRng) or root may remove anyone's jobs, but only when the
    request is ``admin`` (an ``admin_allow`` address and a reserved source
    port: root on a trusted host; the caller refuses the request otherwise).
    Any other agent removes only its own jobs, and only those sent from the
    requesting ``host`` (an address): the peer address recorded at intake or
    the control file's ``H`` line must be it, as BSD lpd checks the host
    along with the user.  With no items the agent's jobs are meant, and
    LPRng's ``all`` means every job the agent may remove.  Items match the
    job number, the spool id or the owner.
    """
    privileged = admin and agent in PRIVILEGED_AGENTS
    host = _address(host)
    if "all" in items or "-all" in items:   # LPRng's `lprm all`: every job we may remove
        items = ()
    numbers = {i for i in items if i.isdigit()}
    users = {i for i in items if not i.isdigit() and i != "-"}
    chosen = []
    for job in jobs:
        if not privileged and (job.user != agent or not _same_host(job, host)):
            continue
        named = job.number in numbers or job.id in numbers or job.user in users
        if (numbers or users) and not named:
            continue
        chosen.append(job)
    return chosen


def render_removal(chosen: Sequence[JobMeta], removed: set[str]) -> str:
    if not chosen:
        return "no matching jobs\n"
    lines = []
    for job in chosen:
        verb = "dequeued" if job.id in removed else "is being delivered, not removed"
        lines.append(f"{_p(job.control_name)} {verb}")
    return _text(lines)
