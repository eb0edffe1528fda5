"""The writing thread (native Writer): small writes to local files beside the loop."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from nbdquorum.native import Inline, Writer


def _files(tmp_path: Path, n: int, size: int = 1 << 16) -> list[int]:
    fds = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(bytes(size))
        fds.append(os.open(p, os.O_RDWR))
    return fds


def test_jobs_land_in_order_on_every_descriptor_and_skipped_ones_stay_untouched(
        tmp_path: Path) -> None:
    async def main() -> list[list[int]]:
        fds = _files(tmp_path, 3)
        w = Writer(asyncio.get_running_loop())
        inline = Inline([fds[0], -1, fds[2]])
        got: list[list[int]] = []
        jobs = [w.submit(inline, 4096, bytes([k]) * 4096) for k in range(1, 51)]
        for job in jobs:  # some are done when asked, others are told later
            w.when_done(job, got.append)
        for _ in range(200):
            if len(got) == len(jobs):
                break
            await asyncio.sleep(0.01)
        assert w.pending == 0
        w.close()
        for fd in fds:
            os.close(fd)
        return got

    got = asyncio.run(main())
    assert got == [[0, -1, 0]] * 50
    # the last job wins on the descriptors written; the skipped one never saw any
    assert (tmp_path / "f0").read_bytes()[4096:8192] == bytes([50]) * 4096
    assert (tmp_path / "f2").read_bytes()[4096:8192] == bytes([50]) * 4096
    assert (tmp_path / "f1").read_bytes() == bytes(1 << 16)


def test_a_descriptor_that_fails_gives_its_errno_and_the_others_are_written(
        tmp_path: Path) -> None:
    async def main() -> list[int]:
        fds = _files(tmp_path, 2)
        ro = os.open(tmp_path / "f1", os.O_RDONLY)
        w = Writer(asyncio.get_running_loop())
        job = w.submit(Inline([fds[0], ro]), 0, b"x" * 512)
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        w.when_done(job, fut.set_result)
        codes = await asyncio.wait_for(fut, 10)
        w.close()
        for fd in (*fds, ro):
            os.close(fd)
        return codes

    assert asyncio.run(main()) == [0, errno.EBADF]
    assert (tmp_path / "f0").read_bytes()[:512] == b"x" * 512


def test_close_writes_what_is_queued_and_tells_every_waiter(tmp_path: Path) -> None:
    async def main() -> list[list[int]]:
        (fd,) = _files(tmp_path, 1, 1 << 20)
        w = Writer(asyncio.get_running_loop())
        got: list[list[int]] = []
        inline = Inline([fd])
        for k in range(64):
            w.when_done(w.submit(inline, k * 16384, bytes([k + 1]) * 16384), got.append)
        w.close()  # before the loop ever ran the eventfd's reader
        assert w.closed and w.busy_for() == 0.0
        try:
            w.submit(inline, 0, b"late")
        except BrokenPipeError:
            pass
        else:
            raise AssertionError("a closed writer took a job")
        os.close(fd)
        return got

    got = asyncio.run(main())
    assert got == [[0]] * 64
    data = (tmp_path / "f0").read_bytes()
    assert all(data[k * 16384:(k + 1) * 16384] == bytes([k + 1]) * 16384 for k in range(64))
