"""Errors of the QMP monitor.

Exception tree:
    QMPError                 a command failed; the client gets
     |                       ``{"id": ..., "error": {"class": error_class, "desc": desc}}``
     |                       (qemu/qemu qapi/qmp-dispatch.c, qmp_error_response)
    ProtocolError            misuse of the QMP protocol objects (abstract)
     +-- LocalProtocolError  we broke the protocol, e.g. an event sent before
                             capabilities negotiation: a bug in nbdquorum

Bad input from a client never raises: the sans-I/O connection (protocol.py)
turns it into ``ParseError``/``BadRequest`` events, the server answers them
with an error reply and the monitor keeps working (qmp-spec: "Errors").
"""

from __future__ import annotations

import enum


class ErrorClass(enum.StrEnum):
    """The error classes QEMU still uses (qemu/qemu qapi/error.json)."""

    GENERIC_ERROR = "GenericError"  #: the default, for any other error
    COMMAND_NOT_FOUND = "CommandNotFound"  #: unknown or not-yet-available command
    DEVICE_NOT_FOUND = "DeviceNotFound"  #: a named device (here: node) is absent


class QMPError(Exception):
    """A command failed: ``error_class`` and ``desc`` go on the wire as they are.

    ``desc`` reuses QEMU's wording wherever QEMU has a text for the same
    situation, because scripts compare it even though qmp-spec says not to.
    """

    def __init__(self, error_class: ErrorClass | str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = str(error_class)
        self.desc = desc

    def __repr__(self) -> str:
        return f"QMPError({self.error_class!r}, {self.desc!r})"


def generic(desc: str) -> QMPError:
    return QMPError(ErrorClass.GENERIC_ERROR, desc)


def command_not_found(desc: str) -> QMPError:
    return QMPError(ErrorClass.COMMAND_NOT_FOUND, desc)


class ProtocolError(Exception):
    """Abstract: the QMP protocol objects were used in a way the protocol forbids."""

    def __init__(self, msg: str) -> None:
        if type(self) is ProtocolError:
            raise TypeError("use LocalProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """We (the server) tried to do something the protocol forbids: a bug."""
