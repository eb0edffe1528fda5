"""Time ``ctl replace`` of a child of a quorum of big sparse images holding little data.

    .venv/bin/python scripts/bench_thin.py                 4 TiB images, 1 MiB of data
    .venv/bin/python scripts/bench_thin.py --size 1T --limit 30
    .venv/bin/python scripts/bench_thin.py --size 1G --fill    the dense case

Three sparse images of ``--size`` (truncate) in ``--dir`` get 1 MiB of data at four
offsets through the quorum (qemu-io); then ``nbdquorum ctl replace child2 child3=NEW``
onto a new sparse image.  Prints the replace's time and the allocation (st_blocks*512)
of every image.  A replace still running after ``--limit`` seconds is stopped: the
report then gives the bytes the resync had copied and allocated so far.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_arg(text: str) -> int:
    if text and text[-1].upper() in UNITS:
        return int(text[:-1]) * UNITS[text[-1].upper()]
    return int(text)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=size_arg, default=4 << 40, help="image size (default 4T)")
    ap.add_argument("--limit", type=float, default=120.0, help="stop the replace after SECONDS")
    ap.add_argument("--dir", type=Path, default=None, help="where the images go")
    ap.add_argument("--fill", action="store_true",
                    help="write data over the whole size first (the dense case: no zero to skip)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="thin-", dir=args.dir))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    py = sys.executable
    images = [work / f"c{i}.raw" for i in range(3)]
    new = work / "new.raw"
    for p in [*images, new]:
        with open(p, "wb") as f:
            f.truncate(args.size)
    sock, ctl_sock, log = work / "nbd.sock", work / "qmp.sock", work / "server.log"
    argv = [py, "-m", "nbdquorum", "serve", "--socket", str(sock), "--control", str(ctl_sock)]
    for i, p in enumerate(images):
        argv += ["--child", f"child{i}={p}"]
    with open(log, "wb") as lf:
        srv = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=lf, env=env)
    try:
        deadline = time.monotonic() + 30
        while "serving " not in log.read_text(errors="replace"):
            if time.monotonic() > deadline or srv.poll() is not None:
                print(log.read_text(), file=sys.stderr)
                return 1
            time.sleep(0.05)
        uri = f"nbd+unix:///disk?socket={sock}"
        offsets = [0, args.size // 3 // 65536 * 65536, args.size // 2, args.size - (256 << 10)]
        cmds = []
        for n, off in enumerate(offsets):
            cmds += ["-c", f"write -P {0x11 * (n + 1)} {off} 256k"]
        if args.fill:
            cmds = ["-c", f"write -P 90 0 {args.size}"]
        subprocess.run(["qemu-io", "-f", "raw", *cmds, "-c", "flush", uri], check=True,
                       stdout=subprocess.DEVNULL)
        t0 = time.monotonic()
        try:
            done = subprocess.run(
                [py, "-m", "nbdquorum", "ctl", "--control", str(ctl_sock), "replace", "child2",
                 f"child3={new}"], env=env, timeout=args.limit, capture_output=True, text=True)
            ok = done.returncode == 0
            out = (done.stdout + done.stderr).strip()
        except subprocess.TimeoutExpired:
            ok, out = False, f"still running after {args.limit:.0f} s: stopped"
        elapsed = time.monotonic() - t0
        status = subprocess.run(
            [py, "-m", "nbdquorum", "ctl", "--control", str(ctl_sock), "status", "--json"],
            env=env, capture_output=True, text=True, check=False)
        report = {
            "size": args.size,
            "replace-ok": ok,
            "replace-seconds": round(elapsed, 2),
            "output": out,
            "allocated": {p.name: allocated(p) for p in [*images, new]},
        }
        try:
            for ch in json.loads(status.stdout)[0]["children"]:
                if ch.get("node-name") == "child3" and "unsynced-bytes" in ch:
                    report["child3-unsynced-bytes"] = ch["unsynced-bytes"]
        except (ValueError, LookupError, TypeError):
            pass
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    finally:
        srv.terminate()
        srv.wait(30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
