"""The node-name registry and the only place the graph changes.

Every change (open a node, attach or detach a quorum child, delete a node) is
checked here first and applied only if every check passes, so a refused
change leaves nothing half-done.  Error texts follow QEMU 7.2 where QEMU has
one (as QEMU 7.2 words its refusals), so scripts written for QEMU keep
working.  The graph mutations run on the event-loop thread; in-flight I/O
holds its own snapshot of a quorum's children, so a child removed mid-request
finishes (or fails) without failing the client while the quorum holds.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from nbdquorum.block.errors import GraphError, NodeNotFound
from nbdquorum.block.file import FileNode
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import ChildSlot, ChildState, QuorumNode, ReopenPlan
from nbdquorum.block.raw import RawNode
from nbdquorum.eventbus import EventBus

log = logging.getLogger(__name__)


class Graph:
    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus or EventBus()
        self.nodes: dict[str, BlockNode] = {}  # node-name -> node, insertion order
        self.in_use: dict[str, str] = {}  # node-name -> what uses it (an export)
        #: QEMU's /objects container (object-add): id -> properties; their meaning
        #: belongs to whoever uses them (tls-creds-x509 for nbd nodes)
        self.objects: dict[str, dict[str, Any]] = {}
        self._auto = 0
        #: the state a child added live starts in (see child_add)
        self.new_child_state = ChildState.ACTIVE
        #: hooks run after a child joins a quorum (the resync job hooks in)
        self.on_child_added: list[Callable[[QuorumNode, ChildSlot], None]] = []
        self.on_child_removed: list[Callable[[QuorumNode, ChildSlot], None]] = []

    # -- lookup ------------------------------------------------------------------
    def __iter__(self) -> Iterator[BlockNode]:
        return iter(list(self.nodes.values()))

    def __contains__(self, name: object) -> bool:
        return name in self.nodes

    def get(self, name: str) -> BlockNode:
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(f"Node '{name}' not found") from None

    def lookup_device(self, name: str) -> BlockNode:
        """QEMU's bdrv_lookup_bs(): a device id or a node-name."""
        try:
            return self.nodes[name]
        except KeyError:
            raise NodeNotFound(f"Cannot find device='{name}' nor node-name='{name}'") from None

    def quorums(self) -> list[QuorumNode]:
        return [n for n in self.nodes.values() if isinstance(n, QuorumNode)]

    def parents(self, node: BlockNode) -> list[BlockNode]:
        return [p for p in self.nodes.values() if any(c is node for c in p.children_nodes())]

    def auto_name(self) -> str:
        self._auto += 1
        return f"#block{self._auto:03d}"

    # -- creation ----------------------------------------------------------------
    def add(self, node: BlockNode) -> BlockNode:
        if node.node_name in self.nodes:
            raise GraphError(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node
        return node

    def check_new_name(self, name: str) -> None:
        if name in self.nodes:
            raise GraphError(f"Duplicate nodes with node-name='{name}'")
        if not name or name.startswith("#") or len(name) > 31 or not all(
            c.isalnum() or c in "-_." for c in name
        ) or not name[0].isalpha():
            raise GraphError(f"Invalid node-name: '{name}'")

    def _check_not_open(self, filename: str) -> None:
        try:
            st = os.stat(filename)
        except OSError:
            return  # the open reports it
        for n in self.nodes.values():
            if isinstance(n, FileNode) and n.inode == (st.st_dev, st.st_ino):
                owner = next((p.node_name for p in self.parents(n)), n.node_name)
                raise GraphError(f"{filename} is already open as node '{owner}'")

    def open_raw_file(
        self, node_name: str, filename: str, *, file_node_name: str | None = None,
        read_only: bool = False, create_size: int | None = None,
    ) -> RawNode:
        """A raw node over a new file node, as ``blockdev-add driver=raw``.

        A ``#blockNNN`` name (from auto_name) is accepted for implicit nodes.
        """
        if not (node_name.startswith("#") and node_name not in self.nodes):
            self.check_new_name(node_name)
        fname = file_node_name or self.auto_name()
        if file_node_name:
            self.check_new_name(file_node_name)
        self._check_not_open(filename)
        try:
            f = FileNode(fname, filename, read_only=read_only, create_size=create_size)
        except OSError as err:
            raise GraphError(f"Could not open '{filename}': {err.strerror}") from err
        f.owned_by_monitor = file_node_name is not None
        raw = RawNode(node_name, f, read_only=read_only)
        self.add(f)
        self.add(raw)
        return raw

    def open_file(self, node_name: str, filename: str, *, read_only: bool = False) -> FileNode:
        self.check_new_name(node_name)
        self._check_not_open(filename)
        try:
            f = FileNode(node_name, filename, read_only=read_only)
        except OSError as err:
            raise GraphError(f"Could not open '{filename}': {err.strerror}") from err
        return self.add(f)  # type: ignore[return-value]

    # -- quorum membership -----------------------------------------------------------
    def _quorum(self, parent: str, verb: str) -> QuorumNode:
        node = self.lookup_device(parent)
        if not isinstance(node, QuorumNode):
            raise GraphError(f"The node {parent} does not support {verb} a child")
        return node

    def child_add(
        self, parent: str, node_name: str, state: ChildState | None = None, *,
        missed_only: bool = False,
    ) -> ChildSlot:
        """x-blockdev-change {parent, node} / x-blockdev-child-add {parent, child}.

        The new child starts in ``new_child_state``: ``resyncing`` in the
        server (a background job copies the voted contents before it votes),
        ``active`` for QEMU's semantics (its data must already be consistent).
        """
        state = state or self.new_child_state
        q = self._quorum(parent, "adding")
        node = self.get(node_name)
        if node is q:
            raise GraphError(f"The node {node_name} cannot be a child of itself")
        if self.parents(node):
            raise GraphError(f"The node {node_name} already has a parent")
        slot = q.members.attach(node, state, missed_only=missed_only)
        log.warning("quorum %s: added %s as %s (%s)", q.node_name, node_name, slot.name, state)
        for fn in list(self.on_child_added):
            fn(q, slot)
        return slot

    def child_del(self, parent: str, child: str, *, by_node_name: bool = False) -> ChildSlot:
        """x-blockdev-change {parent, child: "children.N"}; or by node-name (x-blockdev-child-del)."""
        q = self._quorum(parent, "removing")
        slot = None
        if by_node_name:
            slot = next((s for s in q.slots if s.node.node_name == child), None)
            if slot is None and child in self.nodes:
                raise GraphError(f"Node '{child}' is not a child of '{q.node_name}'")
            if slot is None:
                raise NodeNotFound(f"Node '{child}' not found")
        else:
            slot = q.slot(child)
            if slot is None:
                raise GraphError(f"Node '{q.node_name}' does not have child '{child}'")
        q.members.detach(slot)
        log.warning("quorum %s: removed %s (%s)", q.node_name, slot.node.node_name, slot.name)
        for fn in list(self.on_child_removed):
            fn(q, slot)
        return slot

    # -- deletion ---------------------------------------------------------------------
    def delete(self, node_name: str) -> None:
        """blockdev-del: refused while the node is in use or has a parent."""
        node = self.nodes.get(node_name)
        if node is None:
            raise NodeNotFound(f"Failed to find node with node-name='{node_name}'")
        if not node.owned_by_monitor:
            raise GraphError(f"Node {node_name} is not owned by the monitor")
        if node_name in self.in_use:
            raise GraphError(f"Node {node_name} is in use")
        if self.parents(node):
            raise GraphError(f"Block device {node_name} is in use")
        del self.nodes[node_name]
        node.close()
        self._drop_implicit(node)

    def _drop_implicit(self, node: BlockNode) -> None:
        """Children that only this node held go with it (QEMU drops implicit nodes)."""
        for child in node.children_nodes():
            if not child.owned_by_monitor and not self.parents(child):
                self.nodes.pop(child.node_name, None)
                child.close()
                self._drop_implicit(child)

    def close(self) -> None:
        for node in reversed(list(self.nodes.values())):
            try:
                node.close()
            except OSError:
                log.exception("closing %s", node.node_name)
        self.nodes.clear()

    # -- reopen ---------------------------------------------------------------------------
    def reopen(self, q: QuorumNode, plan: ReopenPlan) -> None:
        """blockdev-reopen of a quorum: the whole plan, or nothing (prepare, then commit).

        The caller has checked the graph-level facts (the nodes to add exist,
        have no parent and are not in use); Members checks the rest.
        """
        q.members.prepare(plan)
        try:
            removed = list(plan.remove)
            added = q.members.commit(plan)
        except BaseException:
            q.members.abort(plan)
            raise
        for slot in added:
            for fn in list(self.on_child_added):
                fn(q, slot)
        for slot in removed:
            for fn in list(self.on_child_removed):
                fn(q, slot)
