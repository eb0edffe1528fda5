"""The C core (nbdquorum.native) against the Python reference (block/vote.py).

Worked examples pin the rules down for both implementations; Hypothesis then
checks that C and Python agree on random buffers, random corruption, every
threshold and failed children.  The I/O functions run against real files.
"""

from __future__ import annotations

import array
import errno
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdquorum import native
from nbdquorum.block.vote import Buffer, VoteResult, diff_span_reference, vote_reference
from tests.ci import unavailable

A = b"\xaa" * 512
B = b"\xbb" * 512
C = b"\xcc" * 512

VOTERS = [pytest.param(native.vote, id="c"), pytest.param(vote_reference, id="python")]
SPANS = [pytest.param(native.diff_span, id="c"), pytest.param(diff_span_reference, id="python")]


def vote_both(bufs: Sequence[Buffer | None], threshold: int) -> VoteResult:
    """Vote in C and in Python, insist they agree, and return the result."""
    got = native.vote(bufs, threshold)
    assert got == vote_reference(bufs, threshold)
    return got


# -- worked examples ---------------------------------------------------------

EXAMPLES = [
    # (buffers, threshold, winner, groups)
    pytest.param([A, A, A], 2, 0, (0, 0, 0), id="unanimous"),
    pytest.param([A, A, A], 3, 0, (0, 0, 0), id="unanimous-threshold-all"),
    pytest.param([A, A, A], 4, None, (0, 0, 0), id="threshold-above-children"),
    pytest.param([A, A, B], 2, 0, (0, 0, 2), id="last-corrupt"),
    pytest.param([B, A, A], 2, 1, (0, 1, 1), id="first-corrupt"),
    pytest.param([A, B, A], 2, 0, (0, 1, 0), id="middle-corrupt"),
    pytest.param([A, B, C], 1, None, (0, 1, 2), id="three-way-tie"),
    pytest.param([A, B], 1, None, (0, 1), id="one-one-tie"),
    pytest.param([A, B, B, A], 1, None, (0, 1, 1, 0), id="two-two-tie"),
    pytest.param([A, B, B, A, C], 2, None, (0, 1, 1, 0, 4), id="tie-beside-a-loner"),
    pytest.param([A, B, B, C, B], 3, 1, (0, 1, 1, 3, 1), id="majority-after-mismatch"),
    pytest.param([A, B, B, C, B], 4, None, (0, 1, 1, 3, 1), id="majority-below-threshold"),
    pytest.param([A, None, A], 2, 0, (0, -1, 0), id="failed-child"),
    pytest.param([None, B, A, B], 2, 1, (-1, 1, 2, 1), id="failed-first-child"),
    pytest.param([A, None, None], 2, None, (0, -1, -1), id="too-few-voters"),
    pytest.param([A, None, None], 1, 0, (0, -1, -1), id="lone-voter-threshold-1"),
    pytest.param([None, None, None], 1, None, (-1, -1, -1), id="nobody-votes"),
    pytest.param([A], 1, 0, (0,), id="single-child"),
    pytest.param([b"", b"", b""], 2, 0, (0, 0, 0), id="empty-buffers"),
]


@pytest.mark.parametrize("vote", VOTERS)
@pytest.mark.parametrize(("bufs", "threshold", "winner", "groups"), EXAMPLES)
def test_vote_examples(
    vote: object,
    bufs: list[bytes | None],
    threshold: int,
    winner: int | None,
    groups: tuple[int, ...],
) -> None:
    assert callable(vote)
    assert vote(bufs, threshold) == VoteResult(winner, groups)


@pytest.mark.parametrize("vote", VOTERS)
@pytest.mark.parametrize("threshold", [0, -1, -(2**40)])
def test_vote_rejects_threshold_below_one(vote: object, threshold: int) -> None:
    assert callable(vote)
    with pytest.raises(OSError) as info:
        vote([A, A], threshold)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("vote", VOTERS)
def test_vote_rejects_no_children(vote: object) -> None:
    assert callable(vote)
    with pytest.raises(OSError) as info:
        vote([], 1)
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize("vote", VOTERS)
def test_vote_rejects_mixed_lengths(vote: object) -> None:
    assert callable(vote)
    with pytest.raises(ValueError, match="length"):
        vote([A, A[:-1]], 1)


def test_vote_huge_threshold_is_no_quorum() -> None:
    assert vote_both([A, A], 2**40) == VoteResult(None, (0, 0))


