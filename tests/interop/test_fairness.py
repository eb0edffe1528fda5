"""One client must never stop the others: stalled readers, trickling writers, a crowd.

The hostile clients are raw sockets (scripts/nbd_hostile.py, a subprocess): they
pipeline READs and never read a reply, or send WRITE headers and trickle the
payloads.  Meanwhile real clients (nbdsh, qemu-io) must be served, their data
verified, and the children identical afterwards.  Each scenario runs with one
process and with ``--workers 1`` (connections spread over the primary and the
worker).  Memory checks are about bounded growth: the summed VmRSS of the
server's processes stays under the bound docs/performance.md states (534 MiB
whatever clients do), not about time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import (
    CLIENT_TIMEOUT,
    REPO_ROOT,
    MiB,
    Server,
    StartServer,
    assert_identical,
    nbdsh_command,
    output,
    qemu_io,
    read_at,
    run,
)

pytestmark = pytest.mark.timeout(300)

HOSTILE = REPO_ROOT / "scripts" / "nbd_hostile.py"
SIZE = 64 * MiB
#: docs/performance.md: summed VmRSS of the server's processes, whatever clients do
RSS_BOUND = 534 * MiB

SERVERS = {"one-process": [], "workers-1": ["--workers", "1"]}


@pytest.fixture(params=list(SERVERS))
def extra(request: pytest.FixtureRequest) -> list[str]:
    return list(SERVERS[request.param])


def random_images(tmp: Path, n: int = 3) -> list[Path]:
    """n identical children of random data (a read of the wrong bytes shows)."""
    data = os.urandom(SIZE)
    paths = []
    for i in range(n):
        p = tmp / f"c{i}.raw"
        p.write_bytes(data)
        paths.append(p)
    return paths


class Hostile:
    """scripts/nbd_hostile.py against the server's socket, until stopped."""

    def __init__(self, server: Server, mode: str, clients: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HOSTILE), "--socket", str(server.socket), "--mode", mode,
             "--clients", str(clients), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # after every handshake and first request
        if not line.startswith("ready"):
            self.proc.kill()
            _out, err = self.proc.communicate()
            pytest.fail(f"hostile clients did not start: {line!r} {err}", pytrace=False)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def hostiles() -> Iterator[list[Hostile]]:
    started: list[Hostile] = []
    yield started
    for h in started:
        if h.proc.poll() is None:
            h.stop()


def tree_rss(pid: int) -> int:
    """Summed VmRSS of a process and its children (the worker processes), in bytes."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def nbdsh_read(server: Server, offset: int, length: int, expect: bytes) -> None:
    """A libnbd client reads and checks; generous timeout: load must not flake it."""
    argv, env = nbdsh_command()
    script = (f"import hashlib\n"
              f"d = h.pread({length}, {offset})\n"
              f"assert hashlib.sha256(d).hexdigest() == {expect!r}, 'wrong data'\n"
              f"print('ok')\n")
    proc = run([*argv, "-u", server.uri(), "-c", script], env=env, timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0 and "ok" in proc.stdout, output(proc)


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_a_client_that_stops_reading_does_not_stop_another(
        start_server: StartServer, tmp_path: Path, extra: list[str],
        hostiles: list[Hostile]) -> None:
    """Client A pipelines 1 MiB READs and reads no reply; client B's 1 MiB read is served."""
    images = random_images(tmp_path)
    server = start_server("nbdquorum", images=images, extra=extra)
    assert server.proc is not None
    # one stalled client on each process (with --workers 1 the second goes to the worker)
    for _ in range(2):
        hostiles.append(Hostile(server, "stall", 1, "--length", "1M", "--total", "1G"))
    want = read_at(images[0], 5 * MiB, MiB)
    for _ in range(3):  # again and again: the stalled clients hold what they hold, no more
        nbdsh_read(server, 5 * MiB, MiB, sha(want))
    assert tree_rss(server.proc.pid) < RSS_BOUND


