"""``nbdquorum serve``: open the children, build the quorum, serve NBD (and QMP) until stopped."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nbdquorum.block.errors import GraphError
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import ChildState, QuorumNode, ReadPattern
from nbdquorum.eventbus import Event, EventBus
from nbdquorum.nbd.tls import TLSConfig, TLSConfigError, TLSContexts
from nbdquorum.qmp.events import wired
from nbdquorum.ratelimit import Burst
from nbdquorum.remote.child import NBDChild
from nbdquorum.remote.uri import AddressError, is_uri, parse_uri
from nbdquorum.runtime import MALLOC_HEAP_MAX, parse_size, run_loop, setup_logging
from nbdquorum.sockets import Listener, bind_tcp, bind_unix, inherited

if TYPE_CHECKING:
    from nbdquorum.state import StateStore

log = logging.getLogger("nbdquorum")




class UsageError(Exception):
    """A problem with the command line or its files: one line, exit 1."""


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return (host.strip("[]") or "127.0.0.1"), int(port)


def parse_mode(text: str) -> int:
    """An octal permission mode: 660, 0660, 0o660."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an octal mode such as 0660, got {text!r}"
                                         ) from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is not within 0..0777")
    return mode


def parse_group(text: str) -> int:
    """A group name or a numeric gid."""
    import grp

    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such group {text!r}") from None


@dataclass
class ChildSpec:
    name: str  # node-name
    path: str  # image file


def parse_child(text: str, index: int) -> ChildSpec:
    name, sep, path = text.partition("=")
    if not sep or "/" in name or not name:
        return ChildSpec(f"child{index}", text)
    return ChildSpec(name, path)


@dataclass
class ServeConfig:
    children: list[ChildSpec]
    size: int | None = None
    vote_threshold: int | None = None
    read_pattern: str = "quorum"
    rewrite_corrupted: bool = False
    node_name: str = "quorum0"
    export_name: str = "disk"
    listen: tuple[str, int] | None = None
    socket: str | None = None
    control: str | None = None
    state_dir: str | None = None
    read_only: bool = False
    max_errors: int = 20
    child_timeout: float = 30.0
    resync_speed: int = 0
    intent_interval: float = 5.0
    health_interval: float = 1.0
    reset_state: bool = False
    fault_injection: bool = False
    #: worker processes that take a share of the connections (0: none)
    workers: int = 0
    #: the primary serves no client connection itself while a worker is up
    workers_take_all: bool = False
    #: HTTP address of the Prometheus metrics endpoint (metrics.py)
    metrics: tuple[str, int] | None = None
    #: request bytes in flight over the whole server (split between processes)
    memory_budget: int = 64 << 20
    #: per client connection: requests, request bytes, unsent reply bytes
    max_client_requests: int = 16
    max_client_bytes: int = 16 << 20
    max_client_backlog: int = 1 << 20
    #: --tls, --tls-certificates, --tls-verify-peer, --tls-authz-dn (nbd/tls.py)
    tls: TLSConfig = field(default_factory=TLSConfig)
    #: seconds a client has to choose an export (0: no limit)
    handshake_timeout: float = 10.0
    #: client connections open at once, over every process (0: no limit)
    max_connections: int = 1024
    #: --socket's permission bits and group (gid); None: the umask's, the process's
    socket_mode: int | None = None
    socket_group: int | None = None
    verbose: int = 0
    extra: dict[str, object] = field(default_factory=dict)
    #: node-names whose images did not exist and were created blank (--size)
    created: set[str] = field(default_factory=set)


