"""A small NBD client: a worker's link to the primary, and a quorum's link to a
child on another host.

Fixed newstyle, OPT_GO, structured replies and base:allocation where the
server has them (simple replies and no block status where it does not);
requests multiplexed by cookie over one connection.  The wire format lives in
pure functions (encode_* / parse_*) and a sans-I/O reply parser (ReplyReader)
with the same constants table as the server (constants.py); NBDClient is the
asyncio driver around them: after the handshake it is the connection's
protocol, so replies are parsed as they arrive, without a task.  A server that
breaks the protocol raises ``NBDClientError``; a lost connection fails every
request in flight with a ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import platform
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nbdquorum.buffers import SPARES
from nbdquorum.coretypes import Buffer, Extent
from nbdquorum.native import Sender
from nbdquorum.nbd.constants import (
    IHAVEOPT,
    META_BASE_ALLOCATION,
    NBDMAGIC,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    GlobalFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)
from nbdquorum.nbd.wire import (
    CHUNK,
    CLIENT_FLAGS,
    ERROR,
    GREETING,
    HOLE,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_TYPE,
    OFFSET,
    OPTION,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    STRING_LENGTH,
    U16,
    U32,
    unpack_block_status,
)

log = logging.getLogger(__name__)


class NBDClientError(ConnectionError):
    """The server broke the protocol, or refused what the client needs."""


# -- the wire format, without I/O ----------------------------------------------
def parse_greeting(data: bytes) -> int:
    """The server's 18-byte newstyle greeting -> its handshake flags."""
    magic, opt, flags = GREETING.unpack(data)
    if magic != NBDMAGIC or opt != IHAVEOPT:
        raise NBDClientError("not an NBD newstyle server")
    if not flags & GlobalFlag.FIXED_NEWSTYLE:
        raise NBDClientError("server does not speak fixed newstyle")
    return int(flags)


def encode_client_flags(server_flags: int) -> bytes:
    flags = ClientFlag.FIXED_NEWSTYLE
    if server_flags & GlobalFlag.NO_ZEROES:
        flags |= ClientFlag.NO_ZEROES
    return CLIENT_FLAGS.pack(flags)


def encode_option(opt: Opt, payload: bytes = b"") -> bytes:
    return OPTION.pack(IHAVEOPT, opt, len(payload)) + payload


def _string(s: str) -> bytes:
    b = s.encode()
    return STRING_LENGTH.pack(len(b)) + b


def encode_set_meta_context(export: str, queries: list[str]) -> bytes:
    body = _string(export) + U32.pack(len(queries)) + b"".join(map(_string, queries))
    return encode_option(Opt.SET_META_CONTEXT, body)


def encode_go(export: str, infos: tuple[int, ...] = ()) -> bytes:
    body = _string(export) + U16.pack(len(infos))
    return encode_option(Opt.GO, body + b"".join(U16.pack(i) for i in infos))


def describe_refusal(rep: int, payload: bytes) -> str:
    """An option's error reply as text: its name and the server's message."""
    try:
        name = Rep(rep).name.lower().replace("err_", "")
    except ValueError:
        name = f"error {rep:#x}"
    text = payload.decode("utf-8", "replace").strip()
    return f"{name}: {text}" if text else name


def parse_option_reply(header: bytes, expect: Opt) -> tuple[int, int]:
    """A 20-byte option reply header -> (reply type, payload length)."""
    magic, opt, rep, length = OPTION_REPLY.unpack(header)
    if magic != REPLY_MAGIC or opt != expect:
        raise NBDClientError(f"bad option reply (magic {magic:#x}, option {opt})")
    return rep, length


def encode_request(cmd: Cmd, flags: int, cookie: int, offset: int, length: int) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def parse_reply_start(head: bytes) -> tuple[int, int, int] | None:
    """The first 16 bytes of a reply.

    A simple reply is whole: returns (errno, cookie, 0).  A structured chunk
    needs 4 more bytes (its length, see parse_chunk_header): returns None.
    """
    magic, error, cookie = SIMPLE_REPLY.unpack(head)
    if magic == SIMPLE_REPLY_MAGIC:
        return error, cookie, 0
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NBDClientError(f"bad reply magic {magic:#x}")
    return None


