"""scripts/bench: nbdquorum vs qemu-storage-daemon's quorum over NBD, side by side.

Theory of operation
-------------------
1. Fresh images: one file of random data, copied byte for byte into every child
   (c0..c7 as needed), plus ``stale``: different random data, the child that
   disagrees everywhere.  Writing them leaves them in the page cache (warm).
2. For every row of the matrix and every repetition, each target (a server
   command line) is started on the same images in turn, fio (nbd engine, Unix
   socket) runs for a fixed time, and the server is stopped: A B A B, so noise
   hits both servers alike.  Around the fio run the server's utime+stime are
   read from /proc/PID/stat; its VmHWM from /proc/PID/status at the end.
3. Rows that read run before rows that write, so the copies are still
   identical when the stale and children-count rows use them (writes reach
   every child of the quorum under test, but not the extra copies).
4. Medians over repetitions, ratios nbdquorum / qsd quorum3, verdicts against
   the targets (bench_report.py), bench-out/results.json, and with
   --write-docs the chart and table in docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_remote  # noqa: E402
import bench_report  # noqa: E402

VENV_PY = ROOT / ".venv" / "bin" / "python"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# -- the matrix ----------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    id: str
    label: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1
    rwmixread: int | None = None
    images: str = "q3"  # which image set: q3, stale, n2, n5, n8, remote
    unit: str = "iops"  # headline metric: iops or mbps
    writes: bool = False  # modifies the images
    #: main (every target), special (nbdq vs qsd only), remote (--remote: the quorums
    #: with a child on another host, and nbdquorum's all-local quorum for the ratio)
    group: str = "main"
    full_only: bool = False
    bssplit: str | None = None  # fio --bssplit (mixed request sizes), instead of bs
    #: hostile clients during the row (scripts/nbd_hostile.py): MODE:CLIENTS[:LENGTH]
    hostile: str = ""
    #: over TLS (x509 certificates made by tests/interop/tls_certs.py): the servers
    #: export with TLS required, fio's nbd engine (libnbd) connects with nbds+unix://
    tls: bool = False


ROWS: list[Row] = [
    Row("randread-4k-qd1", "randread 4k QD1", "randread", "4k", 1),
    Row("randread-4k-qd32", "randread 4k QD32", "randread", "4k", 32),
    Row("randwrite-4k-qd32", "randwrite 4k QD32", "randwrite", "4k", 32, writes=True),
    Row("seqread-1m-qd8", "seqread 1M QD8", "read", "1m", 8, unit="mbps"),
    Row("seqwrite-1m-qd8", "seqwrite 1M QD8", "write", "1m", 8, unit="mbps", writes=True),
    Row("randrw-4k-qd16", "randrw 70/30 4k QD16", "randrw", "4k", 16, rwmixread=70, writes=True),
    Row("seqread-1m-stale", "seqread 1M QD8, one child stale", "read", "1m", 8, images="stale",
        unit="mbps", group="special"),
    Row("multiconn-randread-4k-qd32x4", "randread 4k QD32 x 4 connections", "randread", "4k",
        32, numjobs=4, group="special", full_only=True),
    *[
        Row(f"children-{n}-seqread-1m", f"seqread 1M QD8, {n} children", "read", "1m", 8,
            images=f"n{n}", unit="mbps", group="special", full_only=True)
        for n in (2, 3, 5, 8)
    ],
    Row("memory-read-1m-qd128x4", "memory: randread 1M QD128 x 4 conns", "randread", "1m", 128,
        numjobs=4, unit="mbps", group="special"),
    Row("memory-write-1m-qd128x4", "memory: randwrite 1M QD128 x 4 conns", "randwrite", "1m",
        128, numjobs=4, unit="mbps", writes=True, group="special"),
    # one client must never stop the others (docs/performance.md, "Bounds")
    Row("fair-randread-4k-qd1-stall16", "randread 4k QD1, 16 clients stalled", "randread",
        "4k", 1, group="special", hostile="stall:16"),
    Row("memory-friendly-randrw-mixed", "memory: randrw 4k/64k/1M QD32 x 4 conns", "randrw",
        "4k", 32, numjobs=4, rwmixread=50, unit="mbps", writes=True, group="special",
        bssplit="4k/34:64k/33:1m/33"),
    Row("memory-hostile-stall64", "memory: 64 clients pipeline 1 GiB of reads, read nothing",
        "randread", "4k", 1, group="special", hostile="stall:64"),
    Row("memory-hostile-trickle64", "memory: 64 clients trickle 32 MiB writes", "randread",
        "4k", 1, group="special", hostile="trickle:64:32M"),
    # TLS (docs/tls.md): both servers over TLS 1.3, nbdquorum with OpenSSL, qsd with GnuTLS
    Row("tls-seqread-1m-qd8", "TLS: seqread 1M QD8", "read", "1m", 8, unit="mbps",
        group="special", tls=True),
    Row("tls-randread-4k-qd32", "TLS: randread 4k QD32", "randread", "4k", 32,
        group="special", tls=True),
    # a quorum of two local files and one remote child (qemu-nbd over TCP), --remote
    *[
        Row(f"remote-{r.id}", f"remote child: {r.label}", r.rw, r.bs, r.iodepth,
            rwmixread=r.rwmixread, images="remote", unit=r.unit, writes=r.writes,
            group="remote")
        for r in [
            Row("seqread-1m-qd8", "seqread 1M QD8", "read", "1m", 8, unit="mbps"),
            Row("seqwrite-1m-qd8", "seqwrite 1M QD8", "write", "1m", 8, unit="mbps",
                writes=True),
            Row("randread-4k-qd1", "randread 4k QD1", "randread", "4k", 1),
            Row("randread-4k-qd32", "randread 4k QD32", "randread", "4k", 32),
            Row("randwrite-4k-qd32", "randwrite 4k QD32", "randwrite", "4k", 32, writes=True),
            Row("randrw-4k-qd16", "randrw 70/30 4k QD16", "randrw", "4k", 16, rwmixread=70,
                writes=True),
        ]
    ],
]


# -- targets: how to start each server ----------------------------------------
@dataclass(frozen=True)
class Target:
    id: str
    label: str
    kind: str  # nbdq, qsd, nbdkit
    mode: str = "quorum"  # quorum, fifo, single, remote, remote-alone
    full_only: bool = False
    extra: tuple[str, ...] = ()  # more server arguments
    #: a quorum of two local files and the remote child (--remote only)
    remote: bool = False


#: nbdquorum's configuration for this 2-core machine: one worker process, which
#: takes every second connection (a single connection stays in the primary)
NBDQ_ARGS = ("--workers", "1")

TARGETS: list[Target] = [
    Target("nbdq", "nbdquorum quorum of 3", "nbdq", extra=NBDQ_ARGS),
    Target("qsd", "qsd quorum of 3", "qsd"),
    Target("qsd-fifo", "qsd quorum, fifo", "qsd", "fifo", full_only=True),
    Target("qsd-raw", "qsd one raw file", "qsd", "single", full_only=True),
    Target("nbdkit", "nbdkit one file", "nbdkit", "single", full_only=True),
    Target("nbdq-fifo", "nbdquorum fifo", "nbdq", "fifo", full_only=True, extra=NBDQ_ARGS),
    Target("nbdq-remote", "nbdquorum, 2 local + 1 remote child", "nbdq", "remote",
           extra=NBDQ_ARGS, remote=True),
    Target("qsd-remote", "qsd, 2 local + QEMU's nbd child", "qsd", "remote", remote=True),
    # the hop's own ceiling: nbdquorum with the remote child as its only child (no
    # local copies, no vote): what relaying every byte to the far end costs alone
    Target("nbdq-remote-alone", "nbdquorum, the remote child alone", "nbdq", "remote-alone",
           extra=NBDQ_ARGS, remote=True),
    # the remote server's own ceiling on this machine: fio straight to a second
    # qemu-nbd on the same host (its own copy, so its writes touch no quorum's child)
    Target("remote-direct", "qemu-nbd alone, fio straight to it", "direct", "remote",
           remote=True),
]
#: the remote rows' targets: the remote pair, the all-local quorum for the ratio, and
#: the two ceilings (nbdquorum with the remote child alone, the remote server alone)
REMOTE_TARGETS = ("nbdq", "nbdq-remote", "qsd-remote", "nbdq-remote-alone", "remote-direct")
#: node name of the remote child in both quorums
REMOTE_CHILD = "remote"


def tls_dirs(out: Path) -> Path:
    """The benchmark's certificates (made once per output directory): server/, client/."""
    where = out / "tls"
    if not (where / "server" / "server-cert.pem").exists():
        sys.path.insert(0, str(ROOT))
        from tests.interop.tls_certs import make_certs

        make_certs(where)
        # fio's nbd engine refuses tls-certificates= in its URI (a local file), so
        # libnbd finds the client's files where it looks by default: $HOME/.pki/libnbd
        (where / "home" / ".pki").mkdir(parents=True, exist_ok=True)
        shutil.copytree(where / "client", where / "home" / ".pki" / "libnbd")
    return where


