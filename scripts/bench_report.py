"""Tables, verdicts, chart and docs for scripts/bench (see bench_run.py).

Works on the results document that bench_run writes (bench-out/results.json),
so ``.venv/bin/python scripts/bench_report.py [results.json] [--write-docs]``
re-renders a finished run without running it again.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
A, B = "nbdq", "qsd"  # the pair every ratio compares: nbdquorum / qsd quorum of 3
RSS_BUDGET_MIB = 256
#: docs/performance.md "Bounds": summed VmRSS whatever clients do
RSS_HOSTILE_MIB = 512

# The targets, as (row, what, bound).  what: a metric of the medians;
# "p50" compares latency (lower is better, bound is the max ratio).
THROUGHPUT_TARGETS = [
    ("seqread-1m-qd8", "mbps", 2.5),
    ("seqwrite-1m-qd8", "mbps", 1.2),
    ("randread-4k-qd32", "iops", 1.5),
    ("randwrite-4k-qd32", "iops", 1.2),
    ("randrw-4k-qd16", "iops", 1.2),
    ("seqread-1m-stale", "mbps", 2.0),
]

# Children on other hosts (scripts/bench --remote): rows remote-*, a quorum of two
# local files and one remote child (qemu-nbd over TCP), compared pairwise
RA, RB = "nbdq-remote", "qsd-remote"  # nbdquorum / qsd, each with the remote child
RLOCAL = "nbdq"  # nbdquorum's all-local quorum of three, same run
RDIRECT = "remote-direct"  # fio straight to a second qemu-nbd on the remote host
RALONE = "nbdq-remote-alone"  # nbdquorum with the remote child as its only child
REMOTE_VS_QSD = 1.5  # nbdq-remote >= 1.5x qsd-remote on every remote row
REMOTE_VS_LOCAL = 0.6  # nbdq-remote >= 0.6x nbdquorum's all-local quorum
RESYNC_VS_NBDCOPY = 0.5  # a full resync of the remote child >= 0.5x nbdcopy to it
RESYNC_FIO_KEEPS = 0.5  # fio during the resync >= 0.5x fio alone
RESYNC_FIO_LABEL = "fio randrw 70/30 4k QD16"  # bench_run.RESYNC_FIO

SHORT = {
    "nbdq": "nbdquorum",
    "nbdq-remote": "nbdquorum, remote child",
    "qsd-remote": "qsd, nbd child",
    "remote-direct": "qemu-nbd alone",
    "nbdq-remote-alone": "nbdquorum, remote child alone",
    "qsd": "qsd quorum3",
    "qsd-fifo": "qsd fifo",
    "qsd-raw": "qsd 1 raw",
    "nbdkit": "nbdkit 1 file",
    "nbdq-fifo": "nbdquorum fifo",
}


# -- helpers -------------------------------------------------------------------
def med(doc: dict[str, Any], row: str, target: str) -> dict[str, Any] | None:
    r = doc["results"].get(row, {}).get(target)
    return r["median"] if r else None


def row_def(doc: dict[str, Any], row: str) -> dict[str, Any]:
    return next(r for r in doc["rows"] if r["id"] == row)


def headline(doc: dict[str, Any], row: str) -> str:
    return "mbps" if row_def(doc, row)["unit"] == "mbps" else "iops"


def is_remote(row: str) -> bool:
    return row.startswith("remote-")


def ratio(doc: dict[str, Any], row: str, metric: str, a: str = A, b: str = B) -> float | None:
    ma, mb = med(doc, row, a), med(doc, row, b)
    if not ma or not mb or not ma.get(metric) or not mb.get(metric):
        return None
    return float(ma[metric]) / float(mb[metric])


def fmt_thr(m: dict[str, Any], unit: str) -> str:
    if unit == "mbps":
        return f"{m['mbps']:.0f} MB/s"
    v = m["iops"]
    return f"{v / 1000:.1f}k IOPS" if v >= 1000 else f"{v:.0f} IOPS"


def fmt_cpu(m: dict[str, Any], unit: str) -> str:
    if unit == "mbps":
        return f"{m['cpu_s_per_gb']:.2f} CPU-s/GB" if m.get("cpu_s_per_gb") is not None else "-"
    return f"{m['cpu_us_per_op']:.0f} us CPU/op" if m.get("cpu_us_per_op") is not None else "-"


def fmt_lat(m: dict[str, Any]) -> str:
    return f"p50 {fmt_us(m['p50_us'])}, p99 {fmt_us(m['p99_us'])}"


def fmt_us(us: float) -> str:
    return f"{us / 1000:.1f} ms" if us >= 10000 else f"{us:.0f} us"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


# -- verdicts ------------------------------------------------------------------
def verdicts(doc: dict[str, Any]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []

    def add(target: str, status: str, measured: str) -> None:
        out.append({"target": target, "status": status, "measured": measured})

    if not any(not is_remote(r) for r in doc["results"]):  # scripts/bench --remote alone
        return remote_verdicts(doc)
    for row, metric, bound in THROUGHPUT_TARGETS:
        label = f"{label_of(doc, row)} >= {bound}x qsd"
        r = ratio(doc, row, metric)
        if r is None:
            add(label, "SKIP", "row not run")
            continue
        ma, mb = med(doc, row, A), med(doc, row, B)
        assert ma and mb
        unit = headline(doc, row)
        add(label, "PASS" if r >= bound else "FAIL",
            f"{r:.2f}x ({fmt_thr(ma, unit)} vs {fmt_thr(mb, unit)})")

    r = ratio(doc, "randread-4k-qd1", "p50_us")
    if r is None:
        add("randread 4k QD1 p50 latency <= qsd", "SKIP", "row not run")
    else:
        ma, mb = med(doc, "randread-4k-qd1", A), med(doc, "randread-4k-qd1", B)
        assert ma and mb
        add("randread 4k QD1 p50 latency <= qsd", "PASS" if r <= 1.0 else "FAIL",
            f"{fmt_us(ma['p50_us'])} vs {fmt_us(mb['p50_us'])} ({r:.2f}x)")

    cpu = [(row, ratio(doc, row, "cpu_us_per_op")) for row in doc["results"]]
    cpu = [(row, c) for row, c in cpu if c is not None]
    if cpu:
        worse = [(row, c) for row, c in cpu if c > 1.0]
        worst = max(cpu, key=lambda x: x[1])
        add("server CPU per op and per GB <= qsd on every row",
            "PASS" if not worse else "FAIL",
            f"{len(cpu) - len(worse)}/{len(cpu)} rows; worst {worst[0]} {worst[1]:.2f}x"
            + (f"; over: {', '.join(f'{r} {c:.2f}x' for r, c in worse)}" if worse else ""))
    else:
        add("server CPU per op and per GB <= qsd on every row", "SKIP", "no rows")

    mc, single = med(doc, "multiconn-randread-4k-qd32x4", A), med(doc, "randread-4k-qd32", A)
    if mc and single:
        r = mc["iops"] / single["iops"]
        qmc, qsingle = med(doc, "multiconn-randread-4k-qd32x4", B), med(doc, "randread-4k-qd32", B)
        qs = f"; qsd {qmc['iops'] / qsingle['iops']:.2f}x" if qmc and qsingle else ""
        add("4 connections: total throughput grows (nbdquorum, vs 1 connection)",
            "PASS" if r >= 1.0 else "FAIL",
            f"{r:.2f}x ({fmt_thr(mc, 'iops')} vs {fmt_thr(single, 'iops')}){qs}")
    else:
        add("4 connections: total throughput grows", "SKIP", "needs --full")

    fair, idle = med(doc, "fair-randread-4k-qd1-stall16", A), med(doc, "randread-4k-qd1", A)
    label = "randread 4k QD1 p50 with 16 clients stalled <= 2x idle"
    if fair and idle and idle.get("p50_us"):
        r = fair["p50_us"] / idle["p50_us"]
        qf, qi = med(doc, "fair-randread-4k-qd1-stall16", B), med(doc, "randread-4k-qd1", B)
        qs = (f"; qsd {qf['p50_us'] / qi['p50_us']:.2f}x" if qf and qi and qi.get("p50_us")
              else "")
        add(label, "PASS" if r <= 2.0 else "FAIL",
            f"{r:.2f}x ({fmt_us(fair['p50_us'])} vs {fmt_us(idle['p50_us'])}){qs}")
    else:
        add(label, "SKIP", "rows not run")
    for row, bound in (("memory-friendly-randrw-mixed", RSS_BUDGET_MIB),
                       ("memory-hostile-stall64", RSS_HOSTILE_MIB),
                       ("memory-hostile-trickle64", RSS_HOSTILE_MIB)):
        m = med(doc, row, A)
        label = f"summed VmHWM < {bound} MiB: {label_of(doc, row) if m else row}"
        if not m:
            add(label, "SKIP", "row not run")
            continue
        q = med(doc, row, B)
        add(label, "PASS" if m["vmhwm_mib"] < bound else "FAIL",
            f"{m['vmhwm_mib']:.0f} MiB" + (f" (qsd {q['vmhwm_mib']:.0f} MiB)" if q else ""))

    mem = [(row, med(doc, row, A)) for row in doc["results"] if row.startswith("memory-")
           and row.endswith("x4")]
    mem = [(row, m) for row, m in mem if m]
    if mem:
        row, m = max(mem, key=lambda x: x[1]["vmhwm_mib"])
        q = med(doc, row, B)
        qs = f", qsd {q['vmhwm_mib']:.0f} MiB" if q else ""
        add(f"RSS < {RSS_BUDGET_MIB} MiB with 4 x 128 x 1 MiB in flight",
            "PASS" if m["vmhwm_mib"] < RSS_BUDGET_MIB else "FAIL",
            f"peak VmHWM {m['vmhwm_mib']:.0f} MiB ({row}{qs})")
    else:
        add(f"RSS < {RSS_BUDGET_MIB} MiB with 4 x 128 x 1 MiB in flight", "SKIP", "row not run")

    lin = children_costs(doc, A)
    label = "cost linear in the number of children (no superlinear growth)"
    if len(lin) >= 3:
        # marginal CPU-s/GB per added child, over the upper half vs the lower half
        # of the range: a fixed per-request cost makes it fall (fine), a cost that
        # grows with N (quadratic vote, per-child locking) makes it rise
        (n0, c0), (nm, cm), (n1, c1) = lin[0], lin[len(lin) // 2], lin[-1]
        lo, hi = (cm - c0) / (nm - n0), (c1 - cm) / (n1 - nm)
        ok = hi <= 1.5 * max(lo, 0.0) + 0.05  # +0.05 CPU-s/GB: noise floor
        q = children_costs(doc, B)
        qs = ("; qsd " + ", ".join(f"{n}: {c:.2f}" for n, c in q)) if q else ""
        add(label, "PASS" if ok else "FAIL",
            "CPU-s/GB by children " + ", ".join(f"{n}: {c:.2f}" for n, c in lin)
            + f"; per added child {lo:.2f} ({n0}-{nm}), {hi:.2f} ({nm}-{n1}){qs}")
    else:
        add(label, "SKIP", "needs --full")
    if any(is_remote(r) for r in doc["results"]) or doc.get("resync"):
        out += remote_verdicts(doc)
    return out


def remote_verdicts(doc: dict[str, Any]) -> list[dict[str, str]]:
    """The remote child's targets: vs qsd's nbd child, vs the all-local quorum, resync."""
    out: list[dict[str, str]] = []

    def add(target: str, status: str, measured: str) -> None:
        out.append({"target": target, "status": status, "measured": measured})

    rows = [r["id"] for r in doc["rows"] if is_remote(r["id"])]
    for row in rows:
        unit = headline(doc, row)
        ma, mb, ml = med(doc, row, RA), med(doc, row, RB), med(doc, row, RLOCAL)
        label = label_of(doc, row)
        r = ratio(doc, row, unit, RA, RB)
        if r is None or not ma or not mb:
            add(f"{label}: >= {REMOTE_VS_QSD}x qsd", "SKIP", "not run")
        else:
            add(f"{label}: >= {REMOTE_VS_QSD}x qsd", "PASS" if r >= REMOTE_VS_QSD else "FAIL",
                f"{r:.2f}x ({fmt_thr(ma, unit)} vs {fmt_thr(mb, unit)})")
        c = ratio(doc, row, "cpu_us_per_op", RA, RB)
        if c is None or not ma or not mb:
            add(f"{label}: CPU per op <= qsd", "SKIP", "not run")
        else:
            add(f"{label}: CPU per op <= qsd", "PASS" if c <= 1.0 else "FAIL",
                f"{c:.2f}x ({fmt_cpu(ma, unit)} vs {fmt_cpu(mb, unit)})")
        r = ratio(doc, row, unit, RA, RLOCAL)
        if r is None or not ma or not ml:
            add(f"{label}: >= {REMOTE_VS_LOCAL}x all-local", "SKIP", "not run")
        else:
            add(f"{label}: >= {REMOTE_VS_LOCAL}x all-local",
                "PASS" if r >= REMOTE_VS_LOCAL else "FAIL",
                f"{r:.2f}x ({fmt_thr(ma, unit)} vs {fmt_thr(ml, unit)})")
    rs = doc.get("resync")
    if rs:
        cp = rs["nbdcopy"]["median"]["mbps"]
        for kind, what in (("resync", "alone"), ("resync_fio", "under fio")):
            m = rs[kind]["median"]["mbps"]
            add(f"full resync of the remote child {what} >= {RESYNC_VS_NBDCOPY}x nbdcopy",
                "PASS" if m >= RESYNC_VS_NBDCOPY * cp else "FAIL",
                f"{m / cp:.2f}x ({m:.0f} MB/s vs {cp:.0f} MB/s)")
        alone, during = rs["fio"]["median"]["iops"], rs["resync_fio"]["median"]["fio_iops"]
        add(f"fio during the resync >= {RESYNC_FIO_KEEPS}x of fio alone",
            "PASS" if during >= RESYNC_FIO_KEEPS * alone else "FAIL",
            f"{during / alone:.2f}x ({during / 1000:.1f}k vs {alone / 1000:.1f}k IOPS, "
            f"{RESYNC_FIO_LABEL})")
    return out


def children_costs(doc: dict[str, Any], target: str) -> list[tuple[int, float]]:
    out = []
    for row in doc["results"]:
        m = re.fullmatch(r"children-(\d+)-seqread-1m", row)
        r = med(doc, row, target)
        if m and r and r.get("cpu_s_per_gb"):
            out.append((int(m.group(1)), float(r["cpu_s_per_gb"])))
    return sorted(out)


def label_of(doc: dict[str, Any], row: str) -> str:
    for r in doc["rows"]:
        if r["id"] == row:
            return str(r["label"])
    return row


# -- text and markdown ---------------------------------------------------------
def _ordered_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    # bench_run stores the rows in the matrix's order (it runs reads first)
    return [r for r in doc["rows"] if not is_remote(r["id"])]


def _remote_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in doc["rows"] if is_remote(r["id"])]


def _extras(doc: dict[str, Any]) -> list[str]:
    return [t["id"] for t in doc["targets"] if t["id"] not in (A, B, RA, RB, RDIRECT, RALONE)]


def text_table(doc: dict[str, Any]) -> str:
    extras = _extras(doc)
    head = (f"{'workload':38} {'nbdquorum':>12} {'qsd quorum3':>12} {'ratio':>6} "
            f"{'p50 nbdq/qsd us':>16} {'p99 nbdq/qsd us':>16} {'CPU nbdq/qsd':>22} {'cpu':>6} "
            f"{'RSS MiB':>9}" + "".join(f" {SHORT.get(e, e):>14}" for e in extras))
    lines = [head, "-" * len(head)]
    for r in _ordered_rows(doc):
        rid, unit = r["id"], r["unit"]
        ma, mb = med(doc, rid, A), med(doc, rid, B)
        key = "mbps" if unit == "mbps" else "iops"

        def thr(m: dict[str, Any] | None, key: str = key) -> str:
            if not m:
                return "-"
            return f"{m[key]:.0f} MB/s" if key == "mbps" else f"{m[key] / 1000:.1f}k"

        def cpu(m: dict[str, Any] | None, unit: str = unit) -> str:
            if not m:
                return "-"
            if unit == "mbps":
                return f"{m['cpu_s_per_gb']:.2f}"
            return f"{m['cpu_us_per_op']:.0f}"

        cu = "s/GB" if unit == "mbps" else "us/op"
        p50 = f"{ma['p50_us']:.0f}/{mb['p50_us']:.0f}" if ma and mb else "-"
        p99 = f"{ma['p99_us']:.0f}/{mb['p99_us']:.0f}" if ma and mb else "-"
        rss = f"{ma['vmhwm_mib']:.0f}/{mb['vmhwm_mib']:.0f}" if ma and mb else "-"
        lines.append(
            f"{r['label'][:38]:38} {thr(ma):>12} {thr(mb):>12} {fmt_ratio(ratio(doc, rid, key)):>6} "
            f"{p50:>16} {p99:>16} {cpu(ma) + '/' + cpu(mb) + ' ' + cu:>22} "
            f"{fmt_ratio(ratio(doc, rid, 'cpu_us_per_op')):>6} {rss:>9}"
            + "".join(f" {thr(med(doc, rid, e)):>14}" for e in extras))
    return "\n".join(lines)


def text_remote_table(doc: dict[str, Any]) -> str:
    """The remote rows: nbdquorum and qsd with the remote child, and the all-local quorum."""
    head = (f"{'workload (2 local + 1 remote child)':38} {'nbdq remote':>12} {'qsd remote':>12} "
            f"{'ratio':>6} {'nbdq local3':>12} {'/local':>7} {'p50 nbdq/qsd us':>16} "
            f"{'CPU nbdq/qsd':>20} {'cpu':>6} {'qemu-nbd CPU':>14} {'remote alone':>13} "
            f"{'qemu-nbd alone':>15}")
    lines = [head, "-" * len(head)]
    for r in _remote_rows(doc):
        rid, unit = r["id"], r["unit"]
        key = "mbps" if unit == "mbps" else "iops"
        ma, mb, ml = med(doc, rid, RA), med(doc, rid, RB), med(doc, rid, RLOCAL)
        md = med(doc, rid, RDIRECT)

        def thr(m: dict[str, Any] | None, key: str = key) -> str:
            if not m:
                return "-"
            return f"{m[key]:.0f} MB/s" if key == "mbps" else f"{m[key] / 1000:.1f}k"

        def cpu(m: dict[str, Any] | None, unit: str = unit, k: str = "server") -> str:
            v = remote_cpu(m, unit, k)
            return "-" if v is None else f"{v:.2f}" if unit == "mbps" else f"{v:.0f}"

        cu = "s/GB" if unit == "mbps" else "us/op"
        p50 = f"{ma['p50_us']:.0f}/{mb['p50_us']:.0f}" if ma and mb else "-"
        lines.append(
            f"{r['label'].removeprefix('remote child: ')[:38]:38} {thr(ma):>12} {thr(mb):>12} "
            f"{fmt_ratio(ratio(doc, rid, key, RA, RB)):>6} {thr(ml):>12} "
            f"{fmt_ratio(ratio(doc, rid, key, RA, RLOCAL)):>7} {p50:>16} "
            f"{cpu(ma) + '/' + cpu(mb) + ' ' + cu:>20} "
            f"{fmt_ratio(ratio(doc, rid, 'cpu_us_per_op', RA, RB)):>6} "
            f"{cpu(ma, k='remote') + '/' + cpu(mb, k='remote'):>14} "
            f"{thr(med(doc, rid, RALONE)):>13} {thr(md):>15}")
    return "\n".join(lines)


def remote_cpu(m: dict[str, Any] | None, unit: str, who: str = "server") -> float | None:
    """CPU-s/GB (mbps rows) or us/op of the quorum server (who=server) or of qemu-nbd."""
    if not m or m.get(f"{who}_cpu_s") is None or not m.get("ops"):
        return None
    cpu = float(m[f"{who}_cpu_s"])
    return cpu / (m["bytes"] / 1e9) if unit == "mbps" else 1e6 * cpu / m["ops"]


def max_busy(doc: dict[str, Any]) -> float | None:
    """The most the whole machine was busy (cores) over any run of the document."""
    vals = [run.get("machine_busy_cores") for per in doc["results"].values()
            for r in per.values() for run in r["runs"]]
    rs = doc.get("resync") or {}
    vals += [run.get("machine_busy_cores") for v in rs.values() for run in v["runs"]]
    got = [float(v) for v in vals if v is not None]
    return max(got) if got else None


def machine_cost(m: dict[str, Any] | None, unit: str) -> float | None:
    """What a unit of work cost the whole machine: core-s per GB or core-us per op."""
    if not m:
        return None
    v = m.get("machine_s_per_gb" if unit == "mbps" else "machine_us_per_op")
    return None if v is None else float(v)


def remote_bounds(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per remote target with a rate: the rate it asks for, what a unit of the work
    cost the whole machine in this run (every process and the kernel, all cores),
    and so how many cores that rate would keep busy at that cost. A rate that needs
    more cores than the machine has cannot be met without first making the work
    cheaper, whatever the scheduling."""
    out: list[dict[str, Any]] = []
    for r in _remote_rows(doc):
        rid, unit = r["id"], r["unit"]
        key = "mbps" if unit == "mbps" else "iops"
        ma, mb, ml = med(doc, rid, RA), med(doc, rid, RB), med(doc, rid, RLOCAL)
        cost = machine_cost(ma, unit)
        if not ma or cost is None:
            continue
        per = 1e-3 if unit == "mbps" else 1e-6  # MB/s x s/GB, IOPS x us/op -> cores
        for what, base, factor in ((f"{REMOTE_VS_QSD}x qsd", mb, REMOTE_VS_QSD),
                                   (f"{REMOTE_VS_LOCAL}x all-local", ml, REMOTE_VS_LOCAL)):
            if not base:
                continue
            need = factor * float(base[key])
            out.append({"row": rid, "label": label_of(doc, rid), "target": what, "unit": unit,
                        "need": need, "have": float(ma[key]), "cost": cost,
                        "cores": need * cost * per, "busy": ma.get("machine_busy_cores")})
    rs = doc.get("resync")
    if rs:
        m = {k: v["median"] for k, v in rs.items()}
        rc, fc = m["resync"].get("machine_s_per_gb"), m["fio"].get("machine_us_per_op")
        if rc is not None and fc is not None:
            need_r = RESYNC_VS_NBDCOPY * m["nbdcopy"]["mbps"]
            need_f = RESYNC_FIO_KEEPS * m["fio"]["iops"]
            out.append({"row": "resync", "label": "resync under fio",
                        "target": f"{RESYNC_VS_NBDCOPY}x nbdcopy and fio {RESYNC_FIO_KEEPS}x",
                        "unit": "resync", "need": need_r, "need_fio": need_f,
                        "have": m["resync_fio"]["mbps"], "cost": rc, "cost_fio": fc,
                        "cores": need_r * rc * 1e-3 + need_f * fc * 1e-6,
                        "busy": m["resync_fio"].get("machine_busy_cores")})
    return out


