"""QMP, server side, as a sans-I/O state machine: bytes in, events out, messages to bytes.

Theory of operation
-------------------
A QMP client sends JSON objects, normally one a line (qmp-spec: 2.1).  Framing
is done by a small scanner that follows strings and brackets over a byte buffer
and keeps its state between ``receive_data`` calls, so a message split anywhere
(or fed one byte at a time) costs O(n) overall.  When the brackets balance, the
span is decoded by :mod:`json` (``json.loads``; a span never needs
``raw_decode``'s trailing-data logic because the scanner already cut it).

QEMU's quirks that clients rely on are kept (as observed on QEMU 7.2's
monitor): single-quoted strings, ``\\'`` escapes, an incomplete object that
waits across newlines for more bytes, a parse error reply without ``id``, a
control byte (or 0xFE/0xFF) that resets a pending message, and the texts of the
input checks ("QMP input must be a JSON object", ...).  One deliberate
difference: after any other parse error the scanner skips to the end of the
line (or to the next reset byte) instead of reporting every bad token again,
so a megabyte of garbage costs one error reply, not thousands.

Phases: ``Phase.NEGOTIATION`` until the ``qmp_capabilities`` handler calls
:meth:`ServerConnection.negotiate`, then ``Phase.COMMAND``; events may be sent
only in the command phase (qmp-spec: 2.2 "Capabilities negotiation").  Bad
input never raises: it becomes a :class:`ParseError` or :class:`BadRequest`
event that the server answers with an error reply.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections import deque
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from nbdquorum.qmp.errors import ErrorClass, LocalProtocolError

#: QEMU's json-streamer limits (qobject/json-streamer.c): a pending message
#: larger than this, or nested deeper, is dropped with an error reply.
MAX_MESSAGE_SIZE: Final = 64 << 20
MAX_NESTING: Final = 1024
#: at most this much of an offending token is quoted back in an error
_QUOTE_MAX = 32


class _NoId:
    """The request had no ``id`` member (``"id": null`` is a real id)."""

    _instance: _NoId | None = None

    def __new__(cls) -> _NoId:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NO_ID"

    def __bool__(self) -> bool:
        return False


NO_ID: Final = _NoId()


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: returned by :meth:`ServerConnection.next_event` when more bytes are needed
NEED_DATA: Final = _NeedData()


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Execute:
    """A well-formed command: ``{"execute"|"exec-oob": name, "arguments"?, "id"?}``."""

    name: str  # the command's wire name, e.g. "x-blockdev-change"
    arguments: dict[str, Any] = field(default_factory=dict)  # wire (dash) spelling, unchecked
    id: Any = NO_ID  # echoed verbatim in the reply; NO_ID if absent
    oob: bool = False  # sent as exec-oob (only after oob was enabled)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """Valid JSON that is not a valid QMP command; answered with ``id`` if it had one."""

    desc: str  # QEMU's text, e.g. "QMP input member 'foo' is unexpected"
    id: Any = NO_ID


@dataclass(frozen=True, slots=True)
class ParseError:
    """Bytes that are not JSON; answered without ``id`` (qmp-spec: 2.4.2)."""

    desc: str  # "JSON parse error, ..."


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its side; nothing follows."""


QMPEvent = Execute | BadRequest | ParseError | ConnectionClosed


class Phase(enum.Enum):
    NEGOTIATION = "negotiation"  #: greeting sent; only qmp_capabilities works
    COMMAND = "command"  #: negotiated; all commands, and events are delivered
    CLOSED = "closed"  #: the peer hung up


# --------------------------------------------------------------------------- messages


class Message(MutableMapping[str, Any]):
    """One QMP message: a JSON object that serializes to one ``\\r\\n``-ended line.

    Modelled on qemu/qemu python/qemu/qmp/message.py: a mapping plus
    ``bytes(msg)``.  Output is ASCII with json's default separators, which
    reproduces QEMU's spacing.
    """

    def __init__(self, value: Mapping[str, Any] | None = None) -> None:
        self._obj: dict[str, Any] = dict(value or {})

    def __getitem__(self, key: str) -> Any:
        return self._obj[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._obj[key] = value

    def __delitem__(self, key: str) -> None:
        del self._obj[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._obj)

    def __len__(self) -> int:
        return len(self._obj)

    def __repr__(self) -> str:
        return f"Message({self._obj!r})"

    def __bytes__(self) -> bytes:
        """Raises: ValueError or TypeError if a value is not JSON (a bug: LocalProtocolError)."""
        try:
            text = json.dumps(self._obj, ensure_ascii=True, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise LocalProtocolError(f"not JSON-serializable: {err}") from err
        return text.encode("ascii") + b"\r\n"


def greeting(major: int, minor: int, micro: int, package: str,
             capabilities: Sequence[str] = ("oob",)) -> Message:
    """The greeting, keys in QEMU's order (reference 3.2)."""
    return Message({"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": package},
        "capabilities": list(capabilities),
    }})


