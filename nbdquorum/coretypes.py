"""Plain types every layer shares; this module imports nothing of nbdquorum.

It sits below everything (native, nbd, block, worker) so that a lower layer
never imports a higher one for a type: ``native`` returns a ``VoteResult``
without importing ``block``, the NBD client hands out ``Extent`` lists
without importing the block-node interface.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TypeAlias

__all__ = ["Buffer", "Extent", "VoteResult"]

#: Anything that exposes bytes without a copy (``collections.abc.Buffer`` is 3.12+).
Buffer: TypeAlias = bytes | bytearray | memoryview

#: One run of a block-status map: (length, base:allocation flags)
Extent: TypeAlias = tuple[int, int]


@dataclass(frozen=True, slots=True)
class VoteResult:
    """The outcome of one vote over a quorum's children."""

    #: Representative child index of the winning version; None: no quorum (EIO).
    winner: int | None
    #: Per child: index of the first child with the same bytes (the version's
    #: representative), or -1 if the child did not vote.
    groups: tuple[int, ...]

    @property
    def voters(self) -> tuple[int, ...]:
        """Indices of the children that voted."""
        return tuple(i for i, g in enumerate(self.groups) if g >= 0)

    @property
    def winners(self) -> tuple[int, ...]:
        """Indices in the winning version; empty when there is no quorum."""
        if self.winner is None:
            return ()
        return tuple(i for i, g in enumerate(self.groups) if g == self.winner)

    @property
    def losers(self) -> tuple[int, ...]:
        """Indices that voted but disagree with the winner.

        These are the children to report bad and, with rewrite-corrupted, to
        repair.  Empty when there is no quorum: without a winner nobody is
        known to be wrong.
        """
        if self.winner is None:
            return ()
        return tuple(i for i, g in enumerate(self.groups) if g >= 0 and g != self.winner)

    @property
    def counts(self) -> dict[int, int]:
        """Members per version, keyed by representative index, in index order."""
        return dict(sorted(Counter(g for g in self.groups if g >= 0).items()))
