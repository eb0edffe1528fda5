"""Shared asyncio helper for the unit tests."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run *coro* on a fresh event loop in debug mode (slow callbacks, unawaited
    coroutines and cross-thread misuse are reported), then close the loop."""
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
