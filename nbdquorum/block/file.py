"""The ``file`` driver: a regular file (or block device) on the host.

All syscalls run on the I/O pool.  Zero and trim punch holes where the file
system can, so every child reads zeros afterwards: a quorum's children must
stay byte-identical, so trim is never a silent no-op here.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from nbdquorum.block import aio
from nbdquorum.block.node import (
    STATE_HOLE,
    STATE_ZERO,
    BlockNode,
    Buffer,
    Caps,
    Direct,
    Extent,
    oserror,
)

_ZERO_CHUNK = bytes(1 << 20)


def pread_full(fd: int, offset: int, length: int) -> bytearray:
    buf = bytearray(length)
    view = memoryview(buf)
    done = 0
    while done < length:
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise oserror(errno.EIO, "short read (file shrank?)")
        done += n
    return buf


def pwrite_full(fd: int, offset: int, data: Buffer) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_zeroes(fd: int, offset: int, length: int) -> None:
    while length > 0:
        n = min(length, len(_ZERO_CHUNK))
        pwrite_full(fd, offset, memoryview(_ZERO_CHUNK)[:n])
        offset += n
        length -= n


class FileDirect(Direct):
    """A file's bytes are its descriptor's: Voted I/O reads and writes it in C."""

    def __init__(self, node: FileNode) -> None:
        self.node = node
        self.fd = node.fd

    def pin(self) -> None:
        self.node.pin()

    def unpin(self) -> None:
        self.node.unpin()


class FileNode(BlockNode):
    driver = "file"

    def __init__(
        self, node_name: str, filename: str, *, read_only: bool = False, create_size: int | None = None
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.path = filename
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if create_size is not None and not read_only and not os.path.exists(filename):
            fd = os.open(filename, flags | os.O_CREAT | os.O_EXCL, 0o644)
            os.ftruncate(fd, create_size)
        else:
            fd = os.open(filename, flags)
        self.fd = fd
        try:
            # Like QEMU's image locking: two writers on one image (a second
            # server, or the same file given twice) would let one disk
            # outvote the others, so the second open is refused.
            fcntl.flock(fd, (fcntl.LOCK_SH if read_only else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(
                errno.EBUSY,
                f'Failed to get "{"shared" if read_only else "write"}" lock: {filename} is '
                "in use (by another process, or given twice)",
            ) from None
        st = os.fstat(fd)
        self.inode = (st.st_dev, st.st_ino)  # identity, to refuse one image twice
        if stat.S_ISBLK(st.st_mode):
            self._size = os.lseek(fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self._size = st.st_size
        else:
            os.close(fd)
            raise OSError(errno.EINVAL, f"not a regular file or block device: {filename}")
        self._closed = False
        self._pins = 0  # in-flight requests using self.fd
        self._close_pending = False
        self._direct = FileDirect(self)
        #: a range block status found to be all data, [start, end): asked again, it
        #: is answered without lseek; any punch or zeroing forgets it
        self._data_run: tuple[int, int] | None = None
        self._holes_made = 0  # bumped by every punch/zero (a run found meanwhile is dropped)

    def pin(self) -> None:
        self._pins += 1

    def unpin(self) -> None:
        self._pins -= 1
        if self._pins == 0 and self._close_pending:
            self._really_close()

    def size(self) -> int:
        return self._size

    def health(self) -> str | None:
        if not self._fd_open():
            return None
        try:
            st = os.fstat(self.fd)
        except OSError as err:
            return f"{self.path}: fstat failed: {err.strerror}"
        if st.st_nlink == 0:
            return f"{self.path} was deleted (the open file lives on until the child is replaced)"
        if stat.S_ISREG(st.st_mode) and st.st_size != self._size:
            return f"{self.path} changed size from {self._size} to {st.st_size} bytes"
        return None

    def filename(self) -> str:
        return self.path

    def _fd_open(self) -> bool:
        # closed for new users, but still valid for the requests that pinned it
        return not self._closed or self._close_pending

    def caps(self) -> Caps:
        base = Caps.TRIM | Caps.FAST_ZERO | Caps.FUA | Caps.MULTI_CONN
        return base | Caps.READ_ONLY if self.read_only else base

    def direct(self) -> Direct | None:
        return self._direct if self._fd_open() else None

    def actual_size(self) -> int:
        try:
            return os.fstat(self.fd).st_blocks * 512
        except OSError:
            return 0

    def _check_open(self) -> None:
        if not self._fd_open():
            raise oserror(errno.ESHUTDOWN, f"{self.node_name} is closed")

    async def pread(self, offset: int, length: int) -> Buffer:
        self._check_open()
        self.pin()
        try:
            return await aio.run(pread_full, self.fd, offset, length)
        finally:
            self.unpin()

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        self._check_open()
        self.pin()
        try:
            await aio.run(self._pwrite_sync, offset, data, fua)
        finally:
            self.unpin()

    def _pwrite_sync(self, offset: int, data: Buffer, fua: bool) -> None:
        pwrite_full(self.fd, offset, data)
        if fua:
            os.fdatasync(self.fd)

    async def flush(self) -> None:
        self._check_open()
        self.pin()
        try:
            await aio.run(os.fdatasync, self.fd)
        finally:
            self.unpin()

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_open()
        self.pin()
        try:
            await aio.run(self._zero_sync, offset, length, may_trim, fast, fua)
        finally:
            self.unpin()

    def _zero_sync(self, offset: int, length: int, may_trim: bool, fast: bool, fua: bool) -> None:
        from nbdquorum import native

        self._forget_data_run()
        done = False
        if may_trim:
            done = native.punch_hole(self.fd, offset, length)
        if not done:
            done = native.zero_range(self.fd, offset, length)
        if not done:
            if fast:
                raise oserror(errno.ENOTSUP, "fast zero")
            write_zeroes(self.fd, offset, length)
        if fua:
            os.fdatasync(self.fd)
        self._forget_data_run()

    def _forget_data_run(self) -> None:
        """Holes may appear (a punch): what block status knew of the data is void.
        (Writes only turn holes into data: they leave a known data run true.)"""
        self._holes_made += 1
        self._data_run = None

    async def cache(self, offset: int, length: int) -> None:
        self._check_open()
        self.pin()
        try:
            await aio.run(os.posix_fadvise, self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        finally:
            self.unpin()

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        self._check_open()
        self.pin()
        try:
            return await aio.run(self._block_status_sync, offset, length)
        finally:
            self.unpin()

    def _block_status_sync(self, offset: int, length: int) -> list[Extent]:
        end = offset + length
        out: list[Extent] = []
        pos = offset
        gen = self._holes_made
        while pos < end:
            run = self._data_run
            if run is not None and run[0] <= pos < run[1]:
                # known data (see _data_run): no lseek, which on tmpfs walks every
                # page up to the next hole, gigabytes for a full image
                n = min(run[1], end) - pos
                out.append((n, 0))
                pos += n
                continue
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # only a hole up to EOF
                    data = end
                elif err.errno in (errno.EINVAL, errno.ENOTSUP):
                    out.append((end - pos, 0))
                    break
                else:
                    raise
            if data > pos:
                n = min(data, end) - pos
                out.append((n, STATE_HOLE | STATE_ZERO))
                pos += n
                continue
            try:
                hole = os.lseek(self.fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            else:
                if hole > pos and gen == self._holes_made:
                    self._data_run = (pos, hole)
            n = min(max(hole, pos + 1), end) - pos
            out.append((n, 0))
            pos += n
        return out

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._pins:
                self._close_pending = True
            else:
                self._really_close()
        super().close()

    def _really_close(self) -> None:
        self._close_pending = False
        os.close(self.fd)
