"""Members (the one writer of the membership) and Voted I/O (the one reader-and-voter)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.errors import GraphError
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import Buffer, Direct, Unreachable
from nbdquorum.block.quorum import ChildState, QuorumNode, ReadPattern, ReopenPlan, members
from nbdquorum.block.quorum import node as quorum_node
from nbdquorum.block.quorum.voted import INLINE_MAX, VotedIO
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.qmp.events import wired
from nbdquorum.qmp.format import quorum_status
from tests.unit.aiohelp import run
from tests.unit.test_quorum import SIZE, MemNode


def mixed(tmp_path: Path) -> tuple[Graph, QuorumNode, MemNode, list[Event]]:
    """Two file children (descriptors, one C call) and one awaited child."""
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    g = Graph(bus)
    files = [g.open_raw_file(f"f{i}", str(tmp_path / f"f{i}.raw"), create_size=SIZE)
             for i in range(2)]
    mem = MemNode("m0")
    q = QuorumNode("q0", [*files, mem], vote_threshold=2, bus=bus)
    g.add(q)
    return g, q, mem, seen


def test_a_quorum_of_files_and_another_kind_of_child_reads_and_writes(tmp_path: Path) -> None:
    g, q, mem, seen = mixed(tmp_path)
    run(q.pwrite(4096, b"\x5a" * 8192))
    assert bytes(mem.buf[4096:4096 + 8192]) == b"\x5a" * 8192
    for i in range(2):
        assert (tmp_path / f"f{i}.raw").read_bytes()[4096:4096 + 8192] == b"\x5a" * 8192
    assert bytes(run(q.pread(4096, 8192))) == b"\x5a" * 8192
    # a big read (the pool's path) votes over all three
    run(q.pwrite(0, b"\x11" * (INLINE_MAX * 4)))
    assert bytes(run(q.pread(0, INLINE_MAX * 4))) == b"\x11" * (INLINE_MAX * 4)
    assert seen == []
    g.close()


def test_the_awaited_child_is_outvoted_and_reported_like_a_file(tmp_path: Path) -> None:
    g, q, mem, seen = mixed(tmp_path)
    run(q.pwrite(0, b"\x22" * 4096))
    mem.buf[100] = 0
    assert bytes(run(q.pread(0, 4096))) == b"\x22" * 4096
    bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
    assert [b["node-name"] for b in bad] == ["m0"]
    assert q.slots[2].stats.checksum_errors == 1
    g.close()


def test_a_failing_file_in_a_mixed_quorum_is_outvoted(tmp_path: Path) -> None:
    g, q, mem, seen = mixed(tmp_path)
    run(q.pwrite(0, b"\x33" * 4096))
    mem.fail_read = errno.EIO
    assert bytes(run(q.pread(0, 4096))) == b"\x33" * 4096
    assert [e.data["node-name"] for e in seen if e.name == "QUORUM_REPORT_BAD"] == ["m0"]
    assert q.slots[2].stats.read_errors == 1
    g.close()


def test_the_serve_now_path_declines_a_child_without_a_descriptor(tmp_path: Path) -> None:
    g, q, _mem, _seen = mixed(tmp_path)
    now = q.direct()
    assert now.try_pread(0, 4096) is None
    assert now.try_pwrite(0, b"\x01" * 4096) is False
    g.close()


def test_voted_io_read_now_needs_every_child_a_descriptor(tmp_path: Path) -> None:
    g, q, mem, _ = mixed(tmp_path)
    v = VotedIO()
    files = [s.node for s in q.slots[:2]]
    assert v.read_now([*files, mem], 0, 4096, 2) is None
    reads = v.read_now(files, 0, 4096, 2)
    assert reads is not None and reads.unanimous and bytes(reads.winner or b"") == bytes(4096)
    g.close()


# -- Members -----------------------------------------------------------------------------


BIG = 4 * SIZE  # several resync regions


def members_quorum(n: int = 3, **kw: Any) -> tuple[QuorumNode, list[Event]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    return QuorumNode("q", [MemNode(f"m{i}", BIG) for i in range(n)], vote_threshold=2,
                      bus=bus, **kw), seen


def test_start_resync_is_one_operation_whatever_asks_for_it() -> None:
    q, seen = members_quorum()
    needed: list[str] = []
    q.members.on_resync_needed.append(lambda s: needed.append(s.node.node_name))
    slot = q.slots[2]
    q.members.start_resync(slot, [(0, 1)])
    assert slot.state is ChildState.RESYNCING and slot.sync is not None
    assert 0 < slot.sync.dirty_bytes() < BIG
    q.members.start_resync(slot)  # widen to everything
    assert slot.sync.dirty_bytes() == BIG
    assert needed == ["m2", "m2"]
    assert [e.data["state"] for e in seen if e.name == "QUORUM_CHILD_STATE_CHANGE"] == [
        "resyncing"]
    q.members.resynced(slot)
    assert slot.state is ChildState.ACTIVE and slot.sync is None


def test_a_faulted_child_is_not_resynced_by_a_missed_write_only_by_the_operator() -> None:
    q, _ = members_quorum()
    slot = q.slots[1]
    q.members.fault(slot, "test")
    q.members.start_resync(slot, [(0, 4096)])
    assert slot.state is ChildState.FAULTED
    q.members.start_resync(slot, revive=True)
    assert slot.state is ChildState.RESYNCING and slot.error_count == 0


def test_count_error_faults_at_max_errors() -> None:
    q, _ = members_quorum(max_errors=3)
    slot = q.slots[0]
    for _ in range(2):
        q.members.count_error(slot)
    assert slot.state is ChildState.ACTIVE
    q.members.count_error(slot)
    assert slot.state is ChildState.FAULTED


def test_reopen_prepare_changes_nothing_and_a_refused_plan_leaves_all_as_it_was() -> None:
    q, seen = members_quorum()
    before = (list(q.slots), q.vote_threshold, q.read_pattern)
    plan = ReopenPlan(3, ReadPattern.QUORUM, False, remove=[q.slots[0]])
    with pytest.raises(GraphError, match="threshold may not exceed children count"):
        q.members.prepare(plan)
    assert (list(q.slots), q.vote_threshold, q.read_pattern) == before and seen == []


def test_reopen_commit_applies_the_whole_plan_at_once() -> None:
    q, _ = members_quorum()
    changes: list[int] = []
    q.members.on_change.append(lambda: changes.append(len(q.slots)))
    new = MemNode("m9", BIG)
    plan = q.members.prepare(ReopenPlan(1, ReadPattern.FIFO, False, add=[new],
                                        remove=[q.slots[0], q.slots[1]]))
    added = q.members.commit(plan)
    assert [s.node.node_name for s in q.slots] == ["m2", "m9"]
    assert added[0].name == "children.3"
    assert (q.vote_threshold, q.read_pattern) == (1, ReadPattern.FIFO)
    assert changes == [2], "one change notification for the whole plan"


def test_reopen_refuses_to_leave_fewer_voters_than_the_threshold() -> None:
    q, _ = members_quorum()
    plan = ReopenPlan(2, ReadPattern.QUORUM, False, add=[MemNode("n1", BIG), MemNode("n2", BIG)],
                      remove=[q.slots[0], q.slots[1]], new_state=ChildState.RESYNCING)
    with pytest.raises(GraphError, match="1 child would be left in sync"):
        q.members.prepare(plan)


# -- a child whose link goes down and comes back -------------------------------------------


class LinkNode(MemNode):
    """A MemNode behind a link that can go down (a child on another host)."""

    def __init__(self, name: str, size: int = SIZE) -> None:
        super().__init__(name, size)
        self.down = False

    def health(self) -> str | None:
        return Unreachable("connection refused") if self.down else None

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.down:
            raise OSError(errno.ENOTCONN, "not connected")
        return await super().pread(offset, length)

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if self.down:
            raise OSError(errno.ENOTCONN, "not connected")
        await super().pwrite(offset, data, fua=fua)


def test_a_lost_link_makes_the_child_unreachable_and_its_missed_writes_are_recorded() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    far = LinkNode("far", BIG)
    q = QuorumNode("q", [MemNode("a", BIG), MemNode("b", BIG), far], vote_threshold=2,
                   bus=bus, max_errors=100)
    needed: list[str] = []
    q.members.on_resync_needed.append(lambda s: needed.append(s.node.node_name))
    slot = q.slots[2]
    far.down = True
    run(q.pwrite(0, b"\x01" * 4096))  # the write fails on far: far is out
    assert slot.state is ChildState.UNREACHABLE
    assert slot.error_count == 1
    run(q.pwrite(2 * SIZE, b"\x02" * 4096))  # not even sent to far: recorded
    assert slot.stats.writes == 1
    assert slot.sync is not None and list(slot.sync) == [0, 2]
    assert bytes(run(q.pread(0, 4096))) == b"\x01" * 4096  # the others answer
    assert q.check_health() == []  # still down: nothing new
    far.down = False
    q.check_health()
    assert slot.state is ChildState.RESYNCING and needed == ["far"]
    states = [e.data["state"] for e in seen if e.name == "QUORUM_CHILD_STATE_CHANGE"]
    assert states == ["unreachable", "resyncing"]


def test_a_link_found_down_by_the_health_check_reports_no_failed_request() -> None:
    """No request was under way: the child's state change is its event, not a
    QUORUM_REPORT_BAD naming a read of 0 bytes at byte 0 that never happened."""
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    far = LinkNode("far", BIG)
    q = QuorumNode("q", [MemNode("a", BIG), MemNode("b", BIG), far], vote_threshold=2,
                   bus=bus)
    far.down = True
    assert [s.node.node_name for s, _ in q.check_health()] == ["far"]
    assert q.slots[2].state is ChildState.UNREACHABLE
    assert q.slots[2].error_count == 0  # a link down is not an error of the child
    assert [e.name for e in seen] == ["QUORUM_CHILD_STATE_CHANGE"]


def test_errors_toward_the_fault_limit_halve_for_every_hour_without_one() -> None:
    """md's read-error decay: a link that drops under a write now and then over months
    never adds up to --max-errors; errors close together still do, and a fault says
    why in query-quorum-status."""
    far = LinkNode("far", BIG)
    q = QuorumNode("q", [MemNode("a", BIG), MemNode("b", BIG), far], vote_threshold=2,
                   bus=EventBus(), max_errors=4)
    slot = q.slots[2]
    for _ in range(3):
        q.members.count_error(slot)
    assert slot.error_count == 3 and slot.state is ChildState.ACTIVE
    slot.error_at -= 2 * members.ERROR_DECAY + 60  # two hours and a minute later
    assert q.members.recent_errors(slot) == 0  # 3 >> 2
    assert quorum_status(q)["children"][2]["errors"] == 0
    for _ in range(3):
        q.members.count_error(slot)
    slot.error_at -= members.ERROR_DECAY  # an hour later: 3 -> 1, then one more
    q.members.count_error(slot)
    assert slot.error_count == 2 and slot.state is ChildState.ACTIVE
    q.members.count_error(slot)
    q.members.count_error(slot)
    assert slot.state is ChildState.FAULTED
    status = quorum_status(q)["children"][2]
    assert status["fault-reason"] == "reached 4 errors"
    q.members.start_resync(slot, revive=True)  # the operator's way back (x-quorum-resync)
    assert slot.state is ChildState.RESYNCING and slot.fault_reason is None
    assert "fault-reason" not in quorum_status(q)["children"][2]


def test_an_unreachable_child_that_comes_back_with_a_broken_image_is_faulted() -> None:
    far = LinkNode("far", BIG)
    q = QuorumNode("q", [MemNode("a", BIG), MemNode("b", BIG), far], vote_threshold=2,
                   bus=EventBus())
    q.members.unreachable(q.slots[2], "test")
    far.down = False
    far.health = lambda: "export is read-only"  # type: ignore[method-assign]
    q.check_health()
    assert q.slots[2].state is ChildState.FAULTED


def _catch_up_rig() -> tuple[Graph, QuorumNode, LinkNode]:
    bus = EventBus()
    g = Graph(bus)
    far = LinkNode("far", BIG)
    q = QuorumNode("q", [MemNode("a", BIG), MemNode("b", BIG), far], vote_threshold=2,
                   bus=bus, max_errors=100)
    g.add(q)
    return g, q, far


def test_a_returning_child_catches_up_on_what_it_missed_only() -> None:
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.jobs.resync import ResyncManager

    g, q, far = _catch_up_rig()

    async def main() -> int:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs)
        await q.pwrite(0, b"\x07" * (2 * SIZE))  # data everywhere the child will be checked
        far.down = True
        q.check_health()
        await q.pwrite(3 * SIZE, b"\x09" * 4096)  # missed
        far.down = False
        q.check_health()
        await jobs.jobs["resync-far"].wait()
        return int(jobs.history[-1]["total-progress"])

    copied = run(main())
    assert q.slots[2].state is ChildState.ACTIVE
    assert copied == SIZE, "only the region written while it was away"
    assert bytes(far.buf) == bytes(q.slots[0].node.buf)  # type: ignore[attr-defined]


def test_a_different_image_behind_the_same_address_is_copied_in_full() -> None:
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.jobs.resync import ResyncManager

    g, q, far = _catch_up_rig()

    async def main() -> int:
        jobs = JobManager(g.bus)
        ResyncManager(g, jobs)
        await q.pwrite(0, b"\x07" * (2 * SIZE))
        far.down = True
        q.check_health()
        await q.pwrite(3 * SIZE, b"\x09" * 4096)
        far.buf[:] = bytes(len(far.buf))  # the host came back with a blank disk
        far.down = False
        q.check_health()
        await jobs.jobs["resync-far"].wait()
        return int(jobs.history[-1]["total-progress"])

    copied = run(main())
    assert q.slots[2].state is ChildState.ACTIVE
    assert copied == BIG, "everything"
    assert bytes(far.buf) == bytes(q.slots[0].node.buf)  # type: ignore[attr-defined]


# -- a read answered as soon as its vote is decided ---------------------------------------


class SlowNode(MemNode):
    """An awaited child that answers reads only when the test lets it."""

    def __init__(self, name: str, size: int = SIZE) -> None:
        super().__init__(name, size)
        self.gate = asyncio.Event()

    async def pread(self, offset: int, length: int) -> Buffer:
        await self.gate.wait()
        return await super().pread(offset, length)


def test_a_decided_vote_answers_before_a_slow_child_which_is_still_compared(
        tmp_path: Path) -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    g = Graph(bus)
    files = [g.open_raw_file(f"f{i}", str(tmp_path / f"f{i}.raw"), create_size=SIZE)
             for i in range(2)]
    slow = SlowNode("slow")
    q = QuorumNode("q0", [*files, slow], vote_threshold=2, bus=bus)
    q.answer_early = True

    async def main() -> None:
        slow.gate.set()
        await q.pwrite(0, b"\x44" * 8192)
        slow.gate.clear()
        slow.buf[10] = 0  # it will lose, late
        data = await asyncio.wait_for(q.pread(0, 8192), 5)  # the two files decide
        assert bytes(data) == b"\x44" * 8192
        assert not [e for e in seen if e.name == "QUORUM_REPORT_BAD"]
        # an overlapping write waits for the late comparison (the range lock)
        write = asyncio.ensure_future(q.pwrite(0, b"\x55" * 512))
        await asyncio.sleep(0.05)
        assert not write.done()
        slow.gate.set()
        await asyncio.wait_for(write, 5)
        bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
        assert [b["node-name"] for b in bad] == ["slow"]
        assert q.slots[2].stats.checksum_errors == 1

    run(main())
    g.close()


def test_an_undecided_vote_waits_for_every_child(tmp_path: Path) -> None:
    g = Graph(EventBus())
    f = g.open_raw_file("f0", str(tmp_path / "f0.raw"), create_size=SIZE)
    slow = SlowNode("slow")
    q = QuorumNode("q0", [f, slow], vote_threshold=2, bus=g.bus)
    q.answer_early = True

    async def main() -> None:
        read = asyncio.ensure_future(q.pread(0, 4096))
        await asyncio.sleep(0.05)
        assert not read.done(), "one of two cannot decide a vote at threshold 2"
        slow.gate.set()
        assert bytes(await asyncio.wait_for(read, 5)) == bytes(4096)

    run(main())
    g.close()


# --------------------------------------------------------------------------- the soon path


class SoonNode(MemNode):
    """A child without a descriptor that offers the soon path (as an NBD child does):
    its requests start at once and finish when the test lets them (``gate``), or
    never (``hang``), or fail (``fail``)."""

    def __init__(self, name: str, size: int = SIZE) -> None:
        super().__init__(name, size)
        self.gate = asyncio.Event()
        self.started = 0
        self.fail: int | None = None
        self._soon = _SoonOffer(self)
        self.tasks: set[asyncio.Task[None]] = set()

    def direct(self) -> Any:
        return self._soon

    def start(self, op: Any) -> asyncio.Future[Any]:
        self.started += 1
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Any] = loop.create_future()

        async def later() -> None:
            await self.gate.wait()
            if out.done():
                return
            if self.fail is not None:
                out.set_exception(OSError(self.fail, "soon child failed"))
            else:
                out.set_result(await op())

        task = loop.create_task(later())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return out


class _SoonOffer(Direct):
    fd = None

    def __init__(self, node: SoonNode) -> None:
        self.node = node

    def soon_pread(self, offset: int, length: int) -> asyncio.Future[Any]:
        return self.node.start(lambda: MemNode.pread(self.node, offset, length))

    def soon_pwrite(self, offset: int, data: Buffer) -> asyncio.Future[Any]:
        return self.node.start(lambda: MemNode.pwrite(self.node, offset, data))

    #: requests above this many bytes are declined, as an NBD child declines a
    #: request it would have to split (None: any size)
    max_request: int | None = None

    def takes(self, length: int) -> bool:
        return self.max_request is None or length <= self.max_request

    # the callback forms, as an NBD child offers them: then(result, error) once, later
    def call_pread(self, offset: int, length: int, then: Any) -> bool:
        if not self.takes(length):
            return False
        self.soon_pread(offset, length).add_done_callback(lambda f: _tell(f, then))
        return True

    def call_pwrite(self, offset: int, data: Buffer, then: Any) -> bool:
        if not self.takes(len(data)):
            return False
        self.soon_pwrite(offset, data).add_done_callback(lambda f: _tell(f, then))
        return True


def _tell(f: asyncio.Future[Any], then: Any) -> None:
    err = f.exception()
    then(None if err is not None else f.result(), err)


def _soon_quorum(tmp_path: Path, *, threshold: int = 2, timeout: float = 5.0,
                 bounded: bool = False, rewrite: bool = False,
                 ) -> tuple[Graph, QuorumNode, SoonNode, list[Event]]:
    """Two files and ``far``; ``bounded``: far says it bounds its own requests
    (an NBD child's timeout), which lets reads be answered on the now path."""
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    g = Graph(bus)
    files = [g.open_raw_file(f"f{i}", str(tmp_path / f"f{i}.raw"), create_size=SIZE)
             for i in range(2)]
    far = SoonNode("far")
    if bounded:
        far._soon.time_limit = timeout
    q = QuorumNode("q0", [*files, far], vote_threshold=threshold, bus=bus,
                   child_timeout=timeout, rewrite_corrupted=rewrite)
    return g, q, far, seen


def _fill(q: QuorumNode, far: SoonNode, offset: int, data: bytes) -> None:
    """Write ``data`` to every child (the far one at once)."""
    for slot in q.slots[:2]:
        assert slot.node.direct() is not None
        fd = slot.node.direct().fd  # type: ignore[union-attr]
        assert os.pwrite(fd, data, offset) == len(data)
    far.buf[offset:offset + len(data)] = data


@pytest.mark.parametrize("far_sends", ["same", "other", "error"])
def test_a_read_is_answered_now_while_the_one_remote_child_is_still_read(
        tmp_path: Path, far_sends: str) -> None:
    g, q, far, seen = _soon_quorum(tmp_path, bounded=True, rewrite=True)
    data = b"\x3c" * 4096
    _fill(q, far, 8192, data)
    if far_sends == "other":
        far.buf[8192 + 7] = 0
    elif far_sends == "error":
        far.fail = errno.EIO

    async def main() -> None:
        got = q.direct().try_pread(8192, 4096)
        assert got is not None and bytes(got) == data, "the two files decide: answered now"
        assert far.started == 1 and q._late_bytes == 4096
        # the range stays locked until the late child answered
        assert q.lock.would_block(8192, 4096, exclusive=True)
        assert q.direct().soon_pwrite(8192, b"\x55" * 512) is None
        far.gate.set()
        for _ in range(1000):
            await asyncio.sleep(0.01)
            if not q.lock.would_block(8192, 4096, exclusive=True):
                break
        assert not q.lock.would_block(8192, 4096, exclusive=True), "the range is free"
        assert q._late_bytes == 0
        bad = [(e.data["node-name"], e.data["type"]) for e in seen
               if e.name == "QUORUM_REPORT_BAD"]
        stats = q.slots[2].stats
        assert stats.reads == 1
        if far_sends == "same":
            assert not bad and stats.checksum_errors == 0 and stats.read_errors == 0
        elif far_sends == "other":
            assert bad == [("far", "read")] and stats.checksum_errors == 1
            assert bytes(far.buf[8192:8192 + 4096]) == data, "rewritten with the winner"
        else:
            assert bad == [("far", "read")] and stats.read_errors == 1

    run(main())
    g.close()


@pytest.mark.parametrize("thread", [True, False], ids=["write-thread", "on-the-loop"])
@pytest.mark.parametrize("far_does", ["write", "fail"])
def test_a_write_with_one_remote_child_is_answered_once_it_answered(
        tmp_path: Path, far_does: str, thread: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quorum_node, "LATE_WRITER", thread)
    g, q, far, seen = _soon_quorum(tmp_path, bounded=True)
    if far_does == "fail":
        far.fail = errno.EIO

    async def main() -> None:
        done = q.direct().soon_pwrite(4096, b"\x77" * 4096)
        assert done is not None and far.started == 1
        await asyncio.sleep(0.02)
        for slot in q.slots[:2]:  # the files have it (on the loop: at once)
            fd = slot.node.direct().fd  # type: ignore[union-attr]
            assert os.pread(fd, 4096, 4096) == b"\x77" * 4096
        assert not done.done(), "answered once every child has"
        assert (q._writer is not None) == thread
        assert q.lock.would_block(4096, 1, exclusive=False), "the range stays locked"
        far.gate.set()
        await asyncio.wait_for(done, 5)  # acknowledged either way: two of three took it
        assert not q.lock.would_block(4096, 4096, exclusive=True)
        # the files were held open while the thread wrote them, and no longer
        assert [s.node.children_nodes()[0]._pins  # type: ignore[attr-defined]
                for s in q.slots[:2]] == [0, 0]
        bad = [(e.data["node-name"], e.data["type"]) for e in seen
               if e.name == "QUORUM_REPORT_BAD"]
        stats, sync = q.slots[2].stats, q.slots[2].sync
        assert stats.writes == 1
        if far_does == "write":
            assert not bad and bytes(far.buf[4096:8192]) == b"\x77" * 4096
            assert sync is None or sync.dirty_bytes() == 0
        else:
            assert bad == [("far", "write")] and stats.write_errors == 1
            assert sync is not None and sync.dirty_bytes() >= 4096, "recorded for catch-up"

    run(main())
    g.close()


def test_a_write_thread_stuck_on_a_disk_sends_the_next_writes_back_to_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quorum_node, "LATE_WRITER", True)
    g, q, far, _seen = _soon_quorum(tmp_path, bounded=True)

    async def main() -> None:
        first = q.direct().soon_pwrite(0, b"\x01" * 512)
        assert first is not None and q._writer is not None
        writer = q._writer
        # as if its job had been in a pwrite for a second (a disk pushing back)
        monkeypatch.setattr(writer, "busy_for", lambda: 1.0)
        second = q.direct().soon_pwrite(8192, b"\x02" * 512)
        assert second is not None
        for slot in q.slots[:2]:  # written on the loop, at once
            fd = slot.node.direct().fd  # type: ignore[union-attr]
            assert os.pread(fd, 512, 8192) == b"\x02" * 512
        assert writer.pending == 1, "only the first went to the thread"
        far.gate.set()
        await asyncio.wait_for(asyncio.gather(first, second), 5)
        assert writer.pending == 0
        for slot in q.slots[:2]:
            fd = slot.node.direct().fd  # type: ignore[union-attr]
            assert os.pread(fd, 512, 0) == b"\x01" * 512

    run(main())
    q.close()
    assert q._writer is not None and q._writer.closed, "closed with its node"
    g.close()


