"""Every NBD wire layout, declared once for the server (protocol.py) and the client.

The byte layouts of proto.md's messages, network byte order, as precompiled
``struct.Struct`` objects; the values that go into them (magic numbers,
option, command and reply codes) are in constants.py.  Each comment names
the fields in order.  Both ends pack and unpack with these, so a layout
cannot differ between the server and the client that talks to it.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from nbdquorum.coretypes import Extent

__all__ = [
    "CHUNK",
    "CLIENT_FLAGS",
    "ERROR",
    "EXPORT_NAME_REPLY",
    "GREETING",
    "HOLE",
    "INFO_BLOCK_SIZE",
    "INFO_EXPORT",
    "INFO_TYPE",
    "OFFSET",
    "OPTION",
    "OPTION_REPLY",
    "REQUEST",
    "SIMPLE_REPLY",
    "STRING_LENGTH",
    "U16",
    "U32",
    "pack_block_status",
    "unpack_block_status",
]

# -- handshake ------------------------------------------------------------------
#: NBDMAGIC, IHAVEOPT, handshake flags (GlobalFlag)
GREETING: Final = struct.Struct(">QQH")
#: the client's flags (ClientFlag)
CLIENT_FLAGS: Final = struct.Struct(">I")
#: IHAVEOPT, option (Opt), data length
OPTION: Final = struct.Struct(">QII")
#: REPLY_MAGIC, option, reply type (Rep), length
OPTION_REPLY: Final = struct.Struct(">QIII")
#: size, transmission flags: the reply to NBD_OPT_EXPORT_NAME (+124 zeroes unless NO_ZEROES)
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")
#: Info.EXPORT, size, transmission flags
INFO_EXPORT: Final = struct.Struct(">HQH")
#: Info.BLOCK_SIZE, minimum, preferred, maximum
INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")

# -- transmission -----------------------------------------------------------------
#: REQUEST_MAGIC, command flags (CmdFlag), type (Cmd), cookie, offset, length
REQUEST: Final = struct.Struct(">IHHQQI")
#: SIMPLE_REPLY_MAGIC, error, cookie
SIMPLE_REPLY: Final = struct.Struct(">IIQ")
#: STRUCTURED_REPLY_MAGIC, reply flags (ReplyFlag), type (ReplyType), cookie, payload length
CHUNK: Final = struct.Struct(">IHHQI")
#: the offset in front of an OFFSET_DATA chunk's data (and after an ERROR_OFFSET message)
OFFSET: Final = struct.Struct(">Q")
#: OFFSET_HOLE: offset, hole size
HOLE: Final = struct.Struct(">QI")
#: ERROR, ERROR_OFFSET: error, message length (the message follows)
ERROR: Final = struct.Struct(">IH")

# -- the small fields inside option payloads ----------------------------------------
U16: Final = struct.Struct(">H")
U32: Final = struct.Struct(">I")
#: an information request's or reply's type (Info)
INFO_TYPE: Final = U16
#: the length in front of a string (export name, metadata context query)
STRING_LENGTH: Final = U32


def pack_block_status(context_id: int, extents: Sequence[Extent]) -> bytes:
    """A BLOCK_STATUS chunk's payload: the context id, then (length, flags) per extent."""
    return struct.pack(f">I{2 * len(extents)}I", context_id,
                       *(value for extent in extents for value in extent))


def unpack_block_status(payload: bytes) -> tuple[int, list[Extent]]:
    """A BLOCK_STATUS chunk's payload -> (context id, extents).

    Raises:
        struct.error: the payload is not a context id and whole extents.
    """
    if len(payload) % 8 != 4:
        raise struct.error(f"block status payload of {len(payload)} bytes")
    words = struct.unpack(f">{len(payload) // 4}I", payload)
    return words[0], list(zip(words[1::2], words[2::2], strict=True))
