"""``serve --metrics HOST:PORT``: the server's numbers in Prometheus' text format.

A custom collector reads the live objects when scraped: the quorums' child
slots (state and the ChildStats counters), the running jobs, the NBD
server's request counters (nbd/stats.py: plain integers on the request
path, folded into cumulative histogram buckets here, off the hot path) and,
with worker processes, the totals they send to the primary over the control
channel (kept by the pool, a dead worker's last totals folded into a base).
The text is made by prometheus_client (its encoder on a registry of its
own: no process or platform collectors, whose numbers would describe the
primary alone) and served by a small asyncio HTTP handler on the server's
loop, so a scrape never reads the objects from another thread.

docs/monitoring.md describes every metric; docs/alerts.yml holds example
alert rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from nbdquorum.block.quorum import ChildSlot, ChildState, QuorumNode
from nbdquorum.jobs.job import Job
from nbdquorum.nbd.stats import BOUNDS_NS, CMD_NAMES, RequestStats
from nbdquorum.sockets import Listener, bind_tcp

if TYPE_CHECKING:
    from nbdquorum.block.graph import Graph
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.nbd.server import NBDServer
    from nbdquorum.worker.pool import WorkerPool

log = logging.getLogger(__name__)

PREFIX = "nbdquorum_"
#: commands that never appear as a request of their own (DISC has no reply)
_NOT_REQUESTS = frozenset({"disc"})
#: the `le` label of each bucket, cumulative upper bounds in seconds
_go_float = cast(Callable[[float], str], floatToGoString)  # untyped in the library
_LE = (*(_go_float(b / 1e9) for b in BOUNDS_NS), "+Inf")

#: the per-child counters: metric name (without prefix and _total), ChildStats
#: field, help text
CHILD_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("child_reads", "reads", "Read requests sent to the child (worker processes' included)."),
    ("child_writes", "writes", "Write, zero and trim requests sent to the child."),
    ("child_read_errors", "read_errors", "Reads of the child that returned an error."),
    ("child_write_errors", "write_errors",
     "Writes, zeroes and trims of the child that returned an error."),
    ("child_flush_errors", "flush_errors", "Flushes of the child that returned an error."),
    ("child_checksum_errors", "checksum_errors",
     "Reads whose bytes lost the vote (the child returned different data)."),
    ("child_repaired", "repaired_bytes",
     "Bytes rewritten on the child with the voted data (rewrite-corrupted, a repairing scrub)."),
)


@dataclass
class Sources:
    """Where the numbers live; the callables are read at every scrape."""

    quorums: Callable[[], Sequence[QuorumNode]]
    jobs: Callable[[], Sequence[Job]] = list
    #: this process's request counters and open client connections
    requests: Callable[[], RequestStats] = RequestStats
    connections: Callable[[], int] = int
    #: worker processes serving (0 without --workers)
    workers: Callable[[], int] = int


def server_sources(graph: Graph, jobs: JobManager, nbd: NBDServer,
                   pool: WorkerPool | None) -> Sources:
    """The sources of a running server (cli.serve); the workers' through the pool."""
    if pool is None:
        return Sources(quorums=graph.quorums, jobs=lambda: list(jobs.jobs.values()),
                       requests=lambda: nbd.stats, connections=nbd.clients)
    return Sources(
        quorums=graph.quorums,
        jobs=lambda: list(jobs.jobs.values()),
        requests=lambda: pool.requests.total(nbd.stats),
        connections=lambda: nbd.clients() + sum(w.conns for w in pool.workers),
        workers=lambda: sum(1 for w in pool.workers if w.ready),
    )


