"""Thin images stay thin: a copy costs what is allocated, not the virtual size.

One rule, used by resync, catch-up and scrub: a range is zero where **every**
voting child says it reads as zero, i.e. its block status carries
``STATE_ZERO`` (a hole in a file; NBD's ``NBD_STATE_ZERO``; HOLE alone
promises nothing).  A child that cannot answer, answers an error, or answers
for less than the range asked makes the rest "data": a range where some
voters say zero and others have data is read and voted (that is where a
corrupted child shows).

``copy_voted`` copies a range onto a target child with that rule: zero
ranges become zero on the target (``zero(may_trim=True)``: a punched hole in
a file, WRITE_ZEROES over NBD) unless the target's own block status already
says ZERO there, and are never written as data; the rest is read and voted,
and aligned all-zero blocks of the voted bytes are zeroed the same way
instead of written.  The target reads the quorum's bytes afterwards either
way.  The caller holds the quorum's exclusive range lock over the range, so
the block status asked here cannot be outdated by a client write.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from nbdquorum import native
from nbdquorum.block.node import STATE_HOLE, STATE_ZERO, BlockNode, Buffer, Extent
from nbdquorum.block.quorum.voted import timed

T = TypeVar("T")

#: aligned blocks of voted data this big that are all zero are zeroed, not written
ZERO_GRAIN = 64 << 10
#: at most this many bytes are read (and voted) at once
COPY_MAX = 1 << 20
#: data extents closer than this are read in one voted read (the gap is zero anyway)
MERGE_GAP = 64 << 10

_ZEROS = bytes(ZERO_GRAIN)


@dataclass
class Copied:
    """What a copy did, in bytes."""

    read: int = 0  #: read from the voters and voted
    written: int = 0  #: written as data
    zeroed: int = 0  #: made zero on the target (punch hole, zero range, WRITE_ZEROES)
    skipped: int = 0  #: zero on every voter and already zero on the target: no I/O

    def add(self, other: Copied) -> None:
        self.read += other.read
        self.written += other.written
        self.zeroed += other.zeroed
        self.skipped += other.skipped


def intersect_extents(maps: Sequence[Sequence[Extent]], length: int) -> list[Extent]:
    """AND the flags of several extent lists over the same range (one pass).

    Past the end of a list its flags count as 0 (data).  Adjacent results with
    the same flags are merged.
    """
    ends: list[list[tuple[int, int]]] = []
    for m in maps:
        pos, acc = 0, []
        for n, f in m:
            if n <= 0:
                continue
            pos += n
            acc.append((min(pos, length), f))
            if pos >= length:
                break
        ends.append(acc)
    idx = [0] * len(ends)
    out: list[Extent] = []
    pos = 0
    while pos < length:
        flags = STATE_HOLE | STATE_ZERO
        nxt = length
        for j, acc in enumerate(ends):
            i = idx[j]
            while i < len(acc) and acc[i][0] <= pos:
                i += 1
            idx[j] = i
            if i == len(acc):
                flags = 0
            else:
                flags &= acc[i][1]
                nxt = min(nxt, acc[i][0])
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + nxt - pos, flags)
        else:
            out.append((nxt - pos, flags))
        pos = nxt
    return out


def _covered(m: Sequence[Extent], length: int) -> int:
    return min(length, sum(n for n, _ in m if n > 0))


async def all_zero(nodes: Sequence[BlockNode], offset: int, length: int, *,
                   limit: float | None = None) -> list[Extent]:
    """Extents of [offset, offset+length): ``STATE_ZERO`` set only where every node
    says ZERO; anything unknown (an error, no answer, no nodes) is data (0)."""
    out: list[Extent] = []

    def put(n: int, flags: int) -> None:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))

    pos, end = offset, offset + length
    while pos < end:
        if not nodes:
            put(end - pos, 0)
            break
        maps = await asyncio.gather(
            *(timed(n.block_status(pos, end - pos), limit) for n in nodes),
            return_exceptions=True)
        good: list[Sequence[Extent]] = []
        for m in maps:
            if isinstance(m, BaseException):
                if not isinstance(m, Exception):
                    raise m
                break
            good.append(m)
        # an answer may cover less than asked (an NBD server may stop early):
        # take what every node covered, and ask again for the rest
        covered = min((_covered(m, end - pos) for m in good), default=0)
        if len(good) < len(nodes) or covered <= 0:
            put(end - pos, 0)  # someone could not say: all of it is data
            break
        for n, flags in intersect_extents(good, covered):
            put(n, flags & STATE_ZERO)
        pos += covered
    return out


def region_runs(extents: Sequence[Extent], offset: int, length: int,
                region: int) -> list[tuple[int, int, bool]]:
    """Cut [offset, offset+length) at ``region`` boundaries into runs
    ``(offset, length, all_zero)`` of whole regions; a region is all-zero when
    ``extents`` (an all_zero() answer from ``offset`` on) say ZERO over all of it."""
    zero: list[tuple[int, int]] = []
    pos = offset
    for n, flags in extents:
        if flags & STATE_ZERO:
            zero.append((pos, pos + n))
        pos += n
    out: list[tuple[int, int, bool]] = []
    i, end = 0, offset + length
    a = offset
    while a < end:
        b = min(end, (a // region + 1) * region)
        while i < len(zero) and zero[i][1] <= a:
            i += 1
        z = i < len(zero) and zero[i][0] <= a and b <= zero[i][1]
        if out and out[-1][2] == z:
            out[-1] = (out[-1][0], b - out[-1][0], z)
        else:
            out.append((a, b - a, z))
        a = b
    return out


def zero_blocks(data: Buffer, offset: int, grain: int = ZERO_GRAIN) -> list[tuple[int, int, bool]]:
    """Split voted bytes read at ``offset`` into runs ``(start, end, all_zero)`` (indexes
    into ``data``), deciding per ``grain``-aligned block (the first and last may be
    partial): zero runs inside data are not cut finer than that."""
    zeros = _ZEROS if grain == ZERO_GRAIN else bytes(grain)
    if isinstance(data, bytes | bytearray):
        buf = data
        n = len(buf)

        def is_zero(a: int, b: int) -> bool:
            return buf.startswith(zeros if b - a == grain else bytes(b - a), a)
    else:  # a view (a part of a larger read): compared in place, never copied whole
        view = memoryview(data).cast("B")
        n = len(view)
        zview = memoryview(zeros)

        def is_zero(a: int, b: int) -> bool:
            return native.diff_span(view[a:b], zview[:b - a]) is None
    runs: list[tuple[int, int, bool]] = []
    a = 0
    while a < n:
        b = min(n, (offset + a) // grain * grain + grain - offset)
        zero = is_zero(a, b)
        if runs and runs[-1][2] == zero:
            runs[-1] = (runs[-1][0], b, zero)
        else:
            runs.append((a, b, zero))
        a = b
    return runs


Span = tuple[int, int, list[tuple[int, int]]]  # (offset, length, data extents in it)


def _spans(extents: Sequence[Extent], offset: int) -> tuple[list[Span], list[tuple[int, int]]]:
    """(spans to read, zero ranges) of an all_zero() answer, as offsets and lengths.

    Data extents closer than MERGE_GAP are read in one span (one voted read
    instead of many small ones); only the data extents of a span are written,
    its gaps are zero ranges like the others.  Spans are cut at COPY_MAX.
    """
    data: list[tuple[int, int]] = []
    zeros: list[tuple[int, int]] = []
    pos = offset
    for n, flags in extents:
        if flags & STATE_ZERO:
            zeros.append((pos, n))
        else:
            for a in range(pos, pos + n, COPY_MAX):
                data.append((a, min(COPY_MAX, pos + n - a)))
        pos += n
    spans: list[Span] = []
    for a, n in data:
        if spans:
            start, length, parts = spans[-1]
            if a - (start + length) < MERGE_GAP and a + n - start <= COPY_MAX:
                parts.append((a, n))
                spans[-1] = (start, a + n - start, parts)
                continue
        spans.append((a, n, [(a, n)]))
    return spans, zeros


async def copy_voted(
    target: BlockNode, offset: int, length: int, *,
    zero_map: Callable[[int, int], Awaitable[list[Extent]]],
    read_voted: Callable[[int, int], Awaitable[Buffer]],
    child_io: Callable[[Awaitable[None]], Awaitable[None]], limit: float | None = None,
) -> Copied:
    """Make ``target`` read the quorum's bytes over [offset, offset+length).

    ``zero_map`` is the quorum's all-voters-zero rule, ``read_voted`` its voted
    read; ``child_io`` bounds each of the target's operations and ``limit`` its
    block status (the child timeout).  The caller holds the exclusive range lock.
    """
    done = Copied()
    spans, zeros = _spans(await zero_map(offset, length), offset)
    for start, n, parts in spans:
        data = await read_voted(start, n)
        done.read += n
        view = memoryview(data)
        for p, m in parts:
            sub = view[p - start:p - start + m]
            for a, b, zero in zero_blocks(sub, p):
                if zero:
                    zeros.append((p + a, b - a))
                else:
                    await child_io(target.pwrite(p + a, sub[a:b]))
                    done.written += b - a
    if zeros:
        await _make_zero(target, offset, length, zeros, done, child_io, limit)
    return done


async def _make_zero(
    target: BlockNode, offset: int, length: int, zeros: list[tuple[int, int]], done: Copied,
    child_io: Callable[[Awaitable[None]], Awaitable[None]], limit: float | None,
) -> None:
    """Zero ``zeros`` (ranges within [offset, offset+length)) on the target where its
    own block status does not say ZERO already (an error there: zero it all)."""
    have = await all_zero([target], offset, length, limit=limit)
    blank: list[tuple[int, int]] = []  # the target's ZERO ranges
    pos = offset
    for n, flags in have:
        if flags & STATE_ZERO:
            blank.append((pos, pos + n))
        pos += n
    need: list[tuple[int, int]] = []
    for start, n in sorted(zeros):
        a, end = start, start + n
        for z0, z1 in blank:
            if z1 <= a or z0 >= end:
                continue
            if z0 > a:
                need.append((a, z0))
            done.skipped += min(z1, end) - max(z0, a)
            a = max(a, z1)
            if a >= end:
                break
        if a < end:
            need.append((a, end))
    merged: list[tuple[int, int]] = []
    for a, b in need:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    for a, b in merged:
        try:
            await child_io(target.zero(a, b - a, may_trim=True))
        except OSError as err:
            if err.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            for p in range(a, b, COPY_MAX):  # a node that cannot zero: write zeroes
                await child_io(target.pwrite(p, bytes(min(COPY_MAX, b - p))))
        done.zeroed += b - a
