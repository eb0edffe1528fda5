"""Worker processes (``serve --workers N``) with real clients and real process deaths.

Every scenario of the interop suite that takes the ``target`` fixture also runs as
``nbdquorum-workers`` (two workers that take every connection).  Here: what only
exists with several processes: connections spread over them, overlapping writes from
several connections (all forwarded, ordered by the primary), a view change pushed to
the workers, local reads counted by the primary, a worker killed, the primary killed.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.worker.pool import RESPAWN_DELAY
from tests.ci import unavailable
from tests.interop.conftest import (
    REPO_ROOT,
    MiB,
    NbdquorumServer,
    StartServer,
    assert_identical,
    assert_pattern,
    corrupt,
    make_image,
    nbdquorum_env,
    qemu_io,
    read_at,
    require_libnbd,
    wait_until,
)
from tests.interop.qmp_fixtures import arun, execute, qmp_client
from tests.interop.test_copy import Inflight

pytestmark = pytest.mark.timeout(120)

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def worker_pids(stderr: str) -> dict[int, int]:
    """The latest pid of each worker, from the primary's log."""
    return {int(i): int(pid) for i, pid in STARTED.findall(stderr)}


def served_by(stderr: str, worker: int) -> int:
    """Connections a worker logged (the -vv debug line of each new connection)."""
    return len(re.findall(rf"conn\d+\[w{worker}\]: connected", stderr))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_connections_spread_over_the_processes(start_server: StartServer) -> None:
    nbd = require_libnbd()
    server = start_server("nbdquorum", extra=["--workers", "2", "-vv"])
    handles = []
    for i in range(5):
        h = nbd.NBD()
        h.connect_uri(server.uri())
        h.pwrite(bytes([i + 1]) * 65536, i * MiB)
        handles.append(h)
    for h in handles:
        for j in range(5):  # every connection sees every other's writes
            assert h.pread(65536, j * MiB) == bytes([j + 1]) * 65536
    for h in handles:
        h.shutdown()
    log = server.stderr()
    # the primary takes the first connection and ties; each worker gets its share
    assert served_by(log, 1) >= 1 and served_by(log, 2) >= 1, log
    assert_identical(server.images)


@pytest.mark.timeout(180)
def test_overlapping_writes_from_many_connections_keep_the_children_identical(
    start_server: StartServer,
) -> None:
    """Four connections on two workers write over each other; every write is forwarded
    to the primary, whose range lock orders them the same way on every child."""
    nbd = require_libnbd()
    server = start_server("nbdquorum", size=8 * MiB,
                          extra=["--workers", "2", "--workers-take-all"])
    rng = random.Random(77)
    handles = []
    for _ in range(4):
        h = nbd.NBD()
        h.connect_uri(server.uri())
        handles.append(h)
    try:
        for _round in range(3):
            ios = [Inflight(h, nbd) for h in handles]
            for io in ios:
                for _ in range(64):
                    offset = rng.randrange(0, MiB - 512) // 512 * 512 + rng.choice([0, 1, 511])
                    length = min(rng.choice([512, 4096, 65536, 262_144]), MiB - offset)
                    io.pwrite(rng.randbytes(length), offset)
            for io in ios:
                io.wait(64)
        handles[0].flush()
        seen = [bytes(h.pread(MiB, 0)) for h in handles]
    finally:
        for h in handles:
            h.shutdown()
    assert_identical(server.images)
    assert all(s == seen[0] for s in seen)
    assert read_at(server.images[0], 0, MiB) == seen[0]


def test_a_mismatch_seen_by_a_worker_is_reported_and_repaired_by_the_primary(
    start_server: StartServer,
) -> None:
    server = start_server("nbdquorum", rewrite_corrupted=True,
                          extra=["--workers", "1", "--workers-take-all", "-vv"])
    qemu_io(server.uri(), "write -P 0x3c 0 1M")
    corrupt(server.images[2], 4096, 512, 0xEE)
    qemu_io(server.uri(), "read -P 0x3c 0 1M")
    server.wait_event("QUORUM_REPORT_BAD", **{"node-name": "child2", "type": "read"})
    assert_pattern(server.images[2], 0, MiB, 0x3C)  # rewritten with the winning bytes
    assert served_by(server.stderr(), 1) >= 2