def return_message(value: Any, id: Any = NO_ID) -> Message:
    """``{"return": value, "id": id}``: QEMU puts ``return`` first."""
    msg = Message({"return": value})
    if id is not NO_ID:
        msg["id"] = id
    return msg


def error_message(error_class: ErrorClass | str, desc: str, id: Any = NO_ID) -> Message:
    """``{"id": id, "error": {"class", "desc"}}``: QEMU puts ``id`` first."""
    msg = Message()
    if id is not NO_ID:
        msg["id"] = id
    msg["error"] = {"class": str(error_class), "desc": desc}
    return msg


def event_message(name: str, data: Mapping[str, Any] | None, timestamp: float) -> Message:
    """``{"timestamp": {"seconds", "microseconds"}, "event", "data"?}`` (qmp-spec: 2.5)."""
    if timestamp < 0:
        seconds, micro = -1, -1
    else:
        seconds = int(timestamp)
        micro = min(round((timestamp - seconds) * 1_000_000), 999_999)
    msg = Message({"timestamp": {"seconds": seconds, "microseconds": micro}, "event": name})
    if data is not None:
        msg["data"] = dict(data)
    return msg


# --------------------------------------------------------------------------- scanner

_WS: Final = frozenset(b" \t\r\n")
_STRUCT_OPEN: Final = frozenset(b"{[")
_STRUCT_CLOSE: Final = frozenset(b"}]")
_QUOTES: Final = frozenset(b"\"'")
# Bytes that can never appear in JSON text outside a string, and reset the parser
# (qmp-spec: "Forcing the JSON parser into known-good state").
_RESET_BYTES: Final = frozenset([*range(0x20), 0xFE, 0xFF]) - _WS
#: inside a message, outside strings: the next byte that matters
_OUTSIDE_RE: Final = re.compile(rb"[{}\[\]\"'\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]")
#: inside a string: the closing quote, an escape, or a control/reset byte
_IN_DQ_RE: Final = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_IN_SQ_RE: Final = re.compile(rb"['\\\x00-\x1f\xfe\xff]")
#: the end of a bare top-level token (a number or a keyword)
_TOKEN_END_RE: Final = re.compile(rb"[\s{}\[\],:\"'\x00-\x1f\xfe\xff]")
_RECOVER_RE: Final = re.compile(rb"[\n\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]")
_KEYWORD_RE: Final = re.compile(r"[A-Za-z]+")


def _quote(raw: bytes) -> str:
    """A token for an error text.  Control characters stay raw, as QEMU leaves them:
    the JSON encoder escapes them on the wire (``'\u001b'``)."""
    try:
        text = raw[:_QUOTE_MAX].decode("utf-8")
    except UnicodeDecodeError:
        text = raw[:_QUOTE_MAX].decode("latin-1")
    return text + ("..." if len(raw) > _QUOTE_MAX else "")


def _requote(text: str) -> str:
    """Turn QEMU's extensions (single-quoted strings, ``\\'``) into strict JSON."""
    out: list[str] = []
    i, n = 0, len(text)
    quote = ""
    while i < n:
        c = text[i]
        if not quote:
            if c == "'":
                quote = "'"
                out.append('"')
            else:
                if c == '"':
                    quote = '"'
                out.append(c)
        elif c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            out.append("'" if nxt == "'" else c + nxt)
            i += 1
        elif c == quote:
            quote = ""
            out.append('"')
        elif c == '"':  # a double quote inside a single-quoted string
            out.append('\\"')
        else:
            out.append(c)
        i += 1
    return "".join(out)


