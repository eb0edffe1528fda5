"""Voted I/O: the one way to read N children and vote, and to write N children.

Every caller that reads a quorum's children and votes (the quorum node's
reads and its fast path, the worker processes, scrub through the quorum,
crash recovery) and every caller that writes them all goes through
``VotedIO``; no other module calls the C core's read, vote or write
functions.

A child is anything that can be read and written asynchronously (a
BlockNode).  Children whose ``direct()`` offers a file descriptor are grouped
into one GIL-free C call (``native.pread_vote`` / ``pwrite_all``): one thread
hop for N children is where the speed comes from.  Every other child is
awaited alongside that call, under the child timeout, and the vote then runs
over all the buffers.  In the common case (every child a file, small
request, bytes in the page cache) the C call runs on the event loop itself
(``read_now`` / ``write_now``): a hop to a thread and back costs ten times
more than a 4 KiB read.  Where the file system supports RWF_NOWAIT the
kernel says when a call would block and the request goes to the pool
instead; where it cannot tell (tmpfs), a plain call is made and timed, and a
slow one sends small requests to the pool for a second.

Big reads take their per-child buffers from the process's pool of spare
buffers (nbdquorum/buffers.py) instead of zero-filling fresh ones.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nbdquorum import native
from nbdquorum.block import aio
from nbdquorum.block.node import BlockNode, Buffer, Direct, error_of, oserror
from nbdquorum.block.vote import VoteResult
from nbdquorum.buffers import SPARES

T = TypeVar("T")

PreadVote = tuple[VoteResult, list[bytearray], list[int]]

#: requests up to this size are served on the event loop when the page cache allows
INLINE_MAX = 64 << 10
#: an inline call slower than this (s) moves small requests back to the pool for
#: a second (only where RWF_NOWAIT cannot say; scheduling noise stays below it)
INLINE_STALL = 0.02
#: votes over at least this many bytes run on the pool, not the event loop
VOTE_ON_POOL = 65536


@dataclass(slots=True)
class Reads:
    """What reading N children at one range gave, before anyone judges it."""

    bufs: list[Buffer | None]  #: per child: its bytes, or None if it failed
    errors: list[OSError | None]  #: per child: its error, or None
    result: VoteResult  #: the vote over ``bufs`` at the threshold asked for
    #: children still being read when the vote was already decided (``early``):
    #: index -> the task that gives their bytes or error (the caller follows them)
    late: dict[int, asyncio.Task[Buffer | OSError]] = field(default_factory=dict)

    @property
    def unanimous(self) -> bool:
        """Every child read OK and all agreed (nothing to report or repair)."""
        return (self.result.winner is not None and not any(self.errors)
                and len(self.result.winners) == len(self.bufs))

    @property
    def winner(self) -> Buffer | None:
        w = self.result.winner
        return None if w is None else self.bufs[w]


def _directs(nodes: Sequence[BlockNode]) -> list[Direct | None]:
    return [n.direct() for n in nodes]


def _fds(directs: Sequence[Direct | None]) -> list[int] | None:
    """The descriptors of all children, or None unless every child has one."""
    fds = [d.fd if d is not None else None for d in directs]
    return None if None in fds else fds  # type: ignore[return-value]


async def timed(aw: Awaitable[T], limit: float | None) -> T:
    """Await a child's I/O for at most ``limit`` seconds (None: no limit); ETIMEDOUT after."""
    if limit is None:
        return await aw
    try:
        return await asyncio.wait_for(aw, limit)
    except TimeoutError:
        raise oserror(errno.ETIMEDOUT, "child did not answer") from None


def _decided(bufs: Sequence[Buffer | None], threshold: int, pending: int) -> bool:
    """Whether the vote over ``bufs`` is won whatever ``pending`` more children say:
    the winner has ``threshold`` and more than any other version could reach."""
    if sum(b is not None for b in bufs) < threshold:
        return False
    result = native.vote(bufs, threshold)
    if result.winner is None:
        return False
    sizes: dict[int, int] = {}
    for g in result.groups:
        if g >= 0:
            sizes[g] = sizes.get(g, 0) + 1
    win = sizes.pop(result.groups[result.winner])
    return win > max(sizes.values(), default=0) + pending


