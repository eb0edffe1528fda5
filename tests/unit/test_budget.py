"""The process budget's fairness rules, the request peek that charges before a
payload buffer exists, and the spare-buffer pool's total cap."""

from __future__ import annotations

import asyncio
import struct

from nbdquorum.nbd.constants import REQUEST_MAGIC, Cmd
from nbdquorum.nbd.server import Budget
from tests.unit.aiohelp import run
from tests.unit.test_nbd_protocol import transmission_conn

MiB = 1 << 20


def test_uncontended_grants_up_to_the_limit() -> None:
    b = Budget(10 * MiB, floor=MiB)
    a = object()
    assert b.try_acquire(a, 6 * MiB)
    assert b.try_acquire(a, 4 * MiB)
    assert not b.try_acquire(a, 2 * MiB)  # over the limit, and holding already
    b.release(a, 10 * MiB)
    assert b.used == 0 and not b.held


def test_a_connection_holding_nothing_always_gets_a_floor_request() -> None:
    """Clients that stop reading keep their charges; a newcomer is never stuck behind them."""
    b = Budget(8 * MiB, floor=3 * MiB)
    stalled = [object() for _ in range(4)]
    for s in stalled:
        assert b.try_acquire(s, 2 * MiB)
    assert b.used == b.limit
    newcomer = object()
    assert b.try_acquire(newcomer, 3 * MiB)  # beyond the limit, within the floor
    assert not b.try_acquire(newcomer, 3 * MiB)  # but only its first
    assert not b.try_acquire(object(), 4 * MiB)  # and only up to the floor
    assert b.used == 11 * MiB


def test_an_oversized_request_passes_alone() -> None:
    b = Budget(8 * MiB, floor=MiB)
    a, c = object(), object()
    assert b.try_acquire(a, 32 * MiB)  # nothing else held
    assert not b.try_acquire(c, 2 * MiB)
    b.release(a, 32 * MiB)
    assert b.try_acquire(c, 2 * MiB)
    assert not b.try_acquire(a, 32 * MiB)  # something else is held now


def test_no_connection_takes_more_than_its_share_while_others_wait() -> None:
    async def go() -> None:
        b = Budget(12 * MiB, floor=MiB)
        greedy, other = object(), object()
        assert b.try_acquire(greedy, 10 * MiB)
        # the other waits for 4 MiB: the greedy one is over its share (6 MiB)
        waiting = asyncio.create_task(b.acquire(other, 4 * MiB))
        await asyncio.sleep(0)
        assert not waiting.done()
        assert not b.try_acquire(greedy, 1 * MiB)  # fits, but over its share while other waits
        b.release(greedy, 4 * MiB)  # the greedy one finishes some: the waiter fits now
        await asyncio.wait_for(waiting, 5)
        assert b.held == {greedy: 6 * MiB, other: 4 * MiB}
        # with nobody waiting, the spare room may go to anyone
        assert b.try_acquire(greedy, 2 * MiB)

    run(go())


def test_waiters_that_fit_pass_one_that_does_not() -> None:
    async def go() -> None:
        b = Budget(8 * MiB, floor=MiB)
        a, big, small = object(), object(), object()
        assert b.try_acquire(a, 6 * MiB)
        t_big = asyncio.create_task(b.acquire(big, 6 * MiB))
        await asyncio.sleep(0)
        # 2 MiB fits and is within the small one's share: it does not queue behind
        t_small = asyncio.create_task(b.acquire(small, 2 * MiB))
        await asyncio.sleep(0)
        assert t_small.done() and not t_big.done()
        b.release(a, 6 * MiB)
        await asyncio.wait_for(t_big, 5)
        assert b.used == 8 * MiB

    run(go())