def parse_chunk_header(header: bytes) -> tuple[int, int, int, int]:
    """A 20-byte structured reply chunk header -> (flags, type, cookie, length)."""
    magic, flags, rtype, cookie, length = CHUNK.unpack(header)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise NBDClientError(f"expected a structured reply chunk, got magic {magic:#x}")
    return flags, rtype, cookie, length


def parse_error(payload: bytes) -> tuple[int, str]:
    code, n = ERROR.unpack_from(payload)
    return code, payload[ERROR.size:ERROR.size + n].decode(errors="replace")


def parse_extents(payload: bytes) -> list[Extent]:
    return unpack_block_status(payload)[1]


# -- the asyncio driver -----------------------------------------------------------
async def _starttls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    tls: ssl.SSLContext, server_hostname: str | None) -> None:
    """NBD_OPT_STARTTLS, then the TLS handshake on the same stream (nbds://)."""
    writer.write(encode_option(Opt.STARTTLS))
    rep, n = parse_option_reply(await reader.readexactly(OPTION_REPLY.size), Opt.STARTTLS)
    message = (await reader.readexactly(n)).decode(errors="replace")
    if rep != Rep.ACK:
        raise NBDClientError(f"server refused TLS (reply {rep:#x}): {message}")
    await writer.start_tls(tls, server_hostname=server_hostname)
#: requests are written at once when this many payload bytes wait
_CORK_MAX = 256 << 10
#: ``call`` waits while more than this is written and not yet on the socket
_BACKLOG_MAX = 4 << 20
#: requests over a plain socket leave from a sending thread (native Sender); off
#: (NBDQUORUM_SEND_THREAD=0): from the event loop, through the transport
SEND_THREAD = os.environ.get("NBDQUORUM_SEND_THREAD", "1") != "0"
#: ... when the requests of one loop turn carry this many payload bytes
_THREAD_MIN = 128 << 10
#: replies are read into a buffer of this size ...
_SCRATCH = 256 << 10
#: ... but the data of a READ chunk longer than this goes from the socket straight
#: into the request's own buffer (no copy through the reply buffer)
_DIRECT_MIN = 64 << 10
#: the longest reply chunk kept whole in the reply buffer (block status, errors)
_CHUNK_MAX = 64 << 20
_EOF = "closed by the server"
#: the most a large READ waits for in the socket before the loop is woken
_LOWAT_MAX = 1 << 20
_DONE = int(ReplyFlag.DONE)  # a plain int: IntFlag's & makes a new flag object each time

#: a request's outcome handed to a callback: (result, None) or (None, error)
Done = Callable[[object, "BaseException | None"], None]


class _Pending:
    """One request in flight: what was asked, what its reply has filled in so far,
    and who hears the outcome (a future, or a callback called from the reply parser)."""

    __slots__ = (
        "cmd",
        "covered",
        "data",
        "deadline",
        "done",
        "error",
        "extents",
        "future",
        "length",
        "offset",
        "pieces",
    )

    def __init__(self, cmd: Cmd, offset: int, length: int,
                 future: asyncio.Future[object] | None = None, done: Done | None = None,
                 deadline: float = math.inf) -> None:
        self.cmd = cmd
        self.offset = offset
        self.length = length
        self.future = future
        self.done = done
        self.deadline = deadline
        self.data: Buffer | None = None
        self.covered = 0  # bytes of a READ that data/hole chunks have filled
        #: (start, length) of each chunk of a READ answered in more than one
        self.pieces: list[tuple[int, int]] | None = None
        self.extents: list[Extent] | None = None
        self.error: tuple[int, str] | None = None

    @property
    def settled(self) -> bool:
        f = self.future
        return f.done() if f is not None else self.done is None


def _settle(p: _Pending, result: object, err: BaseException | None) -> None:
    """Tell the request's owner its outcome, once (a later one is dropped: a reply
    after the time limit, a time limit after the owner cancelled)."""
    f = p.future
    if f is not None:
        if f.done():
            return
        if err is None:
            f.set_result(result)
        else:
            f.set_exception(err)
        return
    done = p.done
    if done is None:
        return
    p.done = None
    try:
        done(result, err)
    except Exception:  # the owner's bug must not break the parsing of other replies
        log.exception("NBD client: a request's callback failed")


