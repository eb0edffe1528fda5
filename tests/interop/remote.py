"""Other hosts for the interop tests: network namespaces, remote NBD servers, faults, fio.

A child "on another host" is an NBD server (qemu-nbd or nbdkit) running inside a Linux
network namespace that the test creates, reached over TCP through a veth pair. Nothing
here sends a packet anywhere but 127.0.0.0/8 or into a namespace the test made.

Hosts
-----
``remote_host`` (fixture, a factory; import ``remote_host_fixture`` into the test module)::

    host = remote_host()          # a fresh namespace behind its own veth pair
    host.addr                     # "10.213.A.B": the namespace's address (servers bind here)
    host.host_addr                # the root namespace's end of the link
    host.run(argv)                # CompletedProcess[str] of argv run inside the namespace
    host.popen(argv, ...)         # Popen inside the namespace (killed by close())
    host.workdir                  # where its servers write their logs (under tmp_path)
    host.cut()                    # silent link: packets vanish, no RST, no FIN
    host.restore()                # the link is back; open TCP connections resume
    host.close()                  # kill everything in it, delete namespace, veth, route

``local_host`` (fixture) is a ``LocalHost``: the same interface on 127.0.0.1 in the root
namespace, for tests that need a remote server but no link faults (``cut()`` raises).

Each namespace gets a /30 out of 10.213.0.0/16 (``POOL``): namespace ``nbdq-PID-N``, veth
``nqPID-Nh`` (root side) / ``nqPID-Nn`` (namespace side). A subnet is claimed atomically
through a file in ``REGISTRY`` (shared by concurrent pytest processes); a blackhole route
for the /30 (metric ``GUARD_METRIC``, below the connected route) guarantees that packets
for it never follow the default route off the machine, even after the veth is gone.
Everything left by a crashed earlier run (its PID no longer alive) is removed when the next
host is created. Static neighbour entries on both ends: no ARP, so a cut link gives no
"no route to host" either; a connect() to a cut host hangs as it does for a host behind a
dead router.

Why ``cut()`` downs the *namespace* end: with the root end down, the kernel deletes the
connected route, and packets for the namespace's address would follow the default route
out of the machine (and a local sender gets errors rather than silence). With the namespace
end down, the root end merely loses carrier; its route stays and the veth drops what is
sent into it. Both directions are silent.

Servers
-------
``qemu_nbd(host, image, export="disk", port=None, extra=(), cache="writeback",
discard="unmap", shared=16)`` and ``nbdkit(host, plugin_args, filters=(), port=None,
export="disk", extra=())`` start a server on ``host`` (any ``Host``) and wait (bounded)
until it accepts TCP connections from the root namespace. Both return an ``NbdServer``::

    srv.uri                       # "nbd://ADDR:PORT/EXPORT"
    srv.addr, srv.port, srv.export
    srv.kill(sig=SIGKILL)         # the server dies (its kernel closes the sockets: FIN/RST)
    srv.restart()                 # same argv, same port, same image: "the server comes back"
    srv.stop()                    # SIGTERM and wait (used by host.close())
    srv.alive(), srv.log()

qemu-nbd is a writable, persistent (``--persistent``), multi-connection (``--shared``
> 1 advertises NBD_FLAG_CAN_MULTI_CONN) raw export with ``--discard=unmap`` (qemu-nbd
ignores TRIM unless asked) and the page cache (``--cache=writeback``, qemu-nbd's default:
works on tmpfs, and the image file read by a test is what the server wrote; its flush is an
fdatasync). nbdkit runs in the foreground with ``--exit-with-parent``; its ``file`` plugin
ignores the export name, so any ``EXPORT`` in the URI works. Filters, e.g.::

    nbdkit(host, ["file", img, "rdelay=200ms"], filters=["delay"])           # slow
    nbdkit(host, ["file", img, "error-pread-rate=50%"], filters=["error"])    # flaky
    nbdkit(host, ["file", img, "error-rate=100%", f"error-file={flag}"],
           filters=["error"])     # healthy until the test creates ``flag``

A quorum with children on other hosts
-------------------------------------
``start_remote_quorum`` (fixture; import ``start_remote_quorum_fixture``)::

    srv = start_remote_quorum("qsd", local=2, remote={"child2": nbd_srv.uri},
                              nbd_options={"reconnect-delay": 0})

builds a quorum of ``local`` raw files (child0, child1, ...) and the remote children (by
node name), exported on a Unix socket like every other target, reaped in teardown. For
``qsd`` each remote child is QEMU's nbd node ``{"driver": "nbd", "server": {"type":
"inet", "host", "port"}, "export", ...nbd_options}``; for ``nbdquorum`` it is passed as
``--child NAME=URI``.

Name ``remote_host`` before ``start_remote_quorum``/``start_server`` in a test's arguments:
fixtures are torn down in reverse, so the root-namespace servers are reaped while their
remote hosts still exist (and a test that cut a link restores it before it returns).

What qemu-storage-daemon (QEMU 7.2) does with an nbd child, as test_remote_harness.py
records it: remote killed → requests succeed from the other children, the child reported
(QUORUM_REPORT_BAD, EIO, throttled to one a second per node), the client never notices;
the nbd client reconnects by itself in the background (backoff 1 s doubling to 16 s) but
never copies the writes the child missed. Silent link → reads and writes hang with no
limit and nothing reported; held requests complete after the link returns.
``reconnect-delay`` N → requests wait up to N s for the server to return, then succeed
without it (child reported).

fio with verify
---------------
``fio_verify(uri, cwd, runtime=5, size=..., ...)`` runs fio's nbd engine with crc32c
verify for a bounded time and returns a ``FioResult`` (``returncode``, ``timed_out``,
``verify_errors``, ``io_errors``, ``job``, ``output``). ``fio_verify_start`` returns a
``FioJob`` to inject faults while it runs; ``job.result()`` waits (bounded) for it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.ci import unavailable

from .conftest import (
    EXPORT,
    IMAGE_SIZE,
    START_TIMEOUT,
    NbdquorumServer,
    QsdServer,
    Server,
    free_tcp_port,
    make_image,
    output,
    require,
    run,
    wait_until,
)

POOL_PREFIX = "10.213"  # 10.213.0.0/16: 16384 /30 subnets, one per RemoteHost
POOL_SIZE = 16384
GUARD_METRIC = 4242  # the blackhole route under each /30's connected route
NETNS_PREFIX = "nbdq-"
DEV_PREFIX = "nq"
REGISTRY = Path("/run/nbdquorum-test-netns") if os.access("/run", os.W_OK) else Path(
    tempfile.gettempdir()) / "nbdquorum-test-netns"
NBD_PORT = 10809  # every namespace has its own port space
STOP_TIMEOUT = 10.0
IP_TIMEOUT = 20.0

_NETNS_RE = re.compile(rf"^{NETNS_PREFIX}(\d+)-(\d+)$")
_DEV_RE = re.compile(rf"^{DEV_PREFIX}(\d+)-(\d+)[hn]$")


# --------------------------------------------------------------------------- helpers


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; with check, a failure fails the test with ip's message."""
    proc = run([require("ip"), *args], timeout=IP_TIMEOUT)
    if check and proc.returncode != 0:
        pytest.fail(f"ip {' '.join(args)} failed ({proc.returncode}): {output(proc)}",
                    pytrace=False)
    return proc


