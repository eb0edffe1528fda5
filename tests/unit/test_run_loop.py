"""run_loop: a SIGTERM that comes after the server stopped, while the interpreter is
still tearing down, keeps the exit status the stop decided."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from nbdquorum.runtime import run_loop

    async def main():
        # a thread the interpreter joins at exit: the teardown takes a while
        threading.Thread(target=time.sleep, args=(3,)).start()
        return 0

    rc = run_loop(main())
    print("stopped", flush=True)
    sys.exit(rc)
""")


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_a_sigterm_during_the_teardown_keeps_the_exit_status(loop: str) -> None:
    import os
    env = dict(os.environ, NBDQUORUM_LOOP=loop)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "stopped"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


FINALIZING = textwrap.dedent("""
    import sys, time
    from nbdquorum.runtime import run_loop

    class Slow:  # freed with the module's globals, once the interpreter is finalizing
        def __del__(self):
            print("finalizing", flush=True)
            time.sleep(3)

    keep = Slow()

    async def main():
        return 0

    sys.exit(run_loop(main()))
""")


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_a_sigterm_while_the_interpreter_finalizes_keeps_the_exit_status(loop: str) -> None:
    """Past the exit handlers Python runs no signal handler and puts SIGTERM back to
    its default: a SIGTERM then must not turn a clean stop into "killed"."""
    import os
    env = dict(os.environ, NBDQUORUM_LOOP=loop)
    proc = subprocess.Popen([sys.executable, "-c", FINALIZING], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "finalizing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
