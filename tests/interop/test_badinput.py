"""Misbehaving clients, written with a hand-rolled NBD client on a raw socket.

Each bad client gets a clean error reply or a closed connection; afterwards the server
is still alive and a fresh real client (qemu-io, nbdinfo) is served normally.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any

import pytest

from .conftest import (
    IMAGE_SIZE,
    MiB,
    Server,
    nbdinfo_json,
    qemu_io,
    xfail_for,
)

pytestmark = pytest.mark.timeout(60)

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 0x80000001
INFO_EXPORT = 0

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_FLAG_FUA = 1 << 0

TIMEOUT = 10.0


class Closed(Exception):
    """The server closed the connection."""


class Wire:
    """The client side of the fixed newstyle handshake and simple replies, byte by byte."""

    def __init__(self, server: Server) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(server.socket))
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise Closed(f"after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def wait_closed(self) -> bytes:
        """Read until EOF; return what came before it. Fails if the server keeps it open."""
        got = bytearray()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return bytes(got)
            except TimeoutError:
                break
            if not chunk:
                return bytes(got)
            got += chunk
        pytest.fail(f"server did not close the connection within {TIMEOUT}s", pytrace=False)

    # ----- handshake

    def greeting(self) -> int:
        assert self.recv_exact(8) == NBDMAGIC
        magic, flags = struct.unpack(">QH", self.recv_exact(10))
        assert magic == IHAVEOPT, hex(magic)
        assert flags & FLAG_FIXED_NEWSTYLE
        return flags

    def client_flags(self, flags: int = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) -> None:
        self.send(struct.pack(">I", flags))

    def option(self, opt: int, data: bytes = b"") -> None:
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return opt, rtype, self.recv_exact(length)

    def go(self, name: str = "disk") -> tuple[int, int]:
        """NBD_OPT_GO; returns (size, transmission flags) from NBD_INFO_EXPORT."""
        raw = name.encode()
        self.option(OPT_GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        size = flags = None
        while True:
            opt, rtype, data = self.option_reply()
            assert opt == OPT_GO
            if rtype == REP_ACK:
                break
            assert rtype == REP_INFO, f"reply {rtype:#x} to NBD_OPT_GO"
            (info,) = struct.unpack(">H", data[:2])
            if info == INFO_EXPORT:
                size, flags = struct.unpack(">QH", data[2:])
        assert size is not None and flags is not None, "no NBD_INFO_EXPORT before the ACK"
        return size, flags

    def handshake(self) -> int:
        self.greeting()
        self.client_flags()
        size, _ = self.go()
        return size

    # ----- transmission

    def request(
        self,
        cmd: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes = b"",
        magic: int = REQUEST_MAGIC,
    ) -> int:
        self.cookie += 1
        self.send(struct.pack(">IHHQQI", magic, flags, cmd, self.cookie, offset, length) + payload)
        return self.cookie

    def reply(self, cookie: int) -> int:
        magic, error, got = struct.unpack(">IIQ", self.recv_exact(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        assert got == cookie, f"reply for cookie {got}, expected {cookie}"
        return error

    def read(self, offset: int, length: int, flags: int = 0) -> tuple[int, bytes]:
        error = self.reply(self.request(CMD_READ, offset, length, flags))
        return error, (self.recv_exact(length) if error == 0 else b"")

    def command(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, payload: bytes = b""
    ) -> int:
        return self.reply(self.request(cmd, offset, length, flags, payload))


def still_serving(server: Server) -> None:
    """The server survived: it is alive and fresh real clients get normal service."""
    assert server.alive(), f"server died:\n{server.stderr()}"
    assert nbdinfo_json(server.uri())["export-size"] == IMAGE_SIZE
    qemu_io(server.uri(), "write -P 0x77 0 4k", "read -P 0x77 0 4k")


# --------------------------------------------------------------------------- handshake


def test_garbage_instead_of_a_handshake(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.send(b"GET / HTTP/1.1\r\nHost: nbd\r\n\r\n" + bytes(range(256)))
        w.wait_closed()
    still_serving(server)


def test_garbage_before_the_greeting_is_read(server: Server) -> None:
    with Wire(server) as w:
        w.send(b"\xff" * 4096)
        w.wait_closed()
    still_serving(server)


def test_truncated_handshake_then_close(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.send(b"\x00\x00")  # half of the client flags
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\x00\x00\x00\x04di")
    still_serving(server)


def test_connect_and_close_without_a_word(server: Server) -> None:
    for _ in range(20):
        Wire(server).close()
    still_serving(server)


def test_unknown_option_is_unsupported_and_handshake_continues(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(0x7FFF, b"whatever")
        opt, rtype, _ = w.option_reply()
        assert (opt, rtype) == (0x7FFF, REP_ERR_UNSUP)
        size, _ = w.go()
        assert size == IMAGE_SIZE
        assert w.read(0, 512) == (0, bytes(512))
    still_serving(server)


def test_export_name_option_old_style(server: Server) -> None:
    """NBD_OPT_EXPORT_NAME: no option reply; size, flags, then straight to transmission."""
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(OPT_EXPORT_NAME, b"disk")
        size, _flags = struct.unpack(">QH", w.recv_exact(10))  # NO_ZEROES: no padding
        assert size == IMAGE_SIZE
        assert w.command(CMD_WRITE, 0, 3, payload=b"old") == 0
        assert w.read(0, 3) == (0, b"old")


def test_option_info_then_go(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))
        replies = []
        while True:
            opt, rtype, data = w.option_reply()
            assert opt == OPT_INFO
            replies.append((rtype, data))
            if rtype == REP_ACK:
                break
        exports = [d for t, d in replies if t == REP_INFO and d[:2] == b"\0\0"]
        assert exports and struct.unpack(">Q", exports[0][2:10])[0] == IMAGE_SIZE
        assert w.go()[0] == IMAGE_SIZE  # INFO does not end the handshake


def test_starttls_is_refused_and_handshake_continues(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(OPT_STARTTLS)
        opt, rtype, _ = w.option_reply()
        assert opt == OPT_STARTTLS
        assert rtype & 0x80000000, f"STARTTLS answered {rtype:#x}, not an error"
        assert w.go()[0] == IMAGE_SIZE
        assert w.read(0, 512) == (0, bytes(512))


def test_option_list_then_go(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(OPT_LIST)
        names = []
        while True:
            opt, rtype, data = w.option_reply()
            assert opt == OPT_LIST
            if rtype == REP_ACK:
                break
            assert rtype == REP_SERVER
            (length,) = struct.unpack(">I", data[:4])
            names.append(data[4 : 4 + length].decode())
        assert names == ["disk"]
        assert w.go()[0] == IMAGE_SIZE


def test_option_abort(server: Server) -> None:
    with Wire(server) as w:
        w.greeting()
        w.client_flags()
        w.option(OPT_ABORT)
        # The server may ACK the abort; either way it closes the connection.
        w.wait_closed()
    still_serving(server)


def test_handshake_and_requests_one_byte_at_a_time(server: Server) -> None:
    """The server reassembles messages split at every byte boundary."""
    with Wire(server) as w:
        w.greeting()
        flags = struct.pack(">I", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        go = struct.pack(">QII", IHAVEOPT, OPT_GO, 10) + struct.pack(">I", 4) + b"disk" + b"\0\0"
        write = struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 4096, 8) + b"abcdefgh"
        for byte in flags + go:
            w.send(bytes([byte]))
        while w.option_reply()[1] != REP_ACK:
            pass
        w.cookie = 1
        for byte in write:
            w.send(bytes([byte]))
        assert w.reply(1) == 0
        assert w.read(4096, 8) == (0, b"abcdefgh")
    still_serving(server)


def test_pipelined_requests_in_one_send(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        wire = b""
        for i in range(32):
            wire += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 100 + i, i * 512, 512)
            wire += bytes([i + 1]) * 512
        w.send(wire)
        cookies = set()
        for _ in range(32):
            magic, error, cookie = struct.unpack(">IIQ", w.recv_exact(16))
            assert (magic, error) == (SIMPLE_REPLY_MAGIC, 0)
            cookies.add(cookie)
        assert cookies == set(range(100, 132))
        error, data = w.read(0, 32 * 512)
        assert error == 0
        assert data == b"".join(bytes([i + 1]) * 512 for i in range(32))


def test_disconnect_command_closes_the_connection(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.command(CMD_WRITE, 0, 4, payload=b"disc") == 0
        w.request(CMD_DISC)
        assert w.wait_closed() == b""
    qemu_io(server.uri(), "read -v 0 4")
    still_serving(server)


# --------------------------------------------------------------------------- transmission


def test_bad_request_magic_closes_the_connection(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        w.request(CMD_READ, 0, 512, magic=0x12345678)
        w.wait_closed()
    still_serving(server)


def test_client_disconnects_in_the_middle_of_a_write(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        w.request(CMD_WRITE, 0, MiB, payload=b"\x99" * 1000)
    still_serving(server)
    qemu_io(server.uri(), "read -P 0 4k 4k")


def test_read_past_the_end_is_einval(server: Server) -> None:
    with Wire(server) as w:
        assert w.handshake() == IMAGE_SIZE
        assert w.read(IMAGE_SIZE - 256, 512)[0] == errno.EINVAL
        assert w.read(IMAGE_SIZE, 1)[0] == errno.EINVAL
        assert w.read(2**63, 512)[0] == errno.EINVAL
        # The connection is still in step after the errors.
        assert w.read(IMAGE_SIZE - 512, 512) == (0, bytes(512))
    still_serving(server)


def test_write_past_the_end_is_enospc(
    server: Server, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(target, "qsd", "QEMU 7.2 answers EINVAL to a write past the end", request)
    with Wire(server) as w:
        w.handshake()
        assert w.command(CMD_WRITE, IMAGE_SIZE - 256, 512, payload=b"\x55" * 512) == errno.ENOSPC
        assert w.command(CMD_WRITE, IMAGE_SIZE, 1, payload=b"\x55") == errno.ENOSPC
        # The payload was consumed: the next request is read as a request.
        assert w.read(IMAGE_SIZE - 512, 512) == (0, bytes(512))
    for image in server.images:
        assert image.stat().st_size == IMAGE_SIZE
    still_serving(server)


def test_write_zeroes_and_trim_past_the_end_fail(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.command(CMD_WRITE_ZEROES, IMAGE_SIZE - 256, 512) in (errno.EINVAL, errno.ENOSPC)
        assert w.command(CMD_TRIM, IMAGE_SIZE - 256, 512) in (errno.EINVAL, errno.ENOSPC)
        assert w.read(0, 512) == (0, bytes(512))
    for image in server.images:
        assert image.stat().st_size == IMAGE_SIZE
    still_serving(server)


def test_read_larger_than_the_maximum_block_size_is_einval(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.read(0, 64 * MiB)[0] == errno.EINVAL
        assert w.read(0, 512) == (0, bytes(512))
    still_serving(server)


def test_unknown_command_is_einval(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.command(99, 0, 0) == errno.EINVAL
        assert w.read(0, 512) == (0, bytes(512))
    still_serving(server)


def test_unknown_command_flag_is_einval(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.read(0, 512, flags=1 << 14)[0] == errno.EINVAL
        assert w.read(0, 512) == (0, bytes(512))
    still_serving(server)


def test_flush_with_nonzero_offset_is_einval(
    server: Server, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(target, "qsd", "QEMU ignores the offset and length of NBD_CMD_FLUSH", request)
    with Wire(server) as w:
        w.handshake()
        assert w.command(CMD_FLUSH, 4096, 0) == errno.EINVAL
        assert w.command(CMD_FLUSH, 0, 0) == 0
    still_serving(server)


def test_zero_length_requests(server: Server) -> None:
    """Zero-length reads and writes are harmless: success or EINVAL, never a hang."""
    with Wire(server) as w:
        w.handshake()
        error, _ = w.read(0, 0)
        assert error in (0, errno.EINVAL)
        assert w.command(CMD_WRITE, 0, 0) in (0, errno.EINVAL)
        assert w.read(0, 512) == (0, bytes(512))
    still_serving(server)


def test_fua_write_and_cache_command(server: Server) -> None:
    with Wire(server) as w:
        w.handshake()
        assert w.command(CMD_WRITE, 512, 512, CMD_FLAG_FUA, payload=b"\x31" * 512) == 0
        assert w.command(CMD_CACHE, 0, MiB) == 0
        assert w.read(512, 512) == (0, b"\x31" * 512)
    for image in server.images:
        assert image.read_bytes()[512:1024] == b"\x31" * 512
