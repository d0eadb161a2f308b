"""Interoperability: zones signed by BIND's dnssec-signzone (NSEC, NSEC3, NSEC3 Opt-Out).

Our own fixtures are signed by dnspython and our own NSEC3 builder, so a shared misreading of
an RFC would pass unnoticed. Here BIND 9 signs the zone (RSA/SHA-256 or ECDSA P-256 keys made by
dnssec-keygen), the in-memory upstream serves the signed file as it is, and the validator must
reach the same conclusions. dnssec-keygen and dnssec-signzone are required system programs
(bind9-utils, also used by the lab): a missing one fails the test.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import dns.dnssec
import dns.name
import dns.rcode
import pytest

from resolver.validator.anchors import TrustAnchors
from resolver.validator.response import Security
from tests.dnssec_fixtures import WHEN, Run, World, Zone

ORIGIN = "bind.test."
ZONE = """\
$TTL 3600
@       SOA  ns.example.net. admin.example.net. 1 3600 600 86400 300
@       NS   ns.example.net.
www     A    192.0.2.1
www     AAAA 2001:db8::1
*.wild  A    192.0.2.3
a.b     A    192.0.2.4
alias   CNAME www
sub     NS   ns.example.net.
"""


def _run(argv: list[str], cwd: Path) -> str:
    return subprocess.run(argv, cwd=cwd, check=True, capture_output=True, text=True,
                          timeout=60).stdout


def _stamp(t: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(t))


def bind_world(tmp: Path, algorithm: str, denial: list[str]) -> World:
    (tmp / "zone").write_text(ZONE)
    ksk = _run(["dnssec-keygen", "-q", "-K", str(tmp), "-a", algorithm, "-f", "KSK", ORIGIN],
               tmp).strip()
    _run(["dnssec-keygen", "-q", "-K", str(tmp), "-a", algorithm, ORIGIN], tmp)
    # -P: BIND's own post-signing check uses the real clock; our signatures live around WHEN.
    _run(["dnssec-signzone", "-q", "-S", "-P", "-K", str(tmp), "-o", ORIGIN, "-f", "zone.signed",
          "-s", _stamp(WHEN - 86400), "-e", _stamp(WHEN + 30 * 86400), *denial, "zone"], tmp)
    zone = Zone.from_signed(str(tmp / "zone.signed"), ORIGIN)
    key_text = (tmp / f"{ksk}.key").read_text().split("DNSKEY", 1)[1]
    key = dns.rdata.from_text("IN", "DNSKEY", key_text)
    anchors = TrustAnchors.from_records(
        [(dns.name.from_text(ORIGIN), dns.dnssec.make_ds(ORIGIN, key, "SHA256"))])
    return World({zone.origin: zone}, anchors)


VARIANTS = {
    "nsec-rsa": ("RSASHA256", []),
    "nsec3-ecdsa": ("ECDSAP256SHA256", ["-3", "-", "-H", "0"]),
    "nsec3-optout-salt": ("ECDSAP256SHA256", ["-3", "aabbccdd", "-H", "0", "-A"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bind_signed_zone(tmp_path: Path, variant: str) -> None:
    algorithm, denial = VARIANTS[variant]
    world = bind_world(tmp_path, algorithm, denial)
    optout = "-A" in denial

    def ask(name: str, rdtype: str = "A") -> tuple[Security, int, str]:
        result = Run(world=world).ask(name + ORIGIN, rdtype)
        return result.verdict.security, result.rcode, result.verdict.reason

    assert ask("www.")[0] is Security.SECURE
    assert ask("alias.")[0] is Security.SECURE
    assert ask("x.wild.")[0] is Security.SECURE
    assert ask("www.", "TXT")[:2] == (Security.SECURE, dns.rcode.NOERROR)
    assert ask("b.")[:2] == (Security.SECURE, dns.rcode.NOERROR)  # empty non-terminal
    assert ask("x.wild.", "TXT")[:2] == (Security.SECURE, dns.rcode.NOERROR)
    nx = ask("nope.")
    assert nx[1] == dns.rcode.NXDOMAIN
    # With Opt-Out, an NXDOMAIN whose next closer falls in an opt-out span is not secure.
    assert nx[0] is (Security.INSECURE if optout else Security.SECURE), nx
    sub = ask("sub.", "DS")  # the unsigned delegation: DS denied
    assert sub[0] is (Security.INSECURE if optout else Security.SECURE), sub
