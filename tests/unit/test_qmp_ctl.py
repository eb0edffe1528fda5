"""``nbdquorum ctl`` against an in-process QMP server: output, exit codes, rollback."""

from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nbdquorum import ctl
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import QuorumNode
from nbdquorum.cli import main as cli_main
from nbdquorum.eventbus import EventBus
from nbdquorum.jobs.job import JobManager
from nbdquorum.jobs.resync import ResyncManager
from nbdquorum.qmp.server import QMPServer

SIZE = 1 << 20


class ThreadedServer:
    """A graph and its QMP server on an event loop in a background thread."""

    def __init__(self, tmp: Path, *, resync_speed: int | None = None) -> None:
        """``resync_speed``: run background jobs, new children resyncing at this rate."""
        self.tmp = tmp
        self.path = tmp / "qmp.sock"
        self.bus = EventBus()
        self.graph = Graph(self.bus)
        kids: list[BlockNode] = [
            self.graph.open_raw_file(f"child{i}", str(tmp / f"c{i}.raw"), create_size=SIZE)
            for i in range(3)
        ]
        self.quorum = QuorumNode("quorum0", kids, vote_threshold=2, bus=self.bus)
        self.graph.add(self.quorum)
        self.graph.in_use["quorum0"] = "export 'disk'"
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.server = QMPServer(self.graph, self.bus)
        self.jobs: JobManager | None = None
        if resync_speed is not None:
            self.jobs = JobManager(self.bus)
            self.server.jobs = self.jobs
            self.server.resync = ResyncManager(self.graph, self.jobs, speed=resync_speed)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.listen_unix(str(self.path)))
        self.ready.set()
        self.loop.run_forever()

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the loop thread (graph and bus are not thread-safe)."""
        done = threading.Event()
        box: list[Any] = []

        def go() -> None:
            box.append(fn(*args))
            done.set()

        self.loop.call_soon_threadsafe(go)
        assert done.wait(10)
        return box[0]

    def stop(self) -> None:
        if self.jobs is not None:
            asyncio.run_coroutine_threadsafe(self.jobs.shutdown(), self.loop).result(10)
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.graph.close()

    def image(self, name: str, size: int = SIZE) -> str:
        path = self.tmp / name
        with open(path, "wb") as f:
            f.truncate(size)
        return str(path)

    def edges(self) -> list[tuple[str, str]]:
        return self.call(lambda: [(s.name, s.node.node_name) for s in self.quorum.slots])


@pytest.fixture
def srv(tmp_path: Path) -> Iterator[ThreadedServer]:
    s = ThreadedServer(tmp_path)
    yield s
    s.stop()


@pytest.fixture
def jobsrv(tmp_path: Path) -> Iterator[ThreadedServer]:
    """A server with background jobs; new children resync at 512 KiB/s (2 s for 1 MiB).

    The children hold data: ranges every child reads as zero are skipped by
    resync and scrub, which would leave nothing for the rate limit to slow down."""
    for i in range(3):
        (tmp_path / f"c{i}.raw").write_bytes(b"\x5a" * SIZE)
    s = ThreadedServer(tmp_path, resync_speed=512 * 1024)
    yield s
    s.stop()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def ctl_run(srv: ThreadedServer, capsys: Any, *argv: str) -> tuple[int, str, str]:
    code = cli_main(["ctl", "--control", str(srv.path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_status_table_and_json(srv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(srv, capsys, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "quorum0: healthy"
    assert "vote-threshold 2" in lines[1] and "size 1.0 MiB" in lines[1]
    assert lines[2].split()[:5] == ["EDGE", "NODE", "STATE", "READS", "WRITES"]
    assert "CKSUM" in lines[2]
    assert lines[3].split()[:3] == ["children.0", "child0", "active"]
    code, out, _ = ctl_run(srv, capsys, "status", "--json")
    assert code == 0
    (st,) = json.loads(out)
    assert [c["node-name"] for c in st["children"]] == ["child0", "child1", "child2"]


def test_add_remove_replace_threshold(srv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(srv, capsys, "add", f"n3={srv.image('n3.raw')}", "--json")
    assert code == 0, err
    assert json.loads(out) == {"parent": "quorum0", "added": "n3",
                               "filename": str(srv.tmp / "n3.raw")}
    assert srv.edges()[-1] == ("children.3", "n3")
    code, _, err = ctl_run(srv, capsys, "threshold", "3")
    assert code == 0, err
    assert srv.call(lambda: srv.quorum.vote_threshold) == 3
    code, _, err = ctl_run(srv, capsys, "replace", "child1", f"n4={srv.image('n4.raw')}")
    assert code == 0, err
    assert [n for _, n in srv.edges()] == ["child0", "child2", "n3", "n4"]
    assert not srv.call(lambda: "child1" in srv.graph)  # closed, not just detached
    code, _, err = ctl_run(srv, capsys, "remove", "n3")
    assert code == 0, err
    assert [n for _, n in srv.edges()] == ["child0", "child2", "n4"]


def test_refusals_exit_1_with_the_desc_on_stderr(srv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(srv, capsys, "threshold", "4")
    assert (code, out) == (1, "")
    assert err == "nbdquorum ctl: threshold may not exceed children count\n"
    code, _, err = ctl_run(srv, capsys, "remove", "nosuch")
    assert code == 1 and "Node 'nosuch' not found" in err
    small = srv.image("small.raw", SIZE // 2)
    code, _, err = ctl_run(srv, capsys, "add", f"small={small}")
    assert code == 1 and "of size" in err
    assert not srv.call(lambda: "small" in srv.graph)  # the blockdev-add was rolled back
    code, _, err = ctl_run(srv, capsys, "remove", "child0")
    assert code == 0
    code, _, err = ctl_run(srv, capsys, "remove", "child1")
    assert code == 1 and "lower than the vote threshold 2" in err


def test_raw_qmp(srv: ThreadedServer, capsys: Any) -> None:
    code, out, _ = ctl_run(srv, capsys, "qmp", '{"execute": "query-version", "id": 9}')
    assert code == 0
    assert json.loads(out) == {"return": {"qemu": {"micro": 0, "minor": 1, "major": 0},
                                          "package": "nbdquorum 0.1.0"}, "id": 9}
    code, out, err = ctl_run(srv, capsys, "qmp", '{"execute": "nope"}')
    assert code == 1
    assert json.loads(out)["error"]["class"] == "CommandNotFound"
    assert "The command nope has not been found" in err


def test_usage_errors_exit_2_before_connecting(tmp_path: Path, capsys: Any) -> None:
    missing = str(tmp_path / "none.sock")
    assert cli_main(["ctl", "--control", missing, "qmp", "not json"]) == 2
    assert cli_main(["ctl", "--control", missing, "add", "nopath"]) == 2
    with pytest.raises(SystemExit) as info:
        cli_main(["ctl", "--control", missing, "frobnicate"])
    assert info.value.code == 2
    capsys.readouterr()


def test_cannot_connect_exits_3(tmp_path: Path, capsys: Any) -> None:
    assert cli_main(["ctl", "--control", str(tmp_path / "none.sock"), "status"]) == 3
    assert "cannot connect" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    assert cli_main(["ctl", "--control", str(tmp_path / "file"), "status"]) == 3


def test_events_count(srv: ThreadedServer, capsys: Any) -> None:
    result: list[int] = []

    def follow() -> None:
        result.append(ctl.main(["--control", str(srv.path), "events", "--count", "2",
                                "--name", "QUORUM_FAILURE"]))

    t = threading.Thread(target=follow)
    t.start()
    # emit until the follower has connected and seen two (no sleeps: poll its progress)
    for _ in range(2000):
        if not t.is_alive():
            break
        srv.call(srv.bus.emit, "JOB_STATUS_CHANGE", {"status": "running", "id": "j"})
        srv.call(srv.bus.emit, "QUORUM_FAILURE",
                 {"reference": "quorum0", "sectors-count": 1, "sector-num": 0})
        t.join(0.01)
    t.join(10)
    assert result == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(json.loads(line)["event"] == "QUORUM_FAILURE" for line in lines)


def test_status_of_several_quorums_needs_parent(srv: ThreadedServer, capsys: Any) -> None:
    def second() -> None:
        kid = srv.graph.open_raw_file("d0", srv.image("d0.raw"))
        srv.graph.add(QuorumNode("quorum1", [kid], vote_threshold=1, bus=srv.bus))

    srv.call(second)
    code, _, err = ctl_run(srv, capsys, "threshold", "1")
    assert code == 2 and "give --parent" in err
    code, _, err = ctl_run(srv, capsys, "threshold", "1", "--parent", "quorum0")
    assert code == 0, err
    code, out, _ = ctl_run(srv, capsys, "status", "quorum1")
    assert out.startswith("quorum1: healthy")


@pytest.mark.parametrize("where", ["before", "after", "both"])
def test_connection_options_before_or_after_the_subcommand(
        srv: ThreadedServer, capsys: Any, tmp_path: Path, where: str) -> None:
    good = ["--control", str(srv.path), "--timeout", "20"]
    if where == "before":
        argv = ["ctl", *good, "status", "--json"]
    elif where == "after":
        argv = ["ctl", "status", "--json", *good]
    else:  # the one after the subcommand wins
        argv = ["ctl", "--control", str(tmp_path / "none.sock"), "status", *good]
    code = cli_main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "quorum0" in out


def test_control_after_the_subcommand_of_a_change(srv: ThreadedServer, capsys: Any) -> None:
    assert cli_main(["ctl", "threshold", "1", "--control", str(srv.path)]) == 0, (
        capsys.readouterr().err)
    assert srv.call(lambda: srv.quorum.vote_threshold) == 1
    assert ctl.main(["events", "--count", "0", "--control", str(srv.path)]) == 0


def test_every_change_prints_a_confirmation_line(srv: ThreadedServer, capsys: Any) -> None:
    n3 = srv.image("n3.raw")
    code, out, err = ctl_run(srv, capsys, "add", f"n3={n3}")
    assert (code, err) == (0, "")
    assert out == "added n3 to quorum0: active (in sync)\n"
    code, out, _ = ctl_run(srv, capsys, "threshold", "3")
    assert out == "quorum0: vote-threshold 3 (was 2)\n"
    code, out, _ = ctl_run(srv, capsys, "threshold", "3")
    assert out == "quorum0: vote-threshold 3 (unchanged)\n"
    code, out, _ = ctl_run(srv, capsys, "replace", "child1", f"n4={srv.image('n4.raw')}")
    assert code == 0
    assert out == "replaced child1 with n4 in quorum0: done (n4 in sync, child1 removed)\n"
    code, out, _ = ctl_run(srv, capsys, "remove", "n3")
    assert (code, out) == (0, "removed n3 from quorum0 and closed it\n")
    # --json stays one machine-readable object, nothing else on stdout
    code, out, _ = ctl_run(srv, capsys, "threshold", "2", "--json")
    assert json.loads(out) == {"parent": "quorum0", "vote-threshold": 2}
    code, out, err = ctl_run(srv, capsys, "remove", "n4", "--keep-node")
    assert (code, out) == (0, "removed n4 from quorum0 (detached; the node stays open)\n"), err


def test_progress_bar_ends_its_line_before_the_done_line() -> None:
    term = FakeTerminal()
    bar = ctl.ProgressBar("resync n4", term)
    bar.update(0, 4 << 20)
    bar.update(1 << 20, 4 << 20)
    bar.finish()
    term.write("done\n")
    lines = term.getvalue().split("\n")
    assert lines[-1] == ""
    assert lines[-2] == "done"  # on a line of its own: not overwritten by the bar
    assert lines[-3].rsplit("\r", 1)[-1].startswith("resync n4 [" + "#" * 30 + "] 100.0%")
    quiet = io.StringIO()  # not a terminal: no bar, no carriage returns
    bar = ctl.ProgressBar("resync n4", quiet)
    bar.update(1, 2)
    bar.finish()
    assert quiet.getvalue() == ""


def test_replace_on_a_terminal_draws_a_bar_then_the_done_line(
        jobsrv: ThreadedServer, capsys: Any, monkeypatch: Any) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    code = cli_main(["ctl", "--control", str(jobsrv.path), "replace", "child1",
                     f"n4={jobsrv.image('n4.raw')}"])
    out, _ = capsys.readouterr()
    assert code == 0, term.getvalue()
    assert out == "replaced child1 with n4 in quorum0: done (n4 in sync, child1 removed)\n"
    bar = term.getvalue()
    assert bar.endswith("\n") and "\r" in bar
    assert bar.rstrip().rsplit("\r", 1)[-1].startswith("resync n4 [" + "#" * 30 + "] 100.0%")


def test_add_without_wait_says_it_resyncs(jobsrv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(jobsrv, capsys, "add", f"n3={jobsrv.image('n3.raw')}")
    assert code == 0, err
    assert out.startswith("added n3 to quorum0: resyncing (")
    assert "to copy); it votes once in sync" in out


def test_qmp_takes_a_bare_command_name_and_json_arguments(
        srv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(srv, capsys, "qmp", "query-version")
    assert code == 0, err
    assert json.loads(out)["return"]["package"] == "nbdquorum 0.1.0"
    code, out, err = ctl_run(srv, capsys, "qmp", "query-quorum-status",
                             '{"node-name": "quorum0"}')
    assert code == 0, err
    assert json.loads(out)["return"][0]["node-name"] == "quorum0"
    code, out, err = ctl_run(srv, capsys, "qmp", "query-quorum-status", '{"node-name": "x"}')
    assert code == 1 and "node-name='x'" in err


def test_qmp_message_parsing() -> None:
    assert ctl.parse_message("query-version") == {"execute": "query-version"}
    assert ctl.parse_message("qmp_capabilities") == {"execute": "qmp_capabilities"}
    assert ctl.parse_message("x-quorum-scrub", '{"repair": true}') == {
        "execute": "x-quorum-scrub", "arguments": {"repair": True}}
    assert ctl.parse_message(' {"execute": "quit", "id": 3}') == {"execute": "quit", "id": 3}
    for bad, args, text in [("not json", None, "neither a command name nor JSON"),
                            ("[1]", None, "must be a JSON object"),
                            ("quit", "[1]", "must be a JSON object"),
                            ("quit", "{", "are not JSON"),
                            ('{"execute": "quit"}', "{}", "not a JSON message and more")]:
        with pytest.raises(ctl.UsageProblem, match=text):
            ctl.parse_message(bad, args)


def test_unknown_event_names_are_refused_at_once(tmp_path: Path, capsys: Any) -> None:
    # refused before connecting: no server is needed, nothing waits
    code = cli_main(["ctl", "--control", str(tmp_path / "none.sock"), "events",
                     "--name", "BOGUS"])
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown event 'BOGUS'" in err
    assert "QUORUM_REPORT_BAD" in err and "BLOCK_JOB_COMPLETED" in err


def test_event_names_in_any_case(srv: ThreadedServer, capsys: Any) -> None:
    result: list[int] = []

    def follow() -> None:
        result.append(ctl.main(["--control", str(srv.path), "events", "--count", "1",
                                "--name", "quorum_failure"]))

    t = threading.Thread(target=follow)
    t.start()
    for _ in range(2000):
        if not t.is_alive():
            break
        srv.call(srv.bus.emit, "QUORUM_FAILURE",
                 {"reference": "quorum0", "sectors-count": 1, "sector-num": 0})
        t.join(0.01)
    t.join(10)
    assert result == [0]
    assert json.loads(capsys.readouterr().out)["event"] == "QUORUM_FAILURE"


# --------------------------------------------------------------------------- health


def quorum(*children: dict[str, Any], threshold: int = 2, **more: Any) -> dict[str, Any]:
    kids = []
    for i, c in enumerate(children):
        kids.append({"child": f"children.{i}", "node-name": f"c{i}", "state": "active",
                     "reads": 0, "writes": 0, "read-errors": 0, "write-errors": 0,
                     "flush-errors": 0, "checksum-errors": 0, "repaired-bytes": 0,
                     "unsynced-bytes": 0, "errors": 0, "resync-failures": 0,
                     "filename": f"/img/c{i}.raw", **c})
    return {"node-name": "q", "vote-threshold": threshold, "read-pattern": "quorum",
            "rewrite-corrupted": False, "size": 16 << 20, "children": kids,
            "last-scrub": None, **more}


def test_health_healthy() -> None:
    assert ctl.diagnose(quorum({}, {}, {})) == ("healthy", [])


def test_health_names_checksum_errors_and_the_next_command() -> None:
    health, problems = ctl.diagnose(quorum({}, {"checksum-errors": 3}, {}))
    assert health == "degraded"
    assert problems == [("c1 has 3 checksum errors",
                         "run `nbdquorum ctl scrub --repair`, or "
                         "`nbdquorum ctl replace c1 NEW=PATH|URI`")]


def test_health_read_and_write_errors() -> None:
    health, problems = ctl.diagnose(quorum({"read-errors": 1, "write-errors": 2, "errors": 3},
                                           {}, {}))
    assert health == "degraded"
    ((status, action),) = problems
    assert status == "c0 has 1 read error and 2 write errors"
    assert "check the device behind c0" in action and "replace c0 NEW=PATH|URI" in action
    _, problems = ctl.diagnose(quorum({"checksum-errors": 1, "read-errors": 1,
                                       "flush-errors": 1, "errors": 2}, {}, {}))
    assert problems[0][0] == "c0 has 1 checksum error, 1 read error and 1 flush error"
    assert "scrub --repair" in problems[0][1]


def test_health_faulted_child() -> None:
    health, problems = ctl.diagnose(quorum({}, {}, {"state": "faulted", "errors": 20,
                                                    "read-errors": 20,
                                                    "fault-reason": "reached 20 errors"}))
    assert health == "degraded"
    assert problems[0] == (
        "c2 is faulted (reached 20 errors): it gets no I/O",
        "`nbdquorum ctl replace c2 NEW=PATH|URI`; or, once its device is fixed, "
        """`nbdquorum ctl qmp x-quorum-resync '{"node-name": "c2", "full": true}'`""")
    # a server without the reason: the count stands in for it
    _, problems = ctl.diagnose(quorum({}, {}, {"state": "faulted", "errors": 20}))
    assert problems[0][0] == "c2 is faulted (20 errors): it gets no I/O"


def test_health_of_a_remote_child_names_its_reason_and_its_link() -> None:
    """A child on another host: a fault gives its reason (an export of another size
    is no error count), and errors point at the link and the server, not a kernel log."""
    remote = {"filename": "nbd://10.0.0.2:10809/disk"}
    _, problems = ctl.diagnose(quorum({}, {}, {
        **remote, "state": "faulted", "errors": 0,
        "fault-reason": "the export has 33554432 bytes, the quorum 67108864"}))
    assert problems[0][0] == ("c2 is faulted (the export has 33554432 bytes, the quorum "
                              "67108864): it gets no I/O")
    assert "once its server or image is fixed" in problems[0][1]
    health, problems = ctl.diagnose(quorum({}, {}, {**remote, "write-errors": 1,
                                                    "errors": 1}))
    assert health == "degraded"
    assert problems[0][0] == "c2 has 1 write error"
    assert "check the link to c2's host and the NBD server there" in problems[0][1]
    assert "kernel log" not in problems[0][1]
    # hours later the count toward the fault limit has decayed: history, not degraded
    health, problems = ctl.diagnose(quorum({}, {}, {**remote, "write-errors": 1,
                                                    "errors": 0}))
    assert health == "healthy"
    assert problems == [("c2 had 1 write error, none lately",
                         "none needed; if more appear, `nbdquorum ctl replace c2 "
                         "NEW=PATH|URI`")]


def test_health_resyncing_child_with_progress() -> None:
    health, problems = ctl.diagnose(quorum({}, {}, {"state": "resyncing",
                                                    "unsynced-bytes": 12 << 20}))
    assert health == "degraded"
    assert problems == [("c2 is resyncing: 25.0% done, 12.0 MiB to go",
                         "none needed; it votes once in sync "
                         "(`nbdquorum ctl status q` shows the progress)")]
    _, problems = ctl.diagnose(quorum({}, {}, {"state": "resyncing", "unsynced-bytes": 1024,
                                               "resync-failures": 2,
                                               "resync-error": "Input/output error"}))
    assert problems[0][0].endswith("but its resync failed 2 times (last: Input/output error)")
    assert "replace c2 NEW=PATH|URI" in problems[0][1]


def test_health_below_the_threshold() -> None:
    health, problems = ctl.diagnose(quorum({}, {"state": "faulted"}, {"state": "faulted"}))
    assert health == "failed"
    assert problems[0][0] == ("only 1 of 3 children in sync, fewer than the vote threshold 2: "
                              "reads and writes fail")
    assert "`nbdquorum ctl threshold 1`" in problems[0][1]
    assert [p[0].split()[0] for p in problems[1:]] == ["c1", "c2"]


def test_health_commands_name_the_quorum_when_there_are_several() -> None:
    _, problems = ctl.diagnose(quorum({"checksum-errors": 1}, {}, {}), several=True)
    assert problems[0][1] == ("run `nbdquorum ctl scrub --repair --parent q`, or "
                              "`nbdquorum ctl replace c0 NEW=PATH|URI --parent q`")


def test_status_text_has_state_status_and_action_lines() -> None:
    text = ctl.format_status([quorum({}, {"checksum-errors": 3}, {})])
    lines = text.splitlines()
    assert lines[:3] == [
        "q: degraded",
        "  status: c1 has 3 checksum errors",
        "  action: run `nbdquorum ctl scrub --repair`, or `nbdquorum ctl replace c1 NEW=PATH|URI`",
    ]
    assert lines[3].startswith("  vote-threshold 2")


def test_last_scrub_line_is_readable_and_names_current_members_only(
        monkeypatch: Any) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        scrub = {"repair": False, "mismatched-regions": {"c1": 3, "gone": 7},
                 "mismatched-bytes": {"c1": 3 * 65536, "gone": 7 * 65536},
                 "unrecoverable-regions": 0, "scanned": 16 << 20, "cancelled": False,
                 "error": None, "finished": 1795630071.25}
        text = ctl.format_status([quorum({}, {}, {}, **{"last-scrub": scrub})])
        (line,) = [x for x in text.splitlines() if "last scrub" in x]
        assert line == ("  last scrub: check, completed 2026-11-25 18:07:51 UTC, "
                        "16.0 MiB scanned, c1: 3 regions (192.0 KiB) differ")
        assert "{" not in line and "gone" not in line and "1795630071" not in line
        clean = {**scrub, "repair": True, "mismatched-regions": {"gone": 1},
                 "cancelled": True}
        assert ctl.format_scrub(clean, ["c0", "c1"]) == (
            "repair, cancelled 2026-11-25 18:07:51 UTC, 16.0 MiB scanned, no mismatches")
        bad = {**scrub, "repair": True, "unrecoverable-regions": 2}
        assert ctl.format_scrub(bad, ["c1"]).endswith(
            "c1: 3 regions (192.0 KiB) repaired, 2 regions without a quorum (unrecoverable)")
    finally:
        monkeypatch.undo()
        time.tzset()


def test_status_of_a_live_server_with_checksum_errors(srv: ThreadedServer, capsys: Any) -> None:
    def hurt() -> None:
        srv.quorum.slots[1].stats.checksum_errors = 3

    srv.call(hurt)
    code, out, err = ctl_run(srv, capsys, "status")
    assert code == 0, err
    assert out.splitlines()[:3] == [
        "quorum0: degraded",
        "  status: child1 has 3 checksum errors",
        "  action: run `nbdquorum ctl scrub --repair`, or "
        "`nbdquorum ctl replace child1 NEW=PATH|URI`",
    ]


# --------------------------------------------------------------------------- query-block-jobs


def qmp_json(srv: ThreadedServer, capsys: Any, *argv: str) -> Any:
    code, out, err = ctl_run(srv, capsys, "qmp", *argv)
    assert code == 0, err
    reply = json.loads(out)
    return reply["return"]


def test_query_block_jobs_during_a_resync(jobsrv: ThreadedServer, capsys: Any) -> None:
    from nbdquorum.qmp.check import visit

    assert qmp_json(jobsrv, capsys, "query-block-jobs") == []
    code, _, err = ctl_run(jobsrv, capsys, "add", f"n3={jobsrv.image('n3.raw')}")
    assert code == 0, err
    qmp_json(jobsrv, capsys, "job-pause", '{"id": "resync-n3"}')  # holds it still
    (info,) = qmp_json(jobsrv, capsys, "query-block-jobs")
    visit("BlockJobInfo", info, "")  # every member and type as declared
    assert {k: info[k] for k in ("type", "device", "len", "busy", "paused", "speed",
                                 "io-status", "ready", "status", "auto-finalize",
                                 "auto-dismiss")} == {
        "type": "resync", "device": "resync-n3", "len": SIZE, "busy": False, "paused": True,
        "speed": 512 * 1024, "io-status": "ok", "ready": False, "status": "paused",
        "auto-finalize": True, "auto-dismiss": True}
    assert 0 <= info["offset"] <= SIZE
    (job,) = qmp_json(jobsrv, capsys, "query-jobs")  # the same job, in JobInfo's terms
    (again,) = qmp_json(jobsrv, capsys, "query-block-jobs")
    # (a region already being copied when the pause came may still finish in between)
    assert job["id"] == info["device"]
    assert info["offset"] <= job["current-progress"] <= again["offset"]
    qmp_json(jobsrv, capsys, "job-resume", '{"id": "resync-n3"}')
    (info,) = qmp_json(jobsrv, capsys, "query-block-jobs") or [{"status": "running",
                                                                 "busy": True,
                                                                 "paused": False}]
    assert (info["status"], info["busy"], info["paused"]) == ("running", True, False)


def test_query_block_jobs_without_jobs(srv: ThreadedServer, capsys: Any) -> None:
    assert qmp_json(srv, capsys, "query-block-jobs") == []  # as QEMU: never an error


# --------------------------------------------------------------------------- scrub


def test_scrub_repair_wait_prints_a_summary(jobsrv: ThreadedServer, capsys: Any) -> None:
    with open(jobsrv.tmp / "c1.raw", "r+b") as f:  # child1 differs, behind the server's back
        f.write(b"\x42" * 4096)
    code, out, err = ctl_run(jobsrv, capsys, "scrub", "--repair", "--wait")
    assert code == 0, err
    assert out.startswith("scrub of quorum0: repair, completed ")
    assert out.endswith(", 1.0 MiB scanned, child1: 1 region (4.0 KiB) repaired\n")
    assert err == "scrubbing quorum0 (repair) ...\n"  # not a terminal: no bar
    with open(jobsrv.tmp / "c1.raw", "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
    code, out, _ = ctl_run(jobsrv, capsys, "status")
    (line,) = [x for x in out.splitlines() if "last scrub" in x]
    assert "child1: 1 region (4.0 KiB) repaired" in line and "{" not in line
    code, out, _ = ctl_run(jobsrv, capsys, "scrub", "--wait", "--json")
    result = json.loads(out)
    assert result["parent"] == "quorum0" and result["job"] == "scrub-quorum0"
    assert result["last-scrub"]["mismatched-regions"] == {}


def test_scrub_without_wait_returns_at_once(jobsrv: ThreadedServer, capsys: Any) -> None:
    code, out, err = ctl_run(jobsrv, capsys, "scrub", "--speed", str(64 * 1024))
    assert code == 0, err
    assert out.startswith("started a scrub (check) of quorum0 as job scrub-quorum0;")
    code, out, err = ctl_run(jobsrv, capsys, "scrub")  # one at a time
    assert code == 1 and "scrub-quorum0" in err and "already in use" in err
    code, out, err = ctl_run(jobsrv, capsys, "qmp", "job-cancel", '{"id": "scrub-quorum0"}')
    assert code == 0, err


def test_scrub_progress_bar_on_a_terminal(jobsrv: ThreadedServer, capsys: Any,
                                          monkeypatch: Any) -> None:
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    code = cli_main(["ctl", "--control", str(jobsrv.path), "scrub", "--wait",
                     "--speed", str(512 * 1024)])
    out, _ = capsys.readouterr()
    assert code == 0, term.getvalue()
    assert out.startswith("scrub of quorum0: check, completed ")
    bar = term.getvalue()
    assert bar.endswith("\n")
    assert bar.rstrip().rsplit("\r", 1)[-1].startswith("scrub quorum0 [" + "#" * 30 + "] 100.0%")


def test_a_cancelled_scrub_exits_1(jobsrv: ThreadedServer, capsys: Any) -> None:
    result: list[int] = []

    def scrub() -> None:
        result.append(ctl.main(["--control", str(jobsrv.path), "scrub", "--wait",
                                "--speed", str(16 * 1024)]))

    t = threading.Thread(target=scrub)
    t.start()

    def running() -> bool:
        assert jobsrv.jobs is not None
        return "scrub-quorum0" in jobsrv.jobs.jobs

    for _ in range(1000):
        if jobsrv.call(running):
            break
        t.join(0.01)
    assert jobsrv.call(running)
    assert jobsrv.jobs is not None
    jobsrv.call(jobsrv.jobs.jobs["scrub-quorum0"].cancel)
    t.join(30)
    assert result == [1]
    out = capsys.readouterr().out
    assert out.startswith("scrub of quorum0: check, cancelled ")


def test_checksum_errors_a_completed_repair_scrub_dealt_with(monkeypatch: Any) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        scrub = {"repair": True, "mismatched-regions": {"c1": 3}, "mismatched-bytes": {},
                 "unrecoverable-regions": 0, "scanned": 16 << 20, "cancelled": False,
                 "error": None, "finished": 1795630071.0, "checksum-errors": {"c1": 3}}
        st = quorum({}, {"checksum-errors": 3}, {}, **{"last-scrub": scrub})
        health, problems = ctl.diagnose(st)
        assert health == "healthy"
        assert problems == [("c1 had 3 checksum errors, repaired by the scrub of "
                             "2026-11-25 18:07:51 UTC",
                             "none needed; if more appear, `nbdquorum ctl replace c1 NEW=PATH|URI`")]
        # more errors since the scrub: degraded again
        st["children"][1]["checksum-errors"] = 4
        assert ctl.diagnose(st)[0] == "degraded"
        # a check (not a repair), or a cancelled repair, repairs nothing
        for other in ({**scrub, "repair": False}, {**scrub, "cancelled": True}):
            st = quorum({}, {"checksum-errors": 3}, {}, **{"last-scrub": other})
            assert ctl.diagnose(st)[0] == "degraded"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_status_after_scrub_repair_on_a_live_server(jobsrv: ThreadedServer,
                                                    capsys: Any) -> None:
    def hurt() -> None:
        jobsrv.quorum.slots[1].stats.checksum_errors = 2

    jobsrv.call(hurt)
    assert ctl_run(jobsrv, capsys, "status")[1].startswith("quorum0: degraded\n")
    code, _, err = ctl_run(jobsrv, capsys, "scrub", "--repair", "--wait")
    assert code == 0, err
    out = ctl_run(jobsrv, capsys, "status")[1]
    assert out.startswith("quorum0: healthy\n  status: child1 had 2 checksum errors, "
                          "repaired by the scrub of ")


# --------------------------------------------------------------------------- status --json shape

#: Every member of `status --json` (query-quorum-status) that docs/qmp.md documents.
#: Scripts rely on them: this list may only grow. A rename or removal, in the code or in
#: the documentation, fails the test below.
PINNED_STATUS_MEMBERS: dict[str, set[str]] = {
    "QuorumStatus": {"node-name", "vote-threshold", "read-pattern", "rewrite-corrupted",
                     "size", "children", "last-scrub"},
    "QuorumChildStatus": {"child", "node-name", "filename", "state", "errors",
                          "unsynced-bytes", "resync-failures", "resync-error", "reads",
                          "writes", "read-errors", "write-errors", "flush-errors",
                          "checksum-errors", "repaired-bytes"},
    "QuorumScrubResult": {"repair", "mismatched-regions", "mismatched-bytes",
                          "unrecoverable-regions", "scanned", "cancelled", "error",
                          "finished", "checksum-errors"},
}
PINNED_CHILD_STATES = {"active", "resyncing", "faulted"}


def test_status_json_shape_is_documented_and_only_grows(
        jobsrv: ThreadedServer, capsys: Any) -> None:
    from nbdquorum.qmp.schema import EnumType, StructType, named_type

    documented: dict[str, dict[str, bool]] = {}
    for name, pinned in PINNED_STATUS_MEMBERS.items():
        t = named_type(name)
        assert isinstance(t, StructType)
        documented[name] = {m.name: m.optional for m in t.members}
        assert all(m.doc for m in t.members), f"{name}: a member without documentation"
        missing = pinned - set(documented[name])
        assert not missing, f"{name}: documented members removed or renamed: {missing}"
        assert "nothing is renamed or removed" in t.doc or "no member is renamed" in t.doc
    states = named_type("QuorumChildState")
    assert isinstance(states, EnumType) and set(states.values) >= PINNED_CHILD_STATES
    doc = (Path(__file__).resolve().parents[2] / "docs" / "qmp.md").read_text()
    assert "### QuorumChildStatus" in doc and "nothing is renamed or removed" in doc

    # the live answer: a resync that failed once (resync-error), after a scrub
    code, _, err = ctl_run(jobsrv, capsys, "scrub", "--wait")
    assert code == 0, err

    def fail_resync() -> None:
        slot = jobsrv.quorum.slots[2]
        slot.resync_failures, slot.resync_error = 1, "Input/output error"

    jobsrv.call(fail_resync)
    code, out, err = ctl_run(jobsrv, capsys, "status", "--json")
    assert code == 0, err
    (st,) = json.loads(out)
    objects = [("QuorumStatus", st), ("QuorumScrubResult", st["last-scrub"]),
               *(("QuorumChildStatus", c) for c in st["children"])]
    for name, obj in objects:
        # every documented member is there (optional ones may be absent) ...
        required = {m for m, optional in documented[name].items() if not optional}
        assert required <= set(obj), f"{name}: the server no longer sends {required - set(obj)}"
        # ... and every member sent is documented
        assert set(obj) <= set(documented[name]), (
            f"{name}: undocumented members {set(obj) - set(documented[name])}: document "
            "them in qmp/schema.py")
        assert PINNED_STATUS_MEMBERS[name] <= set(documented[name])
    assert "resync-error" in st["children"][2]
    assert {c["state"] for c in st["children"]} <= set(states.values)
