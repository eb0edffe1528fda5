"""The NBD client's reply parser (ReplyReader) and its driver (NBDClient).

The parser is fed replies cut at every possible place, small and large (large
READ data goes straight into the request's buffer), structured and simple; the
driver runs over a socketpair against a scripted server: time limits, late
replies, a connection's end.
"""

from __future__ import annotations

import asyncio
import errno
import pickle
import random
import struct
from typing import Any

import pytest

from nbdquorum.nbd import client as nbdc
from nbdquorum.nbd.constants import (
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    ReplyFlag,
    ReplyType,
)
from nbdquorum.nbd.wire import CHUNK, REQUEST, SIMPLE_REPLY
from tests.unit.aiohelp import run_on

MiB = 1 << 20


def simple(cookie: int, code: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, code, cookie) + data


def chunk(cookie: int, rtype: int, payload: bytes, done: bool = True) -> bytes:
    flags = ReplyFlag.DONE if done else 0
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, len(payload)) + payload


def data_chunk(cookie: int, off: int, body: bytes, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, struct.pack(">Q", off) + body, done)


def hole_chunk(cookie: int, off: int, n: int, done: bool = True) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, struct.pack(">QI", off, n), done)


class Owner:
    """Requests as the parser sees them, their outcomes recorded by callback."""

    def __init__(self) -> None:
        self.pending: dict[int, nbdc._Pending] = {}
        self.outcomes: dict[int, tuple[object, BaseException | None]] = {}

    def ask(self, cookie: int, cmd: Cmd, offset: int = 0, length: int = 0) -> None:
        def done(result: object, err: BaseException | None) -> None:
            assert cookie not in self.outcomes, "an outcome told twice"
            self.outcomes[cookie] = (result, err)
        self.pending[cookie] = nbdc._Pending(cmd, offset, length, None, done)


def feed(reader: nbdc.ReplyReader, stream: bytes, cuts: list[int]) -> None:
    """``stream`` into the reader in pieces ending at ``cuts`` (and wherever the
    buffer offered is shorter)."""
    view = memoryview(stream)
    pos = 0
    for end in [*cuts, len(stream)]:
        while pos < end:
            dst = reader.buffer()
            assert len(dst) > 0
            n = min(len(dst), end - pos)
            held = pickle.PickleBuffer(dst)  # as uvloop: held until buffer_updated returns
            dst[:n] = view[pos:pos + n]
            reader.filled(n)
            held.release()
            pos += n


def scenario() -> tuple[Owner, bytes, dict[int, bytes]]:
    rng = random.Random(7)
    big = rng.randbytes(MiB)
    mid = rng.randbytes(300 << 10)
    small = rng.randbytes(4096)
    o = Owner()
    want: dict[int, bytes] = {}
    stream = b""
    o.ask(1, Cmd.WRITE)
    stream += simple(1)
    o.ask(2, Cmd.READ, 4096, 4096)
    stream += data_chunk(2, 4096, small)
    want[2] = small
    o.ask(3, Cmd.READ, 0, MiB)  # one large chunk: straight into its buffer
    stream += data_chunk(3, 0, big)
    want[3] = big
    o.ask(4, Cmd.READ, 10 * MiB, (300 << 10) + 8192)  # data, hole, data out of order
    stream += data_chunk(4, 10 * MiB + 8192, mid, done=False)
    stream += hole_chunk(4, 10 * MiB + 4096, 4096, done=False)
    stream += data_chunk(4, 10 * MiB, small)
    want[4] = small + bytes(4096) + mid
    o.ask(5, Cmd.READ, 0, 64 << 10)  # all a hole
    stream += hole_chunk(5, 0, 64 << 10)
    want[5] = bytes(64 << 10)
    o.ask(6, Cmd.FLUSH)
    stream += simple(6, errno.EIO)
    o.ask(7, Cmd.WRITE)
    message = b"no space left, really"
    stream += chunk(7, ReplyType.ERROR, struct.pack(">IH", errno.ENOSPC, len(message)) + message)
    o.ask(8, Cmd.BLOCK_STATUS, 0, 1 << 40)  # longer than the reply buffer
    extents = [(4096, i % 4) for i in range(50_000)]
    payload = struct.pack(">I", 1) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    stream += chunk(8, ReplyType.BLOCK_STATUS, payload, done=False)
    stream += chunk(8, ReplyType.NONE, b"")
    o.ask(9, Cmd.READ, 0, 8)  # 4 of 8 bytes: an error, never zeroes
    stream += data_chunk(9, 0, b"1234")
    return o, stream, want


