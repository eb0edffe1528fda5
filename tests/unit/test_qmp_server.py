"""The asyncio QMP server on a real Unix socket: clients, events, throttling, hangups."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import QuorumNode
from nbdquorum.eventbus import EventBus
from nbdquorum.qmp import commands, server
from nbdquorum.qmp.server import QMPServer
from nbdquorum.qmp.throttle import EventThrottle

SIZE = 1 << 20
TIMEOUT = 10.0


def run(coro: Awaitable[Any]) -> Any:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, 60))
    finally:
        loop.close()


class Client:
    """A minimal asyncio QMP client that keeps events apart from replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._id = 0

    @classmethod
    async def connect(cls, path: Path, negotiate: bool = True) -> Client:
        reader, writer = await asyncio.open_unix_connection(str(path))
        c = cls(reader, writer)
        c.greeting = await c.recv()
        if negotiate:
            assert await c.cmd("qmp_capabilities") == {"return": {}, "id": c._id}
        return c

    async def recv(self) -> dict[str, Any]:
        line = await asyncio.wait_for(self.reader.readline(), TIMEOUT)
        assert line.endswith(b"\r\n"), line
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = await self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    async def cmd(self, name: str, **arguments: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"execute": name, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        await self.send_raw(json.dumps(msg).encode() + b"\n")
        return await self.reply()

    async def event(self) -> dict[str, Any]:
        if self.events:
            return self.events.pop(0)
        msg = await self.recv()
        assert "event" in msg, msg
        return msg

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class Rig:
    def __init__(self, tmp: Path, throttle: EventThrottle | None = None) -> None:
        self.tmp = tmp
        self.path = tmp / "qmp.sock"
        self.bus = EventBus()
        self.graph = Graph(self.bus)
        kids: list[BlockNode] = [
            self.graph.open_raw_file(f"child{i}", str(tmp / f"c{i}.raw"), create_size=SIZE)
            for i in range(3)
        ]
        self.graph.add(QuorumNode("quorum0", kids, vote_threshold=2, bus=self.bus))
        self.server = QMPServer(self.graph, self.bus, throttle=throttle)
        self.quits = 0

        def on_quit() -> None:
            self.quits += 1

        self.server.on_quit = on_quit

    async def __aenter__(self) -> Rig:
        await self.server.listen_unix(str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.shutdown()
        self.graph.close()

    def bad(self, node: str, sector: int = 0) -> None:
        self.bus.emit("QUORUM_REPORT_BAD", {"node-name": node, "sectors-count": 8,
                                            "sector-num": sector, "type": "read"})


async def until(pred: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not pred():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


# --------------------------------------------------------------------------- socket


def test_socket_is_private_and_removed_on_shutdown(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            mode = os.stat(rig.path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            assert not [p for p in os.listdir(tmp_path) if p.endswith("~")]
        assert not rig.path.exists()

    run(main())


def test_stale_socket_is_replaced_but_a_live_one_is_not(tmp_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "qmp.sock"))
    stale.close()  # bound, never listening: stale

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            other = QMPServer(rig.graph, rig.bus)
            with pytest.raises(OSError, match="in use"):
                await other.listen_unix(str(rig.path))
            c = await Client.connect(rig.path)
            await c.close()

    run(main())


def test_a_regular_file_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "qmp.sock").write_text("precious")

    async def main() -> None:
        with pytest.raises(OSError, match="not a socket"):
            async with Rig(tmp_path):
                pass

    run(main())
    assert (tmp_path / "qmp.sock").read_text() == "precious"


# --------------------------------------------------------------------------- sessions


def test_greeting_negotiation_and_a_command(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path, negotiate=False)
            assert c.greeting == {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1,
                                                               "major": 0},
                                                      "package": "nbdquorum 0.1.0"},
                                          "capabilities": ["oob"]}}
            r = await c.cmd("query-version")
            assert r["error"]["class"] == "CommandNotFound"
            assert (await c.cmd("qmp_capabilities", enable=["oob"]))["return"] == {}
            r = await c.cmd("query-quorum-status")
            assert r["return"][0]["node-name"] == "quorum0"
            await c.close()

    run(main())


