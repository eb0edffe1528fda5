"""The metrics: request counters (nbd/stats.py), the scrape-time collector and the
HTTP endpoint (metrics.py), on a real quorum of temp files and a real NBD server.

The exposition text is parsed back with prometheus_client's own parser, and
checked with ``promtool check metrics`` where the Debian package is installed
(tests/interop/test_metrics.py scrapes a running server).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nbdquorum import metrics
from nbdquorum.block.bitmap import RegionBitmap
from nbdquorum.block.graph import Graph
from nbdquorum.block.quorum import ChildState, QuorumNode
from nbdquorum.eventbus import EventBus
from nbdquorum.jobs.job import Job
from nbdquorum.nbd import stats as nbdstats
from nbdquorum.nbd.client import NBDClient
from nbdquorum.nbd.constants import Cmd
from nbdquorum.nbd.server import READ_CHUNK, SYNC_MAX, Export, NBDServer
from nbdquorum.nbd.stats import BOUNDS_NS, CMD_NAMES, NBUCKETS, RequestStats, WorkerRequests
from tests.ci import unavailable
from tests.unit.aiohelp import run

SIZE = 4 << 20
READ, WRITE, FLUSH = (CMD_NAMES.index(c) for c in ("read", "write", "flush"))


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """nbd/stats.py's clock, set by the test (nanoseconds)."""
    now = [0]
    monkeypatch.setattr(nbdstats, "clock", lambda: now[0])
    yield now


def recorded(st: RequestStats, cmd: int, duration_ns: int, now: list[int]) -> None:
    now[0] = 1_000_000_000_000
    st.record(cmd, now[0] - duration_ns)


# -- the counters ---------------------------------------------------------------------------


def test_record_counts_sums_and_buckets_by_upper_bound(fake_clock: list[int]) -> None:
    st = RequestStats()
    recorded(st, Cmd.READ, BOUNDS_NS[0], fake_clock)  # on the bound: that bucket (le)
    recorded(st, Cmd.READ, BOUNDS_NS[0] + 1, fake_clock)  # just above: the next
    recorded(st, Cmd.WRITE, 10**12, fake_clock)  # beyond every bound: +Inf
    recorded(st, 0x4242, 5, fake_clock)  # an unknown command: other
    assert st.counts[READ] == 2 and st.sums[READ] == 2 * BOUNDS_NS[0] + 1
    assert st.buckets[READ][0] == 1 and st.buckets[READ][1] == 1
    assert st.buckets[WRITE][-1] == 1 and sum(st.buckets[WRITE]) == 1
    assert st.counts[nbdstats.OTHER] == 1 and st.total() == 4


def test_snapshot_round_trips_and_rejects_what_it_does_not_make(fake_clock: list[int]) -> None:
    st = RequestStats()
    for d in (10, 10**5, 10**8):
        recorded(st, Cmd.FLUSH, d, fake_clock)
    back = RequestStats.from_snapshot(st.snapshot())
    assert (back.counts, back.sums, back.buckets) == (st.counts, st.sums, st.buckets)
    good = st.snapshot()
    bad: list[Any] = [
        None, {}, {**good, "cmds": ["read"]}, {**good, "counts": good["counts"][:-1]},
        {**good, "buckets": [b[:-1] for b in good["buckets"]]},
        {**good, "sums": [-1] * len(CMD_NAMES)}, {**good, "counts": ["1"] * len(CMD_NAMES)},
        {**good, "counts": [True] * len(CMD_NAMES)},
    ]
    for snap in bad:
        with pytest.raises(ValueError):
            RequestStats.from_snapshot(snap)


def test_a_dead_workers_counts_stay_in_the_sums(fake_clock: list[int]) -> None:
    here = RequestStats()
    recorded(here, Cmd.READ, 100, fake_clock)
    workers = WorkerRequests()
    w1, w1_again = object(), object()  # the worker, and the one started in its place
    mine = RequestStats()
    for _ in range(5):
        recorded(mine, Cmd.READ, 100, fake_clock)
    workers.update(w1, mine.snapshot())
    assert workers.total(here).counts[READ] == 6
    workers.retire(w1)  # killed: its last totals go into the base
    workers.retire(w1)  # twice is once
    assert workers.total(here).counts[READ] == 6
    fresh = RequestStats()
    recorded(fresh, Cmd.READ, 100, fake_clock)
    workers.update(w1_again, fresh.snapshot())  # the replacement starts from zero
    total = workers.total(here)
    assert total.counts[READ] == 7 and sum(total.buckets[READ]) == 7
    workers.update(w1_again, {"garbage": 1})  # logged and ignored
    assert workers.total(here).counts[READ] == 7


# -- the collector ----------------------------------------------------------------------------


class FakeJob(Job):
    job_type = "resync"


