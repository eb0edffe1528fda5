"""Bulk and concurrent traffic: nbdcopy in and out, and 256 in-flight libnbd requests."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    IMAGE_SIZE,
    MiB,
    Server,
    StartServer,
    assert_identical,
    output,
    read_at,
    require,
    require_libnbd,
    run,
    sha256_file,
)

pytestmark = pytest.mark.timeout(120)


def random_image(path: Path, size: int, seed: int) -> Path:
    """Random data with zero runs, so nbdcopy's sparse and zero paths are used too."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for _ in range(8):
        start = rng.randrange(0, size - MiB)
        length = rng.choice([512, 4096, 65536, MiB])
        data[start : start + length] = bytes(length)
    path.write_bytes(data)
    return path


def test_nbdcopy_in_and_out(server: Server, tmp_path: Path) -> None:
    nbdcopy = require("nbdcopy")
    source = random_image(tmp_path / "source.img", IMAGE_SIZE, seed=1)
    proc = run([nbdcopy, "--flush", source, server.uri()], timeout=60)
    assert proc.returncode == 0, output(proc)

    back = tmp_path / "back.img"
    proc = run([nbdcopy, server.uri(), back], timeout=60)
    assert proc.returncode == 0, output(proc)
    assert sha256_file(back) == sha256_file(source)
    for image in server.images:
        assert sha256_file(image) == sha256_file(source), f"{image.name} differs"


def test_nbdcopy_multiple_connections(server: Server, tmp_path: Path) -> None:
    """multi-conn: 4 connections write disjoint parts of the same export."""
    nbdcopy = require("nbdcopy")
    source = random_image(tmp_path / "source.img", IMAGE_SIZE, seed=2)
    proc = run(
        [nbdcopy, "--connections=4", "--requests=16", "--flush", source, server.uri()], timeout=60
    )
    assert proc.returncode == 0, output(proc)
    proc = run([nbdcopy, "--connections=4", server.uri(), tmp_path / "back.img"], timeout=60)
    assert proc.returncode == 0, output(proc)
    assert sha256_file(tmp_path / "back.img") == sha256_file(source)
    assert_identical(server.images)


class Inflight:
    """Issue libnbd aio commands and wait for all of them; any failure is recorded."""

    def __init__(self, h: Any, nbd: Any) -> None:
        self.h = h
        self.nbd = nbd
        self.errors: list[str] = []
        self.done = 0

    def _completion(self, what: str) -> Any:
        def cb(error: Any) -> int:
            self.done += 1
            # error is a list holding the errno of the command, 0 on success
            value = error.value if hasattr(error, "value") else error
            if value:
                self.errors.append(f"{what}: errno {value}")
            return 1  # auto-retire the command

        return cb

    def pwrite(self, data: bytes, offset: int) -> None:
        buf = self.nbd.Buffer.from_bytearray(bytearray(data))
        self.h.aio_pwrite(buf, offset, completion=self._completion(f"write {offset}+{len(data)}"))

    def pread(self, length: int, offset: int) -> Any:
        buf = self.nbd.Buffer(length)
        self.h.aio_pread(buf, offset, completion=self._completion(f"read {offset}+{length}"))
        return buf

    def wait(self, count: int) -> None:
        while self.h.aio_in_flight() > 0:
            self.h.poll(-1)
        assert not self.errors, self.errors
        assert self.done == count


def layout(rng: random.Random, count: int, limit: int) -> list[tuple[int, int]]:
    """``count`` disjoint (offset, length) extents below ``limit``, sizes 512 B..1 MiB."""
    sizes = [MiB] * 4 + [
        rng.choice([512, 1000, 4096, 16384, 65536, 100_000]) for _ in range(count - 4)
    ]
    assert sum(sizes) <= limit
    gaps = limit - sum(sizes)
    cuts = sorted(rng.randrange(0, gaps + 1) for _ in range(count))
    extents, pos, prev = [], 0, 0
    for size, cut in zip(sizes, cuts, strict=True):
        pos += cut - prev
        prev = cut
        extents.append((pos, size))
        pos += size
    rng.shuffle(extents)
    return extents


