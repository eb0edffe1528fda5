"""Errors of the block graph (not of the data path, which raises OSError).

Exception tree:
    GraphError            a graph change or lookup was refused; ``desc`` is
     |                    the client-facing text, in QEMU's wording where QEMU
     |                    has one (observed on QEMU 7.2)
     +-- NodeNotFound     a node-name or device that does not exist
"""

from __future__ import annotations


class GraphError(Exception):
    #: the QMP error class this maps to (qapi/error.json)
    error_class = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class NodeNotFound(GraphError):
    error_class = "GenericError"
