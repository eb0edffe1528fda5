"""Typed wrappers over the C core (native/quorum.c).

This is the only module that imports the compiled ``nbdquorum._native_lib``.
Inputs go to C zero-copy through ``ffi.from_buffer`` (never written through
when they are read-only), outputs come back as Python values, and a negative
return from C becomes ``OSError(-rc, os.strerror(-rc))``.  A vote without a
quorum is not an exception here: it is a ``VoteResult`` whose ``winner`` is
None, so the caller still learns who disagreed.

cffi releases the GIL for every call, so these are meant to run on a thread
pool (``loop.run_in_executor``) for large buffers.  The buffers must not be
resized while a call runs; cffi holds a buffer export, so a bytearray that is
resized meanwhile raises BufferError instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal

from nbdquorum._native_lib import ffi, lib
from nbdquorum.coretypes import Buffer, VoteResult

if TYPE_CHECKING:
    from nbdquorum._native_lib import _CData

log = logging.getLogger(__name__)

__all__ = [
    "UNKNOWN",
    "Buffer",
    "Inline",
    "Sender",
    "VoteResult",
    "WriteJob",
    "Writer",
    "diff_span",
    "pread_vote",
    "pread_vote_nowait",
    "punch_hole",
    "pwrite_all",
    "pwrite_all_nowait",
    "trim_malloc",
    "tune_malloc",
    "vote",
    "zero_range",
]

# Stands in for every empty buffer: its exporter may hand out a NULL pointer,
# which the C side would take for a failed child.
_EMPTY = ffi.new("uint8_t[1]")


def _check(rc: int) -> int:
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc


def _winner(rc: int) -> int | None:
    """Map a vote return to a winner index; -EIO is no quorum, not an error."""
    if rc == -errno.EIO:
        return None
    return _check(rc)


def _pointer(buf: Buffer, *, writable: bool = False) -> tuple[_CData, int]:
    """Zero-copy pointer to ``buf`` and its size in bytes.

    The cdata keeps the buffer exported: hold it until the C call returns.
    """
    cdata = ffi.from_buffer("uint8_t[]", buf, require_writable=writable)
    size = len(cdata)
    return (cdata if size else _EMPTY), size


def _threshold(threshold: int, n: int) -> int:
    """Clamp into C int range without changing the outcome of the vote."""
    return 0 if threshold < 1 else min(threshold, n + 1)


def _check_offset(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"negative offset or length: {offset}, {length}")


def vote(bufs: Sequence[Buffer | None], threshold: int) -> VoteResult:
    """Vote over the children's buffers; a ``None`` buffer does not vote.

    Raises:
        OSError: EINVAL if ``bufs`` is empty or ``threshold`` < 1.
        ValueError: if the buffers that vote differ in length.
    """
    n = len(bufs)
    ptrs = ffi.new("const uint8_t *[]", n)
    keep = []  # the exports behind ptrs, alive until the call returns
    length: int | None = None
    for i, buf in enumerate(bufs):
        if buf is None:
            continue
        cdata, size = _pointer(buf)
        if length is None:
            length = size
        elif size != length:
            raise ValueError("buffers to vote on differ in length")
        keep.append(cdata)
        ptrs[i] = cdata
    groups = ffi.new("int32_t[]", n)
    rc = lib.quorum_vote(ptrs, n, length or 0, _threshold(threshold, n), groups)
    return VoteResult(_winner(rc), tuple(ffi.unpack(groups, n)))


def diff_span(a: Buffer, b: Buffer) -> tuple[int, int] | None:
    """Return (first differing offset, one past the last), or None if equal.

    Raises:
        ValueError: if ``a`` and ``b`` differ in length.
    """
    pa, length = _pointer(a)
    pb, length_b = _pointer(b)
    if length_b != length:
        raise ValueError("buffers to compare differ in length")
    span = ffi.new("uint64_t[2]")
    if _check(lib.quorum_diff_span(pa, pb, length, span)) == 0:
        return None
    return int(span[0]), int(span[1])


def pread_vote(
    fds: Sequence[int],
    offset: int,
    length: int,
    threshold: int,
    bufs: Sequence[bytearray] | None = None,
) -> tuple[VoteResult, list[bytearray], list[int]]:
    """Read ``length`` bytes at ``offset`` from every child, then vote.

    A negative fd skips its child.  ``bufs`` are the read buffers, one per
    child and each at least ``length`` bytes (the first ``length`` are used);
    when omitted, a ``bytearray(length)`` is allocated for every child.

    Returns ``(result, bufs, errnos)``: ``errnos[i]`` is 0 if child i read
    OK, its errno if the read failed (EIO for a read that hit EOF), or -1 if
    it was skipped.  Only the children that read OK vote; with too few of
    them, ``result.winner`` is None.

    Raises:
        OSError: EINVAL if ``fds`` is empty, ``threshold`` < 1, or the range
            does not fit in an off_t.
        ValueError: on a negative offset or length, or bad ``bufs``.
    """
    _check_offset(offset, length)
    n = len(fds)
    out = [bytearray(length) for _ in range(n)] if bufs is None else list(bufs)
    if len(out) != n:
        raise ValueError(f"{len(out)} buffers for {n} children")
    ptrs = ffi.new("uint8_t *[]", n)
    keep = []  # the exports behind ptrs, alive until the call returns
    for i, (fd, buf) in enumerate(zip(fds, out, strict=True)):
        if fd < 0:
            continue
        cdata, size = _pointer(buf, writable=True)
        if size < length:
            raise ValueError(f"buffer {i} holds {size} bytes, need {length}")
        keep.append(cdata)
        ptrs[i] = cdata
    errs = ffi.new("int[]", n)
    groups = ffi.new("int32_t[]", n)
    cfds = ffi.new("int[]", list(fds))
    rc = lib.quorum_pread_vote(
        cfds, n, offset, length, ptrs, errs, _threshold(threshold, n), groups
    )
    result = VoteResult(_winner(rc), tuple(ffi.unpack(groups, n)))
    return result, out, ffi.unpack(errs, n)


def pwrite_all(fds: Sequence[int], offset: int, data: Buffer, sync: bool) -> list[int]:
    """Write ``data`` at ``offset`` to every child; fdatasync each if ``sync``.

    A negative fd skips its child.  Returns per child 0 (written), the errno
    of the failed write or sync, or -1 (skipped); the caller decides whether
    enough children succeeded.

    Raises:
        OSError: EINVAL if the range does not fit in an off_t.
        ValueError: on a negative offset.
    """
    _check_offset(offset, 0)
    n = len(fds)
    errs = ffi.new("int[]", n)
    pdata, length = _pointer(data)
    cfds = ffi.new("int[]", list(fds))
    _check(lib.quorum_pwrite_all(cfds, n, offset, pdata, length, int(sync), errs))
    return ffi.unpack(errs, n)


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeroes, keeping the file size.

    Returns False if the file system cannot punch holes (EOPNOTSUPP).

    Raises:
        OSError: any other fallocate error.
        ValueError: on a negative offset or length.
    """
    _check_offset(offset, length)
    return _check(lib.quorum_punch_hole(fd, offset, length)) == 1


