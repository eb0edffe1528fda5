"""Faulty children: failures are counted, outvoted, faulted, and repaired.

``serve --fault-injection`` puts a ``faulty`` node (nbdquorum's blkdebug) named as each
child over ``NAME-raw``; x-faulty-set switches its rules live.  While the quorum holds,
no client request fails: a child whose read fails or returns other bytes is outvoted
and reported (QUORUM_REPORT_BAD, counters in query-quorum-status); past --max-errors
it is ``faulted`` and gets no I/O; a child that misses a write resyncs; a child that
stops answering is given up after --child-timeout.  A deleted or truncated image,
which I/O alone cannot see, is found by the health check.  And a real failing disk:
nbdkit's error filter, exported as a file by nbdfuse, as one child.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import require_libnbd
from .qmp_fixtures import missing
from .repair_fixtures import (
    QUORUM,
    REGION,
    SIZE,
    KiB,
    MiB,
    Qmp,
    StartNbdq,
    fio_randwrite,
    fio_result,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
    require,
    require_fuse,
    same_files,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

EIO_TEXT = os.strerror(errno.EIO)  # "Input/output error"
ETIMEDOUT_TEXT = os.strerror(errno.ETIMEDOUT)  # "Connection timed out"
FAULTY = ["--fault-injection"]


def counters(q: Qmp, name: str) -> tuple[int, int]:
    c = q.child(name)
    return int(c["reads"]), int(c["writes"])


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# --------------------------------------------------------------------------- reads


def test_read_errors_are_outvoted_counted_then_faulted(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=[*FAULTY, "--max-errors", "3"])
    qemu_io(srv.uri, "write -P 0x41 0 16M", "flush")
    q = srv.qmp()
    q.faulty("child1", {"op": "read", "action": "error", "errno": errno.EIO})

    qemu_io(srv.uri, "read -P 0x41 0 64k")
    bad = q.wait_event("QUORUM_REPORT_BAD", 5, node_name="child1")["data"]
    assert bad == {"node-name": "child1", "type": "read", "error": EIO_TEXT,
                   "sector-num": 0, "sectors-count": 128}
    c1 = q.child("child1")
    assert (c1["state"], c1["read-errors"], c1["errors"]) == ("active", 1, 1)
    assert q.child("child0")["read-errors"] == 0

    # two more failed reads reach --max-errors 3: faulted, with an event
    qemu_io(srv.uri, "read -P 0x41 1M 64k", "read -P 0x41 2M 64k")
    ev = q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child1", state="faulted")
    assert ev["data"] == {"node-name": "child1", "child": "children.1", "parent": QUORUM,
                          "state": "faulted", "previous": "active"}
    c1 = q.child("child1")
    assert (c1["state"], c1["read-errors"], c1["errors"]) == ("faulted", 3, 3)

    # a faulted child gets no I/O at all: its counters stop, its file is not written
    frozen = counters(q, "child1")
    before = counters(q, "child0")
    qemu_io(srv.uri, "read -P 0x41 4M 1M", "write -P 0x42 5M 1M", "read -P 0x42 5M 1M",
            "flush")
    assert counters(q, "child1") == frozen
    after = counters(q, "child0")
    assert after[0] > before[0] and after[1] > before[1]
    assert read_file(srv.images[1], 5 * MiB, 4096) == b"\x41" * 4096
    assert read_file(srv.images[0], 5 * MiB, 4096) == b"\x42" * 4096
    assert not q.select("QUORUM_FAILURE")


def test_flipped_reads_are_outvoted(nbdq: StartNbdq) -> None:
    """``flip`` on reads: the child returns other bytes; the vote wins, no error."""
    srv = nbdq(extra=[*FAULTY, "--max-errors", "1"])
    qemu_io(srv.uri, "write -P 0x5c 0 1M", "flush")
    q = srv.qmp()
    q.faulty("child1", {"op": "read", "action": "flip", "offset": 64 * KiB, "length": 4 * KiB})
    qemu_io(srv.uri, "read -P 0x5c 0 1M")
    bad = q.wait_event("QUORUM_REPORT_BAD", 5, node_name="child1")["data"]
    # a content mismatch: no error member, the span where child1 differs
    assert bad == {"node-name": "child1", "type": "read", "sector-num": 128,
                   "sectors-count": 8}
    c1 = q.child("child1")
    assert (c1["checksum-errors"], c1["read-errors"], c1["state"]) == (1, 0, "active")
    assert read_file(srv.images[1], 64 * KiB, 4 * KiB) == b"\x5c" * 4096  # reads only
    assert not q.select("QUORUM_FAILURE")


def test_hung_child_times_out_and_reads_succeed(nbdq: StartNbdq) -> None:
    """``hang`` with --child-timeout 1: the two others decide the vote, so the read is
    answered without waiting; the hung child is reported when its timeout expires."""
    timeout = 1.0
    srv = nbdq(extra=[*FAULTY, "--child-timeout", str(timeout)])
    qemu_io(srv.uri, "write -P 0x6d 0 1M", "flush")
    q = srv.qmp()
    q.faulty("child2", {"op": "read", "action": "hang"})
    t0 = time.monotonic()
    qemu_io(srv.uri, "read -P 0x6d 0 64k")
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + 4, f"the read took {elapsed:.2f}s"
    bad = q.wait_event("QUORUM_REPORT_BAD", timeout + 5, node_name="child2")["data"]
    assert time.monotonic() - t0 >= timeout * 0.9, "reported only once its timeout expired"
    assert bad["error"] == ETIMEDOUT_TEXT and bad["type"] == "read"
    assert q.child("child2")["read-errors"] == 1
    # healing releases the hang; reads are fast again
    q.faulty("child2")
    t0 = time.monotonic()
    qemu_io(srv.uri, "read -P 0x6d 0 64k")
    assert time.monotonic() - t0 < timeout
    assert not q.select("QUORUM_FAILURE")


# --------------------------------------------------------------------------- writes


def test_missed_write_resyncs_the_child_back(nbdq: StartNbdq) -> None:
    """One failed write (a rule with count 1): resyncing, the region is copied, active."""
    srv = nbdq(extra=FAULTY)
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    q = srv.qmp()
    q.faulty("child2", {"op": "write", "action": "error", "count": 1})
    qemu_io(srv.uri, "write -P 0x22 6M 64k")  # the client sees success
    bad = q.wait_event("QUORUM_REPORT_BAD", 5, node_name="child2")["data"]
    assert bad["type"] == "write" and bad["error"] == EIO_TEXT
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child2", state="resyncing",
                 previous="active")
    done = q.wait_event("BLOCK_JOB_COMPLETED", 10, device="resync-child2")["data"]
    assert "error" not in done and done["len"] == REGION  # only the missed region
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child2", state="active",
                 previous="resyncing")
    c2 = q.child("child2")
    assert (c2["state"], c2["write-errors"], c2["unsynced-bytes"]) == ("active", 1, 0)
    qemu_io(srv.uri, "read -P 0x22 6M 64k", "read -P 0x11 0 6M")
    assert srv.stop() == 0
    same_files(srv.images)


def test_write_error_child_resyncs_after_the_rule_is_cleared(nbdq: StartNbdq) -> None:
    """A persistent write error: the child stays resyncing (never read) while its resync
    fails, and comes back by itself once the disk works again (retries with backoff)."""
    srv = nbdq(extra=FAULTY)
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    q = srv.qmp()
    q.faulty("child2", {"op": "write", "action": "error"})
    qemu_io(srv.uri, "write -P 0x33 2M 64k", "read -P 0x33 2M 64k")
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child2", state="resyncing")
    # the resync cannot write either: the job ends with the child's error
    failed = q.wait_event("BLOCK_JOB_COMPLETED", 10, device="resync-child2")["data"]
    assert EIO_TEXT in failed.get("error", ""), failed
    c2 = q.child("child2")
    assert (c2["state"], c2["unsynced-bytes"]) == ("resyncing", REGION)
    assert c2["resync-failures"] >= 1 and EIO_TEXT in c2["resync-error"], c2
    reads = c2["reads"]
    qemu_io(srv.uri, "read -P 0x33 2M 64k")
    assert q.child("child2")["reads"] == reads  # a resyncing child is never read
    assert read_file(srv.images[2], 2 * MiB, 4096) == b"\x11" * 4096  # it missed it

    # the disk is healed: a retry of the resync brings it back, no operator needed
    q.faulty("child2")
    wait_until(lambda: q.state("child2") == "active", 15, "child2 to be active again")
    done = q.select("BLOCK_JOB_COMPLETED", device="resync-child2")[-1]["data"]
    assert "error" not in done and done["len"] == REGION
    c2 = q.child("child2")
    assert (c2["unsynced-bytes"], c2["resync-failures"]) == (0, 0)
    assert "resync-error" not in c2
    assert not q.select("QUORUM_FAILURE")
    assert srv.stop() == 0
    same_files(srv.images)


# --------------------------------------------------------------------------- faulted


def fault_child1(q: Qmp, uri: str) -> None:
    """Fail child1's reads until it is faulted (--max-errors 3), then heal the rule."""
    q.faulty("child1", {"op": "read", "action": "error"})
    qemu_io(uri, "read -P 0x41 0 4k", "read -P 0x41 1M 4k", "read -P 0x41 2M 4k")
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, node_name="child1", state="faulted")
    q.faulty("child1")


