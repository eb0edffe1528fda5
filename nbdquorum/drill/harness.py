"""The server harness: ``nbdquorum serve`` as a subprocess, a QMP event watcher, a reading
client; and the filesystem part (nbdfuse, a loop device, ext4)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbdquorum.ctl import CtlError, QMPClient
from nbdquorum.drill.common import (
    EXPORT,
    SERVER_OPTIONS,
    Config,
    DrillError,
    fs_files,
    last_line,
    sh,
)


class Server:
    """``python -m nbdquorum serve`` as a subprocess, in its own session.

    ``images`` maps each child's name to its image file or its NBD URI; ``options`` are
    the server's tuning options; ``fault_injection`` puts each child behind a fault
    injector (``x-faulty-set``).  ``start()`` may be called again after ``stop()``: the
    same command line, the same state dir (a restart).
    """

    def __init__(self, work: Path, sock_dir: Path, images: Mapping[str, Path | str], *,
                 options: Sequence[str] = SERVER_OPTIONS, fault_injection: bool = True) -> None:
        self.work = work
        self.sock = sock_dir / "nbd.sock"
        self.control = sock_dir / "qmp.sock"
        self.log_path = work / "server.log"
        self.images = dict(images)
        self.options = tuple(options)
        self.fault_injection = fault_injection
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "nbdquorum", "serve"]
        if self.fault_injection:
            argv.append("--fault-injection")
        for name, path in self.images.items():
            argv += ["--child", f"{name}={path}"]
        argv += ["--socket", str(self.sock), "--control", str(self.control),
                 "--state-dir", str(self.work / "state"), *self.options]
        return argv

    def uri(self) -> str:
        return f"nbd+unix:///{EXPORT}?socket={self.sock}"

    def start(self, timeout: float) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # the directory that holds nbdquorum/
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


@dataclass
class Pass:
    """One write pass of a Writer: wall-clock start and end, which source, its outcome."""

    start: float
    end: float
    source: int
    ok: bool
    error: str = ""

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Writer(threading.Thread):
    """A client that writes one region again and again until told to stop, each pass
    from the next of ``argvs`` in turn (different data every pass), each pass timed
    (wall clock, to compare with the server's event timestamps).

    A pass that fails is a client error; one that takes longer than ``timeout`` is a
    hung client and ends the loop.  ``current`` is (index, start) of the pass running.
    """

    def __init__(self, argvs: list[list[str]], nbytes: int, timeout: float) -> None:
        super().__init__(name="drill-writer", daemon=True)
        self.argvs = argvs
        self.nbytes = nbytes
        self.timeout = timeout
        self.stop = threading.Event()
        self.passes: list[Pass] = []
        self.current: tuple[int, float] | None = None
        self.hung = False
        self.cond = threading.Condition()
        self.proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            source = n % len(self.argvs)
            start = time.time()
            with self.cond:
                self.current = (n, start)
                self.cond.notify_all()
            proc = self.proc = subprocess.Popen(
                self.argvs[source], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
            try:
                out, _ = proc.communicate(timeout=self.timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                out, _ = proc.communicate()
                rc = -9
            error = ""
            if rc != 0:
                done = subprocess.CompletedProcess(self.argvs[source], rc, out or "", "")
                error = (last_line(done) if rc != -9
                         else f"timed out after {self.timeout:g}s")
            with self.cond:
                self.passes.append(Pass(start, time.time(), source, rc == 0, error))
                self.current = None
                self.cond.notify_all()
            n += 1
            if rc == -9:
                self.hung = True
                break

    def wait(self, pred: Callable[[list[Pass]], bool], timeout: float) -> bool:
        """Wait (bounded) until ``pred(passes)`` holds; False if it did not, or the
        writer stopped."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.passes):
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return pred(self.passes)
                self.cond.wait(min(left, 0.5))
            return True

    def wait_started(self, after: int, timeout: float) -> tuple[int, float] | None:
        """Wait (bounded) for pass number ``after`` or a later one to be running."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                cur = self.current
                if cur is not None and cur[0] >= after:
                    return cur
                left = deadline - time.monotonic()
                if left <= 0 or not self.is_alive():
                    return None
                self.cond.wait(min(left, 0.5))

    def errors(self) -> list[str]:
        with self.cond:
            return [p.error for p in self.passes if not p.ok]

    def rate(self, start: float, end: float) -> tuple[float | None, int]:
        """MiB/s of the passes that ran wholly within [start, end] (wall clock): their
        bytes over their time; and how many they were."""
        with self.cond:
            inside = [p for p in self.passes if p.ok and p.start >= start and p.end <= end]
        took = sum(p.seconds for p in inside)
        if not inside or took <= 0:
            return None, len(inside)
        return self.nbytes * len(inside) / (1 << 20) / took, len(inside)

    def finish(self) -> None:
        self.stop.set()
        self.join(self.timeout + 10)

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
