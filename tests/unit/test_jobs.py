"""Resync and scrub jobs on real temp files, with the job status machine."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.graph import Graph
from nbdquorum.block.quorum import ChildState, QuorumNode
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.jobs.job import JobManager
from nbdquorum.jobs.resync import ResyncManager
from nbdquorum.jobs.scrub import ScrubJob
from nbdquorum.qmp.events import wired
from tests.unit.aiohelp import run

SIZE = 4 << 20




def setup(tmp_path: Path, n: int = 3) -> tuple[Graph, QuorumNode, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    g = Graph(bus)
    kids = [g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"), create_size=SIZE) for i in range(n)]
    q = QuorumNode("q0", kids, vote_threshold=2, bus=bus)
    g.add(q)
    return g, q, seen


def test_bitmap_ranges_and_roundtrip() -> None:
    bm = RegionBitmap(5 << 20, 1 << 20)
    assert bm.nbits == 5
    assert bm.set_range((1 << 20) - 1, 2) == [0, 1]
    assert list(bm) == [0, 1] and bm.count() == 2
    assert RegionBitmap.from_hex(5 << 20, 1 << 20, bm.to_hex()).count() == 2
    full = RegionBitmap(5 << 20, 1 << 20, fill=True)
    assert full.count() == 5 and full.dirty_bytes() == 5 << 20


def test_added_child_resyncs_under_writes_then_becomes_active(tmp_path: Path) -> None:
    g, q, seen = setup(tmp_path)

    async def main() -> None:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs, speed=8 << 20)  # slow enough that writes race the copy
        await q.pwrite(0, b"\x11" * SIZE)
        g.open_raw_file("new", str(tmp_path / "new.raw"), create_size=SIZE)
        slot = g.child_add("q0", "new")
        assert slot.state is ChildState.RESYNCING
        job = jobs.jobs["resync-new"]
        writes = [q.pwrite(i * 300_000, bytes([i + 1]) * 70_000) for i in range(12)]
        await asyncio.gather(*writes)
        await job.wait()
        assert slot.state is ChildState.ACTIVE
        assert jobs.history[-1]["id"] == "resync-new" and "error" not in jobs.history[-1]

    run(main())
    imgs = [(tmp_path / f).read_bytes() for f in ("c0.raw", "c1.raw", "c2.raw", "new.raw")]
    assert imgs[0] == imgs[1] == imgs[2] == imgs[3]
    statuses = [e.data["status"] for e in seen if e.name == "JOB_STATUS_CHANGE"]
    assert statuses == ["created", "running", "waiting", "pending", "concluded", "null"]
    assert any(e.name == "BLOCK_JOB_COMPLETED" and e.data["type"] == "resync" for e in seen)
    g.close()


def test_resync_pause_resume_cancel(tmp_path: Path) -> None:
    g, q, seen = setup(tmp_path)

    async def main() -> None:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs, speed=1 << 20)
        await q.pwrite(0, b"\x11" * SIZE)  # data to copy (zero ranges cost no time)
        g.open_raw_file("new", str(tmp_path / "new.raw"), create_size=SIZE)
        slot = g.child_add("q0", "new")
        job = jobs.jobs["resync-new"]
        await asyncio.sleep(0.05)
        job.pause()
        done = job.current
        await asyncio.sleep(0.3)
        assert job.current <= done + (1 << 20)
        job.resume()
        job.cancel()
        await job.wait()
        assert slot.state is ChildState.RESYNCING  # never active without a full copy
        assert slot.sync is not None and slot.sync.count() > 0

    run(main())
    names = [e.name for e in seen]
    assert "BLOCK_JOB_CANCELLED" in names
    g.close()


def test_scrub_counts_and_repairs_the_minority(tmp_path: Path) -> None:
    g, q, _seen = setup(tmp_path)
    run(q.pwrite(0, b"\x32" * SIZE))
    with open(tmp_path / "c1.raw", "r+b") as f:
        f.seek(3 << 20)
        f.write(b"\x00" * 100)

    async def scrub(repair: bool) -> dict[str, Any]:
        jobs = JobManager(g.bus)
        job = jobs.add(ScrubJob(q, g.bus, repair=repair))
        await job.wait()
        assert isinstance(job, ScrubJob)
        return job.result()

    r = run(scrub(False))
    assert r["mismatched-regions"] == {"c1": 1} and r["mismatched-bytes"] == {"c1": 100}
    assert (tmp_path / "c1.raw").read_bytes()[3 << 20] == 0  # check does not repair
    r = run(scrub(True))
    assert r["mismatched-regions"] == {"c1": 1}
    assert (tmp_path / "c1.raw").read_bytes() == (tmp_path / "c0.raw").read_bytes()
    r = run(scrub(False))
    assert r["mismatched-regions"] == {} and r["unrecoverable-regions"] == 0
    assert q.last_scrub is not None and q.last_scrub["cancelled"] is False
    g.close()


def test_a_write_missed_during_the_final_flush_is_copied_before_active(tmp_path: Path) -> None:
    """A write that fails on the resyncing child while the job flushes it marks the region
    dirty again; the job must copy it before the child joins the vote."""
    g, q, _seen = setup(tmp_path)

    async def main() -> None:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs)
        await q.pwrite(0, b"\x11" * SIZE)
        node = g.open_raw_file("new", str(tmp_path / "new.raw"), create_size=SIZE)
        flush = node.flush
        raced = []

        async def racing_flush() -> None:
            if not raced:  # a client write lands on the active children and fails on new
                raced.append(True)
                for s in q.active():
                    await s.node.pwrite(0, b"\x22" * 4096)
                q._missed_write(slot, 0, 4096)
            await flush()

        node.flush = racing_flush  # type: ignore[method-assign]
        slot = g.child_add("q0", "new")
        await jobs.jobs["resync-new"].wait()
        assert raced and slot.state is ChildState.ACTIVE

    run(main())
    assert (tmp_path / "new.raw").read_bytes()[:4096] == b"\x22" * 4096
    g.close()


def test_a_step_failing_as_it_is_cancelled_is_not_left_unretrieved() -> None:
    """A removed child's connection can fail a step's write in the same turn the job
    cancels it: the step then ends with that error instead of as cancelled.  Stopping
    the job takes every step's outcome, so the loop never logs "Task exception was
    never retrieved" (which a server's log must not show on a clean removal)."""
    from nbdquorum.jobs import resync

    reported: list[dict[str, Any]] = []

    async def step(fail_on_cancel: bool) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if fail_on_cancel:
                raise BrokenPipeError(108, "closed") from None
            raise

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        inflight = {loop.create_task(step(i % 2 == 0)) for i in range(4)}
        await asyncio.sleep(0)
        await resync._cancel_all(inflight)
        assert not inflight
        # two steps failing in one turn: the first ends the job, the second is taken too
        failing = {loop.create_task(step(True)) for _ in range(2)}
        await asyncio.sleep(0)
        for t in failing:
            t.cancel()
        try:
            await resync._one_done(failing)
        except BrokenPipeError:
            pass
        else:
            raise AssertionError("a failed step must end the job")
        del failing, t
        import gc
        gc.collect()
        await asyncio.sleep(0)

    run(main())
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported


def test_a_job_cancelled_in_the_turn_it_was_created_still_concludes(tmp_path: Path) -> None:
    """A child added and removed by two QMP commands read from one packet: the resync
    job is cancelled before its task ever ran.  It must still conclude (aborting,
    concluded, null) so that a later shutdown does not wait on it forever."""
    g, _q, seen = setup(tmp_path)

    async def main() -> None:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs)
        g.open_raw_file("new", str(tmp_path / "new.raw"), create_size=SIZE)
        slot = g.child_add("q0", "new")
        job = jobs.jobs["resync-new"]
        job.cancel()  # same turn: its task has not started
        await asyncio.wait_for(job.wait(), 5)
        await asyncio.wait_for(jobs.shutdown(), 5)
        assert slot.state is ChildState.RESYNCING  # never active without a copy

    run(main())
    statuses = [e.data["status"] for e in seen if e.name == "JOB_STATUS_CHANGE"]
    assert statuses == ["created", "aborting", "concluded", "null"], statuses
    assert any(e.name == "BLOCK_JOB_CANCELLED" for e in seen)
    g.close()
