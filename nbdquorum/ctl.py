"""``nbdquorum ctl``: the operator's client for a running server's QMP socket.

Subcommands: ``status`` (a table of children, states and counters, like
``zpool status``), ``add NAME=PATH|URI``, ``remove NAME``, ``replace OLD NAME=PATH|URI``,
``threshold N``, ``scrub``, ``events`` (follow) and ``qmp COMMAND|JSON``.  Each is a short
sequence of ordinary QMP commands, so anything ctl does can be scripted with
any QMP client too.

Exit codes scripts can rely on:
    0  success
    1  the server refused a command (its ``desc`` goes to stderr)
    2  usage error (bad arguments, an ambiguous quorum)
    3  cannot connect to the control socket, or the connection broke

The QMP client here uses plain blocking sockets: ctl must run where only the
standard library is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any, Final

from nbdquorum.remote.uri import AddressError, is_uri, parse_uri

EXIT_OK: Final = 0
EXIT_QMP_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_CONNECT: Final = 3

DEFAULT_TIMEOUT: Final = 30.0
POLL_INTERVAL: Final = 0.2
#: replace/add --wait give up after this many failed resync attempts in a row
RESYNC_GIVE_UP: Final = 3


# --------------------------------------------------------------------------- errors


class CtlError(Exception):
    """Ends the command with ``exit_code``; ``str()`` is the message for stderr."""

    exit_code = EXIT_QMP_ERROR


class QMPReplyError(CtlError):
    """The server answered with an error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


class ConnectError(CtlError):
    exit_code = EXIT_CONNECT


class UsageProblem(CtlError):
    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------- client