def test_vote_takes_any_contiguous_buffer() -> None:
    words = array.array("I", [0xAAAAAAAA] * 128)  # the bytes of A, 4 per item
    bufs: list[Buffer | None] = [bytearray(A), memoryview(A), memoryview(words), A]
    assert vote_both(bufs, 4) == VoteResult(0, (0, 0, 0, 0))
    sliced = memoryview(b"xx" + A + b"yy")[2:-2]
    assert vote_both([A, sliced, B], 2) == VoteResult(0, (0, 0, 2))


def test_vote_same_buffer_object_twice() -> None:
    buf = bytearray(B)
    assert vote_both([buf, A, buf], 2) == VoteResult(0, (0, 1, 0))


def test_vote_result_helpers() -> None:
    result = VoteResult(1, (0, 1, 1, -1, 4, 1))
    assert result.voters == (0, 1, 2, 4, 5)
    assert result.winners == (1, 2, 5)
    assert result.losers == (0, 4)
    assert result.counts == {0: 1, 1: 3, 4: 1}
    failed = VoteResult(None, (0, 1, -1))
    assert failed.losers == ()
    assert failed.winners == ()
    assert failed.counts == {0: 1, 1: 1}


# -- diff_span ---------------------------------------------------------------


@pytest.mark.parametrize("span", SPANS)
def test_diff_span_examples(span: object) -> None:
    assert callable(span)
    assert span(b"", b"") is None
    assert span(A, A) is None
    assert span(b"abcdef", b"abXdYf") == (2, 5)
    assert span(b"abc", b"Xbc") == (0, 1)
    assert span(b"abc", b"abX") == (2, 3)
    assert span(A, B) == (0, len(A))
    with pytest.raises(ValueError, match="length"):
        span(b"ab", b"abc")


def corrupt(base: bytes, positions: Sequence[int]) -> bytes:
    out = bytearray(base)
    for p in positions:
        out[p] ^= 0xFF
    return bytes(out)


# Sizes and offsets around the 4 KiB and 64-byte steps the C scan uses.
EDGE_SIZES = [1, 63, 64, 65, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 4096 + 100, 1 << 20]


