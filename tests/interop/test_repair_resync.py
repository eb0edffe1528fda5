"""Resync of an added child, driven over QMP with qemu.qmp and through NBD.

A child added live starts ``resyncing``: it receives every new write but is never
read and never votes until a background job (QEMU's job vocabulary: query-jobs,
job-pause/resume/cancel, block-job-set-speed, JOB_STATUS_CHANGE,
BLOCK_JOB_COMPLETED/CANCELLED) has copied the voted contents onto it.  Then it is
``active`` and byte-identical to the others.  ``ctl replace`` chains add, resync and
remove while clients keep working.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from .qmp_fixtures import ctl, nbdquorum_env
from .repair_fixtures import (
    QUORUM,
    REGION,
    SIZE,
    MiB,
    Qmp,
    StartNbdq,
    corrupt,
    fio_randwrite,
    fio_result,
    make_image,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
    require,
    run,
    same_files,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

SPEED = 4 * MiB  # a 16 MiB resync takes about 4 s


def job_samples(q: Qmp, job_id: str, until: float) -> list[dict[str, object]]:
    """query-jobs entries of ``job_id`` while it lives (at most ``until`` seconds)."""
    samples = []
    deadline = time.monotonic() + until
    while time.monotonic() < deadline:
        job = q.job(job_id)
        if job is None:
            break
        samples.append(job)
    return samples


def assert_completed_sequence(q: Qmp, job_id: str, since: int = 0) -> None:
    """JOB_STATUS_CHANGE of a job that ran to its end, in QEMU's order."""
    statuses = q.job_statuses(job_id, since)
    if statuses and statuses[0] == "created":  # QEMU emits it; nbdquorum starts at running
        statuses = statuses[1:]
    assert statuses[0] == "running", statuses
    assert statuses[-4:] == ["waiting", "pending", "concluded", "null"], statuses
    assert set(statuses[1:-4]) <= {"running", "paused"}, statuses


def test_added_child_resyncs_to_active_and_identical(nbdq: StartNbdq) -> None:
    """x-blockdev-child-add: resyncing, a job with progress, its events, then active."""
    srv = nbdq(extra=["--resync-speed", str(SPEED)])
    qemu_io(srv.uri, "write -P 0x5a 0 8M", "write -P 0xa5 8M 8M", "flush")
    q = srv.qmp()
    new = make_image(srv.work / "new.raw")
    started = time.monotonic()
    q.add_child("new", new)

    st = q.child("new")
    assert (st["child"], st["state"]) == ("children.3", "resyncing")
    assert 0 < st["unsynced-bytes"] <= SIZE
    # a resyncing child is never read: a client read goes to the active children only
    qemu_io(srv.uri, "read -P 0x5a 0 1M", "read -P 0xa5 15M 1M")
    assert q.child("new")["reads"] == 0

    samples = job_samples(q, "resync-new", 30)
    assert samples, "the resync job never showed in query-jobs"
    assert all(s["type"] == "resync" and s["total-progress"] == SIZE for s in samples)
    progress = [int(s["current-progress"]) for s in samples]  # type: ignore[call-overload]
    assert progress == sorted(progress), "current-progress went backwards"
    assert any(0 < p < SIZE for p in progress), f"no progress seen in between: {progress[:5]}"
    assert {s["status"] for s in samples} == {"running"}

    done = q.wait_event("BLOCK_JOB_COMPLETED", 30, device="resync-new")
    elapsed = time.monotonic() - started
    assert done["data"] == {"type": "resync", "device": "resync-new", "len": SIZE,
                            "offset": SIZE, "speed": SPEED}
    q.wait_event("JOB_STATUS_CHANGE", 10, id="resync-new", status="null")
    assert_completed_sequence(q, "resync-new")
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 10, node_name="new", state="active",
                 previous="resyncing", child="children.3", parent=QUORUM)
    # the rate limit held: 15 MiB after the first region at 4 MiB/s is ~3.75 s
    assert elapsed >= 0.6 * (SIZE - REGION) / SPEED, f"resync took only {elapsed:.2f}s"

    st = q.child("new")
    assert (st["state"], st["unsynced-bytes"]) == ("active", 0)
    assert q.cmd("query-jobs") == []
    # qemu-img agrees: the new child equals child0, and both equal the export
    for argv in ([str(new), str(srv.images[0])], [srv.uri, str(new)]):
        proc = run([require("qemu-img"), "compare", "-f", "raw", "-F", "raw", *argv])
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert srv.stop() == 0
    same_files([*srv.images, new])