class _DuplicateKey(ValueError):
    pass


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    """A number JSON can carry back: ``1e999`` would be infinity, which no reply
    (an error echoes the request's id) could serialise."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range '{text}'")
    return value


_DECODER: Final = json.JSONDecoder(object_pairs_hook=_object_pairs,
                                   parse_constant=_reject_constant,
                                   parse_float=_finite_float)


def _decode(span: bytes) -> Any:
    """Decode one framed JSON value.

    Raises:
        ValueError: with the error text (after "JSON parse error, ").
    """
    try:
        text = span.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("invalid UTF-8 sequence in string") from None
    if "'" in text:
        text = _requote(text)
    try:
        return _DECODER.decode(text)
    except _DuplicateKey as err:
        raise ValueError(f"duplicate key '{err}'") from None
    except RecursionError:
        raise ValueError("nesting depth limit exceeded") from None
    except json.JSONDecodeError as err:
        msg = err.msg
        raise ValueError(msg[:1].lower() + msg[1:]) from None
    except ValueError as err:  # int too long, parse_constant, parse_float
        raise ValueError(str(err)) from None


class ServerConnection:
    """The server side of one QMP connection.

    ``receive_data(bytes)`` (``b""`` for EOF), then ``next_event()`` until it
    returns ``NEED_DATA``; ``send(message)`` returns the bytes to write.
    """

    def __init__(self, greeting_message: Message, *, max_message_size: int = MAX_MESSAGE_SIZE,
                 max_nesting: int = MAX_NESTING) -> None:
        self._greeting = greeting_message
        self.phase = Phase.NEGOTIATION
        #: capabilities the client enabled with qmp_capabilities
        self.enabled: frozenset[str] = frozenset()
        self.max_message_size = max_message_size
        self.max_nesting = max_nesting
        self._buf = bytearray()
        self._pos = 0  # scan position in _buf
        self._start = -1  # start of the pending message in _buf, or -1
        self._depth = 0
        self._quote = 0  # the open string's quote byte, or 0
        self._escape = False  # the last byte was a backslash inside a string
        self._recovering = False  # skipping to the end of the line after an error
        self._eof = False
        self._events: deque[QMPEvent] = deque()

    # ----- state

    @property
    def negotiated(self) -> bool:
        return self.phase is Phase.COMMAND

    @property
    def oob_enabled(self) -> bool:
        return "oob" in self.enabled

    def negotiate(self, enable: Sequence[str] = ()) -> None:
        """Leave the negotiation phase (called by the qmp_capabilities handler).

        Raises:
            LocalProtocolError: negotiation is already complete.
        """
        if self.phase is not Phase.NEGOTIATION:
            raise LocalProtocolError(f"cannot negotiate in phase {self.phase.value}")
        self.enabled = frozenset(enable)
        self.phase = Phase.COMMAND

    # ----- output

    def initial_bytes(self) -> bytes:
        return bytes(self._greeting)

    def send(self, message: Message) -> bytes:
        """Serialize a reply or event.

        Raises:
            LocalProtocolError: an event before negotiation, or a value that is not JSON.
        """
        if "event" in message and self.phase is not Phase.COMMAND:
            raise LocalProtocolError("events are sent only after capabilities negotiation")
        return bytes(message)

    # ----- input

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the client; ``b""`` means the client closed its side."""
        if self._eof:
            if data:
                raise LocalProtocolError("data after EOF")
            return
        if not data:
            self._eof = True
            self._scan()
            self._events.append(ConnectionClosed())
            return
        self._buf += data
        self._scan()

    def next_event(self) -> QMPEvent | _NeedData:
        if self._events:
            ev = self._events.popleft()
            if isinstance(ev, ConnectionClosed):
                self.phase = Phase.CLOSED
            return ev
        return NEED_DATA

    @property
    def buffered(self) -> int:
        """Bytes received and not yet turned into events (a pending message)."""
        return len(self._buf)

    # ----- the scanner

    def _error(self, desc: str, *, recover: bool) -> None:
        self._events.append(ParseError(f"JSON parse error, {desc}"))
        self._reset_message()
        self._recovering = recover

    def _reset_message(self) -> None:
        self._start = -1
        self._depth = 0
        self._quote = 0
        self._escape = False

    def _compact(self) -> None:
        keep = self._start if self._start >= 0 else self._pos
        if keep:
            del self._buf[:keep]
            self._pos -= keep
            if self._start >= 0:
                self._start = 0

    def _scan(self) -> None:
        buf = self._buf
        n = len(buf)
        while self._pos < n:
            if self._recovering:
                m = _RECOVER_RE.search(buf, self._pos)
                if m is None:
                    self._pos = n
                    break
                self._pos = m.end()  # the newline or reset byte ends recovery
                self._recovering = False
                continue
            if self._start < 0:
                if not self._scan_top(n):
                    break
            elif not self._scan_message(n):
                break
        self._compact()

    def _scan_top(self, n: int) -> bool:
        """At the top level, between messages.  Returns False to wait for data."""
        buf = self._buf
        b = buf[self._pos]
        if b in _WS:
            self._pos += 1
        elif b in _STRUCT_OPEN:
            self._start = self._pos
            self._depth = 1
            self._pos += 1
        elif b in _RESET_BYTES:
            self._pos += 1
            self._error(f"stray '{_quote(bytes([b]))}'", recover=False)
        elif b in _STRUCT_CLOSE or b in b",:":
            self._pos += 1
            self._error("expecting value", recover=True)
        elif b in _QUOTES:
            # a top-level string: frame it as a message of its own
            self._start = self._pos
            self._depth = 0
            self._quote = b
            self._pos += 1
        else:
            m = _TOKEN_END_RE.search(buf, self._pos)
            if m is None and not self._eof:
                if n - self._pos > self.max_message_size:
                    self._pos = n
                    self._error("token size limit exceeded", recover=True)
                    return True
                return False
            end = m.start() if m is not None else n
            token = bytes(buf[self._pos:end])
            self._pos = end
            try:
                json.loads(token, parse_constant=_reject_constant)
            except ValueError:
                text = token.decode("utf-8", errors="replace")
                what = "keyword" if _KEYWORD_RE.fullmatch(text) else "token"
                self._error(f"invalid {what} '{_quote(token)}'", recover=True)
            else:
                self._events.append(BadRequest("QMP input must be a JSON object"))
                self._recovering = True
        return True

    def _scan_message(self, n: int) -> bool:
        """Inside a pending message.  Returns False to wait for data."""
        buf = self._buf
        if self._pos - self._start > self.max_message_size:
            self._pos = n
            self._error("token size limit exceeded", recover=True)
            return True
        if self._quote:
            if self._escape:
                self._escape = False
                self._pos += 1
                return True
            m = (_IN_DQ_RE if self._quote == 0x22 else _IN_SQ_RE).search(buf, self._pos)
            if m is None:
                self._pos = n
                return False
            b = buf[m.start()]
            self._pos = m.end()
            if b == 0x5C:  # backslash: the next byte is escaped
                self._escape = True
            elif b == self._quote:
                self._quote = 0
                if self._depth == 0:
                    self._complete()
            else:
                # A control byte inside a string: QEMU's lexer rejects it and resets.
                # A reset byte is the resync point itself; a tab or CR is a typo,
                # so skip the rest of its line; a newline already starts a new one.
                self._error(f"stray '{_quote(bytes([b]))}'", recover=b in b"\t\r")
            return True
        m = _OUTSIDE_RE.search(buf, self._pos)
        if m is None:
            self._pos = n
            return False
        b = buf[m.start()]
        self._pos = m.end()
        if b in _STRUCT_OPEN:
            self._depth += 1
            if self._depth > self.max_nesting:
                self._error("nesting depth limit exceeded", recover=True)
        elif b in _STRUCT_CLOSE:
            self._depth -= 1
            if self._depth == 0:
                self._complete()
        elif b in _QUOTES:
            self._quote = b
        else:
            self._error(f"stray '{_quote(bytes([b]))}'", recover=False)
        return True

    def _complete(self) -> None:
        span = bytes(self._buf[self._start:self._pos])
        self._reset_message()
        try:
            value = _decode(span)
        except ValueError as err:
            self._events.append(ParseError(f"JSON parse error, {err}"))
            return
        self._events.append(self._request(value))

    def _request(self, value: Any) -> Execute | BadRequest:
        """QEMU's qmp_dispatch_check_obj(), with its texts (reference 3.4)."""
        if not isinstance(value, dict):
            return BadRequest("QMP input must be a JSON object")
        ident = value.get("id", NO_ID)
        for key, member in value.items():
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(member, str):
                    return BadRequest(f"QMP input member '{key}' must be a string", ident)
            elif key == "arguments":
                if not isinstance(member, dict):
                    return BadRequest("QMP input member 'arguments' must be an object", ident)
            elif key != "id":
                return BadRequest(f"QMP input member '{key}' is unexpected", ident)
        if "execute" in value:
            name, oob = value["execute"], False
        elif "exec-oob" in value:
            name, oob = value["exec-oob"], True
        else:
            return BadRequest("QMP input lacks member 'execute'", ident)
        return Execute(name, dict(value.get("arguments", {})), ident, oob)
