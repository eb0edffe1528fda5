"""The primary's side of the worker processes: spawn, place connections, push views.

See the package docstring for the design.  The pool owns the listening
sockets when workers are configured: it accepts every connection and either
serves it in this process or hands its descriptor to the least-loaded worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import mmap
import os
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import nbdquorum
from nbdquorum.block.node import BlockNode
from nbdquorum.block.quorum import QuorumNode, ReadPattern
from nbdquorum.nbd.server import Export, NBDServer, log_drop
from nbdquorum.nbd.stats import WorkerRequests
from nbdquorum.nbd.tls import TLSConfig
from nbdquorum.sockets import Listener, bind_tcp, bind_unix
from nbdquorum.worker.control import EPOCH, Channel, Message, channel_pair

log = logging.getLogger(__name__)

#: a worker that dies is started again after this many seconds, doubled for each
#: death in a row within RESPAWN_QUICK seconds of its start (at most 32x)
RESPAWN_DELAY = 1.0
RESPAWN_QUICK = 5.0

#: the exit status of a worker that could not import the package: it is not started again
CANNOT_START = 3

#: Where the worker processes import nbdquorum from: the very package this process
#: loaded (an installed one, or the checkout the server runs from), never whatever the
#: current directory holds.  ``python -m nbdquorum.worker`` would put the current
#: directory first on sys.path, where a folder named nbdquorum shadows the package.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(nbdquorum.__file__)))

#: The worker's first lines, run with ``python -P -c`` (-P: the current directory is not
#: put on sys.path; the environment is kept, so a venv's or user's site-packages still
#: provide the dependencies).  argv: PACKAGE_PARENT, then the worker's options.  A
#: worker that cannot import the package tells the primary why in one control
#: message (the primary logs it as one line) and exits with CANNOT_START.
BOOTSTRAP = f"""\
import os, sys
where = sys.argv.pop(1)
sys.path.insert(0, where)
try:
    import nbdquorum
    found = os.path.dirname(os.path.realpath(nbdquorum.__file__))
    if found != os.path.realpath(os.path.join(where, "nbdquorum")):
        raise ImportError(f"imported nbdquorum from {{found}}, not from {{where}}")
    from nbdquorum.worker.main import main
except Exception as err:
    import json, socket
    why = f"{{type(err).__name__}}: {{err}} (importing nbdquorum from {{where}})"
    try:
        ctl = socket.socket(fileno=int(sys.argv[sys.argv.index("--ctl-fd") + 1]))
        ctl.send(json.dumps({{"op": "cannot-start", "error": why}}).encode())
    except Exception:
        print("nbdquorum worker: cannot start:", why, file=sys.stderr)
    sys.exit({CANNOT_START})
