from __future__ import annotations

import asyncio

import pytest

from nbdquorum.block.rangelock import RangeLock
from tests.unit.aiohelp import run


def test_readers_share_writers_exclude() -> None:
    async def main() -> list[str]:
        lock = RangeLock()
        order: list[str] = []
        gate = asyncio.Event()

        async def reader(name: str) -> None:
            async with lock.hold(0, 4096, exclusive=False):
                order.append(name + "+")
                await gate.wait()
                order.append(name + "-")

        async def writer() -> None:
            async with lock.hold(100, 10, exclusive=True):
                order.append("w")

        t1 = asyncio.create_task(reader("r1"))
        t2 = asyncio.create_task(reader("r2"))
        await asyncio.sleep(0)
        t3 = asyncio.create_task(writer())
        await asyncio.sleep(0)
        assert order == ["r1+", "r2+"]  # both readers in, writer waits
        gate.set()
        await asyncio.gather(t1, t2, t3)
        return order

    assert run(main()) == ["r1+", "r2+", "r1-", "r2-", "w"]


def test_overlapping_writes_keep_arrival_order_and_disjoint_run_in_parallel() -> None:
    async def main() -> list[str]:
        lock = RangeLock()
        order: list[str] = []
        gate = asyncio.Event()

        async def w(name: str, off: int, hold: bool = False) -> None:
            async with lock.hold(off, 512, exclusive=True):
                order.append(name)
                if hold:
                    await gate.wait()

        a = asyncio.create_task(w("a", 0, hold=True))
        await asyncio.sleep(0)
        b = asyncio.create_task(w("b", 256))  # overlaps a: waits
        c = asyncio.create_task(w("c", 4096))  # disjoint: runs now
        d = asyncio.create_task(w("d", 300))  # overlaps b (waiting): must not overtake it
        await asyncio.sleep(0.01)
        assert order == ["a", "c"]
        gate.set()
        await asyncio.gather(a, b, c, d)
        return order

    assert run(main()) == ["a", "c", "b", "d"]


def test_reader_does_not_overtake_waiting_writer() -> None:
    async def main() -> list[str]:
        lock = RangeLock()
        order: list[str] = []
        gate = asyncio.Event()

        async def op(name: str, excl: bool, hold: bool = False) -> None:
            async with lock.hold(0, 10, exclusive=excl):
                order.append(name)
                if hold:
                    await gate.wait()

        t = [asyncio.create_task(op("r1", False, hold=True))]
        await asyncio.sleep(0)
        t.append(asyncio.create_task(op("w", True)))
        await asyncio.sleep(0)
        t.append(asyncio.create_task(op("r2", False)))
        await asyncio.sleep(0.01)
        assert order == ["r1"]
        gate.set()
        await asyncio.gather(*t)
        return order

    assert run(main()) == ["r1", "w", "r2"]


def test_cancelled_waiter_releases_its_place() -> None:
    async def main() -> None:
        lock = RangeLock()
        gate = asyncio.Event()

        async def holder() -> None:
            async with lock.hold(0, 10, exclusive=True):
                await gate.wait()

        h = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiter.cancel()
        await asyncio.sleep(0)
        gate.set()
        await h
        assert len(lock) == 0
        async with lock.hold(0, 10, exclusive=True):
            pass

    run(main())


@pytest.mark.parametrize(("shift", "big"), [(20, 64), (9, 4), (10, 1)])
def test_random_traffic_against_a_model(shift: int, big: int) -> None:
    """Random readers and writers over a few ranges, some cancelled while they wait,
    some taken with try_acquire: never two conflicting holders, a request runs as
    soon as no earlier overlapping one is in its way, and the lock ends empty.
    With small buckets (``shift``) entries spread over many, and some touch more
    than ``big`` (checked by every request)."""
    import random

    from nbdquorum.block.rangelock import _Entry

    async def main() -> None:
        rng = random.Random(5 + shift)
        lock = RangeLock(shift, big)
        holding: list[_Entry] = []  # granted, in grant order

        def check() -> None:
            for i, a in enumerate(holding):
                for b in holding[i + 1:]:
                    assert not a.conflicts(b), (a.start, a.end, b.start, b.end)
            assert lock._exclusive == sum(e.exclusive for e in lock._entries)
            assert lock._waiting == sum(1 for e in lock._entries
                                        if e.waiter is not None and not e.waiter.done())
            # every entry filed in the buckets it touches, or with the big ones; no other
            filed: dict[_Entry, set[int]] = {}
            for k, near in lock._buckets.items():
                assert near, "no empty bucket is kept"
                for e in near:
                    filed.setdefault(e, set()).add(k)
            for e in lock._entries:
                first, last = e.start >> shift, (e.end - 1) >> shift
                if last - first >= big:
                    assert e in lock._big and e not in filed
                else:
                    assert filed.pop(e) == set(range(first, last + 1))
            assert not filed and set(lock._big) <= set(lock._entries)

        async def user(offset: int, length: int, exclusive: bool, stay: int) -> None:
            entry = await lock.acquire(offset, length, exclusive=exclusive)
            holding.append(entry)
            try:
                check()
                for _ in range(stay):
                    await asyncio.sleep(0)
            finally:  # (also when cancelled while holding it)
                holding.remove(entry)
                lock.release(entry)

        tasks: list[asyncio.Task[None]] = []
        for _ in range(400):
            offset, length = rng.randrange(0, 64) * 512, rng.randrange(1, 8) * 512
            exclusive = rng.random() < 0.4
            roll = rng.random()
            if roll < 0.2:
                probe = _Entry(offset, offset + length, exclusive)
                busy = any(e.conflicts(probe) for e in lock._entries)
                entry = lock.try_acquire(offset, length, exclusive=exclusive)
                assert (entry is None) == busy
                if entry is not None:
                    holding.append(entry)
                    check()
                    holding.remove(entry)
                    lock.release(entry)
            else:
                tasks.append(asyncio.get_running_loop().create_task(
                    user(offset, length, exclusive, rng.randrange(0, 4))))
            if roll > 0.9 and tasks:
                rng.choice(tasks).cancel()  # mostly while waiting for the range
            for _ in range(rng.randrange(0, 3)):
                await asyncio.sleep(0)
            check()
            # nobody waits who could run: no earlier entry overlaps a waiter
            entries = list(lock._entries)
            for i, e in enumerate(entries):
                if e.waiter is not None and not e.waiter.done():
                    assert any(entries[j].conflicts(e) for j in range(i))
        await asyncio.gather(*tasks, return_exceptions=True)
        assert len(lock) == 0 and lock._waiting == 0 and lock._exclusive == 0

    run(main())
