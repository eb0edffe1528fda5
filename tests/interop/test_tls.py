"""TLS (STARTTLS in the NBD handshake) with real clients: nbdinfo, libnbd, qemu-io, qemu-img.

Certificates come from the ``openssl`` command line (tls_certs.py).  What is
checked: TLS works for each client and the data reaches every child; under
``require`` a plaintext client learns nothing (no size, no list) and
NBD_OPT_EXPORT_NAME hangs up; ``on`` serves both; ``--tls-verify-peer`` refuses
certificates of another CA and clients without one, ``--tls-authz-dn`` other
subjects, and the server goes on serving; SIGHUP loads a new server
certificate for new connections while an old connection keeps working; garbage
instead of a ClientHello, a handshake that stops half-way and plaintext sent
after STARTTLS cost only their own connection; worker processes do the same.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from nbdquorum.nbd.client import NBDClient
from nbdquorum.nbd.constants import Cmd
from nbdquorum.nbd.tls import HANDSHAKE_TIMEOUT, client_context
from tests.ci import unavailable
from tests.interop.conftest import (
    MiB,
    Server,
    StartServer,
    assert_identical,
    assert_pattern,
    nbdinfo,
    nbdquorum_cli,
    output,
    qemu_io,
    require,
    require_libnbd,
    run,
    wait_until,
)
from tests.interop.tls_certs import CLIENT2_DN, CLIENT_DN, make_certs

pytestmark = pytest.mark.timeout(120)

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_ERR_TLS_REQD = 1, (1 << 31) + 5


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        unavailable("openssl is not installed")
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_server(start_server: StartServer, certs: Path, *args: str, target: str = "nbdquorum",
               server_dir: Path | None = None) -> Server:
    return start_server(target, listen=True, extra=[
        "--tls-certificates", str(server_dir or certs / "server"), *args])


def nbds(server: Server, client: Path) -> str:
    assert server.listen is not None
    host, port = server.listen
    return f"nbds://{host}:{port}/disk?tls-certificates={client}"


def nbd_plain(server: Server) -> str:
    assert server.listen is not None
    host, port = server.listen
    return f"nbd://{host}:{port}/disk"


def qemu_tls_args(server: Server, client: Path) -> list[str]:
    assert server.listen is not None
    host, port = server.listen
    return ["--object", f"tls-creds-x509,id=tls0,dir={client},endpoint=client",
            "--image-opts",
            f"driver=nbd,host={host},port={port},export=disk,tls-creds=tls0"]


def qemu_io_tls(server: Server, client: Path, *commands: str,
                check: bool = True) -> str:
    argv: list[str] = [require("qemu-io")]
    for c in commands:
        argv += ["-c", c]
    proc = run([*argv, *qemu_tls_args(server, client)])
    text = output(proc)
    if check:
        assert proc.returncode == 0 and "failed" not in text, text
    return text


# --------------------------------------------------------------------------- raw clients


def _recv(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def plain_client(server: Server) -> socket.socket:
    """Connected past the greeting, client flags sent (fixed newstyle, no zeroes)."""
    assert server.listen is not None
    s = socket.create_connection(server.listen, timeout=30)
    _recv(s, 18)
    s.sendall(struct.pack(">I", 3))
    return s


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def reply(s: socket.socket) -> tuple[int, int, bytes]:
    magic, opt, rep, n = struct.unpack(">QIII", _recv(s, 20))
    assert magic == REPLY_MAGIC
    return opt, rep, _recv(s, n)


def starttls(server: Server) -> socket.socket:
    s = plain_client(server)
    s.sendall(option(OPT_STARTTLS))
    assert reply(s)[:2] == (OPT_STARTTLS, REP_ACK)
    return s


def closed_by_server(s: socket.socket, timeout: float) -> bool:
    """The server closed ``s`` (EOF or reset) within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        while s.recv(4096):
            pass
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return True