def test_full_resync_brings_a_faulted_child_back(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=[*FAULTY, "--max-errors", "3"])
    qemu_io(srv.uri, "write -P 0x41 0 16M", "flush")
    q = srv.qmp()
    fault_child1(q, srv.uri)
    qemu_io(srv.uri, "write -P 0x99 8M 2M", "flush")  # child1 misses this
    assert read_file(srv.images[1], 8 * MiB, 4096) == b"\x41" * 4096

    mark = q.mark()
    q.cmd("x-quorum-resync", node_name="child1", full=True)
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, since=mark, node_name="child1",
                 state="resyncing", previous="faulted")
    done = q.wait_event("BLOCK_JOB_COMPLETED", 20, since=mark, device="resync-child1")["data"]
    assert done["len"] == SIZE and done["offset"] == SIZE and "error" not in done
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 5, since=mark, node_name="child1",
                 state="active", previous="resyncing")
    qemu_io(srv.uri, "read -P 0x99 8M 2M")
    reads = q.child("child1")["reads"]
    qemu_io(srv.uri, "read -P 0x41 0 1M")
    assert q.child("child1")["reads"] > reads  # it votes again
    assert srv.stop() == 0
    same_files(srv.images)


def test_repaired_child_starts_a_fresh_error_count(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=[*FAULTY, "--max-errors", "3"])
    qemu_io(srv.uri, "write -P 0x41 0 16M", "flush")
    q = srv.qmp()
    fault_child1(q, srv.uri)
    mark = q.mark()
    q.cmd("x-quorum-resync", node_name="child1", full=True)
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 20, since=mark, node_name="child1",
                 state="active")
    # one transient error after the repair: far below --max-errors 3
    q.faulty("child1", {"op": "read", "action": "error", "count": 1})
    qemu_io(srv.uri, "read -P 0x41 4M 4k")
    c1 = q.child("child1")
    assert c1["state"] == "active", f"one error faulted the repaired child again: {c1}"


