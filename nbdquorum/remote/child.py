"""The ``nbd`` driver: a quorum child served by an NBD server on another host.

QEMU's block/nbd.c in spirit: one connection to a remote export (qemu-nbd,
nbdkit, nbd-server, another nbdquorum), its requests multiplexed by cookie.
It is one more kind of child for the quorum: Voted I/O awaits it alongside
the local files.

Life of the link:

* ``open()`` connects once (``open_timeout`` > 0: keeps trying that long), within
  ``timeout`` per attempt; the export must have the quorum's size and be writable.
* Connection lost (reset, EOF, a request past ``timeout``): for the first
  ``reconnect_delay`` seconds requests wait and are sent again once the link
  is back (QEMU's reconnect-delay); after that they fail at once and
  ``health()`` says ``Unreachable``, which takes the child out of the quorum's
  I/O until it returns.  Reconnection goes on in the background with backoff.
* A silent link (packets vanish) is noticed through TCP keepalive and
  TCP_USER_TIMEOUT without any I/O, and through the request timeout with it.
* ``close()`` never waits on a dead link.

What the export can do is respected so that children stay identical: TRIM is
advisory in NBD (qemu-nbd drops it by default), so a trim goes out as
WRITE_ZEROES; FUA without the server's support is a write and a flush; a
refused fast zero is retried as a plain one, never an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from nbdquorum.block.node import (
    BlockNode,
    Buffer,
    Caps,
    Direct,
    Extent,
    Then,
    Unreachable,
    oserror,
    settler,
    tell,
)
from nbdquorum.nbd.client import NBDClient, NBDClientError
from nbdquorum.nbd.constants import Cmd, CmdFlag, TransmissionFlag
from nbdquorum.nbd.tls import client_context
from nbdquorum.remote.uri import NBDAddress

log = logging.getLogger(__name__)

T = TypeVar("T")

#: requests bigger than the server's maximum (or this) are split
MAX_REQUEST = 32 << 20
#: zeroes written as data when the server has no WRITE_ZEROES, per request
ZERO_CHUNK = 1 << 20
#: reconnection attempts back off from this to RECONNECT_MAX seconds
RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0
#: TCP keepalive: probe after this many idle seconds, then every KEEPINTVL
KEEPIDLE = 5
KEEPINTVL = 2
KEEPCNT = 3


class NBDChild(BlockNode):
    driver = "nbd"

    def __init__(
        self, node_name: str, address: NBDAddress, *, timeout: float = 30.0,
        reconnect_delay: float = 0.0, open_timeout: float = 0.0, size: int | None = None,
        read_only: bool = False,
        connector: Callable[[NBDAddress, float], Awaitable[NBDClient]] | None = None,
    ) -> None:
        super().__init__(node_name, read_only=read_only)
        self.address = address
        #: seconds a request (or one connection attempt) may take
        self.timeout = timeout
        #: seconds requests wait for a lost link to come back (QEMU's reconnect-delay)
        self.reconnect_delay = reconnect_delay
        #: seconds open() keeps trying to connect (QEMU's open-timeout; 0: once)
        self.open_timeout = open_timeout
        self._size = size  # known before the first connection when restored
        self._connector = connector or connect
        self._client: NBDClient | None = None
        self._flags = 0
        self._max_request = MAX_REQUEST
        self._status_ok = False
        self._connected = asyncio.Event()
        self._lost_at: float | None = None  # monotonic time the link went down
        self._why = "not connected yet"
        self._broken: str | None = None  # the export itself is unusable (not the link)
        self._reconnector: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._closed = False
        #: connections made (the first and every reconnection), for status and tests
        self.connects = 0
        self._soon = _Soon(self)

    # -- the link -------------------------------------------------------------------------
    async def open(self) -> None:
        """Connect the first time (blockdev-add, the command line).

        Raises:
            OSError: naming the address: refused, timed out, wrong size, read-only.
        """
        deadline = time.monotonic() + self.open_timeout
        while True:
            try:
                await self._connect_once()
                return
            except OSError as err:
                if self._broken is not None or time.monotonic() >= deadline:
                    raise OSError(err.errno or errno.EIO,
                                  f"{self.address}: {err.strerror or err}") from err
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))

    def start_offline(self, why: str) -> None:
        """Begin unconnected (the far end is down at start-up); reconnect in the background."""
        prefix = f"{self.address}: "
        self._lost(why[len(prefix):] if why.startswith(prefix) else why)  # (named once)

    async def _connect_once(self) -> None:
        try:
            client = await asyncio.wait_for(self._connector(self.address, self.timeout),
                                            self.timeout)
        except TimeoutError:
            raise oserror(errno.ETIMEDOUT, "connection timed out") from None
        except NBDClientError as err:
            raise OSError(errno.EPROTO, str(err)) from err
        info = client.info
        problem = None
        if self._size is not None and info.size != self._size:
            problem = f"the export has {info.size} bytes, the quorum {self._size}"
        elif info.flags & TransmissionFlag.READ_ONLY and not self.read_only:
            problem = "the export is read-only"
        if problem is not None:
            self._broken = f"{self.address}: {problem}"
            await client.abort()
            raise OSError(errno.EINVAL, problem)
        self._size = info.size
        self._flags = int(info.flags)
        self._max_request = min(MAX_REQUEST, info.max_block or MAX_REQUEST)
        self._status_ok = info.base_allocation
        self._client = client
        self._broken = None
        self._lost_at = None
        self.connects += 1
        self._connected.set()
        if self._watcher is not None:
            self._watcher.cancel()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(client))
        if self.connects > 1:
            log.warning("child %s: connected again to %s", self.node_name, self.address)

    async def _watch(self, client: NBDClient) -> None:
        """Notice the connection's end (reset, EOF, a broken reply) without I/O."""
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(client.closed)
        if self._client is client and not self._closed:
            self._lost(f"connection lost: {client.lost_reason or 'closed'}")

    def _lost(self, why: str) -> None:
        client, self._client = self._client, None
        self._connected.clear()
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        self._why = why
        if client is not None:
            log.error("child %s: %s (%s)", self.node_name, why, self.address)
            client.abort_now()
        if not self._closed and (self._reconnector is None or self._reconnector.done()):
            self._reconnector = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = RECONNECT_MIN
        while not self._closed and self._client is None:
            try:
                await self._connect_once()
                return
            except OSError as err:
                self._why = f"reconnecting: {err.strerror or err}"
                log.debug("child %s: %s", self.node_name, self._why)
            await asyncio.sleep(delay)
            delay = min(RECONNECT_MAX, delay * 2)

    def _waiting_window(self) -> float:
        """Seconds a request may still wait for the link (reconnect-delay)."""
        if self._lost_at is None:
            return 0.0
        return max(0.0, self._lost_at + self.reconnect_delay - time.monotonic())

    async def _ready(self) -> NBDClient:
        client = self._client
        if client is not None:
            return client
        if self._closed:
            raise oserror(errno.ESHUTDOWN, f"{self.node_name} is closed")
        wait = self._waiting_window()
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), wait)
            if self._client is not None:
                return self._client
        raise oserror(errno.ENOTCONN, f"{self.address}: {self._why}")

    async def _call(self, cmd: Cmd, offset: int = 0, length: int = 0, flags: int = 0,
                    data: Buffer | None = None) -> object:
        while True:
            client = await self._ready()
            t0 = time.monotonic()
            try:
                return await client.call(cmd, offset, length, flags, data,
                                         limit=self.timeout)
            except TimeoutError:
                self._lost(f"a request took longer than {self.timeout:g}s")
                raise oserror(errno.ETIMEDOUT, f"{self.address}: no answer") from None
            except asyncio.CancelledError:
                # the quorum's own child timeout fired first: the link is as dead
                if time.monotonic() - t0 >= self.timeout * 0.99:
                    self._lost(f"a request took longer than {self.timeout:g}s")
                raise
            except ConnectionError as err:  # the connection ended under the request
                if self._client is client:
                    self._lost(f"connection lost: {err}")
                if self._waiting_window() <= 0:
                    raise _lost_error(self.address, err) from err
                # within reconnect-delay: sent again once the link is back

    def _submit(self, cmd: Cmd, offset: int, length: int, flags: int = 0,
                data: Buffer | None = None) -> asyncio.Future[Any] | None:
        """The task-free form of ``_call`` for the quorum's soon path: the request
        goes out now and the future returned gives its result or OSError, with
        ``_call``'s failure handling; None (take ``_call``) when not connected or
        the request needs splitting."""
        client = self._client
        if client is None:
            return None
        out: asyncio.Future[Any] = client._loop.create_future()
        return out if self._send(cmd, offset, length, flags, data, settler(out)) else None

    def _takes(self, length: int) -> bool:
        """Connected, and the request needs no splitting."""
        return self._client is not None and length <= self._max_request

    def _send(self, cmd: Cmd, offset: int, length: int, flags: int, data: Buffer | None,
              then: Then) -> bool:
        """``_submit`` with a callback: the request goes out now and ``then(result,
        error)`` is called once, later (an OSError as ``_call`` raises it); False
        (nothing sent) when not connected or the request needs splitting."""
        if not self._takes(length):
            return False
        client = self._client
        assert client is not None
        loop = client._loop

        def told(result: object, err: BaseException | None) -> None:
            then(None if err is not None else _as_result(cmd, length, result), err)

        def settle(result: object, err: BaseException | None) -> None:
            if err is None:
                then(_as_result(cmd, length, result), None)
            elif isinstance(err, TimeoutError):
                # also when the quorum gave up first (its own child timeout cancels):
                # past this child's time limit the link is as dead
                if self._client is client:
                    self._lost(f"a request took longer than {self.timeout:g}s")
                then(None, oserror(errno.ETIMEDOUT, f"{self.address}: no answer"))
            elif isinstance(err, ConnectionError):
                if self._client is client:
                    self._lost(f"connection lost: {err}")
                if self._waiting_window() <= 0:
                    then(None, _lost_error(self.address, err))
                    return
                # within reconnect-delay: sent again once the link is back
                again = loop.create_task(self._call(cmd, offset, length, flags, data))
                again.add_done_callback(lambda g: tell(g, told))
            else:
                then(None, err)

        try:
            client.send(cmd, offset, length, flags, data, settle, limit=self.timeout)
        except ConnectionError:
            return False
        return True

    def direct(self) -> Direct:
        return self._soon

    # -- BlockNode ---------------------------------------------------------------------------
    def size(self) -> int:
        if self._size is None:
            raise oserror(errno.ENOTCONN, f"{self.address}: size unknown (never connected)")
        return self._size

    def caps(self) -> Caps:
        f = self._flags
        caps = Caps(0)
        if f & TransmissionFlag.SEND_WRITE_ZEROES:
            caps |= Caps.TRIM  # a trim goes out as WRITE_ZEROES: it reaches the bytes
        if f & TransmissionFlag.SEND_FAST_ZERO:
            caps |= Caps.FAST_ZERO
        if f & TransmissionFlag.SEND_FUA:
            caps |= Caps.FUA
        if f & TransmissionFlag.CAN_MULTI_CONN:
            caps |= Caps.MULTI_CONN
        if self.read_only:
            caps |= Caps.READ_ONLY
        return caps

    def health(self) -> str | None:
        if self._broken is not None:
            return self._broken
        if self._client is None and self._waiting_window() <= 0:
            return Unreachable(f"{self.address}: {self._why}")
        return None

    def filename(self) -> str:
        return self.address.uri()

    def actual_size(self) -> int:
        return 0  # unknown on another host (QEMU shows none for nbd)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
        step = self._max_request
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    async def pread(self, offset: int, length: int) -> Buffer:
        if length <= self._max_request:
            out = await self._call(Cmd.READ, offset, length)
            return out if isinstance(out, bytes | bytearray | memoryview) else bytes(length)
        buf = bytearray(length)
        for o, n in self._pieces(offset, length):
            out = await self._call(Cmd.READ, o, n)
            buf[o - offset:o - offset + n] = out if isinstance(
                out, bytes | bytearray | memoryview) else bytes(n)
        return buf

    async def pwrite(self, offset: int, data: Buffer, *, fua: bool = False) -> None:
        native_fua = fua and bool(self._flags & TransmissionFlag.SEND_FUA)
        view = memoryview(data).cast("B")
        for o, n in self._pieces(offset, len(view)):
            await self._call(Cmd.WRITE, o, n, CmdFlag.FUA if native_fua else 0,
                             view[o - offset:o - offset + n])
        if fua and not native_fua:
            await self.flush()

    async def flush(self) -> None:
        if self._flags & TransmissionFlag.SEND_FLUSH:
            await self._call(Cmd.FLUSH)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        # TRIM is advisory in NBD: the children must read zeros afterwards
        await self.zero(offset, length, may_trim=True, fua=fua)

    async def zero(
        self, offset: int, length: int, *, may_trim: bool = True, fast: bool = False,
        fua: bool = False,
    ) -> None:
        f = self._flags
        if not f & TransmissionFlag.SEND_WRITE_ZEROES:
            for o in range(offset, offset + length, ZERO_CHUNK):
                await self.pwrite(o, bytes(min(ZERO_CHUNK, offset + length - o)))
            if fua:
                await self.flush()
            return
        flags = 0 if may_trim else CmdFlag.NO_HOLE
        if fua and f & TransmissionFlag.SEND_FUA:
            flags |= CmdFlag.FUA
        use_fast = fast and bool(f & TransmissionFlag.SEND_FAST_ZERO)
        for o, n in self._pieces(offset, length):
            try:
                await self._call(Cmd.WRITE_ZEROES, o, n,
                                 flags | (CmdFlag.FAST_ZERO if use_fast else 0))
            except OSError as err:
                if not (use_fast and err.errno == errno.ENOTSUP):
                    raise
                use_fast = False  # a refused fast zero is no error: zero the slow way
                await self._call(Cmd.WRITE_ZEROES, o, n, flags)
        if fua and not f & TransmissionFlag.SEND_FUA:
            await self.flush()

    async def cache(self, offset: int, length: int) -> None:
        if self._flags & TransmissionFlag.SEND_CACHE:
            with contextlib.suppress(OSError):
                await self._call(Cmd.CACHE, offset, length)

    async def block_status(self, offset: int, length: int) -> list[Extent]:
        if not self._status_ok:
            return [(length, 0)]
        out = await self._call(Cmd.BLOCK_STATUS, offset, min(length, 0xFFFFFFFF))
        extents = out if isinstance(out, list) else [(length, 0)]
        covered = sum(n for n, _ in extents)
        if covered < length:  # a server may describe less than asked: the rest is data
            extents.append((length - covered, 0))
        return extents

    def close(self) -> None:
        self._closed = True
        for t in (self._reconnector, self._watcher):
            if t is not None:
                t.cancel()
        client, self._client = self._client, None
        if client is not None:
            client.abort_now()  # never wait on a dead link
        super().close()

    def status(self) -> dict[str, Any]:
        """The link, for query-named-block-nodes and ctl status."""
        return {"connected": self._client is not None, "connects": self.connects,
                **({} if self._client is not None else {"reason": self._why})}


