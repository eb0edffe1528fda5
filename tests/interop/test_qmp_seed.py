"""The seed's live child add/del, QEMU's x-blockdev-change, and each refusal, on both servers.

Every scenario runs against nbdquorum and against qemu-storage-daemon; commands that
only nbdquorum has (the seed's x-blockdev-child-add/del, blockdev-reopen of a quorum, the
size check) are strict xfails for qsd, so the day QEMU agrees the test says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .qmp_fixtures import (
    QUORUM,
    SIZE,
    StartTarget,
    Target,
    arun,
    both_targets,
    error_of,
    execute,
    graph_state,
    make_image,
    nbdquorum_only,
    qemu_io,
    qmp_client,
    qmp_target_fixture,  # noqa: F401  (the qmp_target fixture)
    shape,
)

KiB = 1024


def new_node(t: Target, qmp: Any, name: str = "new_node", size: int = SIZE) -> Any:
    """blockdev-add of a raw node over a new image, exactly as the seed's example does."""
    img = make_image(t.tmp / f"{name}.raw", size)
    return execute(qmp, "blockdev-add", {
        "driver": "raw", "node-name": name,
        "file": {"driver": "file", "filename": str(img)}})


def read_image(t: Target, name: str, length: int) -> bytes:
    with open(t.tmp / f"{name}.raw", "rb") as f:
        return f.read(length)


# --------------------------------------------------------------------------- the seed's example


@nbdquorum_only("QEMU has no x-blockdev-child-add/del (CommandNotFound)")
def test_seed_example_verbatim(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            assert await new_node(t, qmp) == {}
            assert await execute(qmp, "x-blockdev-child-add",
                                 {"parent": QUORUM, "child": "new_node"}) == {}
            # the new child gets every write that starts after it joined
            qemu_io(t.uri, "write -P 0x32 0 64k")
            assert read_image(t, "new_node", 64 * KiB) == b"\x32" * (64 * KiB)
            assert await error_of(qmp, "blockdev-del", {"node-name": "new_node"}) == (
                "GenericError", "Block device new_node is in use")
            assert await execute(qmp, "x-blockdev-child-del",
                                 {"parent": QUORUM, "child": "new_node"}) == {}
            assert await execute(qmp, "blockdev-del", {"node-name": "new_node"}) == {}
            qemu_io(t.uri, "read -P 0x32 0 64k")

    arun(main())


@both_targets
def test_seed_example_with_x_blockdev_change(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            assert await new_node(t, qmp) == {}
            assert await execute(qmp, "x-blockdev-change",
                                 {"parent": QUORUM, "node": "new_node"}) == {}
            qemu_io(t.uri, "write -P 0x32 0 64k")
            assert read_image(t, "new_node", 64 * KiB) == b"\x32" * (64 * KiB)
            assert await error_of(qmp, "blockdev-del", {"node-name": "new_node"}) == (
                "GenericError", "Block device new_node is in use")
            assert await execute(qmp, "x-blockdev-change",
                                 {"parent": QUORUM, "child": "children.3"}) == {}
            assert await execute(qmp, "blockdev-del", {"node-name": "new_node"}) == {}
            qemu_io(t.uri, "read -P 0x32 0 64k")

    arun(main())


@both_targets
def test_child_names_leave_gaps_as_qemu_does(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "child": "children.1"})
            await new_node(t, qmp, "n3")
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "node": "n3"})
            # the new edge is children.3, not the free children.1
            assert await error_of(qmp, "x-blockdev-change",
                                  {"parent": QUORUM, "child": "children.1"}) == (
                "GenericError", "Node 'quorum0' does not have child 'children.1'")
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "child": "children.3"})
            # the top index is reused
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "node": "n3"})
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "child": "children.3"})

    arun(main())


# --------------------------------------------------------------------------- refusals

