"""Test certificates made with the ``openssl`` command line (the steps docs/tls.md gives).

``make_certs(DIR)`` writes, each in the directory layout QEMU's tls-creds-x509,
nbdkit and libnbd read:

* ``server/``: ``ca-cert.pem``, ``server-cert.pem`` (for localhost and 127.0.0.1),
  ``server-key.pem``: give it to ``serve --tls-certificates``;
* ``client/``: ``ca-cert.pem`` (to verify the server), ``client-cert.pem`` and
  ``client-key.pem`` signed by the same CA, subject ``CN=client1,O=nbdquorum tests``;
* ``client2/``: the same CA, another subject (``CN=client2,O=nbdquorum tests``);
* ``rogue/``: trusts the server's CA, but its client certificate is signed by
  another CA (``CN=rogue,O=elsewhere``);
* ``anon/``: the CA certificate alone (a client without a certificate);
* ``server2/``: a second server certificate from the same CA (a reload test's new one).

Also runnable: ``python -m tests.interop.tls_certs DIR`` (the benchmark uses it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

CLIENT_DN = "CN=client1,O=nbdquorum tests"
CLIENT2_DN = "CN=client2,O=nbdquorum tests"
ROGUE_DN = "CN=rogue,O=elsewhere"

_CA_EXT = ["-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
_SERVER_EXT = ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth\n"
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
_CLIENT_EXT = ("basicConstraints=critical,CA:FALSE\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n")


def _openssl(*args: str | Path) -> None:
    proc = subprocess.run(["openssl", *map(str, args)], capture_output=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed:\n"
                           + proc.stderr.decode(errors="replace"))


def _subj(dn: str) -> str:
    """RFC 4514 (most specific first) -> openssl's -subj (/C=../O=../CN=..)."""
    return "/" + "/".join(reversed(dn.split(",")))


def _ca(work: Path, name: str, dn: str) -> tuple[Path, Path]:
    key, cert = work / f"{name}-key.pem", work / f"{name}-cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", cert, "-days", "30", "-subj", _subj(dn), *_CA_EXT)
    return key, cert


def _leaf(work: Path, ca: tuple[Path, Path], name: str, dn: str, ext: str) -> tuple[Path, Path]:
    key, csr, cert = work / f"{name}-key.pem", work / f"{name}.csr", work / f"{name}-cert.pem"
    extfile = work / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", _subj(dn))
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial",
             "-days", "30", "-out", cert, "-extfile", extfile)
    return key, cert


def _layout(where: Path, ca_cert: Path, role: str | None = None,
            pair: tuple[Path, Path] | None = None) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    shutil.copy(ca_cert, where / "ca-cert.pem")
    if role is not None and pair is not None:
        shutil.copy(pair[1], where / f"{role}-cert.pem")
        shutil.copy(pair[0], where / f"{role}-key.pem")
        (where / f"{role}-key.pem").chmod(0o600)
    return where


def make_certs(root: Path) -> Path:
    """Write the directories above under ``root``; returns ``root``."""
    if shutil.which("openssl") is None:
        raise FileNotFoundError("openssl")
    work = root / "work"
    work.mkdir(parents=True, exist_ok=True)
    ca = _ca(work, "ca", "CN=nbdquorum test CA")
    other = _ca(work, "other-ca", "CN=some other CA")
    _layout(root / "server", ca[1], "server",
            _leaf(work, ca, "server", "CN=localhost,O=nbdquorum tests", _SERVER_EXT))
    _layout(root / "server2", ca[1], "server",
            _leaf(work, ca, "server2", "CN=localhost,O=nbdquorum tests renewed", _SERVER_EXT))
    _layout(root / "client", ca[1], "client", _leaf(work, ca, "client", CLIENT_DN, _CLIENT_EXT))
    _layout(root / "client2", ca[1], "client",
            _leaf(work, ca, "client2", CLIENT2_DN, _CLIENT_EXT))
    _layout(root / "rogue", ca[1], "client", _leaf(work, other, "rogue", ROGUE_DN, _CLIENT_EXT))
    _layout(root / "anon", ca[1])
    return root


if __name__ == "__main__":
    print(make_certs(Path(sys.argv[1])))
