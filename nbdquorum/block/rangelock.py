"""A byte-range lock that orders overlapping requests the same on every child.

Theory of operation: requests enter in arrival order.  A request may run when
no *earlier* request (running or still waiting) overlaps it in a conflicting
mode; readers share, writers (write, zero, trim, rewrite) exclude.  Because a
later request never overtakes an earlier overlapping one, two overlapping
writes reach every child in the same order and the children cannot diverge,
and a read never votes on a range whose write is half-way through (the false
mismatch that rewrite-corrupted would "repair" with stale bytes).
Non-overlapping requests never wait for each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Entry:
    __slots__ = ("end", "exclusive", "granted", "start", "waiter")

    def __init__(self, start: int, end: int, exclusive: bool) -> None:
        self.start = start  # first byte
        self.end = end  # one past the last byte
        self.exclusive = exclusive  # True for writers
        self.granted = False
        self.waiter: asyncio.Future[None] | None = None

    def conflicts(self, other: _Entry) -> bool:
        return (
            (self.exclusive or other.exclusive)
            and self.start < other.end
            and other.start < self.end
        )


class RangeLock:
    """See the module doc.  Entries are also filed by the buckets of ``1 << shift``
    bytes they touch, so that a request checks the few entries near it rather
    than every one held (a write to a child on another host holds its range for
    a network round trip: at queue depth 32, some 32 entries); an entry touching
    more than ``big`` buckets is checked by every request instead."""

    def __init__(self, shift: int = 20, big: int = 64) -> None:
        #: granted and waiting, in arrival order (a dict: removal without a scan)
        self._entries: dict[_Entry, None] = {}
        self._exclusive = 0  # entries that are writers: readers check nothing without one
        self._waiting = 0  # entries whose waiter is not woken yet: releases scan only then
        self._shift = shift
        self._big_span = big
        self._buckets: dict[int, dict[_Entry, None]] = {}
        self._big: dict[_Entry, None] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _span(self, entry: _Entry) -> range | None:
        """The buckets an entry touches, or None when that is more than ``big``."""
        first, last = entry.start >> self._shift, (entry.end - 1) >> self._shift
        return None if last - first >= self._big_span else range(first, last + 1)

    def _blocked(self, entry: _Entry) -> bool:
        if not self._entries or not (entry.exclusive or self._exclusive):
            return False  # nothing held, or readers among readers
        start, end, exclusive = entry.start, entry.end, entry.exclusive
        for e in self._big:
            if (exclusive or e.exclusive) and e.start < end and start < e.end:
                return True
        span = self._span(entry)
        if span is None:
            return any(e.conflicts(entry) for e in self._entries)
        buckets = self._buckets
        for k in span:
            near = buckets.get(k)
            if near:
                for e in near:
                    if (exclusive or e.exclusive) and e.start < end and start < e.end:
                        return True
        return False

    def _add(self, entry: _Entry) -> None:
        self._entries[entry] = None
        if entry.exclusive:
            self._exclusive += 1
        span = self._span(entry)
        if span is None:
            self._big[entry] = None
            return
        buckets = self._buckets
        for k in span:
            near = buckets.get(k)
            if near is None:
                buckets[k] = {entry: None}
            else:
                near[entry] = None

    def _remove(self, entry: _Entry) -> None:
        del self._entries[entry]
        if entry.exclusive:
            self._exclusive -= 1
        span = self._span(entry)
        if span is None:
            del self._big[entry]
            return
        buckets = self._buckets
        for k in span:
            near = buckets[k]
            del near[entry]
            if not near:
                del buckets[k]

    def would_block(self, offset: int, length: int, *, exclusive: bool) -> bool:
        """True if a request on this range would have to wait (or overtake one)."""
        return self._blocked(_Entry(offset, offset + max(length, 1), exclusive))

    def try_acquire(self, offset: int, length: int, *, exclusive: bool) -> _Entry | None:
        """The range at once, or None if the request would have to wait."""
        entry = _Entry(offset, offset + max(length, 1), exclusive)
        if self._blocked(entry):
            return None
        entry.granted = True
        self._add(entry)
        return entry

    @asynccontextmanager
    async def hold(self, offset: int, length: int, *, exclusive: bool) -> AsyncIterator[None]:
        entry = await self.acquire(offset, length, exclusive=exclusive)
        try:
            yield
        finally:
            self.release(entry)

    async def acquire(self, offset: int, length: int, *, exclusive: bool) -> _Entry:
        """Wait for the range; the holder must ``release()`` the entry returned
        (``hold()`` does both; this form lets a hold outlive the task that took it)."""
        entry = _Entry(offset, offset + max(length, 1), exclusive)
        blocked = self._blocked(entry)
        self._add(entry)
        if blocked:
            waiter = entry.waiter = asyncio.get_running_loop().create_future()
            self._waiting += 1
            try:
                await waiter
            except BaseException:
                if waiter.cancelled():  # never woken: no longer waiting
                    self._waiting -= 1
                self._release(entry)
                raise
        entry.granted = True
        return entry

    def release(self, entry: _Entry) -> None:
        self._release(entry)

    def _release(self, entry: _Entry) -> None:
        self._remove(entry)
        if not self._waiting:
            return
        entries = list(self._entries)
        # Wake every waiter that this release concerned and that no earlier
        # entry still blocks.  Only waiters overlapping the released range can
        # change, so the scan is cheap when many requests are queued elsewhere.
        for i, e in enumerate(entries):
            if e.granted or e.waiter is None or e.waiter.done() or not e.conflicts(entry):
                continue
            blocked = False
            for j in range(i):
                if entries[j].conflicts(e):
                    blocked = True
                    break
            if not blocked:
                e.waiter.set_result(None)
                self._waiting -= 1
