"""Byte-level tests of the sans-I/O NBD server (nbdquorum/nbd/protocol.py).

Every frame is built by hand with struct.pack from the layouts in proto.md, and
every input is fed three ways, as h11's tests do: all at once, one byte at a
time, and followed by the start of the next frame.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdquorum.nbd import (
    IHAVEOPT,
    MAX_BLOCK,
    META_BASE_ALLOCATION,
    NBDMAGIC,
    NEED_DATA,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    BlockStatusReply,
    ClientFlag,
    Cmd,
    CmdFlag,
    DataChunk,
    Disconnect,
    ErrorReply,
    Event,
    ExportChosen,
    ExportInfo,
    GlobalFlag,
    HoleChunk,
    Info,
    LocalProtocolError,
    NbdErrno,
    Opt,
    Phase,
    ReadReply,
    RemoteProtocolError,
    Rep,
    ReplyFlag,
    ReplyType,
    Request,
    ServerConnection,
    SimpleReply,
    StartTLS,
    StateFlag,
    TLSMode,
    TransmissionFlag,
)
from nbdquorum.nbd.constants import MAX_OPTION_LENGTH, MAX_STRING, MAX_WRITE_PAYLOAD

TF = TransmissionFlag
MiB = 1024 * 1024
ALL_FLAGS = (
    TF.HAS_FLAGS
    | TF.SEND_FLUSH
    | TF.SEND_FUA
    | TF.SEND_TRIM
    | TF.SEND_WRITE_ZEROES
    | TF.SEND_DF
    | TF.SEND_CACHE
    | TF.SEND_FAST_ZERO
    | TF.CAN_MULTI_CONN
)
EXPORTS = {
    "disk": ExportInfo("disk", 64 * MiB, "the test disk", flags=ALL_FLAGS),
    "ro": ExportInfo("ro", 1 * MiB, read_only=True, flags=TF.SEND_FLUSH),
    "bare": ExportInfo("bare", 1 * MiB),  # advertises nothing but HAS_FLAGS
    "aligned": ExportInfo("aligned", 1 * MiB, flags=ALL_FLAGS, min_block=512, max_block=MiB),
}
DEFAULT = "disk"
# The flags "disk" is advertised with, without and with structured replies.
DISK_FLAGS = ALL_FLAGS & ~TF.SEND_DF
DISK_FLAGS_STRUCTURED = ALL_FLAGS
FIXED = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES

# -- Frame builders (proto.md layouts) -------------------------------------------------


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def string(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return u32(len(raw)) + raw


def opt(option: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, option, len(data)) + data


def rep(option: int, reply: int, data: bytes = b"") -> bytes:
    return struct.pack(">QIII", REPLY_MAGIC, option, reply, len(data)) + data


def rep_error(option: int, reply: Rep, message: str) -> bytes:
    return rep(option, reply, message.encode())


def info_data(name: str | bytes, *infos: int) -> bytes:
    """Option data of NBD_OPT_INFO and NBD_OPT_GO."""
    return string(name) + u16(len(infos)) + b"".join(u16(i) for i in infos)


def meta_data(name: str | bytes, *queries: str | bytes) -> bytes:
    """Option data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT."""
    return string(name) + u32(len(queries)) + b"".join(string(q) for q in queries)


def info_export(info: ExportInfo, flags: int) -> bytes:
    return struct.pack(">HQH", Info.EXPORT, info.size, flags)


def info_block_size(info: ExportInfo) -> bytes:
    return struct.pack(
        ">HIII", Info.BLOCK_SIZE, info.min_block, info.preferred_block, info.max_block
    )


def meta_context(context_id: int, name: str = META_BASE_ALLOCATION) -> bytes:
    return u32(context_id) + name.encode()


def req(
    cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, cmd, cookie, offset, length) + data


def simple(cookie: int, error: int = 0) -> bytes:
    return struct.pack(">IIQ", SIMPLE_REPLY_MAGIC, error, cookie)


def chunk(flags: int, kind: int, cookie: int, payload: bytes) -> bytes:
    return (
        struct.pack(">IHHQI", STRUCTURED_REPLY_MAGIC, flags, kind, cookie, len(payload)) + payload
    )


# -- Driving a connection --------------------------------------------------------------


def drain(conn: ServerConnection) -> tuple[list[Event], bytes]:
    """Call next_event() until it needs data, the connection ends or TLS is to start."""
    events: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            break
        assert not isinstance(ev, type)
        events.append(ev)
        if isinstance(ev, Disconnect | StartTLS):
            break
    return events, conn.data_to_send()


def feed(conn: ServerConnection, data: bytes) -> tuple[list[Event], bytes]:
    """Feed *data* (``b""`` feeds nothing) and drain."""
    if data:
        conn.receive_data(data)
    return drain(conn)


def feed_eof(conn: ServerConnection) -> tuple[list[Event], bytes]:
    conn.receive_data(b"")
    return drain(conn)


def new_conn(exports: dict[str, ExportInfo] | None = None) -> ServerConnection:
    return ServerConnection(EXPORTS if exports is None else exports, DEFAULT)


def handshake_conn(
    cflags: int = FIXED, structured: bool = False, meta: bool = False
) -> ServerConnection:
    """A connection in option haggling, client flags already received."""
    conn = new_conn()
    wire = u32(cflags)
    if structured:
        wire += opt(Opt.STRUCTURED_REPLY)
    if meta:
        wire += opt(Opt.SET_META_CONTEXT, meta_data("", META_BASE_ALLOCATION))
    assert feed(conn, wire)[0] == []
    return conn


def transmission_conn(
    export: str = "disk", structured: bool = True, meta: bool = True
) -> ServerConnection:
    """A connection that has gone through NBD_OPT_GO for *export*."""
    conn = new_conn()
    wire = u32(FIXED)
    if structured:
        wire += opt(Opt.STRUCTURED_REPLY)
    if meta:
        wire += opt(Opt.SET_META_CONTEXT, meta_data(export, META_BASE_ALLOCATION))
    events, _ = feed(conn, wire + opt(Opt.GO, info_data(export)))
    assert [type(e) for e in events] == [ExportChosen]
    assert conn.phase is Phase.TRANSMISSION
    return conn


TRAILING = {
    Phase.HANDSHAKE: struct.pack(">Q", IHAVEOPT)[:5],  # start of the next option
    Phase.TRANSMISSION: u32(REQUEST_MAGIC)[:3],  # start of the next request
    Phase.CLOSED: b"ignored after the end",
}


def tr(
    make: Callable[[], ServerConnection],
    wire: bytes,
    expected_events: Sequence[Event],
    expected_out: bytes = b"",
) -> ServerConnection:
    """Feed *wire* all at once, byte by byte, and with trailing bytes (h11 ``tr``)."""
    conn = make()
    assert feed(conn, wire) == (list(expected_events), expected_out)

    conn = make()
    events: list[Event] = []
    out = b""
    for i in range(len(wire)):
        got, sent = feed(conn, wire[i : i + 1])
        events += got
        out += sent
    assert (events, out) == (list(expected_events), expected_out)

    conn = make()
    assert feed(conn, wire) == (list(expected_events), expected_out)
    trailing_conn = make()
    assert feed(trailing_conn, wire + TRAILING[conn.phase]) == (
        list(expected_events),
        expected_out,
    )
    assert trailing_conn.phase is conn.phase
    if conn.phase is not Phase.CLOSED:
        assert trailing_conn.next_event() is NEED_DATA
    return conn


# -- Constants -------------------------------------------------------------------------


def test_constants_match_proto_md() -> None:
    assert NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert REPLY_MAGIC == 0x3E889045565A9
    assert (REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC) == (
        0x25609513,
        0x67446698,
        0x668E33EF,
    )
    assert MAX_BLOCK == 1 << 25
    assert all(r >= 1 << 31 for r in Rep if r.name.startswith("ERR_"))
    assert all(t >= 1 << 15 for t in ReplyType if t.name.startswith("ERROR"))
    assert (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT) == (9, 10)
    assert TF.SEND_FAST_ZERO == 1 << 11 and CmdFlag.FAST_ZERO == 1 << 4
    assert (StateFlag.HOLE, StateFlag.ZERO) == (1, 2)


# -- Greeting and client flags -----------------------------------------------------------


def test_initial_bytes() -> None:
    greeting = new_conn().initial_bytes()
    assert greeting == b"NBDMAGICIHAVEOPT" + u16(GlobalFlag.FIXED_NEWSTYLE | GlobalFlag.NO_ZEROES)
    assert new_conn().phase is Phase.HANDSHAKE


@pytest.mark.parametrize("cflags", [0, 1, 2, 3])
def test_known_client_flags_are_accepted(cflags: int) -> None:
    conn = tr(new_conn, u32(cflags), [])
    assert conn.phase is Phase.HANDSHAKE


@pytest.mark.parametrize("cflags", [4, 1 << 31, 0xFFFFFFFF])
def test_unknown_client_flag_closes(cflags: int) -> None:
    conn = new_conn()
    with pytest.raises(RemoteProtocolError, match="client flags"):
        feed(conn, u32(cflags))
    assert conn.phase is Phase.CLOSED
    with pytest.raises(RemoteProtocolError):
        conn.next_event()  # stays failed, as in h11


def test_eof_before_client_flags_is_a_disconnect() -> None:
    conn = new_conn()
    assert feed_eof(conn) == ([Disconnect()], b"")
    assert conn.phase is Phase.CLOSED
    assert conn.next_event() == Disconnect()


def test_eof_inside_client_flags_is_an_error() -> None:
    conn = new_conn()
    conn.receive_data(b"\x00\x00")
    with pytest.raises(RemoteProtocolError, match="middle"):
        feed_eof(conn)


def test_data_after_eof_is_a_local_error() -> None:
    conn = new_conn()
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeated EOF is fine
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


# -- NBD_OPT_EXPORT_NAME --------------------------------------------------------------------


def test_export_name_no_zeroes() -> None:
    info = EXPORTS["disk"]
    expected = replace(info, flags=DISK_FLAGS)
    conn = tr(
        handshake_conn,
        opt(Opt.EXPORT_NAME, b"disk"),
        [ExportChosen("disk", expected)],
        struct.pack(">QH", info.size, DISK_FLAGS),
    )
    assert conn.phase is Phase.TRANSMISSION
    assert conn.export == expected
    assert conn.structured is False


def test_export_name_with_zeroes() -> None:
    info = EXPORTS["disk"]
    tr(
        lambda: handshake_conn(cflags=ClientFlag.FIXED_NEWSTYLE),
        opt(Opt.EXPORT_NAME, b"disk"),
        [ExportChosen("disk", replace(info, flags=DISK_FLAGS))],
        struct.pack(">QH", info.size, DISK_FLAGS) + bytes(124),
    )


def test_export_name_empty_selects_default() -> None:
    conn = handshake_conn()
    events, _ = feed(conn, opt(Opt.EXPORT_NAME))
    assert events == [ExportChosen("disk", replace(EXPORTS["disk"], flags=DISK_FLAGS))]


def test_export_name_after_structured_reply_keeps_send_df() -> None:
    conn = handshake_conn(structured=True)
    _, out = feed(conn, opt(Opt.EXPORT_NAME, b"disk"))
    assert out == struct.pack(">QH", EXPORTS["disk"].size, DISK_FLAGS_STRUCTURED)
    assert conn.structured


def test_export_name_read_only_export_advertises_read_only() -> None:
    conn = handshake_conn()
    events, out = feed(conn, opt(Opt.EXPORT_NAME, b"ro"))
    flags = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH
    assert out == struct.pack(">QH", MiB, flags)
    assert events == [ExportChosen("ro", replace(EXPORTS["ro"], flags=flags))]


@pytest.mark.parametrize("name", [b"nope", b"\xff\xfe", b"x" * (MAX_STRING + 1)])
def test_export_name_unknown_closes(name: bytes) -> None:
    # There is no error reply for NBD_OPT_EXPORT_NAME: the server hangs up.
    conn = handshake_conn()
    with pytest.raises(RemoteProtocolError):
        feed(conn, opt(Opt.EXPORT_NAME, name))
    assert conn.phase is Phase.CLOSED
    assert conn.data_to_send() == b""


def test_plain_newstyle_export_name() -> None:
    tr(
        lambda: handshake_conn(cflags=0),
        opt(Opt.EXPORT_NAME, b"disk"),
        [ExportChosen("disk", replace(EXPORTS["disk"], flags=DISK_FLAGS))],
        struct.pack(">QH", 64 * MiB, DISK_FLAGS) + bytes(124),
    )


def test_plain_newstyle_other_option_closes() -> None:
    conn = handshake_conn(cflags=0)
    with pytest.raises(RemoteProtocolError, match="fixed newstyle"):
        feed(conn, opt(Opt.LIST))


# -- NBD_OPT_ABORT ---------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort(data: bytes) -> None:
    conn = tr(handshake_conn, opt(Opt.ABORT, data), [Disconnect()], rep(Opt.ABORT, Rep.ACK))
    assert conn.phase is Phase.CLOSED
    conn.receive_data(b"more")  # dropped
    assert conn.next_event() == Disconnect()


# -- NBD_OPT_LIST ----------------------------------------------------------------------------


def test_list() -> None:
    expected = b"".join(
        rep(Opt.LIST, Rep.SERVER, string(name) + info.description.encode())
        for name, info in EXPORTS.items()
    )
    tr(handshake_conn, opt(Opt.LIST), [], expected + rep(Opt.LIST, Rep.ACK))


def test_list_with_data_is_invalid() -> None:
    tr(
        handshake_conn,
        opt(Opt.LIST, b"x"),
        [],
        rep_error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data"),
    )


def test_list_sees_exports_added_later() -> None:
    exports = {"a": ExportInfo("a", 512)}
    conn = ServerConnection(exports, "a")
    feed(conn, u32(FIXED))
    exports["b"] = ExportInfo("b", 1024, "new")
    _, out = feed(conn, opt(Opt.LIST))
    assert out == (
        rep(Opt.LIST, Rep.SERVER, string("a"))
        + rep(Opt.LIST, Rep.SERVER, string("b") + b"new")
        + rep(Opt.LIST, Rep.ACK)
    )


# -- NBD_OPT_STARTTLS ------------------------------------------------------------------------


def test_starttls_is_refused_by_policy() -> None:
    tr(
        handshake_conn,
        opt(Opt.STARTTLS),
        [],
        rep_error(Opt.STARTTLS, Rep.ERR_POLICY, "TLS is not enabled on this server"),
    )


def tls_conn(mode: TLSMode, wire: bytes = b"") -> ServerConnection:
    """A connection in option haggling under *mode*, client flags (and *wire*) received."""
    conn = ServerConnection(EXPORTS, DEFAULT, tls=mode)
    assert feed(conn, u32(FIXED) + wire)[0] == []
    return conn


def upgraded(mode: TLSMode, before: bytes = b"") -> ServerConnection:
    """A connection that sent *before*, then STARTTLS, whose TLS handshake succeeded."""
    conn = tls_conn(mode, before)
    conn.data_to_send()
    events, out = feed(conn, opt(Opt.STARTTLS))
    assert events == [StartTLS()]
    assert out == rep(Opt.STARTTLS, Rep.ACK)
    conn.tls_started()
    assert conn.tls
    return conn


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_starttls_is_acked_and_returns_an_event(mode: TLSMode) -> None:
    wire = opt(Opt.STARTTLS)
    for step in (len(wire), 1):  # at once, and byte by byte
        conn = tls_conn(mode)
        events: list[Event] = []
        out = b""
        for i in range(0, len(wire), step):
            got, sent = feed(conn, wire[i : i + step])
            events += got
            out += sent
        assert events == [StartTLS()]
        assert out == rep(Opt.STARTTLS, Rep.ACK)
        assert conn.phase is Phase.HANDSHAKE and not conn.tls


@pytest.mark.parametrize("mode", [TLSMode.ON, TLSMode.REQUIRE])
def test_after_starttls_the_export_is_served(mode: TLSMode) -> None:
    conn = upgraded(mode)
    events, out = feed(conn, opt(Opt.GO, info_data("disk")))
    assert [type(e) for e in events] == [ExportChosen]
    assert out.endswith(rep(Opt.GO, Rep.ACK))


@pytest.mark.parametrize(
    "option,data",
    [
        (Opt.LIST, b""),
        (Opt.INFO, info_data("disk")),
        (Opt.GO, info_data("disk")),
        (Opt.STRUCTURED_REPLY, b""),
        (Opt.LIST_META_CONTEXT, meta_data("disk")),
        (Opt.SET_META_CONTEXT, meta_data("disk", META_BASE_ALLOCATION)),
        (99, b"unknown"),
    ],
)
def test_require_refuses_every_option_before_tls(option: int, data: bytes) -> None:
    conn = tr(
        lambda: tls_conn(TLSMode.REQUIRE),
        opt(option, data),
        [],
        rep_error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS"),
    )
    assert conn.phase is Phase.HANDSHAKE and conn.export is None and not conn.structured


def test_require_hangs_up_on_export_name_in_plaintext() -> None:
    conn = tls_conn(TLSMode.REQUIRE)
    conn.receive_data(opt(Opt.EXPORT_NAME, b"disk"))
    with pytest.raises(RemoteProtocolError, match="without TLS"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED
    assert conn.data_to_send() == b""  # nothing about the export was said


def test_require_allows_abort_before_tls() -> None:
    tr(lambda: tls_conn(TLSMode.REQUIRE), opt(Opt.ABORT), [Disconnect()], rep(Opt.ABORT, Rep.ACK))


def test_on_serves_plaintext_clients_too() -> None:
    conn = tls_conn(TLSMode.ON)
    events, _ = feed(conn, opt(Opt.GO, info_data("disk")))
    assert [type(e) for e in events] == [ExportChosen]
    assert not conn.tls


def test_bytes_after_starttls_before_its_reply_break_the_protocol() -> None:
    conn = tls_conn(TLSMode.ON)
    conn.receive_data(opt(Opt.STARTTLS) + b"\x16\x03\x01")  # a ClientHello sent too early
    with pytest.raises(RemoteProtocolError, match="after NBD_OPT_STARTTLS"):
        conn.next_event()
    assert conn.phase is Phase.CLOSED
    assert conn.data_to_send() == b""  # no ACK: the connection is dropped


def test_plaintext_fed_during_the_upgrade_is_refused() -> None:
    conn = tls_conn(TLSMode.ON)
    assert feed(conn, opt(Opt.STARTTLS))[0] == [StartTLS()]
    conn.receive_data(b"\x16\x03\x01\x02\x00")
    with pytest.raises(RemoteProtocolError, match="during the TLS upgrade"):
        conn.next_event()


def test_next_event_before_tls_started_is_a_local_error() -> None:
    conn = tls_conn(TLSMode.ON)
    assert feed(conn, opt(Opt.STARTTLS))[0] == [StartTLS()]
    with pytest.raises(LocalProtocolError):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        ServerConnection(EXPORTS, DEFAULT, tls=TLSMode.ON).tls_started()


def test_starttls_twice_and_with_data_are_invalid() -> None:
    conn = upgraded(TLSMode.ON)
    assert feed(conn, opt(Opt.STARTTLS)) == (
        [], rep_error(Opt.STARTTLS, Rep.ERR_INVALID, "TLS is already negotiated"))
    tr(
        lambda: tls_conn(TLSMode.ON),
        opt(Opt.STARTTLS, b"x"),
        [],
        rep_error(Opt.STARTTLS, Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data"),
    )


def test_plaintext_negotiation_is_forgotten_after_starttls() -> None:
    conn = upgraded(
        TLSMode.ON,
        opt(Opt.STRUCTURED_REPLY) + opt(Opt.SET_META_CONTEXT, meta_data("disk", META_BASE_ALLOCATION)),
    )
    assert not conn.structured and not conn.meta_contexts
    events, _ = feed(conn, opt(Opt.GO, info_data("disk")))
    assert [type(e) for e in events] == [ExportChosen]
    assert not conn.structured and not conn.meta_contexts


# -- NBD_OPT_INFO and NBD_OPT_GO -------------------------------------------------------------


def info_replies(
    option: int, name: str, requests: Sequence[int] = (), flags: int = DISK_FLAGS
) -> bytes:
    info = EXPORTS[name]
    out = rep(option, Rep.INFO, info_export(info, flags))
    if Info.NAME in requests:
        out += rep(option, Rep.INFO, u16(Info.NAME) + name.encode())
    if Info.DESCRIPTION in requests and info.description:
        out += rep(option, Rep.INFO, u16(Info.DESCRIPTION) + info.description.encode())
    return out + rep(option, Rep.INFO, info_block_size(info)) + rep(option, Rep.ACK)


@pytest.mark.parametrize(
    "requests",
    [(), (Info.EXPORT,), (Info.NAME,), (Info.DESCRIPTION,), (Info.BLOCK_SIZE,),
     (Info.DESCRIPTION, Info.NAME, Info.BLOCK_SIZE), (Info.NAME, Info.NAME), (999,)],
)  # fmt: skip
def test_info(requests: tuple[int, ...]) -> None:
    conn = tr(
        handshake_conn,
        opt(Opt.INFO, info_data("disk", *requests)),
        [],
        info_replies(Opt.INFO, "disk", requests),
    )
    assert conn.phase is Phase.HANDSHAKE


def test_info_without_description_skips_it() -> None:
    tr(
        handshake_conn,
        opt(Opt.INFO, info_data("bare", Info.DESCRIPTION)),
        [],
        info_replies(Opt.INFO, "bare", [Info.DESCRIPTION], TF.HAS_FLAGS),
    )


def test_info_empty_name_is_default_export() -> None:
    _, out = feed(handshake_conn(), opt(Opt.INFO, info_data("", Info.NAME)))
    assert out == info_replies(Opt.INFO, "disk", [Info.NAME])


def test_info_read_only_export() -> None:
    _, out = feed(handshake_conn(), opt(Opt.INFO, info_data("ro")))
    expected_flags = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH
    assert out.startswith(rep(Opt.INFO, Rep.INFO, info_export(EXPORTS["ro"], expected_flags)))


@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_info_unknown_export(option: Opt) -> None:
    tr(
        handshake_conn,
        opt(option, info_data("nope", Info.NAME)),
        [],
        rep_error(option, Rep.ERR_UNKNOWN, "export 'nope' not available"),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "option data too short"),
        (b"\x00\x00\x00", "option data too short"),
        (u32(10) + b"disk" + u16(0), "option data too short"),  # name runs past the end
        (string("disk"), "option data too short"),  # no request count
        (string("disk") + u16(2) + u16(1), "information request count does not match the option length"),
        (string("disk") + u16(0) + b"\x00", "information request count does not match the option length"),
        (string(b"\xff") + u16(0), "string is not valid UTF-8"),
        (string("x" * (MAX_STRING + 1)) + u16(0), "string longer than 4096 bytes"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("option", [Opt.INFO, Opt.GO])
def test_info_malformed_is_invalid_and_handshake_goes_on(
    option: Opt, data: bytes, message: str
) -> None:
    conn = tr(handshake_conn, opt(option, data), [], rep_error(option, Rep.ERR_INVALID, message))
    assert conn.phase is Phase.HANDSHAKE
    events, _ = feed(conn, opt(Opt.GO, info_data("disk")))
    assert [type(e) for e in events] == [ExportChosen]


def test_go() -> None:
    expected = replace(EXPORTS["disk"], flags=DISK_FLAGS)
    conn = tr(
        handshake_conn,
        opt(Opt.GO, info_data("disk", Info.BLOCK_SIZE)),
        [ExportChosen("disk", expected)],
        info_replies(Opt.GO, "disk", [Info.BLOCK_SIZE]),
    )
    assert conn.phase is Phase.TRANSMISSION
    assert conn.export == expected


def test_go_structured_advertises_df() -> None:
    conn = handshake_conn(structured=True)
    events, out = feed(conn, opt(Opt.GO, info_data("disk")))
    assert out == info_replies(Opt.GO, "disk", flags=ALL_FLAGS)
    assert events == [ExportChosen("disk", replace(EXPORTS["disk"], flags=ALL_FLAGS))]


def test_go_never_pads_with_zeroes() -> None:
    conn = handshake_conn(cflags=ClientFlag.FIXED_NEWSTYLE)
    _, out = feed(conn, opt(Opt.GO, info_data("disk")))
    assert out.endswith(rep(Opt.GO, Rep.ACK))


def test_go_then_request_in_the_same_read() -> None:
    conn = handshake_conn()
    events, _ = feed(conn, opt(Opt.GO, info_data("disk")) + req(Cmd.READ, 9, 0, 512))
    assert [type(e) for e in events] == [ExportChosen, Request]
    assert events[1] == Request(Cmd.READ, CmdFlag(0), 9, 0, 512)


def test_fast_zero_is_dropped_without_write_zeroes() -> None:
    exports = {"z": ExportInfo("z", 4096, flags=TF.SEND_FAST_ZERO)}
    conn = ServerConnection(exports, "z")
    _, out = feed(conn, u32(FIXED) + opt(Opt.EXPORT_NAME, b"z"))
    assert out == struct.pack(">QH", 4096, TF.HAS_FLAGS)


# -- NBD_OPT_STRUCTURED_REPLY ----------------------------------------------------------------


def test_structured_reply() -> None:
    conn = tr(handshake_conn, opt(Opt.STRUCTURED_REPLY), [], rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert conn.structured


def test_structured_reply_with_data_is_invalid() -> None:
    conn = tr(
        handshake_conn,
        opt(Opt.STRUCTURED_REPLY, b"\x00"),
        [],
        rep_error(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data"),
    )
    assert not conn.structured


def test_structured_reply_twice_is_invalid() -> None:
    conn = tr(
        lambda: handshake_conn(structured=True),
        opt(Opt.STRUCTURED_REPLY),
        [],
        rep_error(Opt.STRUCTURED_REPLY, Rep.ERR_INVALID, "structured replies already negotiated"),
    )
    assert conn.structured


# -- NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT -----------------------------------


@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_needs_structured_replies(option: Opt) -> None:
    conn = tr(
        handshake_conn,
        opt(option, meta_data("disk", META_BASE_ALLOCATION)),
        [],
        rep_error(option, Rep.ERR_INVALID, "structured replies not negotiated"),
    )
    assert conn.meta_contexts == {}


@pytest.mark.parametrize(
    "queries",
    [(), ("base:",), (META_BASE_ALLOCATION,), ("qemu:dirty-bitmap:x", "base:"),
     (META_BASE_ALLOCATION, "base:")],
)  # fmt: skip
def test_list_meta_context(queries: tuple[str, ...]) -> None:
    o = Opt.LIST_META_CONTEXT
    conn = tr(
        lambda: handshake_conn(structured=True),
        opt(o, meta_data("disk", *queries)),
        [],
        rep(o, Rep.META_CONTEXT, meta_context(0)) + rep(o, Rep.ACK),
    )
    assert conn.meta_contexts == {}  # listing selects nothing


@pytest.mark.parametrize(
    "queries", [("base:allocation:x",), ("qemu:dirty-bitmap:x",), ("nocolon",), ("base:other",)]
)
def test_list_meta_context_unmatched_queries_are_ignored(queries: tuple[str, ...]) -> None:
    o = Opt.LIST_META_CONTEXT
    tr(
        lambda: handshake_conn(structured=True),
        opt(o, meta_data("", *queries)),
        [],
        rep(o, Rep.ACK),
    )


def test_set_meta_context() -> None:
    o = Opt.SET_META_CONTEXT
    conn = tr(
        lambda: handshake_conn(structured=True),
        opt(
            o, meta_data("disk", "qemu:dirty-bitmap:x", META_BASE_ALLOCATION, META_BASE_ALLOCATION)
        ),
        [],
        rep(o, Rep.META_CONTEXT, meta_context(1)) + rep(o, Rep.ACK),
    )
    assert conn.meta_contexts == {1: META_BASE_ALLOCATION}


@pytest.mark.parametrize("queries", [(), ("base:",), ("x-foo:bar",)])
def test_set_meta_context_selecting_nothing(queries: tuple[str, ...]) -> None:
    o = Opt.SET_META_CONTEXT
    conn = tr(
        lambda: handshake_conn(structured=True, meta=True),
        opt(o, meta_data("disk", *queries)),
        [],
        rep(o, Rep.ACK),
    )
    assert conn.meta_contexts == {}  # the earlier selection was replaced


@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_unknown_export(option: Opt) -> None:
    tr(
        lambda: handshake_conn(structured=True, meta=True),
        opt(option, meta_data("nope", META_BASE_ALLOCATION)),
        [],
        rep_error(option, Rep.ERR_UNKNOWN, "export 'nope' not available"),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "option data too short"),
        (string("disk"), "option data too short"),
        (string("disk") + u32(1), "query count does not match the option length"),
        (string("disk") + u32(1) + u32(20) + b"base:", "option data too short"),
        (meta_data("disk", META_BASE_ALLOCATION) + b"!", "trailing bytes in option data"),
        (meta_data("disk", b"\xc3"), "string is not valid UTF-8"),
    ],
)
@pytest.mark.parametrize("option", [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT])
def test_meta_context_malformed(option: Opt, data: bytes, message: str) -> None:
    conn = tr(
        lambda: handshake_conn(structured=True, meta=True),
        opt(option, data),
        [],
        rep_error(option, Rep.ERR_INVALID, message),
    )
    # A failed SET still replaces the selection; a failed LIST changes nothing.
    expected = {} if option == Opt.SET_META_CONTEXT else {1: META_BASE_ALLOCATION}
    assert conn.meta_contexts == expected


def test_meta_contexts_survive_go_to_the_same_export() -> None:
    conn = handshake_conn(structured=True, meta=True)  # selected for "" = default "disk"
    feed(conn, opt(Opt.GO, info_data("disk")))
    assert conn.meta_contexts == {1: META_BASE_ALLOCATION}


def test_meta_contexts_dropped_by_go_to_another_export() -> None:
    conn = handshake_conn(structured=True, meta=True)
    feed(conn, opt(Opt.GO, info_data("aligned")))
    assert conn.meta_contexts == {}


def test_meta_contexts_dropped_by_export_name_to_another_export() -> None:
    conn = handshake_conn(structured=True, meta=True)
    feed(conn, opt(Opt.EXPORT_NAME, b"ro"))
    assert conn.meta_contexts == {}


# -- Unknown options, framing and EOF --------------------------------------------------------


@pytest.mark.parametrize("option", [0, Opt.PEEK_EXPORT, 11, 12, 0xDEADBEEF])
def test_unknown_option_is_unsupported_and_handshake_goes_on(option: int) -> None:
    conn = tr(
        handshake_conn,
        opt(option, b"some data"),
        [],
        rep_error(option, Rep.ERR_UNSUP, f"option {option} is not supported"),
    )
    assert feed(conn, opt(Opt.STRUCTURED_REPLY))[1] == rep(Opt.STRUCTURED_REPLY, Rep.ACK)


def test_pipelined_options_are_all_answered() -> None:
    wire = opt(Opt.STRUCTURED_REPLY) + opt(Opt.LIST) + opt(99) + opt(Opt.ABORT)
    events, out = feed(handshake_conn(), wire)
    assert events == [Disconnect()]
    assert out.startswith(rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert out.endswith(
        rep_error(99, Rep.ERR_UNSUP, "option 99 is not supported") + rep(Opt.ABORT, Rep.ACK)
    )


def test_option_too_long_closes_without_waiting_for_the_data() -> None:
    conn = handshake_conn()
    header = struct.pack(">QII", IHAVEOPT, Opt.LIST, MAX_OPTION_LENGTH + 1)
    with pytest.raises(RemoteProtocolError, match="too long"):
        feed(conn, header)


def test_option_at_the_length_cap_is_read() -> None:
    conn = handshake_conn()
    _, out = feed(conn, opt(Opt.LIST, bytes(MAX_OPTION_LENGTH)))
    assert out == rep_error(Opt.LIST, Rep.ERR_INVALID, "NBD_OPT_LIST takes no data")


def test_bad_option_magic_closes() -> None:
    conn = handshake_conn()
    with pytest.raises(RemoteProtocolError, match="magic"):
        feed(conn, struct.pack(">QII", NBDMAGIC, Opt.LIST, 0))
    assert conn.phase is Phase.CLOSED


def test_eof_between_options_is_a_disconnect() -> None:
    conn = handshake_conn()
    assert feed(conn, opt(Opt.LIST))[0] == []
    assert feed_eof(conn) == ([Disconnect()], b"")
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("cut", [1, 15, 16, 20])
def test_eof_inside_an_option_is_an_error(cut: int) -> None:
    conn = handshake_conn()
    conn.receive_data(opt(Opt.GO, info_data("disk"))[:cut])
    assert conn.next_event() is NEED_DATA
    with pytest.raises(RemoteProtocolError, match="middle"):
        feed_eof(conn)


# -- Transmission: requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length"),
    [
        (Cmd.READ, 0, 0, 4096),
        (Cmd.READ, CmdFlag.DF | CmdFlag.FUA, 1 << 40, 0xFFFFFFFF),
        (Cmd.FLUSH, 0, 0, 0),
        (Cmd.TRIM, CmdFlag.FUA, 512, 1024),
        (Cmd.CACHE, 0, 7, 9),
        (Cmd.WRITE_ZEROES, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, 0, 1 << 31),
        (Cmd.BLOCK_STATUS, CmdFlag.REQ_ONE, 0, 1),
        (Cmd.RESIZE, 0, 0, 0),
        (99, 0, 1, 2),  # unknown command: passed on as a plain int, no payload
        (Cmd.READ, 0x8020, 0, 1),  # unknown flags are kept for validate()
    ],
)
def test_request(cmd: int, flags: int, offset: int, length: int) -> None:
    cookie = 0xFEEDFACECAFEBEEF
    tr(
        transmission_conn,
        req(cmd, cookie, offset, length, flags),
        [Request(cmd, CmdFlag(flags), cookie, offset, length)],
    )


def test_request_command_is_an_enum_when_known() -> None:
    conn = transmission_conn()
    conn.receive_data(req(Cmd.TRIM, 1, 0, 1) + req(1234, 2, 0, 1))
    ev, ev2 = conn.next_event(), conn.next_event()
    assert isinstance(ev, Request) and type(ev.cmd) is Cmd
    assert isinstance(ev2, Request) and type(ev2.cmd) is int and ev2.cmd == 1234


def test_write() -> None:
    payload = bytes(range(256)) * 5
    tr(
        transmission_conn,
        req(Cmd.WRITE, 5, 4096, len(payload), CmdFlag.FUA, payload),
        [Request(Cmd.WRITE, CmdFlag.FUA, 5, 4096, len(payload), payload)],
    )


def test_write_of_length_zero_has_no_payload() -> None:
    tr(
        transmission_conn,
        req(Cmd.WRITE, 5, 0, 0),
        [Request(Cmd.WRITE, CmdFlag(0), 5, 0, 0, b"")],
    )


def test_write_payload_is_owned_by_the_event() -> None:
    conn = transmission_conn()
    payload = b"A" * 100_000
    conn.receive_data(req(Cmd.WRITE, 1, 0, len(payload)) + payload[:10])
    assert conn.next_event() is NEED_DATA
    for i in range(10, len(payload), 7_000):  # the rest arrives in pieces
        conn.receive_data(payload[i : i + 7_000])
    ev = conn.next_event()
    assert isinstance(ev, Request) and ev.data == payload
    assert isinstance(ev.data, bytearray)
    conn.receive_data(req(Cmd.WRITE, 2, 0, 3, data=b"xyz"))
    ev2 = conn.next_event()
    assert isinstance(ev2, Request) and ev2.data == b"xyz"
    assert ev.data == payload  # not overwritten by the next write


def test_write_payload_and_next_request_in_one_read() -> None:
    conn = transmission_conn()
    conn.receive_data(req(Cmd.WRITE, 1, 0, 4))
    assert conn.next_event() is NEED_DATA
    events, _ = feed(conn, b"abcd" + req(Cmd.FLUSH, 2) + req(Cmd.WRITE, 3, 8, 2, data=b"ef"))
    assert events == [
        Request(Cmd.WRITE, CmdFlag(0), 1, 0, 4, b"abcd"),
        Request(Cmd.FLUSH, CmdFlag(0), 2, 0, 0),
        Request(Cmd.WRITE, CmdFlag(0), 3, 8, 2, b"ef"),
    ]


def test_oversized_write_closes() -> None:
    conn = transmission_conn()
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        feed(conn, req(Cmd.WRITE, 1, 0, MAX_WRITE_PAYLOAD + 1))
    assert conn.phase is Phase.CLOSED


def test_write_at_the_payload_cap_is_read_then_refused_by_validate() -> None:
    conn = transmission_conn()
    conn.receive_data(req(Cmd.WRITE, 1, 0, MAX_WRITE_PAYLOAD))
    assert conn.next_event() is NEED_DATA
    (ev,), _ = feed(conn, bytes(MAX_WRITE_PAYLOAD))
    assert isinstance(ev, Request) and len(ev.data) == MAX_WRITE_PAYLOAD
    assert conn.validate(ev) == NbdErrno.EINVAL


def test_disc() -> None:
    conn = tr(transmission_conn, req(Cmd.DISC, 3), [Disconnect()])
    assert conn.phase is Phase.CLOSED
    conn.receive_data(req(Cmd.READ, 4, 0, 1))  # MUST NOT be sent; dropped
    assert conn.next_event() == Disconnect()


def test_requests_before_disc_are_delivered_in_order() -> None:
    wire = req(Cmd.READ, 1, 0, 1) + req(Cmd.FLUSH, 2) + req(Cmd.DISC, 3) + req(Cmd.READ, 4)
    events, _ = feed(transmission_conn(), wire)
    assert events == [
        Request(Cmd.READ, CmdFlag(0), 1, 0, 1),
        Request(Cmd.FLUSH, CmdFlag(0), 2, 0, 0),
        Disconnect(),
    ]


def test_bad_request_magic_closes() -> None:
    conn = transmission_conn()
    with pytest.raises(RemoteProtocolError, match="magic"):
        feed(conn, struct.pack(">IHHQQI", SIMPLE_REPLY_MAGIC, 0, 0, 1, 0, 1))
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_eof_between_requests_is_a_disconnect() -> None:
    conn = transmission_conn()
    assert feed(conn, req(Cmd.READ, 1, 0, 1))[0] == [Request(Cmd.READ, CmdFlag(0), 1, 0, 1)]
    assert feed_eof(conn) == ([Disconnect()], b"")
    assert conn.phase is Phase.CLOSED


@pytest.mark.parametrize("partial", [req(Cmd.READ, 1, 0, 1)[:27], req(Cmd.WRITE, 1, 0, 4) + b"abc"])
def test_eof_inside_a_request_is_an_error(partial: bytes) -> None:
    conn = transmission_conn()
    assert feed(conn, partial) == ([], b"")
    with pytest.raises(RemoteProtocolError, match="middle"):
        feed_eof(conn)


def test_read_request_split_anywhere() -> None:
    wire = req(Cmd.READ, 7, 0, 4096)
    for cut in range(len(wire) + 1):
        c = transmission_conn()
        assert feed(c, wire[:cut])[0] + feed(c, wire[cut:])[0] == [
            Request(Cmd.READ, CmdFlag(0), 7, 0, 4096)
        ]


def test_write_request_split_anywhere() -> None:
    wire = req(Cmd.WRITE, 7, 512, 40, CmdFlag.FUA, bytes(range(40))) + req(Cmd.FLUSH, 8)
    expected = [
        Request(Cmd.WRITE, CmdFlag.FUA, 7, 512, 40, bytes(range(40))),
        Request(Cmd.FLUSH, CmdFlag(0), 8, 0, 0),
    ]
    for cut in range(len(wire) + 1):
        for cut2 in range(cut, len(wire) + 1, 5):
            c = transmission_conn()
            events = feed(c, wire[:cut])[0] + feed(c, wire[cut:cut2])[0] + feed(c, wire[cut2:])[0]
            assert events == expected


def test_many_buffered_requests_parse_in_linear_time() -> None:
    n = 20_000
    wire = b"".join(req(Cmd.WRITE, i, i * 8, 8, data=i.to_bytes(8, "big")) for i in range(n))
    events, _ = feed(transmission_conn(), wire)
    assert len(events) == n
    assert all(
        isinstance(ev, Request) and ev.cookie == i and ev.data == i.to_bytes(8, "big")
        for i, ev in enumerate(events)
    )


# -- validate() ----------------------------------------------------------------------------------

E = NbdErrno
F = CmdFlag
SIZE = EXPORTS["disk"].size

# (id, export, structured, meta, cmd, flags, offset, length, expected)
VALIDATE_TABLE: list[tuple[str, str, bool, bool, int, int, int, int, int]] = [
    ("read", "disk", True, True, Cmd.READ, 0, 0, 4096, 0),
    ("read to the end", "disk", True, True, Cmd.READ, 0, SIZE - 1, 1, 0),
    ("read length 0", "disk", True, True, Cmd.READ, 0, 0, 0, E.EINVAL),
    ("read past end", "disk", True, True, Cmd.READ, 0, SIZE - 1, 2, E.EINVAL),
    ("read at end", "disk", True, True, Cmd.READ, 0, SIZE, 1, E.EINVAL),
    ("read huge offset", "disk", True, True, Cmd.READ, 0, (1 << 64) - 1, 1, E.EINVAL),
    ("read max block", "disk", True, True, Cmd.READ, 0, 0, MAX_BLOCK, 0),
    ("read over max block", "disk", True, True, Cmd.READ, 0, 0, MAX_BLOCK + 1, E.EINVAL),
    ("read DF over max block", "disk", True, True, Cmd.READ, F.DF, 0, MAX_BLOCK + 1, E.EOVERFLOW),
    ("read DF", "disk", True, True, Cmd.READ, F.DF, 0, 1, 0),
    ("read DF simple", "disk", False, False, Cmd.READ, F.DF, 0, 1, E.EINVAL),
    ("read FUA", "disk", True, True, Cmd.READ, F.FUA, 0, 1, 0),
    ("read REQ_ONE", "disk", True, True, Cmd.READ, F.REQ_ONE, 0, 1, E.EINVAL),
    ("read NO_HOLE", "disk", True, True, Cmd.READ, F.NO_HOLE, 0, 1, E.EINVAL),
    ("read FAST_ZERO", "disk", True, True, Cmd.READ, F.FAST_ZERO, 0, 1, E.EINVAL),
    ("read unknown flag", "disk", True, True, Cmd.READ, 1 << 5, 0, 1, E.EINVAL),
    ("read top flag", "disk", True, True, Cmd.READ, 1 << 15, 0, 1, E.EINVAL),
    ("read read-only", "ro", False, False, Cmd.READ, 0, 0, 1, 0),
    ("write", "disk", True, True, Cmd.WRITE, 0, 0, 1, 0),
    ("write FUA", "disk", False, False, Cmd.WRITE, F.FUA, 0, 1, 0),
    ("write past end", "disk", True, True, Cmd.WRITE, 0, SIZE - 1, 2, E.ENOSPC),
    ("write length 0", "disk", True, True, Cmd.WRITE, 0, 0, 0, E.EINVAL),
    ("write over max block", "disk", True, True, Cmd.WRITE, 0, 0, MAX_BLOCK + 1, E.EINVAL),
    ("write DF", "disk", True, True, Cmd.WRITE, F.DF, 0, 1, E.EINVAL),
    ("write NO_HOLE", "disk", True, True, Cmd.WRITE, F.NO_HOLE, 0, 1, E.EINVAL),
    ("write read-only", "ro", False, False, Cmd.WRITE, 0, 0, 1, E.EPERM),
    ("write read-only past end", "ro", False, False, Cmd.WRITE, 0, MiB, 1, E.EPERM),
    ("trim read-only", "ro", False, False, Cmd.TRIM, 0, 0, 1, E.EPERM),
    ("zero read-only", "ro", False, False, Cmd.WRITE_ZEROES, 0, 0, 1, E.EPERM),
    ("flush", "disk", True, True, Cmd.FLUSH, 0, 0, 0, 0),
    ("flush FUA", "disk", True, True, Cmd.FLUSH, F.FUA, 0, 0, 0),
    ("flush offset", "disk", True, True, Cmd.FLUSH, 0, 1, 0, E.EINVAL),
    ("flush length", "disk", True, True, Cmd.FLUSH, 0, 0, 1, E.EINVAL),
    ("flush read-only", "ro", False, False, Cmd.FLUSH, 0, 0, 0, 0),
    ("flush not offered", "bare", False, False, Cmd.FLUSH, 0, 0, 0, E.EINVAL),
    ("FUA not offered", "bare", False, False, Cmd.WRITE, F.FUA, 0, 1, E.EINVAL),
    ("trim", "disk", True, True, Cmd.TRIM, F.FUA, 0, MiB, 0),
    ("trim past end", "disk", True, True, Cmd.TRIM, 0, SIZE, 1, E.EINVAL),
    ("trim over max block", "disk", True, True, Cmd.TRIM, 0, 0, SIZE, 0),
    ("trim not offered", "bare", False, False, Cmd.TRIM, 0, 0, 1, E.EINVAL),
    ("trim DF", "disk", True, True, Cmd.TRIM, F.DF, 0, 1, E.EINVAL),
    ("zero", "disk", True, True, Cmd.WRITE_ZEROES, F.FUA | F.NO_HOLE, 0, 1, 0),
    ("zero fast", "disk", True, True, Cmd.WRITE_ZEROES, F.FAST_ZERO, 0, SIZE, 0),
    ("zero past end", "disk", True, True, Cmd.WRITE_ZEROES, 0, 1, SIZE, E.ENOSPC),
    ("zero length 0", "disk", True, True, Cmd.WRITE_ZEROES, 0, 0, 0, E.EINVAL),
    ("zero not offered", "bare", False, False, Cmd.WRITE_ZEROES, 0, 0, 1, E.EINVAL),
    ("zero REQ_ONE", "disk", True, True, Cmd.WRITE_ZEROES, F.REQ_ONE, 0, 1, E.EINVAL),
    ("cache", "disk", True, True, Cmd.CACHE, 0, 0, 1, 0),
    ("cache past end", "disk", True, True, Cmd.CACHE, 0, SIZE, 1, E.EINVAL),
    ("cache not offered", "bare", False, False, Cmd.CACHE, 0, 0, 1, E.EINVAL),
    ("cache NO_HOLE", "disk", True, True, Cmd.CACHE, F.NO_HOLE, 0, 1, E.EINVAL),
    ("status", "disk", True, True, Cmd.BLOCK_STATUS, F.REQ_ONE, 0, SIZE, 0),
    ("status past end", "disk", True, True, Cmd.BLOCK_STATUS, 0, 1, SIZE, E.EINVAL),
    ("status length 0", "disk", True, True, Cmd.BLOCK_STATUS, 0, 0, 0, E.EINVAL),
    ("status no context", "disk", True, False, Cmd.BLOCK_STATUS, 0, 0, 1, E.EINVAL),
    ("status simple", "disk", False, False, Cmd.BLOCK_STATUS, 0, 0, 1, E.EINVAL),
    ("status DF", "disk", True, True, Cmd.BLOCK_STATUS, F.DF, 0, 1, E.EINVAL),
    ("status read-only", "ro", True, True, Cmd.BLOCK_STATUS, 0, 0, 1, 0),
    ("unknown command", "disk", True, True, 99, 0, 0, 1, E.EINVAL),
    ("resize", "disk", True, True, Cmd.RESIZE, 0, 0, 1, E.EINVAL),
    ("disc", "disk", True, True, Cmd.DISC, 0, 0, 0, E.EINVAL),
    ("aligned read", "aligned", True, True, Cmd.READ, 0, 512, 1024, 0),
    ("unaligned offset", "aligned", True, True, Cmd.READ, 0, 1, 512, E.EINVAL),
    ("unaligned length", "aligned", True, True, Cmd.WRITE, 0, 0, 100, E.EINVAL),
    ("unaligned trim", "aligned", True, True, Cmd.TRIM, 0, 256, 512, E.EINVAL),
    ("small max block", "aligned", True, True, Cmd.READ, 0, 0, MiB, 0),
    ("over small max block", "aligned", True, True, Cmd.WRITE, 0, 0, MiB + 512, E.ENOSPC),
]


@pytest.mark.parametrize(
    ("export", "structured", "meta", "cmd", "flags", "offset", "length", "expected"),
    [pytest.param(*row[1:], id=row[0]) for row in VALIDATE_TABLE],
)
def test_validate(
    export: str,
    structured: bool,
    meta: bool,
    cmd: int,
    flags: int,
    offset: int,
    length: int,
    expected: int,
) -> None:
    conn = transmission_conn(export, structured=structured, meta=meta)
    assert conn.validate(Request(cmd, CmdFlag(flags), 1, offset, length)) == expected


def test_validate_over_small_max_block_within_size() -> None:
    exports = {"s": ExportInfo("s", 4 * MiB, flags=ALL_FLAGS, max_block=MiB)}
    conn = ServerConnection(exports, "s")
    feed(conn, u32(FIXED) + opt(Opt.GO, info_data("s")))
    assert conn.validate(Request(Cmd.READ, CmdFlag(0), 1, 0, MiB + 1)) == E.EINVAL
    assert conn.validate(Request(Cmd.WRITE_ZEROES, CmdFlag(0), 1, 0, MiB + 1)) == 0


def test_validate_before_transmission_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        handshake_conn().validate(Request(Cmd.READ, CmdFlag(0), 1, 0, 1))


def test_export_info_rejects_impossible_block_sizes() -> None:
    for kwargs in (
        {"min_block": 3},
        {"min_block": 1 << 17, "preferred_block": 1 << 17},
        {"preferred_block": 256},
        {"min_block": 512, "max_block": 1000},
        {"max_block": MAX_BLOCK + 1},
        {"max_block": 100},  # below min(preferred, size)
    ):
        with pytest.raises(ValueError):
            ExportInfo("x", MiB, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ExportInfo("x" * (MAX_STRING + 1), 1)
    with pytest.raises(ValueError):
        ExportInfo("x", -1)


# -- send(): replies, byte for byte --------------------------------------------------------------


def joined(iov: Sequence[bytes | memoryview]) -> bytes:
    return b"".join(bytes(part) for part in iov)


def test_simple_reply() -> None:
    conn = transmission_conn(structured=False, meta=False)
    assert conn.send(SimpleReply(0xABCDEF)) == [simple(0xABCDEF)]
    assert conn.send(SimpleReply(7, NbdErrno.ENOSPC)) == [simple(7, 28)]


def test_simple_reply_with_data_is_not_copied() -> None:
    conn = transmission_conn(structured=False, meta=False)
    data = b"x" * 4096
    iov = conn.send(SimpleReply(7, 0, data))
    assert iov[0] == simple(7) and iov[1] is data
    buf = bytearray(b"abc")
    iov = conn.send(SimpleReply(8, 0, buf))
    assert isinstance(iov[1], memoryview) and iov[1].obj is buf


def test_simple_reply_errors() -> None:
    structured = transmission_conn()
    with pytest.raises(LocalProtocolError, match="structured"):
        structured.send(SimpleReply(1, 0, b"data"))
    assert structured.send(SimpleReply(1, NbdErrno.EIO)) == [simple(1, 5)]
    conn = transmission_conn(structured=False, meta=False)
    with pytest.raises(LocalProtocolError, match="no payload"):
        conn.send(SimpleReply(1, NbdErrno.EIO, b"data"))
    with pytest.raises(LocalProtocolError, match="not an NBD error"):
        conn.send(SimpleReply(1, 2))  # ENOENT is not on the wire list
    with pytest.raises(LocalProtocolError, match="out of range"):
        conn.send(SimpleReply(1 << 64))


def test_read_reply_structured() -> None:
    conn = transmission_conn()
    data = b"D" * 1000
    iov = conn.send(ReadReply(9, [DataChunk(4096, data), HoleChunk(5096, 3000)]))
    assert joined(iov) == chunk(
        0, ReplyType.OFFSET_DATA, 9, struct.pack(">Q", 4096) + data
    ) + chunk(ReplyFlag.DONE, ReplyType.OFFSET_HOLE, 9, struct.pack(">QI", 5096, 3000))
    assert iov[1] is data  # the payload is passed through, not copied


def test_read_reply_structured_single_chunk_is_done() -> None:
    conn = transmission_conn()
    iov = conn.send(ReadReply(9, [DataChunk(0, b"abc")]))
    assert joined(iov) == chunk(ReplyFlag.DONE, ReplyType.OFFSET_DATA, 9, bytes(8) + b"abc")


def test_read_reply_structured_empty_is_none_chunk() -> None:
    conn = transmission_conn()
    assert conn.send(ReadReply(9, [])) == [chunk(ReplyFlag.DONE, ReplyType.NONE, 9, b"")]


def test_read_reply_simple_concatenates_in_offset_order() -> None:
    conn = transmission_conn(structured=False, meta=False)
    iov = conn.send(ReadReply(3, [HoleChunk(10, 4), DataChunk(14, b"yz"), DataChunk(7, b"abc")]))
    assert joined(iov) == simple(3) + b"abc" + bytes(4) + b"yz"


def test_read_reply_simple_memoryview_payload() -> None:
    conn = transmission_conn(structured=False, meta=False)
    backing = bytearray(b"0123456789")
    iov = conn.send(ReadReply(3, [DataChunk(0, memoryview(backing)[2:6])]))
    assert joined(iov) == simple(3) + b"2345"


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    "chunks",
    [
        [DataChunk(0, b"")],
        [HoleChunk(0, 0)],
        [DataChunk(0, b"abc"), DataChunk(2, b"x")],  # overlap
        [HoleChunk(0, 10), DataChunk(5, b"x")],  # overlap
        [HoleChunk(0, 1 << 32)],
    ],
)
def test_read_reply_bad_chunks(structured: bool, chunks: list[DataChunk | HoleChunk]) -> None:
    conn = transmission_conn(structured=structured, meta=False)
    with pytest.raises(LocalProtocolError):
        conn.send(ReadReply(1, chunks))


def test_read_reply_simple_gap_is_an_error() -> None:
    conn = transmission_conn(structured=False, meta=False)
    with pytest.raises(LocalProtocolError, match="gap"):
        conn.send(ReadReply(1, [DataChunk(0, b"a"), DataChunk(2, b"b")]))
    # Structured replies may leave gaps (an error chunk may follow).
    transmission_conn().send(ReadReply(1, [DataChunk(0, b"a"), DataChunk(2, b"b")]))


def test_error_reply_structured() -> None:
    conn = transmission_conn()
    assert conn.send(ErrorReply(4, NbdErrno.EIO, "disk on fire")) == [
        chunk(ReplyFlag.DONE, ReplyType.ERROR, 4, struct.pack(">IH", 5, 12) + b"disk on fire")
    ]
    assert conn.send(ErrorReply(4, NbdErrno.EINVAL)) == [
        chunk(ReplyFlag.DONE, ReplyType.ERROR, 4, struct.pack(">IH", 22, 0))
    ]


def test_error_reply_structured_with_offset() -> None:
    conn = transmission_conn()
    payload = struct.pack(">IH", 5, 3) + b"bad" + struct.pack(">Q", 1 << 33)
    assert conn.send(ErrorReply(4, NbdErrno.EIO, "bad", 1 << 33)) == [
        chunk(ReplyFlag.DONE, ReplyType.ERROR_OFFSET, 4, payload)
    ]


def test_error_reply_message_is_cut_on_a_character_boundary() -> None:
    conn = transmission_conn()
    message = "a" + "é" * 3000  # 6001 bytes of UTF-8; byte 4096 splits an "é"
    (frame,) = conn.send(ErrorReply(4, NbdErrno.EIO, message))
    (length,) = struct.unpack(">H", frame[24:26])
    assert length == MAX_STRING - 1
    assert bytes(frame[26:]).decode() == "a" + "é" * 2047


def test_error_reply_simple() -> None:
    conn = transmission_conn(structured=False, meta=False)
    assert conn.send(ErrorReply(4, NbdErrno.EPERM, "read-only", 5)) == [simple(4, 1)]


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("error", [0, 2, 1000])
def test_error_reply_needs_an_nbd_error(structured: bool, error: int) -> None:
    conn = transmission_conn(structured=structured, meta=False)
    with pytest.raises(LocalProtocolError):
        conn.send(ErrorReply(1, error))


def test_block_status_reply() -> None:
    conn = transmission_conn()
    extents = [(4096, StateFlag.HOLE | StateFlag.ZERO), (8192, 0)]
    payload = struct.pack(">IIIII", 1, 4096, 3, 8192, 0)
    assert conn.send(BlockStatusReply(6, 1, extents)) == [
        chunk(ReplyFlag.DONE, ReplyType.BLOCK_STATUS, 6, payload)
    ]


@pytest.mark.parametrize(
    ("structured", "meta", "context_id", "extents"),
    [
        (True, True, 2, [(1, 0)]),  # unknown context
        (True, False, 1, [(1, 0)]),  # nothing negotiated
        (False, False, 1, [(1, 0)]),
        (True, True, 1, []),
        (True, True, 1, [(0, 0)]),
        (True, True, 1, [(1 << 32, 0)]),
    ],
)
def test_block_status_reply_errors(
    structured: bool, meta: bool, context_id: int, extents: list[tuple[int, int]]
) -> None:
    conn = transmission_conn(structured=structured, meta=meta)
    with pytest.raises(LocalProtocolError):
        conn.send(BlockStatusReply(1, context_id, extents))


def test_send_before_transmission_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        handshake_conn().send(SimpleReply(1))


def test_send_after_disc_answers_requests_in_flight() -> None:
    conn = transmission_conn()
    feed(conn, req(Cmd.FLUSH, 1) + req(Cmd.DISC, 2))
    assert conn.phase is Phase.CLOSED
    assert conn.send(SimpleReply(1)) == [simple(1)]


def test_send_rejects_non_replies() -> None:
    with pytest.raises(LocalProtocolError):
        transmission_conn().send(Disconnect())  # type: ignore[arg-type]


# -- Fuzzing: random input yields events or RemoteProtocolError, nothing else -------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run_fuzz(conn: ServerConnection, pieces: Sequence[bytes], eof: bool) -> None:
    """h11's fuzz invariant, plus: validate() and send() accept what we produced."""
    try:
        for piece in [*pieces, b""] if eof else pieces:
            conn.receive_data(piece)
            events, out = drain(conn)
            assert isinstance(out, bytes)
            for ev in events:
                assert isinstance(ev, ExportChosen | Request | Disconnect)
                if isinstance(ev, Request):
                    error = conn.validate(ev)
                    assert error == 0 or error in set(NbdErrno)
                    reply = ErrorReply(ev.cookie, error) if error else SimpleReply(ev.cookie)
                    assert conn.send(reply)
            if conn.phase is Phase.CLOSED:
                return
    except RemoteProtocolError:
        assert conn.phase is Phase.CLOSED
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