def _kill_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _reap(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM the process group, SIGKILL after ``timeout``; return the exit code."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
    _kill_group(proc, signal.SIGKILL)  # anything it forked
    return proc.returncode


def _netns_pids(name: str) -> list[int]:
    proc = run(["ip", "netns", "pids", name], timeout=IP_TIMEOUT)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _kill_netns(name: str) -> None:
    """SIGKILL every process in namespace ``name`` (bounded wait for them to go)."""
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
    ss = shutil.which("ss")
    if ss is None:
        return []
    proc = run([ss, "-tanH", "dst", addr], timeout=IP_TIMEOUT)
    return [line for line in proc.stdout.splitlines()
            if line.strip() and not line.startswith("TIME-WAIT")]


def _subnet(index: int) -> tuple[str, str, str]:
    """(network/30, root address, namespace address) of pool subnet ``index``."""
    base = index * 4
    a, b = base // 256, base % 256
    return (f"{POOL_PREFIX}.{a}.{b}/30", f"{POOL_PREFIX}.{a}.{b + 1}",
            f"{POOL_PREFIX}.{a}.{b + 2}")


def _drop_guard(network: str) -> None:
    run(["ip", "route", "del", "blackhole", network, "metric", str(GUARD_METRIC)],
        timeout=IP_TIMEOUT)


def sweep_leftovers() -> None:
    """Remove namespaces, veths, guard routes and claims of pytest runs that are gone."""
    if REGISTRY.is_dir():
        for claim in REGISTRY.iterdir():
            try:
                info = json.loads(claim.read_text())
            except (OSError, ValueError):
                # being written right now; or its writer died between create and write
                with contextlib.suppress(OSError):
                    if time.time() - claim.stat().st_mtime > 60:
                        claim.unlink()
                continue
            if _pid_alive(int(info["pid"])):
                continue
            _kill_netns(info["netns"])
            run(["ip", "netns", "del", info["netns"]], timeout=IP_TIMEOUT)
            run(["ip", "link", "del", info["host_dev"]], timeout=IP_TIMEOUT)
            _drop_guard(info["network"])
            with contextlib.suppress(FileNotFoundError):
                claim.unlink()
    for name in run(["ip", "netns", "list"], timeout=IP_TIMEOUT).stdout.split("\n"):
        m = _NETNS_RE.match(name.split(" ")[0])
        if m and not _pid_alive(int(m.group(1))):
            _kill_netns(m.group(0))
            run(["ip", "netns", "del", m.group(0)], timeout=IP_TIMEOUT)
    links = json.loads(run(["ip", "-j", "link", "show"], timeout=IP_TIMEOUT).stdout or "[]")
    for link in links:
        m = _DEV_RE.match(link.get("ifname", ""))
        if m and not _pid_alive(int(m.group(1))):
            run(["ip", "link", "del", link["ifname"]], timeout=IP_TIMEOUT)


# --------------------------------------------------------------------------- hosts


class Host:
    """Where a server runs: ``run``/``popen`` there, ``addr`` to reach it from the root."""

    addr = "127.0.0.1"
    name = "localhost"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir  # the servers' logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: list[NbdServer] = []
        self.closed = False

    def prefix(self) -> list[str]:
        """argv prefix that runs a command on this host."""
        return []

    def port(self) -> int:
        """A TCP port free on this host."""
        return free_tcp_port()

    def run(self, argv: Sequence[str | os.PathLike[str]], *, timeout: float = 60.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run argv on this host to completion (bounded); never raises on a non-zero exit."""
        return run([*self.prefix(), *(str(a) for a in argv)], timeout=timeout, input=input)

    def popen(self, argv: Sequence[str | os.PathLike[str]], **kwargs: Any
              ) -> subprocess.Popen[bytes]:
        """Start argv on this host in its own session; ``close()`` kills it."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([*self.prefix(), *(str(a) for a in argv)],
                                start_new_session=True, **kwargs)
        self.procs.append(proc)
        return proc

    def cut(self) -> None:
        raise NotImplementedError(f"{self.name}: only a RemoteHost's link can be cut")

    def restore(self) -> None:
        raise NotImplementedError(f"{self.name}: only a RemoteHost's link can be cut")

    def close(self) -> None:
        """Stop every server and process started here (idempotent)."""
        for srv in self.servers:
            srv.stop()
        for proc in self.procs:
            _reap(proc)
        self.closed = True


class LocalHost(Host):
    """The root namespace on 127.0.0.1: a "remote" server with no link to cut."""


class RemoteHost(Host):
    """A network namespace behind a veth pair: another host, as far as TCP can tell."""

    _counter = 0

    def __init__(self, workdir: Path) -> None:
        pid = os.getpid()
        RemoteHost._counter += 1
        n = RemoteHost._counter
        self.name = f"{NETNS_PREFIX}{pid}-{n}"
        super().__init__(workdir / self.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host_dev = f"{DEV_PREFIX}{pid}-{n}h"
        self.ns_dev = f"{DEV_PREFIX}{pid}-{n}n"
        self.is_cut = False
        self._guarded = False
        self._claim: Path | None = None
        self.network, self.host_addr, self.addr = self._claim_subnet(pid, n)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # ----- set-up

    def _claim_subnet(self, pid: int, n: int) -> tuple[str, str, str]:
        REGISTRY.mkdir(mode=0o700, exist_ok=True)
        start = (pid * 16 + n) % POOL_SIZE
        for k in range(256):
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
            self._claim = path
            # a subnet somebody else routes (not through this registry) is not ours to take
            routes = run(["ip", "-4", "route", "show", "match", ns_addr], timeout=IP_TIMEOUT)
            if any(not line.startswith("default") for line in routes.stdout.splitlines()):
                path.unlink()
                self._claim = None
                continue
            return network, host_addr, ns_addr
        pytest.fail(f"no free /30 in {POOL_PREFIX}.0.0/16 after 256 tries", pytrace=False)

    def _create(self) -> None:
        # the guard first: from now on nothing for this /30 can leave the machine
        ip("route", "add", "blackhole", self.network, "metric", str(GUARD_METRIC))
        self._guarded = True
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
        return str(json.loads(ip(*args, "-j", "link", "show", dev).stdout)[0]["address"])

    def _static_neighbours(self) -> None:
        """No ARP across the link: a cut link drops packets instead of failing connect()."""
        ns_mac, host_mac = self._mac(self.name, self.ns_dev), self._mac(None, self.host_dev)
        ip("neigh", "replace", self.addr, "lladdr", ns_mac, "dev", self.host_dev,
           "nud", "permanent")
        ip("-n", self.name, "neigh", "replace", self.host_addr, "lladdr", host_mac,
           "dev", self.ns_dev, "nud", "permanent")

    # ----- use

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def port(self) -> int:
        return NBD_PORT

    def cut(self) -> None:
        """Packets vanish both ways (no RST, no FIN, no ICMP); connects hang."""
        ip("-n", self.name, "link", "set", self.ns_dev, "down")
        self.is_cut = True

    def restore(self) -> None:
        """The link is back (TCP retransmits get through again)."""
        ip("-n", self.name, "link", "set", self.ns_dev, "up")
        self._static_neighbours()  # a link going down flushes even permanent entries
        self.is_cut = False

    def close(self) -> None:
        """Kill everything in the namespace, then delete namespace, veth and guard route.

        The link is restored first so that the dying servers' FIN/RST reach the root
        namespace's sockets through the veth, not never. The guard route stays (until the
        process exits, or the next run sweeps it) while a root-namespace socket to the
        namespace could still send.
        """
        if self.closed:
            return
        try:
            if self.is_cut:
                self.restore()
            super().close()
            _kill_netns(self.name)
            wait_for = time.monotonic() + 3.0
            while _root_sockets_to(self.addr) and time.monotonic() < wait_for:
                time.sleep(0.05)
        finally:
            run(["ip", "netns", "del", self.name], timeout=IP_TIMEOUT)
            run(["ip", "link", "del", self.host_dev], timeout=IP_TIMEOUT)
            if self._guarded and not _root_sockets_to(self.addr):
                _drop_guard(self.network)
                self._guarded = False
            if self._guarded:  # dropped when this process exits (its sockets are gone)
                atexit.register(self._release)
            else:
                self._release()
            self.closed = True

    def _release(self) -> None:
        if self._guarded:
            _drop_guard(self.network)
            self._guarded = False
        if self._claim is not None:
            with contextlib.suppress(FileNotFoundError):
                self._claim.unlink()
            self._claim = None


def require_netns() -> None:
    """Network namespaces need root and iproute2 (a skip on a laptop, a failure in CI)."""
    require("ip")
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    probe = f"{NETNS_PREFIX}{os.getpid()}-probe"
    proc = run(["ip", "netns", "add", probe], timeout=IP_TIMEOUT)
    run(["ip", "netns", "del", probe], timeout=IP_TIMEOUT)
    if proc.returncode != 0:
        unavailable(f"cannot create a network namespace: {output(proc).strip()}")


MakeRemoteHost = Callable[[], RemoteHost]


@pytest.fixture(name="remote_host")
def remote_host_fixture(tmp_path: Path) -> Iterator[MakeRemoteHost]:
    """Factory: ``remote_host()`` → a new ``RemoteHost``; every one closed in teardown."""
    require_netns()
    sweep_leftovers()
    hosts: list[RemoteHost] = []

    def make() -> RemoteHost:
        host = RemoteHost(tmp_path)
        hosts.append(host)
        return host

    yield make
    for host in reversed(hosts):
        host.close()


@pytest.fixture(name="local_host")
def local_host_fixture(tmp_path: Path) -> Iterator[LocalHost]:
    """The root namespace (127.0.0.1) as a host; its servers stopped in teardown."""
    host = LocalHost(tmp_path)
    yield host
    host.close()


# --------------------------------------------------------------------------- servers


class NbdServer:
    """An NBD server process on a host, listening on TCP ``addr:port``."""

    def __init__(self, host: Host, argv: list[str], port: int, export: str, log: Path,
                 kind: str) -> None:
        self.host = host
        self.argv = argv
        self.addr = host.addr
        self.port = port
        self.export = export
        self.log_path = log
        self.kind = kind
        self.proc: subprocess.Popen[bytes] | None = None
        host.servers.append(self)

    @property
    def uri(self) -> str:
        return f"nbd://{self.addr}:{self.port}/{self.export}"

    def start(self) -> NbdServer:
        with open(self.log_path, "ab") as log:
            self.proc = self.host.popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._accepts, START_TIMEOUT, f"{self.kind} on {self.addr}:{self.port}")
        return self

    def _accepts(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.kind} exited with {self.proc.returncode} on start-up:\n"
                        f"{self.log()}", pytrace=False)
        try:
            socket.create_connection((self.addr, self.port), timeout=2).close()
        except OSError:
            return False
        return True

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """The server dies now; returns its exit status (negative: the signal)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            _kill_group(self.proc, sig)
        return self.proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> NbdServer:
        """Start again on the same port with the same image (killing it first if alive)."""
        if self.alive():
            self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None:
            _reap(self.proc)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _log_path(host: Host, kind: str, port: int) -> Path:
    return host.workdir / f"{kind}-{port}-{len(host.servers)}.log"


def qemu_nbd(host: Host, image: Path, export: str = EXPORT, port: int | None = None,
             extra: Sequence[str] = (), *, cache: str = "writeback", discard: str = "unmap",
             shared: int = 16) -> NbdServer:
    """qemu-nbd serving raw ``image`` writable, persistent and multi-connection on host."""
    port = host.port() if port is None else port
    argv = [require("qemu-nbd"), "--persistent", f"--shared={shared}", "--format=raw",
            f"--export-name={export}", f"--bind={host.addr}", f"--port={port}",
            f"--cache={cache}", f"--discard={discard}", *extra, str(image)]
    return NbdServer(host, argv, port, export, _log_path(host, "qemu-nbd", port),
                     "qemu-nbd").start()


def require_nbdkit_filter(name: str) -> None:
    proc = run([require("nbdkit"), f"--filter={name}", "null", "--dump-plugin"])
    if proc.returncode != 0:
        unavailable(f"nbdkit's {name} filter is not installed")


def nbdkit(host: Host, plugin_args: Sequence[str | os.PathLike[str]],
           filters: Sequence[str] = (), port: int | None = None, export: str = EXPORT,
           extra: Sequence[str] = ()) -> NbdServer:
    """nbdkit in the foreground on host: ``nbdkit [--filter=F]... PLUGIN ARGS``.

    ``plugin_args`` is the plugin and its key=value arguments, the filters' parameters
    among them (``["file", img, "rdelay=100ms"]``).
    """
    for f in filters:
        require_nbdkit_filter(f)
    port = host.port() if port is None else port
    argv = [require("nbdkit"), "--foreground", "--exit-with-parent", f"--ipaddr={host.addr}",
            f"--port={port}", *(f"--filter={f}" for f in filters), *extra,
            *(str(a) for a in plugin_args)]
    return NbdServer(host, argv, port, export, _log_path(host, "nbdkit", port),
                     "nbdkit").start()


# --------------------------------------------------------------------------- quorums


def nbd_blockdev(uri: str, node_name: str, options: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """QEMU's nbd node for ``nbd://HOST:PORT/EXPORT`` (``port`` is a string in QAPI)."""
    m = re.fullmatch(r"nbd://([^/:]+):(\d+)/(.*)", uri)
    assert m, f"not an nbd://HOST:PORT/EXPORT URI: {uri}"
    node: dict[str, Any] = {
        "driver": "nbd",
        "node-name": node_name,
        "server": {"type": "inet", "host": m.group(1), "port": m.group(2)},
        "export": m.group(3),
    }
    node.update(options or {})
    return node


