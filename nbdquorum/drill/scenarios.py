"""The failure scenarios, and one scenario's run: start, write, break, use, repair, verify."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nbdquorum import ctl
from nbdquorum.ctl import CtlError, QMPClient, QMPReplyError
from nbdquorum.drill.common import (
    CHILDREN,
    DETECT_EVENTS,
    NEW_CHILD,
    READ_BACK,
    STATE_SETTLE,
    ClientHung,
    Config,
    DrillError,
    KiB,
    MiB,
    event_time,
    host_file,
    human,
    image_json,
    last_line,
    nbd_file,
    sh,
)
from nbdquorum.drill.harness import (
    EventWatch,
    Reader,
    Server,
    check_fs,
    make_fs,
)
from nbdquorum.drill.report import (
    Progress,
    Result,
)


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # what it simulates, for --help, the report and docs/drills.md
    failed: tuple[str, ...] = ("b",)  # the children it breaks
    qmp_rules: tuple[dict[str, Any], ...] = ()  # x-faulty-set rules, if any
    default: bool = True  # part of the default run
    kind: str = "replace"  # which run does it (and which report table shows it)


SCENARIOS: Final = {
    s.name: s
    for s in (
        Scenario("flip", "bytes flipped in b's image file: silent corruption, bit rot"),
        Scenario("zero", "a range of b's image file zeroed: a lost write, a bad firmware"),
        Scenario("truncate", "b's image file truncated to a quarter: an operator's mistake"),
        Scenario("delete", "b's image file unlinked: the disk is pulled, the LUN vanishes"),
        Scenario("eio", "every read and write of b fails with EIO: a dead disk",
                 qmp_rules=({"op": "any", "action": "error", "errno": 5},)),
        Scenario("hang", "b stops answering (requests hang): a stuck controller, a lost path",
                 qmp_rules=({"op": "any", "action": "hang"},)),
        Scenario("quorum-loss", "b and c both fail with EIO: the quorum is lost; this drill "
                 "must fail (client errors, no repair)", failed=("b", "c"),
                 qmp_rules=({"op": "any", "action": "error", "errno": 5},), default=False),
        Scenario("host-loss", "b is an NBD export on another host (qemu-nbd in a network "
                 "namespace; a killed server without one) that vanishes mid-write and comes "
                 "back: it must catch up by itself", default=False, kind="host-loss"),
        Scenario("rolling", "children on other hosts fail one after another and come back "
                 "in another order, the server restarting in between: a stale member must "
                 "never become a source", failed=("b", "c"), default=False, kind="rolling"),
    )
}


# --------------------------------------------------------------------------- a scenario


class Run:
    """One scenario, start to finish."""

    def __init__(self, sc: Scenario, base: Path, cfg: Config, srcs: dict[str, Path],
                 progress: Progress) -> None:
        self.sc = sc
        self.cfg = cfg
        self.srcs = srcs
        self.res = Result(sc.name, sc.what, kind=sc.kind)
        self.work = base / sc.name
        self.work.mkdir()
        self.progress = progress
        sock_dir = self.work
        if len(str(sock_dir / "nbd.sock")) > 100:  # sun_path is 108 bytes
            sock_dir = Path(tempfile.mkdtemp(prefix="nbdq-drill-"))
        self.sock_dir = sock_dir
        self.images = {n: self.work / f"{n}.img" for n in CHILDREN}
        self.new_image = self.work / f"{NEW_CHILD}.img"
        self.server = Server(self.work, sock_dir, self.images)
        self.fs_sums: dict[str, str] = {}
        self.watch: EventWatch | None = None
        self.t_fault: float | None = None
        self.detect_tried = False
        self._stopped: subprocess.Popen[bytes] | None = None

    def say(self, msg: str) -> None:
        self.progress(f"{self.sc.name}: {msg}")

    # -- client operations: every one that fails is a client error ------------------
    def client_op(self, op: str, fn: Callable[[], subprocess.CompletedProcess[str] | None],
                  ) -> bool:
        t = time.monotonic()
        detail = ""
        hung = False
        try:
            proc = fn()
            ok = proc is None or proc.returncode == 0
            if proc is not None and not ok:
                detail = last_line(proc)
                hung = proc.returncode == -9
        except DrillError as err:
            ok, detail = False, str(err)
            hung = "timed out after" in detail
        errors = [] if ok else [detail]
        self.record(op, time.monotonic() - t, errors, hung)
        return ok

    def record(self, op: str, seconds: float, errors: list[str], hung: bool,
               **extra: Any) -> None:
        """Count a client operation; every error it saw is a client error."""
        entry: dict[str, Any] = {"op": op, "ok": not errors, "seconds": round(seconds, 3),
                                 **extra}
        if errors:
            entry["error"] = errors[0]
            self.res.client_errors += len(errors)
            self.say(f"CLIENT ERROR in {op}: {errors[0]}")
        self.res.client_ops.append(entry)
        if hung:  # the server is stuck: every later step would wait as long
            raise ClientHung(f"client I/O hung: {op} did not finish within "
                             f"{self.cfg.timeout:g}s")

    def qemu_img(self, *args: str) -> subprocess.CompletedProcess[str]:
        return sh([self.cfg.qemu_img, *args], timeout=self.cfg.timeout)

    def write_data(self, src: Path, offset: int, size: int) -> subprocess.CompletedProcess[str]:
        target = image_json(nbd_file(self.server.sock), offset, size)
        return self.qemu_img("convert", "-n", "-f", "raw", "-O", "raw", str(src), target)

    def compare_export_argv(self, expect: Path) -> list[str]:
        lay = self.cfg.layout
        return [self.cfg.qemu_img, "compare", "-f", "raw", str(expect),
                image_json(nbd_file(self.server.sock), lay.data_offset, lay.data_size)]

    def compare_export(self, expect: Path) -> subprocess.CompletedProcess[str]:
        return sh(self.compare_export_argv(expect), timeout=self.cfg.timeout)

    # -- the scenario -------------------------------------------------------------
    def run(self) -> Result:
        t0 = time.monotonic()
        try:
            with ExitStack() as stack:
                stack.callback(self._stop_server)
                self._run(stack)
        except (DrillError, CtlError, OSError) as err:
            self.res.problems.append(f"{type(err).__name__}: {err}"
                                     if not isinstance(err, DrillError) else str(err))
            self.say(f"FAILED: {err}")
            if self.watch is not None:  # what the events showed before the failure
                if self.t_fault is not None and not self.detect_tried:
                    self.detect(self.watch, self.t_fault, wait=0.0)
                self.res.events = self._event_summary(self.watch)
        finally:
            if self.sock_dir != self.work:
                shutil.rmtree(self.sock_dir, ignore_errors=True)
        self.res.seconds = time.monotonic() - t0
        self.say(("verified" if self.res.verified else "NOT verified")
                 + f" in {self.res.seconds:.1f}s")
        return self.res

    def _stop_server(self) -> None:
        if self.server.proc is None or self.server.proc is self._stopped:
            return  # not started, or this very process was stopped (and judged) already
        self._stopped = self.server.proc
        rc = self.server.stop()
        self.res.server_exit = rc
        if rc is not None and rc != 0:
            self.res.problems.append(f"the server exited with {rc}: {self.server.log_tail(3)}")

    def _run(self, stack: ExitStack) -> None:
        lay, cfg = self.cfg.layout, self.cfg
        for path in [*self.images.values(), self.new_image]:
            with open(path, "wb") as f:
                f.truncate(lay.size)
        self.say(f"starting the server ({', '.join(CHILDREN)}; {human(lay.size)} each)")
        self.server.start(cfg.timeout)
        watch = self.watch = EventWatch(self.server.control, self.show_event)
        stack.callback(self._close_watch, watch)
        client = QMPClient(str(self.server.control))
        stack.callback(client.close)
        parent = ctl.pick_parent(client, None)

        # 1. known data
        if lay.fs_size:
            self.say(f"ext4 in the first {human(lay.fs_size)} via nbdfuse + loop")
            self.client_op("mkfs+copy (before the fault)", self._make_fs)
        self.say(f"random data at {human(lay.data_offset)}+{human(lay.data_size)} "
                 "(qemu-img convert)")
        self.client_op("write (before the fault)",
                       lambda: self.write_data(self.srcs["before"], lay.data_offset,
                                               lay.data_size))

        # 2. the fault
        self.say(f"failing {' and '.join(self.sc.failed)}: {self.sc.what}")
        t_fault = self.t_fault = self.inject(client)

        # 3. keep using the disk: the fault must cost the client nothing
        self.say("reading everything back (qemu-img compare through the export)")
        self.client_op(READ_BACK, lambda: self.compare_export(self.srcs["before"]))
        self.say(f"writing {human(lay.degraded_size)} while degraded")
        self.client_op("write (degraded)",
                       lambda: self.write_data(self.srcs["degraded"], lay.degraded_offset,
                                               lay.degraded_size))
        self.client_op("read (degraded, after the write)",
                       lambda: self.compare_export(self.srcs["expect"]))
        self.detect(watch, t_fault)
        # A child that failed I/O may be faulted by the next health check (or
        # the next error): give it a moment, then record where it stands.
        watch.wait_for(lambda ev: ev.get("event") == "QUORUM_CHILD_STATE_CHANGE"
                       and ev.get("data", {}).get("node-name") in self.sc.failed
                       and ev["data"].get("state") == "faulted", STATE_SETTLE)
        (status,) = ctl.quorum_status(client, parent)
        for name in self.sc.failed:
            child = ctl.child_of(status, name)
            self.res.failed_state[name] = str(child.get("state")) if child else "gone"
        self.say("state of the broken child: "
                 + ", ".join(f"{n} {s}" for n, s in self.res.failed_state.items()))

        # 4. the repair, while a client reads
        repaired = self.repair(client, watch, parent)

        # 5. verify every byte
        self.verify(client, parent, repaired)
        self.res.events = self._event_summary(watch)

    def show_event(self, ev: dict[str, Any]) -> None:
        """A progress line for each quorum event and each job's end."""
        name, data = str(ev.get("event")), ev.get("data") or {}
        if name == "QUORUM_REPORT_BAD":
            sect = f"sector {data.get('sector-num')}+{data.get('sectors-count')}"
            why = data.get("error") or "contents differ"
            self.say(f"event {name} {data.get('node-name')} {data.get('type')} {sect}: {why}")
        elif name == "QUORUM_CHILD_STATE_CHANGE":
            self.say(f"event {name} {data.get('node-name')} {data.get('previous')} -> "
                     f"{data.get('state')}")
        elif name == "QUORUM_FAILURE":
            self.say(f"event {name} sector {data.get('sector-num')}+{data.get('sectors-count')}")
        elif name in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
            err = data.get("error")
            self.say(f"event {name} {data.get('device')} {data.get('offset')}/{data.get('len')} "
                     f"bytes" + (f": {err}" if err else ""))

    def _close_watch(self, watch: EventWatch) -> None:
        watch.close()

    def _make_fs(self) -> None:
        self.fs_sums = make_fs(self.work, self.server.uri(), self.cfg)

    def inject(self, client: QMPClient) -> float:
        """Break the children; returns the wall-clock time the fault was in place."""
        lay = self.cfg.layout
        if self.sc.qmp_rules:
            for name in self.sc.failed:
                client.execute("x-faulty-set", {"node-name": name,
                                                "rules": list(self.sc.qmp_rules)})
            return time.time()
        path = self.images["b"]
        if self.sc.name == "delete":
            path.unlink()
        elif self.sc.name == "truncate":
            os.truncate(path, lay.size // 4)
        else:
            spans = self.damage_spans()
            fd = os.open(path, os.O_RDWR)
            try:
                for off, n in spans:
                    if self.sc.name == "flip":
                        data = bytes(x ^ 0xFF for x in os.pread(fd, n, off))
                    else:
                        data = bytes(n)
                    os.pwrite(fd, data, off)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.say("damaged " + ", ".join(f"{human(n)} at {off}" for off, n in spans))
        return time.time()

    def damage_spans(self) -> list[tuple[int, int]]:
        lay = self.cfg.layout
        align = 4 * KiB
        spans: list[tuple[int, int]] = []
        if self.sc.name == "flip":
            n = min(64 * KiB, lay.data_size // 16)
            spans = [(lay.data_offset + (lay.data_size * k // 8) // align * align, n)
                     for k in (1, 4, 7)]
            if lay.fs_size:
                spans = [(0, 64 * KiB), (lay.fs_size // 2, 64 * KiB), *spans]
        else:  # zero
            n = min(MiB, lay.data_size // 4)
            spans = [(lay.data_offset + (lay.data_size // 3) // align * align, n)]
            if lay.fs_size:
                spans = [(0, min(MiB, lay.fs_size // 4)), *spans]
        return spans

    def detect(self, watch: EventWatch, t_fault: float, wait: float = 10.0) -> None:
        self.detect_tried = True
        failed = set(self.sc.failed)

        def pred(ev: dict[str, Any]) -> bool:
            return (ev.get("event") in DETECT_EVENTS
                    and ev.get("data", {}).get("node-name") in failed
                    and event_time(ev) >= t_fault - 0.01)

        ev = watch.wait_for(pred, wait)
        if ev is None:
            self.res.problems.append("the fault was not detected (no QUORUM_REPORT_BAD or "
                                     f"QUORUM_CHILD_STATE_CHANGE within {wait:g}s of the I/O)")
            self.say("NOT detected")
            return
        self.res.detect_s = max(0.0, event_time(ev) - t_fault)
        data = ev.get("data", {})
        what = data.get("error") or data.get("state") or "contents differ"
        self.res.detected_by = f"{ev['event']} {data.get('node-name')} ({what})"
        self.say(f"detected after {self.res.detect_s:.3f}s: {self.res.detected_by}")

    def repair(self, client: QMPClient, watch: EventWatch, parent: str) -> bool:
        """ctl replace b b2=PATH: add, wait for the resync, remove b; with a reader running."""
        cfg = self.cfg
        self.say(f"replacing b with {NEW_CHILD}={self.new_image} "
                 "(blockdev-add, x-blockdev-child-add) while a client reads")
        reader = Reader(self.compare_export_argv(self.srcs["expect"]), cfg.timeout)
        reader.start()
        t = time.monotonic()
        ok = False
        try:
            ctl.add_child(client, parent, NEW_CHILD, str(self.new_image))
            self.wait_resync(client, watch, parent, t + cfg.timeout)
            client.execute("x-blockdev-child-del", {"parent": parent, "child": "b"})
            client.execute("blockdev-del", {"node-name": "b"})
            self.res.repair_s = time.monotonic() - t
            ok = True
            self.say(f"repaired in {self.res.repair_s:.2f}s: b removed, {NEW_CHILD} active")
        except (DrillError, QMPReplyError) as err:
            self.res.problems.append(f"repair failed: {err}")
            self.say(f"REPAIR FAILED: {err}")
        except BaseException:
            reader.kill()
            raise
        reader.finish()
        self.say(f"the client read everything {reader.passes} time(s) during the repair")
        self.record("read (during the resync)", reader.seconds, reader.errors, reader.hung,
                    passes=reader.passes)
        if ok:
            self.resync_rate(watch)
        return ok

    def wait_resync(self, client: QMPClient, watch: EventWatch, parent: str,
                    deadline: float) -> None:
        def ended(ev: dict[str, Any]) -> bool:
            return (ev.get("event") in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED")
                    and str(ev.get("data", {}).get("device", "")).startswith(f"resync-{NEW_CHILD}")
                    and ("error" in ev["data"] or ev["event"] == "BLOCK_JOB_CANCELLED"))

        shown = -1.0
        while True:
            (status,) = ctl.quorum_status(client, parent)
            child = ctl.child_of(status, NEW_CHILD)
            if child is None:
                raise DrillError(f"{NEW_CHILD} left the quorum during its resync")
            state = child.get("state")
            if state == "active":
                return
            if state == "faulted":
                raise DrillError(f"{NEW_CHILD} faulted during its resync")
            bad = watch.find(ended)
            if bad is not None:
                raise DrillError(f"{bad['data'].get('device')} "
                                 + (f"failed: {bad['data']['error']}" if "error" in bad["data"]
                                    else "was cancelled"))
            jobs = client.execute("query-jobs") or []
            for job in jobs:
                if str(job.get("id", "")).startswith(f"resync-{NEW_CHILD}"):
                    total = int(job.get("total-progress") or 0)
                    done = int(job.get("current-progress") or 0)
                    pct = 100.0 * done / total if total else 0.0
                    if pct - shown >= 25 or (shown < 0 and total):
                        self.say(f"resync {pct:3.0f}% ({human(done)} of {human(total)})")
                        shown = pct
            if time.monotonic() > deadline:
                raise DrillError(f"{NEW_CHILD} still {state} after {self.cfg.timeout:g}s")
            time.sleep(0.05)

    def resync_rate(self, watch: EventWatch) -> None:
        job_prefix = f"resync-{NEW_CHILD}"
        done = watch.wait_for(
            lambda ev: (ev.get("event") == "BLOCK_JOB_COMPLETED"
                        and str(ev.get("data", {}).get("device", "")).startswith(job_prefix)
                        and "error" not in ev["data"]), 2.0)
        if done is None:
            return
        job_id = done["data"]["device"]
        start = watch.find(lambda ev: ev.get("event") == "JOB_STATUS_CHANGE"
                           and ev.get("data", {}).get("id") == job_id
                           and ev["data"].get("status") == "running")
        n = int(done["data"].get("len") or 0)
        self.res.resync_bytes = n
        if start is not None and n:
            dt = max(event_time(done) - event_time(start), 1e-3)
            self.res.resync_mib_s = round(n / MiB / dt, 1)
            self.say(f"resync: {human(n)} in {dt:.2f}s = {self.res.resync_mib_s} MiB/s")

    def verify(self, client: QMPClient, parent: str, repaired: bool) -> None:
        lay = self.cfg.layout
        expect = self.srcs["expect"]
        self.say("verifying: the export, every child, the filesystem")
        self.client_op("read (after the repair)", lambda: self.compare_export(expect))
        survivors = {n: p for n, p in self.images.items() if n not in self.sc.failed}
        survivors[NEW_CHILD] = self.new_image
        for name, path in survivors.items():
            proc = self.qemu_img("compare", "-f", "raw", str(expect),
                                 image_json(host_file(path), lay.data_offset, lay.data_size))
            self.res.check(f"data on {name}", proc.returncode == 0,
                           f"child {name}: random data differs from the source: "
                           f"{last_line(proc)}")
        names = list(survivors)
        for name in names[1:]:
            proc = self.qemu_img("compare", "-f", "raw", "-F", "raw",
                                 str(survivors[names[0]]), str(survivors[name]))
            self.res.check(f"{name} == {names[0]}", proc.returncode == 0,
                           f"children {names[0]} and {name} differ: {last_line(proc)}")
        if lay.fs_size:
            fs_problems: list[str] = []

            def fs_check() -> None:
                fs_problems.extend(check_fs(self.work, self.server.uri(), self.cfg,
                                            self.fs_sums))
                if fs_problems:
                    raise DrillError("; ".join(fs_problems))

            self.client_op("fs check (e2fsck -fn, sha256 of every file)", fs_check)
            self.res.check("filesystem", not fs_problems and bool(self.fs_sums),
                           "the filesystem did not verify" if not self.fs_sums
                           else "; ".join(fs_problems))
            for name, path in survivors.items():
                fsck = sh(["e2fsck", "-fn", path], timeout=self.cfg.timeout)
                self.res.check(f"e2fsck {name}", fsck.returncode == 0,
                               f"e2fsck -fn on child {name}: exit {fsck.returncode}: "
                               f"{last_line(fsck)}")
        (status,) = ctl.quorum_status(client, parent)
        states = {c["node-name"]: c.get("state") for c in status["children"]}
        want = {n: "active" for n in survivors}
        self.res.check("membership", repaired and states == want,
                       f"children after the repair: {states} (want {want})")

    @staticmethod
    def _event_summary(watch: EventWatch) -> list[dict[str, Any]]:
        with watch.cond:
            return [{"t": round(event_time(ev), 6), "event": ev.get("event"),
                     "data": ev.get("data")} for ev in watch.events]
