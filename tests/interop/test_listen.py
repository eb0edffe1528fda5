"""Listening sockets: never taken over, removed on exit, errors that name the address."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from .conftest import (
    StartServer,
    make_image,
    nbd_uri,
    nbdquorum_cli,
    qemu_io,
)

pytestmark = pytest.mark.timeout(90)


def one_line_error(proc: object, *needles: str) -> str:
    import subprocess

    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode != 0, f"accepted: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def children(*paths: Path) -> list[str]:
    return [arg for p in paths for arg in ("--child", str(p))]


@pytest.mark.parametrize("target", ["nbdquorum", "nbdquorum-workers"])
def test_second_server_cannot_take_over_a_live_nbd_socket(
        start_server: StartServer, tmp_path: Path, target: str) -> None:
    first = start_server(target)
    qemu_io(first.uri(), "write -P 0x5a 0 64k")
    others = [make_image(tmp_path / f"o{i}.raw") for i in range(3)]
    proc = nbdquorum_cli("serve", *children(*others), "--socket", str(first.socket),
                         timeout=30)
    one_line_error(proc, str(first.socket), "in use")
    # the first server's clients still reach it, through the same path
    qemu_io(first.uri(), "read -P 0x5a 0 64k")
    assert first.alive()


def test_clean_stop_removes_the_socket_files_it_created(
        start_server: StartServer) -> None:
    server = start_server(extra=["--control", "qmp.sock"])
    qmp = server.tmp / "qmp.sock"
    assert server.socket.exists() and qmp.exists()
    assert server.stop() == 0
    assert not server.socket.exists(), "NBD socket file left behind"
    assert not qmp.exists(), "QMP socket file left behind"


def test_socket_in_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    sock = tmp_path / "nodir" / "nbd.sock"
    one_line_error(nbdquorum_cli("serve", *children(*images), "--socket", str(sock)),
                   f"unix:{sock}")


def test_port_in_use_names_the_address(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = nbdquorum_cli("serve", *children(*images), "--listen", f"127.0.0.1:{port}")
    one_line_error(proc, f"tcp:127.0.0.1:{port}")


def test_size_creates_no_image_when_the_listen_fails(tmp_path: Path) -> None:
    new = [tmp_path / f"new{i}.raw" for i in range(3)]
    sock = tmp_path / "nodir" / "nbd.sock"
    one_line_error(nbdquorum_cli("serve", *children(*new), "--size", "4M",
                                 "--socket", str(sock)), str(sock))
    assert not [p for p in new if p.exists()], "images created by a server that never served"


def test_a_live_qmp_socket_leaves_nothing_behind(
        start_server: StartServer, tmp_path: Path) -> None:
    """The QMP path is taken: refused before any image or NBD socket file is made."""
    first = start_server(extra=["--control", "qmp.sock"])
    qmp = first.tmp / "qmp.sock"
    new = [tmp_path / f"new{i}.raw" for i in range(3)]
    sock = tmp_path / "second.sock"
    proc = nbdquorum_cli("serve", *children(*new), "--size", "4M", "--socket", str(sock),
                         "--control", str(qmp))
    one_line_error(proc, str(qmp), "in use")
    assert not sock.exists(), "NBD socket file left behind by a refused server"
    assert not [p for p in new if p.exists()]
    qemu_io(nbd_uri(first.socket), "read -P 0 0 64k")