def test_the_view_follows_a_removed_child(start_server: StartServer, tmp_path: Path) -> None:
    """After x-blockdev-change removes a child, a worker no longer reads it: corrupting
    the removed image changes nothing and reports nothing."""
    qmp_path = tmp_path / "qmp.sock"
    server = start_server("nbdquorum", extra=["--workers", "1", "--workers-take-all",
                                              "--control", str(qmp_path)])
    qemu_io(server.uri(), "write -P 0x5d 0 2M")

    async def remove() -> None:
        async with qmp_client(qmp_path) as qmp:
            await execute(qmp, "x-blockdev-change", {"parent": "quorum0", "child": "children.2"})

    arun(remove())
    corrupt(server.images[2], 0, 2 * MiB, 0x00)
    qemu_io(server.uri(), "read -P 0x5d 0 2M", "read -P 0x5d 4096 4096")
    assert not [e for e in server.final_events() if e["event"] == "QUORUM_REPORT_BAD"]


def test_reads_answered_by_a_worker_are_counted_by_the_primary(
    start_server: StartServer, tmp_path: Path,
) -> None:
    qmp_path = tmp_path / "qmp.sock"
    server = start_server("nbdquorum", extra=["--workers", "1", "--workers-take-all",
                                              "--control", str(qmp_path)])
    qemu_io(server.uri(), *[f"read {i * 4096} 4096" for i in range(50)], read_only=True)

    async def reads() -> list[int]:
        async with qmp_client(qmp_path) as qmp:
            status = await execute(qmp, "query-quorum-status")
        return [c["reads"] for c in status[0]["children"]]

    # workers report their counts once a second
    counts = wait_until(lambda: (lambda r: r if min(r) >= 50 else None)(arun(reads())), 10,
                        "the worker's read counts in query-quorum-status")
    assert len(counts) == 3


def test_a_worker_that_dies_is_replaced(start_server: StartServer) -> None:
    server = start_server("nbdquorum", extra=["--workers", "1", "--workers-take-all", "-vv"])
    qemu_io(server.uri(), "write -P 0x61 0 1M")
    pid = worker_pids(server.stderr())[1]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "worker 1 exited unexpectedly" in server.stderr(), 10, "the death noted")
    # meanwhile the primary serves; acknowledged data is intact
    qemu_io(server.uri(), "read -P 0x61 0 1M", "write -P 0x62 1M 1M")
    wait_until(lambda: worker_pids(server.stderr()).get(1, pid) != pid, 15, "a new worker 1")
    wait_until(lambda: server.stderr().count("worker 1 ready") == 2, 10, "the new worker ready")
    before = served_by(server.stderr(), 1)
    qemu_io(server.uri(), "read -P 0x61 0 1M", "read -P 0x62 1M 1M")
    wait_until(lambda: served_by(server.stderr(), 1) > before, 10, "the new worker serving")
    assert_identical(server.images)


def test_the_workers_go_when_the_primary_dies(start_server: StartServer) -> None:
    server = start_server("nbdquorum", extra=["--workers", "2"])
    pids = list(worker_pids(server.stderr()).values())
    assert len(pids) == 2 and all(pid_alive(p) for p in pids)
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    server.returncode = 0  # killed on purpose; nothing to check at teardown
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "the workers to exit")


def test_sigterm_stops_workers_after_their_requests(start_server: StartServer) -> None:
    nbd = require_libnbd()
    server = start_server("nbdquorum", extra=["--workers", "1", "--workers-take-all"])
    pids = list(worker_pids(server.stderr()).values())
    h = nbd.NBD()
    h.connect_uri(server.uri())
    io = Inflight(h, nbd)
    for i in range(64):
        io.pwrite(bytes([i]) * 65536, i * 65536)
    io.wait(64)
    h.flush()
    h.shutdown()
    assert server.stop() == 0, server.stderr()
    assert not any(pid_alive(p) for p in pids)
    for i in range(0, 64, 7):
        assert_pattern(server.images[1], i * 65536, 65536, i)


# ------------------------------------------------------------ where workers import from


