"""Scrub: md's check and repair, ZFS's scrub, over QMP on a live export.

x-quorum-scrub reads every region of every active child, votes, and reports per child
the regions and bytes where it lost (QUORUM_SCRUB_DONE, query-quorum-status's
``last-scrub``, ``ctl status``); with ``repair`` it rewrites the losers.  A check
changes nothing on disk.  It yields to client I/O and never makes a client fail.
"""

from __future__ import annotations

import json

import pytest

from .qmp_fixtures import ctl
from .repair_fixtures import (
    QUORUM,
    SIZE,
    KiB,
    MiB,
    StartNbdq,
    corrupt,
    fio_randwrite,
    fio_result,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
    same_files,
    sha256,
)

pytestmark = pytest.mark.timeout(120)

# two damaged places on child2, in different 1 MiB regions: a whole 4 KiB block, and
# 300 bytes inside one sector
DAMAGE = [(3 * MiB + 4 * KiB, 4 * KiB, 0x00), (10 * MiB + 100, 300, 0xEE)]


def test_scrub_check_then_repair(nbdq: StartNbdq) -> None:
    srv = nbdq()
    qemu_io(srv.uri, "write -P 0x61 0 16M", "flush")
    q = srv.qmp()
    for off, n, byte in DAMAGE:
        corrupt(srv.images[2], off, n, byte)
    before = [sha256(p) for p in srv.images]
    assert before[0] == before[1] != before[2]

    # check: counts, changes nothing
    mark = q.mark()
    q.cmd("x-quorum-scrub")
    done = q.wait_event("QUORUM_SCRUB_DONE", 30, since=mark)["data"]
    assert done["node-name"] == QUORUM
    assert done["repair"] is False and done["cancelled"] is False
    assert done["mismatched-regions"] == {"child2": 2}
    # the differing bytes, per region rounded to the 512-byte span that differs
    assert 4 * KiB + 300 <= done["mismatched-bytes"]["child2"] <= 4 * KiB + 512
    assert set(done["mismatched-bytes"]) == {"child2"}
    assert done["unrecoverable-regions"] == 0
    assert done["scanned"] == SIZE
    completed = q.wait_event("BLOCK_JOB_COMPLETED", 10, since=mark, device="scrub-quorum0")
    assert completed["data"]["type"] == "scrub" and "error" not in completed["data"]
    assert [sha256(p) for p in srv.images] == before, "a check scrub changed the files"
    bad = q.select("QUORUM_REPORT_BAD", mark, node_name="child2")
    assert bad and all("error" not in e["data"] for e in bad)  # a mismatch, not an error
    st = q.status()
    assert st["last-scrub"]["mismatched-regions"] == {"child2": 2}
    assert st["last-scrub"]["repair"] is False
    by_name = {c["node-name"]: c for c in st["children"]}
    assert by_name["child2"]["checksum-errors"] == 2
    assert by_name["child0"]["checksum-errors"] == by_name["child1"]["checksum-errors"] == 0
    assert by_name["child2"]["repaired-bytes"] == 0
    text = ctl(srv.control, "status")
    assert text.returncode == 0, text.stderr
    scrub_line = next(line for line in text.stdout.splitlines() if "last scrub" in line)
    assert "child2" in scrub_line, scrub_line

    # repair: the minority is rewritten on disk
    mark = q.mark()
    q.cmd("x-quorum-scrub", repair=True)
    done = q.wait_event("QUORUM_SCRUB_DONE", 30, since=mark)["data"]
    assert done["repair"] is True
    assert done["mismatched-regions"] == {"child2": 2}
    same_files(srv.images)
    assert sha256(srv.images[2]) == before[0]
    assert q.child("child2")["repaired-bytes"] >= 4 * KiB + 300

    # a new check finds nothing
    mark = q.mark()
    q.cmd("x-quorum-scrub", job_id="recheck")
    done = q.wait_event("QUORUM_SCRUB_DONE", 30, since=mark)["data"]
    assert done["mismatched-regions"] == {} and done["unrecoverable-regions"] == 0
    q.wait_event("BLOCK_JOB_COMPLETED", 10, since=mark, device="recheck")
    assert q.status()["last-scrub"]["mismatched-regions"] == {}
    status = json.loads(ctl(srv.control, "status", "--json").stdout)
    assert status[0]["last-scrub"]["repair"] is False
    assert not q.select("QUORUM_FAILURE")
    qemu_io(srv.uri, "read -P 0x61 0 16M")


