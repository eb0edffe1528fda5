"""TLS for the NBD server: certificates, the SSLContext, reloads, the client DN allow-list.

Certificates are read from one directory laid out as QEMU's ``tls-creds-x509``
and nbdkit read theirs: ``server-cert.pem`` (may hold the chain after the
certificate), ``server-key.pem``, ``ca-cert.pem`` (the CA that signs client
certificates; needed with ``verify_peer``) and the optional ``ca-crl.pem``.
OpenSSL does all of the cryptography (Python's `ssl` module); TLS 1.2 is the
oldest version offered.

`TLSContexts` holds the context new handshakes use; `reload` builds a new one
from the files (SIGHUP), so connections already up keep theirs, and a reload
that fails keeps the old context and says why.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .protocol import TLSMode

log = logging.getLogger(__name__)

#: the files of a certificate directory (QEMU's and nbdkit's names)
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

#: a TLS handshake not finished this many seconds after STARTTLS costs its connection
HANDSHAKE_TIMEOUT = 10.0

#: getpeercert()'s attribute names -> the short names of RFC 4514 (and GnuTLS's DNs)
_SHORT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
    "serialNumber": "serialNumber",
}


class TLSConfigError(Exception):
    """Certificates that cannot be loaded, or options that contradict each other: one line."""


@dataclass(frozen=True)
class TLSConfig:
    """``serve --tls*``: what the server offers and asks of its clients."""

    mode: TLSMode = TLSMode.OFF
    #: the certificate directory (None: TLS off)
    certificates: str | None = None
    #: a client certificate signed by the directory's CA is required
    verify_peer: bool = False
    #: subject DNs (RFC 4514, fnmatch patterns) a client certificate must match one of
    authz_dn: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def from_options(cls, mode: str | None, certificates: str | None, verify_peer: bool,
                     authz_dn: Sequence[str]) -> TLSConfig:
        """nbdkit's rules: certificates alone mean ``require``; ``on`` and ``require``
        need certificates and ``off`` refuses them.  Raises TLSConfigError."""
        default = TLSMode.REQUIRE if certificates else TLSMode.OFF
        tls = default if mode is None else TLSMode(mode)
        if tls is not TLSMode.OFF and not certificates:
            raise TLSConfigError(f"--tls {tls.value} needs --tls-certificates DIR")
        if tls is TLSMode.OFF and certificates:
            raise TLSConfigError("--tls off contradicts --tls-certificates")
        if tls is TLSMode.OFF and (verify_peer or authz_dn):
            raise TLSConfigError("--tls-verify-peer and --tls-authz-dn need TLS "
                                 "(--tls-certificates DIR)")
        if authz_dn and not verify_peer:
            raise TLSConfigError("--tls-authz-dn needs --tls-verify-peer (without it no "
                                 "client certificate is asked for)")
        return cls(tls, certificates, verify_peer, tuple(authz_dn))

    def to_json(self) -> dict[str, Any]:
        """For a worker process's configuration (`from_json` reads it back)."""
        return {"mode": self.mode.value, "certificates": self.certificates,
                "verify_peer": self.verify_peer, "authz_dn": list(self.authz_dn)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TLSConfig:
        return cls(TLSMode(data["mode"]), data.get("certificates"),
                   bool(data.get("verify_peer")), tuple(data.get("authz_dn") or ()))


def _file(directory: str, name: str, required: bool) -> str | None:
    path = os.path.join(directory, name)
    if os.path.exists(path):
        return path
    if required:
        raise TLSConfigError(f"{path}: no such file")
    return None


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    """A server SSLContext from ``cfg.certificates``; raises TLSConfigError naming the file."""
    assert cfg.certificates is not None
    where = cfg.certificates
    if not os.path.isdir(where):
        raise TLSConfigError(f"--tls-certificates {where}: not a directory")
    cert = _file(where, SERVER_CERT, True)
    key = _file(where, SERVER_KEY, True)
    ca = _file(where, CA_CERT, cfg.verify_peer)
    crl = _file(where, CA_CRL, False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    loading = cert
    try:
        ctx.load_cert_chain(str(cert), str(key))
        if cfg.verify_peer:
            loading = ca
            ctx.load_verify_locations(cafile=ca)
            if crl is not None:
                loading = crl
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as err:
        what = f"{cert} / {key}" if loading == cert else loading
        raise TLSConfigError(f"{what}: {getattr(err, 'reason', None) or err}") from err
    return ctx


def client_context(directory: str | None = None) -> ssl.SSLContext:
    """A client SSLContext: the server verified against ``DIR/ca-cert.pem`` (else the
    system's CAs), ``client-cert.pem``/``client-key.pem`` presented when present."""
    ctx = ssl.create_default_context(
        cafile=os.path.join(directory, CA_CERT) if directory else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if directory:
        cert = os.path.join(directory, CLIENT_CERT)
        if os.path.exists(cert):
            ctx.load_cert_chain(cert, os.path.join(directory, CLIENT_KEY))
    return ctx


def subject_dn(peercert: dict[str, Any] | None) -> str:
    """The subject of a certificate (``getpeercert()``) as an RFC 4514 string, most
    specific first: ``CN=client,O=Example,C=GB`` (GnuTLS's and QEMU's spelling)."""
    if not peercert:
        return ""
    rdns = []
    for rdn in reversed(peercert.get("subject", ())):
        rdns.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = "".join("\\" + c if c in ',+"\\<>;' else c for c in value)
    if out.startswith((" ", "#")):
        out = "\\" + out
    if out.endswith(" ") and not out.endswith("\\ "):
        out = out[:-1] + "\\ "
    return out


def authorized(dn: str, patterns: Sequence[str]) -> bool:
    """``dn`` matches one of ``patterns`` (fnmatch, case-sensitive: ``*`` any run of
    characters, ``?`` one, ``[...]`` a set; no wildcard: an exact match)."""
    return any(fnmatch.fnmatchcase(dn, p) for p in patterns)


class TLSContexts:
    """The context new TLS handshakes use, rebuilt from the files on `reload`."""

    def __init__(self, cfg: TLSConfig) -> None:
        self.cfg = cfg
        self.mode = cfg.mode
        #: None while TLS is off
        self.context: ssl.SSLContext | None = (
            server_context(cfg) if cfg.mode is not TLSMode.OFF else None)
        #: reloads that succeeded (tests, logs)
        self.generation = 0

    def reload(self) -> bool:
        """Load the certificates again for new handshakes; False (and the old context
        kept) when they do not load."""
        if self.mode is TLSMode.OFF:
            return True
        try:
            ctx = server_context(self.cfg)
        except TLSConfigError as err:
            log.error("TLS certificates not reloaded, the old ones stay in use: %s", err)
            return False
        self.context = ctx
        self.generation += 1
        log.info("TLS certificates reloaded from %s", self.cfg.certificates)
        return True

    def check_peer(self, peercert: dict[str, Any] | None) -> str | None:
        """None when the client may go on, else why not (the DN allow-list)."""
        if not self.cfg.authz_dn:
            return None
        dn = subject_dn(peercert)
        if authorized(dn, self.cfg.authz_dn):
            return None
        return f"client certificate subject {dn!r} is not in the --tls-authz-dn list"
