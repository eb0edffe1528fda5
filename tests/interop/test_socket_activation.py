"""systemd socket activation through systemd's own ``systemd-socket-activate``: it
listens, waits for the first connection, then starts ``nbdquorum serve`` with the
socket (LISTEN_FDS/LISTEN_PID); that first connection is served, the server
serves exactly the inherited sockets, its workers never see LISTEN_*, and the
socket file (systemd's) survives the server."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from . import rawnbd
from .conftest import (
    REPO_ROOT,
    STOP_TIMEOUT,
    free_tcp_port,
    make_image,
    nbd_uri,
    nbdinfo_json,
    output,
    qemu_io,
    require,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


class Activated:
    """``systemd-socket-activate -l ADDRESS ... python -m nbdquorum serve ARGS``."""

    def __init__(self, tmp: Path, listen: str, *args: str, accept: bool = False) -> None:
        self.tmp = tmp
        self.images = [make_image(tmp / f"c{i}.raw") for i in range(3)]
        self.stderr_path = tmp / "serve.stderr"
        argv = [require("systemd-socket-activate"), "-l", listen,
                # it passes on no environment but these (and HOME, PATH, TERM)
                "-E", f"PYTHONPATH={REPO_ROOT}", "-E", "PYTHONUNBUFFERED=1",
                *(["--accept"] if accept else []),
                sys.executable, "-m", "nbdquorum", "serve",
                *[a for p in self.images for a in ("--child", str(p))], *args]
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdout=err, stderr=err,
                                         stdin=subprocess.DEVNULL, cwd=tmp)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def server_pid(self) -> int:
        """The server: systemd-socket-activate's child (or itself, once exec-ed)."""
        def find() -> int | None:
            for pid in [self.proc.pid, *children(self.proc.pid)]:
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if b"nbdquorum\0serve" in cmd:
                    return pid
            return None

        pid: int = wait_until(find, 30, "the activated server process")
        return pid

    def stop(self) -> int:
        if self.proc.poll() is None:
            pid = self.server_pid()
            os.kill(pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"the activated server did not stop:\n{self.stderr()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            for pid in [*children(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait()


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat_line = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat_line.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def listening(path: Path) -> bool:
    return path.exists()


Activate = Callable[..., Activated]


@pytest.fixture
def activate(tmp_path: Path) -> Iterator[Activate]:
    started: list[Activated] = []

    def start(listen: str, *args: str, accept: bool = False) -> Activated:
        a = Activated(tmp_path, listen, *args, accept=accept)
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


@pytest.mark.parametrize("workers", [[], ["--workers", "1"]], ids=["one-process", "workers"])
def test_unix_socket_activation(activate: Activate, tmp_path: Path, workers: list[str]) -> None:
    path = tmp_path / "nbd.sock"
    srv = activate(str(path), "--control", str(tmp_path / "qmp.sock"), *workers)
    wait_until(lambda: listening(path), 30, "systemd-socket-activate's socket")
    # this connection wakes the server: it must be served, not reset
    qemu_io(nbd_uri(path), "write -P 0x5e 0 1M", "read -P 0x5e 0 1M")
    pid = srv.server_pid()
    assert nbdinfo_json(nbd_uri(path))["export-size"] == 16 << 20
    log = srv.stderr()
    assert f"on unix:{path} (systemd)" in log, log
    assert "tcp:" not in log, f"a TCP listener besides the inherited socket:\n{log}"
    if workers:
        kids = [p for p in children(pid)
                if b"nbdquorum" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert kids, "no worker process"
        for kid in kids:
            env = Path(f"/proc/{kid}/environ").read_bytes().split(b"\0")
            leaked = [v for v in env if v.startswith(b"LISTEN_")]
            assert not leaked, f"worker {kid} inherited {leaked}"
        qemu_io(nbd_uri(path), "read -P 0x5e 0 1M")  # read in a worker, voted there
    assert srv.stop() == 0, srv.stderr()
    assert "Traceback" not in srv.stderr(), srv.stderr()
    # systemd's socket file is never removed by the server (the QMP one, its own, is)
    assert stat.S_ISSOCK(os.lstat(path).st_mode), "the inherited socket's file was removed"
    assert not (tmp_path / "qmp.sock").exists()


def test_tcp_socket_activation(activate: Activate) -> None:
    port = free_tcp_port()
    srv = activate(f"127.0.0.1:{port}")
    uri = f"nbd://127.0.0.1:{port}/disk"

    def bound() -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return True
        return False

    wait_until(bound, 30, "systemd-socket-activate's TCP socket")
    info = nbdinfo_json(uri)  # wakes the server
    assert info["export-size"] == 16 << 20
    qemu_io(uri, "write -P 0x21 4k 4k", "read -P 0x21 4k 4k")
    assert f"on tcp:127.0.0.1:{port} (systemd)" in srv.stderr()
    assert srv.stop() == 0, srv.stderr()


@pytest.mark.parametrize("extra", [["--socket", "other.sock"], ["--listen", "127.0.0.1:0"]])
def test_socket_activation_with_socket_or_listen_is_refused(
        activate: Activate, tmp_path: Path, extra: list[str]) -> None:
    path = tmp_path / "nbd.sock"
    srv = activate(str(path), *extra)
    wait_until(lambda: listening(path), 30, "systemd-socket-activate's socket")
    waker = rawnbd.open_socket(path)
    code = srv.proc.wait(timeout=60)
    waker.close()
    assert code == 1, srv.stderr()
    lines = [ln for ln in srv.stderr().splitlines() if ln.startswith("nbdquorum: error")]
    assert lines and "socket activation" in lines[0], srv.stderr()
    assert "Traceback" not in srv.stderr()
    assert not (tmp_path / "other.sock").exists()
    assert path.exists()


def test_accept_yes_is_refused_with_a_clear_error(activate: Activate, tmp_path: Path) -> None:
    path = tmp_path / "nbd.sock"
    srv = activate(str(path), accept=True)
    wait_until(lambda: listening(path), 30, "systemd-socket-activate's socket")
    proc = qemu_io(nbd_uri(path), "read 0 4k", check=False)
    assert proc.returncode != 0, output(proc)
    wait_until(lambda: "not a listening stream socket" in srv.stderr(), 60,
               "the per-connection server's error")
    assert "Traceback" not in srv.stderr()
