"""Background jobs: resync of a new child, scrub (QEMU's job vocabulary)."""

from __future__ import annotations
