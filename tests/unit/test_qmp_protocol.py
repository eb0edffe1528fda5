"""qmp/protocol.py fed bytes: whole, one byte at a time, split anywhere, and with trailing data."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdquorum.qmp.errors import LocalProtocolError
from nbdquorum.qmp.protocol import (
    NEED_DATA,
    NO_ID,
    BadRequest,
    ConnectionClosed,
    Execute,
    Message,
    ParseError,
    Phase,
    ServerConnection,
    error_message,
    event_message,
    greeting,
    return_message,
)

GREETING = greeting(0, 1, 0, "nbdquorum 0.1.0")


def conn(**kwargs: Any) -> ServerConnection:
    return ServerConnection(GREETING, **kwargs)


def drain(c: ServerConnection) -> list[Any]:
    out = []
    while True:
        ev = c.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, ConnectionClosed):
            return out


def feed(c: ServerConnection, data: bytes) -> list[Any]:
    if data:  # b"" would mean EOF: see eof()
        c.receive_data(data)
    return drain(c)


def eof(c: ServerConnection) -> list[Any]:
    c.receive_data(b"")
    return drain(c)


def feed_bytewise(c: ServerConnection, data: bytes) -> list[Any]:
    out: list[Any] = []
    for i in range(len(data)):
        out += feed(c, data[i:i + 1])
    return out


def three_ways(wire: bytes, expected: list[Any], trailing: bytes = b'{"execute": "quit"}\n'
               ) -> None:
    """h11's tr(): all at once, one byte at a time, and followed by another message."""
    assert feed(conn(), wire) == expected
    assert feed_bytewise(conn(), wire) == expected
    assert feed(conn(), wire + trailing) == [*expected, Execute("quit")]


# --------------------------------------------------------------------------- framing


def test_execute_with_id_and_arguments() -> None:
    wire = b'{"execute": "blockdev-del", "arguments": {"node-name": "c1"}, "id": 7}\r\n'
    three_ways(wire, [Execute("blockdev-del", {"node-name": "c1"}, 7)])


def test_split_anywhere() -> None:
    wire = b'{"execute": "x-blockdev-change", "arguments": {"parent": "q0", "node": "n\\"x"}}\n'
    want = [Execute("x-blockdev-change", {"parent": "q0", "node": 'n"x'})]
    for cut in range(len(wire) + 1):
        c = conn()
        assert feed(c, wire[:cut]) + feed(c, wire[cut:]) == want, cut


def test_id_echoed_whatever_its_type() -> None:
    for ident in [1, "x1", None, {"any": ["json"]}, [1, 2], 1.5, True]:
        wire = json.dumps({"execute": "query-version", "id": ident}).encode() + b"\n"
        three_ways(wire, [Execute("query-version", {}, ident)])


def test_no_id_is_not_null_id() -> None:
    (ev,) = feed(conn(), b'{"execute": "quit"}\n')
    assert ev.id is NO_ID
    (ev,) = feed(conn(), b'{"execute": "quit", "id": null}\n')
    assert ev.id is None


def test_several_messages_in_one_chunk_and_no_newline_needed() -> None:
    wire = b'{"execute": "a"}{"execute": "b"}  {"execute": "c"}\n'
    three_ways(wire, [Execute("a"), Execute("b"), Execute("c")])


def test_incomplete_object_waits_across_newlines() -> None:
    c = conn()
    assert feed(c, b'{"execute": "query-version"\n\n') == []
    assert feed(c, b', "id": 3}\n') == [Execute("query-version", {}, 3)]


def test_control_byte_resets_a_pending_object() -> None:
    # reference 3.4: an incomplete object, then \x1b\n: one parse error, parser reset
    c = conn()
    assert feed(c, b'{"execute": "query-version"\n') == []
    assert feed(c, b"\x1b\n") == [ParseError("JSON parse error, stray '\x1b'")]
    assert feed(c, b'{"execute": "quit"}\n') == [Execute("quit")]


def test_reset_byte_resyncs_without_waiting_for_a_newline() -> None:
    wire = b'{"execute": "x\xff{"execute": "quit"}\n'
    assert feed(conn(), wire) == [ParseError("JSON parse error, stray '\xff'"),
                                  Execute("quit")]


def test_braces_inside_strings_do_not_count() -> None:
    wire = b'{"execute": "x-blockdev-change", "arguments": {"parent": "}{]["}}\n'
    three_ways(wire, [Execute("x-blockdev-change", {"parent": "}{]["})])


