"""NBD errors: protocol violations and the errno -> NBD error mapping.

Exception tree::

    Exception
     +-- ProtocolError            abstract: someone broke the NBD protocol
          +-- LocalProtocolError  we did (a bug in the caller of ServerConnection)
          +-- RemoteProtocolError the client did; close the connection

Block-layer failures are not exceptions of this module: they are ``OSError``
with an ``errno``, turned into an on-the-wire `NbdErrno` by `to_nbd_errno` and
nowhere else.
"""

from __future__ import annotations

import errno as _errno

from .constants import CmdFlag, NbdErrno

__all__ = ["LocalProtocolError", "ProtocolError", "RemoteProtocolError", "to_nbd_errno"]


class ProtocolError(Exception):
    """Someone broke the NBD protocol; never raised directly (as h11's)."""

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("tried to directly instantiate ProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(ProtocolError):
    """The client sent something we cannot parse or must not accept.

    The only sane reaction is to drop the connection (proto.md: "a party MAY
    initiate a hard disconnect if it detects a violation").
    """


# System errno -> NBD error, after nbdkit server/protocol.c nbd_errno() and qemu
# nbd/server.c system_errno_to_nbd_errno().  Anything absent maps to EINVAL.
_ERRNO_TABLE: dict[int, NbdErrno] = {
    _errno.EPERM: NbdErrno.EPERM,
    _errno.EROFS: NbdErrno.EPERM,
    _errno.EIO: NbdErrno.EIO,
    # Beyond nbdkit's table: a child that did not answer in time, or whose
    # disk vanished, failed the request's I/O; EINVAL would blame the client.
    _errno.ETIMEDOUT: NbdErrno.EIO,
    _errno.ENODEV: NbdErrno.EIO,
    _errno.ENXIO: NbdErrno.EIO,
    _errno.ENOMEM: NbdErrno.ENOMEM,
    _errno.EDQUOT: NbdErrno.ENOSPC,
    _errno.EFBIG: NbdErrno.ENOSPC,
    _errno.ENOSPC: NbdErrno.ENOSPC,
    _errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
    _errno.EINVAL: NbdErrno.EINVAL,
}
# ENOTSUP and EOVERFLOW are only allowed as answers to the flag that asks for
# them (proto.md: "Error values"); otherwise they degrade to EINVAL.
_FLAG_GATED: dict[int, tuple[CmdFlag, NbdErrno]] = {
    _errno.ENOTSUP: (CmdFlag.FAST_ZERO, NbdErrno.ENOTSUP),
    _errno.EOPNOTSUPP: (CmdFlag.FAST_ZERO, NbdErrno.ENOTSUP),
    _errno.EOVERFLOW: (CmdFlag.DF, NbdErrno.EOVERFLOW),
}


def to_nbd_errno(err: BaseException | int, flags: CmdFlag = CmdFlag(0)) -> NbdErrno:
    """Map a failure of a request with command flags *flags* to an NBD error.

    *err* is a system errno value or an exception.  An ``OSError`` without an
    errno, or any other exception, counts as EIO (nbdkit: a plugin that fails
    without setting errno reports EIO); ``MemoryError`` is ENOMEM.  Unknown errno
    values map to EINVAL, which is also what the spec tells clients to assume.

    Raises:
        ValueError: *err* is 0, which is not an error.
    """
    if isinstance(err, BaseException):
        if isinstance(err, MemoryError):
            return NbdErrno.ENOMEM
        if not isinstance(err, OSError) or not err.errno:
            return NbdErrno.EIO
        code = err.errno
    else:
        code = err
    if code == 0:
        raise ValueError("errno 0 is not an error")
    gated = _FLAG_GATED.get(code)
    if gated is not None:
        flag, nbd = gated
        return nbd if flags & flag else NbdErrno.EINVAL
    return _ERRNO_TABLE.get(code, NbdErrno.EINVAL)
