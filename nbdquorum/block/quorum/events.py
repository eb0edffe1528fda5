"""What the quorum reports, as typed events (the QMP layer gives them QEMU's wire shape).

The quorum knows nothing of QMP: it says what happened, in bytes and names;
``nbdquorum.qmp.events`` turns each event into QEMU's event name and data
(QUORUM_REPORT_BAD with sector numbers, ...), for the monitor and the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ChildBad:
    """A child failed an operation, or its bytes lost a vote (error is None)."""

    node_name: str  #: the child node
    op: str  #: "read", "write" or "flush"
    offset: int  #: bytes; for a lost vote, the start of the differing span
    length: int  #: bytes; 0 for flush
    error: int | None = None  #: errno of a failure; None for differing contents
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class QuorumLost:
    """A request found no quorum: too few children answered, or no version won."""

    quorum: str  #: the quorum node
    offset: int
    length: int
    timestamp: float = field(default_factory=time.time)


@dataclass(frozen=True, slots=True)
class ChildStateChanged:
    """A child entered another state (Members is the only source)."""

    quorum: str
    node_name: str
    edge: str  #: "children.N"
    state: str  #: the new ChildState value
    previous: str  #: the old one, or "none" for a child that just joined
    timestamp: float = field(default_factory=time.time)


QuorumEvent = ChildBad | QuorumLost | ChildStateChanged