def test_a_far_request_that_raises_keeps_the_range_locked_until_the_thread_wrote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local files' job is queued before the far request goes out: when that
    raises, the job cannot be taken back, so the range lock and the write-intent
    mark stay held until the thread has written it, and the write is judged with
    the far child failed; a later write to the range must never be overwritten
    by the earlier one's job."""
    monkeypatch.setattr(quorum_node, "LATE_WRITER", True)
    g, q, far, _seen = _soon_quorum(tmp_path, bounded=True)

    async def main() -> None:
        far.gate.set()
        warm = q.direct().soon_pwrite(65536, b"\x00" * 512)  # the thread, started and idle
        assert warm is not None and q._writer is not None
        await asyncio.wait_for(warm, 5)
        writer = q._writer

        def broken(offset: int, data: Buffer, then: Any) -> bool:
            raise RuntimeError("the far child's client broke")

        monkeypatch.setattr(far._soon, "call_pwrite", broken)
        told: list[BaseException | None] = []
        try:
            started = q.direct().call_pwrite(0, b"\x01" * 512, lambda _r, e: told.append(e))
        except RuntimeError:
            started = False
        monkeypatch.undo()
        monkeypatch.setattr(quorum_node, "LATE_WRITER", True)
        assert q.lock.would_block(0, 512, exclusive=True), "unlocked with its job still queued"
        # a later write of the range, on the loop (the thread as if stuck): it waits
        monkeypatch.setattr(writer, "busy_for", lambda: 1.0)
        second = q.direct().soon_pwrite(0, b"\x02" * 512)
        if second is None:
            await asyncio.wait_for(q.pwrite(0, b"\x02" * 512), 5)
        else:
            await asyncio.wait_for(second, 5)
        for _ in range(500):
            if writer.pending == 0:
                break
            await asyncio.sleep(0.01)
        assert writer.pending == 0
        for slot in q.slots[:2]:  # the last write acknowledged is what the files hold
            fd = slot.node.direct().fd  # type: ignore[union-attr]
            assert os.pread(fd, 512, 0) == b"\x02" * 512
        assert started and len(told) == 1, "told once, as any write"
        assert [s.node.children_nodes()[0]._pins  # type: ignore[attr-defined]
                for s in q.slots[:2]] == [0, 0]
        assert q.slots[2].stats.write_errors == 1

    run(main())
    q.close()
    g.close()


