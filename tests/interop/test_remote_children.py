"""Children on other hosts: NBD exports (qemu-nbd, nbdkit) as quorum children.

Each scenario starts real NBD servers (tests/interop/remote.py: on 127.0.0.1, or in a
network namespace behind a veth pair when the link must fail silently), an nbdquorum
server whose quorum has them as children, and real clients (qemu-io, fio with verify,
qemu.qmp).  Where QEMU can do the same, the scenario also runs against
qemu-storage-daemon with QEMU's nbd child.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    MiB,
    assert_identical,
    make_image,
    nbdquorum_cli,
    qemu_io,
    read_at,
    wait_until,
)
from .remote import (
    fio_verify_start,
    local_host_fixture,
    nbd_blockdev,
    nbdkit,
    qemu_nbd,
    remote_host_fixture,
    start_remote_quorum_fixture,
)
from .repair_fixtures import Qmp

__all__ = ["local_host_fixture", "remote_host_fixture", "start_remote_quorum_fixture"]

pytestmark = pytest.mark.timeout(180)

SIZE = 16 * MiB
TIMEOUT = 3.0  # --child-timeout of these servers: short, so faults show quickly


def start(start_remote_quorum: Any, tmp_path: Path, remote: dict[str, str], *,
          local: int = 2, extra: tuple[str, ...] = (), **kw: Any) -> tuple[Any, Qmp]:
    qmp_sock = tmp_path / f"qmp-{time.monotonic_ns()}.sock"
    srv = start_remote_quorum("nbdquorum", local=local, remote=remote, size=SIZE,
                              extra=["--control", str(qmp_sock), "--child-timeout",
                                     str(TIMEOUT), *extra], **kw)
    return srv, Qmp(qmp_sock)


def child(qmp: Qmp, name: str) -> dict[str, Any]:
    st = qmp.cmd("query-quorum-status")[0]
    return next(c for c in st["children"] if c["node-name"] == name)


def wait_state(qmp: Qmp, name: str, state: str, timeout: float = 30.0) -> None:
    wait_until(lambda: child(qmp, name)["state"] == state, timeout,
               f"{name} to be {state}: {child(qmp, name)}")


def completed(qmp: Qmp, device: str) -> dict[str, Any]:
    """The BLOCK_JOB_COMPLETED event of the job ``device`` (its id; waited for)."""
    def find() -> list[dict[str, Any]]:
        return [e for e in qmp.events if e["event"] == "BLOCK_JOB_COMPLETED"
                and e["data"]["device"] == device]
    return wait_until(find, 30, f"BLOCK_JOB_COMPLETED of {device}")[-1]  # type: ignore[no-any-return]


def images_of(srv: Any) -> list[Path]:
    return [p for p in srv.images if isinstance(p, Path)]


# --------------------------------------------------------------------------- joining


@pytest.mark.parametrize("server", ["qemu-nbd", "nbdkit"])
def test_an_nbd_export_on_the_command_line_is_a_child(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path, server: str) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = (qemu_nbd(local_host, img) if server == "qemu-nbd"
           else nbdkit(local_host, ["file", img]))
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x5a 1M 1M", "read -P 0x5a 1M 1M")
    assert read_at(img, 1 * MiB, 1 * MiB) == b"\x5a" * MiB
    node = next(n for n in qmp.cmd("query-named-block-nodes") if n["node-name"] == "far")
    assert node["drv"] == "nbd" and node["file"] == far.uri
    assert node["image"]["filename"] == far.uri and node["image"]["format"] == "nbd"
    assert node["x-link"]["connected"] is True
    assert child(qmp, "far")["state"] == "active"
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_blockdev_add_of_an_nbd_node_joins_and_resyncs(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    qemu_io(srv.uri(), "write -P 0x33 0 4M")
    img = make_image(tmp_path / "new.raw", SIZE)
    far = qemu_nbd(local_host, img)
    qmp.cmd("blockdev-add", **{k.replace("-", "_"): v
                               for k, v in nbd_blockdev(far.uri, "far").items()})
    qmp.cmd("x-blockdev-change", parent="quorum0", node="far")
    wait_state(qmp, "far", "active")
    qemu_io(srv.uri(), "read -P 0x33 0 4M")
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_nbd_nodes_are_refused_with_the_reason(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    _srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    small = qemu_nbd(local_host, make_image(tmp_path / "small.raw", SIZE // 2))
    ro = qemu_nbd(local_host, make_image(tmp_path / "ro.raw", SIZE), extra=["--read-only"])

    def add(name: str, uri: str) -> None:
        qmp.cmd("blockdev-add", **{k.replace("-", "_"): v
                                   for k, v in nbd_blockdev(uri, name).items()})

    add("small", small.uri)
    _cls, desc = qmp.error("x-blockdev-change", parent="quorum0", node="small")
    assert "size" in desc, desc
    port = local_host.port()
    _cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="nobody",
                          server={"type": "inet", "host": "127.0.0.1", "port": str(port)})
    assert desc == f"Failed to connect to '127.0.0.1:{port}': Connection refused", desc
    _cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="ro",
                          server={"type": "inet", "host": "127.0.0.1", "port": str(ro.port)},
                          export="disk")
    assert "read-only" in desc, desc
    cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="num",
                          server={"type": "inet", "host": "127.0.0.1", "port": ro.port})
    assert "port" in desc and cls == "GenericError", desc
    assert [c["node-name"] for c in qmp.cmd("query-quorum-status")[0]["children"]] == [
        "child0", "child1", "child2"]
    qmp.close()


def test_a_start_that_fails_closes_its_remote_children_quietly(
        local_host: Any, tmp_path: Path) -> None:
    """A start refused for another reason (here a missing image) with a remote child
    already connected: one clear error and exit 1; the connection is closed with the
    server, never logged as lost, never reconnecting, no pending task destroyed."""
    far = qemu_nbd(local_host, make_image(tmp_path / "far.raw", SIZE))
    proc = nbdquorum_cli("serve", "--child", f"a={tmp_path / 'missing.raw'}",
                         "--child", f"far={far.uri}", "--socket", str(tmp_path / "s.sock"))
    assert proc.returncode == 1, proc.stderr
    assert "missing.raw: no such file" in proc.stderr
    for noise in ("connection lost", "Task was destroyed", "Traceback", "ERROR"):
        assert noise not in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- failures


def test_a_killed_server_makes_the_child_unreachable_and_it_catches_up_when_back(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x11 0 8M")
    far.kill()
    # no client sees an error while two children agree
    qemu_io(srv.uri(), "write -P 0x22 2M 1M", "read -P 0x11 0 1M", "read -P 0x22 2M 1M")
    wait_state(qmp, "far", "unreachable")
    assert child(qmp, "far")["unsynced-bytes"] >= 1 * MiB
    bad = [e for e in qmp.events if e["event"] == "QUORUM_CHILD_STATE_CHANGE"
           and e["data"]["node-name"] == "far"]
    assert bad and bad[-1]["data"]["state"] == "unreachable"
    far.restart()
    wait_state(qmp, "far", "active")
    done = completed(qmp, "resync-far")
    assert done["data"]["len"] < SIZE, "a catch-up, not a full copy"
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_a_silent_link_holds_no_request_past_the_child_timeout(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path) -> None:
    host = remote_host()
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x44 0 4M")
    host.cut()  # packets vanish: no RST, no FIN
    t0 = time.monotonic()
    qemu_io(srv.uri(), "write -P 0x55 0 1M", "read -P 0x55 0 1M")
    took = time.monotonic() - t0
    assert took < TIMEOUT + 10, f"a request waited {took:.1f}s on a dead link"
    wait_state(qmp, "far", "unreachable")
    host.restore()
    wait_state(qmp, "far", "active", timeout=60)
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_a_failing_export_is_counted_and_faulted(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    flag = tmp_path / "fail-now"
    far = nbdkit(local_host, ["file", img, "error-pwrite-rate=100%", f"error-file={flag}"],
                 filters=["error"])
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri},
                     extra=("--max-errors", "3"))
    qemu_io(srv.uri(), "write -P 0x66 0 64k")
    flag.touch()
    for i in range(4):
        qemu_io(srv.uri(), f"write -P 0x67 {i * 65536} 64k")
    wait_state(qmp, "far", "faulted")
    assert child(qmp, "far")["write-errors"] >= 3
    qemu_io(srv.uri(), "read -P 0x67 0 256k")
    qmp.close()


def test_a_slow_export_is_still_a_child(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = nbdkit(local_host, ["file", img, "rdelay=100ms", "wdelay=100ms"], filters=["delay"])
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x77 0 1M", "read -P 0x77 0 1M")
    assert child(qmp, "far")["state"] == "active"
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_reconnect_delay_keeps_requests_waiting_for_a_server_that_comes_back(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img)
    opts = nbd_blockdev(far.uri, "far", {"reconnect-delay": 20})
    qmp.cmd("blockdev-add", **{k.replace("-", "_"): v for k, v in opts.items()})
    qmp.cmd("x-blockdev-change", parent="quorum0", node="far")
    wait_state(qmp, "far", "active")
    far.kill()
    time.sleep(0.5)  # the loss is noticed; requests now wait for the reconnection
    far.restart()
    qemu_io(srv.uri(), "write -P 0x12 0 1M")
    assert child(qmp, "far")["state"] == "active"
    assert not [e for e in qmp.events if e["event"] == "QUORUM_CHILD_STATE_CHANGE"
                and e["data"]["node-name"] == "far" and e["data"]["state"] == "unreachable"]
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_a_restart_while_the_remote_is_down_serves_and_catches_up_later(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x31 0 2M")
    qmp.close()
    assert srv.stop() == 0
    far.kill()
    srv.returncode = None
    srv.start()  # same state dir: the recorded membership, far down
    qmp = Qmp(Path(srv.extra[1]))
    qemu_io(srv.uri(), "write -P 0x32 4M 1M", "read -P 0x31 0 2M")
    wait_state(qmp, "far", "unreachable")
    far.restart()
    wait_state(qmp, "far", "active")
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_trim_reaches_a_remote_child_as_write_zeroes(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img, discard="ignore")  # qemu-nbd drops TRIM unless asked
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x41 0 1M", "discard 0 1M")
    assert read_at(img, 0, MiB) == bytes(MiB)
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_x_resync_missed_copies_only_what_a_returning_image_missed(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    qemu_io(srv.uri(), "write -P 0x51 0 8M")
    far.kill()
    qemu_io(srv.uri(), "write -P 0x52 0 1M")
    wait_state(qmp, "far", "unreachable")
    qmp.cmd("x-blockdev-child-del", parent="quorum0", child="far")
    qmp.cmd("blockdev-del", node_name="far")
    qemu_io(srv.uri(), "write -P 0x53 4M 1M")  # still recorded for the departed image
    far.restart()
    opts = nbd_blockdev(far.uri, "far2")
    qmp.cmd("blockdev-add", **{k.replace("-", "_"): v for k, v in opts.items()})
    qmp.cmd("x-blockdev-child-add", parent="quorum0", child="far2", x_resync="missed")
    wait_state(qmp, "far2", "active")
    done = completed(qmp, "resync-far2")
    assert done["data"]["len"] == 2 * MiB, done
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


# --------------------------------------------------------------------------- COLO


def test_colo_the_secondary_is_lost_and_returns_under_writes(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path) -> None:
    """COLO's layout: local image + the secondary's export, vote-threshold 1, fifo local
    first; fio verifies through the quorum while the secondary's host vanishes and returns."""
    host = remote_host()
    img = make_image(tmp_path / "secondary.raw", SIZE)
    sec = qemu_nbd(host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"secondary": sec.uri}, local=1,
                     vote_threshold=1, read_pattern="fifo")
    job = fio_verify_start(srv.uri(), tmp_path, runtime=12, size=8 * MiB)
    time.sleep(2)
    sec.kill()
    wait_state(qmp, "secondary", "unreachable")
    time.sleep(2)
    sec.restart()
    wait_state(qmp, "secondary", "active", timeout=60)
    job.result().check()
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


