"""Thin images stay thin: resync and scrub skip what every voter reads as zero.

The children here are sparse images held in memory (4 KiB blocks, a dict of the
allocated ones) that answer block status like a file and record every operation,
so a test can say what a resync wrote, zeroed, or left alone.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import random
from typing import Any

import pytest

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.faulty import FaultRule, FaultyNode
from nbdquorum.block.node import STATE_HOLE, STATE_ZERO, BlockNode, Buffer, Extent
from nbdquorum.block.quorum import ChildState, QuorumNode
from nbdquorum.block.quorum.thin import (
    ZERO_GRAIN,
    all_zero,
    intersect_extents,
    region_runs,
    zero_blocks,
)
from nbdquorum.eventbus import EventBus
from nbdquorum.jobs.job import JobManager
from nbdquorum.jobs.resync import ResyncJob
from nbdquorum.jobs.scrub import ScrubJob
from tests.unit.aiohelp import run

BLK = 4096
MiB = 1 << 20
GiB = 1 << 30
BIG = 64 * GiB  # never read in full: a test that tried would not finish


class SparseNode(BlockNode):
    """A sparse image in memory: only written 4 KiB blocks exist; records its I/O."""

    driver = "sparse"

    def __init__(self, name: str, size: int = BIG, *, hole_flags: int = STATE_HOLE | STATE_ZERO,
                 ) -> None:
        super().__init__(name)
        self._size = size
        self.blocks: dict[int, bytearray] = {}
        self.ops: list[tuple[str, int, int]] = []  # (op, offset, length)
        self.written: list[tuple[int, bytes]] = []  # every pwrite's data
        self.hole_flags = hole_flags  # what block status says of a hole
        self.status_error: int | None = None

    def size(self) -> int:
        return self._size

    def allocated(self) -> int:
        return len(self.blocks) * BLK

    def _blocks(self, offset: int, length: int) -> range:
        return range(offset // BLK, -(-(offset + length) // BLK))

    async def pread(self, offset: int, length: int) -> Buffer:
        self.ops.append(("read", offset, length))
        out = bytearray(length)
        for b in self._blocks(offset, length):
            data = self.blocks.get(b)
            if data is not None:
                lo, hi = max(offset, b * BLK), min(offset + length, b * BLK + BLK)
                out[lo - offset:hi - offset] = data[lo - b * BLK:hi - b * BLK]
        return out

    def _put(self, offset: int, data: bytes) -> None:
        for b in self._blocks(offset, len(data)):
            lo, hi = max(offset, b * BLK), min(offset + len(data), b * BLK + BLK)
            blk = self.blocks.setdefault(b, bytearray(BLK))
            blk[lo - b * BLK:hi - b * BLK] = data[lo - offset:hi - offset]

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self.ops.append(("write", offset, len(data)))
        self.written.append((offset, bytes(data)))
        self._put(offset, bytes(data))

    async def zero(self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
                   fua: bool = False) -> None:
        self.ops.append(("zero", offset, length))
        for b in [b for b in self.blocks if offset <= b * BLK and b * BLK + BLK <= offset + length]:
            del self.blocks[b]  # whole blocks: a punched hole
        for b in self._blocks(offset, length):
            if b in self.blocks:  # partial blocks: zeroed bytes
                lo, hi = max(offset, b * BLK), min(offset + length, b * BLK + BLK)
                self.blocks[b][lo - b * BLK:hi - b * BLK] = bytes(hi - lo)

    async def flush(self) -> None:
        pass

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self.ops.append(("status", offset, length))
        if self.status_error is not None:
            raise OSError(self.status_error, "block status failed")
        out: list[Extent] = []
        pos, end = offset, offset + length
        for b in sorted(b for b in self.blocks if offset // BLK <= b < -(-end // BLK)):
            start = max(b * BLK, offset)
            if start > pos:
                out.append((start - pos, self.hole_flags))
            stop = min(b * BLK + BLK, end)
            if out and out[-1][1] == 0 and start == pos:
                out[-1] = (out[-1][0] + stop - start, 0)
            else:
                out.append((stop - start, 0))
            pos = stop
        if pos < end:
            out.append((end - pos, self.hole_flags))
        return out

    def of(self, op: str) -> list[tuple[int, int]]:
        return [(o, n) for kind, o, n in self.ops if kind == op]


def voters(n: int = 3, size: int = BIG) -> list[SparseNode]:
    return [SparseNode(f"c{i}", size) for i in range(n)]


def write_all(nodes: list[SparseNode], offset: int, data: bytes) -> None:
    for node in nodes:
        node._put(offset, data)


def quorum(kids: list[SparseNode]) -> QuorumNode:
    return QuorumNode("q0", kids, vote_threshold=2)


def resync(q: QuorumNode, target: BlockNode) -> ResyncJob:
    async def main() -> ResyncJob:
        bus = EventBus()
        slot = q.members.attach(target, ChildState.RESYNCING)
        job = ResyncJob(q, slot, bus)
        JobManager(bus).add(job)
        await job.wait()
        assert job.error is None, job.error
        assert slot.state is ChildState.ACTIVE
        return job

    job: ResyncJob = run(main())
    return job


async def same_bytes(a: SparseNode, b: SparseNode) -> None:
    for blk in set(a.blocks) | set(b.blocks):
        assert await a.pread(blk * BLK, BLK) == await b.pread(blk * BLK, BLK), blk * BLK


# --------------------------------------------------------------------------- the rule


def test_intersect_extents_is_the_and_of_every_map() -> None:
    rnd = random.Random(7)
    for _ in range(300):
        length = rnd.randint(1, 60)
        maps = []
        for _ in range(rnd.randint(1, 4)):
            m, left = [], length + rnd.choice([0, 0, 5, -3])
            while left > 0:
                n = rnd.randint(1, 9)
                m.append((n, rnd.choice([0, STATE_HOLE, STATE_ZERO, 3])))
                left -= n
            maps.append(m)
        got = intersect_extents(maps, length)
        assert sum(n for n, _ in got) == length
        flat = [f for n, f in got for _ in range(n)]
        for i in range(length):
            want = 3
            for m in maps:
                p, f = 0, 0
                for n, fl in m:
                    if p <= i < p + n:
                        f = fl
                        break
                    p += n
                want &= f
            assert flat[i] == want, (maps, length, got)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(got))  # merged


def test_zero_needs_zero_on_every_voter_hole_alone_is_not_enough() -> None:
    kids = voters(3, 64 * MiB)
    kids[1]._put(8 * MiB, b"\x01" * BLK)  # one voter has data where the others have holes
    got = run(all_zero(kids, 0, 64 * MiB))
    assert got == [(8 * MiB, STATE_ZERO), (BLK, 0), (56 * MiB - BLK, STATE_ZERO)]
    kids[2].hole_flags = STATE_HOLE  # unallocated, but not promised to read as zero
    assert run(all_zero(kids, 0, 64 * MiB)) == [(64 * MiB, 0)]


def test_a_voter_that_cannot_answer_makes_everything_data() -> None:
    kids = voters(3, 64 * MiB)
    kids[0].status_error = errno.EIO
    assert run(all_zero(kids, 0, 64 * MiB)) == [(64 * MiB, 0)]
    assert run(all_zero([], 0, MiB)) == [(MiB, 0)]


def test_an_answer_covering_less_than_asked_is_asked_again() -> None:
    class Short(SparseNode):
        async def block_status(self, offset: int, length: int) -> list[Extent]:
            return (await super().block_status(offset, min(length, 3 * MiB)))

    kids: list[SparseNode] = [Short("s0", 16 * MiB), *voters(2, 16 * MiB)]
    write_all(kids, 10 * MiB, b"\x05" * BLK)
    got = run(all_zero(kids, 0, 16 * MiB))
    assert got == [(10 * MiB, STATE_ZERO), (BLK, 0), (6 * MiB - BLK, STATE_ZERO)]
    assert len(kids[0].of("status")) == 6  # 3 MiB an answer


def test_region_runs_and_zero_blocks() -> None:
    ext = [(MiB + BLK, STATE_ZERO), (BLK, 0), (3 * MiB - 2 * BLK, STATE_ZERO)]
    assert region_runs(ext, 0, 4 * MiB, MiB) == [
        (0, MiB, True), (MiB, MiB, False), (2 * MiB, 2 * MiB, True)]
    data = bytearray(4 * ZERO_GRAIN)
    data[ZERO_GRAIN + 5] = 1
    assert zero_blocks(data, 0) == [(0, ZERO_GRAIN, True), (ZERO_GRAIN, 2 * ZERO_GRAIN, False),
                                    (2 * ZERO_GRAIN, 4 * ZERO_GRAIN, True)]
    # blocks are aligned to the disk, not to the buffer
    data = bytearray(2 * ZERO_GRAIN)
    data[0] = data[-1] = 1
    assert zero_blocks(data, 512) == [
        (0, ZERO_GRAIN - 512, False), (ZERO_GRAIN - 512, 2 * ZERO_GRAIN - 512, True),
        (2 * ZERO_GRAIN - 512, 2 * ZERO_GRAIN, False)]
    assert zero_blocks(bytes(BLK), 12288) == [(0, BLK, True)]  # all zero: no data at all
    # a view into a larger read (compared in place): the same answers
    big = bytearray(8 * ZERO_GRAIN)
    big[3 * ZERO_GRAIN + 5] = 1
    big[6 * ZERO_GRAIN - 1] = 7
    view = memoryview(big)[2 * ZERO_GRAIN:6 * ZERO_GRAIN]
    assert zero_blocks(view, 0) == zero_blocks(bytes(view), 0) == [
        (0, ZERO_GRAIN, True), (ZERO_GRAIN, 2 * ZERO_GRAIN, False),
        (2 * ZERO_GRAIN, 3 * ZERO_GRAIN, True), (3 * ZERO_GRAIN, 4 * ZERO_GRAIN, False)]
    assert zero_blocks(view[512:], 512) == zero_blocks(bytes(view[512:]), 512)
    assert zero_blocks(memoryview(bytes(BLK)), 12288) == [(0, BLK, True)]


# --------------------------------------------------------------------------- resync


def test_resync_onto_a_blank_image_writes_only_the_data() -> None:
    kids = voters()
    write_all(kids, 0, b"\x11" * (256 << 10))
    write_all(kids, 20 * GiB + 12288, b"\x22" * BLK)  # one block inside a region
    write_all(kids, BIG - MiB, b"\x33" * MiB)
    q = quorum(kids)
    new = SparseNode("new")
    job = resync(q, new)
    assert new.of("zero") == []  # blank already: nothing to zero
    assert sorted(new.of("write")) == [(0, 256 << 10), (20 * GiB + 12288, BLK),
                                       (BIG - MiB, MiB)]
    assert new.allocated() == kids[0].allocated()
    assert job.copied.written == (256 << 10) + BLK + MiB
    assert job.copied.skipped == BIG - job.copied.written
    assert job.current == BIG
    # the voters were read only where they hold data
    assert sum(n for _, n in kids[0].of("read")) == job.copied.read <= 3 * MiB
    run(same_bytes(kids[0], new))


def test_resync_zeroes_what_the_target_holds_and_never_writes_zeroes() -> None:
    kids = voters()
    write_all(kids, 5 * MiB, b"\x44" * MiB)
    write_all(kids, 9 * MiB, bytes(256 << 10))  # zeros written as data: allocated
    q = quorum(kids)
    new = SparseNode("new")  # a used disk: garbage where the quorum has holes
    new._put(0, b"\xab" * (2 * MiB))
    new._put(5 * MiB, b"\xab" * (3 * MiB))
    new._put(30 * GiB, b"\xab" * BLK)
    job = resync(q, new)
    assert all(any(data) for _, data in new.written), "zeroes were written as data"
    assert new.of("write") == [(5 * MiB, MiB)]
    zeroed = new.of("zero")
    assert sum(n for _, n in zeroed) == job.copied.zeroed
    covered = set()
    for off, n in zeroed:  # only where the target held something
        covered |= set(range(off // BLK, (off + n) // BLK))
    garbage = (set(range(0, 2 * MiB // BLK)) | set(range(6 * MiB // BLK, 8 * MiB // BLK))
               | {30 * GiB // BLK})
    assert garbage <= covered
    assert job.copied.zeroed <= 4 * MiB + BLK + (256 << 10) + 2 * MiB  # not the whole disk
    run(same_bytes(kids[0], new))
    assert new.allocated() == MiB  # the explicit zeros became a hole on the copy


def test_resync_reads_and_votes_where_only_some_voters_say_zero() -> None:
    kids = voters()
    kids[0]._put(7 * GiB, b"\xee" * BLK)  # corrupt data where the others have holes
    q = quorum(kids)
    new = SparseNode("new")
    new._put(7 * GiB, b"\xab" * BLK)
    resync(q, new)
    assert (7 * GiB, BLK) in kids[1].of("read")  # that block was read and voted
    assert new.of("write") == []  # the vote says zeros: zeroed, not written
    assert run(new.pread(7 * GiB, BLK)) == bytes(BLK)


def test_resync_steps_over_big_zero_ranges_under_the_lock() -> None:
    kids = voters()
    q = quorum(kids)
    new = SparseNode("new")
    held: list[tuple[int, int]] = []
    hold = q.lock.hold

    def spy(offset: int, length: int, *, exclusive: bool) -> Any:
        assert exclusive
        held.append((offset, length))
        return hold(offset, length, exclusive=exclusive)

    q.lock.hold = spy  # type: ignore[method-assign]
    resync(q, new)
    assert len(held) == BIG // GiB  # one hold per GiB of zeros, not one per MiB region
    # each hold's block status asked under it covers the whole step
    assert sum(n for _, n in held) == BIG


def test_a_client_write_between_the_hint_and_the_step_is_copied() -> None:
    """The block status that decides a step is asked again under the lock."""
    kids = voters()
    q = quorum(kids)
    new = SparseNode("new")
    real = q.zero_extents
    calls = []

    async def racing(offset: int, length: int) -> list[Extent]:
        out = await real(offset, length)
        calls.append(offset)
        if len(calls) == 1:  # after the first (unlocked) hint: a client write lands
            await q.pwrite(3 * MiB, b"\x77" * BLK)
        return out

    q.zero_extents = racing  # type: ignore[method-assign]
    resync(q, new)
    assert run(new.pread(3 * MiB, BLK)) == b"\x77" * BLK


def test_a_target_that_cannot_zero_gets_zeroes_written() -> None:
    class NoZero(SparseNode):
        async def zero(self, offset: int, length: int, **kw: Any) -> None:
            raise OSError(errno.ENOTSUP, "no zero")

    kids = voters(3, 8 * MiB)
    q = quorum(kids)
    new = NoZero("new", 8 * MiB)
    new._put(MiB, b"\xab" * BLK)
    resync(q, new)
    assert run(new.pread(MiB, BLK)) == bytes(BLK)


# --------------------------------------------------------------------------- scrub


def scrub(q: QuorumNode, **kw: Any) -> ScrubJob:
    async def main() -> ScrubJob:
        bus = EventBus()
        job = ScrubJob(q, bus, **kw)
        JobManager(bus).add(job)
        await job.wait()
        return job

    job: ScrubJob = run(main())
    return job


def test_scrub_reads_only_what_some_voter_holds() -> None:
    kids = voters()
    write_all(kids, 3 * GiB, b"\x12" * (512 << 10))
    kids[2]._put(40 * GiB + MiB, b"\x99" * 100)  # corruption in the others' hole
    q = quorum(kids)
    job = scrub(q)
    r = job.result()
    assert r["scanned"] == BIG
    assert r["mismatched-regions"] == {"c2": 1} and r["mismatched-bytes"] == {"c2": 100}
    assert kids[0].of("read") == [(3 * GiB, MiB), (40 * GiB + MiB, MiB)]


def test_scrub_skips_zero_without_charging_the_rate_limit() -> None:
    kids = voters(3, 4 * GiB)
    q = quorum(kids)
    # at 1 MiB/s a 4 GiB scan would take an hour; zero ranges cost nothing
    job = run(asyncio.wait_for(_scrub_async(q, speed=MiB), 60))
    assert job.result()["scanned"] == 4 * GiB and kids[0].of("read") == []


async def _scrub_async(q: QuorumNode, **kw: Any) -> ScrubJob:
    bus = EventBus()
    job = ScrubJob(q, bus, **kw)
    JobManager(bus).add(job)
    await job.wait()
    return job


# --------------------------------------------------------------------------- pieces


def test_faulty_reports_data_where_a_rule_changes_reads() -> None:
    img = SparseNode("img", 16 * MiB)
    f = FaultyNode("f", img, [FaultRule(op="read", offset=4 * MiB, length=BLK, action="flip")])
    assert run(f.block_status(0, MiB)) == [(MiB, STATE_HOLE | STATE_ZERO)]
    assert run(f.block_status(4 * MiB, MiB)) == [(MiB, 0)]
    f.set_rules([FaultRule(op="write", action="error")])
    assert run(f.block_status(4 * MiB, MiB)) == [(MiB, STATE_HOLE | STATE_ZERO)]


@pytest.mark.parametrize("nbits", [1, 7, 8, 9, 1000, 4 << 20])
def test_bitmap_runs_and_clear_bits(nbits: int) -> None:
    bm = RegionBitmap(nbits * MiB, MiB, fill=True)
    assert list(bm.runs()) == [(0, nbits)]
    assert bm.clear_bits(0, nbits // 2) == nbits // 2
    assert bm.count() == nbits - nbits // 2
    if nbits > 2:
        bm.set_bit(0)
        assert list(bm.runs()) == [(0, 1), (nbits // 2, nbits - nbits // 2)]
    assert bm.dirty_bytes() == bm.count() * MiB


def test_a_target_whose_block_status_hangs_is_zeroed_within_the_child_timeout() -> None:
    class Silent(SparseNode):
        async def block_status(self, offset: int, length: int) -> list[Extent]:
            await asyncio.Event().wait()  # never answers
            return []

    kids = voters(3, 8 * MiB)
    write_all(kids, MiB, b"\x07" * BLK)
    q = QuorumNode("q0", kids, vote_threshold=2, child_timeout=0.2)
    new = Silent("new", 8 * MiB)
    new._put(5 * MiB, b"\xab" * BLK)
    resync(q, new)  # the held lock is not held forever: unknown means "zero it"
    assert run(new.pread(5 * MiB, BLK)) == bytes(BLK)
    assert run(new.pread(MiB, BLK)) == b"\x07" * BLK


def test_fragmented_data_is_read_in_few_voted_reads_and_copied_exactly() -> None:
    kids = voters(3, 64 * MiB)
    for off in range(2 * MiB, 3 * MiB, 16 * 1024):  # 4 KiB of data every 16 KiB
        write_all(kids, off, b"\x5e" * BLK)
    q = quorum(kids)
    new = SparseNode("new", 64 * MiB)
    job = resync(q, new)
    assert new.allocated() == kids[0].allocated() == 64 * BLK  # no hole written as data
    assert all(any(data) for _, data in new.written)
    assert len(kids[0].of("read")) == 1  # one voted read for the region, not 64
    assert job.copied.written == 64 * BLK
    run(same_bytes(kids[0], new))


def test_file_block_status_remembers_a_data_run_and_forgets_it_at_a_punch(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """On tmpfs lseek(SEEK_HOLE) walks every page up to the next hole: a resync asking
    region by region of a full image was quadratic.  A run found to be data is
    answered again without lseek; a punch (a hole may appear) forgets it."""
    import os

    from nbdquorum.block.file import FileNode

    path = tmp_path / "f.raw"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
    node = FileNode("f", str(path))
    calls: list[int] = []
    real = os.lseek

    def counting(fd: int, pos: int, how: int) -> int:
        calls.append(how)
        return real(fd, pos, how)

    async def main() -> None:
        await node.pwrite(0, b"\x01" * (2 << 20))
        monkeypatch.setattr(os, "lseek", counting)
        assert await node.block_status(0, 1 << 20) == [(1 << 20, 0)]
        asked = len(calls)
        assert asked > 0
        assert await node.block_status(1 << 20, 1 << 20) == [(1 << 20, 0)]
        assert len(calls) == asked, "the data run was known"
        await node.trim(0, 1 << 20)  # a hole where the run was
        status = await node.block_status(0, 2 << 20)
        assert len(calls) > asked
        assert status[0] == (1 << 20, STATE_HOLE | STATE_ZERO)
        assert status[1:] == [(1 << 20, 0)]

    run(main())
    node.close()


def test_resync_depth_gives_way_to_clients() -> None:
    """More regions in flight while no client does I/O (md's speed_max when idle), the
    clients' share while they do, one region at a time with a speed limit."""
    import time

    from nbdquorum.jobs import resync as rs

    kids = voters()
    q = quorum(kids)
    slot = q.members.attach(SparseNode("new", BIG), ChildState.RESYNCING)
    job = rs.ResyncJob(q, slot, EventBus())
    q.last_client_io = time.monotonic() - 10
    assert job.depth() == rs.DEPTH_IDLE
    q.last_client_io = time.monotonic()  # a client request just now
    assert job.depth() == rs.DEPTH < rs.DEPTH_IDLE
    job.set_speed(1 << 20)
    assert job.depth() == 1