def test_payloads_still_arriving_hold_at_most_half_and_block_no_one() -> None:
    """Trickling writers share the receive half; reads and complete requests keep the limit."""
    async def go() -> None:
        b = Budget(64 * MiB, floor=MiB)
        tricklers = [object() for _ in range(8)]
        assert b.try_acquire(tricklers[0], 48 * MiB, receiving=True)  # alone: may pass
        waiting = [asyncio.create_task(b.acquire(t, 32 * MiB, receiving=True))
                   for t in tricklers[1:]]
        await asyncio.sleep(0)
        assert not any(t.done() for t in waiting)
        # the waiting tricklers cannot use the room: they do not shrink a reader's share
        reader = object()
        assert b.try_acquire(reader, 32 * MiB)
        assert b.try_acquire(reader, 32 * MiB)
        assert b.used == 64 * MiB and b.receiving == 48 * MiB
        small = object()
        assert b.try_acquire(small, MiB, receiving=True)  # the floor, as ever
        b.release(small, MiB, receiving=True)
        # a payload that arrived in full holds like any request and frees the receive half
        b.received(48 * MiB)
        await asyncio.sleep(0)
        assert sum(t.done() for t in waiting) == 1
        assert b.used == 112 * MiB  # over the limit until given back: reads wait meanwhile
        assert not b.try_acquire(reader, MiB)
        for t in waiting:
            t.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)

    run(go())


def test_when_every_waiter_is_over_its_share_the_one_holding_least_goes() -> None:
    async def go() -> None:
        b = Budget(12 * MiB, floor=MiB)
        a, c, d = object(), object(), object()
        assert b.try_acquire(a, 8 * MiB)
        assert b.try_acquire(c, 2 * MiB)
        assert b.try_acquire(d, 2 * MiB)
        t_a = asyncio.create_task(b.acquire(a, 4 * MiB))
        t_c = asyncio.create_task(b.acquire(c, 5 * MiB))
        await asyncio.sleep(0)
        b.release(d, 2 * MiB)
        b.release(a, 4 * MiB)  # room for either; both over their share (6 MiB)
        await asyncio.sleep(0)
        assert t_c.done() and not t_a.done()  # c holds less
        b.release(c, 7 * MiB)
        await asyncio.wait_for(t_a, 5)

    run(go())


def test_a_cancelled_waiter_leaves_no_trace() -> None:
    async def go() -> None:
        b = Budget(4 * MiB, floor=MiB)
        a, c = object(), object()
        assert b.try_acquire(a, 4 * MiB)
        t = asyncio.create_task(b.acquire(c, 2 * MiB))
        await asyncio.sleep(0)
        t.cancel()
        await asyncio.gather(t, return_exceptions=True)
        b.release(a, 4 * MiB)
        assert b.used == 0 and not b.held and b.share() == b.limit

    run(go())


def test_release_when_idle_after_a_peak_schedules_a_trim() -> None:
    async def go() -> None:
        b = Budget(64 * MiB, floor=MiB)
        a = object()
        assert b.try_acquire(a, 16 * MiB)
        b.release(a, 16 * MiB)
        assert b._trim_handle is not None
        b._trim_handle.cancel()
        b._trim()  # runs malloc_trim; the peak restarts from what is used
        assert b.peak == 0

    run(go())


def _header(cmd: int, length: int, cookie: int = 1) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, cookie, 0, length)


def test_peek_sees_a_write_header_before_its_payload_buffer_exists() -> None:
    conn = transmission_conn()
    assert conn.peek_request() is None
    conn.receive_data(_header(Cmd.WRITE, 8 * MiB)[:20])
    assert conn.peek_request() is None  # not a whole header yet
    conn.receive_data(_header(Cmd.WRITE, 8 * MiB)[20:] + b"x" * 100)
    assert conn.peek_request() == (Cmd.WRITE, 8 * MiB, False)
    assert len(conn.receive_buffer()) < 8 * MiB  # peeking allocated nothing
    conn.next_event()  # now the payload buffer exists
    assert conn.peek_request() is None  # a payload is pending: no header is next
    assert len(conn.receive_buffer()) == 8 * MiB - 100


def test_peek_reports_complete_small_writes_and_other_commands() -> None:
    conn = transmission_conn()
    conn.receive_data(_header(Cmd.WRITE, 4096) + bytes(4096))
    assert conn.peek_request() == (Cmd.WRITE, 4096, True)
    conn.next_event()
    conn.receive_data(_header(Cmd.READ, MiB, cookie=2))
    assert conn.peek_request() == (Cmd.READ, MiB, True)
    conn.receive_data(b"\0" * 28)  # a bad magic behind it is next_event()'s to report
    conn.next_event()
    assert conn.peek_request() is None