def test_bad_input_then_the_monitor_keeps_working(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path)
            await c.send_raw(b'{ "execute": }\n[1]\n{"execute": "quit", "bogus": 1, "id": 3}\n')
            assert await c.reply() == {"error": {"class": "GenericError",
                                                 "desc": "JSON parse error, expecting value"}}
            assert (await c.reply())["error"]["desc"] == "QMP input must be a JSON object"
            assert await c.reply() == {"id": 3, "error": {
                "class": "GenericError", "desc": "QMP input member 'bogus' is unexpected"}}
            await c.send_raw(b'{"execute": "x", "arguments": {"a": "' + b"y" * (1 << 20)
                             + b'"}, "id": 4}\n')
            assert (await c.reply())["error"]["desc"] == "The command x has not been found"
            assert "return" in await c.cmd("query-version")
            await c.close()
            assert rig.quits == 0

    run(main())


def test_twenty_clients_at_once(tmp_path: Path) -> None:
    async def one(rig: Rig, i: int) -> None:
        c = await Client.connect(rig.path)
        for _ in range(5):
            r = await c.cmd("query-named-block-nodes")
            assert {n["node-name"] for n in r["return"]} >= {"quorum0", "child0"}
        r = await c.cmd("x-blockdev-change", parent="quorum0")
        assert r["error"]["desc"] == "Either child or node must be specified"
        await c.close()

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            await asyncio.gather(*(one(rig, i) for i in range(20)))
            await until(lambda: rig.server.clients == 0, "all clients gone")

    run(main())


def test_client_that_vanishes_mid_command(tmp_path: Path, monkeypatch: Any) -> None:
    started = asyncio.Event()
    release = asyncio.Event()

    async def slow(ctx: commands.Context) -> dict[str, Any]:
        started.set()
        await release.wait()
        return {}

    monkeypatch.setitem(commands.HANDLERS, "query-version", slow)

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path)
            await c.send_raw(b'{"execute": "query-version", "id": 1}\n')
            await asyncio.wait_for(started.wait(), TIMEOUT)
            c.writer.transport.abort()  # gone, reply pending
            release.set()
            await until(lambda: rig.server.clients == 0, "the vanished client to be reaped")
            d = await Client.connect(rig.path)
            assert "return" in await d.cmd("query-commands")
            await d.close()

    run(main())


def test_half_sent_command_then_hangup(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path)
            await c.send_raw(b'{"execute": "blockdev-del", "argu')
            await c.close()
            await until(lambda: rig.server.clients == 0, "the client to be reaped")
            assert "child0" in rig.graph

    run(main())


def test_quit_replies_first_then_stops(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path)
            assert await c.cmd("quit") == {"return": {}, "id": 2}
            await until(lambda: rig.quits == 1, "on_quit")
            await c.close()

    run(main())


# --------------------------------------------------------------------------- events


def test_events_go_to_every_negotiated_client_only(tmp_path: Path) -> None:
    async def main() -> None:
        async with Rig(tmp_path) as rig:
            a = await Client.connect(rig.path)
            b = await Client.connect(rig.path)
            lurker = await Client.connect(rig.path, negotiate=False)
            rig.bus.emit("JOB_STATUS_CHANGE", {"status": "running", "id": "j"})
            for c in (a, b):
                ev = await c.event()
                assert ev["event"] == "JOB_STATUS_CHANGE"
                assert ev["data"] == {"status": "running", "id": "j"}
                assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            # the lurker got nothing: its next message is the reply to its negotiation
            r = await lurker.cmd("qmp_capabilities")
            assert r == {"return": {}, "id": 1}
            for c in (a, b, lurker):
                await c.close()

    run(main())


def stamp(ev: dict[str, Any]) -> float:
    return float(ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6)


