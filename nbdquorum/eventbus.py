"""The internal event bus: block nodes emit, the log and the QMP monitors listen.

Events carry QEMU's names and field names (qapi/block.json): QUORUM_REPORT_BAD,
QUORUM_FAILURE, and later the job events.  The bus delivers synchronously and in
order; subscribers that do I/O must queue, not block.
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


Subscriber = Callable[[Event], None]


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
        ev = Event(name, data)
        for fn in list(self._subscribers):
            try:
                fn(ev)
            except Exception:  # a broken listener must never fail an I/O request
                log.exception("event subscriber %r failed", fn)
        return ev