def test_scrub_repair_under_fio_does_not_fail_it(nbdq: StartNbdq) -> None:
    """A repairing scrub while fio writes and verifies: no error, no false mismatch."""
    srv = nbdq()
    qemu_io(srv.uri, "write -P 0x5c 0 16M", "flush")  # all-zero regions would be skipped
    q = srv.qmp()
    fio = fio_randwrite(srv.uri, srv.work, SIZE, "--loops=3")
    try:
        q.cmd("x-quorum-scrub", repair=True)
        during = []
        while fio.poll() is None:
            job = q.job("scrub-quorum0")
            if job is not None:
                during.append(job["current-progress"])
    finally:
        result = fio_result(fio)
    assert result["write"]["total_ios"] == 3 * SIZE // 4096
    assert during and max(during) > 0, f"the scrub made no progress while fio ran: {during}"
    done = q.wait_event("QUORUM_SCRUB_DONE", 60)["data"]
    # the range lock keeps the scrub from voting on a half-written range
    assert done["mismatched-regions"] == {} and done["unrecoverable-regions"] == 0
    assert done["scanned"] == SIZE and done["cancelled"] is False
    assert not q.select("QUORUM_FAILURE")
    assert not q.select("QUORUM_REPORT_BAD")
    assert srv.stop() == 0
    same_files(srv.images)


def test_scrub_counts_a_region_without_quorum_as_unrecoverable(nbdq: StartNbdq) -> None:
    """Three versions of one region: reported, never "repaired" with a guess."""
    srv = nbdq()
    qemu_io(srv.uri, "write -P 0x61 0 16M", "flush")
    q = srv.qmp()
    corrupt(srv.images[1], 7 * MiB, 4 * KiB, 0x01)
    corrupt(srv.images[2], 7 * MiB, 4 * KiB, 0x02)
    before = [sha256(p) for p in srv.images]
    mark = q.mark()
    q.cmd("x-quorum-scrub", repair=True)
    done = q.wait_event("QUORUM_SCRUB_DONE", 30, since=mark)["data"]
    assert done["unrecoverable-regions"] == 1
    assert done["mismatched-regions"] == {}
    failure = q.wait_event("QUORUM_FAILURE", 5, since=mark)["data"]
    assert failure["reference"] == QUORUM and failure["sector-num"] == 7 * MiB // 512
    assert [sha256(p) for p in srv.images] == before  # nothing rewritten
    assert q.status()["last-scrub"]["unrecoverable-regions"] == 1


def test_scrub_cancel_reports_a_partial_result(nbdq: StartNbdq) -> None:
    srv = nbdq()
    qemu_io(srv.uri, "write -P 0x5c 0 16M", "flush")  # all-zero regions would be skipped
    q = srv.qmp()
    q.cmd("x-quorum-scrub", speed=2 * MiB)  # 16 MiB would take 8 s
    q.wait_event("JOB_STATUS_CHANGE", 5, id="scrub-quorum0", status="running")
    q.cmd("job-cancel", id="scrub-quorum0")
    done = q.wait_event("QUORUM_SCRUB_DONE", 10)["data"]
    assert done["cancelled"] is True and done["scanned"] < SIZE
    cancelled = q.wait_event("BLOCK_JOB_CANCELLED", 5, device="scrub-quorum0")["data"]
    assert cancelled["type"] == "scrub" and cancelled["speed"] == 2 * MiB
    assert q.status()["last-scrub"]["cancelled"] is True
    assert q.cmd("query-jobs") == []