def server_certificate_subject(server: Server, client: Path) -> dict[str, str]:
    """STARTTLS by hand, then the subject of the certificate the server presented."""
    s = starttls(server)
    with client_context(str(client)).wrap_socket(s, server_hostname="localhost") as t:
        cert = t.getpeercert()
    assert cert
    return {k: v for rdn in cert["subject"] for k, v in rdn}


def tls_size(server: Server, client: Path) -> int | None:
    proc = nbdinfo("--size", nbds(server, client))
    return int(proc.stdout) if proc.returncode == 0 else None


# --------------------------------------------------------------------------- real clients


def test_nbdinfo_and_qemu_over_tls(start_server: StartServer, certs: Path) -> None:
    server = tls_server(start_server, certs)
    proc = nbdinfo("--json", nbds(server, certs / "client"))
    assert proc.returncode == 0, output(proc)
    assert '"TLS": true' in proc.stdout
    qemu_io_tls(server, certs / "client", "write -P 0x5a 1M 1M", "read -P 0x5a 1M 1M")
    for image in server.images:
        assert_pattern(image, MiB, MiB, 0x5A)
    proc = run([require("qemu-img"), "info", *qemu_tls_args(server, certs / "client")])
    assert proc.returncode == 0 and "16 MiB" in proc.stdout, output(proc)
    assert "TLS handshake failed" not in server.stderr()


def test_libnbd_over_tls(start_server: StartServer, certs: Path) -> None:
    nbd = require_libnbd()
    server = tls_server(start_server, certs)
    assert server.listen is not None
    h = nbd.NBD()
    h.set_tls(nbd.TLS_REQUIRE)
    h.set_tls_certificates(str(certs / "client"))
    h.connect_tcp(server.listen[0], str(server.listen[1]))
    assert h.get_tls_negotiated()
    h.pwrite(b"\xa5" * 65536, 3 * MiB)
    assert h.pread(65536, 3 * MiB) == b"\xa5" * 65536
    h.flush()
    h.shutdown()
    assert_identical(server.images)


def test_own_client_over_tls(start_server: StartServer, certs: Path) -> None:
    """NBDClient.connect(tls=...): the STARTTLS a remote child's link would use."""
    server = tls_server(start_server, certs)
    assert server.listen is not None
    host, port = server.listen

    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        client = await NBDClient.connect(reader, writer, "disk",
                                         tls=client_context(str(certs / "client")),
                                         server_hostname="localhost")
        try:
            assert writer.get_extra_info("ssl_object") is not None
            await client.call(Cmd.WRITE, 5 * MiB, 4096, data=b"\x3c" * 4096)
            data = await client.call(Cmd.READ, 5 * MiB, 4096)
            assert isinstance(data, bytes | bytearray | memoryview)
            return bytes(data)
        finally:
            await client.close()

    assert asyncio.run(asyncio.wait_for(go(), 60)) == b"\x3c" * 4096


# --------------------------------------------------------------------------- require / on


def test_require_tells_plaintext_clients_nothing(start_server: StartServer,
                                                 certs: Path) -> None:
    server = tls_server(start_server, certs, "--tls", "require")
    for args in (["--size"], ["--list"], ["--json"]):
        proc = nbdinfo(*args, nbd_plain(server))
        assert proc.returncode != 0, output(proc)
        assert "16777216" not in proc.stdout and "disk" not in proc.stdout, proc.stdout
    proc = qemu_io(nbd_plain(server), "read 0 4k", check=False)
    assert proc.returncode != 0
    # by hand: every option but STARTTLS and ABORT is answered ERR_TLS_REQD
    s = plain_client(server)
    name = struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0)
    for opt, data in ((OPT_LIST, b""), (OPT_INFO, name), (OPT_GO, name)):
        s.sendall(option(opt, data))
        got_opt, rep, _ = reply(s)
        assert (got_opt, rep) == (opt, REP_ERR_TLS_REQD)
    s.sendall(option(OPT_ABORT))
    assert reply(s)[:2] == (OPT_ABORT, REP_ACK)
    s.close()
    # NBD_OPT_EXPORT_NAME has no error reply: the server hangs up, saying nothing
    s = plain_client(server)
    s.sendall(option(OPT_EXPORT_NAME, b"disk"))
    s.settimeout(30)
    assert s.recv(100) == b""
    s.close()
    assert tls_size(server, certs / "client") == 16 * MiB


