"""The asyncio glue around the sans-I/O NBD protocol (protocol.py).

Receive bytes straight into the protocol's buffers (a WRITE payload into
its own buffer: asyncio's BufferedProtocol, no intermediate copies), run
each request as its own task, write what the protocol returns.  Replies finish out of order, so a reply's header and
payload go out together under one send lock.  Bytes in flight are bounded by
a server-wide budget: while it is spent, no connection reads more requests,
which pushes back on the clients through their sockets.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from nbdquorum.block.node import BlockNode
from nbdquorum.nbd.constants import Cmd, CmdFlag, NbdErrno, TransmissionFlag
from nbdquorum.nbd.errors import RemoteProtocolError, to_nbd_errno
from nbdquorum.nbd.events import (
    NEED_DATA,
    BlockStatusReply,
    DataChunk,
    Disconnect,
    ErrorReply,
    ExportChosen,
    ExportInfo,
    ReadReply,
    Request,
    SimpleReply,
)
from nbdquorum.nbd.protocol import Phase, ServerConnection
from nbdquorum.nbd.stats import RequestStats, clock
from nbdquorum.sockets import Listener, bind_tcp, bind_unix

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
#: reading pauses while this many received bytes wait to be parsed (back-pressure)
READ_HIGH = 2 << 20
#: replies at least this big are written buffer by buffer rather than joined
BIG_PAYLOAD = 64 << 10
#: READ/WRITE requests up to this size may be served without a task (_serve_now)
SYNC_MAX = 64 << 10
#: a sender waits for the socket to drain above this many unsent bytes
WRITE_HIGH = 4 << 20
#: default server-wide budget of request bytes in flight (back-pressure)
DEFAULT_BUDGET = 64 << 20


@dataclass
class Export:
    name: str  # export name on the wire
    node: BlockNode  # the node served
    description: str = ""
    read_only: bool = False

    def info(self) -> ExportInfo:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
            | TransmissionFlag.SEND_DF
            | TransmissionFlag.SEND_CACHE
            | TransmissionFlag.SEND_FAST_ZERO
            # One process, one node, flush reaches every child: a flush on
            # any connection covers writes acknowledged on all of them.
            | TransmissionFlag.CAN_MULTI_CONN
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
            flags &= ~(
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        return ExportInfo(
            name=self.name,
            size=self.node.size(),
            description=self.description,
            read_only=self.read_only,
            flags=flags,
        )


class Budget:
    """A byte budget shared by all connections; one oversized request may pass alone.

    The uncontended path is a comparison and an addition: no lock, no task switch.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted, then cancelled: give it back
            raise

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters:
            want, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if not self._fits(want):
                break
            self._waiters.popleft()
            self.used += want
            fut.set_result(None)


class Stream(asyncio.BufferedProtocol):
    """One client socket: receives into the protocol's buffers, writes like a StreamWriter.

    The connection's read loop awaits `wait_data`; reading pauses while more
    than READ_HIGH received bytes wait to be parsed (the loop is waiting for
    the byte budget or for the socket to drain) and resumes when it asks for
    more.  `drain` waits while the transport's write buffer is over its high
    mark, as StreamWriter.drain does.
    """

    def __init__(self, server: NBDServer, *, counted: bool = True) -> None:
        self.server = server
        self.counted = counted  # False: a worker's forwarding connection (not a client)
        self.transport: asyncio.Transport
        self.conn: Connection
        self.task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._fed = False  # bytes or EOF arrived since the loop last waited
        self._data_waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._write_paused = False
        self._read_paused = False
        self._lost = False  # connection_lost() was called
        self._error: Exception | None = None  # ... with this error (ECONNRESET, ...)
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- protocol callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.server.stopping:
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(self.server, self)
        self.task = self._loop.create_task(self.server._run(self.conn))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.proto.receive_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.conn.proto.buffer_filled(nbytes)
        waiter = self._data_waiter
        if waiter is not None and not waiter.done() and self.conn.serve_inline():
            return  # everything received was served here; the read loop sleeps on
        if not self._read_paused and self.conn.proto.buffered() > READ_HIGH:
            self._read_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.conn.proto.receive_data(b"")
        self._wake()
        return True  # keep the transport: replies to requests before EOF still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._error = exc
        if exc is None and hasattr(self, "conn"):
            self.conn.proto.receive_data(b"")  # a plain close is an EOF
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    def _wake(self) -> None:
        self._fed = True
        if self._data_waiter is not None and not self._data_waiter.done():
            self._data_waiter.set_result(None)

    # -- the read side -------------------------------------------------------------------
    async def wait_data(self) -> None:
        """Return once bytes or EOF arrived since the last call (the protocol has them)."""
        if self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()
        if not self._fed:
            if self._error is not None:
                raise self._error  # as StreamReader.read() does
            self._data_waiter = self._loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        self._fed = False

    # -- the write side (StreamWriter's subset the connection uses) -------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.transport.write(data)

    def writelines(self, bufs: list[bytes | memoryview]) -> None:
        self.transport.writelines(bufs)

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size()

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._write_paused:
            return
        if self._drain_waiter is None or self._drain_waiter.done():
            self._drain_waiter = self._loop.create_future()
        await asyncio.shield(self._drain_waiter)
        if self._lost:
            raise ConnectionResetError("connection lost")

    def close(self) -> None:
        self.transport.close()

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def get_extra_info(self, name: str) -> Any:
        return self.transport.get_extra_info(name)