def check(o: Owner, want: dict[int, bytes]) -> None:
    assert sorted(o.outcomes) == list(range(1, 10))
    assert not o.pending
    assert o.outcomes[1] == (None, None)
    for cookie, data in want.items():
        result, err = o.outcomes[cookie]
        assert err is None
        assert isinstance(result, bytes | bytearray | memoryview)
        assert bytes(result) == data, cookie
    err6 = o.outcomes[6][1]
    assert isinstance(err6, OSError) and err6.errno == errno.EIO
    err7 = o.outcomes[7][1]
    assert isinstance(err7, OSError) and err7.errno == errno.ENOSPC
    assert "no space left, really" in str(err7)
    extents = o.outcomes[8][0]
    assert isinstance(extents, list) and len(extents) == 50_000 and extents[5] == (4096, 1)
    err9 = o.outcomes[9][1]
    assert isinstance(err9, OSError) and err9.errno == errno.EIO


def test_replies_whole_and_cut_anywhere() -> None:
    o, stream, want = scenario()
    feed(nbdc.ReplyReader(o.pending), stream, [])
    check(o, want)
    rng = random.Random(11)
    for _ in range(30):  # random cuts, many of them inside headers
        o, stream, want = scenario()
        cuts = sorted(rng.sample(range(1, len(stream)), 200))
        feed(nbdc.ReplyReader(o.pending), stream, cuts)
        check(o, want)


def test_replies_byte_by_byte() -> None:
    o, stream, want = scenario()
    reader = nbdc.ReplyReader(o.pending)
    # the headers and small replies one byte at a time; the large data in one piece
    feed(reader, stream, [i for i in range(1, len(stream))
                          if i < 5000 or i > len(stream) - 420_000])
    check(o, want)


def test_large_read_data_lands_in_its_own_buffer() -> None:
    o = Owner()
    o.ask(1, Cmd.READ, 0, MiB)
    body = bytes(range(256)) * 4096
    reader = nbdc.ReplyReader(o.pending)
    stream = data_chunk(1, 0, body)
    feed(reader, stream, [100])
    # after the first 100 bytes the reader offers the request's buffer itself
    o2 = Owner()
    o2.ask(1, Cmd.READ, 0, MiB)
    r2 = nbdc.ReplyReader(o2.pending)
    dst = r2.buffer()
    dst[:100] = stream[:100]
    r2.filled(100)
    assert len(r2.buffer()) == MiB - (100 - CHUNK.size - 8)
    result, err = o.outcomes[1]
    assert err is None and bytes(result) == body  # type: ignore[arg-type]


def test_simple_replies_carry_read_data() -> None:
    """A server without structured replies: the data follows the simple reply."""
    o = Owner()
    o.ask(1, Cmd.READ, 0, 4096)
    o.ask(2, Cmd.READ, 0, MiB)
    o.ask(3, Cmd.READ, 0, 512)
    stream = simple(1, 0, b"a" * 4096) + simple(2, 0, b"b" * MiB) + simple(3, errno.EIO)
    feed(nbdc.ReplyReader(o.pending, structured=False), stream, [3, 17, 5000, 200_000])
    assert bytes(o.outcomes[1][0]) == b"a" * 4096  # type: ignore[arg-type]
    assert bytes(o.outcomes[2][0]) == b"b" * MiB  # type: ignore[arg-type]
    err = o.outcomes[3][1]
    assert isinstance(err, OSError) and err.errno == errno.EIO  # no data after an error


