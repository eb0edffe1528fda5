"""Harness of the repair interop tests: resync, scrub, faulty children, restarts.

The repair scenarios need what the other harnesses do not offer together: a server
that can be restarted (or killed) on the same state dir with a different command
line, a QMP client that collects events in the background while the test drives NBD
clients, and fio with verify.

* :class:`Nbdq` is one ``python -m nbdquorum serve`` process with an NBD socket, a
  QMP socket and a log file that survives restarts (``start()`` again after
  ``stop()``/``kill9()``); its ``EVENT {json}`` stderr lines are the server's own
  record of every event, unthrottled.
* :class:`Qmp` is qemu.qmp's ``QMPClient`` (the client QEMU's tests use) running on
  an event loop in a background thread, with a blocking interface: ``cmd()``,
  ``error()``, and events collected as they arrive (``wait_event()``).
* the ``nbdq`` fixture starts servers and reaps them: SIGTERM, exit code 0, no
  traceback in the log.

Nothing sleeps to synchronize: every wait polls a condition with a deadline.  Under
``CI=true`` a missing tool fails the test instead of skipping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.ci import unavailable
from tests.interop.qmp_fixtures import can_connect

from .qmp_fixtures import (
    corrupt,
    make_image,
    missing,
    nbdquorum_env,
    qemu_io,
    require,
    require_qemu_qmp,
    run,
    wait_until,
)

MiB = 1 << 20
KiB = 1 << 10
SIZE = 16 * MiB
REGION = MiB  # the server's resync/scrub/write-intent region
QUORUM = "quorum0"
START_TIMEOUT = 30.0
TIMEOUT = 20.0

__all__ = [
    "QUORUM",
    "REGION",
    "SIZE",
    "KiB",
    "MiB",
    "Nbdq",
    "Qmp",
    "StartNbdq",
    "corrupt",
    "fio_randwrite",
    "fio_result",
    "make_image",
    "nbdq_fixture",
    "qemu_io",
    "require",
    "same_files",
    "sha256",
    "wait_until",
]


# --------------------------------------------------------------------------- QMP client


class Qmp:
    """qemu.qmp's QMPClient on a private event loop thread, with a blocking interface.

    Events are collected from the moment of connection, so a test can issue a command
    and then look for the events it caused, whatever the order of arrival.
    """

    def __init__(self, path: Path, name: str = "repair-test") -> None:
        require_qemu_qmp()
        from qemu.qmp import QMPClient

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.client = QMPClient(name)
        self.events: list[dict[str, Any]] = []
        self.cond = threading.Condition()
        self._pump_task: Any = None
        self._call(self._connect(path))

    def _call(self, coro: Any, timeout: float = TIMEOUT) -> Any:
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self.loop)
        return fut.result(timeout + 5)

    async def _connect(self, path: Path) -> None:
        await self.client.connect(str(path))
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        async for ev in self.client.events:
            with self.cond:
                self.events.append({"event": ev["event"], "data": dict(ev.get("data", {})),
                                    "timestamp": dict(ev["timestamp"]),
                                    "received": time.monotonic()})
                self.cond.notify_all()

    # ----- commands

    def cmd(self, name: str, **arguments: Any) -> Any:
        """Execute a command that must succeed (``_`` in keywords becomes ``-``)."""
        args = {k.replace("_", "-"): v for k, v in arguments.items()}
        return self._call(self.client.execute(name, args or None))

    def error(self, name: str, **arguments: Any) -> tuple[str, str]:
        """(class, desc) of a command that must fail."""
        from qemu.qmp import ExecuteError

        try:
            result = self.cmd(name, **arguments)
        except ExecuteError as err:
            return err.error_class, err.error.error.desc
        raise AssertionError(f"{name} {arguments} succeeded: {result}")

    def status(self) -> dict[str, Any]:
        (st,) = self.cmd("query-quorum-status", node_name=QUORUM)
        return dict(st)

    def children(self) -> list[dict[str, Any]]:
        return list(self.status()["children"])

    def child(self, node_name: str) -> dict[str, Any]:
        found = [c for c in self.children() if c["node-name"] == node_name]
        assert found, f"{node_name} is not a child: {self.children()}"
        return found[0]

    def state(self, node_name: str) -> str:
        return str(self.child(node_name)["state"])

    def job(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in self.cmd("query-jobs") if j["id"] == job_id), None)

    def add_child(self, name: str, path: Path) -> None:
        """blockdev-add (raw over file) + x-blockdev-child-add, as ``ctl add`` does."""
        self.cmd("blockdev-add", driver="raw", node_name=name,
                 file={"driver": "file", "filename": str(path)})
        self.cmd("x-blockdev-child-add", parent=QUORUM, child=name)

    def remove_child(self, name: str) -> None:
        self.cmd("x-blockdev-child-del", parent=QUORUM, child=name)
        self.cmd("blockdev-del", node_name=name)

    def faulty(self, node_name: str, *rules: dict[str, Any]) -> None:
        self.cmd("x-faulty-set", node_name=node_name, rules=list(rules))

    # ----- events

    def select(self, name: str, since: int = 0, **data: Any) -> list[dict[str, Any]]:
        want = {k.replace("_", "-"): v for k, v in data.items()}
        with self.cond:
            evs = list(self.events[since:])
        return [e for e in evs
                if e["event"] == name and all(e["data"].get(k) == v for k, v in want.items())]

    def mark(self) -> int:
        """An index into the events: ``select(..., since=mark)`` sees only later ones."""
        with self.cond:
            return len(self.events)

    def wait_event(self, name: str, timeout: float = TIMEOUT, since: int = 0,
                   **data: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = self.select(name, since, **data)
                if found:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(e["event"], e["data"]) for e in self.events[since:]][-30:]
                    raise AssertionError(f"no {name} {data} within {timeout}s; got {names}")
                self.cond.wait(min(left, 0.5))

    def job_statuses(self, job_id: str, since: int = 0) -> list[str]:
        return [e["data"]["status"] for e in self.select("JOB_STATUS_CHANGE", since, id=job_id)]

    def close(self) -> None:
        async def bye() -> None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
            if self._pump_task is not None:
                self._pump_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._pump_task

        with contextlib.suppress(Exception):
            self._call(bye(), 10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# --------------------------------------------------------------------------- server


class Nbdq:
    """One nbdquorum server that can be stopped, killed and started again.

    ``children`` are ``(node-name, path)`` pairs passed as ``--child NAME=PATH``
    (an empty list passes none: the state dir's membership is used).
    """

    def __init__(self, work: Path, children: Sequence[tuple[str, Path]], *,
                 state: bool = True, extra: Sequence[str] = ()) -> None:
        self.work = work
        self.children = list(children)
        self.state_dir: Path | None = work / "state" if state else None
        self.extra = list(extra)
        self.log_path = work / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        self._log_start = 0  # offset of this run's first byte in the log
        self.qmps: list[Qmp] = []

    @property
    def nbd(self) -> Path:
        return self.work / "nbd.sock"

    @property
    def control(self) -> Path:
        return self.work / "qmp.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.nbd}"

    @property
    def images(self) -> list[Path]:
        return [p for _, p in self.children]

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "nbdquorum", "serve"]
        for name, path in self.children:
            argv += ["--child", f"{name}={path}"]
        argv += ["--socket", str(self.nbd), "--control", str(self.control)]
        if self.state_dir is not None:
            argv += ["--state-dir", str(self.state_dir)]
        return argv + self.extra

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process without waiting for it (for start-up failures)."""
        with contextlib.suppress(FileNotFoundError):
            self._log_start = self.log_path.stat().st_size
        for sock in (self.nbd, self.control):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=self.work,
                                         env=nbdquorum_env())
        self.returncode = None
        return self.proc

    def start(self) -> Nbdq:
        proc = self.launch()

        def up() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"nbdquorum exited with {proc.returncode} at start:\n{self.log()}",
                            pytrace=False)
            # "serving" is logged right after the SIGTERM handler is installed
            return "serving " in self.log() and can_connect(self.nbd) and can_connect(
                self.control)

        wait_until(up, START_TIMEOUT, "nbdquorum to serve")
        return self

    def qmp(self) -> Qmp:
        q = Qmp(self.control)
        self.qmps.append(q)
        return q

    def _close_qmps(self) -> None:
        for q in self.qmps:
            q.close()
        self.qmps.clear()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit; returns the exit code (idempotent)."""
        if self.proc is None:
            return 0
        if self.returncode is None:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.returncode = self.proc.returncode
                self._close_qmps()
                pytest.fail(f"nbdquorum did not exit within {timeout}s of signal {sig}:\n"
                            f"{self.log()[-3000:]}", pytrace=False)
        self._close_qmps()
        return self.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.returncode = self.proc.wait(TIMEOUT)
        self._close_qmps()

    def log(self, whole: bool = False) -> str:
        try:
            with open(self.log_path, "rb") as f:
                if not whole:
                    f.seek(self._log_start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_events(self, name: str | None = None, whole: bool = False,
                   **data: Any) -> list[dict[str, Any]]:
        """The ``EVENT`` lines of this run (or of every run), parsed."""
        want = {k.replace("_", "-"): v for k, v in data.items()}
        out = []
        for line in self.log(whole).splitlines():
            if not line.startswith("EVENT "):
                continue
            ev = json.loads(line[6:])
            if (name is None or ev["event"] == name) and all(
                    ev["data"].get(k) == v for k, v in want.items()):
                out.append(ev)
        return out

    def state_json(self) -> dict[str, Any]:
        assert self.state_dir is not None
        data = json.loads((self.state_dir / "state.json").read_text())
        assert isinstance(data, dict)
        return data


StartNbdq = Callable[..., Nbdq]


@pytest.fixture(name="nbdq")
def nbdq_fixture(tmp_path: Path) -> Iterator[StartNbdq]:
    """Factory: ``nbdq(children=3, size=SIZE, state=True, extra=[...])`` → a started ``Nbdq``.

    Images are ``cI.raw`` in a short work dir (Unix socket paths hold 107 bytes);
    ``names`` overrides the node-names (default child0..). ``start=False`` returns the
    server unstarted.  Teardown stops every server that is still running and requires
    exit code 0 and no traceback in its log.
    """
    started: list[Nbdq] = []

    def start(*, children: int = 3, size: int = SIZE, state: bool = True,
              extra: Sequence[str] = (), names: Sequence[str] | None = None,
              images: Sequence[Path] | None = None, run: bool = True) -> Nbdq:
        work = tmp_path / f"s{len(started)}"
        work.mkdir()
        if images is None:
            images = [make_image(work / f"c{i}.raw", size) for i in range(children)]
        if names is None:
            names = [f"child{i}" for i in range(len(images))]
        srv = Nbdq(work, list(zip(names, images, strict=True)), state=state, extra=extra)
        started.append(srv)
        return srv.start() if run else srv

    yield start

    problems = []
    for srv in started:
        if srv.proc is None:
            continue
        if srv.alive():
            code = srv.stop()
            if code != 0:
                problems.append(f"nbdquorum exited with {code}:\n{srv.log()[-3000:]}")
        srv._close_qmps()
        if "Traceback" in srv.log(whole=True):
            problems.append(f"traceback in nbdquorum's log:\n{srv.log(whole=True)[-5000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------- files, fio


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def same_files(paths: Sequence[Path]) -> None:
    """Every image is byte-identical to the first (with the first differing offset)."""
    ref = paths[0].read_bytes()
    for p in paths[1:]:
        data = p.read_bytes()
        if data != ref:
            first = next((i for i, (a, b) in enumerate(zip(ref, data, strict=False))
                          if a != b), min(len(ref), len(data)))
            raise AssertionError(f"{p.name} differs from {paths[0].name} at byte {first} "
                                 f"(sizes {len(ref)}, {len(data)})")


def fio_randwrite(uri: str, cwd: Path, size: int, *extra: str,
                  name: str = "repair") -> subprocess.Popen[bytes]:
    """fio's nbd engine: random 4k writes over ``size`` bytes, crc32c-verified as it goes."""
    argv = [require("fio"), f"--name={name}", "--ioengine=nbd", f"--uri={uri}",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size}",
            "--verify=crc32c", "--verify_fatal=1", "--verify_backlog=256",
            "--verify_state_save=0", "--output-format=json", *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd)


def fio_result(proc: subprocess.Popen[bytes], timeout: float = 120.0) -> dict[str, Any]:
    """Wait for fio; it must exit 0 with no error. Returns its job's JSON."""
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"fio failed ({proc.returncode}):\n{err.decode()}\n{text[-3000:]}"
    job = json.loads(text[text.index("{"):])["jobs"][0]  # fio may print notes first
    assert job["error"] == 0, job
    return dict(job)


def require_fuse() -> None:
    """nbdfuse needs /dev/fuse and fusermount3 (a skip on a laptop, a failure in CI)."""
    if not os.path.exists("/dev/fuse"):
        unavailable("/dev/fuse does not exist: FUSE is unavailable in this environment")
    for tool in ("nbdfuse", "fusermount3", "nbdkit"):
        require(tool)
    if run([require("nbdkit"), "--filter=error", "null", "--dump-plugin"]).returncode != 0:
        missing("nbdkit's error filter is not installed")
