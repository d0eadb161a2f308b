"""ipseckey-resolver inside the lab: our verdicts agree with delv's for every name the lab serves.

Scenario: our resolver runs inside alice on 127.0.0.1:53, with only the lab root's DS as trust
anchor (the built-in IANA anchors off), in both upstream modes: forwarding to the lab's Unbound,
and iterating from the lab root (root_hints = ns-root, no forwarder). For every (name, type)
that lab/topology.py puts in a zone — plus, per zone, the apex SOA/NS/DNSKEY, the zone's DS at
its parent, a name that does not exist and a type that does not exist at an existing name —
we ask our resolver with `dig +dnssec` and ask `delv`, anchored at the same root DS, through the
same Unbound. delv validates by itself (it sets CD), so it is an independent oracle: the outcome
class (AD / plain / SERVFAIL) and the rcode must agree. Then the system stub (`getent hosts`,
glibc, with alice's resolv.conf pointing at us) and plain `dig` must work, every failed
validation must be logged exactly once, and SIGTERM must stop the resolver cleanly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import dns.rcode
import pytest

from lab.probes import Dig
from lab.resolverd import ResolverDaemon
from lab.topology import HOSTS, ZONES, AddressRecords, IpseckeyRecord, TextRecord

if TYPE_CHECKING:
    from lab.core import Lab

pytestmark = pytest.mark.integration

HOST = "alice"
LISTEN = "127.0.0.1"


def lab_cases() -> list[tuple[str, str]]:
    """Every (name, type) the lab serves, plus negative probes per zone."""
    cases: list[tuple[str, str]] = []
    for zone in ZONES.values():
        apex = zone.name

        def fq(owner: str, apex: str = apex) -> str:
            if owner.endswith("."):
                return owner
            return f"{owner}." if apex == "." else f"{owner}.{apex}"

        cases += [(apex, "SOA"), (apex, "NS"), (apex, "DNSKEY")]
        if zone.parent is not None:
            cases.append((apex, "DS"))
        for rec in zone.records:
            if isinstance(rec, AddressRecords):
                cases += [(fq(rec.owner), "A"), (fq(rec.owner), "AAAA")]
            elif isinstance(rec, IpseckeyRecord):
                cases.append((fq(rec.owner), "IPSECKEY"))
            elif isinstance(rec, TextRecord):
                cases.append((fq(rec.owner), rec.text.split()[0]))
        cases.append((fq("no-such-name-4711"), "A"))  # NXDOMAIN
        if zone.records:
            cases.append((fq(zone.records[0].owner), "TXT"))  # NODATA
    return list(dict.fromkeys(cases))


def delv_anchor(ds_file: Path, out: Path) -> Path:
    """delv wants a `trust-anchors { }` clause; the lab gives a DS line."""
    words = ds_file.read_text().split()
    i = words.index("DS")
    tag, alg, digest_type = words[i + 1:i + 4]
    digest = "".join(words[i + 4:])
    out.write_text(f'trust-anchors {{ "{words[0]}" static-ds {tag} {alg} {digest_type} '
                   f'"{digest}"; }};\n')
    return out


def delv_outcome(lab: Lab, anchor: Path, name: str, rdtype: str) -> tuple[str, str]:
    """(class, rcode) as delv sees it: class AD / plain / SERVFAIL."""
    out = lab.exec(HOST, ["delv", f"@{lab.unbound_addr}", "-a", str(anchor), "+root=.",
                          name, rdtype], check=False, timeout=30)
    text = out.stdout + out.stderr
    rcode = "NXDOMAIN" if "ncache nxdomain" in text else "NOERROR"
    if "; fully validated" in text or "; negative response, fully validated" in text:
        return "AD", rcode
    if "; unsigned answer" in text or "; negative response, unsigned answer" in text:
        return "plain", rcode
    assert "resolution failed" in text, f"delv said something unexpected:\n{text}"
    return "SERVFAIL", "SERVFAIL"


def dig(lab: Lab, *args: str) -> Dig:
    """dig at our resolver, with dig's default output (EDE and every section)."""
    return lab.dig(HOST, *args, server=LISTEN, options=("+time=5", "+tries=1"), check=False)


def our_outcome(lab: Lab, name: str, rdtype: str) -> tuple[str, str]:
    d = dig(lab, "+dnssec", name, rdtype)
    assert d.status and d.flags, f"no answer from our resolver for {name} {rdtype}:\n{d.text}"
    if d.status == "SERVFAIL":
        return "SERVFAIL", "SERVFAIL"
    return ("AD" if d.ad else "plain"), d.status


# [upstream] per mode: forward to the lab Unbound, or iterate from the lab root, no forwarder,
# or auto (the default): Unbound passes the DNSSEC probe, so auto forwards to it.
UPSTREAM = {"forward": {"mode": "forward"},
            "iterate": {"mode": "iterate", "servers": [],
                        "root_hints": [HOSTS[ZONES["."].server].v4]},
            "auto": {"mode": "auto", "root_hints": [HOSTS[ZONES["."].server].v4]}}