@pytest.mark.parametrize("bad", [
    simple(99),  # nobody asked
    chunk(99, ReplyType.NONE, b""),
    b"\x12\x34\x56\x78" + bytes(12),  # wrong magic
    data_chunk(1, 1 << 30, b"x"),  # data outside the request
    chunk(1, 77, b""),  # a chunk type that does not exist
])
def test_a_broken_reply_is_an_error(bad: bytes) -> None:
    o = Owner()
    o.ask(1, Cmd.READ, 0, 4096)
    with pytest.raises(nbdc.NBDClientError):
        feed(nbdc.ReplyReader(o.pending), bad, [])


def test_an_absurd_chunk_length_is_refused_before_it_is_buffered() -> None:
    o = Owner()
    o.ask(1, Cmd.BLOCK_STATUS, 0, 4096)
    header = CHUNK.pack(STRUCTURED_REPLY_MAGIC, 0, ReplyType.BLOCK_STATUS, 1, 1 << 31)
    with pytest.raises(nbdc.NBDClientError):
        feed(nbdc.ReplyReader(o.pending), header + bytes(100), [])


def test_an_outcome_is_told_once() -> None:
    """A request whose time ran out gets no second outcome from its late reply."""
    calls: list[Any] = []
    p = nbdc._Pending(Cmd.WRITE, 0, 0, None, lambda r, e: calls.append((r, e)))
    nbdc._settle(p, None, TimeoutError())
    pending = {1: p}
    feed(nbdc.ReplyReader(pending), simple(1), [])
    assert len(calls) == 1 and isinstance(calls[0][1], TimeoutError) and not pending


# -- the driver over a socket pair ---------------------------------------------------------


async def _pair(serve: Any) -> tuple[nbdc.NBDClient, asyncio.Task[None]]:
    """An NBDClient (the handshake skipped) and a scripted server on the other end."""
    import socket
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    sreader, swriter = await asyncio.open_connection(sock=b)
    client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
    return client, asyncio.get_running_loop().create_task(serve(sreader, swriter))


