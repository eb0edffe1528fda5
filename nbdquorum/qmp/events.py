"""The quorum's typed events in QEMU's wire shape (qapi/block.json, QUORUM_*).

Everything that leaves the process as an event (the QMP monitor, the
``EVENT`` log lines) goes through ``wire()``: the block layer reports facts
in bytes, this module speaks sectors and QEMU's field names.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from nbdquorum.block.quorum.events import ChildBad, ChildStateChanged, QuorumLost
from nbdquorum.eventbus import Event

SECTOR = 512


def sector_span(offset: int, length: int) -> tuple[int, int]:
    """QEMU's (sector-num, sectors-count) for a byte range, rounded outward."""
    start = offset // SECTOR
    end = -(-(offset + length) // SECTOR)
    return start, end - start


def wire(ev: object) -> Event | None:
    """The QMP event for a bus event; None for an object that is no event."""
    if isinstance(ev, Event):
        return ev
    data: dict[str, Any]
    if isinstance(ev, ChildBad):
        num, count = sector_span(ev.offset, ev.length) if ev.op != "flush" else (0, 0)
        data = {"node-name": ev.node_name, "sectors-count": count, "sector-num": num,
                "type": ev.op}
        if ev.error is not None:
            data["error"] = os.strerror(ev.error)
        return Event("QUORUM_REPORT_BAD", data, ev.timestamp)
    if isinstance(ev, QuorumLost):
        num, count = sector_span(ev.offset, ev.length)
        return Event("QUORUM_FAILURE",
                     {"reference": ev.quorum, "sectors-count": count, "sector-num": num},
                     ev.timestamp)
    if isinstance(ev, ChildStateChanged):
        return Event("QUORUM_CHILD_STATE_CHANGE",
                     {"node-name": ev.node_name, "child": ev.edge, "parent": ev.quorum,
                      "state": ev.state, "previous": ev.previous}, ev.timestamp)
    return None


def wired(fn: Callable[[Event], None]) -> Callable[[object], None]:
    """A bus subscriber that receives every event in its wire shape."""

    def deliver(ev: object) -> None:
        out = wire(ev)
        if out is not None:
            fn(out)

    return deliver