def apply_state(cfg: ServeConfig, state: dict[str, Any], state_dir: str) -> ServeConfig:
    """Take the membership and options recorded in the state dir.

    The state records the live membership, which QMP may have changed since
    the command line was written; a command line that names other children
    or options is refused with the way out spelled out.
    """
    rec = [ChildSpec(c["node-name"], c["filename"]) for c in state["children"]]
    qstate = state["quorum"]
    if cfg.children:
        given = [(c.name, c.path if is_uri(c.path) else os.path.abspath(c.path))
                 for c in cfg.children]
        recorded = [(c.name, c.path) for c in rec]
        if sorted(given) != sorted(recorded):

            def fmt(xs: list[tuple[str, str]]) -> str:
                return ", ".join(f"{n}={p}" for n, p in xs)

            raise UsageError(
                f"{state_dir} records the children {fmt(recorded)} (the live membership, "
                f"perhaps changed over QMP), but the command line gives {fmt(given)}. "
                "Run without --child to use the recorded membership, or pass --reset-state "
                "to discard the recorded state (children then start active, unsynced)."
            )
    for opt, key in (("vote_threshold", "vote-threshold"), ("node_name", "node-name")):
        val = getattr(cfg, opt)
        if opt in cfg.extra and val != qstate[key]:
            raise UsageError(
                f"--{opt.replace('_', '-')} {val} disagrees with {state_dir}, which records "
                f"{qstate[key]} (changed live?). Drop the option, or pass --reset-state."
            )
    cfg.children = rec
    cfg.vote_threshold = int(qstate["vote-threshold"])
    cfg.node_name = str(qstate["node-name"])
    if "read_pattern" not in cfg.extra:
        cfg.read_pattern = str(qstate["read-pattern"])
    if "rewrite_corrupted" not in cfg.extra:
        cfg.rewrite_corrupted = bool(qstate["rewrite-corrupted"])
    return cfg


async def open_remote_children(cfg: ServeConfig, recorded_size: int | None
                               ) -> dict[str, NBDChild]:
    """Connect the children given as NBD URIs (the others are files).

    At a first start a child that cannot be reached is an error (its size is
    unknown); on a restart with a recorded state it starts unreachable and is
    connected in the background (it then catches up on what it missed).
    """
    out: dict[str, NBDChild] = {}
    try:
        for spec in cfg.children:
            if not is_uri(spec.path):
                continue
            try:
                address = parse_uri(spec.path)
            except AddressError as err:
                raise UsageError(f"child {spec.name}: {err}") from err
            node = NBDChild(spec.name, address, timeout=cfg.child_timeout, size=recorded_size,
                            read_only=cfg.read_only)
            out[spec.name] = node
            try:
                await node.open()
            except OSError as err:
                if recorded_size is None:
                    raise UsageError(f"child {spec.name}: {err.strerror or err}") from err
                log.warning("child %s: %s; it starts unreachable and is connected again in "
                            "the background", spec.name, err.strerror or err)
                node.start_offline(str(err.strerror or err))
    except BaseException:
        for node in out.values():
            node.close()
        raise
    return out


def build_graph(cfg: ServeConfig, bus: EventBus,
                remote: dict[str, NBDChild] | None = None) -> tuple[Graph, QuorumNode]:
    """Open the children and the quorum, with the checks an operator needs."""
    remote = remote or {}
    graph = Graph(bus)
    sizes: dict[str, int] = {}
    for spec in cfg.children:
        if spec.name in remote:
            sizes[spec.path] = remote[spec.name].size()
            continue
        exists = os.path.exists(spec.path)
        if not exists and cfg.size is None:
            raise UsageError(f"{spec.path}: no such file (give --size to create missing images)")
        if exists:
            sizes[spec.path] = os.stat(spec.path).st_size
        else:
            cfg.created.add(spec.name)
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"{p}={s}" for p, s in sizes.items())
        raise UsageError(f"children differ in size: {detail}")
    if cfg.size is not None and sizes and next(iter(sizes.values())) != cfg.size:
        detail = ", ".join(f"{p}={s}" for p, s in sizes.items())
        raise UsageError(f"--size {cfg.size} differs from existing images: {detail}")
    names = [c.name for c in cfg.children]
    if len(set(names)) != len(names):
        raise UsageError(f"duplicate child node-names: {names}")
    n = len(cfg.children)
    threshold = cfg.vote_threshold if cfg.vote_threshold is not None else n // 2 + 1
    if not 1 <= threshold <= n:
        raise UsageError(f"--vote-threshold {threshold} must be between 1 and the number of children ({n})")
    children: list[BlockNode] = []
    try:
        for spec in cfg.children:
            if cfg.fault_injection:
                from nbdquorum.block.faulty import FaultyNode

                if spec.name in remote:
                    inner: BlockNode = remote[spec.name]
                    inner.node_name = f"{spec.name}-nbd"
                    graph.add(inner)
                else:
                    inner = graph.open_raw_file(f"{spec.name}-raw", spec.path,
                                                read_only=cfg.read_only, create_size=cfg.size)
                inner.owned_by_monitor = False
                children.append(graph.add(FaultyNode(spec.name, inner)))
            elif spec.name in remote:
                children.append(graph.add(remote[spec.name]))
            else:
                children.append(
                    graph.open_raw_file(
                        spec.name, spec.path, read_only=cfg.read_only, create_size=cfg.size
                    )
                )
        quorum = QuorumNode(
            cfg.node_name,
            children,
            vote_threshold=threshold,
            bus=bus,
            read_pattern=ReadPattern(cfg.read_pattern),
            rewrite_corrupted=cfg.rewrite_corrupted and not cfg.read_only,
            read_only=cfg.read_only,
            max_errors=cfg.max_errors,
            child_timeout=cfg.child_timeout,
        )
        graph.check_new_name(cfg.node_name)
        graph.add(quorum)
    except GraphError as err:
        graph.close()
        raise UsageError(err.desc) from err
    return graph, quorum


