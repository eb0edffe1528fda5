"""The QMP control socket: QEMU's monitor protocol for live changes to the quorum.

protocol.py (sans-I/O framing and checks), schema.py (the one command and event
table, declarations only), check.py (argument checking against it), docgen.py
(docs/qmp.md from it), commands.py (handlers), throttle.py (QEMU's event rate
limit), server.py (asyncio glue), errors.py.
"""

from __future__ import annotations

from nbdquorum.qmp.errors import ErrorClass, QMPError

# docgen.py is not imported here: ``python -m nbdquorum.qmp.docgen`` must be
# its first import (runpy warns otherwise).
__all__ = ["ErrorClass", "QMPError"]