def _place(p: _Pending, off: int, n: int) -> int:
    """Check a data/hole chunk lies inside the READ; its start in the buffer."""
    start = off - p.offset
    if p.cmd != Cmd.READ or start < 0 or n < 0 or start + n > p.length:
        raise NBDClientError(f"chunk {off}+{n} outside the request {p.offset}+{p.length}")
    p.covered += n
    if p.data is None and start == 0 and n == p.length:
        return start  # the whole request in one chunk: kept without a copy
    if p.pieces is None:
        p.pieces = []
    p.pieces.append((start, n))
    if not isinstance(p.data, bytearray):
        # a spare buffer, not zero-filled: every byte is a data or hole chunk's, or
        # the read fails (covered != length)
        old, p.data = p.data, SPARES.take(p.length)
        if old is not None:
            p.data[:len(old)] = old
    return start


def _chunk(p: _Pending, rtype: int, payload: bytes) -> None:
    """One structured reply chunk's payload, applied to its request."""
    if rtype == ReplyType.OFFSET_DATA:
        (off,) = OFFSET.unpack_from(payload)
        body = memoryview(payload)[OFFSET.size:]
        start = _place(p, off, len(body))
        if isinstance(p.data, bytearray):
            p.data[start:start + len(body)] = body
        else:
            p.data = body
    elif rtype == ReplyType.OFFSET_HOLE:
        off, n = HOLE.unpack_from(payload)
        start = _place(p, off, n)
        if not isinstance(p.data, bytearray):  # a hole over the whole request
            p.data = bytearray(p.length)
        else:
            p.data[start:start + n] = bytes(n)
    elif rtype == ReplyType.BLOCK_STATUS:
        if p.extents is None:
            p.extents = []
        p.extents.extend(parse_extents(payload))
    elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        p.error = parse_error(payload)
    elif rtype != ReplyType.NONE:
        raise NBDClientError(f"unexpected reply chunk type {rtype}")


def _finish(p: _Pending) -> None:
    """The request's reply is complete: its outcome to its owner."""
    if p.error is not None:
        code, msg = p.error
        if not 0 < code < 4096:  # no errno the server may send (NBD's are small)
            msg = msg or f"error {code:#x} from the server"
            code = errno.EIO
        _settle(p, None, OSError(code, msg or os.strerror(code)))
    elif p.cmd == Cmd.READ and p.covered != p.length:
        _settle(p, None, OSError(errno.EIO, f"the server answered {p.covered} of {p.length} bytes read"))
    elif p.pieces is not None and not _tiled(p.pieces, p.length):
        # overlapping chunks (the protocol forbids them) would leave bytes unwritten,
        # and the buffer is not zero-filled
        _settle(p, None, OSError(errno.EIO, "the server answered overlapping chunks"))
    elif p.extents:
        _settle(p, p.extents, None)
    else:
        _settle(p, p.data, None)


def _tiled(pieces: list[tuple[int, int]], length: int) -> bool:
    """Whether the (start, length) pieces cover 0..length once each."""
    at = 0
    for start, n in sorted(pieces):
        if start != at:
            return False
        at += n
    return at == length


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        have = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return platform.system() == "Linux" and have >= (major, minor)


#: kernels before 5.10 could leave a TCP socket unreadable with the mark set once
#: its receive buffer filled first ("tcp: fix SO_RCVLOWAT hangs with fat skbs")
_LOWAT_KERNEL = _kernel_at_least(5, 10)


def _sender(transport: asyncio.BaseTransport, loop: asyncio.AbstractEventLoop | None = None,
            on_failed: Callable[[int], None] | None = None) -> Sender | None:
    """A sending thread for a plain (not TLS) stream socket whose transport has
    nothing left to write, or None (the transport writes)."""
    if not SEND_THREAD:
        return None
    sock = _plain_socket(transport)
    if sock is None:
        return None
    if transport.get_write_buffer_size() or transport.is_closing():  # type: ignore[attr-defined]
        return None  # (the handshake's bytes still queued there would come after ours)
    try:
        return Sender(sock.fileno(), loop, on_failed)
    except OSError as err:
        log.warning("no sending thread (%s): requests leave from the event loop", err)
        return None


def _plain_socket(transport: asyncio.BaseTransport) -> Any:
    """The transport's socket when no TLS layer sits on it (the bytes written and
    read there are the protocol's own), else None."""
    if (transport.get_extra_info("sslcontext") is not None
            or transport.get_extra_info("ssl_object") is not None):
        return None
    return transport.get_extra_info("socket")


