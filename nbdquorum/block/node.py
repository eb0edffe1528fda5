"""The one block-node interface every layer implements.

Modelled on nbdkit's ``struct nbdkit_next_ops``: a node has a size and a few
data operations; a layer overrides only what it changes.  Errors are always
``OSError`` with an errno; the NBD layer maps them to NBD errors in one place.
Offsets and lengths are bytes; callers (the NBD server, jobs) validate ranges.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
from collections.abc import Callable
from typing import Any

from nbdquorum.coretypes import Buffer as Buffer
from nbdquorum.coretypes import Extent as Extent

#: base:allocation flags (proto.md "base:allocation metadata context")
STATE_HOLE = 1
STATE_ZERO = 2


class Caps(enum.IntFlag):
    """What a node can do besides read, write and flush."""

    TRIM = 1  #: trim reaches the bytes (they read as zeros afterwards)
    FAST_ZERO = 2  #: zero without writing data, or refuse quickly (ENOTSUP)
    FUA = 4  #: a write can be made durable on its own (force unit access)
    MULTI_CONN = 8  #: every connection/caller sees every other one's flushed writes
    READ_ONLY = 16  #: writes are refused


#: the outcome of a request started with a callback: (result, None) or (None, error)
Then = Callable[[Any, "BaseException | None"], None]


def settler(out: asyncio.Future[Any]) -> Then:
    """A callback that settles ``out`` (unless it is done already)."""

    def then(result: Any, err: BaseException | None) -> None:
        if not out.done():
            if err is None:
                out.set_result(result)
            else:
                out.set_exception(err)

    return then


def error_of(f: asyncio.Future[Any]) -> BaseException | None:
    """A finished future's error (None if it succeeded or was cancelled), taken: the
    loop never reports it as never retrieved.  Also a done callback for a future
    nobody awaits."""
    return None if f.cancelled() else f.exception()


def tell(f: asyncio.Future[Any], then: Then) -> None:
    """Pass a finished future's outcome to a callback (cancelled: ECANCELED)."""
    if f.cancelled():
        then(None, oserror(errno.ECANCELED, "request cancelled"))
    elif f.exception() is not None:
        then(None, f.exception())
    else:
        then(f.result(), None)


class Direct:
    """A node's offer to serve a request now, on the caller's thread.

    ``try_pread``/``try_pwrite`` answer at once or decline (None/False) when
    that would block or is not the common case; the caller then awaits the
    node as usual.  ``soon_pread``/``soon_pwrite`` start the request now and
    give a future (no task, no coroutine per request), or decline (None).  A node whose bytes are a file descriptor 1:1 says so with
    ``fd``: the quorum's Voted I/O groups such children into one GIL-free C
    call, holding ``pin()`` so the descriptor stays open meanwhile.
    """

    #: a descriptor holding the node's bytes 1:1, or None
    fd: int | None = None
    #: every soon_pread/soon_pwrite future is done within this many seconds (the
    #: node bounds its own requests: a caller with a longer limit needs no timer
    #: of its own), or None
    time_limit: float | None = None
    #: whether try_pwrite may take a write at all (False: the caller need not ask)
    writes_now: bool = True

    def try_pread(self, offset: int, length: int) -> Buffer | None:
        return None

    def try_pwrite(self, offset: int, data: Buffer) -> bool:
        """Raises OSError like pwrite() when the write was done but failed."""
        return False

    def soon_pread(self, offset: int, length: int) -> asyncio.Future[Buffer] | None:
        """Start a read now, without a task: a future of what pread() gives (its
        bytes, or OSError), or None to decline (the caller then awaits pread)."""
        return None

    def soon_pwrite(self, offset: int, data: Buffer) -> asyncio.Future[None] | None:
        """Start a write now, without a task: a future of pwrite()'s outcome, or
        None to decline."""
        return None

    def call_pread(self, offset: int, length: int, then: Then) -> bool:
        """soon_pread with a callback: start a read now; ``then(bytes, None)`` or
        ``then(None, OSError)`` is called once, later, never from within this call.
        False to decline (nothing started).  ``then`` must not raise."""
        return False

    def call_pwrite(self, offset: int, data: Buffer, then: Then) -> bool:
        """soon_pwrite with a callback, as call_pread."""
        return False

    def takes(self, length: int) -> bool:
        """Whether call_pread/call_pwrite would start a request of ``length`` bytes
        now (a caller that must do other I/O first asks before it)."""
        return False

    def pin(self) -> None:
        """Keep ``fd`` open until the matching unpin() (a request is using it)."""

    def unpin(self) -> None:
        pass



class Unreachable(str):
    """A health problem of a node's link, not of its image: it may come back.

    ``health()`` returns one for a child on another host whose connection is
    down; the quorum then takes it out of the I/O (``unreachable``) instead
    of faulting it, and catches it up when ``health()`` is None again.
    """

    __slots__ = ()


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

    # -- capabilities ------------------------------------------------------------
    def caps(self) -> Caps:
        """What the node can do beyond read/write/flush (NBD export flags derive from it)."""
        return Caps.READ_ONLY if self.read_only else Caps(0)

    def direct(self) -> Direct | None:
        """The one optional capability: serve a request now, without a thread hop.

        None for nodes that can only be awaited (the default).  See ``Direct``.
        """
        return None

    def health(self) -> str | None:
        """A problem the node can see without I/O (file deleted, truncated, a
        link down: ``Unreachable``), or None."""
        for c in self.children_nodes():
            problem = c.health()
            if problem:
                return problem
        return None

    # -- lifecycle / introspection ----------------------------------------
    def close(self) -> None:
        for fn in self._on_close:
            fn()
        self._on_close.clear()

    def children_nodes(self) -> list[BlockNode]:
        return []

    def filename(self) -> str:
        return self.node_name

    def actual_size(self) -> int:
        return sum(c.actual_size() for c in self.children_nodes())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"


class Filter(BlockNode):
    """A node over one child that passes everything through by default.

    nbdkit's filter idea: a filter overrides only what it changes (``raw``
    changes nothing, ``faulty`` injects errors into the data path).
    """

    def __init__(self, node_name: str, child: BlockNode, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only or child.read_only)
        self.child = child  # the node underneath ("file" in QEMU's graph)

    def size(self) -> int:
        return self.child.size()

    def caps(self) -> Caps:
        return self.child.caps() | (Caps.READ_ONLY if self.read_only else Caps(0))

    def direct(self) -> Direct | None:
        return self.child.direct()

    def children_nodes(self) -> list[BlockNode]:
        return [self.child]

    def filename(self) -> str:
        return self.child.filename()

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.child.pread(offset, length)

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.child.pwrite(offset, data, fua=fua)

    async def flush(self) -> None:
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.child.trim(offset, length, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self.child.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def cache(self, offset: int, length: int) -> None:
        await self.child.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.child.block_status(offset, length)
