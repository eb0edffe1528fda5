"""QEMU's event rate limiting (monitor/monitor.c, monitor_qapi_event_queue), sans-I/O.

Theory of operation: a throttled event has a key (QUORUM_REPORT_BAD: the event
and its ``node-name``; QUORUM_FAILURE: the event name alone).  The first event
of a key is delivered at once and opens a window of ``period`` seconds.  Events
arriving inside the window replace each other; when the window ends the last
one is delivered (with its own, earlier timestamp) and a new window opens; a
window that ends with nothing pending closes the key.  So a burst costs two
events, the first and the last, and a steady stream one a period.

The caller owns the clock (any monotonic seconds) and the timer: it calls
:meth:`EventThrottle.push` for every event, and :meth:`EventThrottle.due` at
:meth:`EventThrottle.next_deadline`.  iotest 148 checks the same rules with a
virtual clock, and so do this module's unit tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from nbdquorum.eventbus import Event

#: QEMU's monitor_qapi_event_conf: both quorum events, 1000 ms
DEFAULT_PERIODS: Final[Mapping[str, float]] = {"QUORUM_REPORT_BAD": 1.0, "QUORUM_FAILURE": 1.0}

Key = tuple[Any, ...]


def qemu_key(ev: Event) -> Key:
    """QEMU's throttle key: REPORT_BAD per node, everything else by event name."""
    if ev.name == "QUORUM_REPORT_BAD":
        return (ev.name, ev.data.get("node-name"))
    return (ev.name,)


@dataclass
class _Window:
    deadline: float  # when the window ends (caller's clock)
    pending: Event | None = None  # the last event held back in this window


class EventThrottle:
    def __init__(self, periods: Mapping[str, float] = DEFAULT_PERIODS,
                 key: Callable[[Event], Key] = qemu_key) -> None:
        self.periods = dict(periods)  # event name -> window length in seconds; 0 = off
        self._key = key
        self._windows: dict[Key, _Window] = {}

    def push(self, ev: Event, now: float) -> list[Event]:
        """Offer ``ev``; returns what to deliver now (``[ev]`` or nothing)."""
        period = self.periods.get(ev.name, 0.0)
        if period <= 0:
            return [ev]
        key = self._key(ev)
        window = self._windows.get(key)
        if window is not None:
            window.pending = ev  # replaces an earlier held event
            return []
        self._windows[key] = _Window(now + period)
        return [ev]

    def due(self, now: float) -> list[Event]:
        """Close the windows that have ended; returns the held events to deliver."""
        out: list[Event] = []
        for key, window in list(self._windows.items()):
            if window.deadline > now:
                continue
            if window.pending is None:
                del self._windows[key]
                continue
            ev, window.pending = window.pending, None
            window.deadline = now + self.periods.get(ev.name, 0.0)
            out.append(ev)
        out.sort(key=lambda e: e.timestamp)
        return out

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._windows.values()), default=None)

    def pending(self) -> list[Event]:
        """Events held back right now (for tests and shutdown logs)."""
        return [w.pending for w in self._windows.values() if w.pending is not None]