REFUSALS_BOTH = [
    ("x-blockdev-change", {"parent": QUORUM}, "Either child or node must be specified"),
    ("x-blockdev-change", {"parent": QUORUM, "child": "children.0", "node": "spare"},
     "The parameters child and node are in conflict"),
    ("x-blockdev-change", {"parent": "nosuch", "node": "spare"},
     "Cannot find device='nosuch' nor node-name='nosuch'"),
    ("x-blockdev-change", {"parent": QUORUM, "node": "nosuch"}, "Node 'nosuch' not found"),
    ("x-blockdev-change", {"parent": QUORUM, "child": "children.7"},
     "Node 'quorum0' does not have child 'children.7'"),
    ("x-blockdev-change", {"parent": "child0", "node": "spare"},
     "The node child0 does not support adding a child"),
    ("x-blockdev-change", {"parent": QUORUM, "node": "child1"},
     "The node child1 already has a parent"),
    ("blockdev-del", {"node-name": "child0"}, "Block device child0 is in use"),
    ("blockdev-del", {"node-name": QUORUM}, "Node quorum0 is in use"),
    ("blockdev-del", {"node-name": "nosuch"}, "Failed to find node with node-name='nosuch'"),
    ("blockdev-add", {"driver": "raw", "node-name": "other", "file": {
        "driver": "file", "filename": "/nonexistent/x.raw"}},
     "Could not open '/nonexistent/x.raw': No such file or directory"),
]


