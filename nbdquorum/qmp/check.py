"""Argument checking against the table in schema.py (QAPI's input visitor).

Argument errors use QEMU's input-visitor texts (qapi/qobject-input-visitor.c),
with QEMU's full member names (``file.filename``, ``children[1]``):
"Parameter 'x' is missing", "Parameter 'x' is unexpected",
"Invalid parameter type for 'x', expected: string",
"Parameter 'x' does not accept value 'y'".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nbdquorum.qmp.errors import generic
from nbdquorum.qmp.schema import (
    BUILTINS,
    EVENTS,
    AlternateType,
    Command,
    EnumType,
    Member,
    StructType,
    TypeRef,
    named_type,
    py_name,
)

__all__ = ["check_arguments", "check_event", "visit"]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return "null"


def _full(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bad_type(name: str, expected: str) -> Exception:
    return generic(f"Invalid parameter type for '{name or 'null'}', expected: {expected}")


def visit(typ: TypeRef, value: Any, name: str) -> Any:
    """Check ``value`` against ``typ``; returns it with struct keys in Python spelling.

    Raises:
        QMPError: GenericError with QEMU's input-visitor text.
    """
    if isinstance(typ, list):
        if not isinstance(value, list):
            raise _bad_type(name, "array")
        return [visit(typ[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if typ in BUILTINS:
        kind = _kind(value)
        if typ == "any":
            return value
        if typ == "number":
            if kind not in ("integer", "number"):
                raise _bad_type(name, "number")
            return value
        if kind != BUILTINS[typ]:
            raise _bad_type(name, BUILTINS[typ])
        if typ == "int" and not -(1 << 63) <= value < (1 << 63):
            raise _bad_type(name, "integer")
        return value
    t = named_type(typ)
    if isinstance(t, EnumType):
        if not isinstance(value, str):
            raise _bad_type(name, "string")
        if value not in t.values:
            raise generic(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value
    if isinstance(t, AlternateType):
        kind = _kind(value)
        if kind not in t.choices:
            raise _bad_type(name, t.name)
        return visit(t.choices[kind], value, name)
    if not isinstance(value, dict):
        raise _bad_type(name, "object")
    if isinstance(t, StructType):
        return _visit_members(t.members, value, name)
    members = t.base
    out = _visit_members(members, value, name, strict=False)
    variant = named_type(t.variants[value[t.discriminator]])
    assert isinstance(variant, StructType)
    out.update(_visit_members(members + variant.members, value, name))
    return out


def _visit_members(members: Sequence[Member], value: Mapping[str, Any], prefix: str,
                   strict: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in members:
        full = _full(prefix, m.name)
        if m.name not in value:
            if not m.optional:
                raise generic(f"Parameter '{full}' is missing")
            continue
        out[py_name(m.name)] = visit(m.type, value[m.name], full)
    if strict:
        known = {m.name for m in members}
        for key in value:
            if key not in known:
                raise generic(f"Parameter '{_full(prefix, key)}' is unexpected")
    return out


def check_arguments(command: Command, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The checked arguments of ``command``, keyed by Python names.

    Raises:
        QMPError: GenericError "Parameter 'x' is missing" (or unexpected, or of the
            wrong type), as QEMU words it.
    """
    if command.boxed is not None:
        result = visit(command.boxed, dict(arguments), "")
        assert isinstance(result, dict)
        return result
    return _visit_members(command.members, arguments, "")


def check_event(name: str, data: Mapping[str, Any]) -> None:
    """Check an event's data against the table (tests; the server only logs).

    Raises:
        KeyError: the event is not declared.
        QMPError: the data does not match.
    """
    _visit_members(EVENTS[name].members, data, "")
