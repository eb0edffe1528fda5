"""scripts/demo, the README's first command, runs again after any practice on its quorum.

The demo records its membership in its state dir; a ``ctl replace`` there changes the
record, and the next ``scripts/demo`` must serve the recorded quorum (not refuse the
command line's children), and ``scripts/demo --reset`` must start afresh, saying what
it discards.  The demo runs in a temporary directory (NBDQUORUM_DEMO_DIR), on a free
TCP port, without reinstalling the venv (--no-install).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ci import unavailable
from tests.interop.conftest import (
    REPO_ROOT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    MiB,
    free_tcp_port,
    make_image,
    nbd_uri,
    nbdquorum_env,
    output,
    qemu_io,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

DEMO = REPO_ROOT / "scripts" / "demo"


class Demo:
    def __init__(self, tmp: Path) -> None:
        if not (REPO_ROOT / ".venv" / "bin" / "python").exists():
            unavailable("the venv scripts/demo runs (scripts/install-deps --python) is missing")
        self.dir = tmp / "demo"
        self.tmp = tmp
        self.runs = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "demo0.log"

    def start(self, *options: str) -> str:
        """Run scripts/demo until it serves; its output so far."""
        self.runs += 1
        self.log = self.tmp / f"demo{self.runs}.log"
        env = dict(os.environ, NBDQUORUM_DEMO_DIR=str(self.dir), PYTHONUNBUFFERED="1")
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [str(DEMO), "--no-install", *options, "--listen", f"127.0.0.1:{free_tcp_port()}"],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                cwd=self.tmp)
        wait_until(self._serving, START_TIMEOUT, "scripts/demo to serve")
        return self.text()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"scripts/demo exited with {self.proc.returncode}:\n{self.text()}",
                        pytrace=False)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.dir / "nbd.sock"))
            except OSError:
                return False
        return True

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=STOP_TIMEOUT)
        assert code == 0 and "stopped cleanly" in self.text(), self.text()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def uri(self) -> str:
        return nbd_uri(self.dir / "nbd.sock")

    def members(self) -> list[str]:
        state = json.loads((self.dir / "state" / "state.json").read_text())
        return [c["node-name"] for c in state["children"]]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "nbdquorum", "ctl", "--control",
                    str(self.dir / "qmp.sock"), *args], env=nbdquorum_env())


def test_the_demo_runs_again_after_a_replace_and_resets(tmp_path: Path) -> None:
    demo = Demo(tmp_path)
    try:
        demo.start()
        qemu_io(demo.uri(), "write -P 0x44 0 1M")
        # practise a repair: replace c with a new image d
        make_image(demo.dir / "d.raw", 256 * MiB)
        proc = demo.ctl("replace", "c", f"d={demo.dir / 'd.raw'}")
        assert proc.returncode == 0, output(proc)
        demo.stop()
        assert demo.members() == ["a", "b", "d"]

        # again: the recorded quorum, data intact
        text = demo.start()
        assert "recorded" in text and "d=" in text, text
        qemu_io(demo.uri(), "read -P 0x44 0 1M")
        proc = demo.ctl("status")
        assert proc.returncode == 0, output(proc)
        demo.stop()
        assert demo.members() == ["a", "b", "d"]

        # --reset: says what it discards, then a fresh quorum of blank a, b, c
        text = demo.start("--reset")
        assert "discarding" in text and str(demo.dir / "state") in text, text
        assert str(demo.dir / "a.raw") in text, text
        qemu_io(demo.uri(), "read -P 0 0 1M")
        demo.stop()
        assert demo.members() == ["a", "b", "c"]
        assert (demo.dir / "d.raw").exists()  # not the demo's: kept
    finally:
        demo.kill()
