"""qemu.qmp's QMPClient (and qmp-shell) against a real server: every command, and events."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.qmp.schema import COMMANDS

from .qmp_fixtures import (
    QUORUM,
    StartTarget,
    Target,
    arun,
    both_targets,
    corrupt,
    error_of,
    execute,
    make_image,
    next_event,
    qemu_io,
    qmp_client,
    qmp_target_fixture,  # noqa: F401  (the qmp_target fixture)
    require,
    run,
    shape,
    wait_until,
)

KiB = 1024


@both_targets
def test_connect_and_negotiate(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            assert "oob" in qmp.greeting.QMP.capabilities
            v = await execute(qmp, "query-version")
            assert shape(v) == {"qemu": {"micro": "number", "minor": "number",
                                         "major": "number"}, "package": "str"}
            names = {c["name"] for c in await execute(qmp, "query-commands")}
            assert {"qmp_capabilities", "query-version", "x-blockdev-change", "blockdev-add",
                    "blockdev-del", "query-named-block-nodes", "quit"} <= names

    arun(main())


def test_every_command(qmp_target: StartTarget) -> None:
    """Each command of the table, through QMPClient, ending with quit."""
    t = qmp_target("nbdquorum")
    qemu_io(t.uri, "write -P 0x5c 0 16M", "flush")  # for the scrub (zero ranges are skipped)
    done: set[str] = {"qmp_capabilities"}  # QMPClient negotiates on connect
    pki = t.tmp / "pki"
    pki.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(pki / "ca-key.pem"), "-out", str(pki / "ca-cert.pem"),
                    "-days", "1", "-subj", "/CN=test CA"], check=True,
                   capture_output=True, timeout=60)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            async def ok(cmd: str, args: dict[str, Any] | None = None) -> Any:
                done.add(cmd)
                return await execute(qmp, cmd, args)

            assert (await ok("query-version"))["package"] == "nbdquorum 0.1.0"
            assert {c["name"] for c in await ok("query-commands")} == set(COMMANDS)
            img = make_image(t.tmp / "new.raw")
            await ok("blockdev-add", {"driver": "file", "node-name": "f9",
                                      "filename": str(img)})
            await ok("blockdev-add", {"driver": "raw", "node-name": "n9", "file": "f9"})
            await ok("blockdev-add", {"driver": "raw", "node-name": "n8", "file": {
                "driver": "file", "filename": str(make_image(t.tmp / "n8.raw"))}})
            await ok("x-blockdev-child-add", {"parent": QUORUM, "child": "n9"})
            await ok("x-blockdev-change", {"parent": QUORUM, "node": "n8"})
            nodes = {n["node-name"]: n for n in await ok("query-named-block-nodes",
                                                         {"flat": True})}
            assert [c["node-name"] for c in nodes[QUORUM]["children"]] == [
                "child0", "child1", "child2", "n9", "n8"]
            (st,) = await ok("query-quorum-status", {"node-name": QUORUM})
            assert [c["child"] for c in st["children"]] == [f"children.{i}" for i in range(5)]
            await ok("blockdev-reopen", {"options": [{"driver": "quorum", "node-name": QUORUM,
                                                      "vote-threshold": 3}]})
            await ok("x-blockdev-child-del", {"parent": QUORUM, "child": "n9"})
            await ok("x-blockdev-change", {"parent": QUORUM, "child": "children.4"})
            await ok("blockdev-reopen", {"options": [{"driver": "quorum", "node-name": QUORUM,
                                                      "vote-threshold": 2}]})
            await ok("blockdev-del", {"node-name": "n9"})
            await ok("blockdev-del", {"node-name": "f9"})
            await ok("blockdev-del", {"node-name": "n8"})
            (st,) = await ok("query-quorum-status")
            assert st["vote-threshold"] == 2 and len(st["children"]) == 3
            # jobs: a slow scrub to pause, re-speed, resume and cancel
            await ok("x-quorum-scrub", {"speed": 1 << 20, "job-id": "s1"})
            assert [j["id"] for j in await ok("query-jobs")] == ["s1"]
            assert [j["device"] for j in await ok("query-block-jobs")] == ["s1"]
            await ok("job-pause", {"id": "s1"})
            await ok("block-job-set-speed", {"device": "s1", "speed": 2 << 20})
            await ok("job-resume", {"id": "s1"})
            await ok("job-cancel", {"id": "s1"})
            await ok("x-quorum-resync", {"node-name": "child1", "full": True})
            # a fault injector over a fresh raw node, switched live, then removed
            before = {n["node-name"] for n in await ok("query-named-block-nodes")}
            await ok("blockdev-add", {"driver": "faulty", "node-name": "fz", "image": {
                "driver": "raw", "file": {"driver": "file",
                                          "filename": str(make_image(t.tmp / "fz.raw"))}}})
            await ok("x-faulty-set", {"node-name": "fz", "rules": [
                {"op": "read", "action": "error", "errno": 5}]})
            await ok("blockdev-del", {"node-name": "fz"})
            after = {n["node-name"] for n in await ok("query-named-block-nodes")}
            assert after == before  # its implicit raw and file nodes went with it
            # client TLS credentials for nbd nodes: a CA certificate is all they need
            await ok("object-add", {"qom-type": "tls-creds-x509", "id": "tls0",
                                    "dir": str(pki), "endpoint": "client"})
            await ok("object-del", {"id": "tls0"})
            assert await ok("quit") == {}

    arun(main())
    assert done == set(COMMANDS)
    wait_until(lambda: not t.alive(), 20, "the server to exit after quit")
    assert t.wait_exit() == 0, t.stderr()


def _write_then_corrupt(t: Target, *bad: tuple[int, int]) -> None:
    qemu_io(t.uri, "write -P 0x32 0 64k")
    qemu_io(t.uri, "flush")
    for child, byte in bad:
        corrupt(t.images[child], 0, 64 * KiB, byte)


@both_targets
def test_report_bad_after_a_child_is_corrupted(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> dict[str, Any]:
        async with qmp_client(t.qmp) as qmp:
            _write_then_corrupt(t, (1, 0x42))
            qemu_io(t.uri, "read -P 0x32 0 64k")
            return await next_event(qmp, "QUORUM_REPORT_BAD", node_name="child1")

    ev = arun(main())
    assert ev["data"] == {"node-name": "child1", "sectors-count": 128, "sector-num": 0,
                          "type": "read"}
    assert set(ev["timestamp"]) == {"seconds", "microseconds"}


@both_targets
def test_quorum_failure_when_no_two_children_agree(qmp_target: StartTarget,
                                                   target: str) -> None:
    t = qmp_target(target)

    async def main() -> dict[str, Any]:
        async with qmp_client(t.qmp) as qmp:
            _write_then_corrupt(t, (1, 0x41), (2, 0x42))
            proc = qemu_io(t.uri, "read -P 0x32 0 64k", check=False)
            assert "Input/output error" in proc.stdout + proc.stderr
            return await next_event(qmp, "QUORUM_FAILURE")

    ev = arun(main())
    assert ev["data"] == {"reference": QUORUM, "sectors-count": 128, "sector-num": 0}


@both_targets
def test_report_bad_is_throttled_and_the_last_comes_late(qmp_target: StartTarget,
                                                         target: str) -> None:
    """Four bad reads in a burst: two events, the second a second later with its own time."""
    t = qmp_target(target)

    async def main() -> None:
        async with qmp_client(t.qmp) as qmp:
            _write_then_corrupt(t, (1, 0x42))
            loop = asyncio.get_running_loop()
            qemu_io(t.uri, *["read -P 0x32 0 64k"] * 4)
            first = await next_event(qmp, "QUORUM_REPORT_BAD", node_name="child1")
            t_first = loop.time()
            late = await next_event(qmp, "QUORUM_REPORT_BAD", within=5, node_name="child1")
            t_late = loop.time()
            assert t_late - t_first >= 0.5, "the second event was not held back"

            def stamp(e: dict[str, Any]) -> float:
                return float(e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6)

            # the held event keeps the time it happened, well before it was delivered
            assert stamp(late) - stamp(first) < t_late - t_first - 0.3
            if t.kind == "nbdquorum":
                (st,) = await execute(qmp, "query-quorum-status")
                child1 = next(c for c in st["children"] if c["node-name"] == "child1")
                assert child1["checksum-errors"] == 4  # counters stay exact
                assert len([e for e in t.child_events()
                            if e["event"] == "QUORUM_REPORT_BAD"]) == 4

    arun(main())


def test_every_client_gets_every_event(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")

    async def main() -> None:
        async with qmp_client(t.qmp, "a") as a, qmp_client(t.qmp, "b") as b, \
                qmp_client(t.qmp, "c") as c:
            _write_then_corrupt(t, (2, 0x42))
            qemu_io(t.uri, "read -P 0x32 0 64k")
            for q in (a, b, c):
                ev = await next_event(q, "QUORUM_REPORT_BAD")
                assert ev["data"]["node-name"] == "child2"

    arun(main())


def test_qmp_shell_works_unchanged(qmp_target: StartTarget, tmp_path: Path) -> None:
    shell = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "qmp-shell"
    exe = str(shell) if shell.exists() else require("qmp-shell")
    t = qmp_target("nbdquorum")
    proc = run([exe, str(t.qmp)],
               input=b"query-version\nx-blockdev-change parent=quorum0\n"
                     b"query-quorum-status node-name=quorum0\n", timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert '"package": "nbdquorum 0.1.0"' in proc.stdout
    assert "Either child or node must be specified" in proc.stdout
    assert '"vote-threshold": 2' in proc.stdout


@both_targets
def test_x_blockdev_change_errors_match_qemu(qmp_target: StartTarget, target: str) -> None:
    t = qmp_target(target)

    async def main() -> list[tuple[str, str]]:
        async with qmp_client(t.qmp) as qmp:
            return [
                await error_of(qmp, "x-blockdev-change", {"parent": QUORUM}),
                await error_of(qmp, "x-blockdev-change", {"parent": "nosuch", "node": "x"}),
                await error_of(qmp, "no-such-command"),
                await error_of(qmp, "x-blockdev-change", {"parent": QUORUM, "bogus": 1}),
                await error_of(qmp, "x-blockdev-change", {"parent": 1}),
            ]

    assert arun(main()) == [
        ("GenericError", "Either child or node must be specified"),
        ("GenericError", "Cannot find device='nosuch' nor node-name='nosuch'"),
        ("CommandNotFound", "The command no-such-command has not been found"),
        ("GenericError", "Parameter 'bogus' is unexpected"),
        ("GenericError", "Invalid parameter type for 'parent', expected: string"),
    ]


@pytest.mark.parametrize("target", ["nbdquorum"])
def test_events_arrive_only_after_negotiation(qmp_target: StartTarget, target: str) -> None:
    from .qmp_fixtures import RawQMP

    t = qmp_target(target)
    early = RawQMP(t.qmp, negotiate=False)
    late = RawQMP(t.qmp)
    try:
        _write_then_corrupt(t, (1, 0x42))
        qemu_io(t.uri, "read -P 0x32 0 64k")
        ev = late.recv()
        assert ev["event"] == "QUORUM_REPORT_BAD"
        early.send(b'{"execute": "query-version", "id": 1}\n')
        assert early.recv()["error"]["desc"] == (
            "Expecting capabilities negotiation with 'qmp_capabilities'")
    finally:
        early.close()
        late.close()
