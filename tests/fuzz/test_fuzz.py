"""The fuzz targets: every corpus seed and every regression input replayed, and a
bounded run of the coverage-guided fuzzer (atheris) over each target.

A longer run, by hand: ``python -m tests.fuzz.run nbd -max_total_time=3600
/tmp/nbd-corpus tests/fuzz/corpus/nbd`` (run.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci import unavailable
from tests.fuzz.targets import TARGETS

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
#: seconds of fuzzing per target in the test suite (the CI's bounded run)
FUZZ_SECONDS = int(os.environ.get("NBDQUORUM_FUZZ_SECONDS", "12"))


def inputs(kind: str) -> list[Path]:
    found = []
    for where in (HERE / "corpus" / kind, HERE / "regressions" / kind):
        if where.is_dir():
            found += sorted(p for p in where.iterdir() if p.is_file())
    return found


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_corpus_and_regressions_replay(kind: str) -> None:
    files = inputs(kind)
    assert len(files) >= 10, f"the {kind} corpus is missing (python -m tests.fuzz.make_corpus)"
    for path in files:
        try:
            TARGETS[kind](path.read_bytes())
        except Exception as err:
            raise AssertionError(f"{path.relative_to(REPO_ROOT)}: {err!r}") from err


def test_targets_hold_their_oracle() -> None:
    """The oracle is live: a parser that raised something else would be caught."""
    import nbdquorum.nbd.protocol as protocol

    seed = inputs("nbd")[0].read_bytes()
    original = protocol.ServerConnection.next_event

    def broken(self: protocol.ServerConnection) -> object:
        raise ValueError("a parser bug")

    protocol.ServerConnection.next_event = broken  # type: ignore[assignment,method-assign]
    try:
        with pytest.raises(ValueError, match="a parser bug"):
            TARGETS["nbd"](seed)
    finally:
        protocol.ServerConnection.next_event = original  # type: ignore[method-assign]


@pytest.mark.timeout(FUZZ_SECONDS * 4 + 120)
@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_fuzz_for_a_bounded_time(kind: str, tmp_path: Path) -> None:
    """libFuzzer through atheris, FUZZ_SECONDS per target, from the repository's
    corpus; a crash fails the test and leaves the input to turn into a regression."""
    try:
        import atheris  # noqa: F401
    except ImportError:
        unavailable("atheris is not installed (pip install atheris: the test extra)")
    scratch = tmp_path / "corpus"
    scratch.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.run", kind, f"-max_total_time={FUZZ_SECONDS}",
         "-max_len=4096", "-timeout=20", "-rss_limit_mb=1024", "-print_final_stats=1",
         f"-artifact_prefix={artifacts}/", str(scratch), str(HERE / "corpus" / kind)],
        capture_output=True, text=True, timeout=FUZZ_SECONDS * 4 + 60, env=env, cwd=REPO_ROOT,
        check=False)
    crashes = sorted(artifacts.iterdir())
    if proc.returncode != 0 or crashes:
        keep = Path(os.environ.get("NBDQUORUM_FUZZ_ARTIFACTS", "/tmp/nbdquorum-fuzz"))
        keep.mkdir(parents=True, exist_ok=True)
        for c in crashes:
            shutil.copy(c, keep / f"{kind}-{c.name}")
        pytest.fail(f"the {kind} fuzzer failed (exit {proc.returncode}); inputs copied to "
                    f"{keep}:\n{proc.stderr[-5000:]}", pytrace=False)
    assert "Done" in proc.stderr, proc.stderr[-3000:]
    runs = [ln for ln in proc.stderr.splitlines() if ln.startswith("stat::number_of_executed_units")]
    assert runs and int(runs[0].split(":")[-1]) > 100, proc.stderr[-3000:]
