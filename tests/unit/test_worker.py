"""Worker processes' parts in one process: the NBD client against the real server,
and the worker's node (local agreeing reads, everything else forwarded) with real files.

The primary here is the real thing (QuorumNode on temp files behind NBDServer), served
over a socketpair; the worker side is the real NBDClient and WorkerNode.  Only the
process boundary is missing (tests/interop/test_workers.py has it).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.graph import Graph
from nbdquorum.block.quorum import QuorumNode, ReadPattern
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.nbd import client as nbdc
from nbdquorum.nbd.client import NBDClient
from nbdquorum.nbd.constants import Cmd, CmdFlag, StateFlag
from nbdquorum.nbd.server import READ_CHUNK, Export, NBDServer
from nbdquorum.qmp.events import wired
from nbdquorum.worker.node import View, WorkerNode
from nbdquorum.worker.pool import WorkerPool
from tests.unit.aiohelp import run

SIZE = 4 << 20


def scribble(path: Path, offset: int, data: bytes) -> None:
    """Overwrite part of a child behind the quorum's back."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@dataclass
class Rig:
    tmp: Path
    quorum: QuorumNode
    events: list[Event]
    nbd: NBDServer
    client: NBDClient
    pool: WorkerPool  # never spawns here: count 0; used for its view and epoch
    node: WorkerNode

    def push_view(self) -> None:
        """What pool.push_view sends, with the descriptors duplicated as SCM_RIGHTS would."""
        self.pool._bump()
        msg, fds = self.pool._view()
        self.node.set_view(View(epoch=msg["epoch"], local=msg["local"],
                                threshold=msg["threshold"], fifo=msg["fifo"],
                                names=[c["name"] for c in msg["children"]],
                                fds=[os.dup(fd) for fd in fds], size=self.node.size()))

    def child(self, i: int) -> Path:
        return self.tmp / f"c{i}.raw"


@asynccontextmanager
async def rig(tmp: Path, **kw: object) -> AsyncIterator[Rig]:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(wired(seen.append))
    g = Graph(bus)
    kids = [g.open_raw_file(f"c{i}", str(tmp / f"c{i}.raw"), create_size=SIZE) for i in range(3)]
    q = QuorumNode("q0", kids, vote_threshold=2, bus=bus, **kw)  # type: ignore[arg-type]
    g.add(q)
    export = Export("disk", q)
    nbd = NBDServer({"disk": export}, "disk")
    here, there = socket.socketpair()
    serving = asyncio.create_task(nbd.serve_socket(here))
    reader, writer = await asyncio.open_connection(sock=there, limit=READ_CHUNK)
    client = await NBDClient.connect(reader, writer, "disk")
    pool = WorkerPool(nbd, export, q, 0, child_timeout=5.0)
    node = WorkerNode("q0", client.info.size, client, pool._epoch_map, 5.0)
    r = Rig(tmp, q, seen, nbd, client, pool, node)
    r.push_view()
    try:
        yield r
    finally:
        node.close()
        await pool.shutdown(grace=1)
        await client.close()
        await nbd.shutdown(grace=5)
        await serving
        g.close()