def zero_range(fd: int, offset: int, length: int) -> bool:
    """Zero a range without writing it (fallocate ZERO_RANGE), keeping the size.

    Returns False if the file system cannot (EOPNOTSUPP).

    Raises:
        OSError: any other fallocate error.
        ValueError: on a negative offset or length.
    """
    _check_offset(offset, length)
    return _check(lib.quorum_zero_range(fd, offset, length)) == 1


def tune_malloc(max_buffer: int) -> bool:
    """Keep buffers up to ``max_buffer`` bytes on the heap (no mmap per request);
    glibc keeps up to 4 x that of freed heap before giving it back by itself."""
    return lib.quorum_tune_malloc(max_buffer) == 1


def trim_malloc() -> bool:
    """Give the heap's free memory back to the system (glibc malloc_trim).

    False where there is no glibc.  Takes milliseconds for a large heap: call
    it when idle, not per request.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    return bool(_malloc_trim(0))


_malloc_trim: Any = None


#: pread_vote_nowait / pwrite_all_nowait: the file system cannot say whether
#: the call would block (RWF_NOWAIT unsupported, e.g. tmpfs)
UNKNOWN: Final = "unknown"


def pread_vote_nowait(
    fds: Sequence[int], offset: int, length: int, threshold: int
) -> tuple[VoteResult, list[bytearray], list[int]] | Literal["unknown"] | None:
    """As pread_vote, from the page cache only: None if any child would block.

    Cheap enough to call on the event loop for small requests; on None the
    caller retries with pread_vote on a worker thread.  UNKNOWN when a child's
    file system does not support RWF_NOWAIT.  A skipped child's buffer is an
    empty bytearray.
    """
    return Inline(fds).pread_vote(offset, length, threshold, True)


#: stands in, in Inline's results, for the buffer of a child that was skipped
_SKIPPED = bytearray()


class Inline:
    """The C calls of small inline requests to one list of descriptors.

    pread_vote and friends build their argument arrays on every call; with
    three children that is half the cost of a 4 KiB read from the page cache
    (measured: 10 us per call against 5 with the arrays made once).  An
    Inline makes them once per list of descriptors.  Not thread-safe: one
    thread (the event loop's) owns it.  ``fds`` is kept as given; the caller
    keeps one Inline per list and makes a new one when its descriptors change.
    """

    __slots__ = ("_errs", "_groups", "_ptrs", "cfds", "fds", "n", "ok_codes", "readers")

    def __init__(self, fds: Sequence[int]) -> None:
        self.fds = fds
        self.n = n = len(fds)
        self.cfds = ffi.new("int[]", list(fds))
        self._ptrs = ffi.new("uint8_t *[]", n)
        self._errs = ffi.new("int[]", n)
        self._groups = ffi.new("int32_t[]", n)
        #: the children read (a negative descriptor skips its child)
        self.readers = [i for i, fd in enumerate(fds) if fd >= 0]
        #: a write's codes when every descriptor took it (-1: skipped)
        self.ok_codes = [0 if fd >= 0 else -1 for fd in fds]

    def pread_vote(
        self, offset: int, length: int, threshold: int, nowait: bool,
    ) -> tuple[VoteResult, list[bytearray], list[int]] | Literal["unknown"] | None:
        """As pread_vote (``nowait``: pread_vote_nowait, with its None and UNKNOWN).
        A skipped child's buffer is an empty bytearray (its errno is -1)."""
        _check_offset(offset, length)
        n, ptrs = self.n, self._ptrs
        out = [_SKIPPED] * n
        keep = []  # the exports behind ptrs, alive until the call returns
        for i in self.readers:
            out[i] = buf = bytearray(length)
            # (an empty buffer's export may be NULL, which C takes for a failed child)
            ptrs[i] = cdata = (ffi.from_buffer("uint8_t[]", buf, require_writable=True)
                               if length else _EMPTY)
            keep.append(cdata)
        errs, groups = self._errs, self._groups
        t = _threshold(threshold, n)
        if nowait:
            rc = lib.quorum_pread_vote_nowait(self.cfds, n, offset, length, ptrs, errs, t,
                                              groups)
            if rc == -errno.EAGAIN:
                return None
            if rc == -errno.EOPNOTSUPP:
                return UNKNOWN
        else:
            rc = lib.quorum_pread_vote(self.cfds, n, offset, length, ptrs, errs, t, groups)
        del keep
        return (VoteResult(_winner(rc), tuple(ffi.unpack(groups, n))), out,
                ffi.unpack(errs, n))

    def pwrite_all(self, offset: int, data: Buffer,
                   nowait: bool) -> list[int] | Literal["unknown"] | None:
        """As pwrite_all without sync (``nowait``: pwrite_all_nowait)."""
        _check_offset(offset, 0)
        pdata, length = _pointer(data)
        errs = self._errs
        if nowait:
            rc = lib.quorum_pwrite_all_nowait(self.cfds, self.n, offset, pdata, length, errs)
            if rc == -errno.EAGAIN:
                return None
            if rc == -errno.EOPNOTSUPP:
                return UNKNOWN
        else:
            rc = lib.quorum_pwrite_all(self.cfds, self.n, offset, pdata, length, 0, errs)
        _check(rc)
        return ffi.unpack(errs, self.n)


def pwrite_all_nowait(
    fds: Sequence[int], offset: int, data: Buffer
) -> list[int] | Literal["unknown"] | None:
    """As pwrite_all without sync, to the page cache only: None if it would block.

    None means nothing was written; once the first child took the data the
    others are written too (blocking if need be), so children never differ.
    """
    return Inline(fds).pwrite_all(offset, data, True)


#: buffers smaller than this leave joined into one (a copy of a few KiB costs less
#: than an iovec and a buffer export each); larger ones are written where they lie
_JOIN_BELOW: Final = 64 << 10


class Sender:
    """A socket's sending side on a thread of its own (quorum_sender_* in
    native/quorum.h): ``push`` queues buffers and returns, the thread writes
    them in order.  The kernel's copy and the protocol's work of each send then
    run beside the event loop instead of on it.

    The thread writes to a duplicate of ``fd``, closed by ``close``, so a
    descriptor number the caller closes and the system reuses is never written
    to.  Everything pushed is held here until the thread has written it (or has
    been joined): a buffer is never freed, and never handed out again by a pool
    that watches its references, while it is being sent.  A Sender dropped
    without ``close`` joins its thread before it lets go of anything.

    With ``loop``, the loop watches an eventfd the thread makes readable when a
    write fails (``on_failed(errno)`` is called once, on the loop) and when a
    waiter's mark is reached (``below``): nothing polls.  One thread (the event
    loop's) calls every method.
    """

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop | None = None,
                 on_failed: Callable[[int], None] | None = None) -> None:
        told = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        dup = os.dup(fd)
        out = ffi.new("quorum_sender **")
        rc = lib.quorum_sender_new(dup, told, out)
        if rc < 0:
            os.close(dup)
            os.close(told)
            _check(rc)
        self._handle: Any = out[0]
        self._told = told
        self._pushed = 0
        self._sent = 0  # what quorum_sender_sent said last (it only grows, up to _pushed)
        #: (the stream offset just past a push, what must live until it is written)
        self._held: deque[tuple[int, list[Any]]] = deque()
        self._stopped = False
        self._loop = loop
        self._on_failed = on_failed
        self._waiter: asyncio.Future[None] | None = None
        # dropped without close(): the thread is joined first, then the buffers go
        self._release = weakref.finalize(self, _release_sender, self._handle, told,
                                         self._held)
        if loop is not None:
            loop.add_reader(told, self._told_readable)

    def push(self, bufs: Sequence[Buffer]) -> None:
        """Queue ``bufs`` after what was pushed before.

        Raises:
            OSError: the socket failed on an earlier write (its errno), or the
                sender was stopped (EPIPE); nothing of ``bufs`` is queued.
        """
        if self._handle is None:
            raise BrokenPipeError(errno.EPIPE, "sender closed")
        pieces: list[Buffer] = []
        run: list[Buffer] = []
        for b in bufs:
            if (b.nbytes if isinstance(b, memoryview) else len(b)) < _JOIN_BELOW:
                run.append(b)
                continue
            if run:
                pieces.append(b"".join(run) if len(run) > 1 else run[0])
                run = []
            pieces.append(b)
        if run:
            pieces.append(b"".join(run) if len(run) > 1 else run[0])
        n = len(pieces)
        ptrs = ffi.new("uint8_t *[]", n)
        lens = ffi.new("size_t[]", n)
        keep = []
        total = 0
        for i, b in enumerate(pieces):
            c = ffi.from_buffer("uint8_t[]", b)
            keep.append(c)  # the export: the buffer can be neither freed nor resized
            ptrs[i] = c
            lens[i] = size = len(c)
            total += size
        _check(lib.quorum_sender_push(self._handle, ptrs, lens, n))
        self._pushed += total
        self._held.append((self._pushed, keep))
        self.let_go()

    def _written(self) -> int:
        """Bytes the thread has written so far (asks it only while some are queued:
        a small request's flush checks ``busy`` and must not pay a C call)."""
        if self._sent != self._pushed and self._handle is not None:
            self._sent = lib.quorum_sender_sent(self._handle)
        return self._sent

    def let_go(self) -> None:
        """Drop what the thread has written (buffers a pool may hand out again)."""
        held = self._held
        if held:
            sent = self._written()
            while held and held[0][0] <= sent:
                held.popleft()

    @property
    def busy(self) -> bool:
        """Pushed bytes are still queued (not all written)."""
        return self._handle is not None and self._written() != self._pushed

    @property
    def backlog(self) -> int:
        """Bytes pushed and not written yet (0 once closed)."""
        if self._handle is None:
            return 0
        self.let_go()
        return self._pushed - self._written()

    @property
    def error(self) -> int:
        """The errno of the write that failed, 0 while none did."""
        return 0 if self._handle is None else lib.quorum_sender_error(self._handle)

    async def below(self, nbytes: int) -> None:
        """Return once no more than ``nbytes`` wait to be written, or the thread has
        ended (a failed write, ``stop``, ``close``).  Needs the ``loop``."""
        assert self._loop is not None, "below() needs the loop the Sender was made with"
        while (self._handle is not None and not self._stopped and not self.error
               and self.backlog > nbytes):
            if self._waiter is None:
                self._waiter = self._loop.create_future()
                lib.quorum_sender_wake_below(self._handle, nbytes)
            await asyncio.shield(self._waiter)

    def _told_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._told)
        self.let_go()
        err = self.error
        if err and self._on_failed is not None:
            on_failed, self._on_failed = self._on_failed, None
            on_failed(err)
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def stop(self) -> None:
        """Write nothing more (what is queued is dropped); ``close`` still follows."""
        if self._handle is not None:
            self._stopped = True
            lib.quorum_sender_stop(self._handle)

    def close(self) -> None:
        """Stop, join the thread, close its descriptor (idempotent)."""
        if self._handle is None:
            return
        self._handle = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._told)
        self._release()  # joins the thread, closes its descriptors, lets go of the buffers
        self._wake_waiter()


