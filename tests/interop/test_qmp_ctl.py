"""``nbdquorum ctl`` against a real server: the operator's workflow and its exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from .qmp_fixtures import (
    QUORUM,
    StartTarget,
    Target,
    arun,
    both_targets,
    corrupt,
    ctl,
    execute,
    make_image,
    nbdquorum_env,
    qemu_io,
    qmp_client,
    qmp_target_fixture,  # noqa: F401  (the qmp_target fixture)
    shape,
)

KiB = 1024


def status(t: Target) -> dict[str, Any]:
    proc = ctl(t.qmp, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    (st,) = json.loads(proc.stdout)
    assert isinstance(st, dict)
    return st


def test_status_table(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    qemu_io(t.uri, "write -P 0x32 0 64k", "read -P 0x32 0 64k")
    proc = ctl(t.qmp, "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{QUORUM}: healthy"
    assert "vote-threshold 2" in lines[1]
    header = lines[2].split()
    assert header[:3] == ["EDGE", "NODE", "STATE"] and "CKSUM" in header
    rows = [line.split() for line in lines[3:6]]
    assert [r[:3] for r in rows] == [[f"children.{i}", f"child{i}", "active"] for i in range(3)]
    reads = header.index("READS")
    assert all(int(r[reads]) >= 1 for r in rows)


def test_add_remove_replace_threshold(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    qemu_io(t.uri, "write -P 0x32 0 1M", "flush")
    spare = make_image(t.tmp / "spare.raw")
    proc = ctl(t.qmp, "add", f"spare={spare}", "--wait", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"parent": QUORUM, "added": "spare",
                                       "filename": str(spare)}
    children = status(t)["children"]
    assert [c["node-name"] for c in children][-1] == "spare"
    assert all(c["state"] == "active" for c in children)
    with open(spare, "rb") as f:
        assert f.read(1 << 20) == b"\x32" * (1 << 20)  # resynced before --wait returned

    proc = ctl(t.qmp, "threshold", "3")
    assert (proc.returncode, proc.stdout) == (0, f"{QUORUM}: vote-threshold 3 (was 2)\n")
    assert status(t)["vote-threshold"] == 3

    fresh = make_image(t.tmp / "fresh.raw")
    proc = ctl(t.qmp, "replace", "child1", f"fresh={fresh}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (f"replaced child1 with fresh in {QUORUM}: done "
                           "(fresh in sync, child1 removed)\n")
    names = [c["node-name"] for c in status(t)["children"]]
    assert names == ["child0", "child2", "spare", "fresh"]
    with open(fresh, "rb") as f:
        assert f.read(1 << 20) == b"\x32" * (1 << 20)  # replace waited for the resync

    proc = ctl(t.qmp, "remove", "spare")
    assert (proc.returncode, proc.stdout) == (0, f"removed spare from {QUORUM} and closed it\n")
    proc = ctl(t.qmp, "remove", "child0")
    assert proc.returncode == 1
    assert "lower than the vote threshold 3" in proc.stderr
    qemu_io(t.uri, "read -P 0x32 0 1M")


def test_exit_codes(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    proc = ctl(t.qmp, "threshold", "9")
    assert (proc.returncode, proc.stderr) == (
        1, "nbdquorum ctl: threshold may not exceed children count\n")
    proc = ctl(t.qmp, "add", f"bad={t.tmp / 'missing.raw'}")
    assert proc.returncode == 1 and "No such file or directory" in proc.stderr
    assert ctl(t.qmp, "qmp", "{not json").returncode == 2
    assert ctl(t.qmp, "frobnicate").returncode == 2
    assert ctl(t.tmp / "nosuch.sock", "status").returncode == 3
    proc = ctl(t.qmp, "qmp", '{"execute": "query-version", "id": 1}')
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["return"]["package"] == "nbdquorum 0.1.0"
    proc = ctl(t.qmp, "qmp", '{"execute": "nope", "id": 1}')
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["class"] == "CommandNotFound"


def test_events_follows_a_corruption(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    qemu_io(t.uri, "write -P 0x32 0 64k", "flush")
    corrupt(t.images[2], 0, 64 * KiB, 0x42)
    follower = subprocess.Popen(
        [sys.executable, "-m", "nbdquorum", "ctl", "--control", str(t.qmp), "events",
         "--count", "1", "--name", "QUORUM_REPORT_BAD"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=nbdquorum_env())
    try:
        # the follower may not be connected yet: read until it has seen an event
        for _ in range(200):
            qemu_io(t.uri, "read -P 0x32 0 64k")
            try:
                follower.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                corrupt(t.images[2], 0, 64 * KiB, 0x42)
        out, err = follower.communicate(timeout=10)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 0, err
    (line,) = out.decode().splitlines()
    ev = json.loads(line)
    assert ev["event"] == "QUORUM_REPORT_BAD" and ev["data"]["node-name"] == "child2"


#: query-block-jobs' answer for one running job, as qemu-storage-daemon 7.2 gives it
BLOCK_JOB_SHAPE = {"type": "str", "device": "str", "len": "number", "offset": "number",
                   "busy": "bool", "paused": "bool", "speed": "number", "io-status": "str",
                   "ready": "bool", "status": "str", "auto-finalize": "bool",
                   "auto-dismiss": "bool"}


@both_targets
def test_query_block_jobs_while_a_job_runs(qmp_target: StartTarget, target: str) -> None:
    """nbdquorum: during the resync of a new child; qsd: during a slow backup job.

    Both through qemu.qmp's client; both answers must have QEMU's BlockJobInfo shape."""
    t = qmp_target(target, extra=["--resync-speed", str(1 << 20)] if target == "nbdquorum"
                   else [])
    if target == "nbdquorum":  # data for the resync to copy (zero ranges are skipped at once)
        qemu_io(t.uri, "write -P 0x5c 0 16M", "flush")

    async def main() -> dict[str, Any]:
        async with qmp_client(t.qmp) as qmp:
            assert await execute(qmp, "query-block-jobs") == []
            image = make_image(t.tmp / "new.raw")
            await execute(qmp, "blockdev-add", {"driver": "raw", "node-name": "new", "file": {
                "driver": "file", "filename": str(image)}})
            if target == "nbdquorum":
                await execute(qmp, "x-blockdev-child-add", {"parent": QUORUM, "child": "new"})
                job = "resync-new"
            else:
                await execute(qmp, "blockdev-backup", {"job-id": "b0", "device": QUORUM,
                                                       "target": "new", "sync": "full",
                                                       "speed": 1})
                job = "b0"
            (info,) = await execute(qmp, "query-block-jobs")
            assert info["device"] == job and info["status"] == "running", info
            await execute(qmp, "job-pause", {"id": job})
            (paused,) = await execute(qmp, "query-block-jobs")
            assert paused["paused"] is True
            await execute(qmp, "job-cancel", {"id": job})
            return dict(info)

    info = arun(main())
    assert shape(info) == BLOCK_JOB_SHAPE
    assert info["len"] == 16 << 20 and 0 <= info["offset"] <= info["len"]
    assert info["type"] == ("resync" if target == "nbdquorum" else "backup")
    assert (info["io-status"], info["ready"], info["auto-finalize"], info["auto-dismiss"]) == (
        "ok", False, True, True)


def test_operator_finds_and_repairs_a_corrupted_child(qmp_target: StartTarget) -> None:
    """status names the problem and the command; scrub --repair --wait repairs it."""
    t = qmp_target("nbdquorum")
    qemu_io(t.uri, "write -P 0x32 0 64k", "flush")
    corrupt(t.images[2], 0, 64 * KiB, 0x42)
    qemu_io(t.uri, "read -P 0x32 0 64k")  # child2 loses the vote: a checksum error
    proc = run_ctl_after(t, "status")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{QUORUM}: degraded"
    assert lines[1].startswith("  status: child2 has ") and "checksum error" in lines[1]
    assert lines[2] == ("  action: run `nbdquorum ctl scrub --repair`, or "
                        "`nbdquorum ctl replace child2 NEW=PATH|URI`")

    proc = ctl(t.qmp, "scrub", "--repair", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"scrub of {QUORUM}: repair, completed ")
    assert "16.0 MiB scanned" in proc.stdout and "child2: 1 region (64.0 KiB) repaired" in (
        proc.stdout)
    with open(t.images[2], "rb") as f:
        assert f.read(64 * KiB) == b"\x32" * (64 * KiB)

    lines = ctl(t.qmp, "status").stdout.splitlines()
    assert lines[0] == f"{QUORUM}: healthy"
    assert lines[1].startswith("  status: child2 had ") and "repaired by the scrub" in lines[1]
    (scrub,) = [x for x in lines if "last scrub:" in x]
    assert "{" not in scrub and "child2: 1 region (64.0 KiB) repaired" in scrub


def run_ctl_after(t: Target, *args: str) -> Any:
    """ctl with --control after the subcommand, as an operator may type it."""
    from .qmp_fixtures import run

    return run([sys.executable, "-m", "nbdquorum", "ctl", *args, "--control", str(t.qmp)],
               timeout=60, env=nbdquorum_env())


def test_ctl_usage_at_3am(qmp_target: StartTarget) -> None:
    t = qmp_target("nbdquorum")
    # an unknown event name fails at once, naming the known ones (it used to wait forever)
    proc = ctl(t.qmp, "events", "--name", "BOGUS", timeout=30)
    assert proc.returncode == 2
    assert "unknown event 'BOGUS'" in proc.stderr and "QUORUM_REPORT_BAD" in proc.stderr
    # a bare command name, and one with arguments
    proc = ctl(t.qmp, "qmp", "query-version")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["return"]["package"] == "nbdquorum 0.1.0"
    proc = ctl(t.qmp, "qmp", "query-quorum-status", json.dumps({"node-name": QUORUM}))
    assert json.loads(proc.stdout)["return"][0]["node-name"] == QUORUM
    # the removed child is no longer named in the last scrub line
    assert ctl(t.qmp, "scrub", "--wait").returncode == 0
    spare = make_image(t.tmp / "spare.raw")
    assert ctl(t.qmp, "add", f"spare={spare}", "--wait").returncode == 0
    proc = run_ctl_after(t, "remove", "child0")
    assert (proc.returncode, proc.stdout) == (0, f"removed child0 from {QUORUM} and closed it\n")
    out = run_ctl_after(t, "status").stdout
    assert out.startswith(f"{QUORUM}: healthy\n")
    (scrub,) = [x for x in out.splitlines() if "last scrub:" in x]
    assert "no mismatches" in scrub and "child0" not in out
