"""The block node a worker process exports: local agreeing reads, the rest forwarded.

A read is answered here only when the current view is local (every active
child a plain file), its epoch is the primary's latest, and every voting
child read OK and agreed: no vote is lost, nothing needs reporting or
repair.  Anything else goes to the primary, which redoes the read (reads are
idempotent) and does the reporting, counting and repair.  Writes, flush,
trim, zero, cache and block status always go to the primary.
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field

from nbdquorum import native
from nbdquorum.block import aio
from nbdquorum.block.node import BlockNode, Buffer, Extent
from nbdquorum.block.readpath import INLINE_MAX, BufferPool, InlineReads, ReadOutcome
from nbdquorum.nbd.client import NBDClient
from nbdquorum.nbd.constants import Cmd, CmdFlag
from nbdquorum.worker.control import EPOCH


@dataclass(eq=False)
class View:
    """What the primary allows a local read to use."""

    epoch: int
    local: bool = False  # False: forward every read
    threshold: int = 1
    fifo: bool = False  # read-pattern fifo: read the first voter only
    names: list[str] = field(default_factory=list)  # voters' node-names
    fds: list[int] = field(default_factory=list)  # voters' descriptors (ours to close)
    reads: int = 0  # reads answered with this view (for the primary's counters)
    inflight: int = 0  # pool reads using fds right now
    retired: bool = False

    def voters(self) -> tuple[list[int], int]:
        """(descriptors to read, threshold) of a local read."""
        return (self.fds[:1], 1) if self.fifo else (self.fds, self.threshold)

    def counted_names(self) -> list[str]:
        return self.names[:1] if self.fifo else self.names

    def release(self) -> None:
        """Close the descriptors once retired and no read uses them."""
        if self.retired and self.inflight == 0:
            fds, self.fds = self.fds, []
            for fd in fds:
                os.close(fd)


class WorkerNode(BlockNode):
    driver = "quorum"

    def __init__(self, node_name: str, size: int, primary: NBDClient, epoch: mmap.mmap,
                 child_timeout: float) -> None:
        super().__init__(node_name)
        self._size = size
        self.primary = primary
        self._epoch = epoch
        self.child_timeout = child_timeout
        self.view = View(epoch=-1)
        self._inline = InlineReads()
        self._pool = BufferPool()
        self._retired_reads: Counter[str] = Counter()
        #: local reads answered / forwarded (for tests and the stats message)
        self.local_reads = 0
        self.forwarded = 0

    def size(self) -> int:
        return self._size

    def buffers_per_read(self) -> int:
        return max(1, len(self.view.voters()[0]))

    # -- the view ------------------------------------------------------------------
    def set_view(self, view: View) -> None:
        old, self.view = self.view, view
        self._inline.reset()
        for name in old.counted_names():
            self._retired_reads[name] += old.reads
        old.retired = True
        old.release()

    def take_reads(self) -> dict[str, int]:
        """Per child, the reads answered locally since the last call."""
        counts = self._retired_reads
        self._retired_reads = Counter()
        v = self.view
        for name in v.counted_names():
            counts[name] += v.reads
        v.reads = 0
        return {k: n for k, n in counts.items() if n}

    def _current(self, v: View) -> bool:
        epoch: int = EPOCH.unpack_from(self._epoch)[0]
        return v.epoch == epoch

    def _usable(self) -> View | None:
        v = self.view
        return v if v.local and self._current(v) else None

    def _agreed(self, v: View, n: int, done: ReadOutcome) -> bytearray | None:
        """The bytes, if every voter read them and the view was current throughout
        (the primary may change the quorum while the read runs)."""
        result, bufs, codes = done
        if (result.winner is None or any(codes) or len(result.winners) != n
                or not self._current(v)):
            return None
        v.reads += 1
        self.local_reads += 1
        return bufs[result.winner]

    # -- reads -----------------------------------------------------------------------
    def try_pread_now(self, offset: int, length: int) -> Buffer | None:
        if length > INLINE_MAX:
            return None
        v = self._usable()
        if v is None:
            return None
        fds, threshold = v.voters()
        done = self._inline.pread(fds, offset, length, threshold)
        return None if done is None else self._agreed(v, len(fds), done)

    async def pread(self, offset: int, length: int) -> Buffer:
        v = self._usable()
        if v is not None:
            data = await self._pread_local(v, offset, length)
            if data is not None:
                return data
        self.forwarded += 1
        out = await self.primary.call(Cmd.READ, offset, length)
        return out if isinstance(out, bytes | bytearray | memoryview) else bytes(length)

    async def _pread_local(self, v: View, offset: int, length: int) -> Buffer | None:
        fds, threshold = v.voters()
        done = self._inline.pread(fds, offset, length, threshold) if length <= INLINE_MAX else None
        if done is not None:
            return self._agreed(v, len(fds), done)
        lent: list[bytearray] = []
        bufs = self._pool.take(len(fds), length, lent)
        v.inflight += 1
        fut = asyncio.get_running_loop().run_in_executor(
            aio.pool(), native.pread_vote, fds, offset, length, threshold, bufs)

        def finished(f: asyncio.Future[ReadOutcome]) -> None:  # the thread is done
            v.inflight -= 1
            v.release()
            if not f.cancelled():
                f.exception()  # retrieved (it is also awaited unless we timed out)

        fut.add_done_callback(finished)
        try:
            done = await asyncio.wait_for(asyncio.shield(fut), self.child_timeout)
        except TimeoutError:
            # The thread still reads into the buffers (they are not given back)
            # and with the descriptors (released when it returns): forward.
            return None
        except OSError:
            return None  # the primary reads again and reports
        win = self._agreed(v, len(fds), done)
        if lent:
            self._pool.give_back(lent, win)
        return win

    # -- everything else goes to the primary ------------------------------------------
    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.primary.call(Cmd.WRITE, offset, len(data), CmdFlag.FUA if fua else 0, data)

    async def flush(self) -> None:
        await self.primary.call(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.primary.call(Cmd.TRIM, offset, length, CmdFlag.FUA if fua else 0)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        flags = ((0 if may_trim else CmdFlag.NO_HOLE) | (CmdFlag.FAST_ZERO if fast else 0)
                 | (CmdFlag.FUA if fua else 0))
        await self.primary.call(Cmd.WRITE_ZEROES, offset, length, flags)

    async def cache(self, offset: int, length: int) -> None:
        await self.primary.call(Cmd.CACHE, offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        out = await self.primary.call(Cmd.BLOCK_STATUS, offset, length)
        return out if isinstance(out, list) else [(length, 0)]

    def close(self) -> None:
        self.view.retired = True
        self.view.release()
        super().close()
