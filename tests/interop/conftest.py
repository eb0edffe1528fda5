"""Harness for the interop tests: real NBD clients against a real server process.

Every test owns a temporary directory with its images, sockets and server logs. Two kinds
of server can be started from the same scenario:

* ``nbdquorum``: ``python -m nbdquorum serve`` as a subprocess. Its events are the
  ``EVENT {json}`` lines it writes on stderr.
* ``qsd``: qemu-storage-daemon with a quorum node over raw children, the reference
  implementation. Its events come from its QMP monitor socket.

Both expose the same ``Server`` interface (``uri()``, ``events()``, ``wait_event()``,
``final_events()``, ``stop()``), so a scenario is written once and parametrized over
``target``. Servers are reaped in teardown: SIGTERM, wait, and the exit code must be 0.
"""

from __future__ import annotations

import errno
import filecmp
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.ci import unavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
DIST_PACKAGES = "/usr/lib/python3/dist-packages"

MiB = 1024 * 1024
IMAGE_SIZE = 16 * MiB
QUORUM_NODE = "quorum0"
EXPORT = "disk"
TARGETS = ("nbdquorum", "qsd", "nbdquorum-workers")
#: nbdquorum with worker processes that take every connection (reads voted in the
#: worker, everything else forwarded to the primary): the same scenarios must hold
WORKER_ARGS = ("--workers", "2", "--workers-take-all")
EIO_TEXT = os.strerror(errno.EIO)  # "Input/output error", as qemu-io prints it

# Start-up and shutdown budgets. Generous: CI machines have 2 cores and run other jobs.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
EVENT_TIMEOUT = 10.0
CLIENT_TIMEOUT = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


# --------------------------------------------------------------------------- tools


_missing = unavailable


def require(tool: str) -> str:
    """Return the path of an external tool, or skip/fail the test if it is missing."""
    path = shutil.which(tool)
    if path is None:
        _missing(f"{tool} is not installed")
    assert path is not None
    return path


def require_libnbd() -> Any:
    """Import the libnbd Python bindings (Debian's python3-libnbd)."""
    if DIST_PACKAGES not in sys.path:
        sys.path.append(DIST_PACKAGES)
    try:
        import nbd
    except ImportError:
        _missing("the libnbd Python module (python3-libnbd) is not installed")
    return nbd


def nbdsh_command() -> tuple[list[str], dict[str, str]]:
    """argv prefix and environment to run nbdsh with this interpreter.

    /usr/bin/nbdsh runs ``python3 -m nbd`` from PATH, which may be an interpreter that
    cannot import Debian's module; run the module with the test interpreter instead.
    """
    require("nbdsh")
    require_libnbd()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), DIST_PACKAGES) if p)
    return [sys.executable, "-m", "nbd"], env


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = CLIENT_TIMEOUT,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a client, capture text output; never raises on a non-zero exit."""
    proc = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        timeout=timeout,
        env=env,
        input=input,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def qemu_io(
    uri: str, *commands: str, read_only: bool = False, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``qemu-io -f raw -c CMD ... URI``. With check, every command must succeed."""
    argv = [require("qemu-io"), "-f", "raw"]
    if read_only:
        argv.append("-r")
    for c in commands:
        argv += ["-c", c]
    argv.append(uri)
    proc = run(argv)
    if check:
        text = output(proc)
        assert proc.returncode == 0 and "failed" not in text and "error" not in text.lower(), (
            f"qemu-io {list(commands)} on {uri} failed (rc={proc.returncode}):\n{text}"
        )
    return proc


def nbdinfo(*args: str) -> subprocess.CompletedProcess[str]:
    return run([require("nbdinfo"), *args])


def nbdinfo_json(uri: str) -> dict[str, Any]:
    proc = nbdinfo("--json", uri)
    assert proc.returncode == 0, f"nbdinfo --json {uri} failed:\n{output(proc)}"
    info = json.loads(proc.stdout)
    assert len(info["exports"]) == 1, info
    return info["exports"][0]


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}", pytrace=False)
        time.sleep(interval)