def _lowat_socket(transport: asyncio.BaseTransport) -> Any:
    """The socket of a plain TCP connection, or None: over TLS the bytes owed are
    not the bytes on the socket, and a Unix socket's readiness ignores the mark."""
    if not _LOWAT_KERNEL:
        return None
    sock = _plain_socket(transport)
    if sock is None or getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


class ReplyReader:
    """The transmission phase's replies, parsed without I/O.

    Bytes go where ``buffer()`` says, then ``filled(n)`` parses what came; every
    request whose reply is complete leaves ``pending`` and is finished.  Replies
    are parsed out of one reply buffer, many per call; the data of a large READ
    chunk is read straight into the request's own buffer instead.  A reply that
    breaks the protocol raises NBDClientError (the connection cannot go on).
    """

    def __init__(self, pending: dict[int, _Pending], *, structured: bool = True,
                 finish: Callable[[_Pending], None] | None = None) -> None:
        self.pending = pending
        self.structured = structured
        #: called with each request whose reply is complete (default: its outcome told now)
        self.finish = finish or _finish
        self._buf = bytearray(_SCRATCH)
        self._view = memoryview(self._buf)
        self._start = 0  # parsed up to here
        self._end = 0  # filled up to here
        self._need = 0  # bytes from _start the next reply needs before it can be parsed
        # the rest of a READ's data, read straight into its buffer
        self._direct: memoryview | None = None
        self._direct_cookie = 0
        self._direct_last = False  # ... and it ends the reply
        #: the last reply was a large READ's: the next is likely one too, so only its
        #: header is read into the reply buffer (its data then goes straight to its
        #: own buffer instead of through this one)
        self._head_only = 0

    def abandon(self) -> None:
        """No more bytes come: let go of the READ buffer being filled (a spare one:
        the pool may hand it out again at once, not when the collector frees us)."""
        self._direct = None

    @property
    def direct_left(self) -> int:
        """Bytes of a READ's data still to come straight into its buffer (0: none)."""
        d = self._direct
        return 0 if d is None else len(d)

    def buffer(self) -> memoryview:
        """Where the next bytes from the server go (never empty)."""
        if self._direct is not None:
            return self._direct
        if self._head_only and self._start == self._end:
            return self._view[self._end:self._end + self._head_only]
        return self._view[self._end:]

    def filled(self, n: int) -> None:
        """``n`` bytes were put where ``buffer()`` said."""
        direct = self._direct
        if direct is not None:
            if n < len(direct):
                self._direct = direct[n:]
                return
            self._direct = None
            self._head_only = (CHUNK.size + OFFSET.size if self.structured
                               else SIMPLE_REPLY.size)
            if self._direct_last:
                self.finish(self.pending.pop(self._direct_cookie))
            return
        self._end += n
        self._head_only = 0
        self._parse()
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
        elif self._direct is None and (len(self._buf) - end < 16384
                                       or start + self._need > len(self._buf)):
            self._compact()

    def _compact(self) -> None:
        """Move the unparsed bytes to the front, growing the buffer for a long reply."""
        start, end = self._start, self._end
        size = max(len(self._buf), self._need + 16384)
        if size > len(self._buf):
            # (no release(): the event loop may still hold the part it filled)
            buf = bytearray(size)
            buf[:end - start] = self._buf[start:end]
            self._buf = buf
            self._view = memoryview(buf)
        else:
            self._buf[:end - start] = self._buf[start:end]
        self._start, self._end = 0, end - start

    def _parse(self) -> None:
        buf, view, pending, finish = self._buf, self._view, self.pending, self.finish
        while True:
            s = self._start
            avail = self._end - s
            if avail < SIMPLE_REPLY.size:
                self._need = SIMPLE_REPLY.size
                return
            magic, code, cookie = SIMPLE_REPLY.unpack_from(buf, s)
            if magic == SIMPLE_REPLY_MAGIC:  # structured: all but READ and BLOCK_STATUS
                p = pending.get(cookie)
                if p is None:
                    raise NBDClientError(f"reply to unknown cookie {cookie}")
                body = s + SIMPLE_REPLY.size
                if code:
                    p.error = (code, "")
                elif p.cmd == Cmd.READ and not self.structured:  # the data follows
                    n = p.length
                    if avail - SIMPLE_REPLY.size >= n:
                        p.data = bytes(view[body:body + n])
                        p.covered = n
                        body += n
                    elif n > _DIRECT_MIN:
                        self._start = body
                        self._go_direct(p, cookie, p.offset, n, last=True)
                        return
                    else:
                        self._need = SIMPLE_REPLY.size + n
                        return
                self._start = body
                del pending[cookie]
                finish(p)
                continue
            if magic != STRUCTURED_REPLY_MAGIC:
                raise NBDClientError(f"bad reply magic {magic:#x}")
            if avail < CHUNK.size:
                self._need = CHUNK.size
                return
            _, flags, rtype, cookie, length = CHUNK.unpack_from(buf, s)
            p = pending.get(cookie)
            if p is None:
                raise NBDClientError(f"reply to unknown cookie {cookie}")
            body = s + CHUNK.size
            if avail - CHUNK.size >= length:
                self._start = body + length
                _chunk(p, rtype, bytes(view[body:body + length]))
                if flags & _DONE:
                    del pending[cookie]
                    finish(p)
                continue
            if rtype == ReplyType.OFFSET_DATA and length > _DIRECT_MIN:
                if avail < CHUNK.size + OFFSET.size:
                    self._need = CHUNK.size + OFFSET.size
                    return
                (off,) = OFFSET.unpack_from(buf, body)
                self._start = body + OFFSET.size
                self._go_direct(p, cookie, off, length - OFFSET.size,
                                last=bool(flags & _DONE))
                return
            if length > _CHUNK_MAX:
                raise NBDClientError(f"a reply chunk of {length} bytes")
            self._need = CHUNK.size + length
            return

    def _go_direct(self, p: _Pending, cookie: int, off: int, n: int, *, last: bool) -> None:
        """The rest of this data chunk goes straight into the request's buffer."""
        start = _place(p, off, n)
        if not isinstance(p.data, bytearray):
            p.data = SPARES.take(p.length)
        dst = memoryview(p.data)[start:start + n]
        have = self._end - self._start  # all of it belongs to this chunk
        dst[:have] = self._view[self._start:self._end]
        self._start = self._end = 0
        self._direct = dst[have:]
        self._direct_cookie = cookie
        self._direct_last = last