def distrust_new_images(quorum: QuorumNode, created: set[str]) -> None:
    """A recorded child whose image is gone and was just created blank holds
    none of the data: it resyncs instead of voting (unless too few old images
    are left to vote at all, where there is nothing to copy from)."""
    fresh = [s for s in quorum.slots if s.node.node_name in created]
    old_active = [s for s in quorum.active() if s not in fresh]
    if not fresh or len(old_active) < quorum.vote_threshold:
        return
    for slot in fresh:
        if slot.state is ChildState.ACTIVE:
            log.warning("child %s: its image %s was missing and is new: resyncing it",
                        slot.node.node_name, slot.node.filename())
            quorum.members.start_resync(slot)


_event_lines = Burst()
#: events a failing child can repeat on every request: their lines are limited
_REPEATING = ("QUORUM_REPORT_BAD", "QUORUM_FAILURE")


def log_event(ev: Event) -> None:
    """Events go to stderr as one JSON line each (tests and log shippers parse them).

    QUORUM_REPORT_BAD and QUORUM_FAILURE are limited per node to a burst a
    second (ratelimit.py); how many were left out is logged with the next one.
    """
    if ev.name in _REPEATING:
        node = ev.data.get("node-name") or ev.data.get("reference")
        held = _event_lines.admit((ev.name, node))
        if held is None:
            return
        if held:
            log.warning("%d %s event line(s) for %s left out of the log (more than %d a second)",
                        held, ev.name, node, _event_lines.limit)
    line = json.dumps({"event": ev.name, "data": ev.data, "timestamp": ev.timestamp})
    sys.stderr.write(f"EVENT {line}\n")
    sys.stderr.flush()


def bind_listeners(cfg: ServeConfig) -> tuple[list[Listener], Listener | None]:
    """Bind the NBD sockets and the QMP socket, or raise UsageError naming the address.

    Socket activation (systemd's LISTEN_FDS for this process): the inherited
    sockets are the NBD listeners, and only they; --socket/--listen are refused
    with them.  LISTEN_* leave the environment here, before any worker starts.
    """
    nbd: list[Listener] = []
    try:
        activated = inherited()
    except OSError as err:
        raise UsageError(err.strerror or str(err)) from err
    if activated is not None:
        if cfg.socket or cfg.listen:
            for li in activated:
                li.close()
            raise UsageError("socket activation (LISTEN_FDS) passes the listening sockets: "
                             "--socket and --listen cannot be given with it")
        nbd.extend(activated)
    try:
        if cfg.socket:
            nbd.append(bind_unix(cfg.socket, mode=cfg.socket_mode, group=cfg.socket_group,
                                 listen=False))
        if activated is None and (cfg.listen or not cfg.socket):
            host, port = cfg.listen or ("127.0.0.1", 10809)
            nbd.extend(bind_tcp(host, port, listen=False))
        control = bind_unix(cfg.control, mode=0o600, listen=False) if cfg.control else None
    except OSError as err:
        close_listeners(nbd, None)
        raise UsageError(err.strerror or str(err)) from err
    return nbd, control


def raise_fd_limit() -> None:
    """Raise the soft limit of open descriptors to the hard one (as systemd's
    services may and nginx does): every connection costs one, and the default
    soft limit (1024) would run out before --max-connections's default does,
    leaving no descriptor to accept the QMP socket's clients with."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as err:
            log.debug("cannot raise the descriptor limit from %d: %s", soft, err)


def bind_metrics(cfg: ServeConfig) -> list[Listener]:
    """Bind --metrics's address (none without it), or raise UsageError naming it."""
    if cfg.metrics is None:
        return []
    try:
        return bind_tcp(*cfg.metrics, listen=False)
    except OSError as err:
        raise UsageError(f"--metrics: {err.strerror or err}") from err


