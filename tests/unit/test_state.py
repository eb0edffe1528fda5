"""State dir: atomic state file, write-intent bitmap, crash recovery."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.graph import Graph
from nbdquorum.block.quorum import ChildState, QuorumNode
from nbdquorum.block.quorum.recovery import crash_recover
from nbdquorum.eventbus import EventBus
from nbdquorum.state import StateError, StateStore, WriteIntentLog, restore
from tests.unit.aiohelp import run

SIZE = 4 << 20




def quorum(tmp_path: Path, n: int = 3) -> tuple[Graph, QuorumNode]:
    g = Graph(EventBus())
    kids = [g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"), create_size=SIZE) for i in range(n)]
    q = QuorumNode("q0", kids, vote_threshold=2, bus=g.bus)
    g.add(q)
    return g, q


def test_state_roundtrip_keeps_edges_states_and_sync(tmp_path: Path) -> None:
    g, q = quorum(tmp_path)
    q.slots[1].name = "children.7"
    q.members.next_child_index = 8  # as if children.3 .. children.7 had come and gone
    q.members.start_resync(q.slots[2], [(2 << 20, 1)])
    store = StateStore(tmp_path / "st")
    store.save(q)
    state = store.load()
    assert state is not None and state["clean"] is False
    assert not list((tmp_path / "st").glob("*.tmp"))
    g.close()
    g2, q2 = quorum(tmp_path)
    restore(q2, state)
    assert [s.name for s in q2.slots] == ["children.0", "children.7", "children.2"]
    assert q2.next_child_index == 8
    assert q2.slots[2].state is ChildState.RESYNCING
    assert q2.slots[2].sync is not None and list(q2.slots[2].sync) == [2]
    g2.close()


def test_a_faulted_childs_reason_survives_a_restart(tmp_path: Path) -> None:
    g, q = quorum(tmp_path)
    q.members.fault(q.slots[0], "the export has 1 bytes, the quorum 2")
    store = StateStore(tmp_path / "st")
    store.save(q)
    state = store.load()
    assert state is not None
    g.close()
    g2, q2 = quorum(tmp_path)
    restore(q2, state)
    assert q2.slots[0].state is ChildState.FAULTED
    assert q2.slots[0].fault_reason == "the export has 1 bytes, the quorum 2"
    assert q2.slots[1].fault_reason is None
    g2.close()


def test_generations_follow_md_event_counts_and_survive_a_restart(tmp_path: Path) -> None:
    """md's event count: every membership or state change is one more event; an active
    child's generation follows it, an absent one's stays where it left."""
    g, q = quorum(tmp_path)
    m = q.members
    start = m.events
    m.start_resync(q.slots[2], [(0, 1)])  # it misses a write: behind from now on
    assert m.events == start + 1
    assert [s.generation for s in q.slots] == [start + 1, start + 1, start]
    assert m.stale() == [q.slots[2]]
    m.start_resync(q.slots[1], [(0, 1)])  # one after another, in any order
    assert [s.generation for s in q.slots] == [start + 2, start + 1, start]
    store = StateStore(tmp_path / "st")
    store.save(q)
    state = store.load()
    assert state is not None and state["quorum"]["events"] == start + 2
    assert [c["generation"] for c in state["children"]] == [start + 2, start + 1, start]
    g.close()
    g2, q2 = quorum(tmp_path)
    restore(q2, state)  # the server restarted in between
    assert q2.members.events == start + 2
    assert [s.generation for s in q2.slots] == [start + 2, start + 1, start]
    assert [s.state for s in q2.slots] == [ChildState.ACTIVE, ChildState.RESYNCING,
                                           ChildState.RESYNCING]
    q2.members.resynced(q2.slots[2])  # caught up: current again
    assert q2.slots[2].generation == q2.members.events
    assert q2.members.stale() == [q2.slots[1]]
    g2.close()


def saved_state(tmp_path: Path) -> dict[str, Any]:
    """The state dir's record of a fresh quorum of 3, its graph closed."""
    g, q = quorum(tmp_path)
    store = StateStore(tmp_path / "st")
    store.save(q)
    state = store.load()
    assert state is not None
    g.close()
    return state


def test_a_record_of_an_active_child_behind_the_newest_generation_is_never_a_source(
        tmp_path: Path) -> None:
    """A state file that says a child is active at an older generation (it cannot have
    been written whole): that child is copied in full before it votes again."""
    state = saved_state(tmp_path)
    newest = state["children"][0]["generation"]
    state["children"][1]["generation"] = newest - 1
    g2, q2 = quorum(tmp_path)
    restore(q2, state)
    assert q2.slots[1].state is ChildState.RESYNCING
    assert q2.slots[1].sync is not None and q2.slots[1].sync.dirty_bytes() == SIZE
    assert [s.state for s in (q2.slots[0], q2.slots[2])] == [ChildState.ACTIVE] * 2
    g2.close()


