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

Two owners do the work: ``Members`` (members.py) holds the children, their
states and the options, and is the only writer of them; ``VotedIO``
(voted.py) reads N children and votes, and writes N children.  This module
judges the outcomes (counts, reports, faults, repairs) and knows nothing of
NBD, QMP or persistence: it reports typed events (events.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nbdquorum import native
from nbdquorum.block.errors import GraphError
from nbdquorum.block.node import (
    BlockNode,
    Buffer,
    Caps,
    Direct,
    Extent,
    Then,
    Unreachable,
    error_of,
    oserror,
    settler,
    tell,
)
from nbdquorum.block.quorum.events import ChildBad, QuorumEvent, QuorumLost
from nbdquorum.block.quorum.members import (
    ChildSlot,
    ChildState,
    Members,
    ReadPattern,
    check_options,
)
from nbdquorum.block.quorum.thin import Copied, all_zero, copy_voted, intersect_extents
from nbdquorum.block.quorum.voted import INLINE_MAX, INLINE_STALL, Reads, VotedIO
from nbdquorum.block.rangelock import RangeLock
from nbdquorum.ratelimit import Burst

log = logging.getLogger(__name__)

SECTOR = 512


class WriteIntent:
    """What the quorum needs from a write-intent log (persistence implements it)."""

    async def mark(self, offset: int, length: int) -> None:
        """Make the regions durable-dirty before a write is sent to children."""

    def mark_now(self, offset: int, length: int) -> bool:
        """As mark() if the regions are durable-dirty already (no I/O needed);
        False (and nothing marked) otherwise."""
        return False

    def done(self, offset: int, length: int) -> None:
        """The write to this range finished on every child."""


class _Now(Direct):
    """The quorum's serve-now capability: small requests on the event loop."""

    def __init__(self, q: QuorumNode) -> None:
        self.q = q

    def try_pread(self, offset: int, length: int) -> Buffer | None:
        return self.q._try_pread_now(offset, length)

    def try_pwrite(self, offset: int, data: Buffer) -> bool:
        return self.q._try_pwrite_now(offset, data)

    @property
    def writes_now(self) -> bool:  # type: ignore[override]
        """Only when every writable child is a descriptor."""
        return self.q._plan().write_fds is not None

    def soon_pread(self, offset: int, length: int) -> asyncio.Future[Buffer] | None:
        return self.q._try_pread_soon(offset, length)

    def soon_pwrite(self, offset: int, data: Buffer) -> asyncio.Future[None] | None:
        return self.q._try_pwrite_soon(offset, data)

    def call_pread(self, offset: int, length: int, then: Then) -> bool:
        f = self.q._try_pread_soon(offset, length)
        if f is None:
            return False
        f.add_done_callback(lambda f: tell(f, then))
        return True

    def call_pwrite(self, offset: int, data: Buffer, then: Then) -> bool:
        return self.q._call_pwrite_soon(offset, data, then)


@dataclass(slots=True)
class _FastPlan:
    """The fast paths' view of the membership (see QuorumNode._plan)."""

    voters: list[ChildSlot]
    read_fds: list[int] | None  # None: some voter has no descriptor
    threshold: int
    targets: list[ChildSlot]
    write_fds: list[int] | None
    active_targets: int  # targets that count toward the threshold
    #: the soon paths (some child without a descriptor, each with a Direct):
    #: the descriptors, -1 for the others; None when not that case
    soon_read_fds: list[int] | None = None
    soon_write_fds: list[int] | None = None
    #: reads answered now by the descriptors (see QuorumNode._pread_one_late): the
    #: index of the one voter without a descriptor and its Direct, when the others
    #: alone decide every vote they agree on (at least the threshold, and two); else None
    one_late: tuple[int, Direct] | None = None
    #: the one write target without a descriptor, and its Direct (_pwrite_one_late)
    one_late_write: tuple[int, Direct] | None = None


def _soon_fds(nodes: Sequence[BlockNode]) -> list[int] | None:
    """Descriptors (-1 for a node without one) when some node has none and every
    node offers a Direct (the soon paths); else None."""
    fds = []
    for n in nodes:
        d = n.direct()
        if d is None:
            return None
        fds.append(-1 if d.fd is None else d.fd)
    return fds if fds and min(fds) < 0 else None


def _the_one(nodes: Sequence[BlockNode], soon_fds: list[int] | None,
             ) -> tuple[int, Direct] | None:
    """(index, Direct) of the one node without a descriptor, or None."""
    if soon_fds is None or soon_fds.count(-1) != 1:
        return None
    i = soon_fds.index(-1)
    d = nodes[i].direct()
    return None if d is None else (i, d)


def _pass_on(src: asyncio.Future[Any], dst: asyncio.Future[Any]) -> None:
    if dst.done():  # its caller gave up: src's error is taken, not left unretrieved
        error_of(src)
        return
    if src.cancelled():
        dst.cancel()
    elif src.exception() is not None:
        dst.set_exception(src.exception())  # type: ignore[arg-type]
    else:
        dst.set_result(src.result())


#: bytes of reads answered early (their slower children still being read) at most
LATE_MAX = 4 << 20
#: reads up to this size may be answered early
EARLY_MAX = 64 << 10
#: a small write whose one far child is waited on anyway writes the local files on
#: a thread of its own (native.Writer) instead of on the event loop
#: (NBDQUORUM_WRITE_THREAD=0: on the loop, as every other small write)
LATE_WRITER = os.environ.get("NBDQUORUM_WRITE_THREAD", "1") != "0"
#: jobs queued on that thread at most; beyond, writes go on the loop again
WRITER_MAX = 1024


class QuorumNode(BlockNode):
    driver = "quorum"

    def __init__(
        self,
        node_name: str,
        children: Sequence[BlockNode],
        *,
        vote_threshold: int,
        report: Callable[[QuorumEvent], None] | None = None,
        bus: Any = None,
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
        if report is None:
            report = bus.publish if bus is not None else (lambda ev: None)
        self.report: Callable[[QuorumEvent], None] = report
        self.members = Members(
            node_name, children, size=self._size, vote_threshold=vote_threshold,
            read_pattern=ReadPattern(read_pattern), rewrite_corrupted=rewrite_corrupted,
            read_only=lambda: self.read_only, max_errors=max_errors, report=report,
        )
        self.voted = VotedIO()
        #: the writing thread of _pwrite_one_late (made at its first use)
        self._writer: native.Writer | None = None
        self._fast: _FastPlan | None = None
        self.members.on_change.append(self.voted.reset)
        self.members.on_change.append(self._drop_plan)
        self.lock = RangeLock()
        #: seconds a child (on the awaited path) may take before it counts as failed
        self.child_timeout = child_timeout
        #: the write-intent log, when a state dir is configured
        self.write_intent: WriteIntent | None = None
        #: monotonic time of the last client request (scrub yields to client I/O)
        self.last_client_io = 0.0
        #: a failing child must not flood the log (ratelimit.py)
        self._log_burst = Burst()
        #: the last scrub's result (jobs/scrub.py), for status displays
        self.last_scrub: dict[str, Any] | None = None
        self._now = _Now(self)
        #: reads answered early whose slower children are still being followed
        self._late: set[asyncio.Task[None]] = set()
        #: bytes of reads answered early whose slower children are still being read:
        #: beyond LATE_MAX a read waits for every child again, so that a slow child
        #: cannot pile up requests (and their buffers) without end
        self._late_bytes = 0
        #: reads answered on the fast path whose remote child is still being read
        #: (_pread_one_late), and what a clean stop waits on until they are none
        self._late_reads = 0
        self._late_idle: asyncio.Event | None = None
        #: answer a read as soon as its vote is decided (slower children compared in
        #: the background, under the read's range lock, reported and rewritten as if
        #: in time).  A hung child is then reported when its timeout expires, after
        #: the client has its answer; with every child local the vote is decided
        #: by all of them together (one C call), so this matters for remote children.
        self.answer_early = True

    # -- what Members owns, read here ---------------------------------------------------
    @property
    def slots(self) -> list[ChildSlot]:
        return self.members.slots

    @property
    def vote_threshold(self) -> int:
        return self.members.vote_threshold

    @property
    def read_pattern(self) -> ReadPattern:
        return self.members.read_pattern

    @property
    def rewrite_corrupted(self) -> bool:
        return self.members.rewrite_corrupted

    @property
    def next_child_index(self) -> int:
        return self.members.next_child_index

    @property
    def on_change(self) -> list[Callable[[], None]]:
        return self.members.on_change

    def active(self) -> list[ChildSlot]:
        return self.members.active()

    def writable(self) -> list[ChildSlot]:
        return self.members.writable()

    def slot(self, edge_name: str) -> ChildSlot | None:
        return self.members.slot(edge_name)

    def slot_of(self, node: BlockNode) -> ChildSlot | None:
        return self.members.slot_of(node)

    # -- introspection --------------------------------------------------------
    def size(self) -> int:
        return self._size

    def caps(self) -> Caps:
        # trim and zero reach every child (children stay identical); one flush
        # covers every caller, so every connection sees every other one's writes
        return (Caps.TRIM | Caps.FAST_ZERO | Caps.FUA | Caps.MULTI_CONN
                | (Caps.READ_ONLY if self.read_only else Caps(0)))

    def direct(self) -> Direct:
        return self._now

    def children_nodes(self) -> list[BlockNode]:
        return [s.node for s in self.slots]

    def filename(self) -> str:
        opts = {
            "children": [
                {"driver": s.node.driver, "file": {"driver": "file", "filename": s.node.filename()}}
                for s in self.slots
            ],
            "driver": "quorum",
            "vote-threshold": self.vote_threshold,
        }
        return "json:" + json.dumps(opts)

    # -- reports ----------------------------------------------------------------
    def _report_bad(
        self, slot: ChildSlot, op: str, offset: int, length: int, err: BaseException | None = None
    ) -> None:
        code = None
        if err is not None:
            code = err.errno if isinstance(err, OSError) and err.errno else errno.EIO
        held = self._log_burst.admit((slot.node.node_name, op))
        if held is not None:
            log.warning(
                "child %s (%s) bad on %s at byte %d+%d%s%s",
                slot.node.node_name, slot.name, op, offset, length,
                f": {err}" if err is not None else ": contents differ",
                f" ({held} more not logged)" if held else "",
            )
        self.report(ChildBad(slot.node.node_name, op, offset, length, code))

    def _failure(self, offset: int, length: int) -> None:
        held = self._log_burst.admit(("failure",))
        if held is not None:
            log.error("quorum %s lost its quorum at byte %d+%d%s", self.node_name, offset,
                      length, f" ({held} more not logged)" if held else "")
        self.report(QuorumLost(self.node_name, offset, length))

    async def child_io(self, aw: Awaitable[Any]) -> Any:
        """Await one child's I/O under the child timeout (for jobs)."""
        try:
            return await asyncio.wait_for(aw, self.child_timeout)
        except TimeoutError:
            raise oserror(errno.ETIMEDOUT, "child did not answer") from None

    def _missed_write(self, slot: ChildSlot, offset: int, length: int) -> None:
        """A child failed a write the quorum acknowledged: it is out of sync there."""
        self.members.start_resync(slot, [(offset, length)])

    @staticmethod
    def _voted_errno(errors: Sequence[BaseException]) -> int:
        codes = [e.errno if isinstance(e, OSError) and e.errno else errno.EIO for e in errors]
        return Counter(codes).most_common(1)[0][0] if codes else errno.EIO

    # -- read -----------------------------------------------------------------
    async def pread(self, offset: int, length: int) -> Buffer:
        self.last_client_io = time.monotonic()
        # The shared range lock; a read answered before its slowest children have
        # (the vote was already decided) hands it to the task that follows them.
        held = [await self.lock.acquire(offset, length, exclusive=False)]
        try:
            if self.read_pattern is ReadPattern.FIFO:
                return await self._read_fifo(offset, length)
            return await self._read_quorum(offset, length, rewrite=self.rewrite_corrupted,
                                           held=held)
        finally:
            if held:
                self.lock.release(held.pop())

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
                return await self.child_io(slot.node.pread(offset, length))  # type: ignore[no-any-return]
            except OSError as err:
                slot.stats.read_errors += 1
                errors.append(err)
                self._report_bad(slot, "read", offset, length, err)
                self.members.count_error(slot)
        self._failure(offset, length)
        raise oserror(self._voted_errno(errors), f"{self.node_name}: no child could read")

    async def _read_quorum(
        self, offset: int, length: int, *, rewrite: bool,
        findings: dict[str, int] | None = None, held: list[Any] | None = None,
    ) -> Buffer:
        """Read the active children and vote.  With ``held`` (the caller's range
        lock entry, in a list), the answer may come as soon as the vote is decided:
        the slower children are then followed in the background, which takes the
        entry out of the list and releases it when they have answered."""
        voters = self.active()
        if not voters:
            self._failure(offset, length)
            raise oserror(errno.EIO, f"{self.node_name}: no active child")
        for s in voters:
            s.stats.reads += 1
        reads = await self.voted.read([s.node for s in voters], offset, length,
                                      self.vote_threshold, limit=self.child_timeout,
                                      early=bool(held) and self._may_answer_early(length))
        try:
            win = await self._judge(voters, reads, offset, length, rewrite, findings)
        except BaseException:
            for t in reads.late.values():
                t.cancel()
            raise
        if reads.late:
            assert held
            task = asyncio.get_running_loop().create_task(self._follow_late(
                voters, reads.late, win, offset, length, rewrite, held.pop()))
            self._late_started(task, length)
        return win

    def _may_answer_early(self, length: int) -> bool:
        """Small reads only: answering early takes a round trip off their latency,
        while a big read's time is the slow child's bandwidth, which every byte
        still crosses (answered early, sequential 1 MiB reads went at half the rate,
        at twice the CPU per byte, in the remote bench rows)."""
        return (self.answer_early and length <= EARLY_MAX
                and self._late_bytes + length <= LATE_MAX)

    def _late_started(self, task: asyncio.Future[Any], length: int) -> None:
        """A read was answered early; ``task`` ends when its slower children have."""
        self._late_bytes += length
        if isinstance(task, asyncio.Task):
            self._late.add(task)

        def ended(t: asyncio.Future[Any]) -> None:
            self._late_bytes -= length
            self._late.discard(t)

        task.add_done_callback(ended)

    async def settle(self) -> None:
        """Wait for the background comparisons of reads answered early (each is bounded
        by the child timeout); for a clean stop, before the children close."""
        if self._late_reads:  # each is bounded by its child's own time limit
            self._late_idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._late_idle.wait(), self.child_timeout + 1)
        if self._late:
            _done, pending = await asyncio.wait(set(self._late), timeout=self.child_timeout + 1)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _follow_late(
        self, voters: list[ChildSlot], late: dict[int, asyncio.Task[Buffer | OSError]],
        win: Buffer, offset: int, length: int, rewrite: bool, entry: Any,
    ) -> None:
        """The children that answered after the vote was decided: compared with the
        winner, reported and (with rewrite-corrupted) rewritten as if in time.  The
        read's range lock is held until then, so no write overlaps the comparison."""
        try:
            for i, task in late.items():
                out = await task
                slot = voters[i]
                if isinstance(out, OSError):
                    slot.stats.read_errors += 1
                    self._report_bad(slot, "read", offset, length, out)
                    self.members.count_error(slot)
                    continue
                await self._handle_losers(voters, {i: out}, win, [i], offset, rewrite, None)
        except Exception:  # never let a background comparison fail silently
            log.exception("following the late children of a read at %d+%d", offset, length)
        finally:
            self.lock.release(entry)

    async def _judge(
        self, voters: list[ChildSlot], reads: Reads, offset: int, length: int, rewrite: bool,
        findings: dict[str, int] | None,
    ) -> Buffer:
        """Count and report a read's outcome; the winner's bytes, or EIO."""
        failed = [e for e in reads.errors if e is not None]
        for slot, err in zip(voters, reads.errors, strict=True):
            if err is not None:
                slot.stats.read_errors += 1
                self._report_bad(slot, "read", offset, length, err)
                self.members.count_error(slot)
        if len(voters) - len(failed) < self.vote_threshold:
            self._failure(offset, length)
            raise oserror(self._voted_errno(failed), f"{self.node_name}: too few children read")
        win = reads.winner
        if win is None:
            self._failure(offset, length)
            raise oserror(errno.EIO, f"{self.node_name}: no quorum")
        losers = list(reads.result.losers)
        if losers:
            await self._handle_losers(voters, reads.bufs, win, losers, offset, rewrite, findings)
        return win

    async def _handle_losers(
        self, voters: list[ChildSlot], bufs: Sequence[Buffer | None] | dict[int, Buffer],
        win: Buffer,
        losers: list[int], offset: int, rewrite: bool, findings: dict[str, int] | None,
    ) -> None:
        rewrites: list[Awaitable[None]] = []
        for i in losers:
            slot, buf = voters[i], bufs[i]
            assert buf is not None
            span = self.voted.diff_span(win, buf)
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
            await self.child_io(slot.node.pwrite(offset, data))
            slot.stats.repaired_bytes += len(data)
            log.info("rewrote %d bytes of %s at %d", len(data), slot.node.node_name, offset)
        except OSError as err:  # QEMU ignores rewrite errors too; we count them
            slot.stats.write_errors += 1
            self._report_bad(slot, "write", offset, len(data), err)

    # -- write-like operations --------------------------------------------------
    async def _write_all(
        self, op: str, offset: int, length: int, call: Callable[[BlockNode], Awaitable[None]],
        *, data: Buffer | None = None, fua: bool = False,
    ) -> None:
        self.last_client_io = time.monotonic()
        async with self.lock.hold(offset, length, exclusive=True):
            intent = self.write_intent
            if intent is not None:
                await intent.mark(offset, length)
            targets = self.writable()
            for s in targets:
                s.stats.writes += 1
            try:
                errs = await self.voted.write([s.node for s in targets], offset, length, call,
                                              data=data, fua=fua, limit=self.child_timeout)
                self._account_write(op, offset, length, targets, errs)
            finally:
                if intent is not None:
                    intent.done(offset, length)

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
            raise oserror(self._voted_errno(failed),
                          f"{self.node_name}: {op} failed on too many children")
        for slot, err in zip(targets, errs, strict=True):
            if err is not None:
                self.members.count_error(slot)  # first: a lost link makes it unreachable
                self._missed_write(slot, offset, length)
        self.members.written(offset, length)  # absent children catch up on it later

    # -- serve now (the Direct capability the NBD server tries first) ----------------
    def _plan(self) -> _FastPlan:
        """Who the fast paths read and write, and their descriptors: worked out once
        per membership change (Members' on_change drops it), not per request."""
        plan = self._fast
        if plan is None:
            voters = self.active()
            fifo = self.read_pattern is ReadPattern.FIFO
            if fifo:
                voters = voters[:1]  # fifo reads the first child; errors take the full path
            targets = self.writable()
            soon_read = None if fifo else _soon_fds([s.node for s in voters])
            soon_write = _soon_fds([s.node for s in targets])
            plan = self._fast = _FastPlan(
                voters, self.voted.descriptors([s.node for s in voters]),
                1 if fifo else self.vote_threshold,
                targets, self.voted.descriptors([s.node for s in targets]),
                sum(1 for t in targets if t.state is ChildState.ACTIVE),
                soon_read, soon_write,
                _the_one([s.node for s in voters], soon_read)
                if len(voters) - 1 >= max(self.vote_threshold, 2) else None,
                _the_one([s.node for s in targets], soon_write))
        return plan

    def _drop_plan(self) -> None:
        self._fast = None

    def read_width(self) -> int:
        """Buffers a read holds until its vote: one per voter (one with fifo)."""
        return max(1, len(self._plan().voters))

    def _try_pread_now(self, offset: int, length: int) -> Buffer | None:
        """Serve a small read without awaiting anything, or return None.

        Only the common case qualifies: quorum read pattern, every active child
        a descriptor, no overlapping write queued or running, the bytes in the
        page cache, and every child read OK and agreeing.  Anything else
        (None) takes the full path, which may redo the read: reads are
        idempotent, and the full path does the reporting and repair.
        """
        plan = self._plan()
        if plan.read_fds is None:
            return None if plan.one_late is None else self._pread_one_late(plan, offset, length)
        if self.lock.would_block(offset, length, exclusive=False):
            return None
        data = self.voted.read_fds_now(plan.read_fds, offset, length, plan.threshold)
        if data is None:
            return None
        self.last_client_io = time.monotonic()
        for slot in plan.voters:
            slot.stats.reads += 1
        return data

    def _bounds_itself(self, d: Direct) -> bool:
        """Whether ``d`` ends every request within the child timeout by itself (the
        one-late paths start no timer of their own)."""
        return d.time_limit is not None and d.time_limit <= self.child_timeout

    def _pread_one_late(self, plan: _FastPlan, offset: int, length: int) -> Buffer | None:
        """A small read answered now while one voter, on another host, is still
        being read: the descriptors are read on the event loop, and when they all
        agree no version the last one sends can win, so their bytes are the
        answer (the soon path's early answer, without its future and callbacks).
        The shared range lock is held until the late child has answered; its
        bytes are then compared with the answer, and a child that differs or
        fails is reported (and rewritten) as on the soon path.  None: the soon
        path's general case (nothing was sent; reads are idempotent)."""
        assert plan.one_late is not None and plan.soon_read_fds is not None
        i, d = plan.one_late
        if not self._bounds_itself(d) or not self._may_answer_early(length):
            return None
        entry = self.lock.try_acquire(offset, length, exclusive=False)
        if entry is None:
            return None
        try:
            agreed = self.voted.read_agreed_now(plan.soon_read_fds, offset, length)
        except BaseException:
            self.lock.release(entry)
            raise
        if agreed is None:
            self.lock.release(entry)
            return None
        win: Buffer = agreed
        voters = plan.voters

        def late(buf: Any, err: BaseException | None) -> None:
            self._late_bytes -= length
            self._late_reads -= 1
            if not self._late_reads and self._late_idle is not None:
                self._late_idle.set()
            try:
                if err is None and not self.voted.differ(win, buf):
                    self.lock.release(entry)  # the usual case: it agrees
                    return
                bufs: list[Buffer | None] = [win] * len(voters)
                errs: list[OSError | None] = [None] * len(voters)
                if err is None:
                    bufs[i] = buf
                else:
                    bufs[i] = None
                    errs[i] = err if isinstance(err, OSError) else oserror(errno.EIO, str(err))
                reads = Reads(bufs, errs, self.voted.vote_now(bufs, plan.threshold))
                task = self.voted.running_loop().create_task(
                    self._follow_soon(voters, reads, win, [i], offset, length, entry))
            except Exception:  # (a callback must not raise) never leave the range locked
                log.exception("comparing the late child of a read at %d+%d", offset, length)
                self.lock.release(entry)
                return
            self._late.add(task)
            task.add_done_callback(self._late.discard)

        if not d.call_pread(offset, length, late):
            self.lock.release(entry)
            return None
        self.last_client_io = time.monotonic()
        for slot in voters:
            slot.stats.reads += 1
        self._late_bytes += length
        self._late_reads += 1
        return win

    def _try_pwrite_now(self, offset: int, data: Buffer) -> bool:
        """Do a small write without awaiting anything; False: take the full path.

        Qualifies when every writable child is a descriptor, nothing overlaps
        it in the range lock, the write-intent log has the regions durable
        already, and the page cache takes the data without blocking.  Once
        written, errors are handled here exactly as on the full path (this
        raises OSError when fewer than vote-threshold children took it).
        """
        length = len(data)
        plan = self._plan()
        if plan.write_fds is None or self.lock.would_block(offset, length, exclusive=True):
            return False
        targets = plan.targets
        intent = self.write_intent
        if intent is not None and not intent.mark_now(offset, length):
            return False
        try:
            codes = self.voted.write_fds_now(plan.write_fds, offset, data)
            if codes is None:
                return False
            self.last_client_io = time.monotonic()
            for slot in targets:
                slot.stats.writes += 1
            if any(codes):
                self._account_write("write", offset, length, targets,
                                    [None if c == 0 else oserror(c, s.node.node_name)
                                     for c, s in zip(codes, targets, strict=True)])
            elif plan.active_targets < self.vote_threshold:  # _account_write raises
                self._account_write("write", offset, length, targets, [None] * len(targets))
            else:
                self.members.written(offset, length)
            return True
        finally:
            if intent is not None:
                intent.done(offset, length)

    def _try_pread_soon(self, offset: int, length: int) -> asyncio.Future[Buffer] | None:
        """Start a small read without a task when some voter is on another host
        (the descriptors read on the event loop, the others through their soon
        path), or None (take the full path).  The shared range lock is held
        until every child has answered; a read that is not unanimous is judged
        by the full path's code (reports, repair) in a task."""
        plan = self._plan()
        fds = plan.soon_read_fds
        if fds is None:
            return None
        entry = self.lock.try_acquire(offset, length, exclusive=False)
        if entry is None:
            return None
        voters = plan.voters
        nodes = [s.node for s in voters]
        soon = self.voted.read_soon(nodes, fds, offset, length, plan.threshold,
                                    self.child_timeout)
        if soon is None:
            self.lock.release(entry)
            return None
        self.last_client_io = time.monotonic()
        for slot in voters:
            slot.stats.reads += 1
        loop = self.voted.running_loop()
        out: asyncio.Future[Buffer] = loop.create_future()
        early = soon.early() if self._may_answer_early(length) else None
        if early is not None:
            out.set_result(early[0])  # the others are compared when they answer
            self._late_started(soon.out, length)

        def judged(task: asyncio.Future[Buffer]) -> None:
            self.lock.release(entry)
            _pass_on(task, out)

        def voted(f: asyncio.Future[Reads]) -> None:
            reads = f.result() if f.exception() is None else None
            if reads is not None and reads.unanimous:
                self.lock.release(entry)
                if not out.done():
                    out.set_result(reads.winner)  # type: ignore[arg-type]
                return
            if reads is None:
                judged(f)  # type: ignore[arg-type]
            elif early is not None:
                task = loop.create_task(self._follow_soon(voters, reads, early[0], early[1],
                                                          offset, length, entry))
                self._late.add(task)
                task.add_done_callback(self._late.discard)
            else:
                loop.create_task(self._judge(voters, reads, offset, length,
                                             self.rewrite_corrupted, None)
                                 ).add_done_callback(judged)

        soon.out.add_done_callback(voted)
        return out

    async def _follow_soon(self, voters: list[ChildSlot], reads: Reads, win: Buffer,
                           late: list[int], offset: int, length: int, entry: Any) -> None:
        """A soon-path read answered early whose later children were not unanimous
        with it: each is reported and (with rewrite-corrupted) rewritten, as
        _follow_late does on the full path; the range lock is released after."""
        try:
            for i in late:
                err, buf = reads.errors[i], reads.bufs[i]
                slot = voters[i]
                if err is not None:
                    slot.stats.read_errors += 1
                    self._report_bad(slot, "read", offset, length, err)
                    self.members.count_error(slot)
                elif buf is not None:
                    await self._handle_losers(voters, {i: buf}, win, [i], offset,
                                              self.rewrite_corrupted, None)
        except Exception:  # never let a background comparison fail silently
            log.exception("following the late children of a read at %d+%d", offset, length)
        finally:
            self.lock.release(entry)

    def _try_pwrite_soon(self, offset: int, data: Buffer) -> asyncio.Future[None] | None:
        """Start a small write without a task when some child is on another host,
        or None (take the full path).  The exclusive range lock and the
        write-intent mark are held until every child has answered; the outcome
        is judged as on the full path."""
        out: asyncio.Future[None] = self.voted.running_loop().create_future()
        return out if self._call_pwrite_soon(offset, data, settler(out)) else None

    def _call_pwrite_soon(self, offset: int, data: Buffer, then: Then) -> bool:
        """_try_pwrite_soon with a callback: ``then(None, None)`` or ``then(None,
        OSError)`` once every child has answered, never from within this call;
        False: nothing was written."""
        plan = self._plan()
        fds = plan.soon_write_fds
        if fds is None:
            return False
        length = len(data)
        entry = self.lock.try_acquire(offset, length, exclusive=True)
        if entry is None:
            return False
        intent = self.write_intent
        if intent is not None and not intent.mark_now(offset, length):
            self.lock.release(entry)
            return False
        targets = plan.targets
        try:
            if plan.one_late_write is not None and self._pwrite_one_late(
                    plan, offset, data, entry, intent, then):
                return True
        except BaseException:  # (a failure before its callback exists) never leave it locked
            if intent is not None:
                intent.done(offset, length)
            self.lock.release(entry)
            raise

        def written(errs: list[OSError | None]) -> None:
            # judged once every child answered, before the client hears of it
            try:
                self._account_write("write", offset, length, targets, errs)
            finally:
                if intent is not None:
                    intent.done(offset, length)
                self.lock.release(entry)

        out = self.voted.write_soon([s.node for s in targets], fds, offset, data,
                                    self.child_timeout, written)
        if out is None:
            if intent is not None:
                intent.done(offset, length)
            self.lock.release(entry)
            return False
        self.last_client_io = time.monotonic()
        for slot in targets:
            slot.stats.writes += 1
        out.add_done_callback(lambda f: tell(f, then))
        return True

    def _late_writer(self, length: int) -> native.Writer | None:
        """The writing thread for a small write whose far child is waited on anyway,
        or None: the files are written on the loop then (turned off, a write too
        big for the fast path, a job stuck on a disk past INLINE_STALL, or
        WRITER_MAX jobs queued)."""
        if not LATE_WRITER or length > INLINE_MAX:
            return None
        writer = self._writer
        if writer is None:
            writer = self._writer = native.Writer(self.voted.running_loop())
            self._on_close.append(writer.close)
        elif (writer.closed or writer.pending >= WRITER_MAX
              or writer.busy_for() > INLINE_STALL):
            return None
        return writer

    def _pwrite_one_late(self, plan: _FastPlan, offset: int, data: Buffer, entry: Any,
                         intent: WriteIntent | None, then: Then) -> bool:
        """A small write when one target is on another host: the descriptors are
        written on the event loop and the far one's request goes out; the write
        is judged, the range lock and write-intent mark let go, and ``then``
        told, from the far one's callback (the general case without its gather
        and futures).  False: nothing was written (the general case takes it)."""
        assert plan.one_late_write is not None and plan.soon_write_fds is not None
        i, d = plan.one_late_write
        length = len(data)
        if not self._bounds_itself(d) or not d.takes(length):
            return False  # (a request the far child would split: the general case)
        fds = plan.soon_write_fds
        targets = plan.targets
        writer = self._late_writer(length)
        job: native.WriteJob | None = None
        codes: list[int] | None = None
        pinned: list[Direct] = []  # the descriptors' nodes, open until the job is done
        if writer is not None:
            # the files are written beside the loop while the far request travels
            job = writer.submit(self.voted.inline(fds), offset, data)
            for slot, fd in zip(targets, fds, strict=True):
                x = slot.node.direct() if fd >= 0 else None
                if x is not None:
                    x.pin()
                    pinned.append(x)
        else:
            codes = self.voted.write_fds_now(fds, offset, data)
            if codes is None:
                return False  # the page cache pushed back: nothing written

        def unpin(_codes: list[int] | None = None) -> None:
            for x in pinned:
                try:  # (a close put off until now may fail: every pin still goes)
                    x.unpin()
                except Exception:
                    log.exception("closing a file after a write at %d+%d", offset, length)

        def written(result: Any, err: BaseException | None) -> None:
            if job is not None and writer is not None:
                writer.when_done(job, lambda local: judged(local, err))
            else:
                assert codes is not None
                judged(codes, err)

        def judged(codes: list[int], err: BaseException | None) -> None:
            unpin()
            failed: BaseException | None = None
            try:
                # (codes: 0 written, -1 skipped, else the errno)
                errs: list[BaseException | None] = (
                    [None] * len(targets) if max(codes) <= 0 else
                    [None if c <= 0 else oserror(c, s.node.node_name)
                     for c, s in zip(codes, targets, strict=True)])
                if err is not None:
                    errs[i] = err if isinstance(err, OSError) else oserror(errno.EIO, str(err))
                # judged by the children's states now, as the general case does
                self._account_write("write", offset, length, targets, errs)
            except Exception as e:  # (a callback must not raise) the write's outcome
                failed = e
            finally:
                if intent is not None:
                    intent.done(offset, length)
                self.lock.release(entry)
            try:
                then(None, failed)
            except Exception:  # told once: the caller's callback must not raise
                log.exception("telling the outcome of a write at %d+%d", offset, length)

        self.last_client_io = time.monotonic()
        for slot in targets:
            slot.stats.writes += 1
        try:
            sent = d.call_pwrite(offset, data, written)
        except Exception as e:
            if job is None:
                raise  # (written already: the caller lets the lock go)
            # the files' job cannot be taken back: the range stays locked until the
            # thread wrote it, and the write is judged with the far child failed
            log.exception("sending a write at %d+%d to %s", offset, length,
                          targets[i].node.node_name)
            self.voted.running_loop().call_soon(written, None, e)
            return True
        except BaseException:
            if job is not None and writer is not None:  # (the caller lets the lock go)
                writer.when_done(job, unpin)
            raise
        if not sent:
            # the link went: written here, not there (as the gather counts it); told
            # one loop turn later, as every outcome
            self.voted.running_loop().call_soon(
                written, None, oserror(errno.ENOTCONN, targets[i].node.node_name))
        return True

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self._write_all("write", offset, len(data),
                              lambda n: n.pwrite(offset, data, fua=fua), data=data, fua=fua)

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
        outs = await asyncio.gather(*(self.child_io(s.node.flush()) for s in targets),
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
                self.members.count_error(slot)
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

    # -- thin copies (thin.py) ------------------------------------------------------------
    async def zero_extents(self, offset: int, length: int) -> list[Extent]:
        """Where every active child reads zeros: extents with ``STATE_ZERO`` set only
        where each voter's block status says ZERO (the one rule for resync,
        catch-up and scrub; anything a voter cannot vouch for is data)."""
        return await all_zero([s.node for s in self.active()], offset, length,
                              limit=self.child_timeout)

    async def copy_to(self, target: BlockNode, offset: int, length: int) -> Copied:
        """Make ``target`` read the voted bytes of [offset, offset+length), writing
        only data: zero ranges become holes (or WRITE_ZEROES) unless the target
        reads zero there already.  The caller holds the exclusive range lock."""
        return await copy_voted(target, offset, length, zero_map=self.zero_extents,
                                read_voted=self.read_voted, child_io=self.child_io,
                                limit=self.child_timeout)

    # -- health -------------------------------------------------------------------
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
            if slot.state is ChildState.UNREACHABLE:
                if not problem:
                    self.members.returned(slot)  # its link is back: catch up
                elif not isinstance(problem, Unreachable):
                    self.members.fault(slot, problem)
                continue
            if isinstance(problem, Unreachable):
                # a link that went down with no request under way: no read or write
                # failed, so no QUORUM_REPORT_BAD (a request in flight reports its own
                # failure); the state change is the child's event
                self.members.unreachable(slot, problem)
                found.append((slot, str(problem)))
            elif problem:
                # its image is gone or resized: every byte of it is bad, reported as an
                # error (with its reason) for those that watch QUORUM_REPORT_BAD only
                self._report_bad(slot, "read", 0, 0, oserror(errno.EIO, problem))
                self.members.fault(slot, problem)
                found.append((slot, problem))
        return found

    def health(self) -> str | None:
        left = len(self.active())
        if left < self.vote_threshold:
            return f"{left} children in sync, fewer than the vote threshold {self.vote_threshold}"
        return None

    async def run_health_checks(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check_health()