names = st.sampled_from(["", "disk", "ro", "aligned", "nope", "\x00", "é"])
info_requests = st.lists(st.integers(0, 6), max_size=5)
queries = st.lists(
    st.sampled_from(["base:", META_BASE_ALLOCATION, "qemu:x", "", "base:allocation:"]), max_size=4
)


@st.composite
def option_data(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return info_data(draw(names), *draw(info_requests))
    if kind == 2:
        return meta_data(draw(names), *draw(queries))
    return b""


@st.composite
def option_frames(draw: st.DrawFn) -> bytes:
    option = draw(st.one_of(st.integers(0, 12), st.integers(0, 0xFFFFFFFF)))
    data = draw(option_data())
    if draw(st.integers(0, 9)) == 0:  # now and then a length that lies
        return struct.pack(">QII", IHAVEOPT, option, draw(st.integers(0, 0xFFFFFFFF))) + data
    return opt(option, data)


@st.composite
def request_frames(draw: st.DrawFn) -> bytes:
    cmd = draw(st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)))
    flags = draw(st.one_of(st.integers(0, 31), st.integers(0, 0xFFFF)))
    offset = draw(st.one_of(st.integers(0, 70 * MiB), st.integers(0, (1 << 64) - 1)))
    length = draw(st.one_of(st.integers(0, 4096), st.integers(0, 0xFFFFFFFF)))
    if cmd == Cmd.WRITE:
        length = draw(st.integers(0, 64))
        return req(cmd, draw(st.integers(0, (1 << 64) - 1)), offset, length, flags, bytes(length))
    return req(cmd, draw(st.integers(0, (1 << 64) - 1)), offset, length, flags)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@FUZZ