def server_argv(t: Target, images: list[Path], sock: Path,
                tls: Path | None = None,
                site: bench_remote.RemoteSite | None = None,
                control: Path | None = None) -> list[str]:
    """``tls``: the server certificates' directory (TLS required), None for plaintext."""
    argv = _server_argv(t, images, sock, site, control)
    if tls is None:
        return argv
    if t.kind == "nbdq":
        return [*argv, "--tls-certificates", str(tls)]
    if t.kind == "qsd":
        at = argv.index("--nbd-server")
        argv[at + 1] += ",tls-creds=tls0"
        # verify-peer=off: as nbdquorum without --tls-verify-peer (qsd's default is on)
        creds = f"tls-creds-x509,id=tls0,dir={tls},endpoint=server,verify-peer=off"
        return [*argv[:at], "--object", creds, *argv[at:]]
    raise ValueError(f"no TLS for {t.kind}")


def _server_argv(t: Target, images: list[Path], sock: Path,
                 site: bench_remote.RemoteSite | None = None,
                 control: Path | None = None) -> list[str]:
    if t.mode == "single":
        images = images[:1]
    if t.mode in ("remote", "remote-alone") and site is None:
        raise ValueError(f"{t.id} needs the remote site")
    if t.mode == "remote-alone":
        images = []
    if t.kind == "nbdq":
        argv = [str(VENV_PY), "-m", "nbdquorum", "serve"]
        for i, p in enumerate(images):  # named when the remote child needs a known name
            argv += ["--child", f"c{i}={p}" if t.mode == "remote" else str(p)]
        if t.mode in ("remote", "remote-alone"):
            assert site is not None
            argv += ["--child", f"{REMOTE_CHILD}={site.uri}"]
        if t.mode == "remote-alone":
            argv += ["--vote-threshold", "1"]
        argv += ["--socket", str(sock)]
        if control is not None:
            argv += ["--control", str(control)]
        if t.mode == "fifo":
            argv += ["--read-pattern", "fifo"]
        return argv + list(t.extra)
    if t.kind == "qsd":
        argv = ["qemu-storage-daemon"]
        names = []
        for i, p in enumerate(images):
            argv += ["--blockdev",
                     f"driver=file,node-name=f{i},filename={p},cache.direct=off",
                     "--blockdev", f"driver=raw,node-name=c{i},file=f{i}"]
            names.append(f"c{i}")
        if t.mode == "remote":
            assert site is not None
            argv += ["--blockdev", json.dumps(site.qsd_blockdev(REMOTE_CHILD))]
            names.append(REMOTE_CHILD)
        node = "c0"
        if t.mode != "single":
            q: dict[str, Any] = {"driver": "quorum", "node-name": "q0",
                                 "vote-threshold": len(names) // 2 + 1, "children": names}
            if t.mode == "fifo":
                q["read-pattern"] = "fifo"
            argv += ["--blockdev", json.dumps(q)]
            node = "q0"
        argv += ["--nbd-server", f"addr.type=unix,addr.path={sock}",
                 "--export", f"type=nbd,id=e0,node-name={node},name=disk,writable=on"]
        return argv
    if t.kind == "nbdkit":
        return ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock),
                "--exportname", "disk", "file", str(images[0])]
    raise ValueError(t.kind)


