"""Data path through qemu-io: every write reaches all three children, byte for byte."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from tests.ci import unavailable

from .conftest import (
    IMAGE_SIZE,
    MiB,
    Server,
    StartServer,
    assert_identical,
    assert_pattern,
    nbdinfo_json,
    nbdsh_command,
    output,
    qemu_io,
    read_at,
    require_libnbd,
    run,
    xfail_for,
)

pytestmark = pytest.mark.timeout(90)


def check_children(server: Server, offset: int, length: int, byte: int) -> None:
    """Each child image holds ``byte`` over the span, and the children are identical."""
    for image in server.images:
        assert_pattern(image, offset, length, byte)
    assert_identical(server.images)


def test_aligned_write_and_read(server: Server) -> None:
    qemu_io(
        server.uri(),
        "write -P 0x11 64k 64k",
        "read -P 0x11 64k 64k",
        "read -P 0 0 64k",
        "read -P 0 128k 64k",
    )
    check_children(server, 64 * 1024, 64 * 1024, 0x11)
    assert_pattern(server.images[0], 0, 64 * 1024, 0)


def test_unaligned_write_offset_1_length_513(server: Server) -> None:
    qemu_io(
        server.uri(),
        "write -P 0xa5 1 513",
        "read -P 0 0 1",
        "read -P 0xa5 1 513",
        "read -P 0 514 3582",
    )
    check_children(server, 1, 513, 0xA5)
    for image in server.images:
        assert read_at(image, 0, 1) == b"\0"
        assert read_at(image, 514, 512) == bytes(512)


def test_unaligned_read_inside_written_data(server: Server) -> None:
    qemu_io(server.uri(), "write -P 0x3c 0 8k")
    qemu_io(server.uri(), "read -P 0x3c 1 1", "read -P 0x3c 511 2", "read -P 0x3c 4095 1027")


def test_last_byte_of_the_disk(server: Server) -> None:
    last = IMAGE_SIZE - 1
    qemu_io(
        server.uri(),
        f"write -P 0x7f {last} 1",
        f"read -P 0x7f {last} 1",
        f"read -P 0 {last - 511} 511",
    )
    check_children(server, last, 1, 0x7F)
    for image in server.images:
        assert os.path.getsize(image) == IMAGE_SIZE, "a write at the end grew the image"


def test_4mib_write_spanning_chunks(server: Server) -> None:
    offset, length = 2 * MiB + 123, 4 * MiB
    qemu_io(
        server.uri(),
        f"write -P 0x5c {offset} {length}",
        f"read -P 0x5c {offset} {length}",
        f"read -P 0 {offset - 123} 123",
        f"read -P 0 {offset + length} 4096",
    )
    check_children(server, offset, length, 0x5C)


def test_write_zeroes(server: Server) -> None:
    qemu_io(server.uri(), "write -P 0x44 0 1M", "write -z 64k 128k")
    qemu_io(server.uri(), "read -P 0x44 0 64k", "read -P 0 64k 128k", "read -P 0x44 192k 832k")
    check_children(server, 64 * 1024, 128 * 1024, 0)
    check_children(server, 192 * 1024, 832 * 1024, 0x44)


def test_write_zeroes_unaligned(server: Server) -> None:
    qemu_io(server.uri(), "write -P 0x44 0 64k", "write -z 1000 3000")
    qemu_io(server.uri(), "read -P 0x44 0 1000", "read -P 0 1000 3000", "read -P 0x44 4000 61536")
    check_children(server, 1000, 3000, 0)


def test_discard_then_reads_return_zeros(
    server: Server, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(
        target,
        "qsd",
        "QEMU quorum has no discard: it is a silent no-op (QEMU 7.2), "
        "so the old data stays",
        request,
    )
    qemu_io(server.uri(), "write -P 0x44 0 2M")
    qemu_io(server.uri(), "discard 0 1M")
    qemu_io(server.uri(), "read -P 0 0 1M", "read -P 0x44 1M 1M")
    check_children(server, 0, MiB, 0)
    check_children(server, MiB, MiB, 0x44)


def _punch_hole_supported(directory: Path) -> bool:
    probe = directory / "punch-probe"
    with open(probe, "wb") as f:
        f.write(b"x" * MiB)
        f.flush()
        os.fsync(f.fileno())
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
        fd = os.open(probe, os.O_RDWR)
        try:
            rc = libc.fallocate(
                fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, ctypes.c_long(0), ctypes.c_long(MiB)
            )
        finally:
            os.close(fd)
        return rc == 0
    finally:
        probe.unlink()


def test_trim_deallocates_in_the_children(start_server: StartServer, tmp_path: Path) -> None:
    """nbdquorum passes TRIM down: the children's blocks are freed, not just zeroed."""
    if not _punch_hole_supported(tmp_path):
        unavailable("the tmp file system cannot punch holes")
    server = start_server("nbdquorum")
    qemu_io(server.uri(), "write -P 0x44 0 4M", "flush")
    before = [os.stat(i).st_blocks for i in server.images]
    qemu_io(server.uri(), "discard 0 4M", "flush")
    after = [os.stat(i).st_blocks for i in server.images]
    for image, b, a in zip(server.images, before, after, strict=True):
        assert a * 512 <= b * 512 - 2 * MiB, f"{image.name}: {b} -> {a} blocks"
    check_children(server, 0, 4 * MiB, 0)


