"""The remote scenarios: children that are NBD exports on other hosts.

``host-loss``: child ``b`` is served by qemu-nbd "on another host" (in a network namespace
behind a veth pair when the drill runs as root and ``ip netns`` works; otherwise on
127.0.0.1).  A client writes all the time; mid-write the host vanishes (the link goes
silent, or the server is killed), the client keeps writing and reading, the host comes
back and ``b`` catches up by itself.  Reported: time to detect, the client's throughput
before and while ``b`` is away, the catch-up's time and bytes.

``rolling``: ``b`` and ``c`` are qemu-nbd exports on 127.0.0.1; they fail one after
another and come back in the other order, with a server restart in between.  A child
that missed writes must never be a source: with too few children in sync reads fail
rather than return stale data, and the data afterwards is the last acknowledged write.

Both run the server without fault injection (the faults are real) and with a short child
timeout (``REMOTE_CHILD_TIMEOUT``), and have no filesystem part.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from nbdquorum import ctl
from nbdquorum.ctl import QMPClient
from nbdquorum.drill.common import (
    REMOTE_CHILD_TIMEOUT,
    REMOTE_SERVER_OPTIONS,
    Config,
    DrillError,
    KiB,
    event_time,
    host_file,
    human,
    image_json,
    last_line,
    nbd_file,
)
from nbdquorum.drill.harness import EventWatch, Reader, Server, Writer
from nbdquorum.drill.netns import Host, Namespace, NbdExport, netns_support, tools_missing
from nbdquorum.drill.report import Progress
from nbdquorum.drill.scenarios import Run, Scenario

#: write passes before the fault (the "before" throughput), and at least this long
PASSES_BEFORE = 3
SECONDS_BEFORE = 1.0
#: write passes, and seconds, while the remote child is away
PASSES_AWAY = 3
SECONDS_AWAY = 2.0


def state_change(name: str, state: str, after: float) -> Callable[[dict[str, Any]], bool]:
    """Matches ``name``'s QUORUM_CHILD_STATE_CHANGE to ``state`` stamped at or after ``after``."""
    def pred(ev: dict[str, Any]) -> bool:
        data = ev.get("data") or {}
        return (ev.get("event") == "QUORUM_CHILD_STATE_CHANGE"
                and data.get("node-name") == name and data.get("state") == state
                and event_time(ev) >= after - 0.01)
    return pred