# -- /proc ---------------------------------------------------------------------
def process_tree(pid: int) -> list[int]:
    """The process and its descendants (nbdquorum's worker processes)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process and its descendants, in seconds."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is field 3 (state); utime is field 14, stime 15
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time all cores spent busy (not idle/iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice
    busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + (vals[7] if len(vals) > 7 else 0)
    return busy / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to max_wait s) until the machine is idle: under `threshold` cores busy.

    Returns the busy cores of the last 0.5 s sample.  Other people's test runs
    on a 2-core box otherwise halve one server's CPU and not the other's.
    """
    deadline = time.monotonic() + max_wait
    while True:
        b0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(0.5)
        cores = (system_busy_seconds() - b0) / (time.monotonic() - t0)
        if cores < threshold or time.monotonic() >= deadline:
            return cores


def code_digest() -> str:
    """Hash of the server's code (Python, C, the built extension): did it change mid-run?"""
    h = hashlib.sha256()
    for p in sorted([*ROOT.glob("nbdquorum/**/*.py"), *ROOT.glob("nbdquorum/*.so"),
                     *ROOT.glob("native/*")]):
        with contextlib.suppress(OSError):
            h.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    return h.hexdigest()[:16]


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and Threads summed over the process and its descendants
    (a sum of peaks: at least the peak of the sum)."""
    out: dict[str, int] = {"processes": 0}
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                lines = f.readlines()
        except OSError:
            continue
        out["processes"] += 1
        for line in lines:
            key, _, val = line.partition(":")
            if key in ("VmHWM", "VmRSS", "Threads"):
                n = int(val.split()[0]) * (1024 if key.startswith("Vm") else 1)
                out[key] = out.get(key, 0) + n
    return out


# -- images --------------------------------------------------------------------
def write_random(path: Path, size: int) -> None:
    chunk = 8 << 20
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def copy_file(src: Path, dst: Path) -> None:
    """A real copy (no reflink/copy_file_range sharing), so each child has its own pages."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(8 << 20):
            fo.write(block)


def make_images(d: Path, size: int, ncopies: int, stale: bool, remote: bool = False) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob("*.raw"):
        p.unlink()
    t0 = time.monotonic()
    write_random(d / "c0.raw", size)
    for i in range(1, ncopies):
        copy_file(d / "c0.raw", d / f"c{i}.raw")
    # the one-file targets (qsd raw, nbdkit) get their own copy: their writes
    # must not make c0 differ from c1, c2 under the quorums of later runs
    copy_file(d / "c0.raw", d / "single.raw")
    if stale:
        write_random(d / "stale.raw", size)
    if remote:  # the remote quorum's own copies: its writes never reach c0..c2
        for name in REMOTE_IMAGES:
            copy_file(d / "c0.raw", d / name)
    os.sync()
    print(f"bench: {ncopies + 1} identical images{' + stale' if stale else ''} of "
          f"{size >> 20} MiB in {d} ({time.monotonic() - t0:.1f} s)", flush=True)


def fs_type(d: Path) -> str:
    r = subprocess.run(["stat", "-f", "-c", "%T", str(d)], capture_output=True, text=True,
                       check=False)
    return r.stdout.strip() or "unknown"


def default_image_dir(out: Path, need_bytes: int) -> Path:
    """tmpfs when it has room: the run then measures the servers, not the disk's write-back.

    On a disk file system, 1 GiB images that fio overwrites for 10 s fill the
    dirty-page limit and the writers stall on write-back (the write rows then
    measure the disk), and the page cache may drop image pages between rows.
    """
    shm = Path("/dev/shm")
    if shm.is_dir():
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > need_bytes * 1.5 + (2 << 30):
            return shm / f"nbdquorum-bench-{os.getuid()}"
    return out / "images"


