"""The control channel between the primary and a worker.

One JSON object per SOCK_SEQPACKET datagram (message boundaries for free),
file descriptors attached with SCM_RIGHTS.  Both directions are non-blocking
(MSG_DONTWAIT): messages are a few hundred bytes and a socket buffer holds
hundreds of them, so a send that would block means the peer has stopped
reading; the sender is told (send() returns False) and decides.  A datagram
whose descriptors did not all arrive (MSG_CTRUNC: the receiver is out of
descriptors) is passed on flagged ``truncated``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
MAX_FDS = 64
#: the shared epoch page (a memfd both sides map): one little-endian u64 at offset 0
EPOCH = struct.Struct("<Q")

Message = dict[str, Any]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


# socket.send_fds/recv_fds of Python 3.11 drop their flags argument (so
# MSG_DONTWAIT would be ignored): the same two calls, with the flags.
def send_fds(sock: socket.socket, data: bytes, fds: Sequence[int], flags: int) -> int:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    return sock.sendmsg([data], anc, flags)


def recv_fds(sock: socket.socket, bufsize: int, maxfds: int,
             flags: int) -> tuple[bytes, list[int], int]:
    fds = array.array("i")
    data, ancdata, msg_flags, _addr = sock.recvmsg(
        bufsize, socket.CMSG_LEN(maxfds * fds.itemsize), flags)
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
    return data, list(fds), msg_flags


class Channel:
    """Calls ``on_message(msg, fds, truncated)`` per datagram and ``on_eof()`` once at the end.

    The receiver owns the descriptors it is handed and must close them.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message, list[int], bool], None],
        on_eof: Callable[[], None],
    ) -> None:
        self.sock = sock
        self.sock.setblocking(True)
        self.on_message = on_message
        self.on_eof = on_eof
        self.closed = False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def send(self, msg: Message, fds: Sequence[int] = ()) -> bool:
        """Send one message without blocking; False if it was not sent: the
        peer is not reading (the channel stays open) or is gone (on_eof follows)."""
        if self.closed:
            return False
        try:
            send_fds(self.sock, json.dumps(msg).encode(), fds, socket.MSG_DONTWAIT)
            return True
        except (BlockingIOError, InterruptedError):
            log.error("control channel: the peer is not reading; %r not sent", msg.get("op"))
            return False
        except OSError as err:
            log.warning("control channel: send failed: %s", err)
            self._eof()
            return False

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, flags = recv_fds(self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionResetError:
                # the peer exited with messages of ours unread: it is gone, nothing failed
                self._eof()
                return
            except OSError as err:
                log.warning("control channel: receive failed: %s", err)
                self._eof()
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self._eof()
                return
            try:
                msg = json.loads(data)
            except ValueError:
                log.error("control channel: bad message %r", data[:100])
                for fd in fds:
                    os.close(fd)
                continue
            self.on_message(msg, fds, bool(flags & socket.MSG_CTRUNC))

    def _eof(self) -> None:
        if self.closed:
            return
        self.close()
        self.on_eof()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
