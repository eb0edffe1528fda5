"""The sans-I/O NBD server: bytes in, events out, reply events to bytes.

Theory of operation
-------------------

A `ServerConnection` is one client connection with no socket, clock or event
loop (h11's ``Connection`` is the model).  The caller writes `initial_bytes`,
then loops: feed what it reads to `receive_data` (``b""`` at EOF), call
`next_event` until it returns `NEED_DATA`, and after each call write whatever
`data_to_send` returns.

The handshake is answered entirely in here, because every option reply is a
pure function of the exports table and of what the client negotiated so far:
option replies pile up in `data_to_send` and no event is returned until the
client picks an export (`ExportChosen`) or leaves (`Disconnect`), or asks for
TLS (`StartTLS`: the caller upgrades the socket, then calls `tls_started`).

TLS (`TLSMode`, nbdkit's ``--tls`` meanings): with OFF, NBD_OPT_STARTTLS is
refused by policy; with ON, clients may use TLS or not; with REQUIRE, every
option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD until TLS is up
(NBD_OPT_EXPORT_NAME, which has no error reply, hangs up), so a plaintext
client never learns the exports, their list or their sizes.  Bytes that follow
NBD_OPT_STARTTLS before its reply break the protocol (the client MUST wait
for the reply): they would otherwise be plaintext taken for the TLS stream.

In the transmission phase each request becomes a `Request` event, in wire
order; the caller checks it with `validate` (the one place for request checks,
after nbdkit's ``validate_request``), runs it, and turns the outcome into a
reply event, which `send` frames as an iovec without copying the payload.

Rule 1, as in h11 ``_state.py``: the phase only changes through `_TRANSITIONS`
(or to CLOSED when the client breaks the protocol).  Bad input makes
`next_event` raise `RemoteProtocolError` and never any other exception; misuse
by the caller raises `LocalProtocolError`.

Input is kept in one bytearray with a read offset, compacted only when the
consumed prefix dominates, so parsing is O(n) in the bytes received.  A WRITE
payload goes straight from the received chunks into its own bytearray, which
the `Request` then owns.
"""

from __future__ import annotations

import dataclasses
import itertools
import struct
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import ClassVar, Final

from ..buffers import SPARES
from . import wire
from .constants import (
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    MAX_WRITE_PAYLOAD,
    META_BASE_ALLOCATION,
    META_BASE_ALLOCATION_ID,
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
    TransmissionFlag,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .events import (
    NEED_DATA,
    BlockStatusReply,
    Buffer,
    DataChunk,
    Disconnect,
    ErrorReply,
    Event,
    ExportChosen,
    ExportInfo,
    ReadReply,
    ReplyEvent,
    Request,
    SimpleReply,
    StartTLS,
)

__all__ = ["Phase", "ServerConnection", "TLSMode"]


class Phase(Enum):
    """Where the connection is (proto.md: "Protocol phases")."""

    HANDSHAKE = "handshake"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class TLSMode(Enum):
    """Whether a connection may or must use TLS (``serve --tls``, nbdkit's meanings)."""

    OFF = "off"  # NBD_OPT_STARTTLS is refused
    ON = "on"  # plaintext and TLS clients alike
    REQUIRE = "require"  # nothing but STARTTLS and ABORT before TLS


#: Options a client may send before TLS is up under TLSMode.REQUIRE.
_BEFORE_TLS: Final = frozenset({Opt.STARTTLS, Opt.ABORT})

# Rule 1: every phase change caused by an event is listed here.
_TRANSITIONS: Final[dict[tuple[Phase, type[Event]], Phase]] = {
    (Phase.HANDSHAKE, ExportChosen): Phase.TRANSMISSION,
    (Phase.HANDSHAKE, StartTLS): Phase.HANDSHAKE,
    (Phase.HANDSHAKE, Disconnect): Phase.CLOSED,
    (Phase.TRANSMISSION, Request): Phase.TRANSMISSION,
    (Phase.TRANSMISSION, Disconnect): Phase.CLOSED,
}

# Wire layouts, network byte order: the one table, shared with the client (wire.py).
_GREETING = wire.GREETING
_CLIENT_FLAGS = wire.CLIENT_FLAGS
_OPTION = wire.OPTION
_OPTION_REPLY = wire.OPTION_REPLY
_EXPORT_NAME_REPLY = wire.EXPORT_NAME_REPLY
_INFO_EXPORT = wire.INFO_EXPORT
_INFO_BLOCK_SIZE = wire.INFO_BLOCK_SIZE
_REQUEST = wire.REQUEST
_SIMPLE_REPLY = wire.SIMPLE_REPLY
#: size of the buffer receive_buffer() hands out between WRITE payloads
RECEIVE_SCRATCH = 64 * 1024
_CHUNK = wire.CHUNK
_OFFSET = wire.OFFSET
_HOLE = wire.HOLE
_ERROR = wire.ERROR

_SERVER_FLAGS: Final = GlobalFlag.FIXED_NEWSTYLE | GlobalFlag.NO_ZEROES
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)
_EXPORT_NAME_PADDING: Final = bytes(124)
_U32_MAX: Final = (1 << 32) - 1
#: an OFFSET_DATA chunk's header and its offset, packed at once
_DATA_HEAD: Final = struct.Struct(_CHUNK.format + _OFFSET.format.lstrip(">"))
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)