def test_a_file_closed_under_the_writing_thread_that_fails_to_close_still_lets_the_write_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file closed while the thread's job holds it open is closed at the unpin;
    a close that fails there (NFS tells write-back errors at close) must neither
    leave the range locked nor the client untold, nor the other file pinned."""
    monkeypatch.setattr(quorum_node, "LATE_WRITER", True)
    g, q, far, _seen = _soon_quorum(tmp_path, bounded=True)
    files = [s.node.children_nodes()[0] for s in q.slots[:2]]

    def failing_close() -> None:
        raise OSError(errno.EIO, "close failed")

    async def main() -> None:
        done = q.direct().soon_pwrite(0, b"\x05" * 512)
        assert done is not None and q._writer is not None
        assert [f._pins for f in files] == [1, 1]  # type: ignore[attr-defined]
        monkeypatch.setattr(files[0], "_really_close", failing_close)
        files[0].close()  # (as a child removed meanwhile): closed once unpinned
        far.gate.set()
        await asyncio.wait_for(done, 5)
        assert not q.lock.would_block(0, 512, exclusive=True)
        assert [f._pins for f in files] == [0, 0]  # type: ignore[attr-defined]

    run(main())
    q.close()
    monkeypatch.undo()
    g.close()


def test_a_write_with_one_remote_child_fails_below_the_threshold(tmp_path: Path) -> None:
    g, q, far, seen = _soon_quorum(tmp_path, bounded=True, threshold=3)
    far.fail = errno.EIO

    async def main() -> None:
        done = q.direct().soon_pwrite(0, b"\x78" * 512)
        assert done is not None
        far.gate.set()
        with pytest.raises(OSError) as err:
            await asyncio.wait_for(done, 5)
        assert err.value.errno == errno.EIO
        assert [e.name for e in seen if e.name == "QUORUM_FAILURE"]
        assert not q.lock.would_block(0, 512, exclusive=True)

    run(main())
    g.close()


@pytest.mark.parametrize("threshold", [2, 3])
def test_a_write_the_remote_child_would_split_takes_the_general_path(
        tmp_path: Path, threshold: int) -> None:
    g, q, far, seen = _soon_quorum(tmp_path, bounded=True, threshold=threshold)
    far._soon.max_request = 4096
    far.gate.set()

    async def main() -> None:
        for k in range(3):
            fut = q.direct().soon_pwrite(k * 8192, b"\x77" * 8192)
            if fut is None:
                await q.pwrite(k * 8192, b"\x77" * 8192)  # the full path, as the server
            else:
                await asyncio.wait_for(fut, 5)
        assert not [e for e in seen if e.name in ("QUORUM_REPORT_BAD", "QUORUM_FAILURE")]
        assert q.slots[2].stats.write_errors == 0 and q.slots[2].error_count == 0
        assert bytes(far.buf[:3 * 8192]) == b"\x77" * 3 * 8192

    run(main())
    g.close()


@pytest.mark.parametrize("bounded", [False, True])  # False: the general soon path
def test_a_write_is_judged_by_the_children_states_when_it_completes(
        tmp_path: Path, bounded: bool) -> None:
    g, q, far, _seen = _soon_quorum(tmp_path, bounded=bounded, threshold=3)

    async def main() -> None:
        done = q.direct().soon_pwrite(0, b"\x11" * 4096)
        assert done is not None
        await asyncio.sleep(0.01)
        q.members.fault(q.slots[0], "faulted while the write was in flight")
        far.gate.set()
        with pytest.raises(OSError) as err:  # two active children left: below 3
            await asyncio.wait_for(done, 5)
        assert err.value.errno == errno.EIO

    run(main())
    g.close()


def test_a_clean_stop_waits_for_the_remote_child_of_a_read_answered_now(
        tmp_path: Path) -> None:
    g, q, far, seen = _soon_quorum(tmp_path, bounded=True)

    async def main() -> None:
        assert q.direct().try_pread(0, 4096) is not None
        settle = asyncio.ensure_future(q.settle())
        await asyncio.sleep(0.05)
        assert not settle.done(), "the far child's bytes are still to compare"
        far.gate.set()
        await asyncio.wait_for(settle, 5)
        assert q._late_reads == 0 and q._late_bytes == 0
        assert not [e for e in seen if e.name == "QUORUM_REPORT_BAD"]

    run(main())
    g.close()


def test_a_read_is_not_answered_now_unless_the_files_alone_decide_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdquorum.block.quorum import node as node_mod

    async def main() -> None:
        # the far child does not bound its requests: the soon path (and its timer)
        g, q, far, _ = _soon_quorum(tmp_path / "a", bounded=False)
        assert q.direct().try_pread(0, 4096) is None and far.started == 0
        g.close()
        # three needed: two files cannot decide
        g, q, far, _ = _soon_quorum(tmp_path / "b", bounded=True, threshold=3)
        assert q.direct().try_pread(0, 4096) is None and far.started == 0
        g.close()
        # the files disagree: nothing is sent, the soon path reads and judges
        g, q, far, _ = _soon_quorum(tmp_path / "c", bounded=True)
        fd = q.slots[0].node.direct().fd  # type: ignore[union-attr]
        os.pwrite(fd, b"\x01", 100)
        assert q.direct().try_pread(0, 4096) is None and far.started == 0
        assert not q.lock.would_block(0, 4096, exclusive=True)
        g.close()
        # answered early, but no more than LATE_MAX of them at once
        monkeypatch.setattr(node_mod, "LATE_MAX", 2 * 4096)
        g, q, far, _ = _soon_quorum(tmp_path / "d", bounded=True)
        assert [q.direct().try_pread(i * 4096, 4096) is not None for i in range(3)] == [
            True, True, False]
        far.gate.set()
        await asyncio.sleep(0.05)
        assert q._late_bytes == 0
        g.close()

    for d in "abcd":
        (tmp_path / d).mkdir()
    run(main())


def test_soon_reads_are_answered_when_decided_and_the_late_child_still_compared(
        tmp_path: Path) -> None:
    g, q, far, seen = _soon_quorum(tmp_path)

    async def main() -> None:
        far.gate.set()
        done = q.direct().soon_pwrite(0, b"\x44" * 8192)
        assert done is not None, "a mixed quorum takes the soon path"
        await asyncio.wait_for(done, 5)
        assert bytes(far.buf[:8192]) == b"\x44" * 8192
        far.gate.clear()
        far.buf[10] = 0  # it will lose, late
        read = q.direct().soon_pread(0, 8192)
        assert read is not None
        assert bytes(await asyncio.wait_for(read, 5)) == b"\x44" * 8192  # the files decide
        assert not [e for e in seen if e.name == "QUORUM_REPORT_BAD"]
        # the range stays locked until the late child answered: a write declines the
        # soon path and waits on the full path
        assert q.direct().soon_pwrite(0, b"\x55" * 512) is None
        write = asyncio.ensure_future(q.pwrite(0, b"\x55" * 512))
        await asyncio.sleep(0.05)
        assert not write.done()
        far.gate.set()
        await asyncio.wait_for(write, 5)
        bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
        assert [b["node-name"] for b in bad] == ["far"]
        assert q.slots[2].stats.checksum_errors == 1

    run(main())
    g.close()


def test_a_soon_read_waits_for_an_undecided_vote(tmp_path: Path) -> None:
    g, q, far, _seen = _soon_quorum(tmp_path, threshold=3)
    assert far.started == 0

    async def main() -> None:
        read = q.direct().soon_pread(0, 4096)
        assert read is not None
        await asyncio.sleep(0.05)
        assert not read.done(), "two of three cannot decide a vote at threshold 3"
        far.gate.set()
        assert bytes(await asyncio.wait_for(read, 5)) == bytes(4096)

    run(main())
    g.close()


def test_a_soon_child_that_never_answers_is_given_up_after_the_child_timeout(
        tmp_path: Path) -> None:
    g, q, far, seen = _soon_quorum(tmp_path, threshold=3, timeout=0.2)
    far.fail = errno.EIO  # (when let go at the end: too late to matter)

    async def main() -> None:
        read = q.direct().soon_pread(0, 4096)
        assert read is not None
        with pytest.raises(OSError) as err:  # three needed, one hangs: no quorum
            await asyncio.wait_for(read, 5)
        assert err.value.errno == errno.ETIMEDOUT
        bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
        assert bad and bad[0]["node-name"] == "far"
        assert q.lock.would_block(0, 4096, exclusive=True) is False, "the range is free"
        far.gate.set()
        await asyncio.sleep(0.01)

    run(main())
    g.close()


def test_a_soon_write_a_child_fails_is_acknowledged_and_recorded_for_it(
        tmp_path: Path) -> None:
    g, q, far, seen = _soon_quorum(tmp_path)

    async def main() -> None:
        far.fail = errno.EIO
        far.gate.set()
        done = q.direct().soon_pwrite(65536, b"\x66" * 4096)
        assert done is not None
        await asyncio.wait_for(done, 5)  # two of three took it: acknowledged
        bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
        assert [(b["node-name"], b["type"]) for b in bad] == [("far", "write")]
        assert q.slots[2].stats.write_errors == 1
        sync = q.slots[2].sync  # it catches up there later
        assert sync is not None and sync.dirty_bytes() >= 4096

    run(main())
    g.close()


def test_reads_answered_early_are_bounded_so_a_slow_child_cannot_pile_them_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbdquorum.block.quorum import node as node_mod

    monkeypatch.setattr(node_mod, "LATE_MAX", 2 * 65536)
    g, q, far, _seen = _soon_quorum(tmp_path)

    async def main() -> None:
        reads = [q.direct().soon_pread(i * 65536, 65536) for i in range(3)]
        assert all(r is not None for r in reads)
        await asyncio.sleep(0.05)
        assert [r.done() for r in reads] == [True, True, False]  # type: ignore[union-attr]
        far.gate.set()  # the slow child answers: the third read has its vote
        assert bytes(await asyncio.wait_for(reads[2], 5)) == bytes(65536)  # type: ignore[arg-type]
        await asyncio.sleep(0.01)
        assert q._late_bytes == 0

    run(main())
    g.close()


def test_soon_reads_compare_every_kind_of_buffer() -> None:
    """The soon path's comparison: bytes, bytearray and memoryview in any pairing."""
    from nbdquorum.block.quorum.voted import SoonReads

    data = bytes(range(256)) * 16
    kinds = [data, bytearray(data), memoryview(b"xx" + data)[2:], memoryview(bytearray(data))]
    other = bytearray(data)
    other[4000] ^= 1
    for a in kinds:
        for b in kinds:
            assert not SoonReads.diff(a, b)
        for b in (bytes(other), other, memoryview(other)):
            assert SoonReads.diff(a, b) and SoonReads.diff(b, a)


