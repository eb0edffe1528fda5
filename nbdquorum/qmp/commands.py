"""The command handlers, registered by wire name, and the dispatcher.

A handler takes a :class:`Context` and the command's arguments, already
checked against the table in schema.py and spelled the Python way
(``node_name``).  It returns the JSON value of the reply (``None`` for
``{}``) or raises :class:`~nbdquorum.qmp.errors.QMPError`; errors of the block
graph (:class:`~nbdquorum.block.errors.GraphError`) pass through unchanged,
since they already carry QEMU's texts.  Every change to the graph goes through
:class:`~nbdquorum.block.graph.Graph`.

Handlers run on the event loop thread and, apart from async ones, never yield:
a graph change is therefore atomic with respect to NBD requests, which hold
their own snapshot of a quorum's children (graph.py).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from nbdquorum import __version__
from nbdquorum.block.errors import GraphError
from nbdquorum.block.faulty import FaultRule, FaultyNode
from nbdquorum.block.graph import Graph
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import ChildSlot, QuorumNode, ReadPattern, ReopenPlan
from nbdquorum.block.raw import RawNode
from nbdquorum.jobs.job import Job, JobStatus
from nbdquorum.jobs.scrub import ScrubJob
from nbdquorum.nbd.tls import client_context
from nbdquorum.qmp.check import check_arguments
from nbdquorum.qmp.errors import ErrorClass, QMPError, command_not_found, generic
from nbdquorum.qmp.format import block_device_info, quorum_status
from nbdquorum.qmp.protocol import (
    NO_ID,
    Execute,
    Message,
    ServerConnection,
    error_message,
    return_message,
)
from nbdquorum.qmp.schema import COMMANDS
from nbdquorum.remote.child import NBDChild
from nbdquorum.remote.uri import AddressError, from_qapi

if TYPE_CHECKING:
    from nbdquorum.jobs.job import JobManager
    from nbdquorum.jobs.resync import ResyncManager

log = logging.getLogger(__name__)

Handler = Callable[..., Any]

#: wire name -> handler; filled by @handler, checked against COMMANDS by tests
HANDLERS: Final[dict[str, Handler]] = {}


def handler(name: str) -> Callable[[Handler], Handler]:
    """Register ``fn`` as the handler of the command ``name`` (which must be in the table)."""

    def register(fn: Handler) -> Handler:
        if name not in COMMANDS:
            raise ValueError(f"{name} is not declared in qmp/schema.py")
        if name in HANDLERS:
            raise ValueError(f"two handlers for {name}")
        HANDLERS[name] = fn
        return fn

    return register


@dataclass
class Context:
    """What a handler may use: the graph, its connection, and the server's hooks."""

    graph: Graph
    conn: ServerConnection | None = None  # the client's protocol state (qmp_capabilities)
    request_quit: Callable[[], None] = field(default=lambda: None)  # quit: after the reply
    jobs: JobManager | None = None  # background jobs (job commands)
    resync: ResyncManager | None = None  # resync of new children


# --------------------------------------------------------------------------- dispatch


def _lookup(ctx: Context, ev: Execute) -> Handler:
    negotiated = ctx.conn is None or ctx.conn.negotiated
    if ev.name not in COMMANDS or ev.name not in HANDLERS or (
        not negotiated and ev.name != "qmp_capabilities"
    ):
        if not negotiated:  # monitor/qmp.c: "Provide a more useful error message"
            raise command_not_found("Expecting capabilities negotiation with 'qmp_capabilities'")
        raise command_not_found(f"The command {ev.name} has not been found")
    if ev.oob:
        raise generic(f"The command {ev.name} does not support OOB")
    return HANDLERS[ev.name]


