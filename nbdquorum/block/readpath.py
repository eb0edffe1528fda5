"""The parts of a voted read shared by the quorum node and a worker's local reads.

* ``InlineReads``: small reads served on the event loop when the page cache
  allows.  A hop to a worker thread and back costs ten times more than a
  4 KiB read (docs/performance.md).  Where the file system supports
  RWF_NOWAIT the kernel says when a call would block and the request goes to
  the pool instead; where it cannot tell (tmpfs), a plain call is made and
  timed, and a slow one sends small reads to the pool for a while.
* ``BufferPool``: big reads borrow their per-child buffers instead of
  zero-filling fresh ones for every request.
"""

from __future__ import annotations

import time

from nbdquorum import native
from nbdquorum.block.node import Buffer
from nbdquorum.block.vote import VoteResult

#: requests up to this size are served on the event loop when the page cache allows
INLINE_MAX = 64 << 10
#: an inline call slower than this (s) moves small requests back to the pool for
#: a second (only where RWF_NOWAIT cannot say; scheduling noise stays below it)
INLINE_STALL = 0.02
#: reads at least this big borrow their buffers from a pool
POOL_MIN = 128 << 10
#: at most this many bytes of spare buffers are kept, all sizes together (per
#: process; in docs/performance.md's memory bound)
POOL_BYTES = 16 << 20

ReadOutcome = tuple[VoteResult, list[bytearray], list[int]]


class InlineReads:
    def __init__(self) -> None:
        #: whether the children's file systems answer RWF_NOWAIT (re-probed
        #: after reset(), on every membership change)
        self.nowait = True
        #: small reads go to the pool until then (monotonic)
        self.off_until = 0.0

    def reset(self) -> None:
        self.nowait = True

    def pread(self, fds: list[int], offset: int, length: int, threshold: int) -> ReadOutcome | None:
        """Read and vote on the event loop, or None: take the pool path."""
        if self.nowait:
            done = native.pread_vote_nowait(fds, offset, length, threshold)
            if not isinstance(done, str):
                return done
            self.nowait = False  # the file system cannot tell; stop asking
        if time.monotonic() < self.off_until:
            return None
        t0 = time.monotonic()
        out = native.pread_vote(fds, offset, length, threshold)
        if time.monotonic() - t0 > INLINE_STALL:
            self.off_until = time.monotonic() + 1.0
        return out


class BufferPool:
    def __init__(self, limit: int = POOL_BYTES) -> None:
        self.limit = limit
        self.kept = 0  # bytes in the free lists
        self._free: dict[int, list[bytearray]] = {}

    def take(self, n: int, length: int, lent: list[bytearray]) -> list[bytearray] | None:
        """n buffers of ``length`` bytes (recorded in ``lent``), or None below POOL_MIN."""
        if length < POOL_MIN:
            return None
        free = self._free.get(length)
        bufs = []
        for _ in range(n):
            if free:
                bufs.append(free.pop())
                self.kept -= length
            else:
                bufs.append(bytearray(length))
        lent.extend(bufs)
        return bufs

    def give_back(self, lent: list[bytearray], keep: Buffer | None) -> None:
        """Return borrowed buffers, except the one handed to the caller (it is sent)."""
        length = len(lent[0])
        for b in lent:
            if b is keep:
                continue
            if self.kept + length > self.limit:
                self._evict(length)
                if self.kept + length > self.limit:
                    return  # dropped: freed
            self._free.setdefault(length, []).append(b)
            self.kept += length

    def _evict(self, length: int) -> None:
        """Drop spare buffers of other sizes to make room for one of ``length``."""
        for size in list(self._free):
            if size == length:
                continue
            free = self._free[size]
            while free and self.kept + length > self.limit:
                free.pop()
                self.kept -= size
            if not free:
                del self._free[size]
            if self.kept + length <= self.limit:
                return
