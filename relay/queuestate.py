"""Operator states of queues (lpc / `lpd-relay ctl`), kept across restarts.

A queue can be *disabled* (new jobs refused with 0x01 and a line),
*stopped* (jobs accepted and spooled, none delivered) and *redirected*
(its jobs are delivered by another queue's runner, to that queue's
destinations, until ``redirect off``).  The states live in one small JSON
file in the spool directory, written atomically on every change, read by
the daemon at start and by ``lpd-relay ctl`` while the daemon is stopped.
Held jobs need no entry here: holding is a spooled job's own state.  A job
``move``d to another queue is recorded here by spool id (the spool record
keeps the queue it arrived for; ``spool list`` shows that one) and is
delivered by the target queue from then on, across restarts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, replace

import orjson

from relay import log
from relay.durablefiles import write_atomic

__all__ = ["STATES", "STATE_FILE", "QueueStates", "State"]

STATE_FILE = "queue-states.json"
# The labels of lpdrelay_queue_state{state}.
STATES = ("disabled", "stopped", "redirected")   # = relay.metrics.QUEUE_STATES


@dataclass(frozen=True, slots=True)
class State:
    """One queue's operator state; the default is a normal queue."""

    disabled: bool = False
    stopped: bool = False
    redirect: str = ""          # target queue name, "" = not redirected

    def flags(self) -> dict[str, bool]:
        """``STATES`` -> whether the queue is in it (the gauge's values)."""
        return {"disabled": self.disabled, "stopped": self.stopped,
                "redirected": bool(self.redirect)}

    def notice(self) -> str:
        """The lpq headline words, e.g. "disabled, printing stopped"; "" when normal."""
        words = []
        if self.disabled:
            words.append("disabled")
        if self.stopped:
            words.append("printing stopped")
        if self.redirect:
            words.append(f"redirected to {self.redirect}")
        return ", ".join(words)


class QueueStates:
    """The states of every queue, backed by ``STATE_FILE`` in ``spool_dir``."""

    def __init__(self, spool_dir: os.PathLike[str] | str) -> None:
        self.path = os.path.join(os.fspath(spool_dir), STATE_FILE)
        self._states: dict[str, State] = {}
        self.moved: dict[str, str] = {}     # spool id -> the queue it was moved to
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = orjson.loads(f.read())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:   # never stops a start: queues run normally
            log.event("error", "queue_states_unreadable", path=self.path, error=str(exc))
            return
        raw = raw if isinstance(raw, dict) else {}
        moved = raw.get("moved")
        self.moved = {str(k): str(v) for k, v in moved.items()} if isinstance(moved, dict) else {}
        queues = raw.get("queues")
        for name, fields in (queues.items() if isinstance(queues, dict) else ()):
            with contextlib.suppress(TypeError, ValueError):
                self._states[str(name)] = State(
                    disabled=bool(fields.get("disabled")), stopped=bool(fields.get("stopped")),
                    redirect=str(fields.get("redirect") or ""))

    def get(self, queue: str) -> State:
        return self._states.get(queue, State())

    def change(self, queue: str, **changes: object) -> State:
        """Change ``queue``'s state and write the file; on OSError nothing changed."""
        state = replace(self.get(queue), **changes)  # type: ignore[arg-type]
        states = {q: s for q, s in self._states.items() if q != queue}
        if state != State():
            states[queue] = state
        self._save(states, self.moved)
        self._states = states
        return state

    def move(self, job_ids: list[str], target: str, *, keep: set[str] | None = None) -> None:
        """Record jobs as moved to ``target``; ``keep`` (spool ids) drops stale entries."""
        moved = {**self.moved, **dict.fromkeys(job_ids, target)}
        if keep is not None:
            moved = {k: v for k, v in moved.items() if k in keep}
        self._save(self._states, moved)
        self.moved = moved

    def _save(self, states: dict[str, State], moved: dict[str, str]) -> None:
        data = orjson.dumps({"queues": {q: asdict(s) for q, s in sorted(states.items())},
                             "moved": moved})
        write_atomic(self.path, data, fsync=True)

    def redirects(self) -> dict[str, str]:
        """Queue -> the queue whose runner delivers its jobs."""
        return {q: s.redirect for q, s in self._states.items() if s.redirect}