async def _requests(reader: asyncio.StreamReader, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        magic, _flags, cmd, cookie, offset, length = REQUEST.unpack(
            await reader.readexactly(REQUEST.size))
        assert magic == REQUEST_MAGIC
        if cmd == Cmd.WRITE:
            await reader.readexactly(length)
        out.append((cmd, cookie, offset, length))
    return out


def test_time_limits_share_a_timer_and_late_replies_are_dropped() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            reqs = await _requests(r, 3)
            await release.wait()  # answer everything late, then one more on time
            for cmd, cookie, offset, length in reqs:
                w.write(data_chunk(cookie, offset, b"z" * length) if cmd == Cmd.READ
                        else simple(cookie))
            (cmd, cookie, offset, length), = await _requests(r, 1)
            w.write(data_chunk(cookie, offset, b"y" * length))
            await w.drain()

        client, server = await _pair(serve)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        slow = client.submit(Cmd.READ, 0, 4096, limit=5.0)
        fast = client.submit(Cmd.READ, 0, 4096, limit=0.3)  # earlier deadline: re-armed
        told: list[Any] = []
        client.send(Cmd.WRITE, 0, 3, 0, b"abc", lambda r, e: told.append(e), limit=0.3)
        with pytest.raises(TimeoutError):
            await fast
        assert loop.time() - t0 < 3.0
        assert len(told) == 1 and isinstance(told[0], TimeoutError)
        assert not slow.done()
        release.set()
        assert bytes(await slow) == b"z" * 4096  # type: ignore[arg-type]
        # the late replies to the expired requests were dropped; the link still works
        assert bytes(await client.call(Cmd.READ, 0, 16, limit=5)) == b"y" * 16  # type: ignore[arg-type]
        assert len(told) == 1
        await server
        await client.close()
        assert client.closed.done()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_the_connections_end_fails_what_is_in_flight() -> None:
    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _requests(r, 2)
            w.write(simple(1)[:7])  # half a reply, then the end
            await w.drain()
            w.close()

        client, server = await _pair(serve)
        first = client.submit(Cmd.WRITE, 0, 1, 0, b"x")
        told: list[Any] = []
        client.send(Cmd.FLUSH, 0, 0, 0, None, lambda r, e: told.append(e))
        with pytest.raises(ConnectionResetError, match="closed by the server"):
            await first
        await server
        await asyncio.wait_for(client.closed, 5)
        assert len(told) == 1 and isinstance(told[0], ConnectionResetError)
        assert client.lost_reason is not None and "closed by the server" in client.lost_reason
        with pytest.raises(ConnectionResetError):
            client.submit(Cmd.FLUSH)

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_link_that_timed_out_fails_what_is_in_flight_as_a_timeout() -> None:
    """The kernel gave up on a silent link (TCP_USER_TIMEOUT: ETIMEDOUT): the
    requests in flight fail with that errno, not as reset by the peer, still as a
    ConnectionError for their owners, and the reason reads without errno noise."""
    async def main() -> None:
        stop = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _requests(r, 1)
            await stop.wait()
            w.close()

        client, server = await _pair(serve)
        first = client.submit(Cmd.WRITE, 0, 1, 0, b"x")
        await asyncio.sleep(0.05)
        client.connection_lost(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
        with pytest.raises(ConnectionResetError) as caught:
            await first
        assert caught.value.errno == errno.ETIMEDOUT
        assert client.lost_reason == "Connection timed out"
        assert str(caught.value.strerror) == "connection lost: Connection timed out"
        client.abort_now()
        stop.set()
        await server

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_broken_reply_ends_the_connection() -> None:
    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _requests(r, 1)
            w.write(simple(4242))  # a cookie nobody used
            await w.drain()
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                await r.readexactly(1)

        client, server = await _pair(serve)
        with pytest.raises(ConnectionResetError, match="unknown cookie 4242"):
            await client.call(Cmd.FLUSH)
        await server
        await client.abort()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_absurd_error_code_still_gives_every_request_its_outcome() -> None:
    """A code no errno can be (2**31) in a batch of replies: that request fails with
    EIO, the others in the batch get theirs (they have left the pending table)."""
    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _requests(r, 3)
            w.write(simple(1, 0x80000000) + simple(2) + simple(3, errno.ENOSPC))
            await w.drain()
            await r.read()  # until the client goes

        client, server = await _pair(serve)
        futs = [client.submit(Cmd.WRITE, 0, 1, 0, b"x", limit=5) for _ in range(3)]
        outs = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True), 5)
        assert isinstance(outs[0], OSError) and outs[0].errno == errno.EIO
        assert "0x80000000" in str(outs[0])
        assert outs[1] is None
        assert isinstance(outs[2], OSError) and outs[2].errno == errno.ENOSPC
        await client.close()
        await server

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_request_sent_while_others_expire_keeps_its_own_time_limit() -> None:
    """A's limit passes; its owner sends C with a short limit while B (long) waits:
    C must fail after its own limit, not B's."""
    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await _requests(r, 3)  # and never answer
            await r.read()

        client, server = await _pair(serve)
        loop = asyncio.get_running_loop()
        later: list[asyncio.Future[object]] = []
        sent = asyncio.Event()

        def on_a(_r: object, err: BaseException | None) -> None:
            assert isinstance(err, TimeoutError)
            later.append(client.submit(Cmd.FLUSH, limit=0.2))
            sent.set()

        t0 = loop.time()
        client.send(Cmd.FLUSH, 0, 0, 0, None, on_a, limit=0.2)
        b = client.submit(Cmd.FLUSH, limit=20)
        await sent.wait()
        with pytest.raises(TimeoutError):
            await later[0]
        assert loop.time() - t0 < 5  # not B's 20 s
        assert not b.done()
        await client.abort()
        with pytest.raises(ConnectionResetError):
            await b
        server.cancel()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_end_that_came_during_the_handshake_ends_the_client() -> None:
    """Stray bytes and the end reached the handshake's stream before the switch: the
    client must not wait for replies that cannot come."""
    async def main() -> None:
        import socket
        a, b = socket.socketpair()
        b.sendall(b"\x67\x44\x66")  # a few bytes of a reply, then the end
        b.shutdown(socket.SHUT_WR)
        reader, writer = await asyncio.open_connection(sock=a)
        for _ in range(100):  # bounded: the bytes and the end reach the stream first
            if getattr(reader, "_eof", False):
                break
            await asyncio.sleep(0.01)
        assert getattr(reader, "_eof", False) and not reader.at_eof()  # bytes still there
        client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
        await asyncio.wait_for(client.closed, 5)
        assert client.lost_reason is not None
        with pytest.raises(ConnectionResetError):
            client.submit(Cmd.FLUSH)
        b.close()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_read_into_a_used_spare_buffer_gets_only_its_own_bytes() -> None:
    """Spare buffers are not zero-filled: the holes of a reply are written."""
    from nbdquorum.buffers import SPARES

    n = 256 << 10
    dirty = [SPARES.take(n) for _ in range(8)]
    for b in dirty:
        b[:] = b"\xff" * n
    del dirty, b
    o = Owner()
    o.ask(1, Cmd.READ, 0, n)
    stream = (data_chunk(1, 0, b"a" * (64 << 10), done=False)
              + hole_chunk(1, 64 << 10, 128 << 10, done=False)
              + data_chunk(1, 192 << 10, b"b" * (64 << 10)))
    feed(nbdc.ReplyReader(o.pending), stream, [40, 70_000])
    result, err = o.outcomes[1]
    assert err is None
    assert bytes(result) == b"a" * (64 << 10) + bytes(128 << 10) + b"b" * (64 << 10)  # type: ignore[arg-type]