@pytest.mark.timeout(180)
def test_256_concurrent_aio_requests(server: Server) -> None:
    nbd = require_libnbd()
    rng = random.Random(256)
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        # A region written up front, then read back concurrently with the writes below.
        pre_off, pre_len = 12 * MiB, 2 * MiB
        pre = rng.randbytes(pre_len)
        h.pwrite(pre, pre_off)

        # Phase 1: 256 requests in flight at once: 176 writes to disjoint extents of
        # [0, 10 MiB), 48 reads of the pre-written region, 32 overlapping writes into a
        # hot spot at [10 MiB, 10 MiB + 256 KiB).
        io = Inflight(h, nbd)
        extents = layout(rng, 176, 10 * MiB)
        payload = {ext: rng.randbytes(ext[1]) for ext in extents}
        reads = []
        hot = 10 * MiB
        jobs: list[Any] = [("w", ext) for ext in extents]
        jobs += [("r", None)] * 48
        jobs += [("h", None)] * 32
        rng.shuffle(jobs)
        for kind, ext in jobs:
            if kind == "w":
                io.pwrite(payload[ext], ext[0])
            elif kind == "r":
                off = pre_off + rng.randrange(0, pre_len - 65536)
                length = rng.randrange(1, 65536)
                reads.append((off, length, io.pread(length, off)))
            else:
                off = hot + rng.randrange(0, 192 * 1024)
                io.pwrite(bytes([rng.randrange(1, 256)]) * rng.randrange(512, 64 * 1024), off)
        assert h.aio_in_flight() > 1, "requests were not in flight together"
        io.wait(256)
        for off, length, buf in reads:
            assert buf.to_bytearray() == pre[off - pre_off : off - pre_off + length]

        # Phase 2: read every extent back, 176 reads in flight together.
        io = Inflight(h, nbd)
        bufs = [(ext, io.pread(ext[1], ext[0])) for ext in extents]
        io.wait(len(extents))
        bad = [ext for ext, buf in bufs if bytes(buf.to_bytearray()) != payload[ext]]
        assert not bad, f"{len(bad)} extents read back wrong, e.g. {bad[:3]}"

        # The overlapping writes had no defined order: overwrite the hot spot with one
        # acknowledged write and check only that.
        final = rng.randbytes(256 * 1024)
        h.pwrite(final, hot)
        assert h.pread(len(final), hot) == final
        h.flush()
    finally:
        h.shutdown()

    assert_identical(server.images)
    image = server.images[0].read_bytes()
    for (off, length), data in payload.items():
        assert image[off : off + length] == data, f"child0 wrong at {off}+{length}"
    assert image[hot : hot + len(final)] == final
    assert (
        hashlib.sha256(image[pre_off : pre_off + pre_len]).digest() == hashlib.sha256(pre).digest()
    )


@pytest.mark.timeout(120)
def test_overlapping_concurrent_writes_land_in_the_same_order_on_every_child(
    start_server: StartServer,
) -> None:
    """nbdquorum's range lock orders overlapping writes the same way on every child, so
    the children stay identical without any later overwrite (QEMU gives no such promise)."""
    nbd = require_libnbd()
    server = start_server("nbdquorum")
    rng = random.Random(4242)
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        for _round in range(4):
            io = Inflight(h, nbd)
            for _ in range(256):
                offset = rng.randrange(0, MiB - 512) // 512 * 512 + rng.choice([0, 0, 1, 511])
                length = min(rng.choice([512, 4096, 65536, 262_144]), MiB - offset)
                io.pwrite(rng.randbytes(length), 4 * MiB + offset)
            io.wait(256)
        h.flush()
        seen = bytes(h.pread(MiB, 4 * MiB))
    finally:
        h.shutdown()
    assert_identical(server.images)
    assert read_at(server.images[0], 4 * MiB, MiB) == seen
