"""The sending thread (native Sender) and the NBD client's use of it for large writes."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nbdquorum.native import Sender
from nbdquorum.nbd import client as nbdc
from nbdquorum.nbd.constants import REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Cmd
from nbdquorum.nbd.wire import REQUEST, SIMPLE_REPLY
from tests.unit.aiohelp import run_on


def _reader(sock: socket.socket, want: int, got: bytearray) -> threading.Thread:
    def run() -> None:
        while len(got) < want:
            b = sock.recv(1 << 20)
            if not b:
                return
            got.extend(b)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@contextlib.contextmanager
def _pair(loop: asyncio.AbstractEventLoop | None = None,
          on_failed: Callable[[int], None] | None = None,
          ) -> Iterator[tuple[socket.socket, socket.socket, Sender]]:
    """A socket pair and a Sender on its first end, all closed at the end."""
    a, b = socket.socketpair()
    a.setblocking(False)  # as an event loop's socket: the thread waits when it is full
    s = Sender(a.fileno(), loop, on_failed)
    try:
        yield a, b, s
    finally:
        s.close()
        a.close()
        b.close()


def _wait_written(s: Sender) -> None:
    """Until the thread has written everything pushed (bounded)."""
    deadline = time.monotonic() + 5
    while s.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_pushed_buffers_arrive_whole_and_in_order() -> None:
    with _pair() as (_a, b, s):
        rounds = [[os.urandom(n) for n in sizes] for sizes in
                  ([5], [70_000, 3, 2 << 20], [1, 1, 1], [100_000] * 9, [1 << 20, 28])]
        want = b"".join(b"".join(r) for r in rounds)
        got = bytearray()
        t = _reader(b, len(want), got)
        for r in rounds:
            s.push(r)
        t.join(20)
        assert bytes(got) == want
        _wait_written(s)
        assert not s.busy and s.backlog == 0 and s.error == 0


def test_a_buffer_is_held_until_written_then_let_go() -> None:
    with _pair() as (a, b, s):
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)  # (the thread's dup too)
        big = bytearray(os.urandom(4 << 20))  # more than the socket holds: the thread waits
        base = sys.getrefcount(big)
        s.push([big])
        time.sleep(0.2)
        assert s.busy and s.backlog > 0
        assert sys.getrefcount(big) > base  # held while queued (a pool must not reuse it)
        with pytest.raises(BufferError):
            big.extend(b"x")  # and exported: it cannot move under the thread
        got = bytearray()
        t = _reader(b, len(big), got)
        t.join(20)
        assert bytes(got) == big
        _wait_written(s)
        s.push([b"x"])  # a push lets go of what was written
        gc.collect()
        assert sys.getrefcount(big) == base


def test_a_failed_socket_fails_the_next_push() -> None:
    with _pair() as (_a, b, s):
        b.close()
        deadline = time.monotonic() + 5
        with pytest.raises(OSError):  # EPIPE (or ECONNRESET): the peer is gone
            while time.monotonic() < deadline:
                s.push([b"y" * 100_000])
                time.sleep(0.01)
        assert s.error != 0


def test_close_returns_at_once_while_the_thread_waits_on_a_full_socket() -> None:
    with _pair() as (_a, _b, s):
        s.push([bytes(8 << 20)])  # the peer never reads: the thread waits in poll
        time.sleep(0.2)
        assert s.busy
        t0 = time.monotonic()
        s.close()
        assert time.monotonic() - t0 < 2
        with pytest.raises(BrokenPipeError):
            s.push([b"z"])


def test_the_thread_writes_to_its_own_descriptor() -> None:
    """Closing the caller's descriptor (and the number being reused) never sends the
    thread's bytes elsewhere: it writes to a duplicate of its own."""
    with _pair() as (a, b, s):
        a.close()
        r, w = os.pipe()  # likely takes the number a had
        try:
            got = bytearray()
            t = _reader(b, 6, got)
            s.push([b"abc", b"def"])
            t.join(10)
            assert bytes(got) == b"abcdef"
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 10)  # nothing went to the pipe
        finally:
            os.close(r)
            os.close(w)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_waiter_wakes_when_the_queue_is_down_to_its_mark_or_the_sender_closes(
        loop: str) -> None:
    async def main() -> None:
        with _pair(asyncio.get_running_loop()) as (_a, b, s):
            s.push([bytes(6 << 20)])  # the peer does not read yet
            waiter = asyncio.ensure_future(s.below(1 << 20))
            await asyncio.sleep(0.2)
            assert not waiter.done() and s.backlog > 1 << 20
            got = bytearray()
            t = _reader(b, 6 << 20, got)
            await asyncio.wait_for(waiter, 10)  # woken by the thread, not by polling
            assert s.backlog <= 1 << 20
            await asyncio.wait_for(s.below(0), 10)
            assert s.backlog == 0
            t.join(10)
            assert len(got) == 6 << 20
            # a waiter on a stuck socket learns of the close
            s.push([bytes(8 << 20)])
            waiter = asyncio.ensure_future(s.below(0))
            await asyncio.sleep(0.1)
            assert not waiter.done()
            s.close()
            await asyncio.wait_for(waiter, 5)

    run_on(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_stopped_sender_wakes_its_waiter_and_does_not_spin(loop: str) -> None:
    async def main() -> None:
        with _pair(asyncio.get_running_loop()) as (_a, _b, s):
            calls = 0
            real = s._told_readable

            def counted() -> None:
                nonlocal calls
                calls += 1
                real()

            asyncio.get_running_loop().remove_reader(s._told)
            asyncio.get_running_loop().add_reader(s._told, counted)
            s.push([bytes(8 << 20)])
            waiter = asyncio.ensure_future(s.below(0))
            await asyncio.sleep(0.1)
            s.stop()
            await asyncio.wait_for(waiter, 5)
            await asyncio.sleep(0.2)
            assert calls <= 2  # woken, not woken again and again

    run_on(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_failed_write_is_told_with_no_waiter(loop: str) -> None:
    """The peer resets the connection while the thread waits on a full socket: the
    loop hears of it through the eventfd, with the errno, without another push."""
    async def main() -> None:
        import struct
        failed = asyncio.get_running_loop().create_future()
        with _pair(asyncio.get_running_loop(), failed.set_result) as (_a, b, s):
            s.push([bytes(8 << 20)])
            await asyncio.sleep(0.1)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            b.close()
            err = await asyncio.wait_for(failed, 5)
            assert err in (errno.EPIPE, errno.ECONNRESET)
            assert s.error == err

    run_on(loop, main)


def test_a_sender_dropped_without_close_writes_nothing_freed() -> None:
    """Garbage-collected with bytes queued: the thread is joined before the buffers
    go, so the peer gets only bytes that were pushed, and then the end."""
    a, b = socket.socketpair()
    a.setblocking(False)
    s = Sender(a.fileno())
    s.push([b"A" * 5_000_000])  # more than the socket holds: the thread waits
    time.sleep(0.2)
    del s
    gc.collect()
    junk = [bytearray(b"B" * 100_000) for _ in range(100)]  # (reuse what was freed)
    a.close()
    got = bytearray()
    b.settimeout(10)
    while True:
        chunk = b.recv(1 << 20)
        if not chunk:
            break  # the end: the thread's descriptor was closed too
        got.extend(chunk)
    b.close()
    assert got and got == b"A" * len(got)
    del junk


# -- the NBD client: large writes through the thread, small ones from the loop ------------


async def _nbd_server(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                      seen: list[tuple[int, int, bytes]]) -> None:
    """A scripted NBD server (transmission phase only): keeps what it was sent."""
    try:
        while True:
            magic, _flags, cmd, cookie, offset, length = REQUEST.unpack(
                await r.readexactly(REQUEST.size))
            assert magic == REQUEST_MAGIC
            if cmd == Cmd.DISC:
                return
            data = await r.readexactly(length) if cmd == Cmd.WRITE else b""
            seen.append((cmd, offset, data))
            w.write(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, 0, cookie))
            await w.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        return


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_large_and_small_writes_keep_their_order(loop: str, family: str, tmp_path: Any) -> None:
    """Large writes leave from the thread and small ones from the loop, mixed and
    back to back: the server sees every request, in the order sent, intact."""
    async def main() -> None:
        seen: list[tuple[int, int, bytes]] = []
        if family == "tcp":
            srv = await asyncio.start_server(lambda r, w: _nbd_server(r, w, seen),
                                             "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", srv.sockets[0].getsockname()[1])
        else:
            path = str(tmp_path / "s")
            srv = await asyncio.start_unix_server(lambda r, w: _nbd_server(r, w, seen), path)
            reader, writer = await asyncio.open_unix_connection(path)
        client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
        assert client._tx is not None
        sizes = [4096, 1 << 20, 512, 512, 256 << 10, 4096, 2 << 20, 1, 130 << 10, 4096] * 3
        futs = []
        sent = []
        threaded = 0
        for i, n in enumerate(sizes):
            data = os.urandom(n)
            sent.append((int(Cmd.WRITE), i << 22, data))
            futs.append(client.submit(Cmd.WRITE, i << 22, n, 0, data, limit=20))
            if i % 3 == 2:
                await asyncio.sleep(0)  # some loop turns carry several requests
                threaded += client._tx.busy
        await asyncio.gather(*futs)
        assert seen == sent
        assert threaded, "no large write went through the sending thread"
        await client.close()
        assert client._tx._handle is None  # the thread was joined
        srv.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reset_while_the_thread_waits_fails_the_writes_at_once(loop: str) -> None:
    """The server stops reading, the thread waits on a full socket, then the
    connection is reset: every write in flight fails at once, and close returns."""
    async def main() -> None:
        conns: list[asyncio.StreamWriter] = []
        stuck = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conns.append(w)
            await stuck.wait()  # never reads

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", srv.sockets[0].getsockname()[1])
        client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
        futs = [client.submit(Cmd.WRITE, i << 20, 1 << 20, 0, bytes(1 << 20))
                for i in range(32)]
        for _ in range(100):
            await asyncio.sleep(0.02)
            if conns and client._tx is not None and client._tx.busy:
                break
        assert client._tx is not None and client._tx.busy
        conns[0].transport.abort()  # a reset
        t0 = asyncio.get_running_loop().time()
        outs = await asyncio.gather(*futs, return_exceptions=True)
        assert all(isinstance(o, ConnectionError) for o in outs)
        assert asyncio.get_running_loop().time() - t0 < 5
        await client.close()
        assert client._tx._handle is None
        srv.close()

    run_on(loop, main)


def test_no_sending_thread_over_tls_or_when_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    class T:
        def __init__(self, **extra: Any) -> None:
            self.extra = extra

        def get_extra_info(self, name: str) -> Any:
            return self.extra.get(name)

        def get_write_buffer_size(self) -> int:
            return 0

        def is_closing(self) -> bool:
            return False

    with socket.socket() as tcp:
        assert nbdc._sender(T(socket=tcp, sslcontext=object())) is None  # type: ignore[arg-type]
        assert nbdc._sender(T(socket=tcp, ssl_object=object())) is None  # type: ignore[arg-type]
        assert nbdc._sender(T()) is None  # type: ignore[arg-type]
        monkeypatch.setattr(nbdc, "SEND_THREAD", False)
        assert nbdc._sender(T(socket=tcp)) is None  # type: ignore[arg-type]
        monkeypatch.setattr(nbdc, "SEND_THREAD", True)
        s = nbdc._sender(T(socket=tcp))  # type: ignore[arg-type]
        assert s is not None
        s.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_large_write_waits_behind_what_the_transport_still_holds(loop: str) -> None:
    """The transport still holds small requests (the far end reads slowly): a large
    write then goes through the transport too, behind them, never past them."""
    async def main() -> None:
        seen: list[tuple[int, int, bytes]] = []
        gate = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await gate.wait()  # reads nothing until the client's buffer has filled
            await _nbd_server(r, w, seen)

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", srv.sockets[0].getsockname()[1])
        writer.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 32 << 10)
        client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
        assert client._tx is not None
        sent, futs = [], []
        for i in range(200):  # small writes, one loop turn each, until the transport holds some
            data = os.urandom(16 << 10)
            sent.append((int(Cmd.WRITE), i << 20, data))
            futs.append(client.submit(Cmd.WRITE, i << 20, len(data), 0, data, limit=30))
            await asyncio.sleep(0)
            if client.transport.get_write_buffer_size():
                break
        assert client.transport.get_write_buffer_size()
        big = os.urandom(1 << 20)
        sent.append((int(Cmd.WRITE), 999 << 20, big))
        futs.append(client.submit(Cmd.WRITE, 999 << 20, len(big), 0, big, limit=30))
        await asyncio.sleep(0)
        assert not client._tx.busy and client._tx._pushed == 0  # not through the thread
        gate.set()
        await asyncio.gather(*futs)
        assert seen == sent
        await client.close()
        srv.close()

    run_on(loop, main)
