"""``nbdquorum drill``: practise the 3 a.m. repair on scratch images.

For each failure scenario the drill starts a real server (a subprocess with
three children ``a``, ``b``, ``c`` behind fault injectors), writes known data
through NBD (seeded random bytes with ``qemu-img convert``, and where FUSE and
loop devices work, a real ext4 filesystem made through ``nbdfuse`` and a loop
device), breaks child ``b`` in one way, keeps using the disk as a client
would, watches the QMP events, replaces ``b`` live with a new image ``b2``
(what ``nbdquorum ctl replace b b2=PATH`` does), waits for the resync, and
verifies every byte: through the export, on each child file, and in the
filesystem (checksums and ``e2fsck``).

Disk layout: with the filesystem, ext4 fills the first half of the disk and the
random data the second half; without it (``--no-fs``, or no FUSE/loop) the
random data fills the whole disk.  The random region is written in two parts:
all of it before the fault, then its second half again (other bytes) while
``b`` is broken, so the repair must carry writes the broken child never saw.

Exit codes: 0 every scenario verified with zero client errors, 1 a scenario
failed, 2 usage (or a required tool is missing).

The scenarios with children on other hosts (``host-loss``, ``rolling``; not in
the default run) have their own shape: see remote.py.

The package: this module (the command: its parser and run), scenarios.py (the
failures and one scenario's run), remote.py (the runs of the remote scenarios),
netns.py (another host: a network namespace, a qemu-nbd export), harness.py
(the server subprocess, the QMP event watcher, the reading and writing
clients, the filesystem part), report.py (results and the tables), common.py
(constants, errors, helpers).  The drill talks to
the server only as a client does (NBD tools, ``ctl``'s QMP client): it starts
``python -m nbdquorum serve`` as a subprocess and imports none of its code.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from nbdquorum.drill.common import (
    DEFAULT_SIZE,
    DEFAULT_TIMEOUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    MIN_FS_SIZE,
    MIN_SIZE,
    Config,
    KiB,
    Layout,
    fs_support,
    human,
    random_bytes,
)
from nbdquorum.drill.remote import HostLossRun, RollingRun
from nbdquorum.drill.report import Progress, Result, format_report
from nbdquorum.drill.scenarios import SCENARIOS, Run

#: which run does each kind of scenario
RUNS: dict[str, type[Run]] = {"replace": Run, "host-loss": HostLossRun, "rolling": RollingRun}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``drill`` on the main parser's subcommands."""
    from nbdquorum.runtime import parse_size

    names = ", ".join(f"{s.name} ({s.what})" for s in SCENARIOS.values())
    p = sub.add_parser(
        "drill", help="practise disk failures and live repairs on scratch images",
        description="Serve scratch images, write known data (and an ext4 filesystem where "
                    "FUSE and loop devices work), fail child b, replace it live, verify "
                    "every byte, and report time to detect, time to repair, resync speed "
                    "and client errors. Exit 0 only if every scenario verified with no "
                    f"client error. Scenarios: {names}.")
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                   help="run this scenario (repeat; default: every scenario but "
                        "quorum-loss, host-loss and rolling)")
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                   help="size of each scratch image (default 64M)")
    p.add_argument("--dir", metavar="DIR", help="make the scratch directory in DIR "
                   "(default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (images, server logs)")
    p.add_argument("--no-fs", action="store_true",
                   help="skip the filesystem part (nbdfuse, loop device, ext4)")
    p.add_argument("--no-netns", action="store_true",
                   help="host-loss: lose the remote host by killing its server, even where "
                        "a network namespace could make its link go silent")
    p.add_argument("--seed", type=int, default=1, help="seed of the known data (default 1)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help=f"for each step (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--json", action="store_true",
                   help="print the report as JSON on stdout (progress stays on stderr)")


def _usage(msg: str) -> int:
    print(f"nbdquorum drill: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _leftover_mounts(base: Path) -> list[str]:
    return [str(p) for p in base.glob("*/*") if p.is_dir() and os.path.ismount(p)]


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """Run ``nbdquorum drill``; returns the exit code."""
    names = args.scenario or [s.name for s in SCENARIOS.values() if s.default]
    names = list(dict.fromkeys(names))
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        return _usage("qemu-img is not installed (it writes and compares the data)")
    size = int(args.size)
    if size < MIN_SIZE or size % (64 * KiB):
        return _usage(f"--size must be a multiple of 64 KiB and at least {human(MIN_SIZE)}")
    fs_reason = "--no-fs" if args.no_fs else fs_support()
    fs_size = 0
    if fs_reason is None:
        fs_size = size // 2 // (64 * KiB) * (64 * KiB)
        if fs_size < MIN_FS_SIZE:
            fs_reason, fs_size = f"--size below {human(2 * MIN_FS_SIZE)}", 0
    if args.dir and not os.path.isdir(args.dir):
        # the drill makes (and removes) its scratch directory inside DIR, never DIR itself
        what = "not a directory" if os.path.exists(args.dir) else "no such directory"
        return _usage(f"--dir {args.dir}: {what} (give an existing directory, or leave "
                      "--dir out for the system's temporary directory)")
    cfg = Config(Layout(size, fs_size), args.seed, args.timeout, fs_reason, qemu_img,
                 no_netns=args.no_netns)
    progress = Progress()
    try:
        base = Path(tempfile.mkdtemp(prefix="nbdquorum-drill-", dir=args.dir))
    except OSError as err:
        return _usage(f"cannot make a scratch directory in {args.dir or tempfile.gettempdir()}: "
                      f"{err.strerror or err}")
    old_term = signal.signal(signal.SIGTERM, _sigterm)
    results: list[Result] = []
    t0 = time.monotonic()
    try:
        progress(f"scratch directory {base}; scenarios: {', '.join(names)}; "
                 + ("filesystem: yes" if fs_size else f"filesystem: no ({fs_reason})"))
        srcs = make_sources(base, cfg)
        for name in names:
            sc = SCENARIOS[name]
            results.append(RUNS[sc.kind](sc, base, cfg, srcs, progress).run())
    except KeyboardInterrupt:
        progress("interrupted: cleaning up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
        left = _leftover_mounts(base)
        if args.keep or left:
            if left:
                progress(f"WARNING: still mounted, not removing {base}: {left}")
            else:
                progress(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    ok = bool(results) and all(r.verified for r in results)
    if args.json:
        report = {
            "ok": ok, "size": size, "filesystem": bool(fs_size), "filesystem_size": fs_size,
            "filesystem_skipped": fs_reason if not fs_size else None,
            "data_offset": cfg.layout.data_offset, "data_size": cfg.layout.data_size,
            "seed": cfg.seed, "directory": str(base) if args.keep else None,
            "seconds": round(time.monotonic() - t0, 3),
            "scenarios": [r.to_json() for r in results],
        }
        print(json.dumps(report, indent=2))
    else:
        sys.stdout.write(format_report(results, cfg))
    return EXIT_OK if ok else EXIT_FAILED


def make_sources(base: Path, cfg: Config) -> dict[str, Path]:
    """The known data: before the fault, written while degraded, and what must be read.

    ``degraded2`` is a second version of the degraded half (the remote scenarios write
    the two in turn), ``expect2`` the data region once it is written last; ``static``
    is the half that is written only before the fault.
    """
    lay = cfg.layout
    before = random_bytes(cfg.seed, lay.data_size)
    degraded = random_bytes(cfg.seed + 1_000_003, lay.degraded_size)
    degraded2 = random_bytes(cfg.seed + 2_000_003, lay.degraded_size)
    paths = {name: base / f"src-{name}.bin"
             for name in ("before", "degraded", "expect", "degraded2", "expect2", "static")}
    split = lay.degraded_offset - lay.data_offset
    paths["before"].write_bytes(before)
    paths["degraded"].write_bytes(degraded)
    paths["expect"].write_bytes(before[:split] + degraded)
    paths["degraded2"].write_bytes(degraded2)
    paths["expect2"].write_bytes(before[:split] + degraded2)
    paths["static"].write_bytes(before[:split])
    return paths
