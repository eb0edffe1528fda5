"""Live changes under load: children added and removed over QMP while fio writes and verifies.

The issue's "live means live": no request fails (fio exits 0 and its crc32c verify
passes), and afterwards the children that stayed are identical.  A child added while
writes are in flight receives every write that starts after it joined; the blocks
written before it joined are stale (zero) in it until the resync job has copied them,
so it is compared once no child is ``resyncing`` any more.  Without a resync job (QEMU's
semantics) a new child would keep that stale data: the comparison then accepts a block
of the new child only if it equals the others' or is still zero.
"""

from __future__ import annotations

import filecmp
import json
import subprocess
from pathlib import Path
from typing import Any

from .qmp_fixtures import (
    QUORUM,
    RawQMP,
    StartTarget,
    Target,
    make_image,
    qmp_target_fixture,  # noqa: F401  (the qmp_target fixture)
    require,
    wait_until,
)

MiB = 1 << 20
SIZE = 64 * MiB
BLOCK = 4096


class Monitor:
    """Commands over a raw QMP socket that must succeed."""

    def __init__(self, path: Path) -> None:
        self.c = RawQMP(path)
        self.n = 0

    def __call__(self, name: str, **arguments: Any) -> Any:
        self.n += 1
        msg: dict[str, Any] = {"execute": name, "id": self.n}
        if arguments:
            msg["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self.c.send(json.dumps(msg).encode() + b"\n")
        reply = self.c.reply()
        assert reply.get("id") == self.n and "return" in reply, (name, arguments, reply)
        return reply["return"]

    def children(self) -> list[dict[str, Any]]:
        (st,) = self("query-quorum-status", node_name=QUORUM)
        return list(st["children"])

    def close(self) -> None:
        self.c.close()


def fio(t: Target, *extra: str) -> subprocess.Popen[bytes]:
    argv = [require("fio"), "--name=live", "--ioengine=nbd", f"--uri={t.uri}",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={SIZE}",
            "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=256",
            "--verify_state_save=0", "--output-format=json", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=t.tmp)


def stale_or_equal(new: Path, ref: Path) -> tuple[int, int]:
    """(blocks equal to ref, blocks still zero); fails on any other block."""
    equal = zero = 0
    empty = bytes(BLOCK)
    with open(new, "rb") as a, open(ref, "rb") as b:
        for i in range(SIZE // BLOCK):
            x, y = a.read(BLOCK), b.read(BLOCK)
            if x == y:
                equal += 1
            elif x == empty:
                zero += 1
            else:
                raise AssertionError(f"{new.name}: block {i} is neither the quorum's nor stale")
    return equal, zero


def test_children_added_and_removed_under_fio(qmp_target: StartTarget) -> None:
    require("fio")
    t = qmp_target("nbdquorum", size=SIZE)
    mon = Monitor(t.qmp)
    proc = fio(t)
    changes = 0
    saw_resyncing = False
    current: str | None = None
    try:
        while proc.poll() is None:
            name = f"live{changes}"
            img = make_image(t.tmp / f"{name}.raw", SIZE)
            mon("blockdev-add", driver="raw", node_name=name,
                file={"driver": "file", "filename": str(img)})
            if changes % 2:
                mon("x-blockdev-change", parent=QUORUM, node=name)
            else:
                mon("x-blockdev-child-add", parent=QUORUM, child=name)
            saw_resyncing |= any(c["state"] == "resyncing" for c in mon.children())
            if current is not None:
                mon("x-blockdev-child-del", parent=QUORUM, child=current)
                mon("blockdev-del", node_name=current)
            current = name
            changes += 1
            # give fio's requests room between changes without sleeping on a guess:
            # one status round trip is enough to interleave with in-flight I/O
            mon("query-quorum-status")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"fio failed:\n{err.decode()}\n{out.decode()[-3000:]}"
    text = out.decode()
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes first
    assert job["error"] == 0
    assert job["write"]["total_ios"] == SIZE // BLOCK
    assert job["read"]["total_ios"] > 0  # the verify reads went through the quorum too
    assert changes >= 5, f"only {changes} membership changes happened during the run"

    # the last child added stays; wait until nothing is resyncing any more
    wait_until(lambda: all(c["state"] == "active" for c in mon.children()), 120,
               "every child to be active")
    assert [c["node-name"] for c in mon.children()] == ["child0", "child1", "child2", current]
    mon.close()
    assert t.stop() == 0, t.stderr()
    assert not [e for e in t.child_events() if e["event"] == "QUORUM_FAILURE"]

    for other in t.images[1:]:
        assert filecmp.cmp(t.images[0], other, shallow=False), f"{other.name} differs"
    assert current is not None
    _, zero = stale_or_equal(t.tmp / f"{current}.raw", t.images[0])
    if saw_resyncing:
        assert zero == 0, f"{current}: {zero} blocks still stale after its resync"


def test_remove_and_readd_a_child_under_fio(qmp_target: StartTarget) -> None:
    """An original child leaves mid-run and a fresh image takes its place (replace)."""
    require("fio")
    t = qmp_target("nbdquorum", size=SIZE)
    mon = Monitor(t.qmp)
    proc = fio(t)
    try:
        wait_until(lambda: proc.poll() is not None or mon.children()[0]["writes"] > 100, 60,
                   "fio to start writing")
        img = make_image(t.tmp / "fresh.raw", SIZE)
        mon("blockdev-add", driver="raw", node_name="fresh",
            file={"driver": "file", "filename": str(img)})
        mon("x-blockdev-child-add", parent=QUORUM, child="fresh")
        resynced = mon.children()[-1]["state"] == "resyncing"
        mon("x-blockdev-child-del", parent=QUORUM, child="child1")
        mon("blockdev-del", node_name="child1")
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"fio failed:\n{err.decode()}\n{out.decode()[-3000:]}"
    wait_until(lambda: all(c["state"] == "active" for c in mon.children()), 120,
               "the new child to be active")
    mon.close()
    assert t.stop() == 0, t.stderr()
    assert filecmp.cmp(t.images[0], t.images[2], shallow=False)
    _, zero = stale_or_equal(t.tmp / "fresh.raw", t.images[0])
    if resynced:
        assert zero == 0
