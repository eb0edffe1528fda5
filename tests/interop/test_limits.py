"""Limits that protect a server facing a network: the handshake timeout,
--max-connections (counted over the worker processes), idle connections that
cost little and slow nobody, the Unix socket's mode and group, and a QMP
socket that answers through a flood of NBD connections."""

from __future__ import annotations

import grp
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.ci import unavailable

from . import rawnbd
from .conftest import (
    EVENT_TIMEOUT,
    QmpEventReader,
    Server,
    StartServer,
    make_image,
    nbdquorum_cli,
    qemu_io,
    wait_until,
)

pytestmark = pytest.mark.timeout(240)

WORKERS = ["--workers", "2", "--workers-take-all"]


def pid_of(server: Server) -> int:
    assert server.proc is not None
    return server.proc.pid


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_handshake_timeout_drops_a_client_that_does_not_negotiate(
        start_server: StartServer, workers: bool) -> None:
    server = start_server(extra=["--handshake-timeout", "1", *(WORKERS if workers else [])])
    silent = rawnbd.open_socket(server.socket)  # connects, never reads or writes
    halfway = rawnbd.open_socket(server.socket)
    rawnbd.greeting(halfway)
    halfway.sendall(b"\x00\x00\x00\x03")  # client flags, then no option
    done = rawnbd.connect(server.socket)  # chose its export in time: never dropped
    for sock in (silent, halfway):
        assert rawnbd.closed_by_peer(sock, 60), "a client still negotiating was not dropped"
        sock.close()
    time.sleep(2)  # (twice the timeout: a timer left running would have fired)
    assert rawnbd.read(done, 0, 4096) == bytes(4096)
    done.close()
    assert "handshake not finished within 1s" in server.stderr()
    # the workers' own connections to the primary are not clients: writes are
    # forwarded over them long after the timeout
    qemu_io(server.uri(), "write -P 0x3c 0 64k", "read -P 0x3c 0 64k")


def test_handshake_timeout_zero_never_drops(start_server: StartServer) -> None:
    server = start_server(extra=["--handshake-timeout", "0"])
    silent = rawnbd.open_socket(server.socket)
    assert not rawnbd.closed_by_peer(silent, 3)
    silent.close()


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_max_connections_closes_the_one_too_many(
        start_server: StartServer, workers: bool) -> None:
    server = start_server(extra=["--max-connections", "3", *(WORKERS if workers else [])])
    held: list[socket.socket] = []

    def admitted() -> bool:  # room once a close is counted (a worker reports it)
        sock = rawnbd.open_socket(server.socket)
        try:
            rawnbd.negotiate(sock)
        except (ConnectionError, OSError):
            sock.close()
            return False
        held.append(sock)
        return True

    # the fixture's own probe connection counts until its close is reported (with
    # workers, a moment after it closed): the three are admitted once it is
    for _ in range(3):
        wait_until(admitted, 30, "a connection admitted below the limit")
    extra = rawnbd.open_socket(server.socket)
    with pytest.raises((ConnectionError, OSError)):
        rawnbd.greeting(extra)  # closed without a greeting
    extra.close()
    assert "client connections open (--max-connections): closing a new one" in server.stderr()
    # the three are served all along
    for i, sock in enumerate(held):
        assert rawnbd.read(sock, i * 4096, 4096, cookie=i) == bytes(4096)
    held.pop().close()
    wait_until(admitted, 30, "a connection admitted after one closed")
    assert rawnbd.read(held[-1], 0, 512) == bytes(512)
    for sock in held:
        sock.close()


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_hundreds_of_idle_connections_slow_nobody(
        start_server: StartServer, workers: bool) -> None:
    """300 idle connections (half still negotiating, half with their export) while
    a real client writes and reads; each idle one costs a few KiB, not a buffer."""
    server = start_server(extra=["--handshake-timeout", "600", *(WORKERS if workers else [])])
    pid = pid_of(server)
    warm = rawnbd.connect(server.socket)
    rawnbd.read(warm, 0, 4096)
    warm.close()
    before = rawnbd.vm_rss(pid)
    negotiated = [rawnbd.connect(server.socket) for _ in range(150)]
    negotiating = [rawnbd.open_socket(server.socket) for _ in range(150)]
    for sock in negotiating:
        rawnbd.greeting(sock)
    qemu_io(server.uri(), "write -P 0x77 1M 1M", "read -P 0x77 1M 1M", "read -P 0 0 1M")
    if not workers:  # all 300 in this process: what one costs here
        per_conn = (rawnbd.vm_rss(pid) - before) / 300
        print(f"RSS per idle connection: {per_conn / 1024:.1f} KiB")
        assert per_conn < 32 * 1024, f"an idle connection costs {per_conn / 1024:.0f} KiB"
    # none of them was dropped or starved: each is served in turn
    for i, sock in enumerate(negotiated):
        assert rawnbd.read(sock, 1 << 20, 512, cookie=i) == b"\x77" * 512
    for sock in negotiating:
        sock.sendall(b"\x00\x00\x00\x03")
    for sock in negotiated + negotiating:
        sock.close()