class RemoteRun(Run):
    """What both remote scenarios share: exports, states, reads of a region, checks."""

    def __init__(self, sc: Scenario, base: Path, cfg: Config, srcs: dict[str, Path],
                 progress: Progress) -> None:
        super().__init__(sc, base, cfg, srcs, progress)
        self.detect_tried = True  # each remote run measures its own detection
        self.client: QMPClient | None = None
        self.parent = ""

    def need_tools(self) -> None:
        missing = tools_missing(["qemu-nbd"])
        if missing:
            raise DrillError(f"{missing} (the remote child's server)")

    def make_images(self) -> None:
        for path in self.images.values():
            with open(path, "wb") as f:
                f.truncate(self.cfg.layout.size)

    def export(self, stack: ExitStack, host: Host, name: str) -> NbdExport:
        exp = NbdExport(host, self.images[name], self.work / f"qemu-nbd-{name}.log")
        stack.callback(exp.stop)
        exp.start(self.cfg.timeout)
        return exp

    def start_server(self, stack: ExitStack, children: dict[str, Path | str]) -> None:
        """Start the server; it is stopped before the exports (the stack unwinds LIFO)."""
        self.server = Server(self.work, self.sock_dir, children,
                             options=REMOTE_SERVER_OPTIONS, fault_injection=False)
        stack.callback(self._stop_server)
        self.connect(stack)

    def connect(self, stack: ExitStack) -> None:
        """(Re)start the server process and open the event watch and the QMP client."""
        self.server.start(self.cfg.timeout)
        watch = EventWatch(self.server.control, self.show_event)
        if self.watch is not None:  # a restart: keep the events seen so far
            watch.events[:0] = self.watch.events
        self.watch = watch
        stack.callback(self._close_watch, watch)
        client = self.client = QMPClient(str(self.server.control))
        stack.callback(client.close)
        self.parent = ctl.pick_parent(client, None)

    def disconnect(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.watch is not None:
            self.watch.close()

    def qmp(self) -> QMPClient:
        assert self.client is not None
        return self.client

    def states(self) -> dict[str, str]:
        (status,) = ctl.quorum_status(self.qmp(), self.parent)
        return {str(c["node-name"]): str(c.get("state")) for c in status["children"]}

    def child(self, name: str) -> dict[str, Any]:
        (status,) = ctl.quorum_status(self.qmp(), self.parent)
        return ctl.child_of(status, name) or {}

    def wait_states(self, want: dict[str, str | tuple[str, ...]], what: str
                    ) -> dict[str, str]:
        """Poll (bounded by --timeout) until each named child is in the (one of the)
        wanted state(s)."""
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            states = self.states()
            if all(states.get(n) in ((s,) if isinstance(s, str) else s)
                   for n, s in want.items()):
                return states
            if time.monotonic() > deadline:
                raise DrillError(f"{what}: children still {states} after "
                                 f"{self.cfg.timeout:g}s (want {want})")
            time.sleep(0.05)

    def threshold(self, n: int) -> None:
        """What ``nbdquorum ctl threshold N`` does: blockdev-reopen with a new threshold."""
        self.qmp().execute("blockdev-reopen", {"options": [
            {"driver": "quorum", "node-name": self.parent, "vote-threshold": n}]})
        self.say(f"vote-threshold {n} (blockdev-reopen, as `nbdquorum ctl threshold {n}`)")

    def write_argv(self, src: Path, offset: int, size: int) -> list[str]:
        return [self.cfg.qemu_img, "convert", "-n", "-f", "raw", "-O", "raw", str(src),
                image_json(nbd_file(self.server.sock), offset, size)]

    def read_region(self, offset: int, size: int, out: Path) -> tuple[bytes | None, str]:
        """Read a region through the export into ``out``: (its bytes, "") or (None, why)."""
        out.unlink(missing_ok=True)
        proc = self.qemu_img("convert", "-f", "raw", "-O", "raw",
                             image_json(nbd_file(self.server.sock), offset, size), str(out))
        if proc.returncode != 0:
            return None, last_line(proc)
        return out.read_bytes(), ""

    def verify_children(self, expect: Path) -> None:
        """Each child's image file holds the expected data; all are identical."""
        lay = self.cfg.layout
        names = list(self.images)
        for name in names:
            proc = self.qemu_img("compare", "-f", "raw", str(expect),
                                 image_json(host_file(self.images[name]), lay.data_offset,
                                            lay.data_size))
            self.res.check(f"data on {name}", proc.returncode == 0,
                           f"child {name}: data differs from the last acknowledged write: "
                           f"{last_line(proc)}")
        for name in names[1:]:
            proc = self.qemu_img("compare", "-f", "raw", "-F", "raw",
                                 str(self.images[names[0]]), str(self.images[name]))
            self.res.check(f"{name} == {names[0]}", proc.returncode == 0,
                           f"children {names[0]} and {name} differ: {last_line(proc)}")

    def no_stale_source(self, names: tuple[str, ...]) -> None:
        """A child that was away became active only at the end of a catch-up."""
        assert self.watch is not None
        with self.watch.cond:
            bad = [ev for ev in self.watch.events
                   if ev.get("event") == "QUORUM_CHILD_STATE_CHANGE"
                   and (ev.get("data") or {}).get("node-name") in names
                   and ev["data"].get("state") == "active"
                   and ev["data"].get("previous") in ("unreachable", "faulted")]
        self.res.check("no stale source", not bad,
                       "a child that missed writes voted again without a catch-up: "
                       + ", ".join(f"{e['data']['node-name']} {e['data']['previous']} -> active"
                                   for e in bad))

    def catch_up_job(self, name: str, after: float) -> tuple[int | None, float | None]:
        """(len, run time) of ``name``'s last successful resync job that ended after ``after``."""
        assert self.watch is not None
        prefix = f"resync-{name}"
        done = self.watch.wait_for(
            lambda ev: (ev.get("event") == "BLOCK_JOB_COMPLETED"
                        and str((ev.get("data") or {}).get("device", "")).startswith(prefix)
                        and "error" not in ev["data"] and event_time(ev) >= after - 0.01),
            2.0)
        if done is None:
            return None, None
        job_id = done["data"]["device"]
        with self.watch.cond:
            starts = [ev for ev in self.watch.events
                      if ev.get("event") == "JOB_STATUS_CHANGE"
                      and (ev.get("data") or {}).get("id") == job_id
                      and ev["data"].get("status") == "running"
                      and event_time(ev) <= event_time(done)]
        n = int(done["data"].get("len") or 0)
        if not starts:
            return n, None
        return n, max(0.0, event_time(done) - event_time(starts[-1]))

    def finish_server(self) -> None:
        """Stop the server cleanly (its final flush reaches every child): exit 0 required."""
        self.disconnect()
        self._stop_server()
        self.res.check("clean stop", self.res.server_exit == 0,
                       f"the server exited with {self.res.server_exit}")


class HostLossRun(RemoteRun):
    """b's host vanishes mid-write and comes back; b catches up by itself."""

    def _run(self, stack: ExitStack) -> None:
        lay, cfg = self.cfg.layout, self.cfg
        self.need_tools()
        why_not = "--no-netns" if self.cfg.no_netns else netns_support()
        host: Host = Namespace() if why_not is None else Host()
        stack.callback(host.close)
        self.make_images()
        exp = self.export(stack, host, "b")
        if isinstance(host, Namespace):
            self.res.how = (f"b on qemu-nbd at {exp.addr}:{exp.port} in network namespace "
                            f"{host.name} (veth pair); lost: link cut (ip link set "
                            f"{host.ns_dev} down: packets vanish); child timeout "
                            f"{REMOTE_CHILD_TIMEOUT:g}s")
        else:
            self.res.how = (f"b on qemu-nbd at {exp.addr}:{exp.port} (no network namespace: "
                            f"{why_not}); lost: server killed (SIGKILL), then restarted; "
                            f"child timeout {REMOTE_CHILD_TIMEOUT:g}s")
        self.say(self.res.how)
        self.start_server(stack, {"a": self.images["a"], "b": exp.uri, "c": self.images["c"]})
        watch = self.watch
        assert watch is not None

        self.say(f"random data at {human(lay.data_offset)}+{human(lay.data_size)}")
        self.client_op("write (before the fault)",
                       lambda: self.write_data(self.srcs["before"], lay.data_offset,
                                               lay.data_size))
        split = lay.degraded_offset - lay.data_offset
        reader = Reader([cfg.qemu_img, "compare", "-f", "raw", str(self.srcs["static"]),
                         image_json(nbd_file(self.server.sock), lay.data_offset, split)],
                        cfg.timeout)
        sources = [self.srcs["degraded"], self.srcs["degraded2"]]
        writer = Writer([self.write_argv(src, lay.degraded_offset, lay.degraded_size)
                         for src in sources], lay.degraded_size, cfg.timeout)
        recorded = False

        def record_clients(*, hung_stops: bool) -> None:
            """Count the clients' passes and errors once (also when a step failed)."""
            nonlocal recorded
            if recorded:
                return
            recorded = True
            self.record("write (loop: before, during and after the host loss)",
                        sum(p.seconds for p in writer.passes), writer.errors(),
                        writer.hung and hung_stops, passes=len(writer.passes))
            self.record("read (loop, meanwhile)", reader.seconds, reader.errors,
                        reader.hung and hung_stops, passes=reader.passes)

        stack.callback(record_clients, hung_stops=False)
        stack.callback(reader.kill)
        stack.callback(writer.kill)
        self.say(f"a client writes {human(lay.degraded_size)} at {human(lay.degraded_offset)} "
                 "over and over (two versions in turn) and another reads the rest back")
        t_start = time.time()
        reader.start()
        writer.start()
        if not writer.wait(lambda ps: len(ps) >= PASSES_BEFORE
                           and ps[-1].end - t_start >= SECONDS_BEFORE, cfg.timeout):
            raise DrillError(f"the client's writes did not run: {writer.errors()[:1]}")

        # the fault, mid-write
        cur = writer.wait_started(len(writer.passes), cfg.timeout)
        if cur is None:
            raise DrillError("the client stopped writing")
        mean = statistics.mean(p.seconds for p in writer.passes)
        time.sleep(min(0.4 * mean, 1.0))
        if isinstance(host, Namespace):
            host.cut()
            lost = "link cut"
        else:
            exp.kill()
            lost = "server killed"
        t_fault = self.t_fault = time.time()
        self.say(f"{lost} during write pass {cur[0] + 1}")
        ev = watch.wait_for(state_change("b", "unreachable", t_fault), cfg.timeout)
        if ev is None:
            raise DrillError(f"b was not made unreachable within {cfg.timeout:g}s "
                             f"(states {self.states()})")
        t_detect = event_time(ev)
        self.res.detect_s = max(0.0, t_detect - t_fault)
        self.res.detected_by = "QUORUM_CHILD_STATE_CHANGE b (unreachable)"
        self.say(f"detected after {self.res.detect_s:.3f}s: b unreachable")
        self.res.failed_state["b"] = "unreachable"

        # b is away: the client keeps writing
        if not writer.wait(lambda ps: sum(p.start >= t_detect for p in ps) >= PASSES_AWAY
                           and time.time() - t_detect >= SECONDS_AWAY, cfg.timeout):
            raise DrillError("the client stopped writing while b was away: "
                             f"{writer.errors()[:1]}")
        self.res.missed_bytes = int(self.child("b").get("unsynced-bytes") or 0)
        self.say(f"b missed {human(self.res.missed_bytes)}; bringing its host back")

        # the host returns: b catches up by itself, the client still writing
        if isinstance(host, Namespace):
            host.restore()
        else:
            exp.start(cfg.timeout)
        t_back = time.time()
        ev = watch.wait_for(state_change("b", "active", t_back), cfg.timeout)
        if ev is None:
            raise DrillError(f"b did not catch up within {cfg.timeout:g}s of its return "
                             f"(states {self.states()})")
        t_active = event_time(ev)
        self.res.catch_up_s = max(0.0, t_active - t_back)
        back = watch.find(state_change("b", "resyncing", t_back))
        if back is not None:
            self.res.reconnect_s = max(0.0, event_time(back) - t_back)
        self.res.catch_up_bytes, self.res.catch_up_job_s = self.catch_up_job("b", t_back)
        self.res.repair_s = self.res.catch_up_s
        self.res.resync_bytes = self.res.catch_up_bytes
        self.say(f"b active {self.res.catch_up_s:.2f}s after its return; catch-up copied "
                 + ("?" if self.res.catch_up_bytes is None else human(self.res.catch_up_bytes)))
        writer.wait(lambda ps: any(p.start >= t_active for p in ps), cfg.timeout)
        writer.finish()
        reader.finish()
        record_clients(hung_stops=True)
        self.res.throughput = {
            "before": writer.rate(t_start, t_fault)[0],
            "away": writer.rate(t_detect, t_back)[0],
            "catch-up": writer.rate(t_back, t_active)[0],
        }
        self.res.longest_pass_s = max(p.seconds for p in writer.passes)
        rates = ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}"
                          for k, v in self.res.throughput.items())
        self.say(f"client write MiB/s: {rates}; {len(writer.passes)} passes, the slowest "
                 f"{self.res.longest_pass_s:.2f}s")

        # verify: the last pass's data, everywhere
        last = writer.passes[-1]
        if not last.ok:
            raise DrillError(f"the client's last write failed: {last.error}")
        expect = self.srcs["expect" if last.source == 0 else "expect2"]
        self.client_op("read (after the catch-up)", lambda: self.compare_export(expect))
        states = self.states()
        self.res.check("membership", states == {n: "active" for n in self.images},
                       f"children after the catch-up: {states} (want all active)")
        self.no_stale_source(("b",))
        self.res.events = self._event_summary(watch)
        self.finish_server()
        self.verify_children(expect)