# The command flags each command may carry (proto.md: "Command flags").  FUA is
# valid on every command once SEND_FUA is advertised: the spec says the server
# MUST then accept it, ignoring it where nothing is written.
_CMD_FLAGS: Final[dict[Cmd, CmdFlag]] = {
    Cmd.READ: CmdFlag.FUA | CmdFlag.DF,
    Cmd.WRITE: CmdFlag.FUA,
    Cmd.FLUSH: CmdFlag.FUA,
    Cmd.TRIM: CmdFlag.FUA,
    Cmd.CACHE: CmdFlag.FUA,
    Cmd.WRITE_ZEROES: CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlag.FUA | CmdFlag.REQ_ONE,
}
# Transmission flag that must have been advertised before a command flag ...
_FLAG_NEEDS: Final[dict[CmdFlag, TransmissionFlag]] = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}
# ... or a command may be used.
_CMD_NEEDS: Final[dict[Cmd, TransmissionFlag]] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}
_WRITES: Final = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
# Past the end of the export: ENOSPC for these, EINVAL for the rest
# (proto.md: "Error values" names read and trim for EINVAL).
_ENOSPC_PAST_END: Final = frozenset({Cmd.WRITE, Cmd.WRITE_ZEROES})
# Commands whose length is a payload size and so capped by max_block.
_DATA_CMDS: Final = frozenset({Cmd.READ, Cmd.WRITE})
_VALID_ERRNOS: Final = frozenset(int(e) for e in NbdErrno)
#: a request's command by its number (an Enum call per request costs a microsecond)
_CMDS: Final[dict[int, Cmd]] = {int(c): c for c in Cmd}
_NO_FLAGS: Final = CmdFlag(0)


class _Invalid(Exception):
    """Option data that does not parse; answered with NBD_REP_ERR_INVALID."""