async def execute(ctx: Context, ev: Execute) -> Any:
    """Run one command; returns its JSON value.

    Raises:
        QMPError: the command failed (any handler error is turned into one).
    """
    fn = _lookup(ctx, ev)
    args = check_arguments(COMMANDS[ev.name], ev.arguments)
    try:
        result = fn(ctx, **args)
        if inspect.isawaitable(result):
            result = await result
    except QMPError:
        raise
    except GraphError as err:
        raise QMPError(err.error_class, err.desc) from err
    except OSError as err:
        raise generic(err.strerror or str(err)) from err
    except Exception as err:
        desc = getattr(err, "desc", None)  # job errors carry a client-facing text
        if isinstance(desc, str):
            raise generic(desc) from err
        log.exception("command %s failed", ev.name)
        raise generic(f"Internal error in {ev.name}: {err}") from err
    return {} if result is None else result


async def dispatch(ctx: Context, ev: Execute) -> Message:
    """The reply message for ``ev``: a return or an error, with ``ev``'s id."""
    try:
        value = await execute(ctx, ev)
    except QMPError as err:
        return error_message(err.error_class, err.desc, ev.id)
    return return_message(value, ev.id)


# --------------------------------------------------------------------------- session


@handler("qmp_capabilities")
def qmp_capabilities(ctx: Context, *, enable: list[str] | None = None) -> None:
    if ctx.conn is None or ctx.conn.negotiated:
        raise QMPError(ErrorClass.COMMAND_NOT_FOUND,
                       "Capabilities negotiation is already complete, command ignored")
    ctx.conn.negotiate(enable or [])


def version_triple() -> tuple[int, int, int]:
    parts = [int("".join(ch for ch in p if ch.isdigit()) or 0) for p in __version__.split(".")]
    major, minor, micro = [*parts, 0, 0, 0][:3]
    return major, minor, micro


@handler("query-version")
def query_version(ctx: Context) -> dict[str, Any]:
    major, minor, micro = version_triple()
    return {"qemu": {"micro": micro, "minor": minor, "major": major},
            "package": f"nbdquorum {__version__}"}


@handler("query-commands")
def query_commands(ctx: Context) -> list[dict[str, str]]:
    return [{"name": name} for name in COMMANDS if name in HANDLERS]


@handler("quit")
def quit(ctx: Context) -> None:
    ctx.request_quit()


# --------------------------------------------------------------------------- nodes


@handler("blockdev-add")
async def blockdev_add(ctx: Context, **options: Any) -> None:
    graph = ctx.graph
    driver = options["driver"]
    node_name = options.get("node_name")
    read_only = bool(options.get("read_only", False))
    if node_name is None:
        raise generic("'node-name' must be specified for the root node")
    if driver == "file":
        graph.open_file(node_name, options["filename"], read_only=read_only)
    elif driver == "nbd":
        graph.check_new_name(node_name)
        graph.add(await _open_nbd(ctx, node_name, options, read_only))
    elif driver == "raw":
        file = options["file"]
        if isinstance(file, str):
            _raw_over_node(graph, node_name, file, read_only)
        elif file.get("driver") == "nbd":
            graph.check_new_name(node_name)
            inner_name = file.get("node_name") or graph.auto_name()
            if inner_name == node_name:
                raise generic(f"Duplicate nodes with node-name='{node_name}'")
            if file.get("node_name"):
                graph.check_new_name(inner_name)
            inner = await _open_nbd(ctx, inner_name, file, read_only)
            inner.owned_by_monitor = file.get("node_name") is not None
            graph.add(inner)
            graph.add(RawNode(node_name, inner, read_only=read_only))
        else:
            _raw_over_inline_file(graph, node_name, file, read_only)
    elif driver == "faulty":
        _faulty(graph, node_name, options["image"], options.get("rules") or [])
    else:
        raise generic(f"blockdev-add cannot create a '{driver}' node: the quorum is created "
                      "by 'nbdquorum serve'; use blockdev-reopen to change it")