class _Gather:
    """Collects the futures of one request's children (no task): each outcome goes
    to ``bufs``/``errs`` by index (``got`` keeps the raw ones), and ``out`` gets
    ``result()`` once all have answered or ``limit`` seconds passed (the rest:
    ETIMEDOUT)."""

    __slots__ = ("bufs", "errs", "expired", "got", "left", "make", "out", "started", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, started: dict[int, asyncio.Future[Any]],
                 bufs: list[Buffer | None] | None, errs: list[OSError | None],
                 limit: float | None, make: Callable[[], Any],
                 got: dict[int, Any] | None = None) -> None:
        self.out: asyncio.Future[Any] = loop.create_future()
        self.started = started
        self.bufs = bufs
        self.errs = errs
        self.make = make
        self.got = got
        self.left = len(started)
        self.expired = False
        self.timer = (loop.call_later(limit, self._expire)
                      if limit is not None and started else None)
        if not started:
            self._finish()
        for i, f in started.items():
            f.add_done_callback(lambda f, i=i: self._one(i, f))  # type: ignore[misc]

    def _one(self, i: int, f: asyncio.Future[Any]) -> None:
        if self.out.done():
            if not f.cancelled():
                f.exception()  # retrieved: the request was already given up
            return
        if f.cancelled():
            err: BaseException | None = (
                oserror(errno.ETIMEDOUT, "child did not answer") if self.expired
                else oserror(errno.ECANCELED, "child request cancelled"))
        else:
            err = f.exception()
        if err is None:
            value = f.result()
            if self.got is not None:
                self.got[i] = value
            if self.bufs is not None and i >= 0:
                self.bufs[i] = value
        elif i >= 0:
            self.errs[i] = err if isinstance(err, OSError) else oserror(errno.EIO, str(err))
        elif self.got is not None:
            self.got[i] = err if isinstance(err, OSError) else oserror(errno.EIO, str(err))
        self.left -= 1
        if self.left == 0 or (self.expired and self._pool_done()):
            self._finish()

    def _pool_done(self) -> bool:
        """A write on the pool is never abandoned (its buffer and descriptors are busy)."""
        f = self.started.get(-1)
        return f is None or f.done()

    def _expire(self) -> None:
        self.expired = True
        for i, f in self.started.items():
            if not f.done() and i >= 0:
                self.errs[i] = oserror(errno.ETIMEDOUT, "child did not answer")
                # the child hears of it first (its callbacks run before this
                # request's): a lost link is then unreachable, not an error to count
                f.cancel()
        if self._pool_done():
            self._finish()

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.out.done():
            return
        try:
            self.out.set_result(self.make())
        except BaseException as err:
            self.out.set_exception(err)


class SoonReads(_Gather):
    """The children of one read started on the soon path (VotedIO.read_soon)."""

    __slots__ = ("threshold",)

    def __init__(self, loop: asyncio.AbstractEventLoop, started: dict[int, asyncio.Future[Any]],
                 bufs: list[Buffer | None], errs: list[OSError | None], limit: float | None,
                 make: Callable[[], Any], threshold: int) -> None:
        self.threshold = threshold
        super().__init__(loop, started, bufs, errs, limit, make)

    def early(self) -> tuple[Buffer, list[int]] | None:
        """The winner and the children still being read, if those that answered all
        agree, none failed, and no version the others could send can still win;
        else None (wait for ``out``)."""
        bufs = self.bufs
        assert bufs is not None
        if not self.left or any(self.errs):
            return None
        have = [b for b in bufs if b is not None]
        if len(have) < self.threshold or len(have) <= self.left:
            return None
        first = have[0]
        if any(self.diff(first, b) for b in have[1:]):
            return None
        # not yet taken in (a future may be done with its callback still queued)
        return first, [i for i in self.started if bufs[i] is None and self.errs[i] is None]

    @staticmethod
    def diff(a: Buffer, b: Buffer) -> bool:
        # a bytearray compares with any buffer by one memcmp (bytes and memoryview
        # only with their own kind: memoryview == x goes item by item)
        if isinstance(a, bytearray):
            return a != b
        if isinstance(b, bytearray) or (isinstance(a, bytes) and isinstance(b, bytes)):
            return b != a
        return native.diff_span(a, b) is not None


