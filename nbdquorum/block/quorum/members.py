"""Members: the only writer of a quorum's children, their states, sync bitmaps and threshold.

Every change of membership or child state goes through one named operation
here (``attach``, ``detach``, ``start_resync``, ``resynced``, ``fault``,
``restore``, ``reopen``), which checks what must hold, applies the change,
reports it (``ChildStateChanged``) and runs the change hooks (persistence,
the workers' view) once.  The CLI, QMP, persistence and the jobs ask for
these operations; none of them assigns a slot's state itself.

``reopen`` follows QEMU's reopen: ``prepare`` checks a whole plan against the
current membership and changes nothing; ``commit`` applies it without
yielding (so no request sees half of it); ``abort`` drops a prepared plan.

Child states (ChildState): only ``active`` children vote and are read;
``resyncing`` children get every write and are caught up by a background job
from their ``sync`` bitmap; ``faulted`` children get no I/O at all until the
operator acts.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.errors import GraphError
from nbdquorum.block.node import BlockNode, Unreachable
from nbdquorum.block.quorum.events import ChildStateChanged, QuorumEvent

log = logging.getLogger(__name__)

#: departed images whose missed regions are kept (the oldest go first)
DEPARTED_MAX = 8
#: a child's error count toward max-errors halves after this many seconds without
#: an error (md halves a member's read-error count for every hour)
ERROR_DECAY = 3600.0


class ReadPattern(enum.StrEnum):
    QUORUM = "quorum"  #: read every active child and vote
    FIFO = "fifo"  #: read the first active child; on error the next one


class ChildState(enum.StrEnum):
    ACTIVE = "active"  #: in sync; votes and is read
    RESYNCING = "resyncing"  #: gets writes, never read or counted until resynced
    FAULTED = "faulted"  #: failed too often; gets no I/O at all until the operator acts
    #: its link is down (a child on another host): no I/O; the regions written
    #: meanwhile are recorded, and it catches up (resyncing) when it returns
    UNREACHABLE = "unreachable"


@dataclass
class ChildStats:
    """Per-child counters, in the spirit of zpool status READ/WRITE/CKSUM."""

    reads: int = 0  # read requests sent to the child
    writes: int = 0  # write/zero/trim requests sent to the child
    read_errors: int = 0  # reads that returned an error
    write_errors: int = 0  # writes/zero/trim that returned an error
    flush_errors: int = 0
    checksum_errors: int = 0  # reads whose bytes lost the vote
    repaired_bytes: int = 0  # bytes rewritten with the winning version


@dataclass(eq=False)
class ChildSlot:
    """One edge quorum -> child, named as QEMU names it (``children.N``).

    Read it anywhere; only Members changes ``state``, ``sync`` and ``error_count``.
    """

    name: str  # edge name, "children.N"
    node: BlockNode  # the child node
    state: ChildState = ChildState.ACTIVE
    stats: ChildStats = field(default_factory=ChildStats)
    #: regions not yet in sync (a resyncing child); None when in sync
    sync: RegionBitmap | None = None
    #: errors counted toward max-errors since the child joined or was cleared,
    #: halved for every hour without one (md's read-error decay): a link that
    #: drops now and then over months never adds up to a fault
    error_count: int = 0
    #: when error_count last changed (time.monotonic())
    error_at: float = 0.0
    #: why the child is faulted (None while it is not)
    fault_reason: str | None = None
    #: resync attempts that failed in a row, and the last one's error (the job's)
    resync_failures: int = 0
    resync_error: str | None = None
    #: the resync is a catch-up of a returning image (only what it missed): the
    #: job checks first that it is the same image (else it copies everything)
    catch_up: bool = False
    #: md's event count for this child: the quorum's event count when it last held
    #: every acknowledged write (kept current while active, frozen when it leaves)
    generation: int = 0


@dataclass
class ReopenPlan:
    """A whole change of a quorum's options and children (blockdev-reopen)."""

    vote_threshold: int
    read_pattern: ReadPattern
    rewrite_corrupted: bool
    add: list[BlockNode] = field(default_factory=list)  # nodes to attach, in order
    remove: list[ChildSlot] = field(default_factory=list)  # slots to detach
    #: the state new children start in
    new_state: ChildState = ChildState.ACTIVE
    #: set by Members.prepare: the plan was checked against this membership
    prepared: bool = False


