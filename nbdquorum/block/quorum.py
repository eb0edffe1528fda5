"""The quorum driver: N children, every write to all, every read voted.

Semantics follow QEMU's block/quorum.c, with three deliberate differences:

* The vote compares bytes directly (memcmp-class, in the C core) on the
  agreeing path and on the mismatch path; QEMU hashes every copy with SHA-256
  once any copy differs.
* A tie between the largest versions is a failure (EIO + QUORUM_FAILURE).
  QEMU returns the version first seen at the highest child index.
* QUORUM_REPORT_BAD for a content mismatch names the 512-byte span where the
  child differs, not the whole request.

Every request holds a range lock (rangelock.py) so overlapping writes land in
the same order on every child and reads never vote on a half-written range.

Children have a state (ChildState).  Only ``active`` children vote and are
read.  ``resyncing`` children receive every write but are never read until a
background job has copied the voted contents to them; ``faulted`` children get
no I/O at all.  The graph (graph.py) is the only code that adds or removes
children; this module knows nothing of NBD or QMP and reports through the
event bus.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nbdquorum import native
from nbdquorum.block import aio
from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.errors import GraphError
from nbdquorum.block.node import STATE_HOLE, STATE_ZERO, BlockNode, Buffer, Extent, oserror
from nbdquorum.block.rangelock import RangeLock
from nbdquorum.block.readpath import INLINE_MAX, INLINE_STALL, BufferPool, InlineReads
from nbdquorum.block.vote import VoteResult
from nbdquorum.eventbus import EventBus
from nbdquorum.ratelimit import Burst

log = logging.getLogger(__name__)

SECTOR = 512


class ReadPattern(enum.StrEnum):
    QUORUM = "quorum"  #: read every active child and vote
    FIFO = "fifo"  #: read the first active child; on error the next one


class ChildState(enum.StrEnum):
    ACTIVE = "active"  #: in sync; votes and is read
    RESYNCING = "resyncing"  #: gets writes, never read or counted until resynced
    FAULTED = "faulted"  #: failed too often; gets no I/O at all


@dataclass
class ChildStats:
    """Per-child counters, in the spirit of zpool status READ/WRITE/CKSUM."""

    reads: int = 0  # read requests sent to the child
    writes: int = 0  # write/zero/trim requests sent to the child
    read_errors: int = 0  # reads that returned an error
    write_errors: int = 0  # writes/zero/trim that returned an error
    flush_errors: int = 0
    checksum_errors: int = 0  # reads whose bytes lost the vote
    repaired_bytes: int = 0  # bytes rewritten with the winning version

    def as_dict(self) -> dict[str, int]:
        return {k.replace("_", "-"): v for k, v in self.__dict__.items()}


@dataclass(eq=False)
class ChildSlot:
    """One edge quorum -> child, named as QEMU names it (``children.N``)."""

    name: str  # edge name, "children.N"
    node: BlockNode  # the child node
    state: ChildState = ChildState.ACTIVE
    stats: ChildStats = field(default_factory=ChildStats)
    #: regions not yet in sync (a resyncing child); None when in sync
    sync: RegionBitmap | None = None
    #: errors counted toward max-errors since the child joined or was cleared
    error_count: int = 0
    #: resync attempts that failed in a row, and the last one's error
    resync_failures: int = 0
    resync_error: str | None = None


class WriteIntent:
    """What the quorum needs from a write-intent log (state.py implements it)."""

    async def mark(self, offset: int, length: int) -> None:
        """Make the regions durable-dirty before a write is sent to children."""

    def mark_now(self, offset: int, length: int) -> bool:
        """As mark() if the regions are durable-dirty already (no I/O needed);
        False (and nothing marked) otherwise."""
        return False

    def done(self, offset: int, length: int) -> None:
        """The write to this range finished on every child."""


def sector_span(offset: int, length: int) -> tuple[int, int]:
    """QEMU's (sector-num, sectors-count) for a byte range, rounded outward."""
    start = offset // SECTOR
    end = -(-(offset + length) // SECTOR)
    return start, end - start


class QuorumNode(BlockNode):
    driver = "quorum"

    def __init__(
        self,
        node_name: str,
        children: Sequence[BlockNode],
        *,
        vote_threshold: int,
        bus: EventBus,
        read_pattern: ReadPattern = ReadPattern.QUORUM,
        rewrite_corrupted: bool = False,
        read_only: bool = False,
        max_errors: int = 20,
        child_timeout: float = 30.0,
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        if not children:
            raise GraphError("Number of provided children must be 1 or more")
        check_options(len(children), vote_threshold, read_pattern, rewrite_corrupted)
        sizes = {c.node_name: c.size() for c in children}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{n}={s}" for n, s in sizes.items())
            raise GraphError(f"children of a quorum must have the same size ({detail})")
        self._size = next(iter(sizes.values()))
        self.slots: list[ChildSlot] = [
            ChildSlot(f"children.{i}", c) for i, c in enumerate(children)
        ]
        self.next_child_index = len(self.slots)
        self.vote_threshold = vote_threshold
        self.read_pattern = ReadPattern(read_pattern)
        self.rewrite_corrupted = rewrite_corrupted
        self.bus = bus
        self.lock = RangeLock()
        #: errors after which a child is marked faulted (md's max_read_errors); 0: never
        self.max_errors = max_errors
        #: seconds a child (on the non-fd path) may take before it counts as failed
        self.child_timeout = child_timeout
        #: the write-intent log, when a state dir is configured
        self.write_intent: WriteIntent | None = None
        #: monotonic time of the last client request (scrub yields to client I/O)
        self.last_client_io = 0.0
        #: small writes go to the page cache on the event loop until then (monotonic)
        self._inline_writes_off_until = 0.0
        #: small reads on the event loop (readpath.py)
        self._inline_reads = InlineReads()
        #: whether the children's file systems answer RWF_NOWAIT for writes
        #: (re-probed on every membership change)
        self._nowait_writes = True
        #: spare read buffers by size, so big reads do not zero-fill fresh ones
        self._pool = BufferPool()
        #: a failing child must not flood the log (ratelimit.py)
        self._log_burst = Burst()
        #: the last scrub's result (jobs/scrub.py), for status displays
        self.last_scrub: dict[str, Any] | None = None
        #: called after each membership/state change (persistence hooks in)
        self.on_change: list[Callable[[], None]] = []
        #: called with (slot, offset, length) when a write to a non-active
        #: or failing child must be remembered (resync bitmap hooks in)
        self.on_missed_write: list[Callable[[ChildSlot, int, int], None]] = []

    # -- introspection --------------------------------------------------------
    def size(self) -> int:
        return self._size

    def children_nodes(self) -> list[BlockNode]:
        return [s.node for s in self.slots]

    def buffers_per_read(self) -> int:
        return 1 if self.read_pattern is ReadPattern.FIFO else max(1, len(self.active()))

    def slot(self, edge_name: str) -> ChildSlot | None:
        return next((s for s in self.slots if s.name == edge_name), None)

    def slot_of(self, node: BlockNode) -> ChildSlot | None:
        return next((s for s in self.slots if s.node is node), None)

    def active(self) -> list[ChildSlot]:
        return [s for s in self.slots if s.state is ChildState.ACTIVE]

    def writable(self) -> list[ChildSlot]:
        return [s for s in self.slots if s.state is not ChildState.FAULTED]

    def filename(self) -> str:
        import json

        opts = {
            "children": [
                {"driver": s.node.driver, "file": {"driver": "file", "filename": s.node.filename()}}
                for s in self.slots
            ],
            "driver": "quorum",
            "vote-threshold": self.vote_threshold,
        }
        return "json:" + json.dumps(opts)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["image"].pop("dirty-flag", None)
        d["children"] = [{"child": s.name, "node-name": s.node.node_name} for s in self.slots]
        return d

    def status(self) -> dict[str, Any]:
        """The zpool-status-like view: options, and per child state and counters."""
        return {
            "node-name": self.node_name,
            "vote-threshold": self.vote_threshold,
            "read-pattern": str(self.read_pattern),
            "rewrite-corrupted": self.rewrite_corrupted,
            "size": self._size,
            "children": [
                {
                    "child": s.name,
                    "node-name": s.node.node_name,
                    "filename": s.node.filename(),
                    "state": str(s.state),
                    "errors": s.error_count,
                    "unsynced-bytes": s.sync.dirty_bytes() if s.sync is not None else 0,
                    "resync-failures": s.resync_failures,
                    **({"resync-error": s.resync_error} if s.resync_error else {}),
                    **s.stats.as_dict(),
                }
                for s in self.slots
            ],
            "last-scrub": self.last_scrub,
        }

    # -- events ---------------------------------------------------------------
    def _report_bad(
        self, slot: ChildSlot, op: str, offset: int, length: int, err: BaseException | None = None
    ) -> None:
        num, count = sector_span(offset, length) if op != "flush" else (0, 0)
        data: dict[str, Any] = {
            "node-name": slot.node.node_name,
            "sectors-count": count,
            "sector-num": num,
            "type": op,
        }
        if err is not None:
            code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
            data["error"] = os.strerror(code)
        held = self._log_burst.admit((slot.node.node_name, op))
        if held is not None:
            log.warning(
                "child %s (%s) bad on %s at sector %d+%d%s%s",
                slot.node.node_name, slot.name, op, num, count,
                f": {data['error']}" if err is not None else ": contents differ",
                f" ({held} more not logged)" if held else "",
            )
        self.bus.emit("QUORUM_REPORT_BAD", data)

    def _failure(self, offset: int, length: int) -> None:
        num, count = sector_span(offset, length)
        held = self._log_burst.admit(("failure",))
        if held is not None:
            log.error("quorum %s lost its quorum at sector %d+%d%s", self.node_name, num, count,
                      f" ({held} more not logged)" if held else "")
        self.bus.emit(
            "QUORUM_FAILURE",
            {"reference": self.node_name, "sectors-count": count, "sector-num": num},
        )

    # Small requests are served on the event loop when the page cache allows
    # (readpath.py says why and how); writes follow the same policy.

    def _inline_writes_ok(self) -> bool:
        return time.monotonic() >= self._inline_writes_off_until

    def _pread_inline(
        self, fds: list[int], offset: int, length: int, threshold: int | None = None
    ) -> tuple[VoteResult, list[bytearray], list[int]] | None:
        threshold = self.vote_threshold if threshold is None else threshold
        return self._inline_reads.pread(fds, offset, length, threshold)

    def _pwrite_inline(self, fds: list[int], offset: int, data: Buffer) -> list[int] | None:
        """A small write on the event loop: non-blocking where the kernel can
        tell, else a plain buffered pwrite (microseconds unless write-back
        pushes back, which the callers watch for)."""
        if self._nowait_writes:
            codes = native.pwrite_all_nowait(fds, offset, data)
            if codes is None:
                return None
            if not isinstance(codes, str):
                return codes
            self._nowait_writes = False  # the file system cannot tell; stop asking
        t0 = time.monotonic()
        codes = native.pwrite_all(fds, offset, data, False)
        if time.monotonic() - t0 > INLINE_STALL:
            # the page cache is pushing back (write-back): stop writing on the
            # event loop for a while
            self._inline_writes_off_until = time.monotonic() + 1.0
        return codes

    async def child_io(self, aw: Awaitable[Any]) -> Any:
        """Await one child's I/O under the child timeout (for jobs)."""
        return await self._timed(aw)

    async def _timed(self, aw: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(aw, self.child_timeout)
        except TimeoutError:
            raise oserror(errno.ETIMEDOUT, "child did not answer") from None

    def _count_error(self, slot: ChildSlot) -> None:
        slot.error_count += 1
        # An error may be the first sign of a deleted or truncated image:
        # look now rather than at the next periodic check.
        problem = slot.node.health() if slot.state is not ChildState.FAULTED else None
        if problem and slot in self.slots:
            log.error("child %s: %s", slot.node.node_name, problem)
            self.set_state(slot, ChildState.FAULTED)
            return
        if self.max_errors and slot.error_count >= self.max_errors and slot in self.slots:
            log.error("child %s reached %d errors: faulted", slot.node.node_name, slot.error_count)
            self.set_state(slot, ChildState.FAULTED)

    def _missed_write(self, slot: ChildSlot, offset: int, length: int) -> None:
        """A child failed a write the quorum acknowledged: it is out of sync there."""
        if slot.state is ChildState.FAULTED or slot not in self.slots:
            return
        if slot.sync is None:
            slot.sync = RegionBitmap(self._size)
        slot.sync.set_range(offset, length)
        if slot.state is ChildState.ACTIVE:
            self.set_state(slot, ChildState.RESYNCING)
        for fn in list(self.on_missed_write):
            fn(slot, offset, length)

    @staticmethod
    def _voted_errno(errors: Sequence[BaseException]) -> int:
        codes = [e.errno if isinstance(e, OSError) and e.errno else errno.EIO for e in errors]
        return Counter(codes).most_common(1)[0][0] if codes else errno.EIO

    # -- read -----------------------------------------------------------------
    async def pread(self, offset: int, length: int) -> Buffer:
        self.last_client_io = time.monotonic()
        async with self.lock.hold(offset, length, exclusive=False):
            if self.read_pattern is ReadPattern.FIFO:
                return await self._read_fifo(offset, length)
            return await self._read_quorum(offset, length, rewrite=self.rewrite_corrupted)

    async def read_voted(self, offset: int, length: int) -> Buffer:
        """A voted read for a job that already holds the range lock."""
        return await self._read_quorum(offset, length, rewrite=self.rewrite_corrupted)

    async def verify(self, offset: int, length: int, *, repair: bool) -> dict[str, int]:
        """Scrub one range: vote, report, count; with repair, rewrite the losers.

        Returns {node-name: differing bytes} for the children that lost.
        Raises OSError (EIO) when the range has no quorum.
        """
        findings: dict[str, int] = {}
        async with self.lock.hold(offset, length, exclusive=repair):
            await self._read_quorum(offset, length, rewrite=repair, findings=findings)
        return findings

    async def _read_fifo(self, offset: int, length: int) -> Buffer:
        errors: list[BaseException] = []
        for slot in self.active():
            slot.stats.reads += 1
            try:
                return await self._timed(slot.node.pread(offset, length))  # type: ignore[no-any-return]
            except OSError as err:
                slot.stats.read_errors += 1
                errors.append(err)
                self._report_bad(slot, "read", offset, length, err)
                self._count_error(slot)
        self._failure(offset, length)
        raise oserror(self._voted_errno(errors), f"{self.node_name}: no child could read")

    async def _read_quorum(
        self, offset: int, length: int, *, rewrite: bool,
        findings: dict[str, int] | None = None,
    ) -> Buffer:
        voters = self.active()
        if not voters:
            self._failure(offset, length)
            raise oserror(errno.EIO, f"{self.node_name}: no active child")
        for s in voters:
            s.stats.reads += 1
            s.node.pin()
        try:
            return await self._read_voters(voters, offset, length, rewrite, findings)
        finally:
            for s in voters:
                s.node.unpin()

    async def _read_voters(
        self, voters: list[ChildSlot], offset: int, length: int, rewrite: bool,
        findings: dict[str, int] | None,
    ) -> Buffer:
        lent: list[bytearray] = []  # pool buffers this read borrowed
        win: Buffer | None = None
        try:
            win = await self._read_voters_into(voters, offset, length, rewrite, findings, lent)
            return win
        finally:
            if lent:
                self._pool.give_back(lent, win)

    async def _read_voters_into(
        self, voters: list[ChildSlot], offset: int, length: int, rewrite: bool,
        findings: dict[str, int] | None, lent: list[bytearray],
    ) -> Buffer:
        fds = [s.node.fast_fd() for s in voters]
        bufs: list[Buffer | None]
        errs: list[BaseException | None]
        if all(fd is not None for fd in fds):
            ifds = [fd for fd in fds if fd is not None]
            done = self._pread_inline(ifds, offset, length) if length <= INLINE_MAX else None
            result: VoteResult | None
            if done is None:
                pooled = self._pool.take(len(ifds), length, lent)
                done = await aio.run(native.pread_vote, ifds, offset, length,
                                     self.vote_threshold, pooled)
            result, raw_bufs, codes = done
            bufs = [b if c == 0 else None for b, c in zip(raw_bufs, codes, strict=True)]
            errs = [None if c == 0 else oserror(c, s.node.node_name)
                    for c, s in zip(codes, voters, strict=True)]
        else:
            outcomes = await asyncio.gather(
                *(self._timed(s.node.pread(offset, length)) for s in voters),
                return_exceptions=True,
            )
            bufs, errs = [], []
            for out in outcomes:
                if isinstance(out, BaseException):
                    if not isinstance(out, Exception):
                        raise out
                    bufs.append(None)
                    errs.append(out)
                else:
                    bufs.append(out)
                    errs.append(None)
            result = None
        failed = [e for e in errs if e is not None]
        for slot, err in zip(voters, errs, strict=True):
            if err is not None:
                slot.stats.read_errors += 1
                self._report_bad(slot, "read", offset, length, err)
                self._count_error(slot)
        if len(voters) - len(failed) < self.vote_threshold:
            self._failure(offset, length)
            raise oserror(self._voted_errno(failed), f"{self.node_name}: too few children read")
        if result is None:
            if length >= 65536:
                result = await aio.run(native.vote, bufs, self.vote_threshold)
            else:
                result = native.vote(bufs, self.vote_threshold)
        if result.winner is None:
            self._failure(offset, length)
            raise oserror(errno.EIO, f"{self.node_name}: no quorum")
        win = bufs[result.winner]
        assert win is not None
        losers = [i for i in result.losers]
        if losers:
            await self._handle_losers(voters, bufs, win, losers, offset, rewrite, findings)
        return win

    async def _handle_losers(
        self, voters: list[ChildSlot], bufs: list[Buffer | None], win: Buffer,
        losers: list[int], offset: int, rewrite: bool, findings: dict[str, int] | None,
    ) -> None:
        rewrites: list[Awaitable[None]] = []
        for i in losers:
            slot, buf = voters[i], bufs[i]
            assert buf is not None
            span = native.diff_span(win, buf)
            if span is None:
                continue
            first, end = span
            slot.stats.checksum_errors += 1
            if findings is not None:
                findings[slot.node.node_name] = end - first
            self._report_bad(slot, "read", offset + first, end - first)
            if rewrite:
                a = (first // SECTOR) * SECTOR
                b = min(len(win), -(-end // SECTOR) * SECTOR)
                rewrites.append(self._rewrite(slot, offset + a, memoryview(win)[a:b]))
        if rewrites:
            await asyncio.gather(*rewrites)

    async def _rewrite(self, slot: ChildSlot, offset: int, data: Buffer) -> None:
        try:
            await self._timed(slot.node.pwrite(offset, data))
            slot.stats.repaired_bytes += len(data)
            log.info("rewrote %d bytes of %s at %d", len(data), slot.node.node_name, offset)
        except OSError as err:  # QEMU ignores rewrite errors too; we count them
            slot.stats.write_errors += 1
            self._report_bad(slot, "write", offset, len(data), err)

    # -- write-like operations --------------------------------------------------
    async def _write_all(
        self,
        op: str,
        offset: int,
        length: int,
        call: Callable[[BlockNode], Awaitable[None]],
        fast: Callable[[list[int]], list[int]] | None = None,
        inline: Callable[[list[int]], list[int] | None] | None = None,
    ) -> None:
        self.last_client_io = time.monotonic()
        async with self.lock.hold(offset, length, exclusive=True):
            intent = self.write_intent
            if intent is not None:
                await intent.mark(offset, length)
            targets = self.writable()
            for s in targets:
                s.stats.writes += 1
                s.node.pin()
            try:
                await self._write_targets(op, offset, length, targets, call, fast, inline)
            finally:
                for s in targets:
                    s.node.unpin()
                if intent is not None:
                    intent.done(offset, length)

    async def _write_targets(
        self,
        op: str,
        offset: int,
        length: int,
        targets: list[ChildSlot],
        call: Callable[[BlockNode], Awaitable[None]],
        fast: Callable[[list[int]], list[int]] | None,
        inline: Callable[[list[int]], list[int] | None] | None = None,
    ) -> None:
        fds = [s.node.fast_fd() for s in targets]
        errs: list[BaseException | None]
        if fast is not None and targets and all(fd is not None for fd in fds):
            ifds = [fd for fd in fds if fd is not None]
            codes = None
            if inline is not None and length <= INLINE_MAX and self._inline_writes_ok():
                codes = inline(ifds)
            if codes is None:
                codes = await aio.run(fast, ifds)
            errs = [None if c == 0 else oserror(c, s.node.node_name)
                    for c, s in zip(codes, targets, strict=True)]
        else:
            outs = await asyncio.gather(*(self._timed(call(s.node)) for s in targets),
                                        return_exceptions=True)
            errs = []
            for out in outs:
                if isinstance(out, BaseException) and not isinstance(out, Exception):
                    raise out
                errs.append(out if isinstance(out, BaseException) else None)
        self._account_write(op, offset, length, targets, errs)

    def _account_write(
        self, op: str, offset: int, length: int, targets: list[ChildSlot],
        errs: Sequence[BaseException | None],
    ) -> None:
        """Count, report and judge a write's per-child outcome (raises below threshold)."""
        ok = 0
        failed: list[BaseException] = []
        for slot, err in zip(targets, errs, strict=True):
            if err is None:
                if slot.state is ChildState.ACTIVE:
                    ok += 1
                continue
            failed.append(err)
            slot.stats.write_errors += 1
            self._report_bad(slot, "write", offset, length, err)
        if ok < self.vote_threshold:
            self._failure(offset, length)
            raise oserror(self._voted_errno(failed), f"{self.node_name}: {op} failed on too many children")
        for slot, err in zip(targets, errs, strict=True):
            if err is not None:
                self._missed_write(slot, offset, length)
                self._count_error(slot)

    # -- synchronous fast paths (the NBD server tries these first) ------------------
    def try_pread_now(self, offset: int, length: int) -> Buffer | None:
        """Serve a small read without awaiting anything, or return None.

        Only the common case qualifies: quorum read pattern, every active child
        a plain file, no overlapping write queued or running, the bytes in the
        page cache, and every child read OK and agreeing.  Anything else
        (None) takes the full path, which may redo the read: reads are
        idempotent, and the full path does the reporting and repair.
        """
        if length > INLINE_MAX:
            return None
        if self.lock.would_block(offset, length, exclusive=False):
            return None
        voters = self.active()
        if self.read_pattern is ReadPattern.FIFO:
            voters = voters[:1]  # fifo reads the first child; errors take the full path
        fds = [s.node.fast_fd() for s in voters]
        if not voters or None in fds:
            return None
        threshold = 1 if self.read_pattern is ReadPattern.FIFO else self.vote_threshold
        done = self._pread_inline(fds, offset, length, threshold)  # type: ignore[arg-type]
        if done is None:
            return None
        result, bufs, codes = done
        if result.winner is None or any(codes) or len(result.winners) != len(voters):
            return None
        self.last_client_io = time.monotonic()
        for slot in voters:
            slot.stats.reads += 1
        return bufs[result.winner]

    def try_pwrite_now(self, offset: int, data: Buffer) -> bool:
        """Do a small write without awaiting anything; False: take the full path.

        Qualifies when every writable child is a plain file, nothing overlaps
        it in the range lock, the write-intent log has the regions durable
        already, and the page cache takes the data without blocking.  Once
        written, errors are handled here exactly as on the full path (this
        raises OSError when fewer than vote-threshold children took it).
        """
        length = len(data)
        if length > INLINE_MAX or not self._inline_writes_ok():
            return False
        if self.lock.would_block(offset, length, exclusive=True):
            return False
        targets = self.writable()
        fds = [s.node.fast_fd() for s in targets]
        if not targets or None in fds:
            return False
        intent = self.write_intent
        if intent is not None and not intent.mark_now(offset, length):
            return False
        try:
            codes = self._pwrite_inline(fds, offset, data)  # type: ignore[arg-type]
            if codes is None:
                return False
            self.last_client_io = time.monotonic()
            for slot in targets:
                slot.stats.writes += 1
            errs = [None if c == 0 else oserror(c, s.node.node_name)
                    for c, s in zip(codes, targets, strict=True)]
            self._account_write("write", offset, length, targets, errs)
            return True
        finally:
            if intent is not None:
                intent.done(offset, length)

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._write_all(
            "write", offset, len(data),
            lambda n: n.pwrite(offset, data, fua=fua),
            lambda fds: native.pwrite_all(fds, offset, data, fua),
            None if fua else lambda fds: self._pwrite_inline(fds, offset, data),
        )

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self._write_all(
            "write", offset, length,
            lambda n: n.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua),
        )

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._write_all("write", offset, length, lambda n: n.trim(offset, length, fua=fua))

    async def flush(self) -> None:
        targets = self.writable()
        outs = await asyncio.gather(*(self._timed(s.node.flush()) for s in targets),
                                    return_exceptions=True)
        ok = 0
        failed: list[BaseException] = []
        for slot, out in zip(targets, outs, strict=True):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out
                failed.append(out)
                slot.stats.flush_errors += 1
                self._report_bad(slot, "flush", 0, 0, out)
                self._count_error(slot)
            elif slot.state is ChildState.ACTIVE:
                ok += 1
        if ok < self.vote_threshold:
            self._failure(0, 0)
            raise oserror(self._voted_errno(failed), f"{self.node_name}: flush failed")

    async def cache(self, offset: int, length: int) -> None:
        await asyncio.gather(*(s.node.cache(offset, length) for s in self.active()),
                             return_exceptions=True)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """A range is a hole/zero only where every active child says so."""
        voters = self.active()
        if not voters:
            return [(length, 0)]
        maps = await asyncio.gather(*(s.node.block_status(offset, length) for s in voters),
                                    return_exceptions=True)
        good = [m for m in maps if not isinstance(m, BaseException)]
        if not good:
            return [(length, 0)]
        return intersect_extents(good, length)

    def check_health(self) -> list[tuple[ChildSlot, str]]:
        """Fault children whose files were deleted or resized under us.

        I/O alone cannot see a deleted image (the open file keeps working) or a
        truncation beyond the range read so far; a periodic fstat can.
        """
        found = []
        for slot in list(self.slots):
            if slot.state is ChildState.FAULTED:
                continue
            problem = slot.node.health()
            if problem:
                log.error("child %s: %s", slot.node.node_name, problem)
                self._report_bad(slot, "read", 0, 0, oserror(errno.EIO, problem))
                self.set_state(slot, ChildState.FAULTED)
                found.append((slot, problem))
        return found

    async def run_health_checks(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check_health()

    # -- membership (called only by graph.py) ------------------------------------
    def attach(self, node: BlockNode, state: ChildState = ChildState.ACTIVE) -> ChildSlot:
        if node.size() != self._size:
            raise GraphError(
                f"Cannot add node '{node.node_name}' of size {node.size()} to quorum "
                f"'{self.node_name}' of size {self._size}"
            )
        slot = ChildSlot(f"children.{self.next_child_index}", node, state)
        if state is ChildState.RESYNCING:
            slot.sync = RegionBitmap(self._size, fill=True)  # nothing copied yet
        self.next_child_index += 1
        self.slots.append(slot)
        self._emit_state(slot, "none")
        self._changed()
        return slot

    def detach(self, slot: ChildSlot) -> None:
        if len(self.slots) <= self.vote_threshold:
            raise GraphError(
                f"The number of children cannot be lower than the vote threshold {self.vote_threshold}"
            )
        # Beyond QEMU: resyncing children take writes but do not count towards
        # the threshold, so removing an active child could leave a quorum
        # where every write fails.
        self.check_can_leave_vote(slot)
        self.slots.remove(slot)
        # QEMU 5.2+ "stable children names": only the top index is reused
        if slot.name == f"children.{self.next_child_index - 1}":
            self.next_child_index -= 1
        self._changed()

    def set_state(self, slot: ChildSlot, state: ChildState) -> None:
        if slot.state is not state:
            log.warning("child %s (%s): %s -> %s", slot.node.node_name, slot.name, slot.state, state)
            previous = slot.state
            slot.state = state
            if state is ChildState.ACTIVE:
                slot.sync = None
            if previous is ChildState.FAULTED:
                slot.error_count = 0  # a second chance, as md's re-add
            self._emit_state(slot, str(previous))
            self._changed()

    def _emit_state(self, slot: ChildSlot, previous: str) -> None:
        self.bus.emit(
            "QUORUM_CHILD_STATE_CHANGE",
            {"node-name": slot.node.node_name, "child": slot.name, "parent": self.node_name,
             "state": str(slot.state), "previous": previous},
        )

    def check_can_leave_vote(self, slot: ChildSlot, verb: str = "remove") -> None:
        """Refuse to take an active child out of the vote below the threshold."""
        left = len(self.active()) - (slot.state is ChildState.ACTIVE)
        if slot.state is ChildState.ACTIVE and left < self.vote_threshold:
            what = f"{left} child{'' if left == 1 else 'ren'} would be left in sync (active)"
            raise GraphError(
                f"Cannot {verb} {slot.node.node_name}: {what}, fewer than the vote threshold "
                f"{self.vote_threshold}"
            )

    def _changed(self) -> None:
        self._inline_reads.reset()
        self._nowait_writes = True
        for fn in list(self.on_change):
            fn()


def check_options(
    nchildren: int, vote_threshold: int, read_pattern: str, rewrite_corrupted: bool
) -> None:
    """QEMU's open-time checks, with QEMU's texts."""
    if vote_threshold < 1:
        raise GraphError("Parameter 'vote-threshold' expects a value >= 1")
    if vote_threshold > nchildren:
        raise GraphError("threshold may not exceed children count")
    if read_pattern not in ("quorum", "fifo"):
        raise GraphError(f"Parameter 'read-pattern' does not accept value '{read_pattern}'")


def intersect_extents(maps: Sequence[Sequence[Extent]], length: int) -> list[Extent]:
    """AND the flags of several extent lists over the same range."""
    cuts: set[int] = {0, length}
    for m in maps:
        pos = 0
        for n, _ in m:
            pos += n
            cuts.add(min(pos, length))
    points = sorted(cuts)

    def flags_at(m: Sequence[Extent], pos: int) -> int:
        p = 0
        for n, f in m:
            if p <= pos < p + n:
                return f
            p += n
        return 0

    out: list[Extent] = []
    for a, b in itertools.pairwise(points):
        if b <= a:
            continue
        f = STATE_HOLE | STATE_ZERO
        for m in maps:
            f &= flags_at(m, a)
        if out and out[-1][1] == f:
            out[-1] = (out[-1][0] + b - a, f)
        else:
            out.append((b - a, f))
    return out
