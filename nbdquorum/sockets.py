"""Listening sockets the servers bind themselves: never taking over a live one.

asyncio's ``create_unix_server(path=...)`` unlinks whatever socket file is at
``path`` first, live or not, so a second server started on the same path
silently steals the first one's clients.  Every listener of nbdquorum (NBD,
QMP) is bound here instead:

- a socket file that a live server accepts on is refused (EADDRINUSE, naming
  the path); one that nobody accepts on (left by a crash) is replaced; a path
  that is not a socket is never touched;
- a file the server created is removed when it closes the listener, and only
  if it is still the same file (a successor may have bound the path since);
- every error names the address it is about.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass, field

#: pending connections the kernel queues per listener (qemu-nbd and nbdkit use similar)
BACKLOG = 128


@dataclass
class Listener:
    """A bound, listening socket and the file it created (for Unix sockets)."""

    #: the listening socket (non-blocking once served)
    sock: socket.socket
    #: how logs and errors name it: ``unix:PATH`` or ``tcp:HOST:PORT``
    address: str
    #: the socket file this process created, removed by close()
    path: str | None = None
    #: (st_dev, st_ino) of that file when it was created
    inode: tuple[int, int] | None = field(default=None, repr=False)
    #: listen() was called: connections are queued from now on
    listening: bool = False

    def listen(self, backlog: int = BACKLOG) -> None:
        """Start queueing connections (idempotent).

        Raises:
            OSError: naming the address (a TCP port taken since the bind).
        """
        if not self.listening:
            try:
                self.sock.listen(backlog)
            except OSError as err:
                raise _fail(self.address, err) from err
            self.listening = True

    def close(self) -> None:
        """Close the socket and remove the socket file, if it is still ours."""
        self.sock.close()
        if self.path is None or self.inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        self.inode = None


def _fail(address: str, err: OSError) -> OSError:
    return OSError(err.errno, f"cannot listen on {address}: {err.strerror or err}")


def socket_alive(path: str) -> bool:
    """Whether a server accepts connections on the Unix socket at ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _clear_stale(path: str, address: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"cannot listen on {address}: {path} exists and is not a socket")
    if socket_alive(path):
        raise OSError(errno.EADDRINUSE,
                      f"cannot listen on {address}: {path} is in use by a running server")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # stale: left by a server that crashed


def bind_unix(path: str, *, mode: int | None = None, group: int | None = None,
              listen: bool = True) -> Listener:
    """Bind a Unix socket at ``path`` and (unless ``listen`` is false) listen on it.

    A server binds every address before it opens anything else and listens
    once it is ready, so that a refused start-up never looks alive to clients.

    With ``mode`` (and ``group``, a gid), the socket is bound under a temporary
    name, chmod-ed (and chown-ed) and renamed into place, so it never exists at
    ``path`` with looser permissions or another group.

    Raises:
        OSError: naming the address: the path is live, is not a socket, or
            cannot be bound (missing directory, permissions, too long).
    """
    address = f"unix:{path}"
    _clear_stale(path, address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}~")
    try:
        if (mode is not None or group is not None) and len(os.fsencode(tmp)) < 108:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock.bind(tmp)
            try:
                if group is not None:
                    os.chown(tmp, -1, group)
                if mode is not None:
                    os.chmod(tmp, mode)
                os.rename(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            old = os.umask(0o777 & ~mode) if mode is not None else None
            try:
                sock.bind(path)
            finally:
                if old is not None:
                    os.umask(old)
            if group is not None:
                os.chown(path, -1, group)
            if mode is not None:
                os.chmod(path, mode)
        st = os.lstat(path)
    except OSError as err:
        sock.close()
        raise _fail(address, err) from err
    except BaseException:
        sock.close()
        raise
    li = Listener(sock, address, path, (st.st_dev, st.st_ino))
    if listen:
        try:
            li.listen()
        except OSError:
            li.close()
            raise
    return li


def bind_tcp(host: str, port: int, *, listen: bool = True) -> list[Listener]:
    """Bind every address ``host`` resolves to (as asyncio.start_server), and listen.

    Raises:
        OSError: naming ``tcp:HOST:PORT``: unresolvable, in use, not permitted.
    """
    address = f"tcp:{host}:{port}"
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise OSError(errno.EADDRNOTAVAIL,
                      f"cannot listen on {address}: cannot resolve {host!r}: {err.strerror}"
                      ) from err
    bound: list[Listener] = []
    try:
        for family, _type, _proto, _name, addr in dict.fromkeys(
                (i[0], i[1], i[2], i[3], i[4]) for i in infos):
            s = socket.socket(family, socket.SOCK_STREAM)
            bound.append(Listener(s, address))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            if listen:
                bound[-1].listen()
    except OSError as err:
        for li in bound:
            li.close()
        raise _fail(address, err) from err
    if not bound:
        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {address}: no address")
    return bound


#: the first descriptor systemd passes (sd_listen_fds(3): SD_LISTEN_FDS_START)
LISTEN_FDS_START = 3
#: the environment of the socket activation protocol, cleared once read
LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def inherited(environ: dict[str, str] | None = None) -> list[Listener] | None:
    """The listening sockets passed by systemd socket activation (sd_listen_fds(3)).

    None when this process was not socket-activated: no LISTEN_FDS, or a
    LISTEN_PID naming another process (the variables were inherited from a
    parent).  Otherwise the descriptors 3 .. 3+LISTEN_FDS-1 as Listeners
    without a path: their socket files belong to systemd and are never removed.
    Either way LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES are removed from
    ``environ`` (default os.environ), so no child process takes them for its own.

    Raises:
        OSError: a descriptor that is not a listening stream socket
            (``Accept=yes`` passes connected ones: not supported, as nbdkit).
    """
    env = os.environ if environ is None else environ
    pid, fds, names = (env.pop(k, None) for k in LISTEN_ENV)
    if fds is None or pid is None or not pid.isdigit() or int(pid) != os.getpid():
        return None
    if not fds.isdigit() or int(fds) < 1:
        raise OSError(errno.EINVAL, f"socket activation: bad LISTEN_FDS={fds!r}")
    labels = names.split(":") if names else []
    found: list[Listener] = []
    for i in range(int(fds)):
        fd = LISTEN_FDS_START + i
        try:
            sock = socket.socket(fileno=fd)
        except OSError as err:
            raise OSError(err.errno, f"socket activation: descriptor {fd}: {err.strerror}"
                          ) from err
        os.set_inheritable(fd, False)
        if (sock.type != socket.SOCK_STREAM
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)):
            sock.detach()
            raise OSError(errno.EINVAL, f"socket activation: descriptor {fd} is not a "
                          "listening stream socket (use Accept=no and ListenStream=)")
        found.append(Listener(sock, _describe(sock, labels[i] if i < len(labels) else ""),
                              listening=True))
    return found


def _describe(sock: socket.socket, label: str) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        where = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
        text = f"unix:{where or '(unnamed)'}"
    elif sock.family == socket.AF_INET6:
        text = f"tcp:[{name[0]}]:{name[1]}"
    else:
        text = f"tcp:{name[0]}:{name[1]}"
    return f"{text} (systemd{': ' + label if label else ''})"