def warm(paths: list[Path]) -> None:
    """Read the images so the row starts with them in the page cache."""
    buf = bytearray(8 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


#: the remote quorums' two local children, and the image qemu-nbd serves
REMOTE_IMAGES = ("r0.raw", "r1.raw", "remote.raw", "direct.raw")


def image_set(d: Path, name: str, target: Target | None = None) -> list[Path]:
    """The local images of a target on a row (a remote target's remote child is not here)."""
    if target is not None and target.mode == "single":
        return [d / "single.raw"]
    if name == "remote":
        if target is not None and target.mode == "remote-alone":
            return []
        if target is not None and target.mode == "remote":
            return [d / REMOTE_IMAGES[0], d / REMOTE_IMAGES[1]]
        return [d / f"c{i}.raw" for i in range(3)]
    if name == "q3":
        return [d / f"c{i}.raw" for i in range(3)]
    if name == "stale":
        return [d / "c0.raw", d / "c1.raw", d / "stale.raw"]
    if name.startswith("n"):
        return [d / f"c{i}.raw" for i in range(int(name[1:]))]
    raise ValueError(name)


# -- servers -------------------------------------------------------------------
class ServerError(Exception):
    pass


def _nbd_greets(sock: Path) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(sock))
        return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def running(argv: list[str], sock: Path, log: Path, timeout: float = 30) -> Iterator[int]:
    """Start a server, wait until it greets on the socket, yield its pid, stop it."""
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    with open(log, "ab") as logf:  # the child keeps its own descriptor
        logf.write(("\n$ " + " ".join(argv) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not (sock.exists() and _nbd_greets(sock)):
            if proc.poll() is not None:
                raise ServerError(f"{argv[0]} exited with {proc.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise ServerError(f"{argv[0]} did not listen on {sock} in {timeout} s; see {log}")
            time.sleep(0.05)
        # let the server see the probe connection close: nbdquorum places a new
        # connection on its least-loaded process, and the probe would count
        time.sleep(0.3)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


@contextlib.contextmanager
def hostile_clients(row: Row, sock: Path, log: Path) -> Iterator[None]:
    """scripts/nbd_hostile.py for the row's hostile clients, ready before fio starts."""
    if not row.hostile:
        yield
        return
    mode, clients, *rest = row.hostile.split(":")
    argv = [str(VENV_PY), str(ROOT / "scripts" / "nbd_hostile.py"), "--socket", str(sock),
            "--mode", mode, "--clients", clients]
    if rest:
        argv += ["--length", rest[0]]
    with open(log, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise ServerError(f"hostile clients did not start ({row.hostile}); see {log}")
        time.sleep(1)  # let the server take what it takes of them
        yield
    finally:
        proc.terminate()
        proc.wait(30)


# -- fio -------------------------------------------------------------------------
def fio_argv(row: Row, sock: Path, runtime: float, out: Path, uri: str | None = None
             ) -> list[str]:
    size = f"--bssplit={row.bssplit}" if row.bssplit else f"--bs={row.bs}"
    local = f"nbd{'s' if row.tls else ''}+unix:///disk?socket={sock}"
    argv = [
        "fio", f"--name={row.id}", "--ioengine=nbd",
        f"--uri={uri or local}",
        f"--rw={row.rw}", size, f"--iodepth={row.iodepth}",
        f"--numjobs={row.numjobs}", "--group_reporting", "--time_based",
        f"--runtime={runtime:g}", "--norandommap", "--randrepeat=0",
        "--output-format=json", f"--output={out}",
    ]
    if row.rwmixread is not None:
        argv.append(f"--rwmixread={row.rwmixread}")
    return argv


def parse_fio(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = json.loads(text[text.index("{"):])  # fio may print a line before the JSON
    job = data["jobs"][0]  # group_reporting: one aggregated job
    if job.get("error"):
        raise ServerError(f"fio reported error {job['error']} (see {path})")
    res: dict[str, Any] = {"ops": 0, "bytes": 0, "iops": 0.0, "bw_bytes": 0.0}
    lat: dict[str, dict[str, float]] = {}
    for d in ("read", "write"):
        j = job[d]
        res["ops"] += j["total_ios"]
        res["bytes"] += j["io_bytes"]
        res["iops"] += j["iops"]
        res["bw_bytes"] += j["bw_bytes"]
        if j["total_ios"]:
            pct = j["clat_ns"].get("percentile", {})
            lat[d] = {
                "p50_us": pct.get("50.000000", 0) / 1000,
                "p99_us": pct.get("99.000000", 0) / 1000,
                "mean_us": j["clat_ns"]["mean"] / 1000,
            }
    # headline latency: reads when the row reads at all (randrw: its 70% reads)
    main = lat.get("read") or lat.get("write") or {"p50_us": 0, "p99_us": 0, "mean_us": 0}
    res.update(p50_us=main["p50_us"], p99_us=main["p99_us"], lat=lat,
               runtime_s=job["read"]["runtime"] / 1000 or job["write"]["runtime"] / 1000,
               mbps=res["bw_bytes"] / 1e6, fio_cpu_pct=job["usr_cpu"] + job["sys_cpu"])
    return res


def run_one(row: Row, target: Target, args: argparse.Namespace, imgdir: Path, out: Path,
            rep: int) -> dict[str, Any]:
    sock = out / "run" / f"{target.id}.sock"
    sock.parent.mkdir(parents=True, exist_ok=True)
    certs = tls_dirs(out) if row.tls else None
    site: bench_remote.RemoteSite | None = args.site
    direct: bench_remote.RemoteSite | None = args.direct_site if target.kind == "direct" else None
    if target.kind == "direct" and direct is None:
        raise ServerError("no second remote server for remote-direct")
    argv = [] if direct else server_argv(target, image_set(imgdir, row.images, target), sock,
                                         certs / "server" if certs is not None else None, site)
    fio_env = {**os.environ, "HOME": str(certs / "home")} if certs is not None else None
    fio_out = out / "fio" / f"{row.id}.{target.id}.{rep}.json"
    fio_out.parent.mkdir(parents=True, exist_ok=True)
    log = out / "logs" / f"{target.id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    os.sync()  # write-back from the previous row should not land in this one
    if args.warm:
        warm(image_set(imgdir, row.images, target))
    t_wait = time.monotonic()
    idle_cores = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    waited = time.monotonic() - t_wait
    serving = (contextlib.nullcontext(direct.pid) if direct is not None
               else running(argv, sock, log))
    with serving as pid:
        st0 = proc_status(pid)
        prof = start_profilers(args, row, target, pid, out)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        b0, f0 = system_busy_seconds(), children_cpu_seconds()
        r0 = cpu_seconds(site.pid) if site is not None and direct is None else 0.0
        with hostile_clients(row, sock, out / "logs" / "hostile.log"):
            fio = subprocess.run(fio_argv(row, sock, args.runtime, fio_out,
                                          direct.uri if direct is not None else None),
                                 env=fio_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 timeout=args.runtime + 60, check=False)
            st1 = proc_status(pid)
        c1, t1 = cpu_seconds(pid), time.monotonic()
        b1, f1 = system_busy_seconds(), children_cpu_seconds()
        r1 = cpu_seconds(site.pid) if site is not None and direct is None else 0.0
        stop_profilers(prof)
    if fio.returncode != 0:
        raise ServerError(f"fio failed ({fio.returncode}) on {row.id}/{target.id}: "
                          f"{fio.stdout.decode(errors='replace')[-800:]}")
    res = parse_fio(fio_out)
    cpu = c1 - c0
    # CPU burnt by anything but this server and this fio (other jobs on a shared
    # machine, and with --profile the profilers): the run's noise indicator
    # (the remote server, running through the remote rows, is not "other")
    remote_cpu = r1 - r0
    other = max(0.0, (b1 - b0) - cpu - (f1 - f0) - remote_cpu)
    if target.mode in ("remote", "remote-alone") and direct is None:
        res.update(remote_cpu_s=remote_cpu,
                   remote_cpu_us_per_op=1e6 * remote_cpu / res["ops"] if res["ops"] else None)
    res.update(
        fio_cpu_s=f1 - f0,
        busy_cores_before=idle_cores,
        waited_quiet_s=round(waited, 1),
        other_cpu_pct=100 * other / (t1 - t0),
        server_cpu_s=cpu,
        server_cpu_pct=100 * cpu / (t1 - t0),
        wall_s=t1 - t0,
        cpu_us_per_op=1e6 * cpu / res["ops"] if res["ops"] else None,
        cpu_s_per_gb=cpu / (res["bytes"] / 1e9) if res["bytes"] else None,
        # the whole machine's CPU (every process and the kernel), what a row costs
        # the two cores in all: the bound on how fast it could go on this machine
        machine_busy_cores=(b1 - b0) / (t1 - t0),
        machine_us_per_op=1e6 * (b1 - b0) / res["ops"] if res["ops"] else None,
        machine_s_per_gb=(b1 - b0) / (res["bytes"] / 1e9) if res["bytes"] else None,
        vmhwm_mib=st1.get("VmHWM", 0) / (1 << 20),
        vmrss_start_mib=st0.get("VmRSS", 0) / (1 << 20),
        threads=st1.get("Threads"),
        processes=st1.get("processes"),
    )
    return res


# -- resync onto the remote child ------------------------------------------------
#: the client load during the resync (and alone, for its unloaded throughput)
RESYNC_FIO = Row("resync-fio", "randrw 70/30 4k QD16", "randrw", "4k", 16, rwmixread=70,
                 images="remote", writes=True, group="remote")
RESYNC_TARGET = next(t for t in TARGETS if t.id == "nbdq-remote")


def _fio_snapshots(path: Path) -> list[tuple[float, int]]:
    """(wall time s, operations so far) of each of fio's --status-interval reports."""
    text = path.read_text() if path.exists() else ""
    dec, i, out = json.JSONDecoder(), 0, []
    while (j := text.find("{", i)) >= 0:
        try:
            obj, i = dec.raw_decode(text, j)
        except ValueError:
            break
        job = obj["jobs"][0]
        out.append((obj["timestamp_ms"] / 1000,
                    int(job["read"]["total_ios"]) + int(job["write"]["total_ios"])))
    return out


def _wait_synced(qmp: Any, deadline: float) -> float:
    """Wait until the remote child is active again (its resync done); the wall time
    its QUORUM_CHILD_STATE_CHANGE says it became so.  Events, not polling: a query
    every few milliseconds would cost the server CPU that the resync then lacks."""
    while True:
        while qmp.events:
            ev = qmp.events.pop(0)
            data = ev.get("data", {})
            if ev.get("event") != "QUORUM_CHILD_STATE_CHANGE" or data.get("node-name") != REMOTE_CHILD:
                continue
            if data["state"] == "active":
                ts = ev["timestamp"]  # QMP's {"seconds", "microseconds"}
                return float(ts["seconds"] + ts["microseconds"] / 1e6)
            if data["state"] == "faulted":
                (st,) = qmp.execute("query-quorum-status")
                child = next(c for c in st["children"] if c["node-name"] == REMOTE_CHILD)
                raise ServerError(f"resync of {REMOTE_CHILD}: faulted, {child.get('resync-error')}")
        if time.monotonic() > deadline:
            raise ServerError(f"resync of {REMOTE_CHILD}: timed out")
        msg = qmp.recv()  # the client's timeout bounds one wait
        if "event" in msg:
            qmp.events.append(msg)


def resync_once(args: argparse.Namespace, imgdir: Path, out: Path, rep: int,
                with_fio: bool) -> dict[str, Any]:
    """One full resync of the remote child (x-quorum-resync full), fio running or not."""
    from nbdquorum.ctl import QMPClient

    site: bench_remote.RemoteSite = args.site
    sock, control = out / "run" / "resync.sock", out / "run" / "resync.qmp"
    sock.parent.mkdir(parents=True, exist_ok=True)
    argv = server_argv(RESYNC_TARGET, image_set(imgdir, "remote", RESYNC_TARGET), sock,
                       site=site, control=control)
    fio_out = out / "fio" / f"resync.{'fio' if with_fio else 'alone'}.{rep}.json"
    fio_out.parent.mkdir(parents=True, exist_ok=True)
    fio_out.unlink(missing_ok=True)
    os.sync()
    wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    with running(argv, sock, out / "logs" / "resync.log") as pid:
        qmp = QMPClient(str(control), timeout=30)
        fio = None
        try:
            if with_fio:
                fa = [*fio_argv(RESYNC_FIO, sock, 600, fio_out), "--status-interval=1"]
                fio = subprocess.Popen(fa, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
                time.sleep(2.5)  # fio connected and in its stride: two snapshots
            qmp.events.clear()
            c0, r0, w0 = cpu_seconds(pid), cpu_seconds(site.pid), time.time()
            b0 = system_busy_seconds()
            qmp.execute("x-quorum-resync", {"node-name": REMOTE_CHILD, "full": True})
            w1 = _wait_synced(qmp, time.monotonic() + 600)
            c1, r1, b1 = cpu_seconds(pid), cpu_seconds(site.pid), system_busy_seconds()
            # the event's time is when the resync ended; the busy time runs to now
            bw = max(time.time() - w0, 1e-3)
            t0, t1 = w0, max(w1, w0 + 1e-3)
            if fio is not None:
                time.sleep(1.2)  # one more snapshot after the end
        finally:
            if fio is not None:
                fio.send_signal(signal.SIGINT)
                try:
                    fio.wait(30)
                except subprocess.TimeoutExpired:
                    fio.kill()
                    fio.wait()
            qmp.close()
    res: dict[str, Any] = {
        "bytes": args.size, "seconds": t1 - t0, "mbps": args.size / 1e6 / (t1 - t0),
        "server_cpu_s_per_gb": (c1 - c0) / (args.size / 1e9),
        "remote_cpu_s_per_gb": (r1 - r0) / (args.size / 1e9),
        "machine_busy_cores": (b1 - b0) / bw,
        "machine_s_per_gb": (b1 - b0) / (args.size / 1e9),
    }
    if with_fio:
        snaps = _fio_snapshots(fio_out)
        # the reports that lie inside the resync: the client's rate while it ran
        inside = [(t, n) for t, n in snaps if w0 <= t <= w1]
        if len(inside) >= 2:
            (ta, na), (tb, nb) = inside[0], inside[-1]
        else:  # a resync shorter than two reports: the ones around it
            before = [x for x in snaps if x[0] <= w0][-1:]
            after = [x for x in snaps if x[0] >= w1][:1]
            if not before or not after:
                raise ServerError(f"fio wrote no reports around the resync ({fio_out})")
            (ta, na), (tb, nb) = before[0], after[0]
        res.update(fio_iops=(nb - na) / (tb - ta), fio_window_s=tb - ta)
    return res


def fio_alone(args: argparse.Namespace, imgdir: Path, out: Path, rep: int) -> dict[str, Any]:
    """The resync's client load without a resync: its unloaded throughput."""
    row = RESYNC_FIO
    return run_one(row, RESYNC_TARGET, args, imgdir, out, rep)


def nbdcopy_once(args: argparse.Namespace, imgdir: Path) -> dict[str, Any]:
    """nbdcopy copying a local image onto the same remote export (what a resync does)."""
    site: bench_remote.RemoteSite = args.site
    src = imgdir / REMOTE_IMAGES[0]  # equal to the remote image: the copy changes nothing
    os.sync()
    wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    r0, t0 = cpu_seconds(site.pid), time.monotonic()
    f0, b0 = children_cpu_seconds(), system_busy_seconds()
    p = subprocess.run(["nbdcopy", "--flush", str(src), site.uri], capture_output=True,
                       text=True, timeout=600, check=False)
    t1, b1 = time.monotonic(), system_busy_seconds()
    if p.returncode != 0:
        raise ServerError(f"nbdcopy failed ({p.returncode}): {p.stderr[-500:]}")
    return {"bytes": args.size, "seconds": t1 - t0, "mbps": args.size / 1e6 / (t1 - t0),
            "nbdcopy_cpu_s_per_gb": (children_cpu_seconds() - f0) / (args.size / 1e9),
            "remote_cpu_s_per_gb": (cpu_seconds(site.pid) - r0) / (args.size / 1e9),
            "machine_busy_cores": (b1 - b0) / (t1 - t0),
            "machine_s_per_gb": (b1 - b0) / (args.size / 1e9)}


def run_resync(args: argparse.Namespace, imgdir: Path, out: Path) -> dict[str, Any]:
    """nbdcopy, the resync alone, fio alone, the resync under fio: A B C D, repeated."""
    runs: dict[str, list[dict[str, Any]]] = {"nbdcopy": [], "resync": [], "fio": [],
                                             "resync_fio": []}
    for rep in range(args.repeat):
        for kind in runs:
            if kind == "nbdcopy":
                res = nbdcopy_once(args, imgdir)
            elif kind == "fio":
                res = fio_alone(args, imgdir, out, rep)
            else:
                res = resync_once(args, imgdir, out, rep, with_fio=kind == "resync_fio")
            runs[kind].append(res)
            thr = (f"{res['iops']:9.0f} IOPS" if kind == "fio" else
                   f"{res['mbps']:7.0f} MB/s in {res['seconds']:5.1f} s"
                   + (f", fio {res['fio_iops']:7.0f} IOPS over {res['fio_window_s']:.1f} s"
                      if kind == "resync_fio" else ""))
            print(f"  resync [{rep + 1}/{args.repeat}] {kind:10} {thr}", flush=True)
    return {k: {"median": median_result(v), "runs": v} for k, v in runs.items()}


# -- profilers ---------------------------------------------------------------------
def start_profilers(args: argparse.Namespace, row: Row, target: Target, pid: int,
                    out: Path) -> list[subprocess.Popen[bytes]]:
    if not args.profile:
        return []
    procs: list[subprocess.Popen[bytes]] = []
    pdir = out / "profile"
    pdir.mkdir(parents=True, exist_ok=True)
    base = pdir / f"{row.id}.{target.id}"
    dur = max(1, int(args.runtime) - 1)
    pyspy = VENV_PY.parent / "py-spy"
    if "py-spy" in args.profile and target.kind == "nbdq":
        if pyspy.exists():
            # raw = collapsed stacks; bench_report summarises them (self and total time)
            procs.append(_spawn(
                [str(pyspy), "record", "--pid", str(pid), "--duration", str(dur),
                 "--rate", "250", "--native", "--threads", "--format", "raw",
                 "-o", f"{base}.pyspy.txt"], Path(f"{base}.pyspy.log")))
        else:
            print("bench: py-spy not installed (.venv/bin/pip install py-spy); skipped")
    if "perf" in args.profile and shutil.which("perf"):
        procs.append(_spawn(
            ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-p", str(pid),
             "-o", f"{base}.perf.data", "--", "sleep", str(dur)], Path(f"{base}.perf.log")))
    return procs


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=f)


def stop_profilers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGINT)
            p.wait(10)


# -- the run ---------------------------------------------------------------------
def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "missing"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) * 1024
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / (1 << 30), 1),
        "kernel": platform.release(),
        "os": _os_release(),
        "python": platform.python_version(),
        "fio": tool_version(["fio", "--version"]),
        "qsd": tool_version(["qemu-storage-daemon", "--version"]),
        "nbdkit": tool_version(["nbdkit", "--version"]),
        "nbdquorum_commit": commit,
    }


