"""The sdist and the wheel hold what an installed nbdquorum needs.

Built from a copy of the checkout without build isolation (the venv's setuptools and
cffi, no network): the sdist first, then the wheel from that sdist, as ``python -m
build`` does.  tests/interop/test_packaging.py installs such a wheel and serves with it.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import nbdquorum
from tests.dists import (
    REPO_ROOT,
    build,
    sdist_names,
    source_copy,
    source_modules,
    unpack_sdist,
    wheel_names,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(sdist, wheel built from that sdist)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = source_copy(tmp / "src")
    out = tmp / "out"
    sdist = build(src, out, "--sdist", "--no-isolation")
    wheel = build(unpack_sdist(sdist, tmp / "unpacked"), out, "--wheel", "--no-isolation")
    return sdist, wheel


def test_the_wheel_holds_every_module_of_the_source_tree(dists: tuple[Path, Path]) -> None:
    names = wheel_names(dists[1])
    missing = sorted(source_modules() - names)
    assert not missing, f"modules of nbdquorum/ missing from {dists[1].name}: {missing}"
    assert {"nbdquorum/py.typed", "nbdquorum/_native_lib.pyi"} <= names
    assert [n for n in names if re.fullmatch(r"nbdquorum/_native_lib\..*\.so", n)], (
        f"the compiled C core is missing from {dists[1].name}: {sorted(names)}")


def test_the_sdist_holds_the_c_core_the_readme_and_its_docs(dists: tuple[Path, Path]) -> None:
    names = sdist_names(dists[0])
    native = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "native").iterdir()}
    assert native <= names, sorted(native - names)
    assert {"native/quorum.c", "native/quorum.h", "native/quorum.cdef"} <= native
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in",
            "nbdquorum/_native_build.py"} <= names
    linked = set(re.findall(r"\]\((docs/[^)#]+)", (REPO_ROOT / "README.md").read_text()))
    assert linked and linked <= names, sorted(linked - names)
    assert source_modules() <= names
    # sources only: no build products of a checkout
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))
                or n == "nbdquorum/_native_lib.c"], sorted(names)


def test_one_version_everywhere(dists: tuple[Path, Path]) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    for dist in dists:
        assert f"-{nbdquorum.__version__}" in dist.name, dist.name
    proc = subprocess.run([sys.executable, "-m", "nbdquorum", "--version"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nbdquorum {nbdquorum.__version__}"
