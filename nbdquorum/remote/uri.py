"""Where a child on another host lives: NBD URIs and QEMU's ``server`` address.

The NBD URI standard (NetworkBlockDevice/nbd doc/uri.md): ``nbd://HOST[:PORT]/EXPORT``
and ``nbd+unix:///EXPORT?socket=PATH``; ``nbds://`` and ``nbds+unix://`` ask for
TLS.  QEMU names the same thing with a SocketAddress (``{"type": "inet",
"host", "port"}`` with the port as a string, or ``{"type": "unix", "path"}``)
and an ``export``.  Both forms become one ``NBDAddress``; its ``uri()`` is the
file name QEMU shows for an nbd node.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_PORT = 10809
SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+tcp", "nbds+tcp")


class AddressError(ValueError):
    """An NBD URI or server address that cannot be used; the text says why."""


@dataclass(frozen=True)
class NBDAddress:
    export: str = ""
    host: str | None = None  # inet
    port: int = DEFAULT_PORT
    path: str | None = None  # unix socket
    tls: bool = False
    #: libnbd's tls-certificates=DIR query parameter (client certificates)
    tls_certificates: str | None = None
    #: the name the server's certificate must carry (QEMU's tls-hostname; default: host)
    tls_hostname: str | None = None

    @property
    def kind(self) -> str:
        return "unix" if self.path is not None else "inet"

    def uri(self) -> str:
        s = "nbds" if self.tls else "nbd"
        export = quote(self.export, safe="")
        if self.path is not None:
            return (f"{s}+unix:///{export}?socket={quote(self.path, safe='/')}"
                    + (f"&tls-certificates={quote(self.tls_certificates, safe='/')}"
                       if self.tls_certificates else ""))
        host = self.host or ""
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        uri = f"{s}://{host}:{self.port}/{export}"
        return uri + (f"?tls-certificates={quote(self.tls_certificates, safe='/')}"
                      if self.tls_certificates else "")

    def server(self) -> dict[str, Any]:
        """QEMU's SocketAddress for this address (the port a string, as QEMU has it)."""
        if self.path is not None:
            return {"type": "unix", "path": self.path}
        return {"type": "inet", "host": self.host, "port": str(self.port)}

    def __str__(self) -> str:
        return self.uri()


def is_uri(text: str) -> bool:
    """Whether a --child value is an NBD URI (a plain path stays a file)."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


def parse_uri(text: str) -> NBDAddress:
    """Raises: AddressError."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise AddressError(f"{text}: not an NBD URI (nbd://HOST[:PORT]/EXPORT or "
                           "nbd+unix:///EXPORT?socket=PATH)")
    tls = scheme.startswith("nbds")
    query = parse_qs(parts.query, keep_blank_values=True)
    for key in query:
        if key not in ("socket", "tls-certificates"):
            raise AddressError(f"{text}: unknown query parameter {key!r}")
    export = unquote(parts.path[1:]) if parts.path.startswith("/") else unquote(parts.path)
    certs = query.get("tls-certificates", [None])[-1]
    if certs is not None and not tls:
        raise AddressError(f"{text}: tls-certificates needs an nbds:// URI")
    if scheme.endswith("+unix"):
        sockets = query.get("socket")
        if not sockets or not sockets[-1]:
            raise AddressError(f"{text}: nbd+unix needs ?socket=PATH")
        if parts.netloc:
            raise AddressError(f"{text}: nbd+unix takes no host")
        return NBDAddress(export=export, path=sockets[-1], tls=tls, tls_certificates=certs)
    if "socket" in query:
        raise AddressError(f"{text}: ?socket= is for nbd+unix:// URIs")
    host = parts.hostname
    if not host:
        raise AddressError(f"{text}: no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError as err:
        raise AddressError(f"{text}: bad port ({err})") from err
    return NBDAddress(export=export, host=host, port=port, tls=tls, tls_certificates=certs)


def from_qapi(server: dict[str, Any], export: str | None, *, tls_dir: str | None = None,
              tls: bool = False, tls_hostname: str | None = None) -> NBDAddress:
    """QEMU's blockdev-add form: ``server`` (SocketAddress) and ``export``; with
    ``tls``, its tls-creds object's directory and tls-hostname.

    Raises: AddressError (with QEMU's wording where QEMU has one).
    """
    kind = server.get("type")
    if kind == "inet":
        host, port = server.get("host"), server.get("port", str(DEFAULT_PORT))
        if not isinstance(host, str) or not host:
            raise AddressError("Parameter 'server.host' is missing")
        try:
            p = int(str(port))
        except ValueError:
            raise AddressError(f"Parameter 'server.port' expects a port number, got '{port}'"
                               ) from None
        if not 0 < p < 65536:
            raise AddressError(f"Port number {port} out of range")
        return NBDAddress(export=export or "", host=host, port=p, tls=tls,
                          tls_certificates=tls_dir, tls_hostname=tls_hostname)
    if kind == "unix":
        path = server.get("path")
        if not isinstance(path, str) or not path:
            raise AddressError("Parameter 'server.path' is missing")
        return NBDAddress(export=export or "", path=path, tls=tls, tls_certificates=tls_dir,
                          tls_hostname=tls_hostname)
    if kind is None:
        raise AddressError("Parameter 'server.type' is missing")
    raise AddressError(f"Parameter 'server.type' does not accept value '{kind}'")


def is_loopback(addr: NBDAddress) -> bool:
    if addr.path is not None:
        return True
    try:
        return ipaddress.ip_address(addr.host or "").is_loopback
    except ValueError:
        return addr.host == "localhost"
