"""Persistence: ``--state-dir`` keeps the live membership across restarts.

Children added and removed over QMP, their edge names and states, the threshold
changed live (``ctl threshold``, blockdev-reopen) and an unfinished resync all survive
a restart; a command line that disagrees with the recorded state is refused with one
clear line that names the way out (``--reset-state``).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import pytest

from .conftest import nbdinfo_json
from .qmp_fixtures import ctl
from .repair_fixtures import (
    QUORUM,
    REGION,
    SIZE,
    MiB,
    Nbdq,
    Qmp,
    StartNbdq,
    make_image,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
    same_files,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)


def layout(q: Qmp) -> dict[str, Any]:
    """query-quorum-status without the counters (which start again at 0)."""
    st = q.status()
    return {
        **{k: st[k] for k in ("node-name", "vote-threshold", "read-pattern",
                              "rewrite-corrupted", "size")},
        "children": [{k: c[k] for k in ("child", "node-name", "filename", "state",
                                        "unsynced-bytes")} for c in st["children"]],
    }


def refused(srv: Nbdq) -> str:
    """Start ``srv`` expecting a start-up refusal: exit 1 and one line on stderr."""
    proc = srv.launch()
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server started:\n{srv.log()}") from None
    srv.returncode = code
    text = srv.log()
    assert code == 1, text
    lines = text.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert lines[0].startswith("nbdquorum: error: "), lines[0]
    return lines[0]


def test_membership_changed_over_qmp_survives_a_restart(nbdq: StartNbdq) -> None:
    srv = nbdq()
    qemu_io(srv.uri, "write -P 0x2b 0 16M", "flush")
    q = srv.qmp()
    extra = [make_image(srv.work / f"n{i}.raw") for i in (3, 4)]
    for i, img in zip((3, 4), extra, strict=True):
        q.add_child(f"n{i}", img)
        wait_until(lambda i=i: q.state(f"n{i}") == "active", 20, f"n{i} to be active")
    q.remove_child("child1")
    before = layout(q)
    assert [(c["child"], c["node-name"]) for c in before["children"]] == [
        ("children.0", "child0"), ("children.2", "child2"), ("children.3", "n3"),
        ("children.4", "n4")]
    assert srv.state_json()["clean"] is False  # while it runs
    assert srv.stop() == 0
    assert srv.state_json()["clean"] is True

    srv.children = []  # no --child: the recorded membership is used
    srv.start()
    q = srv.qmp()
    assert layout(q) == before
    assert "children.1" not in {c["child"] for c in q.children()}
    info = nbdinfo_json(srv.uri)
    assert info["export-size"] == SIZE and info["export-name"] == "disk"
    qemu_io(srv.uri, "read -P 0x2b 0 16M")
    # the edge counter survived too: the next child is children.5, as QEMU numbers it
    q.add_child("n5", make_image(srv.work / "n5.raw"))
    assert q.child("n5")["child"] == "children.5"
    wait_until(lambda: q.state("n5") == "active", 20, "n5 to be active")
    assert srv.stop() == 0
    same_files([srv.work / "c0.raw", srv.work / "c2.raw", *extra, srv.work / "n5.raw"])


def test_a_disagreeing_child_list_is_refused_with_the_way_out(nbdq: StartNbdq) -> None:
    srv = nbdq()
    given = list(srv.children)
    q = srv.qmp()
    q.add_child("n3", make_image(srv.work / "n3.raw"))
    wait_until(lambda: q.state("n3") == "active", 20, "n3 to be active")
    assert srv.stop() == 0

    line = refused(srv)  # the original command line, without n3
    assert "--reset-state" in line and "n3=" in line and str(srv.state_dir) in line

    srv.extra = ["--reset-state"]  # the documented way out: the command line wins
    srv.start()
    q = srv.qmp()
    assert [(c["node-name"], c["state"]) for c in q.children()] == [
        (name, "active") for name, _ in given]
    assert srv.stop() == 0
    srv.children, srv.extra = [], []
    srv.start()  # and the state now records the new membership
    assert [c["node-name"] for c in srv.qmp().children()] == ["child0", "child1", "child2"]


def test_unfinished_resync_resumes_after_a_restart(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=["--resync-speed", str(2 * MiB)])  # 16 MiB would take 8 s
    qemu_io(srv.uri, "write -P 0x5e 0 16M", "flush")
    q = srv.qmp()
    n3 = make_image(srv.work / "n3.raw")
    q.add_child("n3", n3)
    wait_until(lambda: q.child("n3")["unsynced-bytes"] <= SIZE - 3 * REGION, 20,
               "three regions to be copied")
    assert srv.stop() == 0  # SIGTERM mid-way
    assert srv.log_events("BLOCK_JOB_CANCELLED", device="resync-n3")
    rec = {c["node-name"]: c for c in srv.state_json()["children"]}["n3"]
    assert rec["state"] == "resyncing"
    left = bin(int(rec["sync"], 16)).count("1") * REGION
    assert REGION <= left <= SIZE - 3 * REGION, rec

    srv.children = []
    srv.extra = ["--resync-speed", str(4 * MiB)]
    srv.start()
    q = srv.qmp()
    # it continues where it stopped, not from scratch
    assert f"resync of n3: {left} bytes to copy" in srv.log()
    done = q.wait_event("BLOCK_JOB_COMPLETED", 20, device="resync-n3")["data"]
    assert done["len"] == left and "error" not in done
    wait_until(lambda: q.state("n3") == "active", 5, "n3 to be active")
    assert layout(q)["children"][-1] == {"child": "children.3", "node-name": "n3",
                                         "filename": str(n3), "state": "active",
                                         "unsynced-bytes": 0}
    assert srv.stop() == 0
    assert {c["node-name"]: c for c in srv.state_json()["children"]}["n3"]["state"] == "active"
    same_files([*srv.images, n3])


def test_threshold_changed_live_persists(nbdq: StartNbdq) -> None:
    srv = nbdq()
    q = srv.qmp()
    proc = ctl(srv.control, "threshold", "3")
    assert proc.returncode == 0, proc.stderr
    assert q.status()["vote-threshold"] == 3
    before = layout(q)
    assert srv.stop() == 0
    assert srv.state_json()["quorum"]["vote-threshold"] == 3

    srv.start()  # the same --child list, no --vote-threshold
    q = srv.qmp()
    assert layout(q) == before
    qemu_io(srv.uri, "write -P 0x31 0 1M", "read -P 0x31 0 1M")
    assert srv.stop() == 0

    srv.extra = ["--vote-threshold", "2"]  # the old command line disagrees now
    line = refused(srv)
    assert "--vote-threshold 2" in line and "3" in line and "--reset-state" in line
    assert QUORUM in srv.state_json()["quorum"]["node-name"]


def test_a_faulted_child_stays_faulted_after_a_restart(nbdq: StartNbdq) -> None:
    """A faulted child missed writes: a restart must not let it vote again."""
    srv = nbdq(extra=["--fault-injection", "--max-errors", "1"])
    qemu_io(srv.uri, "write -P 0x10 0 16M", "flush")
    q = srv.qmp()
    q.faulty("child1", {"op": "read", "action": "error"})
    qemu_io(srv.uri, "read -P 0x10 0 4k")
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child1", state="faulted")
    qemu_io(srv.uri, "write -P 0x20 0 1M", "flush")  # child1 misses it
    before = layout(q)
    assert srv.stop() == 0

    srv.children = []
    srv.extra = ["--fault-injection"]  # no rules now: child1 would read fine
    srv.start()
    q = srv.qmp()
    assert layout(q) == before
    assert q.state("child1") == "faulted"
    qemu_io(srv.uri, "read -P 0x20 0 1M")
    assert q.child("child1")["reads"] == 0


def test_a_lost_image_recreated_by_size_is_not_trusted(nbdq: StartNbdq) -> None:
    srv = nbdq()
    images = list(srv.images)
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    assert srv.stop() == 0
    os.unlink(images[1])  # the disk behind child1 is gone

    srv.children = []
    line = refused(srv)
    assert "no such file" in line

    srv.extra = ["--size", str(SIZE)]  # what the error message suggests
    proc = srv.launch()
    wait_until(lambda: proc.poll() is not None or "serving " in srv.log(), 30,
               "the server to serve or exit")
    if proc.poll() is not None:  # refusing is a fix too, if it names a safe way out
        srv.returncode = proc.returncode
        assert "--size" not in srv.log() and "--reset-state" in srv.log(), srv.log()
        return
    q = srv.qmp()
    # a blank child may vote only once it holds the data: resynced first
    wait_until(lambda: q.state("child1") == "active", 20, "child1 to be active")
    qemu_io(srv.uri, "read -P 0x11 0 16M")
    assert srv.stop() == 0
    same_files(images)
