"""Shared asyncio helper for the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from tests.ci import unavailable


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run *coro* on a fresh event loop in debug mode (slow callbacks, unawaited
    coroutines and cross-thread misuse are reported), then close the loop."""
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, Any]], timeout: float = 60) -> Any:
    """Run ``main()`` on ``loop``: "asyncio", or "uvloop" (the `fast` extra, installed
    with the tests; missing, it fails under CI=true and skips elsewhere)."""
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            unavailable("uvloop is not installed (the fast extra)")
        return uvloop.run(asyncio.wait_for(main(), timeout))
    return asyncio.run(asyncio.wait_for(main(), timeout))