class Connection:
    def __init__(self, server: NBDServer, stream: Stream) -> None:
        self.server = server
        self.stream = stream
        peer = stream.get_extra_info("peername") or "unix"
        self.log = log.getChild(f"conn{server.next_id()}")
        self.log.debug("connected from %s", peer)
        self.proto = ServerConnection(
            {name: e.info() for name, e in server.exports.items()}, server.default_export
        )
        self.export: Export | None = None
        self.send_lock = asyncio.Lock()  # serialises drain() on back-pressure
        self._out: list[bytes | memoryview] = []  # reply buffers not yet written
        self._out_bytes = 0
        self._flush_scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.read_task: asyncio.Task[Any] | None = None
        #: an event (or error) serve_inline() took but left to the read loop
        self._held: object = None
        #: where served requests are counted (None: not a client's connection)
        self.stats: RequestStats | None = server.stats if stream.counted else None

    async def run(self) -> None:
        # The read loop is its own task so that shutdown can stop reading
        # without cancelling the replies and the close below.
        self.stream.write(self.proto.initial_bytes())
        self.read_task = asyncio.create_task(self._read_loop())
        try:
            await asyncio.shield(self.read_task)
        except asyncio.CancelledError:
            self.read_task.cancel()
            if not self.server.stopping:
                raise
        except RemoteProtocolError as err:
            self.log.warning("protocol error from client: %s", err)
            self._flush_handshake()
        except (ConnectionError, OSError) as err:
            self.log.debug("connection lost: %s", err)
        finally:
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                self._flush_out()  # replies queued in this loop iteration
                self._flush_handshake()
                await self.stream.drain()
            self.stream.close()
            with contextlib.suppress(Exception):
                await self.stream.wait_closed()
            self.log.debug("closed")

    def _flush_handshake(self) -> None:
        out = self.proto.data_to_send()
        if out:
            self.stream.write(out)

    def serve_inline(self) -> bool:
        """Serve what just arrived from the socket callback itself, without waking
        the read loop, while every request takes a fast path (_serve_now).

        Called only while the read loop waits for data.  True: all of it was
        served, the loop sleeps on.  False: wake the loop, which continues with
        the event (or the protocol error) held here.  For a client with one
        request in flight this saves a task switch per request.
        """
        if (self.proto.phase is not Phase.TRANSMISSION or self.server.stopping
                or self.stream.get_write_buffer_size() > WRITE_HIGH):
            return False
        while True:
            try:
                ev = self.proto.next_event()
                if ev is NEED_DATA:
                    if self._out:
                        self._flush_out()
                    return True
                if not (isinstance(ev, Request) and self._serve_now(ev)):
                    self._held = ev
                    return False
            except Exception as err:  # raised again in the read loop, as it would be there
                self._held = err
                return False
            if self.stream.get_write_buffer_size() > WRITE_HIGH:
                return False  # the loop drains the socket first

    async def _read_loop(self) -> None:
        budget = self.server.budget
        while True:
            if self._held is not None:
                ev, self._held = self._held, None
                if isinstance(ev, BaseException):
                    raise ev
            else:
                ev = self.proto.next_event()
            self._flush_handshake()
            if ev is NEED_DATA:
                # Everything received is handled: send the replies now rather
                # than one loop iteration later (QD1 latency), and wait for the
                # socket only when it is backed up.
                if self._out:
                    self._flush_out()
                if self.stream.get_write_buffer_size() > WRITE_HIGH:
                    await self.stream.drain()
                await self.stream.wait_data()  # the bytes are in the protocol already
                continue
            if isinstance(ev, ExportChosen):
                self.export = self.server.exports[ev.name]
                self.log.debug("export %r chosen", ev.name)
            elif isinstance(ev, Request):
                if self._serve_now(ev):
                    if self.stream.get_write_buffer_size() > WRITE_HIGH:
                        await self.stream.drain()
                    continue
                # A read holds one buffer per child until the vote: charge them all.
                cost = (ev.length * self.export.node.buffers_per_read()
                        if ev.cmd == Cmd.READ and self.export is not None
                        else ev.length if ev.cmd == Cmd.WRITE else 0)
                if cost:
                    await budget.acquire(cost)
                task = asyncio.create_task(self._serve(ev, cost))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(ev, Disconnect):
                self.log.debug("client disconnected")
                return

    async def _send(self, reply: object) -> None:
        """Queue a reply; replies finished in the same loop iteration leave together.

        A reply's buffers are queued at once, so replies never interleave on
        the wire; one writelines() per loop iteration replaces one send per
        reply (the biggest cost of small requests after the thread hop).
        Back-pressure: a sender waits while the socket's buffer is full.
        """
        self._queue(reply)
        if self.stream.get_write_buffer_size() > WRITE_HIGH:
            async with self.send_lock:  # one drainer at a time
                await self.stream.drain()

    def _queue(self, reply: object) -> None:
        iov = self.proto.send(reply)  # type: ignore[arg-type]
        self._out.extend(iov)
        self._out_bytes += sum(len(b) for b in iov)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_out)
        if self._out_bytes >= BIG_PAYLOAD:
            self._flush_out()

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out, self._out_bytes = self._out, [], 0
        if not out or self.stream.is_closing():
            return
        if len(out) > 1 and any(len(b) >= BIG_PAYLOAD for b in out):
            # Python 3.11's writelines() joins (copies) the buffers; for a big
            # payload several sends are cheaper than the copy.  The transport
            # sends at once or copies what is left, so the payload's memory is
            # free for reuse when write() returns.
            for buf in out:
                self.stream.write(buf)
        else:
            self.stream.writelines(out)

    def _serve_now(self, req: Request) -> bool:
        """Serve a small READ or WRITE synchronously if the node can (no task,
        no await); False sends it down the full path."""
        t0 = clock()
        if req.cmd == Cmd.READ:
            if req.length > SYNC_MAX or self.export is None or self.proto.validate(req):
                return False
            data = self.export.node.try_pread_now(req.offset, req.length)
            if data is None:
                return False
            self._queue(ReadReply(req.cookie, [DataChunk(req.offset, data)]))
            if self.stats is not None:
                self.stats.record(req.cmd, t0)
            return True
        if req.cmd == Cmd.WRITE and not req.flags:
            if req.length > SYNC_MAX or self.export is None or self.proto.validate(req):
                return False
            try:
                if not self.export.node.try_pwrite_now(req.offset, req.data):
                    return False
            except OSError as err:
                self._queue(ErrorReply(req.cookie, to_nbd_errno(err, req.flags),
                                       str(err.strerror or err)))
            else:
                self._queue(SimpleReply(req.cookie))
            if self.stats is not None:
                self.stats.record(req.cmd, t0)
            return True
        return False

    async def _serve(self, req: Request, cost: int) -> None:
        t0 = clock()
        try:
            reply = await self._dispatch(req)
            await self._send(reply)
        except (ConnectionError, OSError) as err:
            self.log.debug("reply to %d not sent: %s", req.cookie, err)
        except Exception:
            self.log.exception("internal error serving %s", req)
            with contextlib.suppress(Exception):
                await self._send(ErrorReply(req.cookie, NbdErrno.EIO, "internal server error"))
        finally:
            if cost:
                self.server.budget.release(cost)
            if self.stats is not None:
                self.stats.record(req.cmd, t0)

    async def _dispatch(self, req: Request) -> object:
        bad = self.proto.validate(req)
        if bad:
            return ErrorReply(req.cookie, bad, f"invalid request (command {int(req.cmd)})")
        assert self.export is not None
        node = self.export.node
        fua = bool(req.flags & CmdFlag.FUA)
        try:
            if req.cmd == Cmd.READ:
                data = await node.pread(req.offset, req.length)
                return ReadReply(req.cookie, [DataChunk(req.offset, data)])
            if req.cmd == Cmd.WRITE:
                await node.pwrite(req.offset, req.data, fua=fua)
            elif req.cmd == Cmd.FLUSH:
                await node.flush()
            elif req.cmd == Cmd.TRIM:
                await node.trim(req.offset, req.length, fua=fua)
            elif req.cmd == Cmd.WRITE_ZEROES:
                await node.zero(
                    req.offset, req.length,
                    may_trim=not (req.flags & CmdFlag.NO_HOLE),
                    fast=bool(req.flags & CmdFlag.FAST_ZERO),
                    fua=fua,
                )
            elif req.cmd == Cmd.CACHE:
                await node.cache(req.offset, req.length)
            elif req.cmd == Cmd.BLOCK_STATUS:
                extents = await node.block_status(req.offset, req.length)
                if req.flags & CmdFlag.REQ_ONE:
                    extents = [(min(extents[0][0], req.length), extents[0][1])]
                ctx = next(iter(self.proto.meta_contexts))
                return BlockStatusReply(req.cookie, ctx, extents)
            else:
                return ErrorReply(req.cookie, NbdErrno.EINVAL, "unsupported command")
        except OSError as err:
            code = to_nbd_errno(err, req.flags)
            self.log.info("%s at %d+%d failed: %s", Cmd(req.cmd).name, req.offset, req.length, err)
            return ErrorReply(req.cookie, code, str(err.strerror or err))
        return SimpleReply(req.cookie)


