"""Quorum voting: the pure-Python reference (the result type is in coretypes.py).

The hot path votes in C (``nbdquorum.native.vote``); this module holds the
slow, obviously-correct version of the same rules, which the unit tests hold
the C to, the way QEMU's quorum keeps a blkverify mode.

Rules (qemu/qemu block/quorum.c ``quorum_vote``, with two differences):
children whose bytes are identical form one version; the version with the
most members wins if it has at least ``threshold`` members.  Versions are
found by comparing bytes, never by hashing, and a tie for the most members
is no quorum: we never guess.  A child whose buffer is ``None`` failed and
does not vote.
"""

from __future__ import annotations

import errno
import os
from collections import Counter
from collections.abc import Sequence

from nbdquorum.coretypes import Buffer as Buffer
from nbdquorum.coretypes import VoteResult as VoteResult


def _as_bytes(buf: Buffer) -> bytes:
    return buf if isinstance(buf, bytes) else memoryview(buf).tobytes()


def vote_reference(bufs: Sequence[Buffer | None], threshold: int) -> VoteResult:
    """Vote as the C ``quorum_vote`` does, in plain Python.

    Raises:
        OSError: EINVAL if ``bufs`` is empty or ``threshold`` < 1 (the C
            function's -EINVAL).
        ValueError: if the buffers that vote differ in length.
    """
    if not bufs or threshold < 1:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    data = [None if b is None else _as_bytes(b) for b in bufs]
    if len({len(d) for d in data if d is not None}) > 1:
        raise ValueError("buffers to vote on differ in length")

    groups: list[int] = []
    representatives: list[int] = []
    for i, d in enumerate(data):
        if d is None:
            groups.append(-1)
            continue
        for r in representatives:
            if data[r] == d:
                groups.append(r)
                break
        else:
            representatives.append(i)
            groups.append(i)

    counts = Counter(g for g in groups if g >= 0)
    winner: int | None = None
    if counts:
        best = max(counts.values())
        top = [r for r in representatives if counts[r] == best]
        if len(top) == 1 and best >= threshold:
            winner = top[0]
    return VoteResult(winner, tuple(groups))


def diff_span_reference(a: Buffer, b: Buffer) -> tuple[int, int] | None:
    """Return (first differing offset, one past the last), or None if equal.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length.
    """
    x, y = _as_bytes(a), _as_bytes(b)
    if len(x) != len(y):
        raise ValueError("buffers to compare differ in length")
    diffs = [i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q]
    if not diffs:
        return None
    return diffs[0], diffs[-1] + 1