def quorum(tmp_path: Path) -> tuple[Graph, QuorumNode]:
    bus = EventBus()
    g = Graph(bus)
    kids = [g.open_raw_file(f"c{i}", str(tmp_path / f"c{i}.raw"), create_size=SIZE)
            for i in range(3)]
    q = QuorumNode("q0", kids, vote_threshold=2, bus=bus)
    g.add(q)
    return g, q


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples}


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian package prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=60, check=False)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and not out.strip(), f"promtool check metrics:\n{out}"


def test_collector_reports_children_jobs_requests_connections_workers(
    tmp_path: Path, fake_clock: list[int]
) -> None:
    g, q = quorum(tmp_path)
    try:
        c0, c1, c2 = q.slots
        c0.stats.reads, c0.stats.checksum_errors, c0.stats.repaired_bytes = 7, 2, 4096
        c1.stats.write_errors, c1.stats.read_errors, c1.stats.writes = 3, 1, 9
        c2.state = ChildState.RESYNCING
        c2.sync = RegionBitmap(SIZE, fill=True)
        job = FakeJob("resync-c2", "c2", g.bus)
        job.current, job.total = 1 << 20, SIZE
        st = RequestStats()
        for d in (20_000, 300_000, 300_000):
            recorded(st, Cmd.READ, d, fake_clock)
        recorded(st, Cmd.WRITE, 2 * 10**9, fake_clock)
        src = metrics.Sources(quorums=g.quorums, jobs=lambda: [job], requests=lambda: st,
                              connections=lambda: 4, workers=lambda: 2)
        text = generate_latest(metrics.make_registry(src))
        found = samples(text)
        p = "nbdquorum_"
        for child, current in (("c0", "active"), ("c1", "active"), ("c2", "resyncing")):
            for s in ChildState:
                assert value(found, p + "child_state", node="q0", child=child,
                             state=s.value) == (1 if s.value == current else 0)
        kid = {"node": "q0", "child": "c0"}
        assert value(found, p + "child_reads_total", **kid) == 7
        assert value(found, p + "child_checksum_errors_total", **kid) == 2
        assert value(found, p + "child_repaired_total", **kid) == 4096
        kid1 = {"node": "q0", "child": "c1"}
        assert value(found, p + "child_writes_total", **kid1) == 9
        assert value(found, p + "child_write_errors_total", **kid1) == 3
        assert value(found, p + "child_read_errors_total", **kid1) == 1
        assert value(found, p + "child_unsynced_bytes", node="q0", child="c2") == SIZE
        assert value(found, p + "child_unsynced_bytes", **kid) == 0
        assert value(found, p + "vote_threshold", node="q0") == 2
        assert value(found, p + "children", node="q0") == 3
        jl = {"job_id": "resync-c2", "type": "resync", "device": "c2"}
        assert value(found, p + "job_progress_bytes", **jl) == 1 << 20
        assert value(found, p + "job_total_bytes", **jl) == SIZE
        assert value(found, p + "requests_total", cmd="read") == 3
        assert value(found, p + "requests_total", cmd="write") == 1
        assert value(found, p + "requests_total", cmd="flush") == 0
        assert not any(n == p + "requests_total" and ("cmd", "disc") in lb for n, lb in found)
        h = p + "request_duration_seconds"
        assert value(found, h + "_bucket", cmd="read", le="2.5e-05") == 1
        assert value(found, h + "_bucket", cmd="read", le="0.00025") == 1
        assert value(found, h + "_bucket", cmd="read", le="0.0005") == 3  # cumulative
        assert value(found, h + "_bucket", cmd="read", le="+Inf") == 3
        assert value(found, h + "_count", cmd="read") == 3
        assert value(found, h + "_sum", cmd="read") == pytest.approx(620e-6)
        assert value(found, h + "_bucket", cmd="write", le="1.0") == 0
        assert value(found, h + "_bucket", cmd="write", le="2.5") == 1
        assert value(found, p + "connections") == 4
        assert value(found, p + "workers") == 2
        promtool_check(text)
    finally:
        g.close()


def test_a_quorum_change_shows_at_the_next_scrape(tmp_path: Path) -> None:
    g, q = quorum(tmp_path)
    try:
        registry = metrics.make_registry(metrics.Sources(quorums=g.quorums))
        before = samples(generate_latest(registry))
        q.slots[1].state = ChildState.FAULTED
        del q.slots[2]
        after = samples(generate_latest(registry))
        state = "nbdquorum_child_state"
        assert value(before, state, node="q0", child="c1", state="active") == 1
        assert value(after, state, node="q0", child="c1", state="faulted") == 1
        assert value(after, state, node="q0", child="c1", state="active") == 0
        assert ("nbdquorum_child_reads_total",
                frozenset({"node": "q0", "child": "c2"}.items())) not in after
    finally:
        g.close()


# -- the server's counting --------------------------------------------------------------------