class QsdRemoteServer(QsdServer):
    """qemu-storage-daemon whose quorum has nbd children (QEMU's client) next to files.

    ``images`` holds a Path for a local raw child and an ``nbd://`` URI for a remote one.
    """

    def __init__(self, *args: Any, nbd_options: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        self.nbd_options = dict(nbd_options or {})
        super().__init__(*args, **kwargs)

    def child_blockdevs(self, index: int, name: str, image: Path | str) -> list[str]:
        if isinstance(image, str) and image.startswith("nbd://"):
            return ["--blockdev", json.dumps(nbd_blockdev(image, name, self.nbd_options))]
        return super().child_blockdevs(index, name, image)


StartRemoteQuorum = Callable[..., Server]


@pytest.fixture(name="start_remote_quorum")
def start_remote_quorum_fixture(tmp_path: Path) -> Iterator[StartRemoteQuorum]:
    """Factory: ``start_remote_quorum(target, local=2, remote={NAME: URI}, ...)``.

    ``target`` is ``"qsd"`` or ``"nbdquorum"``; local children are child0.. (raw files of
    ``size`` bytes in tmp_path), remote ones keep their names and come after them.
    ``nbd_options`` go into each of qsd's nbd nodes (``reconnect-delay``,
    ``open-timeout``); ``extra`` are more nbdquorum arguments. Servers are reaped in
    teardown (exit code 0 required, as with ``start_server``).
    """
    started: list[Server] = []

    def start(target: str, *, local: int = 2, remote: dict[str, str], size: int = IMAGE_SIZE,
              vote_threshold: int | None = None, read_pattern: str | None = None,
              rewrite_corrupted: bool = False, nbd_options: dict[str, Any] | None = None,
              extra: Sequence[str] = ()) -> Server:
        n = len(started)
        workdir = tmp_path / f"{target}-remote{n}"
        workdir.mkdir()
        images: list[Any] = [make_image(tmp_path / f"r{n}-{i}.raw", size)
                             for i in range(local)]
        names = [f"child{i}" for i in range(local)]
        images += list(remote.values())
        names += list(remote)
        common: dict[str, Any] = dict(vote_threshold=vote_threshold, read_pattern=read_pattern,
                                      rewrite_corrupted=rewrite_corrupted, read_only=False,
                                      listen=None)
        server: Server
        if target == "qsd":
            require("qemu-storage-daemon")
            assert not extra, f"qsd has no options {extra}"
            server = QsdRemoteServer(workdir, images, names, nbd_options=nbd_options, **common)
        elif target == "nbdquorum":
            server = NbdquorumServer(workdir, images, names, named=True, extra=extra, **common)
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


# --------------------------------------------------------------------------- fio


_VERIFY_ERROR = re.compile(r"verify: bad|verify failed|bad magic header|bad header")


@dataclass
class FioResult:
    """What fio did: exit status (None if killed at the time limit), errors, its job JSON."""

    returncode: int | None
    timed_out: bool
    verify_errors: int
    io_errors: int
    job: dict[str, Any] | None
    output: str = field(repr=False)

    @property
    def ok(self) -> bool:
        return (self.returncode == 0 and not self.timed_out and self.verify_errors == 0
                and self.io_errors == 0)

    def check(self) -> FioResult:
        """Assert that fio finished in time, exited 0, with no I/O or verify error."""
        assert self.ok, f"fio: {self}\n{self.output[-3000:]}"
        return self


class FioJob:
    """A running fio (see ``fio_verify_start``)."""

    def __init__(self, proc: subprocess.Popen[bytes], deadline: float, log: Path) -> None:
        self.proc = proc
        self.deadline = deadline
        self.log = log

    def running(self) -> bool:
        return self.proc.poll() is None

    def result(self) -> FioResult:
        """Wait for fio until its deadline, killing it past that; parse what it wrote."""
        timed_out = False
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT)
        text = self.log.read_text(errors="replace")
        job = None
        with contextlib.suppress(ValueError, KeyError, IndexError):
            start = text.index("{\n")
            job = json.JSONDecoder().raw_decode(text[start:])[0]["jobs"][0]
        io_errors = 0
        if job is not None:
            io_errors = int(job.get("total_err", 0))
            if job.get("error") and job["error"] != 84:  # 84: EILSEQ, fio's verify failure
                io_errors = max(io_errors, 1)
        return FioResult(returncode=None if timed_out else self.proc.returncode,
                         timed_out=timed_out,
                         verify_errors=len(_VERIFY_ERROR.findall(text)),
                         io_errors=io_errors, job=job, output=text)


def fio_verify_start(uri: str, cwd: Path, *, runtime: float = 5.0, size: int = 8 << 20,
                     rw: str = "randwrite", bs: str = "4k", iodepth: int = 16,
                     grace: float = 30.0, extra: Sequence[str] = (),
                     name: str = "remote") -> FioJob:
    """Start fio's nbd engine on ``uri``: writes verified (crc32c) as it goes, for
    ``runtime`` seconds; ``result()`` gives up ``grace`` seconds after that.

    An I/O error or a verify failure does not stop fio (``--continue_on_error=all``): the
    result counts them instead.
    """
    log = cwd / f"fio-{name}-{time.monotonic_ns()}.log"
    argv = [require("fio"), f"--name={name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
            f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--verify=crc32c", "--verify_backlog=64",
            "--verify_state_save=0", "--continue_on_error=all", "--output-format=json",
            *extra]
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return FioJob(proc, time.monotonic() + runtime + grace, log)


def fio_verify(uri: str, cwd: Path, **kwargs: Any) -> FioResult:
    """``fio_verify_start(...).result()``."""
    return fio_verify_start(uri, cwd, **kwargs).result()