def test_a_child_that_bounds_its_requests_needs_no_timer_of_the_quorum() -> None:
    from nbdquorum.block.quorum.voted import _own_limit

    class Bounded(Direct):
        time_limit = 5.0

    assert _own_limit(Bounded(), 5.0) is None  # the child fails them by then itself
    assert _own_limit(Bounded(), 10.0) is None
    assert _own_limit(Bounded(), 2.0) == 2.0  # the quorum's bound is shorter: a timer
    assert _own_limit(Direct(), 5.0) == 5.0  # no promise: a timer
    assert _own_limit(Bounded(), None) is None  # no bound asked


def test_an_nbd_child_bounds_its_requests_unless_they_may_wait_for_the_link() -> None:
    from nbdquorum.remote.child import NBDChild
    from nbdquorum.remote.uri import parse_uri

    address = parse_uri("nbd://127.0.0.1:1/disk")
    d = NBDChild("far", address, timeout=7.0).direct()
    assert d is not None and d.time_limit == 7.0
    d = NBDChild("far", address, timeout=7.0, reconnect_delay=3.0).direct()
    assert d is not None and d.time_limit is None  # reconnect-delay: they may wait longer


def test_an_nbd_child_down_at_start_names_its_address_once() -> None:
    """A restart with the far end down: the child starts unreachable, and its reason
    (health, x-link, the log) names the address once, not twice."""
    from nbdquorum.remote.child import NBDChild
    from nbdquorum.remote.uri import parse_uri

    async def main() -> None:
        address = parse_uri("nbd://127.0.0.1:1/disk")
        node = NBDChild("far", address, timeout=7.0, size=SIZE)
        node.start_offline(f"{address}: Connection refused")
        try:
            assert str(node.health()) == f"{address}: Connection refused"
        finally:
            node.close()

    run(main())


