"""The worker pool for blocking child I/O and C voting.

pread/pwrite and the cffi calls release the GIL, so several requests' I/O and
votes run in parallel on the pool while the event loop keeps serving sockets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None


def pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        workers = int(os.environ.get("NBDQUORUM_IO_THREADS", "0")) or max(4, 2 * (os.cpu_count() or 2))
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nbdq-io")
    return _pool


async def run(fn: Callable[..., T], *args: object) -> T:
    """Run a blocking call on the I/O pool and await its result."""
    return await asyncio.get_running_loop().run_in_executor(pool(), fn, *args)


def shutdown() -> None:
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=True)
        _pool = None