def _os_release() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


def parse_size(text: str) -> int:
    units = {"k": 10, "m": 20, "g": 30}
    t = text.strip().lower().rstrip("ib")
    if t and t[-1] in units:
        return int(t[:-1]) << units[t[-1]]
    return int(t)


def select(args: argparse.Namespace) -> tuple[list[Row], list[Target]]:
    # the remote rows run with --remote (then alone), or when --rows names them
    if args.remote:
        rows = [r for r in ROWS if r.group == "remote"]
    else:
        rows = [r for r in ROWS if (args.full or not r.full_only) and r.group != "remote"]
    if args.rows:
        wanted = [w.strip() for w in args.rows.split(",") if w.strip()]
        ids = {r.id for r in ROWS}
        remote_ok = args.remote or any("remote" in w for w in wanted)
        rows = [r for r in ROWS if (r.id in wanted
                or any(w not in ids and w in r.id for w in wanted))
                and (r.group != "remote" or remote_ok)]
        if not rows and not args.resync_only:
            sys.exit(f"bench: no row matches {args.rows!r}; rows: {', '.join(r.id for r in ROWS)}")
    if args.resync_only:
        rows = []
    remote = any(r.group == "remote" for r in rows) or args.remote
    targets = [t for t in TARGETS if (args.full or not t.full_only)
               and (not t.remote or remote)
               and (not remote or args.rows or args.full or t.id in REMOTE_TARGETS)]
    if args.targets:
        wanted = args.targets.split(",")
        targets = [t for t in TARGETS if t.id in wanted]
    if args.profile and not args.targets:
        targets = [t for t in targets if t.kind == "nbdq"]
    # reads before writes: the extra copies (stale, children rows) stay identical
    rows.sort(key=lambda r: r.writes)
    return rows, targets