def test_a_soon_read_declined_by_a_later_child_leaves_no_unretrieved_error() -> None:
    """The soon path starts each remote child's read in turn; when a later one
    declines (its link just went) the read takes the full path, and the reads
    already started are dropped.  One of those failing afterwards (the far end
    going away for both) must not leave its error for the loop to log as "Future
    exception was never retrieved"."""
    import gc

    reported: list[dict[str, Any]] = []

    class Declines(_SoonOffer):
        def soon_pread(self, offset: int, length: int) -> Any:
            return None

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        first, second = SoonNode("a"), SoonNode("b")
        second._soon = Declines(second)
        first.fail = errno.ECONNRESET
        soon = VotedIO().read_soon([first, second], [-1, -1], 0, 4096, 2, 5.0)
        assert soon is None and first.started == 1
        first.gate.set()
        await asyncio.gather(*first.tasks)  # the dropped read fails
        gc.collect()
        await asyncio.sleep(0)

    run(main())
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported


def test_a_soon_read_its_caller_gave_up_on_leaves_no_unretrieved_error(
        tmp_path: Path) -> None:
    """A caller of the quorum's soon_pread may drop the future (an outer quorum's
    timer cancels a child's soon read); the judgement of a read that was not
    unanimous then fails with no one to tell, and its error must be taken, not
    left for the loop to log as "Task exception was never retrieved"."""
    import gc

    g, q, far, _seen = _soon_quorum(tmp_path, threshold=3)
    far.fail = errno.EIO  # three needed, one fails: no quorum
    reported: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, ctx: reported.append(ctx))
        read = q.direct().soon_pread(0, 4096)
        assert read is not None
        read.cancel()
        far.gate.set()
        await asyncio.gather(*far.tasks)
        await until_free(q)
        gc.collect()
        await asyncio.sleep(0)

    async def until_free(q: QuorumNode) -> None:
        for _ in range(1000):
            if not q.lock.would_block(0, 4096, exclusive=True):
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the read's range lock was never released")

    run(main())
    g.close()
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
