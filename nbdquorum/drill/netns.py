"""Another host for the drill: a network namespace behind a veth pair, and an NBD server on it.

The remote scenarios put a child's NBD server "on another host": inside a Linux network
namespace the drill creates (``ip netns``, root only), reached over TCP through a veth pair.
``cut()`` makes the link silent (packets vanish both ways: no RST, no FIN, no ICMP), as when
a host loses power or a switch dies; ``restore()`` brings it back.

Safety, the same rules as the project's interop tests:

- every namespace gets a /30 out of 10.213.0.0/16 (``POOL_PREFIX``), claimed in two steps:
  a file created with O_EXCL in ``REGISTRY`` (what a later run needs to clean up after a
  crashed one), then a blackhole *guard route* for the /30 (metric ``GUARD_METRIC``, under
  the connected route), which the kernel refuses to add twice, so two runs can never share
  a subnet; a subnet that any other route already covers is skipped. The guard route also
  keeps packets for the /30 from following the default route off the machine, even after
  the veth is gone;
- static neighbour entries on both ends: no ARP, so a cut link is silent (a connect to a
  cut host hangs as it does for a host behind a dead router) rather than "no route";
- the *namespace* end is downed to cut the link: with the root end down the kernel would
  delete the connected route, and packets would leave by the default route;
- nothing is addressed but the namespace's own /30; every loop is bounded; ``close()``
  kills what runs inside, deletes namespace, veth and guard route; what a dead drill left
  (its PID gone) is swept when the next namespace is made.

Names: namespace ``nbdqd-PID-N``, veth ``nqdPID-Nh`` (root side) / ``nqdPID-Nn``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from nbdquorum.drill.common import EXPORT, DrillError, last_line, sh

log = logging.getLogger(__name__)

POOL_PREFIX: Final = "10.213"  # 10.213.0.0/16: 16384 /30 subnets
POOL_SIZE: Final = 16384
GUARD_METRIC: Final = 4242
NETNS_PREFIX: Final = "nbdqd-"
DEV_PREFIX: Final = "nqd"
REGISTRY: Final = (Path("/run/nbdquorum-drill-netns") if os.access("/run", os.W_OK)
                   else Path(tempfile.gettempdir()) / "nbdquorum-drill-netns")
NBD_PORT: Final = 10809  # a namespace has its own port space
IP_TIMEOUT: Final = 20.0
STOP_TIMEOUT: Final = 10.0
#: subnets tried before giving up
CLAIM_TRIES: Final = 256

_NETNS_RE: Final = re.compile(rf"^{NETNS_PREFIX}(\d+)-(\d+)$")
_DEV_RE: Final = re.compile(rf"^{DEV_PREFIX}(\d+)-(\d+)[hn]$")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ip ARGS``; with check, a failure raises DrillError with ip's message."""
    proc = sh(["ip", *args], timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        raise DrillError(f"ip {' '.join(args)} failed: {last_line(proc)}")
    return proc


def netns_support() -> str | None:
    """None when the drill can make network namespaces, else why not."""
    if os.geteuid() != 0:
        return "not root (network namespaces need root)"
    if shutil.which("ip") is None:
        return "ip (iproute2) is not installed"
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    proc = ip("netns", "add", probe, check=False)
    ip("netns", "del", probe, check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {last_line(proc)}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _subnet(index: int) -> tuple[str, str, str]:
    """(network/30, root address, namespace address) of pool subnet ``index``."""
    base = index * 4
    hi, lo = base // 256, base % 256
    return (f"{POOL_PREFIX}.{hi}.{lo}/30", f"{POOL_PREFIX}.{hi}.{lo + 1}",
            f"{POOL_PREFIX}.{hi}.{lo + 2}")


def _netns_pids(name: str) -> list[int]:
    proc = ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_netns(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (a bounded wait for them to go)."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while pids := _netns_pids(name):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)


def _root_sockets_to(addr: str) -> list[str]:
    """Root-namespace TCP sockets to ``addr`` that may still send (not TIME-WAIT)."""
    if shutil.which("ss") is None:
        return []
    proc = sh(["ss", "-tanH", "dst", addr], timeout=IP_TIMEOUT)
    return [line for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("TIME-WAIT")]


def _drop_guard(network: str) -> None:
    ip("route", "del", "blackhole", network, "metric", str(GUARD_METRIC), check=False)


def sweep_leftovers() -> None:
    """Remove namespaces, veths, guard routes and claims of drills that are gone."""
    if REGISTRY.is_dir():
        for claim in REGISTRY.iterdir():
            try:
                info = json.loads(claim.read_text())
                pid = int(info["pid"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written right now, or not ours
            if _pid_alive(pid):
                continue
            if _NETNS_RE.match(str(info.get("netns", ""))):
                _kill_netns(info["netns"])
                ip("netns", "del", info["netns"], check=False)
            if _DEV_RE.match(str(info.get("host_dev", ""))):
                ip("link", "del", info["host_dev"], check=False)
            if str(info.get("network", "")).startswith(POOL_PREFIX + "."):
                _drop_guard(info["network"])
            with contextlib.suppress(FileNotFoundError):
                claim.unlink()
    for line in ip("netns", "list", check=False).stdout.splitlines():
        m = _NETNS_RE.match(line.split(" ")[0])
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns(m.group(0))
            ip("netns", "del", m.group(0), check=False)
    try:
        links = json.loads(ip("-j", "link", "show", check=False).stdout or "[]")
    except ValueError:
        links = []
    for link in links:
        m = _DEV_RE.match(str(link.get("ifname", "")))
        if m and not _pid_alive(int(m.group(1))):
            ip("link", "del", m.group(0), check=False)


class Host:
    """Where an NBD server runs; this base class is the root namespace on 127.0.0.1."""

    addr = "127.0.0.1"
    name = "localhost"

    def prefix(self) -> list[str]:
        """The argv prefix that runs a command on this host."""
        return []

    def port(self) -> int:
        """A TCP port that is free on this host."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((self.addr, 0))
            return int(s.getsockname()[1])

    def close(self) -> None:
        pass


class Namespace(Host):
    """A network namespace behind a veth pair: another host, as far as TCP can tell."""

    _counter = 0

    def __init__(self) -> None:
        pid = os.getpid()
        Namespace._counter += 1
        n = Namespace._counter
        self.name = f"{NETNS_PREFIX}{pid}-{n}"
        self.host_dev = f"{DEV_PREFIX}{pid}-{n}h"
        self.ns_dev = f"{DEV_PREFIX}{pid}-{n}n"
        self.is_cut = False
        self.closed = False
        self._guarded = False
        self._claim: Path | None = None
        sweep_leftovers()
        try:
            self.network, self.host_addr, self.addr = self._claim_subnet(pid, n)
            self._create()
        except BaseException:
            self.close()
            raise

    def _claim_subnet(self, pid: int, n: int) -> tuple[str, str, str]:
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        start = (pid * 16 + n + POOL_SIZE // 2) % POOL_SIZE
        for k in range(CLAIM_TRIES):
            index = (start + k) % POOL_SIZE
            network, host_addr, ns_addr = _subnet(index)
            path = REGISTRY / str(index)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": pid, "netns": self.name, "host_dev": self.host_dev,
                           "network": network}, f)
            # a subnet that anything but the default route covers is somebody else's;
            # the guard route is the atomic claim against any other user of the pool
            routes = ip("-4", "route", "show", "match", ns_addr, check=False).stdout
            if (any(not line.startswith("default") for line in routes.splitlines())
                    or ip("route", "add", "blackhole", network, "metric", str(GUARD_METRIC),
                          check=False).returncode != 0):
                path.unlink()
                continue
            self._claim = path
            self._guarded = True
            return network, host_addr, ns_addr
        raise DrillError(f"no free /30 in {POOL_PREFIX}.0.0/16 after {CLAIM_TRIES} tries")

    def _create(self) -> None:
        ip("netns", "add", self.name)
        ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.ns_dev)
        ip("link", "set", self.ns_dev, "netns", self.name)
        ip("addr", "add", f"{self.host_addr}/30", "dev", self.host_dev)
        ip("-n", self.name, "addr", "add", f"{self.addr}/30", "dev", self.ns_dev)
        ip("-n", self.name, "link", "set", "lo", "up")
        ip("link", "set", self.host_dev, "up")
        ip("-n", self.name, "link", "set", self.ns_dev, "up")
        self._static_neighbours()

    def _mac(self, netns: str | None, dev: str) -> str:
        args = ["-n", netns] if netns else []
        try:
            return str(json.loads(ip(*args, "-j", "link", "show", dev).stdout)[0]["address"])
        except (ValueError, LookupError) as err:
            raise DrillError(f"cannot read the MAC address of {dev}: {err}") from err

    def _static_neighbours(self) -> None:
        ns_mac, host_mac = self._mac(self.name, self.ns_dev), self._mac(None, self.host_dev)
        ip("neigh", "replace", self.addr, "lladdr", ns_mac, "dev", self.host_dev,
           "nud", "permanent")
        ip("-n", self.name, "neigh", "replace", self.host_addr, "lladdr", host_mac,
           "dev", self.ns_dev, "nud", "permanent")

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def port(self) -> int:
        return NBD_PORT

    def cut(self) -> None:
        """Packets vanish both ways (no RST, no FIN, no ICMP); connects hang."""
        ip("-n", self.name, "link", "set", self.ns_dev, "down")
        self.is_cut = True

    def restore(self) -> None:
        """The link is back: retransmissions and new connections get through."""
        ip("-n", self.name, "link", "set", self.ns_dev, "up")
        self._static_neighbours()  # a link going down flushes even permanent entries
        self.is_cut = False

    def close(self) -> None:
        """Kill everything inside, delete namespace, veth and (once no socket needs it)
        the guard route; idempotent.  The link is restored first so that the dying
        servers' FIN/RST reach the root namespace's sockets."""
        if self.closed:
            return
        self.closed = True
        try:
            if self.is_cut:
                with contextlib.suppress(DrillError):
                    self.restore()
            _kill_netns(self.name)
            deadline = time.monotonic() + 3.0
            while (self._guarded and _root_sockets_to(self.addr)
                   and time.monotonic() < deadline):
                time.sleep(0.05)
        finally:
            ip("netns", "del", self.name, check=False)
            ip("link", "del", self.host_dev, check=False)
            if self._guarded and _root_sockets_to(self.addr):
                atexit.register(self._release)  # when this process's sockets are gone
            else:
                self._release()

    def _release(self) -> None:
        if self._guarded:
            _drop_guard(self.network)
            self._guarded = False
        if self._claim is not None:
            with contextlib.suppress(FileNotFoundError):
                self._claim.unlink()
            self._claim = None


class NbdExport:
    """qemu-nbd on a host: a writable, persistent, multi-connection raw export of ``image``
    on TCP ``addr:port``; ``kill()`` (SIGKILL: the kernel closes its sockets) and
    ``start()`` again on the same port with the same image."""

    def __init__(self, host: Host, image: Path, log_path: Path, *,
                 port: int | None = None) -> None:
        self.host = host
        self.image = image
        self.log_path = log_path
        self.addr = host.addr
        self.port = host.port() if port is None else port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd://{self.addr}:{self.port}/{EXPORT}"

    def argv(self) -> list[str]:
        return [*self.host.prefix(), "qemu-nbd", "--persistent", "--shared=16",
                "--format=raw", f"--export-name={EXPORT}", f"--bind={self.addr}",
                f"--port={self.port}", "--cache=writeback", "--discard=unmap", str(self.image)]

    def start(self, timeout: float) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise DrillError(f"qemu-nbd exited with {self.proc.returncode} at start-up: "
                                 f"{self.log_tail()}")
            try:
                socket.create_connection((self.addr, self.port), timeout=2).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise DrillError(f"qemu-nbd did not listen on {self.addr}:{self.port} "
                                 f"within {timeout:g}s: {self.log_tail()}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the server's process group and wait (bounded) for it to go."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:]) or "(empty log)"

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "host": self.host.name, "image": str(self.image)}


def tools_missing(tools: Sequence[str]) -> str | None:
    """None when every tool is installed, else the first one that is not."""
    return next((f"{t} is not installed" for t in tools if shutil.which(t) is None), None)
