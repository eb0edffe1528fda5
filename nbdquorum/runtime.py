"""What every nbdquorum process shares at run time: the event loop, logging, size options.

The serve command, the worker processes and the drill import this module, never
each other and never the command-line entry (cli.py).  It imports nothing of
nbdquorum.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import gc
import logging
import os
import re
import signal
import sys
from collections.abc import Coroutine
from typing import Any

#: buffers up to this size stay on the heap (reused, not mmap'ed per request);
#: bigger ones are mmap'ed and unmapped when freed.  glibc then gives freed heap
#: back by itself beyond 4 x this, and the budget trims when idle (nbd/server.py).
MALLOC_HEAP_MAX = 1 << 20

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtTpP]?)(i?[bB])?\s*$")
_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 1048576, 512M, 4G)")
    n = int(m.group(1)) * _SCALE[m.group(2).lower()]
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return n


def setup_logging(verbose: int, tag: str = "") -> None:
    """Log lines on stderr; ``-vv`` (verbose > 1) is debug.  ``tag`` marks a
    process's lines (``[w1]`` for worker 1) after the logger's name."""
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO,
        format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s",
        stream=sys.stderr,
    )


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the server's loop: uvloop when installed (the `fast` extra), else asyncio.

    NBDQUORUM_LOOP=asyncio forces the standard loop.  The request path makes
    many short-lived objects and no cycles worth collecting often, so the
    collector runs rarely and start-up objects are frozen out of it.
    """
    gc.set_threshold(50_000, 20, 20)
    rc = _run(main)
    # Stopped: what is left is the interpreter's teardown (joining the I/O threads,
    # then finalizing).  A second SIGTERM then (a supervisor or a test repeating
    # itself) ends the process at once with the status the stop already decided,
    # not "killed".  Python handlers stop running once finalizing begins, and the
    # interpreter puts SIGTERM back to its default (death by signal) then, unless
    # it is ignored: so from the exit handlers on it is ignored; what is left to
    # do then is freeing memory.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: os._exit(rc))
    atexit.register(signal.signal, signal.SIGTERM, signal.SIG_IGN)
    return rc


def _run(main: Coroutine[Any, Any, int]) -> int:
    if os.environ.get("NBDQUORUM_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)
