"""Crash recovery: make the children agree again where writes were in flight.

After an unclean stop (kill -9, power loss), only the regions marked in the
write-intent bitmap can differ between children.  Each is read through
Voted I/O and voted at a fine grain before the first request is served.
"""

from __future__ import annotations

import logging

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.quorum.members import ChildState
from nbdquorum.block.quorum.node import QuorumNode

log = logging.getLogger(__name__)

#: crash recovery votes at this grain inside a dirty region
RECOVERY_GRAIN = 4096


async def crash_recover(q: QuorumNode, dirty: RegionBitmap) -> dict[str, int]:
    """Make the children agree again on the regions dirty at an unclean stop.

    Each region is voted at RECOVERY_GRAIN among the active children; a grain
    with a winning version is copied to the others.  Where no version has a
    quorum (different writes were in flight on different children), the bytes
    of the first active child are taken: a write acknowledged to a client
    reached at least vote-threshold children, so it has a quorum and wins.
    Resyncing children get the dirty regions added to what they still lack.
    Returns counts for the log and the tests.
    """
    stats = {"regions": 0, "grains-repaired": 0, "grains-without-quorum": 0}
    regions = [dirty.region_of(b) for b in dirty]
    for slot in list(q.slots):
        if slot.state is ChildState.RESYNCING:
            q.members.start_resync(slot, regions)
    for off, n in regions:  # absent children and departed images may have missed them
        q.members.written(off, n)
    voters = q.active()
    if not voters:
        return stats
    nodes = [s.node for s in voters]
    for off, n in regions:
        stats["regions"] += 1
        reads = await q.voted.read(nodes, off, n, 1, limit=q.child_timeout)
        failed = [e for e in reads.errors if e is not None]
        if failed:
            raise OSError(failed[0].errno, f"crash recovery: cannot read region at {off}")
        bufs = [memoryview(b) for b in reads.bufs if b is not None]
        for g in range(0, n, RECOVERY_GRAIN):
            views = [buf[g:g + RECOVERY_GRAIN] for buf in bufs]
            result = q.voted.vote_now(views, q.vote_threshold)
            src = result.winner if result.winner is not None else 0
            targets = [i for i in range(len(voters)) if i != src
                       and result.groups[i] != result.groups[src]]
            if result.winner is None and len(set(result.groups)) > 1:
                stats["grains-without-quorum"] += 1
            for i in targets:
                await voters[i].node.pwrite(off + g, views[src])
                stats["grains-repaired"] += 1
    if stats["grains-repaired"]:
        await q.flush()
    log.warning(
        "crash recovery of %s: %d dirty regions, %d grains repaired, %d without quorum",
        q.node_name, stats["regions"], stats["grains-repaired"], stats["grains-without-quorum"],
    )
    return stats
