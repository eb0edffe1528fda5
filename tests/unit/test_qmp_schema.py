"""The QMP table tested as data: handlers, argument checking, docs, examples."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.block.graph import Graph
from nbdquorum.qmp import docgen, schema
from nbdquorum.qmp.check import check_arguments, check_event
from nbdquorum.qmp.commands import HANDLERS, Context, execute
from nbdquorum.qmp.errors import QMPError
from nbdquorum.qmp.protocol import Execute, ServerConnection, greeting
from nbdquorum.qmp.schema import COMMANDS, EVENTS, py_name
from tests.unit.aiohelp import run

REPO = Path(__file__).resolve().parents[2]




def negotiated_ctx() -> Context:
    conn = ServerConnection(greeting(0, 1, 0, "t"))
    conn.negotiate()
    return Context(Graph(), conn)


def error_of(name: str, arguments: dict[str, Any], ctx: Context | None = None) -> tuple[str, str]:
    with pytest.raises(QMPError) as info:
        run(execute(ctx or negotiated_ctx(), Execute(name, arguments)))
    return info.value.error_class, info.value.desc


# --------------------------------------------------------------------------- table <-> handlers


def test_every_command_has_a_handler_and_every_handler_a_command() -> None:
    assert set(COMMANDS) == set(HANDLERS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_handler_signature_matches_the_schema(name: str) -> None:
    cmd = COMMANDS[name]
    params = list(inspect.signature(HANDLERS[name]).parameters.values())
    assert params[0].name == "ctx"
    rest = params[1:]
    if cmd.boxed is not None:
        assert [p.kind for p in rest] == [inspect.Parameter.VAR_KEYWORD], name
        return
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in rest), name
    assert [p.name for p in rest] == [py_name(m.name) for m in cmd.members]
    for p, m in zip(rest, cmd.members, strict=True):
        has_default = p.default is not inspect.Parameter.empty
        assert has_default == m.optional, f"{name}: {m.name}"


def test_x_commands_are_unstable() -> None:
    for c in COMMANDS.values():
        assert ("unstable" in c.features) == c.name.startswith("x-")


def test_every_referenced_type_is_declared() -> None:
    types = schema.all_types()

    def refs(t: schema.TypeRef) -> None:
        name = t[0] if isinstance(t, list) else t
        assert name in schema.BUILTINS or name in types, name

    for c in COMMANDS.values():
        for m in c.members:
            refs(m.type)
        if c.boxed:
            assert c.boxed in types
    for e in EVENTS.values():
        for m in e.members:
            refs(m.type)
    for t in types.values():
        if isinstance(t, schema.StructType):
            for m in t.members:
                refs(m.type)
        elif isinstance(t, schema.UnionType):
            for m in t.base:
                refs(m.type)
            for v in t.variants.values():
                assert isinstance(types[v], schema.StructType)
        elif isinstance(t, schema.AlternateType):
            for v in t.choices.values():
                refs(v)


# --------------------------------------------------------------------------- argument errors


def test_unknown_command() -> None:
    assert error_of("no-such-cmd", {}) == ("CommandNotFound",
                                           "The command no-such-cmd has not been found")


def test_before_negotiation_every_command_but_qmp_capabilities_is_refused() -> None:
    ctx = Context(Graph(), ServerConnection(greeting(0, 1, 0, "t")))
    want = ("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
    assert error_of("query-version", {}, ctx) == want
    assert error_of("no-such-cmd", {}, ctx) == want
    assert run(execute(ctx, Execute("qmp_capabilities", {"enable": ["oob"]}))) == {}
    assert ctx.conn is not None and ctx.conn.oob_enabled
    assert error_of("qmp_capabilities", {}, ctx) == (
        "CommandNotFound", "Capabilities negotiation is already complete, command ignored")


def test_exec_oob_is_refused_for_every_command() -> None:
    with pytest.raises(QMPError) as info:
        run(execute(negotiated_ctx(), Execute("query-version", {}, 1, oob=True)))
    assert info.value.desc == "The command query-version does not support OOB"


@pytest.mark.parametrize(("name", "arguments", "desc"), [
    ("blockdev-del", {}, "Parameter 'node-name' is missing"),
    ("blockdev-del", {"node-name": "a", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ("blockdev-del", {"node-name": 1}, "Invalid parameter type for 'node-name', expected: string"),
    ("query-version", {"x": 1}, "Parameter 'x' is unexpected"),
    ("x-blockdev-change", {"parent": ["q"]},
     "Invalid parameter type for 'parent', expected: string"),
    ("x-blockdev-child-add", {"parent": "q"}, "Parameter 'child' is missing"),
    ("query-named-block-nodes", {"flat": "yes"},
     "Invalid parameter type for 'flat', expected: boolean"),
    ("qmp_capabilities", {"enable": ["foo"]}, "Parameter 'enable[0]' does not accept value 'foo'"),
    ("qmp_capabilities", {"enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
    ("blockdev-add", {}, "Parameter 'driver' is missing"),
    ("blockdev-add", {"driver": "qcow2"}, "Parameter 'driver' does not accept value 'qcow2'"),
    ("blockdev-add", {"driver": "raw", "node-name": "n"}, "Parameter 'file' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": 3},
     "Invalid parameter type for 'file', expected: BlockdevRef"),
    ("blockdev-add", {"driver": "raw", "node-name": "n", "file": {"driver": "file"}},
     "Parameter 'file.filename' is missing"),
    ("blockdev-add", {"driver": "raw", "node-name": "n",
                      "file": {"driver": "file", "filename": "/x", "aio": "native"}},
     "Parameter 'file.aio' is unexpected"),
    ("blockdev-add", {"driver": "file", "node-name": "n", "filename": "/x", "size": 1},
     "Parameter 'size' is unexpected"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "vote-threshold": "2"}]},
     "Invalid parameter type for 'options[0].vote-threshold', expected: integer"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "vote-threshold": True}]},
     "Invalid parameter type for 'options[0].vote-threshold', expected: integer"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "vote-threshold": 1.0}]},
     "Invalid parameter type for 'options[0].vote-threshold', expected: integer"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "vote-threshold": 1 << 64}]},
     "Invalid parameter type for 'options[0].vote-threshold', expected: integer"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "read-pattern": "lifo"}]},
     "Parameter 'options[0].read-pattern' does not accept value 'lifo'"),
    ("blockdev-reopen", {"options": [{"driver": "quorum", "children": ["a", 2]}]},
     "Invalid parameter type for 'options[0].children[1]', expected: string"),
])
def test_argument_errors_use_qemus_texts(name: str, arguments: dict[str, Any], desc: str) -> None:
    assert error_of(name, arguments) == ("GenericError", desc)


def test_missing_is_reported_before_unexpected_as_qemu_does() -> None:
    assert error_of("blockdev-del", {"bogus": 1}) == ("GenericError",
                                                     "Parameter 'node-name' is missing")


def test_checked_arguments_use_python_names() -> None:
    args = check_arguments(COMMANDS["blockdev-add"], {
        "driver": "raw", "node-name": "n", "read-only": False,
        "file": {"driver": "file", "filename": "/x", "node-name": "f"}})
    assert args == {"driver": "raw", "node_name": "n", "read_only": False,
                    "file": {"driver": "file", "filename": "/x", "node_name": "f"}}
    assert check_arguments(COMMANDS["blockdev-add"], {
        "driver": "raw", "node-name": "n", "file": "f0"})["file"] == "f0"


# --------------------------------------------------------------------------- examples, events, docs


def _example_requests() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for c in COMMANDS.values():
        for line in c.examples:
            if line.startswith("-> "):
                msg = json.loads(line[3:])
                out.append((c.name, msg))
    return out


@pytest.mark.parametrize(("name", "msg"), _example_requests())
def test_documented_requests_pass_the_checks(name: str, msg: dict[str, Any]) -> None:
    assert msg["execute"] == name
    check_arguments(COMMANDS[name], msg.get("arguments", {}))


def test_every_command_has_an_example() -> None:
    assert all(any(x.startswith("-> ") for x in c.examples) for c in COMMANDS.values())


def test_documented_events_match_their_schema() -> None:
    for e in EVENTS.values():
        for line in e.examples:
            msg = json.loads(line[3:])
            assert msg["event"] == e.name
            check_event(e.name, msg["data"])


def test_quorum_events_as_the_block_layer_emits_them_match_the_table() -> None:
    check_event("QUORUM_REPORT_BAD", {"node-name": "c1", "sectors-count": 128, "sector-num": 0,
                                      "type": "read"})
    check_event("QUORUM_REPORT_BAD", {"node-name": "w1", "sectors-count": 8, "sector-num": 0,
                                      "type": "write", "error": "No space left on device"})
    check_event("QUORUM_FAILURE", {"reference": "q0", "sectors-count": 8, "sector-num": 0})
    with pytest.raises(QMPError):
        check_event("QUORUM_REPORT_BAD", {"node-name": "c1", "type": "erase", "sector-num": 0,
                                          "sectors-count": 1})


def test_docs_qmp_md_is_up_to_date() -> None:
    doc = REPO / "docs" / "qmp.md"
    assert doc.read_text() == docgen.markdown(), (
        "docs/qmp.md is stale: run python -m nbdquorum.qmp.docgen --markdown > docs/qmp.md")


def test_docs_mention_every_command_and_event() -> None:
    text = docgen.markdown()
    for name in [*COMMANDS, *EVENTS]:
        assert f"### {name}\n" in text


def test_docgen_module_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "nbdquorum.qmp.docgen", "--json"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(proc.stdout) == sorted(COMMANDS)
