"""The asyncio glue of the QMP monitor: a Unix socket, clients, and events.

Each client is one task: read, feed its sans-I/O ServerConnection, run each
command to completion in order (as QEMU's in-band monitor does), write the
reply.  Writes are synchronous calls into the transport, so a reply or event
always goes out whole and needs no lock; a client whose unread output passes
``MAX_UNSENT`` is disconnected instead of growing memory without bound.

Events come from the block layer's bus, go through one server-wide throttle
(throttle.py: QEMU's one-a-second rule for the quorum events) and then to
every client that has completed capabilities negotiation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from nbdquorum import __version__
from nbdquorum.block.graph import Graph
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.qmp.check import check_event
from nbdquorum.qmp.commands import Context, dispatch, version_triple
from nbdquorum.qmp.errors import ErrorClass, LocalProtocolError, QMPError
from nbdquorum.qmp.events import wired
from nbdquorum.qmp.protocol import (
    NEED_DATA,
    NO_ID,
    BadRequest,
    ConnectionClosed,
    Execute,
    Message,
    ParseError,
    ServerConnection,
    error_message,
    event_message,
    greeting,
)
from nbdquorum.qmp.schema import EVENTS
from nbdquorum.qmp.throttle import DEFAULT_PERIODS, EventThrottle
from nbdquorum.sockets import Listener, bind_unix

if TYPE_CHECKING:
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.jobs.resync import ResyncManager

log = logging.getLogger(__name__)

READ_SIZE: Final = 64 << 10
#: a client that leaves this much output unread is disconnected
MAX_UNSENT: Final = 16 << 20


class _Client:
    """One monitor connection."""

    def __init__(self, number: int, conn: ServerConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer
        # not log.getChild(): the logging module keeps every logger it names forever
        self.log = logging.Logger(f"{log.name}.client{number}")
        self.log.parent = log
        self.quit_requested = False

    def write(self, data: bytes) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_UNSENT:
            self.log.warning("client does not read its output; disconnecting")
            self.writer.transport.abort()

    def send(self, message: Message) -> None:
        try:
            data = self.conn.send(message)
        except LocalProtocolError as err:  # an unserializable reply: a bug, not the client's
            self.log.exception("cannot send %r", message)
            data = self.conn.send(error_message(ErrorClass.GENERIC_ERROR, f"Internal error: {err}",
                                                message.get("id", NO_ID)))
        self.write(data)


class QMPServer:
    def __init__(self, graph: Graph, bus: EventBus, *,
                 throttle: EventThrottle | None = None) -> None:
        self.graph = graph
        self.bus = bus
        #: called (once) after the reply to ``quit`` has been written
        self.on_quit: Callable[[], None] | None = None
        self.path: str | None = None
        #: background jobs and the resync manager, for the job commands (set by cli.serve)
        self.jobs: JobManager | None = None
        self.resync: ResyncManager | None = None
        self._throttle = throttle or EventThrottle(DEFAULT_PERIODS)
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        # (uvloop's call_at gives a plain Handle, without when(), for a deadline that
        # is due: the deadline armed is kept here)
        self._timer: asyncio.Handle | None = None
        self._timer_at: float | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._listener: Listener | None = None
        self._numbers = itertools.count(1)
        major, minor, micro = version_triple()
        self._greeting = greeting(major, minor, micro, f"nbdquorum {__version__}")

    # ----- life cycle

    async def listen_unix(self, path: str) -> None:
        """Listen on ``path``, a socket of mode 0600 (a stale socket there is replaced).

        Raises:
            OSError: the path is in use by a live server, or is not a socket.
        """
        await self.serve_listener(bind_unix(path, mode=0o600))

    async def serve_listener(self, li: Listener) -> None:
        """Serve a Unix socket bound by sockets.bind_unix; its file goes at shutdown."""
        self._start()
        try:
            li.listen()
            self._server = await asyncio.start_unix_server(self._accept, sock=li.sock)
        except BaseException:
            li.close()
            raise
        self._listener = li
        self.path = li.path
        log.info("QMP monitor listening on %s", li.path)

    async def serve_connection(self, reader: asyncio.StreamReader,
                               writer: asyncio.StreamWriter) -> None:
        """Serve one already-connected client (tests use socketpairs)."""
        self._start()
        await self._accept(reader, writer)

    def _start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._unsubscribe = self.bus.subscribe(wired(self._on_bus_event))

    async def shutdown(self) -> None:
        """Stop listening, disconnect every client, remove the socket."""
        if self._server is not None:
            self._server.close()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        held = self._throttle.pending()
        if held:
            log.info("dropping %d throttled event(s) at shutdown", len(held))
        for client in list(self._clients):
            client.writer.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._remove_socket()

    def _remove_socket(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def clients(self) -> int:
        return len(self._clients)

    # ----- clients

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = _Client(next(self._numbers), ServerConnection(self._greeting), writer)
        self._clients.add(client)
        client.log.debug("connected")
        try:
            await self._serve(client, reader)
        except (ConnectionError, OSError) as err:
            client.log.debug("connection lost: %s", err)
        except asyncio.CancelledError:
            # shutdown gave up on a command still running: the task ends quietly, not
            # cancelled (Python 3.11's stream callback reports a cancelled client task
            # as an exception, with a traceback in the log)
            client.log.debug("command cancelled at shutdown")
        finally:
            self._clients.discard(client)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()
            client.log.debug("disconnected")
        if client.quit_requested:  # the client hung up before its reply went out
            self._quit()

    async def _serve(self, client: _Client, reader: asyncio.StreamReader) -> None:
        conn = client.conn
        client.write(conn.initial_bytes())

        def request_quit() -> None:
            client.quit_requested = True

        ctx = Context(self.graph, conn, request_quit, jobs=self.jobs, resync=self.resync)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                conn.receive_data(await reader.read(READ_SIZE))
                continue
            if isinstance(ev, ConnectionClosed):
                return
            if isinstance(ev, ParseError):
                client.log.debug("parse error: %s", ev.desc)
                client.send(error_message(ErrorClass.GENERIC_ERROR, ev.desc))
            elif isinstance(ev, BadRequest):
                client.log.debug("bad request: %s", ev.desc)
                client.send(error_message(ErrorClass.GENERIC_ERROR, ev.desc, ev.id))
            elif isinstance(ev, Execute):
                client.log.debug("execute %s %s", ev.name, ev.arguments)
                reply = await dispatch(ctx, ev)
                if "error" in reply:
                    client.log.info("%s failed: %s", ev.name, reply["error"]["desc"])
                client.send(reply)
            if client.writer.is_closing():
                return
            await client.writer.drain()
            if client.quit_requested:
                client.quit_requested = False
                self._quit()

    def _quit(self) -> None:
        log.info("quit requested over QMP")
        if self.on_quit is not None:
            self.on_quit()

    # ----- events

    def _on_bus_event(self, ev: Event) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._offer, ev)
        else:
            self._offer(ev)

    def _offer(self, ev: Event) -> None:
        if ev.name in EVENTS:
            try:
                check_event(ev.name, ev.data)
            except QMPError as err:
                log.warning("event %s does not match the schema: %s", ev.name, err.desc)
        assert self._loop is not None
        for out in self._throttle.push(ev, self._loop.time()):
            self._broadcast(out)
        self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        deadline = self._throttle.next_deadline()
        if self._timer is not None:
            if deadline is not None and self._timer_at == deadline:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._fire)
            self._timer_at = deadline

    def _fire(self) -> None:
        assert self._loop is not None
        self._timer = None
        for out in self._throttle.due(self._loop.time()):
            self._broadcast(out)
        self._arm()

    def _broadcast(self, ev: Event) -> None:
        try:
            data = bytes(event_message(ev.name, ev.data, ev.timestamp))
        except LocalProtocolError:
            log.exception("event %s cannot be serialized", ev.name)
            return
        for client in list(self._clients):
            if client.conn.negotiated:
                client.write(data)