class QMPClient:
    """A small synchronous QMP client: greeting, negotiation, commands, events."""

    def __init__(self, path: str, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise ConnectError(f"cannot connect to {path}: {err.strerror or err}") from err
        self._file: IO[bytes] = self.sock.makefile("rb")
        self.greeting = self.recv()
        if "QMP" not in self.greeting:
            self.close()
            raise ConnectError(f"{path} is not a QMP monitor (greeting: {self.greeting})")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        try:
            self._file.close()
        except (OSError, AttributeError):
            pass
        self.sock.close()

    def __enter__(self) -> QMPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def recv(self, *, block: bool = False) -> dict[str, Any]:
        """The next message; ``block`` waits without the client's timeout."""
        if block:
            self.sock.settimeout(None)
        try:
            line = self._file.readline()
        except TimeoutError as err:
            raise ConnectError(f"no answer from {self.path} within {self.timeout}s") from err
        except OSError as err:
            raise ConnectError(f"connection to {self.path} broke: {err.strerror or err}") from err
        finally:
            if block:
                self.sock.settimeout(self.timeout)
        if not line:
            raise ConnectError(f"{self.path} closed the connection")
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise ConnectError(f"{self.path} sent something that is not JSON: {line!r}") from err
        if not isinstance(msg, dict):
            raise ConnectError(f"{self.path} sent a non-object: {line!r}")
        return msg

    def send(self, msg: dict[str, Any]) -> None:
        try:
            self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        except OSError as err:
            raise ConnectError(f"connection to {self.path} broke: {err.strerror or err}") from err

    def raw(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send ``msg`` as given; returns the first message that is not an event."""
        self.send(msg)
        while True:
            reply = self.recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            return reply

    def execute(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run a command; returns its ``return`` value.

        Raises:
            QMPReplyError: the server answered with an error.
            ConnectError: the connection failed.
        """
        self._next_id += 1
        ident = f"ctl-{self._next_id}"
        msg: dict[str, Any] = {"execute": name, "id": ident}
        if arguments:
            msg["arguments"] = arguments
        self.send(msg)
        while True:
            reply = self.recv()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != ident:
                if "error" in reply and "id" not in reply:  # a parse error: ours is broken
                    err = reply["error"]
                    raise QMPReplyError(err.get("class", "?"), err.get("desc", "?"))
                continue  # not ours: qmp-spec says to drop it
            if "error" in reply:
                err = reply["error"]
                raise QMPReplyError(err.get("class", "?"), err.get("desc", "?"))
            return reply.get("return")

    def follow(self) -> Iterator[dict[str, Any]]:
        """Every event, as it arrives, forever."""
        while True:
            while self.events:
                yield self.events.pop(0)
            msg = self.recv(block=True)
            if "event" in msg:
                yield msg


# --------------------------------------------------------------------------- helpers


def parse_named_path(text: str) -> tuple[str, str]:
    """NAME=PATH (an image file, made absolute) or NAME=URI (an NBD export)."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UsageProblem(f"expected NAME=PATH or NAME=nbd://HOST[:PORT]/EXPORT, got {text!r}")
    if is_uri(path):
        try:
            parse_uri(path)
        except AddressError as err:
            raise UsageProblem(str(err)) from err
        return name, path
    return name, os.path.abspath(path)


def quorum_status(client: QMPClient, node: str | None = None) -> list[dict[str, Any]]:
    args = {"node-name": node} if node else None
    result = client.execute("query-quorum-status", args)
    assert isinstance(result, list)
    return result


def pick_parent(client: QMPClient, parent: str | None) -> str:
    """The quorum to act on: ``--parent``, or the server's only quorum."""
    if parent:
        return parent
    names = [q["node-name"] for q in quorum_status(client)]
    if not names:
        raise CtlError("the server has no quorum node")
    if len(names) > 1:
        raise UsageProblem(f"the server has several quorum nodes ({', '.join(names)}): "
                           "give --parent")
    return str(names[0])


def child_of(status: dict[str, Any], node: str) -> dict[str, Any] | None:
    return next((c for c in status["children"] if c.get("node-name") == node), None)


def blockdev_options(name: str, path: str) -> dict[str, Any]:
    """blockdev-add's arguments for an image file, or QEMU's nbd node for a URI."""
    if is_uri(path):
        addr = parse_uri(path)
        opts: dict[str, Any] = {"driver": "nbd", "node-name": name, "server": addr.server(),
                                "export": addr.export}
        return opts
    return {"driver": "raw", "node-name": name, "file": {"driver": "file", "filename": path}}


def add_child(client: QMPClient, parent: str, name: str, path: str,
              resync: str | None = None) -> None:
    client.execute("blockdev-add", blockdev_options(name, path))
    args: dict[str, Any] = {"parent": parent, "child": name}
    if resync is not None:
        args["x-resync"] = resync
    try:
        client.execute("x-blockdev-child-add", args)
    except QMPReplyError:
        try:  # leave nothing behind
            client.execute("blockdev-del", {"node-name": name})
        except QMPReplyError as err:
            print(f"nbdquorum ctl: could not delete {name} again: {err.desc}", file=sys.stderr)
        raise


class ProgressBar:
    """``label [#####     ]  42.0%  12.3 MiB/s`` redrawn in place on a terminal.

    Off a terminal it draws nothing (a log file gets no carriage returns);
    :meth:`finish` then leaves the cursor on a fresh line either way, so the
    line printed after it (the "done" line) is never overwritten.
    """

    WIDTH: Final = 30

    def __init__(self, label: str, out: IO[str]) -> None:
        self.label = label
        self.out = out
        self.tty = out.isatty()
        self.drawn = False
        self._start: tuple[float, int] | None = None  # (time, bytes done) at the first draw
        self._rate = ""

    def update(self, done: int, total: int) -> None:
        if not self.tty or total <= 0:
            return
        now = time.monotonic()
        if self._start is None:
            self._start = (now, done)
        t0, d0 = self._start
        if now > t0 and done > d0:
            self._rate = f"  {(done - d0) / (now - t0) / 2**20:7.1f} MiB/s"
        self._draw(min(1.0, max(0.0, done / total)))

    def _draw(self, fraction: float) -> None:
        bar = "#" * int(fraction * self.WIDTH)
        self.out.write(f"\r{self.label} [{bar:<{self.WIDTH}}] {fraction * 100:5.1f}%"
                       f"{self._rate}   ")
        self.out.flush()
        self.drawn = True

    def finish(self) -> None:
        """Draw 100% and end the line (only if a bar was drawn)."""
        if self.drawn:
            self._draw(1.0)
            self.out.write("\n")
            self.out.flush()
            self.drawn = False


def wait_active(client: QMPClient, parent: str, name: str, timeout: float | None,
                out: IO[str]) -> None:
    """Poll until the child ``name`` votes (its resync is done)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shown = None
    bar = ProgressBar(f"resync {name}", out)
    try:
        while True:
            (status,) = quorum_status(client, parent)
            child = child_of(status, name)
            if child is None:
                raise CtlError(f"{name} left {parent} while it was being synchronized")
            state = child.get("state")
            if state == "active":
                bar.finish()
                return
            if state == "faulted":
                raise CtlError(f"{name} faulted while it was being synchronized")
            failures = child.get("resync-failures", 0)
            if isinstance(failures, int) and failures >= RESYNC_GIVE_UP:
                raise CtlError(f"the resync of {name} failed {failures} times "
                               f"(last: {child.get('resync-error')}); the server keeps "
                               f"retrying, {name} stays out of the vote")
            left = child.get("unsynced-bytes")
            size = status.get("size")
            if bar.tty and isinstance(left, int) and isinstance(size, int) and size > 0:
                bar.update(size - left, size)
            elif left != shown:
                print(f"waiting for {name} to resync ({state}"
                      + (f", {_human(left)} to go" if isinstance(left, int) else "") + ")",
                      file=out, flush=True)
                shown = left
            if deadline is not None and time.monotonic() > deadline:
                raise CtlError(f"{name} is still {state} after {timeout}s")
            time.sleep(POLL_INTERVAL)
    finally:
        if bar.drawn:  # interrupted mid-bar: end its line before the error message
            out.write("\n")
            out.flush()


def describe_child(client: QMPClient, parent: str, name: str) -> str:
    """``active (in sync)`` or ``resyncing (16.0 MiB to copy)``: for confirmation lines."""
    (status,) = quorum_status(client, parent)
    child = child_of(status, name)
    if child is None:
        return "not a member"
    state = str(child.get("state"))
    left = child.get("unsynced-bytes")
    if state == "active":
        return "active (in sync)"
    if state == "resyncing" and isinstance(left, int):
        return f"resyncing ({_human(left)} to copy)"
    return state


# --------------------------------------------------------------------------- status table

_FIRST: Final = ("child", "node-name", "state")
_LAST: Final = ("filename",)
#: counters first in zpool's order of interest; any other numeric member follows
_COUNTERS: Final = ("reads", "writes", "read-errors", "write-errors", "flush-errors",
                    "checksum-errors", "repaired-bytes", "unsynced-bytes")
_LABELS: Final = {"child": "EDGE", "node-name": "NODE", "read-errors": "READ-ERR",
                  "write-errors": "WRITE-ERR", "flush-errors": "FLUSH-ERR",
                  "checksum-errors": "CKSUM", "repaired-bytes": "REPAIRED",
                  "unsynced-bytes": "UNSYNCED", "filename": "FILE"}


def _human(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _count(n: int, what: str) -> str:
    plural = "children" if what == "child" else f"{what}s"
    return f"{n} {what if n == 1 else plural}"


def _local_time(epoch: Any) -> str:
    if not isinstance(epoch, int | float) or isinstance(epoch, bool):
        return "at an unknown time"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch))


def format_scrub(scrub: dict[str, Any], members: Sequence[str]) -> str:
    """The ``last scrub`` line: kind, outcome, local date, what it found on CURRENT members.

    A child removed since the scrub is not named (its node-name may even belong to
    another image by now).
    """
    kind = "repair" if scrub.get("repair") else "check"
    when = _local_time(scrub.get("finished"))
    if scrub.get("cancelled"):
        outcome = f"cancelled {when}"
    elif scrub.get("error"):
        outcome = f"failed {when} ({scrub['error']})"
    else:
        outcome = f"completed {when}"
    parts = [f"{kind}, {outcome}"]
    scanned = scrub.get("scanned")
    if isinstance(scanned, int):
        parts.append(f"{_human(scanned)} scanned")
    regions = scrub.get("mismatched-regions") or {}
    nbytes = scrub.get("mismatched-bytes") or {}
    found = []
    if isinstance(regions, dict):
        verb = "repaired" if scrub.get("repair") else "differ"
        for name in members:
            n = regions.get(name)
            if isinstance(n, int) and n > 0:
                size = nbytes.get(name) if isinstance(nbytes, dict) else None
                found.append(f"{name}: {_count(n, 'region')}"
                              + (f" ({_human(size)})" if isinstance(size, int) else "")
                              + f" {verb}")
    unrecoverable = scrub.get("unrecoverable-regions")
    if isinstance(unrecoverable, int) and unrecoverable > 0:
        found.append(f"{_count(unrecoverable, 'region')} without a quorum (unrecoverable)")
    parts += found or ["no mismatches"]
    return ", ".join(parts)


def _n(child: dict[str, Any], key: str) -> int:
    value = child.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def diagnose(st: dict[str, Any], *, several: bool = False
             ) -> tuple[str, list[tuple[str, str]]]:
    """``(health, [(status, action), ...])`` of one quorum, like zpool's state/status/action.

    health is ``healthy`` (every child active, no errors counted), ``degraded``
    (a child is out of the vote or has errors; I/O still works) or ``failed``
    (fewer children in sync than the vote threshold: I/O fails).  ``several``:
    the server has several quorums, so the suggested commands name this one.
    """
    node = str(st.get("node-name"))

    def ctl(command: str) -> str:
        parent = f" --parent {node}" if several else ""
        return f"`nbdquorum ctl {command}{parent}`"

    children = [c for c in st.get("children", []) if isinstance(c, dict)]
    scrub = st.get("last-scrub")
    # checksum errors counted before a completed repair scrub ended are repaired
    repaired_upto: dict[str, Any] = {}
    repaired_when = ""
    if (isinstance(scrub, dict) and scrub.get("repair") and not scrub.get("cancelled")
            and not scrub.get("error") and not scrub.get("unrecoverable-regions")
            and isinstance(scrub.get("checksum-errors"), dict)):
        repaired_upto = scrub["checksum-errors"]
        repaired_when = _local_time(scrub.get("finished"))
    notes: list[tuple[str, str]] = []
    threshold = st.get("vote-threshold")
    size = st.get("size")
    active = sum(1 for c in children if c.get("state") == "active")
    problems: list[tuple[str, str]] = []
    failed = isinstance(threshold, int) and active < threshold
    if failed:
        lower = (f"lower the threshold ({ctl(f'threshold {active}')}) to serve from the "
                 "children in sync, or " if active >= 1 else "")
        problems.append((
            f"only {active} of {_count(len(children), 'child')} in sync, fewer than the vote "
            f"threshold {threshold}: reads and writes fail",
            f"{lower}bring children back (below)"))
    for c in children:
        name = str(c.get("node-name"))
        state = c.get("state")
        remote = is_uri(str(c.get("filename", "")))  # a child on another host
        replace = ctl(f"replace {name} NEW=PATH|URI")
        if state == "faulted":
            why = c.get("fault-reason") or _count(_n(c, "errors"), "error")
            fix = "its server or image is fixed" if remote else "its device is fixed"
            problems.append((
                f"{name} is faulted ({why}): it gets no I/O",
                f"{replace}; or, once {fix}, `nbdquorum ctl qmp "
                f"""x-quorum-resync '{{"node-name": "{name}", "full": true}}'`"""))
            continue
        if state == "resyncing":
            left = _n(c, "unsynced-bytes")
            progress = (f"{(1 - left / size) * 100:.1f}% done, {_human(left)} to go"
                        if isinstance(size, int) and size > 0 else f"{_human(left)} to go")
            failures = _n(c, "resync-failures")
            if failures:
                problems.append((
                    f"{name} is resyncing ({progress}), but its resync failed "
                    f"{_count(failures, 'time')} (last: {c.get('resync-error')})",
                    f"check the image of {name}; the server keeps retrying; or {replace}"))
            else:
                problems.append((f"{name} is resyncing: {progress}",
                                 "none needed; it votes once in sync "
                                 f"(`nbdquorum ctl status {node}` shows the progress)"))
        elif state == "unreachable":
            left = _n(c, "unsynced-bytes")
            problems.append((
                f"{name} is unreachable (its host or link is down; "
                f"{_human(left)} written since will be copied when it returns)",
                f"none needed if it comes back: it catches up by itself; to give it up, "
                f"{replace}"))
        elif state != "active":
            problems.append((f"{name} is {state}", f"{replace}"))
        cksum = _n(c, "checksum-errors")
        upto = repaired_upto.get(name)
        if cksum and isinstance(upto, int) and cksum <= upto:
            notes.append((f"{name} had {_count(cksum, 'checksum error')}, repaired by the "
                          f"scrub of {repaired_when}",
                          f"none needed; if more appear, {replace}"))
            c = {**c, "checksum-errors": 0}
        errs = [(_n(c, "checksum-errors"), "checksum error"), (_n(c, "read-errors"), "read error"),
                (_n(c, "write-errors"), "write error"), (_n(c, "flush-errors"), "flush error")]
        found = [_count(n, what) for n, what in errs if n]
        if not found:
            continue
        listed = (", ".join(found[:-1]) + " and " + found[-1]) if len(found) > 1 else found[0]
        text = f"{name} has {listed}"
        if _n(c, "checksum-errors"):
            action = f"run {ctl('scrub --repair')}, or {replace}"
        elif state == "active" and c.get("errors") == 0:
            # I/O errors long past: the count toward the fault limit has decayed to
            # zero (halved every hour), so they are history, not a degraded quorum
            notes.append((f"{name} had {listed}, none lately",
                          f"none needed; if more appear, {replace}"))
            continue
        elif remote:
            action = (f"check the link to {name}'s host and the NBD server there (`x-link` "
                      f"in {ctl('qmp query-named-block-nodes')} says why a connection "
                      f"ended); a lost link is counted too; if errors continue, {replace}")
        else:
            action = (f"check the device behind {name} (kernel log); if errors continue, "
                      f"{replace}")
        problems.append((text, action))
    if failed:
        health = "failed"
    elif problems:
        health = "degraded"
    else:
        health = "healthy"
    return health, problems + notes


def format_status(statuses: Sequence[dict[str, Any]], *, several: bool = False) -> str:
    """``zpool status``-like text: per quorum its health (what is wrong, what to run),
    options, one row per child, the last scrub."""
    out: list[str] = []
    for st in statuses:
        children = st.get("children", [])
        health, problems = diagnose(st, several=several or len(statuses) > 1)
        out.append(f"{st.get('node-name')}: {health}")
        for status, action in problems:
            out.append(f"  status: {status}")
            out.append(f"  action: {action}")
        opts = [f"vote-threshold {st.get('vote-threshold')}",
                f"read-pattern {st.get('read-pattern')}",
                f"rewrite-corrupted {'on' if st.get('rewrite-corrupted') else 'off'}"]
        if isinstance(st.get("size"), int):
            opts.append(f"size {_human(st['size'])}")
        out.append("  " + ", ".join(opts))
        cols = [*_FIRST, *(c for c in _COUNTERS if any(c in ch for ch in children))]
        for child in children:
            for key, value in child.items():
                if (key not in cols and key not in _LAST and isinstance(value, int | float)
                        and not isinstance(value, bool)):
                    cols.append(key)
        cols += [c for c in _LAST if any(c in ch for ch in children)]
        rows = [[_LABELS.get(k, k.upper()) for k in cols]]
        rows += [["" if ch.get(k) is None else str(ch.get(k)) for k in cols] for ch in children]
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        for r in rows:
            cells = []
            for i, cell in enumerate(r):
                numeric = cols[i] not in _FIRST and cols[i] not in _LAST
                cells.append(cell.rjust(widths[i]) if numeric else cell.ljust(widths[i]))
            out.append("  " + "  ".join(cells).rstrip())
        scrub = st.get("last-scrub")
        if isinstance(scrub, dict):
            members = [str(c.get("node-name")) for c in children]
            out.append("  last scrub: " + format_scrub(scrub, members))
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- subcommands


def cmd_status(client: QMPClient, args: argparse.Namespace) -> int:
    statuses = quorum_status(client, args.node)
    if args.json:
        print(json.dumps(statuses, indent=2))
        return EXIT_OK
    several = len(statuses) > 1 or (args.node is not None and len(quorum_status(client)) > 1)
    sys.stdout.write(format_status(statuses, several=several))
    return EXIT_OK


def cmd_add(client: QMPClient, args: argparse.Namespace) -> int:
    name, path = parse_named_path(args.spec)
    parent = pick_parent(client, args.parent)
    add_child(client, parent, name, path)
    if args.wait:
        wait_active(client, parent, name, args.wait_timeout, sys.stderr)
    text = f"added {name} to {parent}: {describe_child(client, parent, name)}"
    if not args.wait and "resyncing" in text:
        text += "; it votes once in sync (`nbdquorum ctl status` shows the progress)"
    _report(args, {"parent": parent, "added": name, "filename": path}, text)
    return EXIT_OK


def cmd_remove(client: QMPClient, args: argparse.Namespace) -> int:
    parent = pick_parent(client, args.parent)
    client.execute("x-blockdev-child-del", {"parent": parent, "child": args.name})
    if not args.keep_node:
        try:
            client.execute("blockdev-del", {"node-name": args.name})
        except QMPReplyError as err:
            raise QMPReplyError(err.error_class, f"{args.name} was detached from {parent}, "
                                                 f"but not closed: {err.desc}") from err
    _report(args, {"parent": parent, "removed": args.name},
            f"removed {args.name} from {parent}"
            + (" (detached; the node stays open)" if args.keep_node else " and closed it"))
    return EXIT_OK


def cmd_replace(client: QMPClient, args: argparse.Namespace) -> int:
    name, path = parse_named_path(args.spec)
    parent = pick_parent(client, args.parent)
    (status,) = quorum_status(client, parent)
    if child_of(status, args.old) is None:
        raise QMPReplyError("GenericError", f"Node '{args.old}' is not a child of '{parent}'")
    add_child(client, parent, name, path)
    if not args.no_wait:
        wait_active(client, parent, name, args.wait_timeout, sys.stderr)
    client.execute("x-blockdev-child-del", {"parent": parent, "child": args.old})
    if not args.keep_node:
        client.execute("blockdev-del", {"node-name": args.old})
    gone = "detached (node kept open)" if args.keep_node else "removed"
    if args.no_wait:
        text = (f"replaced {args.old} with {name} in {parent}: {args.old} {gone}; "
                f"{name} is {describe_child(client, parent, name)}")
    else:
        text = f"replaced {args.old} with {name} in {parent}: done ({name} in sync, {args.old} {gone})"
    _report(args, {"parent": parent, "added": name, "filename": path, "removed": args.old}, text)
    return EXIT_OK


def cmd_threshold(client: QMPClient, args: argparse.Namespace) -> int:
    parent = pick_parent(client, args.parent)
    (before,) = quorum_status(client, parent)
    client.execute("blockdev-reopen", {"options": [
        {"driver": "quorum", "node-name": parent, "vote-threshold": args.n}]})
    old = before.get("vote-threshold")
    _report(args, {"parent": parent, "vote-threshold": args.n},
            f"{parent}: vote-threshold {args.n}" + (f" (was {old})" if old != args.n
                                                    else " (unchanged)"))
    return EXIT_OK


def _job(client: QMPClient, job_id: str) -> dict[str, Any] | None:
    jobs = client.execute("query-jobs")
    assert isinstance(jobs, list)
    return next((j for j in jobs if isinstance(j, dict) and j.get("id") == job_id), None)


def cmd_scrub(client: QMPClient, args: argparse.Namespace) -> int:
    parent = pick_parent(client, args.parent)
    (before,) = quorum_status(client, parent)
    job_id = f"scrub-{parent}"
    kind = "repair" if args.repair else "check"
    arguments: dict[str, Any] = {"node-name": parent, "repair": args.repair, "job-id": job_id}
    if args.speed is not None:
        arguments["speed"] = args.speed
    client.execute("x-quorum-scrub", arguments)
    if not args.wait:
        _report(args, {"parent": parent, "job": job_id, "repair": args.repair},
                f"started a scrub ({kind}) of {parent} as job {job_id}; `nbdquorum ctl "
                f"status` shows the result when it is done (or run with --wait)")
        return EXIT_OK
    bar = ProgressBar(f"scrub {parent}", sys.stderr)
    if not bar.tty:
        print(f"scrubbing {parent} ({kind}) ...", file=sys.stderr, flush=True)
    deadline = None if args.wait_timeout is None else time.monotonic() + args.wait_timeout
    try:
        while (job := _job(client, job_id)) is not None:
            done, total = job.get("current-progress"), job.get("total-progress")
            if isinstance(done, int) and isinstance(total, int):
                bar.update(done, total)
            if deadline is not None and time.monotonic() > deadline:
                raise CtlError(f"the scrub of {parent} still runs after {args.wait_timeout}s "
                               f"(job {job_id}; `nbdquorum ctl qmp job-cancel "
                               f"""'{{"id": "{job_id}"}}'` stops it)""")
            time.sleep(POLL_INTERVAL)
        (after,) = quorum_status(client, parent)
        result = after.get("last-scrub")
        if not isinstance(result, dict) or result == before.get("last-scrub"):
            raise CtlError(f"the scrub of {parent} ended without a result")
        if not result.get("cancelled") and not result.get("error"):
            bar.finish()
    finally:
        if bar.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
    members = [str(c.get("node-name")) for c in after.get("children", [])]
    _report(args, {"parent": parent, "job": job_id, "last-scrub": result},
            f"scrub of {parent}: {format_scrub(result, members)}")
    if result.get("cancelled") or result.get("error"):
        return EXIT_QMP_ERROR
    return EXIT_OK


def cmd_events(client: QMPClient, args: argparse.Namespace) -> int:
    seen = 0
    if args.count is not None and args.count <= 0:
        return EXIT_OK
    for ev in client.follow():
        if args.name and ev.get("event") not in args.name:
            continue
        print(json.dumps(ev), flush=True)
        seen += 1
        if args.count is not None and seen >= args.count:
            break
    return EXIT_OK


#: what ``ctl qmp NAME`` takes for a command name (QAPI names: letters, digits, ``-_``)
_COMMAND_NAME: Final = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def parse_message(text: str, arguments: str | None = None) -> dict[str, Any]:
    """The message of ``ctl qmp``: raw JSON, or a command name and optional JSON arguments.

    Raises:
        UsageProblem: neither, or arguments that are not a JSON object.
    """
    if _COMMAND_NAME.fullmatch(text):
        msg: dict[str, Any] = {"execute": text}
        if arguments is not None:
            try:
                args = json.loads(arguments)
            except ValueError as err:
                raise UsageProblem(f"the arguments of {text} are not JSON: {err}") from err
            if not isinstance(args, dict):
                raise UsageProblem(f"the arguments of {text} must be a JSON object, "
                                   """e.g. '{"node-name": "child1"}'""")
            msg["arguments"] = args
        return msg
    if arguments is not None:
        raise UsageProblem("give either a whole JSON message or a command name and its "
                           "arguments, not a JSON message and more")
    try:
        parsed = json.loads(text)
    except ValueError as err:
        raise UsageProblem(f"neither a command name nor JSON: {err}") from err
    if not isinstance(parsed, dict):
        raise UsageProblem("the message must be a JSON object")
    return parsed


def known_events() -> list[str]:
    """The event names the server can send (the table in qmp/schema.py)."""
    from nbdquorum.qmp.schema import EVENTS

    return sorted(EVENTS)


def check_event_names(names: Sequence[str]) -> list[str]:
    """``names`` spelled as the server sends them (any case accepted).

    Raises:
        UsageProblem: an unknown name; the message lists the known ones.
    """
    known = known_events()
    out = []
    for name in names:
        if name.upper() not in known:
            raise UsageProblem(f"unknown event {name!r}; the server sends: "
                               + ", ".join(known))
        out.append(name.upper())
    return out


def cmd_qmp(client: QMPClient, args: argparse.Namespace) -> int:
    reply = client.raw(parse_message(args.message, args.arguments))
    print(json.dumps(reply))
    if "error" in reply:
        error = reply["error"]
        print(f"nbdquorum ctl: {error.get('class')}: {error.get('desc')}", file=sys.stderr)
        return EXIT_QMP_ERROR
    return EXIT_OK


def check_usage(args: argparse.Namespace) -> None:
    """Argument problems argparse cannot see, found before connecting.

    Raises:
        UsageProblem: with the message for stderr.
    """
    if args.ctl_command == "qmp":
        parse_message(args.message, args.arguments)
    if args.ctl_command == "events" and args.name:
        args.name = check_event_names(args.name)
    if args.ctl_command in ("add", "replace"):
        parse_named_path(args.spec)


def _report(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """The confirmation of a change: ``result`` as JSON with --json, else ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(result), flush=True)
    else:
        print(text, flush=True)


COMMANDS: Final = {
    "status": cmd_status,
    "add": cmd_add,
    "remove": cmd_remove,
    "replace": cmd_replace,
    "threshold": cmd_threshold,
    "scrub": cmd_scrub,
    "events": cmd_events,
    "qmp": cmd_qmp,
}


# --------------------------------------------------------------------------- argparse


def _integer(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    return n


def _connection_options(p: argparse.ArgumentParser, *, default: bool) -> None:
    p.add_argument("--control", metavar="PATH",
                   default=os.environ.get("NBDQUORUM_CONTROL") if default else argparse.SUPPRESS,
                   help="the server's --control socket (default: $NBDQUORUM_CONTROL)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   default=DEFAULT_TIMEOUT if default else argparse.SUPPRESS,
                   help=f"for each reply (default {DEFAULT_TIMEOUT:g})")


def _sub_parser_class(common: argparse.ArgumentParser) -> type[argparse.ArgumentParser]:
    """A parser class whose instances all inherit ``common``'s options."""

    class SubParser(argparse.ArgumentParser):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["parents"] = [*kwargs.get("parents", ()), common]
            super().__init__(*args, **kwargs)

    return SubParser


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``ctl`` on the main parser's subcommands."""
    p = sub.add_parser(
        "ctl", help="operate a running server over its QMP control socket",
        description="Operate a running nbdquorum server over its QMP control socket. "
                    "Exit codes: 0 ok, 1 the server refused a command, 2 usage, "
                    "3 cannot connect.")
    _connection_options(p, default=True)
    # the same options after the subcommand (`ctl status --control S`): without a
    # default there, so they override the value before it only when given
    common = argparse.ArgumentParser(add_help=False)
    _connection_options(common, default=False)
    csub = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND",
                            parser_class=_sub_parser_class(common))

    s = csub.add_parser("status", help="children, states, counters and threshold")
    s.add_argument("node", nargs="?", help="only this quorum node")
    s.add_argument("--json", action="store_true", help="query-quorum-status as JSON")

    def parent_opt(q: argparse.ArgumentParser) -> None:
        q.add_argument("--parent", metavar="NODE", help="the quorum (default: the only one)")
        q.add_argument("--json", action="store_true", help="print the result as JSON")

    a = csub.add_parser("add", help="open an image and attach it as a new child")
    a.add_argument("spec", metavar="NAME=PATH|URI",
                   help="node-name and raw image (or nbd:// URI) of the new child")
    a.add_argument("--wait", action="store_true", help="wait until the new child is in sync")
    a.add_argument("--wait-timeout", type=float, metavar="SECONDS")
    parent_opt(a)

    r = csub.add_parser("remove", help="detach a child and close it")
    r.add_argument("name", metavar="NAME", help="node-name of the child")
    r.add_argument("--keep-node", action="store_true", help="detach only; keep the node open")
    parent_opt(r)

    rp = csub.add_parser("replace", help="add a new child, wait for its resync, remove OLD")
    rp.add_argument("old", metavar="OLD", help="node-name of the child to replace")
    rp.add_argument("spec", metavar="NAME=PATH|URI",
                    help="node-name and raw image (or nbd:// URI) of the new child")
    rp.add_argument("--no-wait", action="store_true",
                    help="remove OLD without waiting for the new child to resync")
    rp.add_argument("--wait-timeout", type=float, metavar="SECONDS")
    rp.add_argument("--keep-node", action="store_true", help="keep OLD open after detaching it")
    parent_opt(rp)

    t = csub.add_parser("threshold", help="change the vote threshold (blockdev-reopen)")
    t.add_argument("n", type=_integer, metavar="N")
    parent_opt(t)

    sc = csub.add_parser("scrub", help="read and vote every region; --repair rewrites losers",
                         description="Start a scrub (x-quorum-scrub): every region of every "
                                     "active child is read and voted on; children that lose "
                                     "are counted, and with --repair rewritten. Without "
                                     "--wait it returns at once; the result then appears in "
                                     "`ctl status` (last scrub). With --wait: a progress bar "
                                     "on a terminal, then a summary line; exit 1 if the "
                                     "scrub was cancelled or failed.")
    sc.add_argument("--repair", action="store_true",
                    help="rewrite the regions where a child lost the vote")
    sc.add_argument("--wait", action="store_true", help="wait for the end; print a summary")
    sc.add_argument("--wait-timeout", type=float, metavar="SECONDS")
    sc.add_argument("--speed", type=_integer, metavar="BYTES",
                    help="rate limit in bytes per second (default unlimited)")
    parent_opt(sc)

    e = csub.add_parser("events", help="print events as JSON lines until interrupted")
    e.add_argument("--count", type=_integer, metavar="N", help="stop after N events")
    e.add_argument("--name", action="append", metavar="EVENT",
                   help="only these events (repeat); one of " + ", ".join(known_events()))

    q = csub.add_parser(
        "qmp", help="send one QMP command and print the reply",
        description="Send one QMP message and print the reply as JSON: a command name "
                    "(`ctl qmp query-jobs`), a name and its arguments as a JSON object "
                    """(`ctl qmp x-quorum-scrub '{"repair": true}'`), or a whole raw """
                    """message (`ctl qmp '{"execute": "query-version", "id": 1}'`).""")
    q.add_argument("message", metavar="COMMAND|JSON",
                   help="a command name, or a whole JSON message")
    q.add_argument("arguments", metavar="ARGUMENTS", nargs="?",
                   help="the command's arguments, a JSON object (with a command name only)")


def run(args: argparse.Namespace) -> int:
    """Run ``nbdquorum ctl``; returns the exit code."""
    if not args.control:
        print("nbdquorum ctl: error: --control PATH is required (or set NBDQUORUM_CONTROL)",
              file=sys.stderr)
        return EXIT_USAGE
    fn = COMMANDS[args.ctl_command]
    timeout = args.timeout if args.timeout and args.timeout > 0 else None
    try:
        check_usage(args)
        with QMPClient(args.control, timeout) as client:
            return fn(client, args)
    except CtlError as err:
        print(f"nbdquorum ctl: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return EXIT_OK if args.ctl_command == "events" else 130
    except BrokenPipeError:
        return EXIT_OK  # stdout closed (ctl events | head)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nbdquorum.ctl ...`` without the main CLI (same arguments as ``ctl``)."""
    parser = argparse.ArgumentParser(prog="nbdquorum")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["ctl", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
