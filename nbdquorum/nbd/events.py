"""Events of the sans-I/O NBD server: what the client did, and what to answer.

`ServerConnection.next_event` returns `ExportChosen`, `Request`, `Disconnect`,
`StartTLS` or the `NEED_DATA` sentinel; `ServerConnection.send` takes a reply event
(`SimpleReply`, `ReadReply`, `ErrorReply`, `BlockStatusReply`) and returns the
bytes to write.  All events are frozen dataclasses with slots, as h11's are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

from nbdquorum.coretypes import Buffer

from .constants import (
    DEFAULT_MIN_BLOCK,
    DEFAULT_PREFERRED_BLOCK,
    MAX_BLOCK,
    MAX_STRING,
    Cmd,
    CmdFlag,
    TransmissionFlag,
)

__all__ = [
    "NEED_DATA",
    "BlockStatusReply",
    "Buffer",
    "DataChunk",
    "Disconnect",
    "ErrorReply",
    "Event",
    "ExportChosen",
    "ExportInfo",
    "HoleChunk",
    "ReadReply",
    "ReplyEvent",
    "Request",
    "SimpleReply",
    "StartTLS",
]


def _is_power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the server exports under one name; the protocol answers from it."""

    name: str  # export name as clients spell it (UTF-8, <= 4096 bytes)
    size: int  # export size in bytes
    description: str = ""  # shown to humans (NBD_INFO_DESCRIPTION, NBD_OPT_LIST)
    read_only: bool = False  # refuse writes with EPERM; READ_ONLY is advertised
    # Transmission flags to advertise.  HAS_FLAGS (and READ_ONLY when read_only)
    # are added by the protocol; SEND_DF is dropped when the client did not
    # negotiate structured replies, as the spec requires.
    flags: TransmissionFlag = TransmissionFlag.HAS_FLAGS
    min_block: int = DEFAULT_MIN_BLOCK  # alignment of offset and length
    preferred_block: int = DEFAULT_PREFERRED_BLOCK  # efficient I/O granularity
    max_block: int = MAX_BLOCK  # largest READ/WRITE length accepted

    def __post_init__(self) -> None:
        # proto.md: "Block size constraints" and "Conventions" (strings).
        if len(self.name.encode()) > MAX_STRING or len(self.description.encode()) > MAX_STRING:
            raise ValueError("export name and description must be at most 4096 bytes")
        if not 0 <= self.size < 1 << 64:
            raise ValueError(f"export size out of range: {self.size}")
        if not _is_power_of_2(self.min_block) or self.min_block > 1 << 16:
            raise ValueError(f"min_block must be a power of 2 <= 65536: {self.min_block}")
        if not _is_power_of_2(self.preferred_block) or self.preferred_block < max(
            self.min_block, 512
        ):
            raise ValueError(f"bad preferred_block: {self.preferred_block}")
        if (
            self.max_block % self.min_block
            or not min(self.preferred_block, self.size) <= self.max_block <= MAX_BLOCK
        ):
            raise ValueError(f"bad max_block: {self.max_block}")


# -- Events the client causes --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """The handshake is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME succeeded)."""

    name: str  # canonical export name ("" was resolved to the default export)
    info: ExportInfo  # the export, with `flags` exactly as advertised


@dataclass(frozen=True, slots=True)
class Request:
    """A transmission request other than NBD_CMD_DISC, not yet validated.

    Pass it to `ServerConnection.validate` before acting on it.
    """

    cmd: Cmd | int  # a plain int when the type is unknown (validate() -> EINVAL)
    flags: CmdFlag  # may hold unknown bits (validate() -> EINVAL)
    cookie: int  # the client's handle, echoed in every reply
    offset: int
    length: int
    # WRITE payload (``length`` bytes), owned by the receiver; kept out of repr()
    # so that logging a request does not dump 32 MiB.
    data: Buffer = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client is done: NBD_CMD_DISC, NBD_OPT_ABORT, or EOF between frames."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS was accepted: its ACK is in `data_to_send`.

    The caller writes the ACK, stops reading plaintext at once, runs the TLS
    handshake over the same socket and then calls
    `ServerConnection.tls_started`; everything after that is read and written
    through TLS.  (The protocol has already refused any plaintext byte that
    followed the option.)
    """


class NEED_DATA:  # a sentinel class, spelled as h11 spells it
    """Sentinel: `ServerConnection.next_event` needs more bytes."""

    def __init__(self) -> None:
        raise TypeError("NEED_DATA is a sentinel; compare with 'is'")


Event: TypeAlias = ExportChosen | Request | Disconnect | StartTLS


# -- Events the server sends --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimpleReply:
    """A simple reply; ``data`` only for a successful READ without structured replies."""

    cookie: int
    error: int = 0  # 0 or an NbdErrno
    data: Buffer = field(default=b"", repr=False)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """Part of a READ reply: ``data`` read at absolute ``offset``."""

    offset: int
    data: Buffer = field(repr=False)  # at least one byte


@dataclass(frozen=True, slots=True)
class HoleChunk:
    """Part of a READ reply: ``length`` zero bytes at absolute ``offset``."""

    offset: int
    length: int  # at least one byte


@dataclass(frozen=True, slots=True)
class ReadReply:
    """A successful READ, as content chunks.

    Structured: one OFFSET_DATA/OFFSET_HOLE chunk each, DONE on the last.
    Simple: one simple reply carrying the chunks' bytes in offset order (holes
    as zeroes); the chunks must then be contiguous.  For a read with
    `CmdFlag.DF` pass at most one `DataChunk`.
    """

    cookie: int
    chunks: Sequence[DataChunk | HoleChunk]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A failed request.

    Structured: an ERROR chunk (ERROR_OFFSET when ``offset`` is given) with DONE.
    Simple: a simple reply with ``error`` and no payload.
    """

    cookie: int
    error: int  # a nonzero NbdErrno; see errors.to_nbd_errno
    message: str = ""  # for humans; truncated to 4096 bytes of UTF-8
    offset: int | None = None  # where the error happened, inside the request


@dataclass(frozen=True, slots=True)
class BlockStatusReply:
    """A successful BLOCK_STATUS for one context: a BLOCK_STATUS chunk with DONE."""

    cookie: int
    context_id: int  # a key of ServerConnection.meta_contexts
    extents: Sequence[tuple[int, int]]  # (length, StateFlag) pairs, consecutive


ReplyEvent: TypeAlias = SimpleReply | ReadReply | ErrorReply | BlockStatusReply
