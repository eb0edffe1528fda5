"""A child on another host for scripts/bench: qemu-nbd over TCP, in a network namespace.

The remote child is an image served by qemu-nbd over TCP.  With root and ``ip
netns`` it runs in a network namespace of its own behind a veth pair ("another
host" as far as TCP can tell: the packets cross a link, not the loopback);
otherwise on 127.0.0.1.  ``RemoteSite.where`` says which, for the results.

Safety, as in the interop tests' harness (tests/interop/remote.py), whose
registry and names this shares so that either cleans up after the other: each
namespace takes a /30 out of 10.213.0.0/16, claimed atomically through a file
in the registry; a blackhole route for the /30 (metric 4242, under the
connected route) is installed *first*, so packets for it can never follow the
default route off the machine, even after the veth is gone.  Traffic goes only
to the namespace made here.  Everything is removed at the end (and by the next
run of either tool if this process died).

It also holds the resync measurement (``measure_resync``): nbdcopy copying a
local image to the remote export, nbdquorum's full resync of the remote child
alone, fio alone, and the resync with fio running.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

POOL_PREFIX = "10.213"
POOL_SIZE = 16384
GUARD_METRIC = 4242
NETNS_PREFIX = "nbdq-"
DEV_PREFIX = "nq"
REGISTRY = Path("/run/nbdquorum-test-netns") if os.access("/run", os.W_OK) else Path(
    tempfile.gettempdir()) / "nbdquorum-test-netns"
NBD_PORT = 10809
EXPORT = "disk"


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _ip(*args: str) -> None:
    r = _run(["ip", *args])
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {(r.stderr or r.stdout).strip()}")


def netns_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root"
    if not shutil.which("ip"):
        return False, "no ip(8)"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    r = _run(["ip", "netns", "add", probe])
    _run(["ip", "netns", "del", probe])
    if r.returncode != 0:
        return False, (r.stderr or r.stdout).strip()
    return True, ""


class Namespace:
    """A network namespace behind a veth pair, with its /30 and guard route."""

    def __init__(self) -> None:
        pid = os.getpid()
        self.name = f"{NETNS_PREFIX}{pid}-b"
        self.host_dev = f"{DEV_PREFIX}{pid}-bh"
        self.ns_dev = f"{DEV_PREFIX}{pid}-bn"
        self._claim: Path | None = None
        self._guarded = False
        self.network, self.host_addr, self.addr = self._claim_subnet(pid)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    def _claim_subnet(self, pid: int) -> tuple[str, str, str]:
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        start = (pid * 16 + 15) % POOL_SIZE
        for k in range(256):
            index = (start + k) % POOL_SIZE
            base = index * 4
            a, b = base // 256, base % 256
            network = f"{POOL_PREFIX}.{a}.{b}/30"
            host_addr, ns_addr = f"{POOL_PREFIX}.{a}.{b + 1}", f"{POOL_PREFIX}.{a}.{b + 2}"
            path = REGISTRY / str(index)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": pid, "netns": self.name, "host_dev": self.host_dev,
                           "network": network}, f)
            self._claim = path
            routes = _run(["ip", "-4", "route", "show", "match", ns_addr]).stdout
            if any(not line.startswith("default") for line in routes.splitlines()):
                path.unlink()  # somebody routes it outside the registry: not ours
                self._claim = None
                continue
            return network, host_addr, ns_addr
        raise RuntimeError(f"no free /30 in {POOL_PREFIX}.0.0/16")

    def _create(self) -> None:
        _ip("route", "add", "blackhole", self.network, "metric", str(GUARD_METRIC))
        self._guarded = True
        _ip("netns", "add", self.name)
        _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        _ip("link", "set", self.ns_dev, "netns", self.name)
        _ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
        _ip("-n", self.name, "addr", "add", f"{self.addr}/30", "dev", self.ns_dev)
        _ip("-n", self.name, "link", "set", "lo", "up")
        _ip("link", "set", self.host_dev, "up")
        _ip("-n", self.name, "link", "set", self.ns_dev, "up")

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def close(self) -> None:
        r = _run(["ip", "netns", "pids", self.name])
        for p in r.stdout.split() if r.returncode == 0 else []:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)
        time.sleep(0.2)
        _run(["ip", "netns", "del", self.name])
        _run(["ip", "link", "del", self.host_dev])
        # the guard goes once no socket of ours can still send to the namespace
        # (at exit at the latest), then the claim
        atexit.register(self._release)

    def _release(self) -> None:
        if self._guarded:
            _run(["ip", "route", "del", "blackhole", self.network, "metric", str(GUARD_METRIC)])
            self._guarded = False
        if self._claim is not None:
            with contextlib.suppress(FileNotFoundError):
                self._claim.unlink()
            self._claim = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RemoteSite:
    """qemu-nbd serving ``image`` over TCP, in a namespace when possible."""

    def __init__(self, image: Path, log: Path, *, use_netns: bool = True,
                 beside: RemoteSite | None = None) -> None:
        self.image = image
        self.log = log
        self.ns: Namespace | None = None
        self.owns_ns = beside is None
        if beside is not None:  # a second server on the same host, the next port
            self.ns, self.addr, self.where = beside.ns, beside.addr, beside.where
            self.port = beside.port + 1 if beside.ns is not None else free_port()
            self.proc = None
            return
        ok, why = netns_available() if use_netns else (False, "--remote-where localhost")
        if ok:
            self.ns = Namespace()
            self.addr, self.port = self.ns.addr, NBD_PORT
            self.where = (f"network namespace {self.ns.name} behind a veth pair "
                          f"({self.ns.host_addr} -> {self.ns.addr}, TCP)")
        else:
            self.addr, self.port = "127.0.0.1", free_port()
            self.where = f"127.0.0.1 over TCP (no network namespace: {why})"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://{self.addr}:{self.port}/{EXPORT}"

    def qsd_blockdev(self, node_name: str) -> dict[str, Any]:
        """QEMU's nbd node for this export (QAPI's ``port`` is a string)."""
        return {"driver": "nbd", "node-name": node_name,
                "server": {"type": "inet", "host": self.addr, "port": str(self.port)},
                "export": EXPORT}

    def start(self) -> None:
        argv = ["qemu-nbd", "--persistent", "--shared=16", "--format=raw",
                f"--export-name={EXPORT}", f"--bind={self.addr}", f"--port={self.port}",
                "--cache=writeback", "--discard=unmap", str(self.image)]
        prefix = self.ns.prefix() if self.ns else []
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([*prefix, *argv], stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu-nbd exited ({self.proc.returncode}); see {self.log}")
            try:
                socket.create_connection((self.addr, self.port), timeout=2).close()
                return
            except OSError as err:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"qemu-nbd did not listen on {self.addr}:{self.port}") from err
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid  # ip netns exec execs: the pid is qemu-nbd's

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self.ns is not None and self.owns_ns:
            self.ns.close()
        self.ns = None


@contextlib.contextmanager
def remote_site(image: Path, log: Path, *, use_netns: bool = True,
                beside: RemoteSite | None = None) -> Iterator[RemoteSite]:
    """qemu-nbd serving ``image`` (``beside``: on that site's host, the next port)."""
    site = RemoteSite(image, log, use_netns=use_netns, beside=beside)
    try:
        site.start()
        yield site
    finally:
        site.close()