@dataclass
class Plan:
    rows: list[Row]
    targets: list[Target]
    results: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict)


def targets_for(row: Row, targets: list[Target]) -> list[Target]:
    if row.group == "remote":
        return [t for t in targets if t.id in REMOTE_TARGETS]
    if row.group == "main":
        return [t for t in targets if not t.remote]
    return [t for t in targets if t.id in ("nbdq", "qsd")]


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in runs[0].items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            vals = [r[k] for r in runs if r.get(k) is not None]
            out[k] = statistics.median(vals) if vals else None
        elif v is None:
            out[k] = None
    out["n"] = len(runs)
    return out


def run_matrix(plan: Plan, args: argparse.Namespace, imgdir: Path, out: Path,
               total: int) -> None:
    done = 0
    for row in plan.rows:
        per_target: dict[str, list[dict[str, Any]]] = {}
        for rep in range(args.repeat):
            for t in targets_for(row, plan.targets):
                try:
                    res = run_one(row, t, args, imgdir, out, rep)
                except ServerError as err:
                    if t.kind == "nbdq":
                        raise
                    # a reference server failing a row (qsd drops fio's connections
                    # under the mixed-size load) leaves that cell empty, not the run
                    done += 1
                    print(f"  [{done}/{total}] {row.id:30} {t.id:9} FAILED: {err}", flush=True)
                    continue
                per_target.setdefault(t.id, []).append(res)
                done += 1
                print(f"  [{done}/{total}] {row.id:30} {t.id:9} "
                      f"{res['iops']:9.0f} IOPS {res['mbps']:8.1f} MB/s "
                      f"p50 {res['p50_us']:7.0f} us p99 {res['p99_us']:7.0f} us "
                      f"cpu {res['server_cpu_pct']:4.0f}% "
                      f"{res['cpu_us_per_op']:6.1f} us/op {res['cpu_s_per_gb']:5.2f} s/GB "
                      f"hwm {res['vmhwm_mib']:5.0f} MiB other {res['other_cpu_pct']:3.0f}%",
                      flush=True)
        plan.results[row.id] = per_target


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Re-run rows replace theirs in an earlier results document (same image size)."""
    if old["meta"].get("size") != new["meta"].get("size"):
        sys.exit("bench: --merge: the earlier results used another image size")
    ids = [r.id for r in ROWS]
    rows = {r["id"]: r for r in old["rows"]} | {r["id"]: r for r in new["rows"]}
    old["rows"] = sorted(rows.values(), key=lambda r: ids.index(r["id"]))
    targets = {t["id"]: t for t in old["targets"]} | {t["id"]: t for t in new["targets"]}
    old["targets"] = [asdict(t) for t in TARGETS if t.id in targets]
    for rid, per in new["results"].items():
        old["results"].setdefault(rid, {}).update(per)
    if "resync" in new:
        old["resync"] = new["resync"]
    old["meta"].setdefault("merged", []).append(
        {"date": new["meta"]["date"], "rows": list(new["results"]),
         "code_digest": new["meta"]["code_digest"], "argv": new["meta"]["argv"]})
    return old


def main() -> int:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB images, 3 s a row (smoke run)")
    ap.add_argument("--full", action="store_true",
                    help="all targets (qsd fifo, qsd raw, nbdkit, nbdquorum fifo) and the "
                         "multi-conn and children-count rows")
    ap.add_argument("--size", help="image size (default 1G, --quick 64M)")
    ap.add_argument("--runtime", type=float, help="seconds per fio run (default 10, --quick 3)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per row and target; medians")
    ap.add_argument("--rows", help="only these rows (comma list of ids, or parts of ids; "
                    "see --list)")
    ap.add_argument("--targets", help="only these targets (comma list): "
                    + ",".join(t.id for t in TARGETS))
    ap.add_argument("--out", default=str(ROOT / "bench-out"), help="output dir (bench-out)")
    ap.add_argument("--image-dir", help="where the images go (default OUT/images)")
    ap.add_argument("--keep-images", action="store_true",
                    help="reuse existing images of the right size instead of making fresh ones")
    ap.add_argument("--write-docs", action="store_true",
                    help="regenerate docs/performance.png and the table in docs/performance.md")
    ap.add_argument("--profile", nargs="?", const="py-spy,perf", default="",
                    help="profile nbdquorum alone under each row (py-spy and/or perf); "
                         "output in OUT/profile; the numbers of a profiled run are not "
                         "representative and are written to profile.json, not results.json")
    ap.add_argument("--wait-quiet", type=float, default=30, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes to "
                         "leave the CPUs idle (default 30; 0: do not wait)")
    ap.add_argument("--merge", action="store_true",
                    help="replace only the rows run now in the existing results.json "
                         "(re-run rows a disturbed run got wrong); the docs say which")
    ap.add_argument("--remote", action="store_true",
                    help="the remote-child rows instead of the default matrix: a quorum of two "
                         "local files and qemu-nbd over TCP (in a network namespace when root), "
                         "nbdquorum and qsd, with nbdquorum's all-local quorum for the ratio; "
                         "then the resync measurement (see --no-resync)")
    ap.add_argument("--no-resync", action="store_true",
                    help="with --remote: skip the resync measurement")
    ap.add_argument("--resync-only", action="store_true",
                    help="only the resync measurement (nbdcopy, resync alone, fio alone, "
                         "resync under fio)")
    ap.add_argument("--remote-where", choices=["netns", "localhost"], default="netns",
                    help="where qemu-nbd runs: a network namespace when available (default), "
                         "or 127.0.0.1")
    ap.add_argument("--list", action="store_true", help="list rows and targets, then exit")
    args = ap.parse_args()
    args.size = parse_size(args.size) if args.size else (64 << 20 if args.quick else 1 << 30)
    args.runtime = args.runtime or (3.0 if args.quick else 10.0)
    if args.resync_only:
        args.remote = True
    args.site = args.direct_site = None

    rows, targets = select(args)
    if args.list:
        for r in rows:
            print(f"row    {r.id:32} {r.label}")
        for t in targets:
            print(f"target {t.id:32} {t.label}")
        return 0
    want_resync = args.remote and not args.no_resync
    need_site = want_resync or any(t.remote for t in targets)
    for tool in ("fio", "qemu-storage-daemon") + (("nbdkit",) if any(
            t.kind == "nbdkit" for t in targets) else ()) + (
            ("qemu-nbd",) if need_site else ()) + (("nbdcopy",) if want_resync else ()):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (scripts/install-deps installs it)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("fio", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    need = 3
    for r in rows:
        if r.images.startswith("n"):
            need = max(need, int(r.images[1:]))
    imgdir = (Path(args.image_dir) if args.image_dir
              else default_image_dir(out, (need + 2) * args.size))
    imgdir.mkdir(parents=True, exist_ok=True)
    args.warm = fs_type(imgdir) != "tmpfs"
    have = [imgdir / f"c{i}.raw" for i in range(need)] + [imgdir / "stale.raw",
                                                           imgdir / "single.raw"]
    if need_site:
        have += [imgdir / n for n in REMOTE_IMAGES]
    if not (args.keep_images and all(p.exists() and p.stat().st_size == args.size for p in have)):
        make_images(imgdir, args.size, need, stale=True, remote=need_site)

    digest = code_digest()
    meta = machine_info()
    meta["code_digest"] = digest
    meta.update(image_dir=str(imgdir), image_fs=fs_type(imgdir), size=args.size, runtime_s=args.runtime, repeat=args.repeat, full=args.full,
                quick=args.quick, argv=sys.argv[1:])
    if need_site:
        meta.update(qemu_nbd=tool_version(["qemu-nbd", "--version"]),
                    nbdcopy=tool_version(["nbdcopy", "--version"]))
        (out / "logs").mkdir(parents=True, exist_ok=True)
    total = sum(len(targets_for(r, targets)) for r in rows) * args.repeat
    print(f"bench: {len(rows)} rows, {len(targets)} targets, {total} runs of "
          f"{args.runtime:g} s (about {total * (args.runtime + 1.5) / 60:.1f} min)", flush=True)
    plan = Plan(rows, targets)
    t_start = time.monotonic()
    resync: dict[str, Any] | None = None
    try:
        with contextlib.ExitStack() as stack:
            if need_site:
                args.site = stack.enter_context(bench_remote.remote_site(
                    imgdir / REMOTE_IMAGES[2], out / "logs" / "qemu-nbd.log",
                    use_netns=args.remote_where == "netns"))
                meta["remote_where"] = args.site.where
                if any(t.kind == "direct" for t in targets):
                    args.direct_site = stack.enter_context(bench_remote.remote_site(
                        imgdir / REMOTE_IMAGES[3], out / "logs" / "qemu-nbd-direct.log",
                        beside=args.site))
                print(f"bench: remote child {args.site.uri}: qemu-nbd in {args.site.where}",
                      flush=True)
            run_matrix(plan, args, imgdir, out, total)
            if want_resync:
                print(f"bench: resync of the remote child ({args.size >> 20} MiB), "
                      f"{args.repeat} time(s)", flush=True)
                resync = run_resync(args, imgdir, out)
    finally:
        if not args.keep_images:
            shutil.rmtree(imgdir, ignore_errors=True)
            print(f"bench: removed {imgdir} (--keep-images keeps it)")
    meta["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if code_digest() != digest:
        meta["code_changed_during_run"] = True
        print("bench: WARNING: nbdquorum's code changed during the run; the rows mix versions")


    doc: dict[str, Any] = {
        "meta": meta,
        "rows": [asdict(r) for r in ROWS if r in rows],  # display order
        "targets": [asdict(t) for t in targets],
        "results": {
            rid: {tid: {"median": median_result(runs), "runs": runs} for tid, runs in per.items()}
            for rid, per in plan.results.items()
        },
    }
    if resync is not None:
        doc["resync"] = resync
    name = "profile.json" if args.profile else "results.json"
    # this run alone, before anything else can fail: runs are never lost or clobbered
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / "history").mkdir(exist_ok=True)
    (out / "history" / f"{name[:-5]}-{stamp}.json").write_text(json.dumps(doc, indent=1) + "\n")
    if args.merge and (out / name).exists():
        doc = merge(json.loads((out / name).read_text()), doc)
    doc["verdicts"] = bench_report.verdicts(doc)
    (out / name).write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(bench_report.text_report(doc))
    print(f"\nbench: raw results in {out / name}")
    if args.profile:
        for line in bench_report.profile_summaries(out / "profile"):
            print(line)
    if args.write_docs and not args.profile:
        bench_report.write_docs(doc, ROOT / "docs" / "performance.md",
                                ROOT / "docs" / "performance.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