def test_resync_request_never_takes_the_quorum_below_threshold(nbdq: StartNbdq) -> None:
    from qemu.qmp import ExecuteError

    srv = nbdq(extra=[*FAULTY, "--max-errors", "3"])
    qemu_io(srv.uri, "write -P 0x41 0 16M", "flush")
    q = srv.qmp()
    try:
        fault_child1(q, srv.uri)  # child0 and child2 are the two voters left
        mark = q.mark()
        with contextlib.suppress(ExecuteError):  # refusing it is the obvious fix
            q.cmd("x-quorum-resync", node_name="child0")
        # whatever the server answered, clients must keep working
        proc = qemu_io(srv.uri, "write -P 0x42 0 64k", "read -P 0x42 0 64k", check=False)
        assert proc.returncode == 0 and "failed" not in proc.stdout + proc.stderr, (
            proc.stdout + proc.stderr)
        assert not q.select("QUORUM_FAILURE", mark)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-2000:]


# --------------------------------------------------------------------------- health


def test_deleted_image_is_faulted_by_the_health_check(nbdq: StartNbdq) -> None:
    nbd = require_libnbd()
    srv = nbdq(extra=["--health-interval", "0.2"])
    qemu_io(srv.uri, "write -P 0x17 0 16M", "flush")
    q = srv.qmp()
    h = nbd.NBD()  # one connection, open across the failure
    h.connect_uri(srv.uri)
    assert h.pread(4096, 0) == b"\x17" * 4096
    t0 = time.monotonic()
    os.unlink(srv.images[1])
    ev = q.wait_event("QUORUM_CHILD_STATE_CHANGE", 3, node_name="child1", state="faulted")
    assert ev["data"]["previous"] == "active"
    detected = time.monotonic() - t0
    bad = q.wait_event("QUORUM_REPORT_BAD", 3, node_name="child1")["data"]
    assert bad["error"] == EIO_TEXT
    assert "was deleted" in srv.log()
    # clients keep working on the two remaining children, the open connection too
    h.pwrite(b"\x18" * MiB, MiB)
    h.flush()
    assert h.pread(MiB, MiB) == b"\x18" * MiB
    h.shutdown()
    qemu_io(srv.uri, "read -P 0x17 0 1M", "read -P 0x18 1M 1M", "read -P 0x17 2M 14M")
    assert q.child("child1")["state"] == "faulted"
    assert not q.select("QUORUM_FAILURE")
    assert detected < 3
    assert srv.stop() == 0
    same_files([srv.images[0], srv.images[2]])


