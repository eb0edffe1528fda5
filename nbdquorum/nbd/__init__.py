"""Sans-I/O NBD server protocol (NetworkBlockDevice/nbd doc/proto.md).

`ServerConnection` turns client bytes into events and reply events into bytes;
``server.py`` is the asyncio glue around it.
"""

from __future__ import annotations

from .constants import (
    IHAVEOPT,
    MAX_BLOCK,
    META_BASE_ALLOCATION,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    GlobalFlag,
    Info,
    NbdErrno,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    StateFlag,
    TransmissionFlag,
)
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, to_nbd_errno
from .events import (
    NEED_DATA,
    BlockStatusReply,
    DataChunk,
    Disconnect,
    ErrorReply,
    Event,
    ExportChosen,
    ExportInfo,
    HoleChunk,
    ReadReply,
    ReplyEvent,
    Request,
    SimpleReply,
)
from .protocol import Phase, ServerConnection

__all__ = [
    "IHAVEOPT",
    "MAX_BLOCK",
    "META_BASE_ALLOCATION",
    "NBDMAGIC",
    "NEED_DATA",
    "REPLY_MAGIC",
    "REQUEST_MAGIC",
    "SIMPLE_REPLY_MAGIC",
    "STRUCTURED_REPLY_MAGIC",
    "BlockStatusReply",
    "ClientFlag",
    "Cmd",
    "CmdFlag",
    "DataChunk",
    "Disconnect",
    "ErrorReply",
    "Event",
    "ExportChosen",
    "ExportInfo",
    "GlobalFlag",
    "HoleChunk",
    "Info",
    "LocalProtocolError",
    "NbdErrno",
    "Opt",
    "Phase",
    "ProtocolError",
    "ReadReply",
    "RemoteProtocolError",
    "Rep",
    "ReplyEvent",
    "ReplyFlag",
    "ReplyType",
    "Request",
    "ServerConnection",
    "SimpleReply",
    "StateFlag",
    "TransmissionFlag",
    "to_nbd_errno",
]
