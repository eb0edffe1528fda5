"""Fixtures and helpers of the QMP interop tests (kept apart from conftest.py).

``qmp_target`` (import ``qmp_target_fixture`` to use it) starts either server behind a QMP socket, from the same scenario:

* ``nbdquorum``: ``python -m nbdquorum serve --child childN=IMG ... --socket S --control Q``
* ``qsd``: qemu-storage-daemon with file -> raw -> quorum nodes, an NBD export and a QMP
  monitor on a chardev socket (which serves one client at a time).

Both expose the quorum ``quorum0`` over children ``child0..N-1`` at
``nbd+unix:///disk?socket=S``.  QMP is spoken through the ``qemu.qmp`` library's
``QMPClient`` (the client QEMU's own tests use) or, for malformed input, a raw
socket.  Under ``CI=true`` a missing tool fails the test instead of skipping it.
Nothing here sleeps to synchronize: every wait polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ci import unavailable

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
SIZE = 16 * MiB
QUORUM = "quorum0"
TARGETS = ("nbdquorum", "qsd")
START_TIMEOUT = 30.0
TIMEOUT = 15.0

#: parametrize a scenario over both servers
both_targets = pytest.mark.parametrize("target", TARGETS)


def nbdquorum_only(reason: str) -> Any:
    """Parametrize over both servers; the qsd run is expected to fail (strict xfail)."""
    return pytest.mark.parametrize("target", [
        "nbdquorum",
        pytest.param("qsd", marks=pytest.mark.xfail(strict=True, reason=reason)),
    ])


# --------------------------------------------------------------------------- tools


missing = unavailable


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        missing(f"{tool} is not installed")
    assert path is not None
    return path


def require_qemu_qmp() -> None:
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        missing("the qemu.qmp package is not installed (pip install -e '.[test]')")


def run(argv: Sequence[str | os.PathLike[str]], *, timeout: float = 120.0,
        input: bytes | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout,
                          input=input, env=env, check=False)
    return subprocess.CompletedProcess(proc.args, proc.returncode,
                                       proc.stdout.decode(errors="replace"),
                                       proc.stderr.decode(errors="replace"))


def nbdquorum_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ctl(control: Path, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``python -m nbdquorum ctl --control Q ARGS`` to completion."""
    return run([sys.executable, "-m", "nbdquorum", "ctl", "--control", control, *args],
               timeout=timeout, env=nbdquorum_env())


