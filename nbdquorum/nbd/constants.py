"""Every NBD wire constant, declared once.

Values come from NetworkBlockDevice/nbd ``doc/proto.md`` (sections "Handshake",
"Transmission" and "Values"); the names drop the ``NBD_`` / ``NBD_FLAG_`` /
``NBD_OPT_`` ... prefixes because the class name carries them:
``Cmd.WRITE_ZEROES`` is ``NBD_CMD_WRITE_ZEROES``.  An ``IntEnum``/``IntFlag``
is both the table and its name lookup (``Cmd(6).name``).
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

# -- Magic numbers (proto.md: "Newstyle negotiation", "Request message", ...) --

#: Server greeting, ASCII "NBDMAGIC" (also called INIT_PASSWD).
NBDMAGIC: Final = 0x4E42444D41474943
#: Newstyle greeting and the prefix of every client option, ASCII "IHAVEOPT".
IHAVEOPT: Final = 0x49484156454F5054
#: Prefix of every fixed-newstyle option reply.
REPLY_MAGIC: Final = 0x3E889045565A9
#: Prefix of every transmission request.
REQUEST_MAGIC: Final = 0x25609513
#: Prefix of a simple reply (historically NBD_REPLY_MAGIC).
SIMPLE_REPLY_MAGIC: Final = 0x67446698
#: Prefix of every structured reply chunk.
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# -- Limits ---------------------------------------------------------------------

#: Largest READ/WRITE a client should send without asking (proto.md: "Block size
#: constraints", 2^25); also the maximum block size we advertise by default.
MAX_BLOCK: Final = 32 * 1024 * 1024
#: Strings (export names, queries, messages) MUST be no longer than this.
MAX_STRING: Final = 4096
#: Option data larger than this is a denial of service, not a mistake: we drop the
#: connection instead of reading it (the spec lets a server do that).
MAX_OPTION_LENGTH: Final = 64 * 1024
#: Largest WRITE payload we read off the wire.  Up to this size a too-big write is
#: consumed and failed with EINVAL; beyond it the stream cannot be resynchronised
#: cheaply, so it is a protocol error (nbdkit skips up to 2x its request limit).
MAX_WRITE_PAYLOAD: Final = 2 * MAX_BLOCK
#: The block-size constraints a server without NBD_INFO_BLOCK_SIZE implies.
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096

#: The one metadata context this protocol defines (proto.md: "The base: namespace").
META_BASE_ALLOCATION: Final = "base:allocation"
#: The context id we hand out for base:allocation on NBD_OPT_SET_META_CONTEXT.
#: Nonzero so that it cannot be confused with the reserved id 0 of LIST replies.
META_BASE_ALLOCATION_ID: Final = 1


class GlobalFlag(IntFlag):
    """Handshake flags, 16 bits, sent by the server after IHAVEOPT."""

    FIXED_NEWSTYLE = 1 << 0  #: server speaks fixed newstyle
    NO_ZEROES = 1 << 1  #: server can skip the 124 zero bytes after EXPORT_NAME


class ClientFlag(IntFlag):
    """Client flags, 32 bits, the first thing the client sends."""

    FIXED_NEWSTYLE = 1 << 0  #: NBD_FLAG_C_FIXED_NEWSTYLE
    NO_ZEROES = 1 << 1  #: NBD_FLAG_C_NO_ZEROES


class TransmissionFlag(IntFlag):
    """Per-export transmission flags, 16 bits, sent with the export size."""

    HAS_FLAGS = 1 << 0  #: MUST always be set
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2  #: NBD_CMD_FLUSH is understood
    SEND_FUA = 1 << 3  #: NBD_CMD_FLAG_FUA is understood
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6  #: NBD_CMD_WRITE_ZEROES and NBD_CMD_FLAG_NO_HOLE
    SEND_DF = 1 << 7  #: NBD_CMD_FLAG_DF; MUST be clear without structured replies
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9  #: experimental RESIZE extension
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11  #: NBD_CMD_FLAG_FAST_ZERO; needs SEND_WRITE_ZEROES


class Opt(IntEnum):
    """Option types a client sends during the handshake."""

    EXPORT_NAME = 1  #: choose an export and enter transmission (no error reply)
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  #: withdrawn; answered with ERR_UNSUP
    STARTTLS = 5
    INFO = 6
    GO = 7  #: like INFO, then enter transmission
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10


class Rep(IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1  #: option unknown to this server
    ERR_POLICY = (1 << 31) + 2  #: known and valid, but forbidden here
    ERR_INVALID = (1 << 31) + 3  #: known, but syntactically/semantically invalid
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6  #: the requested export does not exist
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9


class Info(IntEnum):
    """Information types inside an NBD_REP_INFO reply (and client requests)."""

    EXPORT = 0  #: size + transmission flags; mandatory before ACK
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3  #: minimum, preferred, maximum


class Cmd(IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1  #: the only request with a payload
    DISC = 2  #: soft disconnect; no reply
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  #: experimental RESIZE extension; never advertised, always EINVAL


class CmdFlag(IntFlag):
    """Command flags, 16 bits, in every request."""

    FUA = 1 << 0  #: valid on any command when SEND_FUA was advertised
    NO_HOLE = 1 << 1  #: WRITE_ZEROES only
    DF = 1 << 2  #: READ only, and only with structured replies
    REQ_ONE = 1 << 3  #: BLOCK_STATUS only
    FAST_ZERO = 1 << 4  #: WRITE_ZEROES only, when SEND_FAST_ZERO was advertised


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0  #: final chunk of this reply


class ReplyType(IntEnum):
    """Structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class NbdErrno(IntEnum):
    """The only error values allowed on the wire (proto.md: "Error values")."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12  #: SHOULD NOT be returned if at all possible
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75  #: only for READ with DF
    ENOTSUP = 95  #: only for WRITE_ZEROES with FAST_ZERO
    ESHUTDOWN = 108


class StateFlag(IntFlag):
    """Extent flags of the base:allocation metadata context."""

    HOLE = 1 << 0  #: not allocated
    ZERO = 1 << 1  #: reads as zeroes
