"""Thin images stay thin: replacing a child of big sparse images copies what is allocated.

A quorum of three sparse images of 4 TiB (or the biggest sparse file the test's file
system holds) with 1 MiB of data written by qemu-io; ``nbdquorum ctl replace`` onto a
new sparse image.  Copying the virtual size would take days here (and fill the disk),
so a replace that finishes within the test's timeout has skipped the zero ranges; the
new image then allocates about what the others do, reads the same bytes (through the
quorum with qemu-io, and in the image file itself), and a scrub finds nothing wrong,
but does find a corruption hidden in the others' holes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from .conftest import read_at
from .qmp_fixtures import ctl
from .repair_fixtures import (
    QUORUM,
    KiB,
    MiB,
    StartNbdq,
    corrupt,
    make_image,
    nbdq_fixture,  # noqa: F401  (the nbdq fixture)
    qemu_io,
)

pytestmark = pytest.mark.timeout(300)

TiB = 1 << 40
#: generous: the replace takes seconds when zero ranges are skipped, days when not
REPLACE_TIMEOUT = 150.0


def biggest_sparse(directory: Path) -> int:
    """4 TiB, or the biggest size (1 TiB, 256 GiB) of a sparse file ``directory`` holds."""
    probe = directory / "probe.raw"
    try:
        for size in (4 * TiB, TiB, 256 << 30):
            try:
                make_image(probe, size)
                return size
            except OSError:
                continue
        pytest.fail(f"{directory} cannot hold a sparse file of 256 GiB", pytrace=False)
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_replace_of_a_sparse_child_copies_only_the_data(nbdq: StartNbdq, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        ) -> None:
    size = biggest_sparse(tmp_path)
    with capsys.disabled():
        print(f"\n  sparse images of {size / TiB:g} TiB")
    srv = nbdq(size=size)
    # 1 MiB in all: region-aligned, inside one region, unaligned, at the very end
    writes = [(0, 256 * KiB, 0x11), (size // 3 // MiB * MiB + 64 * KiB, 256 * KiB, 0x22),
              (size // 2 + 12 * KiB, 4 * KiB, 0x33), (size - 508 * KiB, 508 * KiB, 0x44)]
    assert sum(n for _, n, _ in writes) == MiB
    qemu_io(srv.uri, *(f"write -P {p} {o} {n}" for o, n, p in writes), "flush")
    old = srv.images
    new = make_image(srv.work / "new.raw", size)

    proc = ctl(srv.control, "replace", "child2", f"child3={new}", "--wait-timeout",
               str(REPLACE_TIMEOUT), timeout=REPLACE_TIMEOUT + 30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "child3 in sync" in proc.stdout
    q = srv.qmp()
    assert [(c["node-name"], c["state"]) for c in q.children()] == [
        ("child0", "active"), ("child1", "active"), ("child3", "active")]

    # the copy allocates what the others do (they hold 1 MiB, and file system
    # metadata), not the zeroes of the virtual size
    others = max(allocated(p) for p in old[:2])
    assert MiB <= others < 2 * MiB
    assert allocated(new) <= 1.1 * others, (allocated(new), others)

    # the same bytes: through the quorum, and in the image files themselves
    reads = []
    for off, n, pattern in writes:
        reads += [f"read -P {pattern} {off} {n}", f"read -P 0 {off + n} 4k"]
        for path in (new, old[0]):
            assert read_at(path, off, n) == bytes([pattern]) * n, (path, off)
    qemu_io(srv.uri, *reads[:-1])  # (the last write ends at the end of the disk)
    for off, n, _ in writes:
        assert read_at(new, off, n + 4 * KiB) == read_at(old[0], off, n + 4 * KiB)

    # a scrub over the whole virtual size: nothing wrong ...
    mark = q.mark()
    q.cmd("x-quorum-scrub")
    done = q.wait_event("QUORUM_SCRUB_DONE", REPLACE_TIMEOUT, since=mark)["data"]
    assert done["node-name"] == QUORUM and done["cancelled"] is False
    assert done["mismatched-regions"] == {} and done["unrecoverable-regions"] == 0
    assert done["scanned"] == size

    # ... and a corruption where the other children have holes is read, voted, found
    hidden = size // 4 + 3 * MiB + 100
    corrupt(old[1], hidden, 100, 0xEE)
    mark = q.mark()
    q.cmd("x-quorum-scrub")
    done = q.wait_event("QUORUM_SCRUB_DONE", REPLACE_TIMEOUT, since=mark)["data"]
    assert done["mismatched-regions"] == {"child1": 1}
    assert done["mismatched-bytes"] == {"child1": 100}
    assert not q.select("QUORUM_FAILURE")