def test_a_record_without_generations_is_taken_as_it_is(tmp_path: Path) -> None:
    state = saved_state(tmp_path)
    del state["quorum"]["events"]
    for c in state["children"]:
        del c["generation"]
    g2, q2 = quorum(tmp_path)
    restore(q2, state)  # a state dir of an earlier version
    assert [s.state for s in q2.slots] == [ChildState.ACTIVE] * 3
    g2.close()


def test_corrupt_state_file_is_a_clear_error(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(StateError, match="not valid JSON"):
        store.load()
    store.path.write_text(json.dumps({"format": 99}))
    with pytest.raises(StateError, match="unknown state format"):
        store.load()


def test_write_intent_marks_durably_before_write_and_clears_lazily(tmp_path: Path) -> None:
    g, q = quorum(tmp_path)
    path = tmp_path / "wi.bitmap"

    async def main() -> WriteIntentLog:
        wil = WriteIntentLog(path, SIZE)
        q.write_intent = wil
        # concurrent writes to fresh regions share bitmap syncs (group commit)
        await asyncio.gather(*(q.pwrite(i * (1 << 20), b"x" * 4096) for i in range(4)))
        assert list(wil.bitmap) == [0, 1, 2, 3]
        assert RegionBitmap.from_bytes(SIZE, 1 << 20, path.read_bytes()).count() == 4
        assert wil.syncs <= 4
        assert await wil.clean(q) == 4
        assert RegionBitmap.from_bytes(SIZE, 1 << 20, path.read_bytes()).count() == 0
        return wil

    wil = run(main())
    wil.close()
    g.close()


def test_the_cleaner_survives_a_failed_bitmap_write(tmp_path: Path) -> None:
    """The bitmap file's disk failing a save keeps the regions dirty (recorded in
    memory, saved at the next try), and the periodic cleaner keeps running: it is not
    a task that died with an error nobody retrieves."""
    g, q = quorum(tmp_path)
    wil = WriteIntentLog(tmp_path / "wi.bitmap", SIZE)
    fails: list[OSError] = []
    real = wil._write_sync

    def flaky(data: bytes) -> None:
        if fails:
            raise fails.pop()
        real(data)

    wil._write_sync = flaky  # type: ignore[method-assign]

    async def main() -> None:
        q.write_intent = wil
        await q.pwrite(0, b"x" * 4096)  # marked: saved before the write
        fails.append(OSError(5, "Input/output error"))  # the clean's save fails
        cleaner = asyncio.get_running_loop().create_task(wil.run_cleaner(q, 0.01))
        for _ in range(500):  # bounded: 5 s
            await asyncio.sleep(0.01)
            if not fails and not wil.bitmap.count():
                break
        assert not cleaner.done(), cleaner
        cleaner.cancel()
        assert not fails and wil.bitmap.count() == 0

    run(main())
    wil.close()
    g.close()


def test_write_intent_of_an_earlier_run_is_recovered(tmp_path: Path) -> None:
    path = tmp_path / "wi.bitmap"
    bm = RegionBitmap(SIZE)
    bm.set_range(3 << 20, 10)
    path.write_bytes(bm.to_bytes())
    wil = WriteIntentLog(path, SIZE)
    assert list(wil.recovered) == [3]
    wil.close()


def test_crash_recovery_makes_children_agree(tmp_path: Path) -> None:
    g, q = quorum(tmp_path)
    run(q.pwrite(0, b"\x01" * SIZE))
    # an interrupted write reached c0 only in region 1; different in-flight
    # writes reached c1 and c2 in region 2 (no version has a quorum there)
    for name, off, byte in (("c0", 1 << 20, 9), ("c1", 2 << 20, 7), ("c2", 2 << 20, 8)):
        with open(tmp_path / f"{name}.raw", "r+b") as f:
            f.seek(off + 4096)
            f.write(bytes([byte]) * 8192)
    dirty = RegionBitmap(SIZE)
    dirty.set_range(1 << 20, 2 << 20)
    stats = run(crash_recover(q, dirty))
    imgs = [(tmp_path / f"c{i}.raw").read_bytes() for i in range(3)]
    assert imgs[0] == imgs[1] == imgs[2]
    # region 1: the majority (the old bytes) wins; region 2: taken from c0
    assert imgs[0][(1 << 20) + 4096] == 1
    assert imgs[0][(2 << 20) + 4096] == 1
    assert stats["regions"] == 2 and stats["grains-repaired"] > 0
    g.close()