def test_flush(server: Server) -> None:
    qemu_io(server.uri(), "write -P 0x21 0 64k", "flush", "read -P 0x21 0 64k")
    check_children(server, 0, 64 * 1024, 0x21)


def test_write_fua(server: Server) -> None:
    proc = qemu_io(server.uri(), "write -f -P 0x22 4k 12k", "read -P 0x22 4k 12k")
    assert "wrote 12288/12288 bytes at offset 4096" in proc.stdout
    check_children(server, 4096, 12 * 1024, 0x22)


def test_write_zeroes_fua(server: Server) -> None:
    qemu_io(server.uri(), "write -P 0x23 0 64k", "write -z -f 4k 4k", "read -P 0 4k 4k")
    check_children(server, 4096, 4096, 0)


def test_mixed_session_leaves_identical_children(server: Server) -> None:
    """One qemu-io session with every kind of request; afterwards the children agree."""
    qemu_io(
        server.uri(),
        "write -P 0x01 0 1M",
        "write -P 0x02 1 513",
        "write -f -P 0x03 1M 64k",
        "write -z 512k 4k",
        f"write -P 0x04 {IMAGE_SIZE - 1} 1",
        f"write -P 0x05 {5 * MiB - 7} {4 * MiB}",
        "flush",
    )
    qemu_io(
        server.uri(),
        "read -P 0x01 0 1",
        "read -P 0x02 1 513",
        "read -P 0x01 514 510",
        "read -P 0 512k 4k",
        "read -P 0x03 1M 64k",
        f"read -P 0x04 {IMAGE_SIZE - 1} 1",
        f"read -P 0x05 {5 * MiB - 7} {4 * MiB}",
    )
    assert_identical(server.images)
    assert read_at(server.images[2], 0, 2) == b"\x01\x02"
    assert_pattern(server.images[1], 5 * MiB - 7, 4 * MiB, 0x05)


def test_read_only_export_refuses_qemu_io_writes(start_server: StartServer, target: str) -> None:
    server = start_server(target, read_only=True)
    proc = qemu_io(server.uri(), "write -P 0x66 0 4k", check=False)
    assert proc.returncode != 0
    # qemu-io sees the read-only flag and refuses to open read-write (EACCES), or the
    # write itself is refused (EPERM); either way nothing is written.
    assert "Permission denied" in output(proc) or "Operation not permitted" in output(proc), output(
        proc
    )
    qemu_io(server.uri(), "read -P 0 0 4k", read_only=True)
    check_children(server, 0, 4096, 0)


@pytest.mark.parametrize("command", ["pwrite", "zero", "trim"])
def test_read_only_export_answers_eperm(
    start_server: StartServer, target: str, command: str, request: pytest.FixtureRequest
) -> None:
    """A client that ignores the read-only flag gets EPERM from the server."""
    xfail_for(
        target,
        "qsd",
        "QEMU 7.2 answers EINVAL, not EPERM, to writes to a read-only export",
        request,
    )
    nbd = require_libnbd()
    server = start_server(target, read_only=True)
    h = nbd.NBD()
    h.set_strict_mode(0)  # send the request; let the server refuse it
    h.connect_uri(server.uri())
    try:
        assert h.is_read_only()
        with pytest.raises(nbd.Error) as e:
            if command == "pwrite":
                h.pwrite(b"\x66" * 4096, 0)
            elif command == "zero":
                h.zero(4096, 0)
            else:
                h.trim(4096, 0)
        assert e.value.errnum == errno.EPERM, str(e.value)
        assert "Operation not permitted" in str(e.value)
        assert h.pread(4096, 0) == bytes(4096)  # the connection is still usable
    finally:
        h.shutdown()
    check_children(server, 0, 4096, 0)