sys.exit(main(sys.argv[1:]))
"""


@dataclass(eq=False)
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    channel: Channel
    conns: int = 0  # client connections it serves
    ready: bool = False  # connected to us and holding a view
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=time.monotonic)
    quick_deaths: int = 0  # deaths in a row soon after start, of this index
    cannot_start: str = ""  # why it could not import the package, as it said


class WorkerPool:
    def __init__(self, nbd: NBDServer, export: Export, quorum: QuorumNode, count: int, *,
                 child_timeout: float, take_all: bool = False, verbose: int = 0,
                 tls: TLSConfig | None = None) -> None:
        self.nbd = nbd
        #: TLS for the clients: a worker does the TLS handshake of the connections
        #: it is handed, with the same certificates (loaded, and reloaded, itself)
        self.tls = tls or TLSConfig()
        self.export = export
        self.quorum = quorum
        self.count = count
        self.child_timeout = child_timeout
        self.verbose = verbose
        self.take_all = take_all
        self.workers: list[Worker] = []
        self.here = 0  # client connections served by this process
        self.stopping = False
        self.epoch = 0
        self._epoch_fd = os.memfd_create("nbdquorum-view", os.MFD_CLOEXEC)
        os.ftruncate(self._epoch_fd, mmap.PAGESIZE)
        self._epoch_map = mmap.mmap(self._epoch_fd, mmap.PAGESIZE)
        self._listeners: list[socket.socket] = []
        self._owned: list[Listener] = []  # bound by listen_*: closed (files removed) at shutdown
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepting: list[asyncio.Task[None]] = []
        self._all_ready = asyncio.Event()
        #: the workers' request counts (their stats messages), for the metrics
        self.requests = WorkerRequests()

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        # first among the hooks: the epoch moves before anything (a state-dir
        # write that may fail, an fsync) can delay or skip it
        self.quorum.on_change.insert(0, self.push_view)
        self._bump()
        for i in range(1, self.count + 1):
            self._spawn(i)
        # Wait (briefly) for the workers, so the first connections spread out.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._all_ready.wait(), 10)
        not_ready = [w.index for w in self.workers if not w.ready and not w.channel.closed]
        if not_ready:
            log.warning("workers %s not ready yet; serving without them meanwhile", not_ready)

    def running(self) -> int:
        """Worker processes that reported in and serve (not the ones still starting)."""
        return sum(w.ready for w in self.workers)

    def _spawn(self, index: int, quick_deaths: int = 0) -> None:
        ctl_here, ctl_there = channel_pair()
        data_here, data_there = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = {
            "export": self.export.name,
            "node": self.quorum.node_name,
            "description": self.export.description,
            "read_only": self.export.read_only,
            "budget": self.nbd.budget.limit,
            "limits": dataclasses.asdict(self.nbd.limits),
            "child_timeout": self.child_timeout,
            "verbose": self.verbose,
            "tls": self.tls.to_json(),
        }
        fds = (ctl_there.fileno(), data_there.fileno(), self._epoch_fd)
        proc = subprocess.Popen(
            [sys.executable, "-P", "-c", BOOTSTRAP, PACKAGE_PARENT, "--index", str(index),
             "--ctl-fd", str(fds[0]), "--data-fd", str(fds[1]), "--epoch-fd", str(fds[2]),
             "--config", json.dumps(cfg)],
            pass_fds=fds,
            start_new_session=True,  # a terminal's Ctrl-C goes to the primary alone
            stdin=subprocess.DEVNULL,
        )
        ctl_there.close()
        data_there.close()
        w: Worker
        channel = Channel(ctl_here, lambda m, f, _t: self._on_message(w, m, f),
                          lambda: self._on_exit(w))
        w = Worker(index, proc, channel, quick_deaths=quick_deaths)
        self.workers.append(w)
        channel.start()
        # the worker's forwarding connection (its clients are bounded and counted there)
        self._task(self.nbd.serve_socket(data_here, internal=True))
        self._send_view(w)
        log.info("worker %d started (pid %d)", index, proc.pid)

    def _task(self, coro: Coroutine[Any, Any, None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _on_message(self, w: Worker, msg: Message, fds: list[int]) -> None:
        for fd in fds:  # workers send none
            os.close(fd)
        op = msg.get("op")
        if op == "ready":
            w.ready = True
            log.debug("worker %d ready", w.index)
            if all(x.ready for x in self.workers):
                self._all_ready.set()
        elif op == "closed":
            w.conns = max(0, w.conns - 1)
        elif op == "cannot-start":
            w.cannot_start = str(msg.get("error"))
        elif op == "stats":
            reads = msg.get("reads") or {}
            for slot in self.quorum.slots:
                n = reads.get(slot.node.node_name)
                if n:
                    slot.stats.reads += int(n)
            if reads:
                self.quorum.last_client_io = time.monotonic()
            if "requests" in msg:
                self.requests.update(w, msg["requests"])
        else:
            log.error("worker %d: unexpected message %r", w.index, msg)

    def _on_exit(self, w: Worker) -> None:
        w.ready = False
        self.requests.retire(w)  # its counts stay in the sums
        if all(x.ready for x in self.workers if x is not w):
            self._all_ready.set()  # start() need not wait for a dead worker
        self._task(self._reap(w))

    def _send(self, w: Worker, msg: Message, fds: list[int] | None = None) -> bool:
        """Send to a worker; one that stopped reading is killed (and started again)."""
        if w.channel.send(msg, fds or ()):
            return True
        if not w.channel.closed:
            log.error("worker %d does not read its control channel; killing it", w.index)
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()
            w.channel.close()
            self._on_exit(w)
        return False

    async def _reap(self, w: Worker) -> None:
        code = await asyncio.get_running_loop().run_in_executor(None, w.proc.wait)
        if w in self.workers:
            self.workers.remove(w)
        w.exited.set()
        if self.stopping:
            log.info("worker %d stopped (exit status %d)", w.index, code)
            return
        if code == CANNOT_START:
            # the reason was sent before the exit, but the exit may be seen first:
            # give the control channel a moment to deliver it
            for _ in range(100):
                if w.cannot_start:
                    break
                await asyncio.sleep(0.01)
            # it would fail the same way again: one line, no restarts
            log.error("worker %d cannot start: %s; not restarting it (%d of %d worker "
                      "processes running)", w.index, w.cannot_start or f"exit status {code}",
                      self.running(), self.count)
            return
        log.error("worker %d exited unexpectedly (status %d); its %d connection(s) were lost",
                  w.index, code, w.conns)
        quick = w.quick_deaths + 1 if time.monotonic() - w.started < RESPAWN_QUICK else 0
        await asyncio.sleep(RESPAWN_DELAY * 2 ** min(quick, 5))
        if not self.stopping:
            self._spawn(w.index, quick)

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let every worker finish its requests and exit."""
        self.stopping = True
        with contextlib.suppress(ValueError):
            self.quorum.on_change.remove(self.push_view)
        for t in self._accepting:
            t.cancel()
        for s in self._listeners:
            s.close()
        self._listeners.clear()
        for li in self._owned:
            li.close()
        self._owned.clear()
        for w in list(self.workers):
            self._send(w, {"op": "shutdown", "grace": grace})
        for w in list(self.workers):
            try:
                await asyncio.wait_for(w.exited.wait(), grace + 5)
            except TimeoutError:
                log.error("worker %d did not stop; killing it", w.index)
                with contextlib.suppress(ProcessLookupError):
                    w.proc.kill()
                await w.exited.wait()
        self._epoch_map.close()
        os.close(self._epoch_fd)

    def reload_tls(self) -> None:
        """SIGHUP: every worker loads the certificates again for its new handshakes
        (a worker started later loads the files as they are then)."""
        for w in list(self.workers):
            self._send(w, {"op": "tls-reload"})

    # -- the view ----------------------------------------------------------------------
    def _bump(self) -> None:
        self.epoch += 1
        EPOCH.pack_into(self._epoch_map, 0, self.epoch)

    def _view(self) -> tuple[Message, list[int]]:
        """The voters as a worker may use them: each child by kind ("file": its
        descriptor follows), or not local at all (every read forwarded)."""
        q = self.quorum
        voters = q.active()
        directs = [s.node.direct() for s in voters]
        fds = [d.fd if d is not None else None for d in directs]
        fifo = q.read_pattern is ReadPattern.FIFO
        # a fault injector's rules change without a quorum change: never local
        local = (bool(voters) and None not in fds and all(_plain(s.node) for s in voters)
                 and len(voters) >= (1 if fifo else q.vote_threshold))
        msg: Message = {
            "op": "view", "epoch": self.epoch, "local": local,
            "threshold": q.vote_threshold, "fifo": fifo,
            "children": ([{"name": s.node.node_name, "kind": "file"} for s in voters]
                         if local else []),
        }
        return msg, [fd for fd in fds if fd is not None] if local else []

    def _send_view(self, w: Worker) -> None:
        msg, fds = self._view()
        self._send(w, msg, fds)

    def push_view(self) -> None:
        """The quorum changed: invalidate the workers' views now, send new ones."""
        if self._epoch_map.closed:
            return
        self._bump()
        msg, fds = self._view()
        for w in list(self.workers):
            self._send(w, msg, fds)

    # -- connections ---------------------------------------------------------------------
    async def serve_listener(self, li: Listener) -> None:
        """Accept on a socket bound by sockets.bind_unix/bind_tcp and place each connection."""
        li.listen()
        self._listen(li.sock)

    async def listen_unix(self, path: str) -> None:
        """Bind ``path`` (never over a live server) and serve it; removed at shutdown."""
        li = bind_unix(path)
        self._owned.append(li)
        self._listen(li.sock)

    async def listen_tcp(self, host: str, port: int) -> None:
        """Listen on every address the host resolves to (as asyncio.start_server)."""
        for li in bind_tcp(host, port):
            self._owned.append(li)
            self._listen(li.sock)

    def _listen(self, s: socket.socket) -> None:
        s.setblocking(False)
        self._listeners.append(s)
        self._accepting.append(asyncio.get_running_loop().create_task(self._accept(s)))

    async def _accept(self, s: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            try:
                conn, _addr = await loop.sock_accept(s)
            except (OSError, ValueError) as err:
                if self.stopping or s.fileno() < 0:
                    return
                log.warning("accept failed: %s", err)
                await asyncio.sleep(0.1)
                continue
            self.place(conn)

    def clients(self) -> int:
        """Client connections open over the whole server: here and on the workers."""
        return self.here + sum(w.conns for w in self.workers)

    def place(self, conn: socket.socket) -> None:
        """Serve a new connection here or on the least-loaded worker (ties: here);
        beyond --max-connections (counted over every process) it is closed."""
        limit = self.nbd.max_connections
        if limit is not None and self.clients() >= limit:
            log_drop("max-connections", "%d client connections open (--max-connections): "
                     "closing a new one", self.clients())
            conn.close()
            return
        best: Worker | None = None
        load = self.here
        for w in self.workers:
            if w.ready and (w.conns < load or (self.take_all and best is None)):
                best, load = w, w.conns
        if best is not None and self._send(best, {"op": "conn"}, [conn.fileno()]):
            best.conns += 1
            conn.close()
            return
        self.here += 1  # now, not in the task: a burst of accepts must see it
        self._task(self._serve_here(conn))

    async def _serve_here(self, conn: socket.socket) -> None:
        try:
            await self.nbd.serve_socket(conn)
        finally:
            self.here -= 1


def _plain(node: BlockNode) -> bool:
    """No fault injector anywhere below: reads of its descriptor are the node's reads."""
    return node.driver != "faulty" and all(_plain(c) for c in node.children_nodes())
