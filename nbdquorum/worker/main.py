"""A worker process, started by pool.py (never by hand) through its BOOTSTRAP, which
imports this package from where the primary loaded it, whatever the current directory.

It inherits three descriptors from the primary: the control channel, its end
of the forwarding connection (NBD, the worker is the client) and the shared
epoch page.  It serves the connections the primary hands it until told to
stop, or until the primary goes away (end of the control channel), when it
stops at once: without the primary no write can be made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import signal
import socket
from collections.abc import Sequence
from typing import Any

from nbdquorum.runtime import run_loop, setup_logging
from nbdquorum.worker.control import Channel, Message
from nbdquorum.worker.node import LOCAL_KINDS, View, WorkerNode

log = logging.getLogger("nbdquorum.worker")

#: how often local read counts go to the primary (seconds)
STATS_INTERVAL = 1.0


async def run(index: int, ctl_fd: int, data_fd: int, epoch_fd: int, cfg: dict[str, Any]) -> int:
    from nbdquorum import native
    from nbdquorum.nbd.client import NBDClient
    from nbdquorum.nbd.protocol import TLSMode
    from nbdquorum.nbd.server import READ_CHUNK, ClientLimits, Export, NBDServer
    from nbdquorum.nbd.tls import TLSConfig, TLSConfigError, TLSContexts
    from nbdquorum.runtime import MALLOC_HEAP_MAX

    native.tune_malloc(MALLOC_HEAP_MAX)
    tls_cfg = TLSConfig.from_json(cfg.get("tls") or {"mode": "off"})
    try:
        tls = TLSContexts(tls_cfg) if tls_cfg.mode is not TLSMode.OFF else None
    except TLSConfigError as err:  # the files changed since the primary loaded them
        from nbdquorum.worker.pool import CANNOT_START

        Channel(socket.socket(fileno=ctl_fd), lambda *_a: None, lambda: None).send(
            {"op": "cannot-start", "error": f"TLS certificates: {err}"})
        return CANNOT_START
    epoch = mmap.mmap(epoch_fd, mmap.PAGESIZE, prot=mmap.PROT_READ)
    data = socket.socket(fileno=data_fd)
    reader, writer = await asyncio.open_connection(sock=data, limit=READ_CHUNK)
    # the forwarding connection is internal: never TLS (a socketpair to the primary)
    primary = await NBDClient.connect(reader, writer, cfg["export"])
    node = WorkerNode(cfg["node"], primary.info.size, primary, epoch, cfg["child_timeout"])
    export = Export(cfg["export"], node, description=cfg["description"],
                    read_only=cfg["read_only"],
                    read_buffers=lambda: max(1, len(node.view.voters()[0])))
    nbd = NBDServer({cfg["export"]: export}, cfg["export"], budget=cfg["budget"],
                    limits=ClientLimits(**cfg.get("limits", {})), tls=tls)
    stop = asyncio.Event()
    grace = [float(cfg["child_timeout"]) * 2 + 5]
    tasks: set[asyncio.Task[None]] = set()
    channel: Channel

    async def serve(sock: socket.socket) -> None:
        try:
            await nbd.serve_socket(sock)
        finally:
            channel.send({"op": "closed"})

    def on_message(msg: Message, fds: list[int], truncated: bool) -> None:
        op = msg.get("op")
        if op == "view":
            first = node.view.epoch < 0
            children = list(msg["children"])
            view = View(epoch=int(msg["epoch"]), local=bool(msg["local"]),
                        threshold=int(msg["threshold"]), fifo=bool(msg["fifo"]),
                        names=[str(c["name"]) for c in children], fds=fds, size=node.size())
            if any(c.get("kind") not in LOCAL_KINDS for c in children):
                view.local = False  # a kind of child this worker cannot read itself
            if truncated or len(fds) != len(view.names):
                # Out of descriptors: a vote over fewer children than the primary
                # has would not be its vote.  Forward every read until the next view.
                log.error("worker %d: view %d arrived with %d of %d descriptors; "
                          "forwarding every read", index, view.epoch, len(fds), len(view.names))
                view.local = False
            node.set_view(view)
            if first:
                channel.send({"op": "ready"})
        elif op == "conn":
            if len(fds) != 1 or truncated or stop.is_set():
                if len(fds) != 1 or truncated:
                    log.error("worker %d: a connection arrived without its descriptor", index)
                for fd in fds:
                    os.close(fd)
                channel.send({"op": "closed"})
                return
            t = asyncio.get_running_loop().create_task(serve(socket.socket(fileno=fds[0])))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        elif op == "tls-reload":
            if tls is not None:
                tls.reload()
        elif op == "shutdown":
            grace[0] = float(msg.get("grace", grace[0]))
            stop.set()
        else:
            log.error("worker %d: unexpected control message %r", index, msg)
            for fd in fds:
                os.close(fd)

    def on_eof() -> None:
        if not stop.is_set():
            log.error("worker %d: the primary went away; stopping", index)
            grace[0] = 1.0
            stop.set()

    channel = Channel(socket.socket(fileno=ctl_fd), on_message, on_eof)
    channel.start()
    # SIGTERM to the whole group (systemd's KillMode=control-group) stops a
    # worker as the primary's shutdown message does: in-flight requests finish
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    requests_sent = [0]  # the request total the primary last got

    def send_stats() -> None:
        reads = node.take_reads()
        msg: Message = {"op": "stats", "reads": reads}
        requests = nbd.stats.total()
        if requests != requests_sent[0]:
            msg["requests"] = nbd.stats.snapshot()  # running totals (nbd/stats.py)
        if (reads or "requests" in msg) and channel.send(msg):
            requests_sent[0] = requests

    async def stats_loop() -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            send_stats()

    ticker = asyncio.get_running_loop().create_task(stats_loop())
    primary_lost = primary.closed
    primary_lost.add_done_callback(lambda _t: on_eof())
    await stop.wait()
    await nbd.shutdown(grace=grace[0])
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
    ticker.cancel()
    send_stats()
    await primary.close()
    node.close()
    channel.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nbdquorum.worker")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--ctl-fd", type=int, required=True)
    p.add_argument("--data-fd", type=int, required=True)
    p.add_argument("--epoch-fd", type=int, required=True)
    p.add_argument("--config", required=True, help="JSON from the primary")
    args = p.parse_args(argv)
    cfg = json.loads(args.config)
    setup_logging(cfg.get("verbose", 0), f"[w{args.index}]")
    return run_loop(run(args.index, args.ctl_fd, args.data_fd, args.epoch_fd, cfg))


