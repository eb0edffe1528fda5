"""Read voting, in the shape of qemu-iotests 081.

Write 0x32 through the quorum, check the children directly, corrupt a child behind the
server's back with dd, then read through the quorum: one bad child is outvoted (and
repaired with rewrite-corrupted), two differently bad children break the quorum.

Where QEMU differs by design (README: "What the vote does"), each target's own behaviour is asserted:
QEMU reports the whole request's span, nbdquorum only the sectors that differ; QEMU
breaks a tie in favour of the later children, nbdquorum fails the read.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from .conftest import (
    EIO_TEXT,
    IMAGE_SIZE,
    QUORUM_NODE,
    MiB,
    Server,
    StartServer,
    assert_identical,
    assert_pattern,
    corrupt,
    output,
    qemu_io,
    read_at,
    require_libnbd,
    sectors,
    select,
    wait_until,
    xfail_for,
)

pytestmark = pytest.mark.timeout(90)

GOOD = 0x32
BAD_OFFSET, BAD_LENGTH = 4000, 200  # sectors 7 and 8
REQUEST = (0, MiB)  # the read that finds the corruption: "read -P 0x32 0 1M"
READ_ALL = f"read -P {GOOD:#x} 0 1M"

REPORT_BAD = "QUORUM_REPORT_BAD"
FAILURE = "QUORUM_FAILURE"


def written(server: Server, length: int = MiB) -> Server:
    """081 step 1: write 0x32 through the quorum; every child holds it."""
    qemu_io(server.uri(), f"write -P {GOOD:#x} 0 {length}")
    for image in server.images:
        assert_pattern(image, 0, length, GOOD)
    return server


def expected_span(
    target: str, offset: int = BAD_OFFSET, length: int = BAD_LENGTH
) -> tuple[int, int]:
    """(sector-num, sectors-count) each target reports for a bad span inside REQUEST."""
    if target == "qsd":
        return sectors(*REQUEST)  # QEMU reports the whole request
    return sectors(offset, length)  # nbdquorum narrows to the sectors that differ


def span(event: dict[str, Any]) -> tuple[int, int]:
    return event["data"]["sector-num"], event["data"]["sectors-count"]


def read_fails_with_eio(server: Server, command: str = READ_ALL) -> None:
    proc = qemu_io(server.uri(), command, check=False)
    assert proc.returncode != 0, output(proc)
    assert f"read failed: {EIO_TEXT}" in output(proc), output(proc)


@pytest.mark.timeout(120)
def test_write_reaches_every_child(server: Server) -> None:
    written(server, IMAGE_SIZE)
    qemu_io(server.uri(), f"read -P {GOOD:#x} 0 {IMAGE_SIZE}")


def test_one_corrupt_child_is_outvoted(server: Server, target: str) -> None:
    written(server)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)

    qemu_io(server.uri(), READ_ALL)

    event = server.wait_event(REPORT_BAD, node_name="child1")
    assert event["data"]["type"] == "read"
    assert "error" not in event["data"], event  # a content mismatch, not an I/O error
    assert set(event["data"]) == {"node-name", "type", "sector-num", "sectors-count"}
    assert span(event) == expected_span(target)
    events = server.final_events()
    assert select(events, REPORT_BAD) == [event], events
    assert not select(events, FAILURE), events
    # Without rewrite-corrupted the child is left as it was.
    assert_pattern(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 1),
        (511, 2),
        (8192, 512),
        (BAD_OFFSET, BAD_LENGTH),
        (65536 - 1, 4097),
    ],
)
def test_report_bad_span_is_the_differing_sectors(
    start_server: StartServer, offset: int, length: int
) -> None:
    server = written(start_server("nbdquorum"))
    corrupt(server.images[2], offset, length, 0x42)
    qemu_io(server.uri(), READ_ALL)
    event = server.wait_event(REPORT_BAD, node_name="child2")
    assert span(event) == sectors(offset, length)


def test_report_bad_span_is_clipped_to_the_request(start_server: StartServer) -> None:
    server = written(start_server("nbdquorum"))
    corrupt(server.images[0], 0, 64 * 1024, 0x42)
    qemu_io(server.uri(), f"read -P {GOOD:#x} 8k 4k")
    event = server.wait_event(REPORT_BAD, node_name="child0")
    assert span(event) == sectors(8192, 4096)


def test_read_outside_the_corruption_sends_no_event(server: Server) -> None:
    written(server)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), f"read -P {GOOD:#x} 8k 1016k")
    assert server.final_events() == []


def test_rewrite_corrupted_repairs_the_child(start_server: StartServer, target: str) -> None:
    server = written(start_server(target, rewrite_corrupted=True))
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)

    qemu_io(server.uri(), READ_ALL)

    event = server.wait_event(REPORT_BAD, node_name="child1")
    assert event["data"]["type"] == "read"
    assert span(event) == expected_span(target)
    wait_until(
        lambda: read_at(server.images[1], BAD_OFFSET, BAD_LENGTH) == bytes([GOOD]) * BAD_LENGTH,
        10,
        "child1 to be rewritten with the voted data",
    )
    assert_identical(server.images)
    # Repaired: the next read finds nothing to report.
    qemu_io(server.uri(), READ_ALL)
    assert select(server.final_events(), REPORT_BAD) == [event]


def test_two_differently_corrupt_children_break_the_quorum(server: Server) -> None:
    written(server)
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x41)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)

    read_fails_with_eio(server)

    event = server.wait_event(FAILURE)
    assert event["data"]["reference"] == QUORUM_NODE
    assert set(event["data"]) == {"reference", "sector-num", "sectors-count"}
    start, count = span(event)
    bad_start, bad_count = sectors(BAD_OFFSET, BAD_LENGTH)
    assert start <= bad_start and start + count >= bad_start + bad_count, event
    assert start >= 0 and start + count <= sectors(*REQUEST)[1], event
    # The server keeps serving the parts that still have a quorum.
    assert server.alive()
    qemu_io(server.uri(), f"read -P {GOOD:#x} 64k 64k")
    events = server.final_events()
    assert len(select(events, FAILURE)) == 1, events
    assert not select(events, REPORT_BAD), "no winner, so no child is reported bad"


def test_quorum_failure_is_an_eio_reply_not_a_disconnect(
    server: Server, target: str, request: pytest.FixtureRequest
) -> None:
    xfail_for(
        target,
        "qsd",
        "qsd 7.2 drops the connection when a read fails",
        request,
    )
    nbd = require_libnbd()
    written(server)
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x41)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    h = nbd.NBD()
    h.connect_uri(server.uri())
    try:
        with pytest.raises(nbd.Error) as e:
            h.pread(4096, 0)
        assert e.value.errnum == errno.EIO, str(e.value)
        assert h.pread(4096, 8192) == bytes([GOOD]) * 4096
    finally:
        h.shutdown()


def test_threshold_3_of_3_fails_with_one_bad_child(start_server: StartServer, target: str) -> None:
    server = written(start_server(target, vote_threshold=3))
    corrupt(server.images[2], BAD_OFFSET, BAD_LENGTH, 0x42)
    read_fails_with_eio(server)
    assert server.wait_event(FAILURE)["data"]["reference"] == QUORUM_NODE


def test_threshold_1_of_3_one_bad_child_is_outvoted(start_server: StartServer, target: str) -> None:
    server = written(start_server(target, vote_threshold=1))
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), READ_ALL)
    assert server.wait_event(REPORT_BAD, node_name="child0")["data"]["type"] == "read"


def test_write_over_the_corruption_heals_it(server: Server) -> None:
    written(server)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), "write -P 0x55 0 64k", "read -P 0x55 0 64k")
    assert_identical(server.images)
    assert server.final_events() == []


def test_fifo_reads_the_first_child_only(start_server: StartServer, target: str) -> None:
    """fifo: child0 is trusted; its corruption is returned, silently."""
    server = written(start_server(target, read_pattern="fifo"))
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x42)
    proc = qemu_io(server.uri(), READ_ALL, check=False)
    assert "Pattern verification failed" in output(proc), output(proc)
    qemu_io(
        server.uri(), f"read -P 0x42 {BAD_OFFSET} {BAD_LENGTH}", f"read -P {GOOD:#x} 0 {BAD_OFFSET}"
    )
    assert server.final_events() == []


def test_fifo_ignores_a_corrupt_second_child(start_server: StartServer, target: str) -> None:
    server = written(start_server(target, read_pattern="fifo"))
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), READ_ALL)
    assert server.final_events() == []
    assert_pattern(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)


def test_tie_of_two_against_two(start_server: StartServer, target: str) -> None:
    """4 children, threshold 2, two agree on one version and two on another."""
    server = written(start_server(target, children=4, vote_threshold=2))
    corrupt(server.images[2], BAD_OFFSET, BAD_LENGTH, 0x42)
    corrupt(server.images[3], BAD_OFFSET, BAD_LENGTH, 0x42)
    command = f"read -P 0x42 {BAD_OFFSET} {BAD_LENGTH}"
    if target == "qsd":
        # QEMU: the version first seen at the highest child index wins the tie, the
        # good children are the ones reported bad (QEMU 7.2's tie-break).
        qemu_io(server.uri(), command)
        server.wait_event(REPORT_BAD, node_name="child0")
        server.wait_event(REPORT_BAD, node_name="child1")
        assert not select(server.final_events(), FAILURE)
    else:
        # nbdquorum: a tie has no winner, so the read fails.
        read_fails_with_eio(server, command)
        assert server.wait_event(FAILURE)["data"]["reference"] == QUORUM_NODE
        assert not select(server.final_events(), REPORT_BAD)


def test_named_children_and_node_name_appear_in_events(
    start_server: StartServer, target: str
) -> None:
    server = written(start_server(target, names=["alpha", "beta", "gamma"], node_name="q9"))
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), READ_ALL)
    server.wait_event(REPORT_BAD, node_name="beta")
    corrupt(server.images[2], BAD_OFFSET, BAD_LENGTH, 0x43)
    read_fails_with_eio(server)
    server.wait_event(FAILURE, reference="q9")


def test_rewrite_of_a_partial_read_keeps_the_bytes_around_it(
    start_server: StartServer, target: str
) -> None:
    """A read of part of a bad sector repairs what it read and corrupts nothing else."""
    server = written(start_server(target, rewrite_corrupted=True))
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    qemu_io(server.uri(), f"read -P {GOOD:#x} 4100 50")
    server.wait_event(REPORT_BAD, node_name="child1")
    good = bytes([GOOD]) * 50
    wait_until(
        lambda: read_at(server.images[1], 4100, 50) == good, 10, "child1 to be repaired at 4100+50"
    )
    server.final_events()
    around = read_at(server.images[1], 3584, 1024)  # sectors 7 and 8
    for i, byte in enumerate(around):
        offset = 3584 + i
        if BAD_OFFSET <= offset < BAD_OFFSET + BAD_LENGTH:
            assert byte in (GOOD, 0x42), f"offset {offset}: {byte:#x}"
        else:
            assert byte == GOOD, f"offset {offset} was good and is now {byte:#x}"
    assert_identical(server.images[::2])


def test_rewrite_does_nothing_without_a_winner(start_server: StartServer, target: str) -> None:
    server = written(start_server(target, rewrite_corrupted=True))
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x41)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    read_fails_with_eio(server)
    server.wait_event(FAILURE)
    server.final_events()
    assert_pattern(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x41)
    assert_pattern(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    assert_pattern(server.images[2], BAD_OFFSET, BAD_LENGTH, GOOD)


def test_three_different_versions_fail(server: Server) -> None:
    written(server)
    corrupt(server.images[0], BAD_OFFSET, BAD_LENGTH, 0x41)
    corrupt(server.images[2], BAD_OFFSET, BAD_LENGTH, 0x43)
    corrupt(server.images[1], BAD_OFFSET, BAD_LENGTH, 0x42)
    read_fails_with_eio(server)
    assert server.wait_event(FAILURE)["data"]["reference"] == QUORUM_NODE


def test_the_vote_is_per_request(server: Server) -> None:
    """Two children bad at different places: a read spanning both has three versions and
    fails; a read of either place alone has a 2-of-3 majority and succeeds."""
    written(server)
    corrupt(server.images[0], 0, 512, 0x41)
    corrupt(server.images[2], 8192, 512, 0x43)
    read_fails_with_eio(server)
    server.wait_event(FAILURE)
    qemu_io(server.uri(), f"read -P {GOOD:#x} 0 4k")
    server.wait_event(REPORT_BAD, node_name="child0")
    qemu_io(server.uri(), f"read -P {GOOD:#x} 8k 4k")
    server.wait_event(REPORT_BAD, node_name="child2")
    events = server.final_events()
    assert not select(events, REPORT_BAD, node_name="child1"), events
