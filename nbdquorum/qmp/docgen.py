"""docs/qmp.md, generated from the table in schema.py (and ctl's own status formatter).

``python -m nbdquorum.qmp.docgen --markdown > docs/qmp.md``; a unit test checks
that the file is up to date.  This is the top of the QMP layers: it imports
the declarations and the operator's client, and nothing imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Final

from nbdquorum.ctl import format_status
from nbdquorum.qmp.schema import (
    COMMANDS,
    EVENTS,
    EnumType,
    Member,
    StructType,
    TypeRef,
    UnionType,
    all_types,
)


def _type_text(typ: TypeRef) -> str:
    if isinstance(typ, list):
        return f"[{_type_text(typ[0])}]"
    return typ


def _member_rows(members: Sequence[Member]) -> list[str]:
    if not members:
        return ["No arguments.", ""]
    rows = ["| member | type | |", "|---|---|---|"]
    for m in members:
        opt = " (optional)" if m.optional else ""
        rows.append(f"| `{m.name}`{opt} | `{_type_text(m.type)}` | {m.doc} |")
    return [*rows, ""]


def _examples(lines: Sequence[str]) -> list[str]:
    if not lines:
        return []
    return ["Example:", "", "```", *lines, "```", ""]


_CTL_DOC_HEAD = [
    "## The operator's CLI",
    "",
    "`nbdquorum ctl COMMAND --control PATH` (or `NBDQUORUM_CONTROL=PATH`; `--control` and",
    "`--timeout` go before or after the command) runs the usual sequences of the commands",
    "above. Every change prints one confirmation line on stdout (`--json`: one JSON object",
    "instead); progress bars go to stderr, on a terminal only.",
    "",
    "| command | what it does |",
    "|---|---|",
    "| `status [NODE] [--json]` | query-quorum-status: health (what is wrong and what to run), "
    "options, per child its edge, node, state and counters, the last scrub |",
    "| `add NAME=PATH [--wait] [--parent Q]` | blockdev-add (raw over file), then "
    "x-blockdev-child-add; the node is deleted again if the attach is refused; `--wait` waits "
    "until the child is `active` |",
    "| `remove NAME [--keep-node]` | x-blockdev-child-del, then blockdev-del |",
    "| `replace OLD NAME=PATH [--no-wait]` | add NAME, wait for its resync (a progress bar), "
    "then remove OLD; ends with a `done` line |",
    "| `threshold N` | blockdev-reopen with a new vote-threshold |",
    "| `scrub [--repair] [--wait] [--speed B]` | x-quorum-scrub; `--wait`: a progress bar, "
    "then a summary line (exit 1 if the scrub was cancelled or failed) |",
    "| `events [--count N] [--name EVENT]` | print events as JSON lines until interrupted; an "
    "unknown EVENT is refused (exit 2) with the list of events |",
    "| `qmp COMMAND [ARGS] \\| qmp JSON` | send one command (a name, and its arguments as a "
    "JSON object) or one raw message; print the reply |",
    "",
    "`--parent` is needed only when the server has several quorums. Exit codes: 0 success,",
    "1 the server refused a command (its `desc` on stderr), 2 usage, 3 cannot connect.",
    "",
    "`status` heads each quorum with its health, like `zpool status`: `healthy`, `degraded`",
    "(a child is faulted, resyncing or unreachable, or has had errors lately: its count",
    "toward `--max-errors`, which halves every hour, is not zero; I/O works) or `failed`",
    "(fewer children in sync than the vote threshold: I/O fails), then a `status:` and an",
    "`action:` line per problem, naming the child and the command to run next. Checksum",
    "errors that a completed `scrub --repair` has dealt with are reported as repaired, and",
    "I/O errors whose count has decayed to zero as history. The last scrub is one",
    "line: kind, outcome, local date, size scanned and what it found on the current children,",
    "e.g. `last scrub: repair, completed 2026-11-25 18:07:51 CET, 16.0 MiB scanned, child1: 3",
    "regions (192.0 KiB) repaired`.",
    "",
]

_CTL_EXAMPLE_STATUS: Final = {
    "node-name": "quorum0", "vote-threshold": 2, "read-pattern": "quorum",
    "rewrite-corrupted": False, "size": 16 << 20, "last-scrub": None,
    "children": [
        {"child": f"children.{i}", "node-name": f"child{i}", "filename": f"/srv/img/c{i}.raw",
         "state": "active", "errors": 0, "unsynced-bytes": 0, "resync-failures": 0,
         "reads": 12, "writes": 40, "read-errors": 0, "write-errors": 0, "flush-errors": 0,
         "checksum-errors": 3 if i == 1 else 0, "repaired-bytes": 0}
        for i in range(3)],
}


def _ctl_doc() -> list[str]:
    """The CLI section, its status example printed by ctl's own formatter."""
    return [
        *_CTL_DOC_HEAD,
        "```",
        "$ nbdquorum ctl status --control /run/nbdq.qmp",
        *format_status([_CTL_EXAMPLE_STATUS]).rstrip("\n").split("\n"),
        "$ nbdquorum ctl scrub --repair --wait",
        "scrub of quorum0: repair, completed 2026-11-25 18:07:51 CET, 16.0 MiB scanned, "
        "child1: 3 regions (192.0 KiB) repaired",
        "$ nbdquorum ctl replace child1 child3=/srv/img/c3.raw",
        "resync child3 [##############################] 100.0%    212.4 MiB/s",
        "replaced child1 with child3 in quorum0: done (child3 in sync, child1 removed)",
        "```",
        "",
        "`status --json` prints query-quorum-status's list of `QuorumStatus` (see Types) as",
        "it is: its shape only grows (new members and child states may appear; nothing is",
        "renamed or removed), so scripts may rely on every member documented there.",
        "",
    ]