@given(st.binary(max_size=256), st.booleans())
def test_fuzz_random_bytes_after_greeting(data: bytes, eof: bool) -> None:
    run_fuzz(new_conn(), [data], eof)


@FUZZ
@given(
    st.sampled_from([0, 1, 2, 3]),
    st.lists(option_frames(), max_size=8),
    st.binary(max_size=32),
    st.lists(st.integers(0, 1 << 16), max_size=6),
    st.booleans(),
)
def test_fuzz_handshake_options(
    cflags: int, frames: list[bytes], tail: bytes, cuts: list[int], eof: bool
) -> None:
    wire = u32(cflags) + b"".join(frames) + tail
    run_fuzz(new_conn(), split(wire, cuts), eof)


@FUZZ
@given(st.binary(max_size=256), st.booleans(), st.booleans())
def test_fuzz_random_bytes_in_transmission(data: bytes, structured: bool, eof: bool) -> None:
    run_fuzz(transmission_conn(structured=structured, meta=structured), [data], eof)


@FUZZ
@given(
    st.sampled_from(["disk", "ro", "bare", "aligned"]),
    st.booleans(),
    st.lists(request_frames(), max_size=10),
    st.binary(max_size=32),
    st.lists(st.integers(0, 1 << 16), max_size=6),
    st.booleans(),
)
def test_fuzz_requests(
    export: str,
    structured: bool,
    frames: list[bytes],
    tail: bytes,
    cuts: list[int],
    eof: bool,
) -> None:
    conn = transmission_conn(export, structured=structured, meta=structured)
    run_fuzz(conn, split(b"".join(frames) + tail, cuts), eof)


