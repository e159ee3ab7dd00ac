"""relay.handoff: the long-lived threads of the group commit and the dir:// sink."""

from __future__ import annotations

import contextvars
import os
import threading
import time

import pytest
import trio

from relay.handoff import HandOffPool, HandOffThread

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


def test_calls_run_in_one_thread_that_outlives_them() -> None:
    worker = HandOffThread("t-test")

    async def main() -> list[int]:
        with trio.fail_after(10):
            return [await worker.run_sync(threading.get_ident) for _ in range(20)]

    idents = trio.run(main)
    assert len(set(idents)) == 1
    assert idents[0] != threading.get_ident()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_the_thread_has_its_name_in_the_kernel() -> None:
    # So /proc/PID/task/*/stat (per-thread CPU), top -H and perf can tell it apart.
    worker = HandOffThread("dir-sink-test-long-name")

    def comm() -> str:
        with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
            return f.read().strip()

    async def main() -> str:
        with trio.fail_after(10):
            return await worker.run_sync(comm)

    assert trio.run(main) == "dir-sink-test-l"   # the kernel keeps 15 bytes


def test_result_exception_and_context_come_back() -> None:
    worker = HandOffThread("t-test")

    def boom() -> None:
        raise KeyError("x")

    async def main() -> None:
        with trio.fail_after(10):
            assert await worker.run_sync(divmod, 7, 2) == (3, 1)
            with pytest.raises(KeyError):
                await worker.run_sync(boom)
            VAR.set("caller's")
            assert await worker.run_sync(VAR.get) == "caller's"

    trio.run(main)


def test_cancelled_before_the_hand_over_never_runs() -> None:
    worker = HandOffThread("t-test")
    ran: list[int] = []

    async def main() -> None:
        with trio.fail_after(10):
            with trio.CancelScope() as scope:
                scope.cancel()
                await worker.run_sync(ran.append, 1)
            assert scope.cancelled_caught
            await worker.run_sync(ran.append, 2)   # the thread still serves

    trio.run(main)
    assert ran == [2]


def test_a_cancelled_caller_waits_for_the_call_to_end() -> None:
    worker = HandOffThread("t-test")
    ended = threading.Event()

    def slow() -> str:
        time.sleep(0.3)
        ended.set()
        return "done"

    async def main() -> None:
        with trio.fail_after(10):
            with trio.move_on_after(0.05) as scope:
                # Not abandoned: the call's result comes back after its end.
                assert await worker.run_sync(slow) == "done"
                assert ended.is_set()
            assert scope.cancel_called

    trio.run(main)


def test_an_idle_thread_ends_and_the_next_call_starts_another() -> None:
    worker = HandOffThread("t-test", idle=0.05)

    async def main() -> tuple[int, int]:
        with trio.fail_after(10):
            first = await worker.run_sync(threading.get_ident)
            for _ in range(100):  # bounded: up to 5 s for the thread to end
                if not any(t.ident == first for t in threading.enumerate()):
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("idle thread did not end")
            return first, await worker.run_sync(lambda: 42)

    _, second = trio.run(main)
    assert second == 42


def test_a_pool_runs_overlapping_calls_side_by_side() -> None:
    pool = HandOffPool("t-pool")
    barrier = threading.Barrier(3, timeout=5)   # fails unless all three run at once

    async def main() -> list[int]:
        idents: list[int] = []

        async def one() -> None:
            await pool.run_sync(barrier.wait)
            idents.append(await pool.run_sync(threading.get_ident))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(one)
        return idents

    idents = trio.run(main)
    assert len(idents) == 3


def test_a_forked_child_starts_its_own_thread() -> None:
    worker = HandOffThread("t-test")

    async def call() -> int:
        with trio.fail_after(10):
            return await worker.run_sync(lambda: 7)

    assert trio.run(call) == 7          # the parent's thread now exists
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the child reports through its exit status
        code = 1
        try:
            code = 0 if trio.run(call) == 7 else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:   # bounded: 10 s for the child
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child's call never came back")
