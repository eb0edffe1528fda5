"""The one table of QMP commands, types and events: declarations only.

Everything about the monitor's surface is declared here once, in the spirit of
QAPI (qemu/qemu docs/devel/qapi-code-gen.rst, qapi/block-core.json): names,
argument schemas (``'*name'`` is optional), return values, documentation and
examples.  Dispatch (commands.py), argument checking (check.py),
``query-commands`` and docs/qmp.md (docgen.py: ``python -m nbdquorum.qmp.docgen
--markdown``) are all driven by it; unit tests check that the handlers match
the table and that docs/qmp.md is up to date.

This module declares and nothing else: it imports no client, no checker and no
formatter, so anything may import it (tests/unit/test_layers.py holds it to that).

Wire names use dashes (``node-name``); handlers get Python names
(``node_name``).  The conversion happens only here, in :func:`py_name`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

#: a type reference: a builtin ("str", "int", "bool", "number", "any"), a
#: declared type's name, or a one-element list for an array of that type
TypeRef = str | list[str]

BUILTINS: Final = {
    "str": "string",
    "int": "integer",
    "bool": "boolean",
    "number": "number",
    "any": "any",
}


def py_name(wire: str) -> str:
    """``node-name`` -> ``node_name``: the only place names change spelling."""
    return wire.replace("-", "_")


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Member:
    name: str  # wire name, without the '*'
    type: TypeRef
    optional: bool
    doc: str


def _members(data: Mapping[str, TypeRef], docs: Mapping[str, str]) -> tuple[Member, ...]:
    out = []
    for key, typ in data.items():
        name = key.lstrip("*")
        out.append(Member(name, typ, key.startswith("*"), docs.get(name, "")))
    unknown = set(docs) - {m.name for m in out}
    if unknown:
        raise ValueError(f"docs for unknown members {sorted(unknown)}")
    return tuple(out)


@dataclass(frozen=True)
class EnumType:
    name: str
    values: tuple[str, ...]
    doc: str


@dataclass(frozen=True)
class StructType:
    name: str
    members: tuple[Member, ...]
    doc: str


@dataclass(frozen=True)
class UnionType:
    """A flat union: common ``base`` members, then those of the variant chosen
    by the ``discriminator`` member (an enum)."""

    name: str
    base: tuple[Member, ...]
    discriminator: str
    variants: Mapping[str, str]  # discriminator value -> StructType name
    doc: str


@dataclass(frozen=True)
class AlternateType:
    """One of several JSON kinds: ``string`` -> a type, ``object`` -> another."""

    name: str
    choices: Mapping[str, TypeRef]  # JSON kind ("string", "object") -> type
    doc: str


NamedType = EnumType | StructType | UnionType | AlternateType


@dataclass(frozen=True)
class Command:
    name: str  # wire name
    members: tuple[Member, ...]  # the arguments object's members
    boxed: str | None  # or: the arguments object is this union/struct type
    returns: str  # the return value, in QAPI notation (docs only)
    doc: str
    examples: tuple[str, ...] = ()  # "-> {...}" / "<- {...}" lines
    features: tuple[str, ...] = ()  # "unstable" for x- commands
    returns_doc: str = ""


@dataclass(frozen=True)
class EventDef:
    name: str
    members: tuple[Member, ...]
    doc: str
    examples: tuple[str, ...] = ()
    throttled: bool = False  # at most one a second per key (server.py)


@dataclass
class _Registry:
    types: dict[str, NamedType] = field(default_factory=dict)

    def add(self, t: NamedType) -> None:
        if t.name in self.types or t.name in BUILTINS:
            raise ValueError(f"duplicate type {t.name}")
        self.types[t.name] = t


_reg = _Registry()


def enum(name: str, values: Sequence[str], doc: str) -> None:
    _reg.add(EnumType(name, tuple(values), doc))


def struct(name: str, data: Mapping[str, TypeRef], doc: str,
           docs: Mapping[str, str] | None = None) -> None:
    _reg.add(StructType(name, _members(data, docs or {}), doc))


def union(name: str, base: Mapping[str, TypeRef], discriminator: str,
          variants: Mapping[str, str], doc: str, docs: Mapping[str, str] | None = None) -> None:
    _reg.add(UnionType(name, _members(base, docs or {}), discriminator, dict(variants), doc))


def alternate(name: str, choices: Mapping[str, TypeRef], doc: str) -> None:
    _reg.add(AlternateType(name, dict(choices), doc))


def cmd(name: str, data: Mapping[str, TypeRef] | str, *, returns: str = "{}", doc: str,
        docs: Mapping[str, str] | None = None, examples: Sequence[str] = (),
        returns_doc: str = "") -> Command:
    features = ("unstable",) if name.startswith("x-") else ()
    if isinstance(data, str):
        return Command(name, (), data, returns, doc, tuple(examples), features, returns_doc)
    return Command(name, _members(data, docs or {}), None, returns, doc, tuple(examples),
                   features, returns_doc)


def event(name: str, data: Mapping[str, TypeRef], *, doc: str,
          docs: Mapping[str, str] | None = None, examples: Sequence[str] = (),
          throttled: bool = False) -> EventDef:
    return EventDef(name, _members(data, docs or {}), doc, tuple(examples), throttled)


# --------------------------------------------------------------------------- types

enum("QMPCapability", ["oob"], "A QMP capability (qmp_capabilities `enable`).")
enum("BlockdevDriver", ["file", "raw", "quorum", "faulty", "nbd"],
     "Drivers known to blockdev-add and blockdev-reopen.")
enum("QuorumReadPattern", ["quorum", "fifo"],
     "`quorum`: read every active child and vote; `fifo`: read the first child that works.")
enum("QuorumOpType", ["read", "write", "flush"], "The kind of request a quorum event is about.")

_NODE_NAME_DOC = "the node's name (letters, digits, `-_.`, at most 31, starting with a letter)"

union(
    "BlockdevOptions",
    {"driver": "BlockdevDriver", "*node-name": "str", "*read-only": "bool"},
    "driver",
    {"file": "BlockdevOptionsFile", "raw": "BlockdevOptionsRaw",
     "quorum": "BlockdevOptionsQuorum", "faulty": "BlockdevOptionsFaulty",
     "nbd": "BlockdevOptionsNbd"},
    "Options of a block node, selected by `driver` (QEMU's BlockdevOptions, reduced "
    "to what nbdquorum implements).",
    docs={"driver": "block driver", "node-name": _NODE_NAME_DOC,
          "read-only": "open without write permission (default false)"},
)
enum("SocketAddressType", ["inet", "unix"], "The kind of a socket address.")
enum("XResyncMode", ["full", "missed"],
     "What a child added live copies: `full`, everything; `missed`, only the regions "
     "written since an earlier node of the same image left the quorum.")
struct("InetSocketAddress", {"host": "str", "port": "str", "*keep-alive": "bool"},
       "A TCP address (QEMU's InetSocketAddress; the port is a string, as QEMU has it).",
       docs={"host": "host name or IP address", "port": "port number",
             "keep-alive": "accepted for QEMU's sake: TCP keepalive is always on"})
struct("UnixSocketAddress", {"path": "str"}, "A Unix socket.",
       docs={"path": "path of the socket"})
union("SocketAddress", {"type": "SocketAddressType"}, "type",
      {"inet": "InetSocketAddress", "unix": "UnixSocketAddress"},
      "Where a server listens (QEMU's SocketAddress).", docs={"type": "inet or unix"})
struct(
    "BlockdevOptionsNbd",
    {"server": "SocketAddress", "*export": "str", "*tls-creds": "str",
     "*tls-hostname": "str", "*reconnect-delay": "int", "*open-timeout": "int",
     "*x-timeout": "number"},
    "An export of an NBD server, usually on another host, as a quorum child (QEMU's "
    "BlockdevOptionsNbd). The export must have the quorum's size and be writable.",
    docs={"server": "the NBD server's address", "export": "the export name (default \"\")",
          "tls-creds": "a tls-creds-x509 object (endpoint client) for TLS",
          "tls-hostname": "the name the server's certificate must carry",
          "reconnect-delay": "seconds requests wait for a lost connection to come back "
                             "before they fail (default 0)",
          "open-timeout": "seconds blockdev-add keeps trying to connect (default 0: once)",
          "x-timeout": "seconds a request may take before the child counts as failed and "
                       "its connection is dropped (default: the server's --child-timeout)"})
struct("BlockdevOptionsFile", {"filename": "str"}, "A host file or block device.",
       docs={"filename": "path of the image"})
struct("BlockdevOptionsRaw", {"file": "BlockdevRef"}, "The raw format over a `file` node.",
       docs={"file": "the protocol node: inline options or an existing node's name"})
struct(
    "BlockdevOptionsQuorum",
    {"*vote-threshold": "int", "*read-pattern": "QuorumReadPattern",
     "*rewrite-corrupted": "bool", "*children": ["str"]},
    "Options of a quorum node. Only blockdev-reopen takes them: an omitted member "
    "keeps its current value (QEMU would reset it to its default).",
    docs={"vote-threshold": "children that must agree (1 .. number of children)",
          "read-pattern": "how reads are served",
          "rewrite-corrupted": "rewrite children that lose a read vote",
          "children": "the complete new list of child node-names; children not listed are "
                      "detached, nodes not yet children are attached"},
)
enum("FaultOp", ["read", "write", "flush", "any"],
     "The requests a fault rule applies to (`write` also covers zero and trim).")
enum("FaultAction", ["error", "flip", "zero", "hang"],
     "`error`: fail with `errno`; `flip`: reads return (writes store) every byte XOR 0xff; "
     "`zero`: reads return zeros; `hang`: the request does not complete until the rules "
     "change (the quorum's child timeout then counts it as failed).")
struct(
    "FaultRule",
    {"*op": "FaultOp", "*offset": "int", "*length": "int", "*action": "FaultAction",
     "*errno": "int", "*count": "int"},
    "One fault-injection rule (in the spirit of QEMU's blkdebug).",
    docs={"op": "which requests (default `any`)", "offset": "first byte (default 0)",
          "length": "bytes affected (default: to the end)",
          "action": "what goes wrong (default `error`)",
          "errno": "for `error`: the errno (default 5, EIO)",
          "count": "hits before the rule expires (default: never)"},
)
struct(
    "BlockdevOptionsFaulty",
    {"image": "BlockdevRef", "*rules": ["FaultRule"]},
    "A fault injector over another node (nbdquorum's blkdebug), for drills and tests. "
    "With no rules it passes everything through.",
    docs={"image": "the node underneath", "rules": "the initial rules (default none)"},
)
alternate("BlockdevRef", {"object": "BlockdevOptions", "string": "str"},
          "Inline node options, or the node-name of an existing node.")
_GROWS = ("The shape only grows: new members (and new child states) may appear in later "
          "versions; no member is renamed or removed, and none changes its type. Clients "
          "must ignore members they do not know.")
enum("QuorumChildState", ["active", "resyncing", "faulted", "unreachable"],
     "A quorum child's state: `active` (in sync; read and counted in votes), `resyncing` "
     "(gets every write, never read or counted, until its resync job has copied the voted "
     "contents to it), `faulted` (failed too often, or its image vanished: no I/O at all), "
     "`unreachable` (a child on another host whose link or server is down: no I/O, the "
     "regions written meanwhile recorded; it reconnects in the background and catches up "
     "on them, `resyncing`, when it returns). "
     "New states may appear; a client should treat an unknown one as not `active`.")
struct(
    "QuorumScrubResult",
    {"repair": "bool", "mismatched-regions": "any", "mismatched-bytes": "any",
     "unrecoverable-regions": "int", "scanned": "int", "cancelled": "bool", "*error": "str",
     "finished": "number", "checksum-errors": "any"},
    "The result of a quorum's last scrub (x-quorum-scrub), kept until the next one ends. "
    "Children are named by node-name as they were when the scrub ran: a child removed "
    "since may still be named. " + _GROWS,
    docs={"repair": "whether the children that lost were rewritten",
          "mismatched-regions": "`{node-name: regions}`: regions where that child lost the "
                                "vote (children that never lost are absent)",
          "mismatched-bytes": "`{node-name: bytes}`: the bytes that differed there",
          "unrecoverable-regions": "regions where no version reached the vote threshold",
          "scanned": "bytes scanned (less than the size if cancelled or failed)",
          "cancelled": "the scrub was cancelled (job-cancel, or the server stopping)",
          "error": "why the scrub failed; `null` when it did not",
          "finished": "when it ended: seconds since the Unix epoch (UTC)",
          "checksum-errors": "`{node-name: count}`: each child's `checksum-errors` counter "
                             "as the scrub ended; after a completed repair, errors up to "
                             "that count have been repaired"},
)
struct(
    "QuorumChildStatus",
    {"child": "str", "node-name": "str", "filename": "str", "state": "QuorumChildState",
     "errors": "int", "unsynced-bytes": "int", "resync-failures": "int",
     "generation": "int", "*resync-error": "str", "*fault-reason": "str", "reads": "int",
     "writes": "int", "read-errors": "int",
     "write-errors": "int", "flush-errors": "int", "checksum-errors": "int",
     "repaired-bytes": "int"},
    "One child of a quorum in query-quorum-status. Counters count since the server "
    "started (or the child joined) and never go down. " + _GROWS,
    docs={"child": "its edge name, `children.N`",
          "node-name": "the child node's name",
          "filename": "the image file underneath, or the `nbd://` (`nbd+unix://`) URI of "
                      "a child on another host",
          "state": "`active`, `resyncing`, `faulted` or `unreachable`",
          "errors": "errors counted toward the fault limit (`serve --max-errors`) since it "
                    "joined, halved for every hour without one (md's read-error decay); "
                    "reaching the limit faults the child",
          "fault-reason": "why it is faulted, while it is (the limit reached, the image "
                          "deleted or resized, an export of another size)",
          "unsynced-bytes": "bytes its resync still has to copy (0 when in sync)",
          "resync-failures": "resync attempts that failed in a row (the server retries)",
          "generation": "md's event count for this child: the quorum's `events` when it "
                        "last held every acknowledged write; behind the newest, it is "
                        "stale and never a source (kept in the state dir)",
          "resync-error": "the last failed resync's error, while there is one",
          "reads": "read requests sent to it",
          "writes": "write, zero and trim requests sent to it",
          "read-errors": "reads that failed",
          "write-errors": "writes (zero, trim) that failed",
          "flush-errors": "flushes that failed",
          "checksum-errors": "reads whose data lost the vote (zpool's CKSUM)",
          "repaired-bytes": "bytes rewritten on it with the winning version"},
)
struct(
    "QuorumStatus",
    {"node-name": "str", "vote-threshold": "int", "read-pattern": "QuorumReadPattern",
     "rewrite-corrupted": "bool", "size": "int", "events": "int",
     "children": ["QuorumChildStatus"], "last-scrub": "QuorumScrubResult"},
    "One quorum in query-quorum-status (and `nbdquorum ctl status --json`). " + _GROWS,
    docs={"node-name": "the quorum's node-name",
          "vote-threshold": "children that must agree",
          "read-pattern": "`quorum` or `fifo`",
          "rewrite-corrupted": "whether children that lose a read vote are rewritten",
          "size": "the virtual size in bytes",
          "events": "md's event count: one more at every membership or child-state "
                    "change (kept in the state dir)",
          "children": "its children, in edge order",
          "last-scrub": "the last scrub's result; `null` until a scrub has ended"},
)
enum("JobStatus", ["created", "running", "paused", "waiting", "pending", "aborting",
                   "concluded", "null"],
     "A job's status, in QEMU's state machine (QEMU also has `ready`, `standby` and "
     "`undefined`, which nbdquorum's jobs never enter).")
enum("BlockDeviceIoStatus", ["ok", "failed", "nospace"],
     "Whether a job's last I/O worked (`nospace`: it failed for lack of space).")
struct(
    "BlockJobInfo",
    {"type": "str", "device": "str", "len": "int", "offset": "int", "busy": "bool",
     "paused": "bool", "speed": "int", "io-status": "BlockDeviceIoStatus", "ready": "bool",
     "status": "JobStatus", "auto-finalize": "bool", "auto-dismiss": "bool", "*error": "str"},
    "A running block job, in the shape of QEMU 7.2's BlockJobInfo. `type` is `resync` or "
    "`scrub` (QEMU's job types are `mirror`, `commit`, ...), so a client that decodes it "
    "as QEMU's JobType enum must accept other strings.",
    docs={"type": "the job type: `resync` or `scrub`",
          "device": "the job's id (as in the BLOCK_JOB_* events and job-* commands)",
          "len": "bytes to do, so far (a resync's grows when writes fail on its child)",
          "offset": "bytes done; `offset / len` is the progress",
          "busy": "the job is working (not paused, not finished)",
          "paused": "the job is paused (job-pause)",
          "speed": "rate limit in bytes per second, 0 = unlimited (block-job-set-speed)",
          "io-status": "`failed` once the job has failed, else `ok`",
          "ready": "always false: no nbdquorum job waits for a job-complete",
          "status": "the job's status",
          "auto-finalize": "always true: jobs finalize themselves",
          "auto-dismiss": "always true: jobs dismiss themselves once concluded",
          "error": "why the job failed, once it has"},
)

# --------------------------------------------------------------------------- commands

_NEW_CHILD_DOC = (
    "A new child gets every write that starts after it joined, but holds stale data "
    "wherever it has not been written since. In `nbdquorum serve` it therefore starts "
    "in state `resyncing`: written, never read or counted in a vote, until a background "
    "job (`resync-NODE`, reported by JOB_STATUS_CHANGE and BLOCK_JOB_COMPLETED) has "
    "copied the quorum's voted contents to it; then it becomes `active` "
    "(query-quorum-status shows both). QEMU instead lets the child vote at once and "
    "requires its data to be consistent already."
)

COMMANDS: Final[dict[str, Command]] = {c.name: c for c in [
    cmd(
        "qmp_capabilities", {"*enable": ["QMPCapability"]},
        doc="Leave capabilities negotiation mode; every other command (and every event) "
            "becomes available. Before it, any other command fails with CommandNotFound "
            "\"Expecting capabilities negotiation with 'qmp_capabilities'\"; after it, "
            "a second call fails with CommandNotFound \"Capabilities negotiation is "
            "already complete, command ignored\".",
        docs={"enable": "capabilities to enable; only `oob` exists (exec-oob is accepted, "
                        "but no command allows out-of-band execution)"},
        examples=['-> {"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "query-version", {}, returns="VersionInfo",
        doc="The server's version, in QEMU's shape: nbdquorum's version is reported as "
            "the `qemu` triple and `package` names it.",
        examples=['-> {"execute": "query-version"}',
                  '<- {"return": {"qemu": {"micro": 0, "minor": 1, "major": 0}, '
                  '"package": "nbdquorum 0.1.0"}}'],
    ),
    cmd(
        "query-commands", {}, returns="[CommandInfo]",
        doc="The commands this monitor accepts, as `[{\"name\": ...}]`.",
        examples=['-> {"execute": "query-commands"}',
                  '<- {"return": [{"name": "qmp_capabilities"}, {"name": "query-version"}, '
                  '...]}'],
    ),
    cmd(
        "quit", {},
        doc="Stop the server, as SIGTERM does: stop accepting, finish in-flight requests, "
            "flush every child, exit 0. The reply is sent first.",
        examples=['-> {"execute": "quit"}', '<- {"return": {}}'],
    ),
    cmd(
        "blockdev-add", "BlockdevOptions",
        doc="Open a node: `raw` over an inline `file` (or over an existing file node "
            "given by name), or a bare `file` node. `node-name` is required for the node "
            "itself; an inline file without one gets an automatic name (`#block001`) and "
            "is deleted with its raw node. The image must exist. A `quorum` node cannot "
            "be created here (the server creates its quorum from the command line).",
        examples=[
            '-> {"execute": "blockdev-add", "arguments": {"driver": "raw", '
            '"node-name": "new_node", "file": {"driver": "file", '
            '"filename": "/srv/img/new.raw"}}}',
            '<- {"return": {}}',
            '-> {"execute": "blockdev-add", "arguments": {"driver": "file", '
            '"node-name": "f3", "filename": "/srv/img/c3.raw"}}',
            '<- {"return": {}}',
            '-> {"execute": "blockdev-add", "arguments": {"driver": "raw", '
            '"node-name": "c3", "file": "f3"}}',
            '<- {"return": {}}',
        ],
    ),
    cmd(
        "object-add", {"qom-type": "str", "id": "str", "*dir": "str", "*endpoint": "str",
                       "*verify-peer": "bool"},
        doc="QEMU's object-add, for the one kind of object nbd nodes use: client TLS "
            "credentials (`tls-creds-x509`, endpoint `client`), named by `tls-creds` in "
            "blockdev-add. The directory holds `ca-cert.pem` (the CA that signed the "
            "server's certificate) and, when the server verifies clients, "
            "`client-cert.pem` and `client-key.pem`. The server's own TLS comes from "
            "`serve --tls-certificates`.",
        docs={"qom-type": "`tls-creds-x509`", "id": "the object's name",
              "dir": "the certificates' directory", "endpoint": "`client`",
              "verify-peer": "accepted for QEMU's sake: the server is always verified"},
        examples=['-> {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", '
                  '"id": "tls0", "dir": "/etc/pki/nbdquorum", "endpoint": "client"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "object-del", {"id": "str"},
        doc="Delete an object made by object-add; refused while an nbd node uses it.",
        docs={"id": "the object's name"},
        examples=['-> {"execute": "object-del", "arguments": {"id": "tls0"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "blockdev-del", {"node-name": "str"},
        doc="Close a node created by blockdev-add (or by the command line). Refused while "
            "the node is a child (\"Block device X is in use\") or exported "
            "(\"Node X is in use\"); an inline file node goes with its raw node.",
        docs={"node-name": "the node to delete"},
        examples=['-> {"execute": "blockdev-del", "arguments": {"node-name": "new_node"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "x-blockdev-change", {"parent": "str", "*child": "str", "*node": "str"},
        doc="QEMU's command to change a quorum's children: `node` attaches that node as "
            "the next child edge (`children.N`, N = one past the highest in use), "
            "`child` detaches the edge of that name. Exactly one of the two. A detached "
            "node stays open until blockdev-del. " + _NEW_CHILD_DOC,
        docs={"parent": "the quorum's node-name",
              "child": "the edge to remove, e.g. `children.1`",
              "node": "the node-name of the node to attach"},
        examples=[
            '-> {"execute": "x-blockdev-change", "arguments": {"parent": "quorum0", '
            '"node": "new_node"}}',
            '<- {"return": {}}',
            '-> {"execute": "x-blockdev-change", "arguments": {"parent": "quorum0", '
            '"child": "children.3"}}',
            '<- {"return": {}}',
        ],
    ),
    cmd(
        "x-blockdev-child-add", {"parent": "str", "child": "str", "*x-resync": "XResyncMode"},
        doc="Attach the node `child` to the quorum `parent` (the seed's name for "
            "x-blockdev-change with `node`). Refused, with nothing changed, for an unknown "
            "parent or node, a parent that is not a quorum, a node that already has a "
            "parent, and a node whose size differs from the quorum's. " + _NEW_CHILD_DOC,
        docs={"parent": "the quorum's node-name", "child": "node-name of the node to attach",
              "x-resync": "`full` (the default: copy everything) or `missed`: the node is "
                          "the image of a child that left while not in sync (a returning "
                          "secondary); only the regions written since it left are copied, "
                          "after an identity check (falls back to full)"},
        examples=[
            '-> {"execute": "x-blockdev-child-add", "arguments": {"parent": "quorum0", '
            '"child": "new_node"}}',
            '<- {"return": {}}',
        ],
    ),
    cmd(
        "x-blockdev-child-del", {"parent": "str", "child": "str"},
        doc="Detach a child of the quorum `parent`, named by its node-name (or by its edge "
            "name, `children.N`). Refused when fewer children than the vote threshold "
            "would remain (QEMU's rule), and when detaching an `active` child would leave "
            "fewer children in sync than the threshold (children still resyncing take "
            "writes but do not count), since every write would then fail.",
        docs={"parent": "the quorum's node-name",
              "child": "node-name of the child (or its edge name)"},
        examples=[
            '-> {"execute": "x-blockdev-child-del", "arguments": {"parent": "quorum0", '
            '"child": "new_node"}}',
            '<- {"return": {}}',
        ],
    ),
    cmd(
        "blockdev-reopen", {"options": ["BlockdevOptions"]},
        doc="Change a quorum's options live: `vote-threshold`, `read-pattern`, "
            "`rewrite-corrupted`, and its whole `children` list. All entries are checked "
            "first and then applied in one step, between two requests: either everything "
            "changes or nothing does. A new threshold must lie between 1 and the new number "
            "of children, and at least that many children must be in sync afterwards "
            "(new children resync before they vote). Omitted members keep their values. "
            "Only quorum nodes can be reopened (QEMU's quorum cannot be reopened at all).",
        docs={"options": "one entry per node to reopen, each with `driver` and `node-name`"},
        examples=[
            '-> {"execute": "blockdev-reopen", "arguments": {"options": [{"driver": "quorum", '
            '"node-name": "quorum0", "vote-threshold": 3, '
            '"children": ["child0", "child1", "child2", "new_node"]}]}}',
            '<- {"return": {}}',
        ],
    ),
    cmd(
        "query-named-block-nodes", {"*flat": "bool"}, returns="[BlockDeviceInfo]",
        doc="Every node, in QEMU's BlockDeviceInfo shape (`node-name`, `drv`, `ro`, `file`, "
            "`image` with `virtual-size`, ...). A quorum's entry also lists its members as "
            "`children`: `[{\"child\": \"children.N\", \"node-name\": ...}]`.",
        docs={"flat": "accepted for QEMU compatibility; there are no backing chains"},
        examples=[
            '-> {"execute": "query-named-block-nodes", "arguments": {"flat": true}}',
            '<- {"return": [{"node-name": "quorum0", "drv": "quorum", "ro": false, '
            '"image": {"virtual-size": 16777216, ...}, "children": [{"child": "children.0", '
            '"node-name": "child0"}, ...], ...}, ...]}',
        ],
    ),
    cmd(
        "query-jobs", {}, returns="[JobInfo]",
        doc="The running background jobs (resync, scrub) in QEMU's JobInfo shape: `id`, "
            "`type`, `status`, `current-progress`, `total-progress`, and `error` once failed. "
            "Jobs dismiss themselves when they conclude (QEMU's default); their ends are the "
            "JOB_STATUS_CHANGE, BLOCK_JOB_COMPLETED and BLOCK_JOB_CANCELLED events.",
        examples=['-> {"execute": "query-jobs"}',
                  '<- {"return": [{"current-progress": 5242880, "status": "running", '
                  '"total-progress": 16777216, "type": "resync", "id": "resync-new_node"}]}'],
    ),
    cmd(
        "query-block-jobs", {}, returns="[BlockJobInfo]",
        doc="The running block jobs (resync, scrub) in QEMU's BlockJobInfo shape: the "
            "jobs the BLOCK_JOB_COMPLETED and BLOCK_JOB_CANCELLED events report, while "
            "they run. `device` is the job's id. An empty list when nothing runs.",
        examples=['-> {"execute": "query-block-jobs"}',
                  '<- {"return": [{"auto-finalize": true, "io-status": "ok", '
                  '"device": "resync-new_node", "auto-dismiss": true, "busy": true, '
                  '"len": 16777216, "offset": 5242880, "status": "running", '
                  '"paused": false, "speed": 0, "ready": false, "type": "resync"}]}'],
    ),
    cmd(
        "job-pause", {"id": "str"},
        doc="Pause a running job at its next region boundary.",
        docs={"id": "the job's id"},
        examples=['-> {"execute": "job-pause", "arguments": {"id": "resync-new_node"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "job-resume", {"id": "str"},
        doc="Resume a paused job.",
        docs={"id": "the job's id"},
        examples=['-> {"execute": "job-resume", "arguments": {"id": "resync-new_node"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "job-cancel", {"id": "str"},
        doc="Cancel a job. A cancelled resync leaves its child `resyncing` (it never votes "
            "with partial data); its progress is kept and `x-quorum-resync` continues it.",
        docs={"id": "the job's id"},
        examples=['-> {"execute": "job-cancel", "arguments": {"id": "scrub-quorum0"}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "block-job-set-speed", {"device": "str", "speed": "int"},
        doc="Change a running job's rate limit (bytes per second, 0 = unlimited), live.",
        docs={"device": "the job's id", "speed": "bytes per second"},
        examples=['-> {"execute": "block-job-set-speed", "arguments": '
                  '{"device": "resync-new_node", "speed": 104857600}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "x-quorum-resync", {"node-name": "str", "*speed": "int", "*full": "bool"},
        doc="Start (or continue) the resync of a quorum child: the voted contents are copied "
            "onto it region by region while it receives every new write; it votes again "
            "only when it is complete. Children added live start resyncing by themselves; "
            "this restarts a cancelled or failed resync, and with `full` copies everything "
            "again (which also brings a `faulted` child back).",
        docs={"node-name": "the child's node-name",
              "speed": "rate limit in bytes per second (default: the server's --resync-speed)",
              "full": "copy every region, not only the unsynced ones"},
        examples=['-> {"execute": "x-quorum-resync", "arguments": {"node-name": "child1", '
                  '"full": true}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "x-quorum-scrub", {"*node-name": "str", "*repair": "bool", "*speed": "int",
                           "*job-id": "str"},
        doc="Start a scrub job: read every region of every active child, vote, count the "
            "regions and bytes where each child lost, and with `repair` rewrite them (md's "
            "check and repair, ZFS's scrub). It yields to client I/O. The result is in the "
            "QUORUM_SCRUB_DONE event and in query-quorum-status's `last-scrub`.",
        docs={"node-name": "the quorum (default: the only one)",
              "repair": "rewrite the children that lost the vote (default false)",
              "speed": "rate limit in bytes per second (default unlimited)",
              "job-id": "the job's id (default `scrub-NODE`)"},
        examples=['-> {"execute": "x-quorum-scrub", "arguments": {"repair": true}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "x-faulty-set", {"node-name": "str", "rules": ["FaultRule"]},
        doc="Replace the rules of a `faulty` node (a fault injector), live. An empty list "
            "heals it and releases hung requests.",
        docs={"node-name": "the faulty node", "rules": "the new rules"},
        examples=['-> {"execute": "x-faulty-set", "arguments": {"node-name": "child1", '
                  '"rules": [{"op": "read", "action": "error", "errno": 5}]}}',
                  '<- {"return": {}}'],
    ),
    cmd(
        "query-quorum-status", {"*node-name": "str"}, returns="[QuorumStatus]",
        doc="Beyond QEMU, in the spirit of `zpool status`: each quorum's options and, per "
            "child, its edge name, node-name, file, state (`active`, `resyncing`, `faulted`, "
            "`unreachable`) "
            "and counters (reads, writes, read/write/flush errors, checksum mismatches, "
            "repaired bytes, and `unsynced-bytes` while it resyncs), plus what the block "
            "layer adds (`last-scrub`). Counters are exact even when events are throttled. "
            "`nbdquorum ctl status` prints it as a table. Every member is documented in "
            "`QuorumStatus`, `QuorumChildStatus` and `QuorumScrubResult` (see Types); the "
            "shape only grows: new members and child states may appear, nothing is renamed "
            "or removed.",
        docs={"node-name": "only this quorum (default: all)"},
        examples=[
            '-> {"execute": "query-quorum-status"}',
            '<- {"return": [{"node-name": "quorum0", "vote-threshold": 2, '
            '"read-pattern": "quorum", "rewrite-corrupted": false, "size": 16777216, '
            '"children": [{"child": "children.0", "node-name": "child0", '
            '"filename": "/srv/img/c0.raw", "state": "active", "reads": 12, "writes": 40, '
            '"read-errors": 0, "write-errors": 0, "flush-errors": 0, '
            '"checksum-errors": 1, "repaired-bytes": 0, ...}, ...]}]}',
        ],
    ),
]}

# --------------------------------------------------------------------------- events

EVENTS: Final[dict[str, EventDef]] = {e.name: e for e in [
    event(
        "QUORUM_REPORT_BAD",
        {"type": "QuorumOpType", "*error": "str", "node-name": "str", "sector-num": "int",
         "sectors-count": "int"},
        throttled=True,
        doc="A child failed a request or lost a read vote (qapi/block.json). At most one a "
            "second per child node: within the second, later ones replace each other and "
            "the last is delivered when the second ends, with its own timestamp.",
        docs={"type": "the request's kind", "error": "strerror text; absent for a content "
                                                     "mismatch",
              "node-name": "the child node", "sector-num": "first 512-byte sector",
              "sectors-count": "number of sectors"},
        examples=['<- {"timestamp": {"seconds": 1795630054, "microseconds": 102390}, '
                  '"event": "QUORUM_REPORT_BAD", "data": {"node-name": "child1", '
                  '"sectors-count": 128, "sector-num": 0, "type": "read"}}'],
    ),
    event(
        "QUORUM_FAILURE",
        {"reference": "str", "sector-num": "int", "sectors-count": "int"},
        throttled=True,
        doc="A request could not reach the vote threshold and failed (qapi/block.json). "
            "Throttled like QUORUM_REPORT_BAD, but by event name alone, as QEMU does.",
        docs={"reference": "the quorum's node-name", "sector-num": "first 512-byte sector",
              "sectors-count": "number of sectors"},
        examples=['<- {"timestamp": {"seconds": 1795630059, "microseconds": 29277}, '
                  '"event": "QUORUM_FAILURE", "data": {"reference": "quorum0", '
                  '"sectors-count": 8, "sector-num": 0}}'],
    ),
    event(
        "JOB_STATUS_CHANGE", {"id": "str", "status": "str"},
        doc="A job changed status (QEMU's job states: created, running, paused, waiting, "
            "pending, aborting, concluded, null).",
        docs={"id": "the job", "status": "its new status"},
        examples=['<- {"timestamp": {"seconds": 1795630071, "microseconds": 790339}, '
                  '"event": "JOB_STATUS_CHANGE", "data": {"status": "running", '
                  '"id": "resync-new_node"}}'],
    ),
    event(
        "BLOCK_JOB_COMPLETED",
        {"type": "str", "device": "str", "len": "int", "offset": "int", "speed": "int",
         "*error": "str"},
        doc="A job finished (with `error` when it failed), in QEMU's shape; `device` is the "
            "job id, `type` is `resync` or `scrub`.",
        docs={"type": "the job type", "device": "the job id", "len": "bytes to do",
              "offset": "bytes done", "speed": "rate limit", "error": "why it failed"},
    ),
    event(
        "BLOCK_JOB_CANCELLED",
        {"type": "str", "device": "str", "len": "int", "offset": "int", "speed": "int"},
        doc="A job was cancelled (job-cancel, or the server stopping).",
        docs={"type": "the job type", "device": "the job id", "len": "bytes to do",
              "offset": "bytes done", "speed": "rate limit"},
    ),
    event(
        "QUORUM_CHILD_STATE_CHANGE",
        {"node-name": "str", "child": "str", "parent": "str", "state": "str",
         "previous": "str"},
        doc="Beyond QEMU: a child changed state: `resyncing` (joined, or missed a write), "
            "`active` (in sync, votes), `faulted` (too many errors, deleted or resized "
            "image; no more I/O), `unreachable` (its link or server is down; it catches up "
            "when it returns).",
        docs={"node-name": "the child", "child": "its edge name", "parent": "the quorum",
              "state": "the new state", "previous": "the old state"},
    ),
    event(
        "QUORUM_SCRUB_DONE",
        {"node-name": "str", "repair": "bool", "mismatched-regions": "any",
         "mismatched-bytes": "any", "unrecoverable-regions": "int", "scanned": "int",
         "cancelled": "bool"},
        doc="Beyond QEMU: a scrub ended; per child node-name, the regions and bytes where "
            "it lost the vote.",
        docs={"node-name": "the quorum", "repair": "whether losers were rewritten",
              "mismatched-regions": "{node-name: regions}",
              "mismatched-bytes": "{node-name: bytes}",
              "unrecoverable-regions": "regions with no quorum",
              "scanned": "bytes scanned", "cancelled": "stopped early"},
    ),
]}

#: Every other event on the block layer's bus (job events, child state changes)
#: is forwarded unthrottled, with the data its emitter gives it.
FORWARD_UNDECLARED: Final = True


# --------------------------------------------------------------------------- lookups


def named_type(name: str) -> NamedType:
    return _reg.types[name]


def all_types() -> dict[str, NamedType]:
    return dict(_reg.types)