# --------------------------------------------------------------------------- images


def make_image(path: Path, size: int = IMAGE_SIZE) -> Path:
    """A sparse raw image of ``size`` bytes, all zero."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def read_at(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def assert_pattern(path: Path, offset: int, length: int, byte: int) -> None:
    """The child image itself holds ``byte`` over [offset, offset+length)."""
    data = read_at(path, offset, length)
    assert len(data) == length, f"{path.name}: short read at {offset}"
    if data.count(byte) != length:
        bad = next(i for i, b in enumerate(data) if b != byte)
        pytest.fail(
            f"{path.name}: byte at offset {offset + bad} is {data[bad]:#04x}, expected {byte:#04x}",
            pytrace=False,
        )


def corrupt(path: Path, offset: int, length: int, byte: int) -> None:
    """Overwrite part of a child image behind the server's back with dd conv=notrunc."""
    proc = run(
        [
            require("dd"),
            f"of={path}",
            f"bs={length}",
            "count=1",
            f"seek={offset}",
            "oflag=seek_bytes",
            "iflag=fullblock",
            "conv=notrunc",
            "status=none",
        ],
        input=bytes([byte]) * length,
    )
    assert proc.returncode == 0, output(proc)
    assert_pattern(path, offset, length, byte)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MiB), b""):
            h.update(block)
    return h.hexdigest()


def assert_identical(paths: Sequence[Path]) -> None:
    """All child images are byte-identical."""
    first = paths[0]
    for other in paths[1:]:
        assert filecmp.cmp(first, other, shallow=False), (
            f"{first.name} and {other.name} differ: {sha256_file(first)} != {sha256_file(other)}"
        )


