"""Building the sdist and the wheel the way a user's ``pip install`` / ``python -m build`` does.

Shared by tests/unit/test_packaging.py (offline, the venv's setuptools) and
tests/interop/test_packaging.py (isolated builds, a fresh venv, a served quorum).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parent.parent

#: what a checkout may hold besides its sources (the .gitignore's entries): not copied
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.o",
    "_native_lib.c", "demo", "bench-out", ".pytest_cache", ".mypy_cache", ".ruff_cache",
    ".hypothesis",
)


def source_copy(dest: Path) -> Path:
    """The checkout's sources (no venv, no build products) copied to ``dest``: builds
    run there, never writing into the checkout."""
    shutil.copytree(REPO_ROOT, dest, ignore=_NOT_SOURCES)
    return dest


def require_build() -> None:
    try:
        import build  # noqa: F401
    except ImportError:
        unavailable("the 'build' package (the test extra) is not installed")


def build(srcdir: Path, outdir: Path, *options: str, timeout: float = 300) -> Path:
    """``python -m build OPTIONS --outdir OUTDIR SRCDIR``; the one file it made."""
    require_build()
    before = set(outdir.iterdir()) if outdir.exists() else set()
    proc = subprocess.run(
        [sys.executable, "-m", "build", *options, "--outdir", str(outdir), str(srcdir)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"python -m build {' '.join(options)} {srcdir} failed:\n"
                    f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}", pytrace=False)
    made = sorted(set(outdir.iterdir()) - before)
    assert len(made) == 1, made
    return made[0]


def unpack_sdist(sdist: Path, dest: Path) -> Path:
    """Unpack an sdist; the project directory inside it."""
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4 and later
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # our own sdist
    (top,) = dest.iterdir()
    return top


def sdist_names(sdist: Path) -> set[str]:
    """The sdist's files, relative to its top directory."""
    with tarfile.open(sdist) as tar:
        return {m.name.partition("/")[2] for m in tar.getmembers() if m.isfile()}


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


def source_modules() -> set[str]:
    """Every module of the package's source tree, as a path in a wheel."""
    pkg = REPO_ROOT / "nbdquorum"
    return {p.relative_to(REPO_ROOT).as_posix() for p in pkg.rglob("*.py")
            if "__pycache__" not in p.parts}
