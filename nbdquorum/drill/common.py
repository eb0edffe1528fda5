"""What every part of the drill shares: its constants, errors, layout and small helpers."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

KiB: Final = 1 << 10
MiB: Final = 1 << 20
EXPORT: Final = "disk"
CHILDREN: Final = ("a", "b", "c")
NEW_CHILD: Final = "b2"
DEFAULT_SIZE: Final = 64 * MiB
MIN_SIZE: Final = 1 * MiB
MIN_FS_SIZE: Final = 4 * MiB  # ext4 needs a few MiB for its metadata and a journal
DEFAULT_TIMEOUT: Final = 300.0
#: server options: quick to fault a child, quick to notice a deleted image
SERVER_OPTIONS: Final = ("--max-errors", "5", "--child-timeout", "2", "--health-interval", "0.2")
#: the child timeout of the remote scenarios' servers: a silent link is given up after it
REMOTE_CHILD_TIMEOUT: Final = 3.0
#: the remote scenarios' server options (no fault injector: the faults are real)
REMOTE_SERVER_OPTIONS: Final = ("--max-errors", "5", "--child-timeout",
                                f"{REMOTE_CHILD_TIMEOUT:g}", "--health-interval", "0.2")
#: how long the drill waits for a broken child to be faulted before it repairs
STATE_SETTLE: Final = 1.0
DETECT_EVENTS: Final = ("QUORUM_REPORT_BAD", "QUORUM_CHILD_STATE_CHANGE")

#: the client's first full read after the fault (the table's READ-BACK column)
READ_BACK: Final = "read (degraded)"

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


class DrillError(Exception):
    """A step of a scenario failed; the message goes into the report."""


class ClientHung(DrillError):
    """A client operation did not finish within --timeout: the scenario stops there."""


@dataclass
class Layout:
    size: int
    fs_size: int  # 0: no filesystem

    @property
    def data_offset(self) -> int:
        return self.fs_size

    @property
    def data_size(self) -> int:
        return self.size - self.fs_size

    @property
    def degraded_offset(self) -> int:
        """Where the writes made while b is broken start (the data region's second half)."""
        return self.data_offset + self.data_size // 2

    @property
    def degraded_size(self) -> int:
        return self.size - self.degraded_offset


@dataclass
class Config:
    layout: Layout
    seed: int
    timeout: float
    fs_reason: str | None  # why there is no filesystem part
    qemu_img: str
    no_netns: bool = False  # host-loss: a killed server even where namespaces work


def sh(argv: Sequence[str | os.PathLike[str]], *, timeout: float,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool and capture its output; a timeout is returned as exit code -9."""
    args = [str(a) for a in argv]
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              check=False, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else ""
        return subprocess.CompletedProcess(args, -9, out, f"timed out after {timeout:g}s")
    except OSError as err:
        return subprocess.CompletedProcess(args, 127, "", f"{args[0]}: {err.strerror or err}")


def last_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The tool's last meaningful line of output (mount's dmesg hint is not one)."""
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
             if ln.strip() and "dmesg(1)" not in ln]
    return lines[-1] if lines else f"exit code {proc.returncode}"


def human(n: float) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB else f"{n / KiB:.0f} KiB"


def event_time(ev: dict[str, Any]) -> float:
    ts = ev.get("timestamp") or {}
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def fs_support() -> str | None:
    """None when the filesystem part can run, else why not."""
    if os.geteuid() != 0:
        return "not root (loop devices and mounts need root)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    for tool in ("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def image_json(file: dict[str, Any], offset: int, size: int) -> str:
    """A qemu ``json:`` filename for a byte range of an image (raw driver's offset/size)."""
    return "json:" + json.dumps({"driver": "raw", "offset": offset, "size": size, "file": file})


def nbd_file(sock: Path) -> dict[str, Any]:
    return {"driver": "nbd", "server": {"type": "unix", "path": str(sock)}, "export": EXPORT}


def host_file(path: Path) -> dict[str, Any]:
    return {"driver": "file", "filename": str(path)}


def random_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def fs_files(seed: int, fs_size: int) -> dict[str, bytes]:
    """The files the drill puts in the filesystem: about a third of it, a few sizes."""
    rng = random.Random(seed ^ 0x5EED)
    files: dict[str, bytes] = {"README": b"nbdquorum drill: if you can read this, the repair worked\n"}
    for i in range(4):
        files[f"data/blob{i}.bin"] = rng.randbytes(max(fs_size // 16, 4 * KiB) + i * 4097)
    for i in range(16):
        files[f"small/file{i:02}.txt"] = rng.randbytes(rng.randrange(1, 32 * KiB))
    return files
