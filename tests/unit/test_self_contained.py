"""The repository stands alone: nothing in it cites files or trackers a user does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("nbdquorum", "tests", "scripts", "docs", "native", ".ci")
TOP = ("README.md", "pyproject.toml", "Makefile", "setup.py")
SUFFIXES = {".py", ".md", ".toml", ".c", ".h", ".cdef", ".yml", ".yaml", ".txt", ".sh", ""}
# Built from pieces so that this file does not match itself.
FORBIDDEN = re.compile(
    r"\.\./" + "shared"
    + r"|" + "shared" + r"/reference"
    + r"|qemu-quorum\." + "md"
    + r"|qemu-nbd-child\." + "md"
    + r"|child-add-" + "thread"
    + r"|\b" + "[Ii]ssue" + r"s?\s+#?\d+"
)


def files() -> list[Path]:
    found = [ROOT / name for name in TOP if (ROOT / name).exists()]
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*")):
            if (path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts
                    and path.name != Path(__file__).name):
                found.append(path)
    return found


def test_no_citation_of_material_outside_the_repository() -> None:
    hits = []
    for path in files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "cites what a user of the repository does not have:\n" + "\n".join(hits)
