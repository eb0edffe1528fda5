"""The drill's report: each scenario's result, the progress lines, the table."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nbdquorum.drill.common import (
    READ_BACK,
    Config,
    human,
)


@dataclass
class Result:
    name: str
    what: str
    detect_s: float | None = None
    detected_by: str | None = None
    repair_s: float | None = None
    resync_bytes: int | None = None
    resync_mib_s: float | None = None
    client_errors: int = 0
    client_ops: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed_state: dict[str, str] = field(default_factory=dict)  # broken child -> its state
    events: list[dict[str, Any]] = field(default_factory=list)
    server_exit: int | None = None
    seconds: float = 0.0

    @property
    def verified(self) -> bool:
        return (not self.problems and self.client_errors == 0
                and bool(self.checks) and all(self.checks.values()))

    def op_seconds(self, op: str) -> float | None:
        return next((float(o["seconds"]) for o in self.client_ops if o["op"] == op), None)

    def check(self, name: str, ok: bool, problem: str) -> None:
        self.checks[name] = ok
        if not ok:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "what": self.what, "verified": self.verified,
            "detect_seconds": self.detect_s, "detected_by": self.detected_by,
            "repair_seconds": self.repair_s, "resync_bytes": self.resync_bytes,
            "resync_mib_per_second": self.resync_mib_s, "client_errors": self.client_errors,
            "client_ops": self.client_ops, "checks": self.checks, "problems": self.problems,
            "failed_child_state": self.failed_state, "events": self.events,
            "server_exit": self.server_exit, "seconds": round(self.seconds, 3),
        }


class Progress:
    """Progress lines on stderr, stamped with the time since the drill started."""

    def __init__(self, stream: Any = None) -> None:
        self.start = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:7.2f}s] {msg}", file=self.stream, flush=True)


def format_report(results: Sequence[Result], cfg: Config) -> str:
    head = ["SCENARIO", "DETECT", "READ-BACK", "REPAIR", "RESYNC MiB/s", "CLIENT ERRORS",
            "VERIFIED"]

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}s"

    rows = [head] + [[r.name, secs(r.detect_s), secs(r.op_seconds(READ_BACK)), secs(r.repair_s),
                      "-" if r.resync_mib_s is None else f"{r.resync_mib_s:.1f}",
                      str(r.client_errors), "yes" if r.verified else "NO"] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = []
    lay = cfg.layout
    where = (f"ext4 in the first {human(lay.fs_size)}, random data in the rest"
             if lay.fs_size else f"random data only (no filesystem: {cfg.fs_reason})")
    lines.append(f"nbdquorum drill: 3 children of {human(lay.size)}; {where}")
    for row in rows:
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(row)).rstrip())
    for r in results:
        for p in r.problems:
            lines.append(f"{r.name}: {p}")
    ok = all(r.verified for r in results)
    lines.append("PASS: every scenario verified, no client errors" if ok
                 else "FAIL: " + ", ".join(r.name for r in results if not r.verified))
    return "\n".join(lines) + "\n"