def test_the_server_counts_client_requests_and_not_a_forwarding_connection(
    tmp_path: Path,
) -> None:
    g, q = quorum(tmp_path)

    async def client_on(nbd: NBDServer, counted: bool) -> tuple[NBDClient, asyncio.Task[None]]:
        here, there = socket.socketpair()
        serving = asyncio.create_task(nbd.serve_socket(here, internal=not counted))
        reader, writer = await asyncio.open_connection(sock=there, limit=READ_CHUNK)
        return await NBDClient.connect(reader, writer, "disk"), serving

    async def main() -> None:
        nbd = NBDServer({"disk": Export("disk", q)}, "disk")
        client, serving = await client_on(nbd, counted=True)
        fwd, fwd_serving = await client_on(nbd, counted=False)
        assert nbd.clients() == 1 and len(nbd.connections) == 2
        # small ones take the inline path, big ones a task: both are counted
        await client.call(Cmd.WRITE, 0, 4096, 0, b"\x11" * 4096)
        await client.call(Cmd.WRITE, 0, 2 * SYNC_MAX, 0, b"\x22" * (2 * SYNC_MAX))
        for length in (4096, 2 * SYNC_MAX, 512):
            await client.call(Cmd.READ, 0, length)
        await client.call(Cmd.FLUSH)
        with pytest.raises(OSError):  # out of range: an error reply, counted too
            await client.call(Cmd.READ, SIZE, 512)
        for _ in range(5):
            await fwd.call(Cmd.READ, 0, 4096)
            await fwd.call(Cmd.WRITE, 0, 4096, 0, b"\x33" * 4096)
        st = nbd.stats
        assert (st.counts[READ], st.counts[WRITE], st.counts[FLUSH]) == (4, 2, 1)
        assert st.total() == 7  # none of the forwarding connection's 10
        assert all(sum(b) == n for b, n in zip(st.buckets, st.counts, strict=True))
        assert all(len(b) == NBUCKETS for b in st.buckets)
        await client.close()
        await fwd.close()
        await nbd.shutdown(grace=5)
        await serving
        await fwd_serving

    try:
        run(main())
    finally:
        g.close()


# -- the HTTP endpoint ------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    if not request.endswith(b"\r\n\r\n"):
        writer.write_eof()
    raw = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return lines[0], headers, body


def test_endpoint_answers_get_head_and_refuses_the_rest(tmp_path: Path) -> None:
    g, _q = quorum(tmp_path)

    async def main() -> None:
        server = await metrics.start("127.0.0.1", 0, metrics.Sources(quorums=g.quorums))
        port = server.servers[0].sockets[0].getsockname()[1]
        status, headers, body = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == "HTTP/1.1 200 OK"
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert int(headers["Content-Length"]) == len(body)
        assert b'nbdquorum_child_state{child="c0",node="q0",state="active"} 1.0' in body
        status, headers, body = await http(
            port, b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; "
                  b"version=1.0.0,text/plain;q=0.5\r\n\r\n")
        assert headers["Content-Type"].startswith("application/openmetrics-text")
        assert body.endswith(b"# EOF\n")
        status, headers, body = await http(port, b"HEAD / HTTP/1.0\r\n\r\n")
        assert status == "HTTP/1.1 200 OK" and body == b"" and int(headers["Content-Length"]) > 0
        assert (await http(port, b"GET /nope HTTP/1.1\r\n\r\n"))[0].startswith("HTTP/1.1 404")
        assert (await http(port, b"POST /metrics HTTP/1.1\r\n\r\n"))[0].startswith(
            "HTTP/1.1 405")
        assert (await http(port, b"hello\r\n\r\n"))[0].startswith("HTTP/1.1 400")
        assert (await http(port, b"GET /metrics"))[0].startswith("HTTP/1.1 400")  # cut short
        # a scraper that sends nothing holds no stop up
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(1000):
            if server._handlers:
                break
            await asyncio.sleep(0.01)
        await asyncio.wait_for(server.close(), 10)
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        idle_writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    try:
        run(main())
    finally:
        g.close()


def test_a_busy_port_is_an_oserror(tmp_path: Path) -> None:
    async def main() -> None:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(OSError):
                await metrics.start("127.0.0.1", port, metrics.Sources(quorums=list))

    run(main())


def test_monitoring_md_lists_every_metric_the_collector_makes(tmp_path: Path) -> None:
    g, _q = quorum(tmp_path)
    try:
        job = FakeJob("resync-c2", "c2", g.bus)
        src = metrics.Sources(quorums=g.quorums, jobs=lambda: [job])
        made = {f.name + ("_total" if f.type == "counter" else "")
                for f in text_string_to_metric_families(
                    generate_latest(metrics.make_registry(src)).decode())}
    finally:
        g.close()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "monitoring.md").read_text()
    listed = set(re.findall(r"^\| `(nbdquorum_\w+)` \|", doc, re.MULTILINE))
    assert listed == made
