"""The control channel between the primary and a worker.

One JSON object per SOCK_SEQPACKET datagram (message boundaries for free),
file descriptors attached with SCM_RIGHTS.  Sends block (messages are a few
hundred bytes, a socket buffer holds hundreds of them, and the peer's loop
reads them at once); receives are non-blocking (MSG_DONTWAIT on a blocking
socket) and driven by the event loop's reader callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 16
MAX_FDS = 64

Message = dict[str, Any]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


class Channel:
    """Calls ``on_message(msg, fds)`` per datagram and ``on_eof()`` once at the end.

    The receiver owns the descriptors it is handed and must close them.
    """

    def __init__(
        self,
        sock: socket.socket,
        on_message: Callable[[Message, list[int]], None],
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
        """Send one message; False if the peer is gone (on_eof follows)."""
        if self.closed:
            return False
        try:
            socket.send_fds(self.sock, [json.dumps(msg).encode()], list(fds))
            return True
        except OSError as err:
            log.warning("control channel: send failed: %s", err)
            self._eof()
            return False

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, _flags, _addr = socket.recv_fds(
                    self.sock, MAX_MESSAGE, MAX_FDS, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
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
            self.on_message(msg, fds)

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
