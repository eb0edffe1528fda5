"""Big buffers used again instead of made afresh for every request.

A fresh 1 MiB ``bytearray`` costs a zero fill and, once the heap has given the
pages back, a page fault per 4 KiB: with a remote child that was a sixth of the
event loop's time on 1 MiB reads.  Big reads (a child's copy, the bytes of a
remote child's reply) and big write payloads therefore take their buffer from
this pool.

No caller gives a buffer back.  A buffer of the pool is free again when nothing
but the pool refers to it, which CPython's reference count says exactly: a
request still being filled, a memoryview or a cffi pointer of it, a transport
still sending it, a thread still reading into it, all hold a reference.  So a
buffer abandoned by a timed-out request is never handed out while its late
reply may still land in it.

A taken buffer holds whatever its last user left: the taker overwrites all of
it (a read fills every byte or fails).  The pool keeps buffers of one size
together, at most ``limit`` bytes of them over all sizes, busy or free (the
budget counts the busy ones); ``prune`` drops the free ones beyond
``keep_idle`` when the server goes idle.  One pool per process
(``SPARES``); everything runs on the event loop's thread.
"""

from __future__ import annotations

import sys

#: buffers at least this big come from the pool (smaller ones are cheap to make)
MIN_SIZE = 128 << 10
#: at most this many bytes of buffers in the pool, busy or free
LIMIT = 32 << 20
#: free buffers kept once the server is idle (docs/performance.md's memory bound)
KEEP_IDLE = 16 << 20


def _refs(bufs: list[bytearray], i: int) -> int:
    return sys.getrefcount(bufs[i])


def _refs_unused() -> int:
    """What ``_refs`` says of a buffer only its pool list refers to."""
    return _refs([bytearray(1)], 0)


_UNUSED = _refs_unused()


class Spares:
    """Buffers by size, handed out again once unused (see the module's docstring)."""

    def __init__(self, limit: int = LIMIT, keep_idle: int = KEEP_IDLE,
                 min_size: int = MIN_SIZE) -> None:
        self.limit = limit
        self.keep_idle = keep_idle
        self.min_size = min_size
        self.held = 0  # bytes of all the pool's buffers, busy or free
        self._by_size: dict[int, list[bytearray]] = {}
        self._next: dict[int, int] = {}  # where the next search starts, per size
        #: buffers handed out again / made new (for tests and metrics)
        self.reused = 0
        self.made = 0

    def take(self, length: int) -> bytearray:
        """A buffer of ``length`` bytes whose contents are undefined."""
        if length < self.min_size:
            return bytearray(length)
        bufs = self._by_size.get(length)
        if bufs:
            n = len(bufs)
            start = self._next[length]
            for k in range(n):
                i = (start + k) % n
                if _refs(bufs, i) == _UNUSED:
                    self._next[length] = (i + 1) % n  # the oldest handed out go first
                    self.reused += 1
                    return bufs[i]
        buf = bytearray(length)
        self.made += 1
        if self.held + length > self.limit:
            self._drop_free(self.held + length - self.limit)
        if self.held + length <= self.limit:
            bufs = self._by_size.get(length)  # (dropping may have emptied and removed it)
            if bufs is None:
                bufs = self._by_size[length] = []
                self._next[length] = 0
            bufs.append(buf)
            self.held += length
        return buf

    def pooled_bytes(self) -> int:
        """What the pool's lists hold (``held`` must always say the same)."""
        return sum(size * len(bufs) for size, bufs in self._by_size.items())

    def free_bytes(self) -> int:
        # (by index only: a loop variable would be one more reference)
        return sum(size for size, bufs in self._by_size.items()
                   for i in range(len(bufs)) if _refs(bufs, i) == _UNUSED)

    def prune(self) -> None:
        """Keep at most ``keep_idle`` bytes of free buffers."""
        free = self.free_bytes()
        if free > self.keep_idle:
            self._drop_free(free - self.keep_idle)

    def _drop_free(self, nbytes: int) -> None:
        """Forget free buffers (any size) worth at least ``nbytes``, if there are."""
        for size in list(self._by_size):
            bufs = self._by_size[size]
            keep = []
            for i in range(len(bufs)):
                if nbytes > 0 and _refs(bufs, i) == _UNUSED:
                    nbytes -= size
                    self.held -= size
                else:
                    keep.append(bufs[i])
            # (in place: a take() in progress holds this size's list)
            bufs[:] = keep
            self._next[size] = 0
            if not keep:
                del self._by_size[size], self._next[size]
            if nbytes <= 0:
                return


#: the process's pool
SPARES = Spares()