# --------------------------------------------------------------------------- the reference


def test_qsd_keeps_serving_when_its_nbd_child_dies_but_never_catches_it_up(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    """The same fault against qemu-storage-daemon with QEMU's nbd child: reads and writes
    go on; but the child is never reconnected (reconnect-delay 0) nor caught up."""
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(local_host, img)
    srv = start_remote_quorum("qsd", local=2, remote={"far": far.uri}, size=SIZE)
    qemu_io(srv.uri(), "write -P 0x61 0 1M")
    far.kill()
    qemu_io(srv.uri(), "write -P 0x62 0 1M", "read -P 0x62 0 1M")
    far.restart()
    qemu_io(srv.uri(), "write -P 0x63 2M 1M")
    assert read_at(img, 0, MiB) == b"\x61" * MiB, "QEMU never wrote to it again"


def test_removal_and_shutdown_never_wait_on_a_dead_link(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path) -> None:
    host = remote_host()
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(host, img)
    near = make_image(tmp_path / "near.raw", SIZE)
    far2 = qemu_nbd(host, near)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri, "far2": far2.uri},
                     local=3, vote_threshold=2)
    qemu_io(srv.uri(), "write -P 0x21 0 1M")
    host.cut()
    t0 = time.monotonic()
    qmp.cmd("x-blockdev-child-del", parent="quorum0", child="far")
    qmp.cmd("blockdev-del", node_name="far")
    assert time.monotonic() - t0 < 2.0, "removal waited on the dead link"
    qemu_io(srv.uri(), "write -P 0x22 0 1M")  # far2 is given up after the child timeout
    qmp.close()
    t0 = time.monotonic()
    assert srv.stop() == 0
    assert time.monotonic() - t0 < 10.0, "shutdown waited on the dead link"