def qemu_io(uri: str, *commands: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv: list[str] = [require("qemu-io"), "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    proc = run([*argv, uri])
    if check:
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0 and "failed" not in text, (
            f"qemu-io {list(commands)} failed (rc={proc.returncode}):\n{text}")
    return proc


def make_image(path: Path, size: int = SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def corrupt(path: Path, offset: int, length: int, byte: int) -> None:
    """Overwrite part of a child image behind the server's back, with dd."""
    proc = run([require("dd"), f"of={path}", f"bs={length}", "count=1", f"seek={offset}",
                "oflag=seek_bytes", "iflag=fullblock", "conv=notrunc", "status=none"],
               input=bytes([byte]) * length)
    assert proc.returncode == 0, proc.stderr


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(interval)


def can_connect(path: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


# --------------------------------------------------------------------------- servers


@dataclass
class Target:
    """A running server with a quorum of raw children, an NBD export and a QMP socket."""

    kind: str  # "nbdquorum" or "qsd"
    tmp: Path
    images: list[Path]
    names: list[str]
    vote_threshold: int
    extra: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    returncode: int | None = None

    @property
    def nbd(self) -> Path:
        return self.tmp / "nbd.sock"

    @property
    def qmp(self) -> Path:
        return self.tmp / "qmp.sock"

    @property
    def stderr_path(self) -> Path:
        return self.tmp / f"{self.kind}.stderr"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.nbd}"

    def argv(self) -> list[str]:
        if self.kind == "nbdquorum":
            argv = [sys.executable, "-m", "nbdquorum", "serve"]
            for name, path in zip(self.names, self.images, strict=True):
                argv += ["--child", f"{name}={path}"]
            return [*argv, "--vote-threshold", str(self.vote_threshold), "--socket",
                    str(self.nbd), "--control", str(self.qmp), *self.extra]
        argv = [require("qemu-storage-daemon")]
        for i, (name, path) in enumerate(zip(self.names, self.images, strict=True)):
            argv += ["--blockdev", f"driver=file,node-name=f{i},filename={path}",
                     "--blockdev", f"driver=raw,node-name={name},file=f{i}"]
        quorum = {"driver": "quorum", "node-name": QUORUM, "vote-threshold": self.vote_threshold,
                  "children": self.names}
        if "--rewrite-corrupted" in self.extra:
            quorum["rewrite-corrupted"] = True
        return [*argv, "--blockdev", json.dumps(quorum),
                "--nbd-server", f"addr.type=unix,addr.path={self.nbd}",
                "--export", f"type=nbd,id=e0,node-name={QUORUM},name=disk,writable=on",
                "--chardev", f"socket,id=m0,path={self.qmp},server=on,wait=off",
                "--monitor", "chardev=m0"]

    def start(self) -> Target:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(), stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
                cwd=self.tmp, env=nbdquorum_env() if self.kind == "nbdquorum" else None)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"{self.kind} exited with {self.proc.returncode} at start:\n"
                            f"{self.stderr()}", pytrace=False)
            # qsd's monitor serves one client at a time: only check that its socket exists
            return can_connect(self.nbd) and self.qmp.exists()

        wait_until(up, START_TIMEOUT, f"{self.kind} to listen")
        if self.kind == "nbdquorum":
            # serve() installs its SIGTERM handler right after logging "serving", without
            # yielding to the event loop; a greeting read after that line has been written
            # therefore proves the handler is in place (a SIGTERM any earlier kills the
            # process with -15 instead of a clean stop).
            wait_until(lambda: "serving " in self.stderr(), START_TIMEOUT, "the serving line")
            probe = RawQMP(self.qmp, negotiate=False)
            probe.close()
        return self

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        assert self.proc is not None
        self.returncode = self.proc.wait(timeout=timeout)
        return self.returncode

    def stop(self) -> int:
        if self.returncode is not None or self.proc is None:
            return self.returncode or 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait_exit(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"{self.kind} did not exit on SIGTERM:\n{self.stderr()}", pytrace=False)
            raise

    def child_events(self) -> list[dict[str, Any]]:
        """nbdquorum's ``EVENT {json}`` stderr lines (every event, unthrottled)."""
        out = []
        for line in self.stderr().splitlines():
            if line.startswith("EVENT "):
                out.append(json.loads(line[6:]))
        return out


StartTarget = Callable[..., Target]


@pytest.fixture(name="qmp_target")
def qmp_target_fixture(tmp_path: Path) -> Iterator[StartTarget]:
    """Factory: ``qmp_target(kind, children=3, vote_threshold=2, size=SIZE, extra=[])``."""
    require_qemu_qmp()
    started: list[Target] = []

    def start(kind: str = "nbdquorum", *, children: int = 3, vote_threshold: int = 2,
              size: int = SIZE, extra: Sequence[str] = ()) -> Target:
        if kind == "qsd":
            require("qemu-storage-daemon")
        # short paths: sun_path holds 107 bytes
        work = tmp_path / f"{kind[0]}{len(started)}"
        work.mkdir()
        images = [make_image(work / f"c{i}.raw", size) for i in range(children)]
        t = Target(kind, work, images, [f"child{i}" for i in range(children)], vote_threshold,
                   list(extra))
        started.append(t)
        return t.start()

    yield start

    problems = []
    for t in started:
        if t.proc is None:
            continue
        code = t.stop()
        if code != 0:
            problems.append(f"{t.kind} exited with {code}:\n{t.stderr()}")
        elif t.kind == "nbdquorum" and "Traceback" in t.stderr():
            problems.append(f"traceback in nbdquorum's stderr:\n{t.stderr()}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


# --------------------------------------------------------------------------- QMP clients


def arun(coro: Any, timeout: float = 120.0) -> Any:
    """Run an async scenario to completion in a fresh, debug-mode event loop."""
    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    try:
        return loop.run_until_complete(guarded())
    finally:
        loop.close()


@contextlib.asynccontextmanager
async def qmp_client(path: Path, name: str = "test") -> AsyncIterator[Any]:
    """qemu.qmp's QMPClient, connected and negotiated."""
    from qemu.qmp import QMPClient

    qmp = QMPClient(name)
    await asyncio.wait_for(qmp.connect(str(path)), TIMEOUT)
    try:
        yield qmp
    finally:
        # after quit the server hangs up first; qemu.qmp reports that as EOFError
        with contextlib.suppress(EOFError):
            await qmp.disconnect()


async def execute(qmp: Any, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
    return await asyncio.wait_for(qmp.execute(cmd, arguments), TIMEOUT)


async def error_of(qmp: Any, cmd: str, arguments: dict[str, Any] | None = None
                   ) -> tuple[str, str]:
    """(class, desc) of a command that must fail."""
    from qemu.qmp import ExecuteError

    try:
        result = await execute(qmp, cmd, arguments)
    except ExecuteError as err:
        return err.error_class, err.error.error.desc
    raise AssertionError(f"{cmd} {arguments} succeeded: {result}")


async def next_event(qmp: Any, name: str, within: float = TIMEOUT,
                     **data: Any) -> dict[str, Any]:
    """The next event called ``name`` whose data has the given members (``_`` for ``-``)."""
    want = {k.replace("_", "-"): v for k, v in data.items()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = deadline - loop.time()
        if left <= 0:
            raise AssertionError(f"no {name} {want} within {within}s")
        ev = await asyncio.wait_for(qmp.events.get(), left)
        if ev["event"] == name and all(ev["data"].get(k) == v for k, v in want.items()):
            return dict(ev)


async def graph_state(qmp: Any) -> Any:
    """What a refused command must leave unchanged: nodes, and the quorum's members."""
    nodes = await execute(qmp, "query-named-block-nodes", {"flat": True})
    return sorted((n["node-name"], n["drv"], n.get("file")) for n in nodes
                  if not n["node-name"].startswith("#"))


class RawQMP:
    """A raw socket to the monitor, for input no well-behaved client would send."""

    def __init__(self, path: Path, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.greeting = self.recv()
        if negotiate:
            self.send(b'{"execute": "qmp_capabilities"}\n')
            assert self.reply() == {"return": {}}

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the server closed the connection"
        assert line.endswith(b"\r\n"), line
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def reply(self) -> dict[str, Any]:
        while True:
            msg = self.recv()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()


def shape(value: Any) -> Any:
    """The JSON shape of a value: keys and types, not contents."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "str"