@pytest.mark.parametrize("size", EDGE_SIZES)
def test_diff_span_at_scan_boundaries(size: int) -> None:
    base = bytes(range(256)) * (size // 256) + bytes(size % 256)
    edges = {0, 1, 63, 64, 65, 4095, 4096, 4097, size // 2, size - 4097, size - 4096}
    edges |= {size - 65, size - 64, size - 63, size - 2, size - 1}
    points = sorted(p for p in edges if 0 <= p < size)
    assert native.diff_span(base, base) is None
    for p in points:
        assert native.diff_span(base, corrupt(base, [p])) == (p, p + 1)
    for i, p in enumerate(points):
        for q in points[i + 1 :]:
            assert native.diff_span(base, corrupt(base, [p, q])) == (p, q + 1)


@settings(max_examples=300, deadline=None)
@given(
    base=st.binary(min_size=1, max_size=20_000),
    data=st.data(),
)
def test_diff_span_matches_reference_on_random_corruption(base: bytes, data: st.DataObject) -> None:
    positions = data.draw(
        st.lists(st.integers(0, len(base) - 1), max_size=6, unique=True), label="positions"
    )
    other = corrupt(base, positions)
    expected = (min(positions), max(positions) + 1) if positions else None
    assert native.diff_span(base, other) == diff_span_reference(base, other) == expected
    assert native.diff_span(other, base) == expected


@settings(max_examples=200, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_diff_span_matches_reference_on_random_buffers(a: bytes, b: bytes) -> None:
    n = min(len(a), len(b))
    assert native.diff_span(a[:n], b[:n]) == diff_span_reference(a[:n], b[:n])


# -- C and Python agree on random votes --------------------------------------


@st.composite
def quorum_reads(draw: st.DrawFn) -> list[bytes | None]:
    """Children holding one of a few versions (often alike), some failed."""
    size = draw(st.integers(0, 64))
    versions = draw(st.lists(st.binary(min_size=size, max_size=size), min_size=1, max_size=4))
    picks = st.one_of(st.none(), st.sampled_from(versions))
    return draw(st.lists(picks, min_size=1, max_size=9))


@settings(max_examples=500, deadline=None)
@given(bufs=quorum_reads())
def test_vote_matches_reference_for_every_threshold(bufs: list[bytes | None]) -> None:
    for threshold in range(1, len(bufs) + 2):
        result = vote_both(bufs, threshold)
        check_invariants(bufs, threshold, result)


def check_invariants(bufs: Sequence[bytes | None], threshold: int, result: VoteResult) -> None:
    """What any correct vote satisfies, independent of either implementation."""
    for i, (buf, g) in enumerate(zip(bufs, result.groups, strict=True)):
        if buf is None:
            assert g == -1
        else:
            assert 0 <= g <= i
            assert bufs[g] == buf
            assert all(bufs[j] != buf for j in range(g))
    counts = result.counts
    if result.winner is not None:
        best = counts[result.winner]
        assert best >= threshold
        assert all(c < best for r, c in counts.items() if r != result.winner)
    elif counts:
        best = max(counts.values())
        assert best < threshold or list(counts.values()).count(best) > 1


@settings(max_examples=200, deadline=None)
@given(
    base=st.binary(min_size=1, max_size=5000),
    n=st.integers(1, 7),
    data=st.data(),
)
def test_vote_finds_randomly_corrupted_children(base: bytes, n: int, data: st.DataObject) -> None:
    bufs: list[bytes | None] = []
    for i in range(n):
        kind = data.draw(st.sampled_from(["good", "corrupt", "failed"]), label=f"child {i}")
        if kind == "failed":
            bufs.append(None)
        elif kind == "corrupt":
            pos = data.draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=3))
            bufs.append(corrupt(base, pos))
        else:
            bufs.append(base)
    good = [i for i, b in enumerate(bufs) if b == base]
    for threshold in range(1, n + 2):
        result = vote_both(bufs, threshold)
        check_invariants(bufs, threshold, result)
        if result.winner is not None and bufs[result.winner] == base:
            assert result.winners == tuple(good)
            for i in result.losers:
                buf = bufs[i]
                assert buf is not None
                assert native.diff_span(base, buf) == diff_span_reference(base, buf)


# -- pread_vote and pwrite_all on real files ---------------------------------

SIZE = 3 * 4096


@pytest.fixture
def images(tmp_path: Path) -> Iterator[list[int]]:
    """Three identical images, opened read-write."""
    fds = []
    for i in range(3):
        path = tmp_path / f"child{i}.img"
        path.write_bytes(bytes(range(256)) * (SIZE // 256))
        fds.append(os.open(path, os.O_RDWR))
    yield fds
    for fd in fds:
        os.close(fd)


def test_pread_vote_unanimous(images: list[int]) -> None:
    result, bufs, errs = native.pread_vote(images, 4096, 4096, 2)
    assert result == VoteResult(0, (0, 0, 0))
    assert errs == [0, 0, 0]
    assert bufs[0] == (bytes(range(256)) * 16)
    assert all(isinstance(b, bytearray) and len(b) == 4096 for b in bufs)


def test_pread_vote_outvotes_a_corrupt_child(images: list[int]) -> None:
    os.pwrite(images[1], b"\x00\x01", 5000)
    result, bufs, errs = native.pread_vote(images, 4096, 4096, 2)
    assert result == VoteResult(0, (0, 1, 0))
    assert result.losers == (1,)
    assert errs == [0, 0, 0]
    assert native.diff_span(bufs[0], bufs[1]) is not None


def test_pread_vote_eof_is_eio(images: list[int], tmp_path: Path) -> None:
    os.ftruncate(images[2], 4096 + 100)
    result, _, errs = native.pread_vote(images, 4096, 4096, 2)
    assert errs == [0, 0, errno.EIO]
    assert result == VoteResult(0, (0, 0, -1))


def test_pread_vote_skipped_and_failed_children(images: list[int], tmp_path: Path) -> None:
    wronly = os.open(tmp_path / "child0.img", os.O_WRONLY)
    try:
        result, _, errs = native.pread_vote([-1, images[1], wronly], 0, 512, 1)
    finally:
        os.close(wronly)
    assert errs == [-1, 0, errno.EBADF]
    assert result == VoteResult(1, (-1, 1, -1))
    result, _, errs = native.pread_vote([-1, images[1], -1], 0, 512, 2)
    assert result == VoteResult(None, (-1, 1, -1))


def test_pread_vote_nobody_reads(images: list[int]) -> None:
    result, _, errs = native.pread_vote([-1, -1], 0, 512, 1)
    assert result == VoteResult(None, (-1, -1))
    assert errs == [-1, -1]


def test_pread_vote_reuses_caller_buffers(images: list[int]) -> None:
    mine = [bytearray(8192) for _ in images]
    result, bufs, _ = native.pread_vote(images, 0, 4096, 3, mine)
    assert result.winner == 0
    assert all(a is b for a, b in zip(bufs, mine, strict=True))
    assert mine[2][:256] == bytes(range(256))
    assert mine[2][4096:] == bytes(4096)  # beyond length: untouched


def test_pread_vote_argument_errors(images: list[int]) -> None:
    with pytest.raises(ValueError, match="need 4096"):
        native.pread_vote(images, 0, 4096, 2, [bytearray(4096), bytearray(10), bytearray(4096)])
    with pytest.raises(ValueError, match="buffers for"):
        native.pread_vote(images, 0, 16, 2, [bytearray(16)])
    with pytest.raises(ValueError, match="negative"):
        native.pread_vote(images, -1, 16, 2)
    for fds, offset, threshold in [([], 0, 1), (images, 0, 0), (images, 2**63 - 8, 1)]:
        with pytest.raises(OSError) as info:
            native.pread_vote(fds, offset, 16, threshold)
        assert info.value.errno == errno.EINVAL


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_pread_vote_matches_reference(tmp_path: Path, data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5), label="children")
    length = data.draw(st.integers(0, 9000), label="length")
    offset = data.draw(st.integers(0, 300), label="offset")
    base = data.draw(st.binary(min_size=length, max_size=length), label="base")
    fds = []
    expected: list[bytes | None] = []
    try:
        for i in range(n):
            kind = data.draw(st.sampled_from(["good", "corrupt", "short", "skip"]), label=f"{i}")
            content = base
            if kind == "corrupt" and length:
                pos = data.draw(st.lists(st.integers(0, length - 1), min_size=1, max_size=3))
                content = corrupt(base, pos)
            path = tmp_path / f"prop{i}.img"
            image = bytes(offset) + content
            path.write_bytes(image[: offset + length - 1] if kind == "short" else image)
            fds.append(-1 if kind == "skip" else os.open(path, os.O_RDONLY))
            short = kind == "short" and length > 0
            expected.append(None if kind == "skip" or short else content)
        inline = native.Inline(fds)  # one for every call: its arrays are reused
        for threshold in range(1, n + 2):
            for how in ("call", "inline", "inline-nowait"):
                if how == "call":
                    done = native.pread_vote(fds, offset, length, threshold)
                else:
                    done = inline.pread_vote(offset, length, threshold, how == "inline-nowait")
                if done is None or done == native.UNKNOWN:
                    continue  # would block, or the file system cannot tell: no answer
                assert not isinstance(done, str)
                result, bufs, errs = done
                assert result == vote_reference(expected, threshold), how
                for fd, want, buf, err in zip(fds, expected, bufs, errs, strict=True):
                    if fd < 0:
                        assert err == -1
                    elif want is None:
                        assert err == errno.EIO
                    else:
                        assert err == 0
                        assert buf == want
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def test_pwrite_all_writes_every_child(images: list[int]) -> None:
    data = b"\x5a" * 1000
    for sync in (False, True):
        assert native.pwrite_all(images, 100, data, sync) == [0, 0, 0]
        for fd in images:
            assert os.pread(fd, 1000, 100) == data
    result, _, _ = native.pread_vote(images, 0, SIZE, 3)
    assert result.winner == 0


def test_pwrite_all_skipped_and_failed_children(images: list[int], tmp_path: Path) -> None:
    rdonly = os.open(tmp_path / "child2.img", os.O_RDONLY)
    try:
        errs = native.pwrite_all([images[0], -1, rdonly], 0, memoryview(b"hello"), True)
    finally:
        os.close(rdonly)
    assert errs == [0, -1, errno.EBADF]
    assert os.pread(images[0], 5, 0) == b"hello"
    assert os.pread(images[2], 5, 0) != b"hello"


def test_inline_writes_and_reads_like_the_calls(images: list[int]) -> None:
    fds = [images[0], -1, images[2]]
    inline = native.Inline(fds)
    for nowait in (False, True):
        data = bytes([0x41 + nowait]) * 700
        codes = inline.pwrite_all(300, memoryview(data), nowait)
        if codes is None or codes == native.UNKNOWN:
            continue  # would block (nothing written), or the file system cannot tell
        assert codes == [0, -1, 0]
        assert os.pread(images[0], 700, 300) == os.pread(images[2], 700, 300) == data
        assert os.pread(images[1], 700, 300) != data
        done = inline.pread_vote(300, 700, 2, nowait)
        assert done is not None and not isinstance(done, str)
        result, bufs, errs = done
        assert result == VoteResult(0, (0, -1, 0)) and errs == [0, -1, 0]
        assert bufs[0] == bufs[2] == data and bufs[0] is not bufs[2]
        assert bufs[1] == b""  # a skipped child's stand-in
    # an empty read, and errors as the calls give them
    assert inline.pread_vote(0, 0, 1, False)[0] == native.pread_vote(fds, 0, 0, 1)[0]
    with pytest.raises(ValueError, match="negative"):
        inline.pread_vote(-1, 16, 1, False)
    with pytest.raises(OSError) as info:
        inline.pwrite_all(2**63 - 1, b"xy", False)
    assert info.value.errno == errno.EINVAL


def test_pwrite_all_extends_and_handles_empty(images: list[int]) -> None:
    assert native.pwrite_all(images, SIZE, b"tail", False) == [0, 0, 0]
    assert all(os.fstat(fd).st_size == SIZE + 4 for fd in images)
    assert native.pwrite_all(images, 0, b"", True) == [0, 0, 0]
    assert native.pwrite_all([], 0, b"x", False) == []


def test_pwrite_all_argument_errors(images: list[int]) -> None:
    with pytest.raises(ValueError, match="negative"):
        native.pwrite_all(images, -1, b"x", False)
    with pytest.raises(OSError) as info:
        native.pwrite_all(images, 2**63 - 1, b"xy", False)
    assert info.value.errno == errno.EINVAL


# -- fallocate helpers ------------------------------------------------------


@pytest.mark.parametrize("zero", [native.punch_hole, native.zero_range], ids=["punch", "zero"])
def test_fallocate_zeroes_keep_size(images: list[int], zero: object) -> None:
    assert callable(zero)
    fd = images[0]
    if not zero(fd, 4096, 4096):
        unavailable("file system cannot fallocate this way")
    assert os.pread(fd, 4096, 4096) == bytes(4096)
    assert os.pread(fd, 4096, 0) == bytes(range(256)) * 16
    assert os.fstat(fd).st_size == SIZE
    assert zero(fd, 0, 0) is True


def test_fallocate_errors(images: list[int], tmp_path: Path) -> None:
    rdonly = os.open(tmp_path / "child0.img", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as info:
            native.punch_hole(rdonly, 0, 4096)
        assert info.value.errno == errno.EBADF
    finally:
        os.close(rdonly)
    with pytest.raises(ValueError, match="negative"):
        native.zero_range(images[0], 0, -1)


@pytest.mark.parametrize(
    "case",
    ["equal", "last-piece-differs", "first-piece-differs", "one-short", "two-versions-tie"],
)
def test_pread_vote_big_requests_read_in_pieces_agree_with_reference(
    tmp_path: Path, case: str
) -> None:
    """Requests over 256 KiB are read and compared piece by piece in C."""
    import os
    import random

    from nbdquorum import native
    from nbdquorum.block.vote import vote_reference

    size = (1 << 20) + 4096 + 17  # several pieces and a ragged tail
    base = random.Random(7).randbytes(size)
    datas = [bytearray(base) for _ in range(4)]
    if case == "last-piece-differs":
        datas[2][size - 3] ^= 1
    elif case == "first-piece-differs":
        datas[0][5] ^= 1
    elif case == "two-versions-tie":
        datas[2][size // 2] ^= 1
        datas[3][size // 2] ^= 1
    paths = []
    for i, d in enumerate(datas):
        p = tmp_path / f"c{i}"
        p.write_bytes(bytes(d[: size - 100]) if (case == "one-short" and i == 1) else bytes(d))
        paths.append(p)
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for threshold in (1, 2, 3):
            result, bufs, errs = native.pread_vote(fds, 0, size, threshold)
            voted = [bytes(b) if e == 0 else None for b, e in zip(bufs, errs, strict=True)]
            assert voted == [bytes(d) if e == 0 else None for d, e in zip(datas, errs, strict=True)]
            assert result == vote_reference(voted, threshold)
            if case == "one-short":
                assert errs[1] != 0 and errs.count(0) == 3
    finally:
        for fd in fds:
            os.close(fd)