class ServerCollector(Collector):
    """Builds every nbdquorum_ metric family from Sources, at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: the families depend on the live graph

    def collect(self) -> Iterator[Metric]:
        yield from self._children()
        yield from self._jobs()
        yield from self._requests()
        conns = GaugeMetricFamily(PREFIX + "connections", "Open NBD client connections "
                                  "(on the primary and on the worker processes).")
        conns.add_metric([], self.sources.connections())
        yield conns
        workers = GaugeMetricFamily(PREFIX + "workers",
                                    "Worker processes serving connections (serve --workers).")
        workers.add_metric([], self.sources.workers())
        yield workers

    def _children(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            PREFIX + "child_state",
            "1 for the child's current state, 0 for the other states "
            f"({', '.join(s.value for s in ChildState)}).",
            labels=["node", "child", "state"])
        counters = [(CounterMetricFamily(PREFIX + name, text, labels=["node", "child"]), attr)
                    for name, attr, text in CHILD_COUNTERS]
        unsynced = GaugeMetricFamily(
            PREFIX + "child_unsynced_bytes",
            "Bytes the child still has to copy before it is in sync (resyncing children).",
            labels=["node", "child"])
        threshold = GaugeMetricFamily(
            PREFIX + "vote_threshold", "Children that must agree for a read or write to succeed.",
            labels=["node"])
        members = GaugeMetricFamily(PREFIX + "children", "Children of the quorum, any state.",
                                    labels=["node"])
        for q in self.sources.quorums():
            threshold.add_metric([q.node_name], q.vote_threshold)
            members.add_metric([q.node_name], len(q.slots))
            for slot in q.slots:
                labels = [q.node_name, slot.node.node_name]
                for s in ChildState:
                    state.add_metric([*labels, s.value], 1 if slot.state is s else 0)
                for family, attr in counters:
                    family.add_metric(labels, getattr(slot.stats, attr))
                unsynced.add_metric(labels, _unsynced(slot))
        yield state
        for family, _attr in counters:
            yield family
        yield unsynced
        yield threshold
        yield members

    def _jobs(self) -> Iterator[Metric]:
        # job_id, not job: Prometheus gives every series a `job` label of its own
        # (the scrape job) and would rename ours to exported_job
        progress = GaugeMetricFamily(
            PREFIX + "job_progress_bytes", "Bytes a running job (resync, scrub) has done.",
            labels=["job_id", "type", "device"])
        total = GaugeMetricFamily(
            PREFIX + "job_total_bytes",
            "Bytes a running job has to do (it may grow while the job runs).",
            labels=["job_id", "type", "device"])
        for job in self.sources.jobs():
            labels = [job.id, job.job_type, job.device]
            progress.add_metric(labels, job.current)
            total.add_metric(labels, job.total)
        yield progress
        yield total

    def _requests(self) -> Iterator[Metric]:
        st = self.sources.requests()
        count = CounterMetricFamily(PREFIX + "requests", "NBD requests served, per command.",
                                    labels=["cmd"])
        hist = HistogramMetricFamily(
            PREFIX + "request_duration_seconds",
            "Time from a request's arrival to its reply being queued, per NBD command.",
            labels=["cmd"])
        for i, cmd in enumerate(CMD_NAMES):
            if cmd in _NOT_REQUESTS:
                continue
            count.add_metric([cmd], st.counts[i])
            cumulative = 0
            buckets = []
            for le, n in zip(_LE, st.buckets[i], strict=True):
                cumulative += n
                buckets.append((le, float(cumulative)))
            hist.add_metric([cmd], buckets, st.sums[i] / 1e9)
        yield count
        yield hist


def _unsynced(slot: ChildSlot) -> int:
    return slot.sync.dirty_bytes() if slot.sync is not None else 0


def make_registry(sources: Sources) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(sources))
    return registry


# -- the HTTP endpoint ---------------------------------------------------------------------

#: a scraper has this long to send its request
REQUEST_TIMEOUT = 10.0
MAX_HEADER = 16 << 10
PATHS = ("/metrics", "/")


class MetricsServer:
    """GET /metrics (or /) on an asyncio server; every answer closes the connection."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.servers: list[asyncio.Server] = []
        self.listeners: list[Listener] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def serve_listener(self, li: Listener) -> None:
        """Serve a TCP socket bound by sockets.bind_tcp (closed by close())."""
        try:
            li.listen()
            server = await asyncio.start_server(self._client, sock=li.sock, limit=MAX_HEADER)
        except BaseException:
            li.close()
            raise
        self.listeners.append(li)
        self.servers.append(server)
        host, port = li.sock.getsockname()[:2]
        log.info("metrics on http://%s/metrics", f"[{host}]:{port}" if ":" in host
                 else f"{host}:{port}")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            status, body, ctype, head = await self._answer(reader)
            hdr = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
            writer.write(hdr.encode("ascii") + (b"" if head else body))
            await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str, bool]:
        text = "text/plain; charset=utf-8"
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                TimeoutError):
            return "400 Bad Request", b"expected an HTTP request\n", text, False
        line, *header_lines = request.decode("latin-1").split("\r\n")
        headers = dict(h.split(":", 1) for h in header_lines if ":" in h)
        accept = next((v for k, v in headers.items() if k.strip().lower() == "accept"), "")
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "400 Bad Request", b"expected an HTTP request\n", text, False
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", b"only GET and HEAD\n", text, False
        if target.split("?", 1)[0] not in PATHS:
            return "404 Not Found", b"the metrics are at /metrics\n", text, method == "HEAD"
        # the library picks the format: Prometheus' text format, or OpenMetrics when asked
        encode, ctype = choose_encoder(accept.strip())
        try:
            body = encode(self.registry)
        except Exception:
            log.exception("metrics: collecting failed")
            return "500 Internal Server Error", b"collecting the metrics failed\n", text, False
        return "200 OK", body, ctype, method == "HEAD"

    async def close(self) -> None:
        """Stop listening and end the scrapes in progress."""
        servers, self.servers = self.servers, []
        for s in servers:
            s.close()
        for li in self.listeners:
            li.close()
        for t in list(self._handlers):
            t.cancel()
        for s in servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()


async def start(host: str, port: int, sources: Sources) -> MetricsServer:
    """Serve the metrics of *sources* on HOST:PORT (every address it resolves to).

    Raises:
        OSError: naming the address (sockets.bind_tcp).
    """
    server = MetricsServer(make_registry(sources))
    listeners = bind_tcp(host, port)
    try:
        for li in listeners:
            await server.serve_listener(li)
    except BaseException:
        for li in listeners:
            li.close()
        await server.close()
        raise
    return server