def _release_sender(handle: Any, told: int, held: deque[tuple[int, list[Any]]]) -> None:
    lib.quorum_sender_free(handle)  # joined: no buffer is touched after this
    os.close(told)
    held.clear()


class WriteJob:
    """One write queued on a ``Writer``: its job, and what must live until it is done."""

    __slots__ = ("c", "keep", "then")

    def __init__(self, c: Any, keep: tuple[Any, ...]) -> None:
        self.c = c  #: the quorum_wjob (freed by its finish)
        self.keep = keep  #: the descriptors' array, the buffer and its export
        #: called with the codes once done, if it was not when asked
        self.then: Callable[[list[int]], None] | None = None


class Writer:
    """Small writes to local files on a thread of their own (quorum_writer_* in
    native/quorum.h): ``submit`` queues a write of one buffer to a list of
    descriptors and returns; the thread writes the jobs in order, woken once per
    loop turn for all the jobs of that turn.  For a write whose answer waits on
    a slower child anyway (one on another host), so the page cache's copies run
    beside the event loop instead of on it.

    ``when_done`` gives a job's codes to a callback: at once when it is written,
    else later on the loop, when the thread says so through an eventfd the loop
    watches (nothing polls).  The caller keeps the descriptors open until then
    (``Direct.pin``); the job holds the buffer and the descriptors' array.
    ``close`` writes what is queued and joins the thread, then tells every
    waiter.  One thread (the event loop's) calls every method.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        told = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        out = ffi.new("quorum_writer **")
        rc = lib.quorum_writer_new(told, out)
        if rc < 0:
            os.close(told)
            _check(rc)
        self._handle: Any = out[0]
        self._told = told
        self._loop = loop
        self._out = ffi.new("quorum_wjob **")
        self._kick_due = False
        #: jobs someone waits for that were not done when asked
        self._waiting: list[WriteJob] = []
        self.pending = 0  #: jobs submitted and not finished
        self._release = weakref.finalize(self, _release_writer, self._handle, told)
        loop.add_reader(told, self._told_readable)

    @property
    def closed(self) -> bool:
        return self._handle is None

    def busy_for(self) -> float:
        """Seconds the job being written has taken so far (0.0: idle)."""
        return 0.0 if self._handle is None else lib.quorum_writer_busy_ns(self._handle) / 1e9

    def submit(self, inline: Inline, offset: int, data: Buffer) -> WriteJob:
        """Queue a write of ``data`` at ``offset`` to ``inline``'s descriptors
        (negative ones skipped); the thread takes it after this loop turn.

        Raises:
            OSError: EPIPE once closed; nothing is queued.
        """
        if self._handle is None:
            raise BrokenPipeError(errno.EPIPE, "writer closed")
        _check_offset(offset, 0)
        pdata, length = _pointer(data)
        _check(lib.quorum_writer_submit(self._handle, inline.cfds, inline.n, offset, pdata,
                                        length, self._out))
        self.pending += 1
        if not self._kick_due:
            self._kick_due = True
            self._loop.call_soon(self._kick)
        return WriteJob(self._out[0], (inline, pdata, data))

    def _kick(self) -> None:
        self._kick_due = False
        if self._handle is not None:
            lib.quorum_writer_kick(self._handle)

    def when_done(self, job: WriteJob, then: Callable[[list[int]], None]) -> None:
        """``then(codes)`` once ``job`` is written (per descriptor 0, its errno, or
        -1 for a skipped one): now if it is, else later on the loop.  Once per job."""
        if self._handle is None or lib.quorum_wjob_done(job.c, 1):
            then(self._finish(job))
            return
        job.then = then
        self._waiting.append(job)

    def _finish(self, job: WriteJob) -> list[int]:
        inline: Inline = job.keep[0]
        self.pending -= 1
        failed = lib.quorum_wjob_finish(job.c, inline._errs)
        job.keep = ()
        if not failed:
            return inline.ok_codes
        return ffi.unpack(inline._errs, inline.n)

    def _told_readable(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._told)
        self._tell(False)

    def _tell(self, all_done: bool) -> None:
        waiting = self._waiting
        if not waiting:
            return
        done: list[WriteJob] = []
        still: list[WriteJob] = []
        for j in waiting:
            (done if all_done or lib.quorum_wjob_done(j.c, 0) else still).append(j)
        if not done:
            return
        self._waiting = still
        for job in done:
            then, job.then = job.then, None
            codes = self._finish(job)
            if then is not None:
                try:
                    then(codes)
                except Exception:  # one waiter's failure must not stop the others
                    log.exception("telling a write's outcome")

    def close(self) -> None:
        """Write what is queued, join the thread, tell every waiter (idempotent).
        A job submitted and never asked after (``when_done``) is left unfreed."""
        if self._handle is None:
            return
        self._handle = None
        if not self._loop.is_closed():
            self._loop.remove_reader(self._told)
        self._release()  # joined: every job is done
        self._tell(True)


def _release_writer(handle: Any, told: int) -> None:
    lib.quorum_writer_free(handle)
    os.close(told)
