"""The one table of NBD wire layouts (nbd/wire.py), which the server and the client share."""

from __future__ import annotations

import struct

import pytest

from nbdquorum.nbd import client, protocol, wire


def test_the_sizes_are_proto_md_s() -> None:
    sizes = {
        "GREETING": 18, "CLIENT_FLAGS": 4, "OPTION": 16, "OPTION_REPLY": 20,
        "EXPORT_NAME_REPLY": 10, "INFO_EXPORT": 12, "INFO_BLOCK_SIZE": 14,
        "REQUEST": 28, "SIMPLE_REPLY": 16, "CHUNK": 20, "OFFSET": 8, "HOLE": 12, "ERROR": 6,
    }
    assert {name: getattr(wire, name).size for name in sizes} == sizes


def test_server_and_client_use_the_same_layouts() -> None:
    for name in ("GREETING", "OPTION", "OPTION_REPLY", "REQUEST", "CHUNK", "SIMPLE_REPLY",
                 "OFFSET", "HOLE", "ERROR"):
        assert getattr(protocol, f"_{name}") is getattr(wire, name), name
        assert getattr(client, name) is getattr(wire, name), name


def test_block_status_round_trips() -> None:
    extents = [(4096, 0), (1 << 20, 3), (512, 1)]
    payload = wire.pack_block_status(1, extents)
    assert payload == struct.pack(">I6I", 1, 4096, 0, 1 << 20, 3, 512, 1)
    assert wire.unpack_block_status(payload) == (1, extents)
    assert client.parse_extents(payload) == extents


@pytest.mark.parametrize("n", [0, 3, 8, 13])
def test_a_block_status_payload_of_broken_length_is_refused(n: int) -> None:
    with pytest.raises(struct.error):
        wire.unpack_block_status(bytes(n))