def test_on_serves_plaintext_and_tls(start_server: StartServer, certs: Path) -> None:
    server = tls_server(start_server, certs, "--tls", "on")
    proc = nbdinfo("--size", nbd_plain(server))
    assert proc.returncode == 0 and int(proc.stdout) == 16 * MiB, output(proc)
    assert tls_size(server, certs / "client") == 16 * MiB
    qemu_io_tls(server, certs / "client", "write -P 0x11 0 64k")
    qemu_io(nbd_plain(server), "read -P 0x11 0 64k")


# --------------------------------------------------------------------------- client certificates


def test_verify_peer_refuses_other_cas_and_no_certificate(start_server: StartServer,
                                                          certs: Path) -> None:
    server = tls_server(start_server, certs, "--tls-verify-peer")
    for refused in ("rogue", "anon"):
        assert tls_size(server, certs / refused) is None, refused
        text = qemu_io_tls(server, certs / refused, "read 0 4k", check=False)
        assert "read 4096/4096" not in text, text
    assert tls_size(server, certs / "client") == 16 * MiB
    qemu_io_tls(server, certs / "client", "write -P 0x22 0 64k", "read -P 0x22 0 64k")
    log = server.stderr()
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in log or "certificate required" in log


def test_authz_dn_allow_list(start_server: StartServer, certs: Path) -> None:
    server = tls_server(start_server, certs, "--tls-verify-peer",
                        "--tls-authz-dn", "CN=nobody", "--tls-authz-dn", "CN=client1,O=*")
    assert tls_size(server, certs / "client") == 16 * MiB
    assert tls_size(server, certs / "client2") is None
    assert f"subject {CLIENT2_DN!r} is not in the --tls-authz-dn list" in server.stderr()
    assert CLIENT_DN not in server.stderr()
    exact = tls_server(start_server, certs, "--tls-verify-peer", "--tls-authz-dn", CLIENT2_DN)
    assert tls_size(exact, certs / "client2") == 16 * MiB
    assert tls_size(exact, certs / "client") is None


# --------------------------------------------------------------------------- reload


def _swap_in(dest: Path, source: Path) -> None:
    for name in ("server-cert.pem", "server-key.pem"):
        shutil.copy(source / name, dest / f".{name}")
        (dest / f".{name}").replace(dest / name)  # each file atomically


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_sighup_reloads_certificates_without_dropping_connections(
        start_server: StartServer, certs: Path, tmp_path: Path, workers: bool) -> None:
    nbd = require_libnbd()
    live = tmp_path / "live-certs"
    shutil.copytree(certs / "server", live)
    extra = ["--workers", "1", "--workers-take-all", "-vv"] if workers else []
    server = tls_server(start_server, certs, *extra, server_dir=live)
    assert server.listen is not None
    old = nbd.NBD()
    old.set_tls(nbd.TLS_REQUIRE)
    old.set_tls_certificates(str(certs / "client"))
    old.connect_tcp(server.listen[0], str(server.listen[1]))
    old.pwrite(b"\x01" * 4096, 0)
    assert server_certificate_subject(server, certs / "client")["organizationName"] == (
        "nbdquorum tests")

    _swap_in(live, certs / "server2")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    want = 2 if workers else 1  # the primary's line, and the worker's
    wait_until(lambda: server.stderr().count("TLS certificates reloaded") >= want, 30,
               "the reload to be logged")
    assert server_certificate_subject(server, certs / "client")["organizationName"] == (
        "nbdquorum tests renewed")
    # the connection made before the reload goes on with its session
    old.pwrite(b"\x02" * 4096, 4096)
    assert old.pread(8192, 0) == b"\x01" * 4096 + b"\x02" * 4096
    old.shutdown()

    # broken files: the reload fails, the certificate in use stays
    (live / "server-key.pem").write_text("not a key\n")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS certificates not reloaded" in server.stderr(), 30,
               "the failed reload to be logged")
    assert server.alive()
    assert tls_size(server, certs / "client") == 16 * MiB


