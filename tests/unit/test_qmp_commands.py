"""The QMP command handlers on a real graph of temp files: results, QEMU's refusals, atomicity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import ChildState, QuorumNode
from nbdquorum.eventbus import EventBus
from nbdquorum.qmp import commands
from nbdquorum.qmp.commands import Context, dispatch, execute
from nbdquorum.qmp.errors import QMPError
from nbdquorum.qmp.protocol import Execute, ServerConnection, greeting
from tests.unit.aiohelp import run

SIZE = 1 << 20




class Env:
    """A 3-child quorum ``quorum0`` (threshold 2, exported) and a QMP context."""

    def __init__(self, tmp: Path, children: int = 3, threshold: int = 2) -> None:
        self.tmp = tmp
        self.graph = Graph(EventBus())
        kids: list[BlockNode] = [
            self.graph.open_raw_file(f"child{i}", str(tmp / f"c{i}.raw"), create_size=SIZE)
            for i in range(children)
        ]
        q = QuorumNode("quorum0", kids, vote_threshold=threshold, bus=self.graph.bus)
        self.graph.add(q)
        self.graph.in_use["quorum0"] = "export 'disk'"
        self.quorum = q
        conn = ServerConnection(greeting(0, 1, 0, "t"))
        conn.negotiate()
        self.quits = 0
        self.ctx = Context(self.graph, conn, self._quit)

    def _quit(self) -> None:
        self.quits += 1

    def image(self, name: str, size: int = SIZE) -> str:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    def ok(self, name: str, **arguments: Any) -> Any:
        return run(execute(self.ctx, Execute(name, _wire(arguments))))

    def err(self, name: str, **arguments: Any) -> str:
        before = self.snapshot()
        with pytest.raises(QMPError) as info:
            run(execute(self.ctx, Execute(name, _wire(arguments))))
        assert self.snapshot() == before, f"{name} changed the graph although it failed"
        assert info.value.error_class == "GenericError"
        return info.value.desc

    def snapshot(self) -> Any:
        q = self.quorum
        return (list(self.graph.nodes), [(s.name, s.node.node_name) for s in q.slots],
                q.vote_threshold, str(q.read_pattern), q.rewrite_corrupted, q.next_child_index)

    def edges(self) -> list[tuple[str, str]]:
        return [(s.name, s.node.node_name) for s in self.quorum.slots]

    def add_raw(self, name: str, size: int = SIZE) -> None:
        self.ok("blockdev-add", driver="raw", node_name=name,
                file={"driver": "file", "filename": self.image(f"{name}.raw", size)})


def _wire(arguments: dict[str, Any]) -> dict[str, Any]:
    """Python-style keyword arguments to wire names, recursively for dicts."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {k.replace("_", "-"): conv(x) for k, x in v.items()}
        if isinstance(v, list):
            return [conv(x) for x in v]
        return v
    return conv(arguments)  # type: ignore[no-any-return]


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.graph.close()


# --------------------------------------------------------------------------- the seed's example


def test_seed_example_child_add_then_child_del(env: Env) -> None:
    before = set(env.graph.nodes)
    env.add_raw("new_node")
    assert env.ok("x-blockdev-child-add", parent="quorum0", child="new_node") == {}
    assert env.edges()[-1] == ("children.3", "new_node")
    assert env.ok("x-blockdev-child-del", parent="quorum0", child="new_node") == {}
    assert "new_node" not in [n for _, n in env.edges()]
    assert "new_node" in env.graph  # lives on until blockdev-del
    assert env.ok("blockdev-del", node_name="new_node") == {}
    assert "new_node" not in env.graph
    assert set(env.graph.nodes) == before  # its inline file node went with it


def test_same_with_x_blockdev_change(env: Env) -> None:
    env.add_raw("new_node")
    assert env.ok("x-blockdev-change", parent="quorum0", node="new_node") == {}
    assert env.edges()[-1] == ("children.3", "new_node")
    assert env.ok("x-blockdev-change", parent="quorum0", child="children.3") == {}
    assert len(env.edges()) == 3


