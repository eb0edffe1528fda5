"""Bad QMP input over a raw socket: each gets QEMU's reply and the monitor keeps working."""

from __future__ import annotations

import json
import threading

import pytest

from .qmp_fixtures import (
    QUORUM,
    RawQMP,
    StartTarget,
    Target,
    both_targets,
    corrupt,
    qemu_io,
    qmp_target_fixture,  # noqa: F401  (the qmp_target fixture)
    wait_until,
)

KiB = 1024

# reference 3.4: what QEMU 7.2 answers, byte for byte once parsed
CASES = [
    (b'{ "execute": }\n',
     {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}),
    (b"[1,2]\n", {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}),
    (b'{"foo": 1}\n',
     {"error": {"class": "GenericError", "desc": "QMP input member 'foo' is unexpected"}}),
    (b'{"execute": 1}\n',
     {"error": {"class": "GenericError", "desc": "QMP input member 'execute' must be a string"}}),
    (b'{"execute":"query-version","arguments":[],"id":8}\n',
     {"id": 8, "error": {"class": "GenericError",
                         "desc": "QMP input member 'arguments' must be an object"}}),
    (b'{"execute":"query-version","id":7,"extra":true}\n',
     {"id": 7, "error": {"class": "GenericError",
                         "desc": "QMP input member 'extra' is unexpected"}}),
    (b'{"execute":"no-such-cmd","id":"x1"}\n',
     {"id": "x1", "error": {"class": "CommandNotFound",
                            "desc": "The command no-such-cmd has not been found"}}),
    (b'{"execute":"blockdev-del","arguments":{"node-name":"c","bogus":1},"id":2}\n',
     {"id": 2, "error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}),
    (b'{"execute":"blockdev-del","id":3}\n',
     {"id": 3, "error": {"class": "GenericError", "desc": "Parameter 'node-name' is missing"}}),
    (b'{"execute":"blockdev-del","arguments":{"node-name":5},"id":4}\n',
     {"id": 4, "error": {"class": "GenericError",
                         "desc": "Invalid parameter type for 'node-name', expected: string"}}),
    (b'{"execute":"x-blockdev-change","arguments":{"parent":true},"id":5}\n',
     {"id": 5, "error": {"class": "GenericError",
                         "desc": "Invalid parameter type for 'parent', expected: string"}}),
    (b'{"execute":"query-named-block-nodes","arguments":{"flat":"yes"},"id":6}\n',
     {"id": 6, "error": {"class": "GenericError",
                         "desc": "Invalid parameter type for 'flat', expected: boolean"}}),
    (b"{'execute': 'query-version', 'id': 'sq'}\n", None),  # single quotes: a normal reply
    (b'{"execute":"query-version","id":{"any":["json"]}}\n', None),
]


def check_alive(c: RawQMP) -> None:
    c.send(b'{"execute": "query-version", "id": "alive"}\n')
    reply = c.reply()
    assert reply["id"] == "alive" and "return" in reply, reply


@both_targets
def test_bad_input_gets_qemus_replies(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)
    c = RawQMP(t.qmp)
    try:
        for wire, want in CASES:
            c.send(wire)
            reply = c.reply()
            if want is None:
                assert "return" in reply, (wire, reply)
                assert reply["id"] == json.loads(wire.replace(b"'", b'"'))["id"]
            else:
                assert reply == want, wire
        check_alive(c)
    finally:
        c.close()


@both_targets
def test_incomplete_object_waits_then_a_control_byte_resets(qmp_target: StartTarget,
                                                             target: str) -> None:
    t = qmp_target(target)
    c = RawQMP(t.qmp)
    try:
        c.send(b'{"execute": "query-version"\n\n')
        c.send(b"\x1b\n")
        assert c.reply() == {"error": {"class": "GenericError",
                                       "desc": "JSON parse error, stray '\x1b'"}}
        check_alive(c)
    finally:
        c.close()


@both_targets
def test_not_json_then_the_monitor_works(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)
    c = RawQMP(t.qmp)
    try:
        c.send(b"not json\n")
        assert c.reply() == {"error": {"class": "GenericError",
                                       "desc": "JSON parse error, invalid keyword 'not'"}}
        # QEMU sends one more error for 'json'; nbdquorum skips the rest of the line
        c.send(b'{"execute": "query-version", "id": "alive"}\n')
        while (reply := c.reply()).get("id") != "alive":
            assert "error" in reply and target == "qsd"
        assert "return" in reply
    finally:
        c.close()


@both_targets
def test_a_one_mib_line(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)
    c = RawQMP(t.qmp)
    big = "x" * (1 << 20)
    try:
        c.send(json.dumps({"execute": "blockdev-del", "arguments": {"node-name": big},
                           "id": 1}).encode() + b"\n")
        assert c.reply() == {"id": 1, "error": {
            "class": "GenericError", "desc": f"Failed to find node with node-name='{big}'"}}
        check_alive(c)
    finally:
        c.close()


def test_a_one_mib_line_of_garbage(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    c = RawQMP(t.qmp)
    try:
        c.send(b"garbage " * (1 << 17) + b"\n")
        reply = c.reply()
        assert reply["error"]["desc"] == "JSON parse error, invalid keyword 'garbage'"
        check_alive(c)  # one error a line, not one per token
    finally:
        c.close()


def _negotiated(t: Target, target: str) -> RawQMP:
    """A negotiated raw client; for qsd, tolerant of one stale reply first.

    qsd's chardev monitor serves one client at a time and now and then answers
    the vanished client's command (or half command) to the next one: allow one
    stale reply before the negotiation's own (a rare flake of the reference,
    seen about once in 50 runs; nbdquorum must be exact).
    """
    if target != "qsd":
        return RawQMP(t.qmp)
    c = RawQMP(t.qmp, negotiate=False)
    c.send(b'{"execute": "qmp_capabilities"}\n')
    first = c.reply()
    if first != {"return": {}}:
        # a stale reply (then ours is next) or ours spoiled by stale bytes (then
        # the retry's is): either way a success comes within the next two replies
        c.send(b'{"execute": "qmp_capabilities"}\n')
        second = c.reply()
        if second != {"return": {}}:
            assert c.reply() == {"return": {}}, (first, second)
    return c


@both_targets
def test_clients_that_vanish_mid_command(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)
    for i in range(20):
        c = _negotiated(t, target) if i % 2 == 0 else RawQMP(t.qmp, negotiate=False)
        if i % 3 == 0:
            c.send(b'{"execute": "query-named-block-nodes", "id": 1}\n')  # reply never read
        elif i % 3 == 1:
            c.send(b'{"execute": "x-blockdev-change", "argum')  # half a command
        else:
            c.send(b'{"execute": "query-version"')
        c.sock.shutdown(2)
        c.close()
    assert t.alive()
    c = _negotiated(t, target)
    try:
        if target == "qsd":
            # the same flake can leave one stale reply after the negotiation's own
            c.send(b'{"execute": "query-version", "id": "alive"}\n')
            reply = c.reply()
            if reply.get("id") != "alive":
                reply = c.reply()
            assert reply["id"] == "alive" and "return" in reply, reply
        else:
            check_alive(c)
    finally:
        c.close()
    qemu_io(t.uri, "write -P 0x35 0 4k", "read -P 0x35 0 4k")


def test_twenty_clients_at_once(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    clients = [RawQMP(t.qmp) for _ in range(20)]
    errors: list[BaseException] = []

    def work(i: int, c: RawQMP) -> None:
        try:
            for j in range(10):
                ident = f"{i}-{j}"
                c.send(json.dumps({"execute": "query-quorum-status", "id": ident}).encode()
                       + b"\n" + b'{"execute": "x-blockdev-change", "arguments": '
                       b'{"parent": "quorum0"}, "id": "e"}\n')
                r = c.reply()
                assert r["id"] == ident and r["return"][0]["node-name"] == QUORUM, r
                r = c.reply()
                assert r["error"]["desc"] == "Either child or node must be specified", r
        except BaseException as err:  # collected and re-raised in the main thread
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[0]
    # ... and every one of them gets the event of a bad read
    qemu_io(t.uri, "write -P 0x32 0 64k", "flush")
    corrupt(t.images[0], 0, 64 * KiB, 0x42)
    qemu_io(t.uri, "read -P 0x32 0 64k")
    for c in clients:
        ev = c.events.pop(0) if c.events else c.recv()
        assert ev["event"] == "QUORUM_REPORT_BAD" and ev["data"]["node-name"] == "child0", ev
        c.close()


@pytest.mark.parametrize("target", ["nbdquorum"])
def test_socket_is_private(qmp_target: StartTarget, target: str) -> None:
    import os
    import stat

    t: Target = qmp_target(target)
    assert stat.S_IMODE(os.stat(t.qmp).st_mode) == 0o600
    t.stop()
    wait_until(lambda: not t.qmp.exists(), 10, "the socket to be removed")
