"""The ``faulty`` driver: a fault injector over another node, for drills and tests.

In the spirit of QEMU's blkdebug: rules select an operation and a byte range
and say what goes wrong there: an errno (``error``), silently flipped bytes
(``flip``: reads return, or writes store, every byte XOR 0xff), zeroed bytes
(``zero``: reads return zeros), or a child that stops answering (``hang``:
the request waits until the rules change).  Rules can be switched live over
QMP (x-faulty-set).  With no rules the node is a plain pass-through, and it
keeps the quorum's C fast path (fast_fd) available.
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
from dataclasses import dataclass
from typing import Any

from nbdquorum.block.node import BlockNode, Buffer, Direct, Extent, Filter, oserror

OPS = ("read", "write", "flush", "any")
ACTIONS = ("error", "flip", "zero", "hang")


@dataclass
class FaultRule:
    op: str = "any"  # read | write (write, zero, trim) | flush | any
    offset: int = 0  # first byte affected
    length: int | None = None  # bytes affected; None: to the end of the disk
    action: str = "error"  # error | flip | zero | hang
    errno: int = errno_mod.EIO  # for action "error"
    count: int | None = None  # hits left before the rule expires; None: forever

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> FaultRule:
        unknown = set(d) - {"op", "offset", "length", "action", "errno", "count"}
        if unknown:
            raise ValueError(f"Parameter '{sorted(unknown)[0]}' is unexpected")
        r = cls(**{k: v for k, v in d.items()})
        if r.op not in OPS:
            raise ValueError(f"Parameter 'op' does not accept value '{r.op}'")
        if r.action not in ACTIONS:
            raise ValueError(f"Parameter 'action' does not accept value '{r.action}'")
        if r.offset < 0 or (r.length is not None and r.length < 0):
            raise ValueError("offset and length must not be negative")
        return r

    def to_wire(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def hits(self, op: str, offset: int, length: int) -> bool:
        if self.op != "any" and self.op != op:
            return False
        if self.count is not None and self.count <= 0:
            return False
        if op == "flush":
            return True
        end = None if self.length is None else self.offset + self.length
        return offset + max(length, 1) > self.offset and (end is None or offset < end)


class FaultyNode(Filter):
    driver = "faulty"

    def __init__(self, node_name: str, image: BlockNode, rules: list[FaultRule] | None = None) -> None:
        super().__init__(node_name, image)
        self.rules: list[FaultRule] = list(rules or [])
        self._changed = asyncio.Event() if _loop_running() else None
        self.injected = 0  # faults injected so far

    @property
    def image(self) -> BlockNode:
        return self.child

    # -- control ---------------------------------------------------------------------
    def set_rules(self, rules: list[FaultRule]) -> None:
        self.rules = list(rules)
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _match(self, op: str, offset: int, length: int) -> FaultRule | None:
        for r in self.rules:
            if r.hits(op, offset, length):
                if r.count is not None:
                    r.count -= 1
                self.injected += 1
                return r
        return None

    async def _hang(self) -> None:
        if self._changed is None:
            self._changed = asyncio.Event()
        await self._changed.wait()

    async def _pre(self, op: str, offset: int, length: int) -> FaultRule | None:
        r = self._match(op, offset, length)
        if r is None:
            return None
        if r.action == "error":
            raise oserror(r.errno, f"injected by {self.node_name}")
        if r.action == "hang":
            await self._hang()
            raise oserror(errno_mod.EIO, f"{self.node_name}: hung request released")
        return r

    @staticmethod
    def _damage(r: FaultRule, offset: int, data: Buffer) -> bytes:
        buf = bytearray(data)
        a = max(r.offset - offset, 0)
        b = len(buf) if r.length is None else min(len(buf), r.offset + r.length - offset)
        if r.action == "flip":
            buf[a:b] = bytes(x ^ 0xFF for x in buf[a:b])
        elif r.action == "zero":
            buf[a:b] = bytes(max(b - a, 0))
        return bytes(buf)

    # -- what the filter changes: the data path, and no direct access while rules apply
    def direct(self) -> Direct | None:
        return None if self.rules else self.child.direct()

    async def pread(self, offset: int, length: int) -> Buffer:
        r = await self._pre("read", offset, length)
        data = await self.child.pread(offset, length)
        return data if r is None else self._damage(r, offset, data)

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        r = await self._pre("write", offset, len(data))
        await self.child.pwrite(offset, data if r is None else self._damage(r, offset, data),
                                fua=fua)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        # where a rule changes or fails reads, the image's holes say nothing of what
        # is read: data, so that resync and scrub read (and vote on) those bytes
        if any(r.op in ("read", "any") and r.hits("read", offset, length) for r in self.rules):
            return [(length, 0)]
        return await self.child.block_status(offset, length)

    async def flush(self) -> None:
        await self._pre("flush", 0, 0)
        await self.child.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._pre("write", offset, length)
        await self.child.trim(offset, length, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self._pre("write", offset, length)
        await self.child.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
