"""A plain install serves: sdist, wheel from that sdist, a fresh venv outside the checkout.

What a user does with a release: ``python -m build`` (isolated, the build requirements
from the package index, as pip fetches them), ``pip install`` the wheel into a new venv,
then run ``nbdquorum`` from an unrelated directory.  That directory holds a decoy folder
named nbdquorum whose import fails, so nothing (neither the primary nor its worker) may
import from the current directory; nothing points at the checkout (no PYTHONPATH).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import nbdquorum
from tests.dists import REPO_ROOT, build, source_copy, unpack_sdist, wheel_names
from tests.interop.conftest import (
    CLIENT_TIMEOUT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    free_tcp_port,
    make_image,
    nbd_uri,
    output,
    qemu_io,
    require,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(600)


def _accepts(path: Path, proc: subprocess.Popen[bytes], log: Path) -> bool:
    import socket

    if proc.poll() is not None:
        pytest.fail(f"nbdquorum exited with {proc.returncode} during start-up:\n"
                    f"{log.read_text(errors='replace')}", pytrace=False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def test_an_installed_wheel_serves_from_any_directory(tmp_path: Path) -> None:
    require("qemu-io")
    # sdist, then the wheel from the unpacked sdist alone: the sdist is complete
    out = tmp_path / "dist"
    sdist = build(source_copy(tmp_path / "src"), out, "--sdist")
    wheel = build(unpack_sdist(sdist, tmp_path / "unpacked"), out, "--wheel")
    assert "nbdquorum/worker/main.py" in wheel_names(wheel)

    venv = tmp_path / "venv"
    assert REPO_ROOT not in venv.parents
    proc = run([sys.executable, "-m", "venv", venv], timeout=CLIENT_TIMEOUT)
    assert proc.returncode == 0, output(proc)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = run([venv / "bin" / "pip", "install", "-q", "--disable-pip-version-check", wheel],
               timeout=300, env=env)
    assert proc.returncode == 0, output(proc)

    # an unrelated directory, with a decoy nbdquorum package that must never be imported
    cwd = tmp_path / "elsewhere"
    (cwd / "nbdquorum" / "worker").mkdir(parents=True)
    (cwd / "nbdquorum" / "__init__.py").write_text(
        "raise ImportError('the decoy nbdquorum in the current directory was imported')\n")
    (cwd / "nbdquorum" / "worker" / "__init__.py").write_text("")
    exe = venv / "bin" / "nbdquorum"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True,
                           text=True, timeout=CLIENT_TIMEOUT, check=False)
        return p

    version = cli("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"nbdquorum {nbdquorum.__version__}"
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import nbdquorum; print(nbdquorum.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    images = [make_image(tmp_path / f"{n}.raw") for n in "abc"]
    sock, qmp = cwd / "nbd.sock", cwd / "qmp.sock"
    log = tmp_path / "serve.log"
    metrics = f"http://127.0.0.1:{free_tcp_port()}/metrics"  # prometheus_client is installed too
    argv = [str(exe), "serve", "--workers", "1", "--workers-take-all", "-vv",
            "--socket", str(sock), "--control", str(qmp), "--state-dir", str(cwd / "state"),
            "--metrics", metrics.split("/")[2]]
    for n, image in zip("abc", images, strict=True):
        argv += ["--child", f"{n}={image}"]
    with open(log, "wb") as f:
        server = subprocess.Popen(argv, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: _accepts(sock, server, log), START_TIMEOUT, "the installed server")
        wait_until(lambda: "worker 1 ready" in log.read_text(errors="replace"), START_TIMEOUT,
                   "its worker to report in")
        qemu_io(nbd_uri(sock), "write -P 0x6b 0 1M", "write -P 0x6c 3M 512K")
        qemu_io(nbd_uri(sock), "read -P 0x6b 0 1M", "read -P 0x6c 3M 512K", read_only=True)
        status = cli("ctl", "--control", str(qmp), "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(n in status.stdout for n in "abc"), status.stdout
        with urllib.request.urlopen(metrics, timeout=CLIENT_TIMEOUT) as r:
            scraped = r.read().decode()
        assert "nbdquorum_workers 1.0" in scraped, scraped
        assert 'nbdquorum_child_state{child="a",node="quorum0",state="active"} 1.0' in scraped
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=STOP_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    text = log.read_text(errors="replace")
    assert code == 0, text
    assert "stopped cleanly" in text, text
    assert "1 of 1 worker process(es) running" in text, text
    # the worker served the connections (the -vv line of each one it took)
    assert len(re.findall(r"conn\d+\[w1\]: connected", text)) >= 2, text
    assert "Traceback" not in text and "ImportError" not in text, text