class RollingRun(RemoteRun):
    """b and c (qemu-nbd on 127.0.0.1) fail one after another and come back in the other
    order, the server restarting in between; a stale member must never be a source."""

    def step(self, step: str, what: str, client: str, states: dict[str, str] | None = None
             ) -> None:
        if states is None:
            states = self.states()
        self.res.steps.append({"step": step, "what": what, "states": states, "client": client})
        self.say(f"step {step}: {what}: " + ", ".join(f"{n} {s}" for n, s in states.items())
                 + f"; client: {client}")

    def _run(self, stack: ExitStack) -> None:
        lay, cfg = self.cfg.layout, self.cfg
        self.need_tools()
        host = Host()
        self.make_images()
        exps = {n: self.export(stack, host, n) for n in ("b", "c")}
        self.res.how = ("a local; b and c on qemu-nbd at 127.0.0.1 (lost: SIGKILL; back: "
                        f"restarted on the same port); vote-threshold 2 of 3; child timeout "
                        f"{REMOTE_CHILD_TIMEOUT:g}s")
        self.say(self.res.how)
        self.start_server(stack, {"a": self.images["a"], "b": exps["b"].uri,
                                  "c": exps["c"].uri})
        # W1 covers the degraded half; W2 only the second half of it, so that what c
        # caught up on (W1) is still there to check at the end
        region = (lay.degraded_offset, lay.degraded_size)
        half = lay.degraded_size // 2 // (64 * KiB) * (64 * KiB)
        region2 = (lay.degraded_offset + half, lay.degraded_size - half)
        split = lay.degraded_offset - lay.data_offset
        pre_w1 = self.srcs["before"].read_bytes()[split:]
        w1 = self.srcs["degraded"].read_bytes()
        w2_src = self.work / "w2.bin"
        w2_src.write_bytes(self.srcs["degraded2"].read_bytes()[half:])
        expect_w1 = self.srcs["expect"]
        expect_w2 = self.work / "expect-w2.bin"
        expect_w2.write_bytes(self.srcs["before"].read_bytes()[:split] + w1[:half]
                              + w2_src.read_bytes())
        scratch = self.work / "read.bin"

        # 0. everything in sync
        ok = self.client_op("write W0", lambda: self.write_data(
            self.srcs["before"], lay.data_offset, lay.data_size))
        self.step("0", "all three in sync; W0 written", "write W0 " + ("ok" if ok else "FAILED"))

        # 1. c lost; W1 acknowledged by a and b
        exps["c"].kill()
        t1 = self.t_fault = time.time()
        self.client_op("write W1 (c away)", lambda: self.write_data(
            self.srcs["degraded"], *region))
        ok = self.client_op("read W1 back", lambda: self.compare_export(expect_w1))
        self.wait_states({"c": "unreachable"}, "c's loss")
        ev = self.watch.find(state_change("c", "unreachable", t1)) if self.watch else None
        if ev is not None:
            self.res.detect_s = max(0.0, event_time(ev) - t1)
            self.res.detected_by = "QUORUM_CHILD_STATE_CHANGE c (unreachable)"
        self.step("1", "c's server killed; W1 written (a, b acknowledge)",
                  "write W1 and read back " + ("ok" if ok else "FAILED"))

        # 2. a clean stop: the state dir keeps c's missed regions
        self.finish_server()
        recorded = self.recorded_states()
        self.step("2", f"server stopped cleanly (exit {self.res.server_exit}); "
                  "the state dir records", "-", recorded)
        self.res.check("c recorded stale", recorded.get("c") in ("unreachable", "resyncing"),
                       f"the state dir records c as {recorded.get('c')} after it missed W1")

        # 3. b lost too, c back (stale); the server starts again
        exps["b"].kill()
        exps["c"].start(cfg.timeout)
        t3 = time.time()
        self.connect(stack)
        first = self.states()
        self.res.check("c not in sync at start", first.get("c") in ("unreachable", "resyncing"),
                       f"c, which missed W1, started {first.get('c')}")
        # (c active here is the failure checked above: go on, and see what reads return)
        states = self.wait_states({"b": "unreachable", "c": ("resyncing", "active")},
                                  "the restart")
        data, why = self.read_region(*region, scratch)
        if data is None:
            client = f"read fails, as it must ({why.rsplit(': ', 1)[-1]})"
            self.record("read with 1 child in sync (must fail)", 0.0, [], False, outcome=why)
        else:
            what = ("STALE data (from before W1)" if data == pre_w1 else
                    "W1" if data == w1 else "data that is neither W1 nor older")
            client = f"read returned {what}"
            self.res.problems.append(f"with one child in sync out of vote-threshold 2 a read "
                                     f"succeeded and returned {what}")
        self.step("3", "b's server killed, c's restarted (stale); server started", client,
                  states)

        # 3b. the operator lowers the threshold: reads come from a, c catches up from a
        self.threshold(1)
        data, why = self.read_region(*region, scratch)
        if data == w1:
            client = "read = W1"
        else:
            what = (why if data is None else "STALE data (from before W1)" if data == pre_w1
                    else "data that is neither W1 nor older")
            client = f"read: {what}"
            self.res.problems.append(f"with vote-threshold 1 (a in sync, c stale) a read of "
                                     f"W1's region returned {what}")
        self.record("read W1 (vote-threshold 1)", 0.0, [] if data == w1 else [client], False)
        self.step("3b", "operator: vote-threshold 1", client)
        self.wait_states({"c": "active"}, "c's catch-up")
        c_len, _ = self.catch_up_job("c", t3)
        proc = self.qemu_img("compare", "-f", "raw", str(expect_w1),
                             image_json(host_file(self.images["c"]), lay.data_offset,
                                        lay.data_size))
        self.res.check("c caught up on W1", proc.returncode == 0,
                       f"c's image after its catch-up: {last_line(proc)}")
        ok = self.client_op("write W2 (b away)", lambda: self.write_data(w2_src, *region2))
        ok = self.client_op("read W2 back", lambda: self.compare_export(expect_w2)) and ok
        self.step("3c", (f"c caught up from a ({human(c_len)} copied)" if c_len is not None
                         else "c active without a catch-up")
                  + "; W2 written over half of W1 (a, c acknowledge)",
                  "write W2 and read back " + ("ok" if ok else "FAILED"))

        # 4. b back (stale: it has W1, not W2); everything catches up
        t4 = time.time()
        exps["b"].start(cfg.timeout)
        self.wait_states({"b": "active"}, "b's catch-up")
        b_len, self.res.catch_up_job_s = self.catch_up_job("b", t4)
        self.res.catch_up_s = time.time() - t4
        self.res.catch_up_bytes = b_len
        self.threshold(2)
        ok = self.client_op("read after everything returned", lambda: self.compare_export(
            expect_w2))
        self.step("4", "b's server restarted; b caught up"
                  + (f" ({human(b_len)} copied)" if b_len is not None else "")
                  + "; vote-threshold 2 again",
                  "read = W1 + W2 (the last acknowledged writes) " + ("ok" if ok else "FAILED"))
        states = self.states()
        self.res.check("membership", states == {n: "active" for n in self.images},
                       f"children at the end: {states} (want all active)")
        self.no_stale_source(("b", "c"))
        if self.watch is not None:
            self.res.events = self._event_summary(self.watch)
        self.finish_server()
        self.verify_children(expect_w2)

    def recorded_states(self) -> dict[str, str]:
        """The children's states in the state dir's state.json (as an operator reads it)."""
        path = self.work / "state" / "state.json"
        try:
            state = json.loads(path.read_text())
            return {str(c["node-name"]): str(c["state"]) for c in state["children"]}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DrillError(f"cannot read {path}: {err}") from err