def test_payloads_stay_out_of_repr() -> None:
    big = bytes(1 << 20)
    for event in (
        Request(Cmd.WRITE, CmdFlag(0), 1, 0, len(big), big),
        SimpleReply(1, 0, big),
        DataChunk(0, big),
    ):
        assert len(repr(event)) < 200


def _receive_into(conn: ServerConnection, data: bytes, step: int) -> list[memoryview]:
    """Feed *data* the BufferedProtocol way, *step* bytes per read; return the buffers used."""
    used = []
    for i in range(0, len(data), step):
        piece = data[i:i + step]
        first = True
        while piece:  # what does not fit goes to the next buffers
            buf = conn.receive_buffer()
            n = min(len(piece), len(buf))
            buf[:n] = piece[:n]
            if first:
                used.append(buf)
                first = False
            conn.buffer_filled(n)
            piece = piece[n:]
    return used


@pytest.mark.parametrize("step", [1, 7, 4096, 70_000, 1 << 20])
def test_receive_buffer_puts_a_write_payload_straight_into_its_buffer(step: int) -> None:
    conn = transmission_conn()
    payload = bytes(range(256)) * 1024  # 256 KiB
    wire = req(Cmd.WRITE, 5, 4096, len(payload), data=payload) + req(Cmd.FLUSH, 6)
    events: list[Event] = []
    # parse between reads, as the server's read loop does
    for i in range(0, len(wire), step):
        _receive_into(conn, wire[i:i + step], step)
        events += drain(conn)[0]
    write, flush = events
    assert isinstance(write, Request) and write.cmd == Cmd.WRITE and write.cookie == 5
    assert bytes(write.data) == payload
    assert isinstance(flush, Request) and flush.cmd == Cmd.FLUSH
    assert conn.buffered() == 0