async def _open_nbd(ctx: Context, node_name: str, options: dict[str, Any],
                    read_only: bool) -> NBDChild:
    """An NBD export as a node (QEMU's BlockdevOptionsNbd): connected before it is added."""
    creds = options.get("tls_creds")
    tls_dir = None
    if creds is not None:
        obj = ctx.graph.objects.get(creds)
        if obj is None or obj.get("qom-type") != "tls-creds-x509":
            raise generic(f"No TLS credentials with id '{creds}'")
        if obj.get("endpoint", "client") != "client":
            raise generic("Expecting TLS credentials with a client endpoint")
        tls_dir = str(obj["dir"])
    try:
        address = from_qapi(options["server"], options.get("export"), tls=creds is not None,
                            tls_dir=tls_dir, tls_hostname=options.get("tls_hostname"))
    except AddressError as err:
        raise generic(str(err)) from err
    for n in ctx.graph:
        if n.driver == "nbd" and n.filename() == address.uri():
            owner = next((p.node_name for p in ctx.graph.parents(n)), n.node_name)
            raise generic(f"{address.uri()} is already open as node '{owner}'")
    quorums = ctx.graph.quorums()
    timeout = float(options.get("x_timeout") or
                    (quorums[0].child_timeout if quorums else 30.0))
    if timeout <= 0:
        raise generic("Parameter 'x-timeout' expects a positive number")
    node = NBDChild(node_name, address, timeout=timeout,
                    reconnect_delay=float(options.get("reconnect_delay", 0)),
                    open_timeout=float(options.get("open_timeout", 0)), read_only=read_only)
    try:
        await node.open()
    except OSError as err:
        node.close()
        where = address.path or f"{address.host}:{address.port}"
        raise generic(f"Failed to connect to '{where}': {_reason(err)}") from err
    return node


def _reason(err: OSError) -> str:
    """The bare reason of a failed connection ("Connection refused"), as QEMU says it."""
    cause = err.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(err.strerror or err).rpartition(": ")[2]


def _raw_over_node(graph: Graph, node_name: str, reference: str, read_only: bool) -> None:
    file = graph.lookup_device(reference)
    graph.check_new_name(node_name)
    if isinstance(file, QuorumNode) or reference in graph.in_use:
        raise generic(f"Node '{reference}' cannot be the file of a raw node")
    if graph.parents(file):
        raise generic(f"The node {reference} already has a parent")
    graph.add(RawNode(node_name, file, read_only=read_only))


def _raw_over_inline_file(graph: Graph, node_name: str, file: dict[str, Any],
                          read_only: bool) -> None:
    if file["driver"] != "file":
        raise generic(f"The file of a raw node must use the 'file' driver, not "
                      f"'{file['driver']}'")
    file_node_name = file.get("node_name")
    if file_node_name == node_name:
        raise generic(f"Duplicate nodes with node-name='{node_name}'")
    graph.open_raw_file(node_name, file["filename"], file_node_name=file_node_name,
                        read_only=read_only or bool(file.get("read_only", False)))


def _rules(rules: list[dict[str, Any]]) -> list[FaultRule]:
    try:
        return [FaultRule.from_wire(r) for r in rules]
    except (TypeError, ValueError) as err:
        raise generic(str(err)) from err


def _faulty(graph: Graph, node_name: str, image: str | dict[str, Any],
            rules: list[dict[str, Any]]) -> None:
    parsed = _rules(rules)
    graph.check_new_name(node_name)
    if isinstance(image, str):
        inner = graph.lookup_device(image)
        if isinstance(inner, QuorumNode) or image in graph.in_use:
            raise generic(f"Node '{image}' cannot be the image of a faulty node")
        if graph.parents(inner):
            raise generic(f"The node {image} already has a parent")
    else:
        if image["driver"] != "raw" or isinstance(image.get("file"), str):
            raise generic("an inline image of a faulty node must be a raw node over an "
                          "inline file")
        inner_name = image.get("node_name") or graph.auto_name()
        inner = graph.open_raw_file(inner_name, image["file"]["filename"],
                                    file_node_name=image["file"].get("node_name"))
        inner.owned_by_monitor = image.get("node_name") is not None
    graph.add(FaultyNode(node_name, inner, parsed))


