"""Hostile NBD clients on raw sockets, for scripts/bench and the fairness tests.

    python scripts/nbd_hostile.py --socket S --mode stall --clients 16
    python scripts/nbd_hostile.py --socket S --mode trickle --clients 64 --length 32M

* ``stall``: each client pipelines READ requests (``--length`` each, ``--total``
  bytes in all) as fast as the server takes them and never reads a reply.
* ``trickle``: each client sends one WRITE header of ``--length`` and then its
  payload at ``--rate`` bytes a second, so the write never completes in a test.

Prints ``ready N`` once every client has finished its handshake and sent its
first request, then runs until ``--duration`` seconds have passed or SIGTERM.
The sockets are only closed by the exit.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import sys
import threading
import time

IHAVEOPT = 0x49484156454F5054
OPT_EXPORT_NAME = 1
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
REQUEST_MAGIC = 0x25609513
CMD_READ, CMD_WRITE = 0, 1


def parse_size(text: str) -> int:
    units = {"k": 10, "m": 20, "g": 30}
    t = text.strip().lower().rstrip("ib")
    return int(t[:-1]) << units[t[-1]] if t and t[-1] in units else int(t)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def connect(path: str, export: str) -> tuple[socket.socket, int]:
    """Connect and negotiate (fixed newstyle, NBD_OPT_EXPORT_NAME); returns the export size."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    if recv_exact(s, 8) != b"NBDMAGIC":
        raise ConnectionError("not an NBD server")
    recv_exact(s, 10)  # IHAVEOPT, handshake flags
    name = export.encode()
    s.sendall(struct.pack(">IQII", FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, IHAVEOPT,
                          OPT_EXPORT_NAME, len(name)) + name)
    size, _flags = struct.unpack(">QH", recv_exact(s, 10))
    s.settimeout(None)
    return s, size


def stall(sock: socket.socket, size: int, length: int, total: int, sent: threading.Event) -> None:
    """Pipeline READs and never read a reply; blocks once the server stops reading."""
    n = max(1, total // length)
    batch = 64
    cookie = 0
    with sock:
        while n > 0:
            reqs = []
            for _ in range(min(batch, n)):
                offset = (cookie * length) % max(length, size - size % length)
                reqs.append(REQUEST.pack(REQUEST_MAGIC, 0, CMD_READ, cookie, offset, length))
                cookie += 1
            n -= len(reqs)
            try:
                sock.sendall(b"".join(reqs))
            except OSError:
                return
            sent.set()
        sent.set()
        threading.Event().wait()  # keep the socket open, unread, until the exit


def trickle(sock: socket.socket, size: int, length: int, rate: int, index: int,
            sent: threading.Event) -> None:
    """One WRITE of ``length`` whose payload comes at ``rate`` bytes a second."""
    offset = (index * length) % max(length, size - size % length)
    with sock:
        try:
            sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, index, offset, length))
            sent.set()
            left = length - 1  # never the last byte: the write stays incomplete
            piece = max(1, rate // 10)
            while left > 0:
                n = min(piece, left)
                sock.sendall(bytes([index & 0xFF]) * n)
                left -= n
                time.sleep(0.1)
        except OSError:
            return
        threading.Event().wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True, help="the server's Unix socket")
    ap.add_argument("--export", default="disk")
    ap.add_argument("--mode", choices=["stall", "trickle"], required=True)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--length", type=parse_size, default=1 << 20,
                    help="bytes per request (default 1M)")
    ap.add_argument("--total", type=parse_size, default=1 << 30,
                    help="stall: bytes of reads each client asks for (default 1G)")
    ap.add_argument("--rate", type=parse_size, default=64 << 10,
                    help="trickle: payload bytes a second per client (default 64K)")
    ap.add_argument("--duration", type=float, default=3600.0)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    events = []
    for i in range(args.clients):
        sock, size = connect(args.socket, args.export)
        sent = threading.Event()
        events.append(sent)
        if args.mode == "stall":
            target, fargs = stall, (sock, size, args.length, args.total, sent)
        else:
            target, fargs = trickle, (sock, size, args.length, args.rate, i, sent)
        threading.Thread(target=target, args=fargs, daemon=True).start()
    for e in events:
        e.wait(30)
    print(f"ready {args.clients}", flush=True)
    time.sleep(args.duration)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