def md_bounds(doc: dict[str, Any]) -> list[str]:
    """The bounds table of docs/performance.md's remote section."""
    bounds = remote_bounds(doc)
    if not bounds:
        return []
    top = max_busy(doc)
    cores = doc["meta"].get("cores", "?")
    out = [
        "",
        f"What each target asks of the machine ({cores} cores; the busiest any run above kept "
        f"it: {top:.2f} cores). Machine cost: the CPU time of every process and the kernel, "
        "per unit of nbdquorum's work in its row above; cores needed: the target's rate at "
        "that cost.",
        "",
        "| target | rate needed | nbdquorum had | machine cost | machine busy | cores needed |",
        "|---|---|---|---|---|---|",
    ]
    for b in bounds:
        if b["unit"] == "resync":
            need = f"{b['need']:.0f} MB/s + {b['need_fio'] / 1000:.1f}k IOPS"
            have = f"{b['have']:.0f} MB/s"
            cost = f"{b['cost']:.2f} core-s/GB + {b['cost_fio']:.0f} core-us/op (each alone)"
        elif b["unit"] == "mbps":
            need, have = f"{b['need']:.0f} MB/s", f"{b['have']:.0f} MB/s"
            cost = f"{b['cost']:.2f} core-s/GB"
        else:
            need, have = f"{b['need'] / 1000:.1f}k IOPS", f"{b['have'] / 1000:.1f}k IOPS"
            cost = f"{b['cost']:.0f} core-us/op"
        busy = "-" if b["busy"] is None else f"{b['busy']:.2f}"
        label = str(b["label"]).removeprefix("remote child: ")
        out.append(f"| {label}: {b['target']} | {need} | {have} | {cost} | {busy} | "
                   f"**{b['cores']:.2f}** |")
    return out


