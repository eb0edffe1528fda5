"""Resync: copy the voted contents onto a child that is not in sync.

A child that joins a quorum (or misses an acknowledged write) is
``resyncing``: it receives every new write, never votes and is never read,
and its ``sync`` bitmap lists the regions still to copy.  The job walks the
bitmap; for each region it takes the quorum's range lock exclusively (so no
client write can race the copy), reads the voted bytes from the active
children, writes them to the child and clears the bit.  Bits set again by a
failed write while the job runs are picked up before it finishes.  When the
bitmap is empty the child is flushed and becomes ``active`` (md's recovery,
ZFS's resilver).

A copy costs what is allocated, not the virtual size (block/quorum/thin.py):
ranges that every voter reads as zero (block status ZERO) are made zero on the
child (a punched hole; nothing at all where the child reads zero already) and
never written as data, and a run of such regions is done in one step of up to
``WINDOW`` regions under one hold of the lock.  Regions with data are copied
one by one as before, their voted all-zero blocks zeroed instead of written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import Extent, error_of
from nbdquorum.block.quorum import ChildSlot, ChildState, Copied, QuorumNode
from nbdquorum.block.quorum.thin import region_runs
from nbdquorum.eventbus import EventBus
from nbdquorum.jobs.job import Job, JobManager, JobStatus

log = logging.getLogger(__name__)

#: regions compared before a catch-up trusts that a returning child is the same image
IDENTITY_SAMPLES = 8
#: regions looked at, at most, to find those samples (blank ones do not count)
IDENTITY_CANDIDATES = 64
#: regions a resync copies at once (each under its own range lock) while clients
#: do I/O.  It sets the share a resync takes from them when both want the same CPU.
#: Measured with a child on another host and fio randrw 4k QD16 at full speed: 4
#: leaves the client 0.67-0.77x of its rate (the resync 0.3-0.37x of nbdcopy's), 6
#: leaves it 0.53-0.55x, 8 0.45-0.54x.  Like md and ZFS, the clients come first;
#: --resync-speed caps it further (one region at a time then)
DEPTH = 4
#: ... and with no client request for IDLE_AFTER seconds (md's sync_speed_max when
#: the array is otherwise idle): the resync alone, 8 instead of 4 made it 5-10% faster
DEPTH_IDLE = 8
IDLE_AFTER = 0.5
#: regions one block-status query of the job covers (1 GiB of 1 MiB regions); a run of
#: regions that every voter reads as zero is brought in sync in one step of that size
WINDOW = 1024


def _span(bm: RegionBitmap, bit: int, count: int) -> tuple[int, int]:
    """(offset, length) of ``count`` regions from ``bit`` on."""
    off = bm.region_of(bit)[0]
    last_off, last_n = bm.region_of(bit + count - 1)
    return off, last_off + last_n - off


def _steps(extents: list[Extent], bm: RegionBitmap, first: int,
           count: int) -> list[tuple[int, int, bool]]:
    """Regions ``first..first+count-1`` as runs ``(bit, count, all_zero)``."""
    off, n = _span(bm, first, count)
    return [(a // bm.region, -(-m // bm.region), zero)
            for a, m, zero in region_runs(extents, off, n, bm.region)]


class ResyncJob(Job):
    job_type = "resync"

    def __init__(
        self, quorum: QuorumNode, slot: ChildSlot, bus: EventBus, *, speed: int = 0,
        on_progress: Callable[[], None] | None = None, job_id: str | None = None,
    ) -> None:
        super().__init__(job_id or f"resync-{slot.node.node_name}", slot.node.node_name, bus,
                         speed=speed)
        self.quorum = quorum
        self.slot = slot
        self.on_progress = on_progress  # persistence checkpoint hook
        #: what the copy did so far (bytes written, zeroed, found zero already)
        self.copied = Copied()
        #: called (quorum, slot) after a backoff when the job failed
        self.on_retry: Callable[[QuorumNode, ChildSlot], None] | None = None

    def _still_member(self) -> bool:
        return self.slot in self.quorum.slots and self.slot.state is ChildState.RESYNCING

    async def run(self) -> None:
        q, slot = self.quorum, self.slot
        bm = slot.sync
        if bm is None:
            q.members.resynced(slot)
            return
        if slot.catch_up and not await self._same_image(q, slot, bm):
            q.members.start_resync(slot)  # a different image: everything is copied
            bm = slot.sync
            assert bm is not None
        self.total = bm.dirty_bytes()
        log.info("resync of %s: %d bytes to copy%s", slot.node.node_name, self.total,
                 " (catch-up)" if slot.catch_up else "")
        while True:
            await self._copy_dirty(q, slot, bm)
            await q.child_io(slot.node.flush())
            if not bm.count():
                break
            self.total += bm.dirty_bytes()  # writes failed on the child during the flush
        if not self._still_member():
            raise RuntimeError(f"child {slot.node.node_name} left the quorum or faulted")
        q.members.resynced(slot)
        c = self.copied
        log.info("resync of %s complete: %d bytes written, %d zeroed, %d already zero",
                 slot.node.node_name, c.written, c.zeroed, c.skipped)

    def _check_member(self) -> None:
        if not self._still_member():
            raise RuntimeError(f"child {self.slot.node.node_name} left the quorum or faulted")

    async def _same_image(self, q: QuorumNode, slot: ChildSlot, bm: RegionBitmap) -> bool:
        """Best effort: is the returning child the image that left?

        Its size matched when it connected.  Here, regions that were not written
        since it left (spread over the disk) and that hold data in the quorum
        (all-zero ones tell a blank disk from the image apart in no way) must
        read the same on it as the quorum's vote: up to IDENTITY_SAMPLES of
        them, among at most IDENTITY_CANDIDATES tried.  With no such region at
        all, the child is copied in full (cheap where the quorum is blank).
        """
        clean = [b for b in range(bm.nbits) if not bm.test(b)]
        if not clean:
            return True
        step = max(1, len(clean) // IDENTITY_CANDIDATES)
        matched = 0
        for bit in clean[::step][:IDENTITY_CANDIDATES]:
            off, n = bm.region_of(bit)
            async with q.lock.hold(off, n, exclusive=False):
                ours = await q.read_voted(off, n)
                if ours == bytes(len(ours)):
                    continue  # blank in the quorum: proves nothing
                theirs = await q.child_io(slot.node.pread(off, n))
            if q.voted.diff_span(ours, theirs) is not None:
                log.warning("resync of %s: region at %d differs from the quorum's although "
                            "it was not written since the child left: not the same image, "
                            "copying everything", slot.node.node_name, off)
                return False
            matched += 1
            if matched >= IDENTITY_SAMPLES:
                break
        if not matched:
            log.warning("resync of %s: no region with data to tell the image by: copying "
                        "everything", slot.node.node_name)
        return matched > 0

    def depth(self) -> int:
        """Steps in flight now: one with a speed limit, more while no client does I/O."""
        if self.speed > 0:
            return 1
        idle = time.monotonic() - self.quorum.last_client_io >= IDLE_AFTER
        return DEPTH_IDLE if idle else DEPTH

    async def _copy_dirty(self, q: QuorumNode, slot: ChildSlot, bm: RegionBitmap) -> None:
        """Copy every region still dirty, until none is (writes may dirty more).

        Up to depth() steps run at once (one with a speed limit), each under the
        exclusive range lock of its own regions: a child on another host is then
        copied with several requests in flight instead of one round trip at a time."""
        inflight: set[asyncio.Task[None]] = set()

        async def start(bit: int, count: int) -> None:
            # a speed limit paces one step at a time (it sleeps after each copy)
            while len(inflight) >= self.depth():
                await _one_done(inflight)
            if not self._resume.is_set():  # paused: nothing new starts
                await self._resume.wait()
            self._check_member()
            task = asyncio.get_running_loop().create_task(self._step(q, slot, bm, bit, count))
            inflight.add(task)

        try:
            while bm.count():
                for first, nbits in bm.runs():
                    for bit in range(first, first + nbits, WINDOW):
                        self._check_member()
                        take = min(WINDOW, first + nbits - bit)
                        off, n = _span(bm, bit, take)
                        # where every voter reads zero, asked without the lock: it only
                        # says how big the steps are; each step asks again under the lock
                        hint = await q.zero_extents(off, n)
                        for step, count, zero in _steps(hint, bm, bit, take):
                            if zero:
                                await start(step, count)
                            else:
                                for one in range(step, step + count):
                                    if bm.test(one):
                                        await start(one, 1)
                while inflight:
                    await _one_done(inflight)
                if bm.count():  # writes failed on the child meanwhile: more to do
                    self.total += bm.dirty_bytes()
        finally:
            await _cancel_all(inflight)

    async def _step(self, q: QuorumNode, slot: ChildSlot, bm: RegionBitmap, bit: int,
                    count: int) -> None:
        """Bring ``count`` regions from ``bit`` on in sync, under the exclusive range lock
        (no client write can race the copy, nor the block status it asks)."""
        off, n = _span(bm, bit, count)
        async with q.lock.hold(off, n, exclusive=True):
            self._check_member()  # removed while we waited?
            # a hung child must not hold the range (and every client request on it)
            # forever: the child timeout bounds each of the target's operations
            done = await q.copy_to(slot.node, off, n)
            q.members.regions_synced(slot, bit, count)
        self.copied.add(done)
        # the rate limit charges what was read and voted, not ranges skipped as zero
        await self.checkpoint(n, cost=done.read)
        if self.on_progress is not None:
            self.on_progress()

    def finalize(self) -> None:
        slot = self.slot
        if self.error is None or self.cancelled:
            self.quorum.members.resync_outcome(slot, None)
            return
        self.quorum.members.resync_outcome(slot, self.error)
        if self.manager is not None and self._still_member():
            # md retries a failed recovery; so do we, backing off up to a minute
            delay = min(60.0, 0.5 * 2 ** (slot.resync_failures - 1))
            log.warning("resync of %s failed (%s); retrying in %.1fs",
                        slot.node.node_name, self.error, delay)
            retry = self.on_retry
            if retry is not None:
                asyncio.get_running_loop().call_later(delay, retry, self.quorum, slot)


async def _one_done(inflight: set[asyncio.Task[None]]) -> None:
    """Wait for one of the steps in flight; its error (if any) ends the job.

    Every finished step's outcome is taken, so a second failure in the same turn is
    not left for the loop to log as an exception never retrieved."""
    done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
    inflight.difference_update(done)
    errors = [e for e in map(error_of, done) if e is not None]
    if errors:
        raise errors[0]


async def _cancel_all(inflight: set[asyncio.Task[None]]) -> None:
    """Cancel the steps still in flight and wait for them.  A step whose child
    operation failed in the same turn as its cancellation (a removed child's
    connection closing under it) ends with that error rather than as cancelled: the
    job is ending anyway, so the error is taken here and dropped."""
    for t in inflight:
        t.cancel()
    if inflight:
        await asyncio.wait(inflight)
    for t in inflight:
        err = error_of(t)
        if err is not None:
            log.debug("resync step ended with %r while the job stopped", err)
    inflight.clear()


class ResyncManager:
    """Starts a resync job whenever a child needs one, one job per child."""

    def __init__(self, graph: Graph, jobs: JobManager, *, speed: int = 0,
                 on_progress: Callable[[], None] | None = None) -> None:
        self.graph = graph
        self.jobs = jobs
        self.speed = speed  # default rate limit for new jobs, bytes/second
        self.on_progress = on_progress
        graph.new_child_state = ChildState.RESYNCING
        graph.on_child_added.append(self._on_added)
        graph.on_child_removed.append(self._on_removed)
        self._hooked: set[int] = set()
        for q in graph.quorums():
            self.hook(q)

    def hook(self, q: QuorumNode) -> None:
        if id(q) not in self._hooked:
            self._hooked.add(id(q))
            q.members.on_resync_needed.append(lambda slot: self._on_added(q, slot))

    def _on_added(self, q: QuorumNode, slot: ChildSlot) -> None:
        self.ensure(q, slot)

    def _on_removed(self, q: QuorumNode, slot: ChildSlot) -> None:
        job = self.job_for(slot)
        if job is not None and job.status in (JobStatus.CREATED, JobStatus.RUNNING,
                                              JobStatus.PAUSED):
            job.cancel()  # a removed child needs no copy; free the regions it waits on

    def job_for(self, slot: ChildSlot) -> ResyncJob | None:
        """The live resync job of this very slot (not of an earlier node of that name)."""
        for job in self.jobs.jobs.values():
            if isinstance(job, ResyncJob) and job.slot is slot:
                return job
        return None

    def ensure(self, q: QuorumNode, slot: ChildSlot, speed: int | None = None) -> ResyncJob | None:
        """Start a resync for *slot* unless one is running (or it is in sync)."""
        self.hook(q)
        if slot.state is not ChildState.RESYNCING:
            return None
        job = self.job_for(slot)
        if job is not None and job.status in (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED):
            return job
        job_id = f"resync-{slot.node.node_name}"
        n = 1
        while job_id in self.jobs.jobs:  # an earlier node of that name is still winding down
            n += 1
            job_id = f"resync-{slot.node.node_name}-{n}"
        job = ResyncJob(q, slot, self.graph.bus, speed=self.speed if speed is None else speed,
                        on_progress=self.on_progress, job_id=job_id)
        job.on_retry = self._on_added
        self.jobs.add(job)
        return job

    def resume_all(self) -> None:
        for q in self.graph.quorums():
            for slot in q.slots:
                self.ensure(q, slot)
