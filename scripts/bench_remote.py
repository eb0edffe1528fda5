"""A child on another host for scripts/bench: qemu-nbd over TCP, in a network namespace.

The remote child is an image served by qemu-nbd over TCP.  With root and ``ip
netns`` it runs in a network namespace of its own behind a veth pair ("another
host" as far as TCP can tell: the packets cross a link, not the loopback);
otherwise on 127.0.0.1.  ``RemoteSite.where`` says which, for the results.

The namespace is the drill's (nbdquorum/drill/netns.py), with its safety rules: a
/30 out of 10.213.0.0/16 claimed atomically through the registry the interop
tests share, a blackhole guard route installed *first* so that packets for it
can never leave the machine, traffic only to the namespace made here, and
everything removed at the end (or by the next run if this process died).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nbdquorum.drill.netns import Namespace, netns_support

NBD_PORT = 10809
EXPORT = "disk"


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
        why = netns_support() if use_netns else "--remote-where localhost"
        if why is None:
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
