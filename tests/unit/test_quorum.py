"""QuorumNode semantics on real temp files (C fast path) and on a Python node (slow path)."""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.errors import GraphError
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode, Buffer
from nbdquorum.block.quorum import ChildState, QuorumNode, ReadPattern, ReopenPlan
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.qmp.events import sector_span, wired
from tests.unit.aiohelp import run

SIZE = 1 << 20




class MemNode(BlockNode):
    """A child held in memory, without a fast fd: exercises the gather path."""

    driver = "mem"

    def __init__(self, name: str, size: int = SIZE) -> None:
        super().__init__(name)
        self.buf = bytearray(size)
        self.fail_read: int | None = None
        self.fail_write: int | None = None

    def size(self) -> int:
        return len(self.buf)

    async def pread(self, offset: int, length: int) -> Buffer:
        if self.fail_read:
            raise OSError(self.fail_read, os.strerror(self.fail_read))
        return bytes(self.buf[offset:offset + length])

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        if self.fail_write:
            raise OSError(self.fail_write, os.strerror(self.fail_write))
        self.buf[offset:offset + len(data)] = data

    async def flush(self) -> None:
        pass

    async def zero(self, offset: int, length: int, **kw: Any) -> None:
        self.buf[offset:offset + length] = bytes(length)

    async def trim(self, offset: int, length: int, **kw: Any) -> None:
        await self.zero(offset, length)


@pytest.fixture
def events() -> Iterator[tuple[EventBus, list[Event]]]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    yield bus, seen


