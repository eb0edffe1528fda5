"""The serve command line: argument errors, image creation, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import (
    IMAGE_SIZE,
    MiB,
    StartServer,
    make_image,
    nbdinfo_json,
    nbdquorum_cli,
    nbdquorum_env,
    qemu_io,
    read_at,
    require_libnbd,
)

pytestmark = pytest.mark.timeout(60)


def refused(*args: str, address: Path | tuple[str, int]) -> subprocess.CompletedProcess[str]:
    """Run ``serve ARGS``, which must exit with an error instead of serving.

    If the server accepts a connection on ``address`` instead, it is stopped and the test
    fails at once (rather than after a long timeout).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbdquorum", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=nbdquorum_env(),
    )

    def serving() -> bool:
        try:
            if isinstance(address, Path):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(address))
            else:
                socket.create_connection(address, timeout=1).close()
        except OSError:
            return False
        return True

    deadline = time.monotonic() + 20
    while proc.poll() is None:
        if serving() or time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
            pytest.fail(
                f"serve {list(args)} started serving instead of refusing:\n{err.decode()}",
                pytrace=False,
            )
        time.sleep(0.02)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``serve ARGS`` on a Unix socket in ``tmp_path``; must be refused."""
    sock = tmp_path / "nbd.sock"
    return refused(
        "--socket", str(sock), "--state-dir", str(tmp_path / "state"), *args, address=sock
    )


def children(*paths: Path) -> list[str]:
    return [arg for p in paths for arg in ("--child", str(p))]


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode != 0, f"accepted: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def mentions_size(text: str, size: int) -> bool:
    forms = {
        str(size),
        f"{size // MiB}M",
        f"{size // MiB} MiB",
        f"{size // MiB}MiB",
        f"{size // MiB}.0 MiB",
        f"{size // MiB}.0M",
    }
    return any(f in text for f in forms)


def test_missing_image_without_size(tmp_path: Path) -> None:
    make_image(tmp_path / "a.raw")
    make_image(tmp_path / "b.raw")
    proc = serve(
        tmp_path, *children(tmp_path / "a.raw", tmp_path / "b.raw", tmp_path / "missing.raw")
    )
    assert_one_line_error(proc, "missing.raw")
    assert not (tmp_path / "missing.raw").exists()
    assert not (tmp_path / "nbd.sock").exists()


def test_threshold_above_children_count(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    assert_one_line_error(serve(tmp_path, *children(*images), "--vote-threshold", "4"))


def test_threshold_zero(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    assert_one_line_error(serve(tmp_path, *children(*images), "--vote-threshold", "0"))


def test_children_of_different_sizes(tmp_path: Path) -> None:
    a = make_image(tmp_path / "a.raw", 16 * MiB)
    b = make_image(tmp_path / "b.raw", 16 * MiB)
    c = make_image(tmp_path / "c.raw", 8 * MiB)
    line = assert_one_line_error(serve(tmp_path, *children(a, b, c)))
    assert mentions_size(line, 16 * MiB) and mentions_size(line, 8 * MiB), line


def test_no_children(tmp_path: Path) -> None:
    proc = serve(tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


def test_bad_size_suffix(tmp_path: Path) -> None:
    """A syntax error: argparse's usage text may come first; the error is the last line."""
    proc = serve(tmp_path, *children(tmp_path / "a.raw"), "--size", "12Q")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "12Q" in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not (tmp_path / "a.raw").exists()


def test_child_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.raw").mkdir()
    images = [make_image(tmp_path / f"{i}.raw") for i in range(2)]
    assert_one_line_error(serve(tmp_path, *children(*images, tmp_path / "dir.raw")), "dir.raw")


