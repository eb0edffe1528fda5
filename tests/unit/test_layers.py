"""The layers point one way: read every module's imports and hold them to the rules.

Each module of nbdquorum/ is parsed with ``ast`` (nothing is imported).  Every
import counts, wherever it is written: at module level, inside a function (a
late import is still a dependency) and under ``if TYPE_CHECKING:`` (a type is
a dependency too).  Relative imports are resolved; ``from package import name``
counts as an import of ``package.name`` when that is a module.

- **Arrows.** ``RULES`` below says, for a group of modules, which modules they
  must not import (or the only ones they may).  A forbidden import anywhere in
  a module is a violation.
- **Cycles.** Only module-level imports make a cycle: they run while the
  module loads.  An import inside a function runs later, when both modules
  are loaded; one under ``TYPE_CHECKING`` never runs.  Neither closes a cycle,
  but both still count as arrows for the rules above.  Importing
  ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and
  ``a.b`` (a submodule importing a sibling while its package initialises is
  not a cycle).
- **The C core's read, vote and write functions** (``VOTED_IO_FUNCTIONS``) are
  used only by the Voted I/O package (``nbdquorum/block/quorum``): any
  reference to one of them elsewhere (``native.pread_vote(...)``, or passing
  ``native.pwrite_all`` to an executor, or importing it by name) is a
  violation.

``KNOWN_VIOLATIONS`` lists what today's code still breaks; it may only shrink.
The test fails on a violation that is not listed, and on a listed one that no
longer occurs (delete its line).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "nbdquorum"

# --------------------------------------------------------------------------- the rules
# Module patterns are dotted names relative to nbdquorum: "block" is the
# package block/ and every module in it, "nbd.server" that one module.

#: Modules that import nothing of nbdquorum; anything may import them
#: ("" is the package itself, nbdquorum/__init__.py: the version).
LEAVES = ("", "coretypes", "remote.uri")

#: The C core's functions that read, vote over or write N children: Voted I/O's alone.
VOTED_IO_FUNCTIONS = frozenset(
    {"pread_vote", "pread_vote_nowait", "pwrite_all", "pwrite_all_nowait", "vote", "diff_span"}
)
VOTED_IO_PACKAGE = "block.quorum"

#: nbd/ without the server: the wire, the protocol, the client.
NBD_PROTOCOL = ("nbd", "!nbd.server")
#: the storage side and everything above it, which the NBD protocol must not know
NOT_NBD_PROTOCOL = ("block", "jobs", "qmp", "worker", "state", "serve", "cli", "drill",
                    "metrics", "remote")


@dataclass(frozen=True)
class Rule:
    """``sources`` must not import ``forbidden``; with ``only``, nothing but ``only``.

    A pattern starting with ``!`` takes modules out again (``"nbd", "!nbd.server"``:
    nbd/ but not its server).  Leaf modules are always allowed.
    """

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None


RULES: tuple[Rule, ...] = (
    Rule("leaves import nothing of nbdquorum", LEAVES, only=()),
    Rule("native depends on nothing of the project", ("native",), only=("_native_lib",)),
    Rule("the NBD wire, protocol and client know no storage", NBD_PROTOCOL,
         forbidden=NOT_NBD_PROTOCOL),
    Rule("the NBD server uses the block-node interface and nothing else of block/",
         ("nbd.server",), forbidden=(*NOT_NBD_PROTOCOL, "!block.node")),
    Rule("block/ knows nothing of NBD, QMP, workers, persistence, jobs or the CLI", ("block",),
         forbidden=("nbd", "qmp", "worker", "state", "jobs", "serve", "cli", "drill",
                    "metrics", "remote")),
    Rule("a child on another host is a block node over the NBD client, nothing more",
         ("remote",), only=("block.node", "nbd.client", "nbd.constants", "nbd.wire",
                            "nbd.tls", "remote")),
    Rule("ctl is a client: it knows the QMP table and NBD URIs, not the server", ("ctl",),
         only=("qmp.schema", "qmp.errors", "remote.uri")),
    Rule("workers do not import the CLI or the drill", ("worker",),
         forbidden=("cli", "serve", "drill")),
    Rule("the drill is a client: it runs the server, never imports its code", ("drill",),
         forbidden=("cli", "serve", "block", "jobs", "state", "worker", "nbd.server",
                    "qmp.server", "qmp.commands")),
    Rule("serve, ctl and the drill do not import the command-line entry",
         ("serve", "ctl", "drill", "runtime"), forbidden=("cli",)),
    Rule("the runtime module is shared, so it imports nothing of the project", ("runtime",),
         only=()),
    Rule("qmp/schema.py declares: it imports nothing but qmp/errors", ("qmp.schema",),
         only=("qmp.errors",)),
)

#: What today's code still breaks, each "rule: source -> target".  This list
#: must shrink to empty: the test fails when a listed violation is gone.
#: (block/ building QMP-shaped dicts, event names and BlockDeviceInfo, breaks
#: the layers too, but imports nothing of qmp/ for it: no import test sees it.)
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- reading imports


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (nbdquorum.* only)
    line: int
    module_level: bool  # runs while the source loads (not in a function, not TYPE_CHECKING)


@dataclass(frozen=True)
class NativeUse:
    source: str
    name: str  # the native function
    line: int


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a chain of names and attributes, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Reader(ast.NodeVisitor):
    def __init__(self, name: str, is_package: bool, modules: Mapping[str, Path],
                 package: str) -> None:
        self.name = name
        self.is_package = is_package
        self.modules = modules
        self.package = package
        self.imports: list[Import] = []
        self.native_uses: list[NativeUse] = []
        self._depth = 0  # functions and TYPE_CHECKING blocks we are inside
        #: names bound to the module native (``import pkg.native`` binds the dotted name)
        self._native_names: set[str] = {f"{package}.native"}

    # -- where we are
    def _nested(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self._depth += 1
            for child in node.body:
                self.visit(child)
            self._depth -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    # -- imports
    def _add(self, target: str, line: int) -> None:
        if target == self.package or target.startswith(self.package + "."):
            self.imports.append(Import(self.name, target, line, self._depth == 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)
            if alias.name == f"{self.package}.native" and alias.asname:
                self._native_names.add(alias.asname)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            here = self.name.split(".")
            if not self.is_package:
                here.pop()
            here = here[:len(here) - (node.level - 1)]
            base = ".".join([*here, *([base] if base else [])])
        for alias in node.names:
            full = f"{base}.{alias.name}"
            if full in self.modules:
                self._add(full, node.lineno)
                if full == f"{self.package}.native":
                    self._native_names.add(alias.asname or alias.name)
            else:
                self._add(base, node.lineno)
                if base == f"{self.package}.native" and alias.name in VOTED_IO_FUNCTIONS:
                    self.native_uses.append(NativeUse(self.name, alias.name, node.lineno))

    # -- uses of the C core's functions
    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in VOTED_IO_FUNCTIONS and _dotted(node.value) in self._native_names:
            self.native_uses.append(NativeUse(self.name, node.attr, node.lineno))
        self.generic_visit(node)


def read_modules(root: Path = ROOT, package: str = PACKAGE,
                 ) -> tuple[list[Import], list[NativeUse], set[str]]:
    """Every import (within the package) and every use of a Voted I/O function."""
    modules = module_names(root, package)
    imports: list[Import] = []
    uses: list[NativeUse] = []
    for name, path in modules.items():
        reader = _Reader(name, path.name == "__init__.py", modules, package)
        reader.visit(ast.parse(path.read_text(), str(path)))
        imports += reader.imports
        uses += reader.native_uses
    return imports, uses, set(modules)


# --------------------------------------------------------------------------- checking


def _matches(module: str, patterns: Iterable[str], package: str = PACKAGE) -> bool:
    """Whether ``module`` is in the group the patterns describe (see Rule)."""
    hit = False
    for p in patterns:
        negate = p.startswith("!")
        name = p.lstrip("!")
        if not name:  # the package itself, not its modules
            if module == package:
                hit = not negate
            continue
        full = f"{package}.{name}"
        if module == full or module.startswith(full + "."):
            hit = not negate
    return hit


def violations(imports: Iterable[Import], uses: Iterable[NativeUse],
               rules: Iterable[Rule] = RULES, package: str = PACKAGE,
               voted_io: str = VOTED_IO_PACKAGE) -> dict[str, int]:
    """Every broken rule, "rule: source -> target", with one line where it happens."""
    found: dict[str, int] = {}
    for rule in rules:
        for imp in imports:
            if imp.source == imp.target or not _matches(imp.source, rule.sources, package):
                continue
            if _matches(imp.target, LEAVES, package):
                allowed = True
            elif rule.only is not None:
                allowed = _matches(imp.target, rule.only, package)
            else:
                allowed = not _matches(imp.target, rule.forbidden, package)
            if not allowed:
                found.setdefault(f"{rule.name}: {imp.source} -> {imp.target}", imp.line)
    for use in uses:
        if not _matches(use.source, (voted_io,), package):
            found.setdefault(f"Voted I/O: {use.source} -> native.{use.name}", use.line)
    return found


def cycles(imports: Iterable[Import]) -> list[list[str]]:
    """The import cycles among module-level imports (Tarjan's strongly connected components)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if imp.module_level:
            graph.setdefault(imp.source, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


# --------------------------------------------------------------------------- the tests


def _report(found: Mapping[str, int], keys: Iterable[str]) -> str:
    return "\n".join(f"  {k} (line {found[k]})" if k in found else f"  {k}"
                     for k in sorted(keys))


def test_no_import_cycle() -> None:
    imports, _, _ = read_modules()
    found = cycles(imports)
    assert not found, "module-level import cycles:\n" + "\n".join(
        "  " + " <-> ".join(c) for c in found)


def test_the_layers_point_one_way() -> None:
    imports, uses, _ = read_modules()
    found = violations(imports, uses)
    new = set(found) - KNOWN_VIOLATIONS
    gone = KNOWN_VIOLATIONS - set(found)
    assert not new, "imports that break the layer rules (tests/unit/test_layers.py):\n" + \
        _report(found, new)
    assert not gone, ("fixed: delete these lines from KNOWN_VIOLATIONS, "
                      "the list only shrinks:\n" + _report(found, gone))


def test_every_pattern_names_a_module() -> None:
    """A rule about a module that was renamed away would hold for nothing."""
    _, _, modules = read_modules()
    patterns = {*LEAVES, VOTED_IO_PACKAGE, *NOT_NBD_PROTOCOL} - {""}
    for rule in RULES:
        patterns |= {*rule.sources, *rule.forbidden, *(rule.only or ())}
    compiled = {"_native_lib"}  # the C core, built from native/ (no .py to read)
    missing = sorted(p for p in patterns - compiled
                     if not any(_matches(m, [p.lstrip("!")]) for m in modules))
    assert not missing, f"rule patterns that match no module: {missing}"


# -- the checker itself, on a made-up package: it must see what it is for


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    _write(tmp_path, {
        "__init__.py": "",
        "native.py": "def pread_vote(): pass\ndef tune_malloc(): pass\n",
        "a.py": "from pkg import b\n",
        "b.py": "import pkg.a\n",  # a <-> b: a cycle
        "c.py": "def f():\n    from pkg import d\n",  # a late import: no cycle
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.c import f\n",
        "low/__init__.py": "from . import wire\n",
        "low/wire.py": "from ..high import x\n",  # relative, two levels: low.wire -> high.x
        "high/__init__.py": "",
        "high/x.py": ("from pkg import native\nfrom pkg.native import pread_vote as pv\n"
                      "def g(run):\n    run(native.pread_vote)\n    native.tune_malloc()\n"),
        "high/y.py": "import pkg.native\npkg.native.pwrite_all()\n",
        "high/quorum/__init__.py": "from pkg import native\nnative.pread_vote()\n",
    })
    return tmp_path


def test_the_checker_resolves_every_kind_of_import(fake: Path) -> None:
    imports, _, modules = read_modules(fake, "pkg")
    assert "pkg.low" in modules and "pkg.high.quorum" in modules
    seen = {(i.source, i.target, i.module_level) for i in imports}
    assert ("pkg.a", "pkg.b", True) in seen
    assert ("pkg.b", "pkg.a", True) in seen
    assert ("pkg.c", "pkg.d", False) in seen  # inside a function
    assert ("pkg.d", "pkg.c", False) in seen  # under TYPE_CHECKING
    assert ("pkg.low", "pkg.low.wire", True) in seen  # from . import wire
    assert ("pkg.low.wire", "pkg.high.x", True) in seen  # from ..high import x


def test_the_checker_finds_cycles_only_among_module_level_imports(fake: Path) -> None:
    imports, _, _ = read_modules(fake, "pkg")
    assert cycles(imports) == [["pkg.a", "pkg.b"]]


def test_the_checker_finds_forbidden_arrows_and_voted_io_calls(fake: Path) -> None:
    imports, uses, _ = read_modules(fake, "pkg")
    rules = (Rule("low knows nothing of high", ("low",), forbidden=("high", "!high.quorum")),
             Rule("c imports only a", ("c",), only=("a",)))
    found = violations(imports, uses, rules, "pkg", voted_io="high.quorum")
    assert set(found) == {
        "low knows nothing of high: pkg.low.wire -> pkg.high.x",
        "c imports only a: pkg.c -> pkg.d",
        "Voted I/O: pkg.high.x -> native.pread_vote",  # imported by name, and referenced
        "Voted I/O: pkg.high.y -> native.pwrite_all",  # through the dotted name
    }
    assert [u.line for u in uses if u.source == "pkg.high.x"] == [2, 4]
    # the Voted I/O package itself may call the C core
    assert [u.name for u in uses if u.source == "pkg.high.quorum"] == ["pread_vote"]
