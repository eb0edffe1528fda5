"""The internal event bus: block nodes and jobs publish, the log and the QMP monitors listen.

Two kinds of object travel on it: the block layer's typed events
(block/quorum/events.py), and ``Event``s already in QMP's shape (the job
events, which are QEMU's job vocabulary).  ``nbdquorum.qmp.events.wired``
gives a subscriber every one of them in the wire shape.  The bus delivers
synchronously and in order; subscribers that do I/O must queue, not block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    name: str  # QMP event name, e.g. "QUORUM_REPORT_BAD"
    data: dict[str, Any]  # QMP "data" member, wire (dash) spelling
    timestamp: float = field(default_factory=time.time)  # wall clock, seconds


Subscriber = Callable[[Any], None]


class EventBus:
    """Fan-out of block-layer events to any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Register *fn*; returns a function that unregisters it."""
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def emit(self, name: str, data: dict[str, Any]) -> Event:
        """Publish an event already in QMP's shape (name and wire data)."""
        ev = Event(name, data)
        self.publish(ev)
        return ev

    def publish(self, ev: object) -> None:
        for fn in list(self._subscribers):
            try:
                fn(ev)
            except Exception:  # a broken listener must never fail an I/O request
                log.exception("event subscriber %r failed", fn)
