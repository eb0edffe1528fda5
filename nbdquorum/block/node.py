"""The one block-node interface every layer implements.

Modelled on nbdkit's ``struct nbdkit_next_ops``: a node has a size and a few
data operations; a layer overrides only what it changes.  Errors are always
``OSError`` with an errno; the NBD layer maps them to NBD errors in one place.
Offsets and lengths are bytes; callers (the NBD server, jobs) validate ranges.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

from nbdquorum.coretypes import Buffer as Buffer
from nbdquorum.coretypes import Extent as Extent

#: base:allocation flags (proto.md "base:allocation metadata context")
STATE_HOLE = 1
STATE_ZERO = 2


def oserror(code: int, what: str = "") -> OSError:
    msg = os.strerror(code)
    return OSError(code, f"{msg}: {what}" if what else msg)


class BlockNode:
    """Base class: a named node in the block graph.

    Subclasses implement the data path; defaults here raise ENOTSUP so a
    missing operation is an error, never a silent no-op.
    """

    driver: str = "?"

    def __init__(self, node_name: str, *, read_only: bool = False) -> None:
        self.node_name = node_name  # unique in the graph (graph.py enforces it)
        self.read_only = read_only  # opened without write permission
        self.owned_by_monitor = True  # created by the CLI or blockdev-add
        self._on_close: list[Callable[[], None]] = []

    # -- geometry ---------------------------------------------------------
    def size(self) -> int:
        raise NotImplementedError

    # -- data path --------------------------------------------------------
    async def pread(self, offset: int, length: int) -> Buffer:
        raise oserror(errno.ENOTSUP, "read")

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        raise oserror(errno.ENOTSUP, "write")

    async def flush(self) -> None:
        raise oserror(errno.ENOTSUP, "flush")

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        raise oserror(errno.ENOTSUP, "trim")

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        raise oserror(errno.ENOTSUP, "zero")

    async def cache(self, offset: int, length: int) -> None:
        """Advisory prefetch (NBD_CMD_CACHE); the default does nothing."""

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        """Allocation of [offset, offset+length); the default: all data."""
        return [(length, 0)]

    def buffers_per_read(self) -> int:
        """How many request-sized buffers a read holds at once (memory budget)."""
        return 1

    # -- synchronous fast paths (optional) --------------------------------------
    def try_pread_now(self, offset: int, length: int) -> Buffer | None:
        """Serve a read without awaiting, if that is cheap and safe; else None."""
        return None

    def try_pwrite_now(self, offset: int, data: Buffer) -> bool:
        """Do a write without awaiting, if that is cheap and safe; else False.

        Raises OSError like pwrite() when the write was done but failed.
        """
        return False

    # -- fast path ----------------------------------------------------------
    def fast_fd(self) -> int | None:
        """A file descriptor that reads/writes this node's bytes 1:1, or None.

        When every child of a quorum has one, the quorum does a request's
        child I/O and its vote in one C call with the GIL released.
        """
        return None

    def health(self) -> str | None:
        """A problem the node can see without I/O (file deleted, truncated), or None."""
        for c in self.children_nodes():
            problem = c.health()
            if problem:
                return problem
        return None

    def pin(self) -> None:
        """Keep this node's descriptors open across an in-flight request.

        A child removed and deleted while a request still uses it closes
        only when the last request unpins it, so an fd is never reused
        under a running pread/pwrite.
        """
        for c in self.children_nodes():
            c.pin()

    def unpin(self) -> None:
        for c in self.children_nodes():
            c.unpin()

    # -- lifecycle / introspection ----------------------------------------
    def close(self) -> None:
        for fn in self._on_close:
            fn()
        self._on_close.clear()

    def children_nodes(self) -> list[BlockNode]:
        return []

    def filename(self) -> str:
        return self.node_name

    def info(self) -> dict[str, Any]:
        """This node's entry for query-named-block-nodes (QEMU's BlockDeviceInfo)."""
        size = self.size()
        return {
            "iops_rd": 0,
            "detect_zeroes": "off",
            "image": {
                "virtual-size": size,
                "filename": self.filename(),
                "format": self.driver,
                "actual-size": self.actual_size(),
                "dirty-flag": False,
            },
            "iops_wr": 0,
            "ro": self.read_only,
            "node-name": self.node_name,
            "backing_file_depth": 0,
            "drv": self.driver,
            "iops": 0,
            "bps_wr": 0,
            "write_threshold": 0,
            "encrypted": False,
            "bps": 0,
            "bps_rd": 0,
            "cache": {"no-flush": False, "direct": False, "writeback": True},
            "file": self.filename(),
        }

    def actual_size(self) -> int:
        return sum(c.actual_size() for c in self.children_nodes())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"
