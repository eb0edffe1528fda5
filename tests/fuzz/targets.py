"""Fuzz targets: one input, fed to a sans-I/O parser, with the parser's contract as
the oracle.  Used by the coverage-guided fuzzer (run.py, atheris) and replayed by
test_fuzz.py over the corpus and every regression input.

Input layout (both targets): the first byte chooses how the rest is cut into
reads (1..16 bytes each, or all at once when 0 mod 17) and, for NBD, whether
it arrives through ``receive_data`` or the ``receive_buffer`` path; the rest is
what the client sends.  The server side answers every event as the real server
would (option replies inside the protocol; a reply to each request; QMP
negotiation and replies), so replies are fuzzed through ``send`` as well.

The contracts:
- NBD (nbd/protocol.py): ``next_event`` returns events or NEED_DATA, or raises
  RemoteProtocolError, after which the connection is CLOSED; ``peek_request``
  never raises and agrees with the request that follows; a reply built from a
  request that ``validate`` let through is always sendable.
- QMP (qmp/protocol.py): bad input never raises; it becomes ParseError or
  BadRequest events; every event can be answered; EOF ends with ConnectionClosed.

Anything else raised is a crash (the fuzzer keeps the input).
"""

from __future__ import annotations

from nbdquorum.nbd import (
    NEED_DATA,
    BlockStatusReply,
    Cmd,
    DataChunk,
    Disconnect,
    ErrorReply,
    ExportChosen,
    ExportInfo,
    HoleChunk,
    NbdErrno,
    Phase,
    ReadReply,
    RemoteProtocolError,
    Request,
    ServerConnection,
    SimpleReply,
    TransmissionFlag,
)
from nbdquorum.qmp import protocol as qmp

_FLAGS = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA
          | TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
          | TransmissionFlag.SEND_DF | TransmissionFlag.SEND_CACHE
          | TransmissionFlag.SEND_FAST_ZERO | TransmissionFlag.CAN_MULTI_CONN)
EXPORTS = {
    "disk": ExportInfo("disk", 16 << 20, "a fuzzed export", flags=_FLAGS),
    "ro": ExportInfo("ro", 1 << 20, read_only=True,
                     flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY),
}
#: reads longer than this are answered with holes (no big buffers in the fuzzer)
_DATA_MAX = 64 << 10


def _cuts(data: bytes) -> tuple[int, bool, bytes]:
    if not data:
        return 1, False, b""
    step = data[0] % 17
    return step or max(1, len(data)), bool(data[0] & 0x80), data[1:]


def _reply(conn: ServerConnection, req: Request) -> object:
    bad = conn.validate(req)
    if bad:
        return ErrorReply(req.cookie, bad, "invalid request")
    if req.cmd == Cmd.READ:
        if req.length <= _DATA_MAX:
            return ReadReply(req.cookie, [DataChunk(req.offset, bytes(req.length))])
        if conn.structured:
            return ReadReply(req.cookie, [HoleChunk(req.offset, req.length)])
        return ErrorReply(req.cookie, NbdErrno.ENOMEM, "too big for the fuzzer")
    if req.cmd == Cmd.BLOCK_STATUS:
        if not conn.meta_contexts:
            return ErrorReply(req.cookie, NbdErrno.EINVAL, "no context")
        return BlockStatusReply(req.cookie, next(iter(conn.meta_contexts)), [(req.length, 0)])
    if req.cmd == Cmd.WRITE:
        assert len(req.data) == req.length, (len(req.data), req.length)
    return SimpleReply(req.cookie)


def _pump_nbd(conn: ServerConnection) -> bool:
    """Take every event now parseable; False once the connection is over."""
    while True:
        peek = conn.peek_request()
        try:
            ev = conn.next_event()
        except RemoteProtocolError:
            assert conn.phase is Phase.CLOSED, conn.phase
            conn.data_to_send()
            return False
        conn.data_to_send()
        if ev is NEED_DATA:
            return True
        if isinstance(ev, Request):
            if peek is not None:
                assert (peek[0], peek[1]) == (int(ev.cmd), ev.length), (peek, ev)
            conn.send(_reply(conn, ev))  # type: ignore[arg-type]
        elif isinstance(ev, Disconnect):
            return False
        else:
            assert isinstance(ev, ExportChosen), ev
            assert conn.phase is Phase.TRANSMISSION


def nbd_one_input(data: bytes) -> None:
    """The NBD server's handshake and transmission parser, fed ``data``."""
    step, buffered, wire = _cuts(data)
    conn = ServerConnection(EXPORTS, "disk")
    conn.initial_bytes()
    for i in range(0, len(wire), step):
        piece = wire[i:i + step]
        if buffered:  # the asyncio BufferedProtocol path
            while piece:
                buf = conn.receive_buffer()
                n = min(len(buf), len(piece))
                buf[:n] = piece[:n]
                conn.buffer_filled(n)
                piece = piece[n:]
        else:
            conn.receive_data(piece)
        if not _pump_nbd(conn):
            return
    conn.receive_data(b"")
    _pump_nbd(conn)


_GREETING = qmp.greeting(0, 1, 0, "nbdquorum fuzz")


def _pump_qmp(conn: qmp.ServerConnection) -> bool:
    while True:
        ev = conn.next_event()
        if ev is qmp.NEED_DATA:
            return True
        if isinstance(ev, qmp.ConnectionClosed):
            return False
        if isinstance(ev, qmp.Execute):
            if ev.name == "qmp_capabilities" and not conn.negotiated:
                conn.negotiate(("oob",) if ev.arguments.get("enable") == ["oob"] else ())
                conn.send(qmp.event_message("RESUME", None, 1.5))
            conn.send(qmp.return_message({"echo": ev.arguments}, ev.id))
        elif isinstance(ev, qmp.BadRequest):
            conn.send(qmp.error_message("GenericError", ev.desc, ev.id))
        else:
            assert isinstance(ev, qmp.ParseError), ev
            conn.send(qmp.error_message("GenericError", ev.desc))


def qmp_one_input(data: bytes) -> None:
    """The QMP server's parser, fed ``data`` (small limits, to reach them)."""
    step, _buffered, wire = _cuts(data)
    conn = qmp.ServerConnection(_GREETING, max_message_size=4096, max_nesting=32)
    conn.initial_bytes()
    for i in range(0, len(wire), step):
        conn.receive_data(wire[i:i + step])
        if not _pump_qmp(conn):
            return
    conn.receive_data(b"")
    assert not _pump_qmp(conn), "no ConnectionClosed after EOF"


TARGETS = {"nbd": nbd_one_input, "qmp": qmp_one_input}