def test_connecting_to_a_silent_host_is_bounded_and_blocks_nothing(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path) -> None:
    import threading

    host = remote_host()
    far = qemu_nbd(host, make_image(tmp_path / "far.raw", SIZE))
    srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    other = Qmp(Path(srv.extra[1]), name="other")
    host.cut()  # a connect() now hangs: no RST, no ICMP
    result: dict[str, Any] = {}

    def add() -> None:
        t0 = time.monotonic()
        result["error"] = qmp.error("blockdev-add", **{
            k.replace("-", "_"): v for k, v in nbd_blockdev(far.uri, "far").items()})
        result["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=add)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    assert other.cmd("query-version")  # the monitor answers while the connect hangs
    qemu_io(srv.uri(), "read 0 64k")  # and so does the export
    assert time.monotonic() - t0 < TIMEOUT
    t.join(60)
    assert "timed out" in result["error"][1], result
    assert result["seconds"] < TIMEOUT + 5, result
    host.restore()
    other.close()
    qmp.close()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.interop.tls_certs import make_certs

    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_qemu_nbd(local_host: Any, img: Path, pki: Path) -> Any:
    """qemu-nbd that requires TLS (its certificates: the test CA's server pair)."""
    return qemu_nbd(local_host, img, extra=[
        "--object", f"tls-creds-x509,id=tls0,dir={pki / 'server'},endpoint=server",
        "--tls-creds", "tls0"])


def test_a_child_over_tls_from_an_nbds_uri(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path, pki: Path) -> None:
    img = make_image(tmp_path / "far.raw", SIZE)
    far = tls_qemu_nbd(local_host, img, pki)
    uri = (f"nbds://127.0.0.1:{far.port}/disk?tls-certificates={pki / 'client'}")
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": uri})
    qemu_io(srv.uri(), "write -P 0x71 0 1M", "read -P 0x71 0 1M")
    assert read_at(img, 0, MiB) == b"\x71" * MiB
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_a_child_over_tls_from_tls_creds(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path, pki: Path) -> None:
    srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    qemu_io(srv.uri(), "write -P 0x72 0 2M")
    img = make_image(tmp_path / "far.raw", SIZE)
    far = tls_qemu_nbd(local_host, img, pki)
    server = {"type": "inet", "host": "127.0.0.1", "port": str(far.port)}
    _cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="plain", server=server,
                          export="disk")
    assert "tls" in desc.lower(), desc  # the server requires TLS: refused, with the reason
    _cls, desc = qmp.error("blockdev-add", driver="nbd", node_name="far", server=server,
                          export="disk", tls_creds="nosuch")
    assert desc == "No TLS credentials with id 'nosuch'", desc
    qmp.cmd("object-add", qom_type="tls-creds-x509", id="tls0", dir=str(pki / "client"),
            endpoint="client")
    qmp.cmd("blockdev-add", driver="nbd", node_name="far", server=server, export="disk",
            tls_creds="tls0")
    qmp.cmd("x-blockdev-change", parent="quorum0", node="far")
    wait_state(qmp, "far", "active")
    _cls, desc = qmp.error("object-del", id="tls0")
    assert "in use" in desc, desc
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