def close_listeners(nbd: list[Listener], control: Listener | None) -> None:
    """Close listeners and remove the socket files this process created."""
    for li in nbd:
        li.close()
    if control is not None:
        control.close()


async def serve(cfg: ServeConfig) -> int:
    from nbdquorum import native
    from nbdquorum.state import StateError, StateStore

    native.tune_malloc(MALLOC_HEAP_MAX)
    raise_fd_limit()
    bus = EventBus()
    bus.subscribe(wired(log_event))
    store = None
    state = None
    if cfg.state_dir:
        try:
            store = StateStore(cfg.state_dir)
            state = None if cfg.reset_state else store.load()
        except (OSError, StateError) as err:
            raise UsageError(f"state dir {cfg.state_dir}: {err}") from err
        if state is not None:
            cfg = apply_state(cfg, state, cfg.state_dir)
    if not cfg.children:
        raise UsageError("serve needs at least one --child (or a --state-dir that records them)")
    # The certificates before anything: a server that cannot speak TLS as asked
    # must not start in plaintext, nor touch its images.
    try:
        tls = TLSContexts(cfg.tls)
    except TLSConfigError as err:
        raise UsageError(str(err)) from err
    # Every address first: a server that cannot listen must not have created
    # images, recovered a crash or started jobs.
    nbd_listeners, qmp_listener = bind_listeners(cfg)
    metrics_listeners: list[Listener] = []
    try:
        metrics_listeners = bind_metrics(cfg)
        return await _serve_on(cfg, bus, store, state, nbd_listeners, qmp_listener,
                               metrics_listeners, tls)
    finally:
        close_listeners([*nbd_listeners, *metrics_listeners], qmp_listener)