def md_remote(doc: dict[str, Any]) -> str:
    """docs/performance.md, "Children on other hosts": the table, resync, verdicts."""
    meta = doc["meta"]
    out = [
        f"Run of {meta['date']} on `{meta['host']}`: {meta['cpu']}, {meta['cores']} cores; "
        f"{meta['fio']}, {meta['qsd']}, {meta.get('qemu_nbd', 'qemu-nbd')}, "
        f"{meta.get('nbdcopy', 'nbdcopy')}; nbdquorum {meta['nbdquorum_commit']}. Images "
        f"{meta['size'] >> 20} MiB on {meta.get('image_fs', '?')}, {meta['runtime_s']:g} s per "
        f"row, {meta['repeat']} run(s) per row and server (median), command: `scripts/bench "
        f"{' '.join(meta['argv'])}`. The remote child: qemu-nbd "
        f"in {meta.get('remote_where', '?')}. {noise_note(doc)}."
        + "".join(f" {'Rows ' + ', '.join(m['rows']) if m['rows'] else 'The resync'} re-run "
                  f"on {m['date']} (`scripts/bench {' '.join(m['argv'])}`, code "
                  f"{m['code_digest']}) and merged." for m in meta.get("merged", [])),
        "",
        "| workload | nbdquorum, 2 local + remote | qsd, 2 local + QEMU nbd child | "
        "nbdquorum, 3 local | nbdq / qsd | nbdq / qsd CPU | remote / local | "
        "qemu-nbd CPU (nbdq, qsd) | nbdquorum, the remote child alone | "
        "qemu-nbd alone (fio straight to it) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in _remote_rows(doc):
        rid, unit = r["id"], r["unit"]
        key = "mbps" if unit == "mbps" else "iops"
        ma, mb, ml = med(doc, rid, RA), med(doc, rid, RB), med(doc, rid, RLOCAL)

        def cell(m: dict[str, Any] | None, unit: str = unit) -> str:
            if not m:
                return ""
            return f"**{fmt_thr(m, unit)}**, {fmt_lat(m)}, {fmt_cpu(m, unit)}"

        def rcpu(m: dict[str, Any] | None, unit: str = unit) -> str:
            v = remote_cpu(m, unit, "remote")
            return "-" if v is None else f"{v:.2f} s/GB" if unit == "mbps" else f"{v:.0f} us/op"

        out.append("| " + " | ".join([
            r["label"].removeprefix("remote child: "), cell(ma), cell(mb), cell(ml),
            fmt_ratio(ratio(doc, rid, key, RA, RB)),
            fmt_ratio(ratio(doc, rid, "cpu_us_per_op", RA, RB)),
            fmt_ratio(ratio(doc, rid, key, RA, RLOCAL)),
            f"{rcpu(ma)}, {rcpu(mb)}",
            cell(med(doc, rid, RALONE)),
            cell(med(doc, rid, RDIRECT))]) + " |")
    rs = doc.get("resync")
    if rs:
        m = {k: v["median"] for k, v in rs.items()}
        out += [
            "",
            f"Resync of the remote child ({int(m['nbdcopy']['bytes']) >> 20} MiB of random data, "
            f"`x-quorum-resync` with `full`, unlimited speed; medians of {m['nbdcopy']['n']}):",
            "",
            "| copy | MB/s | seconds | client |",
            "|---|---|---|---|",
            f"| `nbdcopy --flush` local image -> the remote export | "
            f"**{m['nbdcopy']['mbps']:.0f}** | {m['nbdcopy']['seconds']:.1f} | - |",
            f"| nbdquorum full resync, no client | **{m['resync']['mbps']:.0f}** | "
            f"{m['resync']['seconds']:.1f} | - |",
            f"| nbdquorum full resync, {RESYNC_FIO_LABEL} running | "
            f"**{m['resync_fio']['mbps']:.0f}** | {m['resync_fio']['seconds']:.1f} | "
            f"{m['resync_fio']['fio_iops'] / 1000:.1f}k IOPS during the resync, "
            f"{m['fio']['iops'] / 1000:.1f}k alone |",
        ]
    out += ["", "| target | verdict | measured |", "|---|---|---|"]
    for v in remote_verdicts(doc):
        out.append(f"| {v['target']} | **{v['status']}** | {v['measured']} |")
    out += md_bounds(doc)
    return "\n".join(out)


def text_resync(doc: dict[str, Any]) -> str:
    rs = doc.get("resync")
    if not rs:
        return ""
    m = {k: v["median"] for k, v in rs.items()}
    return "\n".join([
        f"resync of the remote child ({int(m['nbdcopy']['bytes']) >> 20} MiB, medians of "
        f"{m['nbdcopy']['n']}):",
        f"  nbdcopy local -> remote        {m['nbdcopy']['mbps']:7.0f} MB/s "
        f"({m['nbdcopy']['seconds']:.1f} s)",
        f"  nbdquorum full resync, alone   {m['resync']['mbps']:7.0f} MB/s "
        f"({m['resync']['seconds']:.1f} s, {m['resync']['server_cpu_s_per_gb']:.2f} CPU-s/GB)",
        f"  nbdquorum full resync, fio on  {m['resync_fio']['mbps']:7.0f} MB/s "
        f"({m['resync_fio']['seconds']:.1f} s)",
        f"  {RESYNC_FIO_LABEL}: alone {m['fio']['iops']:.0f} IOPS, during the resync "
        f"{m['resync_fio']['fio_iops']:.0f} IOPS",
    ])


def noise_note(doc: dict[str, Any]) -> str:
    """How much CPU other processes took during the runs (a 2-core box is easily disturbed)."""
    vals = [run.get("other_cpu_pct") for per in doc["results"].values() for r in per.values()
            for run in r["runs"]]
    vals = sorted(v for v in vals if v is not None)
    if not vals:
        return ""
    busy = sum(v > 10 for v in vals)
    s = (f"CPU used by other processes during the runs (not this server, not fio): median "
         f"{vals[len(vals) // 2]:.0f}%, max {vals[-1]:.0f}% of one core; "
         f"{busy}/{len(vals)} runs above 10%")
    if doc["meta"].get("code_changed_during_run"):
        s += "; WARNING: nbdquorum's code changed during the run"
    return s


def text_report(doc: dict[str, Any]) -> str:
    """Every table that has rows, then the verdicts."""
    parts = []
    if _ordered_rows(doc):
        parts.append(text_table(doc))
    if _remote_rows(doc):
        parts.append(text_remote_table(doc))
    if doc.get("resync"):
        parts.append(text_resync(doc))
    if remote_bounds(doc):
        parts.append(text_bounds(doc))
    return "\n\n".join([*parts, text_verdicts(doc)])


def text_bounds(doc: dict[str, Any]) -> str:
    """Per remote target: the rate asked, and the cores it would keep busy at the cost
    per unit this run measured (every process and the kernel)."""
    top = max_busy(doc)
    lines = [f"what each remote target asks of the machine ({doc['meta'].get('cores', '?')} "
             f"cores; busiest run: {top:.2f}):"]
    for b in remote_bounds(doc):
        label = str(b["label"]).removeprefix("remote child: ")
        lines.append(f"  {label + ': ' + b['target']:52} needs {b['cores']:5.2f} cores "
                     f"(had {b['have']:.0f}, needs {b['need']:.0f})")
    return "\n".join(lines)


def text_verdicts(doc: dict[str, Any]) -> str:
    lines = [noise_note(doc), "verdicts (nbdquorum vs qsd, same run):"]
    for v in doc["verdicts"]:
        lines.append(f"  {v['status']:4}  {v['target']}: {v['measured']}")
    n = collections.Counter(v["status"] for v in doc["verdicts"])
    lines.append(f"  -- {n['PASS']} PASS, {n['FAIL']} FAIL, {n['SKIP']} SKIP")
    return "\n".join(lines)


def md_table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    extras = _extras(doc)
    out = [
        f"Run of {meta['date']} on `{meta['host']}`: {meta['cpu']}, {meta['cores']} cores, "
        f"{meta['mem_gib']} GiB, {meta['os']}, Linux {meta['kernel']}; {meta['fio']}, "
        f"{meta['qsd']}, nbdquorum {meta['nbdquorum_commit']}. Images "
        f"{meta['size'] >> 20} MiB, {meta['runtime_s']:g} s per row, "
        f"{meta['repeat']} run(s) per row and server (median), "
        f"command: `scripts/bench {' '.join(meta['argv'])}`, images on "
        f"{meta.get('image_fs', '?')}. {noise_note(doc)}.",
        "",
    ]
    for m in meta.get("merged", []):
        out[-2] += (f" Rows {', '.join(m['rows'])} re-run on {m['date']} "
                    f"(`scripts/bench {' '.join(m['argv'])}`) and merged.")
    cols = ["workload", "nbdquorum", "qsd quorum of 3", "nbdq / qsd throughput",
            "nbdq / qsd CPU per op"] + [SHORT.get(e, e) for e in extras]
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in _ordered_rows(doc):
        rid, unit = r["id"], r["unit"]
        key = "mbps" if unit == "mbps" else "iops"

        def cell(m: dict[str, Any] | None, unit: str = unit, rid: str = rid) -> str:
            if not m:
                return ""
            s = f"**{fmt_thr(m, unit)}**, {fmt_lat(m)}, {fmt_cpu(m, unit)}"
            if rid.startswith("memory-"):
                s += f", peak RSS {m['vmhwm_mib']:.0f} MiB"
            return s

        out.append("| " + " | ".join(
            [r["label"], cell(med(doc, rid, A)), cell(med(doc, rid, B)),
             fmt_ratio(ratio(doc, rid, key)), fmt_ratio(ratio(doc, rid, "cpu_us_per_op"))]
            + [(fmt_thr(m, unit) if (m := med(doc, rid, e)) else "") for e in extras]) + " |")
    out += ["", "| target | verdict | measured |", "|---|---|---|"]
    for v in doc["verdicts"]:
        out.append(f"| {v['target']} | **{v['status']}** | {v['measured']} |")
    return "\n".join(out)


BEGIN, END = "<!-- bench:begin (scripts/bench --write-docs) -->", "<!-- bench:end -->"
RBEGIN = "<!-- bench-remote:begin (scripts/bench --remote --write-docs) -->"
REND = "<!-- bench-remote:end -->"


def write_docs(doc: dict[str, Any], md: Path, png: Path) -> None:
    if _remote_rows(doc) or doc.get("resync"):
        write_remote_docs(doc, md, png.with_name(png.stem + "-remote" + png.suffix))
    if _ordered_rows(doc):
        write_main_docs(doc, md, png)


def write_remote_docs(doc: dict[str, Any], md: Path, png: Path) -> None:
    """The block under "Children on other hosts" (the section is made if missing)."""
    chart_ok = bool(_remote_rows(doc)) and chart(doc, png, remote=True)
    block = md_remote(doc)
    if chart_ok:
        block += f"\n\n![nbdquorum vs qsd with a remote child, side by side]({png.name})"
    text = md.read_text() if md.exists() else "# Performance\n\n"
    new = f"{RBEGIN}\n{block}\n{REND}"
    if RBEGIN in text and REND in text:
        text = text[: text.index(RBEGIN)] + new + text[text.index(REND) + len(REND):]
    else:
        text = text.rstrip("\n") + "\n\n## Children on other hosts\n\n" + new + "\n"
    md.write_text(text)
    print(f"bench: wrote {md}" + (f" and {png}" if chart_ok else ""))


def write_main_docs(doc: dict[str, Any], md: Path, png: Path) -> None:
    chart_ok = chart(doc, png)
    block = md_table(doc)
    if chart_ok:
        block += f"\n\n![nbdquorum vs qsd, side by side]({png.name})"
    text = md.read_text() if md.exists() else "# Performance\n\n"
    new = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + new + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + new + "\n"
    md.write_text(text)
    print(f"bench: wrote {md}" + (f" and {png}" if chart_ok else ""))


# -- the chart -----------------------------------------------------------------
COLORS = {"nbdq": "#1f77b4", "qsd": "#d62728", "qsd-fifo": "#ff9896", "qsd-raw": "#c7c7c7",
          "nbdkit": "#98df8a", "nbdq-fifo": "#aec7e8", "nbdq-remote": "#9467bd",
          "qsd-remote": "#d62728", "remote-direct": "#98df8a", "nbdq-remote-alone": "#c5b0d5"}


#: the throughput axis is logarithmic (base 2), so 0.5x, 2x, 5x and 8x are all
#: readable; bars start at XMIN (a ratio of 1/16: nothing measured comes near it)
XMIN = 1 / 16


def chart(doc: dict[str, Any], png: Path, remote: bool = False) -> bool:
    """The chart: throughput relative to qsd, CPU per op, peak RSS.  ``remote``: the
    remote-child rows (nbdquorum and qsd with the remote child, nbdquorum all-local)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib not installed (.venv/bin/pip install matplotlib): no chart")
        return False
    ta, tb = (RA, RB) if remote else (A, B)
    rows = [r for r in (_remote_rows(doc) if remote else _ordered_rows(doc))
            if med(doc, r["id"], ta) and med(doc, r["id"], tb)]
    if not rows:
        return False
    tids = [t["id"] for t in doc["targets"]]
    if remote:
        tids = [RA, RB, RLOCAL, RALONE, RDIRECT]
    tids = [ta, tb] + [t for t in tids if t not in (ta, tb) and (remote or t not in (RA, RB))]
    nbars = [len([t for t in tids if med(doc, r["id"], t)]) for r in rows]
    fig, axes = plt.subplots(
        1, 3, figsize=(16, 0.9 + 0.26 * sum(max(n, 2) + 1 for n in nbars)),
        gridspec_kw={"width_ratios": [3, 2, 1.3]}, sharey=True)
    ylabels, yticks = [], []
    labelled: set[str] = set()
    y0 = 0.0
    for r in rows:
        rid, unit = r["id"], r["unit"]
        key = "mbps" if unit == "mbps" else "iops"
        mb = med(doc, rid, tb)
        assert mb
        present = [t for t in tids if med(doc, rid, t)]
        h = 0.8
        ys = [y0 + k for k in range(len(present))]
        yticks.append(y0 + (len(present) - 1) / 2)
        ylabels.append(r["label"].removeprefix("remote child: "))
        for t, y in zip(present, ys, strict=True):
            m = med(doc, rid, t)
            assert m
            kw = {"color": COLORS.get(t, "grey"), "height": h,
                  "label": None if t in labelled else (
                      "nbdquorum, 3 local" if remote and t == RLOCAL else SHORT.get(t, t))}
            labelled.add(t)
            rt = m[key] / mb[key] if mb[key] else 0.0
            rt = max(rt, XMIN)
            axes[0].barh(y, rt - XMIN, left=XMIN, **kw)
            txt = fmt_thr(m, unit) + (f"  ({rt:.2f}x)" if t == ta else "")
            axes[0].text(rt, y, " " + txt, va="center", fontsize=7,
                         fontweight="bold" if t == ta else None)
            if t in (ta, tb) and m.get("cpu_us_per_op") and mb.get("cpu_us_per_op"):
                rc = m["cpu_us_per_op"] / mb["cpu_us_per_op"]
                axes[1].barh(y, rc, **kw)
                axes[1].text(rc, y, " " + fmt_cpu(m, unit) + (f"  ({rc:.2f}x)" if t == ta else ""),
                             va="center", fontsize=7)
            if t in (ta, tb):
                axes[2].barh(y, m["vmhwm_mib"], **kw)
                axes[2].text(m["vmhwm_mib"], y, f" {m['vmhwm_mib']:.0f}", va="center",
                             fontsize=7)
        bound = REMOTE_VS_QSD if remote else next(
            (b for row, _, b in THROUGHPUT_TARGETS if row == rid), None)
        if bound:
            axes[0].plot([bound, bound], [ys[0] - 0.5, ys[-1] + 0.5], color="black", lw=2)
        y0 += len(present) + 1
    axes[0].plot([], [], color="black", lw=2, label="target")
    for ax in axes[:2]:
        ax.axvline(1.0, color="grey", ls=":", lw=1)
    axes[0].set_yticks(yticks, ylabels)
    axes[0].invert_yaxis()
    axes[0].set_xlabel(f"throughput relative to {SHORT[tb]}, log scale (higher is better)")
    axes[1].set_xlabel("server CPU per op (= per GB) relative to qsd (lower is better)")
    axes[2].set_xlabel("server peak RSS, MiB (VmHWM)")
    axes[2].axvline(RSS_BUDGET_MIB, color="black", lw=1, ls="--")
    axes[2].text(RSS_BUDGET_MIB, -1, " budget", fontsize=7, va="bottom")
    top = max(4.0, *(p.get_x() + p.get_width() for p in axes[0].patches))
    axes[0].set_xscale("log", base=2)
    ends = [p.get_x() + p.get_width() for p in axes[0].patches]
    lo = max(XMIN, min([0.25, *ends]) / 1.2)
    axes[0].set_xlim(lo, top * 3.5)  # room for the value labels right of the bars
    ticks = [2.0 ** k for k in range(math.ceil(math.log2(lo)), 1 + int(math.log2(top * 3.5)))]
    axes[0].set_xticks(ticks, [f"{t:g}x" for t in ticks])
    axes[1].set_xlim(0, max(1.5, *ax_max(axes[1])) * 1.55)
    axes[2].set_xlim(0, max(RSS_BUDGET_MIB, *ax_max(axes[2])) * 1.3)
    axes[0].legend(loc="best", fontsize=8)
    meta = doc["meta"]
    what = ("a quorum of 2 local files + 1 remote child (qemu-nbd over TCP)" if remote
            else "quorum")
    fig.suptitle(f"nbdquorum vs qemu-storage-daemon, {what}, over NBD (fio nbd engine), "
                 f"{meta['date'][:10]}, {meta['cores']} cores {meta['cpu']}, "
                 f"{meta['size'] >> 20} MiB images, {meta['runtime_s']:g} s per row", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def ax_max(ax: Any) -> list[float]:
    return [p.get_width() for p in ax.patches] or [1.0]


# -- profiles ------------------------------------------------------------------
_FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short_frame(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    f = m.group("file")
    f = f.split("site-packages/")[-1].split("/lib/python3.11/")[-1].split("/work/main/")[-1]
    return f"{m.group('fn')} ({f})"


def _classify(frames: list[str]) -> str:
    """idle (pool worker waiting for work, loop in epoll), gil (waiting for the GIL), or cpu."""
    joined = ";".join(frames)
    leaf = frames[-1] if frames else ""
    if "pthread_cond_timedwait" in joined or "take_gil" in joined:
        return "gil"  # 3.11's GIL waits in pthread_cond_timedwait (drop_gil/take_gil)
    if "_queue_SimpleQueue_get" in joined or "epoll_wait" in leaf or leaf.startswith(
            ("select (selectors.py", "epoll_wait")):
        return "idle"
    return "cpu"


def summarise_pyspy(path: Path, top: int = 18) -> list[str]:
    """Shares per function from py-spy's raw (collapsed) stacks, idle and GIL waits apart."""
    kinds: collections.Counter[tuple[str, str]] = collections.Counter()  # (thread, kind)
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    gil_after: collections.Counter[str] = collections.Counter()
    total = cpu = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "main"
        if frames and frames[0].startswith("thread ("):
            thread = "main" if "MainThread" in frames[0] else "pool"
            frames = frames[1:]
        frames = [_short_frame(f) for f in frames]
        kind = _classify(frames)
        kinds[thread, kind] += n
        total += n
        if kind == "gil":
            # the Python-level call that released the GIL and now waits to get it back
            py = [f for f in frames if ".py)" in f]
            gil_after[f"{thread}: {py[-1] if py else '?'}"] += n
        if kind != "cpu":
            continue
        cpu += n
        self_c[f"{thread}: {frames[-1]}"] += n
        for f in set(frames):
            if ".py)" in f:
                incl[f"{thread}: {f}"] += n
    if not total:
        return [f"{path.name}: no samples"]
    out = [f"{path.name}: {total} samples over all threads; by thread and state: "
           + ", ".join(f"{t} {k} {100 * c / total:.0f}%" for (t, k), c in sorted(kinds.items()))]
    out.append("  waiting for the GIL, after (thread: last Python frame):")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in gil_after.most_common(6)]
    out.append(f"  on-CPU self time ({cpu} samples = 100%):")
    out += [f"    {100 * c / cpu:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out.append("  on-CPU inclusive time of Python functions:")
    out += [f"    {100 * c / cpu:5.1f}%  {f}" for f, c in incl.most_common(top + 12)]
    return out


def summarise_perf(path: Path, top: int = 30) -> list[str]:
    try:
        r = subprocess.run(
            ["perf", "report", "-i", str(path), "--no-children", "--sort", "dso,sym", "--stdio",
             "--percent-limit", "0.5", "-g", "none"],
            capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return [f"{path.name}: perf report failed: {err}"]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
    return [f"{path.name}: perf self time by dso/symbol"] + [f"    {ln.strip()}" for ln in
                                                            lines[:top]]


def profile_summaries(pdir: Path) -> list[str]:
    out: list[str] = []
    for p in sorted(pdir.glob("*.pyspy.txt")):
        out += [*summarise_pyspy(p), ""]
    for p in sorted(pdir.glob("*.perf.data")):
        out += [*summarise_perf(p), ""]
    (pdir / "summary.txt").write_text("\n".join(out) + "\n")
    return [*out, f"bench: profile summaries in {pdir / 'summary.txt'}"]


def main() -> int:
    ap = argparse.ArgumentParser(description="re-render a scripts/bench results file")
    ap.add_argument("results", nargs="?", default=str(ROOT / "bench-out" / "results.json"))
    ap.add_argument("--write-docs", action="store_true")
    ap.add_argument("--profile-dir", help="summarise py-spy/perf profiles in this dir")
    ap.add_argument("--chart", help="only draw the chart to this PNG")
    args = ap.parse_args()
    if args.profile_dir:
        print("\n".join(profile_summaries(Path(args.profile_dir))))
        return 0
    doc = json.loads(Path(args.results).read_text())
    doc["verdicts"] = verdicts(doc)
    if args.chart:
        return 0 if chart(doc, Path(args.chart)) else 1
    print(text_report(doc))
    if args.write_docs:
        write_docs(doc, ROOT / "docs" / "performance.md", ROOT / "docs" / "performance.png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
