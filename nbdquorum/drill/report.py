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
    # the remote scenarios (host-loss, rolling)
    kind: str = "replace"  # which table the scenario goes in: replace, host-loss, rolling
    how: str | None = None  # where the remote child ran and how it was lost
    #: the client's MiB/s: before the fault, while away, from the return to active
    throughput: dict[str, float | None] = field(default_factory=dict)
    longest_pass_s: float | None = None  # the client's slowest write pass
    missed_bytes: int | None = None  # what the child lacked when it came back
    reconnect_s: float | None = None  # back -> resyncing
    catch_up_s: float | None = None  # back -> active
    catch_up_job_s: float | None = None  # the catch-up job's run time
    catch_up_bytes: int | None = None  # BLOCK_JOB_COMPLETED len of the catch-up
    steps: list[dict[str, Any]] = field(default_factory=list)  # rolling: what each step saw

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
            "kind": self.kind, "how": self.how,
            "throughput_mib_per_second": self.throughput,
            "longest_pass_seconds": self.longest_pass_s, "missed_bytes": self.missed_bytes,
            "reconnect_seconds": self.reconnect_s, "catch_up_seconds": self.catch_up_s,
            "catch_up_job_seconds": self.catch_up_job_s, "catch_up_bytes": self.catch_up_bytes,
            "steps": self.steps,
        }


class Progress:
    """Progress lines on stderr, stamped with the time since the drill started."""

    def __init__(self, stream: Any = None) -> None:
        self.start = time.monotonic()
        self.stream = stream if stream is not None else sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.start:7.2f}s] {msg}", file=self.stream, flush=True)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}s"


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _table(rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to their widths; the first ``left`` ones flush left, the rest right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(widths[i]) if i < left else c.rjust(widths[i])
                      for i, c in enumerate(row)).rstrip() for row in rows]


def _replace_table(results: Sequence[Result]) -> list[str]:
    head = ["SCENARIO", "DETECT", "READ-BACK", "REPAIR", "RESYNC MiB/s", "CLIENT ERRORS",
            "VERIFIED"]
    return _table([head] + [[r.name, _secs(r.detect_s), _secs(r.op_seconds(READ_BACK)),
                             _secs(r.repair_s), _rate(r.resync_mib_s), str(r.client_errors),
                             "yes" if r.verified else "NO"] for r in results])


def _host_loss_table(results: Sequence[Result]) -> list[str]:
    head = ["SCENARIO", "DETECT", "MiB/s BEFORE", "MiB/s AWAY", "CATCH-UP", "COPIED",
            "CLIENT ERRORS", "VERIFIED"]
    lines = _table([head] + [[
        r.name, _secs(r.detect_s), _rate(r.throughput.get("before")),
        _rate(r.throughput.get("away")), _secs(r.catch_up_s),
        "-" if r.catch_up_bytes is None else human(r.catch_up_bytes),
        str(r.client_errors), "yes" if r.verified else "NO"] for r in results])
    for r in results:
        lines.append(f"  {r.name}: {r.how}")
        details = []
        if r.longest_pass_s is not None:
            details.append(f"slowest write pass {r.longest_pass_s:.2f}s")
        if r.throughput.get("catch-up") is not None:
            details.append(f"{_rate(r.throughput.get('catch-up'))} MiB/s from its return "
                           "to active")
        if r.missed_bytes is not None:
            details.append(f"missed {human(r.missed_bytes)} while away")
        if r.reconnect_s is not None:
            details.append(f"reconnected {r.reconnect_s:.2f}s after its return")
        if r.catch_up_job_s is not None:
            details.append(f"catch-up job {r.catch_up_job_s:.2f}s")
        if details:
            lines.append(f"  {r.name}: " + ", ".join(details))
    return lines


def _rolling_table(r: Result) -> list[str]:
    names = sorted({n for st in r.steps for n in st.get("states", {})})
    rows = [["STEP", *names, "WHAT", "CLIENT"]]
    for st in r.steps:
        states = st.get("states", {})
        rows.append([str(st["step"]), *(str(states.get(n, "-")) for n in names),
                     str(st["what"]), str(st.get("client", "-"))])
    return [f"{r.name}: {r.how}", *_table(rows, left=len(rows[0])),
            f"{r.name}: client errors {r.client_errors}, verified "
            f"{'yes' if r.verified else 'NO'}"]


def format_report(results: Sequence[Result], cfg: Config) -> str:
    lines = []
    lay = cfg.layout
    where = (f"ext4 in the first {human(lay.fs_size)}, random data in the rest"
             if lay.fs_size else f"random data only (no filesystem: {cfg.fs_reason})")
    if all(r.kind != "replace" for r in results):  # the remote ones make no filesystem
        where = (f"random data at {human(lay.data_offset)}+{human(lay.data_size)} "
                 "(the remote scenarios have no filesystem part)")
    lines.append(f"nbdquorum drill: 3 children of {human(lay.size)}; {where}")
    replace = [r for r in results if r.kind == "replace"]
    if replace:
        lines += _replace_table(replace)
    host_loss = [r for r in results if r.kind == "host-loss"]
    if host_loss:
        if len(lines) > 1:
            lines.append("")
        lines += _host_loss_table(host_loss)
    for r in results:
        if r.kind == "rolling":
            if len(lines) > 1:
                lines.append("")
            lines += _rolling_table(r)
    for r in results:
        for p in r.problems:
            lines.append(f"{r.name}: {p}")
    ok = all(r.verified for r in results)
    lines.append("PASS: every scenario verified, no client errors" if ok
                 else "FAIL: " + ", ".join(r.name for r in results if not r.verified))
    return "\n".join(lines) + "\n"