class _Reader:
    """Bounds-checked reader over one option's data."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n > self.remaining():
            raise _Invalid("option data too short")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u16(self) -> int:
        value: int = int.from_bytes(self.take(2), "big")
        return value

    def u32(self) -> int:
        value: int = int.from_bytes(self.take(4), "big")
        return value

    def string(self) -> str:
        """A 32-bit length followed by that many bytes of UTF-8."""
        n = self.u32()
        if n > MAX_STRING:
            raise _Invalid(f"string longer than {MAX_STRING} bytes")
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise _Invalid("string is not valid UTF-8") from None

    def end(self) -> None:
        if self.remaining():
            raise _Invalid("trailing bytes in option data")


def _payload(data: Buffer) -> bytes | memoryview:
    """A byte-addressed view of *data*, without copying it."""
    if isinstance(data, bytes):
        return data
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _message(text: str) -> bytes:
    """*text* as UTF-8, cut to the 4096-byte string limit on a character boundary."""
    raw = text.encode()
    if len(raw) > MAX_STRING:
        raw = raw[:MAX_STRING].decode(errors="ignore").encode()
    return raw


class ServerConnection:
    """The server side of one NBD connection (fixed newstyle, STARTTLS as `TLSMode` says)."""

    #: ``next_event`` handlers for fixed-newstyle options; anything else is ERR_UNSUP.
    _OPTIONS: ClassVar[dict[Opt, Callable[[ServerConnection, int, bytes], Event | None]]]

    def __init__(self, exports: Mapping[str, ExportInfo], default_export: str,
                 tls: TLSMode = TLSMode.OFF, *, scratch: bytearray | None = None) -> None:
        """Serve *exports* (looked up live, by key); the name "" means *default_export*.

        *scratch*: the buffer `receive_buffer` hands out between payloads, which
        connections served by one thread may share (`buffer_filled` takes its
        bytes before the next `receive_buffer`): an idle connection then holds
        no receive buffer of its own.  Default: one of RECEIVE_SCRATCH bytes,
        made on first use.
        """
        self._exports = exports
        self._default_export = default_export
        self._tls_mode = tls
        #: the connection runs over TLS (`tls_started` was called)
        self.tls = False
        self._tls_pending = False  # StartTLS returned, tls_started() not yet called
        #: where the connection is; see `Phase`
        self.phase = Phase.HANDSHAKE
        #: NBD_OPT_STRUCTURED_REPLY was acknowledged
        self.structured = False
        #: context id -> name, from the last NBD_OPT_SET_META_CONTEXT for this export
        self.meta_contexts: dict[int, str] = {}
        #: the chosen export, with the flags as advertised; None during the handshake
        self.export: ExportInfo | None = None
        #: (command, flags) pairs validate() found valid for this export
        self._valid_kinds: set[tuple[int, int]] = set()
        self._client_flags: ClientFlag | None = None
        self._meta_export: str | None = None  # export the meta contexts were set for
        self._buf = bytearray()
        self._pos = 0  # read offset into _buf
        self._eof = False
        self._out: list[bytes] = []  # option replies not yet taken by data_to_send()
        self._failure: str | None = None  # why the client's input was rejected
        # A WRITE whose payload is still arriving: its header and its buffer.
        self._pending: tuple[CmdFlag, int, int, int] | None = None
        self._write_buf = bytearray()
        self._write_filled = 0
        self._scratch = scratch  # receive_buffer()'s buffer between payloads
        self._into_payload = False  # the last receive_buffer() was the payload

    # -- Public API --------------------------------------------------------------

    def initial_bytes(self) -> bytes:
        """The server greeting: NBDMAGIC, IHAVEOPT and the handshake flags."""
        return _GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes read from the client; ``b""`` means EOF.

        Raises:
            LocalProtocolError: bytes fed after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("received data after EOF")
        if self.phase is Phase.CLOSED:
            return  # the client MUST NOT send anything more; drop it
        if self._tls_pending:
            # The caller stops reading at StartTLS: these bytes can only be the
            # TLS stream misrouted, never plaintext to parse.
            self._failure = "plaintext data received during the TLS upgrade"
            return
        view = memoryview(data)
        missing = len(self._write_buf) - self._write_filled
        if self._pending is not None and missing:
            # The read buffer is empty while a payload is pending, so order holds.
            take = min(missing, len(view))
            self._write_buf[self._write_filled : self._write_filled + take] = view[:take]
            self._write_filled += take
            view = view[take:]
        self._buf += view

    def receive_buffer(self) -> memoryview:
        """Where the next bytes read from the client can go; then call `buffer_filled`.

        While a WRITE payload is arriving this is the rest of the payload's own
        buffer, so the bytes land where the request will use them, without a
        copy; otherwise a scratch buffer whose bytes `buffer_filled` adds to the
        input.  (For asyncio's BufferedProtocol; `receive_data` is the same
        thing for bytes already read.)
        """
        if self._pending is not None and self._write_filled < len(self._write_buf):
            # _buf is empty here: the payload took everything after its header
            self._into_payload = True
            return memoryview(self._write_buf)[self._write_filled:]
        self._into_payload = False
        if self._scratch is None:
            self._scratch = bytearray(RECEIVE_SCRATCH)
        return memoryview(self._scratch)

    def buffer_filled(self, n: int) -> None:
        """``n`` bytes were read into the last `receive_buffer` (EOF: receive_data(b""))."""
        if n <= 0:
            return
        if self._into_payload:
            self._write_filled += n
            return
        assert self._scratch is not None
        with memoryview(self._scratch) as view:
            self.receive_data(view[:n])

    @property
    def tls_pending(self) -> bool:
        """StartTLS was returned and tls_started() not called yet."""
        return self._tls_pending

    def tls_started(self) -> None:
        """The TLS handshake that `StartTLS` asked for succeeded: read on, through TLS.

        Raises:
            LocalProtocolError: no StartTLS is pending.
        """
        if not self._tls_pending:
            raise LocalProtocolError("tls_started() without a pending StartTLS")
        self._tls_pending = False
        self.tls = True

    def buffered(self) -> int:
        """Received bytes not yet parsed (payloads being filled excluded)."""
        return self._available()

    def peek_request(self) -> tuple[int, int, bool] | None:
        """(command, length, complete) of the request header next_event() would parse
        now, without consuming it; None when no whole header is next.

        ``complete``: a WRITE's payload is all received too (other commands:
        always).  A caller that bounds what each client may hold charges the
        request here, before next_event() allocates a WRITE's payload buffer.
        Never raises: a bad header is next_event()'s to report.
        """
        if (self.phase is not Phase.TRANSMISSION or self._pending is not None
                or self._failure is not None or self._available() < _REQUEST.size):
            return None
        magic, _flags, kind, _cookie, _offset, length = _REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            return None
        if kind != Cmd.WRITE:
            return kind, length, True
        return kind, length, self._available() >= _REQUEST.size + length

    def next_event(self) -> Event | type[NEED_DATA]:
        """Parse the next event out of the received bytes.

        Handshake options that need no decision from the caller are answered
        here (see `data_to_send`); after `Disconnect` every call returns
        `Disconnect` again.

        Raises:
            RemoteProtocolError: the client broke the protocol; close the
                connection.  Never raises anything else on bad input.
        """
        if self._failure is not None:
            raise RemoteProtocolError(self._failure)
        if self.phase is Phase.CLOSED:
            return Disconnect()
        if self._tls_pending:
            raise LocalProtocolError("next_event() before tls_started()")
        try:
            if self.phase is Phase.HANDSHAKE:
                event = self._next_handshake_event()
            else:
                event = self._next_transmission_event()
        except RemoteProtocolError as err:
            self._close()
            self._failure = str(err)
            raise
        if event is NEED_DATA:
            return NEED_DATA
        assert not isinstance(event, type)
        self.phase = _TRANSITIONS[self.phase, type(event)]
        if self.phase is Phase.CLOSED:
            self._close()
        return event

    def data_to_send(self) -> bytes:
        """Option replies produced since the last call; write them after next_event()."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, event: ReplyEvent) -> list[bytes | memoryview]:
        """Frame a reply as an iovec: headers, and payloads as given (not copied).

        Raises:
            LocalProtocolError: no export was chosen yet, or the reply is not
                allowed (payload in a structured simple reply, an error value
                outside NbdErrno, an empty or overlapping chunk, ...).
        """
        if self.export is None:
            raise LocalProtocolError("cannot send replies before the transmission phase")
        try:
            if isinstance(event, SimpleReply):
                return self._send_simple(event)
            if isinstance(event, ReadReply):
                return self._send_read(event)
            if isinstance(event, ErrorReply):
                return self._send_error(event)
            if isinstance(event, BlockStatusReply):
                return self._send_block_status(event)
        except struct.error as err:
            raise LocalProtocolError(f"field out of range in {event!r}: {err}") from err
        raise LocalProtocolError(f"not a reply event: {event!r}")

    def validate(self, req: Request) -> int:
        """0 if *req* may run, else the NbdErrno to reply with.

        The single place for request checks (nbdkit ``validate_request``;
        proto.md: "Error values", "Block size constraints").

        Raises:
            LocalProtocolError: called before an export was chosen.
        """
        info = self.export
        if info is None:
            raise LocalProtocolError("validate() before the transmission phase")
        key = (req.cmd, req.flags)
        if key not in self._valid_kinds:  # checked once per (command, flags) pair
            bad = self._check_kind(info, req.cmd, req.flags)
            if bad:
                return bad
            self._valid_kinds.add(key)  # only valid pairs: a handful, never unbounded
        cmd = req.cmd
        if cmd == Cmd.FLUSH:
            return NbdErrno.EINVAL if req.offset or req.length else 0
        if req.length == 0:
            return NbdErrno.EINVAL  # unspecified by the spec; nbdkit refuses it too
        if req.offset % info.min_block or req.length % info.min_block:
            return NbdErrno.EINVAL
        if req.offset + req.length > info.size:
            return NbdErrno.ENOSPC if cmd in _ENOSPC_PAST_END else NbdErrno.EINVAL
        if cmd in _DATA_CMDS and req.length > info.max_block:
            return NbdErrno.EOVERFLOW if req.flags & CmdFlag.DF else NbdErrno.EINVAL
        return 0

    def _check_kind(self, info: ExportInfo, cmd_value: int, flags_value: int) -> int:
        """The checks of validate() that depend only on the command and its flags."""
        try:
            cmd = Cmd(cmd_value)
        except ValueError:
            return NbdErrno.EINVAL  # unknown command
        allowed = _CMD_FLAGS.get(cmd)
        if allowed is None:
            return NbdErrno.EINVAL  # DISC (never a Request) and RESIZE
        flags = int(flags_value)
        if flags & ~int(allowed):
            return NbdErrno.EINVAL  # unknown flag, or one foreign to the command
        for flag, offered in _FLAG_NEEDS.items():
            if flags & flag and not info.flags & offered:
                return NbdErrno.EINVAL  # flag the client was not offered
        if cmd in _WRITES and info.flags & TransmissionFlag.READ_ONLY:
            return NbdErrno.EPERM
        needs = _CMD_NEEDS.get(cmd)
        if needs is not None and not info.flags & needs:
            return NbdErrno.EINVAL  # command the client was not offered
        if cmd is Cmd.BLOCK_STATUS and not (self.structured and self.meta_contexts):
            return NbdErrno.EINVAL
        return 0

    # -- Input buffer --------------------------------------------------------------

    def _available(self) -> int:
        return len(self._buf) - self._pos

    def _consume(self, n: int) -> None:
        self._pos += n
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= 65536 and 2 * self._pos >= len(self._buf):
            # Moves fewer bytes than were consumed since the last move: O(n) overall.
            del self._buf[: self._pos]
            self._pos = 0

    def _take(self, n: int) -> bytes:
        with memoryview(self._buf) as view:
            data = bytes(view[self._pos : self._pos + n])
        self._consume(n)
        return data

    def _need_data(self, at_boundary: bool) -> Event | type[NEED_DATA]:
        """No complete frame: wait, or at EOF leave cleanly between frames."""
        if not self._eof:
            return NEED_DATA
        if at_boundary:
            return Disconnect()
        raise RemoteProtocolError("connection closed in the middle of a message")

    def _close(self) -> None:
        self.phase = Phase.CLOSED
        self._buf = bytearray()
        self._pos = 0
        self._pending = None
        self._write_buf = bytearray()

    # -- Handshake -------------------------------------------------------------------

    def _next_handshake_event(self) -> Event | type[NEED_DATA]:
        if self._client_flags is None:
            if self._available() < _CLIENT_FLAGS.size:
                return self._need_data(at_boundary=self._available() == 0)
            (raw,) = _CLIENT_FLAGS.unpack_from(self._buf, self._pos)
            self._consume(_CLIENT_FLAGS.size)
            if raw & ~_KNOWN_CLIENT_FLAGS:
                # proto.md: "the server MUST drop the TCP connection".
                raise RemoteProtocolError(f"unknown client flags 0x{raw:08x}")
            self._client_flags = ClientFlag(raw)
        while True:
            if self._available() < _OPTION.size:
                return self._need_data(at_boundary=self._available() == 0)
            magic, option, length = _OPTION.unpack_from(self._buf, self._pos)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic 0x{magic:016x}")
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(f"option {option} data too long ({length} bytes)")
            if self._available() < _OPTION.size + length:
                return self._need_data(at_boundary=False)
            self._consume(_OPTION.size)
            event = self._handle_option(option, self._take(length))
            if event is not None:
                return event

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        fixed = self._client_flags is not None and self._client_flags & ClientFlag.FIXED_NEWSTYLE
        if not fixed and option != Opt.EXPORT_NAME:
            # Plain newstyle has no option replies, so nothing can be refused.
            raise RemoteProtocolError(f"option {option} without fixed newstyle")
        if (self._tls_mode is TLSMode.REQUIRE and not self.tls
                and option not in _BEFORE_TLS):
            if option == Opt.EXPORT_NAME:  # no error reply exists: hang up
                raise RemoteProtocolError("NBD_OPT_EXPORT_NAME without TLS, which is required")
            self._reply_error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return None
        try:
            handler = self._OPTIONS[Opt(option)]
        except (ValueError, KeyError):
            self._reply_error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            return None
        return handler(self, option, data)

    def _reply(self, option: int, rep: Rep, payload: bytes = b"") -> None:
        self._out.append(_OPTION_REPLY.pack(REPLY_MAGIC, option, rep, len(payload)) + payload)

    def _reply_error(self, option: int, rep: Rep, message: str) -> None:
        self._reply(option, rep, _message(message))

    def _lookup(self, name: str) -> tuple[str, ExportInfo] | None:
        key = name or self._default_export
        info = self._exports.get(key)
        return None if info is None else (key, info)

    def _advertised(self, info: ExportInfo) -> ExportInfo:
        """*info* with the transmission flags this client is told."""
        # Plain int arithmetic: ~ on an IntFlag would also drop unknown bits.
        flags = int(info.flags) | int(TransmissionFlag.HAS_FLAGS)
        if info.read_only:
            flags |= int(TransmissionFlag.READ_ONLY)
        if not self.structured:
            flags &= ~int(TransmissionFlag.SEND_DF)  # MUST be clear (proto.md)
        if not flags & TransmissionFlag.SEND_WRITE_ZEROES:
            flags &= ~int(TransmissionFlag.SEND_FAST_ZERO)  # MUST be clear (proto.md)
        read_only = bool(flags & TransmissionFlag.READ_ONLY)
        return dataclasses.replace(info, flags=TransmissionFlag(flags), read_only=read_only)

    def _enter_transmission(self, key: str, info: ExportInfo) -> ExportChosen:
        if self._meta_export != key:
            self.meta_contexts.clear()  # contexts were negotiated for another export
        self.export = info
        self._valid_kinds.clear()
        return ExportChosen(key, info)

    def _opt_export_name(self, option: int, data: bytes) -> Event | None:
        # No error reply exists for this option: failure means hanging up.
        try:
            name = data.decode()
        except UnicodeDecodeError:
            raise RemoteProtocolError("export name is not valid UTF-8") from None
        found = self._lookup(name) if len(data) <= MAX_STRING else None
        if found is None:
            raise RemoteProtocolError(f"unknown export {name[:256]!r}")
        key, info = found
        info = self._advertised(info)
        reply = _EXPORT_NAME_REPLY.pack(info.size, info.flags)
        assert self._client_flags is not None
        if not self._client_flags & ClientFlag.NO_ZEROES:
            reply += _EXPORT_NAME_PADDING
        self._out.append(reply)
        return self._enter_transmission(key, info)

    def _opt_abort(self, option: int, data: bytes) -> Event | None:
        self._reply(option, Rep.ACK)  # any data is ignored, as the spec asks
        return Disconnect()

    def _opt_list(self, option: int, data: bytes) -> Event | None:
        if data:
            self._reply_error(option, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")
            return None
        for key, info in self._exports.items():
            name = key.encode()
            self._reply(
                option, Rep.SERVER, len(name).to_bytes(4, "big") + name + _message(info.description)
            )
        self._reply(option, Rep.ACK)
        return None

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        if self._tls_mode is TLSMode.OFF:
            self._reply_error(option, Rep.ERR_POLICY, "TLS is not enabled on this server")
            return None
        if data:
            self._reply_error(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            return None
        if self.tls:
            self._reply_error(option, Rep.ERR_INVALID, "TLS is already negotiated")
            return None
        if self._available():
            # The client MUST wait for the reply; bytes already here were sent
            # before it and would be read as plaintext (proto.md: "STARTTLS").
            raise RemoteProtocolError("data after NBD_OPT_STARTTLS before its reply")
        self._reply(option, Rep.ACK)
        # Nothing negotiated in plaintext survives the upgrade (as nbdkit does).
        self.structured = False
        self.meta_contexts.clear()
        self._meta_export = None
        self._tls_pending = True
        return StartTLS()

    def _opt_info_go(self, option: int, data: bytes) -> Event | None:
        reader = _Reader(data)
        try:
            name = reader.string()
            count = reader.u16()
            if reader.remaining() != 2 * count:
                raise _Invalid("information request count does not match the option length")
            requests = {reader.u16() for _ in range(count)}
        except _Invalid as err:
            self._reply_error(option, Rep.ERR_INVALID, str(err))
            return None
        found = self._lookup(name)
        if found is None:
            self._reply_error(option, Rep.ERR_UNKNOWN, f"export {name[:256]!r} not available")
            return None
        key, info = found
        info = self._advertised(info)
        self._reply(option, Rep.INFO, _INFO_EXPORT.pack(Info.EXPORT, info.size, info.flags))
        if Info.NAME in requests:
            self._reply(option, Rep.INFO, Info.NAME.to_bytes(2, "big") + key.encode())
        if Info.DESCRIPTION in requests and info.description:
            self._reply(
                option, Rep.INFO, Info.DESCRIPTION.to_bytes(2, "big") + info.description.encode()
            )
        # Sent even when not requested: we enforce max_block, which is not the
        # default, and unrequested information is allowed (qemu does the same).
        self._reply(
            option,
            Rep.INFO,
            _INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block
            ),
        )
        self._reply(option, Rep.ACK)
        return self._enter_transmission(key, info) if option == Opt.GO else None

    def _opt_structured_reply(self, option: int, data: bytes) -> Event | None:
        if data:
            self._reply_error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")
        elif self.structured:
            self._reply_error(option, Rep.ERR_INVALID, "structured replies already negotiated")
        else:
            self.structured = True
            self._reply(option, Rep.ACK)
        return None

    def _opt_meta_context(self, option: int, data: bytes) -> Event | None:
        setting = option == Opt.SET_META_CONTEXT
        if setting:
            # Replaces the previous selection even when it fails (proto.md).
            self.meta_contexts.clear()
            self._meta_export = None
        if not self.structured:
            self._reply_error(option, Rep.ERR_INVALID, "structured replies not negotiated")
            return None
        reader = _Reader(data)
        try:
            name = reader.string()
            count = reader.u32()
            if count > reader.remaining() // 4:
                raise _Invalid("query count does not match the option length")
            queries = [reader.string() for _ in range(count)]
            reader.end()
        except _Invalid as err:
            self._reply_error(option, Rep.ERR_INVALID, str(err))
            return None
        found = self._lookup(name)
        if found is None:
            self._reply_error(option, Rep.ERR_UNKNOWN, f"export {name[:256]!r} not available")
            return None
        # base:allocation is the only context.  LIST treats no query and the
        # "base:" wildcard as "everything"; SET selects by exact name only.
        # Queries for other namespaces or leaves are ignored, as required.
        wanted = {META_BASE_ALLOCATION} | ({"base:"} if not setting else set())
        if (not setting and not queries) or wanted.intersection(queries):
            context_id = META_BASE_ALLOCATION_ID if setting else 0
            payload = context_id.to_bytes(4, "big") + META_BASE_ALLOCATION.encode()
            self._reply(option, Rep.META_CONTEXT, payload)
            if setting:
                self.meta_contexts[context_id] = META_BASE_ALLOCATION
        if setting:
            self._meta_export = found[0]
        self._reply(option, Rep.ACK)
        return None

    _OPTIONS = {
        Opt.EXPORT_NAME: _opt_export_name,
        Opt.ABORT: _opt_abort,
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info_go,
        Opt.GO: _opt_info_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_meta_context,
        Opt.SET_META_CONTEXT: _opt_meta_context,
    }

    # -- Transmission ------------------------------------------------------------------

    def _next_transmission_event(self) -> Event | type[NEED_DATA]:
        if self._pending is not None:
            return self._finish_write()
        if self._available() < _REQUEST.size:
            return self._need_data(at_boundary=self._available() == 0)
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._buf, self._pos)
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic 0x{magic:08x}")
        self._consume(_REQUEST.size)
        # unknown: a plain int (validate() answers EINVAL; no payload is assumed)
        cmd: Cmd | int = _CMDS.get(kind, kind)
        if cmd is Cmd.DISC:
            return Disconnect()
        if cmd is not Cmd.WRITE or length == 0:
            return Request(cmd, CmdFlag(flags) if flags else _NO_FLAGS, cookie, offset, length)
        if length > MAX_WRITE_PAYLOAD:
            # Too big to read and refuse: the stream cannot be resynchronised.
            raise RemoteProtocolError(f"write of {length} bytes exceeds {MAX_WRITE_PAYLOAD}")
        self._pending = (CmdFlag(flags) if flags else _NO_FLAGS, cookie, offset, length)
        # (a spare buffer: every byte is received before use)
        self._write_buf = SPARES.take(length) if length >= SPARES.min_size else bytearray(length)
        take = min(length, self._available())
        with memoryview(self._buf) as view:
            self._write_buf[:take] = view[self._pos : self._pos + take]
        self._write_filled = take
        self._consume(take)
        return self._finish_write()

    def _finish_write(self) -> Event | type[NEED_DATA]:
        assert self._pending is not None
        if self._write_filled < len(self._write_buf):
            return self._need_data(at_boundary=False)
        flags, cookie, offset, length = self._pending
        data = self._write_buf
        self._pending = None
        self._write_buf = bytearray()
        self._write_filled = 0
        return Request(Cmd.WRITE, flags, cookie, offset, length, data)

    # -- Replies -----------------------------------------------------------------------

    @staticmethod
    def _check_errno(error: int, *, allow_zero: bool) -> None:
        if error not in _VALID_ERRNOS and not (allow_zero and error == 0):
            raise LocalProtocolError(f"{error} is not an NBD error value; see to_nbd_errno()")

    def _chunk(self, flags: ReplyFlag, kind: ReplyType, cookie: int, length: int) -> bytes:
        return _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)

    def _send_simple(self, event: SimpleReply) -> list[bytes | memoryview]:
        self._check_errno(event.error, allow_zero=True)
        header = _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, event.error, event.cookie)
        payload = _payload(event.data)
        if not payload:
            return [header]
        if self.structured:
            raise LocalProtocolError("a payload needs a structured reply (use ReadReply)")
        if event.error:
            raise LocalProtocolError("an error reply carries no payload")
        return [header, payload]

    def _send_read(self, event: ReadReply) -> list[bytes | memoryview]:
        chunks = event.chunks
        if len(chunks) == 1 and self.structured and isinstance(chunks[0], DataChunk):
            # the common reply, framed in one pack: a chunk header and its offset
            data = _payload(chunks[0].data)
            size = len(data) + _OFFSET.size
            if _OFFSET.size < size <= _U32_MAX:
                return [_DATA_HEAD.pack(STRUCTURED_REPLY_MAGIC, _DONE, _OFFSET_DATA,
                                        event.cookie, size, chunks[0].offset), data]
        pieces: list[tuple[int, bytes | memoryview | int]] = []  # offset, data or hole size
        for chunk in event.chunks:
            if isinstance(chunk, DataChunk):
                data = _payload(chunk.data)
                pieces.append((chunk.offset, data))
                size = len(data)
            else:
                pieces.append((chunk.offset, chunk.length))
                size = chunk.length
            if not 0 < size <= _U32_MAX - _OFFSET.size:
                raise LocalProtocolError(f"chunk size out of range: {chunk!r}")
        ordered = sorted(pieces, key=lambda piece: piece[0])
        for (offset, piece), (next_offset, _) in itertools.pairwise(ordered):
            end = offset + (piece if isinstance(piece, int) else len(piece))
            if end > next_offset or (not self.structured and end != next_offset):
                raise LocalProtocolError("read chunks overlap or (simple reply) leave a gap")
        if not self.structured:
            out: list[bytes | memoryview] = [
                _SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, event.cookie)
            ]
            out += [bytes(piece) if isinstance(piece, int) else piece for _, piece in ordered]
            return out
        if not pieces:
            return [self._chunk(ReplyFlag.DONE, ReplyType.NONE, event.cookie, 0)]
        out = []
        last = len(pieces) - 1
        for i, (offset, piece) in enumerate(pieces):
            done = ReplyFlag.DONE if i == last else ReplyFlag(0)
            if isinstance(piece, int):
                hole = _HOLE.pack(offset, piece)
                out.append(self._chunk(done, ReplyType.OFFSET_HOLE, event.cookie, len(hole)) + hole)
            else:
                size = _OFFSET.size + len(piece)
                head = self._chunk(done, ReplyType.OFFSET_DATA, event.cookie, size)
                out += [head + _OFFSET.pack(offset), piece]
        return out

    def _send_error(self, event: ErrorReply) -> list[bytes | memoryview]:
        self._check_errno(event.error, allow_zero=False)
        if not self.structured:
            return [_SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, event.error, event.cookie)]
        message = _message(event.message)
        body = _ERROR.pack(event.error, len(message)) + message
        kind = ReplyType.ERROR
        if event.offset is not None:
            body += _OFFSET.pack(event.offset)
            kind = ReplyType.ERROR_OFFSET
        return [self._chunk(ReplyFlag.DONE, kind, event.cookie, len(body)) + body]

    def _send_block_status(self, event: BlockStatusReply) -> list[bytes | memoryview]:
        if not self.structured or event.context_id not in self.meta_contexts:
            raise LocalProtocolError(f"metadata context {event.context_id} was not negotiated")
        extents: Sequence[tuple[int, int]] = event.extents
        if not extents or any(length <= 0 for length, _ in extents):
            raise LocalProtocolError("block status needs extents of nonzero length")
        body = wire.pack_block_status(event.context_id, extents)
        return [self._chunk(ReplyFlag.DONE, ReplyType.BLOCK_STATUS, event.cookie, len(body)) + body]
