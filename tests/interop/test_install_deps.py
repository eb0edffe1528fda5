"""scripts/install-deps touches apt only when something is missing.

apt-get is replaced by a stub on PATH that records a call and fails: on a machine that
has everything (CI, after scripts/install-deps), checking must not call it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.interop.conftest import REPO_ROOT, output, require, run

SCRIPT = REPO_ROOT / "scripts" / "install-deps"


def _stub_apt(bindir: Path, called: Path) -> None:
    bindir.mkdir(parents=True, exist_ok=True)
    for name in ("apt-get", "apt"):
        stub = bindir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {called}\nexit 1\n')
        stub.chmod(0o755)


def test_nothing_is_missing_and_apt_is_not_called(tmp_path: Path) -> None:
    require("dpkg-query")
    called = tmp_path / "apt-called"
    _stub_apt(tmp_path / "bin", called)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    proc = run([SCRIPT, "--check"], env=env)
    assert proc.returncode == 0 and not output(proc), output(proc)
    assert not called.exists(), called.read_text()


def test_a_missing_command_is_reported_without_calling_apt(tmp_path: Path) -> None:
    """The check is real: with nbdfuse off PATH, it names nbdfuse (and exits 1)."""
    require("dpkg-query")
    called = tmp_path / "apt-called"
    bindir = tmp_path / "bin"
    _stub_apt(bindir, called)
    for tool in ("bash", "dpkg-query", "grep", "dirname", "cat"):
        found = shutil.which(tool)
        assert found is not None, tool
        (bindir / tool).symlink_to(found)
    proc = run([SCRIPT, "--check"], env=dict(os.environ, PATH=str(bindir)))
    assert proc.returncode == 1, output(proc)
    assert "missing Debian packages: nbdfuse" in output(proc), output(proc)
    assert not called.exists(), called.read_text()