def markdown() -> str:
    """docs/qmp.md, generated from the table."""
    out = [
        "# QMP reference",
        "",
        "<!-- Generated by `python -m nbdquorum.qmp.docgen --markdown > docs/qmp.md`;",
        "     do not edit. A unit test checks that this file is up to date. -->",
        "",
        "nbdquorum speaks QMP on the Unix socket given by `serve --control PATH` (created with",
        "mode 0600). The wire format is QEMU's (docs/interop/qmp-spec): one JSON object a line,",
        "`\\r\\n`-terminated replies, `{\"execute\", \"arguments\"?, \"id\"?}` in,",
        "`{\"return\", \"id\"}` or `{\"id\", \"error\": {\"class\", \"desc\"}}` out. Existing",
        "clients (qemu.qmp's `QMPClient`, `qmp-shell`, socat) work unchanged, and so does the",
        "`nbdquorum ctl` tool.",
        "",
        "## Session",
        "",
        "```",
        '<- {"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, '
        '"package": "nbdquorum 0.1.0"}, "capabilities": ["oob"]}}',
        '-> {"execute": "query-version", "id": 1}',
        '<- {"id": 1, "error": {"class": "CommandNotFound", '
        '"desc": "Expecting capabilities negotiation with \'qmp_capabilities\'"}}',
        '-> {"execute": "qmp_capabilities", "id": 2}',
        '<- {"return": {}, "id": 2}',
        '-> {"execute": "x-blockdev-change", "arguments": {"parent": "quorum0"}, "id": 3}',
        '<- {"id": 3, "error": {"class": "GenericError", '
        '"desc": "Either child or node must be specified"}}',
        "```",
        "",
        "Errors use QEMU's classes (`GenericError`, `CommandNotFound`, `DeviceNotFound`) and,",
        "where QEMU has a text for the same situation, QEMU's text. Input that is not a QMP",
        "command gets an error and the monitor keeps working:",
        "",
        "| input | `desc` |",
        "|---|---|",
        "| `{ \"execute\": }` | `JSON parse error, expecting value` (no `id`) |",
        "| `[1, 2]` | `QMP input must be a JSON object` |",
        "| `{\"foo\": 1}` | `QMP input member 'foo' is unexpected` |",
        "| `{\"execute\": 1}` | `QMP input member 'execute' must be a string` |",
        "| `{\"execute\": \"quit\", \"arguments\": []}` |"
        " `QMP input member 'arguments' must be an object` |",
        "| an unknown command `x` | `The command x has not been found` (CommandNotFound) |",
        "| a missing argument | `Parameter 'node-name' is missing` |",
        "| an unknown argument | `Parameter 'bogus' is unexpected` |",
        "| a wrong type | `Invalid parameter type for 'parent', expected: string` |",
        "",
        "Single-quoted strings are accepted, as QEMU does. An incomplete object waits for more",
        "bytes (even across newlines); an ASCII control character other than whitespace (or",
        "0xFF) drops it with a parse error. After any other parse error the rest of the line",
        "is skipped, so garbage costs one error reply per line (QEMU sends one per token).",
        "A pending message larger than 64 MiB, or nested deeper than 1024, is dropped.",
        "",
        "Events go to every client that has completed negotiation, as",
        "`{\"timestamp\": {\"seconds\", \"microseconds\"}, \"event\", \"data\"}`.",
        "",
        "## Commands",
        "",
    ]
    for c in COMMANDS.values():
        out += [f"### {c.name}", ""]
        if c.features:
            out += [f"Features: {', '.join(c.features)}.", ""]
        out += [c.doc, ""]
        if c.boxed is not None:
            out += [f"Arguments: the members of `{c.boxed}` (see Types).", ""]
        else:
            out += _member_rows(c.members)
        out += [f"Returns: `{c.returns}`" + (f": {c.returns_doc}" if c.returns_doc else ""), ""]
        out += _examples(c.examples)
    out += ["## Events", ""]
    for e in EVENTS.values():
        out += [f"### {e.name}", "", e.doc, ""]
        out += _member_rows(e.members)
        out += _examples(e.examples)
    out += [
        "Every other event of the block layer (job events such as `JOB_STATUS_CHANGE` and",
        "`BLOCK_JOB_COMPLETED`, child state changes) is forwarded as emitted, unthrottled.",
        "",
        *_ctl_doc(),
        "## Types",
        "",
    ]
    for t in all_types().values():
        out += [f"### {t.name}", "", t.doc, ""]
        if isinstance(t, EnumType):
            out += ["Values: " + ", ".join(f"`{v}`" for v in t.values) + ".", ""]
        elif isinstance(t, StructType):
            out += _member_rows(t.members)
        elif isinstance(t, UnionType):
            out += _member_rows(t.base)
            variants = ", ".join(f"`{k}`: `{v}`" for k, v in t.variants.items())
            out += [f"Then, by `{t.discriminator}`: {variants}.", ""]
        else:
            choices = ", ".join(f"a JSON {k}: `{_type_text(v)}`" for k, v in t.choices.items())
            out += [f"One of: {choices}.", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbdquorum.qmp.docgen")
    parser.add_argument("--markdown", action="store_true", help="print docs/qmp.md")
    parser.add_argument("--json", action="store_true", help="print the command names as JSON")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown())
    elif args.json:
        print(json.dumps(sorted(COMMANDS)))
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