@pytest.fixture(scope="module", params=sorted(UPSTREAM))
def resolver(lab: Lab, request: pytest.FixtureRequest) -> Iterator[Path]:
    """Our resolver (no tunnels: plain validating) running in alice; yields its log file;
    SIGTERM must end it with 0."""
    shutil.rmtree(lab.run_dir / "resolver-lab", ignore_errors=True)
    daemon = ResolverDaemon(lab, HOST, name="resolver-lab", tunnels=False,
                            sections={"upstream": UPSTREAM[request.param]})
    daemon.start(timeout=15)
    try:
        answer = daemon.query("example.test.", "SOA")
        assert answer.rcode() == dns.rcode.NOERROR, f"{answer}\n{daemon.tail()}"
        yield daemon.log
    finally:
        code = daemon.stop()
    assert code == 0, f"exit status {code} (None: ignored SIGTERM):\n{daemon.tail(60)}"
    if request.param == "auto":
        # The broken zones' bogus answers made it probe Unbound again now and then; Unbound
        # passed every time, so auto never left it: one switch line, at start.
        switches = [line for line in daemon.log.read_text().splitlines()
                    if "event=upstream-switch " in line]
        assert len(switches) == 1 and "path=forward" in switches[0], switches


def test_every_lab_name_agrees_with_delv(lab: Lab, resolver: Path, tmp_path: Path) -> None:
    anchor = delv_anchor(lab.root_anchor_file, tmp_path / "delv.anchor")
    cases = lab_cases()
    assert len(cases) > 40
    disagreements = []
    seen = {"AD": 0, "plain": 0, "SERVFAIL": 0}
    for name, rdtype in cases:
        theirs = delv_outcome(lab, anchor, name, rdtype)
        ours = our_outcome(lab, name, rdtype)
        seen[ours[0]] += 1
        if ours != theirs:
            disagreements.append(f"{name} {rdtype}: ours {ours}, delv {theirs}")
    assert not disagreements, "\n".join(disagreements) + "\n" + resolver.read_text()[-3000:]
    # The lab has all three outcomes; a run that saw only one proves little.
    assert all(seen.values()), seen


def test_expectations_ede_and_one_log_line_per_failure(lab: Lab, resolver: Path) -> None:
    out = dig(lab, "+dnssec", "host.badsig.test.", "IPSECKEY")
    assert out.status == "SERVFAIL" and "EDE: 6 (DNSSEC Bogus)" in out.text
    out = dig(lab, "+dnssec", "host.expired.test.", "IPSECKEY")
    assert out.status == "SERVFAIL" and "EDE: 7 (Signature Expired)" in out.text
    for _ in range(3):  # cached as bogus: no new validation, no new log line
        dig(lab, "host.badsig.test.", "IPSECKEY")
    lines = [ln for ln in resolver.read_text().splitlines()
             if "event=validation-failed name=host.badsig.test. type=IPSECKEY" in ln]
    assert len(lines) == 1, lines
    # A CD=1 client gets the data unvalidated, without AD.
    out = dig(lab, "+dnssec", "+cd", "host.badsig.test.", "IPSECKEY")
    assert out.status == "NOERROR" and not out.ad, out.text
    # A client without DO or AD gets no RRSIGs and no AD (dig sets AD by default); with AD, AD.
    out = dig(lab, "+noedns", "+noadflag", "bob.example.test.", "IPSECKEY")
    assert out.status == "NOERROR" and "RRSIG" not in out.text
    assert not out.ad, out.text
    out = dig(lab, "+adflag", "+noedns", "bob.example.test.", "IPSECKEY")
    assert out.ad, out.text
    # TCP works and repeats the answer from the wire cache.
    out = dig(lab, "+tcp", "+dnssec", "bob.example.test.", "A")
    assert out.status == "NOERROR" and "198.51.100.11" in out.text


def test_system_stub_resolves_through_us(lab: Lab, resolver: Path) -> None:
    lab.set_resolv_conf(HOST, f"nameserver {LISTEN}\noptions attempts:1 timeout:3\n")
    try:
        out = lab.exec(HOST, ["getent", "hosts", "bob.example.test"], check=False)
        assert out.returncode == 0, out
        assert "198.51.100.11" in out.stdout or "2001:db8:100::11" in out.stdout
        out = lab.exec(HOST, ["getent", "ahostsv4", "carol.example.test"], check=False)
        assert out.returncode == 0 and "198.51.100.12" in out.stdout, out
        # Bogus data never reaches the application: SERVFAIL, getent fails.
        out = lab.exec(HOST, ["getent", "ahostsv4", "host.expired.test"], check=False)
        assert out.returncode != 0 and "198.51.100" not in out.stdout
        # dig without @server uses resolv.conf too.
        out = lab.exec(HOST, ["dig", "+short", "dave.example.test", "A"], check=False)
        assert out.stdout.strip() == "198.51.100.13"
    finally:
        lab.clear_resolv_conf(HOST)