def sectors(offset: int, length: int) -> tuple[int, int]:
    """(sector-num, sectors-count) of a byte span, rounded outward to 512-byte sectors."""
    start = offset // 512
    end = -(-(offset + length) // 512)
    return start, end - start


# --------------------------------------------------------------------------- events


def _strip(message: dict[str, Any]) -> dict[str, Any]:
    return {"event": message["event"], "data": message.get("data", {})}


def select(events: Sequence[dict[str, Any]], name: str, **data: Any) -> list[dict[str, Any]]:
    """Events called ``name`` whose data contains every given key/value.

    Keyword names use ``_`` for ``-``: ``select(evs, "QUORUM_REPORT_BAD", node_name="c1")``.
    """
    want = {k.replace("_", "-"): v for k, v in data.items()}
    return [
        e
        for e in events
        if e["event"] == name and all(e["data"].get(k) == v for k, v in want.items())
    ]


def nbd_uri(socket_path: Path | str, export: str = EXPORT) -> str:
    """``nbd+unix:///EXPORT?socket=PATH``; ``export=""`` asks for the default export."""
    return f"nbd+unix:///{export}?socket={socket_path}"


def events(server: Server, every: bool = False) -> list[dict[str, Any]]:
    """The server's QUORUM_* events so far, parsed (see ``Server.events``)."""
    return server.events(every)


class QmpEventReader:
    """A minimal QMP client: negotiates capabilities, then collects events in a thread."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.replies: dict[Any, dict[str, Any]] = {}
        self.cond = threading.Condition()
        self.next_id = 0
        greeting = json.loads(self.file.readline())
        assert "QMP" in greeting, greeting
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()
        self.command("qmp_capabilities")

    def _pump(self) -> None:
        try:
            for line in self.file:
                msg = json.loads(line)
                with self.cond:
                    if "event" in msg:
                        self.events.append(_strip(msg))
                    elif "id" in msg:
                        self.replies[msg["id"]] = msg
                    self.cond.notify_all()
        except OSError:
            pass  # the daemon went away

    def command(self, name: str, **arguments: Any) -> Any:
        with self.cond:
            self.next_id += 1
            ident = self.next_id
        msg: dict[str, Any] = {"execute": name, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        with self.cond:
            ok = self.cond.wait_for(lambda: ident in self.replies, timeout=EVENT_TIMEOUT)
            assert ok, f"no QMP reply to {name}"
            reply = self.replies.pop(ident)
        assert "return" in reply, reply
        return reply["return"]

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.thread.join(timeout=5)
        self.file.close()
        self.sock.close()


# --------------------------------------------------------------------------- servers


class Server:
    """A running export of a 3-way (or n-way) quorum, with its images and logs."""

    kind = ""

    def __init__(
        self,
        tmp: Path,
        images: list[Path],
        names: list[str],
        *,
        vote_threshold: int | None,
        read_pattern: str | None,
        rewrite_corrupted: bool,
        read_only: bool,
        listen: tuple[str, int] | None,
        export_name: str = EXPORT,
        node_name: str = QUORUM_NODE,
    ) -> None:
        self.tmp = tmp
        self.images = images
        self.names = names
        self.node_name = node_name
        self.export_name = export_name
        self.vote_threshold = vote_threshold
        self.read_pattern = read_pattern
        self.rewrite_corrupted = rewrite_corrupted
        self.read_only = read_only
        self.listen = listen
        self.socket = tmp / "nbd.sock"
        self.stderr_path = tmp / f"{self.kind}.stderr"
        self.stdout_path = tmp / f"{self.kind}.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    # ----- life cycle

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    def start(self) -> Server:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=self.env(),
            )
        wait_until(self._accepts, START_TIMEOUT, f"{self.kind} to accept connections")
        return self

    def _connect(self) -> socket.socket:
        if self.listen is not None:
            return socket.create_connection(self.listen, timeout=2)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        try:
            s.connect(str(self.socket))
        except OSError:
            s.close()
            raise
        return s

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            self.returncode = self.proc.returncode  # reported here, not again in teardown
            pytest.fail(
                f"{self.kind} exited with {self.proc.returncode} during start-up:\n{self.stderr()}",
                pytrace=False,
            )
        try:
            self._connect().close()
        except OSError:
            return False
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig``, wait for the exit and return the exit code (idempotent)."""
        if self.returncode is not None:
            return self.returncode
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.returncode = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self.returncode = self.proc.returncode
            pytest.fail(
                f"{self.kind} did not exit within {STOP_TIMEOUT}s of signal {sig}", pytrace=False
            )
        self._closed()
        return self.returncode

    def _closed(self) -> None:
        pass

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----- addresses

    def uri(self, export: str | None = None) -> str:
        name = self.export_name if export is None else export
        if self.listen is not None:
            host, port = self.listen
            return f"nbd://{host}:{port}/{name}"
        return nbd_uri(self.socket, name)

    # ----- events

    def events(self, every: bool = False) -> list[dict[str, Any]]:
        """Events received so far, as ``{"event": NAME, "data": {...}}``.

        Only the QUORUM_* events unless ``every``: qsd also reports its own life cycle
        (BLOCK_EXPORT_DELETED on shutdown, ...).
        """
        found = self._events()
        return found if every else [e for e in found if e["event"].startswith("QUORUM_")]

    def _events(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def wait_event(self, name: str, timeout: float = EVENT_TIMEOUT, **data: Any) -> dict[str, Any]:
        """Wait until an event called ``name`` with matching data has arrived."""
        found = wait_until(
            lambda: select(self.events(), name, **data),
            timeout,
            f"{name} {data} from {self.kind}; got {self.events()}",
        )
        return found[0]

    def final_events(self) -> list[dict[str, Any]]:
        """Every QUORUM_* event caused by the requests made so far. Stops the server.

        For checks that an event did NOT happen: after a clean shutdown nothing is in
        flight, so an event that is missing now was never emitted.
        """
        code = self.stop()
        assert code == 0, f"{self.kind} exited with {code}:\n{self.stderr()}"
        return self.events()

    def reap(self) -> None:
        """Teardown: stop the server and check that it exits cleanly."""
        if self.proc is None or self.returncode is not None:
            return
        code = self.stop()
        assert code == 0, f"{self.kind} exited with {code} on SIGTERM:\n{self.stderr()}"


class NbdquorumServer(Server):
    kind = "nbdquorum"

    def __init__(
        self,
        *args: Any,
        extra: Sequence[str] = (),
        named: bool = False,
        create_size: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.extra = list(extra)
        self.named = named
        self.create_size = create_size
        super().__init__(*args, **kwargs)

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "nbdquorum", "serve"]
        for name, path in zip(self.names, self.images, strict=True):
            argv += ["--child", f"{name}={path}" if self.named else str(path)]
        if self.create_size is not None:
            argv += ["--size", self.create_size]
        if self.vote_threshold is not None:
            argv += ["--vote-threshold", str(self.vote_threshold)]
        if self.read_pattern is not None:
            argv += ["--read-pattern", self.read_pattern]
        if self.rewrite_corrupted:
            argv.append("--rewrite-corrupted")
        if self.read_only:
            argv.append("--read-only")
        if self.node_name != QUORUM_NODE:
            argv += ["--node-name", self.node_name]
        if self.export_name != EXPORT:
            argv += ["--export-name", self.export_name]
        if self.listen is not None:
            argv += ["--listen", f"{self.listen[0]}:{self.listen[1]}"]
        else:
            argv += ["--socket", str(self.socket)]
        argv += ["--state-dir", str(self.tmp / "state")]
        return argv + self.extra

    def env(self) -> dict[str, str]:
        return nbdquorum_env()

    def _events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.stderr().splitlines():
            if not line.startswith("EVENT "):
                continue
            try:
                msg = json.loads(line[len("EVENT ") :])
            except ValueError:
                pytest.fail(f"malformed EVENT line on stderr: {line!r}", pytrace=False)
            assert isinstance(msg, dict) and set(msg) >= {"event", "data"}, line
            found.append(_strip(msg))
        return found

    def reap(self) -> None:
        if self.proc is None or (self.returncode is not None and self.returncode != 0):
            return  # already reported
        super().reap()
        if "Traceback" in self.stderr():
            pytest.fail(f"traceback in nbdquorum's stderr:\n{self.stderr()}", pytrace=False)


class QsdServer(Server):
    kind = "qsd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.qmp_path = self.tmp / "qmp.sock"
        self.qmp: QmpEventReader | None = None

    def argv(self) -> list[str]:
        argv = [require("qemu-storage-daemon")]
        for i, (name, path) in enumerate(zip(self.names, self.images, strict=True)):
            argv += self.child_blockdevs(i, name, path)
        quorum: dict[str, Any] = {
            "driver": "quorum",
            "node-name": self.node_name,
            "children": self.names,
            "vote-threshold": self.vote_threshold or len(self.names) // 2 + 1,
        }
        if self.read_pattern is not None:
            quorum["read-pattern"] = self.read_pattern
        if self.rewrite_corrupted:
            quorum["rewrite-corrupted"] = True
        argv += ["--blockdev", json.dumps(quorum)]
        if self.listen is not None:
            host, port = self.listen
            argv += ["--nbd-server", f"addr.type=inet,addr.host={host},addr.port={port}"]
        else:
            argv += ["--nbd-server", f"addr.type=unix,addr.path={self.socket}"]
        writable = "off" if self.read_only else "on"
        argv += [
            "--export",
            f"type=nbd,id=e0,node-name={self.node_name},"
            f"name={self.export_name},writable={writable}",
            "--chardev",
            f"socket,id=m0,path={self.qmp_path},server=on,wait=off",
            "--monitor",
            "chardev=m0",
        ]
        return argv

    def child_blockdevs(self, index: int, name: str, path: Path | str) -> list[str]:
        """The --blockdev arguments of quorum child ``name``: raw over a local file."""
        return [
            "--blockdev",
            f"driver=file,node-name=file{index},filename={path}",
            "--blockdev",
            f"driver=raw,node-name={name},file=file{index}",
        ]

    def start(self) -> Server:
        super().start()
        wait_until(self.qmp_path.exists, START_TIMEOUT, "the qsd QMP socket")
        self.qmp = QmpEventReader(self.qmp_path)
        return self

    def _events(self) -> list[dict[str, Any]]:
        assert self.qmp is not None
        with self.qmp.cond:
            return list(self.qmp.events)

    def final_events(self) -> list[dict[str, Any]]:
        # A QMP round trip: events emitted before the command are written before its reply.
        if self.qmp is not None and self.alive():
            self.qmp.command("query-version")
        return super().final_events()

    def _closed(self) -> None:
        if self.qmp is not None:
            self.qmp.close()


def nbdquorum_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def nbdquorum_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nbdquorum ARGS`` to completion (for argument-error tests)."""
    return run([sys.executable, "-m", "nbdquorum", *args], timeout=timeout, env=nbdquorum_env())


StartServer = Callable[..., Server]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """Factory: ``start_server(target, children=3, ...)`` → a started ``Server``.

    nbdquorum-only keywords go to ``NbdquorumServer``: ``create_size="4M"`` (``--size``),
    ``extra=[...]`` (more arguments).

    Creates ``children`` zero-filled images of ``size`` bytes in the test's tmp dir
    (unless ``images`` is given), starts the server on a Unix socket (or TCP with
    ``listen=True``) and reaps it in teardown, checking for exit code 0. Child node
    names are child0, child1, ... (nbdquorum's defaults, so not passed) unless ``names``
    is given (then passed as ``--child NAME=PATH``).
    """
    started: list[Server] = []

    def start(
        target: str = "nbdquorum",
        *,
        children: int = 3,
        size: int = IMAGE_SIZE,
        images: list[Path] | None = None,
        vote_threshold: int | None = None,
        read_pattern: str | None = None,
        rewrite_corrupted: bool = False,
        read_only: bool = False,
        listen: bool = False,
        export_name: str = EXPORT,
        names: list[str] | None = None,
        node_name: str = QUORUM_NODE,
        **extra: Any,
    ) -> Server:
        workdir = tmp_path / f"{target}{len(started)}"
        workdir.mkdir()
        if images is None:
            images = [
                make_image(tmp_path / f"c{len(started)}-{i}.raw", size) for i in range(children)
            ]
        if names is None:
            names = [f"child{i}" for i in range(len(images))]
        elif target.startswith("nbdquorum"):
            extra["named"] = True
        address = ("127.0.0.1", free_tcp_port()) if listen else None
        kwargs: dict[str, Any] = dict(
            vote_threshold=vote_threshold,
            read_pattern=read_pattern,
            rewrite_corrupted=rewrite_corrupted,
            read_only=read_only,
            listen=address,
            export_name=export_name,
            node_name=node_name,
        )
        server: Server
        if target == "nbdquorum":
            server = NbdquorumServer(workdir, images, names, **kwargs, **extra)
        elif target == "nbdquorum-workers":
            extra["extra"] = [*WORKER_ARGS, *extra.get("extra", ())]
            server = NbdquorumServer(workdir, images, names, **kwargs, **extra)
        elif target == "qsd":
            require("qemu-storage-daemon")
            assert not extra, f"qsd has no options {extra}"
            server = QsdServer(workdir, images, names, **kwargs)
        else:
            raise ValueError(target)
        started.append(server)
        return server.start()

    yield start

    errors = []
    for server in started:
        try:
            server.reap()
        except (AssertionError, pytest.fail.Exception) as e:
            errors.append(str(e))
        finally:
            if server.proc is not None and server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait()
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture(params=TARGETS)
def target(request: pytest.FixtureRequest) -> str:
    """The server implementation under test: nbdquorum, or qemu-storage-daemon as reference."""
    return str(request.param)


@pytest.fixture
def server(start_server: StartServer, target: str) -> Server:
    """A default 3-child, threshold-2 export of 16 MiB zero images."""
    return start_server(target)


def xfail_for(
    target: str, kinds: str | Sequence[str], reason: str, request: pytest.FixtureRequest
) -> None:
    """Mark the running test xfail(strict=True) when ``target`` is one of ``kinds``."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    if target in kinds:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))
