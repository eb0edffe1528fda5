"""The ``raw`` format driver: the bytes of its ``file`` child, unchanged.

It exists so the graph has QEMU's shape (quorum -> raw -> file) and QMP clients
can use the blockdev-add forms they already know.
"""

from __future__ import annotations

from typing import Any

from nbdquorum.block.node import BlockNode, Buffer, Extent


class RawNode(BlockNode):
    driver = "raw"

    def __init__(self, node_name: str, file: BlockNode, *, read_only: bool = False) -> None:
        super().__init__(node_name, read_only=read_only or file.read_only)
        self.file = file  # the protocol node underneath

    def size(self) -> int:
        return self.file.size()

    def children_nodes(self) -> list[BlockNode]:
        return [self.file]

    def filename(self) -> str:
        return self.file.filename()

    def fast_fd(self) -> int | None:
        return self.file.fast_fd()

    async def pread(self, offset: int, length: int) -> Buffer:
        return await self.file.pread(offset, length)

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        await self.file.pwrite(offset, data, fua=fua)

    async def flush(self) -> None:
        await self.file.flush()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.file.trim(offset, length, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        await self.file.zero(offset, length, may_trim=may_trim, fast=fast, fua=fua)

    async def cache(self, offset: int, length: int) -> None:
        await self.file.cache(offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        return await self.file.block_status(offset, length)

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["file"] = self.filename()
        return d
