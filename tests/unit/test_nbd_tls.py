"""nbd/tls.py without sockets: the option rules, the subject DN, the allow-list."""

from __future__ import annotations

import pytest

from nbdquorum.nbd.protocol import TLSMode
from nbdquorum.nbd.tls import TLSConfig, TLSConfigError, authorized, subject_dn

PEER = {"subject": ((("countryName", "GB"),), (("organizationName", "Example, Ltd"),),
                    (("commonName", "client1"),))}


@pytest.mark.parametrize("mode,certs,mode_out", [
    (None, None, TLSMode.OFF),
    (None, "/d", TLSMode.REQUIRE),  # certificates alone mean require (nbdkit)
    ("on", "/d", TLSMode.ON),
    ("require", "/d", TLSMode.REQUIRE),
    ("off", None, TLSMode.OFF),
])
def test_mode_from_options(mode: str | None, certs: str | None, mode_out: TLSMode) -> None:
    assert TLSConfig.from_options(mode, certs, False, []).mode is mode_out


@pytest.mark.parametrize("mode,certs,verify,authz", [
    ("on", None, False, []),
    ("require", None, False, []),
    ("off", "/d", False, []),
    (None, None, True, []),
    (None, "/d", False, ["CN=x"]),
])
def test_contradictions_are_refused(mode: str | None, certs: str | None, verify: bool,
                                    authz: list[str]) -> None:
    with pytest.raises(TLSConfigError):
        TLSConfig.from_options(mode, certs, verify, authz)


def test_config_survives_the_trip_to_a_worker() -> None:
    cfg = TLSConfig.from_options("on", "/d", True, ["CN=a*", "CN=b"])
    assert TLSConfig.from_json(cfg.to_json()) == cfg


def test_subject_dn_is_rfc4514_most_specific_first() -> None:
    assert subject_dn(PEER) == "CN=client1,O=Example\\, Ltd,C=GB"
    assert subject_dn(None) == "" and subject_dn({}) == ""
    multi = {"subject": ((("commonName", "a"), ("userId", "u")),)}
    assert subject_dn(multi) == "CN=a+UID=u"
    assert subject_dn({"subject": ((("commonName", " #x "),),)}) == "CN=\\ #x\\ "


def test_authorized_exact_and_wildcards() -> None:
    dn = subject_dn(PEER)
    assert authorized(dn, [dn])
    assert authorized(dn, ["CN=nobody", "CN=client1,*"])
    assert authorized(dn, ["CN=client?,O=*,C=GB"])
    assert not authorized(dn, ["CN=client1"])  # exact means the whole DN
    assert not authorized(dn, ["cn=client1,*"])  # case-sensitive
    assert not authorized("", ["CN=*"])
    assert not authorized(dn, [])