def test_child_del_by_edge_name(env: Env) -> None:
    assert env.ok("x-blockdev-child-del", parent="quorum0", child="children.1") == {}
    assert env.edges() == [("children.0", "child0"), ("children.2", "child2")]


def test_edge_names_leave_gaps_and_reuse_only_the_top_index(env: Env) -> None:
    env.ok("x-blockdev-change", parent="quorum0", child="children.1")
    env.add_raw("n3")
    env.ok("x-blockdev-change", parent="quorum0", node="n3")
    assert [e for e, _ in env.edges()] == ["children.0", "children.2", "children.3"]
    env.ok("x-blockdev-change", parent="quorum0", child="children.3")
    env.ok("x-blockdev-change", parent="quorum0", node="n3")
    assert env.edges()[-1] == ("children.3", "n3")


# --------------------------------------------------------------------------- refusals


def test_x_blockdev_change_refusals_have_qemus_texts(env: Env) -> None:
    env.add_raw("n3")
    assert env.err("x-blockdev-change", parent="quorum0") == (
        "Either child or node must be specified")
    assert env.err("x-blockdev-change", parent="quorum0", child="children.0", node="n3") == (
        "The parameters child and node are in conflict")
    assert env.err("x-blockdev-change", parent="nosuch", node="n3") == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    assert env.err("x-blockdev-change", parent="quorum0", child="children.9") == (
        "Node 'quorum0' does not have child 'children.9'")
    assert env.err("x-blockdev-change", parent="quorum0", node="nosuch") == (
        "Node 'nosuch' not found")
    assert env.err("x-blockdev-change", parent="quorum0", node="child0") == (
        "The node child0 already has a parent")
    assert env.err("x-blockdev-change", parent="child0", node="n3") == (
        "The node child0 does not support adding a child")
    assert env.err("x-blockdev-change", parent="child0", child="file") == (
        "The node child0 does not support removing a child")
    assert env.err("x-blockdev-change", parent="child0", child="children.0") == (
        "Node 'child0' does not have child 'children.0'")
    env.ok("x-blockdev-change", parent="quorum0", child="children.0")
    assert env.err("x-blockdev-change", parent="quorum0", child="children.1") == (
        "The number of children cannot be lower than the vote threshold 2")


