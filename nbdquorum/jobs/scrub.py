"""Scrub: read every region of every active child, vote, count, optionally repair.

md's ``check`` and ``repair`` sync actions, ZFS's ``zpool scrub``.  Each region
is verified under the quorum's range lock (shared for check, exclusive for
repair), so client I/O stays consistent; between regions the job yields while
clients are busy and honours its rate limit.  The result, per child, counts
mismatched regions and bytes; regions without a quorum are counted as
unrecoverable (and emit QUORUM_FAILURE like a client read would).

Regions that every voter reads as zero (block status ZERO on each, see
block/quorum/thin.py) have nothing to compare: they count as scanned without
being read, and cost nothing against the rate limit.  A region where only some
voters say zero is read and voted like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from nbdquorum.block.bitmap import DEFAULT_REGION
from nbdquorum.block.quorum import QuorumNode
from nbdquorum.block.quorum.thin import region_runs
from nbdquorum.eventbus import EventBus
from nbdquorum.jobs.job import Job

log = logging.getLogger(__name__)

#: regions one block-status query of the scrub covers (1 GiB of 1 MiB regions)
WINDOW = 1024
#: pause between regions while a client request happened this recently (s)
YIELD_WINDOW = 0.02


class ScrubJob(Job):
    job_type = "scrub"

    def __init__(
        self, quorum: QuorumNode, bus: EventBus, *, repair: bool = False, speed: int = 0,
        region: int = DEFAULT_REGION, job_id: str | None = None,
    ) -> None:
        super().__init__(job_id or f"scrub-{quorum.node_name}", quorum.node_name, bus, speed=speed)
        self.quorum = quorum
        self.repair = repair  # rewrite the losing children
        self.region = region
        self.mismatched_regions: dict[str, int] = {}  # node-name -> regions that lost
        self.mismatched_bytes: dict[str, int] = {}  # node-name -> differing bytes
        self.unrecoverable: list[int] = []  # offsets of regions without a quorum

    async def run(self) -> None:
        q = self.quorum
        size = q.size()
        self.total = size
        span = self.region * WINDOW
        for start in range(0, size, span):
            length = min(span, size - start)
            # ranges every voter reads as zero hold nothing to compare: counted as
            # scanned, never read (a range written after this query is compared by
            # the next scrub, like one written behind the scrub's position)
            hint = await q.zero_extents(start, length)
            for off, n, zero in region_runs(hint, start, length, self.region):
                if zero:
                    await self.checkpoint(n, cost=0)
                    continue
                for roff in range(off, off + n, self.region):
                    await self._verify(q, roff, min(self.region, off + n - roff))

    async def _verify(self, q: QuorumNode, off: int, n: int) -> None:
        # Yield to client I/O: wait (bounded) while requests keep arriving.
        for _ in range(50):
            if time.monotonic() - q.last_client_io >= YIELD_WINDOW:
                break
            await asyncio.sleep(YIELD_WINDOW)
        try:
            found = await q.verify(off, n, repair=self.repair)
        except OSError as err:
            log.error("scrub of %s: no quorum at %d+%d: %s", q.node_name, off, n, err)
            self.unrecoverable.append(off)
            found = {}
        for name, nbytes in found.items():
            self.mismatched_regions[name] = self.mismatched_regions.get(name, 0) + 1
            self.mismatched_bytes[name] = self.mismatched_bytes.get(name, 0) + nbytes
        await self.checkpoint(n)

    def result(self) -> dict[str, Any]:
        return {
            "repair": self.repair,
            "mismatched-regions": dict(self.mismatched_regions),
            "mismatched-bytes": dict(self.mismatched_bytes),
            "unrecoverable-regions": len(self.unrecoverable),
            "scanned": self.current,
        }

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["x-scrub"] = self.result()
        return d

    def finalize(self) -> None:
        q = self.quorum
        # each child's checksum-error counter as the scrub ended: a status display can
        # tell errors a completed repair has dealt with from later ones
        seen = {s.node.node_name: s.stats.checksum_errors for s in q.slots}
        q.last_scrub = {**self.result(), "cancelled": self.cancelled, "error": self.error,
                        "finished": time.time(), "checksum-errors": seen}
        self.bus.emit("QUORUM_SCRUB_DONE", {"node-name": q.node_name, **self.result(),
                                            "cancelled": self.cancelled})