def check_options(
    nchildren: int, vote_threshold: int, read_pattern: str, rewrite_corrupted: bool
) -> None:
    """QEMU's open-time checks, with QEMU's texts."""
    if vote_threshold < 1:
        raise GraphError("Parameter 'vote-threshold' expects a value >= 1")
    if vote_threshold > nchildren:
        raise GraphError("threshold may not exceed children count")
    if read_pattern not in ("quorum", "fifo"):
        raise GraphError(f"Parameter 'read-pattern' does not accept value '{read_pattern}'")


def _in_sync(n: int) -> str:
    return f"{n} child{'' if n == 1 else 'ren'} would be left in sync (active)"


class Members:
    """The children of one quorum and the options that say how they vote."""

    def __init__(
        self, quorum: str, children: Sequence[BlockNode], *, size: int, vote_threshold: int,
        read_pattern: ReadPattern, rewrite_corrupted: bool, read_only: Callable[[], bool],
        max_errors: int, report: Callable[[QuorumEvent], None],
    ) -> None:
        self.quorum = quorum  # the quorum's node-name, for events and messages
        self.size = size
        self._read_only = read_only  # the quorum node's fact, asked when it matters
        self.slots: list[ChildSlot] = [
            ChildSlot(f"children.{i}", c) for i, c in enumerate(children)
        ]
        self.next_child_index = len(self.slots)
        self.vote_threshold = vote_threshold
        self.read_pattern = ReadPattern(read_pattern)
        self.rewrite_corrupted = rewrite_corrupted
        #: errors after which a child is faulted (md's max_read_errors); 0: never
        self.max_errors = max_errors
        self._report = report
        #: called after each membership/state/option change (persistence, views)
        self.on_change: list[Callable[[], None]] = []
        #: called with a slot that now needs a resync job (the resync manager hooks in)
        self.on_resync_needed: list[Callable[[ChildSlot], None]] = []
        #: images that left while not in sync, by file name (a URI for a child on
        #: another host): the regions written since they left keep being recorded,
        #: so the same image can come back with a catch-up (md's write-intent
        #: bitmap for an absent member); the oldest go first beyond DEPARTED_MAX
        self.departed: dict[str, RegionBitmap] = {}
        #: md's event count: one more at every membership or child-state change
        #: (persisted; a child whose generation is behind it is stale)
        self.events = 0

    # -- reading ------------------------------------------------------------------------
    def active(self) -> list[ChildSlot]:
        return [s for s in self.slots if s.state is ChildState.ACTIVE]

    def writable(self) -> list[ChildSlot]:
        return [s for s in self.slots
                if s.state is not ChildState.FAULTED and s.state is not ChildState.UNREACHABLE]

    def absent(self) -> list[ChildSlot]:
        """Children that miss writes while away: their missed regions are recorded."""
        return [s for s in self.slots if s.state is ChildState.UNREACHABLE]

    def slot(self, edge_name: str) -> ChildSlot | None:
        return next((s for s in self.slots if s.name == edge_name), None)

    def slot_of(self, node: BlockNode) -> ChildSlot | None:
        return next((s for s in self.slots if s.node is node), None)

    def named(self, node_name: str) -> ChildSlot | None:
        return next((s for s in self.slots if s.node.node_name == node_name), None)

    def __contains__(self, slot: object) -> bool:
        return slot in self.slots

    # -- membership -----------------------------------------------------------------------
    def attach(self, node: BlockNode, state: ChildState = ChildState.ACTIVE, *,
               missed_only: bool = False) -> ChildSlot:
        """A new child; a resyncing one starts with everything to copy, unless
        ``missed_only`` and this image left earlier: then only what it missed."""
        self._check_size(node)
        slot = self._attach(node, state)
        departed = self.departed.pop(node.filename(), None)
        if missed_only and departed is not None and state is ChildState.RESYNCING:
            slot.sync = departed
            slot.catch_up = True
            log.warning("child %s: the image %s left %d region(s) ago: catching up on them",
                        node.node_name, node.filename(), departed.count())
        self._changed()
        if state is ChildState.RESYNCING:
            self._need_resync(slot)
        return slot

    def _check_size(self, node: BlockNode) -> None:
        if node.size() != self.size:
            raise GraphError(
                f"Cannot add node '{node.node_name}' of size {node.size()} to quorum "
                f"'{self.quorum}' of size {self.size}"
            )

    def _attach(self, node: BlockNode, state: ChildState) -> ChildSlot:
        slot = ChildSlot(f"children.{self.next_child_index}", node, state)
        if state is ChildState.RESYNCING:
            slot.sync = RegionBitmap(self.size, fill=True)  # nothing copied yet
        self.next_child_index += 1
        self.slots.append(slot)
        self._emit(slot, "none")
        return slot

    def detach(self, slot: ChildSlot) -> None:
        self._check_detach(slot, self.vote_threshold)
        self._detach(slot)
        self._changed()

    def _remember(self, slot: ChildSlot) -> None:
        """A child that leaves out of sync: keep recording what its image misses."""
        if slot.state is ChildState.ACTIVE or slot.sync is None:
            return
        self.departed.pop(slot.node.filename(), None)
        self.departed[slot.node.filename()] = slot.sync
        while len(self.departed) > DEPARTED_MAX:
            self.departed.pop(next(iter(self.departed)))

    def written(self, offset: int, length: int) -> None:
        """A write reached the quorum: absent children and departed images missed it."""
        for slot in self.slots:
            if slot.state is ChildState.UNREACHABLE:
                self.missed(slot, offset, length)
        for bitmap in self.departed.values():
            bitmap.set_range(offset, length)

    def _check_detach(self, slot: ChildSlot, threshold: int) -> None:
        if len(self.slots) <= threshold:
            raise GraphError(
                f"The number of children cannot be lower than the vote threshold {threshold}"
            )
        # Beyond QEMU: resyncing children take writes but do not count towards
        # the threshold, so removing an active child could leave a quorum
        # where every write fails.
        self.check_can_leave_vote(slot)

    def _detach(self, slot: ChildSlot) -> None:
        self._remember(slot)
        self.slots.remove(slot)
        # QEMU 5.2+ "stable children names": only the top index is reused
        if slot.name == f"children.{self.next_child_index - 1}":
            self.next_child_index -= 1

    def check_can_leave_vote(self, slot: ChildSlot, verb: str = "remove") -> None:
        """Refuse to take an active child out of the vote below the threshold."""
        left = len(self.active()) - (slot.state is ChildState.ACTIVE)
        if slot.state is ChildState.ACTIVE and left < self.vote_threshold:
            raise GraphError(
                f"Cannot {verb} {slot.node.node_name}: {_in_sync(left)}, fewer than the vote "
                f"threshold {self.vote_threshold}"
            )

    # -- states ----------------------------------------------------------------------------
    def start_resync(self, slot: ChildSlot, regions: Iterable[tuple[int, int]] | None = None,
                     *, revive: bool = False) -> None:
        """The one way a child starts (or widens) a resync.

        ``regions`` (byte ranges) are added to what the child still lacks;
        None means all of it (a full resync).  A faulted child stays faulted
        (a missed write changes nothing for it) unless ``revive``: the
        operator asked for its resync (md's re-add).
        """
        if slot not in self.slots or (slot.state is ChildState.FAULTED and not revive):
            return
        if slot.state is ChildState.UNREACHABLE and not revive:
            for off, n in regions if regions is not None else [(0, self.size)]:
                self.missed(slot, off, n)  # it catches up on them when it returns
            return
        if regions is None:
            slot.sync = RegionBitmap(self.size, fill=True)
            slot.catch_up = False  # everything is copied: nothing to check first
        else:
            if slot.sync is None:
                slot.sync = RegionBitmap(self.size)
            for off, n in regions:
                slot.sync.set_range(off, n)
        if slot.state is not ChildState.RESYNCING:
            self._set_state(slot, ChildState.RESYNCING)
        self._need_resync(slot)

    def region_synced(self, slot: ChildSlot, bit: int) -> None:
        """A resync job copied one region of ``slot.sync`` (bit index)."""
        if slot.sync is not None:
            slot.sync.clear_bit(bit)

    def regions_synced(self, slot: ChildSlot, first: int, n: int) -> None:
        """A resync job brought ``n`` regions of ``slot.sync`` from bit ``first`` on in sync."""
        if slot.sync is not None:
            slot.sync.clear_bits(first, n)

    def resync_outcome(self, slot: ChildSlot, error: str | None) -> None:
        """A resync attempt ended: ``error`` None clears the failure count."""
        if error is None:
            slot.resync_failures = 0
            slot.resync_error = None
        else:
            slot.resync_failures += 1
            slot.resync_error = error

    def resynced(self, slot: ChildSlot) -> None:
        """A resync job copied everything: the child votes again."""
        if slot in self.slots and slot.state is ChildState.RESYNCING:
            slot.catch_up = False
            self._set_state(slot, ChildState.ACTIVE)

    def fault(self, slot: ChildSlot, why: str) -> None:
        """Take a failing child out of all I/O until the operator acts."""
        if slot in self.slots and slot.state is not ChildState.FAULTED:
            log.error("child %s: %s: faulted", slot.node.node_name, why)
            slot.fault_reason = why
            self._set_state(slot, ChildState.FAULTED)

    @staticmethod
    def recent_errors(slot: ChildSlot, now: float | None = None) -> int:
        """The child's error count toward max-errors, after md's decay: halved for
        every whole hour since it last changed."""
        if slot.error_count:
            now = time.monotonic() if now is None else now
            hours = int((now - slot.error_at) // ERROR_DECAY)
            if hours > 0:
                slot.error_count >>= min(hours, 62)
                slot.error_at += hours * ERROR_DECAY
        return slot.error_count

    def count_error(self, slot: ChildSlot, *, counts: bool = True) -> None:
        """One more I/O error of this child: faulted at max-errors, or at once
        when the node itself reports a problem with its image (deleted,
        truncated); unreachable when the problem is its link (the child may
        come back).  ``counts`` False: the error says nothing of the child
        (its link was already known to be down), only its health is looked at.
        """
        if slot.state is ChildState.UNREACHABLE:
            # a request that was under way when the link went down: that loss was
            # counted once already (every request in flight fails with it)
            counts = False
        if counts:
            now = time.monotonic()
            slot.error_count = self.recent_errors(slot, now) + 1
            slot.error_at = now
        if slot.state is ChildState.FAULTED:
            return
        problem = slot.node.health()
        if isinstance(problem, Unreachable):
            self.unreachable(slot, problem)
        elif problem:
            self.fault(slot, problem)
        if self.max_errors and slot.error_count >= self.max_errors:
            self.fault(slot, f"reached {slot.error_count} errors")

    def unreachable(self, slot: ChildSlot, why: str) -> None:
        """The child's link is down: out of reads and writes, its missed regions
        recorded from now on (and whatever it had not caught up yet kept)."""
        if slot not in self.slots or slot.state in (ChildState.FAULTED,
                                                     ChildState.UNREACHABLE):
            return
        log.error("child %s: %s: unreachable", slot.node.node_name, why)
        if slot.sync is None:
            slot.sync = RegionBitmap(self.size)
        self._set_state(slot, ChildState.UNREACHABLE)

    def missed(self, slot: ChildSlot, offset: int, length: int) -> None:
        """An absent child missed this write: record it for its catch-up."""
        if slot.sync is None:
            slot.sync = RegionBitmap(self.size)
        slot.sync.set_range(offset, length)

    def returned(self, slot: ChildSlot) -> None:
        """An unreachable child's link is back: it catches up (resyncing) on
        what it missed, then votes again."""
        if slot in self.slots and slot.state is ChildState.UNREACHABLE:
            if slot.sync is None:
                slot.sync = RegionBitmap(self.size)
            slot.catch_up = True
            self._set_state(slot, ChildState.RESYNCING)
            self._need_resync(slot)

    def restore(self, records: Sequence[tuple[ChildSlot, str, ChildState, RegionBitmap | None]],
                next_child_index: int, *, events: int | None = None,
                generations: Sequence[int | None] = ()) -> None:
        """Put back what was recorded before a restart (persistence), before serving.

        Each record is (slot, edge name, state, sync bitmap or None), with the
        recorded event count and each child's generation when the record has
        them.  Nothing is reported: these are the states the children already
        had.  A child recorded active whose generation is behind the newest is
        stale (a record that cannot have been written whole): it is copied in
        full before it votes again, never used as a source.
        """
        gens = list(generations) + [None] * (len(records) - len(generations))
        newest = max((g for g in gens if g is not None), default=None)
        for (slot, edge, state, sync), gen in zip(records, gens, strict=True):
            slot.name = edge
            slot.state = state
            slot.generation = gen if gen is not None else (newest or 0)
            if state is ChildState.ACTIVE and newest is not None and slot.generation < newest:
                log.error("child %s: generation %d is behind the quorum's %d: stale, "
                          "copying it in full", slot.node.node_name, slot.generation, newest)
                slot.state = state = ChildState.RESYNCING
                sync = RegionBitmap(self.size, fill=True)
            if state in (ChildState.RESYNCING, ChildState.UNREACHABLE):
                slot.sync = sync if sync is not None else RegionBitmap(self.size, fill=True)
            else:
                slot.sync = None
        self.next_child_index = next_child_index
        self.events = max(events or 0, newest or 0)

    def _set_state(self, slot: ChildSlot, state: ChildState) -> None:
        if slot.state is state:
            return
        log.warning("child %s (%s): %s -> %s", slot.node.node_name, slot.name, slot.state, state)
        previous = slot.state
        slot.state = state
        if state is ChildState.ACTIVE:
            slot.sync = None
        if previous is ChildState.FAULTED:
            slot.error_count = 0  # a second chance, as md's re-add
            slot.fault_reason = None
        self._emit(slot, str(previous))
        self._changed()

    # -- reopen: prepare / commit / abort ----------------------------------------------------
    def prepare(self, plan: ReopenPlan) -> ReopenPlan:
        """Check a whole reopen against the current membership; change nothing.

        Raises:
            GraphError: with QEMU's text where it has one.
        """
        for node in plan.add:
            self._check_size(node)
        keep = [s for s in self.slots if s not in plan.remove]
        check_options(len(keep) + len(plan.add), plan.vote_threshold, plan.read_pattern,
                      plan.rewrite_corrupted)
        if plan.rewrite_corrupted and self._read_only():
            raise GraphError(
                f"rewrite-corrupted=on cannot be used on the read-only node '{self.quorum}'")
        kept_active = sum(1 for s in keep if s.state is ChildState.ACTIVE)
        voting = kept_active + (len(plan.add) if plan.new_state is ChildState.ACTIVE else 0)
        if voting < plan.vote_threshold:
            raise GraphError(f"Cannot reopen {self.quorum}: {_in_sync(voting)}, fewer than the "
                             f"vote threshold {plan.vote_threshold}")
        plan.prepared = True
        return plan

    def commit(self, plan: ReopenPlan) -> list[ChildSlot]:
        """Apply a prepared plan without yielding; returns the new slots."""
        assert plan.prepared, "commit of a plan that was not prepared"
        added = [self._attach(node, plan.new_state) for node in plan.add]
        for slot in plan.remove:
            self._detach(slot)
        self.vote_threshold = plan.vote_threshold
        self.read_pattern = plan.read_pattern
        self.rewrite_corrupted = plan.rewrite_corrupted
        plan.prepared = False
        self._changed()
        log.warning("quorum %s: vote-threshold %d, read-pattern %s, rewrite-corrupted %s, "
                    "children %s", self.quorum, self.vote_threshold, self.read_pattern,
                    self.rewrite_corrupted, [s.node.node_name for s in self.slots])
        for slot in added:
            if slot.state is ChildState.RESYNCING:
                self._need_resync(slot)
        return added

    def abort(self, plan: ReopenPlan) -> None:
        """Drop a prepared plan (prepare changed nothing, so nothing is undone)."""
        plan.prepared = False

    # -- reporting ----------------------------------------------------------------------------
    def _emit(self, slot: ChildSlot, previous: str) -> None:
        self._report(ChildStateChanged(self.quorum, slot.node.node_name, slot.name,
                                       str(slot.state), previous))

    def _need_resync(self, slot: ChildSlot) -> None:
        for fn in list(self.on_resync_needed):
            fn(slot)

    def _changed(self) -> None:
        self.events += 1
        for s in self.slots:
            if s.state is ChildState.ACTIVE:
                s.generation = self.events
        for fn in list(self.on_change):
            fn()

    def stale(self) -> list[ChildSlot]:
        """Children behind the newest generation: never a source until caught up."""
        newest = max((s.generation for s in self.slots), default=0)
        return [s for s in self.slots if s.generation < newest]
