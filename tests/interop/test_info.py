"""What clients see before any I/O: size, export list, block sizes and flags."""

from __future__ import annotations

import json

import pytest

from .conftest import (
    IMAGE_SIZE,
    StartServer,
    nbdinfo,
    nbdinfo_json,
    output,
    qemu_io,
    require,
    run,
    xfail_for,
)

pytestmark = pytest.mark.timeout(60)


def qemu_img_info(uri: str) -> dict[str, object]:
    proc = run([require("qemu-img"), "info", "--output=json", uri])
    assert proc.returncode == 0, output(proc)
    return json.loads(proc.stdout)


def test_qemu_img_info_over_unix_socket(start_server: StartServer, target: str) -> None:
    server = start_server(target)
    info = qemu_img_info(server.uri())
    assert info["virtual-size"] == IMAGE_SIZE
    assert info["format"] == "raw"


def test_qemu_img_info_over_tcp(start_server: StartServer, target: str) -> None:
    server = start_server(target, listen=True)
    assert server.uri().startswith("nbd://127.0.0.1:")
    assert qemu_img_info(server.uri())["virtual-size"] == IMAGE_SIZE


def test_size_follows_the_images(start_server: StartServer, target: str) -> None:
    server = start_server(target, size=3 * 1024 * 1024 + 512)
    assert qemu_img_info(server.uri())["virtual-size"] == 3 * 1024 * 1024 + 512


def test_nbdinfo_json_size_block_sizes_and_flags(start_server: StartServer, target: str) -> None:
    server = start_server(target)
    export = nbdinfo_json(server.uri())
    assert export["export-name"] == "disk"
    assert export["export-size"] == IMAGE_SIZE
    assert export["block_size_minimum"] == 1
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * 1024 * 1024
    for flag in (
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
        "can_cache",
        "can_fast_zero",
    ):
        assert export[flag] is True, f"{flag} is {export[flag]}"
    assert export["is_read_only"] is False


def test_nbdinfo_read_only_export(start_server: StartServer, target: str) -> None:
    server = start_server(target, read_only=True)
    export = nbdinfo_json(server.uri())
    assert export["is_read_only"] is True
    assert export["export-size"] == IMAGE_SIZE


def test_nbdinfo_list_shows_the_export(start_server: StartServer, target: str) -> None:
    server = start_server(target)
    proc = nbdinfo("--list", "--json", server.uri(""))
    assert proc.returncode == 0, output(proc)
    names = [e["export-name"] for e in json.loads(proc.stdout)["exports"]]
    assert names == ["disk"]


def test_default_export_name_selects_disk(
    start_server: StartServer, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(target, "qsd", "QEMU has no default export: '' is just an unknown name", request)
    server = start_server(target)
    assert server.uri("").startswith("nbd+unix:///?socket=")
    assert nbdinfo_json(server.uri(""))["export-size"] == IMAGE_SIZE
    # The default export is the same disk, not a second one.
    qemu_io(server.uri(""), "write -P 0x5a 0 4k")
    qemu_io(server.uri(), "read -P 0x5a 0 4k")


def test_custom_export_name(start_server: StartServer) -> None:
    server = start_server("nbdquorum", export_name="vol1")
    assert nbdinfo_json(server.uri("vol1"))["export-size"] == IMAGE_SIZE
    proc = nbdinfo("--list", "--json", server.uri(""))
    assert proc.returncode == 0, output(proc)
    assert [e["export-name"] for e in json.loads(proc.stdout)["exports"]] == ["vol1"]
    assert nbdinfo("--size", server.uri("disk")).returncode != 0
    assert nbdinfo("--size", server.uri("")).stdout.strip() == str(IMAGE_SIZE)


def test_unknown_export_fails_cleanly(start_server: StartServer, target: str) -> None:
    server = start_server(target)
    proc = nbdinfo("--json", server.uri("nosuch"))
    assert proc.returncode != 0
    assert "nosuch" in proc.stderr
    assert server.alive()
    # The next client is served normally.
    assert nbdinfo_json(server.uri())["export-size"] == IMAGE_SIZE
    qemu_io(server.uri(), "read -P 0 0 4k")