def test_single_quoted_strings_as_qemu_accepts() -> None:
    wire = b"{'execute': 'query-version', 'id': 'sq'}\n"
    three_ways(wire, [Execute("query-version", {}, "sq")])
    wire = b"""{'execute': 'x', 'arguments': {'a': 'it\\'s "quoted"', "b": "it\\'s"}}\n"""
    three_ways(wire, [Execute("x", {"a": 'it\'s "quoted"', "b": "it's"})])


def test_unicode_arguments() -> None:
    wire = '{"execute": "x", "arguments": {"n": "nœud ☃"}}\n'.encode()
    three_ways(wire, [Execute("x", {"n": "nœud ☃"})])


def test_eof_ends_the_connection() -> None:
    c = conn()
    assert feed(c, b'{"execute": "quit"}\n{"execute": ') == [Execute("quit")]
    assert eof(c) == [ConnectionClosed()]
    assert c.phase is Phase.CLOSED


def test_one_mib_message_fed_in_small_chunks_is_linear() -> None:
    big = "x" * (1 << 20)
    wire = json.dumps({"execute": "blockdev-del", "arguments": {"node-name": big}}).encode()
    c = conn()
    out: list[Any] = []
    for i in range(0, len(wire), 1000):
        out += feed(c, wire[i:i + 1000])
    assert out == [Execute("blockdev-del", {"node-name": big})]
    assert c.buffered == 0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("wire", "expected"), [
    (b'{ "execute": }\n', ParseError("JSON parse error, expecting value")),
    (b"not json\n", ParseError("JSON parse error, invalid keyword 'not'")),
    (b"[1,2]\n", BadRequest("QMP input must be a JSON object")),
    (b"42\n", BadRequest("QMP input must be a JSON object")),
    (b'"str"\n', BadRequest("QMP input must be a JSON object")),
    (b'{"foo": 1}\n', BadRequest("QMP input member 'foo' is unexpected")),
    (b'{"execute": 1}\n', BadRequest("QMP input member 'execute' must be a string")),
    (b'{"id": 5}\n', BadRequest("QMP input lacks member 'execute'", 5)),
    (b'{"execute":"query-version","arguments":[],"id":8}\n',
     BadRequest("QMP input member 'arguments' must be an object", 8)),
    (b'{"execute":"query-version","id":7,"extra":true}\n',
     BadRequest("QMP input member 'extra' is unexpected", 7)),
    (b'{"execute":"x","exec-oob":"y"}\n',
     BadRequest("QMP input member 'exec-oob' is unexpected")),
    (b'{"execute": "a", "execute": "b"}\n', ParseError("JSON parse error, duplicate key 'execute'")),
    (b'{"execute": NaN}\n', ParseError("JSON parse error, invalid keyword 'NaN'")),
    # infinity has no JSON: an error reply could not echo such an id
    (b'{"execute": "x", "id": 1e999}\n',
     ParseError("JSON parse error, number out of range '1e999'")),
    (b'{"execute": "x", "arguments": {"a": [-1.5e400]}}\n',
     ParseError("JSON parse error, number out of range '-1.5e400'")),
    (b'{"execute": "a\tb"}\n', ParseError("JSON parse error, stray '\t'")),
    (b'{"execute": "\xc3\x28"}\n', ParseError("JSON parse error, invalid UTF-8 sequence in string")),
    (b"}\n", ParseError("JSON parse error, expecting value")),
])
def test_bad_input_gets_an_error_and_the_parser_continues(wire: bytes, expected: Any) -> None:
    three_ways(wire, [expected])


def test_garbage_costs_one_error_a_line() -> None:
    wire = b"not json at all\nreally not\n" + b"x " * 10000 + b"\n"
    out = feed(conn(), wire + b'{"execute": "quit"}\n')
    assert out == [ParseError("JSON parse error, invalid keyword 'not'"),
                   ParseError("JSON parse error, invalid keyword 'really'"),
                   ParseError("JSON parse error, invalid keyword 'x'"),
                   Execute("quit")]


def test_message_size_limit() -> None:
    c = conn(max_message_size=1000)
    wire = b'{"execute": "x", "arguments": {"a": "' + b"y" * 5000 + b'"}}\n'
    out = feed_bytewise(c, wire) + feed(c, b'{"execute": "quit"}\n')
    assert out == [ParseError("JSON parse error, token size limit exceeded"), Execute("quit")]
    assert c.buffered < 2000


def test_nesting_limit() -> None:
    c = conn(max_nesting=10)
    out = feed(c, b'{"execute": "x", "arguments": ' + b"[" * 20 + b"]" * 20 + b"}\n"
               + b'{"execute": "quit"}\n')
    assert out == [ParseError("JSON parse error, nesting depth limit exceeded"), Execute("quit")]


