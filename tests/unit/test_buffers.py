"""The pool of spare buffers: a buffer is handed out again only once nothing but
the pool refers to it, and the pool keeps within its limits."""

from __future__ import annotations

import gc

from nbdquorum.buffers import Spares

K = 1 << 10


def test_small_buffers_are_not_pooled() -> None:
    pool = Spares(limit=1 << 20, keep_idle=1 << 20, min_size=64 * K)
    a = pool.take(4 * K)
    assert len(a) == 4 * K and pool.held == 0 and pool.made == 0


def test_a_buffer_comes_back_only_once_unused() -> None:
    pool = Spares(limit=1 << 20, keep_idle=1 << 20, min_size=64 * K)
    a = pool.take(64 * K)
    b = pool.take(64 * K)
    assert a is not b  # a is still referred to
    ida = id(a)
    del a
    c = pool.take(64 * K)
    assert id(c) == ida and pool.reused == 1
    # every kind of holder keeps it busy: a memoryview, a slice of one, a list
    view = memoryview(c)[10:20]
    assert pool.take(64 * K) is not c
    del view
    holder = [c]
    assert pool.take(64 * K) is not c
    del holder
    idc = id(c)
    del c
    gc.collect()
    assert id(pool.take(64 * K)) == idc


def test_the_pool_keeps_at_most_its_limit_busy_or_free() -> None:
    pool = Spares(limit=4 * 64 * K, keep_idle=64 * K, min_size=64 * K)
    busy = [pool.take(64 * K) for _ in range(6)]  # two more than the limit holds
    assert pool.held == pool.limit and pool.made == 6
    del busy
    # a bigger size makes room by forgetting free buffers of another size
    big = pool.take(128 * K)
    assert pool.held == pool.limit
    assert pool.free_bytes() == 2 * 64 * K
    pool.prune()  # idle: at most keep_idle of free buffers stay
    assert pool.free_bytes() == 64 * K
    assert pool.held == 64 * K + 128 * K
    del big
    assert pool.free_bytes() == 64 * K + 128 * K


def test_a_taken_buffer_is_never_held_by_two_takers() -> None:
    """Whatever order buffers of two sizes are taken and dropped in; the pool's
    count of its bytes stays right (a wrong one would stop it reusing anything)."""
    import random

    rng = random.Random(5)
    pool = Spares(limit=8 * 64 * K, keep_idle=2 * 64 * K, min_size=64 * K)
    held: list[bytearray] = []
    for _ in range(2000):
        if held and rng.random() < 0.5:
            held.pop(rng.randrange(len(held)))
        else:
            b = pool.take(rng.choice((64 * K, 128 * K)))
            assert all(b is not h for h in held)
            held.append(b)
        if rng.random() < 0.05:
            pool.prune()
        assert pool.held <= pool.limit
        assert pool.held == pool.pooled_bytes()
    held.clear()
    pool.prune()
    assert pool.free_bytes() <= pool.keep_idle
    # the pool still hands its buffers out again (its count of bytes is right)
    pool.take(64 * K)
    before = pool.reused
    for _ in range(10):
        pool.take(64 * K)
    assert pool.reused == before + 10


def test_making_room_while_taking_keeps_the_count_right() -> None:
    """A take that drops free buffers of another size to make room files the new
    buffer in the list the pool keeps, not in one it has just replaced."""
    pool = Spares(limit=4 * 64 * K, keep_idle=4 * 64 * K, min_size=64 * K)
    a, b = pool.take(64 * K), pool.take(64 * K)
    pool.take(128 * K)  # dropped at once: free
    c = pool.take(64 * K)  # no free 64K, the pool full: the 128K goes
    assert pool.held == pool.pooled_bytes() == 3 * 64 * K
    del a, b, c
    assert pool.free_bytes() == 3 * 64 * K
