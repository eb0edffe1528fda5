"""The block graph: nodes with one small interface (node.py), files, raw, quorum."""

from __future__ import annotations