def test_socket_mode_and_group(start_server: StartServer) -> None:
    group = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), None)
    if group is None:
        unavailable("no other group on this machine")
    server = start_server(extra=["--socket-mode", "0660", "--socket-group", group.gr_name,
                                 "--control", "qmp.sock"])
    st = os.stat(server.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    assert stat.S_IMODE(os.stat(server.tmp / "qmp.sock").st_mode) == 0o600  # unchanged
    qemu_io(server.uri(), "write -P 1 0 4k", "read -P 1 0 4k")


@pytest.mark.parametrize("args, needle", [
    (["--socket-mode", "0999"], "octal mode"),
    (["--socket-mode", "01777"], "0..0777"),
    (["--socket-group", "no-such-group-here"], "no such group"),
    (["--max-connections", "-1"], "--max-connections"),
    (["--handshake-timeout", "-1"], "--handshake-timeout"),
])
def test_bad_limit_options_are_one_line_errors(
        tmp_path: Path, args: list[str], needle: str) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    proc = nbdquorum_cli("serve", *[a for p in images for a in ("--child", str(p))],
                         "--socket", str(tmp_path / "s.sock"), *args)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_socket_mode_needs_a_socket(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    proc = nbdquorum_cli("serve", *[a for p in images for a in ("--child", str(p))],
                         "--socket-mode", "0600")
    assert proc.returncode != 0 and "need --socket" in proc.stderr, proc.stderr


def open_qmp(path: Path) -> QmpEventReader:
    """The QMP client, once the socket accepts (it is served after the NBD one)."""

    def attempt() -> QmpEventReader | None:
        try:
            return QmpEventReader(path)
        except OSError:
            return None

    reader: QmpEventReader = wait_until(attempt, 30, f"QMP on {path}")
    return reader


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_qmp_answers_during_a_connection_flood(
        start_server: StartServer, workers: bool) -> None:
    server = start_server(extra=["--control", "qmp.sock", "--max-connections", "100",
                                 *(WORKERS if workers else [])])
    qmp = open_qmp(server.tmp / "qmp.sock")
    stop = threading.Event()
    opened = [0]

    def flood() -> None:
        held: list[socket.socket] = []
        while not stop.is_set():
            try:
                held.append(rawnbd.open_socket(server.socket, timeout=5))
                opened[0] += 1
            except OSError:
                pass
            if len(held) > 300:  # keep the client's own descriptors bounded
                for s in held[:100]:
                    s.close()
                del held[:100]
        for s in held:
            s.close()

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: opened[0] > 500, 60, "the flood to get going")
        for _ in range(5):
            t0 = time.monotonic()
            assert qmp.command("query-version")["package"].startswith("nbdquorum")
            # generous: a bound on starvation, not a speed claim
            assert time.monotonic() - t0 < EVENT_TIMEOUT
            time.sleep(0.2)
        # a new QMP client is accepted during the flood as well
        second = QmpEventReader(server.tmp / "qmp.sock")
        assert second.command("query-version")
        second.close()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        qmp.close()
    assert server.alive()
    qemu_io(server.uri(), "write -P 9 0 64k", "read -P 9 0 64k")