@handler("object-add")
def object_add(ctx: Context, *, qom_type: str, id: str, dir: str | None = None,
               endpoint: str = "client", verify_peer: bool = True) -> None:
    """QEMU's object-add, for the one kind of object nbd nodes use: tls-creds-x509."""
    if qom_type != "tls-creds-x509":
        raise generic(f"Invalid parameter type for 'qom-type', expected: tls-creds-x509 "
                      f"(the only object type nbdquorum knows), got '{qom_type}'")
    if id in ctx.graph.objects:
        raise generic(f"attempt to add duplicate property '{id}' to object (type 'container')")
    if endpoint not in ("client", "server"):
        raise generic(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    if endpoint != "client":
        raise generic("only client credentials can be added live: the server's TLS comes "
                      "from serve --tls-certificates")
    if dir is None:
        raise generic("Parameter 'dir' is missing")
    try:
        client_context(dir)
    except (OSError, ValueError) as err:
        raise generic(f"Unable to load TLS credentials from {dir}: {err}") from err
    ctx.graph.objects[id] = {"qom-type": qom_type, "id": id, "dir": dir, "endpoint": endpoint,
                             "verify-peer": verify_peer}


@handler("object-del")
def object_del(ctx: Context, *, id: str) -> None:
    if id not in ctx.graph.objects:
        raise generic(f"object '{id}' not found")
    for n in ctx.graph:
        if isinstance(n, NBDChild) and n.address.tls_certificates == ctx.graph.objects[id]["dir"]:
            raise generic(f"object '{id}' is in use, can not be deleted")
    del ctx.graph.objects[id]


@handler("blockdev-del")
def blockdev_del(ctx: Context, *, node_name: str) -> None:
    ctx.graph.delete(node_name)


@handler("query-named-block-nodes")
def query_named_block_nodes(ctx: Context, *, flat: bool = False) -> list[dict[str, Any]]:
    return [block_device_info(n) for n in ctx.graph]


# --------------------------------------------------------------------------- quorum children


@handler("x-blockdev-change")
def x_blockdev_change(ctx: Context, *, parent: str, child: str | None = None,
                      node: str | None = None) -> None:
    # The order of the checks is QEMU's qmp_x_blockdev_change(), so the same
    # mistake gets the same text.
    graph = ctx.graph
    p = graph.lookup_device(parent)
    if (child is None) == (node is None):
        if child is not None:
            raise generic("The parameters child and node are in conflict")
        raise generic("Either child or node must be specified")
    if child is not None:
        if not isinstance(p, QuorumNode):
            edges = {"file"} if isinstance(p, RawNode) else set()
            if child not in edges:
                raise generic(f"Node '{parent}' does not have child '{child}'")
        graph.child_del(parent, child)
    if node is not None:
        graph.get(node)
        graph.child_add(parent, node)


def _in_sync(n: int) -> str:
    return f"{n} child{'' if n == 1 else 'ren'} would be left in sync (active)"


@handler("x-blockdev-child-add")
def x_blockdev_child_add(ctx: Context, *, parent: str, child: str,
                         x_resync: str = "full") -> None:
    ctx.graph.lookup_device(parent)
    ctx.graph.get(child)
    ctx.graph.child_add(parent, child, missed_only=x_resync == "missed")


@handler("x-blockdev-child-del")
def x_blockdev_child_del(ctx: Context, *, parent: str, child: str) -> None:
    q = ctx.graph.lookup_device(parent)
    by_edge = (isinstance(q, QuorumNode) and q.slot(child) is not None
               and not any(s.node.node_name == child for s in q.slots))
    ctx.graph.child_del(parent, child, by_node_name=not by_edge)


# --------------------------------------------------------------------------- reopen


def _plan_reopen(graph: Graph, opts: dict[str, Any], claimed: set[str]
                 ) -> tuple[QuorumNode, ReopenPlan]:
    """The graph-level checks of one blockdev-reopen entry, and its plan.

    Members.prepare checks the rest (sizes, options, children left in sync).
    """
    name = opts.get("node_name")
    if name is None:
        raise generic("node-name not specified")
    node = graph.nodes.get(name)
    if node is None:
        raise generic(f"Failed to find node with node-name='{name}'")
    if opts["driver"] != node.driver:
        raise generic("Cannot change the option 'driver'")
    if not isinstance(node, QuorumNode):
        raise generic(f"Block format '{node.driver}' used by node '{name}' does not support "
                      "reopening files")
    q = node
    if "read_only" in opts and opts["read_only"] != q.read_only:
        raise generic("Cannot change the option 'read-only'")
    current = [s.node.node_name for s in q.slots]
    wanted: list[str] = opts.get("children", current)
    if not wanted:
        raise generic("Number of provided children must be 1 or more")
    seen: set[str] = set()
    add: list[BlockNode] = []
    for child in wanted:
        if child in seen:
            raise generic(f"Node '{child}' is listed more than once in 'children'")
        seen.add(child)
        if child in current:
            continue
        c: BlockNode = graph.lookup_device(child)
        if c is q:
            raise generic(f"The node {child} cannot be a child of itself")
        if graph.parents(c) or child in claimed:
            raise generic(f"The node {child} already has a parent")
        if child in graph.in_use:
            raise generic(f"Node {child} is in use")
        claimed.add(child)
        add.append(c)
    plan = ReopenPlan(
        vote_threshold=opts.get("vote_threshold", q.vote_threshold),
        read_pattern=opts.get("read_pattern", str(q.read_pattern)),
        rewrite_corrupted=opts.get("rewrite_corrupted", q.rewrite_corrupted),
        add=add,
        remove=[s for s in q.slots if s.node.node_name not in seen],
        new_state=graph.new_child_state,
    )
    try:
        q.members.prepare(plan)
    except GraphError as err:
        raise generic(err.desc) from err
    plan.read_pattern = ReadPattern(plan.read_pattern)
    return q, plan


@handler("blockdev-reopen")
def blockdev_reopen(ctx: Context, *, options: list[dict[str, Any]]) -> None:
    graph = ctx.graph
    claimed: set[str] = set()
    plans: list[tuple[QuorumNode, ReopenPlan]] = []
    for opts in options:
        q, plan = _plan_reopen(graph, opts, claimed)
        if any(p is q for p, _ in plans):
            raise generic(f"Node '{q.node_name}' is listed more than once")
        plans.append((q, plan))
    for q, plan in plans:
        graph.reopen(q, plan)


# --------------------------------------------------------------------------- status


# --------------------------------------------------------------------------- jobs


def _jobs(ctx: Context) -> JobManager:
    if ctx.jobs is None:
        raise generic("this server runs no background jobs")
    return ctx.jobs


@handler("query-jobs")
def query_jobs(ctx: Context) -> list[dict[str, Any]]:
    return _jobs(ctx).query()


@handler("query-block-jobs")
def query_block_jobs(ctx: Context) -> list[dict[str, Any]]:
    if ctx.jobs is None:  # a server without background jobs runs none
        return []
    return [_block_job_info(job) for job in ctx.jobs.jobs.values()
            if job.status is not JobStatus.NULL]


def _block_job_info(job: Job) -> dict[str, Any]:
    """QEMU's BlockJobInfo of a job (blockjob.c: block_job_query)."""
    info: dict[str, Any] = {
        "type": job.job_type,
        "device": job.id,
        "len": max(job.total, job.current),
        "offset": job.current,
        "busy": job.status in (JobStatus.CREATED, JobStatus.RUNNING),
        "paused": job.status is JobStatus.PAUSED,
        "speed": job.speed,
        "io-status": "failed" if job.error is not None else "ok",
        "ready": False,
        "status": str(job.status),
        "auto-finalize": True,
        "auto-dismiss": True,
    }
    if job.error is not None:
        info["error"] = job.error
    return info


@handler("job-pause")
def job_pause(ctx: Context, *, id: str) -> None:
    _jobs(ctx).get(id).pause()


@handler("job-resume")
def job_resume(ctx: Context, *, id: str) -> None:
    _jobs(ctx).get(id).resume()


@handler("job-cancel")
def job_cancel(ctx: Context, *, id: str) -> None:
    _jobs(ctx).get(id).cancel()


@handler("block-job-set-speed")
def block_job_set_speed(ctx: Context, *, device: str, speed: int) -> None:
    _jobs(ctx).get(device).set_speed(speed)


def _child(graph: Graph, node_name: str) -> tuple[QuorumNode, ChildSlot]:
    node = graph.get(node_name)
    for q in graph.quorums():
        slot = q.slot_of(node)
        if slot is not None:
            return q, slot
    raise generic(f"Node '{node_name}' is not a quorum child")


@handler("x-quorum-resync")
def x_quorum_resync(ctx: Context, *, node_name: str, speed: int | None = None,
                    full: bool = False) -> None:
    if ctx.resync is None:
        raise generic("this server runs no background jobs")
    if speed is not None and speed < 0:
        raise generic("Parameter 'speed' expects a non negative value")
    q, slot = _child(ctx.graph, node_name)
    job = ctx.resync.job_for(slot)
    if job is not None and job.status in (JobStatus.CREATED, JobStatus.RUNNING, JobStatus.PAUSED):
        raise generic(f"Job ID '{job.id}' already in use")
    q.members.check_can_leave_vote(slot, "resync")
    q.members.start_resync(slot, None if full or slot.sync is None else [], revive=True)
    job = ctx.resync.ensure(q, slot)
    if job is None:
        raise generic(f"Node '{node_name}' needs no resync")
    if speed is not None:
        job.set_speed(speed)


@handler("x-quorum-scrub")
def x_quorum_scrub(ctx: Context, *, node_name: str | None = None, repair: bool = False,
                   speed: int = 0, job_id: str | None = None) -> None:
    quorums = ctx.graph.quorums()
    if node_name is None:
        if len(quorums) != 1:
            raise generic("Parameter 'node-name' is missing")
        q = quorums[0]
    else:
        node = ctx.graph.lookup_device(node_name)
        if not isinstance(node, QuorumNode):
            raise generic(f"Node '{node_name}' is not a quorum node")
        q = node
    if speed < 0:
        raise generic("Parameter 'speed' expects a non negative value")
    _jobs(ctx).add(ScrubJob(q, ctx.graph.bus, repair=repair, speed=speed, job_id=job_id))


@handler("x-faulty-set")
def x_faulty_set(ctx: Context, *, node_name: str, rules: list[dict[str, Any]]) -> None:
    node = ctx.graph.get(node_name)
    if not isinstance(node, FaultyNode):
        raise generic(f"Node '{node_name}' is not a faulty node")
    node.set_rules(_rules(rules))


@handler("query-quorum-status")
def query_quorum_status(ctx: Context, *, node_name: str | None = None) -> list[dict[str, Any]]:
    if node_name is None:
        return [quorum_status(q) for q in ctx.graph.quorums()]
    node = ctx.graph.lookup_device(node_name)
    if not isinstance(node, QuorumNode):
        raise generic(f"Node '{node_name}' is not a quorum node")
    return [quorum_status(node)]


__all__ = ["HANDLERS", "NO_ID", "Context", "dispatch", "execute", "handler"]