def test_overlapping_chunks_are_an_error() -> None:
    """Chunks that overlap (the protocol forbids it) and add up to the request's
    length leave a gap: an error, never the buffer's old bytes."""
    n = 256 << 10
    o = Owner()
    o.ask(1, Cmd.READ, 0, n)
    stream = (data_chunk(1, 0, b"a" * (128 << 10), done=False)
              + data_chunk(1, 64 << 10, b"b" * (128 << 10)))
    feed(nbdc.ReplyReader(o.pending), stream, [])
    err = o.outcomes[1][1]
    assert isinstance(err, OSError) and err.errno == errno.EIO
    assert "overlapping" in str(err)


def test_after_a_large_read_only_the_next_header_goes_through_the_reply_buffer() -> None:
    """Consecutive large READs: the reply buffer takes only the next chunk's header,
    so its data goes straight to its own buffer instead of being copied over."""
    body = bytes(range(256)) * 4096
    o = Owner()
    o.ask(1, Cmd.READ, 0, MiB)
    o.ask(2, Cmd.READ, MiB, MiB)
    o.ask(3, Cmd.READ, 0, 4096)
    first = data_chunk(1, 0, body)
    rest = data_chunk(2, MiB, body) + data_chunk(3, 0, b"s" * 4096)
    reader = nbdc.ReplyReader(o.pending)
    feed(reader, first, [])
    assert len(reader.buffer()) == CHUNK.size + 8
    feed(reader, rest, [])
    for cookie, want in ((1, body), (2, body), (3, b"s" * 4096)):
        result, err = o.outcomes[cookie]
        assert err is None and bytes(result) == want  # type: ignore[arg-type]
    assert len(reader.buffer()) > 4096  # after a small reply: the whole buffer again


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_over_tcp_a_large_reads_data_wakes_the_loop_once_most_of_it_came(loop: str) -> None:
    """SO_RCVLOWAT follows a large READ over plain TCP: while its data arrives the
    socket is readable only once what is owed (up to 1 MiB) has come; then back to
    1 byte.  Data cut in pieces with pauses between them still arrives whole, and
    a reset in the middle still ends the request at once."""
    import socket

    body = bytes(range(256)) * (3 * 4096)  # 3 MiB

    async def main() -> None:
        go = asyncio.Event()
        marks: list[int] = []
        conns: list[asyncio.StreamWriter] = []

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            conns.append(w)
            while True:
                (_cmd, cookie, offset, length), = await _requests(r, 1)
                stream = data_chunk(cookie, offset, body[:length])
                cut = 200_000
                w.write(stream[:cut])  # the header and part of the data
                await w.drain()
                await go.wait()
                for at in range(cut, len(stream), 700_000):
                    w.write(stream[at:at + 700_000])
                    await w.drain()
                    await asyncio.sleep(0.05)

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = nbdc.NBDClient(reader, writer, nbdc.ExportInfo(1 << 30, 0))
        sock = writer.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        got = client.submit(Cmd.READ, 0, len(body))
        for _ in range(200):  # the first piece came: the mark is set
            await asyncio.sleep(0.01)
            if client._replies.direct_left:
                break
        marks.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
        go.set()
        assert bytes(await asyncio.wait_for(got, 10)) == body  # type: ignore[arg-type]
        assert marks == [1 << 20]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        # a reset while the mark is up ends the request at once
        go.clear()
        got = client.submit(Cmd.READ, 0, len(body))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if client._replies.direct_left:
                break
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1 << 20
        conns[-1].transport.abort()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(got, 5)
        assert client._replies.direct_left == 0  # its spare buffer is let go at once
        await client.close()
        srv.close()

    run_on(loop, main, 30)


