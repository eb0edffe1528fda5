"""Per-command request counters of an NBD server: plain integers on the request path.

For each command: how many requests, the sum of their durations and how many
fell in each duration bucket (not cumulative).  Recording one request is a
clock read, a bisect and three list increments: no lock (one event loop per
process), no object per request, nothing from the metrics library.  The
metrics module (nbdquorum/metrics.py) folds the buckets into Prometheus'
cumulative histogram when it is scraped.

Worker processes send their totals (``snapshot()``) to the primary over the
control channel; the primary keeps each worker's latest totals and, when a
worker dies, folds them into a base (``WorkerRequests``), so the sums it
reports never go backwards.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from typing import Any

log = logging.getLogger(__name__)

#: label of each command, indexed by its value on the wire (Cmd); ``other`` is
#: every value past the table (unknown commands, RESIZE)
CMD_NAMES = ("read", "write", "disc", "flush", "trim", "cache", "write_zeroes",
             "block_status", "other")
OTHER = len(CMD_NAMES) - 1
#: upper bounds (nanoseconds) of the duration buckets; the last bucket is +Inf
BOUNDS_NS = tuple(int(s * 1e9) for s in (
    0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
NBUCKETS = len(BOUNDS_NS) + 1

clock = time.perf_counter_ns


class RequestStats:
    """Counts, duration sums (ns) and duration buckets per command."""

    __slots__ = ("buckets", "counts", "sums")

    def __init__(self) -> None:
        self.counts = [0] * len(CMD_NAMES)
        self.sums = [0] * len(CMD_NAMES)
        self.buckets = [[0] * NBUCKETS for _ in CMD_NAMES]

    def record(self, cmd: int, started: int) -> None:
        """One request of command *cmd* that began at ``clock()`` == *started* is done."""
        d = clock() - started
        i = cmd if cmd < OTHER else OTHER
        self.counts[i] += 1
        self.sums[i] += d
        self.buckets[i][bisect_left(BOUNDS_NS, d)] += 1

    def add(self, other: RequestStats) -> None:
        for i in range(len(CMD_NAMES)):
            self.counts[i] += other.counts[i]
            self.sums[i] += other.sums[i]
            mine, theirs = self.buckets[i], other.buckets[i]
            for j in range(NBUCKETS):
                mine[j] += theirs[j]

    def copy(self) -> RequestStats:
        c = RequestStats()
        c.add(self)
        return c

    def total(self) -> int:
        return sum(self.counts)

    # -- over the control channel ------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The totals as a JSON-able dict (from_snapshot reads it back)."""
        return {"cmds": list(CMD_NAMES), "counts": list(self.counts), "sums": list(self.sums),
                "buckets": [list(b) for b in self.buckets]}

    @classmethod
    def from_snapshot(cls, snap: Any) -> RequestStats:
        """Totals sent by a worker; ValueError if they are not what snapshot() makes."""
        st = cls()
        try:
            if list(snap["cmds"]) != list(CMD_NAMES):
                raise ValueError(f"commands {snap['cmds']!r}, expected {list(CMD_NAMES)}")
            counts, sums, buckets = snap["counts"], snap["sums"], snap["buckets"]
            if not (len(counts) == len(sums) == len(buckets) == len(CMD_NAMES)
                    and all(len(b) == NBUCKETS for b in buckets)):
                raise ValueError("wrong number of commands or buckets")
            for i in range(len(CMD_NAMES)):
                st.counts[i] = _count(counts[i])
                st.sums[i] = _count(sums[i])
                st.buckets[i] = [_count(v) for v in buckets[i]]
        except (KeyError, TypeError) as err:
            raise ValueError(f"malformed request totals: {err!r}") from None
        return st


def _count(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"not a count: {v!r}")
    return v


class WorkerRequests:
    """The workers' request totals as the primary knows them.

    ``update`` replaces a worker's latest totals (a worker sends its running
    totals, so a lost message loses nothing but time); ``retire`` folds a
    dead worker's last totals into the base, so a replacement starting from
    zero never makes a sum go backwards.
    """

    def __init__(self) -> None:
        self.base = RequestStats()
        self.latest: dict[object, RequestStats] = {}

    def update(self, worker: object, snap: Any) -> None:
        try:
            self.latest[worker] = RequestStats.from_snapshot(snap)
        except ValueError as err:
            log.error("a worker sent bad request totals: %s", err)

    def retire(self, worker: object) -> None:
        st = self.latest.pop(worker, None)
        if st is not None:
            self.base.add(st)

    def total(self, *more: RequestStats) -> RequestStats:
        """The base, every live worker's latest totals and *more* (this process's)."""
        t = self.base.copy()
        for st in (*self.latest.values(), *more):
            t.add(st)
        return t