def test_throttle_is_per_server_and_delivers_the_last_late(tmp_path: Path) -> None:
    period = 0.3

    async def main() -> None:
        throttle = EventThrottle({"QUORUM_REPORT_BAD": period, "QUORUM_FAILURE": period})
        async with Rig(tmp_path, throttle) as rig:
            a = await Client.connect(rig.path)
            b = await Client.connect(rig.path)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            for sector in range(4):
                rig.bad("child1", sector)
            rig.bad("child2", 99)
            for c in (a, b):
                evs = [await c.event() for _ in range(3)]
                got = [(e["data"]["node-name"], e["data"]["sector-num"]) for e in evs]
                assert got == [("child1", 0), ("child2", 99), ("child1", 3)]
                # the late one keeps its own timestamp, taken when it was emitted
                assert stamp(evs[2]) - stamp(evs[0]) < period / 2
            assert loop.time() - t0 >= period * 0.9
            await until(lambda: rig.server._throttle.next_deadline() is None, "windows to close")
            for c in (a, b):
                await c.close()

    run(main())


def test_a_client_that_does_not_read_is_dropped(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(server, "MAX_UNSENT", 64 << 10)

    async def main() -> None:
        async with Rig(tmp_path) as rig:
            sleeper = await Client.connect(rig.path)
            reader = await Client.connect(rig.path)
            received = 0

            async def consume() -> None:
                nonlocal received
                while True:
                    await reader.recv()
                    received += 1

            task = asyncio.create_task(consume())
            pad = "x" * 1000
            for i in range(2000):
                rig.bus.emit("JOB_STATUS_CHANGE", {"status": "running", "id": f"j{i}{pad}"})
                if i % 20 == 19:  # keep the reader close behind
                    floor = i - 40
                    await until(lambda: received > floor, "the reader to keep up")  # noqa: B023
            await until(lambda: rig.server.clients == 1, "the sleeper to be dropped")
            await until(lambda: received == 2000, "the reader to get every event")
            task.cancel()
            await reader.close()
            await sleeper.close()

    run(main())


def test_a_due_throttle_deadline_under_uvloop(tmp_path: Path, caplog: Any) -> None:
    """uvloop's call_at gives a plain Handle (no when()) for a deadline already due:
    a burst of events that arms such a deadline, then re-arms it, keeps flowing."""
    import uvloop  # the `fast` extra, installed with the tests

    async def main() -> None:
        # a window far shorter than uvloop's millisecond clock: due as soon as armed
        throttle = EventThrottle({"QUORUM_REPORT_BAD": 1.0, "QUORUM_FAILURE": 1e-6})
        async with Rig(tmp_path, throttle) as rig:
            c = await Client.connect(rig.path)
            rig.bad("child1", 0)  # a long window: the timer armed for it
            for n in range(3):  # the first opens a window that is due at once
                rig.bus.emit("QUORUM_FAILURE", {"reference": "quorum0", "sector-num": n,
                                                "sectors-count": 8})
            got = [await c.event() for _ in range(3)]
            assert [e["event"] for e in got] == ["QUORUM_REPORT_BAD", "QUORUM_FAILURE",
                                                 "QUORUM_FAILURE"]
            # the first of the burst at once, then the last once its window ended
            assert [e["data"]["sector-num"] for e in got[1:]] == [0, 2]
            await c.close()

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
    # the event path raised nothing (the bus logs what a listener raises)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_a_command_still_running_at_shutdown_is_cancelled_without_a_traceback(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A command that outlives the shutdown's wait (blockdev-add of an NBD node whose
    host does not answer) has its client's task cancelled: that must end the
    connection quietly, not make asyncio report an exception from the stream's
    own done callback (which Python 3.11 does for a cancelled client task)."""
    started = asyncio.Event()
    reported: list[dict[str, Any]] = []

    async def hangs(ctx: commands.Context) -> dict[str, Any]:
        started.set()
        await asyncio.Event().wait()
        return {}

    monkeypatch.setitem(commands.HANDLERS, "query-version", hangs)

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, ctx: reported.append(ctx))
        async with Rig(tmp_path) as rig:
            c = await Client.connect(rig.path)
            await c.send_raw(b'{"execute": "query-version", "id": 1}\n')
            await asyncio.wait_for(started.wait(), TIMEOUT)
        assert rig.server.clients == 0
        await asyncio.sleep(0)
        await c.close()

    run(main())
    assert reported == []