def _own_limit(d: Direct | None, limit: float | None) -> float | None:
    """``limit`` if a request started on ``d`` may outlive it (a timer must bound
    it), None if the node's own time limit already does."""
    if limit is None:
        return None
    bound = None if d is None else d.time_limit
    return limit if bound is None or bound > limit else None


def _soon_vote(bufs: list[Buffer | None], errs: list[OSError | None], threshold: int) -> Reads:
    """The vote of a soon-path read: every child read and equal to the first is the
    usual outcome, told by comparing bytes; anything else is voted in full."""
    first = bufs[0]
    if first is not None and not any(errs) and len(bufs) >= threshold:
        diff = SoonReads.diff
        if not any(b is None or diff(first, b) for b in bufs[1:]):
            return Reads(bufs, errs, VoteResult(0, (0,) * len(bufs)))
    return Reads(bufs, errs, native.vote(bufs, threshold))


class _Calls:
    """The awaited (non-descriptor) children's I/O of one request: one task each,
    started at once, and one timer for all of them (``limit`` seconds; a child
    still busy then gets ETIMEDOUT and its task is cancelled)."""

    __slots__ = ("expired", "tasks", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 calls: dict[int, Awaitable[Any]], limit: float | None) -> None:
        self.expired = False
        self.tasks: dict[int, asyncio.Task[Any]] = {
            i: loop.create_task(self._one(aw)) for i, aw in calls.items()}
        self.timer = (loop.call_later(limit, self._expire)
                      if limit is not None and self.tasks else None)

    async def _one(self, aw: Awaitable[Any]) -> Any:
        try:
            return await aw
        except OSError as err:
            return err
        except asyncio.CancelledError:
            if self.expired:
                return oserror(errno.ETIMEDOUT, "child did not answer")
            raise

    def _expire(self) -> None:
        self.expired = True
        for t in self.tasks.values():
            t.cancel()

    def _take(self, i: int, out: Any, bufs: list[Buffer | None] | None,
              errs: list[OSError | None]) -> None:
        if isinstance(out, OSError):
            errs[i] = out
        elif bufs is not None:
            bufs[i] = out

    async def all(self, bufs: list[Buffer | None] | None, errs: list[OSError | None]) -> None:
        """Wait for every child (each bounded by the timer)."""
        for i, t in self.tasks.items():
            self._take(i, await t, bufs, errs)
        self._stop_timer()

    async def until_decided(self, bufs: list[Buffer | None], errs: list[OSError | None],
                            threshold: int) -> None:
        """Wait until the vote over ``bufs`` is decided whatever the children still
        being read say (or all have answered); the rest are ``late()``."""
        pending = {t for t in self.tasks.values() if not t.done()}
        for i, t in self.tasks.items():
            if t.done():
                self._take(i, t.result(), bufs, errs)
        while pending and not _decided(bufs, threshold, len(pending)):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for i, t in self.tasks.items():
                if t in done:
                    self._take(i, t.result(), bufs, errs)
        if not pending:
            self._stop_timer()

    def late(self) -> dict[int, asyncio.Task[Any]]:
        """The children not collected yet (their timer keeps running)."""
        return {i: t for i, t in self.tasks.items() if not t.done()}

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def cancel(self) -> None:
        self._stop_timer()
        for t in self.tasks.values():
            t.cancel()