def test_trickling_payloads_hold_nothing_others_need(
        start_server: StartServer, tmp_path: Path, extra: list[str],
        hostiles: list[Hostile]) -> None:
    """Writes whose payloads trickle in (32 MiB each, 16 clients) while normal clients write."""
    images = random_images(tmp_path)
    server = start_server("nbdquorum", images=images, extra=extra)
    assert server.proc is not None
    hostiles.append(Hostile(server, "trickle", 16, "--length", "32M", "--rate", "256K"))
    # normal writes (up to the budget's floor: bigger ones may wait for the receive
    # half the trickling payloads hold), in the trickling writes' ranges (no range
    # lock is held), and a 4 MiB read
    for i, (offset, length) in enumerate([(0, 4096), (1 * MiB, MiB), (33 * MiB, 2 * MiB)]):
        qemu_io(server.uri(), f"write -P {0x40 + i} {offset} {length}",
                f"read -P {0x40 + i} {offset} {length}")
    qemu_io(server.uri(), f"read -P 0x42 {33 * MiB} {2 * MiB}", f"read 0 {4 * MiB}")
    assert tree_rss(server.proc.pid) < RSS_BOUND
    for h in hostiles:
        h.stop()  # the incomplete writes are dropped with their connections
    server.stop()
    assert server.returncode == 0, server.stderr()
    assert_identical(images)
    assert read_at(images[0], 1 * MiB, MiB) == bytes([0x41]) * MiB


def test_a_crowd_is_served_while_stalled_readers_and_trickling_writers_stay(
        start_server: StartServer, tmp_path: Path, extra: list[str],
        hostiles: list[Hostile]) -> None:
    """32 stalled readers and 32 trickling writers; 6 normal clients write and read back
    their own regions at once.  Data verified, children identical, memory bounded.

    The normal requests are 1 MiB at most: a request within the budget's floor never
    waits for other clients; bigger ones share the budget, which clients that stopped
    reading may hold (docs/performance.md)."""
    images = random_images(tmp_path)
    server = start_server("nbdquorum", images=images, extra=extra)
    assert server.proc is not None
    hostiles.append(Hostile(server, "stall", 32, "--length", "1M", "--total", "1G"))
    hostiles.append(Hostile(server, "trickle", 32, "--length", "32M", "--rate", "64K"))
    peak = tree_rss(server.proc.pid)
    errors: list[str] = []

    def client(i: int) -> None:
        base, pat = 8 * MiB * i, 0x10 + i
        cmds = [f"write -P {pat} {base + j * MiB} {MiB}" for j in range(4)]
        cmds += [f"write -P {pat} {base + 4 * MiB} 4096", f"write -P {pat} {base + 5 * MiB} 65536"]
        cmds += [f"read -P {pat} {base + j * MiB} {MiB}" for j in range(4)]
        cmds += [f"read -P {pat} {base + 4 * MiB} 4096", f"read -P {pat} {base + 5 * MiB} 65536"]
        try:
            proc = qemu_io(server.uri(), *cmds, check=False)
        except Exception as err:  # a timeout: reported by the test, not lost in the thread
            errors.append(f"client {i}: {err!r}")
            return
        text = output(proc)
        if proc.returncode != 0 or "failed" in text or "error" in text.lower():
            errors.append(f"client {i}: {text}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    want = read_at(images[0], 60 * MiB, MiB)
    nbdsh_read(server, 60 * MiB, MiB, sha(want))  # a libnbd client too, meanwhile
    for t in threads:
        t.join(CLIENT_TIMEOUT * 2)
        peak = max(peak, tree_rss(server.proc.pid))
    assert not errors, "\n".join(errors)
    assert peak < RSS_BOUND, f"summed VmRSS {peak >> 20} MiB"
    for h in hostiles:
        h.stop()
    server.stop()
    assert server.returncode == 0, server.stderr()
    assert_identical(images)
    for i in range(6):  # every client's writes are there
        assert read_at(images[0], 8 * MiB * i, 4 * MiB) == bytes([0x10 + i]) * 4 * MiB
