"""A hand-rolled NBD client on raw sockets, for tests that hold many connections
(idle, half-negotiated, misbehaving) where a real client per connection would
cost a process each."""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC = 0, 1, 2

Address = Path | str | tuple[str, int]


def open_socket(address: Address, timeout: float = 30.0) -> socket.socket:
    """Connect to a Unix socket path or a (host, port)."""
    if isinstance(address, tuple):
        return socket.create_connection(address, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(os.fspath(address))
            return s
        except BlockingIOError:  # the listen backlog is full: the server is accepting
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
        except OSError:
            s.close()
            raise


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed by the server after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def greeting(sock: socket.socket) -> None:
    """Read the server's greeting (NBDMAGIC, IHAVEOPT, flags)."""
    data = recv_exact(sock, 18)
    assert data[:8] == NBDMAGIC, data


def negotiate(sock: socket.socket, export: str = "disk") -> int:
    """Greeting, client flags and NBD_OPT_EXPORT_NAME; returns the export's size."""
    greeting(sock)
    name = export.encode()
    sock.sendall(struct.pack(">IQII", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, IHAVEOPT,
                             OPT_EXPORT_NAME, len(name)) + name)
    size, _flags = struct.unpack(">QH", recv_exact(sock, 10))
    return int(size)


def connect(address: Address, export: str = "disk") -> socket.socket:
    """A connection in the transmission phase."""
    s = open_socket(address)
    try:
        negotiate(s, export)
    except BaseException:
        s.close()
        raise
    return s


def read(sock: socket.socket, offset: int, length: int, cookie: int = 1) -> bytes:
    """One NBD_CMD_READ (simple replies); raises on an error reply."""
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length))
    magic, error, got = SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size))
    assert magic == SIMPLE_REPLY_MAGIC and got == cookie, (magic, got)
    if error:
        raise OSError(error, f"NBD read error {error}")
    return recv_exact(sock, length)


def write(sock: socket.socket, offset: int, data: bytes, cookie: int = 1) -> None:
    """One NBD_CMD_WRITE; raises on an error reply."""
    sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, cookie, offset, len(data)) + data)
    magic, error, got = SIMPLE_REPLY.unpack(recv_exact(sock, SIMPLE_REPLY.size))
    assert magic == SIMPLE_REPLY_MAGIC and got == cookie, (magic, got)
    if error:
        raise OSError(error, f"NBD write error {error}")


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """The server closed (or reset) the connection within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def vm_rss(pid: int) -> int:
    """Resident set size of a process, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
