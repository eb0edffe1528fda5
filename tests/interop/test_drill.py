"""``nbdquorum drill`` end to end: every scenario on small images, and a drill that must fail.

Nothing is mocked: the drill starts real servers, writes with qemu-img (and, where FUSE
and loop devices work, makes an ext4 filesystem through nbdfuse and a loop device),
breaks a child, replaces it over QMP and verifies every byte.  Under CI=true the
filesystem part must run wherever /dev/fuse exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import MiB, nbdquorum_env, require, run
from .remote import require_netns

pytestmark = pytest.mark.timeout(600)

DEFAULT_SCENARIOS = ["flip", "zero", "truncate", "delete", "eio", "hang"]
CHILD_TIMEOUT = 2.0  # the drill's --child-timeout for its servers
SIZE = 16 * MiB


def drill(tmp_path: Path, *args: str, timeout: float = 500.0) -> subprocess.CompletedProcess[str]:
    require("qemu-img")
    return run([sys.executable, "-m", "nbdquorum", "drill", "--dir", str(tmp_path), *args],
               timeout=timeout, env=nbdquorum_env())


def report_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        pytest.fail(f"no JSON report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    assert isinstance(report, dict)
    return report


def assert_cleaned_up(tmp_path: Path) -> None:
    """No mount, loop device or scratch file is left behind."""
    with open("/proc/mounts") as f:
        mounts = [line for line in f if str(tmp_path) in line]
    assert mounts == []
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False)
    assert str(tmp_path) not in loops.stdout
    assert list(tmp_path.iterdir()) == []


def fs_expected() -> bool:
    return os.environ.get("CI") == "true" and os.path.exists("/dev/fuse")


def test_every_scenario_verifies(tmp_path: Path) -> None:
    proc = drill(tmp_path, "--size", "16M", "--json", "--timeout", "60")
    report = report_of(proc)
    if fs_expected():
        assert report["filesystem"], f"the fs part did not run: {report['filesystem_skipped']}"
    assert report["size"] == SIZE
    scenarios = {s["name"]: s for s in report["scenarios"]}
    assert list(scenarios) == DEFAULT_SCENARIOS
    failed = {n: (s["problems"], [op for op in s["client_ops"] if not op["ok"]])
              for n, s in scenarios.items() if not s["verified"]}
    assert failed == {}, proc.stderr[-6000:]
    assert proc.returncode == 0 and report["ok"] is True
    for name, s in scenarios.items():
        assert s["problems"] == []
        assert s["client_errors"] == 0, s["client_ops"]
        ops = [op["op"] for op in s["client_ops"]]
        assert all(op["ok"] for op in s["client_ops"])
        assert "read (degraded)" in ops and "write (degraded)" in ops
        assert "read (during the resync)" in ops and "read (after the repair)" in ops
        # plausible timings: found at once (the hang: after the child timeout), repaired fast
        detect = s["detect_seconds"]
        assert detect is not None, name
        if name == "hang":
            assert CHILD_TIMEOUT - 0.1 <= detect < CHILD_TIMEOUT + 5, detect
        else:
            assert 0 <= detect < 5, (name, detect)
        assert s["detected_by"].split()[1] == "b"
        assert 0 < s["repair_seconds"] < 60, s["repair_seconds"]
        assert s["resync_bytes"] == SIZE
        assert s["resync_mib_per_second"] > 0
        assert s["server_exit"] == 0
        # The broken child: faulted, or still active (outvoted) where only its contents
        # are wrong. A truncated image may be either: the degraded write re-extends the
        # file, and if that happens before the server's next health check (every 0.2s),
        # only the votes notice the hole.
        states = {"flip": {"active"}, "zero": {"active"}, "truncate": {"active", "faulted"}}
        assert s["failed_child_state"]["b"] in states.get(name, {"faulted"}), name
        checks = s["checks"]
        assert checks["data on a"] and checks["data on c"] and checks["data on b2"]
        assert checks["c == a"] and checks["b2 == a"] and checks["membership"]
        if report["filesystem"]:
            assert checks["filesystem"] and checks["e2fsck b2"], checks
            assert "mkfs+copy (before the fault)" in ops
        events = {e["event"] for e in s["events"]}
        assert {"QUORUM_REPORT_BAD", "JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED",
                "QUORUM_CHILD_STATE_CHANGE"} <= events
    assert_cleaned_up(tmp_path)


def test_quorum_loss_fails(tmp_path: Path) -> None:
    """Two of three children fail: clients see errors, the repair cannot resync, exit 1."""
    proc = drill(tmp_path, "--size", "16M", "--scenario", "quorum-loss", "--json",
                 "--timeout", "60")
    report = report_of(proc)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert report["ok"] is False
    if fs_expected():
        assert report["filesystem"]
    (s,) = report["scenarios"]
    assert s["name"] == "quorum-loss"
    assert s["verified"] is False
    assert s["client_errors"] >= 3, s["client_ops"]
    failed_ops = {op["op"] for op in s["client_ops"] if not op["ok"]}
    assert {"read (degraded)", "write (degraded)", "read (after the repair)"} <= failed_ops
    assert "Input/output error" in " ".join(op.get("error", "") for op in s["client_ops"])
    assert s["detect_seconds"] is not None
    assert s["repair_seconds"] is None
    assert any(p.startswith("repair failed: resync-b2 failed") for p in s["problems"]), s
    assert any(e["event"] == "QUORUM_FAILURE" for e in s["events"])
    assert_cleaned_up(tmp_path)


def test_hang_before_the_child_faults(tmp_path: Path) -> None:
    proc = drill(tmp_path, "--size", "4M", "--no-fs", "--scenario", "hang", "--json",
                 "--timeout", "15")
    report = report_of(proc)
    (s,) = report["scenarios"]
    assert s["problems"] == [] and s["client_errors"] == 0, s["problems"]
    assert proc.returncode == 0 and s["verified"]


def test_table_and_exit_code(tmp_path: Path) -> None:
    """Without --json: progress on stderr, the table on stdout."""
    proc = drill(tmp_path, "--size", "4M", "--no-fs", "--scenario", "eio")
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert "no filesystem: --no-fs" in lines[0]
    assert lines[1].split() == ["SCENARIO", "DETECT", "READ-BACK", "REPAIR", "RESYNC", "MiB/s",
                                "CLIENT", "ERRORS", "VERIFIED"]
    row = lines[2].split()
    assert row[0] == "eio" and row[-2:] == ["0", "yes"]
    assert lines[-1] == "PASS: every scenario verified, no client errors"
    assert "eio: event QUORUM_REPORT_BAD b read sector 0+" in proc.stderr
    assert "eio: event QUORUM_CHILD_STATE_CHANGE b2 resyncing -> active" in proc.stderr
    assert "eio: verified in" in proc.stderr
    assert_cleaned_up(tmp_path)


def test_usage_errors(tmp_path: Path) -> None:
    proc = drill(tmp_path, "--scenario", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = drill(tmp_path, "--size", "100000")
    assert proc.returncode == 2 and "multiple of 64 KiB" in proc.stderr


def test_a_missing_dir_is_refused_not_created(tmp_path: Path) -> None:
    """--dir names where the scratch directory goes: a missing one is one clear line and
    exit 2, and nothing is created (before: the folder was made and left behind)."""
    require("qemu-img")
    missing = tmp_path / "nonexistent" / "deeper"
    proc = run([sys.executable, "-m", "nbdquorum", "drill", "--dir", str(missing)],
               env=nbdquorum_env())
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"nbdquorum drill: error: --dir {missing}: no such directory (give an existing "
        "directory, or leave --dir out for the system's temporary directory)"], proc.stderr
    assert list(tmp_path.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("")
    proc = run([sys.executable, "-m", "nbdquorum", "drill", "--dir", str(afile)],
               env=nbdquorum_env())
    assert proc.returncode == 2 and "not a directory" in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- remote children

REMOTE_CHILD_TIMEOUT = 3.0  # the remote scenarios' --child-timeout


def state_changes(s: dict[str, Any], name: str) -> list[tuple[str, str]]:
    return [(e["data"]["previous"], e["data"]["state"]) for e in s["events"]
            if e["event"] == "QUORUM_CHILD_STATE_CHANGE" and e["data"]["node-name"] == name]


def assert_host_loss(s: dict[str, Any]) -> None:
    """What every host-loss run must show, however the host was lost."""
    assert s["kind"] == "host-loss"
    assert s["problems"] == [] and s["client_errors"] == 0, (s["problems"], s["client_ops"])
    assert s["verified"], s["checks"]
    assert all(s["checks"].values()) and {"data on a", "data on b", "data on c", "b == a",
                                          "c == a", "membership", "clean stop",
                                          "no stale source"} <= set(s["checks"])
    ops = {op["op"]: op for op in s["client_ops"]}
    loop = ops["write (loop: before, during and after the host loss)"]
    assert loop["ok"] and loop["passes"] >= 7, loop  # 3 before, 3 while away, 1 after
    assert ops["read (loop, meanwhile)"]["ok"]
    assert ops["read (after the catch-up)"]["ok"]
    tp = s["throughput_mib_per_second"]
    assert tp["before"] > 0 and tp["away"] > 0, tp
    # b came back by itself and caught up on what it missed only: less than the disk
    assert state_changes(s, "b")[-3:] == [("active", "unreachable"),
                                          ("unreachable", "resyncing"), ("resyncing", "active")]
    assert 0 < s["missed_bytes"] <= SIZE // 2, s["missed_bytes"]
    assert 0 < s["catch_up_bytes"] <= SIZE // 2, s["catch_up_bytes"]
    assert s["catch_up_seconds"] is not None and s["catch_up_job_seconds"] is not None
    assert s["server_exit"] == 0


def test_host_loss_in_a_network_namespace(tmp_path: Path) -> None:
    """b's host behind a veth pair goes silent mid-write: found after the child timeout,
    no client error, b catches up when the link is back. Under CI=true (root) the
    namespace variant must run."""
    require_netns()
    proc = drill(tmp_path, "--size", "16M", "--scenario", "host-loss", "--json",
                 "--timeout", "60")
    report = report_of(proc)
    (s,) = report["scenarios"]
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "in network namespace nbdqd-" in s["how"] and "link cut" in s["how"], s["how"]
    assert_host_loss(s)
    # a silent link is noticed by a request that times out, not sooner (one in flight
    # when the link went down may have been sent a moment before it)
    assert REMOTE_CHILD_TIMEOUT - 1 <= s["detect_seconds"] < REMOTE_CHILD_TIMEOUT + 10, s
    assert any(e["event"] == "QUORUM_REPORT_BAD" and e["data"]["node-name"] == "b"
               and "timed out" in e["data"].get("error", "") for e in s["events"])
    # the namespace, its veth and its claim are gone
    netns = s["how"].split("network namespace ")[1].split()[0]
    assert netns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                       text=True, check=True).stdout
    dev = netns.replace("nbdqd-", "nqd") + "h"
    assert dev not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True,
                                     text=True, check=True).stdout
    assert_cleaned_up(tmp_path)


def test_host_loss_with_a_killed_server(tmp_path: Path) -> None:
    """Without a namespace (--no-netns here; no root elsewhere) the host loss is a killed
    server on 127.0.0.1: the reset is noticed at once. The report is a table."""
    require("qemu-nbd")
    proc = drill(tmp_path, "--size", "16M", "--no-fs", "--scenario", "host-loss",
                 "--no-netns", "--timeout", "60")
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert "random data at 0 KiB+16.0 MiB" in lines[0], lines[0]
    assert lines[1].split() == ["SCENARIO", "DETECT", "MiB/s", "BEFORE", "MiB/s", "AWAY",
                                "CATCH-UP", "COPIED", "CLIENT", "ERRORS", "VERIFIED"]
    row = lines[2].split()
    assert row[0] == "host-loss" and row[-2:] == ["0", "yes"], lines
    assert "(no network namespace: --no-netns); lost: server killed (SIGKILL)" in lines[3]
    assert "child timeout 3s" in lines[3]
    assert lines[-1] == "PASS: every scenario verified, no client errors"
    assert "host-loss: event QUORUM_CHILD_STATE_CHANGE b active -> unreachable" in proc.stderr
    assert "host-loss: event QUORUM_CHILD_STATE_CHANGE b resyncing -> active" in proc.stderr
    assert_cleaned_up(tmp_path)
    proc = drill(tmp_path, "--size", "16M", "--no-fs", "--scenario", "host-loss",
                 "--no-netns", "--json", "--timeout", "60")
    (s,) = report_of(proc)["scenarios"]
    assert_host_loss(s)
    assert s["detect_seconds"] < REMOTE_CHILD_TIMEOUT, s["detect_seconds"]
    assert_cleaned_up(tmp_path)


def test_rolling_a_stale_member_never_becomes_a_source(tmp_path: Path) -> None:
    """c misses W1, the server restarts, b dies and the stale c returns: reads fail at
    threshold 2 (one child in sync), return W1 at threshold 1, and after everyone is
    back every child holds the last acknowledged writes."""
    require("qemu-nbd")
    proc = drill(tmp_path, "--size", "16M", "--no-fs", "--scenario", "rolling", "--json",
                 "--timeout", "60")
    report = report_of(proc)
    (s,) = report["scenarios"]
    assert proc.returncode == 0 and s["verified"], (s["problems"], proc.stderr[-6000:])
    assert s["kind"] == "rolling" and s["client_errors"] == 0
    steps = {st["step"]: st for st in s["steps"]}
    assert list(steps) == ["0", "1", "2", "3", "3b", "3c", "4"]
    assert steps["0"]["states"] == {"a": "active", "b": "active", "c": "active"}
    assert steps["1"]["states"] == {"a": "active", "b": "active", "c": "unreachable"}
    assert steps["2"]["states"] == {"a": "active", "b": "active", "c": "unreachable"}
    assert steps["3"]["states"] == {"a": "active", "b": "unreachable", "c": "resyncing"}
    assert steps["3"]["client"].startswith("read fails, as it must"), steps["3"]
    assert steps["3b"]["client"] == "read = W1", steps["3b"]
    assert steps["3c"]["states"] == {"a": "active", "b": "unreachable", "c": "active"}
    assert steps["4"]["states"] == {"a": "active", "b": "active", "c": "active"}
    checks = s["checks"]
    assert all(checks.values()) and {
        "c recorded stale", "c not in sync at start", "c caught up on W1", "no stale source",
        "membership", "data on a", "data on b", "data on c", "b == a", "c == a",
        "clean stop"} <= set(checks), checks
    # each returning child caught up on what it missed only
    assert 0 < s["catch_up_bytes"] < SIZE
    # (c's return happens as the server starts, before the drill's event watch is on)
    assert ("unreachable", "resyncing") in state_changes(s, "b")
    for name in ("b", "c"):
        assert state_changes(s, name)[-1] == ("resyncing", "active")
    assert any(e["event"] == "QUORUM_FAILURE" for e in s["events"])  # step 3's read
    assert_cleaned_up(tmp_path)