def test_same_node_name_twice(tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.raw"), make_image(tmp_path / "b.raw")
    assert_one_line_error(serve(tmp_path, "--child", f"x={a}", "--child", f"x={b}"))


def test_socket_directory_missing(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    sock = tmp_path / "nodir" / "nbd.sock"
    assert_one_line_error(refused(*children(*images), "--socket", str(sock), address=sock))


def test_port_in_use(tmp_path: Path) -> None:
    images = [make_image(tmp_path / f"{i}.raw") for i in range(3)]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = nbdquorum_cli(
            "serve", *children(*images), "--listen", f"127.0.0.1:{port}", timeout=20
        )
    assert_one_line_error(proc, str(port))


@pytest.mark.parametrize("size", ["4M", "1G"])
def test_size_creates_sparse_images(start_server: StartServer, tmp_path: Path, size: str) -> None:
    nbytes = {"4M": 4 * MiB, "1G": 1024 * MiB}[size]
    images = [tmp_path / f"new{i}.raw" for i in range(3)]
    server = start_server("nbdquorum", images=images, create_size=size)
    for image in images:
        st = os.stat(image)
        assert st.st_size == nbytes
        assert st.st_blocks * 512 < MiB, f"{image.name} is not sparse: {st.st_blocks} blocks"
    assert nbdinfo_json(server.uri())["export-size"] == nbytes
    qemu_io(server.uri(), f"write -P 0x61 {nbytes - 4096} 4k", f"read -P 0x61 {nbytes - 4096} 4k")
    for image in images:
        assert read_at(image, nbytes - 4097, 4097) == b"\0" + b"\x61" * 4096


def test_size_keeps_existing_images(start_server: StartServer, tmp_path: Path) -> None:
    """--size only creates the missing ones; an existing image keeps its data."""
    old = [make_image(tmp_path / f"old{i}.raw", 4 * MiB) for i in range(2)]
    for image in old:
        with open(image, "r+b") as f:
            f.write(b"\x5e" * 4096)
    images = [*old, tmp_path / "new.raw"]
    server = start_server("nbdquorum", images=images, create_size="4M")
    assert os.path.getsize(tmp_path / "new.raw") == 4 * MiB
    qemu_io(server.uri(), "read -P 0x5e 0 4k")  # 2 of 3 agree


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_idle_exits_0(start_server: StartServer, sig: int) -> None:
    server = start_server("nbdquorum")
    assert server.stop(sig) == 0, server.stderr()
    assert "Traceback" not in server.stderr()


def test_sigterm_with_an_idle_client_connected(start_server: StartServer) -> None:
    nbd = require_libnbd()
    server = start_server("nbdquorum")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    h.pwrite(b"\x62" * 4096, 0)
    assert server.stop() == 0, server.stderr()
    for image in server.images:
        assert image.read_bytes()[:4096] == b"\x62" * 4096


@pytest.mark.timeout(90)
def test_sigterm_with_requests_in_flight(start_server: StartServer) -> None:
    """Every write acknowledged before the shutdown is in every child afterwards."""
    nbd = require_libnbd()
    server = start_server("nbdquorum")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    status: dict[int, int] = {}

    def done(i: int):  # type: ignore[no-untyped-def]
        def cb(error) -> int:  # type: ignore[no-untyped-def]
            status[i] = error.value
            return 1

        return cb

    for i in range(16):
        h.aio_pwrite(
            nbd.Buffer.from_bytearray(bytearray([i + 1]) * MiB), i * MiB, completion=done(i)
        )
    server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    try:
        while h.aio_in_flight() > 0:
            h.poll(-1)
    except nbd.Error:
        pass  # the server closed the connection: the rest were not acknowledged
    assert server.stop() == 0, server.stderr()
    acked = [i for i, err in status.items() if err == 0]
    data = [image.read_bytes() for image in server.images]
    for i in acked:
        for image, content in zip(server.images, data, strict=True):
            assert content[i * MiB : (i + 1) * MiB] == bytes([i + 1]) * MiB, (
                f"acknowledged write {i} missing from {image.name}"
            )
    assert data[0] == data[1] == data[2], "children differ after shutdown"


def test_restart_on_the_same_images_keeps_the_data(
    start_server: StartServer, tmp_path: Path
) -> None:
    images = [make_image(tmp_path / f"r{i}.raw") for i in range(3)]
    first = start_server("nbdquorum", images=images)
    qemu_io(first.uri(), "write -P 0x63 1M 64k")
    assert first.stop() == 0
    second = start_server("nbdquorum", images=images)
    qemu_io(second.uri(), "read -P 0x63 1M 64k")
    assert nbdinfo_json(second.uri())["export-size"] == IMAGE_SIZE


def test_same_image_twice_is_refused(tmp_path: Path) -> None:
    """One file counted as two children would outvote the third on its own."""
    a, b = make_image(tmp_path / "a.raw"), make_image(tmp_path / "b.raw")
    assert_one_line_error(serve(tmp_path, *children(a, a, b)), "a.raw")


def test_same_image_through_a_symlink_is_refused(tmp_path: Path) -> None:
    a, b = make_image(tmp_path / "a.raw"), make_image(tmp_path / "b.raw")
    (tmp_path / "alias.raw").symlink_to(a)
    assert_one_line_error(serve(tmp_path, *children(a, b, tmp_path / "alias.raw")))


def test_images_in_use_by_a_running_server_are_refused(
    start_server: StartServer, tmp_path: Path
) -> None:
    """Like QEMU's image locking: two servers writing one set of children diverge them."""
    images = [make_image(tmp_path / f"l{i}.raw") for i in range(3)]
    first = start_server("nbdquorum", images=images)
    second = tmp_path / "second.sock"
    proc = refused(
        *children(*images),
        "--socket",
        str(second),
        "--state-dir",
        str(tmp_path / "second-state"),
        address=second,
    )
    assert_one_line_error(proc)
    assert first.alive()
    qemu_io(first.uri(), "write -P 0x64 0 4k", "read -P 0x64 0 4k")