def file_quorum(tmp_path: Path, bus: EventBus, n: int = 3, **kw: Any) -> tuple[Graph, QuorumNode]:
    g = Graph(bus)
    kids = [g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"), create_size=SIZE) for i in range(n)]
    kw.setdefault("vote_threshold", n // 2 + 1)
    q = QuorumNode("q0", kids, bus=bus, **kw)
    g.add(q)
    return g, q


def corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_sector_span_rounds_outward() -> None:
    assert sector_span(0, 512) == (0, 1)
    assert sector_span(1, 512) == (0, 2)
    assert sector_span(1024, 1) == (2, 1)


def test_write_reaches_every_child_and_reads_back(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus)
    run(q.pwrite(4096 + 1, b"x" * 1000))
    assert bytes(run(q.pread(4096 + 1, 1000))) == b"x" * 1000
    for i in range(3):
        assert (tmp_path / f"c{i}.raw").read_bytes()[4097:5097] == b"x" * 1000
    assert seen == []
    g.close()


def test_one_corrupt_child_is_outvoted_and_reported_narrowly(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus)
    run(q.pwrite(0, b"\x32" * 65536))
    corrupt(tmp_path / "c1.raw", 5000, b"\x42" * 100)
    assert bytes(run(q.pread(0, 65536))) == b"\x32" * 65536
    assert [e.name for e in seen] == ["QUORUM_REPORT_BAD"]
    d = seen[0].data
    assert d["node-name"] == "c1" and d["type"] == "read" and "error" not in d
    assert (d["sector-num"], d["sectors-count"]) == sector_span(5000, 100)
    assert q.slots[1].stats.checksum_errors == 1
    # without rewrite-corrupted the child stays corrupt
    assert (tmp_path / "c1.raw").read_bytes()[5000:5100] == b"\x42" * 100
    g.close()


def test_rewrite_corrupted_repairs_the_child(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus, rewrite_corrupted=True)
    run(q.pwrite(0, b"\x32" * 65536))
    corrupt(tmp_path / "c2.raw", 70, b"\x00\x01")
    run(q.pread(0, 65536))
    assert (tmp_path / "c2.raw").read_bytes()[:65536] == b"\x32" * 65536
    assert q.slots[2].stats.repaired_bytes == 512
    seen.clear()
    run(q.pread(0, 65536))
    assert seen == []
    g.close()


def test_no_majority_is_eio_and_quorum_failure(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus)
    run(q.pwrite(0, b"\x32" * 4096))
    corrupt(tmp_path / "c0.raw", 0, b"\x41" * 4096)
    corrupt(tmp_path / "c1.raw", 0, b"\x42" * 4096)
    with pytest.raises(OSError) as ei:
        run(q.pread(0, 4096))
    assert ei.value.errno == errno.EIO
    assert [e.name for e in seen] == ["QUORUM_FAILURE"]
    assert seen[0].data == {"reference": "q0", "sectors-count": 8, "sector-num": 0}
    g.close()


def test_tie_fails_instead_of_guessing(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus, n=4, vote_threshold=2)
    run(q.pwrite(0, b"\x32" * 4096))
    corrupt(tmp_path / "c2.raw", 0, b"\x00" * 4096)
    corrupt(tmp_path / "c3.raw", 0, b"\x00" * 4096)
    with pytest.raises(OSError):
        run(q.pread(0, 4096))
    assert seen[-1].name == "QUORUM_FAILURE"
    g.close()


def test_fifo_reads_first_child_only(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus, read_pattern=ReadPattern.FIFO)
    run(q.pwrite(0, b"\x32" * 512))
    corrupt(tmp_path / "c1.raw", 0, b"\x42" * 512)
    assert bytes(run(q.pread(0, 512))) == b"\x32" * 512
    corrupt(tmp_path / "c0.raw", 0, b"\x41" * 512)
    assert bytes(run(q.pread(0, 512))) == b"\x41" * 512  # fifo does not verify
    assert seen == []
    g.close()


def test_slow_path_read_error_is_reported_with_error_and_does_not_vote(events: Any) -> None:
    bus, seen = events
    kids = [MemNode(f"m{i}") for i in range(3)]
    q = QuorumNode("q", kids, vote_threshold=2, bus=bus)
    run(q.pwrite(0, b"abc"))
    kids[0].fail_read = errno.EIO
    assert bytes(run(q.pread(0, 3))) == b"abc"
    assert seen[0].name == "QUORUM_REPORT_BAD"
    assert seen[0].data["error"] == os.strerror(errno.EIO)
    assert seen[0].data["node-name"] == "m0"
    kids[1].fail_read = errno.ENOSPC
    with pytest.raises(OSError):
        run(q.pread(0, 3))
    assert seen[-1].name == "QUORUM_FAILURE"


def test_write_succeeds_with_threshold_and_fails_below(events: Any) -> None:
    bus, seen = events
    kids = [MemNode(f"m{i}") for i in range(3)]
    q = QuorumNode("q", kids, vote_threshold=2, bus=bus)
    kids[2].fail_write = errno.ENOSPC
    run(q.pwrite(0, b"zz"))
    bad = [e for e in seen if e.name == "QUORUM_REPORT_BAD"]
    assert [e.data["type"] for e in bad] == ["write"]
    assert bad[0].data["error"] == os.strerror(errno.ENOSPC)
    # the child missed an acknowledged write: it stops voting until resynced
    assert q.slots[2].state is ChildState.RESYNCING
    assert q.slots[2].sync is not None and list(q.slots[2].sync) == [0]
    kids[1].fail_write = errno.ENOSPC
    with pytest.raises(OSError) as ei:
        run(q.pwrite(0, b"yy"))
    assert ei.value.errno == errno.ENOSPC  # the voted errno
    assert seen[-1].name == "QUORUM_FAILURE"


def test_trim_and_zero_reach_every_child(tmp_path: Path, events: Any) -> None:
    bus, _ = events
    g, q = file_quorum(tmp_path, bus)
    run(q.pwrite(0, b"\xff" * 65536))
    run(q.trim(0, 8192))
    run(q.zero(8192, 4096, may_trim=False))
    for i in range(3):
        data = (tmp_path / f"c{i}.raw").read_bytes()
        assert data[:12288] == bytes(12288) and data[12288:65536] == b"\xff" * (65536 - 12288)
    g.close()


def test_block_status_hole_only_where_all_children_have_one(tmp_path: Path, events: Any) -> None:
    bus, _ = events
    g, q = file_quorum(tmp_path, bus)
    run(q.pwrite(0, b"\x01" * 65536))
    corrupt(tmp_path / "c0.raw", 512 << 10, b"\x01" * 4096)  # data on one child only
    ext = run(q.block_status(0, SIZE))
    assert sum(n for n, _ in ext) == SIZE
    assert ext[0][1] == 0  # the written start is data
    assert ext[-1][1] == 3  # the tail is a hole on every child
    g.close()


def test_overlapping_writes_land_in_the_same_order_on_every_child(tmp_path: Path, events: Any) -> None:
    bus, _ = events
    g, q = file_quorum(tmp_path, bus)

    async def many() -> None:
        await asyncio.gather(*(q.pwrite((i % 7) * 512, bytes([i]) * 4096) for i in range(200)))

    run(many())
    imgs = [(tmp_path / f"c{i}.raw").read_bytes() for i in range(3)]
    assert imgs[0] == imgs[1] == imgs[2]
    g.close()


def test_membership_texts_follow_qemu(tmp_path: Path, events: Any) -> None:
    bus, _ = events
    g, q = file_quorum(tmp_path, bus)
    g.open_raw_file("new", str(tmp_path / "new.raw"), create_size=SIZE)
    slot = g.child_add("q0", "new")
    assert slot.name == "children.3"
    with pytest.raises(GraphError, match="The node new already has a parent"):
        g.child_add("q0", "new")
    with pytest.raises(GraphError, match="Cannot find device='nosuch' nor node-name='nosuch'"):
        g.child_add("nosuch", "new")
    with pytest.raises(GraphError, match="The node c0 does not support adding a child"):
        g.child_add("c0", "new")
    with pytest.raises(GraphError, match=r"Node .q0. does not have child .children\.9."):
        g.child_del("q0", "children.9")
    with pytest.raises(GraphError, match="Block device new is in use"):
        g.delete("new")
    g.child_del("q0", "children.1")
    g.child_del("q0", "children.3")
    assert [s.name for s in q.slots] == ["children.0", "children.2"]
    with pytest.raises(GraphError, match="lower than the vote threshold 2"):
        g.child_del("q0", "children.0")
    g.delete("new")
    assert "new" not in g
    g.open_raw_file("big", str(tmp_path / "big.raw"), create_size=2 * SIZE)
    with pytest.raises(GraphError, match="size"):
        g.child_add("q0", "big")
    g.close()


def test_removed_child_mid_read_does_not_fail_the_request(tmp_path: Path, events: Any) -> None:
    bus, _ = events
    g, q = file_quorum(tmp_path, bus, n=3, vote_threshold=1)
    run(q.pwrite(0, b"\x07" * 65536))

    async def main() -> None:
        reads = [asyncio.create_task(q.pread(0, 65536)) for _ in range(20)]
        await asyncio.sleep(0)
        g.child_del("q0", "children.2")
        g.delete("c2")
        for r in reads:
            assert bytes(await r) == b"\x07" * 65536

    run(main())
    g.close()


def test_resyncing_child_gets_writes_but_never_votes(events: Any) -> None:
    bus, seen = events
    kids = [MemNode(f"m{i}") for i in range(3)]
    q = QuorumNode("q", kids, vote_threshold=2, bus=bus)
    q.members.start_resync(q.slots[2], [])
    assert seen[-1].name == "QUORUM_CHILD_STATE_CHANGE"
    assert seen[-1].data["state"] == "resyncing"
    seen.clear()
    kids[2].buf[0:3] = b"bad"
    assert bytes(run(q.pread(0, 3))) == bytes(3)
    assert seen == []
    run(q.pwrite(0, b"new"))
    assert bytes(kids[2].buf[0:3]) == b"new"


def test_child_is_faulted_after_max_errors_and_gets_no_more_io(events: Any) -> None:
    bus, seen = events
    kids = [MemNode(f"m{i}") for i in range(3)]
    q = QuorumNode("q", kids, vote_threshold=2, bus=bus, max_errors=3)
    kids[1].fail_read = errno.EIO
    for _ in range(3):
        run(q.pread(0, 512))
    assert q.slots[1].state is ChildState.FAULTED
    assert any(e.name == "QUORUM_CHILD_STATE_CHANGE" and e.data["state"] == "faulted" for e in seen)
    n = q.slots[1].stats.reads
    run(q.pread(0, 512))
    run(q.pwrite(0, b"ok"))
    assert q.slots[1].stats.reads == n and q.slots[1].stats.writes == 0
    assert bytes(kids[1].buf[:2]) == bytes(2)


def test_hung_child_times_out_without_failing_the_client(events: Any) -> None:
    bus, seen = events

    class Hang(MemNode):
        async def pread(self, offset: int, length: int) -> Buffer:
            await asyncio.Event().wait()
            raise AssertionError

    kids: list[BlockNode] = [MemNode("m0"), MemNode("m1"), Hang("h")]
    q = QuorumNode("q", kids, vote_threshold=2, bus=bus, child_timeout=0.05)

    async def main() -> None:
        # answered at once (the two others decide the vote); the hung child is
        # followed in the background and reported when its timeout expires
        assert bytes(await q.pread(0, 4)) == bytes(4)
        for _ in range(100):
            if any(e.name == "QUORUM_REPORT_BAD" for e in seen):
                break
            await asyncio.sleep(0.01)

    run(main())
    bad = [e for e in seen if e.name == "QUORUM_REPORT_BAD"]
    assert bad[0].data["node-name"] == "h"
    assert bad[0].data["error"] == os.strerror(errno.ETIMEDOUT)


def test_deleted_or_truncated_child_file_is_faulted_by_health_check(
    tmp_path: Path, events: Any
) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus)
    assert q.check_health() == []
    os.unlink(tmp_path / "c1.raw")
    os.truncate(tmp_path / "c2.raw", SIZE // 2)
    found = q.check_health()
    assert [s.node.node_name for s, _ in found] == ["c1", "c2"]
    assert "deleted" in found[0][1] and "changed size" in found[1][1]
    assert q.slots[1].state is ChildState.FAULTED and q.slots[2].state is ChildState.FAULTED
    bad = [e.data for e in seen if e.name == "QUORUM_REPORT_BAD"]
    assert [b["node-name"] for b in bad] == ["c1", "c2"] and all("error" in b for b in bad)
    g.close()


def test_sync_fast_paths_serve_only_the_common_case(tmp_path: Path, events: Any) -> None:
    bus, seen = events
    g, q = file_quorum(tmp_path, bus)
    now = q.direct()
    assert now.try_pwrite(0, b"\x05" * 4096) is True
    assert bytes(now.try_pread(0, 4096) or b"") == b"\x05" * 4096
    corrupt(tmp_path / "c1.raw", 100, b"\x00")
    assert now.try_pread(0, 4096) is None  # a mismatch: the full path reports it
    assert seen == []
    assert bytes(run(q.pread(0, 4096))) == b"\x05" * 4096
    assert [e.name for e in seen] == ["QUORUM_REPORT_BAD"]
    q.members.commit(q.members.prepare(ReopenPlan(q.vote_threshold, ReadPattern.FIFO, False)))
    assert bytes(now.try_pread(0, 4096) or b"") == b"\x05" * 4096
    corrupt(tmp_path / "c0.raw", 100, b"\x09")
    assert (now.try_pread(0, 4096) or b"")[100] == 9  # fifo does not verify
    assert now.try_pread(0, 1 << 20) is None  # big requests take the pool
    g.close()
