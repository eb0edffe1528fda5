"""The block graph in QEMU's reply shapes: BlockDeviceInfo and the quorum status.

The block layer exposes plain attributes and counters; what a QMP client
sees (field names, nesting, QEMU's constant fields) is decided here.
"""

from __future__ import annotations

from typing import Any

from nbdquorum.block.faulty import FaultyNode
from nbdquorum.block.file import FileNode
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import ChildStats, QuorumNode
from nbdquorum.remote.child import NBDChild


def block_device_info(node: BlockNode) -> dict[str, Any]:
    """A node's entry for query-named-block-nodes (QEMU's BlockDeviceInfo)."""
    size = node.size()
    image: dict[str, Any] = {
        "virtual-size": size,
        "filename": node.filename(),
        "format": node.driver,
        "actual-size": node.actual_size(),
    }
    if isinstance(node, NBDChild):  # as QEMU shows an nbd node: no sizes on disk
        del image["actual-size"]
    elif not isinstance(node, QuorumNode | FileNode):
        image["dirty-flag"] = False
    d: dict[str, Any] = {
        "iops_rd": 0,
        "detect_zeroes": "off",
        "image": image,
        "iops_wr": 0,
        "ro": node.read_only,
        "node-name": node.node_name,
        "backing_file_depth": 0,
        "drv": node.driver,
        "iops": 0,
        "bps_wr": 0,
        "write_threshold": 0,
        "encrypted": False,
        "bps": 0,
        "bps_rd": 0,
        "cache": {"no-flush": False, "direct": False, "writeback": True},
        "file": node.filename(),
    }
    if isinstance(node, QuorumNode):
        d["children"] = [{"child": s.name, "node-name": s.node.node_name} for s in node.slots]
    if isinstance(node, FaultyNode):
        d["x-rules"] = [r.to_wire() for r in node.rules]
    if isinstance(node, NBDChild):
        d["x-link"] = node.status()
    return d


def child_stats(stats: ChildStats) -> dict[str, int]:
    """The READ/WRITE/CKSUM-like counters, in wire spelling."""
    return {k.replace("_", "-"): v for k, v in stats.__dict__.items()}


def quorum_status(q: QuorumNode) -> dict[str, Any]:
    """query-quorum-status: options, and per child state and counters (like zpool status)."""
    return {
        "node-name": q.node_name,
        "vote-threshold": q.vote_threshold,
        "read-pattern": str(q.read_pattern),
        "rewrite-corrupted": q.rewrite_corrupted,
        "size": q.size(),
        "events": q.members.events,
        "children": [
            {
                "child": s.name,
                "node-name": s.node.node_name,
                "filename": s.node.filename(),
                "state": str(s.state),
                "errors": q.members.recent_errors(s),
                "unsynced-bytes": s.sync.dirty_bytes() if s.sync is not None else 0,
                "resync-failures": s.resync_failures,
                "generation": s.generation,
                **({"resync-error": s.resync_error} if s.resync_error else {}),
                **({"fault-reason": s.fault_reason} if s.fault_reason else {}),
                **child_stats(s.stats),
            }
            for s in q.slots
        ],
        "last-scrub": q.last_scrub,
    }
