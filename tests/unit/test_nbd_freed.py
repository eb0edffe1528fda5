"""A connection that ended is freed at once, by reference counting, whatever its
client did: the chaos clients (tests/interop/test_chaos.py) and TLS's own
misbehaviours, over both event loops.

The server's cycle collector runs rarely (runtime.run_loop), so a connection left
in a reference cycle stays in memory long after its socket closed; over TLS that
is some 300 KiB each (the TLS layer's 256 KiB read buffer, OpenSSL's state), and
the chaos rounds grew by ~50 MiB a round.  Here the collector is off: a connection
whose objects are not gone soon after it ended is held by a cycle (or still
running: a socket closed in the middle of a TLS handshake once left its
connection waiting forever).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbdquorum.block.graph import Graph
from nbdquorum.block.quorum import QuorumNode
from nbdquorum.eventbus import EventBus
from nbdquorum.nbd.protocol import TLSMode
from nbdquorum.nbd.server import ClientLimits, Export, NBDServer, Stream
from nbdquorum.nbd.tls import TLSConfig, TLSContexts
from tests.ci import unavailable
from tests.interop import rawnbd
from tests.interop import test_chaos as chaos

pytestmark = pytest.mark.timeout(300)

#: a connection's objects are gone within this after its end (the loops free a
#: closed transport an iteration or two later; nothing waits for a timer)
FREED_WITHIN = 20.0


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            unavailable("uvloop (the `fast` extra) is not installed")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.fixture
def collector_off() -> Iterator[None]:
    """The collector off, and no log records made: pytest's capture keeps every
    record (and so the errors it names, their tracebacks, their frames) until the
    test ends, which the server's own stderr handler does not."""
    logging.disable(logging.CRITICAL)
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()
        logging.disable(logging.NOTSET)


def over_the_limit(open_: Callable[[Path], socket.socket], path: Path, rng: random.Random,
                   slot: int) -> None:
    """A second connection while --max-connections (1) are open: closed at once."""
    with open_(path):
        extra = rawnbd.open_socket(path, timeout=10)
        with extra:
            assert rawnbd.closed_by_peer(extra, 10)


def stuck_in_tls_handshake(open_: Callable[[Path], socket.socket], path: Path,
                           rng: random.Random, slot: int) -> None:
    """Part of a ClientHello, then silence until the handshake timeout drops it."""
    _stuck_client(path, True)


def _quorum(tmp_path: Path) -> tuple[Graph, QuorumNode]:
    bus = EventBus()
    g = Graph(bus)
    kids = [g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"), create_size=chaos.SIZE)
            for i in range(3)]
    q = QuorumNode("q0", kids, vote_threshold=2, bus=bus)
    g.add(q)
    return g, q


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_connection_is_freed_when_it_ends(tmp_path: Path, loop_kind: str, tls: bool,
                                            collector_off: None) -> None:
    loop = new_loop(loop_kind)
    transport = chaos.TLS_TRANSPORT if tls else chaos.CHAOS_TRANSPORTS["plain"]
    behaviours = [*dict.fromkeys(chaos.BEHAVIOURS), *transport.behaviours, over_the_limit]
    if tls:
        behaviours.append(stuck_in_tls_handshake)
    streams: list[weakref.ref[Stream]] = []

    class Tracking(NBDServer):
        def _stream(self) -> Stream:
            stream = super()._stream()
            streams.append(weakref.ref(stream))
            return stream

    g, q = _quorum(tmp_path)
    path = tmp_path / "nbd.sock"
    contexts = (TLSContexts(TLSConfig(TLSMode.ON, str(chaos.pki() / "server")))
                if tls else None)

    async def until_freed(nbd: NBDServer, what: str) -> None:
        deadline = time.monotonic() + FREED_WITHIN
        while nbd.connections or any(r() is not None for r in streams):
            if time.monotonic() > deadline:
                left = [s for s in (r() for r in streams) if s is not None]
                raise AssertionError(
                    f"{what}: {len(nbd.connections)} connection(s) still running, "
                    f"{len(left)} of {len(streams)} ended but not freed "
                    f"(lost: {[s._lost for s in left]})")
            await asyncio.sleep(0.05)
        assert nbd.open_clients == 0, f"{what}: a --max-connections place not given back"

    async def main() -> None:
        nbd = Tracking({"disk": Export("disk", q)}, "disk", tls=contexts, max_connections=1,
                       limits=ClientLimits(handshake_timeout=0.5))
        await nbd.listen_unix(str(path))
        for seed, behaviour in enumerate(behaviours):
            def client(behaviour: chaos.Behaviour = behaviour, seed: int = seed) -> None:
                try:
                    behaviour(transport.open, path, random.Random(seed), 0)
                except (OSError, ConnectionError):
                    pass  # closed by the server: its right
            await asyncio.get_running_loop().run_in_executor(None, client)
            await until_freed(nbd, behaviour.__name__)
        assert len(streams) >= len(behaviours)
        # a stop drops a client stuck in its TLS handshake (or its option haggling)
        greeted = threading.Event()
        stuck = threading.Thread(target=_stuck_client, args=(path, tls, greeted))
        stuck.start()
        assert await asyncio.get_running_loop().run_in_executor(None, greeted.wait, 10)
        assert nbd.connections
        await nbd.shutdown(grace=5)
        await until_freed(nbd, "shutdown")
        await asyncio.get_running_loop().run_in_executor(None, stuck.join)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
        g.close()


def _stuck_client(path: Path, tls: bool, greeted: threading.Event | None = None) -> None:
    try:
        sock = chaos._starttls(path) if tls else chaos._plain(path)
        if greeted is not None:
            greeted.set()
        with sock:
            if tls:
                sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello
            rawnbd.closed_by_peer(sock, 10)
    except OSError:
        pass