async def _serve_on(cfg: ServeConfig, bus: EventBus, store: StateStore | None,
                    state: dict[str, Any] | None, nbd_listeners: list[Listener],
                    qmp_listener: Listener | None, metrics_listeners: list[Listener],
                    tls: TLSContexts) -> int:
    from nbdquorum.block.quorum.recovery import crash_recover
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.jobs.resync import ResyncManager
    from nbdquorum.nbd.protocol import TLSMode
    from nbdquorum.nbd.server import ClientLimits, Export, NBDServer
    from nbdquorum.state import WriteIntentLog, restore
    from nbdquorum.worker.pool import WorkerPool

    recorded = int(state["quorum"]["size"]) if state is not None else None
    remote = await open_remote_children(cfg, recorded)
    try:
        graph, quorum = build_graph(cfg, bus, remote)
    except BaseException:
        # (a missing image, sizes that differ...) the connections made are closed
        # now, as the server stops: never left to end with the loop, where each
        # would be logged as lost and start reconnecting
        for node in remote.values():
            node.close()
        raise
    intent = None
    tasks: list[asyncio.Task[None]] = []
    if store is not None:
        if state is not None:
            restore(quorum, state)
            distrust_new_images(quorum, cfg.created)
            quorum.check_health()  # children on other hosts that are down: unreachable
        intent = WriteIntentLog(store.intent_path, quorum.size())
        if state is not None and not state.get("clean", False) and intent.recovered.count():
            log.warning("unclean stop detected: resolving %d dirty regions before serving",
                        intent.recovered.count())
            await crash_recover(quorum, intent.recovered)
        quorum.write_intent = intent
        store.save(quorum, clean=False)
        quorum.on_change.append(lambda: store.save(quorum))
        await intent.clean(quorum)
        tasks.append(asyncio.create_task(intent.run_cleaner(quorum, cfg.intent_interval)))
    tasks.append(asyncio.create_task(quorum.run_health_checks(cfg.health_interval)))
    jobs = JobManager(bus)
    resync = ResyncManager(
        graph, jobs, speed=cfg.resync_speed,
        on_progress=(lambda: store.save_progress(quorum)) if store is not None else None,
    )
    resync.resume_all()
    export = Export(cfg.export_name, quorum, description="nbdquorum " + quorum.node_name,
                    read_only=cfg.read_only, read_buffers=quorum.read_width)
    graph.in_use[quorum.node_name] = f"export {cfg.export_name!r}"
    # one budget for the server: each process gets its share (the workers get
    # theirs from the pool, as the primary's)
    nbd = NBDServer({cfg.export_name: export}, cfg.export_name,
                    budget=max(1, cfg.memory_budget // (cfg.workers + 1)),
                    limits=ClientLimits(cfg.max_client_requests, cfg.max_client_bytes,
                                        cfg.max_client_backlog, cfg.handshake_timeout),
                    tls=tls if cfg.tls.mode is not TLSMode.OFF else None,
                    max_connections=cfg.max_connections or None)
    pool = None
    if cfg.workers:
        pool = WorkerPool(nbd, export, quorum, cfg.workers, child_timeout=cfg.child_timeout,
                          take_all=cfg.workers_take_all, verbose=cfg.verbose, tls=cfg.tls)
    listener: NBDServer | WorkerPool = nbd if pool is None else pool
    qmp = None
    exporter = None  # the metrics endpoint
    # Signal handlers first: a SIGTERM right after the socket appears must
    # already mean "stop cleanly", not kill the process.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload_tls() -> None:
        # new handshakes use the new files; connections already up keep theirs
        if cfg.tls.mode is TLSMode.OFF:
            log.info("SIGHUP: TLS is off, nothing to reload")
            return
        tls.reload()
        if pool is not None:
            pool.reload_tls()

    loop.add_signal_handler(signal.SIGHUP, reload_tls)
    try:
        if pool is not None:
            await pool.start()
        # QMP first: once the NBD socket accepts, the monitor does too
        if qmp_listener is not None:
            from nbdquorum.qmp.server import QMPServer

            qmp = QMPServer(graph, bus)
            qmp.jobs = jobs
            qmp.resync = resync
            await qmp.serve_listener(qmp_listener)
        try:
            for li in nbd_listeners:
                await listener.serve_listener(li)
        except OSError as err:
            raise UsageError(err.strerror or str(err)) from err
        if metrics_listeners:
            from nbdquorum import metrics

            exporter = metrics.MetricsServer(
                metrics.make_registry(metrics.server_sources(graph, jobs, nbd, pool)))
            try:
                for li in metrics_listeners:
                    await exporter.serve_listener(li)
            except OSError as err:
                raise UsageError(f"--metrics: {err.strerror or err}") from err
        where = [li.address for li in nbd_listeners]
        where = list(dict.fromkeys(where))
        gc.freeze()  # the graph, tables and modules never become garbage
        log.info(
            "serving %s (%d children, vote-threshold %d, %s) as export %r on %s%s%s%s",
            quorum.node_name, len(quorum.slots), quorum.vote_threshold, quorum.read_pattern,
            cfg.export_name, ", ".join(where),
            f"; QMP on {cfg.control}" if cfg.control else "",
            f"; {pool.running()} of {cfg.workers} worker process(es) running"
            if pool is not None else "",
            f"; TLS {cfg.tls.mode.value}" if cfg.tls.mode is not TLSMode.OFF else "",
        )
        if qmp is not None:
            qmp.on_quit = stop.set
        await stop.wait()
        log.info("stopping: finishing in-flight requests")
        if pool is not None:
            await pool.shutdown(grace=2 * cfg.child_timeout + 5)
        await nbd.shutdown(grace=2 * cfg.child_timeout + 5)
        await quorum.settle()  # reads answered early: their slower children are compared
        if qmp is not None:
            await qmp.shutdown()
        await jobs.shutdown()
        for t in tasks:
            t.cancel()
        try:
            await quorum.flush()
            if intent is not None:
                await intent.clean(quorum, final=True)
        except OSError as err:
            log.error("final flush failed: %s", err)
            if store is not None:
                store.save(quorum, clean=False)
            return 1
        if store is not None:
            store.save(quorum, clean=intent is None or intent.bitmap.count() == 0)
        log.info("stopped cleanly")
        return 0
    finally:
        if exporter is not None:
            await exporter.close()
        for t in tasks:
            t.cancel()
        if intent is not None:
            intent.close()
        graph.close()
        from nbdquorum.block import aio

        aio.shutdown()


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``serve`` on the main parser's subcommands."""
    p = sub.add_parser(
        "serve", help="serve a quorum of raw images over NBD",
        description="Export one virtual disk over NBD: a voted quorum of raw image files "
                    "and NBD exports on other hosts. "
                    "Every write goes to every child; every read is voted.",
        epilog="Example: nbdquorum serve --child a=/disk1/a.raw --child b=/disk2/b.raw "
               "--child c=/disk3/c.raw --socket /run/nbdq.sock --control /run/nbdq.qmp "
               "--state-dir /var/lib/nbdquorum")
    p.add_argument("--child", action="append", default=[], metavar="[NAME=]PATH|URI",
                   help="a raw image file, or an NBD export on another host "
                        "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...) "
                        "(repeat; node-names default to child0, child1, ...)")
    p.add_argument("--size", type=parse_size, help="create missing images (sparse) of this size")
    p.add_argument("--vote-threshold", type=int, metavar="N",
                   help="children that must agree for a read to succeed "
                        "(default: a majority, children // 2 + 1)")
    p.add_argument("--read-pattern", choices=["quorum", "fifo"], default="quorum",
                   help="quorum: read every child and vote; fifo: read the first active "
                        "child, the next one only on an error (default quorum)")
    p.add_argument("--rewrite-corrupted", action="store_true",
                   help="rewrite children that lose a read vote with the winning bytes")
    p.add_argument("--node-name", default="quorum0", metavar="NAME",
                   help="the quorum node's name in QMP and events (default quorum0)")
    p.add_argument("--export-name", default="disk", metavar="NAME",
                   help='the NBD export name; clients asking for "" get it too (default disk)')
    p.add_argument("--listen", type=parse_listen, metavar="HOST:PORT",
                   help="TCP address (default 127.0.0.1:10809 when no --socket)")
    p.add_argument("--socket", metavar="PATH",
                   help="Unix socket for NBD (refused if a running server listens there; "
                        "removed on exit)")
    p.add_argument("--socket-mode", type=parse_mode, metavar="MODE",
                   help="--socket's permission bits, octal (0660, ...; default: from the "
                        "umask); the path is never reachable with looser ones")
    p.add_argument("--socket-group", type=parse_group, metavar="GROUP",
                   help="--socket's group, a name or a gid (default: the server's)")
    p.add_argument("--control", metavar="PATH",
                   help="Unix socket for QMP, mode 0600 (default: none)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="persistent membership, resync progress and write-intent bitmap "
                        "(default: none: a restart forgets QMP changes)")
    p.add_argument("--read-only", action="store_true",
                   help="export read-only and open the images read-only")
    p.add_argument("--max-errors", type=int, default=20, metavar="N",
                   help="errors after which a child is marked faulted; the count halves for every "
                        "hour without one, as md's (0: never; default 20)")
    p.add_argument("--child-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a child slower than this counts as failed (default 30)")
    p.add_argument("--resync-speed", type=parse_size, default=0, metavar="BYTES",
                   help="default resync rate limit in bytes/second (512M, ...; default unlimited)")
    p.add_argument("--intent-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often flushed regions leave the write-intent bitmap "
                        "(with --state-dir; default 5)")
    p.add_argument("--health-interval", type=float, default=1.0, metavar="SECONDS",
                   help="how often children are checked for deleted or resized files "
                        "(default 1)")
    p.add_argument("--reset-state", action="store_true",
                   help="discard the membership recorded in --state-dir")
    p.add_argument("--fault-injection", action="store_true",
                   help="put a fault injector (x-faulty-set over QMP) above each child")
    p.add_argument("--workers", type=int, default=0, metavar="N",
                   help="worker processes that serve a share of the connections, reading "
                        "and voting locally and forwarding the rest (default 0: one process)")
    p.add_argument("--workers-take-all", action="store_true",
                   help="with --workers: place every connection on a worker; the primary "
                        "only makes the forwarded requests")
    p.add_argument("--metrics", type=parse_listen, metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics "
                        "(default: none; see docs/monitoring.md)")
    p.add_argument("--memory-budget", type=parse_size, default=64 << 20, metavar="BYTES",
                   help="request bytes in flight over all clients (WRITE payloads from their "
                        "header on, reads being served), split evenly between the processes "
                        "and fairly between the clients (default 64M; docs/performance.md "
                        "gives the memory bound)")
    p.add_argument("--max-client-requests", type=int, default=16, metavar="N",
                   help="requests one client may have in flight; more wait in its socket "
                        "(default 16, as QEMU)")
    p.add_argument("--max-client-bytes", type=parse_size, default=16 << 20, metavar="BYTES",
                   help="request bytes one client may hold (one bigger request may run alone; "
                        "default 16M)")
    p.add_argument("--max-client-backlog", type=parse_size, default=1 << 20, metavar="BYTES",
                   help="reply bytes a client has not read yet above which its requests "
                        "wait: a client that stops reading stops being served (default 1M)")
    p.add_argument("--tls", choices=["off", "on", "require"],
                   help="off: plaintext only; on: TLS or plaintext; require: a client must "
                        "start TLS (NBD_OPT_STARTTLS) before it learns anything of the "
                        "export (default: require with --tls-certificates, else off; "
                        "see docs/tls.md)")
    p.add_argument("--tls-certificates", metavar="DIR",
                   help="server-cert.pem, server-key.pem, ca-cert.pem (with "
                        "--tls-verify-peer) and an optional ca-crl.pem, as QEMU's "
                        "tls-creds-x509 reads them; reloaded on SIGHUP")
    p.add_argument("--tls-verify-peer", action="store_true",
                   help="require a client certificate signed by DIR/ca-cert.pem")
    p.add_argument("--tls-authz-dn", action="append", default=[], metavar="PATTERN",
                   help="with --tls-verify-peer: the client certificate's subject DN "
                        "(RFC 4514, as CN=client,O=Example,C=GB) must match one PATTERN "
                        "(repeat; fnmatch wildcards * ? [..], else an exact match)")
    p.add_argument("--tls-psk", metavar="FILE",
                   help="TLS-PSK: not supported (refused; docs/tls.md says why)")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="a client that has not chosen an export this long after connecting "
                        "is dropped (0: never; default 10, as qemu-nbd)")
    p.add_argument("--max-connections", type=int, default=1024, metavar="N",
                   help="client connections open at once, over all worker processes; more "
                        "are logged and closed (0: no limit; default 1024)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="-v: more log lines; -vv: debug, per request")


def run(args: argparse.Namespace, parser: argparse.ArgumentParser,
        argv: Sequence[str] | None = None) -> int:
    """Run ``nbdquorum serve``; returns the exit code."""
    setup_logging(getattr(args, "verbose", 0))
    try:
        explicit = {
            k: True for k in ("vote_threshold", "node_name", "read_pattern", "rewrite_corrupted")
            if f"--{k.replace('_', '-')}" in " ".join(argv if argv is not None else sys.argv)
        }
        if args.tls_psk:
            raise UsageError("--tls-psk: TLS-PSK is not supported (Python 3.11's ssl module "
                             "has no PSK API); use --tls-certificates (docs/tls.md)")
        try:
            tls = TLSConfig.from_options(args.tls, args.tls_certificates,
                                         args.tls_verify_peer, args.tls_authz_dn)
        except TLSConfigError as err:
            raise UsageError(str(err)) from err
        cfg = ServeConfig(
            children=[parse_child(c, i) for i, c in enumerate(args.child)],
            size=args.size,
            vote_threshold=args.vote_threshold,
            read_pattern=args.read_pattern,
            rewrite_corrupted=args.rewrite_corrupted,
            node_name=args.node_name,
            export_name=args.export_name,
            listen=args.listen,
            socket=args.socket,
            control=args.control,
            state_dir=args.state_dir,
            read_only=args.read_only,
            max_errors=args.max_errors,
            child_timeout=args.child_timeout,
            resync_speed=args.resync_speed,
            intent_interval=args.intent_interval,
            health_interval=args.health_interval,
            reset_state=args.reset_state,
            fault_injection=args.fault_injection,
            workers=args.workers,
            workers_take_all=args.workers_take_all,
            metrics=args.metrics,
            memory_budget=args.memory_budget,
            max_client_requests=args.max_client_requests,
            max_client_bytes=args.max_client_bytes,
            max_client_backlog=args.max_client_backlog,
            tls=tls,
            handshake_timeout=args.handshake_timeout,
            max_connections=args.max_connections,
            socket_mode=args.socket_mode,
            socket_group=args.socket_group,
            verbose=args.verbose,
            extra=dict(explicit),
        )
        if not cfg.children and not cfg.state_dir:
            parser.error("serve needs at least one --child")
        if cfg.workers < 0:
            parser.error("--workers must be 0 or more")
        if cfg.max_connections < 0:
            parser.error("--max-connections must be 0 (no limit) or more")
        if not cfg.handshake_timeout >= 0:
            parser.error("--handshake-timeout must be 0 (no limit) or more seconds")
        if (cfg.socket_mode is not None or cfg.socket_group is not None) and not cfg.socket:
            parser.error("--socket-mode and --socket-group need --socket")
        return run_loop(serve(cfg))
    except UsageError as err:
        print(f"nbdquorum: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
