"""A small NBD client: a worker's link to the primary, and a quorum's link to a
child on another host.

Fixed newstyle, OPT_GO, structured replies and base:allocation where the
server has them (simple replies and no block status where it does not);
requests multiplexed by cookie over one connection.  The wire format lives in
pure functions (encode_* / parse_*) with the same constants table as the
server (constants.py); NBDClient is the asyncio driver around them.  A server
that breaks the protocol raises ``NBDClientError``; a lost connection fails
every request in flight with a ``ConnectionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import ssl
from dataclasses import dataclass, field

from nbdquorum.coretypes import Buffer, Extent
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


def _expire(fut: asyncio.Future[object]) -> None:
    """A request's time limit passed: its caller gets TimeoutError (a late reply is dropped)."""
    if not fut.done():
        fut.set_exception(TimeoutError())


@dataclass(eq=False)
class _Pending:
    cmd: Cmd
    offset: int
    length: int
    future: asyncio.Future[object]
    data: Buffer | None = None
    covered: int = 0  # bytes of a READ that data/hole chunks have filled
    extents: list[Extent] = field(default_factory=list)
    error: tuple[int, str] | None = None


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


class NBDClient:
    """One NBD connection with many requests in flight."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 info: ExportInfo) -> None:
        self.reader = reader
        self.writer = writer
        self.info = info
        self._pending: dict[int, _Pending] = {}
        self._cookie = 0
        self._closed: BaseException | None = None
        #: kept: asking asyncio for the loop costs a getpid() system call on Python 3.11
        self._loop = asyncio.get_running_loop()
        self._out: list[Buffer] = []  # requests not written yet (see submit)
        self._out_bytes = 0
        self._flush_scheduled = False
        self._task = self._loop.create_task(self._read_replies())

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

    async def call(self, cmd: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
                   data: Buffer | None = None, *, limit: float | None = None) -> object:
        """Send one request and await its reply.

        Returns the bytes read (READ), the extents (BLOCK_STATUS) or None;
        an error reply raises OSError with the server's errno and message.
        ``limit``: raise TimeoutError after that many seconds (one timer on the
        reply; ``asyncio.wait_for`` would add a task per request).
        """
        fut = self.submit(cmd, offset, length, flags, data)
        timer = None if limit is None else self._loop.call_later(limit, _expire, fut)
        try:
            if self.writer.transport.get_write_buffer_size() > (4 << 20):
                await asyncio.wait_for(self.writer.drain(), limit)
            return await fut
        finally:
            if timer is not None:
                timer.cancel()

    def submit(self, cmd: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
               data: Buffer | None = None, *, limit: float | None = None,
               ) -> asyncio.Future[object]:
        """Send one request now; its reply (or error) arrives in the future returned.

        The request is written at once (no back-pressure wait: for callers that
        bound their own requests in flight).  ``limit``: the future fails with
        TimeoutError after that many seconds.
        """
        if self._closed is not None:
            raise ConnectionResetError(errno.ECONNRESET, f"connection lost: {self._closed}")
        if self.writer.transport.is_closing():
            # closed under us (a failed send, abort_now) before the reader saw it end:
            # a lost connection, never a write on a closed transport
            raise ConnectionResetError(errno.ECONNRESET, "connection lost: transport closed")
        self._cookie += 1
        cookie = self._cookie
        fut: asyncio.Future[object] = self._loop.create_future()
        self._pending[cookie] = _Pending(cmd, offset, length, fut)
        self._out.append(encode_request(cmd, flags, cookie, offset, length))
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
        if limit is not None:
            timer = self._loop.call_later(limit, _expire, fut)
            fut.add_done_callback(lambda _f: timer.cancel())
        return fut

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out, self._out_bytes = self._out, [], 0
        if not out or self.writer.transport.is_closing():
            return  # a closed connection: the reader fails what is pending
        if len(out) == 1:
            self.writer.write(out[0])
        else:
            self.writer.writelines(out)

    async def _read_replies(self) -> None:
        try:
            read = self.reader.readexactly
            while True:
                head = await read(SIMPLE_REPLY.size)
                simple = parse_reply_start(head)
                if simple is not None:  # structured: for everything but READ and BLOCK_STATUS
                    code, cookie, _ = simple
                    p = self._pending.pop(cookie, None)
                    if p is None:
                        raise NBDClientError(f"reply to unknown cookie {cookie}")
                    if code:
                        p.error = (code, "")
                    elif p.cmd == Cmd.READ and not self.info.structured:
                        p.data = await read(p.length)  # simple replies carry the data
                        p.covered = p.length
                    self._finish(p)
                    continue
                flags, rtype, cookie, length = parse_chunk_header(head + await read(CHUNK.size - SIMPLE_REPLY.size))
                payload = await read(length) if length else b""
                p = self._pending.get(cookie)
                if p is None:
                    raise NBDClientError(f"reply to unknown cookie {cookie}")
                self._chunk(p, rtype, payload)
                if flags & ReplyFlag.DONE:
                    del self._pending[cookie]
                    self._finish(p)
        except asyncio.CancelledError:
            self._fail_all(ConnectionError("client closed"))
            raise
        except Exception as err:  # EOF, a broken reply (struct.error, ValueError, ...)
            self._fail_all(err)

    @staticmethod
    def _place(p: _Pending, off: int, n: int) -> int:
        """Check a data/hole chunk lies inside the READ; its start in the buffer."""
        start = off - p.offset
        if p.cmd != Cmd.READ or start < 0 or n < 0 or start + n > p.length:
            raise NBDClientError(f"chunk {off}+{n} outside the request {p.offset}+{p.length}")
        p.covered += n
        if p.data is None and start == 0 and n == p.length:
            return start  # the whole request in one chunk: kept without a copy
        if not isinstance(p.data, bytearray):
            old, p.data = p.data, bytearray(p.length)  # zero-filled: holes need no more
            if old is not None:
                p.data[:len(old)] = old
        return start

    @classmethod
    def _chunk(cls, p: _Pending, rtype: int, payload: bytes) -> None:
        if rtype == ReplyType.OFFSET_DATA:
            (off,) = OFFSET.unpack_from(payload)
            body = memoryview(payload)[OFFSET.size:]
            start = cls._place(p, off, len(body))
            if isinstance(p.data, bytearray):
                p.data[start:start + len(body)] = body
            else:
                p.data = body
        elif rtype == ReplyType.OFFSET_HOLE:
            off, n = HOLE.unpack_from(payload)
            start = cls._place(p, off, n)
            if not isinstance(p.data, bytearray):  # a hole over the whole request
                p.data = bytearray(p.length)
            else:
                p.data[start:start + n] = bytes(n)
        elif rtype == ReplyType.BLOCK_STATUS:
            p.extents.extend(parse_extents(payload))
        elif rtype in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
            p.error = parse_error(payload)
        elif rtype != ReplyType.NONE:
            raise NBDClientError(f"unexpected reply chunk type {rtype}")

    @staticmethod
    def _finish(p: _Pending) -> None:
        if p.future.done():
            return
        if p.error is not None:
            code, msg = p.error
            p.future.set_exception(OSError(code or errno.EIO, msg or os.strerror(code or errno.EIO)))
        elif p.cmd == Cmd.READ and p.covered != p.length:
            p.future.set_exception(OSError(
                errno.EIO, f"the server answered {p.covered} of {p.length} bytes read"))
        elif p.extents:
            p.future.set_result(p.extents)
        else:
            p.future.set_result(p.data)

    def _fail_all(self, err: BaseException) -> None:
        self._closed = err
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(
                    ConnectionResetError(errno.ECONNRESET, f"connection lost: {err}"))

    @property
    def lost_reason(self) -> str | None:
        """Why the connection ended (None while it lives)."""
        if self._closed is None:
            return None
        if isinstance(self._closed, asyncio.IncompleteReadError):
            return "closed by the server"
        return str(self._closed) or type(self._closed).__name__

    def abort_now(self) -> None:
        """Drop the connection at once: no DISC, no waiting (a dead link)."""
        self._task.cancel()
        self.writer.transport.abort()

    async def abort(self) -> None:
        self.abort_now()
        with contextlib.suppress(BaseException):
            await self._task

    @property
    def closed(self) -> asyncio.Task[None]:
        """Done when the connection ended (the primary went away)."""
        return self._task

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self._flush()  # requests before the DISC
            self.writer.write(encode_request(Cmd.DISC, 0, 0, 0, 0))
            await self.writer.drain()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
