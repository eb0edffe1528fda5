"""nbdquorum: an NBD server exporting a voted quorum of raw disk images."""

from __future__ import annotations

__version__ = "0.1.0"