class NBDServer:
    def __init__(
        self, exports: Mapping[str, Export], default_export: str, *, budget: int = DEFAULT_BUDGET
    ) -> None:
        self.exports = dict(exports)
        self.default_export = default_export
        self.budget = Budget(budget)
        self.servers: list[asyncio.Server] = []
        self._owned: list[Listener] = []  # bound by listen_*: closed (files removed) at shutdown
        self.connections: set[Connection] = set()
        self._idle = asyncio.Event()  # set while no connection is open
        self._idle.set()
        self.stopping = False
        self._ids = 0
        #: requests served on client connections (nbd/stats.py)
        self.stats = RequestStats()

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def _stream(self) -> Stream:
        return Stream(self)

    async def _run(self, conn: Connection) -> None:
        self.connections.add(conn)
        self._idle.clear()
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)
            if not self.connections:
                self._idle.set()

    def clients(self) -> int:
        """Client connections open (a worker's forwarding connection is none)."""
        return sum(1 for c in self.connections if c.stats is not None)

    async def serve_socket(self, sock: socket.socket, *, counted: bool = True) -> None:
        """Serve one already-accepted connection (handed over by the worker pool);
        counted=False: a worker's forwarding connection, left out of the request counts."""
        _transport, stream = await asyncio.get_running_loop().connect_accepted_socket(
            (lambda: Stream(self, counted=False)) if not counted else self._stream, sock)
        if stream.task is not None:
            await stream.task

    async def serve_listener(self, li: Listener) -> None:
        """Accept connections on a socket bound by sockets.bind_unix/bind_tcp."""
        loop = asyncio.get_running_loop()
        li.listen()
        if li.sock.family == socket.AF_UNIX:
            server = await loop.create_unix_server(self._stream, sock=li.sock)
        else:
            server = await loop.create_server(self._stream, sock=li.sock)
        self.servers.append(server)

    async def listen_unix(self, path: str) -> None:
        """Bind ``path`` (never over a live server) and serve it; removed at shutdown."""
        li = bind_unix(path)
        self._owned.append(li)
        await self.serve_listener(li)

    async def listen_tcp(self, host: str, port: int) -> None:
        for li in bind_tcp(host, port):
            self._owned.append(li)
            await self.serve_listener(li)

    async def shutdown(self, grace: float = 60.0) -> None:
        """Stop accepting and reading; let in-flight requests finish and reply.

        Requests still running after *grace* seconds (a child that never
        answers) are cancelled, so a stop never hangs for good.
        """
        self.stopping = True
        for s in self.servers:
            s.close()
        for conn in list(self.connections):
            if conn.read_task is not None:
                conn.read_task.cancel()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.error("shutdown: cancelling requests still running after %.0fs", grace)
            for conn in list(self.connections):
                for task in list(conn.tasks):
                    task.cancel()
            await self._idle.wait()
        for s in self.servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
        for li in self._owned:
            li.close()
        self._owned.clear()

