"""The block node a worker process exports: local agreeing reads, the rest forwarded.

A read is answered here only when the current view is local (every active
child a plain file), its epoch is the primary's latest, and every voting
child read OK and agreed: no vote is lost, nothing needs reporting or
repair.  Anything else goes to the primary, which redoes the read (reads are
idempotent) and does the reporting, counting and repair.  Writes, flush,
trim, zero, cache and block status always go to the primary.
"""

from __future__ import annotations

import mmap
import os
from collections import Counter
from dataclasses import dataclass, field

from nbdquorum.block import aio
from nbdquorum.block.file import pread_full
from nbdquorum.block.node import BlockNode, Buffer, Direct, Extent
from nbdquorum.block.quorum.voted import Reads, VotedIO
from nbdquorum.nbd.client import NBDClient
from nbdquorum.nbd.constants import Cmd, CmdFlag
from nbdquorum.worker.control import EPOCH


class _ViewDirect(Direct):
    """A view's descriptor: pins count the view's reads in flight."""

    def __init__(self, view: View, fd: int) -> None:
        self.view = view
        self.fd = fd

    def pin(self) -> None:
        self.view.inflight += 1

    def unpin(self) -> None:
        self.view.inflight -= 1
        self.view.release()


class ViewChild(BlockNode):
    """A child of the primary's quorum as the view describes it: here, a file
    by its descriptor (kind "file"), read through Voted I/O like the primary's."""

    driver = "file"

    def __init__(self, name: str, size: int, direct: _ViewDirect) -> None:
        super().__init__(name, read_only=True)
        self._size = size
        self._direct = direct

    def size(self) -> int:
        return self._size

    def direct(self) -> Direct:
        return self._direct

    async def pread(self, offset: int, length: int) -> Buffer:
        return await aio.run(pread_full, self._direct.fd, offset, length)


#: the kinds of child a worker can read itself (the view says each child's kind)
LOCAL_KINDS = frozenset({"file"})


@dataclass(eq=False)
class View:
    """What the primary allows a local read to use."""

    epoch: int
    local: bool = False  # False: forward every read
    threshold: int = 1
    fifo: bool = False  # read-pattern fifo: read the first voter only
    names: list[str] = field(default_factory=list)  # voters' node-names
    fds: list[int] = field(default_factory=list)  # voters' descriptors (ours to close)
    size: int = 0  # the export's size
    reads: int = 0  # reads answered with this view (for the primary's counters)
    inflight: int = 0  # pool reads using fds right now
    retired: bool = False
    children: list[ViewChild] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.children = [ViewChild(n, self.size, _ViewDirect(self, fd))
                         for n, fd in zip(self.names, self.fds, strict=False)]

    def voters(self) -> tuple[list[ViewChild], int]:
        """(children to read, threshold) of a local read."""
        return (self.children[:1], 1) if self.fifo else (self.children, self.threshold)

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
        self.voted = VotedIO()
        self._retired_reads: Counter[str] = Counter()
        self._now = _WorkerNow(self)
        #: local reads answered / forwarded (for tests and the stats message)
        self.local_reads = 0
        self.forwarded = 0

    def size(self) -> int:
        return self._size

    def direct(self) -> Direct:
        return self._now

    # -- the view ------------------------------------------------------------------
    def set_view(self, view: View) -> None:
        old, self.view = self.view, view
        self.voted.reset()
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

    def _agreed(self, v: View, reads: Reads) -> Buffer | None:
        """The bytes, if every voter read them and the view was current throughout
        (the primary may change the quorum while the read runs)."""
        if not reads.unanimous or not self._current(v):
            return None
        v.reads += 1
        self.local_reads += 1
        return reads.winner

    # -- reads -----------------------------------------------------------------------
    def try_pread_now(self, offset: int, length: int) -> Buffer | None:
        v = self._usable()
        if v is None:
            return None
        children, threshold = v.voters()
        reads = self.voted.read_now(children, offset, length, threshold)
        return None if reads is None else self._agreed(v, reads)

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
        children, threshold = v.voters()
        # a read that outlives the child timeout is forwarded; its thread keeps the
        # view's descriptors pinned (and its buffers) until it returns
        reads = await self.voted.read(children, offset, length, threshold,
                                      fd_limit=self.child_timeout)
        return self._agreed(v, reads)

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


class _WorkerNow(Direct):
    def __init__(self, node: WorkerNode) -> None:
        self.node = node

    def try_pread(self, offset: int, length: int) -> Buffer | None:
        return self.node.try_pread_now(offset, length)