def test_no_low_water_mark_over_unix_sockets_or_tls() -> None:
    class T:
        def __init__(self, **extra: Any) -> None:
            self.extra = extra

        def get_extra_info(self, name: str) -> Any:
            return self.extra.get(name)

    import socket
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        assert nbdc._lowat_socket(T(socket=tcp)) is tcp  # type: ignore[arg-type]
        assert nbdc._lowat_socket(T(socket=unix)) is None  # type: ignore[arg-type]
        assert nbdc._lowat_socket(T(socket=tcp, sslcontext=object())) is None  # type: ignore[arg-type]
        assert nbdc._lowat_socket(T(socket=tcp, ssl_object=object())) is None  # type: ignore[arg-type]


def test_a_call_given_up_while_the_socket_is_backed_up_leaves_no_unretrieved_error() -> None:
    """A caller cancelled while its request waits for the socket to drain (a quorum
    dropping a slow child's write: the child timeout, a removal) has its request
    sent already; when the connection then ends, that request's error must be
    taken, not left for the loop to log as "Future exception was never retrieved"
    (a server's log must not show that on a child's removal)."""
    import gc

    reported: list[dict[str, Any]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        stop = asyncio.Event()

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await stop.wait()  # reads nothing: the client's writes back up
            w.close()

        client, server = await _pair(serve)
        big = bytes(nbdc._BACKLOG_MAX * 2)
        call = loop.create_task(client.call(Cmd.WRITE, 0, len(big), 0, big))
        for _ in range(200):  # until the call waits for the backlog to drain
            await asyncio.sleep(0.01)
            if client._backlog() > nbdc._BACKLOG_MAX:
                break
        assert client._backlog() > nbdc._BACKLOG_MAX and not call.done()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        client.abort_now()  # the child removed: its pending request fails
        await asyncio.wait_for(client.closed, 5)
        stop.set()
        await server
        del call
        gc.collect()
        await asyncio.sleep(0)

    asyncio.run(asyncio.wait_for(main(), 30))
    assert not [c for c in reported if "never retrieved" in c.get("message", "")], reported
