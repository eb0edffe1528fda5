"""The coverage-guided fuzzer (atheris, libFuzzer) over one target of targets.py.

    python -m tests.fuzz.run nbd [LIBFUZZER OPTIONS] [CORPUS DIR ...]
    python -m tests.fuzz.run qmp -max_total_time=600 /tmp/qmp-corpus tests/fuzz/corpus/qmp

libFuzzer's options as usual (-runs=N, -max_total_time=S, -max_len=N, ...); the
first corpus directory receives the new inputs, so give a scratch directory
first and the repository's corpus after it.  A crash writes ``crash-*`` (see
-artifact_prefix=); copy it to tests/fuzz/regressions/<target>/ with the fix:
test_fuzz.py replays every input there.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["nbdquorum"]):
    # instrumented (coverage feedback) before targets.py imports them
    import nbdquorum.nbd.protocol
    import nbdquorum.nbd.wire
    import nbdquorum.qmp.protocol  # noqa: F401

from tests.fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[sys.argv.pop(1)]
    atheris.Setup(sys.argv, target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
