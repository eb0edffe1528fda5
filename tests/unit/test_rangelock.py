from __future__ import annotations

import asyncio

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