def test_client_handshake_reports_the_export(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            assert r.client.info.size == SIZE
            assert r.client.info.flags & 1  # HAS_FLAGS

    run(main())


def test_client_round_trips_every_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            c = r.client
            await c.call(Cmd.WRITE, 4096, 8192, 0, b"\x5a" * 8192)
            await c.call(Cmd.WRITE, 0, 512, CmdFlag.FUA, b"\x01" * 512)
            assert bytes(await c.call(Cmd.READ, 4096, 8192)) == b"\x5a" * 8192  # type: ignore[arg-type]
            await c.call(Cmd.FLUSH)
            await c.call(Cmd.WRITE_ZEROES, 4096, 4096, CmdFlag.NO_HOLE)
            await c.call(Cmd.TRIM, 8192, 4096)
            assert bytes(await c.call(Cmd.READ, 4096, 8192)) == bytes(8192)  # type: ignore[arg-type]
            await c.call(Cmd.CACHE, 0, 65536)
            extents = await c.call(Cmd.BLOCK_STATUS, 0, SIZE)
            assert isinstance(extents, list) and sum(n for n, _ in extents) == SIZE
            assert any(f & StateFlag.HOLE for _, f in extents)
            for i in range(3):
                assert r.child(i).read_bytes()[:512] == b"\x01" * 512

    run(main())


def test_client_raises_the_servers_errno_and_message(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            with pytest.raises(OSError) as err:
                await r.client.call(Cmd.READ, SIZE, 4096)
            assert err.value.errno == errno.EINVAL
            # and the connection still serves
            await r.client.call(Cmd.FLUSH)

    run(main())


def test_client_parses_simple_and_structured_replies() -> None:
    simple = b"\x67\x44\x66\x98" + (5).to_bytes(4, "big") + (7).to_bytes(8, "big")
    assert nbdc.parse_reply_start(simple) == (5, 7, 0)
    chunk = b"\x66\x8e\x33\xef" + b"\x00\x01" + b"\x80\x01" + (9).to_bytes(8, "big")
    assert nbdc.parse_reply_start(chunk) is None
    assert nbdc.parse_chunk_header(chunk + (10).to_bytes(4, "big")) == (1, 0x8001, 9, 10)
    assert nbdc.parse_error((22).to_bytes(4, "big") + (3).to_bytes(2, "big") + b"bad") == (22, "bad")
    with pytest.raises(nbdc.NBDClientError):
        nbdc.parse_reply_start(b"\x00" * 16)
    with pytest.raises(nbdc.NBDClientError):
        nbdc.parse_greeting(b"NBDMAGIC" + b"\x00" * 10)


def test_agreeing_reads_are_answered_locally(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pwrite(0, b"\x11" * (1 << 20))
            assert r.node.try_pread_now(4096, 4096) == b"\x11" * 4096
            assert bytes(await r.node.pread(0, 1 << 20)) == b"\x11" * (1 << 20)
            assert (r.node.local_reads, r.node.forwarded) == (2, 0)
            assert r.node.take_reads() == {"c0": 2, "c1": 2, "c2": 2}
            assert r.node.take_reads() == {}
            assert not [e for e in r.events if e.name == "QUORUM_REPORT_BAD"]

    run(main())


def test_a_mismatch_is_forwarded_and_the_primary_reports_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pwrite(0, b"\x22" * 65536)
            scribble(r.child(1), 0, b"\xee" * 512)
            assert r.node.try_pread_now(0, 4096) is None  # not answered here
            assert bytes(await r.node.pread(0, 4096)) == b"\x22" * 4096
            assert r.node.forwarded == 1
            bad = [e.data for e in r.events if e.name == "QUORUM_REPORT_BAD"]
            assert bad and bad[0]["node-name"] == "c1" and bad[0]["sector-num"] == 0

    run(main())


def test_a_read_error_is_forwarded(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pwrite(0, b"\x33" * 4096)
            os.truncate(r.child(2), 0)  # the child's reads now come up short (EIO)
            assert bytes(await r.node.pread(0, 4096)) == b"\x33" * 4096
            assert r.node.forwarded == 1

    run(main())


def test_a_newer_epoch_makes_the_old_view_unusable(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pwrite(0, b"\x44" * 4096)
            r.pool._bump()  # the primary changed; the new view has not arrived
            assert r.node.try_pread_now(0, 4096) is None
            assert bytes(await r.node.pread(0, 4096)) == b"\x44" * 4096
            assert (r.node.local_reads, r.node.forwarded) == (0, 1)
            r.push_view()
            assert r.node.try_pread_now(0, 4096) == b"\x44" * 4096

    run(main())


def test_the_view_follows_child_state_and_closes_retired_descriptors(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            old = list(r.node.view.fds)
            r.quorum.members.fault(r.quorum.slots[2], "test")
            r.push_view()
            assert r.node.view.names == ["c0", "c1"]
            for fd in old:
                with pytest.raises(OSError):
                    os.fstat(fd)
            # the faulted child no longer takes part: corrupting it changes nothing
            await r.node.pwrite(0, b"\x55" * 4096)
            scribble(r.child(2), 0, b"\xee" * 4096)
            assert r.node.try_pread_now(0, 4096) == b"\x55" * 4096
            assert r.node.take_reads() == {"c0": 1, "c1": 1}

    run(main())


def test_below_threshold_nothing_is_local(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            r.quorum.members.fault(r.quorum.slots[1], "test")
            r.quorum.members.fault(r.quorum.slots[2], "test")
            r.push_view()
            assert not r.node.view.local
            assert r.node.try_pread_now(0, 4096) is None
            with pytest.raises(OSError) as err:  # the primary has no quorum either
                await r.node.pread(0, 4096)
            assert err.value.errno == errno.EIO

    run(main())


def test_fifo_reads_the_first_child_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path, read_pattern=ReadPattern.FIFO) as r:
            await r.node.pwrite(0, b"\x66" * 4096)
            scribble(r.child(1), 0, b"\xee" * 4096)  # not read in fifo mode
            assert r.node.try_pread_now(0, 4096) == b"\x66" * 4096
            assert r.node.take_reads() == {"c0": 1}

    run(main())


def test_writes_and_the_rest_go_to_the_primary(tmp_path: Path) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pwrite(8192, b"\x77" * 4096, fua=True)
            await r.node.zero(8192, 512, may_trim=False)
            await r.node.trim(65536, 65536)
            await r.node.flush()
            await r.node.cache(0, 4096)
            assert sum(n for n, _ in await r.node.block_status(0, SIZE)) == SIZE
            for i in range(3):
                data = r.child(i).read_bytes()
                assert data[8192:8704] == bytes(512) and data[8704:12288] == b"\x77" * 3584
            assert r.quorum.slots[0].stats.writes >= 3

    run(main())


@pytest.fixture
def no_leaked_fds() -> Iterator[None]:
    before = set(os.listdir("/proc/self/fd"))
    yield
    leaked = set(os.listdir("/proc/self/fd")) - before
    assert not leaked, f"descriptors left open: {leaked}"


def test_closing_releases_every_descriptor(tmp_path: Path, no_leaked_fds: None) -> None:
    async def main() -> None:
        async with rig(tmp_path) as r:
            await r.node.pread(0, 1 << 20)
            r.push_view()
            r.push_view()

    run(main())


class _WithLoop(nbdc._Pending):
    __slots__ = ("loop",)


def _pending(cmd: Cmd, offset: int, length: int) -> Any:
    loop = asyncio.new_event_loop()
    p = _WithLoop(cmd, offset, length, loop.create_future())
    p.loop = loop
    return p


def test_client_assembles_chunks_and_refuses_gaps_and_strays() -> None:
    from nbdquorum.nbd.constants import ReplyType

    def data(off: int, body: bytes) -> bytes:
        return off.to_bytes(8, "big") + body

    def hole(off: int, n: int) -> bytes:
        return off.to_bytes(8, "big") + n.to_bytes(4, "big")

    p = _pending(Cmd.READ, 100, 12)
    nbdc._chunk(p, ReplyType.OFFSET_DATA, data(104, b"BBBB"))
    nbdc._chunk(p, ReplyType.OFFSET_HOLE, hole(108, 4))
    nbdc._chunk(p, ReplyType.OFFSET_DATA, data(100, b"AAAA"))
    nbdc._finish(p)
    assert bytes(p.future.result()) == b"AAAABBBB" + bytes(4)
    p.loop.close()

    short = _pending(Cmd.READ, 0, 8)
    nbdc._chunk(short, ReplyType.OFFSET_DATA, data(0, b"1234"))
    nbdc._finish(short)
    assert short.future.exception().errno == errno.EIO  # 4 of 8 bytes: not zeros
    short.loop.close()

    for off, body in ((96, b"xxxx"), (110, b"xxxx")):  # outside 100+12
        stray = _pending(Cmd.READ, 100, 12)
        with pytest.raises(nbdc.NBDClientError):
            nbdc._chunk(stray, ReplyType.OFFSET_DATA, data(off, body))
        stray.loop.close()


def test_fault_injectors_keep_every_read_forwarded(tmp_path: Path) -> None:
    """x-faulty-set changes what a child returns without a quorum change: a worker must
    never read around a fault injector."""
    from nbdquorum.block.faulty import FaultyNode

    async def main() -> None:
        bus = EventBus()
        g = Graph(bus)
        kids = [FaultyNode(f"f{i}", g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"),
                                                     create_size=SIZE)) for i in range(3)]
        for k in kids:
            g.add(k)
        q = QuorumNode("q0", kids, vote_threshold=2, bus=bus)  # type: ignore[arg-type]
        g.add(q)
        pool = WorkerPool(NBDServer({}, "disk"), Export("disk", q), q, 0, child_timeout=5.0)
        msg, fds = pool._view()
        assert msg["local"] is False and fds == []
        await pool.shutdown(grace=1)
        g.close()

    run(main())


def test_control_channel_carries_messages_and_descriptors_without_blocking(
    tmp_path: Path,
) -> None:
    """On the standard asyncio loop (which leaves sockets blocking): a receive with
    nothing queued returns to the loop, a descriptor arrives open, EOF is reported."""
    from nbdquorum.worker.control import Channel, channel_pair

    async def main() -> None:
        a, b = channel_pair()
        got: list[tuple[dict[str, object], list[int], bool]] = []
        eof, arrived = asyncio.Event(), asyncio.Event()

        def on_message(m: dict[str, object], f: list[int], t: bool) -> None:
            got.append((m, f, t))
            arrived.set()

        ch_a = Channel(a, lambda m, f, t: None, lambda: None)
        ch_b = Channel(b, on_message, eof.set)
        ch_b.start()
        await asyncio.sleep(0.05)  # readable callbacks with nothing queued must not block
        f = tmp_path / "x"
        f.write_bytes(b"hello")
        fd = os.open(f, os.O_RDONLY)
        assert ch_a.send({"op": "view", "n": 1}, [fd])
        os.close(fd)
        await asyncio.wait_for(arrived.wait(), 5)
        (msg, fds, truncated), = got
        assert msg == {"op": "view", "n": 1} and not truncated and len(fds) == 1
        assert os.pread(fds[0], 5, 0) == b"hello"
        os.close(fds[0])
        ch_a.close()
        await asyncio.wait_for(eof.wait(), 5)
        ch_b.close()

    run(main())