@both_targets
def test_refusals_have_qemus_texts_and_change_nothing(qmp_target: StartTarget,
                                                      target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await new_node(t, qmp, "spare")
            for cmd, args, desc in REFUSALS_BOTH:
                before = await graph_state(qmp)
                assert await error_of(qmp, cmd, args) == ("GenericError", desc), (cmd, args)
                assert await graph_state(qmp) == before, (cmd, args)
            qemu_io(t.uri, "write -P 0x33 0 4k", "read -P 0x33 0 4k")

    arun(main())


@both_targets
def test_removing_below_the_threshold_is_refused(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await execute(qmp, "x-blockdev-change", {"parent": QUORUM, "child": "children.0"})
            before = await graph_state(qmp)
            assert await error_of(qmp, "x-blockdev-change",
                                  {"parent": QUORUM, "child": "children.1"}) == (
                "GenericError", "The number of children cannot be lower than the vote threshold 2")
            assert await graph_state(qmp) == before
            qemu_io(t.uri, "write -P 0x33 0 4k", "read -P 0x33 0 4k")

    arun(main())


@nbdquorum_only("QEMU attaches a child of another size (reference 1.5)")
def test_a_child_of_another_size_is_refused(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await new_node(t, qmp, "small", SIZE // 2)
            before = await graph_state(qmp)
            cls, desc = await error_of(qmp, "x-blockdev-change",
                                       {"parent": QUORUM, "node": "small"})
            assert (cls, desc) == ("GenericError", f"Cannot add node 'small' of size "
                                                   f"{SIZE // 2} to quorum 'quorum0' of size {SIZE}")
            assert await graph_state(qmp) == before

    arun(main())


@nbdquorum_only("QEMU has no x-blockdev-child-add/del (CommandNotFound)")
def test_seed_command_refusals(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await new_node(t, qmp, "spare")
            cases = [
                ("x-blockdev-child-add", {"parent": "nosuch", "child": "spare"},
                 "Cannot find device='nosuch' nor node-name='nosuch'"),
                ("x-blockdev-child-add", {"parent": QUORUM, "child": "nosuch"},
                 "Node 'nosuch' not found"),
                ("x-blockdev-child-add", {"parent": "child0", "child": "spare"},
                 "The node child0 does not support adding a child"),
                ("x-blockdev-child-add", {"parent": QUORUM, "child": "child2"},
                 "The node child2 already has a parent"),
                ("x-blockdev-child-del", {"parent": QUORUM, "child": "spare"},
                 "Node 'spare' is not a child of 'quorum0'"),
                ("x-blockdev-child-del", {"parent": "child0", "child": "spare"},
                 "The node child0 does not support removing a child"),
            ]
            for cmd, args, desc in cases:
                before = await graph_state(qmp)
                assert await error_of(qmp, cmd, args) == ("GenericError", desc), (cmd, args)
                assert await graph_state(qmp) == before
            await execute(qmp, "x-blockdev-child-del", {"parent": QUORUM, "child": "child0"})
            assert await error_of(qmp, "x-blockdev-child-del",
                                  {"parent": QUORUM, "child": "child1"}) == (
                "GenericError", "The number of children cannot be lower than the vote threshold 2")

    arun(main())


@nbdquorum_only("QEMU: Block format 'quorum' used by node 'quorum0' does not support "
                "reopening files")
def test_blockdev_reopen_changes_the_threshold_live(qmp_target: StartTarget,
                                                    target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            await execute(qmp, "blockdev-reopen", {"options": [
                {"driver": "quorum", "node-name": QUORUM, "vote-threshold": 3}]})
            qemu_io(t.uri, "write -P 0x34 0 4k", "read -P 0x34 0 4k")
            # now removing any child would go below the threshold
            assert await error_of(qmp, "x-blockdev-change",
                                  {"parent": QUORUM, "child": "children.0"}) == (
                "GenericError", "The number of children cannot be lower than the vote threshold 3")
            assert await error_of(qmp, "blockdev-reopen", {"options": [
                {"driver": "quorum", "node-name": QUORUM, "vote-threshold": 4}]}) == (
                "GenericError", "threshold may not exceed children count")

    arun(main())


# --------------------------------------------------------------------------- shapes


#: where nbdquorum's replies knowingly differ in shape from QEMU 7.2's
KNOWN_SHAPE_DIFFERENCES = {
    # block/file.py leaves out image.dirty-flag for file nodes; QEMU reports false
    ("file", "image", "dirty-flag"),
}


def _paths(s: Any, prefix: tuple[str, ...] = ()) -> set[tuple[tuple[str, ...], str]]:
    out: set[tuple[tuple[str, ...], str]] = set()
    if isinstance(s, dict):
        for k, v in s.items():
            out |= _paths(v, (*prefix, k))
    elif isinstance(s, list):
        out.add((prefix, "list"))
        if s:
            out |= _paths(s[0], (*prefix, "[]"))
    else:
        out.add((prefix, s))
    return out


def test_reply_shapes_match_qemu(qmp_target: StartTarget, tmp_path: Path) -> None:
    """One scenario on both servers; every reply of nbdquorum has (at least) QEMU's shape."""

    async def scenario(t: Target) -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with qmp_client(t.qmp) as qmp:
            out["greeting"] = shape(qmp.greeting._raw)
            out["version"] = shape(await execute(qmp, "query-version"))
            out["commands"] = shape(await execute(qmp, "query-commands"))
            out["add"] = shape(await new_node(t, qmp, "n3"))
            out["change"] = shape(await execute(qmp, "x-blockdev-change",
                                                {"parent": QUORUM, "node": "n3"}))
            nodes = await execute(qmp, "query-named-block-nodes", {"flat": True})
            out["nodes"] = {n["drv"]: shape(n) for n in nodes}
            out["error"] = await error_of(qmp, "x-blockdev-change", {"parent": QUORUM})
        return out

    q = arun(scenario(qmp_target("qsd")))
    n = arun(scenario(qmp_target("nbdquorum")))
    for key in ("greeting", "version", "commands", "add", "change"):
        assert n[key] == q[key], key
    assert n["error"] == q["error"]
    for drv, qshape in q["nodes"].items():
        missing = {p for p in _paths(qshape) - _paths(n["nodes"][drv])
                   if (drv, *p[0]) not in KNOWN_SHAPE_DIFFERENCES}
        assert not missing, f"{drv} node entries lack QEMU's members {sorted(missing)}"
