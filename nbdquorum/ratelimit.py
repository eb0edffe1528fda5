"""A burst limit for log lines that a failing disk can repeat thousands of times a second.

A child returning garbage under load reports a mismatch on every read: at 10k
reads a second, one log line (and one EVENT line) each would flood the log and
double the cost of every request.  Counters and QMP events are not limited here
(QMP throttles events as QEMU does); only the lines written to stderr are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

#: lines per key and period before the rest are counted instead of written
LIMIT = 50
PERIOD = 1.0


class Burst:
    """At most ``limit`` admissions per key in each ``period`` seconds."""

    def __init__(self, limit: int = LIMIT, period: float = PERIOD,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.period = period
        self.clock = clock
        self._windows: dict[Hashable, list[float]] = {}  # key -> [start, admitted, held]

    def admit(self, key: Hashable) -> int | None:
        """None: hold this line back.  Otherwise write it, and the returned number
        of lines held back for this key since the last one written (usually 0)."""
        now = self.clock()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.period:
            held = int(w[2]) if w is not None else 0
            self._windows[key] = [now, 1, 0]
            return held
        if w[1] < self.limit:
            w[1] += 1
            return 0
        w[2] += 1
        return None