# --------------------------------------------------------------------------- hostile clients


@pytest.mark.parametrize("workers", [False, True], ids=["one-process", "workers"])
def test_bad_handshakes_cost_only_their_connection(start_server: StartServer, certs: Path,
                                                   workers: bool) -> None:
    extra = ["--workers", "1", "--workers-take-all"] if workers else []
    server = tls_server(start_server, certs, *extra)
    # garbage where the ClientHello belongs: that connection is closed at once
    garbage = starttls(server)
    garbage.sendall(b"GET / HTTP/1.1\r\n\r\n" * 20)
    assert closed_by_server(garbage, 30)
    # plaintext right behind STARTTLS (not waiting for its reply): dropped, no ACK
    eager = plain_client(server)
    eager.sendall(option(OPT_STARTTLS) + option(OPT_LIST))
    eager.settimeout(30)
    assert eager.recv(100) == b""
    # a handshake that stops half-way: held open, others are served meanwhile
    half = starttls(server)
    half.sendall(bytes.fromhex("1603010200"))  # a record header, then nothing
    silent = starttls(server)
    t0 = time.monotonic()
    assert tls_size(server, certs / "client") == 16 * MiB
    qemu_io_tls(server, certs / "client", "write -P 0x33 0 64k", "read -P 0x33 0 64k")
    # ... until the handshake timeout closes them
    for s in (half, silent):
        assert closed_by_server(s, HANDSHAKE_TIMEOUT + 30 - (time.monotonic() - t0))
    assert server.alive()
    assert tls_size(server, certs / "client") == 16 * MiB
    # whichever bound ends them first: the TLS handshake's, or the negotiation's
    # (--handshake-timeout, also 10 s, which the TLS handshake is part of)
    log = server.stderr()
    assert ("SSL handshake is taking longer" in log
            or "handshake not finished within" in log), log


def test_workers_serve_tls_and_refuse_plaintext(start_server: StartServer,
                                                certs: Path) -> None:
    server = tls_server(start_server, certs, "--workers", "1", "--workers-take-all", "-vv")
    wait_until(lambda: "worker 1 started" in server.stderr(), 30, "the worker")
    qemu_io_tls(server, certs / "client", "write -P 0x44 2M 1M", "read -P 0x44 2M 1M")
    assert "conn1[w1]" in server.stderr() or "[w1]" in server.stderr()
    assert "TLS up" in server.stderr()
    proc = nbdinfo("--size", nbd_plain(server))
    assert proc.returncode != 0
    for image in server.images:
        assert_pattern(image, 2 * MiB, MiB, 0x44)


# --------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("args,needle", [
    (["--tls", "on"], "--tls on needs --tls-certificates"),
    (["--tls", "require"], "--tls require needs --tls-certificates"),
    (["--tls", "off", "--tls-certificates", "{certs}/server"], "--tls off contradicts"),
    (["--tls-verify-peer"], "need TLS"),
    (["--tls-certificates", "{certs}/server", "--tls-authz-dn", "CN=x"],
     "--tls-authz-dn needs --tls-verify-peer"),
    (["--tls-certificates", "{certs}/nowhere"], "not a directory"),
    (["--tls-certificates", "{certs}/anon"], "server-cert.pem: no such file"),
    (["--tls-certificates", "{certs}/client"], "server-cert.pem: no such file"),
    (["--tls-psk", "keys.psk"], "TLS-PSK is not supported"),
])
def test_bad_tls_options_are_refused_in_one_line(tmp_path: Path, certs: Path,
                                                 args: list[str], needle: str) -> None:
    image = tmp_path / "a.raw"
    image.write_bytes(b"")
    argv: list[Any] = ["serve", "--child", str(image), "--socket", str(tmp_path / "s")]
    argv += [a.format(certs=certs) for a in args]
    proc = nbdquorum_cli(*argv)
    assert proc.returncode == 1, output(proc)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "s").exists()

