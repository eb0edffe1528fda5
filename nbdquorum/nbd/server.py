"""The asyncio glue around the sans-I/O NBD protocol (protocol.py).

Receive bytes straight into the protocol's buffers (a WRITE payload into
its own buffer: asyncio's BufferedProtocol, no intermediate copies), run
each request as its own task, write what the protocol returns.  Replies finish out of order, so a reply's header and
payload go out together under one send lock.

Bounds: each connection has at most `ClientLimits` requests, request bytes
and unsent reply bytes; at its bounds it parses no more requests and its
socket's reading pauses, so a client that stops reading its replies stops
being served and nobody else notices.  Request bytes are charged when the
header arrives (a WRITE's payload before its buffer exists) to the
connection and to the process's `Budget`, which is shared fairly.

TLS: when the protocol returns `StartTLS`, the read loop stops the socket's
reading before it awaits anything (so no TLS byte is read as plaintext),
writes the ACK and upgrades the transport in place (``loop.start_tls``, with
`Stream` staying the protocol: the TLS layer fills its buffers as the socket
did).  A handshake that fails or stalls (tls.HANDSHAKE_TIMEOUT) ends that
connection only.  A worker's forwarding connection never speaks TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from nbdquorum import native
from nbdquorum.block.node import BlockNode
from nbdquorum.buffers import SPARES
from nbdquorum.nbd.constants import (
    MAX_BLOCK,
    MAX_WRITE_PAYLOAD,
    Cmd,
    CmdFlag,
    NbdErrno,
    TransmissionFlag,
)
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
    StartTLS,
)
from nbdquorum.nbd.protocol import RECEIVE_SCRATCH, Phase, ServerConnection, TLSMode
from nbdquorum.nbd.stats import RequestStats, clock
from nbdquorum.nbd.tls import HANDSHAKE_TIMEOUT, TLSContexts
from nbdquorum.ratelimit import Burst
from nbdquorum.sockets import Listener, bind_tcp, bind_unix

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 20
#: reading pauses while this many received bytes wait to be parsed (back-pressure)
READ_HIGH = 128 << 10
#: replies at least this big are written buffer by buffer rather than joined
BIG_PAYLOAD = 64 << 10
#: READ/WRITE requests up to this size may be served without a task (_serve_now)
SYNC_MAX = 64 << 10
#: unsent reply bytes above which a worker's forwarding connection waits (it
#: has no ClientLimits: the worker bounds its own clients)
WRITE_HIGH = 4 << 20
#: default budget of request bytes in flight, of the whole server (split
#: between the processes when workers run)
DEFAULT_BUDGET = 64 << 20
#: a connection holding nothing may always start one request of this cost
#: (a 1 MiB read voted over 3 children), whatever the budget holds
BUDGET_FLOOR = 3 << 20
#: ClientLimits' defaults (QEMU's NBD server allows 16 requests per client)
DEFAULT_CLIENT_REQUESTS = 16
DEFAULT_CLIENT_BYTES = 16 << 20
DEFAULT_CLIENT_BACKLOG = 1 << 20
#: seconds a client has to finish the handshake (choose an export), as qemu-nbd's 10
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: client connections open at once over the whole server (the primary counts
#: those its workers serve); more are logged and closed
DEFAULT_MAX_CONNECTIONS = 1024
#: after the budget held this much and went idle, freed memory goes back to the
#: system (malloc_trim) this many seconds later
TRIM_AFTER = 8 << 20
TRIM_DELAY = 1.0


def _one_buffer() -> int:
    return 1


@dataclass
class Export:
    name: str  # export name on the wire
    node: BlockNode  # the node served
    description: str = ""
    read_only: bool = False
    #: how many request-sized buffers a read holds until it is answered, for
    #: the memory budget: set by whoever builds the export (for a quorum, one
    #: per voting child); the server asks the node nothing about its buffers
    read_buffers: Callable[[], int] = _one_buffer

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


@dataclass(frozen=True)
class ClientLimits:
    """What one client connection may hold (`serve --max-client-*`)."""

    #: requests parsed and not yet answered
    requests: int = DEFAULT_CLIENT_REQUESTS
    #: request bytes held: WRITE payloads from their header on, reads being served
    bytes: int = DEFAULT_CLIENT_BYTES
    #: reply bytes not yet taken by the client's socket; above it the
    #: client's requests wait (a client that stops reading stops being served)
    backlog: int = DEFAULT_CLIENT_BACKLOG
    #: seconds from connect to the export's choice; a slower client is dropped (0: never)
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT


#: lines about dropped clients (over the limit, handshake too slow): a flood of
#: them must not flood the log too (per kind, a burst a second; the rest counted)
_drop_lines = Burst()


def log_drop(kind: str, msg: str, *args: object) -> None:
    """Log one line about a client dropped by a limit, rate-limited per ``kind``."""
    held = _drop_lines.admit(kind)
    if held is None:
        return
    if held:
        msg += f" ({held} more such line(s) left out in the last second)"
    log.warning(msg, *args)


class Budget:
    """The bytes in flight of one process, shared fairly between its connections.

    Fair: while others wait for room, no connection is granted more than its
    share (the limit over the connections holding or waiting for room that
    would serve); when every waiter that fits is over its share, the one
    holding least goes first.  Waiters that fit are served past one that does not.

    Two holds last as long as a client wants: payloads still arriving, and
    replies the client does not read.  So payloads still arriving are counted
    apart (``receiving``), up to half the limit (one bigger payload may arrive
    alone), and join ``used`` once complete: trickling writers never take room
    from reads and complete requests.  And a connection holding nothing may
    always start one request of up to ``floor`` bytes, budget or not: clients
    that stall cannot lock out a newcomer.  A request bigger than the limit
    passes alone (nothing else used).  Hence, per process,
    ``used + receiving <= limit + max(limit / 2, largest payload) + connections * floor``.

    The uncontended path is a few comparisons and additions: no lock, no task switch.
    """

    def __init__(self, limit: int, floor: int = BUDGET_FLOOR) -> None:
        self.limit = limit
        self.floor = floor
        self.used = 0
        #: of which payloads still being received (client-paced)
        self.receiving = 0
        #: the most ever used at once (tests, the bench's notes)
        self.peak = 0
        #: bytes held by each owner holding any
        self.held: dict[object, int] = {}
        self._waiters: list[tuple[object, int, bool, asyncio.Future[None]]] = []
        self._trim_handle: asyncio.TimerHandle | None = None

    def share(self) -> int:
        """The fair share of one connection now."""
        owners = set(self.held)
        owners.update(o for o, n, r, _f in self._waiters if self._contends(o, n, r))
        return self.limit // max(1, len(owners))

    def _free_pass(self, owner: object, n: int, receiving: bool) -> bool:
        """The floor, or the lone oversized request."""
        if self.held.get(owner, 0):
            return False
        return n <= self.floor or (self.receiving if receiving else self.used) == 0

    def _fits(self, owner: object, n: int, receiving: bool) -> bool:
        if self._free_pass(owner, n, receiving):
            return True
        if receiving:
            return self.receiving + n <= self.limit // 2
        return self.used + n <= self.limit

    def _contends(self, owner: object, n: int, receiving: bool) -> bool:
        """A waiter that room in the budget would serve (not a payload waiting
        for the receive half): others keep to their shares meanwhile."""
        return not receiving

    def _grant(self, owner: object, n: int, receiving: bool) -> None:
        if receiving:
            self.receiving += n
        else:
            self.used += n
        self.held[owner] = self.held.get(owner, 0) + n
        self.peak = max(self.peak, self.used + self.receiving)

    def try_acquire(self, owner: object, n: int, receiving: bool = False) -> bool:
        """Take ``n`` bytes for ``owner`` if that is allowed now; ``receiving``:
        for a payload still arriving (see `received`)."""
        if not self._free_pass(owner, n, receiving):
            if not self._fits(owner, n, receiving):
                return False
            if (not receiving and self._waiters  # (share() only when someone waits)
                    and self.held.get(owner, 0) + n > self.share()
                    and any(o is not owner and self._contends(o, m, r)
                            for o, m, r, _f in self._waiters)):
                return False  # over its share while another waits for room
        self._grant(owner, n, receiving)
        return True

    async def acquire(self, owner: object, n: int, receiving: bool = False) -> None:
        if self.try_acquire(owner, n, receiving):
            return
        fut = asyncio.get_running_loop().create_future()
        entry = (owner, n, receiving, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(owner, n, receiving)  # granted, then cancelled: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self._wake()
            raise

    def received(self, n: int) -> None:
        """A payload charged as receiving arrived in full: it holds like any request now
        (even beyond the limit: the memory is there; others wait until it is back)."""
        self.receiving -= n
        self.used += n
        self._wake()

    def release(self, owner: object, n: int, receiving: bool = False) -> None:
        if n <= 0:
            return
        if receiving:
            self.receiving -= n
        else:
            self.used -= n
        left = self.held.get(owner, 0) - n
        if left > 0:
            self.held[owner] = left
        else:
            self.held.pop(owner, None)
        self._wake()
        if (self.used == 0 and self.receiving == 0 and self.peak >= TRIM_AFTER
                and self._trim_handle is None):
            # idle after holding much: give freed memory back to the system soon
            with contextlib.suppress(RuntimeError):  # (no loop: a unit test)
                self._trim_handle = asyncio.get_running_loop().call_later(TRIM_DELAY, self._trim)

    def _wake(self) -> None:
        while self._waiters:
            self._waiters = [e for e in self._waiters if not e[3].done()]
            fitting = [e for e in self._waiters if self._fits(e[0], e[1], e[2])]
            if not fitting:
                return
            share = self.share()
            entry = next((e for e in fitting
                          if e[2] or self._free_pass(e[0], e[1], e[2])
                          or self.held.get(e[0], 0) + e[1] <= share), None)
            if entry is None:  # all over their shares: who holds least goes first
                entry = min(fitting, key=lambda e: self.held.get(e[0], 0))
            self._waiters.remove(entry)
            self._grant(entry[0], entry[1], entry[2])
            entry[3].set_result(None)

    def _trim(self) -> None:
        self._trim_handle = None
        if self.used + self.receiving <= self.limit // 8:
            self.peak = self.used + self.receiving
            SPARES.prune()
            native.trim_malloc()


class Stream(asyncio.BufferedProtocol):
    """One client socket: receives into the protocol's buffers, writes like a StreamWriter.

    The connection's read loop awaits `wait_data`; reading pauses while more
    than READ_HIGH received bytes wait to be parsed (the loop is waiting for
    the byte budget or for the socket to drain) and resumes when it asks for
    more.  `drain` waits while the transport's write buffer is over its high
    mark, as StreamWriter.drain does.
    """

    def __init__(self, server: NBDServer, internal: bool = False) -> None:
        self.server = server
        #: a worker's forwarding connection, not a client: no ClientLimits, not counted
        self.internal = internal
        #: the connection runs over TLS (after STARTTLS)
        self.secure = False
        #: start_tls() has begun: data reaching this protocol comes through TLS
        self._upgrading = False
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
        #: counted in the server's open_clients (until connection_lost)
        self.counted = False
        self._ended = False  # the connection's task is over (`ended`)

    # -- protocol callbacks ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.server.stopping:
            self._ended = True  # no connection to run: let go once the socket is closed
            transport.close()
            return
        if not self.internal:
            if self.server.full():
                log_drop("max-connections", "%d client connections open (--max-connections): "
                         "closing a new one from %s", self.server.open_clients,
                         transport.get_extra_info("peername") or "unix")
                self._ended = True
                self.transport.abort()
                return
            self.server.open_clients += 1
            self.counted = True
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.conn = Connection(self.server, self,
                               None if self.internal else self.server.limits)
        self.task = self._loop.create_task(self.server._run(self.conn))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._upgrading and self.conn.proto.tls_pending:
            # Bytes through the TLS layer already: the handshake is done.  (asyncio
            # hands over what arrived with the handshake's last flight before
            # start_tls() returns to its caller; uvloop after.)
            self.conn.proto.tls_started()
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
        # keep the transport: replies to requests before EOF still go out
        # (over TLS the transport shuts down after an EOF whatever we answer)
        return not self.conn.proto.tls

    def connection_lost(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        if self.counted:
            self.counted = False
            self.server.open_clients -= 1
        self._error = exc
        if exc is None and hasattr(self, "conn"):
            self.conn.proto.receive_data(b"")  # a plain close is an EOF
        self._wake()
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        if not self._closed.done():
            self._closed.set_result(None)
        if self._ended:
            self._release()

    def ended(self) -> None:
        """The connection's task is over (its replies sent, its socket closed)."""
        self._ended = True
        if self._lost:
            self._release()

    def _release(self) -> None:
        """Connection over and socket closed: drop the references that close cycles,
        so that reference counting frees the connection now, not the cycle collector
        (which runs rarely here: runtime.run_loop).

        Over TLS that is some 300 KiB a connection (the TLS layer's 256 KiB read
        buffer, OpenSSL's state): a few hundred short connections held that way
        are a hundred MiB.  The cycles: this protocol <-> its `Connection`; this
        protocol -> the TLS transport -> its SSLProtocol -> our bound get_buffer
        and buffer_updated (asyncio's and uvloop's TLS layers keep them after
        connection_lost); the error raised by `wait_data` -> its traceback -> the
        frame of this protocol's method.
        """
        self.__dict__.pop("transport", None)
        self.__dict__.pop("conn", None)
        self._error = None

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

    # -- TLS ------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        """Stop reading from the socket now (STARTTLS: the next bytes are TLS's)."""
        self._read_paused = True
        self.transport.pause_reading()

    async def start_tls(self, context: ssl.SSLContext) -> None:
        """Run the server side of a TLS handshake on this socket; from then on this
        protocol reads and writes through TLS.  Raises OSError (ssl.SSLError,
        ConnectionError) when the handshake fails or times out."""
        self._upgrading = True  # what this protocol receives from now on is decrypted
        try:
            tls = await self._loop.start_tls(self.transport, self, context, server_side=True,
                                             ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except BaseException as err:
            # asyncio's start_tls() frame is in the error's traceback and holds the
            # future that holds the error: a cycle that would keep the connection
            # (and its TLS layer) for the collector.  Its frames tell nothing anyway.
            err.__traceback__ = None
            if not self._lost:  # the TLS layer never started: nobody else tells us
                self.connection_lost(err if isinstance(err, Exception) else None)
            raise
        if tls is None or tls.get_extra_info("cipher") is None:
            # The socket closed before the handshake finished (the handshake timeout
            # aborted it, the client left): the loop's start_tls() returns then, as
            # if done, and the TLS layer never tells this protocol it was lost.
            if not self._lost:
                self.connection_lost(None)
            raise ConnectionResetError("connection closed during the TLS handshake")
        self.transport = tls
        self.secure = True
        self._read_paused = False  # start_tls resumed the socket's reading
        self._write_paused = False

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


def _conn_logger(number: int) -> logging.Logger:
    """``nbdquorum.nbd.server.connN``, as log.getChild() names it, but not kept
    in the logging module's table of loggers, which never forgets one: a
    logger per connection ever made would never be freed."""
    child = logging.Logger(f"{log.name}.conn{number}")
    child.parent = log
    return child


class Connection:
    def __init__(self, server: NBDServer, stream: Stream,
                 limits: ClientLimits | None = None) -> None:
        self.server = server
        self.stream = stream
        #: None: unbounded (a worker's forwarding connection)
        self.limits = limits
        #: the loop, kept: asking asyncio for it costs a getpid() system call on
        #: Python 3.11, several per request otherwise
        self._loop = asyncio.get_running_loop()
        #: reply bytes not yet sent above which requests wait
        self.backlog = limits.backlog if limits is not None else WRITE_HIGH
        self.inflight = 0  # requests admitted and not yet answered
        self.held = 0  # bytes charged to this connection (and to the budget)
        #: charged for the request peeked at, until next_event() returns it
        #: (a WRITE stays here while its payload arrives)
        self._ahead: int | None = None
        self._receiving = False  # ... charged as a payload still arriving
        self._room: asyncio.Future[None] | None = None  # a request finished
        peer = stream.get_extra_info("peername") or "unix"
        self.id = server.next_id()
        self.log = _conn_logger(self.id)
        #: dropped by the handshake timeout
        self.expired = False
        self.log.debug("connected from %s", peer)
        tls = server.tls.mode if server.tls is not None and not stream.internal else TLSMode.OFF
        self.proto = ServerConnection(
            {name: e.info() for name, e in server.exports.items()}, server.default_export, tls,
            scratch=server.scratch,
        )
        self.export: Export | None = None
        self.send_lock = asyncio.Lock()  # serialises drain() on back-pressure
        self._out: list[bytes | memoryview] = []  # reply buffers not yet written
        self._out_bytes = 0
        self._flush_scheduled = False
        self.tasks: set[asyncio.Task[None]] = set()
        #: requests started on the node's soon path (_serve_soon), not yet answered
        self.soon = 0
        #: set when ``soon`` falls to zero, while the connection's end waits for that
        self._soon_idle: asyncio.Event | None = None
        self.read_task: asyncio.Task[Any] | None = None
        #: an event (or error) serve_inline() took but left to the read loop
        self._held: object = None
        #: where served requests are counted (None: not a client's connection)
        self.stats: RequestStats | None = None if stream.internal else server.stats

    async def run(self) -> None:
        # The read loop is its own task so that shutdown can stop reading
        # without cancelling the replies and the close below.
        self.stream.write(self.proto.initial_bytes())
        self.read_task = self._loop.create_task(self._read_loop())
        timeout = self.limits.handshake_timeout if self.limits is not None else 0
        timer = (self._loop.call_later(timeout, self._handshake_expired)
                 if timeout > 0 else None)
        try:
            await asyncio.shield(self.read_task)
        except asyncio.CancelledError:
            self.read_task.cancel()
            if not self.server.stopping:
                raise
        except RemoteProtocolError as err:
            if not self.expired:
                self.log.warning("protocol error from client: %s", err)
            self._flush_handshake()
        except (ConnectionError, OSError) as err:
            self.log.debug("connection lost: %s", err)
        finally:
            if timer is not None:
                timer.cancel()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            if self.soon:  # each is bounded (the quorum's child timeout)
                self._soon_idle = asyncio.Event()
                await self._soon_idle.wait()
            if self._ahead is not None:  # a payload that never arrived in full
                self._finish(self._ahead, receiving=self._receiving)
                self._ahead = None
            with contextlib.suppress(Exception):
                self._flush_out()  # replies queued in this loop iteration
                self._flush_handshake()
                await self.stream.drain()
            self.stream.close()
            with contextlib.suppress(Exception):
                await self.stream.wait_closed()
            self.log.debug("closed")

    def _handshake_expired(self) -> None:
        """The handshake timeout: a client still negotiating is dropped."""
        if self.proto.phase is Phase.HANDSHAKE and not self.stream.is_closing():
            self.expired = True
            log_drop("handshake-timeout", "conn%s: handshake not finished within %gs "
                     "(--handshake-timeout): dropping the connection from %s",
                     self.id,
                     self.limits.handshake_timeout if self.limits is not None else 0,
                     self.stream.get_extra_info("peername") or "unix")
            self.stream.transport.abort()

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
                or self._ahead is not None
                or self.stream.get_write_buffer_size() > self.backlog):
            return False
        while True:
            peek = self.proto.peek_request()
            if peek is not None and not _small(*peek):
                return False  # the read loop admits it first
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
            if self.stream.get_write_buffer_size() > self.backlog:
                return False  # the loop drains the socket first

    # -- admission: the connection's bounds and the budget ----------------------------------
    def _cost(self, cmd: int, length: int) -> int:
        """The bytes a request holds: a read one buffer per child until the vote."""
        if cmd == Cmd.READ and self.export is not None and length <= MAX_BLOCK:
            return length * self.export.read_buffers()  # (longer: EINVAL, unread)
        return length if cmd == Cmd.WRITE and length <= MAX_WRITE_PAYLOAD else 0

    def _admit_now(self, cost: int, receiving: bool = False) -> bool:
        lim = self.limits
        if lim is not None and (self.inflight >= lim.requests
                                or (self.held and self.held + cost > lim.bytes)):
            return False
        if self.stream.get_write_buffer_size() > self.backlog:
            return False
        if cost and not self.server.budget.try_acquire(self, cost, receiving):
            return False
        self.inflight += 1
        self.held += cost
        return True

    async def _admit(self, cost: int, receiving: bool = False) -> None:
        """Wait until the connection's bounds and the budget allow ``cost`` more."""
        lim = self.limits
        while not self._admit_now(cost, receiving):
            if self.stream.get_write_buffer_size() > self.backlog:
                self._flush_out()
                await self.stream.drain()
            elif lim is not None and (self.inflight >= lim.requests
                                      or (self.held and self.held + cost > lim.bytes)):
                self._room = self._loop.create_future()
                try:
                    await self._room
                finally:
                    self._room = None
            else:
                await self.server.budget.acquire(self, cost, receiving)
                self.inflight += 1
                self.held += cost
                return

    def _finish(self, cost: int, request: bool = True, receiving: bool = False) -> None:
        """Give back ``cost`` bytes (and with ``request``, the request's place)."""
        if cost:
            self.held -= cost
            self.server.budget.release(self, cost, receiving)
        if request:
            self.inflight -= 1
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def _read_loop(self) -> None:
        while True:
            if self._held is not None:
                ev, self._held = self._held, None
                if isinstance(ev, BaseException):
                    try:
                        raise ev
                    finally:
                        ev = None  # this frame is in its traceback: no cycle
            else:
                if self._ahead is None and self.export is not None:
                    peek = self.proto.peek_request()
                    if peek is not None and not _small(*peek):
                        # charged before next_event() allocates a WRITE's payload
                        need = self._cost(peek[0], peek[1])
                        receiving = not peek[2]  # a payload to come: client-paced
                        if not self._admit_now(need, receiving):
                            await self._admit(need, receiving)
                        self._ahead, self._receiving = need, receiving
                ev = self.proto.next_event()
            self._flush_handshake()
            if ev is NEED_DATA:
                # Everything received is handled: send the replies now rather
                # than one loop iteration later (QD1 latency), and wait for the
                # socket only when it is backed up.
                if self._out:
                    self._flush_out()
                if self.stream.get_write_buffer_size() > self.backlog:
                    await self.stream.drain()
                await self.stream.wait_data()  # the bytes are in the protocol already
                continue
            if isinstance(ev, ExportChosen):
                self.export = self.server.exports[ev.name]
                self.log.debug("export %r chosen", ev.name)
            elif isinstance(ev, Request):
                ahead, self._ahead = self._ahead, None
                if ahead is not None and self._receiving:
                    self._receiving = False
                    self.server.budget.received(ahead)
                if ahead is None:
                    if self._serve_now(ev):
                        if self.stream.get_write_buffer_size() > self.backlog:
                            await self.stream.drain()
                        continue
                    ahead = self._cost(ev.cmd, ev.length)
                    if not self._admit_now(ahead):
                        await self._admit(ahead)
                if self._serve_soon(ev, ahead):
                    continue
                task = self._loop.create_task(self._serve(ev, ahead))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif isinstance(ev, StartTLS):
                await self._start_tls()
            elif isinstance(ev, Disconnect):
                self.log.debug("client disconnected")
                return

    async def _start_tls(self) -> None:
        """The client asked for TLS and its ACK is written: upgrade the socket."""
        # Before any await: the socket's next bytes are the ClientHello, which
        # must reach the TLS layer, never the plaintext buffer.
        self.stream.pause_reading()
        tls = self.server.tls
        assert tls is not None and tls.context is not None
        try:
            await self.stream.start_tls(tls.context)
        except (TimeoutError, OSError) as err:
            what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            self.log.warning("TLS handshake failed: %s", what)
            raise ConnectionAbortedError(f"TLS handshake failed: {what}") from err
        why = tls.check_peer(self.stream.get_extra_info("peercert"))
        if why is not None:
            self.log.warning("TLS client refused: %s", why)
            raise ConnectionRefusedError(why)
        if self.proto.tls_pending:  # not already (see Stream.get_buffer)
            self.proto.tls_started()
        cipher = self.stream.get_extra_info("cipher")
        self.log.debug("TLS up: %s", cipher[1] if cipher else "?")

    async def _send(self, reply: object) -> None:
        """Queue a reply; replies finished in the same loop iteration leave together.

        A reply's buffers are queued at once, so replies never interleave on
        the wire; one writelines() per loop iteration replaces one send per
        reply (the biggest cost of small requests after the thread hop).
        Back-pressure: a sender waits while the socket's buffer is full.
        """
        self._queue(reply)
        if self.stream.get_write_buffer_size() > self.backlog:
            async with self.send_lock:  # one drainer at a time
                await self.stream.drain()

    def _queue(self, reply: object) -> None:
        iov = self.proto.send(reply)  # type: ignore[arg-type]
        self._out.extend(iov)
        for b in iov:
            self._out_bytes += len(b)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_out)
        if self._out_bytes >= BIG_PAYLOAD:
            self._flush_out()

    def _flush_out(self) -> None:
        self._flush_scheduled = False
        out, self._out, self._out_bytes = self._out, [], 0
        if not out or self.stream.is_closing():
            return
        if self.stream.secure:
            # Over TLS every write() is encrypted on its own (a record or more):
            # one write of everything ready costs one copy and saves a record and
            # a pass through the TLS layer per reply header.
            self.stream.write(b"".join(out) if len(out) > 1 else out[0])
        elif len(out) > 1 and any(len(b) >= BIG_PAYLOAD for b in out):
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
            now = self.export.node.direct()
            data = None if now is None else now.try_pread(req.offset, req.length)
            if data is None:
                return False
            self._queue(ReadReply(req.cookie, [DataChunk(req.offset, data)]))
            if self.stats is not None:
                self.stats.record(req.cmd, t0)
            return True
        if req.cmd == Cmd.WRITE and not req.flags:
            if req.length > SYNC_MAX or self.export is None:
                return False
            now = self.export.node.direct()
            if now is None or not now.writes_now or self.proto.validate(req):
                return False  # (a node that never writes now: straight to the soon path)
            try:
                if not now.try_pwrite(req.offset, req.data):
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

    def _serve_soon(self, req: Request, cost: int) -> bool:
        """Start a small READ or WRITE on the node's soon path (no task: its
        outcome comes to a callback, which queues the reply); False sends it
        down the full path."""
        read = req.cmd == Cmd.READ
        if not (read or (req.cmd == Cmd.WRITE and not req.flags)):
            return False
        if req.length > SYNC_MAX or self.export is None or self.proto.validate(req):
            return False
        d = self.export.node.direct()
        if d is None:
            return False
        then = functools.partial(self._soon_done, req, cost, clock())
        if not (d.call_pread(req.offset, req.length, then) if read
                else d.call_pwrite(req.offset, req.data, then)):
            return False
        self.soon += 1
        return True

    def _soon_done(self, req: Request, cost: int, t0: int, result: Any,
                   err: BaseException | None) -> None:
        try:
            reply: object
            if err is None:
                if req.cmd == Cmd.READ:
                    reply = ReadReply(req.cookie, [DataChunk(req.offset, result)])
                    if cost > req.length:  # voted: the reply holds one buffer
                        self._finish(cost - req.length, request=False)
                        cost = req.length
                else:
                    reply = SimpleReply(req.cookie)
            elif isinstance(err, OSError):
                self.log.info("%s at %d+%d failed: %s", Cmd(req.cmd).name, req.offset,
                              req.length, err)
                reply = ErrorReply(req.cookie, to_nbd_errno(err, req.flags),
                                   str(err.strerror or err))
            else:
                self.log.error("internal error serving %s: %r", req, err)
                reply = ErrorReply(req.cookie, NbdErrno.EIO, "internal server error")
            self._queue(reply)
        except Exception:
            self.log.exception("internal error answering %s", req)
        finally:
            self._finish(cost)
            if self.stats is not None:
                self.stats.record(req.cmd, t0)
            self.soon -= 1
            if not self.soon and self._soon_idle is not None:
                self._soon_idle.set()

    async def _serve(self, req: Request, cost: int) -> None:
        t0 = clock()
        try:
            reply = await self._dispatch(req)
            if cost > req.length and isinstance(reply, ReadReply):
                # voted: the other children's buffers are free, the reply holds one
                self._finish(cost - req.length, request=False)
                cost = req.length
            # held until the reply is in the socket or the backlog is under its
            # bound: a client that does not read keeps its charge, not more
            await self._send(reply)
        except (ConnectionError, OSError) as err:
            self.log.debug("reply to %d not sent: %s", req.cookie, err)
        except Exception:
            self.log.exception("internal error serving %s", req)
            with contextlib.suppress(Exception):
                await self._send(ErrorReply(req.cookie, NbdErrno.EIO, "internal server error"))
        finally:
            self._finish(cost)
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
        self, exports: Mapping[str, Export], default_export: str, *, budget: int = DEFAULT_BUDGET,
        limits: ClientLimits | None = None, tls: TLSContexts | None = None,
        max_connections: int | None = None,
    ) -> None:
        self.exports = dict(exports)
        #: TLS for client connections (None: off); `TLSContexts.reload` on SIGHUP
        self.tls = tls
        self.default_export = default_export
        #: client connections accepted here at once (None: no limit; the worker
        #: pool counts those placed on workers, see `WorkerPool.place`)
        self.max_connections = max_connections
        #: client connections open (a worker's forwarding connection is none)
        self.open_clients = 0
        #: the receive buffer of every connection between WRITE payloads: the
        #: event loop fills it and the protocol copies what arrived before the next
        #: read, so one is enough and an idle connection holds none
        self.scratch = bytearray(RECEIVE_SCRATCH)
        #: this process's share of the server's memory budget
        self.budget = Budget(budget)
        self.limits = limits or ClientLimits()
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

    def full(self) -> bool:
        """No room for another client connection (--max-connections)."""
        return self.max_connections is not None and self.open_clients >= self.max_connections

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
            # the read task's error holds frames of the connection (a cycle)
            conn.read_task = None
            conn.stream.ended()

    def clients(self) -> int:
        """Client connections open (a worker's forwarding connection is none)."""
        return sum(1 for c in self.connections if c.stats is not None)

    async def serve_socket(self, sock: socket.socket, *, internal: bool = False) -> None:
        """Serve one already-accepted connection (handed over by the worker pool);
        ``internal``: a worker's forwarding connection: not a client (no
        ClientLimits, left out of the request counts)."""
        _transport, stream = await asyncio.get_running_loop().connect_accepted_socket(
            functools.partial(Stream, self, internal), sock)
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
            if conn.proto.phase is Phase.HANDSHAKE:
                # nothing in flight: a client still negotiating (or stuck in its TLS
                # handshake) is dropped now, not waited for
                conn.stream.transport.abort()
                if not conn.stream._lost:
                    conn.stream.connection_lost(None)
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


def _small(cmd: int, length: int, complete: bool) -> bool:
    """A request the synchronous paths may take without charging it first."""
    return complete and length <= SYNC_MAX and cmd in (Cmd.READ, Cmd.WRITE)
