"""Persistent state (``--state-dir``): membership, options, resync progress, write intent.

Two files live in the state directory:

``state.json``
    The live membership (node-names, files, child edge names, states), the
    quorum's options, each resyncing child's unsynced-region bitmap, and a
    ``clean`` flag that is false while the server runs.  Rewritten atomically
    (write a temp file, fsync it, rename it over, fsync the directory) after
    every membership or state change and, at most once a second, as a resync
    progresses.

``write-intent.bitmap``
    md's write-intent bitmap: one bit per region.  A region's bit is made
    durable *before* a write to it is sent to the children, and cleared
    lazily once every child has flushed and no write to it is in flight.
    Setting bits is group-committed: concurrent writers share one
    pwrite + fdatasync of the bitmap.  After an unclean stop only the dirty
    regions can differ between children; start-up resolves them by a
    fine-grained vote (block/quorum/recovery.py) before the first request is served.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from nbdquorum.block import aio
from nbdquorum.block.bitmap import DEFAULT_REGION, RegionBitmap
from nbdquorum.block.quorum import ChildState, QuorumNode, WriteIntent

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE = "state.json"
INTENT_FILE = "write-intent.bitmap"


class StateError(Exception):
    """The state directory is unusable or disagrees with the command line."""


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StateStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / STATE_FILE
        self.intent_path = self.dir / INTENT_FILE
        self._last_progress_save = 0.0

    def load(self) -> dict[str, Any] | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            state = json.loads(raw)
        except ValueError as err:
            raise StateError(f"{self.path}: not valid JSON ({err})") from err
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StateError(f"{self.path}: unknown state format")
        return state

    def snapshot(self, q: QuorumNode, *, clean: bool) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "clean": clean,
            "saved": time.time(),
            "region": DEFAULT_REGION,
            "quorum": {
                "node-name": q.node_name,
                "vote-threshold": q.vote_threshold,
                "read-pattern": str(q.read_pattern),
                "rewrite-corrupted": q.rewrite_corrupted,
                "next-child-index": q.next_child_index,
                "size": q.size(),
                "events": q.members.events,
            },
            "children": [
                {
                    "child": s.name,
                    "node-name": s.node.node_name,
                    "filename": _recorded_name(s.node.filename()),
                    "driver": _driver(s.node),
                    "state": str(s.state),
                    "sync": s.sync.to_hex() if s.sync is not None else None,
                    "catch-up": s.catch_up,
                    "generation": s.generation,
                    **({"fault-reason": s.fault_reason} if s.fault_reason else {}),
                }
                for s in q.slots
            ],
            # images that left out of sync: what they miss keeps being recorded
            "departed": [{"filename": name, "sync": bm.to_hex()}
                         for name, bm in q.members.departed.items()],
        }

    def save(self, q: QuorumNode, *, clean: bool = False) -> None:
        data = json.dumps(self.snapshot(q, clean=clean), indent=1).encode() + b"\n"
        atomic_write(self.path, data)

    def save_progress(self, q: QuorumNode) -> None:
        """Resync progress: persisted at most once a second."""
        now = time.monotonic()
        if now - self._last_progress_save >= 1.0:
            self._last_progress_save = now
            self.save(q)


def restore(q: QuorumNode, state: dict[str, Any]) -> None:
    """Give a freshly built quorum the recorded edge names, states and sync maps."""
    region = int(state.get("region", DEFAULT_REGION))
    by_name = {c["node-name"]: c for c in state["children"]}
    records = []
    generations: list[int | None] = []
    for slot in q.slots:
        rec = by_name[slot.node.node_name]
        st = ChildState(rec["state"])
        sync = None
        if st in (ChildState.RESYNCING, ChildState.UNREACHABLE):
            sync = (RegionBitmap.from_hex(q.size(), region, rec["sync"]) if rec.get("sync")
                    else RegionBitmap(q.size(), region, fill=True))
        records.append((slot, str(rec["child"]), st, sync))
        gen = rec.get("generation")
        generations.append(int(gen) if gen is not None else None)
        slot.catch_up = bool(rec.get("catch-up", False))
        reason = rec.get("fault-reason")  # why it is faulted: told again after a restart
        slot.fault_reason = str(reason) if reason and st is ChildState.FAULTED else None
    events = state["quorum"].get("events")
    q.members.restore(records, int(state["quorum"].get("next-child-index", len(q.slots))),
                      events=int(events) if events is not None else None,
                      generations=generations)
    for d in state.get("departed", []):
        q.members.departed[str(d["filename"])] = RegionBitmap.from_hex(q.size(), region,
                                                                      d["sync"])


def _recorded_name(name: str) -> str:
    """Files by absolute path (the server may start elsewhere); URIs as they are."""
    return name if "://" in name else os.path.abspath(name)


def _driver(node: object) -> str:
    """The protocol under a child: "nbd" for one on another host, else "file"."""
    while True:
        if getattr(node, "driver", None) == "nbd":
            return "nbd"
        inner = getattr(node, "child", None)
        if inner is None:
            return "file"
        node = inner


class WriteIntentLog(WriteIntent):
    """The persistent write-intent bitmap (see the module docstring)."""

    def __init__(self, path: Path, size: int, region: int = DEFAULT_REGION) -> None:
        self.path = path
        self.bitmap = RegionBitmap(size, region)
        nbytes = len(self.bitmap.to_bytes())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        old = os.pread(fd, nbytes + 1, 0)
        self.fd = fd
        #: regions dirty when we started (from an earlier run)
        self.recovered = (
            RegionBitmap.from_bytes(size, region, old) if len(old) == nbytes
            else RegionBitmap(size, region, fill=bool(old))  # unknown layout: all dirty
        )
        if len(old) != nbytes:
            os.ftruncate(fd, 0)
        self.inflight: Counter[int] = Counter()  # bit -> writes in flight
        self.touched: dict[int, int] = {}  # bit -> sequence of its last mark
        self._set_seq: dict[int, int] = {}  # bit -> sequence when it was set
        self._seq = 0  # increments on every change to the in-memory bitmap
        self._durable = 0  # highest sequence known to be on disk
        self._writer: asyncio.Task[None] | None = None
        self.syncs = 0  # bitmap writes done (a measure of the cost)

    async def mark(self, offset: int, length: int) -> None:
        bits = self.bitmap.bits_for(offset, length)
        need = 0
        for b in bits:
            self.inflight[b] += 1
            self._seq += 1
            self.touched[b] = self._seq
            if self.bitmap.set_bit(b):
                self._set_seq[b] = self._seq
            need = max(need, self._set_seq.get(b, 0))
        try:
            while self._durable < need:
                await self._write()
        except BaseException:
            self.done(offset, length)
            raise

    def mark_now(self, offset: int, length: int) -> bool:
        bits = self.bitmap.bits_for(offset, length)
        for b in bits:
            if not self.bitmap.test(b) or self._set_seq.get(b, 0) > self._durable:
                return False
        for b in bits:
            self.inflight[b] += 1
            self._seq += 1
            self.touched[b] = self._seq
        return True

    def done(self, offset: int, length: int) -> None:
        for b in self.bitmap.bits_for(offset, length):
            self.inflight[b] -= 1
            if self.inflight[b] <= 0:
                del self.inflight[b]

    async def _write(self) -> None:
        """Write the bitmap (or wait for the write in progress)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write_now())
        await asyncio.shield(self._writer)

    async def _write_now(self) -> None:
        seq = self._seq
        data = self.bitmap.to_bytes()
        await aio.run(self._write_sync, data)
        self._durable = max(self._durable, seq)
        self.syncs += 1

    def _write_sync(self, data: bytes) -> None:
        os.pwrite(self.fd, data, 0)
        os.fdatasync(self.fd)

    async def clean(self, q: QuorumNode, *, final: bool = False) -> int:
        """Flush the children, then clear the regions no write touched meanwhile.

        While a child is unreachable (or an image departed out of sync) nothing
        is cleared: the regions it misses are recorded in memory, and after a
        crash this bitmap is what still names them (md keeps its bitmap bits
        while a member is missing).  ``final``: a clean stop, right before the
        state (with those records) is saved.
        """
        if not final and (q.members.absent() or q.members.departed):
            return 0
        candidates = {b: self.touched.get(b, 0) for b in self.bitmap if b not in self.inflight}
        if not candidates:
            return 0
        try:
            await q.flush()
        except OSError as err:
            log.warning("write-intent: flush failed, keeping regions dirty: %s", err)
            return 0
        cleared = 0
        for b, seq in candidates.items():
            if b not in self.inflight and self.touched.get(b, 0) == seq:
                self.bitmap.clear_bit(b)
                self._set_seq.pop(b, None)
                self.touched.pop(b, None)
                cleared += 1
        if cleared:
            self._seq += 1
            await self._write()
        return cleared

    async def run_cleaner(self, q: QuorumNode, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.clean(q)
            except OSError as err:  # the bitmap file's disk: regions stay dirty, try again
                log.warning("write-intent: saving the bitmap failed, regions stay dirty: %s",
                            err)

    def close(self) -> None:
        os.close(self.fd)
