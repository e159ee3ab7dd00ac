"""Receive buffers: a bounded pool of large buffers lent while a body streams, and the
heap trim after a flood of connections."""

from __future__ import annotations

from relay.buffers import LARGE, BufferPool, HeapTrimmer


def test_the_pool_lends_at_most_its_limit_and_keeps_a_few() -> None:
    pool = BufferPool(limit=3, keep=1)
    lent = [pool.take() for _ in range(4)]
    assert lent[3] is None and all(b is not None and len(b) == LARGE for b in lent[:3])
    assert pool.statistics().lent == 3 and pool.statistics().refused == 1
    for buf in lent[:3]:
        assert buf is not None
        pool.give(buf)
    stats = pool.statistics()
    assert (stats.lent, stats.idle) == (0, 1)
    assert pool.take() is lent[0]     # a kept buffer is lent again, not a new one


def test_the_heap_is_trimmed_each_time_the_connections_halve() -> None:
    trimmer = HeapTrimmer(floor=4)
    for active in range(1, 9):
        trimmer.opened(active)
    for active in range(7, 4, -1):
        trimmer.closed(active)
    assert trimmer.trims == 0
    trimmer.closed(4)                 # half of the peak of 8
    assert trimmer.trims == 1
    trimmer.closed(3)
    assert trimmer.trims == 1         # below the floor of 4 now: no more trims
    small = HeapTrimmer(floor=256)
    small.opened(10)
    small.closed(0)
    assert small.trims == 0           # a handful of connections is no flood