def test_join_reports_child_state_change(nbdq: StartNbdq) -> None:
    srv = nbdq()
    q = srv.qmp()
    q.add_child("new", make_image(srv.work / "new.raw"))
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="new", state="active")
    joined = q.select("QUORUM_CHILD_STATE_CHANGE", node_name="new", state="resyncing")
    assert joined, "no QUORUM_CHILD_STATE_CHANGE {state: resyncing} when new joined"


def test_resync_under_fio_randwrite_verify(nbdq: StartNbdq) -> None:
    """fio writes and verifies while a rate-limited resync runs; nothing is lost."""
    size = SIZE
    srv = nbdq(size=size, extra=["--resync-speed", str(SPEED)])
    q = srv.qmp()
    qemu_io(srv.uri, "write -P 0x77 0 16M", "flush")  # something to copy everywhere
    new = make_image(srv.work / "new.raw", size)
    q.cmd("blockdev-add", driver="raw", node_name="new",
          file={"driver": "file", "filename": str(new)})
    q.cmd("x-blockdev-change", parent=QUORUM, node="new")
    job = q.job("resync-new")
    assert job is not None and job["status"] == "running", job

    fio = fio_randwrite(srv.uri, srv.work, size, "--loops=2")
    overlap = []  # (state, writes, job progress) while fio runs
    try:
        while fio.poll() is None:
            j = q.job("resync-new")
            c = q.child("new")
            overlap.append((c["state"], c["writes"], j["current-progress"] if j else None))
    finally:
        result = fio_result(fio)
    assert result["write"]["total_ios"] == 2 * size // 4096
    assert result["read"]["total_ios"] > 0  # the verify reads came through the quorum
    during = [o for o in overlap if o[0] == "resyncing" and o[1] > 0 and o[2] is not None]
    assert during, f"fio's writes never reached the child while it resynced: {overlap[:5]}"

    done = q.wait_event("BLOCK_JOB_COMPLETED", 30, device="resync-new")
    assert done["data"]["speed"] == SPEED and "error" not in done["data"]
    wait_until(lambda: q.state("new") == "active", 10, "new to be active")
    assert not q.select("QUORUM_FAILURE")
    assert srv.stop() == 0
    same_files([*srv.images, new])