def test_nbdsh_write_flush_cache_read(server: Server) -> None:
    argv, env = nbdsh_command()
    script = "; ".join(
        [
            "h.pwrite(b'\\x24' * 3000, 777)",
            "h.flush()",
            "h.cache(65536, 0)",
            "assert h.pread(3000, 777) == b'\\x24' * 3000",
            "assert h.pread(777, 0) == bytes(777)",
            "print(h.get_size(), h.can_flush(), h.can_fua(), h.can_cache())",
        ]
    )
    proc = run([*argv, "-u", server.uri(), "-c", script], env=env)
    assert proc.returncode == 0, output(proc)
    assert proc.stdout.split() == [str(IMAGE_SIZE), "True", "True", "True"]
    check_children(server, 777, 3000, 0x24)


def test_largest_request_32mib(start_server: StartServer, target: str) -> None:
    """One 32 MiB write and one 32 MiB read: the advertised maximum block size."""
    server = start_server(target, size=48 * MiB)
    offset, length = 8 * MiB + 512, 32 * MiB
    qemu_io(server.uri(), f"write -P 0x6b {offset} {length}")
    qemu_io(server.uri(), f"read -P 0x6b {offset} {length}")
    check_children(server, offset, length, 0x6B)


def test_block_status_never_calls_data_zero(server: Server) -> None:
    """Extents that nbdinfo --map calls zero read back as zeros; written data is data."""
    qemu_io(server.uri(), "write -P 0x15 1M 1M", "write -P 0x16 5M 4k", "write -z 6M 1M")
    proc = run(["nbdinfo", "--map", "--json", server.uri()])
    assert proc.returncode == 0, output(proc)
    extents = json.loads(proc.stdout)
    assert extents[0]["offset"] == 0
    assert sum(e["length"] for e in extents) == IMAGE_SIZE
    image = server.images[0].read_bytes()
    for e in extents:
        start, end = e["offset"], e["offset"] + e["length"]
        if "zero" in e["description"]:
            assert image[start:end].count(0) == end - start, f"{e} is not zero"
            assert not (start < 2 * MiB and end > MiB), f"{e} hides the data at 1M"
            assert not (start < 5 * MiB + 4096 and end > 5 * MiB), f"{e} hides the data at 5M"


@pytest.mark.parametrize("flag", ["FAST_ZERO", "NO_HOLE"])
def test_write_zeroes_flags(server: Server, flag: str) -> None:
    nbd = require_libnbd()
    qemu_io(server.uri(), "write -P 0x17 0 256k")
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        try:
            h.zero(128 * 1024, 64 * 1024, getattr(nbd, f"CMD_FLAG_{flag}"))
        except nbd.Error as e:
            # A fast zero may be refused as not fast; nothing else is acceptable.
            assert flag == "FAST_ZERO" and e.errnum == errno.ENOTSUP, str(e)
            return
        assert h.pread(128 * 1024, 64 * 1024) == bytes(128 * 1024)
    finally:
        h.shutdown()
    check_children(server, 64 * 1024, 128 * 1024, 0)
    check_children(server, 192 * 1024, 64 * 1024, 0x17)


def test_unaligned_discard_reads_zeros(
    server: Server, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(target, "qsd", "QEMU quorum has no discard (a silent no-op in QEMU 7.2)", request)
    qemu_io(server.uri(), "write -P 0x18 0 64k")
    qemu_io(server.uri(), "discard 1000 5000")
    qemu_io(server.uri(), "read -P 0x18 0 1000", "read -P 0 1000 5000", "read -P 0x18 6000 59536")
    check_children(server, 1000, 5000, 0)


def test_multi_conn_flush_makes_writes_visible(server: Server) -> None:
    """can_multi_conn: a write on one connection, flush on another, read on a third."""
    nbd = require_libnbd()
    handles = [nbd.NBD() for _ in range(3)]
    for h in handles:
        h.connect_uri(server.uri())
    try:
        assert all(h.can_multi_conn() for h in handles)
        handles[0].pwrite(b"\x19" * 65536, 3 * MiB)
        handles[1].flush()
        assert handles[2].pread(65536, 3 * MiB) == b"\x19" * 65536
    finally:
        for h in handles:
            h.shutdown()
    check_children(server, 3 * MiB, 65536, 0x19)


def test_image_size_not_a_multiple_of_512(
    start_server: StartServer, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(target, "qsd", "QEMU rounds a raw file's size up to whole 512-byte sectors", request)
    size = 3 * MiB + 1001
    server = start_server(target, size=size)
    assert nbdinfo_json(server.uri())["export-size"] == size
    qemu_io(server.uri(), f"write -P 0x1a {size - 700} 700", f"read -P 0x1a {size - 700} 700")
    for image in server.images:
        assert os.path.getsize(image) == size
        assert read_at(image, size - 701, 701) == b"\0" + b"\x1a" * 700
