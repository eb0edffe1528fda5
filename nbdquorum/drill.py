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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final

from nbdquorum import ctl
from nbdquorum.ctl import CtlError, QMPClient, QMPReplyError

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


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    name: str
    what: str  # what it simulates, for --help, the report and docs/drills.md
    failed: tuple[str, ...] = ("b",)  # the children it breaks
    qmp_rules: tuple[dict[str, Any], ...] = ()  # x-faulty-set rules, if any
    default: bool = True  # part of the default run


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
    )
}


# --------------------------------------------------------------------------- configuration


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


# --------------------------------------------------------------------------- helpers


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


# --------------------------------------------------------------------------- processes


class Server:
    """``python -m nbdquorum serve`` as a subprocess, in its own session."""

    def __init__(self, work: Path, sock_dir: Path, images: dict[str, Path]) -> None:
        self.work = work
        self.sock = sock_dir / "nbd.sock"
        self.control = sock_dir / "qmp.sock"
        self.log_path = work / "server.log"
        self.images = images
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "nbdquorum", "serve", "--fault-injection"]
        for name, path in self.images.items():
            argv += ["--child", f"{name}={path}"]
        argv += ["--socket", str(self.sock), "--control", str(self.control),
                 "--state-dir", str(self.work / "state"), *SERVER_OPTIONS]
        return argv

    def uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def start(self, timeout: float) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DrillError(f"the server exited with {self.proc.returncode} at start-up: "
                                 f"{self.log_tail()}")
            if self.sock.exists() and self.control.exists():
                try:
                    QMPClient(str(self.control), 5.0).close()
                    return
                except CtlError:
                    pass
            time.sleep(0.05)
        raise DrillError(f"the server did not start within {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (a clean stop flushes every child), then SIGKILL; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class EventWatch:
    """A second QMP connection that records every event, on a thread."""

    def __init__(self, control: Path,
                 show: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.client = QMPClient(str(control))
        self.show = show
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="drill-events", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.client.follow():
                with self.cond:
                    self.events.append(ev)
                    self.cond.notify_all()
                if self.show is not None:
                    self.show(ev)
        except CtlError:
            pass  # the connection closed: the server stopped, or close() below

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        with self.cond:
            return next((ev for ev in self.events if pred(ev)), None)

    def wait_for(self, pred: Callable[[dict[str, Any]], bool],
                 timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ev = next((e for e in self.events if pred(e)), None)
                left = deadline - time.monotonic()
                if ev is not None or left <= 0 or not self.thread.is_alive():
                    return ev
                self.cond.wait(min(left, 0.5))

    def close(self) -> None:
        try:
            self.client.sock.shutdown(2)  # SHUT_RDWR: wakes the reader thread
        except OSError:
            pass
        self.thread.join(5)
        self.client.close()


class Reader(threading.Thread):
    """A client that reads the whole data region again and again until told to stop.

    It runs while a child is replaced, so the resync and the removal happen under
    client reads; at least one full pass is made.
    """

    def __init__(self, argv: list[str], timeout: float) -> None:
        super().__init__(name="drill-reader", daemon=True)
        self.argv = argv
        self.timeout = timeout
        self.stop = threading.Event()
        self.passes = 0
        self.errors: list[str] = []
        self.hung = False
        self.seconds = 0.0
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        t = time.monotonic()
        try:
            while True:
                proc = self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, text=True)
                try:
                    out, _ = proc.communicate(timeout=self.timeout)
                    rc = proc.returncode
                except subprocess.TimeoutExpired:
                    proc.kill()
                    out, _ = proc.communicate()
                    rc = -9
                self.passes += 1
                if rc != 0:
                    done = subprocess.CompletedProcess(self.argv, rc, out or "", "")
                    self.errors.append(last_line(done) if rc != -9 else
                                       f"timed out after {self.timeout:g}s")
                    self.hung = rc == -9
                    if self.hung:
                        break
                if self.stop.is_set():
                    break
        finally:
            self.seconds = time.monotonic() - t

    def finish(self) -> None:
        self.stop.set()
        self.join()

    def kill(self) -> None:
        self.stop.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        self.join(10)


# --------------------------------------------------------------------------- filesystem


@contextmanager
def fuse_loop(work: Path, uri: str, fs_size: int, *, read_only: bool,
              timeout: float) -> Iterator[str]:
    """nbdfuse exposes the export as a file, losetup a loop device on its first fs_size bytes.

    Yields the loop device.  Everything is undone on the way out, even after a failure:
    the loop device is detached, the FUSE mount unmounted (lazily if it is busy) and
    nbdfuse stopped.
    """
    fusedir = work / ("fuse-ro" if read_only else "fuse")
    fusedir.mkdir(exist_ok=True)
    pidfile = work / "nbdfuse.pid"
    pidfile.unlink(missing_ok=True)
    argv = ["nbdfuse", *(["-r"] if read_only else []), "-P", str(pidfile),
            str(fusedir / "disk"), uri]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    loop: str | None = None
    try:
        deadline = time.monotonic() + timeout
        while not (pidfile.exists() and os.path.ismount(fusedir)):
            if proc.poll() not in (None, 0) or time.monotonic() > deadline:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise DrillError(f"nbdfuse did not mount {fusedir}: {out.strip() or 'timeout'}")
            time.sleep(0.02)
        lo = sh(["losetup", "--find", "--show", *(["--read-only"] if read_only else []),
                 "--offset", "0", "--sizelimit", str(fs_size), fusedir / "disk"],
                timeout=timeout)
        if lo.returncode != 0:
            raise DrillError(f"losetup failed: {last_line(lo)}")
        loop = lo.stdout.strip()
        yield loop
    finally:
        if loop:
            for _ in range(50):  # the kernel may hold the device a moment after umount
                if sh(["losetup", "-d", loop], timeout=30).returncode == 0:
                    break
                time.sleep(0.1)
        if (os.path.ismount(fusedir)
                and sh(["fusermount3", "-u", fusedir], timeout=30).returncode != 0):
            sh(["fusermount3", "-u", "-z", fusedir], timeout=30)
        _stop_nbdfuse(proc, pidfile)


def _stop_nbdfuse(proc: subprocess.Popen[bytes], pidfile: Path) -> None:
    """nbdfuse exits once unmounted; make sure it is gone (and reaped).

    nbdfuse 1.14 stays in the foreground, so ``proc`` is nbdfuse itself; a
    version that forks writes another pid to the pidfile, which is waited for
    (and stopped) too.
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = 0
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if pid and pid != proc.pid:
        deadline = time.monotonic() + 10
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGTERM)
                break
            time.sleep(0.05)
    if proc.stdout is not None:
        proc.stdout.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (someone else's unreaped child) is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def mounted(dev: str, mnt: Path, *, read_only: bool, timeout: float) -> Iterator[Path]:
    mnt.mkdir(exist_ok=True)
    opts = ["-o", "ro,noload"] if read_only else []
    proc = sh(["mount", "-t", "ext4", *opts, dev, mnt], timeout=timeout)
    if proc.returncode != 0:
        raise DrillError(f"mount {dev} failed: {last_line(proc)}")
    try:
        yield mnt
    finally:
        if sh(["umount", mnt], timeout=timeout).returncode != 0:
            sh(["umount", "-l", mnt], timeout=timeout)


def make_fs(work: Path, uri: str, cfg: Config) -> dict[str, str]:
    """mkfs.ext4 through nbdfuse + loop, copy the files in; returns {path: sha256}."""
    size, t = cfg.layout.fs_size, cfg.timeout
    sums: dict[str, str] = {}
    with fuse_loop(work, uri, size, read_only=False, timeout=t) as dev:
        mk = sh(["mkfs.ext4", "-q", "-F", "-L", "drill", "-E",
                 "nodiscard,lazy_itable_init=0,lazy_journal_init=0", dev], timeout=t)
        if mk.returncode != 0:
            raise DrillError(f"mkfs.ext4 failed: {last_line(mk)}")
        with mounted(dev, work / "mnt", read_only=False, timeout=t) as mnt:
            for rel, data in fs_files(cfg.seed, size).items():
                path = mnt / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                sums[rel] = hashlib.sha256(data).hexdigest()
        os.sync()
    return sums


def check_fs(work: Path, uri: str, cfg: Config, sums: dict[str, str]) -> list[str]:
    """Read-only through nbdfuse + loop: e2fsck -fn, then every file's sha256."""
    t = cfg.timeout
    problems: list[str] = []
    with fuse_loop(work, uri, cfg.layout.fs_size, read_only=True, timeout=t) as dev:
        fsck = sh(["e2fsck", "-fn", dev], timeout=t)
        if fsck.returncode != 0:
            problems.append(f"e2fsck -fn through the export: exit {fsck.returncode}: "
                            f"{last_line(fsck)}")
        try:
            with mounted(dev, work / "mnt", read_only=True, timeout=t) as mnt:
                problems += check_files(mnt, sums)
        except DrillError as err:  # mount failed
            problems.append(str(err))
    return problems


def check_files(mnt: Path, sums: dict[str, str]) -> list[str]:
    problems: list[str] = []
    found = {str(p.relative_to(mnt)) for p in mnt.rglob("*")
             if p.is_file() and "lost+found" not in p.parts}
    for rel, want in sums.items():
        try:
            got = hashlib.sha256((mnt / rel).read_bytes()).hexdigest()
        except OSError as err:
            problems.append(f"fs: {rel}: {err.strerror or err}")
            continue
        if got != want:
            problems.append(f"fs: {rel}: sha256 {got[:16]}... != {want[:16]}...")
    extra = sorted(found - set(sums))
    if extra:
        problems.append(f"fs: unexpected files {extra[:5]}")
    return problems


# --------------------------------------------------------------------------- a scenario


class Run:
    """One scenario, start to finish."""

    def __init__(self, sc: Scenario, base: Path, cfg: Config, srcs: dict[str, Path],
                 progress: Progress) -> None:
        self.sc = sc
        self.cfg = cfg
        self.srcs = srcs
        self.res = Result(sc.name, sc.what)
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


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- command


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
                   help="run this scenario (repeat; default: every scenario but quorum-loss)")
    p.add_argument("--size", type=parse_size, default=DEFAULT_SIZE,
                   help="size of each scratch image (default 64M)")
    p.add_argument("--dir", metavar="DIR", help="make the scratch directory in DIR "
                   "(default: the system's temporary directory)")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (images, server logs)")
    p.add_argument("--no-fs", action="store_true",
                   help="skip the filesystem part (nbdfuse, loop device, ext4)")
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
    cfg = Config(Layout(size, fs_size), args.seed, args.timeout, fs_reason, qemu_img)
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
            results.append(Run(SCENARIOS[name], base, cfg, srcs, progress).run())
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
    """The known data: before the fault, written while degraded, and what must be read."""
    lay = cfg.layout
    before = random_bytes(cfg.seed, lay.data_size)
    degraded = random_bytes(cfg.seed + 1_000_003, lay.degraded_size)
    paths = {"before": base / "src-before.bin", "degraded": base / "src-degraded.bin",
             "expect": base / "src-expect.bin"}
    paths["before"].write_bytes(before)
    paths["degraded"].write_bytes(degraded)
    split = lay.degraded_offset - lay.data_offset
    paths["expect"].write_bytes(before[:split] + degraded)
    return paths