def test_truncated_image_is_faulted_by_the_health_check(nbdq: StartNbdq) -> None:
    srv = nbdq(extra=["--health-interval", "0.2"])
    qemu_io(srv.uri, "write -P 0x17 0 16M", "flush")
    q = srv.qmp()
    os.truncate(srv.images[2], SIZE // 2)
    q.wait_event("QUORUM_CHILD_STATE_CHANGE", 3, node_name="child2", state="faulted",
                 previous="active")
    assert "changed size" in srv.log()
    # the truncated half would read short (or as zeros): it is no longer asked
    qemu_io(srv.uri, "read -P 0x17 8M 8M", "write -P 0x19 12M 1M", "read -P 0x19 12M 1M")
    assert os.path.getsize(srv.images[2]) == SIZE // 2  # no I/O went to it
    assert not q.select("QUORUM_FAILURE")


def test_faults_under_fio_never_fail_a_request(nbdq: StartNbdq) -> None:
    """fio writes and verifies while child1's reads fail and child2's reads flip."""
    srv = nbdq(extra=[*FAULTY, "--max-errors", "0"])  # never fault: keep voting
    q = srv.qmp()
    q.faulty("child1", {"op": "read", "action": "error"})
    fio = fio_randwrite(srv.uri, srv.work, SIZE)
    try:
        wait_until(lambda: fio.poll() is not None or q.child("child1")["read-errors"] > 0,
                   30, "fio's verify reads")
        q.faulty("child1")
        q.faulty("child2", {"op": "read", "action": "flip", "length": SIZE // 2})
    finally:
        result = fio_result(fio)
    assert result["read"]["total_ios"] > 0
    by_name = {c["node-name"]: c for c in q.children()}
    assert by_name["child1"]["read-errors"] > 0
    assert all(c["state"] == "active" for c in by_name.values())
    assert not q.select("QUORUM_FAILURE")
    assert srv.stop() == 0
    same_files(srv.images)  # read faults never touched the stored data


# --------------------------------------------------------------------------- nbdkit


def test_nbdkit_error_filter_child_through_nbdfuse(nbdq: StartNbdq, tmp_path: Path) -> None:
    """A real failing disk: nbdkit's error filter, as a file through nbdfuse, as child1."""
    require_fuse()
    require("qemu-io")
    work = tmp_path / "fuse"
    work.mkdir()
    data = bytes([0x4E]) * SIZE
    images = [work / f"c{i}.raw" for i in range(3)]
    for img in images:
        img.write_bytes(data)  # written before the mount: nothing is in FUSE's page cache
    mnt = work / "mnt"
    mnt.mkdir()
    inject = work / "inject"
    fuse_log = work / "nbdfuse.log"
    with open(fuse_log, "wb") as log:
        fuse = subprocess.Popen(
            [require("nbdfuse"), str(mnt / "disk"), "--command", require("nbdkit"), "-s",
             "--exit-with-parent", "--filter=error", "file", str(images[1]),
             "error=EIO", "error-pread-rate=1", f"error-pread-file={inject}"],
            stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
    disk = mnt / "disk"
    try:
        def mounted() -> bool:
            if fuse.poll() is not None:
                missing(f"nbdfuse could not mount ({fuse.returncode}): {fuse_log.read_text()}")
            return disk.exists() and disk.stat().st_size == SIZE

        wait_until(mounted, 15, "nbdfuse to mount")
        srv = nbdq(images=[images[0], disk, images[2]], extra=["--max-errors", "0"])
        q = srv.qmp()
        assert q.child("child1")["filename"] == str(disk)
        qemu_io(srv.uri, "read -P 0x4e 0 1M")
        assert q.child("child1")["read-errors"] == 0

        inject.touch()  # the error filter is switched on: every pread fails
        qemu_io(srv.uri, "read -P 0x4e 8M 1M", "read -P 0x4e 12M 64k")
        bad = q.wait_event("QUORUM_REPORT_BAD", 5, node_name="child1")["data"]
        assert bad["error"] == EIO_TEXT and bad["type"] == "read"
        assert q.child("child1")["read-errors"] >= 2
        assert "injecting EIO error into pread" in fuse_log.read_text()

        inject.unlink()  # healed: reads of child1 work again
        errors = q.child("child1")["read-errors"]
        qemu_io(srv.uri, "read -P 0x4e 4M 1M")
        assert q.child("child1")["read-errors"] == errors
        # writes went through FUSE to nbdkit's file all along
        qemu_io(srv.uri, "write -P 0x4f 2M 64k", "flush")
        assert not q.select("QUORUM_FAILURE")
        assert srv.stop() == 0
    finally:
        subprocess.run([require("fusermount3"), "-u", str(mnt)], capture_output=True,
                       check=False)
        try:
            fuse.wait(15)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
    assert read_file(images[1], 2 * MiB, 64 * KiB) == b"\x4f" * 64 * KiB
    same_files(images)
