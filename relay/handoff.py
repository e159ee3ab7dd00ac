"""A long-lived worker thread that runs blocking calls for trio tasks.

``trio.to_thread.run_sync`` suits calls that are rare or many at once: each
call takes a thread from trio's cache, renames it (``prctl``), hands the
call over and back through the cache's locks.  The group commit and the
``dir://`` sink call one function per batch, one batch at a time, many
times a second: for them one thread that lives on, fed by a queue and
answering through the calling run's trio token, is simpler and cheaper
(strace, 1,000 jobs at c=1: no ``prctl`` a batch, fewer ``futex``).

The semantics are ``to_thread.run_sync``'s default ones: a task cancelled
before the hand-over gets ``Cancelled`` and the call never runs; once handed
over, the task waits for the call to end even when cancelled (the thread may
still be touching what it was given), then raises what the call raised.
The thread is a daemon that ends after ``idle`` seconds without a call and
is started again by the next one, so nothing has to be started or stopped;
a forked child starts its own (the parent's is not in it).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os
import queue
import threading
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

from relay import log

T = TypeVar("T")

_IDLE = 10.0  # seconds a thread waits for its next call before it ends


_ALL: weakref.WeakSet[HandOffThread] = weakref.WeakSet()
_PR_SET_NAME = 15  # linux/prctl.h


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - no C library to load (not Linux)
        return None


LIBC = _libc()   # also relay.groupcommit's (syncfs, sync_file_range)
_PRCTL = getattr(LIBC, "prctl", None)


def _name_os_thread(name: str) -> None:
    # Once a thread (not a call): the kernel's name for it, so per-thread CPU
    # in /proc/PID/task/*/stat, top -H and perf say which thread is which.
    # Best effort: 15 bytes, and nothing where prctl is missing.
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def never_abort(_: object) -> trio.lowlevel.Abort:
    """For ``wait_task_rescheduled``: a cancelled waiter waits on until it is rescheduled."""
    return trio.lowlevel.Abort.FAILED


def _after_fork_in_child() -> None:
    for worker in list(_ALL):
        worker._forget_thread()


class HandOffThread:
    """Runs ``fn(*args)`` calls one at a time in one thread that outlives them."""

    def __init__(self, name: str, *, idle: float = _IDLE) -> None:
        self._name = name
        self._idle = idle
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        _ALL.add(self)

    def _forget_thread(self) -> None:
        # In a forked child: the parent's thread is not there, nor its calls.
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread = None

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in the thread; its result or its exception."""
        return await self.run_sync_then(None, fn, *args)

    async def run_sync_then(self, then: Callable[[], object] | None, fn: Callable[..., T],
                            *args: Any) -> T:
        """``fn(*args)`` in the thread, then ``then()`` there once the caller was woken.

        ``then`` is for work the caller need not wait for; it runs before the
        thread's next call.  What it raises is lost (it has no caller left).
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()
        context = contextvars.copy_context()
        with self._lock:
            self._queue.put((task, token, context, fn, args, then))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name=self._name, daemon=True)
                self._thread.start()

        # Handed over: wait for the call to end (never aborted); resumed by the
        # thread with the call's outcome, unwrapped here.
        result: T = await trio.lowlevel.wait_task_rescheduled(never_abort)
        return result

    def _serve(self) -> None:
        _name_os_thread(self._name)
        # Bounded by the idle timeout: the loop ends once no call came for ``idle`` s.
        while True:
            try:
                task, token, context, fn, args, then = self._queue.get(timeout=self._idle)
            except queue.Empty:
                with self._lock:  # calls are queued under the lock: none is missed
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            result = outcome.capture(context.run, fn, *args)
            # A run that ended under the call has no task left to resume.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(trio.lowlevel.reschedule, task, result)
            if then is not None:
                try:
                    context.run(then)
                except Exception as exc:  # no caller left to raise it to; the thread lives on
                    log.event("error", "thread_task_failed", thread=self._name, error=repr(exc))


os.register_at_fork(after_in_child=_after_fork_in_child)


class HandOffPool:
    """As many ``HandOffThread`` as calls run at once, each kept for the next call.

    For a caller whose calls may overlap (a sink several delivery workers
    share): they still run side by side, each in a thread that lives on.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._idle: list[HandOffThread] = []

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in an idle thread of the pool (a new one when none is idle)."""
        thread = self._idle.pop() if self._idle else HandOffThread(self._name)
        try:
            return await thread.run_sync(fn, *args)
        finally:
            self._idle.append(thread)
