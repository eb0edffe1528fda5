"""The NBD exception tree and the one errno -> NBD error mapping (nbd/errors.py)."""

from __future__ import annotations

import errno
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdquorum.nbd import errors
from nbdquorum.nbd.constants import CmdFlag, NbdErrno
from nbdquorum.nbd.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    to_nbd_errno,
)

E = NbdErrno
NONE = CmdFlag(0)
ALL = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO


def test_exception_tree() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert issubclass(ProtocolError, Exception)
    with pytest.raises(TypeError):
        ProtocolError("abstract")
    assert str(RemoteProtocolError("bad magic")) == "bad magic"


def test_docstring_lists_the_tree() -> None:
    doc = errors.__doc__ or ""
    for name in ("ProtocolError", "LocalProtocolError", "RemoteProtocolError"):
        assert name in doc


@pytest.mark.parametrize(
    ("code", "flags", "expected"),
    [
        (errno.EPERM, NONE, E.EPERM),
        (errno.EROFS, NONE, E.EPERM),
        (errno.EIO, NONE, E.EIO),
        (errno.ENOMEM, NONE, E.ENOMEM),
        (errno.EDQUOT, NONE, E.ENOSPC),
        (errno.EFBIG, NONE, E.ENOSPC),
        (errno.ENOSPC, NONE, E.ENOSPC),
        (errno.ESHUTDOWN, NONE, E.ESHUTDOWN),
        (errno.EINVAL, NONE, E.EINVAL),
        (errno.ENOTSUP, NONE, E.EINVAL),
        (errno.ENOTSUP, CmdFlag.FAST_ZERO, E.ENOTSUP),
        (errno.EOPNOTSUPP, CmdFlag.FAST_ZERO | CmdFlag.FUA, E.ENOTSUP),
        (errno.ENOTSUP, CmdFlag.DF, E.EINVAL),
        (errno.EOVERFLOW, NONE, E.EINVAL),
        (errno.EOVERFLOW, CmdFlag.DF, E.EOVERFLOW),
        (errno.EOVERFLOW, CmdFlag.FAST_ZERO, E.EINVAL),
        (errno.ENOENT, NONE, E.EINVAL),  # the default, as nbdkit's nbd_errno()
        (errno.EACCES, NONE, E.EINVAL),
        (errno.EAGAIN, ALL, E.EINVAL),
        (-errno.EIO, NONE, E.EINVAL),
        (100_000, NONE, E.EINVAL),
    ],
)
def test_errno_values(code: int, flags: CmdFlag, expected: NbdErrno) -> None:
    assert to_nbd_errno(code, flags) is expected
    assert to_nbd_errno(OSError(code, "x"), flags) is expected


def test_default_flags_are_none() -> None:
    assert to_nbd_errno(errno.ENOTSUP) is E.EINVAL
    assert to_nbd_errno(errno.EOVERFLOW) is E.EINVAL


def test_exceptions() -> None:
    assert to_nbd_errno(PermissionError(errno.EPERM, "no")) is E.EPERM
    assert to_nbd_errno(OSError(errno.EROFS, "read-only file system")) is E.EPERM
    assert to_nbd_errno(OSError("no errno")) is E.EIO  # nbdkit: errno unset -> EIO
    assert to_nbd_errno(RuntimeError("bug")) is E.EIO
    assert to_nbd_errno(MemoryError()) is E.ENOMEM


def test_zero_is_not_an_error() -> None:
    with pytest.raises(ValueError):
        to_nbd_errno(0)


@pytest.mark.skipif(sys.platform != "linux", reason="NBD errno values are Linux's")
@pytest.mark.parametrize("nbd", list(NbdErrno))
def test_nbd_values_map_to_themselves_with_the_right_flag(nbd: NbdErrno) -> None:
    assert to_nbd_errno(int(nbd), ALL) is nbd


@given(st.integers(1, 1 << 20), st.integers(0, 0xFFFF))
def test_always_an_nbd_errno(code: int, flags: int) -> None:
    assert isinstance(to_nbd_errno(code, CmdFlag(flags)), NbdErrno)


def test_a_child_timeout_or_vanished_disk_is_an_io_error() -> None:
    import errno

    from nbdquorum.nbd.constants import NbdErrno
    from nbdquorum.nbd.errors import to_nbd_errno

    for code in (errno.ETIMEDOUT, errno.ENODEV, errno.ENXIO):
        assert to_nbd_errno(OSError(code, "x")) == NbdErrno.EIO