def _lost_error(address: object, err: OSError) -> OSError:
    """A request's error when the connection ended under it: the cause's errno (a
    silent link times out, it is not reset) and its text, after the address."""
    return oserror(err.errno or errno.ECONNRESET, f"{address}: {err.strerror or err}")


async def connect(address: NBDAddress, link_timeout: float) -> NBDClient:
    """One connection to ``address`` and its handshake (the caller bounds the time).

    ``nbds://`` asks for TLS (STARTTLS): the server is verified against
    ``DIR/ca-cert.pem`` of libnbd's ``tls-certificates=DIR`` (else the system's
    CAs), and ``client-cert.pem``/``client-key.pem`` there are presented when present.
    """
    tls = None
    if address.tls:
        try:
            tls = client_context(address.tls_certificates)
        except (OSError, ValueError) as err:
            raise oserror(errno.EINVAL, f"TLS certificates {address.tls_certificates}: {err}"
                          ) from err
        if not (address.tls_hostname or address.host):
            tls.check_hostname = False  # a Unix socket: the CA still vouches for the server
    if address.path is not None:
        reader, writer = await asyncio.open_unix_connection(address.path)
    else:
        reader, writer = await asyncio.open_connection(address.host, address.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            watch_link(sock, link_timeout)
    try:
        return await NBDClient.connect(
            reader, writer, address.export, general=True, tls=tls,
            server_hostname=address.tls_hostname or address.host if tls is not None else None)
    except BaseException:
        writer.close()
        raise


def watch_link(sock: socket.socket, timeout: float) -> None:
    """A dead link is noticed without I/O (keepalive: about 11 s) and with it
    (data the far end has not acknowledged for that long, or ``timeout`` if
    shorter, fails the connection: TCP_USER_TIMEOUT)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
        # with keepalive, the user timeout also decides when failed probes end the
        # connection: not later than the probes themselves would
        dead_after = min(timeout, KEEPIDLE + KEEPINTVL * KEEPCNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(dead_after * 1000))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _as_result(cmd: Cmd, length: int, value: object) -> object:
    """A request's reply as pread/pwrite give it: a READ's bytes, else None."""
    if cmd != Cmd.READ:
        return None
    return value if isinstance(value, bytes | bytearray | memoryview) else bytes(length)


class _Soon(Direct):
    """An NBD child's offer to start small reads and writes without a task."""

    def __init__(self, child: NBDChild) -> None:
        self.child = child

    @property
    def time_limit(self) -> float | None:  # type: ignore[override]
        """Requests fail after the child's timeout, unless a lost link makes them
        wait for its return (reconnect-delay): then the caller bounds them."""
        c = self.child
        return c.timeout if c.reconnect_delay <= 0 else None

    def soon_pread(self, offset: int, length: int) -> asyncio.Future[Buffer] | None:
        return self.child._submit(Cmd.READ, offset, length)

    def soon_pwrite(self, offset: int, data: Buffer) -> asyncio.Future[None] | None:
        return self.child._submit(Cmd.WRITE, offset, len(data), 0, data)

    def call_pread(self, offset: int, length: int, then: Then) -> bool:
        return self.child._send(Cmd.READ, offset, length, 0, None, then)

    def takes(self, length: int) -> bool:
        return self.child._takes(length)

    def call_pwrite(self, offset: int, data: Buffer, then: Then) -> bool:
        return self.child._send(Cmd.WRITE, offset, len(data), 0, data, then)