# --------------------------------------------------------------------------- more faults


@pytest.mark.parametrize("fault", ["kill", "cut"])
def test_fio_verifies_through_the_quorum_while_the_remote_fails_and_returns(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path, fault: str) -> None:
    """fio's writes are verified (crc32c) while the remote host's server dies (or its
    link goes silent) and comes back: no I/O error, no verify error, children identical."""
    host = remote_host()
    img = make_image(tmp_path / "far.raw", SIZE)
    far = qemu_nbd(host, img)
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri})
    job = fio_verify_start(srv.uri(), tmp_path, runtime=14, size=8 * MiB, name=fault)
    time.sleep(2)
    if fault == "kill":
        far.kill()
    else:
        host.cut()
    wait_state(qmp, "far", "unreachable")
    time.sleep(1)
    if fault == "kill":
        far.restart()
    else:
        host.restore()
    wait_state(qmp, "far", "active", timeout=60)
    job.result().check()
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img])


def test_an_idle_dead_link_is_noticed_without_io(
        start_remote_quorum: Any, remote_host: Any, tmp_path: Path) -> None:
    """TCP keepalive (idle 5 s, then 3 probes 2 s apart): a silent link with no request
    on it is noticed by itself, and the child leaves the vote before a client pays."""
    host = remote_host()
    far = qemu_nbd(host, make_image(tmp_path / "far.raw", SIZE))
    srv, qmp = start(start_remote_quorum, tmp_path, {"far": far.uri},
                     extra=("--child-timeout", "60"))
    host.cut()
    wait_state(qmp, "far", "unreachable", timeout=40)
    t0 = time.monotonic()
    qemu_io(srv.uri(), "write -P 0x19 0 64k", "read -P 0x19 0 64k")
    assert time.monotonic() - t0 < 5, "a client waited on the dead link"
    host.restore()
    wait_state(qmp, "far", "active", timeout=60)
    qmp.close()


