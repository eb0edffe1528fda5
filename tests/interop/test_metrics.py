"""``serve --metrics``: a running server scraped over HTTP, the text checked by
``promtool check metrics`` (Debian's prometheus package) and its values against the
I/O that real clients (qemu-io, libnbd) made; with a worker process, whose counts
reach the primary and survive its kill -9.  The example alert rules of
docs/alerts.yml pass ``promtool check rules`` and fire in ``promtool test rules``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.interop.conftest import (
    REPO_ROOT,
    Server,
    StartServer,
    corrupt,
    free_tcp_port,
    nbdquorum_cli,
    output,
    qemu_io,
    require,
    require_libnbd,
    wait_until,
)
from tests.interop.test_workers import worker_pids

pytestmark = pytest.mark.timeout(180)

ALERTS = REPO_ROOT / "docs" / "alerts.yml"
KiB = 1024

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scraper:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=30) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain")
            return str(r.read().decode())

    def check(self) -> Samples:
        """Scrape, check with promtool (lint included), parse."""
        text = self.text()
        promtool_check_metrics(text)
        return parse(text)

    def value(self, name: str, **labels: str) -> float:
        return parse(self.text())[(name, frozenset(labels.items()))]

    def until(self, what: str, predicate: Callable[[Samples], bool]) -> Samples:
        """Scrape until predicate holds (worker counts arrive once a second)."""
        return wait_until(lambda: (lambda s: s if predicate(s) else None)(parse(self.text())),
                          15, what)


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def promtool_check_metrics(text: str) -> None:
    proc = subprocess.run([require("promtool"), "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60, check=False)
    out = (proc.stdout + proc.stderr).decode()
    # exit 0 and no output: no problem and no lint warning either
    assert proc.returncode == 0 and not out.strip(), f"promtool check metrics:\n{out}\n{text}"


def start(start_server: StartServer, *extra: str, **kw: Any) -> tuple[Server, Scraper]:
    port = free_tcp_port()
    server = start_server("nbdquorum", extra=["--metrics", f"127.0.0.1:{port}", *extra], **kw)
    scraper = Scraper(port)

    def up() -> bool:
        try:
            scraper.text()
        except OSError:
            return False
        return True

    wait_until(up, 30, "the metrics endpoint")
    return server, scraper


def requests(s: Samples, cmd: str) -> float:
    return get(s, "nbdquorum_requests_total", cmd=cmd)


def child(s: Samples, name: str, kid: str) -> float:
    return get(s, f"nbdquorum_child_{name}", node="quorum0", child=kid)


KIDS = ("child0", "child1", "child2")
STATES = ("active", "resyncing", "faulted")
WRITES = [f"write -P 0x{i + 0x10:x} {i * 64}k 64k" for i in range(4)]
READS = [f"read -P 0x{i % 4 + 0x10:x} {i % 4 * 64}k 64k" for i in range(6)]


def test_scrape_of_a_running_server_counts_what_clients_did(start_server: StartServer) -> None:
    server, scraper = start(start_server, rewrite_corrupted=True)
    before = scraper.check()
    for kid in KIDS:
        for st in STATES:
            assert get(before, "nbdquorum_child_state", node="quorum0", child=kid,
                       state=st) == (st == "active")
    assert get(before, "nbdquorum_workers") == 0
    assert get(before, "nbdquorum_connections") == 0
    assert get(before, "nbdquorum_vote_threshold", node="quorum0") == 2

    qemu_io(server.uri(), *WRITES)
    qemu_io(server.uri(), *READS, read_only=True)
    after = scraper.check()
    assert requests(after, "write") - requests(before, "write") == len(WRITES)
    assert requests(after, "read") - requests(before, "read") == len(READS)
    assert requests(after, "flush") >= requests(before, "flush")
    hist = "nbdquorum_request_duration_seconds"
    assert get(after, hist + "_count", cmd="read") == requests(after, "read")
    assert get(after, hist + "_bucket", cmd="write", le="+Inf") == requests(after, "write")
    assert get(after, hist + "_sum", cmd="write") > 0
    for kid in KIDS:  # read-pattern quorum: every active child is read and written
        assert child(after, "reads_total", kid) - child(before, "reads_total", kid) == len(READS)
        assert child(after, "writes_total", kid) - child(before, "writes_total", kid) == len(
            WRITES)
        assert child(after, "checksum_errors_total", kid) == 0
        assert child(after, "unsynced_bytes", kid) == 0

    # a child that returns other bytes: a checksum error, rewritten (--rewrite-corrupted)
    corrupt(server.images[2], 4 * KiB, 512, 0xEE)
    qemu_io(server.uri(), "read -P 0x10 0 64k", read_only=True)
    bad = scraper.check()
    assert child(bad, "checksum_errors_total", "child2") == 1
    assert child(bad, "repaired_total", "child2") >= 512
    assert child(bad, "checksum_errors_total", "child0") == 0
    assert child(bad, "read_errors_total", "child2") == 0

    # open connections are counted while they are open
    nbd = require_libnbd()
    handles = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(server.uri())
        handles.append(h)
    assert scraper.value("nbdquorum_connections") == 2
    for h in handles:
        h.shutdown()
    scraper.until("the connections to close", lambda s: get(s, "nbdquorum_connections") == 0)

    assert server.stop() == 0, server.stderr()  # SIGTERM: the endpoint goes with the server
    with pytest.raises(OSError):
        scraper.text()


def test_a_workers_counts_reach_the_primary_and_survive_its_kill(
    start_server: StartServer,
) -> None:
    server, scraper = start(start_server, "--workers", "1", "--workers-take-all", "-vv")
    first = scraper.until("the worker serving", lambda s: get(s, "nbdquorum_workers") == 1)
    assert requests(first, "read") == requests(first, "write") == 0

    qemu_io(server.uri(), *WRITES)
    qemu_io(server.uri(), *READS, read_only=True)
    # exactly the clients' requests: the writes the worker forwards to the primary are
    # not counted again
    counted = scraper.until(
        "the worker's request counts",
        lambda s: requests(s, "read") == len(READS) and requests(s, "write") == len(WRITES))
    scraper.check()
    assert get(counted, "nbdquorum_request_duration_seconds_count", cmd="read") == len(READS)
    for kid in KIDS:  # reads voted in the worker, counted by the primary
        assert child(counted, "reads_total", kid) == len(READS)

    nbd = require_libnbd()
    h = nbd.NBD()
    h.connect_uri(server.uri())  # placed on the worker
    assert scraper.value("nbdquorum_connections") == 1
    pid = worker_pids(server.stderr())[1]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: "worker 1 exited unexpectedly" in server.stderr(), 15, "the death noted")
    dead = scraper.check()
    assert requests(dead, "read") == len(READS)  # kept, not gone with the worker
    assert requests(dead, "write") == len(WRITES)
    # 0 until its replacement is ready (a second or more later; a slow test may miss it)
    assert get(dead, "nbdquorum_workers") == 0 or worker_pids(server.stderr())[1] != pid
    assert get(dead, "nbdquorum_connections") == 0  # its connection was lost with it
    del h  # its server is gone; libnbd closes the handle

    scraper.until("a new worker serving", lambda s: get(s, "nbdquorum_workers") == 1)
    wait_until(lambda: worker_pids(server.stderr())[1] != pid, 15, "a new worker 1")
    qemu_io(server.uri(), "read -P 0x10 0 64k", "write -P 0x20 1M 64k")
    final = scraper.until(
        "the new worker's counts added to the old ones",
        lambda s: requests(s, "read") == len(READS) + 1
        and requests(s, "write") == len(WRITES) + 1)
    scraper.check()
    assert get(final, "nbdquorum_request_duration_seconds_count", cmd="write") == len(WRITES) + 1


def test_a_busy_metrics_address_is_one_line_naming_it(tmp_path: Path) -> None:
    image = tmp_path / "a.raw"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = nbdquorum_cli("serve", "--child", str(image), "--size", "1M",
                             "--socket", str(tmp_path / "s"), "--metrics", f"127.0.0.1:{port}")
    text = output(proc)
    assert proc.returncode == 1, text
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert errors == [f"nbdquorum: error: --metrics: cannot listen on tcp:127.0.0.1:{port}: "
                      f"{os.strerror(errno.EADDRINUSE)}"], text
    assert not image.exists()  # refused before anything was created


def test_a_bad_metrics_address_is_refused_by_the_parser(tmp_path: Path) -> None:
    proc = nbdquorum_cli("serve", "--child", str(tmp_path / "a.raw"), "--metrics", "9100x")
    assert proc.returncode == 2 and "expected HOST:PORT" in output(proc)


# -- the example alert rules ------------------------------------------------------------------


def test_alert_rules_pass_promtool_check_rules() -> None:
    proc = subprocess.run([require("promtool"), "check", "rules", str(ALERTS)],
                          capture_output=True, timeout=60, check=False)
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0, out
    assert "SUCCESS" in out and "Checking" in out, out


def test_alert_rules_name_only_metrics_the_server_has(start_server: StartServer) -> None:
    """Every nbdquorum_ name in the rules is in a real scrape (docs cannot drift)."""
    _server, scraper = start(start_server)
    families = {f.name for f in text_string_to_metric_families(scraper.text())}
    named = set(re.findall(r"\bnbdquorum_\w+", ALERTS.read_text()))
    assert named, "no nbdquorum_ metric in the rules"

    def family(name: str) -> str:
        for suffix in ("_total", "_bucket", "_count", "_sum"):
            if name.endswith(suffix) and name[: -len(suffix)] in families:
                return name[: -len(suffix)]
        return name

    assert {family(n) for n in named} <= families, named


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    lab = ",".join(f'{k}="{v}"' for k, v in {"instance": "h:9100", **labels}.items())
    return {"series": f"{name}{{{lab}}}", "values": values}


def test_alert_rules_fire_when_they_should(tmp_path: Path) -> None:
    """promtool test rules: each example alert fires on a made-up history (and the
    quiet quorum next to it raises nothing)."""
    q, ok = {"node": "q0"}, {"node": "ok"}
    tests = [{
        "interval": "1m",
        "input_series": [
            # q0: child b faulted at minute 2; ok: all active the whole time
            *[series("nbdquorum_child_state", "1x60", **q, child=c, state="active")
              for c in ("a", "c")],
            series("nbdquorum_child_state", "1 1 0x58", **q, child="b", state="active"),
            series("nbdquorum_child_state", "0 0 1x58", **q, child="b", state="faulted"),
            *[series("nbdquorum_child_state", "1x60", **ok, child=c, state="active")
              for c in ("a", "b", "c")],
            series("nbdquorum_children", "3x60", **q),
            series("nbdquorum_children", "3x60", **ok),
            series("nbdquorum_vote_threshold", "2x60", **q),
            series("nbdquorum_vote_threshold", "2x60", **ok),
            # q0's child c: checksum errors from minute 20
            series("nbdquorum_child_checksum_errors_total", "0x20 3x40", **q, child="c"),
            series("nbdquorum_child_checksum_errors_total", "0x60", **ok, child="a"),
            # q0's child b: read errors at minute 30 (before it faulted, say)
            series("nbdquorum_child_read_errors_total", "0x30 5x30", **q, child="b"),
            series("nbdquorum_child_write_errors_total", "0x60", **q, child="b"),
            # ok's child b resyncs and finishes; q0's child a is stuck at 1 GiB
            series("nbdquorum_child_unsynced_bytes", "0 1073741824x60", **q, child="a"),
            series("nbdquorum_child_unsynced_bytes", "1073741824-20000000x50 0x10",
                   **ok, child="b"),
        ],
        "alert_rule_test": [
            {"eval_time": "1m", "alertname": "NbdquorumDegraded", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "NbdquorumDegraded", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "instance": "h:9100", **q},
                 "exp_annotations": {
                     "summary": "q0 on h:9100 is degraded",
                     "description": "Not every child of q0 is active (active: 2). "
                                    "`nbdquorum ctl status` names the others; replace a "
                                    "faulted one with `nbdquorum ctl replace`."}}]},
            {"eval_time": "10m", "alertname": "NbdquorumChecksumErrors", "exp_alerts": []},
            {"eval_time": "25m", "alertname": "NbdquorumChecksumErrors", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "instance": "h:9100", **q,
                                "child": "c"},
                 "exp_annotations": {
                     "summary": "c of q0 on h:9100 returns wrong data",
                     "description": "c lost read votes in the last 15 minutes. Run a scrub "
                                    "with repair (x-quorum-scrub, repair true) and consider "
                                    "replacing its disk."}}]},
            {"eval_time": "25m", "alertname": "NbdquorumChildIOErrors", "exp_alerts": []},
            {"eval_time": "35m", "alertname": "NbdquorumChildIOErrors", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "instance": "h:9100", **q,
                                "child": "b"},
                 "exp_annotations": {
                     "summary": "b of q0 on h:9100 has I/O errors",
                     "description": "Reads or writes of b failed in the last 15 minutes; the "
                                    "server logs name the errors."}}]},
            {"eval_time": "20m", "alertname": "NbdquorumResyncStuck", "exp_alerts": []},
            {"eval_time": "59m", "alertname": "NbdquorumResyncStuck", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "instance": "h:9100", **q,
                                "child": "a"},
                 "exp_annotations": {
                     "summary": "resync of a (q0 on h:9100) makes no progress",
                     "description": "a still has unsynced bytes and copied none in 30 "
                                    "minutes. `nbdquorum ctl status` shows its resync error; "
                                    "query-jobs its job."}}]},
            {"eval_time": "59m", "alertname": "NbdquorumNoQuorum", "exp_alerts": []},
        ],
    }]
    spec = tmp_path / "alerts_test.yml"  # JSON is YAML
    spec.write_text(json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
                                "tests": tests}, indent=1))
    proc = subprocess.run([require("promtool"), "test", "rules", str(spec)],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


def test_no_quorum_alert_fires_below_the_threshold(tmp_path: Path) -> None:
    q = {"node": "q0"}
    tests = [{
        "interval": "1m",
        "input_series": [
            series("nbdquorum_child_state", "1x10", **q, child="a", state="active"),
            *[series("nbdquorum_child_state", "0x10", **q, child=c, state="active")
              for c in ("b", "c")],
            series("nbdquorum_children", "3x10", **q),
            series("nbdquorum_vote_threshold", "2x10", **q),
        ],
        "alert_rule_test": [
            {"eval_time": "2m", "alertname": "NbdquorumNoQuorum", "exp_alerts": [
                {"exp_labels": {"severity": "critical", "instance": "h:9100", **q},
                 "exp_annotations": {
                     "summary": "q0 on h:9100 has no quorum",
                     "description": "Active children of q0: 1, fewer than its vote "
                                    "threshold: I/O fails. `nbdquorum ctl status` shows which "
                                    "children are faulted."}}]},
        ],
    }]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps({"rule_files": [str(ALERTS)], "evaluation_interval": "1m",
                                "tests": tests}))
    proc = subprocess.run([require("promtool"), "test", "rules", str(spec)],
                          capture_output=True, timeout=60, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()
