"""Deterministic crash recovery: kill -9 with a write half-way through the children.

With ``--fault-injection``, child2's writes ``hang`` (and ``--child-timeout`` is long),
so a client write reaches child0 and child1 and then waits for child2; the server is
killed with SIGKILL at exactly that point.  The children now differ in one region,
which the write-intent bitmap recorded as dirty before the write was sent.  The
restart (no rules any more) must say so, resolve the region by vote before it serves,
and leave three identical children.

qemu-storage-daemon, started on copies of the same three post-crash images, has no
such recovery: it outvotes child2 on every read, but the children stay different.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import StartServer
from .repair_fixtures import (
    REGION,
    SIZE,
    KiB,
    MiB,
    Nbdq,
    StartNbdq,
    corrupt,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
    require,
    same_files,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

OFFSET, LENGTH = 5 * MiB + 64 * KiB, 64 * KiB  # inside region 5
GRAIN = 4 * KiB  # crash recovery's vote grain


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def crash_mid_write(srv: Nbdq) -> None:
    """Write 0x77 at OFFSET while child2's writes hang; kill -9 once child0/1 have it."""
    intent = srv.work / "state" / "write-intent.bitmap"
    qemu_io(srv.uri, "write -P 0x11 0 16M", "flush")
    wait_until(lambda: intent.read_bytes() == bytes(SIZE // REGION // 8), 10,
               "the write-intent bitmap to be clean")
    q = srv.qmp()
    q.faulty("child2", {"op": "write", "action": "hang"})

    writer = subprocess.Popen(
        [require("qemu-io"), "-f", "raw", "-c", f"write -P 0x77 {OFFSET} {LENGTH}", srv.uri],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        new = b"\x77" * LENGTH

        def half_written() -> bool:
            return all(read_file(p, OFFSET, LENGTH) == new for p in srv.images[:2])

        wait_until(half_written, 10, "the write to reach child0 and child1")
        # durable before the write was sent: bit 5 of the on-disk bitmap
        assert intent.read_bytes()[:1] == bytes([1 << 5]), intent.read_bytes().hex()
        assert writer.poll() is None, "the write completed although child2 hangs"
        assert q.job("resync-child2") is None
        srv.kill9()
        out, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode != 0 or b"failed" in out  # never acknowledged
    assert read_file(srv.images[2], OFFSET, LENGTH) == b"\x11" * LENGTH  # diverged


def recovery_counts(log: str) -> tuple[int, int, int]:
    """(dirty regions, grains repaired, grains without quorum) from the start-up log."""
    m = re.search(r"crash recovery of quorum0: (\d+) dirty regions, (\d+) grains repaired, "
                  r"(\d+) without quorum", log)
    assert m, log
    assert log.index("crash recovery of quorum0") < log.index("serving ")  # before serving
    return int(m[1]), int(m[2]), int(m[3])


CRASH = ["--fault-injection", "--child-timeout", "60", "--intent-interval", "0.2"]


def test_kill_9_mid_write_then_recovery_by_vote(nbdq: StartNbdq, start_server: StartServer,
                                               tmp_path: Path) -> None:
    srv = nbdq(extra=CRASH)
    crash_mid_write(srv)
    new = b"\x77" * LENGTH
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    copies = [Path(shutil.copy(p, crashed / p.name)) for p in srv.images]

    # restart on the same state dir, the injector present but without rules
    srv.start()
    log = srv.log()
    assert "unclean stop detected: resolving 1 dirty regions before serving" in log, log
    assert recovery_counts(log) == (1, LENGTH // GRAIN, 0)
    same_files(srv.images)  # before any client has read anything
    # the version on a majority (threshold 2) won, the rest of the disk is untouched
    qemu_io(srv.uri, f"read -P 0x77 {OFFSET} {LENGTH}", f"read -P 0x11 0 {OFFSET}",
            f"read -P 0x11 {OFFSET + LENGTH} {SIZE - OFFSET - LENGTH}")
    q = srv.qmp()
    assert all(c["state"] == "active" for c in q.children())
    assert not q.select("QUORUM_REPORT_BAD")
    assert srv.stop() == 0
    assert srv.state_json()["clean"] is True

    # QEMU's quorum on the same post-crash images: reads are outvoted, never repaired
    qsd = start_server("qsd", images=copies)
    qemu_io(qsd.uri(), f"read -P 0x77 {OFFSET} {LENGTH}")
    events = qsd.final_events()
    assert [e["data"]["node-name"] for e in events if e["event"] == "QUORUM_REPORT_BAD"] == [
        "child2"]
    assert read_file(copies[0], OFFSET, LENGTH) == read_file(copies[1], OFFSET, LENGTH) == new
    assert read_file(copies[2], OFFSET, LENGTH) == b"\x11" * LENGTH, (
        "qemu-storage-daemon repaired child2; the documented difference no longer holds")


def test_crash_without_a_majority_takes_the_first_active_child(nbdq: StartNbdq) -> None:
    """Three versions of a grain (no quorum): the first active child's bytes, everywhere."""
    srv = nbdq(extra=CRASH)
    crash_mid_write(srv)
    # different writes in flight on different children: child0 0x99, child1 0x77,
    # child2 0x11 in the first grain of the dirty range
    corrupt(srv.images[0], OFFSET, GRAIN, 0x99)
    srv.start()
    assert recovery_counts(srv.log()) == (1, LENGTH // GRAIN + 1, 1)
    same_files(srv.images)
    assert read_file(srv.images[1], OFFSET, GRAIN) == b"\x99" * GRAIN
    qemu_io(srv.uri, f"read -P 0x99 {OFFSET} {GRAIN}",
            f"read -P 0x77 {OFFSET + GRAIN} {LENGTH - GRAIN}")


def test_kill_9_mid_resync_resumes_from_the_recorded_progress(nbdq: StartNbdq) -> None:
    """An unclean stop during a resync: the restart copies what the state dir says is
    left (the recorded unsynced regions plus the regions dirty in the write-intent
    bitmap), not everything, and ends with identical children."""
    srv = nbdq(extra=["--resync-speed", str(2 * MiB), "--intent-interval", "0.2"])
    qemu_io(srv.uri, "write -P 0x3a 0 16M", "flush")
    q = srv.qmp()
    n3 = srv.work / "n3.raw"
    with open(n3, "wb") as f:
        f.truncate(SIZE)
    q.add_child("n3", n3)

    def recorded_left() -> int:
        rec = {c["node-name"]: c for c in srv.state_json()["children"]}["n3"]
        return bin(int(rec["sync"], 16)).count("1") * REGION if rec["sync"] else SIZE

    wait_until(lambda: recorded_left() <= SIZE - 4 * REGION, 20,
               "the state dir to record resync progress")
    # writes while it resyncs: one to a region already copied, one still to copy
    qemu_io(srv.uri, "write -P 0x3b 0 64k", "write -P 0x3c 15M 64k")
    srv.kill9()
    # both bitmaps: bit i (region i) is bit i % 8 of byte i // 8
    rec = {c["node-name"]: c for c in srv.state_json()["children"]}["n3"]
    sync = int.from_bytes(bytes.fromhex(rec["sync"]), "little")
    intent = int.from_bytes((srv.work / "state" / "write-intent.bitmap").read_bytes(),
                            "little")
    expected = bin(sync | intent).count("1") * REGION
    assert expected < SIZE

    srv.children, srv.extra = [], []
    srv.start()
    assert "unclean stop detected" in srv.log()
    # the resync job logs its plan just after the socket accepts: wait for the line
    wait_until(lambda: "resync of n3:" in srv.log(), 10, "the resync to start")
    assert f"resync of n3: {expected} bytes to copy" in srv.log(), srv.log()[-3000:]
    q = srv.qmp()
    wait_until(lambda: q.state("n3") == "active", 20, "n3 to be active")
    qemu_io(srv.uri, "read -P 0x3b 0 64k", "read -P 0x3c 15M 64k")
    assert srv.stop() == 0
    same_files([*srv.images, n3])