@dataclass(frozen=True)
class ExportInfo:
    size: int
    flags: int  # transmission flags
    #: the server's largest request payload (NBD_INFO_BLOCK_SIZE), 0 if not said
    max_block: int = 0
    #: base:allocation was negotiated: BLOCK_STATUS works
    base_allocation: bool = True
    #: structured replies were negotiated (else simple replies, READ data inline)
    structured: bool = True


class NBDClient(asyncio.BufferedProtocol):
    """One NBD connection with many requests in flight.

    After the handshake (``connect``) it is the connection's protocol: replies are
    parsed as they arrive (``ReplyReader``), with no task and no coroutine per
    reply.  Time limits share one timer, armed for the earliest deadline.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: ExportInfo) -> None:
        self.writer = writer
        self.transport = writer.transport
        self.info = info
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0
        self._closed: BaseException | None = None
        #: kept: asking asyncio for the loop costs a getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self._out: list[Buffer] = []  # requests not written yet (see submit)
        self._out_bytes = 0
        self._flush_scheduled = False
        self._replies = ReplyReader(self._pending, structured=info.structured,
                                    finish=self._finish_soon)
        self._ready: list[_Pending] = []  # replies complete, their outcomes not told yet
        self._ended: asyncio.Future[None] = self._loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._paused = False
        self._drained: asyncio.Future[None] | None = None
        #: plain TCP: the socket whose receive low-water mark follows a large READ
        self._sock = _lowat_socket(self.transport)
        self._lowat = 1
        #: a plain socket's requests leave from a thread of their own (None: through
        #: the transport, as over TLS)
        self._tx = _sender(self.transport, self._loop, self._send_failed)
        # from here on the replies come to this object, not to the handshake's stream
        leftover = bytes(getattr(reader, "_buffer", b""))
        ended = getattr(reader, "_eof", False) or reader.exception() is not None
        self.transport.set_protocol(self)
        if leftover:
            self._feed(leftover)
        if ended or self.transport.is_closing():
            # the end came to the handshake's stream: it never comes here again
            self.connection_lost(reader.exception())
            self.transport.abort()

    @classmethod
    async def connect(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      export: str, *, general: bool = False,
                      tls: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> NBDClient:
        """Negotiate ``export``.  ``general``: any NBD server (structured replies
        and base:allocation optional, the block size asked for); else the
        primary, which must offer both.  With ``tls``, NBD_OPT_STARTTLS first and
        everything after it over TLS (``server_hostname``: the name the server's
        certificate must carry, when the context checks host names).

        Raises:
            NBDClientError: the server refused the export or broke the protocol.
        """
        flags = parse_greeting(await reader.readexactly(GREETING.size))
        writer.write(encode_client_flags(flags))
        if tls is not None:
            await _starttls(reader, writer, tls, server_hostname)
        writer.write(encode_option(Opt.STRUCTURED_REPLY))
        rep, n = parse_option_reply(await reader.readexactly(OPTION_REPLY.size), Opt.STRUCTURED_REPLY)
        payload = await reader.readexactly(n)
        structured = rep == Rep.ACK
        if not structured and not general:
            raise NBDClientError("server refused structured replies")
        base_allocation = False
        if structured:
            writer.write(encode_set_meta_context(export, [META_BASE_ALLOCATION]))
            while True:
                rep, n = parse_option_reply(await reader.readexactly(OPTION_REPLY.size), Opt.SET_META_CONTEXT)
                payload = await reader.readexactly(n)
                if rep == Rep.ACK:
                    break
                if rep == Rep.META_CONTEXT:
                    base_allocation = True
                    continue
                if not general:
                    raise NBDClientError(f"server refused {META_BASE_ALLOCATION} "
                                         f"({describe_refusal(rep, payload)})")
                if rep == Rep.ERR_UNKNOWN:
                    raise NBDClientError(f"export {export!r}: {describe_refusal(rep, payload)}")
                break  # meta contexts refused: no block status, nothing else lost
        writer.write(encode_go(export, (Info.BLOCK_SIZE,) if general else ()))
        info: ExportInfo | None = None
        max_block = 0
        while True:
            header = await reader.readexactly(OPTION_REPLY.size)
            rep, n = parse_option_reply(header, Opt.GO)
            payload = await reader.readexactly(n)
            if rep == Rep.ACK:
                break
            if rep != Rep.INFO:
                raise NBDClientError(f"server refused export {export!r} "
                                     f"({describe_refusal(rep, payload)})")
            kind = INFO_TYPE.unpack_from(payload)[0]
            if kind == Info.EXPORT:
                _, size, tflags = INFO_EXPORT.unpack_from(payload)
                info = ExportInfo(size, tflags)
            elif kind == Info.BLOCK_SIZE and len(payload) >= INFO_BLOCK_SIZE.size:
                max_block = INFO_BLOCK_SIZE.unpack_from(payload)[3]
        if info is None:
            raise NBDClientError("server sent no export information")
        info = ExportInfo(info.size, info.flags, max_block, base_allocation, structured)
        return cls(reader, writer, info)


    # -- requests -------------------------------------------------------------------------
    async def call(self, cmd: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
                   data: Buffer | None = None, *, limit: float | None = None) -> object:
        """Send one request and await its reply.

        Returns the bytes read (READ), the extents (BLOCK_STATUS) or None;
        an error reply raises OSError with the server's errno and message.
        ``limit``: raise TimeoutError after that many seconds.
        """
        fut = self.submit(cmd, offset, length, flags, data, limit=limit)
        if self._backlog() > _BACKLOG_MAX:
            try:
                await asyncio.wait_for(self._drain(), limit)
            except BaseException:
                # given up (cancelled, timed out) with the request sent: its outcome,
                # an error once the connection ends, is dropped here, not left for
                # the loop to log as never retrieved
                if not fut.cancel() and not fut.cancelled():
                    fut.exception()
                raise
        return await fut

    def submit(self, cmd: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
               data: Buffer | None = None, *, limit: float | None = None,
               ) -> asyncio.Future[object]:
        """Send one request now; its reply (or error) arrives in the future returned.

        The request is written at once (no back-pressure wait: for callers that
        bound their own requests in flight).  ``limit``: the future fails with
        TimeoutError after that many seconds (a late reply is dropped).
        """
        fut: asyncio.Future[object] = self._loop.create_future()
        self._send(_Pending(cmd, offset, length, fut), flags, data, limit)
        return fut

    def send(self, cmd: Cmd, offset: int, length: int, flags: int, data: Buffer | None,
             done: Done, *, limit: float | None = None) -> None:
        """``submit`` without a future: ``done(result, error)`` is called once, from
        the reply parser (or the time limit, or the connection's end)."""
        self._send(_Pending(cmd, offset, length, None, done), flags, data, limit)

    def _send(self, p: _Pending, flags: int, data: Buffer | None, limit: float | None) -> None:
        if self._closed is not None:
            raise ConnectionResetError(errno.ECONNRESET, f"connection lost: {self.lost_reason}")
        if self.transport.is_closing():
            # closed under us (a failed send, abort_now) before its end reached us:
            # a lost connection, never a write on a closed transport
            raise ConnectionResetError(errno.ECONNRESET, "connection lost: transport closed")
        self._cookie = cookie = self._cookie + 1
        if limit is not None:
            p.deadline = at = self._loop.time() + limit
            if at < self._timer_at:
                self._arm(at)
        self._pending[cookie] = p
        self._out.append(REQUEST.pack(REQUEST_MAGIC, flags, p.cmd, cookie, p.offset, p.length))
        if data is not None:
            self._out.append(data)
            self._out_bytes += len(data)
        if self._out_bytes >= _CORK_MAX:
            self._flush()
        elif not self._flush_scheduled:
            # the requests of one loop iteration leave in one write (a system call and
            # a TCP segment for many small requests instead of one each)
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, payload = self._out, self._out_bytes
        self._out, self._out_bytes = [], 0
        if not out or self.transport.is_closing():
            return  # a closed connection: its end fails what is pending
        tx = self._tx
        if tx is not None and (tx.busy or (
                payload >= _THREAD_MIN and not self.transport.get_write_buffer_size())):
            # large writes leave from the thread (their copy runs beside the loop); small
            # ones from here (a thread's wakeup would cost them more than their copy).
            # Either way in order: one path at a time, the other's queue empty.
            try:
                tx.push(out)
            except OSError as err:  # the socket failed under the sender: a lost connection
                if self._closed is None:
                    self._closed = err
                self.transport.abort()
        elif len(out) == 1:
            self.transport.write(out[0])
        else:
            self.transport.writelines(out)

    def _send_failed(self, err: int) -> None:
        """The sending thread's write failed: the connection is lost, and says why
        (the socket's error went to the thread's write, not to the transport)."""
        if self._closed is None:
            self._closed = OSError(err, os.strerror(err))
        self.transport.abort()

    def _finish_soon(self, p: _Pending) -> None:
        """A complete reply's outcome is told after the event loop's other ready work:
        the replies of one read are parsed at once, but what their owners do next
        waits its turn (a client's request that arrived meanwhile goes first)."""
        if not self._ready:
            self._loop.call_soon(self._finish_ready)
        self._ready.append(p)

    def _finish_ready(self) -> None:
        ready, self._ready = self._ready, []
        if self._tx is not None:
            self._tx.let_go()  # (a reply: its request's bytes were all written)
        for p in ready:
            try:
                _finish(p)
            except Exception as err:  # never leave one without an outcome: they left _pending
                _settle(p, None, OSError(errno.EIO, f"bad reply: {err}"))

    # -- time limits: one timer for the earliest deadline -----------------------------------
    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(at, self._expire)
        self._timer_at = at

    def _expire(self) -> None:
        """Fail the requests past their time limit (their late replies are dropped)."""
        self._timer, self._timer_at = None, math.inf
        # uvloop's clock moves in milliseconds and its timers may fire that much early:
        # a deadline within the next millisecond is due now (else the timer spins)
        now = self._loop.time() + 1e-3
        nearest = math.inf
        for p in list(self._pending.values()):
            if p.deadline <= now:
                _settle(p, None, TimeoutError())
            elif p.deadline < nearest and not p.settled:
                nearest = p.deadline
        # (a callback above may have armed the timer for a request it sent: keep that
        # one if it is earlier)
        if nearest < self._timer_at and self._closed is None:
            self._arm(nearest)

    # -- asyncio.BufferedProtocol: the replies ------------------------------------------------
    def get_buffer(self, sizehint: int) -> memoryview:
        return self._replies.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._replies.filled(nbytes)
            if self._sock is not None:
                self._follow_lowat()
        except Exception as err:  # a broken reply (NBDClientError, struct.error, ...)
            if self._closed is None:
                self._closed = err
            self.transport.abort()

    def _follow_lowat(self) -> None:
        """While a large READ's data arrives, the socket is readable only once a good
        part of what is left has come (SO_RCVLOWAT): a wakeup, a receive and a window
        update per 1 MiB or so instead of per few segments, which halves the sender's
        work per byte too.  Never more than the server still owes this request, so
        it always comes (an end or a reset wakes the socket whatever the mark)."""
        d = self._replies.direct_left
        want = 1 if d < _DIRECT_MIN else min(d, _LOWAT_MAX)
        if want != self._lowat:
            self._lowat = want
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            except OSError:
                self._sock = None  # (a closed socket: the end is on its way)

    def _feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self._closed is None:
            dst = self.get_buffer(len(view))
            n = min(len(dst), len(view))
            dst[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def eof_received(self) -> bool:
        # no reply can come now: what is in flight fails at once, not once the
        # transport has written what it still holds
        self._fail_all(ConnectionResetError(errno.ECONNRESET, _EOF))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tx is not None:
            # joined before the transport closes its descriptor (right after this returns)
            self._tx.close()
        self._fail_all(exc if exc is not None else ConnectionResetError(errno.ECONNRESET, _EOF))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def _backlog(self) -> int:
        """Bytes of requests written and not yet on the socket (counted while the
        transport pushes back, or while the sending thread holds any)."""
        n = self.transport.get_write_buffer_size() if self._paused else 0
        return n + self._tx.backlog if self._tx is not None else n

    async def _drain(self) -> None:
        if self._tx is not None:
            await self._tx.below(_BACKLOG_MAX // 4)
        if not self._paused or self._closed is not None:
            return
        if self._drained is None:
            self._drained = self._loop.create_future()
        await asyncio.shield(self._drained)

    def _fail_all(self, err: BaseException) -> None:
        if self._closed is None:
            self._closed = err
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, -math.inf  # never armed again
        reason = self.lost_reason
        # the cause's errno where it has one (a silent link's ETIMEDOUT stays a timeout
        # in what the requests report), still a ConnectionError for their owners
        code = getattr(err, "errno", None) or errno.ECONNRESET
        pending = list(self._pending.values())
        self._pending.clear()
        self._replies.abandon()
        for p in pending:
            _settle(p, None, ConnectionResetError(code, f"connection lost: {reason}"))
        self.resume_writing()
        if not self._ended.done():
            self._ended.set_result(None)

    # -- the connection's end -----------------------------------------------------------------
    @property
    def lost_reason(self) -> str | None:
        """Why the connection ended (None while it lives)."""
        if self._closed is None:
            return None
        err = self._closed
        text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        return text or type(err).__name__

    def abort_now(self) -> None:
        """Drop the connection at once: no DISC, no waiting (a dead link)."""
        if self._closed is None:
            self._closed = ConnectionAbortedError(errno.ECONNABORTED, "client closed")
        if self._tx is not None:
            self._tx.stop()  # nothing more leaves; joined when the transport ends
        self.transport.abort()

    async def abort(self) -> None:
        self.abort_now()
        with contextlib.suppress(BaseException):
            await asyncio.shield(self._ended)

    @property
    def closed(self) -> asyncio.Future[None]:
        """Done when the connection ended (the primary went away)."""
        return self._ended

    async def close(self) -> None:
        """DISC, then close once what is written has left (bounded: a dead link aborts)."""
        deadline = self._loop.time() + 10
        if not self.transport.is_closing():
            self._out.append(REQUEST.pack(REQUEST_MAGIC, 0, Cmd.DISC, 0, 0, 0))
            self._flush()  # the requests, then the DISC
            if self._closed is None:  # nothing is sent after the DISC
                self._closed = ConnectionAbortedError(errno.ECONNABORTED, "client closed")
            if self._tx is not None:
                # the transport closes once its own buffer is written: the thread's first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._tx.below(0), deadline - self._loop.time())
            self.transport.close()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(self._ended),
                                   max(0.0, deadline - self._loop.time()))
        if not self._ended.done():
            self.transport.abort()
