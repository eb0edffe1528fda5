"""A region bitmap: one bit per fixed-size region of a disk.

Used for a resyncing child's "not yet in sync" regions and for the quorum's
write-intent log.  Regions are coarse (1 MiB by default), so a 1 TiB disk
needs a 128 KiB bitmap.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

DEFAULT_REGION = 1 << 20

_FULL = re.compile(rb"\xff+")
_EMPTY = re.compile(rb"\x00+")


class RegionBitmap:
    def __init__(self, size: int, region: int = DEFAULT_REGION, *, fill: bool = False) -> None:
        if region <= 0 or region & (region - 1):
            raise ValueError(f"region size must be a power of two, got {region}")
        self.size = size  # bytes covered
        self.region = region  # bytes per bit
        self.nbits = max(1, -(-size // region))
        self._bits = bytearray(b"\xff" if fill else b"\x00") * (-(-self.nbits // 8))
        if fill:
            self._trim_tail()
        self._count = self.nbits if fill else 0

    def _trim_tail(self) -> None:
        extra = len(self._bits) * 8 - self.nbits
        if extra:
            self._bits[-1] &= 0xFF >> extra

    # -- bit access ------------------------------------------------------------
    def test(self, bit: int) -> bool:
        return bool(self._bits[bit >> 3] & (1 << (bit & 7)))

    def set_bit(self, bit: int) -> bool:
        """Set one bit; True if it was clear."""
        mask = 1 << (bit & 7)
        if self._bits[bit >> 3] & mask:
            return False
        self._bits[bit >> 3] |= mask
        self._count += 1
        return True

    def clear_bit(self, bit: int) -> bool:
        mask = 1 << (bit & 7)
        if not self._bits[bit >> 3] & mask:
            return False
        self._bits[bit >> 3] &= ~mask & 0xFF
        self._count -= 1
        return True

    def bits_for(self, offset: int, length: int) -> range:
        """The bits covering the byte range [offset, offset+length)."""
        if length <= 0:
            return range(0)
        return range(offset // self.region, min(self.nbits, -(-(offset + length) // self.region)))

    def set_range(self, offset: int, length: int) -> list[int]:
        """Set the bits of a byte range; returns the bits that were newly set."""
        return [b for b in self.bits_for(offset, length) if self.set_bit(b)]

    def clear_bits(self, first: int, n: int) -> int:
        """Clear ``n`` bits from ``first`` on (whole bytes at once); returns how many were set."""
        end = min(first + n, self.nbits)
        cleared = 0
        bit = first
        while bit < end and bit & 7:
            cleared += self.clear_bit(bit)
            bit += 1
        whole_end = end & ~7
        if bit < whole_end:
            a, b = bit >> 3, whole_end >> 3
            ones = int.from_bytes(self._bits[a:b], "little").bit_count()
            self._bits[a:b] = bytes(b - a)
            self._count -= ones
            cleared += ones
            bit = whole_end
        while bit < end:
            cleared += self.clear_bit(bit)
            bit += 1
        return cleared

    def runs(self) -> Iterator[tuple[int, int]]:
        """(first bit, number of bits) of each run of set bits, ascending, as the
        bitmap was when called (later changes are not seen)."""
        snap = bytes(self._bits)
        start = -1  # first bit of the run being walked, or -1
        i, n = 0, len(snap)
        while i < n:
            byte = snap[i]
            if byte == 0xFF and start >= 0:  # a run goes on: skip its whole bytes
                m = _FULL.match(snap, i)
                i = m.end() if m else i + 1
                continue
            if byte == 0 and start < 0:  # between runs: skip the clear bytes
                m = _EMPTY.match(snap, i)
                i = m.end() if m else i + 1
                continue
            for j in range(8):
                if byte & (1 << j):
                    if start < 0:
                        start = i * 8 + j
                elif start >= 0:
                    yield start, i * 8 + j - start
                    start = -1
            i += 1
        if start >= 0:
            yield start, self.nbits - start

    def any_in(self, offset: int, length: int) -> bool:
        return any(self.test(b) for b in self.bits_for(offset, length))

    def region_of(self, bit: int) -> tuple[int, int]:
        """(offset, length) of a bit's region, clipped to the disk size."""
        off = bit * self.region
        return off, min(self.region, self.size - off)

    def __iter__(self) -> Iterator[int]:
        """Set bits in ascending order (skips clear bytes quickly)."""
        for i, byte in enumerate(self._bits):
            if byte:
                for j in range(8):
                    if byte & (1 << j):
                        yield i * 8 + j

    def count(self) -> int:
        return self._count

    def dirty_bytes(self) -> int:
        last = self.nbits - 1
        tail = self.region - self.region_of(last)[1] if self.test(last) else 0
        return self._count * self.region - tail

    def clear_all(self) -> None:
        self._bits[:] = bytes(len(self._bits))
        self._count = 0

    # -- persistence -----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    def to_hex(self) -> str:
        return self._bits.hex()

    @classmethod
    def from_bytes(cls, size: int, region: int, data: bytes) -> RegionBitmap:
        bm = cls(size, region)
        if len(data) != len(bm._bits):
            raise ValueError(f"bitmap of {len(data)} bytes does not fit {bm.nbits} regions")
        bm._bits[:] = data
        bm._trim_tail()
        bm._count = sum(bin(b).count("1") for b in bm._bits)
        return bm

    @classmethod
    def from_hex(cls, size: int, region: int, text: str) -> RegionBitmap:
        return cls.from_bytes(size, region, bytes.fromhex(text))