def test_deep_nesting_within_limit_does_not_crash() -> None:
    wire = b'{"execute": "x", "arguments": {"a": ' + b"[" * 1000 + b"]" * 1000 + b"}}\n"
    (ev,) = feed(conn(), wire)
    assert isinstance(ev, Execute | ParseError)


def test_huge_integer_is_a_parse_error_not_a_crash() -> None:
    (ev,) = feed(conn(), b'{"execute": "x", "id": ' + b"9" * 10000 + b"}\n")
    assert isinstance(ev, ParseError)


# --------------------------------------------------------------------------- negotiation, output


def test_exec_oob_only_after_oob_is_enabled() -> None:
    c = conn()
    c.negotiate(["oob"])
    assert c.oob_enabled and c.negotiated
    assert feed(c, b'{"exec-oob": "quit", "id": 1}\n') == [Execute("quit", {}, 1, oob=True)]


def test_negotiate_twice_is_a_local_error() -> None:
    c = conn()
    c.negotiate()
    with pytest.raises(LocalProtocolError):
        c.negotiate()


def test_events_only_after_negotiation() -> None:
    c = conn()
    ev = event_message("QUORUM_FAILURE", {"reference": "q"}, 1.5)
    with pytest.raises(LocalProtocolError):
        c.send(ev)
    c.negotiate()
    assert c.send(ev) == (b'{"timestamp": {"seconds": 1, "microseconds": 500000}, '
                          b'"event": "QUORUM_FAILURE", "data": {"reference": "q"}}\r\n')


def test_messages_are_qemu_lines() -> None:
    assert conn().initial_bytes() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, '
        b'"package": "nbdquorum 0.1.0"}, "capabilities": ["oob"]}}\r\n')
    assert bytes(return_message({}, 2)) == b'{"return": {}, "id": 2}\r\n'
    assert bytes(error_message("CommandNotFound", "The command x has not been found", "x1")) == (
        b'{"id": "x1", "error": {"class": "CommandNotFound", '
        b'"desc": "The command x has not been found"}}\r\n')
    assert bytes(error_message("GenericError", "JSON parse error, expecting value")) == (
        b'{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}\r\n')
    assert bytes(return_message("\u2603")) == b'{"return": "\\u2603"}\r\n'


def test_unserializable_reply_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        bytes(Message({"return": object()}))
    with pytest.raises(LocalProtocolError):
        bytes(Message({"return": float("nan")}))


def test_event_timestamp_fields() -> None:
    m = event_message("X", None, 1795630054.102390)
    assert m["timestamp"] == {"seconds": 1795630054, "microseconds": 102390}
    assert "data" not in m
    assert event_message("X", {}, -1)["timestamp"] == {"seconds": -1, "microseconds": -1}


# --------------------------------------------------------------------------- fuzz

_FRAGMENTS = [b"{", b"}", b"[", b"]", b'"', b"'", b"\\", b":", b",", b"\n", b"\x1b", b"\xff",
              b'"execute"', b'"id"', b'"arguments"', b"null", b"1e400", b"-0", b" ", b"\t",
              b'{"execute": "quit"}', b"\xc3", b"\x00"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.sampled_from(_FRAGMENTS)), max_size=40),
       st.integers(min_value=1, max_value=17))
def test_fuzz_random_bytes_give_events_never_exceptions(chunks: list[bytes], step: int) -> None:
    """h11's fuzz invariant: whatever the bytes, only events come out."""
    wire = b"".join(chunks)
    c = conn(max_message_size=4096, max_nesting=64)
    c.negotiate(["oob"])
    out: list[Any] = []
    for i in range(0, len(wire), step):
        out += feed(c, wire[i:i + step])
    out += eof(c)
    assert isinstance(out[-1], ConnectionClosed)
    for ev in out:
        assert isinstance(ev, Execute | BadRequest | ParseError | ConnectionClosed)
        if isinstance(ev, Execute):
            assert isinstance(ev.name, str) and isinstance(ev.arguments, dict)
        elif isinstance(ev, ParseError | BadRequest):
            bytes(error_message("GenericError", ev.desc, getattr(ev, "id", NO_ID)))
    # and the connection still works afterwards for a well-formed command on a fresh line
    c2 = conn()
    assert feed(c2, wire + b"\n\x1b\n" + b'{"execute": "quit"}\n')[-1] == Execute("quit")


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=20))
def test_fuzz_any_json_value_round_trips(value: Any) -> None:
    wire = json.dumps({"execute": "x", "arguments": {"v": value}, "id": value}).encode()
    assert feed_bytewise(conn(), wire) == [Execute("x", {"v": value}, value)]