def test_job_pause_resume_speed_cancel_continue(nbdq: StartNbdq) -> None:
    """Job control over QMP, on a slow resync: each verb has its visible effect."""
    speed = 2 * MiB  # 16 MiB would take 8 s
    srv = nbdq(extra=["--resync-speed", str(speed)])
    qemu_io(srv.uri, "write -P 0x3c 0 16M", "flush")
    q = srv.qmp()
    new = make_image(srv.work / "new.raw")
    q.add_child("new", new)
    jid = "resync-new"

    def progress() -> int:
        job = q.job(jid)
        assert job is not None, "the job ended too early"
        return int(job["current-progress"])

    wait_until(lambda: progress() >= REGION, 10, "the first region to be copied")

    # pause: the job stops at its next region boundary and progress stays put
    q.cmd("job-pause", id=jid)
    q.wait_event("JOB_STATUS_CHANGE", 5, id=jid, status="paused")
    assert q.job(jid)["status"] == "paused"  # type: ignore[index]
    at_pause = progress()
    # at 2 MiB/s a running job advances a region every 0.5 s; watch for 1.5 s
    polls = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        polls.append(progress())
        time.sleep(0.1)  # spacing of the observations, not a synchronization
    assert polls[-1] <= at_pause + REGION, (at_pause, polls)  # one region may finish
    settled = polls[len(polls) // 3:]
    assert len(set(settled)) == 1, f"progress moved while paused: {polls}"
    assert q.child("new")["state"] == "resyncing"

    # resume: it moves again
    mark = q.mark()
    q.cmd("job-resume", id=jid)
    q.wait_event("JOB_STATUS_CHANGE", 5, since=mark, id=jid, status="running")
    frozen = polls[-1]
    wait_until(lambda: progress() > frozen, 10, "progress after job-resume")
    assert q.error("job-resume", id=jid)[1] == (
        f"Job '{jid}' in state 'running' cannot accept command verb 'resume'")

    # block-job-set-speed, live: the cancel event reports the new limit
    q.cmd("block-job-set-speed", device=jid, speed=MiB)
    mark = q.mark()
    q.cmd("job-cancel", id=jid)
    cancelled = q.wait_event("BLOCK_JOB_CANCELLED", 10, since=mark, device=jid)
    assert cancelled["data"]["speed"] == MiB
    assert cancelled["data"]["type"] == "resync"
    assert 0 < cancelled["data"]["offset"] < SIZE
    q.wait_event("JOB_STATUS_CHANGE", 5, since=mark, id=jid, status="null")
    assert q.job_statuses(jid, mark)[-3:] == ["aborting", "concluded", "null"]
    assert not q.select("BLOCK_JOB_COMPLETED", mark, device=jid)

    # a cancelled resync leaves the child resyncing, with its progress kept
    st = q.child("new")
    assert st["state"] == "resyncing"
    left = int(st["unsynced-bytes"])
    assert 0 < left < SIZE
    assert SIZE - left >= int(cancelled["data"]["offset"]) - REGION
    assert q.cmd("query-jobs") == []

    # x-quorum-resync continues it (not from scratch); set-speed 0 lifts the limit
    mark = q.mark()
    q.cmd("x-quorum-resync", node_name="new", speed=MiB)
    job = q.job(jid)
    assert job is not None and job["total-progress"] == left, job
    lifted = time.monotonic()
    q.cmd("block-job-set-speed", device=jid, speed=0)
    done = q.wait_event("BLOCK_JOB_COMPLETED", 20, since=mark, device=jid)
    # at 1 MiB/s the rest would take >= left/1MiB seconds; unlimited it is quick
    assert time.monotonic() - lifted < max(2.0, 0.5 * left / MiB), "set-speed 0 had no effect"
    assert done["data"]["len"] == left and done["data"]["speed"] == 0
    assert "error" not in done["data"]
    wait_until(lambda: q.state("new") == "active", 5, "new to be active")
    assert srv.stop() == 0
    same_files([*srv.images, new])


def test_ctl_replace_under_qemu_io(nbdq: StartNbdq) -> None:
    """ctl replace OLD NAME=PATH: add, resync, remove OLD, while clients read and write."""
    srv = nbdq(extra=["--resync-speed", str(SPEED)])
    qemu_io(srv.uri, "write -P 0x21 0 16M", "flush")
    q = srv.qmp()
    fresh = make_image(srv.work / "fresh.raw")
    ctl = subprocess.Popen(
        [sys.executable, "-m", "nbdquorum", "ctl", "--control", str(srv.control), "replace",
         "child1", f"fresh={fresh}", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nbdquorum_env())
    rounds = 0
    saw_resyncing = False
    try:
        # clients keep working during the whole replace: each round writes a
        # region with a new pattern and reads it back (and reads elsewhere)
        while ctl.poll() is None or rounds < 2:
            pattern = 0x30 + rounds % 64
            off = (rounds % 16) * MiB
            qemu_io(srv.uri, f"write -P {pattern} {off} 256k", f"read -P {pattern} {off} 256k",
                    f"read -P 0x21 {off + 512 * 1024} 256k")
            rounds += 1
            names = [c["node-name"] for c in q.children()]
            if "fresh" in names and q.state("fresh") == "resyncing":
                saw_resyncing = True
        out, err = ctl.communicate(timeout=60)
    finally:
        if ctl.poll() is None:
            ctl.kill()
            ctl.wait()
    assert ctl.returncode == 0, err.decode()
    assert json.loads(out) == {"parent": QUORUM, "added": "fresh", "filename": str(fresh),
                               "removed": "child1"}
    assert saw_resyncing, "the replace finished before a client round saw the resync"
    assert rounds >= 3

    children = q.children()
    assert [(c["child"], c["node-name"], c["state"]) for c in children] == [
        ("children.0", "child0", "active"), ("children.2", "child2", "active"),
        ("children.3", "fresh", "active")]
    nodes = {n["node-name"] for n in q.cmd("query-named-block-nodes", flat=True)}
    assert "child1" not in nodes  # closed, not only detached
    q.wait_event("BLOCK_JOB_COMPLETED", 5, device="resync-fresh")
    assert not q.select("QUORUM_FAILURE")
    assert srv.stop() == 0
    same_files([srv.images[0], srv.images[2], fresh])


def test_ctl_replace_a_faulted_child(nbdq: StartNbdq) -> None:
    """The repair after a disk failure: the faulted child is swapped for a fresh image."""
    srv = nbdq(extra=["--fault-injection", "--max-errors", "1"])
    qemu_io(srv.uri, "write -P 0x44 0 16M", "flush")
    q = srv.qmp()
    q.faulty("child2", {"op": "any", "action": "error"})
    qemu_io(srv.uri, "read -P 0x44 0 4k")
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child2", state="faulted")
    qemu_io(srv.uri, "write -P 0x45 0 1M")  # child2 misses it
    fresh = make_image(srv.work / "fresh.raw")
    proc = ctl(srv.control, "replace", "child2", f"fresh={fresh}")
    assert proc.returncode == 0, proc.stderr
    assert [(c["node-name"], c["state"]) for c in q.children()] == [
        ("child0", "active"), ("child1", "active"), ("fresh", "active")]
    qemu_io(srv.uri, "read -P 0x45 0 1M", "read -P 0x44 1M 15M")
    assert srv.stop() == 0
    same_files([srv.images[0], srv.images[1], fresh])


def test_resync_copies_the_voted_contents(nbdq: StartNbdq) -> None:
    """The copy is the vote, not one child's bytes: a corrupted active child does not
    leak into the new one, nor does the new image's old garbage, and trims and
    write-zeroes racing the job land everywhere."""
    srv = nbdq(extra=["--resync-speed", str(SPEED)])
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    q = srv.qmp()
    corrupt(srv.images[0], 9 * MiB, 4096, 0xEE)  # child0 is outvoted there
    new = srv.work / "new.raw"
    new.write_bytes(b"\xab" * SIZE)  # a used disk, not a blank one
    q.add_child("new", new)
    assert q.state("new") == "resyncing"
    qemu_io(srv.uri, "discard 0 1M", "write -z 14M 1M", "write -z -u 13M 512k",
            "discard 12M 64k", "write -P 0x22 15M 4k")
    wait_until(lambda: q.state("new") == "active", 20, "new to be active")
    qemu_io(srv.uri, "read -P 0 0 1M", "read -P 0x11 9M 4k", "read -P 0 14M 1M",
            "read -P 0x22 15M 4k")
    assert srv.stop() == 0
    same_files([srv.images[1], srv.images[2], new])
    with open(srv.images[0], "rb") as f:
        f.seek(9 * MiB)
        assert f.read(4096) == b"\xee" * 4096  # the resync did not touch the loser


def test_ctl_replace_does_not_hang_when_the_resync_fails(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=["--fault-injection"])
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    q = srv.qmp()
    # one failed read on two of the three sources: the first copy finds no quorum
    q.faulty("child0", {"op": "read", "action": "error", "count": 1})
    q.faulty("child1", {"op": "read", "action": "error", "count": 1})
    fresh = make_image(srv.work / "fresh.raw")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdquorum", "ctl", "--control", str(srv.control), "replace",
         "child2", f"fresh={fresh}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nbdquorum_env())
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ctl replace still running 15 s later; jobs {q.cmd('query-jobs')}, "
                    f"fresh is {q.state('fresh')}; events "
                    f"{[e['data'] for e in q.select('BLOCK_JOB_COMPLETED')]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    names = [c["node-name"] for c in q.children()]
    if proc.returncode == 0:  # retried and finished: a fix too
        assert names == ["child0", "child1", "fresh"]
        assert q.state("fresh") == "active"
    else:  # or reported: the old child must still be there
        assert proc.returncode == 1 and err, err
        assert "child2" in names
