"""The one rule for something a test needs but this machine lacks.

On a laptop the test is skipped with the reason; under ``CI=true`` it fails, because a
green run that skipped its real-client tests proves nothing (scripts/install-deps installs
everything, so in CI a missing piece is a broken install).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(what: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: a missing tool is a failure, not a skip)", pytrace=False)
    pytest.skip(what)
