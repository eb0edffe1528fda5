"""The quorum: Members (who votes), Voted I/O (how), and the node that judges.

See node.py for the semantics, members.py for the only writer of the
membership, voted.py for the only reader-and-voter of the children.
"""

from nbdquorum.block.quorum.members import (
    ChildSlot,
    ChildState,
    ChildStats,
    Members,
    ReadPattern,
    ReopenPlan,
    check_options,
)
from nbdquorum.block.quorum.node import QuorumNode, WriteIntent
from nbdquorum.block.quorum.thin import Copied, intersect_extents

__all__ = [
    "ChildSlot",
    "ChildState",
    "ChildStats",
    "Copied",
    "Members",
    "QuorumNode",
    "ReadPattern",
    "ReopenPlan",
    "WriteIntent",
    "check_options",
    "intersect_extents",
]