def test_child_add_del_refusals(env: Env) -> None:
    env.add_raw("small", size=SIZE // 2)
    assert env.err("x-blockdev-child-add", parent="nosuch", child="small") == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    assert env.err("x-blockdev-child-add", parent="quorum0", child="nosuch") == (
        "Node 'nosuch' not found")
    assert env.err("x-blockdev-child-add", parent="child0", child="small") == (
        "The node child0 does not support adding a child")
    assert env.err("x-blockdev-child-add", parent="quorum0", child="child1") == (
        "The node child1 already has a parent")
    assert env.err("x-blockdev-child-add", parent="quorum0", child="small") == (
        f"Cannot add node 'small' of size {SIZE // 2} to quorum 'quorum0' of size {SIZE}")
    assert env.err("x-blockdev-child-add", parent="quorum0", child="quorum0") == (
        "The node quorum0 cannot be a child of itself")
    assert env.err("x-blockdev-child-del", parent="quorum0", child="small") == (
        "Node 'small' is not a child of 'quorum0'")
    assert env.err("x-blockdev-child-del", parent="quorum0", child="nosuch") == (
        "Node 'nosuch' not found")
    env.ok("x-blockdev-child-del", parent="quorum0", child="child2")
    assert env.err("x-blockdev-child-del", parent="quorum0", child="child1") == (
        "The number of children cannot be lower than the vote threshold 2")


def test_blockdev_add_forms(env: Env) -> None:
    f = env.image("f.raw")
    env.ok("blockdev-add", driver="file", node_name="f3", filename=f)
    env.ok("blockdev-add", driver="raw", node_name="c3", file="f3")
    env.ok("blockdev-add", driver="raw", node_name="c4",
           file={"driver": "file", "node_name": "c4-file", "filename": env.image("g.raw")})
    infos = {i["node-name"]: i for i in env.ok("query-named-block-nodes")}
    assert infos["f3"]["drv"] == "file" and infos["c3"]["drv"] == "raw"
    assert infos["c3"]["file"] == f and infos["c4-file"]["drv"] == "file"
    env.ok("x-blockdev-child-add", parent="quorum0", child="c3")
    # a monitor-owned file node stays after its raw node is deleted
    env.ok("blockdev-del", node_name="c4")
    assert "c4-file" in env.graph
    env.ok("blockdev-del", node_name="c4-file")


def test_blockdev_add_refusals(env: Env) -> None:
    img = env.image("x.raw")
    assert env.err("blockdev-add", driver="raw",
                   file={"driver": "file", "filename": img}) == (
        "'node-name' must be specified for the root node")
    assert env.err("blockdev-add", driver="raw", node_name="child0",
                   file={"driver": "file", "filename": img}) == (
        "Duplicate nodes with node-name='child0'")
    assert env.err("blockdev-add", driver="raw", node_name="n",
                   file={"driver": "file", "node_name": "n", "filename": img}) == (
        "Duplicate nodes with node-name='n'")
    assert env.err("blockdev-add", driver="raw", node_name="9bad",
                   file={"driver": "file", "filename": img}) == "Invalid node-name: '9bad'"
    assert env.err("blockdev-add", driver="raw", node_name="n",
                   file={"driver": "file", "filename": str(env.tmp / "missing.raw")}) == (
        f"Could not open '{env.tmp / 'missing.raw'}': No such file or directory")
    assert env.err("blockdev-add", driver="raw", node_name="n", file="nosuch") == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    assert "already has a parent" in env.err("blockdev-add", driver="raw", node_name="n",
                                              file="child0")
    assert "cannot create a 'quorum' node" in env.err("blockdev-add", driver="quorum",
                                                      node_name="q1")


def test_blockdev_del_refusals(env: Env) -> None:
    env.add_raw("n3")
    env.ok("x-blockdev-child-add", parent="quorum0", child="n3")
    assert env.err("blockdev-del", node_name="n3") == "Block device n3 is in use"
    assert env.err("blockdev-del", node_name="quorum0") == "Node quorum0 is in use"
    assert env.err("blockdev-del", node_name="nosuch") == (
        "Failed to find node with node-name='nosuch'")
    auto = next(n for n in env.graph.nodes if n.startswith("#"))
    assert env.err("blockdev-del", node_name=auto) == f"Node {auto} is not owned by the monitor"


# --------------------------------------------------------------------------- blockdev-reopen


def reopen(env: Env, **opts: Any) -> Any:
    return env.ok("blockdev-reopen", options=[{"driver": "quorum", "node_name": "quorum0",
                                               **opts}])


def reopen_err(env: Env, *entries: dict[str, Any]) -> str:
    return env.err("blockdev-reopen", options=list(entries))


def test_reopen_changes_options_live(env: Env) -> None:
    reopen(env, vote_threshold=3, read_pattern="fifo", rewrite_corrupted=True)
    q = env.quorum
    assert (q.vote_threshold, str(q.read_pattern), q.rewrite_corrupted) == (3, "fifo", True)
    reopen(env)  # omitted members keep their values
    assert (q.vote_threshold, str(q.read_pattern), q.rewrite_corrupted) == (3, "fifo", True)


def test_reopen_that_only_lowers_the_threshold_is_a_change(env: Env) -> None:
    """Persistence and the worker views hang on on_change: lowering alone must fire it."""
    changes: list[int] = []
    env.quorum.on_change.append(lambda: changes.append(env.quorum.vote_threshold))
    reopen(env, vote_threshold=1)
    assert changes and changes[-1] == 1


def test_reopen_with_a_new_children_list_is_one_step(env: Env) -> None:
    env.add_raw("n3")
    env.add_raw("n4")
    changes: list[Any] = []
    env.quorum.on_change.append(lambda: changes.append(env.edges()))
    reopen(env, vote_threshold=2, children=["child0", "n3", "n4"])
    assert env.edges() == [("children.0", "child0"), ("children.3", "n3"), ("children.4", "n4")]
    # lower the threshold and shrink in the same step (the order inside must not trip detach)
    reopen(env, vote_threshold=1, children=["n4"])
    assert env.edges() == [("children.4", "n4")]
    assert env.quorum.vote_threshold == 1
    reopen(env, vote_threshold=3, children=["n4", "child0", "child1"])
    assert env.quorum.vote_threshold == 3 and len(env.edges()) == 3


def test_reopen_refusals_change_nothing(env: Env) -> None:
    env.add_raw("n3")
    env.add_raw("small", size=SIZE // 2)
    q = {"driver": "quorum", "node-name": "quorum0"}
    assert reopen_err(env, {**q, "vote-threshold": 0}) == (
        "Parameter 'vote-threshold' expects a value >= 1")
    assert reopen_err(env, {**q, "vote-threshold": 4}) == (
        "threshold may not exceed children count")
    assert reopen_err(env, {**q, "children": ["child0"]}) == (
        "threshold may not exceed children count")
    assert reopen_err(env, {**q, "children": []}) == (
        "Number of provided children must be 1 or more")
    assert reopen_err(env, {**q, "children": ["child0", "child0", "n3"]}) == (
        "Node 'child0' is listed more than once in 'children'")
    assert reopen_err(env, {**q, "children": ["child0", "child1", "nosuch"]}) == (
        "Cannot find device='nosuch' nor node-name='nosuch'")
    assert reopen_err(env, {**q, "children": ["child0", "child1", "small"]}) == (
        f"Cannot add node 'small' of size {SIZE // 2} to quorum 'quorum0' of size {SIZE}")
    assert reopen_err(env, {**q, "children": ["child0", "quorum0"]}) == (
        "The node quorum0 cannot be a child of itself")
    assert reopen_err(env, {"driver": "quorum"}) == "node-name not specified"
    assert reopen_err(env, {"driver": "quorum", "node-name": "nosuch"}) == (
        "Failed to find node with node-name='nosuch'")
    assert reopen_err(env, {"driver": "raw", "node-name": "quorum0", "file": "x"}) == (
        "Cannot change the option 'driver'")
    assert reopen_err(env, {"driver": "raw", "node-name": "child0", "file": "x"}) == (
        "Block format 'raw' used by node 'child0' does not support reopening files")
    assert reopen_err(env, {**q, "read-only": True}) == "Cannot change the option 'read-only'"
    # a valid first entry is not applied when the second is refused
    assert reopen_err(env, {**q, "vote-threshold": 3, "children": ["child0", "child1", "n3"]},
                      {**q, "vote-threshold": 1}) == "Node 'quorum0' is listed more than once"


# --------------------------------------------------------------------------- queries, session


def test_query_named_block_nodes_shape(env: Env) -> None:
    infos = env.ok("query-named-block-nodes", flat=True)
    by_name = {i["node-name"]: i for i in infos}
    qi = by_name["quorum0"]
    assert qi["drv"] == "quorum" and qi["ro"] is False
    assert qi["image"]["virtual-size"] == SIZE
    assert qi["children"] == [{"child": f"children.{i}", "node-name": f"child{i}"}
                              for i in range(3)]
    for key in ("node-name", "drv", "ro", "file", "image", "cache", "detect_zeroes"):
        assert key in by_name["child0"], key
    assert by_name["child0"]["image"]["format"] == "raw"


def test_query_quorum_status(env: Env) -> None:
    (st,) = env.ok("query-quorum-status")
    assert st["node-name"] == "quorum0" and st["vote-threshold"] == 2
    assert [c["node-name"] for c in st["children"]] == ["child0", "child1", "child2"]
    for c in st["children"]:
        assert c["state"] == "active"
        for counter in ("reads", "writes", "read-errors", "write-errors", "checksum-errors"):
            assert c[counter] == 0
    assert env.ok("query-quorum-status", node_name="quorum0") == [st]
    assert env.err("query-quorum-status", node_name="child0") == (
        "Node 'child0' is not a quorum node")
    assert env.err("query-quorum-status", node_name="nosuch") == (
        "Cannot find device='nosuch' nor node-name='nosuch'")


def test_query_version_and_commands(env: Env) -> None:
    v = env.ok("query-version")
    assert v == {"qemu": {"micro": 0, "minor": 1, "major": 0}, "package": "nbdquorum 0.1.0"}
    names = [c["name"] for c in env.ok("query-commands")]
    assert "x-blockdev-change" in names and "qmp_capabilities" in names


def test_quit_asks_the_server_to_stop(env: Env) -> None:
    assert env.ok("quit") == {}
    assert env.quits == 1


def test_dispatch_builds_replies_with_the_id(env: Env) -> None:
    reply = run(dispatch(env.ctx, Execute("query-version", {}, {"any": ["json"]})))
    assert list(reply) == ["return", "id"] and reply["id"] == {"any": ["json"]}
    reply = run(dispatch(env.ctx, Execute("nosuch", {}, 5)))
    assert list(reply) == ["id", "error"]
    assert reply["error"] == {"class": "CommandNotFound",
                              "desc": "The command nosuch has not been found"}


def test_an_unexpected_handler_error_is_a_generic_error(env: Env, monkeypatch: Any) -> None:
    def boom(node: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(commands, "block_device_info", boom)
    assert env.err("query-named-block-nodes") == "Internal error in query-named-block-nodes: boom"


def test_a_quorum_is_a_quorum(env: Env) -> None:
    assert isinstance(env.graph.get("quorum0"), QuorumNode)


# --------------------------------------------------------------------------- children in resync


def test_an_active_child_cannot_leave_if_too_few_would_stay_in_sync(env: Env) -> None:
    env.graph.new_child_state = ChildState.RESYNCING  # as in the server, with a resync job
    env.add_raw("n3")
    env.ok("x-blockdev-child-add", parent="quorum0", child="n3")
    assert env.quorum.slots[-1].state is ChildState.RESYNCING
    env.ok("x-blockdev-child-del", parent="quorum0", child="child0")
    # 3 children remain, more than the threshold (QEMU's rule), but only 2 vote
    assert env.err("x-blockdev-child-del", parent="quorum0", child="child1") == (
        "Cannot remove child1: 1 child would be left in sync (active), fewer than the "
        "vote threshold 2")
    assert env.err("x-blockdev-change", parent="quorum0", child="children.2") == (
        "Cannot remove child2: 1 child would be left in sync (active), fewer than the "
        "vote threshold 2")
    # the resyncing child itself can go
    env.ok("x-blockdev-child-del", parent="quorum0", child="n3")


def test_reopen_refuses_a_quorum_that_could_not_write(env: Env) -> None:
    env.graph.new_child_state = ChildState.RESYNCING
    for n in ("n3", "n4", "n5"):
        env.add_raw(n)
    assert reopen_err(env, {"driver": "quorum", "node-name": "quorum0",
                            "children": ["n3", "n4", "n5"]}) == (
        "Cannot reopen quorum0: 0 children would be left in sync (active), fewer than the "
        "vote threshold 2")
    assert reopen_err(env, {"driver": "quorum", "node-name": "quorum0", "vote-threshold": 4,
                            "children": ["child0", "child1", "child2", "n3"]}) == (
        "Cannot reopen quorum0: 3 children would be left in sync (active), fewer than the "
        "vote threshold 4")
    reopen(env, children=["child0", "child1", "n3"])
    assert [s.state for s in env.quorum.slots] == [ChildState.ACTIVE, ChildState.ACTIVE,
                                                   ChildState.RESYNCING]


def test_rewrite_corrupted_is_refused_on_a_read_only_quorum(env: Env) -> None:
    env.quorum.read_only = True
    assert reopen_err(env, {"driver": "quorum", "node-name": "quorum0",
                            "rewrite-corrupted": True}) == (
        "rewrite-corrupted=on cannot be used on the read-only node 'quorum0'")