class _Started(NbdquorumServer):
    """nbdquorum serve started by ``prefix`` (instead of ``python -m nbdquorum``)."""

    def __init__(self, tmp: Path, prefix: list[str], env: dict[str, str], **kw: Any) -> None:
        self.prefix = prefix
        self._env = env
        images = [make_image(tmp.parent / f"{tmp.name}-c{i}.raw") for i in range(3)]
        super().__init__(tmp, images, [f"child{i}" for i in range(3)], vote_threshold=None,
                         read_pattern=None, rewrite_corrupted=False, read_only=False,
                         listen=None, **kw)

    def argv(self) -> list[str]:
        return self.prefix + super().argv()[3:]  # past "python -m nbdquorum"

    def env(self) -> dict[str, str]:
        return self._env


@pytest.fixture
def started() -> Iterator[list[_Started]]:
    servers: list[_Started] = []
    yield servers
    for s in servers:
        try:
            s.reap()
        finally:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


def _decoy(cwd: Path) -> None:
    """A folder named nbdquorum in the server's directory, which must never be imported."""
    (cwd / "nbdquorum").mkdir(parents=True)
    (cwd / "nbdquorum" / "__init__.py").write_text(
        "raise ImportError('the decoy nbdquorum in the current directory was imported')\n")
    (cwd / "nbdquorum" / "worker").mkdir()
    (cwd / "nbdquorum" / "worker" / "__init__.py").write_text("")


@pytest.mark.parametrize("how", ["python-m", "console-script"])
def test_workers_import_the_primarys_package_whatever_the_directory(
    tmp_path: Path, started: list[_Started], how: str,
) -> None:
    """Started from a directory holding a folder named nbdquorum, the workers still
    import the package the primary runs (the checkout, directly or through the editable
    install's console script) and serve."""
    cwd = tmp_path / "elsewhere"
    _decoy(cwd)
    env = nbdquorum_env()
    if how == "python-m":
        # -P: the primary itself must not import the decoy either
        prefix = [sys.executable, "-P", "-m", "nbdquorum"]
    else:
        script = Path(sys.executable).parent / "nbdquorum"
        if not script.exists():
            unavailable(f"{script} (the editable install's console script) is missing")
        prefix = [str(script)]
        env.pop("PYTHONPATH", None)
    server = _Started(cwd, prefix, env,
                      extra=["--workers", "1", "--workers-take-all", "-vv"])
    started.append(server)
    server.start()
    wait_until(lambda: "worker 1 ready" in server.stderr(), 30, "worker 1 to report in")
    qemu_io(server.uri(), "write -P 0x4e 0 1M", "read -P 0x4e 0 1M")
    log = server.stderr()
    assert served_by(log, 1) >= 1, log
    assert "ImportError" not in log and "decoy" not in log, log
    assert "1 of 1 worker process(es) running" in log, log


def test_a_worker_that_cannot_start_is_one_line_and_not_restarted(
    tmp_path: Path, started: list[_Started],
) -> None:
    """A package whose worker module cannot be imported (here: broken on purpose in a
    copy of the package): one clear line naming the cause, no traceback, no restarts
    every few seconds, and the server says that no worker runs while it serves alone."""
    copy = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "nbdquorum", copy / "nbdquorum",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "nbdquorum" / "worker" / "main.py").write_text(
        "raise ImportError('this worker module is broken on purpose')\n")
    env = nbdquorum_env()
    env["PYTHONPATH"] = str(copy)
    cwd = tmp_path / "run"
    cwd.mkdir()
    server = _Started(cwd, [sys.executable, "-P", "-m", "nbdquorum"], env,
                      extra=["--workers", "1"])
    started.append(server)
    server.start()
    wait_until(lambda: "cannot start" in server.stderr(), 30, "the worker's failure logged")
    qemu_io(server.uri(), "write -P 0x17 0 1M", "read -P 0x17 0 1M")  # served by the primary
    # a restarted worker would have come back after RESPAWN_DELAY * 2 seconds
    time.sleep(RESPAWN_DELAY * 2 + 1)
    log = server.stderr()
    lines = [ln for ln in log.splitlines() if "broken on purpose" in ln]
    assert len(lines) == 1, log
    assert "worker 1 cannot start: ImportError: this worker module is broken on purpose" \
        in lines[0], lines
    assert [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln] == lines
    assert "0 of 1 worker process(es) running" in log, log
    assert "Traceback" not in log and "exited unexpectedly" not in log, log
    assert len(worker_pids(log)) == 1 and log.count("worker 1 started") == 1, log
