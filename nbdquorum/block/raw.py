"""The ``raw`` format driver: the bytes of its ``file`` child, unchanged.

It exists so the graph has QEMU's shape (quorum -> raw -> file) and QMP clients
can use the blockdev-add forms they already know.  A pass-through filter.
"""

from __future__ import annotations

from nbdquorum.block.node import BlockNode, Filter


class RawNode(Filter):
    driver = "raw"

    @property
    def file(self) -> BlockNode:
        """QEMU's name for the child edge of a format node."""
        return self.child