def test_ctl_adds_and_replaces_with_nbd_uris(
        start_remote_quorum: Any, local_host: Any, tmp_path: Path) -> None:
    from .conftest import nbdquorum_cli

    srv, qmp = start(start_remote_quorum, tmp_path, {}, local=3)
    control = srv.extra[1]
    qemu_io(srv.uri(), "write -P 0x3c 0 2M")
    img1 = make_image(tmp_path / "r1.raw", SIZE)
    img2 = make_image(tmp_path / "r2.raw", SIZE)
    r1 = qemu_nbd(local_host, img1)
    r2 = qemu_nbd(local_host, img2)
    out = nbdquorum_cli("ctl", "--control", control, "add", f"r1={r1.uri}", "--wait",
                        timeout=60)
    assert out.returncode == 0, out.stderr
    assert child(qmp, "r1")["state"] == "active"
    out = nbdquorum_cli("ctl", "--control", control, "replace", "r1", f"r2={r2.uri}",
                        timeout=60)
    assert out.returncode == 0, out.stderr
    names = [c["node-name"] for c in qmp.cmd("query-quorum-status")[0]["children"]]
    assert names == ["child0", "child1", "child2", "r2"]
    qmp.close()
    assert srv.stop() == 0
    assert_identical([*images_of(srv), img1, img2])