def test_receive_buffer_is_the_payload_once_the_header_is_parsed() -> None:
    conn = transmission_conn()
    payload = b"\xab" * 100_000
    wire = req(Cmd.WRITE, 1, 0, len(payload), data=payload)
    _receive_into(conn, wire[:1000], 1000)  # header and the start of the payload
    assert drain(conn)[0] == []  # waiting for the payload
    buf = conn.receive_buffer()
    assert len(buf) == len(payload) - (1000 - 28)  # exactly what is missing of it
    buf[:] = wire[1000:]
    conn.buffer_filled(len(buf))
    (write,), _ = drain(conn)
    assert isinstance(write, Request) and bytes(write.data) == payload
    assert write.data is buf.obj  # the bytes landed in the request's own buffer


def test_connections_may_share_one_scratch_buffer() -> None:
    """Two connections fed alternately through one scratch buffer (as the server's
    connections are, one event loop) each get their own bytes, payloads included."""
    shared = bytearray(4096)
    conns = []
    for _ in range(2):
        conn = ServerConnection(EXPORTS, DEFAULT, scratch=shared)
        _receive_into(conn, u32(FIXED) + opt(Opt.GO, info_data("disk")), 5)
        assert [type(e) for e in drain(conn)[0]] == [ExportChosen]
        conns.append(conn)
    payloads = [bytes([0x11]) * 10_000, bytes([0x22]) * 10_000]
    wires = [req(Cmd.WRITE, i + 1, 0, len(p), data=p) + req(Cmd.FLUSH, 9)
             for i, p in enumerate(payloads)]
    events: list[list[Event]] = [[], []]
    for i in range(0, len(wires[0]), 333):  # interleaved, parsed between reads
        for k in (0, 1):
            _receive_into(conns[k], wires[k][i:i + 333], 333)
            events[k] += drain(conns[k])[0]
    for k in (0, 1):
        write, flush = events[k]
        assert isinstance(write, Request) and bytes(write.data) == payloads[k]
        assert isinstance(flush, Request) and flush.cmd == Cmd.FLUSH
    assert conns[0].receive_buffer().obj is shared  # between payloads: the shared one