class VotedIO:
    """Reads-and-votes and writes-to-all over a list of children (see the module doc)."""

    def __init__(self) -> None:
        #: whether the children's file systems answer RWF_NOWAIT (reads / writes);
        #: re-probed after reset(), on every membership change
        self._nowait_reads = True
        self._nowait_writes = True
        #: small requests go to the pool until then (monotonic), after a slow inline call
        self._reads_off_until = 0.0
        self._writes_off_until = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the inline C calls' argument arrays, per list of descriptors
        self._inlines: dict[tuple[int, ...], native.Inline] = {}

    def reset(self) -> None:
        """The children changed: ask their file systems again."""
        self._nowait_reads = True
        self._nowait_writes = True
        self._inlines.clear()

    def inline(self, fds: list[int]) -> native.Inline:
        """The Inline of a list of descriptors (made once per list)."""
        key = tuple(fds)
        inline = self._inlines.get(key)
        if inline is None:
            if len(self._inlines) >= 16:
                self._inlines.clear()  # descriptors of children long gone
            inline = self._inlines[key] = native.Inline(key)
        return inline

    # -- reads ------------------------------------------------------------------------------
    def _inline_read(self, fds: list[int], offset: int, length: int, threshold: int,
                     ) -> PreadVote | None:
        inline = self.inline(fds)
        if self._nowait_reads:
            done = inline.pread_vote(offset, length, threshold, True)
            if not isinstance(done, str):
                return done
            self._nowait_reads = False  # the file system cannot tell; stop asking
        t0 = time.monotonic()
        if t0 < self._reads_off_until:
            return None
        out = inline.pread_vote(offset, length, threshold, False)
        assert not isinstance(out, str) and out is not None
        if time.monotonic() - t0 > INLINE_STALL:
            self._reads_off_until = time.monotonic() + 1.0
        return out

    @staticmethod
    def descriptors(nodes: Sequence[BlockNode]) -> list[int] | None:
        """Every node's descriptor, or None unless each has one (for read_fds_now)."""
        return _fds(_directs(nodes))

    def read_fds_now(self, fds: list[int], offset: int, length: int,
                     threshold: int) -> Buffer | None:
        """The quorum's fast path: the bytes, read on the caller's thread, if every
        descriptor read OK and all agreed; None otherwise (await ``read``)."""
        if length > INLINE_MAX or not fds:
            return None
        done = self._inline_read(fds, offset, length, threshold)
        if done is None:
            return None
        result, bufs, codes = done
        if result.winner is None or any(codes) or len(result.winners) != len(fds):
            return None
        return bufs[result.winner]

    def read_agreed_now(self, fds: list[int], offset: int, length: int) -> Buffer | None:
        """The bytes of the descriptors in ``fds`` (-1: a child skipped), read on the
        caller's thread, if each read OK and all agreed; None otherwise."""
        if length > INLINE_MAX or not fds:
            return None
        done = self._inline_read(fds, offset, length, 1)
        if done is None:
            return None
        result, bufs, _codes = done
        # a failed read does not vote: every descriptor in the winning version
        if result.winner is None or len(result.winners) != len(fds) - fds.count(-1):
            return None
        return bufs[result.winner]

    @staticmethod
    def differ(a: Buffer, b: Buffer) -> bool:
        """Whether two buffers' bytes differ (one memcmp for the usual kinds)."""
        return len(a) != len(b) or SoonReads.diff(a, b)

    def write_fds_now(self, fds: list[int], offset: int, data: Buffer) -> list[int] | None:
        """The quorum's fast path: per descriptor 0 or its errno, written on the
        caller's thread, or None (await ``write``)."""
        if len(data) > INLINE_MAX or not fds:
            return None
        return self._inline_write(fds, offset, data)

    def read_now(self, nodes: Sequence[BlockNode], offset: int, length: int,
                 threshold: int) -> Reads | None:
        """Read and vote on the caller's thread if every child is a descriptor, the
        request is small and the page cache has it; else None (await ``read``)."""
        if length > INLINE_MAX or not nodes:
            return None
        fds = _fds(_directs(nodes))
        if fds is None:
            return None
        done = self._inline_read(fds, offset, length, threshold)
        return None if done is None else self._reads(nodes, done)

    @staticmethod
    def _reads(nodes: Sequence[BlockNode],
               done: PreadVote) -> Reads:
        result, raw, codes = done
        bufs: list[Buffer | None] = [b if c == 0 else None for b, c in zip(raw, codes, strict=True)]
        errs = [None if c == 0 else oserror(c, n.node_name)
                for c, n in zip(codes, nodes, strict=True)]
        return Reads(bufs, errs, result)

    async def read(self, nodes: Sequence[BlockNode], offset: int, length: int, threshold: int,
                   *, limit: float | None = None,
                   fd_limit: float | None = None, early: bool = False) -> Reads:
        """Read every child and vote at ``threshold``.

        ``limit`` (seconds) bounds each awaited (non-descriptor) child; ``fd_limit``
        bounds the grouped C call (a descriptor child that hangs counts as
        ETIMEDOUT; its thread finishes in the background and keeps the
        descriptors pinned and the buffers until then).

        ``early``: return as soon as the vote is decided, that is when no other
        version can still reach the winner's count with the children still
        being read (awaited children only: the descriptors answer together).
        Those are in ``Reads.late``; the caller must follow them (compare,
        report) and may not let an overlapping write run until they end.
        """
        directs = _directs(nodes)
        fds = [d.fd if d is not None and d.fd is not None else -1 for d in directs]
        grouped = [i for i, fd in enumerate(fds) if fd >= 0]
        if len(grouped) == len(nodes):
            done = (self._inline_read(fds, offset, length, threshold)
                    if length <= INLINE_MAX else None)
            if done is None:
                done = await self._pread_pooled(directs, fds, offset, length, threshold,
                                                fd_limit)
            if done is None:  # the C call timed out
                return self._all_failed(nodes, errno.ETIMEDOUT)
            return self._reads(nodes, done)
        # mixed: the awaited children's requests go out first, then the descriptors
        # are read (on the event loop when small and cached, else one C call on the
        # pool), then the awaited children are collected under one timer
        loop = self.running_loop()
        others = [i for i in range(len(nodes)) if fds[i] < 0]
        calls = _Calls(loop, {i: nodes[i].pread(offset, length) for i in others}, limit)
        bufs: list[Buffer | None] = [None] * len(nodes)
        errs: list[OSError | None] = [None] * len(nodes)
        try:
            if grouped:
                done = (self._inline_read(fds, offset, length, 1)
                        if length <= INLINE_MAX else None)
                if done is None:
                    done = await self._pread_pooled(directs, fds, offset, length, 1,
                                                    fd_limit)
                self._fill_grouped(nodes, grouped, done, bufs, errs)
            if early:
                await calls.until_decided(bufs, errs, threshold)
            else:
                await calls.all(bufs, errs)
        except BaseException:
            calls.cancel()
            raise
        late = calls.late()
        return Reads(bufs, errs, await self.vote(bufs, threshold), late)

    def running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, remembered: asking asyncio costs a getpid() system call on
        Python 3.11, several per request otherwise."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def read_soon(self, nodes: Sequence[BlockNode], fds: list[int], offset: int,
                  length: int, threshold: int, limit: float | None,
                  ) -> SoonReads | None:
        """Read and vote without a task: the descriptors (``fds``, -1 for the
        others) on the caller's thread from the page cache, every other child
        through its ``soon_pread``; ``.out`` gives the Reads once all have
        answered (a child past ``limit`` seconds gets ETIMEDOUT), and
        ``early()`` the winner already decided by those that have.  None when a
        small request cannot start that way (nothing was read: await ``read``)."""
        if length > INLINE_MAX:
            return None
        n = len(nodes)
        bufs: list[Buffer | None] = [None] * n
        errs: list[OSError | None] = [None] * n
        if any(fd >= 0 for fd in fds):
            done = self._inline_read(fds, offset, length, 1)
            if done is None:
                return None
            _, raw, codes = done
            for i, fd in enumerate(fds):
                if fd >= 0:
                    if codes[i] == 0:
                        bufs[i] = raw[i]
                    else:
                        errs[i] = oserror(codes[i], nodes[i].node_name)
        started: dict[int, asyncio.Future[Any]] = {}
        timer = None
        for i, fd in enumerate(fds):
            if fd < 0:
                d = nodes[i].direct()
                f = None if d is None else d.soon_pread(offset, length)
                if f is None:
                    # what already started is dropped when it answers: its error
                    # taken then, not left for the loop to log as never retrieved
                    for g in started.values():
                        g.add_done_callback(error_of)
                    return None
                started[i] = f
                if timer is None:
                    timer = _own_limit(d, limit)
        return SoonReads(self.running_loop(), started, bufs, errs, timer,
                         lambda: _soon_vote(bufs, errs, threshold), threshold)

    def write_soon(self, nodes: Sequence[BlockNode], fds: list[int], offset: int,
                   data: Buffer, limit: float | None,
                   then: Callable[[list[OSError | None]], T],
                   ) -> asyncio.Future[T] | None:
        """Write every child without a task: the others' ``soon_pwrite`` first, then
        the descriptors (on the caller's thread when the page cache takes it, else
        one C call on the pool); once all have answered, ``then`` gets per child
        its error or None, and the future what ``then`` returns (or raises).
        None when the request cannot start that way (nothing was written)."""
        if len(data) > INLINE_MAX:
            return None
        n = len(nodes)
        errs: list[OSError | None] = [None] * n
        started: dict[int, asyncio.Future[Any]] = {}
        timer = None  # a write on the pool is never abandoned: no timer for it
        for i, fd in enumerate(fds):
            if fd < 0:
                d = nodes[i].direct()
                f = None if d is None else d.soon_pwrite(offset, data)
                if f is None:
                    if not started:
                        return None  # nothing written yet
                    errs[i] = oserror(errno.ENOTCONN, nodes[i].node_name)
                    continue
                started[i] = f
                if timer is None:
                    timer = _own_limit(d, limit)
        loop = self.running_loop()
        grouped = [i for i, fd in enumerate(fds) if fd >= 0]
        if grouped:
            codes = self._inline_write(fds, offset, data)
            if codes is None:  # the page cache pushed back: the pool, as one more child
                directs = _directs(nodes)
                started[-1] = loop.create_task(
                    self._pwrite_pooled(directs, fds, offset, data, False))
            else:
                for i in grouped:
                    if codes[i] != 0:
                        errs[i] = oserror(codes[i], nodes[i].node_name)

        def result() -> T:
            pooled = got.get(-1)
            if pooled is not None:
                for i in grouped:
                    if isinstance(pooled, OSError):
                        errs[i] = pooled
                    elif pooled[i] != 0:
                        errs[i] = oserror(pooled[i], nodes[i].node_name)
            return then(errs)

        got: dict[int, Any] = {}
        return _Gather(loop, started, None, errs, timer, result, got).out

    @staticmethod
    def _fill_grouped(nodes: Sequence[BlockNode], grouped: list[int],
                      grouped_out: PreadVote | None, bufs: list[Buffer | None],
                      errs: list[OSError | None]) -> None:
        for i in grouped:
            if grouped_out is None:
                errs[i] = oserror(errno.ETIMEDOUT, nodes[i].node_name)
                continue
            _, raw, codes = grouped_out
            if codes[i] == 0:
                bufs[i] = raw[i]
            else:
                errs[i] = oserror(codes[i], nodes[i].node_name)

    async def _pread_pooled(
        self, directs: Sequence[Direct | None], fds: list[int], offset: int, length: int,
        threshold: int, limit: float | None,
    ) -> PreadVote | None:
        """The grouped C call on the I/O pool; None if it outlived ``limit`` seconds."""
        pinned = [d for d in directs if d is not None and d.fd is not None]
        for d in pinned:
            d.pin()
        # (a child not read here, fd -1, needs no buffer)
        bufs = ([SPARES.take(length) if fd >= 0 else bytearray() for fd in fds]
                if length >= SPARES.min_size else None)
        fut = self.running_loop().run_in_executor(
            aio.pool(), native.pread_vote, fds, offset, length, threshold, bufs)

        def finished(f: asyncio.Future[PreadVote]) -> None:  # the thread is done
            for d in pinned:
                d.unpin()
            if not f.cancelled():
                f.exception()  # retrieved (it is also awaited unless we timed out)

        fut.add_done_callback(finished)
        try:
            if limit is None:
                out = await asyncio.shield(fut)
            else:
                out = await asyncio.wait_for(asyncio.shield(fut), limit)
        except TimeoutError:
            return None  # (the thread holds the buffers until it ends: none is reused)
        return out

    @staticmethod
    def _all_failed(nodes: Sequence[BlockNode], code: int) -> Reads:
        n = len(nodes)
        return Reads([None] * n, [oserror(code, x.node_name) for x in nodes],
                     VoteResult(None, (-1,) * n))

    async def vote(self, bufs: Sequence[Buffer | None], threshold: int) -> VoteResult:
        """Vote over buffers already read (big ones on the pool)."""
        size = max((len(b) for b in bufs if b is not None), default=0)
        if size >= VOTE_ON_POOL:
            return await self.running_loop().run_in_executor(
                aio.pool(), native.vote, bufs, threshold)
        return native.vote(bufs, threshold)

    @staticmethod
    def vote_now(bufs: Sequence[Buffer | None], threshold: int) -> VoteResult:
        return native.vote(bufs, threshold)

    @staticmethod
    def diff_span(a: Buffer, b: Buffer) -> tuple[int, int] | None:
        """(first differing byte, one past the last), or None if equal."""
        return native.diff_span(a, b)

    # -- writes -----------------------------------------------------------------------------
    def _inline_write(self, fds: list[int], offset: int, data: Buffer) -> list[int] | None:
        """A small write on the event loop: non-blocking where the kernel can
        tell, else a plain buffered pwrite (microseconds unless write-back
        pushes back, which turns inline writes off for a second)."""
        t0 = time.monotonic()
        if t0 < self._writes_off_until:
            return None
        inline = self.inline(fds)
        if self._nowait_writes:
            codes = inline.pwrite_all(offset, data, True)
            if codes is None:
                return None
            if not isinstance(codes, str):
                return codes
            self._nowait_writes = False  # the file system cannot tell; stop asking
        codes = inline.pwrite_all(offset, data, False)
        assert not isinstance(codes, str) and codes is not None
        if time.monotonic() - t0 > INLINE_STALL:
            self._writes_off_until = time.monotonic() + 1.0
        return codes

    def write_now(self, nodes: Sequence[BlockNode], offset: int,
                  data: Buffer) -> list[OSError | None] | None:
        """Write a small request on the caller's thread if every child is a
        descriptor and the page cache takes it at once; else None."""
        if len(data) > INLINE_MAX or not nodes:
            return None
        fds = _fds(_directs(nodes))
        if fds is None:
            return None
        codes = self._inline_write(fds, offset, data)
        return None if codes is None else self._errors(nodes, codes)

    @staticmethod
    def _errors(nodes: Sequence[BlockNode], codes: Sequence[int]) -> list[OSError | None]:
        return [None if c == 0 else oserror(c, n.node_name)
                for c, n in zip(codes, nodes, strict=True)]

    async def write(
        self, nodes: Sequence[BlockNode], offset: int, length: int,
        call: Callable[[BlockNode], Awaitable[None]], *, data: Buffer | None = None,
        fua: bool = False, limit: float | None = None,
    ) -> list[OSError | None]:
        """Apply a write-like operation to every child; per child, its error or None.

        With ``data`` (a plain write), the descriptor children are written in
        one C call (inline when small and cheap, unless ``fua``); every other
        child, and every child of other operations, gets ``call(node)``
        under ``limit`` seconds.
        """
        directs = _directs(nodes)
        fds = [d.fd if d is not None and d.fd is not None else -1 for d in directs]
        grouped = [i for i, fd in enumerate(fds) if fd >= 0] if data is not None else []
        if data is not None and grouped and len(grouped) == len(nodes):
            codes = None
            if not fua and length <= INLINE_MAX:
                codes = self._inline_write(fds, offset, data)
            if codes is None:
                codes = await self._pwrite_pooled(directs, fds, offset, data, fua)
            return self._errors(nodes, codes)
        in_c = set(grouped)
        others = [i for i in range(len(nodes)) if i not in in_c]
        loop = self.running_loop()
        calls = _Calls(loop, {i: call(nodes[i]) for i in others}, limit)
        errs: list[OSError | None] = [None] * len(nodes)
        try:
            if grouped and data is not None:
                got: list[int] | None = None
                if not fua and length <= INLINE_MAX:
                    got = self._inline_write(fds, offset, data)
                try:
                    if got is None:
                        got = await self._pwrite_pooled(directs, fds, offset, data, fua)
                except OSError as err:
                    for i in grouped:
                        errs[i] = err
                else:
                    for i in grouped:
                        if got[i] != 0:
                            errs[i] = oserror(got[i], nodes[i].node_name)
            await calls.all(None, errs)
        except BaseException:
            calls.cancel()
            raise
        return errs

    async def _pwrite_pooled(self, directs: Sequence[Direct | None], fds: list[int],
                             offset: int, data: Buffer, fua: bool) -> list[int]:
        pinned = [d for d in directs if d is not None and d.fd is not None]
        for d in pinned:
            d.pin()
        try:
            return await self.running_loop().run_in_executor(
                aio.pool(), native.pwrite_all, fds, offset, data, fua)
        finally:
            for d in pinned:
                d.unpin()
